"""Partial attention and the exact merge against a float64 full softmax."""
import numpy as np
import pytest

from rshard_hpc.ops.attention import AttentionPlan, merge_partials, partial_attention, prepare_attention, visible


def full_attention64(q, q_pos, q_seq, k, v, k_pos, k_seq, causal, scale):
    """float64 reference: (o, lse) with (0, -inf) on rows with no visible key."""
    nq, n_heads, _ = q.shape
    group = n_heads // k.shape[1]
    kk = np.repeat(k.astype(np.float64), group, axis=1)  # (nk, H, D)
    vv = np.repeat(v.astype(np.float64), group, axis=1)
    s = np.einsum("qhd,khd->hqk", q.astype(np.float64), kk) * scale
    mask = visible(q_pos, q_seq, k_pos, k_seq, causal)[None]
    s = np.where(mask, s, -np.inf)
    top = s.max(-1, keepdims=True)
    ok = np.isfinite(top)
    p = np.where(mask, np.exp(s - np.where(ok, top, 0)), 0.0)
    den = p.sum(-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", p / np.where(ok, den, 1), vv)
    lse = np.where(ok, top + np.log(np.where(ok, den, 1)), -np.inf)[..., 0].T
    return o, lse


def random_case(rng, nq, nk, n_heads, n_kv, head_dim, n_seqs):
    q = rng.standard_normal((nq, n_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((nk, n_kv, head_dim)).astype(np.float32)
    v = rng.standard_normal((nk, n_kv, head_dim)).astype(np.float32)
    q_pos = rng.integers(0, 300, nq).astype(np.int32)
    k_pos = rng.integers(0, 300, nk).astype(np.int32)
    q_seq = rng.integers(0, n_seqs, nq).astype(np.int32)
    k_seq = rng.integers(0, n_seqs, nk).astype(np.int32)
    return q, q_pos, q_seq, k, v, k_pos, k_seq


@pytest.mark.parametrize("keys_last_min", [1, 10**9])  # keys copied as kᵀ's columns in every pack / in none
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("seed", range(3))
def test_partial_attention_matches_float64(monkeypatch, causal, n_heads, n_kv, seed, keys_last_min):
    from rshard_hpc.ops import attention

    monkeypatch.setattr(attention, "KEYS_LAST_MIN", keys_last_min)
    rng = np.random.default_rng(seed)
    case = random_case(rng, 57, 83, n_heads, n_kv, 16, n_seqs=4)
    o, lse = partial_attention(*case, causal=causal, scale=0.25)
    o_ref, lse_ref = full_attention64(*case, causal=causal, scale=0.25)
    assert o.dtype == np.float32 and lse.dtype == np.float32
    assert np.array_equal(np.isneginf(lse), np.isneginf(lse_ref))
    finite = np.isfinite(lse_ref)
    np.testing.assert_allclose(lse[finite], lse_ref[finite], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-5)
    assert np.all(o[~finite] == 0)


def test_prepared_plan_is_reused_across_layers():
    """One plan, several (q, k, v) on the same rows (the layers of an engine step): each call equals the
    one-shot partial_attention and the float64 reference."""
    rng = np.random.default_rng(5)
    _, q_pos, q_seq, _, _, k_pos, k_seq = random_case(rng, 70, 90, 6, 2, 16, 3)
    plan = prepare_attention(q_pos, q_seq, k_pos, k_seq, causal=True, scale=0.25)
    assert isinstance(plan, AttentionPlan)
    for layer in range(3):
        q, _, _, k, v, _, _ = random_case(np.random.default_rng(layer), 70, 90, 6, 2, 16, 3)
        o, lse = plan(q, k, v)
        o1, lse1 = partial_attention(q, q_pos, q_seq, k, v, k_pos, k_seq, True, 0.25)
        np.testing.assert_array_equal(o, o1)
        np.testing.assert_array_equal(lse, lse1)
        o_ref, _ = full_attention64(q, q_pos, q_seq, k, v, k_pos, k_seq, True, 0.25)
        np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-5)


def test_plan_checks_rows_shapes_and_scale():
    rng = np.random.default_rng(6)
    q, q_pos, q_seq, k, v, k_pos, k_seq = random_case(rng, 20, 30, 4, 2, 8, 2)
    plan = prepare_attention(q_pos, q_seq, k_pos, k_seq, causal=False, scale=0.5)
    with pytest.raises(ValueError, match="prepared for 20 query and 30 key"):
        plan(q[:19], k, v)
    with pytest.raises(ValueError, match="prepared for 20 query and 30 key"):
        plan(q, k[:29], v[:29])
    with pytest.raises(ValueError, match="shape mismatch"):
        plan(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="shape mismatch"):
        plan(q[:, :3], k, v)  # 3 query heads over 2 KV heads
    with pytest.raises(ValueError, match="same length|one length"):
        prepare_attention(q_pos, q_seq[:5], k_pos, k_seq, causal=False, scale=0.5)
    for bad in (0.0, -0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale"):
            prepare_attention(q_pos, q_seq, k_pos, k_seq, causal=False, scale=bad)
    with pytest.raises(ValueError, match="CUDA"):
        prepare_attention(q_pos, q_seq, k_pos, k_seq, causal=False, scale=0.5, mma_config=(1, 1, 4, 64, 2, 1))


def test_fully_masked_rows_give_zero_and_minus_inf():
    rng = np.random.default_rng(7)
    q, q_pos, q_seq, k, v, k_pos, k_seq = random_case(rng, 10, 12, 2, 2, 8, 1)
    k_pos[:] = 100  # every key after every query: causal mask hides them all
    q_pos[:] = np.arange(10)
    o, lse = partial_attention(q, q_pos, q_seq, k, v, k_pos, k_seq, causal=True, scale=0.3)
    assert np.all(np.isneginf(lse)) and np.all(o == 0)
    o, lse = partial_attention(q, q_pos, q_seq, k[:0], v[:0], k_pos[:0], k_seq[:0], causal=False, scale=0.3)
    assert np.all(np.isneginf(lse)) and np.all(o == 0)


@pytest.mark.parametrize("causal", [True, False])
def test_split_keys_then_merge_equals_full(causal):
    """Partials over a random partition of the keys (some rows fully masked in some parts) merge exactly."""
    rng = np.random.default_rng(11)
    q, q_pos, q_seq, k, v, k_pos, k_seq = random_case(rng, 40, 120, 6, 3, 16, 3)
    parts = rng.integers(0, 4, len(k))
    parts[k_seq == 0] = 0  # sequence 0's keys all in part 0: its rows are -inf in parts 1..3
    o_parts, lse_parts = [], []
    for p in range(4):
        sel = np.flatnonzero(parts == p)
        o, lse = partial_attention(q, q_pos, q_seq, k[sel], v[sel], k_pos[sel], k_seq[sel], causal, 0.25)
        o_parts.append(o)
        lse_parts.append(lse)
    o_parts, lse_parts = np.stack(o_parts), np.stack(lse_parts)
    assert np.isneginf(lse_parts[1:, q_seq == 0]).all()
    o, lse = merge_partials(o_parts, lse_parts)
    o_ref, lse_ref = full_attention64(q, q_pos, q_seq, k, v, k_pos, k_seq, causal, 0.25)
    finite = np.isfinite(lse_ref)
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(lse[finite], lse_ref[finite], atol=2e-5, rtol=1e-5)
    assert np.array_equal(np.isneginf(lse), ~finite)


def test_merge_against_float64_softmax_with_minus_inf_and_noncontiguous():
    rng = np.random.default_rng(3)
    n_parts, n, n_heads, head_dim = 5, 33, 4, 8
    scores = rng.standard_normal((n_parts, n, n_heads, 7)) * 3  # 7 keys per part
    values = rng.standard_normal((n_parts, n, n_heads, 7, head_dim))
    scores[1] = -np.inf  # part 1 fully masked everywhere
    scores[:, 0] = -np.inf  # row 0 masked in every part
    scores[3, 5:9, 2] = -np.inf
    with np.errstate(invalid="ignore", divide="ignore"):
        lse_parts = np.log(np.exp(scores).sum(-1))  # (P, n, H), -inf where fully masked
        top = np.where(np.isfinite(lse_parts), lse_parts, 0)
        o_parts = np.einsum("pnhk,pnhkd->pnhd", np.nan_to_num(np.exp(scores - top[..., None])), values)
        o_parts /= np.where(np.isfinite(lse_parts), np.exp(lse_parts - top), 1)[..., None]
    o_parts = np.where(np.isfinite(lse_parts)[..., None], o_parts, 0)
    # the float64 full softmax over all 35 keys
    all_s = scores.transpose(1, 2, 0, 3).reshape(n, n_heads, -1)
    all_v = values.transpose(1, 2, 0, 3, 4).reshape(n, n_heads, -1, head_dim)
    with np.errstate(invalid="ignore"):
        w = np.exp(all_s - all_s.max(-1, keepdims=True))
        o_ref = np.einsum("nhk,nhkd->nhd", w / w.sum(-1, keepdims=True), all_v)
    # non-contiguous float32 inputs (a strided view over a larger array)
    big_o = np.zeros((n_parts, n, n_heads, 2 * head_dim), np.float32)
    big_o[..., ::2] = o_parts
    o, lse = merge_partials(big_o[..., ::2], lse_parts.astype(np.float32))
    assert np.all(o[0] == 0) and np.all(np.isneginf(lse[0]))
    np.testing.assert_allclose(o[1:], o_ref[1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal,key_shift,all_visible", [
    (False, 0, True),  # without causality a block's keys are all visible
    (True, -300, True),  # every key before every query: no mask built
    (True, 0, False),  # keys interleaved with the queries: masked
])
def test_packs_without_a_mask_match_float64(causal, key_shift, all_visible):
    """The NumPy plan skips the mask of a pack whose keys every query sees (AttentionPlan._pack): sequences of
    equal key counts, so no key is padding. Such packs, and masked ones, equal the float64 reference; the flag is
    what the positions say."""
    rng = np.random.default_rng(11)
    q, q_pos, _, k, v, k_pos, _ = random_case(rng, 40, 51, 6, 2, 16, n_seqs=3)
    q_seq, k_seq = np.arange(40, dtype=np.int32) % 3, np.arange(51, dtype=np.int32) % 3  # 17 keys each
    k_pos = (k_pos + key_shift).astype(np.int32)
    plan = AttentionPlan(q_pos, q_seq, k_pos, k_seq, causal=causal, scale=0.25)
    assert {pack.mask is None for pack in plan.packs} == {all_visible}
    o, lse = plan(q, k, v)
    o_ref, lse_ref = full_attention64(q, q_pos, q_seq, k, v, k_pos, k_seq, causal=causal, scale=0.25)
    np.testing.assert_allclose(lse, lse_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed,q_block", [(0, 1024), (1, 1024), (2, 1024), (3, 4)])
def test_many_ragged_sequences_share_packs_and_match_float64(monkeypatch, causal, seed, q_block):
    """A batch of many short prompts of different lengths (as an AttnNode sees a batch of one-line prompts):
    a few packs, not one call a sequence; padded keys take no weight, padded queries write nothing, rows without a
    visible key stay (0, -inf); the results equal the float64 reference. q_block 4: sequences cut into blocks."""
    from rshard_hpc.ops import attention

    monkeypatch.setattr(attention, "Q_BLOCK", q_block)
    rng = np.random.default_rng(seed)
    lengths_q, lengths_k = rng.integers(0, 12, 150), rng.integers(1, 14, 150)
    q_seq = np.repeat(np.arange(150), lengths_q).astype(np.int32)
    k_seq = np.repeat(np.arange(150), lengths_k).astype(np.int32)
    q, q_pos, _, k, v, k_pos, _ = random_case(rng, len(q_seq), len(k_seq), 6, 2, 8, n_seqs=1)
    q_pos, k_pos = (rng.integers(0, 20, len(a)).astype(np.int32) for a in (q_seq, k_seq))
    rng.shuffle(q_seq), rng.shuffle(k_seq)  # a sequence's rows need not be adjacent
    plan = AttentionPlan(q_pos, q_seq, k_pos, k_seq, causal=causal, scale=0.3)
    assert len(plan.packs) < len(np.unique(q_seq)) // 10
    assert sum(len(pack.rows) for pack in plan.packs) == len(q_seq)  # every query row once
    o, lse = plan(q, k, v)
    o_ref, lse_ref = full_attention64(q, q_pos, q_seq, k, v, k_pos, k_seq, causal=causal, scale=0.3)
    assert np.array_equal(np.isneginf(lse), np.isneginf(lse_ref)) and np.isneginf(lse_ref).any() == causal
    finite = np.isfinite(lse_ref)
    np.testing.assert_allclose(lse[finite], lse_ref[finite], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-5)


def test_pack_sizes_are_bounded():
    """Packs keep their scores under PACK_SCORES and take padding only up to a call's cost: a long sequence
    among short ones gets a pack of its own."""
    from rshard_hpc.ops.attention import PACK_SCORES, _pack_blocks

    lengths = np.array([5] * 200 + [600] + [5] * 200)
    packs = _pack_blocks(lengths, lengths)
    assert [len(p) for p in packs][0] == 1 and sorted(np.concatenate(packs).tolist()) == list(range(len(lengths)))
    for pack in packs:
        assert len(pack) * lengths[pack].max() ** 2 <= max(PACK_SCORES, 600 * 600)


@pytest.mark.parametrize("seed", range(6))
def test_plan_reads_rows_where_they_arrived(seed):
    """An AttnNode's last step on NumPy attends straight from its receive buffer (ops/attention.RowSource over
    ops/wire.recv_row_offsets): the same bits as the q, k, v arrays unpacked from it (GQA, three CompNodes, one
    sending nothing, causal and not)."""
    from rshard_hpc.ops.attention import RowSource
    from rshard_hpc.ops.wire import recv_row_offsets

    rng = np.random.default_rng(seed)
    n_heads, n_kv, head_dim = 6, 2, 8
    q_width, kv_width = n_heads * head_dim, n_kv * head_dim
    nq, nkv = rng.integers(0, 30, 3), rng.integers(0, 30, 3)
    nq[seed % 3] = nkv[seed % 3] = 0
    parts, qs, ks, vs = [], [], [], []
    for a, b in zip(nq, nkv):
        sizes = ((a, q_width), (b, kv_width), (b, kv_width))
        q, k, v = (rng.standard_normal((n, w)).astype(np.float32) for n, w in sizes)
        parts += [q.ravel(), k.ravel(), v.ravel()]
        qs.append(q), ks.append(k), vs.append(v)
    recv = np.concatenate(parts)
    q, k, v = (np.concatenate(x).reshape(-1, h, head_dim) for x, h in ((qs, n_heads), (ks, n_kv), (vs, n_kv)))
    q_src, k_src, v_src = recv_row_offsets(nq, nkv, q_width, kv_width)
    rows = recv.reshape(-1, kv_width)
    q_rows = (q_src // kv_width)[:, None] + np.arange(n_heads // n_kv)
    sources = (RowSource(rows, q_rows, (n_heads, head_dim)), RowSource(rows, k_src // kv_width, (n_kv, head_dim)),
               RowSource(rows, v_src // kv_width, (n_kv, head_dim)))
    np.testing.assert_array_equal(sources[0][np.arange(len(q))], q)
    np.testing.assert_array_equal(sources[2][np.arange(len(v))], v)
    q_seq, k_seq = rng.integers(0, 3, len(q)), rng.integers(0, 3, len(k))
    q_pos, k_pos = rng.integers(0, 50, len(q)), rng.integers(0, 50, len(k))
    for causal in (False, True):
        plan = prepare_attention(q_pos, q_seq, k_pos, k_seq, causal=causal, scale=0.3, xp=np)
        want, got = plan(q, k, v), plan(*sources)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("shape", [(3, 2, 1, 5, 43), (1, 12, 1, 43, 1), (7, 4, 2, 3, 2), (2, 1, 1, 1, 300)])
def test_row_max_is_numpys_maximum(shape):
    """ops/attention._row_max (one reduceat over the flat scores) equals max over the last axis, bit for bit,
    with rows all −inf (masked), a NaN row and ±inf entries."""
    from rshard_hpc.ops.attention import _row_max

    rng = np.random.default_rng(sum(shape))
    scores = rng.standard_normal(shape).astype(np.float32) * 50
    flat_rows = scores.reshape(-1, shape[-1])
    flat_rows[0] = -np.inf
    if len(flat_rows) > 2:
        flat_rows[1, -1], flat_rows[2, 0] = np.nan, np.inf
    got = _row_max(scores)
    assert got.shape == shape[:-1] + (1,) and got.dtype == np.float32
    np.testing.assert_array_equal(got, scores.max(axis=-1, keepdims=True))


def test_keys_as_columns_give_the_same_values_as_the_transposed_view(monkeypatch):
    """Above KEYS_LAST_MIN the plan copies a pack's keys as q kᵀ's columns: the results equal those of the
    transposed view's products to float32 rounding (43-key blocks, the 13-rank MiniLM job's), on the encoder's
    unmasked packs and on causal masked ones."""
    from rshard_hpc.ops import attention

    rng = np.random.default_rng(4)
    pos = np.tile(np.arange(128), 6).astype(np.int32)
    seq = np.repeat(np.arange(6), 128).astype(np.int32)
    q_rows, k_rows = np.flatnonzero((pos // 2) % 3 == 0), np.flatnonzero((pos // 2) % 3 == 1)
    q = rng.standard_normal((len(q_rows), 12, 32)).astype(np.float32)
    k, v = (rng.standard_normal((len(k_rows), 12, 32)).astype(np.float32) for _ in range(2))
    for causal in (False, True):
        results = []
        for keys_last_min in (32, 10**9):
            monkeypatch.setattr(attention, "KEYS_LAST_MIN", keys_last_min)
            plan = AttentionPlan(pos[q_rows], seq[q_rows], pos[k_rows], seq[k_rows], causal=causal, scale=32 ** -0.5)
            results.append(plan(q, k, v))
        for got, want in zip(*results):
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
