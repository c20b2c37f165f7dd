"""Standard deviation in the contract's fixed order (TernGrad's clipping threshold).

``std(x)`` sums in blocks of :data:`STD_BLOCK` elements, each block with the 8-lane
``lane_sum``, then adds the block sums one after another: the same order on every device
and at every thread count, so the CPU and GPU thresholds are the same float64.  The
blocks are the parallel tasks (``prange``); within a block the 8 lanes run as one
``<8 x double>`` vector, as in ``_common.lane_sum_squares``.

Reference
---------
W. Wen, C. Xu, F. Yan, C. Wu, Y. Wang, Y. Chen, H. Li, "TernGrad: Ternary gradients to
reduce communication in distributed deep learning", NeurIPS 2017 (clipping at 2.5 sigma).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._common import _LANE_VECTOR, LANES, _lane_rows, _lane_tuple, combine_lanes, n_chunks

STD_BLOCK = 1 << 14
"""Elements per block of the contract's ``std`` (``kernels.reference.STD_BLOCK``)."""


@intrinsic
def _lane_rows_values(typingctx, xs, rows):
    """The 8 lane sums of ``float64(x)`` over ``rows`` full rows of 8 (a UniTuple)."""
    signature = types.UniTuple(types.float64, LANES)(xs, types.int64)

    def codegen(context, builder, sig, args):
        total = cgutils.alloca_once_value(builder, ir.Constant(_LANE_VECTOR, [0.0] * LANES))

        def body(row):
            builder.store(builder.fadd(builder.load(total), row), total)

        _lane_rows(context, builder, sig.args[0], args[0], args[1], body)
        return _lane_tuple(context, builder, sig.return_type, [builder.load(total)])

    return signature, codegen


@intrinsic
def _lane_rows_centered_squares(typingctx, xs, rows, mean):
    """The 8 lane sums of ``d * d``, ``d = float64(x) - mean``, over ``rows`` rows of 8.

    Plain ``fsub``/``fmul``/``fadd`` without fast-math flags: LLVM may not fuse them, so
    every square and sum rounds as the contract says.
    """
    signature = types.UniTuple(types.float64, LANES)(xs, types.int64, types.float64)

    def codegen(context, builder, sig, args):
        total = cgutils.alloca_once_value(builder, ir.Constant(_LANE_VECTOR, [0.0] * LANES))
        means = ir.Constant(_LANE_VECTOR, [0.0] * LANES)
        for j in range(LANES):
            means = builder.insert_element(means, args[2], ir.Constant(ir.IntType(32), j))

        def body(row):
            centered = builder.fsub(row, means)
            builder.store(
                builder.fadd(builder.load(total), builder.fmul(centered, centered)), total
            )

        _lane_rows(context, builder, sig.args[0], args[0], args[1], body)
        return _lane_tuple(context, builder, sig.return_type, [builder.load(total)])

    return signature, codegen


@njit(cache=True, nogil=True)
def _block_sum(x, start, stop, mean, centered):
    """Contract ``lane_sum`` over ``x[start:stop]`` of ``float64(x)`` or its centred square.

    The last ``< 8`` elements (only in the short last block) are the last terms of lanes
    ``0 .. r-1``.
    """
    xs = x[start:stop]
    rows = xs.size // LANES
    if centered:
        lanes = _lane_rows_centered_squares(xs, rows, mean)
    else:
        lanes = _lane_rows_values(xs, rows)
    a0, a1, a2, a3, a4, a5, a6, a7 = lanes
    # Lanes start at +0.0 and so are never -0.0: adding the +0.0 of an unused tail slot
    # leaves a lane unchanged, so all eight add their slot.
    tail = np.zeros(LANES, dtype=np.float64)
    for t in range(xs.size - LANES * rows):
        v = np.float64(xs[LANES * rows + t])
        if centered:
            d = v - mean
            v = d * d
        tail[t] = v
    return combine_lanes(
        a0 + tail[0],
        a1 + tail[1],
        a2 + tail[2],
        a3 + tail[3],
        a4 + tail[4],
        a5 + tail[5],
        a6 + tail[6],
        a7 + tail[7],
    )


@njit(cache=True, nogil=True, parallel=True)
def _block_sums(x, mean, centered, out):
    """``out[b]`` = block ``b``'s lane sum; the blocks are the parallel tasks."""
    n = x.size
    for b in prange(out.size):
        start = b * STD_BLOCK
        out[b] = _block_sum(x, start, min(n, start + STD_BLOCK), mean, centered)


@njit(cache=True, nogil=True)
def _sequential_sum(values):
    """``((0.0 + v0) + v1) + ...`` in order: the contract's combine of the block sums."""
    total = 0.0
    for b in range(values.size):
        total += values[b]
    return total


@njit(cache=True, nogil=True)
def _std(x):
    n = x.size
    sums = np.empty(n_chunks(n, STD_BLOCK), dtype=np.float64)
    _block_sums(x, 0.0, False, sums)
    mean = _sequential_sum(sums) / n
    _block_sums(x, mean, True, sums)
    return math.sqrt(_sequential_sum(sums) / n)


def std(x: np.ndarray) -> float:
    """Population standard deviation of ``x`` in the contract's fixed order.

    Parameters
    ----------
    x : numpy.ndarray
        1-D, C-contiguous, float32 or float64, at least one element.

    Returns
    -------
    float
        ``sqrt(var)``, float64; NaN when ``x`` holds NaN or inf.

    Raises
    ------
    TypeError
        If ``x`` is not a float32 or float64 NumPy array.
    ValueError
        If ``x`` is empty, not 1-D or not C-contiguous.
    """
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        what = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"x must be a float32 or float64 numpy array, got {what}; cast it first")
    if x.ndim != 1 or not x.flags.c_contiguous:
        raise ValueError(
            f"x must be 1-D and C-contiguous, got shape {x.shape}; "
            "pass numpy.ascontiguousarray(x).ravel()"
        )
    if x.size == 0:
        raise ValueError("std of an empty array is undefined (n = 0); pass at least one element")
    return float(_std(x))
