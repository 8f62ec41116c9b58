"""The fused per-token kernels (kernels/passes.cu through ops/passes_cuda.py and the models' switch in
models/common.py) against the NumPy path and a float64 reference. Skipped without CuPy or a GPU.

Fresh random inputs each run, ragged sizes (n = 0, 1, odd; rows narrower and wider than a block), outputs
poisoned with NaN first (passes_cuda.POISON_OUTPUTS) so an element a kernel never writes fails. Tolerances:
the kernels differ from the NumPy float32 path only by the order of a row's sum and by CUDA's cos/sin/exp/erf
(kernels/passes.cu), so a few fp32 ulps (FP32_TOL relative to the row's scale) against the float64 reference.
Where the CuPy chain they replace calls the same CUDA functions in the same order (RoPE, silu * up, the wire,
the merge) the results are compared bit for bit.
"""
import numpy as np
import pytest
from conftest import partials_recv, require_gpu

cupy = require_gpu()

from rshard_hpc.models import common
from rshard_hpc.models.llama import (
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
    rope_qk,
    rope_tables,
)
from rshard_hpc.models.random_init import tiny_config
from rshard_hpc.ops import attention_cuda, passes_cuda
from rshard_hpc.ops.precision import (
    Bf16Input,
    Bf16Matrix,
    to_bf16_bits,
    unpack_partial,
    wire_dtype,
)
from rshard_hpc.ops.wire import WireRoutes

FP32_TOL = 4e-6  # relative to the row's largest magnitude (float64 reference)
ROWS = [0, 1, 7, 64]
WIDTHS = [1, 33, 384, 576, 2049]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(passes_cuda, "POISON_OUTPUTS", True)
    monkeypatch.setattr(attention_cuda, "POISON_OUTPUTS", True)
    monkeypatch.setattr(common, "FUSED", True)


def rng_for(*key):
    return np.random.default_rng([hash(k) % 2**32 for k in key] + [int(np.random.SeedSequence().entropy % 2**32)])


def close(got, want, tol=FP32_TOL, floor=1e-30):
    """got within tol of want relative to each row's largest magnitude (absolute where that is below floor)."""
    got = cupy.asnumpy(got) if not isinstance(got, np.ndarray) else got
    assert got.shape == want.shape, (got.shape, want.shape)
    assert not np.isnan(got).any(), "unwritten (NaN) output elements"
    if want.size:
        scale = np.maximum(np.abs(want).max(axis=-1, keepdims=True), floor)
        err = (np.abs(got.astype(np.float64) - want) / scale).max()
        assert err <= tol, f"relative error {err:.2e} > {tol}"


def bits_match(bits, values):
    """The kernel's bf16 bits are exactly precision.to_bf16_bits of its own float32 output."""
    assert bits.dtype == cupy.uint16
    assert np.array_equal(cupy.asnumpy(bits), to_bf16_bits(cupy.asnumpy(values)))


def qkv_views(rng, n, n_heads, n_kv, head_dim, strided: bool):
    """Host q (n, H, D), k, v (n, Hkv, D) and their device copies: separate arrays, or (strided) views of the
    columns of one (n, (H + 2 Hkv) D) device array, as Llama.pre's fused product gives them (read in place)."""
    qkv = rng.standard_normal((n, n_heads + 2 * n_kv, head_dim)).astype(np.float32)
    host = qkv[:, :n_heads], qkv[:, n_heads:n_heads + n_kv], qkv[:, n_heads + n_kv:]
    if not strided:
        host = tuple(np.ascontiguousarray(a) for a in host)
        return host, tuple(cupy.asarray(a) for a in host)
    d = cupy.asarray(qkv)
    return host, (d[:, :n_heads], d[:, n_heads:n_heads + n_kv], d[:, n_heads + n_kv:])


