"""Hugging Face safetensors folders (config.json, tokenizer.json, sentence-transformers files) -> HDF5."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rshard_hpc.errors import InputError
from rshard_hpc.models import weights
from rshard_hpc.models.config import ModelConfig

BERT_LAYER_NAMES = {
    "attention.self.query.weight": "wq", "attention.self.query.bias": "bq",
    "attention.self.key.weight": "wk", "attention.self.key.bias": "bk",
    "attention.self.value.weight": "wv", "attention.self.value.bias": "bv",
    "attention.output.dense.weight": "wo", "attention.output.dense.bias": "bo",
    "attention.output.LayerNorm.weight": "attn_norm_w", "attention.output.LayerNorm.bias": "attn_norm_b",
    "intermediate.dense.weight": "w_up", "intermediate.dense.bias": "b_up",
    "output.dense.weight": "w_down", "output.dense.bias": "b_down",
    "output.LayerNorm.weight": "mlp_norm_w", "output.LayerNorm.bias": "mlp_norm_b",
}
BERT_EMBED_NAMES = {
    "embeddings.word_embeddings.weight": "embed/word",
    "embeddings.position_embeddings.weight": "embed/position",
    "embeddings.token_type_embeddings.weight": "embed/token_type",
    "embeddings.LayerNorm.weight": "embed/norm_w",
    "embeddings.LayerNorm.bias": "embed/norm_b",
}


def _read_json(path: Path, required=True):
    if not path.exists():
        if required:
            raise InputError(f"{path} is missing")
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from exc


def load_safetensors(folder: Path) -> dict:
    from safetensors.numpy import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder} holds no *.safetensors file")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def tokenizer_json_plain(folder: Path) -> str:
    """tokenizer.json with its fixed truncation and padding removed: rshard applies its own limit."""
    data = _read_json(folder / "tokenizer.json")
    data["truncation"] = None
    data["padding"] = None
    return json.dumps(data)


def _pooling(folder: Path) -> tuple[str, bool, int]:
    """(pooling, normalize, max_seq_length) from the sentence-transformers files, if any."""
    modules = _read_json(folder / "modules.json", required=False) or []
    pooling, normalize = "none", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            cfg = _read_json(folder / module.get("path", "") / "config.json")
            if cfg.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            elif cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            else:
                raise InputError(f"{folder}: unsupported pooling {cfg}")
        if kind.endswith("Normalize"):
            normalize = True
    st_cfg = _read_json(folder / "sentence_bert_config.json", required=False) or {}
    return pooling, normalize, int(st_cfg.get("max_seq_length", 0) or 0)


def convert_hf_folder(folder, out) -> Path:
    folder = Path(folder)
    hf = _read_json(folder / "config.json")
    model_type = hf.get("model_type")
    if model_type == "bert":
        cfg, tensors = _bert(folder, hf)
    elif model_type == "llama":
        from rshard_hpc.convert.llama_hf import llama_from_hf

        cfg, tensors = llama_from_hf(folder, hf)
    else:
        raise InputError(f"{folder}: model_type {model_type!r} is not supported (bert, llama)")
    tokenizer = {"json": tokenizer_json_plain(folder)}
    weights.write_weights(out, cfg, tokenizer, tensors, source=folder)
    return Path(out)


def _bert(folder: Path, hf: dict):
    if hf.get("position_embedding_type", "absolute") != "absolute" or hf.get("hidden_act") != "gelu":
        raise InputError(f"{folder}: only absolute positions and exact GELU are supported for BERT")
    src = load_safetensors(folder)
    prefix = "bert." if any(k.startswith("bert.") for k in src) else ""
    names = {prefix + name: key for name, key in BERT_EMBED_NAMES.items()}
    for i in range(hf["num_hidden_layers"]):
        names.update({f"{prefix}encoder.layer.{i}.{name}": weights.layer_key(i, short)
                      for name, short in BERT_LAYER_NAMES.items()})
    missing = [name for name in names if name not in src]
    if missing:
        raise InputError(f"{folder}: safetensors lack {', '.join(missing[:5])}")
    tensors = {key: src[name] for name, key in names.items()}
    pooling, normalize, max_seq = _pooling(folder)
    n_heads = hf["num_attention_heads"]
    cfg = ModelConfig(
        arch="bert", name=hf.get("_name_or_path") or folder.name, hidden=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_heads,
        head_dim=hf["hidden_size"] // n_heads, intermediate=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], max_positions=hf["max_position_embeddings"], norm="layernorm",
        norm_eps=hf["layer_norm_eps"], act="gelu", causal=False, type_vocab_size=hf["type_vocab_size"],
        pooling=pooling, normalize=normalize, max_seq_length=max_seq or hf["max_position_embeddings"],
    )
    return cfg, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
