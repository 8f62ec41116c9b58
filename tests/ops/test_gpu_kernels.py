"""The CUDA kernels (kernels/*.cu) against a float64 NumPy reference. Skipped without CuPy or a GPU.

Every check draws fresh random inputs and poisons the outputs with NaN first, so an element the kernel
never writes fails the test. Tolerances: fp32 1e-4 relative, bf16 2e-2 (the reference sees the same
bf16-rounded inputs; the kernel also rounds the softmax weights to bf16 for the tensor cores).
"""
import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (GPU tests run on the GPU machine)")
try:
    _N_GPUS = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # no driver / no device
    _N_GPUS, _WHY = 0, str(exc)
else:
    _WHY = "CUDA finds no GPU"
if _N_GPUS < 1:
    pytest.skip(f"no usable GPU: {_WHY}", allow_module_level=True)

from rshard_hpc.ops import attention, attention_cuda, precision  # noqa: E402

TOL = {"fp32": 1e-4, "bf16": 2e-2}
LSE_TOL = {"fp32": 1e-4, "bf16": 2e-3}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(attention_cuda, "POISON_OUTPUTS", True)


def ref_attention(q, q_pos, q_seq, k, v, k_pos, k_seq, causal, scale):
    """float64 dense reference: o (nq, Hq, D), lse (nq, Hq); fully masked rows (0, -inf)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    ok = q_seq[:, None] == k_seq[None, :]
    if causal:
        ok &= k_pos[None, :] <= q_pos[:, None]
    s = np.einsum("qhd,khd->hqk", q, k, optimize=True) * scale
    s = np.where(ok[None], s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    any_key = np.isfinite(top)
    p = np.exp(s - np.where(any_key, top, 0.0))
    den = p.sum(axis=-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", p / np.where(any_key, den, 1.0), v, optimize=True)
    lse = np.where(any_key, top + np.log(np.where(any_key, den, 1.0)), -np.inf)[..., 0].T
    return o, lse


def make_inputs(rng, nq, nk, n_heads, n_kv, head_dim, dtype):
    """Random q, k, v in both forms: (device arrays for the kernel, float64 host copies for the reference)."""
    host = [rng.standard_normal((n, h, head_dim)).astype(np.float32) for n, h in
            ((nq, n_heads), (nk, n_kv), (nk, n_kv))]
    host[0] *= 2.0  # sharper softmax
    if dtype == "bf16":
        bits = [precision.to_bf16_bits(a) for a in host]
        host = [precision.bf16_bits_to_float(b) for b in bits]
        dev = [cupy.asarray(b) for b in bits]
    else:
        dev = [cupy.asarray(a) for a in host]
    return dev, host


def check(got, want, dtype, q_seq_rows=None):
    o, lse = (cupy.asnumpy(a) for a in got)
    o_ref, lse_ref = want
    assert not np.isnan(o).any() and not np.isnan(lse).any(), "unwritten (NaN) output elements"
    masked = ~np.isfinite(lse_ref)
    assert np.array_equal(masked, ~np.isfinite(lse)), "fully masked rows differ"
    assert np.all(lse[masked] == -np.inf)
    assert np.all(o[masked.nonzero()[0], masked.nonzero()[1]] == 0.0), "fully masked rows must give o = 0"
    rel = np.linalg.norm(o - o_ref) / max(np.linalg.norm(o_ref), 1e-30)
    assert rel <= TOL[dtype], f"o relative error {rel:.2e} > {TOL[dtype]}"
    if (~masked).any():
        lerr = np.max(np.abs(lse[~masked] - lse_ref[~masked]) / (1.0 + np.abs(lse_ref[~masked])))
        assert lerr <= LSE_TOL[dtype], f"lse error {lerr:.2e}"
    return rel


def ragged_problem(rng, lens, beta=3, c_a=2, qi=0, kj=1, shuffle=True):
    """An AttnNode (qi, kj) block of a strided plan over a ragged batch: query rows of index group qi,
    key rows of group kj, every sequence's positions 0..n-1; rows in random order if shuffle."""
    q_pos, q_seq, k_pos, k_seq = [], [], [], []
    for s, n in enumerate(lens):
        p = np.arange(n)
        g = (p // c_a) % beta
        q_pos.append(p[g == qi]), q_seq.append(np.full((g == qi).sum(), s))
        k_pos.append(p[g == kj]), k_seq.append(np.full((g == kj).sum(), s))
    q_pos, q_seq, k_pos, k_seq = (np.concatenate(a).astype(np.int32) for a in (q_pos, q_seq, k_pos, k_seq))
    if shuffle:
        pq, pk = rng.permutation(len(q_pos)), rng.permutation(len(k_pos))
        q_pos, q_seq, k_pos, k_seq = q_pos[pq], q_seq[pq], k_pos[pk], k_seq[pk]
    return q_pos, q_seq, k_pos, k_seq


def run_case(rng, q_pos, q_seq, k_pos, k_seq, n_heads, n_kv, head_dim, dtype, causal, mma_config=None):
    dev, host = make_inputs(rng, len(q_pos), len(k_pos), n_heads, n_kv, head_dim, dtype)
    scale = 1.0 / np.sqrt(head_dim)
    plan = attention_cuda.prepare_attention(cupy.asarray(q_pos), cupy.asarray(q_seq), cupy.asarray(k_pos),
                                           cupy.asarray(k_seq), causal=causal, scale=scale, mma_config=mma_config)
    got = plan(*dev)
    want = ref_attention(host[0], q_pos, q_seq, host[1], host[2], k_pos, k_seq, causal, scale)
    return check(got, want, dtype)


# Every class of head dim the host accepts (attention_cuda.head_dim_classes: CUDA-core kernel by threads per row
# and key tile, tensor-core kernel by configuration), at both ends of each, up to MAX_HEAD_DIM.
HEAD_DIMS = [(dtype, d) for dtype in ("fp32", "bf16") for d in attention_cuda.class_ends(dtype == "bf16")]


def test_head_dims_reach_the_maximum():
    assert ("fp32", attention_cuda.MAX_HEAD_DIM) in HEAD_DIMS and ("bf16", attention_cuda.MAX_HEAD_DIM) in HEAD_DIMS


@pytest.mark.parametrize("dtype,head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [True, False])
def test_ragged_strided_gqa(dtype, head_dim, causal):
    rng = np.random.default_rng()
    # lengths include 1 and 2 (sequences with no key of group 1: fully masked rows) and a multi-tile one
    q_pos, q_seq, k_pos, k_seq = ragged_problem(rng, [1, 37, 300, 2, 5, 700, 64])
    run_case(rng, q_pos, q_seq, k_pos, k_seq, 9, 3, head_dim, dtype, causal)


@pytest.mark.parametrize("head_dim", [attention_cuda.MAX_HEAD_DIM + 1, attention_cuda.MAX_HEAD_DIM + 64, 65, 130])
def test_unsupported_head_dims_are_refused(head_dim):
    """A head dim no kernel takes is a ValueError when the plan binds its kernel (the first call)."""
    pos = cupy.arange(8, dtype=cupy.int32)
    plan = attention_cuda.prepare_attention(pos, pos * 0, pos, pos * 0, causal=True, scale=0.1)
    x = cupy.ones((8, 2, head_dim), cupy.float32)
    with pytest.raises(ValueError, match="head dimension"):
        plan(x, x, x)


def test_plan_reused_across_layers_and_checked():
    """One plan, several layers' q, k, v (as the engine calls it): each equals the one-shot call; wrong row
    counts, another dtype or head dim, and a bad scale are ValueErrors."""
    rng = np.random.default_rng()
    q_pos, q_seq, k_pos, k_seq = ragged_problem(rng, [300, 2, 700])
    pos = [cupy.asarray(a) for a in (q_pos, q_seq, k_pos, k_seq)]
    plan = attention_cuda.prepare_attention(*pos, causal=True, scale=0.125)
    for _layer in range(3):
        (q, k, v), _ = make_inputs(rng, len(q_pos), len(k_pos), 8, 2, 64, "bf16")
        o, lse = plan(q, k, v)
        o1, lse1 = attention_cuda.partial_attention(q, *pos[:2], k, v, *pos[2:], True, 0.125)
        assert cupy.array_equal(o, o1) and cupy.array_equal(lse, lse1)
    with pytest.raises(ValueError, match="prepared for"):
        plan(q[1:], k, v)
    with pytest.raises(ValueError, match="prepared for"):
        plan(q, k[1:], v[1:])
    (q32, k32, v32), _ = make_inputs(rng, len(q_pos), len(k_pos), 8, 2, 64, "fp32")
    with pytest.raises(ValueError, match="prepare another plan"):
        plan(q32, k32, v32)
    (q2, k2, v2), _ = make_inputs(rng, len(q_pos), len(k_pos), 8, 2, 32, "bf16")
    with pytest.raises(ValueError, match="prepare another plan"):
        plan(q2, k2, v2)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            attention_cuda.prepare_attention(*pos, causal=True, scale=bad)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False])