# ---------------------------------------------------------------------------------------------- norms
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(n, d, residual):
    rng = rng_for("rms", n, d, residual)
    x, r = (rng.standard_normal((n, d)).astype(np.float32) * 3 for _ in range(2))
    w = rng.standard_normal(d).astype(np.float32)
    eps = 1e-5
    h64 = x.astype(np.float64) + (r if residual else 0)
    h32 = x + r if residual else x
    want = h64 / np.sqrt((h64 ** 2).mean(axis=-1, keepdims=True) + eps) * w
    h, y, bits = passes_cuda.rms_norm(cupy.asarray(x), cupy.asarray(w), eps,
                                      cupy.asarray(r) if residual else None, bits=True)
    close(y, want)
    close(y, common.rms_norm(h32, w, eps).astype(np.float64))  # the NumPy path
    bits_match(bits, y)
    if residual:
        assert np.array_equal(cupy.asnumpy(h), h32)  # the residual add is one fp32 add, as NumPy's
    else:
        assert h is None


@pytest.mark.parametrize("bf16", [False, True])
def test_rms_norm_input_is_the_gemm_input(bf16):
    """models.common.rms_norm_input on CuPy gives what gemm_input(rms_norm(...)) holds: a Bf16Input whose
    operand is the bits of the normed rows when the weight is bf16, the rows themselves otherwise."""
    rng = rng_for("rms_input", bf16)
    x = cupy.asarray(rng.standard_normal((9, 64)).astype(np.float32))
    w = cupy.asarray(rng.standard_normal(64).astype(np.float32))
    weight = rng.standard_normal((32, 64)).astype(np.float32)
    matrix = Bf16Matrix(weight, cupy) if bf16 else cupy.asarray(weight)
    h, got = common.rms_norm_input(x, w, 1e-6, matrix)
    assert h is x
    if bf16:
        assert isinstance(got, Bf16Input)
        bits_match(got.operand, got.source)
        close(got.source, common.rms_norm(cupy.asnumpy(x), cupy.asnumpy(w), 1e-6).astype(np.float64))
    else:
        assert not isinstance(got, Bf16Input)
    with common.chained():  # the CuPy chain, as before: the products agree
        _, chain = common.rms_norm_input(x, w, 1e-6, matrix)
    close(common.linear(got, matrix), cupy.asnumpy(common.linear(chain, matrix)).astype(np.float64), 1e-2 if bf16
          else 1e-5)


@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("residual", [None, "plain", "bias"])
def test_layer_norm(n, d, residual):
    rng = rng_for("ln", n, d, residual)
    x, r = (rng.standard_normal((n, d)).astype(np.float32) * 2 + 1 for _ in range(2))
    w, b, rb = (rng.standard_normal(d).astype(np.float32) for _ in range(3))
    eps = 1e-12
    args = {} if residual is None else {"residual": r, "residual_bias": rb if residual == "bias" else None}
    v = x.astype(np.float64)
    if residual:
        v = v + r + (rb if residual == "bias" else 0)
    mean = v.mean(axis=-1, keepdims=True)
    want = (v - mean) / np.sqrt(((v - mean) ** 2).mean(axis=-1, keepdims=True) + eps) * w + b
    got = common.layer_norm(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b), eps,
                            **{k: None if a is None else cupy.asarray(a) for k, a in args.items()})
    tol = FP32_TOL * (8 if residual else 1)  # the fp32 residual sum itself is rounded before the norm
    close(got, want, tol)
    close(got, common.layer_norm(x, w, b, eps, **args).astype(np.float64))  # the NumPy path


