"""GGUF (llama.cpp) files of the Llama architecture -> the HDF5 weight file.

Tensors are dequantized to float32 with `gguf.quants.dequantize` (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1 and the K-quants Q2_K…Q6_K). llama.cpp's converter permutes the rows of the q and k
projections (interleaved RoPE pairs); `unpermute_qk` restores the Hugging Face layout
(rotate_half pairs), which is what `rshard_hpc.models.llama` computes with.

The tokenizer (byte-level BPE, `tokenizer.ggml.model == "gpt2"`) is rebuilt as a Hugging Face
tokenizer.json from the vocabulary, merges and token types in the file, with the pre-tokenizer that
`tokenizer.ggml.pre` names (llama.cpp's table). Control tokens become special added tokens. A BOS
token is prepended by the post-processor only when the file sets `tokenizer.ggml.add_bos_token`
(SmolLM2 does not: `encode(text)` then equals `encode(text, add_special_tokens=False)`, which is
also what transformers' tokenizer for the GGUF gives).

For `tokenizer.ggml.pre == "smollm"` we follow llama.cpp (and SmolLM2's own tokenizer.json): every
digit is split off before the GPT-2 regex. transformers' GGUF loader has no "smollm" entry and uses
the bare GPT-2 regex; the two differ only where a run of 2+ whitespace characters precedes a digit
("a  1": ours "a" "ĠĠ" "1", transformers "a" "Ġ" "Ġ" "1").
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rshard_hpc.errors import InputError
from rshard_hpc.models import weights
from rshard_hpc.models.config import ModelConfig

SUPPORTED_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

LAYER_NAMES = {
    "attn_norm": "attn_norm_w", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
    "ffn_norm": "mlp_norm_w", "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down",
}
TOP_NAMES = {"token_embd": "embed/word", "output_norm": "final_norm/w", "output": "lm_head/w"}

# Pre-tokenizer regexes (the Split that precedes byte-level mapping), by `tokenizer.ggml.pre`.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    # GPT-2 byte-level regex (tokenizers' ByteLevel(use_regex=True) is exactly this)
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    # llama.cpp splits off every digit (\p{N}) first, then applies the GPT-2 regex: the same as the
    # SmolLM/StarCoder tokenizer.json's Digits(individual_digits) + ByteLevel
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2", "command-r": "digits+gpt2",
    "codeshell": "digits+gpt2", "exaone": "digits+gpt2", "minerva-7b": "digits+gpt2",
    "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT,
    "falcon3": LLAMA3_SPLIT, "dbrx": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT,
}
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


# ---------------------------------------------------------------- tensors

def dequantize_tensor(data: np.ndarray, qtype) -> np.ndarray:
    """Raw GGUF tensor data (as GGUFReader gives it) -> float32 array in NumPy (row-major) order.

    ggml lists dimensions innermost first; the reader's data (and this result) is already
    outermost first, i.e. (rows, cols) = (out, in) for a weight matrix, as Hugging Face stores it."""
    import gguf

    qtype = gguf.GGMLQuantizationType(qtype)
    if qtype.name not in SUPPORTED_QTYPES:
        raise InputError(f"GGUF tensor type {qtype.name} is not supported ({', '.join(SUPPORTED_QTYPES)})")
    try:
        out = gguf.quants.dequantize(np.asarray(data), qtype)
    except NotImplementedError as exc:
        raise InputError(f"GGUF tensor type {qtype.name} cannot be dequantized ({exc})") from exc
    return np.ascontiguousarray(out, dtype=np.float32)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (per head: rows [a0 b0 a1 b1 …] -> [a0 a1 … b0 b1 …]).

    llama.cpp wrote w.reshape(H, 2, D/2, …).swapaxes(1, 2); this is the inverse."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_key(name: str):
    """GGUF tensor name -> our key, or None for tensors we do not use."""
    base = name[:-len(".weight")] if name.endswith(".weight") else name
    if base in TOP_NAMES:
        return TOP_NAMES[base]
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return weights.layer_key(int(parts[1]), LAYER_NAMES[parts[2]])
    return None


# ---------------------------------------------------------------- metadata

def _field_value(field):
    """A GGUFReader field as a Python value (str, int, float, bool or list of those).

    Decoded from `field.types/parts/data` directly, which every gguf-py version since 0.6 has."""
    import gguf

    types = list(field.types)
    if not types:
        return None

    def one(kind, part):
        if kind == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        value = part.tolist()[0]
        return bool(value) if kind == gguf.GGUFValueType.BOOL else value

    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) != 2:  # nested arrays: not used by Llama files
            return None
        return [one(types[1], field.parts[i]) for i in field.data]
    return one(types[0], field.parts[field.data[0]])


def _fields(reader) -> dict:
    """All metadata as Python values."""
    return {key: _field_value(field) for key, field in reader.fields.items()}


def _int_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


# ---------------------------------------------------------------- tokenizer

def _byte_spelling() -> dict:
    """byte -> the character GPT-2's byte-level mapping writes for it."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    spelling = {b: chr(b) for b in visible}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _byte_alphabet() -> set:
    return set(_byte_spelling().values())


def _pre_tokenizer(pre: str) -> dict:
    kind = PRE_TOKENIZERS.get(pre)
    if kind is None:
        raise InputError(f"GGUF pre-tokenizer {pre!r} is not supported ({', '.join(sorted(PRE_TOKENIZERS))})")
    byte_level_regex = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if kind == "gpt2":
        return byte_level_regex
    if kind == "digits+gpt2":
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                       byte_level_regex]}
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": kind}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}


