"""The AttnNode's fused small-step layer (kernels/decode.cu through ops/decode_cuda.py) against the NumPy partial
attention and pack of the general path. Skipped without CuPy or a GPU.

Fresh random rows each run; ragged layouts: several CompNodes, some sending no query or no key row; several
sequences; a query that sees no key (lse -inf, o 0); causal and not; float32 and bf16 wires; the send buffer
poisoned first so an element the kernel never writes fails; the cache's new rows checked element for element.
"""
import numpy as np
import pytest
from conftest import require_gpu

cupy = require_gpu()

from rshard_hpc.engine.kv_cache import KVCache
from rshard_hpc.ops.attention import prepare_attention
from rshard_hpc.ops import decode_cuda
from rshard_hpc.ops.decode_cuda import DecodeLayers
from rshard_hpc.ops.precision import pack_partial, to_bf16_bits, unpack_partial, wire_dtype

TOL = 2e-5  # relative to the largest |o| of a row (fp32, another summation order than the NumPy path)
O_FLOOR = 1e-2  # the least scale TOL is relative to (below)


def wire_of(x, wire):
    return to_bf16_bits(x) if wire == np.uint16 else x.astype(np.float32)


def make_step(shape, layout, wire):
    """A step's receive buffer and a KV cache with earlier rows, fresh random values: (cache, recv, slot, old rows,
    new rows m, q_pos, q_seq, k_pos, k_seq (host, every cached row), q, k_new, v_new (host, wire type))."""
    n_heads, n_kv, head_dim = shape
    nq, nkv = layout
    rng = np.random.default_rng()
    layers, capacity = 3, 700 + sum(nkv)  # old rows (< 690) and the step's
    old = int(rng.integers(0, 40) if rng.random() < 0.5 else rng.integers(300, 690))  # a few keys, or many shares
    cache = KVCache(cupy, layers, capacity, n_kv, head_dim, wire)
    # earlier steps' rows: two sequences, positions 0 … old-1 shared out
    old_seq = rng.integers(0, 2, old).astype(np.int32)
    old_pos = np.arange(old, dtype=np.int32)
    cache.k[:, :old] = cupy.asarray(wire_of(rng.standard_normal((layers, old, n_kv, head_dim)), wire))
    cache.v[:, :old] = cupy.asarray(wire_of(rng.standard_normal((layers, old, n_kv, head_dim)), wire))
    cache.begin_step(old_pos, old_seq)
    cache.end_step()
    # this step: new key rows at later positions; queries of sequence 0, 1 or 2 (sequence 2 has no key: -inf)
    m = sum(nkv)
    new_pos = (old + np.arange(m)).astype(np.int32)
    new_seq = rng.integers(0, 2, m).astype(np.int32)
    k_pos, k_seq = (cupy.asnumpy(a) for a in cache.begin_step(new_pos, new_seq))
    n_q = sum(nq)
    q_pos = (old + rng.integers(0, m + 1, n_q)).astype(np.int32)
    q_seq = rng.integers(0, 3, n_q).astype(np.int32)
    # the receive buffer, stacked over CompNodes: q rows, then k rows, then v rows
    q = wire_of(rng.standard_normal((n_q, n_heads, head_dim)), wire)
    k_new = wire_of(rng.standard_normal((m, n_kv, head_dim)), wire)
    v_new = wire_of(rng.standard_normal((m, n_kv, head_dim)), wire)
    parts, qa, ka = [], 0, 0
    for a, b in zip(nq, nkv):
        parts += [q[qa:qa + a].ravel(), k_new[ka:ka + b].ravel(), v_new[ka:ka + b].ravel()]
        qa, ka = qa + a, ka + b
    recv = cupy.asarray(np.concatenate(parts))
    slot = int(rng.integers(0, layers))
    return cache, recv, slot, old, m, q_pos, q_seq, k_pos, k_seq, q, k_new, v_new