def test_diagonal_block_and_unshuffled(dtype, causal):
    """AttnNode (i, i) (queries and keys of one group), rows in plan order, MHA."""
    rng = np.random.default_rng()
    q_pos, q_seq, k_pos, k_seq = ragged_problem(rng, [513, 129, 1000], beta=2, c_a=1, qi=1, kj=1, shuffle=False)
    run_case(rng, q_pos, q_seq, k_pos, k_seq, 4, 4, 64, dtype, causal)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_long_strided_block(dtype, head_dim):
    """One 4096-token sequence, beta = 3, c_a = 2: many full, partial and skipped tiles."""
    rng = np.random.default_rng()
    q_pos, q_seq, k_pos, k_seq = ragged_problem(rng, [4096], beta=3, c_a=2, qi=2, kj=0)
    run_case(rng, q_pos, q_seq, k_pos, k_seq, 6, 2, head_dim, dtype, True)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_arbitrary_positions_and_seq_ids(dtype):
    """Positions need not be contiguous, sequence ids need not be small or sorted; some queries come
    before every key of their sequence (fully masked when causal)."""
    rng = np.random.default_rng()
    nq, nk = 333, 517
    q_seq = rng.choice([7, 1000, 42], nq).astype(np.int32)
    k_seq = rng.choice([7, 1000, 42, 5], nk).astype(np.int32)
    q_pos = rng.integers(0, 5000, nq).astype(np.int32)
    k_pos = rng.integers(100, 5000, nk).astype(np.int32)
    q_pos[:10] = 3  # before every key (k_pos >= 100)
    for causal in (True, False):
        run_case(rng, q_pos, q_seq, k_pos, k_seq, 8, 2, 64, dtype, causal)


