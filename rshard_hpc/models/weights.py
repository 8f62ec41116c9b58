"""The HDF5 weight file (architecture.md §6): /config (JSON), /tokenizer, /embed, /layers/NNN/…, /final_norm, /lm_head."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rshard_hpc.errors import InputError
from rshard_hpc.models.config import ModelConfig

if TYPE_CHECKING:
    import h5py

FORMAT_VERSION = 1


def layer_key(index: int, name: str) -> str:
    return f"layers/{index:03d}/{name}"


def layer_of(key: str) -> int | None:
    """The layer index of a layer_key, None for a key outside the layers (embeddings, head)."""
    parts = key.split("/")
    return int(parts[1]) if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() else None


def write_weights(path, cfg: ModelConfig, tokenizer: dict, tensors: dict, source=None) -> None:
    """Write atomically (temporary file, then rename): a crash never leaves a half file at `path`, and a failure
    never leaves the temporary behind. Tensors whose shapes do not match `cfg`, or that hold NaN or Inf, are
    refused first (an InputError naming the tensor and `source`, the file converted)."""
    path = Path(path)
    check_tensors(cfg, tensors, source or path)
    check_output(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(tmp, cfg, tokenizer, tensors)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write weight file {path}: {exc}") from exc
    finally:
        _remove(tmp)  # gone already after the rename


def _write_file(tmp: Path, cfg: ModelConfig, tokenizer: dict, tensors: dict) -> None:
    import h5py

    with h5py.File(tmp, "w") as f:
        f.attrs["rshard_format"] = FORMAT_VERSION
        f.create_dataset("config", data=cfg.to_json(), dtype=h5py.string_dtype())
        tok = f.create_group("tokenizer")
        for key, value in tokenizer.items():
            tok.create_dataset(key, data=value, dtype=h5py.string_dtype())
        for key, array in tensors.items():
            f.create_dataset(key, data=np.ascontiguousarray(array, dtype=np.float32))


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def check_output(path) -> None:
    """Refuse, before any slow work, an output path that cannot become a file: a directory, a path below a
    file, or a folder that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory (name the file, e.g. {path / 'model.h5'})")
    parent = next(p for p in path.absolute().parents if p.exists())  # the nearest folder that exists
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: {parent} is not writable")


# ------------------------------------------------------------------------------------------ tensor checks
def tensor_shape(cfg: ModelConfig, key: str) -> tuple | None:
    """The shape `cfg` gives the tensor at `key` (Hugging Face orientation, (out, in)); None for a key the
    format does not know."""
    d, f, qd, kvd = cfg.hidden, cfg.intermediate, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    if key.startswith("layers/"):
        layer = {"wq": (qd, d), "bq": (qd,), "wk": (kvd, d), "bk": (kvd,), "wv": (kvd, d), "bv": (kvd,),
                 "wo": (d, qd), "w_up": (f, d), "b_up": (f,), "w_gate": (f, d), "w_down": (d, f)}
        leaf = key.rsplit("/", 1)[-1]
        return layer.get(leaf, (d,) if leaf in _HIDDEN_VECTORS else None)
    top = {"embed/word": (cfg.vocab_size, d), "embed/position": (cfg.max_positions, d),
           "embed/token_type": (max(cfg.type_vocab_size, 1), d), "lm_head/w": (cfg.vocab_size, d)}
    return top.get(key, (d,) if key in ("embed/norm_w", "embed/norm_b", "final_norm/w") else None)


_HIDDEN_VECTORS = ("bo", "b_down", "attn_norm_w", "attn_norm_b", "mlp_norm_w", "mlp_norm_b")


def check_tensor(where, cfg: ModelConfig, key: str, array: np.ndarray) -> None:
    """An InputError naming `where` and the tensor when its shape is not the one `cfg` needs or it holds NaN or
    Inf (a corrupt or mismatched file would otherwise fail inside a matmul, or run with wrong numbers)."""
    want = tensor_shape(cfg, key)
    if want is not None and tuple(array.shape) != want:
        raise InputError(f"{where}: /{key} has shape {_shape(array.shape)}, but the model's config needs "
                         f"{_shape(want)}: the weights and the config do not belong together")
    if array.size and not np.isfinite(array.sum(dtype=np.float64)):  # a NaN or Inf anywhere makes the sum so
        nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        first = np.unravel_index(int(np.argmax(~np.isfinite(array))), array.shape)
        count = " and ".join(f"{k} {name}" for k, name in ((nan, "NaN"), (inf, "Inf")) if k)
        raise InputError(f"{where}: /{key} holds {count} value{'s' if nan + inf > 1 else ''} (the first at "
                         f"{list(map(int, first))}): the weights are corrupt; convert them again from a good copy")


def check_tensors(cfg: ModelConfig, tensors: dict, where) -> None:
    for key, array in tensors.items():
        check_tensor(where, cfg, key, np.asarray(array))


def _shape(shape) -> str:
    return str(tuple(int(x) for x in shape))


def _open(path) -> h5py.File:
    import h5py  # here, not at the top: CompNodes that receive the weights from CompNode 0 never open the file

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
    """{key: float32 array} for each key; a missing or unreadable tensor, one whose shape does not match the
    file's /config, or one holding NaN or Inf is an InputError naming it."""
    cfg = read_config(path)
    out = {}
    with _open(path) as f:
        for key in keys:
            if key not in f:
                raise InputError(f"weight file {path} lacks /{key}: it is incomplete or for another model")
            try:
                out[key] = np.asarray(f[key][()], dtype=np.float32)
            except OSError as exc:
                raise InputError(f"weight file {path}: /{key} cannot be read ({exc}); re-convert it") from exc
            check_tensor(f"weight file {path}", cfg, key, out[key])
    return out


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
