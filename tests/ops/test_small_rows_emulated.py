"""kernels/small_rows.cu run on the CPU, without a GPU (tests/ops/cuda_emulation.py), against float64 references
of what models/llama.py's pre and post compute: RMSNorm then the q/k/v product then RoPE; the O and down
products with their residual; RMSNorm then the gate/up product then SiLU * up. Float32 and bf16 weights (bf16:
the products' inputs rounded to bf16 first), rows from 1 to more than SMALL_ROWS (a second pass), widths that
are not multiples of a warp, outputs poisoned first. tests/ops/test_gpu_small_rows.py runs the real thing."""
import numpy as np
import pytest
from cuda_emulation import build, call, poisoned

from rshard_hpc.models.common import rms_norm, silu
from rshard_hpc.models.llama import apply_rope, rope_cos_sin, rope_inv_freq
from rshard_hpc.models.random_init import tiny_config
from rshard_hpc.ops import small_rows_cuda
from rshard_hpc.ops.precision import bf16_bits_to_float, round_bf16, to_bf16_bits

TOL = 2e-6  # relative to the largest output: fp32 sums in another order than the float64 reference
ROWS = [1, 3, small_rows_cuda.SMALL_ROWS + 3]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build(tmp_path_factory.mktemp("small_rows"), small_rows_cuda.SOURCE, small_rows_cuda.defines())


def weight(rng, shape, kind: str):
    """(what the kernel reads, its float64 values): float32 values, or bf16 bits."""
    w = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    if kind == "bf16":
        bits = to_bf16_bits(w)
        return bits, bf16_bits_to_float(bits).astype(np.float64)
    return w, w.astype(np.float64)


def operand(x, kind: str):
    """The product's input as the kernel multiplies it (bf16-rounded under bf16 weights), in float64."""
    return (round_bf16(x) if kind == "bf16" else x).astype(np.float64)


TIE_ULPS = 8  # float32 ulps: a normed value this near a bf16 rounding midpoint may round either way


def norm_inputs(rng, n: int, d: int, eps: float, kind: str):
    """Rows h (n, d) and norm weights (d,) to RMSNorm before a product. Under bf16 the kernel rounds its float32
    norm to bf16 and the reference rounds NumPy's: where the two float32 norms differ in their last bit at a bf16
    rounding midpoint they round apart (one bf16 ulp, a 3e-3 error in the product, seen once in CI), so rows with
    a normed value within TIE_ULPS of a midpoint are drawn again: the reference is then the kernel's own."""
    h = rng.standard_normal((n, d)).astype(np.float32) * 3
    nw = rng.standard_normal(d).astype(np.float32)
    while kind == "bf16":
        low = rms_norm(h, nw, eps).astype(np.float32).view(np.uint32) & 0xFFFF  # the bits bf16 rounds away
        tied = (np.abs(low.astype(np.int64) - 0x8000) <= TIE_ULPS).any(axis=1)
        if not tied.any():
            break
        h[tied] = rng.standard_normal((int(tied.sum()), d)).astype(np.float32) * 3
    return h, nw


def close(got, want, tol=TOL):
    assert not np.isnan(got).any(), "unwritten (NaN) output elements"
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err <= tol, f"relative error {err:.2e} > {tol}"


@pytest.mark.parametrize("kind", ["f32", "bf16"])
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("n_heads,n_kv,head_dim,d", [(3, 1, 8, 40), (2, 2, 4, 33)])
def test_norm_rope(lib, kind, n, n_heads, n_kv, head_dim, d):
    rng = np.random.default_rng()
    heads = n_heads + 2 * n_kv
    h, nw = norm_inputs(rng, n, d, 1e-5, kind)
    w, w64 = weight(rng, (heads * head_dim, d), kind)
    cfg = tiny_config("llama", n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, hidden=d)
    inv_freq = rope_inv_freq(cfg)
    pos = rng.integers(0, 9000, n).astype(np.int32)
    out = poisoned((n, heads * head_dim))
    call(lib, f"norm_rope_{kind}", h, nw, np.float32(1e-5), w, pos, inv_freq, out, n, d, heads, n_heads + n_kv,
         head_dim // 2)
    y = (operand(rms_norm(h, nw, 1e-5), kind) @ w64.T).reshape(n, heads, head_dim)
    cos, sin = rope_cos_sin(inv_freq, pos, np)
    want = np.concatenate([apply_rope(y[:, :n_heads + n_kv], cos.astype(np.float64), sin.astype(np.float64)),
                           y[:, n_heads + n_kv:]], axis=1)
    close(out.reshape(n, heads, head_dim), want)


@pytest.mark.parametrize("kind", ["f32", "bf16"])
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("d,f", [(40, 37), (33, 64)])
def test_norm_silu(lib, kind, n, d, f):
    rng = np.random.default_rng()
    h, nw = norm_inputs(rng, n, d, 1e-6, kind)
    w, w64 = weight(rng, (2 * f, d), kind)
    out = poisoned((n, f))
    call(lib, f"norm_silu_{kind}", h, nw, np.float32(1e-6), w, out, n, d, f)
    gate_up = operand(rms_norm(h, nw, 1e-6), kind) @ w64.T
    close(out, silu(gate_up[:, :f]) * gate_up[:, f:])


@pytest.mark.parametrize("kind", ["f32", "bf16"])
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("d,m", [(40, 37), (70, 33)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_linear_rows(lib, kind, n, d, m, with_residual):
    rng = np.random.default_rng()
    x = rng.standard_normal((n, d)).astype(np.float32)
    res = rng.standard_normal((n, m)).astype(np.float32) if with_residual else None
    w, w64 = weight(rng, (m, d), kind)
    out = poisoned((n, m))
    call(lib, f"linear_rows_{kind}", x, w, res, out, n, d, m)
    want = operand(x, kind) @ w64.T + (0 if res is None else res)
    close(out, want)
