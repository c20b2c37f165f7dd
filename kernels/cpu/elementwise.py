"""Elementwise ``a + b`` and ``a - b`` (kernel contract ``add`` / ``subtract``).

Error feedback (``sparcomm/feedback.py``, after Seide et al., Interspeech 2014, and
Stich et al., "Sparsified SGD with memory", NeurIPS 2018) forms ``x + residual`` and
``compensated - decoded`` once per tensor and step; these are the CPU twins of the GPU
kernels that keep float32 subnormals (``kernels/cuda/elementwise.cu``).  Both are IEEE
round-to-nearest in the array dtype, like ``np.add`` / ``np.subtract``, but split over
the Numba threads.

The in-place forms get loops of their own: with ``out`` the same buffer as ``a``, a loop
over three arrays fails LLVM's run-time no-overlap test and runs unvectorised, while
``out += b`` over two distinct arrays vectorises.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange
from sparcomm.kernels._checks import check_divisor

from ._common import n_chunks

_CHUNK = 1 << 16
"""Elements per parallel task; arrays up to this size run on the calling thread."""
PARALLEL_FROM = _CHUNK
"""Elements above which ``add`` and ``subtract`` run their parallel variant (another
compiled function: a warm-up must go past it to reach it)."""

# What a task computes; ``out`` is distinct from ``a`` and ``b`` unless the name says so.
_ADD = 0  # out = a + b
_ADD_TO = 1  # out += b  (out is a; add(a, b, out=b) is b += a: IEEE addition commutes)
_SUBTRACT = 2  # out = a - b
_SUBTRACT_FROM = 3  # out -= b  (out is a)
_REVERSE_SUBTRACT = 4  # out = a - out  (out is b)


@njit(cache=True, nogil=True)
def _binary(mode, a, b, out, lo, hi):
    xs, ys, zs = a[lo:hi], b[lo:hi], out[lo:hi]  # indexed from 0: the loops vectorise
    if mode == _ADD:
        for t in range(zs.size):
            zs[t] = xs[t] + ys[t]
    elif mode == _SUBTRACT:
        for t in range(zs.size):
            zs[t] = xs[t] - ys[t]
    elif mode == _ADD_TO:
        for t in range(zs.size):
            zs[t] += ys[t]
    elif mode == _SUBTRACT_FROM:
        for t in range(zs.size):
            zs[t] -= ys[t]
    else:
        for t in range(zs.size):
            zs[t] = xs[t] - zs[t]


@njit(cache=True, nogil=True)
def _serial(mode, a, b, out):
    _binary(mode, a, b, out, 0, out.size)


@njit(cache=True, nogil=True, parallel=True)
def _parallel(mode, a, b, out):
    n = out.size
    for c in prange(n_chunks(n, _CHUNK)):
        _binary(mode, a, b, out, c * _CHUNK, min(n, (c + 1) * _CHUNK))


_REALS = (np.dtype(np.float32), np.dtype(np.float64))


def _check(a: Any, b: Any, out: Any) -> tuple[bool, bool]:
    """Validate the operands; return ``(out is a, out is b)`` as buffers."""
    for name, array in (("a", a), ("b", b), ("out", out)):
        if not isinstance(array, np.ndarray):
            raise TypeError(
                f"{name} must be a numpy.ndarray, got {type(array).__module__}."
                f"{type(array).__qualname__}; convert it with numpy.asarray()"
            )
        if array.dtype not in _REALS:
            raise TypeError(
                f"{name} must have dtype float32 or float64, got {array.dtype}; cast it first"
            )
        if array.ndim != 1 or not array.flags.c_contiguous:
            raise ValueError(
                f"{name} must be 1-D and C-contiguous, got shape {array.shape}; "
                "pass numpy.ascontiguousarray(a).ravel()"
            )
    if b.dtype != a.dtype or out.dtype != a.dtype:
        raise TypeError(
            f"a, b and out must share one dtype, got {a.dtype}, {b.dtype}, {out.dtype}; "
            "cast them first"
        )
    if b.size != a.size or out.size != a.size:
        raise ValueError(
            f"a, b and out must have the same size, got {a.size}, {b.size}, {out.size}"
        )
    if not out.flags.writeable:
        raise ValueError("out is read-only; pass a writeable buffer")
    same = []
    for name, other in (("a", a), ("b", b)):
        shares = other is out or np.may_share_memory(out, other)  # bounds only: cheap
        if shares and other.ctypes.data != out.ctypes.data:
            raise ValueError(
                f"out partly overlaps {name}: out may be {name} itself (in place) or a "
                "separate buffer, not a shifted view of it; pass a copy"
            )
        same.append(bool(shares) and out.size > 0)
    return same[0], same[1]


def _run(mode: int, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    (_serial if out.size <= _CHUNK else _parallel)(mode, a, b, out)


def add(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = a[i] + b[i]`` in ``a.dtype``, round-to-nearest, subnormals kept.

    Parameters
    ----------
    a, b, out : numpy.ndarray
        1-D C-contiguous float32 or float64, one dtype and size; ``out`` may be ``a`` or
        ``b`` (in place), not a partly overlapping view.

    Raises
    ------
    TypeError, ValueError
        For a non-NumPy array, another dtype, a mismatch of dtype, shape or size, or a
        partial overlap.
    """
    out_is_a, out_is_b = _check(a, b, out)
    if out_is_a:
        _run(_ADD_TO, out, b, out)
    elif out_is_b:
        _run(_ADD_TO, out, a, out)
    else:
        _run(_ADD, a, b, out)


def subtract(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = a[i] - b[i]`` in ``a.dtype``, round-to-nearest, subnormals kept.

    Same arguments and errors as :func:`add`.
    """
    out_is_a, out_is_b = _check(a, b, out)
    if out_is_a:
        _run(_SUBTRACT_FROM, out, b, out)
    elif out_is_b:
        _run(_REVERSE_SUBTRACT, a, out, out)
    else:
        _run(_SUBTRACT, a, b, out)


@njit(cache=True, nogil=True, parallel=True)
def _divide_parallel(x, d, out, in_place):
    n = out.size
    for c in prange(n_chunks(n, _CHUNK)):
        lo, hi = c * _CHUNK, min(n, (c + 1) * _CHUNK)
        zs = out[lo:hi]
        if in_place:  # one array: the loop vectorises (two aliased ones fail LLVM's check)
            for t in range(zs.size):
                zs[t] /= d
        else:
            xs = x[lo:hi]
            for t in range(zs.size):
                zs[t] = xs[t] / d


def divide_scalar(x: np.ndarray, divisor: float, out: np.ndarray) -> None:
    """``out[i] = x[i] / x.dtype(divisor)``, one IEEE division, subnormals kept.

    Parameters
    ----------
    x, out : numpy.ndarray
        1-D C-contiguous float32 or float64 of one dtype and size; ``out`` may be ``x``.
    divisor : int or float
        Finite and non-zero; converted to ``x.dtype`` first (as NumPy's ``x / P``).
    """
    in_place, _ = _check(x, x, out)
    d = x.dtype.type(check_divisor(divisor))
    if out.size <= _CHUNK:
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            np.divide(x, d, out=out)  # one thread: Numba's launch costs more than it saves
    else:
        _divide_parallel(x, d, out, in_place)
