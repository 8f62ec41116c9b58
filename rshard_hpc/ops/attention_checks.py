"""The argument checks both attention paths share (NumPy in attention.py, CUDA in attention_cuda.py)."""
from __future__ import annotations

import math


def check_scale(scale) -> float:
    """scale as a float; ValueError unless finite and > 0. The tensor-core kernel takes each row's running
    maximum on unscaled scores and scales it afterwards, which is right for scale > 0 only."""
    value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"attention scale must be finite and > 0, got {scale!r}")
    return value


def check_rows(pos, seq, what: str) -> int:
    """The row count of a (positions, sequences) pair; ValueError unless both are (n,) of one n."""
    if pos.ndim != 1 or pos.shape != seq.shape:
        raise ValueError(f"{what} positions {pos.shape} and sequence ids {seq.shape} must be (n,) of one length")
    return len(pos)


def check_qkv(q, k, v, nq: int, nk: int):
    """ValueError unless q (nq, Hq, D), k and v (nk, Hkv, D) with Hkv dividing Hq."""
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or k.shape[2] != q.shape[2] \
            or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape} "
                         "(want q (nq, Hq, D), k and v (nk, Hkv, D), Hkv dividing Hq)")
    if q.shape[0] != nq or k.shape[0] != nk:
        raise ValueError(f"q has {q.shape[0]} rows and k, v {k.shape[0]}; the plan was prepared for {nq} query "
                         f"and {nk} key positions")