# ---------------------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("n_heads,n_kv,head_dim", [(9, 3, 64), (4, 4, 128), (2, 1, 2), (3, 1, 6)])
@pytest.mark.parametrize("strided", [False, True])
def test_rope(n, n_heads, n_kv, head_dim, strided):
    """strided: q and k are column slices of the fused q/k/v product, read in place."""
    rng = rng_for("rope", n, n_heads, head_dim, strided)
    cfg = tiny_config("llama", n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, hidden=n_heads * head_dim)
    inv_freq = rope_inv_freq(cfg)
    pos = rng.integers(0, 20000, size=n).astype(np.int32)
    (q, k, _), (dq, dk, _) = qkv_views(rng, n, n_heads, n_kv, head_dim, strided)
    dpos, dfreq = cupy.asarray(pos), cupy.asarray(inv_freq)
    got_q, got_k = rope_qk(dq, dk, rope_tables(dfreq, dpos, cupy, True), dfreq)
    assert got_q.flags.c_contiguous and got_k.flags.c_contiguous
    cos, sin = rope_cos_sin(inv_freq, pos, np)  # the NumPy path: same angles; np.cos vs CUDA cosf
    for got, x in ((got_q, q), (got_k, k)):
        close(got, apply_rope(x, cos, sin).astype(np.float64), 1e-5)
    with common.chained():  # the CuPy chain calls the same cosf / sinf: bit for bit
        cos_d, sin_d = rope_cos_sin(dfreq, dpos, cupy)
        for got, x in ((got_q, dq), (got_k, dk)):
            assert cupy.asnumpy(got).tobytes() == cupy.asnumpy(apply_rope(x, cos_d, sin_d)).tobytes()


def test_rope_refuses_odd_head_dim():
    with pytest.raises(ValueError, match="even head dim"):
        passes_cuda.rope_qk(cupy.zeros((2, 1, 5), cupy.float32), cupy.zeros((2, 1, 5), cupy.float32),
                            cupy.zeros(2, cupy.int32), cupy.zeros(2, cupy.float32))


# ---------------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("shape", [(0, 8), (1, 1), (7, 33), (64, 1536)])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_silu_mul(shape, bf16, strided):
    """strided: gate and up are the two column halves of the fused gate/up product, read in place."""
    rng = rng_for("silu", shape, bf16, strided)
    gate, up = (rng.standard_normal(shape).astype(np.float32) * 4 for _ in range(2))
    g64 = gate.astype(np.float64)
    want = g64 / (1 + np.exp(-g64)) * up
    if strided:
        gate_up = cupy.asarray(np.concatenate([gate, up], axis=1))
        dgate, dup = gate_up[:, :shape[1]], gate_up[:, shape[1]:]
    else:
        dgate, dup = cupy.asarray(gate), cupy.asarray(up)
    out, bits = passes_cuda.silu_mul(dgate, dup, bits=bf16)
    assert out.shape == shape and out.flags.c_contiguous
    close(out, want)
    close(out, (common.silu(gate) * up).astype(np.float64))
    if bf16:
        bits_match(bits, out)
    with common.chained():
        chain = common.silu(cupy.asarray(gate)) * cupy.asarray(up)
    assert cupy.asnumpy(out).tobytes() == cupy.asnumpy(chain).tobytes()


@pytest.mark.parametrize("shape", [(0, 8), (1, 1), (7, 33), (64, 1536)])
@pytest.mark.parametrize("bf16", [False, True])
def test_bias_gelu(shape, bf16):
    from scipy.special import erf

    rng = rng_for("gelu", shape, bf16)
    y = rng.standard_normal(shape).astype(np.float32) * 3
    b = rng.standard_normal(shape[-1]).astype(np.float32)
    v = y.astype(np.float64) + b
    want = v * 0.5 * (1 + erf(v / np.sqrt(2.0)))
    out, bits = passes_cuda.bias_gelu(cupy.asarray(y), cupy.asarray(b), common.GELU_INV_SQRT2, bits=bf16)
    close(out, want)
    close(out, common.gelu(y + b).astype(np.float64), floor=1.0)  # the CPU path: 1.3e-7 relative, absolute below 1
    if bf16:
        bits_match(bits, out)


