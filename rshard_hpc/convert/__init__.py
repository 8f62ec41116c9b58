"""Converters from foreign formats to the HDF5 weight file."""
from __future__ import annotations

from pathlib import Path

from rshard_hpc.errors import InputError


def convert_any(source, out) -> Path:
    """Convert a Hugging Face folder (safetensors) or a GGUF file to the HDF5 weight file `out`."""
    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":
        from rshard_hpc.convert.gguf import convert_gguf

        return convert_gguf(source, out)
    if source.is_dir():
        from rshard_hpc.convert.safetensors import convert_hf_folder

        return convert_hf_folder(source, out)
    raise InputError(f"cannot convert {source}: expected a Hugging Face model folder or a .gguf file")
