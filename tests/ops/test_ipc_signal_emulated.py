"""kernels/ipc_signal.cu (the device-signalled CUDA IPC exchange, dist/ipc_signal.py) run on the CPU under the
emulation shim, three ranks in one process: each publishes its send buffer, notes and counts, each collects;
every rank's bytes land where its counts say, in each word size and both parities, nothing else is written,
and each mailbox counts every note posted to it (what the stream's wait reads). A slot without this call's note
and a byte count other than expected are reported, and nothing is copied. tests/engine/test_gpu_engine.py runs
the exchange itself on a GPU (with the stream's wait)."""
import ctypes

import numpy as np
import pytest
from cuda_emulation import build

from rshard_hpc.dist import ipc_signal

SHIM = r"""
#include <atomic>
#define __threadfence() std::atomic_thread_fence(std::memory_order_seq_cst)
#define __threadfence_system() std::atomic_thread_fence(std::memory_order_seq_cst)
static unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
static int atomicCAS(int* p, int expected, int v) {
    __atomic_compare_exchange_n(p, &expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}
template <class T> static T __ldcg(const T* p) { return *p; }
"""
SIZE = 3


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build(tmp_path_factory.mktemp("signal"), ipc_signal.SOURCE, ipc_signal.defines(), SHIM)


def _p(a: np.ndarray, offset: int = 0):
    return ctypes.c_void_p(a.ctypes.data + offset)


class Rank:
    def __init__(self, size: int):
        self.mailbox = np.zeros(ipc_signal.HEADER_WORDS + 2 * size * ipc_signal.NOTE_WORDS, dtype=np.int64)
        self.outboxes = [np.zeros(1 << 17, dtype=np.uint8) for _ in range(2)]
        self.done = np.zeros(1, dtype=np.uint32)
        self.status = np.zeros(1, dtype=np.int32)


def _table(counts, itemsize):
    counts = np.asarray(counts, dtype=np.int64)
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.stack([displs * itemsize, counts * itemsize], axis=1).ravel().astype(np.int64)


def _publish(lib, ranks, me, send, counts, parity, call):
    mailboxes = np.array([r.mailbox.ctypes.data for r in ranks], dtype=np.uint64)
    rank = ranks[me]
    lib.launch_signal_publish(_p(send), ctypes.c_longlong(send.nbytes), _p(rank.outboxes[parity]),
                              _p(_table(counts, send.itemsize)), _p(mailboxes), _p(rank.done), ctypes.c_int(me),
                              ctypes.c_int(len(ranks)), ctypes.c_int(parity), ctypes.c_longlong(call))


def _collect(lib, ranks, me, recv, recv_counts, parity, call, offset=0):
    outboxes = np.array([[r.outboxes[p].ctypes.data for r in ranks] for p in (0, 1)], dtype=np.uint64).ravel()
    rank = ranks[me]
    lib.launch_signal_collect(_p(recv, offset), _p(rank.mailbox), _p(outboxes),
                              _p(_table(recv_counts, recv.itemsize)), _p(rank.status), ctypes.c_int(len(ranks)),
                              ctypes.c_int(parity), ctypes.c_longlong(call))


# scales of thousands: a pair's bytes outrun four passes of the block (the copy's four loads in flight a thread)
@pytest.mark.parametrize("dtype,scale", [(np.float32, 16), (np.float32, 3), (np.uint16, 5), (np.uint16, 8),
                                         (np.float32, 2048), (np.uint16, 4099)])
def test_every_rank_receives_its_bytes_in_both_parities(lib, dtype, scale):
    rng = np.random.default_rng(scale)
    ranks = [Rank(SIZE) for _ in range(SIZE)]
    for call in (1, 2, 3):
        parity = (call - 1) % 2
        counts = rng.integers(0, 4, (SIZE, SIZE)) * scale + rng.integers(0, 2, (SIZE, SIZE))  # [sender, receiver]
        counts[0, 1] = 0  # a pair with nothing to move
        payload = [[rng.integers(1, 60000, int(counts[s, r])).astype(dtype) for r in range(SIZE)] for s in range(SIZE)]
        for s in range(SIZE):
            _publish(lib, ranks, s, np.concatenate(payload[s]), counts[s], parity, call)
        assert all(r.mailbox[0] == call * SIZE for r in ranks)  # what a receiver's stream waits for
        for r in range(SIZE):
            n = int(counts[:, r].sum())
            recv = np.full(n + 2, 0xFFFF if dtype == np.uint16 else -1, dtype=dtype)  # poisoned, one past the end
            _collect(lib, ranks, r, recv, counts[:, r], parity, call)
            assert ranks[r].status[0] == 0
            np.testing.assert_array_equal(recv[:n], np.concatenate([payload[s][r] for s in range(SIZE)]))
            assert (recv[n:] == recv[-1]).all() and recv[-1] in (0xFFFF, -1), "written past the received bytes"
        assert all(r.done[0] == 0 for r in ranks)  # each publish left its counter at zero for the next


def test_a_missing_note_is_reported_and_nothing_copied(lib):
    ranks = [Rank(SIZE) for _ in range(SIZE)]
    send = np.arange(SIZE * 4, dtype=np.float32)
    for s in (0, 2):  # rank 1 posts nothing
        _publish(lib, ranks, s, send, [4] * SIZE, 0, 1)
    assert ranks[0].mailbox[0] == 2
    recv = np.zeros(SIZE * 4, dtype=np.float32)
    _collect(lib, ranks, 0, recv, [4] * SIZE, 0, 1)
    assert ranks[0].status[0] == 1 + 1  # 1 + the rank whose slot lacks the call
    assert not recv.any(), "a failed collect copies nothing"


def test_another_byte_count_is_reported(lib):
    ranks = [Rank(SIZE) for _ in range(SIZE)]
    send = np.arange(SIZE * 4, dtype=np.float32)
    for s in range(SIZE):
        _publish(lib, ranks, s, send, [4] * SIZE, 1, 2)
    recv = np.zeros(SIZE * 4 + 1, dtype=np.float32)
    _collect(lib, ranks, 2, recv, [4, 4, 5], 1, 2)  # rank 2 expects 5 elements from itself, 4 came
    assert ranks[2].status[0] == -(1 + 2)