@pytest.mark.parametrize("bf16", [False, True])
def test_bias_gelu_keeps_its_relative_accuracy_in_the_negative_tail(bf16):
    """One value a row, so that each is judged against itself: v from -5 to 3, where 1 + erf(v / sqrt 2) cancels
    in float32 (0.1 relative at v = -5; a random (1, 1) case drew v = -3.3: 1e-5). The kernel's erfc form holds."""
    from scipy.special import erfc

    v = np.linspace(-5, 3, 801, dtype=np.float32)[:, None]  # (801, 1)
    want = v.astype(np.float64) * 0.5 * erfc(-v.astype(np.float64) / np.sqrt(2.0))
    out, bits = passes_cuda.bias_gelu(cupy.asarray(v), cupy.zeros(1, cupy.float32), common.GELU_INV_SQRT2, bits=bf16)
    close(out, want)
    deep = np.linspace(-9, -5, 401, dtype=np.float32)[:, None]  # the CPU path gives 0 below about -5.5 (GELU > -1e-7)
    deep_out, _ = passes_cuda.bias_gelu(cupy.asarray(deep), cupy.zeros(1, cupy.float32), common.GELU_INV_SQRT2)
    close(deep_out, common.gelu(deep, np.zeros(1, np.float32)).astype(np.float64), floor=1.0)
    if bf16:
        bits_match(bits, out)