def build_tokenizer_json(meta: dict) -> str:
    """A Hugging Face tokenizer.json (byte-level BPE) from GGUF tokenizer metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise InputError(f"GGUF tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' only)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = _int_list(meta.get("tokenizer.ggml.token_type")) or [1] * len(tokens)
    merges = [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges", [])]
    alphabet = _byte_alphabet()
    added = []
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        # a control token spelled outside the byte alphabet would be unreachable by BPE: keep it whole
        if kind == TOKEN_TYPE_CONTROL or kind == TOKEN_TYPE_USER_DEFINED:
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == TOKEN_TYPE_CONTROL})
    # a plain token spelled outside the byte alphabet is respelled byte-wise, as BPE would spell it
    spelling = _byte_spelling()
    vocab = {}
    for i, tok in enumerate(tokens):
        if not set(tok) <= alphabet and types[i] not in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        bos_tok = tokens[int(bos)]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos_tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos_tok: {"id": bos_tok, "ids": [int(bos)], "tokens": [bos_tok]}}}
    else:
        post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    data = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default"))),
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    return json.dumps(data, ensure_ascii=False)


# ---------------------------------------------------------------- conversion

def read_gguf(path):
    """(ModelConfig, tensors {key: float32}, tokenizer.json string) of a Llama GGUF file."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path} is not a readable GGUF file ({exc})") from exc
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise InputError(f"{path}: GGUF architecture {arch!r} is not supported (llama)")

    def get(key, default=None):
        return meta.get(f"llama.{key}", default)

    lacking = [f"llama.{k}" for k in ("embedding_length", "block_count", "attention.head_count",
                                      "feed_forward_length") if get(k) is None]
    if lacking:
        raise InputError(f"{path}: GGUF metadata lacks {', '.join(lacking)}")
    for t in reader.tensors:  # fail before any slow work
        if _tensor_key(t.name) is not None and gguf.GGMLQuantizationType(t.tensor_type).name not in SUPPORTED_QTYPES:
            raise InputError(f"{path}: tensor {t.name} has type {gguf.GGMLQuantizationType(t.tensor_type).name}, "
                             f"not supported ({', '.join(SUPPORTED_QTYPES)})")
    tokenizer_json = build_tokenizer_json(meta)

    hidden, n_layers = int(get("embedding_length")), int(get("block_count"))
    n_heads = int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_heads))
    head_dim = int(get("attention.key_length", hidden // n_heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise InputError(f"{path}: partial RoPE (rope.dimension_count != head_dim) is not supported")
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none") and "rope_freqs.weight" not in [t.name for t in reader.tensors]:
        raise InputError(f"{path}: rope scaling {scaling!r} is not supported")

    tensors, extra = {}, {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            extra["rope_freq_factors"] = dequantize_tensor(t.data, t.tensor_type).reshape(-1).tolist()
            continue
        key = _tensor_key(t.name)
        if key is None:
            continue
        tensors[key] = dequantize_tensor(t.data, t.tensor_type)

    tokens = meta.get("tokenizer.ggml.tokens") or []
    tie = "lm_head/w" not in tensors
    expected = ["embed/word", "final_norm/w"] + [weights.layer_key(i, n) for i in range(n_layers)
                                                 for n in LAYER_NAMES.values()]
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise InputError(f"{path}: GGUF lacks tensors for {', '.join(missing[:5])}")
    vocab_size = int(tensors["embed/word"].shape[0])
    if len(tokens) > vocab_size:
        raise InputError(f"{path}: the tokenizer has {len(tokens)} tokens, the embedding {vocab_size} rows")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = _int_list(meta.get("tokenizer.ggml.eos_token_id"))
    for extra_eos in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        for i in _int_list(meta.get(extra_eos)):
            if i not in eos:
                eos.append(i)
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and int(i) < len(tokens):
            special[name] = tokens[int(i)]
    extra["special_tokens"] = special
    if meta.get("general.name"):
        extra["gguf_name"] = str(meta["general.name"])
    cfg = ModelConfig(
        arch="llama", name=path.stem, hidden=hidden, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, intermediate=int(get("feed_forward_length")),
        vocab_size=vocab_size, max_positions=int(get("context_length", 2048)), norm="rmsnorm",
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), act="silu", causal=True,
        rope_theta=float(get("rope.freq_base", 10000.0)), tie_embeddings=tie,
        max_seq_length=0, bos_token_id=int(bos) if bos is not None else -1, eos_token_ids=tuple(eos),
        chat_template=str(meta.get("tokenizer.chat_template") or ""), extra=extra,
    )
    weights.check_tensors(cfg, tensors, path)  # shapes against the metadata, no NaN or Inf: before any reshape
    for key, w in tensors.items():
        if key.endswith(("/wq", "/wk")):
            tensors[key] = unpermute_qk(w, n_heads if key.endswith("/wq") else n_kv)
    return cfg, tensors, tokenizer_json


def convert_gguf(path, out, stage=lambda name: None) -> Path:
    """The GGUF file at `path` as the HDF5 weight file `out`; stage(name) is told each of the two stages."""
    stage(f"reading and dequantizing {Path(path).name} (stage 1/2)")
    cfg, tensors, tokenizer_json = read_gguf(path)
    stage(f"writing {Path(out).name} (stage 2/2)")
    weights.write_weights(out, cfg, {"json": tokenizer_json}, tensors, source=path)
    return Path(out)
