"""Single-device model math (no MPI): per-token pre/post passes and a plain reference forward."""
from __future__ import annotations

from rshard_hpc.models.config import ModelConfig


def model_class(cfg: ModelConfig):
    if cfg.arch == "bert":
        from rshard_hpc.models.bert import Bert

        return Bert
    if cfg.arch == "llama":
        from rshard_hpc.models.llama import Llama

        return Llama
    raise ValueError(f"unknown architecture {cfg.arch!r}")


def load_model(path, dtype="float32", xp=None):
    """The model of a weight file with every tensor a CompNode needs."""
    from rshard_hpc.models import weights

    cfg = weights.read_config(path)
    return build_model(cfg, read_model_tensors(path, cfg), dtype=dtype, xp=xp)


def read_model_tensors(path, cfg: ModelConfig, first_layer: int = 0) -> dict:
    """{key: float32 array} of every tensor a CompNode needs (as read from the weight file): comp_tensor_keys."""
    from rshard_hpc.models import weights

    return weights.read_tensors(path, comp_tensor_keys(cfg, first_layer))


def comp_tensor_keys(cfg: ModelConfig, first_layer: int = 0) -> list:
    """The model's tensor keys a CompNode needs. With client layers (first_layer K > 0) the client embeds and runs
    layers 0 … K-1 and CompNodes receive layer-K rows: they need only layers K … L-1, not the embeddings (MiniLM:
    half its weights)."""
    from rshard_hpc.models import weights

    keys = model_class(cfg).tensor_keys(cfg)
    if not first_layer:
        return keys
    return [k for k in keys if (layer := weights.layer_of(k)) is not None and layer >= first_layer]


def build_model(cfg: ModelConfig, tensors: dict, dtype="float32", xp=None):
    """The model from tensors already read, placed on xp's device in the engine precision."""
    import numpy as np

    return model_class(cfg)(cfg, tensors, xp=xp or np, dtype=dtype)