def test_empty_inputs():
    q = cupy.ones((5, 2, 16), cupy.float32)
    none = cupy.zeros((0, 2, 16), cupy.float32)
    pos = cupy.arange(5)
    o, lse = attention_cuda.partial_attention(q, pos, pos * 0, none, none, pos[:0], pos[:0], True, 0.25)
    assert o.shape == (5, 2, 16) and float(abs(o).max()) == 0.0 and bool((lse == -cupy.inf).all())
    o, lse = attention_cuda.partial_attention(none, pos[:0], pos[:0], q, q, pos, pos, True, 0.25)
    assert o.shape == (0, 2, 16) and lse.shape == (0, 2)


def test_dispatch_matches_numpy_path():
    """attention.partial_attention on CuPy arrays (the kernel) against the same call on NumPy arrays."""
    rng = np.random.default_rng()
    q_pos, q_seq, k_pos, k_seq = ragged_problem(rng, [100, 900, 3])
    (q, k, v), _ = make_inputs(rng, len(q_pos), len(k_pos), 4, 2, 32, "fp32")
    o_np, lse_np = attention.partial_attention(q.get(), q_pos, q_seq, k.get(), v.get(), k_pos, k_seq, True, 0.17)
    o_gpu, lse_gpu = attention.partial_attention(q, cupy.asarray(q_pos), cupy.asarray(q_seq), k, v,
                                                 cupy.asarray(k_pos), cupy.asarray(k_seq), True, 0.17)
    check((o_gpu, lse_gpu), (o_np.astype(np.float64), lse_np.astype(np.float64)), "fp32")
    # prepare_attention dispatches on the positions' module, or on xp= (NumPy positions, CuPy plan)
    plan = attention.prepare_attention(cupy.asarray(q_pos), cupy.asarray(q_seq), cupy.asarray(k_pos),
                                       cupy.asarray(k_seq), causal=True, scale=0.17)
    assert isinstance(plan, attention_cuda.CudaAttentionPlan)
    plan = attention.prepare_attention(q_pos, q_seq, k_pos, k_seq, causal=True, scale=0.17, xp=cupy)
    assert isinstance(plan, attention_cuda.CudaAttentionPlan)
    check(plan(q, k, v), (o_np.astype(np.float64), lse_np.astype(np.float64)), "fp32")
    assert isinstance(attention.prepare_attention(q_pos, q_seq, k_pos, k_seq, causal=True, scale=0.17),
                      attention.AttentionPlan)


def ref_merge(o_parts, lse_parts):
    o_parts, lse_parts = np.asarray(o_parts, np.float64), np.asarray(lse_parts, np.float64)
    top = lse_parts.max(axis=0)
    ok = np.isfinite(top)
    w = np.exp(lse_parts - np.where(ok, top, 0.0)[None])
    tot = w.sum(axis=0)
    o = (w[..., None] * o_parts).sum(axis=0) / np.where(ok, tot, 1.0)[..., None]
    return np.where(ok[..., None], o, 0.0), np.where(ok, np.where(ok, top, 0) + np.log(np.where(ok, tot, 1.0)), -np.inf)


