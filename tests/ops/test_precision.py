"""bf16 rounding and bf16 matrix products (precision.py) against torch, on NumPy and (when present) CuPy."""
import numpy as np
import pytest

from rshard_hpc.ops.precision import Bf16Matrix, bf16_bits_to_float, matmul_t, round_bf16, to_bf16_bits, wire_dtype

torch = pytest.importorskip("torch", reason="torch is the independent bf16 reference")


def special_values(rng):
    """Random normals of many scales, exact ties (odd and even), infinities, NaN, signed zeros, subnormals."""
    x = (rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096)).astype(np.float32)
    ties = (np.arange(1, 257, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # halfway between two bf16
    extra = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3.4e38, 65504.0], np.float32)
    return np.concatenate([x, ties, -ties, extra])


def test_rounding_matches_torch():
    x = special_values(np.random.default_rng(1))
    ours = bf16_bits_to_float(to_bf16_bits(x))
    theirs = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    fin = ~np.isnan(theirs)
    np.testing.assert_array_equal(ours[fin].view(np.uint32), theirs[fin].view(np.uint32))  # bit for bit


def test_bf16_matrix_is_rounded_operands_in_fp32():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((37, 96)).astype(np.float32)
    w = rng.standard_normal((50, 96)).astype(np.float32)
    got = matmul_t(x, Bf16Matrix(w))
    ref = round_bf16(x).astype(np.float64) @ round_bf16(w).astype(np.float64).T
    assert got.dtype == np.float32 and got.shape == (37, 50)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert 1e-4 < rel < 1e-2  # bf16 inputs: visibly rounded, still close
    assert matmul_t(np.zeros((0, 96), np.float32), Bf16Matrix(w)).shape == (0, 50)
    with pytest.raises(ValueError):
        matmul_t(x[:, :95], Bf16Matrix(w))


def test_wire_dtype():
    assert wire_dtype("float32") == np.float32 and wire_dtype("bfloat16") == np.uint16
    with pytest.raises(ValueError, match="float16"):
        wire_dtype("float16")


def test_gpu_rounding_and_gemm_match_numpy():
    from conftest import require_gpu

    cupy = require_gpu()
    x = special_values(np.random.default_rng(3))
    gpu_bits = cupy.asnumpy(to_bf16_bits(cupy.asarray(x)))
    cpu_bits = to_bf16_bits(x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(gpu_bits[~nan], cpu_bits[~nan])
    assert (gpu_bits[nan] & 0x7F80 == 0x7F80).all() and (gpu_bits[nan] & 0x7F).any()
    rng = np.random.default_rng(4)
    for n, k, m in [(1, 64, 64), (37, 576, 192), (1000, 576, 1536), (5, 1536, 576)]:
        xs = rng.standard_normal((n, k)).astype(np.float32)
        w = rng.standard_normal((m, k)).astype(np.float32)
        out = matmul_t(cupy.asarray(xs), Bf16Matrix(w, cupy))
        ref = round_bf16(xs).astype(np.float64) @ round_bf16(w).astype(np.float64).T
        np.testing.assert_allclose(cupy.asnumpy(out), ref, rtol=1e-4, atol=1e-3)
    assert matmul_t(cupy.zeros((0, 64), cupy.float32), Bf16Matrix(w[:, :64], cupy)).shape == (0, w.shape[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_partial_pack_roundtrip(dtype):
    """Returned partials: lse survives bit for bit (also -inf), o exactly in float32 or bf16-rounded."""
    from rshard_hpc.ops.precision import pack_partial, partial_slots, unpack_partial

    rng = np.random.default_rng(5)
    wire = wire_dtype(dtype)
    o = rng.standard_normal((7, 3, 16)).astype(np.float32)
    lse = rng.standard_normal((7, 3)).astype(np.float32) * 30
    lse[2, 1] = -np.inf
    packed = pack_partial(o, lse, wire)
    assert packed.dtype == wire and packed.shape == (7, 3, partial_slots(16, wire))
    stacked = np.stack([packed, packed[::-1]])  # (P, n, H, slots), as the CompNode gathers them
    o2, lse2 = unpack_partial(stacked, wire)
    np.testing.assert_array_equal(lse2[0].view(np.uint32), lse.view(np.uint32))
    np.testing.assert_array_equal(lse2[1], lse[::-1])
    np.testing.assert_array_equal(o2[0], o if dtype == "float32" else round_bf16(o))


def _accumulate_cases(xp, rng):
    """(x, weight, accumulate, reference float64 of accumulate + x @ weightᵀ) for float32 and bf16 weights, and a
    row count of 0 (nothing to add)."""
    for n, k, m in [(37, 96, 50), (0, 96, 50), (5, 64, 1536)]:
        x = rng.standard_normal((n, k)).astype(np.float32)
        w = rng.standard_normal((m, k)).astype(np.float32)
        acc = rng.standard_normal((n, m)).astype(np.float32)
        for weight, xr, wr in [(xp.asarray(w), x, w), (Bf16Matrix(w, xp), round_bf16(x), round_bf16(w))]:
            ref = acc.astype(np.float64) + xr.astype(np.float64) @ wr.astype(np.float64).T
            yield xp.asarray(x), weight, xp.asarray(acc), ref


def _check_accumulate(xp, rng):
    for x, weight, acc, ref in _accumulate_cases(xp, rng):
        separate = matmul_t(x, weight) + acc  # the product and the add apart
        got = matmul_t(x, weight, accumulate=acc)
        assert got is acc  # added in place, returned
        got = got.get() if xp is not np else got
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got, separate.get() if xp is not np else separate, rtol=1e-6, atol=1e-5)


def test_matmul_accumulates_in_place():
    """matmul_t(accumulate=) adds the product into that array and returns it (the residual add of a layer's last
    product): float32 and bf16 weights, against float64 and against the product and add done apart."""
    _check_accumulate(np, np.random.default_rng(6))


def test_gpu_matmul_accumulates_in_place():
    """The same on CuPy: cuBLAS adds into the array (beta = 1), sgemm and gemmEx."""
    from conftest import require_gpu

    _check_accumulate(require_gpu(), np.random.default_rng(7))
