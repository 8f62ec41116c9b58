"""`rshard export`: a results file's ids with their embeddings (task embed) or generated text (task generate),
in the formats the next tool reads:

  jsonl  an object a line: {"id": ..., "embedding": [...]} or {"id": ..., "text": ...}
  csv    a header (id, then e0 … e{d-1} or text); integer ids unquoted, string ids and texts quoted
         (csv.QUOTE_NONNUMERIC), so `1` and `"1"` stay apart
  npy    the (n, d) float32 embeddings; the ids beside it as a JSON list in NAME.ids.json (embed files only)

Ids keep their type (the file stores them as text with /id_is_int). Only committed prompts go out (architecture.md
§6). An existing output is refused without --overwrite; each file is written beside its target and renamed over
it, so a failed export leaves nothing half-written.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from rshard_hpc.errors import InputError

FORMATS = ("jsonl", "csv", "npy")


def export_results(path, out, fmt: str | None = None, overwrite: bool = False) -> list[Path]:
    """Write the results file `path` to `out` in `fmt` (default: from out's suffix); returns the files written."""
    fmt = fmt or export_format(out)
    ids, task, values = read_rows(path)
    if fmt == "npy" and task != "embed":
        raise InputError(f"npy holds embeddings, and {path} is a {task} file: use --format jsonl or csv")
    targets = [Path(out)] + ([ids_path(out)] if fmt == "npy" else [])
    for target in targets:
        check_target(target, path, overwrite)
    if fmt == "npy":
        _write(targets[0], lambda f: np.save(f, values), binary=True)
        _write(targets[1], lambda f: f.write(json.dumps(ids, ensure_ascii=False) + "\n"))
    elif fmt == "jsonl":
        _write(targets[0], lambda f: write_jsonl(f, ids, task, values))
    else:
        _write(targets[0], lambda f: write_csv(f, ids, task, values))
    return targets


def export_format(out) -> str:
    """The format named by out's suffix; an InputError when it names none."""
    fmt = Path(out).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise InputError(f"--out {out}: pass --format ({', '.join(FORMATS)}) or name a file ending in one of them")
    return fmt


def ids_path(out) -> Path:
    """The ids beside an npy export: emb.npy -> emb.ids.json."""
    return Path(out).with_suffix(".ids.json")


def read_rows(path) -> tuple[list, str, object]:
    """(typed ids, task, rows): the (n, d) float32 embeddings or the n generated texts of the committed prompts."""
    # imported here: show.py brings h5py, which `rshard` need not load for every command
    from rshard_hpc.run.results import committed, read_ids
    from rshard_hpc.run.show import open_results

    with open_results(path) as f:
        ids, task, n = read_ids(f), f.attrs["task"], committed(f)
        if task == "embed":
            rows = f["embeddings"][:n] if "embeddings" in f else np.zeros((0, 0), np.float32)
        else:
            rows = f["generated/text"].asstr()[:n].tolist() if "generated/text" in f else []
    return ids, str(task), rows


def check_target(target: Path, results, overwrite: bool) -> None:
    """Refuse a folder, the results file itself, or an existing file without --overwrite."""
    if target.is_dir():
        raise InputError(f"--out {target} is a folder: name a file")
    if target.exists() and os.path.samefile(target, results):
        raise InputError(f"--out {target} is the results file: exporting there would destroy it")
    if target.exists() and not overwrite:
        raise InputError(f"{target} exists: pass --overwrite to replace it")


# ------------------------------------------------------------------------------------------ formats
def write_jsonl(f, ids: list, task: str, rows) -> None:
    field = "embedding" if task == "embed" else "text"
    for pid, row in zip(ids, rows):
        value = row.tolist() if task == "embed" else row
        f.write(json.dumps({"id": pid, field: value}, ensure_ascii=False) + "\n")


def write_csv(f, ids: list, task: str, rows) -> None:
    writer = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
    width = rows.shape[1] if task == "embed" else 0
    writer.writerow(["id"] + ([f"e{i}" for i in range(width)] if task == "embed" else ["text"]))
    for pid, row in zip(ids, rows):
        writer.writerow([pid] + (row.tolist() if task == "embed" else [row]))


def _write(target: Path, write, binary: bool = False) -> None:
    """write(file) into .NAME.partial beside target, then renamed over it; a failure removes the partial file."""
    partial = target.with_name(f".{target.name}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") if binary else open(partial, "w", encoding="utf-8", newline="") as f:
            write(f)
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise InputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
