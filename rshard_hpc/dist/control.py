"""The client's control channel (architecture.md §2, §3): step headers, each CompNode's inputs, the final rows and the
ledgers move between the client and the workers as point-to-point messages on a duplicate of the world
(`Topology.channel`; no other traffic shares its tags), not as collectives.

Why: where ranks outnumber cores a waiting rank sleeps between polls (collectives.wait), and a collective needs
every rank's progress through several rounds. Measured on the 2-core machine, 13 ranks (tools/control_probe.py):
a header broadcast (barrier, then bcast) costs the client 8.2 ms and reaches the workers after 8.9 ms; the same
header as 12 messages costs the client 0.2 ms and reaches them after 1.2 ms (about one poll). A batch boundary took
five such collectives.

Messages between one pair of ranks keep their order on each tag (MPI's non-overtaking rule), so a worker reads its
headers, and a CompNode its inputs, in the order the client sent them. A send of an array waits until it is
received (or, started with start_arrays, until `finish`, which its caller reaches before it leaves MPI), so no rank
leaves a large message half-moved behind while it computes (a rendezvous moves only while both sides call MPI); a
pickled message (a header, a ledger) returns at once and moves as its sender goes on calling MPI.
"""
from __future__ import annotations

import pickle

import numpy as np

from rshard_hpc.dist.collectives import _mpi, poll, wait

HEADER, INPUTS, ROWS, LEDGER = 1, 2, 3, 4  # the message kinds, as tags
CLIENT = 0  # the client's rank on the control communicator (= its world rank)


class Channel:
    """One rank's end of the control channel on `comm` (Topology.control)."""

    def __init__(self, comm):
        self.comm = comm
        self._unfinished = []  # (request, its buffer) of pickled sends not yet known complete

    # ------------------------------------------------------------------ pickled objects
    def workers(self) -> range:
        """Every rank but the client's."""
        return range(CLIENT + 1, self.comm.Get_size())

    def send_to_workers(self, obj) -> None:
        """The client: obj (a small dict, no token content) to every worker, pickled once; returns at once."""
        data = _pickled(obj)
        for rank in self.workers():
            self._send_bytes(data, rank, HEADER)

    def send_object(self, obj, dest: int, tag: int) -> None:
        """obj pickled to `dest`; returns at once (finished by a later call or by flush)."""
        self._send_bytes(_pickled(obj), dest, tag)

    def recv_object(self, source: int, tag: int):
        """The next pickled object from `source` on `tag` (a waiting rank sleeps between polls, collectives.wait)."""
        return pickle.loads(self._recv(source, tag, np.uint8).data)

    def header(self):
        """A worker: the client's next header."""
        return self.recv_object(CLIENT, HEADER)

    # ------------------------------------------------------------------ arrays
    def send_arrays(self, arrays: dict, tag: int) -> None:
        """{dest rank: contiguous NumPy array}, each to its rank; returns when every one has been received."""
        self.finish(self.start_arrays(arrays, tag))

    def start_arrays(self, arrays: dict, tag: int) -> list:
        """As send_arrays, but returns at once: the sends under way, for `finish`. The caller keeps calling MPI (a
        receive, `finish`) until they are done: a large message moves only while both sides call MPI."""
        MPI = _mpi()
        buffers = {dest: [np.ascontiguousarray(a), _mpi_type(a.dtype, MPI)] for dest, a in arrays.items()}
        return [(self.comm.Isend(buffer, dest, tag), buffer) for dest, buffer in buffers.items()]

    @staticmethod
    def finish(sends: list) -> None:
        """Wait until every send that start_arrays began has been received."""
        for request, _ in sends:
            wait(request)

    def recv_array(self, source: int, tag: int, dtype) -> np.ndarray:
        """The next array from `source` on `tag`, flat, of `dtype` (its length is the message's)."""
        return self._recv(source, tag, dtype)

    def flush(self) -> None:
        """Wait until every pickled send of this rank has been received (before the job's end)."""
        for request, _ in self._unfinished:
            wait(request)
        self._unfinished = []

    # ------------------------------------------------------------------ the message layer
    def _send_bytes(self, data: np.ndarray, dest: int, tag: int) -> None:
        MPI = _mpi()
        self._unfinished = [(r, b) for r, b in self._unfinished if not r.Test()]
        self._unfinished.append((self.comm.Isend([data, MPI.BYTE], dest, tag), data))

    def _recv(self, source: int, tag: int, dtype) -> np.ndarray:
        MPI = _mpi()
        status = MPI.Status()
        # matched (no other receive can take the message); probed twice a poll: MPICH's first probe brings a waiting
        # message in, only the next finds it (once a poll: 3.1 ms to a sleeping worker, twice: 1.0 ms, 13 ranks)
        message = poll(lambda: self.comm.Improbe(source, tag, status) or self.comm.Improbe(source, tag, status))
        mpi_type = _mpi_type(np.dtype(dtype), MPI)
        out = np.empty(status.Get_count(mpi_type), dtype=dtype)
        wait(message.Irecv([out, mpi_type]))
        return out


def _pickled(obj) -> np.ndarray:
    return np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)


def _mpi_type(dtype, MPI):
    types = {np.dtype(np.uint8): MPI.BYTE, np.dtype(np.int64): MPI.INT64_T, np.dtype(np.float32): MPI.FLOAT}
    try:
        return types[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"the control channel moves bytes, int64 or float32, not {np.dtype(dtype)}") from None
