"""Converters from foreign formats to the HDF5 weight file."""
from __future__ import annotations

from pathlib import Path

from rshard_hpc.errors import InputError
from rshard_hpc.models.weights import check_output


def convert_any(source, out, progress=None) -> Path:
    """Convert a Hugging Face folder (safetensors) or a GGUF file to the HDF5 weight file `out`. An output that
    cannot become a file is refused before any slow work; tensors that do not match the config or hold NaN or
    Inf are refused before anything is written. `progress` (run/progress.Stages), when given, is told each
    stage as it starts."""
    stage = progress.stage if progress is not None else (lambda name: None)
    source = Path(source)
    check_output(out)
    if source.is_file() and source.suffix == ".gguf":
        from rshard_hpc.convert.gguf import convert_gguf

        return convert_gguf(source, out, stage)
    if source.is_dir():
        from rshard_hpc.convert.safetensors import convert_hf_folder

        stage(f"reading {source.name} and writing {Path(out).name}")
        return convert_hf_folder(source, out)
    raise InputError(f"cannot convert {source}: expected a Hugging Face model folder or a .gguf file")
