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
    return model_class(cfg).from_file(path, cfg, dtype=dtype, xp=xp)
