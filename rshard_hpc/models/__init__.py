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


def read_model_tensors(path, cfg: ModelConfig) -> dict:
    """{key: float32 array} of every tensor a CompNode needs (as read from the weight file)."""
    from rshard_hpc.models import weights

    return weights.read_tensors(path, model_class(cfg).tensor_keys(cfg))


def build_model(cfg: ModelConfig, tensors: dict, dtype="float32", xp=None):
    """The model from tensors already read, placed on xp's device in the engine precision."""
    import numpy as np

    return model_class(cfg)(cfg, tensors, xp=xp or np, dtype=dtype)
