"""The HDF5 weight file (architecture.md §6): /config (JSON), /tokenizer, /embed, /layers/NNN/…, /final_norm, /lm_head."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from rshard_hpc.errors import InputError
from rshard_hpc.models.config import ModelConfig

FORMAT_VERSION = 1


def layer_key(index: int, name: str) -> str:
    return f"layers/{index:03d}/{name}"


def write_weights(path, cfg: ModelConfig, tokenizer: dict, tensors: dict) -> None:
    """Write atomically (temporary file, then rename): a crash never leaves a half file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["rshard_format"] = FORMAT_VERSION
        f.create_dataset("config", data=cfg.to_json(), dtype=h5py.string_dtype())
        tok = f.create_group("tokenizer")
        for key, value in tokenizer.items():
            tok.create_dataset(key, data=value, dtype=h5py.string_dtype())
        for key, array in tensors.items():
            f.create_dataset(key, data=np.ascontiguousarray(array, dtype=np.float32))
    os.replace(tmp, path)


def _open(path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise InputError(f"weight file {path} does not exist (convert one with `rshard convert`)")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"weight file {path} is not a readable HDF5 file ({exc}); re-convert it") from exc


def read_config(path) -> ModelConfig:
    with _open(path) as f:
        if "config" not in f:
            raise InputError(f"weight file {path} has no /config: not an rshard weight file")
        raw = f["config"][()]
    try:
        return ModelConfig.from_json(raw.decode() if isinstance(raw, bytes) else raw)
    except (ValueError, TypeError) as exc:
        raise InputError(f"weight file {path}: /config is not a valid model config ({exc})") from exc


def read_tokenizer(path) -> dict:
    with _open(path) as f:
        if "tokenizer" not in f:
            raise InputError(f"weight file {path} has no /tokenizer")
        return {k: _text(v[()]) for k, v in f["tokenizer"].items()}


def read_tensors(path, keys) -> dict:
    """{key: float32 array} for each key; a missing or unreadable tensor is an InputError naming it."""
    out = {}
    with _open(path) as f:
        for key in keys:
            if key not in f:
                raise InputError(f"weight file {path} lacks /{key}: it is incomplete or for another model")
            try:
                out[key] = np.asarray(f[key][()], dtype=np.float32)
            except OSError as exc:
                raise InputError(f"weight file {path}: /{key} cannot be read ({exc}); re-convert it") from exc
    return out


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
