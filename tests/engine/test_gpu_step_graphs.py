"""A CompNode's layers replayed as CUDA graphs (engine/step_graphs.py) against the same layers run launch by launch,
several steps in a row with fresh values each step (rows, positions, which AttnNode row each row goes to, the
partials that come back): the graphs must read each step's values, not the captured step's. Same kernels on the
same values: the send buffers and the rows must be identical bit for bit. Skipped without CuPy or a GPU."""
import numpy as np
import pytest
from conftest import require_gpu

cupy = require_gpu()

from rshard_hpc.engine.step_graphs import StepGraphs
from rshard_hpc.models.llama import Llama
from rshard_hpc.models.random_init import random_tensors, tiny_config
from rshard_hpc.ops import small_rows_cuda
from rshard_hpc.ops.precision import partial_slots, wire_dtype
from rshard_hpc.ops.wire import WireRoutes

BETA = 2


def _routes(rng, cfg, n, wire):
    group = rng.integers(0, BETA, n)
    return WireRoutes([np.flatnonzero(group == g) for g in range(BETA)], n, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                      wire, cupy)


def _partials(rng, cfg, n, wire):
    """A receive buffer of β partials a row: o values and finite lse (as the wire carries them)."""
    slots = partial_slots(cfg.head_dim, wire)
    if np.dtype(wire) == np.uint16:
        o = rng.standard_normal((BETA * n, cfg.n_heads, cfg.head_dim)).astype(np.float32)
        lse = rng.standard_normal((BETA * n, cfg.n_heads, 1)).astype(np.float32)
        bits = (o.view(np.uint32) >> 16).astype(np.uint16)
        packed = np.concatenate([bits, lse.view(np.uint16)], axis=-1)
    else:
        packed = rng.standard_normal((BETA * n, cfg.n_heads, slots)).astype(np.float32)
    return cupy.asarray(packed.ravel())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [1, 3, small_rows_cuda.MAX_ROWS])
def test_replays_equal_launch_by_launch(dtype, n):
    cfg = tiny_config("llama", n_kv_heads=2, n_layers=3)
    model = Llama(cfg, random_tensors(cfg, seed=11), cupy, dtype)
    wire = wire_dtype(dtype)
    rng = np.random.default_rng()
    graphs = None
    for step in range(3):
        routes = _routes(rng, cfg, n, wire)
        h0 = cupy.asarray(rng.standard_normal((n, cfg.hidden)).astype(np.float32))
        pos = cupy.asarray(rng.integers(0, 4000, n).astype(np.int32))  # on the device, as CompWorker.step has them
        recvs = [_partials(rng, cfg, n, wire) for _ in range(cfg.n_layers)]
        assert model.graph_safe(h0)
        if graphs is None:
            graphs = StepGraphs(model, routes, recvs[0].size)
        graphs.begin_step(h0, pos, routes)
        h, h_graph = h0, None
        for layer in range(cfg.n_layers):
            want_send = routes.pack(*model.pre(layer, h, pos))
            h = model.post(layer, h, routes.merge(recvs[layer]))
            got_send = graphs.pre(layer, first=layer == 0)
            graphs.recv[...] = recvs[layer]
            h_graph = graphs.post(layer)
            assert cupy.asnumpy(got_send).tobytes() == cupy.asnumpy(want_send).tobytes(), (step, layer)
            assert cupy.asnumpy(h_graph).tobytes() == cupy.asnumpy(h).tobytes(), (step, layer)
        assert len(graphs.graphs) == 2 * cfg.n_layers  # captured at the first step, replayed after


def test_large_steps_and_host_rows_are_not_graph_safe():
    cfg = tiny_config("llama", n_kv_heads=2)
    model = Llama(cfg, random_tensors(cfg, seed=1), cupy, "float32")
    assert not model.graph_safe(cupy.zeros((small_rows_cuda.MAX_ROWS + 1, cfg.hidden), dtype=cupy.float32))
    assert not model.graph_safe(cupy.zeros((0, cfg.hidden), dtype=cupy.float32))
    assert not model.graph_safe(np.zeros((1, cfg.hidden), dtype=np.float32))
