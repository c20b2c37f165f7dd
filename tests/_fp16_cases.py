"""Inputs and comparisons shared by the FP16 / copy kernel tests on the CPU
(``tests/kernels/test_convert.py``), the CUDA emulator (``tests/gpu/test_emulated_convert.py``)
and a real GPU (``tests/gpu/test_convert_gpu.py``)."""

from __future__ import annotations

import numpy as np

UINT = {np.float32: np.uint32, np.float64: np.uint64}


def all_halves() -> np.ndarray:
    """Every float16 bit pattern (NaNs and infinities included)."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)


def near_halves(dtype) -> np.ndarray:
    """Every half in ``dtype``, the midpoints between consecutive halves of one sign (and
    65520, the midpoint above the largest half, which rounds to inf), and one ulp either
    side of all of them: where round-to-nearest-even decides."""
    uint = UINT[dtype]
    wide = all_halves().astype(dtype)
    magnitudes = np.unique(np.abs(wide[np.isfinite(wide)]))  # 0 .. 65504 ascending
    midpoints = (magnitudes[:-1] + (magnitudes[1:] - magnitudes[:-1]) / 2).astype(dtype)
    midpoints = np.append(midpoints, dtype(65520))
    bits = np.concatenate([wide, midpoints, -midpoints]).view(uint)
    with np.errstate(over="ignore"):
        return np.concatenate([bits, bits + uint(1), bits - uint(1)]).view(dtype)


def gradient(n: int, dtype, seed: int) -> np.ndarray:
    """Gradient-like values over a wide exponent range, with signed zeros."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 8, n))).astype(dtype)
    x[::11] = 0.0
    x[5::13] = -0.0
    return x


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def values_equal(got: np.ndarray, want: np.ndarray) -> bool:
    """Same bits, except that NaNs need only be NaN at the same places."""
    nan = np.isnan(want)
    return np.array_equal(np.isnan(got), nan) and same_bits(got[~nan], want[~nan])
