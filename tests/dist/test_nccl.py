"""The NCCL transport on CPUs, with a fake NCCL and NumPy standing in for CuPy (tests/mpi/nccl_fakes.py): the
exchange's grouping, peers, byte counts, offsets and zero-length skips, its exactness, the unique id's bootstrap
over real mpiexec, and the refusal where workers share a GPU."""
import sys

import numpy as np
import pytest
from conftest import REPO, mpiexec

sys.path.insert(0, str(REPO / "tests" / "mpi"))
from nccl_fakes import STREAM, FakeNccl, deliver_in_process, fake_xp, host_pointer

from rshard_hpc.dist.nccl import NcclExchange, gpu_sharing, nccl_version


class _Comm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size


def _value(src, dst, i, dtype):
    return ((src * 1000 + dst * 37 + i) % 60000).astype(dtype)


def _exchange(counts, dtype):
    """counts[src][dst] elements: every rank's exchange through fakes, then delivered. Returns (fakes, sends,
    recvs, xp pointer bases)."""
    size = len(counts)
    counts = np.asarray(counts, dtype=np.int64)
    fakes = [FakeNccl() for _ in range(size)]
    sends, recvs = [], []
    for rank in range(size):
        send = np.concatenate([_value(rank, dst, np.arange(counts[rank, dst]), dtype) for dst in range(size)])
        ex = NcclExchange(_Comm(rank, size), fakes[rank].NcclCommunicator(size, (0,), rank), fakes[rank], fake_xp(),
                          pointer=host_pointer)
        recv, seconds = ex.alltoallv(send, counts[rank], counts[:, rank])
        assert set(seconds) == {"mpi", "copy"}
        sends.append(send)
        recvs.append(recv)
    deliver_in_process(fakes)
    return counts, fakes, sends, recvs


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_exchange_is_exact_and_grouped(dtype):
    """Every rank's receive buffer holds, peer by peer in rank order, exactly what each peer sent it; every
    send/recv sits inside one group per call, goes to another rank, carries the bytes at its offset (NCCL_UINT8,
    count * itemsize) on the current stream, and zero counts post nothing."""
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 6, size=(4, 4))
    counts[0, 2] = counts[2, 0] = counts[3, :] = 0  # pairs and a whole rank with nothing to send
    counts[1, 1] = 5  # a rank's part for itself: copied, not sent
    counts, fakes, sends, recvs = _exchange(counts, dtype)
    item = np.dtype(dtype).itemsize
    for rank, fake in enumerate(fakes):
        want = np.concatenate([_value(src, rank, np.arange(counts[src, rank]), dtype) for src in range(4)])
        assert recvs[rank].dtype == dtype and np.array_equal(recvs[rank], want)
        assert fake.calls[0] == ("groupStart",) and fake.calls[-1] == ("groupEnd",)
        assert [c[0] for c in fake.calls].count("groupStart") == 1
        send_at = np.concatenate([[0], np.cumsum(counts[rank])[:-1]])
        recv_at = np.concatenate([[0], np.cumsum(counts[:, rank])[:-1]])
        posted = {(c[0], c[4]): c for c in fake.ops()}
        assert len(posted) == len(fake.ops())  # one message per direction and peer
        for peer in range(4):
            for op, n, at, base in (("send", counts[rank, peer], send_at, sends[rank]),
                                    ("recv", counts[peer, rank], recv_at, recvs[rank])):
                call = posted.get((op, peer))
                if peer == rank or n == 0:
                    assert call is None, f"rank {rank} posts {op} of {n} elements to {peer}"
                    continue
                assert call[1:] == (host_pointer(base) + int(at[peer]) * item, int(n) * item, FakeNccl.NCCL_UINT8,
                                    peer, STREAM, True)


def test_engine_shaped_calls():
    """As the engine calls it: CompNodes (0, 1) only send, with an empty receive; AttnNodes (2, 3, 4) only
    receive, with an empty send; all ranks still enter one (possibly empty) group."""
    counts = np.zeros((5, 5), dtype=np.int64)
    counts[0, 2:] = [3, 0, 4]
    counts[1, 2:] = [1, 2, 0]
    counts, fakes, _, recvs = _exchange(counts, np.float32)
    assert [len(r) for r in recvs] == [0, 0, 4, 2, 4]
    assert np.array_equal(recvs[4], _value(0, 4, np.arange(4), np.float32))
    assert {c[0] for c in fakes[0].ops()} == {"send"} and {c[0] for c in fakes[3].ops()} == {"recv"}
    assert fakes[1].calls[0] == ("groupStart",)


def test_self_part_mismatch_is_an_error():
    fake = FakeNccl()
    ex = NcclExchange(_Comm(0, 2), fake.NcclCommunicator(2, (0,), 0), fake, fake_xp(), pointer=host_pointer)
    with pytest.raises(RuntimeError, match="sends itself 2 elements but expects 1"):
        ex.alltoallv(np.zeros(2, np.float32), np.array([2, 0]), np.array([1, 0]))


def test_gpu_sharing_names_the_shared_devices():
    assert gpu_sharing([("a", "0000:01:00.0"), ("a", "0000:02:00.0"), ("b", "0000:01:00.0")]) == ""
    assert gpu_sharing([("a", "0:1"), ("b", "0:1"), ("a", "0:1"), ("a", "0:1")]) == "ranks 0, 2, 3 on a GPU 0:1"
    assert nccl_version(FakeNccl()) == "2.28.3"


def test_bootstrap_and_refusal_over_mpiexec():
    """3 real ranks, fake NCCL: the unique id is made on rank 0 only and reaches every rank's communicator, the
    exchange over it is exact (its groups carried by MPI); workers on one GPU are refused by name for
    --transport nccl, and auto then passes NCCL by, saying why; a rank without NCCL is named; a communicator
    that fails on one rank is aborted on the others and auto moves on."""
    res = mpiexec(3, [sys.executable, str(REPO / "tests" / "mpi" / "nccl_mock.py")])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    for check in ("bootstrap", "exchange", "refusal", "auto", "missing", "initfail"):
        assert f"PASS {check}" in res.stdout, out[-3000:]
