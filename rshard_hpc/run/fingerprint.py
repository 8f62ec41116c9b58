"""What a results file's rows depend on, recorded in the file so that `--resume` never mixes rows made
under different settings: the weights (a digest), the model config, precision, task, generation and pooling
settings, truncation, the plan, the client's layers (--client-layers) and the package version. A resume whose
fingerprint differs is refused, naming the settings that differ."""
from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np

from rshard_hpc import __version__
from rshard_hpc.errors import InputError

SAMPLED_ROWS = 8  # rows of each tensor read into the weights digest (every tensor's shape goes in whole)


def weights_digest(path) -> str:
    """sha256 over the weight file's config, tokenizer and, for every tensor, its name, shape and an evenly
    spaced sample of its rows: different weights at the same path are caught without reading gigabytes."""
    digest = hashlib.sha256()

    def visit(name, obj):
        if not isinstance(obj, h5py.Dataset):
            return
        digest.update(f"{name}{obj.shape}{obj.dtype}".encode())
        if obj.shape == ():
            value = obj[()]
            digest.update(value if isinstance(value, bytes) else str(value).encode())
        elif obj.size:
            step = max(1, obj.shape[0] // SAMPLED_ROWS)
            digest.update(np.ascontiguousarray(obj[::step]).tobytes())

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return digest.hexdigest()


def job_fingerprint(opts, cfg, weights: str, settings, spec) -> dict:
    """{setting: value} of everything the rows of this job depend on (JSON-safe)."""
    out = {"weights": weights, "model_config": hashlib.sha256(cfg.to_json().encode()).hexdigest(),
           "task": opts.task, "dtype": opts.dtype, "truncate": bool(opts.truncate),
           "pooling": f"{cfg.pooling}, normalize={cfg.normalize}" if opts.task == "embed" else "",
           "plan": json.dumps(spec.params(), sort_keys=True), "client_layers": int(opts.client_layers),
           "version": __version__}
    if opts.task == "generate":
        out["generation"] = json.dumps({"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                                        "top_k": settings.top_k, "top_p": settings.top_p, "seed": settings.seed,
                                        "stop": list(settings.stop), "chat": settings.chat}, sort_keys=True)
    return out


def check_same(path, recorded: dict | None, current: dict) -> None:
    """InputError unless a resumed file was made with this job's fingerprint."""
    if recorded is None:
        raise InputError(f"cannot resume {path}: it records no settings fingerprint (written by an older rshard); "
                         f"start a new --out, or --overwrite it")
    differ = [key for key in sorted(set(recorded) | set(current)) if recorded.get(key) != current.get(key)]
    if differ:
        shown = "; ".join(f"{key}: file {_short(recorded.get(key))}, this run {_short(current.get(key))}"
                          for key in differ)
        raise InputError(f"cannot resume {path}: it was made with other settings ({shown}); run with the same "
                         f"settings, or write to a new --out")


def _short(value) -> str:
    text = "none" if value is None else str(value)
    return text[:12] + "…" if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text
