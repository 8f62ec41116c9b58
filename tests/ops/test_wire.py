"""ops/wire.py (CPU): the index-array pack and unpack give the wire bytes and the partials of the per-(i, j)
loops they replaced, byte for byte, at ragged group sizes (empty groups, n = 0, 1, odd), GQA head ratios and
both wire types. The loops below are the previous CompWorker._pack_qkv / _exchange_back, kept as the spec;
their unpack buffer is poisoned so a row the loop never fills would show."""
import numpy as np
import pytest
from conftest import partials_recv

from rshard_hpc.ops.attention import merge_partials
from rshard_hpc.ops.precision import (
    to_bf16_bits,
    unpack_partial,
    wire_dtype,
)
from rshard_hpc.ops.wire import WireRoutes, _one_product

SHAPES = [(4, 4, 16), (9, 3, 64), (6, 4, 8), (2, 1, 128), (3, 3, 5)]  # (H, Hkv, D)


def _groups(rng, n, beta):
    """rows_of_group: each local row in one random group (some groups may be empty)."""
    group = rng.integers(0, beta, size=n)
    return [np.flatnonzero(group == g) for g in range(beta)]


def _old_pack(rows, q, k, v, wire):
    to_wire = (lambda a: to_bf16_bits(a)) if wire == np.uint16 else (lambda a: a.astype(np.float32, copy=False))
    q, k, v = (to_wire(a) for a in (q, k, v))
    beta = len(rows)
    pieces = [p for i in range(beta) for j in range(beta) for p in (q[rows[i]].ravel(), k[rows[j]].ravel(),
                                                                       v[rows[j]].ravel())]
    return np.concatenate(pieces) if pieces else np.zeros(0, wire)


def _old_unpack(rows, recv, n, n_heads, slots, wire):
    beta = len(rows)
    width = n_heads * slots
    poison = np.uint16(0xFFFF) if wire == np.uint16 else np.float32(np.nan)
    packed = np.full((beta, n, n_heads, slots), poison, dtype=wire)
    offset = 0
    for i in range(beta):
        n_rows = len(rows[i])
        for j in range(beta):
            packed[j, rows[i]] = recv[offset:offset + n_rows * width].reshape(n_rows, n_heads, slots)
            offset += n_rows * width
    assert offset == recv.size
    return unpack_partial(packed, wire)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n_heads,n_kv,head_dim", SHAPES)
@pytest.mark.parametrize("n,beta", [(0, 2), (1, 3), (7, 3), (33, 2), (40, 1), (19, 5)])
def test_pack_and_unpack_equal_the_loops(n, beta, n_heads, n_kv, head_dim, dtype):
    rng = np.random.default_rng([n, beta, n_heads, n_kv, head_dim, len(dtype)])
    wire = wire_dtype(dtype)
    rows = _groups(rng, n, beta)
    q = rng.standard_normal((n, n_heads, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((n, n_kv, head_dim)).astype(np.float32) for _ in range(2))
    routes = WireRoutes(rows, n, n_heads, n_kv, head_dim, wire)
    send = routes.pack(q, k, v)
    want = _old_pack(rows, q, k, v, wire)
    assert send.dtype == want.dtype and send.tobytes() == want.tobytes()
    sizes = [[(len(rows[i]) * n_heads + 2 * len(rows[j]) * n_kv) * head_dim for j in range(beta)]
             for i in range(beta)]
    assert routes.send_sizes == sizes and sum(map(sum, sizes)) == send.size

    recv = partials_recv(rng, rows, n_heads, head_dim, wire)
    o_parts, lse_parts = _old_unpack(rows, recv, n, n_heads, routes.slots, wire)
    packed = np.take(recv.reshape(-1, n_heads * routes.slots), routes.recv_rows, axis=0)
    o2, lse2 = unpack_partial(packed.reshape(beta, n, n_heads, routes.slots), wire)
    assert o2.tobytes() == o_parts.tobytes() and lse2.tobytes() == lse_parts.tobytes()
    got = routes.merge(recv)
    assert got.shape == (n, n_heads, head_dim) and got.dtype == np.float32
    assert got.tobytes() == merge_partials(o_parts, lse_parts)[0].tobytes()


def test_rows_must_cover_every_local_row_once():
    with pytest.raises(ValueError, match="exactly once"):
        WireRoutes([np.array([0, 1]), np.array([1])], 3, 4, 4, 8, np.float32)
    with pytest.raises(ValueError, match="exactly once"):
        WireRoutes([np.array([0]), np.array([2])], 3, 4, 4, 8, np.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n_heads,n_kv,head_dim", SHAPES)
@pytest.mark.parametrize("n,beta", [(1, 3), (19, 3), (40, 2)])
def test_views_of_one_product_are_read_in_place(n, beta, n_heads, n_kv, head_dim, dtype):
    """q, k, v as Bert.pre gives them (column slices of one product) pack to the loops' bytes, read from that
    product itself (no copy before the gather); slices in another order, or of a larger array, take the copy."""
    rng = np.random.default_rng([n, beta, n_heads, n_kv, head_dim, 7])
    wire = wire_dtype(dtype)
    rows = _groups(rng, n, beta)
    product = rng.standard_normal((n, (n_heads + 2 * n_kv) * head_dim)).astype(np.float32)
    qkv = product.reshape(n, n_heads + 2 * n_kv, head_dim)
    q, k, v = qkv[:, :n_heads], qkv[:, n_heads:n_heads + n_kv], qkv[:, n_heads + n_kv:]
    fused = _one_product(q, k, v)
    assert fused is not None and np.shares_memory(fused, product) and fused.tobytes() == product.tobytes()
    send = WireRoutes(rows, n, n_heads, n_kv, head_dim, wire).pack(q, k, v)
    assert send.tobytes() == _old_pack(rows, q, k, v, wire).tobytes()

    wider = rng.standard_normal((n, n_heads + 2 * n_kv + 1, head_dim)).astype(np.float32)
    others = [(q, v, k), (q.copy(), k, v),
              (wider[:, :n_heads], wider[:, n_heads:n_heads + n_kv], wider[:, n_heads + n_kv:-1])]
    for q2, k2, v2 in others:
        assert _one_product(q2, k2, v2) is None
        got = WireRoutes(rows, n, n_heads, n_kv, head_dim, wire).pack(q2, k2, v2)
        assert got.tobytes() == _old_pack(rows, q2, k2, v2, wire).tobytes()
