"""The AttnNode's preallocated KV cache: rows written in place equal the growing concatenation it replaced."""
import numpy as np
import pytest

from rshard_hpc.engine.kv_cache import KVCache, key_capacity
from rshard_hpc.plan.schemes import PlanSpec, make_plan


def test_capacity_counts_every_position_of_the_key_group():
    spec = PlanSpec("strided", 2, 3, 1, 2)
    plans = [make_plan(spec, n) for n in (0, 1, 7, 13)]
    total = sum(key_capacity(plans, j) for j in range(3))
    assert total == 21
    assert key_capacity(plans, 0) == sum(int(np.sum(g == 0)) for _, g in plans)


def test_steps_equal_concatenation_and_overflow_is_refused():
    rng = np.random.default_rng(7)
    layers, hkv, d = 3, 2, 4
    cache = KVCache(np, layers, 9, hkv, d, np.float32)
    cache.k.fill(np.nan)  # poison: every row read must have been written
    want_k = [[] for _ in range(layers)]
    want_pos = []
    for m in (5, 0, 1, 3):  # a prefill, an empty step, decode steps
        pos = rng.integers(0, 100, m)
        seq = rng.integers(0, 3, m)
        all_pos, all_seq = cache.begin_step(pos, seq)
        want_pos += list(pos)
        np.testing.assert_array_equal(all_pos, want_pos)
        for layer in range(layers):
            k = rng.standard_normal((m, hkv, d)).astype(np.float32)
            k_new, v_new = cache.new_rows(layer)
            k_new[:] = k
            v_new[:] = -k
            want_k[layer].append(k)
            k_all, v_all = cache.rows(layer)
            np.testing.assert_array_equal(k_all, np.concatenate(want_k[layer]))
            np.testing.assert_array_equal(v_all, -np.concatenate(want_k[layer]))
        cache.end_step()
    with pytest.raises(RuntimeError, match="KV cache overflow"):
        cache.begin_step(np.arange(1), np.zeros(1))


def test_lanes_write_their_own_rows_and_see_the_rows_before_their_end():
    """KVCache.lane (micro-batches): a lane's new rows are its slice of the step's reserved rows; it reads every row
    up to its own last (earlier steps' and earlier lanes'), none of a later lane's."""
    cache = KVCache(np, 2, 10, 1, 2, np.float32)
    cache.begin_step(np.arange(3), np.zeros(3, int))
    cache.new_rows(1)[0][...] = 1.0
    cache.end_step()
    cache.begin_step(np.arange(3, 9), np.zeros(6, int))
    first, second = cache.lane(0, 2), cache.lane(2, 4)
    assert (first.filled, first.new, second.filled, second.new) == (3, 2, 5, 4)
    first.new_rows(1)[0][...] = 2.0
    second.new_rows(1)[0][...] = 3.0
    k_first, _ = first.rows(1)
    k_second, _ = second.rows(1)
    np.testing.assert_array_equal(k_first[:, 0, 0], [1, 1, 1, 2, 2])
    np.testing.assert_array_equal(k_second[:, 0, 0], [1, 1, 1, 2, 2, 3, 3, 3, 3])
    assert first.pos is cache.pos and first.k is cache.k
    with pytest.raises(ValueError, match="outside"):
        cache.lane(4, 3)
