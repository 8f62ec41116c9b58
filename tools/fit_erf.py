"""How ops/gelu_host.py's erfc coefficients were found (float64 least squares; run: python tools/fit_erf.py).

erfc(z) = t · P(t) · exp(-z²), t = 1 / (1 + s · z) on [0, 4.2], the scale s chosen from a grid; the fit weights the
residual so that what is minimized is the error in erf itself. Prints the fit's largest error in erf and its
coefficients (the 0th power first)."""
import numpy as np
from scipy.special import erfcx


def fit_far(degree: int = 6):
    z = np.linspace(0, 4.2, 400_001)
    best = None
    for scale in np.linspace(0.2, 0.8, 61):
        t = 1 / (1 + scale * z)
        weight = t * np.exp(-z * z)  # d erf = weight · d P
        basis = np.vander(t, degree + 1, increasing=True)
        coeffs, *_ = np.linalg.lstsq(basis * weight[:, None], erfcx(z) / t * weight, rcond=None)
        error = float(np.max(np.abs((basis @ coeffs - erfcx(z) / t) * weight)))
        if best is None or error < best[0]:
            best = (error, round(float(scale), 4), coeffs)
    return best


if __name__ == "__main__":
    error, scale, coeffs = fit_far()
    print(f"far: error {error:.2e}, t scale {scale}, P = {np.array2string(coeffs, precision=8, separator=', ')}")
