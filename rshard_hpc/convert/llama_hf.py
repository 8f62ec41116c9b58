"""Hugging Face Llama folders (config.json, *.safetensors, tokenizer files) -> ModelConfig + tensors.

Tensor names map to `rshard_hpc.models.llama`'s keys in Hugging Face orientation (out, in), so
nothing is transposed or permuted. F32, F16 and BF16 safetensors are read with NumPy alone.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from rshard_hpc.errors import InputError
from rshard_hpc.models import weights
from rshard_hpc.models.config import ModelConfig

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm_w", "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "mlp_norm_w", "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up", "mlp.down_proj.weight": "w_down",
}
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path: Path, wanted=None) -> dict:
    """{name: float32 array} from one .safetensors file (F32, F16, F64, BF16), names filtered by `wanted`."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        except (struct.error, ValueError) as exc:
            raise InputError(f"{path} is not a safetensors file ({exc})") from exc
        base = 8 + size
        out = {}
        for name, info in header.items():
            if name == "__metadata__" or (wanted is not None and name not in wanted):
                continue
            start, end = info["data_offsets"]
            f.seek(base + start)
            raw = f.read(end - start)
            dtype, shape = info["dtype"], tuple(info["shape"])
            if dtype == "BF16":
                bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
                arr = bits.view(np.float32)
            elif dtype in _DTYPES:
                arr = np.frombuffer(raw, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<")).astype(np.float32)
            else:
                raise InputError(f"{path}: tensor {name} has unsupported dtype {dtype} (F32, F16, BF16)")
            out[name] = arr.reshape(shape)
    return out


def _json(path: Path):
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from exc


def _ids(value) -> list:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _token_text(value):
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, tok_cfg: dict) -> str:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    template = tok_cfg.get("chat_template") or ""
    chat_json = _json(folder / "chat_template.json")
    if not template and chat_json:
        template = chat_json.get("chat_template", "")
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), "")
    return template or ""


def _rope(hf: dict, folder: Path):
    """(rope_theta, rope_scaling or None) from a transformers 4.x or 5.x config."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = (scaling or params).get("rope_type", (scaling or params).get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "llama3":
        return float(theta), dict(scaling or params)
    raise InputError(f"{folder}: rope type {kind!r} is not supported (default, llama3)")


def llama_from_hf(folder, hf: dict):
    """(ModelConfig, {key: float32 array}) of a Hugging Face LlamaForCausalLM folder."""
    folder = Path(folder)
    if hf.get("hidden_act", "silu") != "silu":
        raise InputError(f"{folder}: hidden_act {hf.get('hidden_act')!r} is not supported (silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise InputError(f"{folder}: attention/MLP biases are not supported for Llama")
    hidden, n_layers = int(hf["hidden_size"]), int(hf["num_hidden_layers"])
    n_heads = int(hf["num_attention_heads"])
    n_kv = int(hf.get("num_key_value_heads") or n_heads)
    head_dim = int(hf.get("head_dim") or hidden // n_heads)
    theta, scaling = _rope(hf, folder)
    tie = bool(hf.get("tie_word_embeddings", False))

    names = {"model.embed_tokens.weight": "embed/word", "model.norm.weight": "final_norm/w"}
    if not tie:
        names["lm_head.weight"] = "lm_head/w"
    for i in range(n_layers):
        for src, short in LAYER_NAMES.items():
            names[f"model.layers.{i}.{src}"] = weights.layer_key(i, short)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder} holds no *.safetensors file")
    src = {}
    for f in files:
        src.update(read_safetensors(f, wanted=names))
    missing = [name for name in names if name not in src]
    if missing == ["lm_head.weight"] and "model.embed_tokens.weight" in src:
        tie, missing = True, []
        del names["lm_head.weight"]
    if missing:
        raise InputError(f"{folder}: safetensors lack {', '.join(missing[:5])}")
    tensors = {key: np.ascontiguousarray(src[name], dtype=np.float32) for name, key in names.items()}

    tok_cfg = _json(folder / "tokenizer_config.json") or {}
    gen_cfg = _json(folder / "generation_config.json") or {}
    bos = gen_cfg.get("bos_token_id", hf.get("bos_token_id"))
    eos = _ids(gen_cfg.get("eos_token_id", hf.get("eos_token_id")))
    special = {name: _token_text(tok_cfg.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    extra = {"special_tokens": {k: v for k, v in special.items() if v is not None}}
    if scaling:
        extra["rope_scaling"] = scaling
    cfg = ModelConfig(
        arch="llama", name=hf.get("_name_or_path") or folder.name, hidden=hidden, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, intermediate=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]), max_positions=int(hf.get("max_position_embeddings", 2048)),
        norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), act="silu", causal=True,
        rope_theta=theta, tie_embeddings=tie, max_seq_length=0,
        bos_token_id=int(bos) if bos is not None else -1, eos_token_ids=tuple(eos),
        chat_template=_chat_template(folder, tok_cfg), extra=extra,
    )
    return cfg, tensors
