"""Results files out (architecture.md §6): appended after every batch, resumable. Only the client rank touches them.

A job holds an exclusive lock on its --out for its whole life (filelock.py). A new file (or --overwrite) is
written beside the target as `.NAME.partial` and takes the target's place once its first batch is in, so a
job that fails before that leaves an existing file as it was. Per batch: rows first, then the ids' types, then
the ids (the commit: rows past len(/ids) are a batch cut short, dropped by --resume). Reports (/privacy/json,
/stats) are written beside the old ones and swapped in, so a failed report write leaves the old one readable.
"""
from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from rshard_hpc.errors import InputError, JobAborted
from rshard_hpc.run import termination, testhooks
from rshard_hpc.run.filelock import ResultsLock
from rshard_hpc.run.fingerprint import check_same

STR = h5py.string_dtype()
ROW_DATASETS = ("embeddings", "generated/token_ids", "generated/text")  # a row per prompt, beside /ids
ID_KINDS = "id_is_int"  # /id_is_int[n] = 1 where id n is an integer (ids are stored as text in /ids)


class DiskFull(JobAborted):
    """The results file could not be written for want of space (every finished batch is kept)."""


def check_out_path(out, **inputs) -> None:
    """Refuse an --out that is a folder or one of the job's input files (named by keyword: prompts=…, model=…)."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder: name a results file (e.g. {out / 'results.h5'})")
    for option, path in inputs.items():
        if path is not None and Path(path).exists() and _same_path(out, Path(path)):
            raise InputError(f"--out {out} is the --{option} file: writing results there would destroy it")


def _same_path(a: Path, b: Path) -> bool:
    if a.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


class ResultWriter:
    """Appends one batch at a time to the results HDF5 (open, append, flush, close), so a crash loses at most
    the batch in flight. `done_ids` are the ids already present (for --resume), with their types."""

    def __init__(self, path, attrs: dict, fingerprint: dict, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.attrs = dict(attrs, fingerprint=json.dumps(fingerprint, sort_keys=True))
        self.done_ids: set = set()
        self.unfinished_rows = 0  # rows of a batch cut short, dropped by --resume
        self.staging = self.path.with_name(f".{self.path.name}.partial")
        self.staging_started = False
        self.lock = ResultsLock(self.path)
        try:
            exists = self.path.exists()
            if exists and not resume and not overwrite:
                raise InputError(f"results file {self.path} exists: pass --resume to continue it or --overwrite")
            self.target = self.path if exists and resume else None  # None: staged until the first batch is in
            if self.target is not None:
                self._check_resumable(fingerprint)
        except BaseException:
            self.lock.release()
            raise

    # ------------------------------------------------------------------------------------------ resume
    def _check_resumable(self, fingerprint: dict) -> None:
        try:
            with h5py.File(self.path, "r") as f:
                recorded = f.attrs.get("fingerprint")
                check_same(self.path, json.loads(recorded) if recorded is not None else None, fingerprint)
                counts, done = row_counts(f), read_ids(f)
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"cannot resume {self.path}: not a readable results file ({exc})") from exc
        self.unfinished_rows = max(counts) - len(done)
        if self.unfinished_rows:
            self._drop_rows_after(len(done))
        self.done_ids = set(done)

    def _drop_rows_after(self, committed: int) -> None:
        """Cut every per-prompt dataset to the rows whose ids are in (a batch cut short by a crash)."""
        with self._open() as f:
            for name in ("ids", ID_KINDS) + ROW_DATASETS:
                if name in f and f[name].shape[0] > committed:
                    f[name].resize(committed, axis=0)

    # ------------------------------------------------------------------------------------------ writing
    @contextmanager
    def _open(self):
        """The results file opened for appending, as one write a SIGTERM waits for (termination.py); a full
        disk is said plainly. Before the first batch is in, that file is the staging file beside the target."""
        try:
            with termination.protected():
                with h5py.File(self._current(), "a") as f:
                    yield f
                self._publish()
        except (OSError, RuntimeError) as exc:  # HDF5 reports a failed write on close as a RuntimeError
            if _is_disk_full(exc):
                raise DiskFull(f"disk full while writing {self.path}: {self.saved()}; free space and run the "
                               f"same command with --resume") from exc
            raise

    def _current(self) -> Path:
        if self.target is not None:
            return self.target
        if not self.staging_started:
            self._start_staging()
        return self.staging

    def _start_staging(self) -> None:
        """A fresh staging file (one a crashed job left behind is overwritten)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(self.staging, "w") as f:
            for key, value in self.attrs.items():
                f.attrs[key] = value
            f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=STR, chunks=(1024,))
            f.create_dataset(ID_KINDS, shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(1024,))
        self.staging_started = True

    def _publish(self) -> None:
        """The staging file takes the target's place once it holds a batch (an old file is replaced only then)."""
        if self.target is None and self.done_ids:
            os.replace(self.staging, self.path)
            self.target = self.path

    def saved(self) -> str:
        """What the results file holds now, for messages."""
        if self.target is None:
            return f"no batch was finished, {self.path} is unchanged"
        return f"{len(self.done_ids)} prompts are in {self.path}"

    def close(self) -> None:
        """End of the job: drop a staging file that never got a batch, and release the lock."""
        if self.target is None and self.staging_started:
            self.staging.unlink(missing_ok=True)
        self.lock.release()

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
        """The ids' types, then the ids, go in last: rows past len(ids) are an unfinished batch."""
        f.flush()
        testhooks.at("inside_results_write")  # off unless RSHARD_TEST_SLOW_WRITE_S
        start = f["ids"].shape[0]
        kinds = f[ID_KINDS]
        kinds.resize(start + len(ids), axis=0)
        kinds[start:] = [isinstance(i, int) for i in ids]
        f.flush()
        ds = f["ids"]
        ds.resize(start + len(ids), axis=0)
        ds[start:] = [str(i) for i in ids]
        f.flush()
        self.done_ids.update(ids)

    def write_json(self, name: str, payload) -> None:
        """A JSON document at /name/json, replaced by each run (written beside the old one, then swapped)."""
        text = json.dumps(payload, default=_json_default)
        with self._open() as f:
            group = f.require_group(name)
            _replace(group, "json", lambda g, key: g.create_dataset(key, data=text, dtype=STR))

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

    def read_json_rows(self, name: str, dataset: str) -> list:
        """Every JSON document of /name/dataset (all runs of the file, e.g. every batch's ledger)."""
        if self.target is None and not self.staging_started:
            return []
        with self._open() as f:
            ds = f.get(f"{name}/{dataset}")
            return [json.loads(_s(x)) for x in ds[()]] if ds is not None else []

    def write_table(self, name: str, columns: dict) -> None:
        """Columns of equal length as datasets under /name (replaced each run, each swapped in whole)."""
        with self._open() as f:
            group = f.require_group(name)
            for key, values in columns.items():
                values = list(values)
                dtype = STR if values and isinstance(values[0], str) else None
                data = values if dtype else np.asarray(values)
                _replace(group, key, lambda g, name, data=data, dtype=dtype: g.create_dataset(name, data=data,
                                                                                               dtype=dtype))


