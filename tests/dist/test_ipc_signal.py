"""The device-signalled CUDA IPC exchange's host side without a GPU (dist/ipc_signal.py, dist/transport.py):
which steps signal on the device (every worker alike), that a step reserves the outboxes first and is drained
and checked at its end, the setting and its refusal, the workers' send bounds against what they send. The
kernels run under the CPU emulation (tests/ops/test_ipc_signal_emulated.py) and on a GPU
(tests/engine/test_gpu_engine.py)."""
import numpy as np
import pytest

from rshard_hpc.dist import ipc_signal
from rshard_hpc.dist.transport import SMALL_STEP_TOKENS, Transport


class _Signals:
    def __init__(self):
        self.calls = []
        self.every_step = False

    takes = ipc_signal.SignalledExchange.takes

    def reserve(self, nbytes):
        self.calls.append(("reserve", nbytes))

    def finish(self):
        self.calls.append(("finish",))


def test_large_steps_signal_on_the_device_small_ones_stage():
    t = Transport(device=True)
    t.begin_step(SMALL_STEP_TOKENS + 1, 4096)  # no signalled exchange chosen: nothing reserved
    assert not t.signalled
    t.end_step()
    t.signals = signals = _Signals()
    t.begin_step(SMALL_STEP_TOKENS + 1, 4096)
    assert t.signalled and not t.small_step and signals.calls == [("reserve", 4096)]
    t.end_step()
    assert not t.signalled and signals.calls[-1] == ("finish",)
    t.begin_step(SMALL_STEP_TOKENS, 4096)  # a decode step: staged, nothing reserved, nothing to finish
    t.end_step()
    assert t.small_step and not t.signalled and len(signals.calls) == 2
    t.begin_step(10 * SMALL_STEP_TOKENS, 4096, causal=False)  # an encoder's step: host-signalled unless forced
    assert not t.signalled and len(signals.calls) == 2
    t.end_step()
    signals.every_step = True  # RSHARD_IPC_SIGNAL=device
    t.begin_step(10 * SMALL_STEP_TOKENS, 4096, causal=False)
    assert t.signalled and signals.calls[-1] == ("reserve", 4096)
    t.end_step()
    assert len(signals.calls) == 4
    t.nccl = object()  # NCCL moves the buffers: never signalled
    t.begin_step(10 * SMALL_STEP_TOKENS, 4096)
    assert not t.signalled and len(signals.calls) == 4


def test_calls_and_counts_when_host_signalled_calls_come_between():
    """A signalled call waits for the count of signalled calls alone (a host-signalled IPC call posts no note),
    while calls and parities run over every call of the exchange (found on the GPU: tests/mpi/gpu_transport.py
    waited for a count that host-signalled calls had raised, and hung)."""
    from types import SimpleNamespace

    exchange = ipc_signal.SignalledExchange.__new__(ipc_signal.SignalledExchange)  # no CUDA: the bookkeeping
    exchange.ipc, exchange.posts = SimpleNamespace(calls=0, size=5), 0
    assert [exchange._next_call() for _ in range(3)] == [(0, 1, 5), (1, 2, 10), (0, 3, 15)]
    exchange.ipc.calls += 2  # two host-signalled calls (DeviceIpc.alltoallv)
    assert exchange._next_call() == (1, 6, 20)


def test_the_setting(monkeypatch):
    monkeypatch.delenv(ipc_signal.SIGNAL_ENV, raising=False)
    assert ipc_signal.signal_mode() == "auto"
    for mode in ("device", "host"):
        monkeypatch.setenv(ipc_signal.SIGNAL_ENV, mode)
        assert ipc_signal.signal_mode() == mode
    monkeypatch.setenv(ipc_signal.SIGNAL_ENV, "yes")
    with pytest.raises(ValueError, match="auto, device or host"):
        ipc_signal.signal_mode()
    monkeypatch.setenv(ipc_signal.SIGNAL_ENV, "host")
    assert ipc_signal.probe(None) == (None, f"{ipc_signal.SIGNAL_ENV}=host")  # no probe, no CUDA
    monkeypatch.setenv(ipc_signal.WAIT_ENV, "7.5")
    assert ipc_signal.wait_seconds() == 7.5


@pytest.mark.parametrize("alpha,beta,lens", [(2, 2, [5, 130, 1]), (3, 3, [300, 17, 64, 2])])
def test_send_bounds_are_what_the_workers_send(alpha, beta, lens):
    """CompWorker.send_bytes is the q/k/v exchange's send (the sum of its counts), AttnWorker.send_bytes the
    partials' (its back counts), for fresh routings."""
    from types import SimpleNamespace

    from rshard_hpc.engine.routing import Routing, step_tokens
    from rshard_hpc.engine.attn_worker import AttnWorker
    from rshard_hpc.engine.workers import CompWorker
    from rshard_hpc.ops.wire import WireRoutes
    from rshard_hpc.plan.schemes import PlanSpec, batch_plans

    cfg = SimpleNamespace(n_heads=6, n_kv_heads=2, head_dim=8)  # what the bounds and counts read
    spec = PlanSpec("strided", alpha, beta, 1, 1)
    plans = batch_plans(spec, lens)
    tokens = step_tokens(plans, [(0, n) for n in lens])
    routing = Routing(tokens, alpha, beta)
    for dtype in ("float32", "bfloat16"):
        for k in range(alpha):
            topo = _Topo(alpha, beta, comp_index=k)
            worker = CompWorker.__new__(CompWorker)
            worker.topo, worker.cfg = topo, cfg
            worker.wire = np.dtype(np.float32 if dtype == "float32" else np.uint16)
            routes = WireRoutes(routing.by_group[k], len(routing.comp_tokens[k]), cfg.n_heads, cfg.n_kv_heads,
                                cfg.head_dim, worker.wire, np)
            assert worker.send_bytes(routing) == worker._send_counts(routes).sum() * worker.wire.itemsize
        for i in range(beta):
            for j in range(beta):
                topo = _Topo(alpha, beta, attn_coords=(i, j))
                worker = AttnWorker(topo, spec, cfg, SimpleNamespace(), dtype=dtype)
                assert worker.send_bytes(routing) == worker._counts(routing)[1].sum() * np.dtype(worker.wire).itemsize


class _Topo:
    """The parts of a Topology the send bounds read: 1 + alpha CompNodes + beta² AttnNodes on work ranks."""

    def __init__(self, alpha, beta, comp_index=None, attn_coords=None):
        self.alpha, self.beta, self.comp_index, self.attn_coords = alpha, beta, comp_index, attn_coords
        self.work_comm = _Comm(alpha + beta * beta)

    def comp_work_rank(self, k):
        return k

    def attn_work_rank(self, i, j):
        return self.alpha + i * self.beta + j


class _Comm:
    def __init__(self, n):
        self.n = n

    def Get_size(self):
        return self.n
