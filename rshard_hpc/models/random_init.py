"""Random-weight models of any shape (tests and benchmarks); real models come from `rshard convert`."""
from __future__ import annotations

import json

import numpy as np

from rshard_hpc.models import model_class, weights
from rshard_hpc.models.config import ModelConfig


def tiny_config(arch: str = "bert", **overrides) -> ModelConfig:
    base = dict(name=f"tiny-random-{arch}", hidden=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16,
                intermediate=128, vocab_size=97, max_positions=512, norm_eps=1e-5)
    if arch == "bert":
        base.update(arch="bert", norm="layernorm", act="gelu", causal=False, type_vocab_size=2,
                    pooling="mean", normalize=True)
    else:
        base.update(arch="llama", norm="rmsnorm", act="silu", causal=True, n_kv_heads=2, rope_theta=10000.0,
                    tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,))
    base.update(overrides)
    return ModelConfig(**base)


def random_tensors(cfg: ModelConfig, seed: int = 0) -> dict:
    """Weights with the shapes the model's tensor_keys name; norms near 1, biases small."""
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(cfg)
    out = {}
    for key, shape in shapes.items():
        leaf = key.rsplit("/", 1)[-1]
        if "norm" in leaf and leaf.endswith("_w") or leaf == "w" and "norm" in key:
            out[key] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif leaf.startswith("b") or leaf.endswith("_b"):
            out[key] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = shape[-1] if len(shape) > 1 and not key.startswith("embed") else 1
            std = 1.0 / np.sqrt(fan_in) if fan_in > 1 else 0.5
            out[key] = (std * rng.standard_normal(shape)).astype(np.float32)
    return out


def tensor_shapes(cfg: ModelConfig) -> dict:
    """{key: shape} of every tensor the model (and its client head) reads, as the weight format gives them."""
    cls = model_class(cfg)
    keys = list(cls.tensor_keys(cfg))
    keys += [k for k in getattr(cls, "head_keys", lambda c: [])(cfg) if k not in keys]  # the client's head
    return {key: weights.tensor_shape(cfg, key) for key in keys}


def write_random_model(path, cfg: ModelConfig, seed: int = 0) -> None:
    tokenizer = {"json": json.dumps(_char_tokenizer(cfg.vocab_size))}
    weights.write_weights(path, cfg, tokenizer, random_tensors(cfg, seed))


def _char_tokenizer(vocab_size: int) -> dict:
    """A tiny word-level tokenizer.json (tokens "t0" … ) so random models run through the CLI."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
            "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}
