"""ops/gelu_host.py: the float32 erfc and GELU of the NumPy path against float64 SciPy, on a sweep of float32 values
(every 4099th bit pattern from 1e-30 to 6, both signs: each binade, the sign switch at 0, the fit's range), the
special values, and arrays that span several chunks, ragged and strided."""
import numpy as np
import pytest
from scipy.special import erf, erfc

from rshard_hpc.models import common
from rshard_hpc.ops import gelu_host

ERFC_TOL = 4e-7  # absolute: ½ erfc is at most 0.5, whose float32 ulp is 6e-8 (measured: 3.1e-7, near z = 0)
GELU_TOL = 2.5e-7  # relative, or absolute below 1 (the scipy path: 1.2e-7)


def _sweep() -> np.ndarray:
    lo, hi = np.float32(1e-30).view(np.uint32), np.float32(6.0).view(np.uint32)
    z = np.arange(lo, hi, 4099, dtype=np.uint32).view(np.float32)
    return np.concatenate([z, -z, np.float32([0.999999, 1.0, 1.000001, 4.199, 4.2, 4.201, 7.5, 1e30])])


def _gelu64(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 * 0.5 * (1 + erf(x64 / np.sqrt(2)))


def test_half_erfc_is_within_a_few_float32_ulps_of_one_half():
    z = _sweep()
    got = gelu_host.half_erfc_float32(z).astype(np.float64)
    want = 0.5 * erfc(np.abs(z.astype(np.float64)))
    assert np.max(np.abs(got - want)) <= ERFC_TOL
    assert np.all(gelu_host.half_erfc_float32(np.float32([4.2, 9.0, 30.0, 1e30, np.inf])) >= 0)


def test_gelu_special_values():
    x = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 1e38, -1e38, 40.0, -40.0])
    with np.errstate(invalid="ignore"):  # -inf * 0
        got = common.gelu(x)
    assert got[0] == 0 and got[1] == 0
    assert got[2] == np.inf and np.isnan(got[3]) and np.isnan(got[4])  # -inf: NaN, as v * 0.5 * (1 + erf) gives
    assert got[5] == np.float32(1e38) and got[6] == 0 and got[7] == 40 and got[8] == 0


@pytest.mark.parametrize("shape", [(3, 7), (gelu_host.GELU_CHUNK + 5,), (2, gelu_host.GELU_CHUNK // 3, 5)])
def test_gelu_matches_float64(shape):
    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    got = common.gelu(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    want = _gelu64(x)
    assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1)) <= GELU_TOL


def test_gelu_sweep_and_strided_input():
    x = _sweep() * np.float32(1.4142135)
    x = x[np.isfinite(x)]
    want = _gelu64(x)
    got = gelu_host.gelu_float32(x, common.GELU_INV_SQRT2)
    assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1)) <= GELU_TOL
    wide = np.stack([x[:1000], -x[:1000]], axis=1)  # a column of a row-major array: strided
    assert np.array_equal(common.gelu(wide[:, 1]), gelu_host.gelu_float32(np.ascontiguousarray(wide[:, 1]),
                                                                          common.GELU_INV_SQRT2))


def test_float64_keeps_scipy():
    x = np.linspace(-6, 6, 101)
    assert np.array_equal(common.gelu(x), x * 0.5 * (1.0 + erf(x * common.GELU_INV_SQRT2)))


@pytest.mark.parametrize("shape", [(5, 384), (gelu_host.GELU_CHUNK // 1536 * 3 + 1, 1536), (2, 3, 7)])
def test_bias_in_the_pass_equals_adding_it_first(shape):
    rng = np.random.default_rng(shape[0])
    y = (rng.standard_normal(shape) * 3).astype(np.float32)
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    got = gelu_host.gelu_float32(y, common.GELU_INV_SQRT2, bias=bias)
    assert got.shape == y.shape and np.array_equal(got, common.gelu(y + bias))
    assert np.array_equal(common.gelu_input(y, bias, np.zeros((4, shape[-1]), np.float32)), common.gelu(y + bias))
