"""Results files out (architecture.md §6): appended after every batch, resumable. Only the client rank touches them."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from rshard_hpc.errors import InputError
from rshard_hpc.run import termination, testhooks

STR = h5py.string_dtype()
ROW_DATASETS = ("embeddings", "generated/token_ids", "generated/text")  # a row per prompt, beside /ids


class ResultWriter:
    """Appends one batch at a time to the results HDF5 (open, append, flush, close), so a crash loses
    at most the batch in flight. `done_ids` are the ids already present (for --resume)."""

    def __init__(self, path, attrs: dict, task: str, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.task = task
        self.done_ids: set[str] = set()
        self.unfinished_rows = 0  # rows of a batch cut short, dropped by --resume
        if self.path.exists() and resume:
            self._check_resumable(attrs)
        elif self.path.exists() and not overwrite:
            raise InputError(f"results file {self.path} exists: pass --resume to continue it or --overwrite")
        else:
            self._create(attrs)

    def _create(self, attrs: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with h5py.File(tmp, "w") as f:
            for key, value in attrs.items():
                f.attrs[key] = value
            f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=STR, chunks=(1024,))
        os.replace(tmp, self.path)

    def _check_resumable(self, attrs: dict) -> None:
        try:
            with h5py.File(self.path, "r") as f:
                for key in ("model", "task"):
                    old = f.attrs.get(key)
                    if old is not None and str(old) != str(attrs[key]):
                        raise InputError(f"cannot resume {self.path}: it was written with {key}={old!r}, "
                                         f"this run has {key}={attrs[key]!r}")
                ids = f["ids"][()]
                lengths = [f[name].shape[0] for name in ROW_DATASETS if name in f]
        except (OSError, KeyError) as exc:
            raise InputError(f"cannot resume {self.path}: not a readable results file ({exc})") from exc
        counts = [len(ids)] + lengths
        committed = min(counts)
        self.unfinished_rows = max(counts) - committed
        if self.unfinished_rows:
            self._drop_rows_after(committed)
        self.done_ids = {_s(x) for x in ids[:committed]}

    def _drop_rows_after(self, committed: int) -> None:
        """Cut every per-prompt dataset to the rows whose ids are in (a batch cut short by a crash)."""
        with self._open() as f:
            for name in ("ids",) + ROW_DATASETS:
                if name in f and f[name].shape[0] > committed:
                    f[name].resize(committed, axis=0)

    @contextmanager
    def _open(self):
        """The results file opened for appending, as one write a SIGTERM waits for (termination.py)."""
        with termination.protected(), h5py.File(self.path, "a") as f:
            yield f

    def append_embeddings(self, ids, embeddings: np.ndarray) -> None:
        with self._open() as f:
            start = f["ids"].shape[0]
            ds = f.get("embeddings")
            if ds is None:
                ds = f.create_dataset("embeddings", shape=(0, embeddings.shape[1]), maxshape=(None, embeddings.shape[1]),
                                      dtype=np.float32, chunks=(256, embeddings.shape[1]))
            ds.resize(start + len(ids), axis=0)
            ds[start:] = embeddings.astype(np.float32)
            self._commit_ids(f, ids)

    def append_generated(self, ids, token_ids: list, texts: list) -> None:
        with self._open() as f:
            start = f["ids"].shape[0]
            group = f.require_group("generated")
            tok = group.get("token_ids")
            if tok is None:
                tok = group.create_dataset("token_ids", shape=(0,), maxshape=(None,),
                                           dtype=h5py.vlen_dtype(np.int32), chunks=(256,))
                group.create_dataset("text", shape=(0,), maxshape=(None,), dtype=STR, chunks=(256,))
            txt = group["text"]
            tok.resize(start + len(ids), axis=0)
            txt.resize(start + len(ids), axis=0)
            for n, (t, s) in enumerate(zip(token_ids, texts)):
                tok[start + n] = np.asarray(t, dtype=np.int32)
                txt[start + n] = s
            self._commit_ids(f, ids)

    def _commit_ids(self, f, ids) -> None:
        """The ids go in last: rows past len(ids) are an unfinished batch (dropped on --resume)."""
        f.flush()
        testhooks.at("inside_results_write")  # off unless RSHARD_TEST_SLOW_WRITE_S
        ds = f["ids"]
        start = ds.shape[0]
        ds.resize(start + len(ids), axis=0)
        ds[start:] = list(ids)
        f.flush()
        self.done_ids.update(ids)

    def write_json(self, name: str, payload) -> None:
        """A JSON document at /name/json (replaced each run), e.g. /privacy and /stats."""
        with self._open() as f:
            group = f.require_group(name)
            if "json" in group:
                del group["json"]
            group.create_dataset("json", data=json.dumps(payload, default=_json_default), dtype=STR)

    def append_json(self, name: str, dataset: str, payload) -> None:
        """One more JSON document in the growing string dataset /name/dataset (a row per batch, kept on
        --resume), e.g. /privacy/ledger."""
        with self._open() as f:
            group = f.require_group(name)
            ds = group.get(dataset)
            if ds is None:
                ds = group.create_dataset(dataset, shape=(0,), maxshape=(None,), dtype=STR, chunks=(64,))
            ds.resize(ds.shape[0] + 1, axis=0)
            ds[-1] = json.dumps(payload, default=_json_default)
            f.flush()

    def write_table(self, name: str, columns: dict) -> None:
        """Columns of equal length as datasets under /name (replaced each run)."""
        with self._open() as f:
            group = f.require_group(name)
            for key, values in columns.items():
                if key in group:
                    del group[key]
                values = list(values)
                if values and isinstance(values[0], str):
                    group.create_dataset(key, data=values, dtype=STR)
                else:
                    group.create_dataset(key, data=np.asarray(values))


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and obj == float("inf"):
        return "inf"
    raise TypeError(type(obj))