# ---------------------------------------------------------------------------------------------- the wire
def _groups(rng, n, beta):
    group = rng.integers(0, beta, size=n)
    return [np.flatnonzero(group == g) for g in range(beta)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n,beta", [(0, 2), (1, 3), (7, 3), (65, 2), (40, 1)])
@pytest.mark.parametrize("n_heads,n_kv,head_dim", [(9, 3, 64), (4, 4, 128), (6, 4, 8)])
@pytest.mark.parametrize("strided", [False, True])
def test_wire_pack_and_merge_equal_the_cpu_path(n, beta, n_heads, n_kv, head_dim, dtype, strided):
    """The GPU send buffer is the CPU one byte for byte (q, k, v separate, or strided: column slices of one
    product, read in place); the fused unpack + merge is the previous GPU path (unpack_partial +
    attention_cuda.merge_partials) bit for bit and the NumPy merge within fp32 rounding."""
    rng = rng_for("wire", n, beta, n_heads, head_dim, dtype, strided)
    wire = wire_dtype(dtype)
    rows = _groups(rng, n, beta)
    (q, k, v), device = qkv_views(rng, n, n_heads, n_kv, head_dim, strided)
    cpu = WireRoutes(rows, n, n_heads, n_kv, head_dim, wire)
    gpu = WireRoutes(rows, n, n_heads, n_kv, head_dim, wire, cupy)
    send = gpu.pack(*device)
    assert send.dtype == wire and cupy.asnumpy(send).tobytes() == cpu.pack(q, k, v).tobytes()

    recv = partials_recv(rng, rows, n_heads, head_dim, wire)
    got = gpu.merge(cupy.asarray(recv))
    packed = np.take(recv.reshape(-1, n_heads * cpu.slots), cpu.recv_rows, axis=0)
    o_parts, lse_parts = unpack_partial(cupy.asarray(packed).reshape(beta, n, n_heads, cpu.slots), wire)
    before, _ = attention_cuda.merge_partials(o_parts, lse_parts)
    assert cupy.asnumpy(got).tobytes() == cupy.asnumpy(before).tobytes()
    close(got, cpu.merge(recv).astype(np.float64), 1e-5)


# ---------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_equals_numpy(arch, dtype):
    """A whole layer (pre, post) on the GPU with the fused kernels against the NumPy path and the CuPy chain."""
    from rshard_hpc.models.bert import Bert
    from rshard_hpc.models.llama import Llama
    from rshard_hpc.models.random_init import random_tensors

    cfg = tiny_config(arch, **({"n_kv_heads": 2} if arch == "llama" else {}))
    tensors = random_tensors(cfg, seed=5)
    family = Llama if arch == "llama" else Bert
    cpu, gpu = family(cfg, tensors, np, dtype), family(cfg, tensors, cupy, dtype)
    rng = rng_for("layer", arch, dtype)
    h = rng.standard_normal((13, cfg.hidden)).astype(np.float32)
    pos = np.arange(5, 18).astype(np.int32)
    attn = rng.standard_normal((13, cfg.n_heads, cfg.head_dim)).astype(np.float32)
    tol = 3e-2 if dtype == "bfloat16" else 1e-4  # a bf16 rounding may flip where fp32 results differ by an ulp
    dpos = cupy.asarray(pos)
    for got, want in zip(gpu.pre(1, cupy.asarray(h), dpos), cpu.pre(1, h, pos)):
        close(got, want.astype(np.float64), tol)
    close(gpu.post(1, cupy.asarray(h), cupy.asarray(attn)), cpu.post(1, h, attn).astype(np.float64), tol)
    with common.chained():
        chain = gpu.post(1, cupy.asarray(h), cupy.asarray(attn))
    close(gpu.post(1, cupy.asarray(h), cupy.asarray(attn)), cupy.asnumpy(chain).astype(np.float64), tol)


# ---------------------------------------------------------------------------------------------- strided inputs
def test_strided_rows_are_read_in_place():
    """Column slices of a row-major array go to the kernels as they are (the row stride passed), other layouts
    as contiguous copies."""
    a = cupy.arange(5 * 14, dtype=cupy.float32).reshape(5, 14)
    q = a.reshape(5, 7, 2)[:, 2:5]  # (5, 3, 2): rows 14 floats apart
    got, ld = passes_cuda._strided_rows(q)
    assert got is q and ld == 14
    got, ld = passes_cuda._strided_rows(a[:, 3:9])
    assert got.data.ptr == a.data.ptr + 12 and ld == 14
    assert passes_cuda._strided_rows(a[:1, 3:9])[1] == 6  # one row: its own width
    for other in (a.T, a[:, ::2], a[::-1], a.astype(cupy.float64)[:, 3:9]):  # copied: contiguous float32
        got, ld = passes_cuda._strided_rows(other)
        assert got.flags.c_contiguous and got.dtype == cupy.float32 and ld == got.size // got.shape[0]
        assert cupy.array_equal(got, other)


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_copies_no_slice(monkeypatch, arch, dtype):
    """A layer's fused kernels read the slices of the fused products in place: no input of theirs is copied
    (a copy would be a launch more, what the fused products save), and the layer's result is the NumPy one."""
    from rshard_hpc.models.bert import Bert
    from rshard_hpc.models.llama import Llama
    from rshard_hpc.models.random_init import random_tensors

    copied = []
    real = passes_cuda._f32

    def watched(x):
        if not (x.dtype == cupy.float32 and x.flags.c_contiguous):
            copied.append(x.shape)
        return real(x)

    monkeypatch.setattr(passes_cuda, "_f32", watched)
    cfg = tiny_config(arch, **({"n_kv_heads": 2} if arch == "llama" else {}))
    tensors = random_tensors(cfg, seed=7)
    family = Llama if arch == "llama" else Bert
    cpu, gpu = family(cfg, tensors, np, dtype), family(cfg, tensors, cupy, dtype)
    rng = rng_for("slices", arch, dtype)
    n = 11
    h = rng.standard_normal((n, cfg.hidden)).astype(np.float32)
    pos = np.arange(n).astype(np.int32)
    routes = WireRoutes([np.arange(n)], n, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, wire_dtype(dtype), cupy)
    cpu_routes = WireRoutes([np.arange(n)], n, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, wire_dtype(dtype))
    q, k, v = gpu.pre(0, cupy.asarray(h), cupy.asarray(pos))
    send = routes.pack(q, k, v)
    out = gpu.post(0, cupy.asarray(h), q)
    assert copied == []
    tol = 3e-2 if dtype == "bfloat16" else 1e-4
    want_q = cpu.pre(0, h, pos)[0]
    close(out, cpu.post(0, h, want_q).astype(np.float64), tol)
    if dtype == "float32":
        close(send, cpu_routes.pack(*cpu.pre(0, h, pos)).astype(np.float64), tol)