@pytest.mark.parametrize("split", [None, 1, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(9, 3, 64), (4, 4, 32), (2, 1, 128), (2, 2, 100), (3, 3, 1)])
@pytest.mark.parametrize("layout", [((1,), (1,)), ((0, 1, 0), (1, 0, 1)), ((2, 0), (0, 3)), ((0,), (2,))])
def test_decode_layer_equals_the_general_path(monkeypatch, split, dtype, causal, shape, layout):
    """split: the key shares decode_attend's blocks take (None: key_shares decides; 1: no split)."""
    monkeypatch.setattr(decode_cuda, "SPLIT", split)
    n_heads, n_kv, head_dim = shape
    nq, nkv = layout
    wire = np.dtype(wire_dtype(dtype))
    cache, recv, slot, old, m, q_pos, q_seq, k_pos, k_seq, q, k_new, v_new = make_step(shape, layout, wire)
    n_q = sum(nq)
    scale = 1.0 / np.sqrt(head_dim)
    decode = DecodeLayers(cache, nq, nkv, cupy.asarray(q_pos), cupy.asarray(q_seq), n_heads, n_kv, head_dim, wire,
                          causal, scale)
    cupy.cuda.runtime.memset(cache.k[slot, old:].data.ptr, 0xFF, cache.k[slot, old:].nbytes)  # poison new rows
    got = cupy.asnumpy(decode.layer(recv, slot))
    assert not cupy.asnumpy(decode.counters).any(), "the share counters must be zero again for the next layer"
    again = cupy.asnumpy(decode.layer(recv, slot))  # a second layer on the same buffers: the same result
    assert np.array_equal(again.view(np.uint32 if wire == np.float32 else np.uint16),
                          got.view(np.uint32 if wire == np.float32 else np.uint16))
    cache.end_step()
    # the cache's new rows: exactly the received ones; the old rows untouched
    assert np.array_equal(cupy.asnumpy(cache.k[slot, old:old + m]), k_new)
    assert np.array_equal(cupy.asnumpy(cache.v[slot, old:old + m]), v_new)
    # reference: the NumPy plan over every cached row, in float32 values
    keys = cupy.asnumpy(cache.k[slot, :old + m])
    vals = cupy.asnumpy(cache.v[slot, :old + m])
    plan = prepare_attention(q_pos, q_seq, k_pos, k_seq, causal=causal, scale=scale, xp=np)
    o_ref, lse_ref = plan(q, keys, vals)
    assert got.shape == (n_q * n_heads * (head_dim + (2 if wire == np.uint16 else 1)),)
    o, lse = unpack_partial(got.reshape(n_q, n_heads, head_dim + (2 if wire == np.uint16 else 1)), wire)
    o = np.asarray(o, dtype=np.float64)
    assert not np.isnan(o).any() and not np.isnan(lse).any(), "unwritten output elements"
    seen = np.isfinite(lse_ref)
    assert np.array_equal(np.isfinite(lse), seen), "a row with no visible key must give lse = -inf, and only such"
    assert np.all(o[~seen] == 0)
    o_tol = TOL if wire == np.float32 else 2 ** -8  # bf16 output bits: half an ulp of bf16
    # o is a weighted mean of standard-normal values: cancellation can leave a row's o tiny (seen: 4e-4 at D = 1)
    # while its rounding error stays that of values near 1, so the scale has a floor
    scale_o = np.maximum(np.abs(o_ref).max(axis=-1, keepdims=True), O_FLOOR)
    assert (np.abs(o - o_ref) / scale_o).max(initial=0) <= o_tol
    assert np.abs(lse[seen] - lse_ref[seen]).max(initial=0) <= 1e-4


def test_no_query_gives_an_empty_send_buffer_and_still_stores_keys():
    cache = KVCache(cupy, 1, 8, 1, 64, np.float32)
    cache.begin_step(np.arange(2), np.zeros(2))
    recv = cupy.arange(2 * 2 * 64, dtype=cupy.float32)
    decode = DecodeLayers(cache, [0], [2], cupy.zeros(0, cupy.int32), cupy.zeros(0, cupy.int32), 1, 1, 64,
                          np.float32, True, 0.125)
    assert decode.layer(recv, 0).size == 0
    assert np.array_equal(cupy.asnumpy(cache.k[0, :2]).ravel(), np.arange(128, dtype=np.float32))
    assert np.array_equal(cupy.asnumpy(cache.v[0, :2]).ravel(), np.arange(128, 256, dtype=np.float32))



@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(9, 3, 64), (4, 4, 32), (2, 1, 128), (2, 2, 100), (3, 3, 1)])
@pytest.mark.parametrize("layout", [((1,), (1,)), ((0, 1, 0), (1, 0, 1)), ((2, 0), (0, 3)), ((0,), (2,)),
                                    ((40, 0, 33), (17, 50, 0))])
def test_plan_layer_equals_the_array_code_bit_for_bit(dtype, causal, shape, layout):
    """PlanLayers (unpack_rows, the plan, pack_partial) against the array code it replaces on a larger
    step (a copy per CompNode, the q concatenation, precision.pack_partial) with the same plan: the same bits in
    the send buffer and the cache (the new kernels only move and round values). Send buffer and new rows poisoned."""
    n_heads, n_kv, head_dim = shape
    nq, nkv = layout
    wire = np.dtype(wire_dtype(dtype))
    cache, recv, slot, old, m, q_pos, q_seq, k_pos, k_seq, q, k_new, v_new = make_step(shape, layout, wire)
    plan = prepare_attention(cupy.asarray(q_pos), cupy.asarray(q_seq), cupy.asarray(k_pos), cupy.asarray(k_seq),
                             causal=causal, scale=1.0 / np.sqrt(head_dim))
    layers = decode_cuda.PlanLayers(cache, nq, nkv, plan, n_heads, n_kv, head_dim, wire)
    cupy.cuda.runtime.memset(cache.k[slot, old:].data.ptr, 0xFF, cache.k[slot, old:].nbytes)  # poison new rows
    cupy.cuda.runtime.memset(cache.v[slot, old:].data.ptr, 0xFF, cache.v[slot, old:].nbytes)
    got = cupy.asnumpy(layers.layer(recv, slot))
    assert np.array_equal(cupy.asnumpy(cache.k[slot, old:old + m]), k_new)
    assert np.array_equal(cupy.asnumpy(cache.v[slot, old:old + m]), v_new)
    o, lse = plan(cupy.asarray(q), *cache.rows(slot))  # the array code's q: the rows, stacked
    want = cupy.asnumpy(pack_partial(o, lse, wire).ravel())
    bits = np.uint32 if wire == np.float32 else np.uint16
    assert got.shape == want.shape and np.array_equal(got.view(bits), want.view(bits))