@pytest.mark.parametrize("n_parts", [1, 3, 4])
def test_merge_with_neg_inf_partials_and_views(n_parts):
    rng = np.random.default_rng()
    n, heads, head_dim = 257, 5, 64
    packed = rng.standard_normal((n_parts, n, heads, head_dim + 1)).astype(np.float32)  # as the engine packs
    packed[..., head_dim] *= 3.0
    dead = rng.random((n_parts, n, heads)) < 0.3  # partials whose keys were all masked
    packed[..., head_dim][dead] = -np.inf
    packed[..., :head_dim][dead] = 0.0
    packed[:, :7, :, head_dim] = -np.inf  # rows with no visible key anywhere
    packed[:, :7, :, :head_dim] = 0.0
    dev = cupy.asarray(packed)
    o, lse = attention_cuda.merge_partials(dev[..., :head_dim], dev[..., head_dim])  # strided views
    o_ref, lse_ref = ref_merge(packed[..., :head_dim], packed[..., head_dim])
    check((o, lse), (o_ref, lse_ref), "fp32")
    # the public dispatch gives the same
    o2, lse2 = attention.merge_partials(dev[..., :head_dim], dev[..., head_dim])
    assert cupy.array_equal(o2, o) and cupy.array_equal(lse2, lse)


def test_merge_equals_unsplit_attention():
    """Splitting the keys into beta groups and merging the partials gives the unsplit result."""
    rng = np.random.default_rng()
    n, beta = 600, 3
    pos = np.arange(n, dtype=np.int32)
    seq = np.zeros(n, np.int32)
    group = (pos // 2) % beta
    (q, k, v), _ = make_inputs(rng, n, n, 6, 3, 64, "fp32")
    full = attention_cuda.partial_attention(q, pos, seq, k, v, pos, seq, True, 0.125)
    parts = []
    for j in range(beta):
        sel = group == j
        dsel = cupy.asarray(sel)
        parts.append(attention_cuda.partial_attention(q, pos, seq, k[dsel], v[dsel], pos[sel], seq[sel], True, 0.125))
    o, lse = attention_cuda.merge_partials(cupy.stack([p[0] for p in parts]), cupy.stack([p[1] for p in parts]))
    check((o, lse), tuple(cupy.asnumpy(a).astype(np.float64) for a in full), "fp32")


def _variant_configs():
    from rshard_hpc.bench import kernel as bench

    return [(hd, tuple(attention_cuda.MmaConfig(*c))) for hd, cs in bench.VARIANTS.items() for c in cs]


@pytest.mark.parametrize("head_dim,config", _variant_configs(), ids=lambda x: str(x).replace(" ", ""))
def test_mma_configurations(head_dim, config):
    """Every tensor-core configuration the benchmark may choose (query-tile rows, warps, key-tile size,
    stages), given to the plan: ragged GQA blocks with fully masked rows, causal and not, and one long
    causal sequence."""
    rng = np.random.default_rng()
    for causal in (True, False):
        q_pos, q_seq, k_pos, k_seq = ragged_problem(rng, [1, 37, 300, 2, 5, 700, 64])
        run_case(rng, q_pos, q_seq, k_pos, k_seq, 9, 3, head_dim, "bf16", causal, mma_config=config)
    # one contiguous causal sequence: skipped, full and masked tiles, more than 32 key tiles (the kernel
    # decides which tiles to visit 32 at a time)
    q_pos = k_pos = np.arange(2500, dtype=np.int32)
    run_case(rng, q_pos, q_pos * 0, k_pos, k_pos * 0, 3, 1, head_dim, "bf16", True, mma_config=config)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("splits", [2, 5, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_key_split_shares_merge_exactly(monkeypatch, dtype, splits, causal):
    """Forced key shares (more shares than key tiles too: empty shares give (0, -inf) and merge away) on a
    ragged block with fully masked rows."""
    monkeypatch.setattr(attention_cuda, "KEY_SPLITS", splits)
    rng = np.random.default_rng()
    q_pos, q_seq, k_pos, k_seq = ragged_problem(rng, [1, 37, 300, 2, 700])
    run_case(rng, q_pos, q_seq, k_pos, k_seq, 9, 3, 64, dtype, causal)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decode_step_splits_keys(dtype):
    """A decode step's shape (one new query per sequence against thousands of keys) takes several key shares
    on its own, and stays exact."""
    rng = np.random.default_rng()
    k_pos = np.arange(4096, dtype=np.int32)
    k_seq = np.zeros(4096, np.int32)
    q_pos, q_seq = np.array([4095], np.int32), np.array([0], np.int32)
    assert attention_cuda.key_splits(9, 4096 // 64) > 1
    run_case(rng, q_pos, q_seq, k_pos, k_seq, 9, 3, 64, dtype, True)
