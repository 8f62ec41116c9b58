"""A stand-in for cupy.cuda.nccl and for CuPy, on NumPy host memory, so that the NCCL transport's exchange can be
checked on CPUs: every call is recorded (inside a group or not), and a group's sends and receives are carried out
when it ends, by `deliver` (MPI point-to-point across real ranks) or later by `deliver_in_process`."""
import ctypes
import types

import numpy as np

STREAM = 4242  # the fake current stream's handle


def fake_xp():
    """NumPy dressed as CuPy for the exchange: empty(), and cuda.get_current_stream().ptr."""
    stream = types.SimpleNamespace(ptr=STREAM)
    return types.SimpleNamespace(empty=np.empty, cuda=types.SimpleNamespace(get_current_stream=lambda: stream))


def host_pointer(array) -> int:
    return array.ctypes.data


class FakeNccl:
    NCCL_UINT8 = 1
    available = True

    def __init__(self, deliver=None, uid_seed=0, init_error=None):
        self.calls = []  # ("groupStart",), ("groupEnd",), (op, ptr, nbytes, dtype, peer, stream, in_group)
        self.in_group = False
        self.pending = []
        self.uids_made = 0
        self.communicators = []
        self.deliver = deliver  # called with a group's ops at groupEnd
        self._rng = np.random.default_rng(uid_seed)
        self.init_error = init_error  # NcclCommunicator raises this, when given

    def get_version(self):
        return 22803

    def get_unique_id(self):
        self.uids_made += 1
        return tuple(int(x) for x in self._rng.integers(-128, 128, size=128))

    def groupStart(self):
        assert not self.in_group, "groupStart inside a group"
        self.in_group = True
        self.pending = []
        self.calls.append(("groupStart",))

    def groupEnd(self):
        assert self.in_group, "groupEnd without groupStart"
        self.in_group = False
        self.calls.append(("groupEnd",))
        if self.deliver is not None:
            self.deliver(self.pending)

    def NcclCommunicator(self, ndev, uid, rank):
        if self.init_error is not None:
            raise self.init_error
        comm = FakeCommunicator(self, ndev, uid, rank)
        self.communicators.append(comm)
        return comm

    def ops(self):
        return [c for c in self.calls if c[0] in ("send", "recv")]


class FakeCommunicator:
    def __init__(self, nccl, ndev, uid, rank):
        self.nccl, self.ndev, self.uid, self.rank = nccl, ndev, uid, rank
        self.aborted = False

    def abort(self):
        self.aborted = True

    def _post(self, op, ptr, count, datatype, peer, stream):
        call = (op, ptr, count, datatype, peer, stream, self.nccl.in_group)
        self.nccl.calls.append(call)
        self.nccl.pending.append(call)

    def send(self, sendbuf, count, datatype, peer, stream):
        self._post("send", sendbuf, count, datatype, peer, stream)

    def recv(self, recvbuf, count, datatype, peer, stream):
        self._post("recv", recvbuf, count, datatype, peer, stream)


def deliver_in_process(fakes: list) -> None:
    """Carry out every rank's posted sends and receives (fakes[r] is rank r's FakeNccl): each send must meet a
    receive of the same byte count on its peer."""
    for src, fake in enumerate(fakes):
        for op, ptr, nbytes, _, peer, _, _ in fake.ops():
            if op != "send":
                continue
            match = [c for c in fakes[peer].ops() if c[0] == "recv" and c[4] == src]
            assert len(match) == 1, f"rank {src} sends to {peer}, which posts {len(match)} receives from {src}"
            assert match[0][2] == nbytes, f"{src}->{peer}: {nbytes} bytes sent, {match[0][2]} expected"
            ctypes.memmove(match[0][1], ptr, nbytes)
    for dst, fake in enumerate(fakes):
        for op, _, _, _, peer, _, _ in fake.ops():
            if op == "recv":
                assert any(c[0] == "send" and c[4] == dst for c in fakes[peer].ops()), f"{dst} waits on {peer}"


def mpi_deliver(comm):
    """A group's ops carried out with MPI point-to-point on comm (the fake communicator's ranks are comm's)."""
    from mpi4py import MPI

    def deliver(ops):
        requests = []
        for op, ptr, nbytes, _, peer, _, _ in ops:
            buf = [(ctypes.c_char * nbytes).from_address(ptr), MPI.BYTE]
            requests.append(comm.Irecv(buf, source=peer, tag=7) if op == "recv" else comm.Isend(buf, dest=peer, tag=7))
        MPI.Request.Waitall(requests)

    return deliver
