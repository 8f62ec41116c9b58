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
