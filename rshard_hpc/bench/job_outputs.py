"""Reading what the suite's sharded jobs wrote: a results file's rows in prompt order (embeddings, generated token
ids), bench job's markdown table, and the output difference against an anchor. A job that wrote less than a row
needs is a RowFailed naming what is missing."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rshard_hpc.bench.prompts import prompt_id
from rshard_hpc.bench.suite_rows import RowFailed


def _in_prompt_order(path, dataset: str):
    """(the results file's `dataset`, the index of each prompt's row in prompt order: ids p00000, p00001, … as
    write_prompts names them)."""
    import h5py

    with h5py.File(path, "r") as f:
        ids = f["ids"].asstr()[()].tolist()
        rows = f[dataset][()]
    order = {pid: i for i, pid in enumerate(ids)}
    return rows, [order[prompt_id(i)] for i in range(len(ids))]


def read_embeddings(path) -> np.ndarray:
    """A results file's embeddings in prompt order."""
    rows, index = _in_prompt_order(path, "embeddings")
    return rows[index]


def read_generated(path) -> list:
    """A results file's generated token ids in prompt order, lists of ints."""
    rows, index = _in_prompt_order(path, "generated/token_ids")
    return [list(map(int, rows[i])) for i in index]


def read_bench_table(path) -> dict:
    """bench job's markdown table: {tokens: {column: cell text}}."""
    lines = Path(path).read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| tokens |")), None)
    if start is None:
        raise RowFailed(f"bench job wrote no table to {path}")
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        table[int(cells["tokens"])] = cells
    return table


def bench_row(table: dict, tokens: int) -> dict:
    if tokens not in table:
        raise RowFailed(f"bench job has no row for {tokens} tokens")
    return table[tokens]


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise RowFailed(f"the job's output has shape {a.shape}, the anchor's {b.shape}")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
