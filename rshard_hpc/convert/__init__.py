"""Converters from foreign formats to the HDF5 weight file."""
from __future__ import annotations

from pathlib import Path

from rshard_hpc.errors import InputError
from rshard_hpc.models.weights import check_output


def convert_any(source, out) -> Path:
    """Convert a Hugging Face folder (safetensors) or a GGUF file to the HDF5 weight file `out`. An output that
    cannot become a file is refused before any slow work; tensors that do not match the config or hold NaN or
    Inf are refused before anything is written."""
    source = Path(source)
    check_output(out)
    if source.is_file() and source.suffix == ".gguf":
        from rshard_hpc.convert.gguf import convert_gguf

        return convert_gguf(source, out)
    if source.is_dir():
        from rshard_hpc.convert.safetensors import convert_hf_folder

        return convert_hf_folder(source, out)
    raise InputError(f"cannot convert {source}: expected a Hugging Face model folder or a .gguf file")