def _replace(group, key: str, create) -> None:
    """group[key] replaced by create(group, name): the new one is written first under another name, so a
    failure (a full disk) leaves the old one whole; a half-written new one is removed."""
    fresh = f"{key}.new"
    if fresh in group:  # left by an earlier failed write
        del group[fresh]
    try:
        create(group, fresh)
    except BaseException:
        if fresh in group:
            del group[fresh]
        raise
    if key in group:
        del group[key]
    group.move(fresh, key)


def row_counts(f) -> list[int]:
    """Lengths of /ids, /id_is_int and every row dataset of an open results file."""
    return [f["ids"].shape[0], f[ID_KINDS].shape[0]] + [f[n].shape[0] for n in ROW_DATASETS if n in f]


def committed(f) -> int:
    """Prompts whose ids are in: the shortest of /ids, /id_is_int and the row datasets (rows past it are a
    batch cut short, architecture.md §6)."""
    return min(row_counts(f))


def read_ids(f) -> list:
    """The committed ids of an open results file in input order, integers as int and strings as str."""
    n = committed(f)
    texts = f["ids"].asstr()[:n].tolist()
    return [int(t) if k else t for t, k in zip(texts, f[ID_KINDS][:n].tolist())]


def _is_disk_full(exc: Exception) -> bool:
    text = str(exc)
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text \
        or "Disk quota" in text or "errno = 28" in text


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
