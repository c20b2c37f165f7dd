"""Shared Numba helpers of the CPU kernels: dtype dispatch, chunking, deterministic sums.

Numba compiles one specialisation per argument type; the small ``@overload`` helpers here
pick the bit-pattern view and constants of ``x.dtype`` at compile time, so every kernel
is written once for float32 and float64.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.typed import List
from sparcomm.kernels._checks import check_accumulate  # noqa: F401 - the CPU kernels' import

CHUNK = 1 << 14
"""Elements per parallel task: a multiple of 64, small enough to stay in L1/L2."""
LANES = 8
"""Lanes of the contract's deterministic bucket sum (``lane_sum``)."""
_LANE_VECTOR = ir.VectorType(ir.DoubleType(), LANES)


def abs_bits(x):  # pragma: no cover - replaced by the overload inside Numba
    """``|x|`` bit pattern view (uint32 or uint64); callers mask the sign bit."""
    raise NotImplementedError


@overload(abs_bits)
def _abs_bits_overload(x):
    if x.dtype == types.float32:
        return lambda x: x.view(np.uint32)
    return lambda x: x.view(np.uint64)


def abs_mask(x):  # pragma: no cover - replaced by the overload inside Numba
    """All bits but the sign bit, in the unsigned type of ``x.dtype``."""
    raise NotImplementedError


@overload(abs_mask)
def _abs_mask_overload(x):
    if x.dtype == types.float32:
        return lambda x: np.uint32(0x7FFFFFFF)
    return lambda x: np.uint64(0x7FFFFFFFFFFFFFFF)


def inf_bits(x):  # pragma: no cover - replaced by the overload inside Numba
    """Bit pattern of +inf of ``x.dtype``: abs bits at or above it are inf or NaN."""
    raise NotImplementedError


@overload(inf_bits)
def _inf_bits_overload(x):
    if x.dtype == types.float32:
        return lambda x: np.uint32(0x7F800000)
    return lambda x: np.uint64(0x7FF0000000000000)


def as_dtype(value, x):  # pragma: no cover - replaced by the overload inside Numba
    """``value`` converted to ``x.dtype`` (float32 arithmetic stays float32)."""
    raise NotImplementedError


@overload(as_dtype)
def _as_dtype_overload(value, x):
    if x.dtype == types.float32:
        return lambda value, x: np.float32(value)
    return lambda value, x: np.float64(value)


def as_key(value, keys):  # pragma: no cover - replaced by the overload inside Numba
    """``value`` converted to the unsigned type of the key array ``keys``."""
    raise NotImplementedError


@overload(as_key)
def _as_key_overload(value, keys):
    if keys.dtype == types.uint32:
        return lambda value, keys: np.uint32(value)
    return lambda value, keys: np.uint64(value)


@njit(cache=True, nogil=True)
def n_chunks(n, chunk):
    return (n + chunk - 1) // chunk


def _lane_rows(context, builder, array_type, array_value, rows, body):
    """Emit ``for r in range(rows): body(float64 <8 x double> of array[8r:8r+8])``."""
    array = context.make_array(array_type)(context, builder, array_value)
    element = context.get_data_type(array_type.dtype)
    vector_in = ir.VectorType(element, LANES)
    align = context.get_abi_sizeof(element)
    with cgutils.for_range(builder, rows) as loop:
        first = builder.mul(loop.index, ir.Constant(loop.index.type, LANES))
        pointer = builder.bitcast(builder.gep(array.data, [first]), vector_in.as_pointer())
        row = builder.load(pointer, align=align)
        if isinstance(element, ir.FloatType):  # float32 input: widen to float64 lanes
            row = builder.fpext(row, _LANE_VECTOR)
        body(row)


def _lane_tuple(context, builder, return_type, vectors):
    items = [
        builder.extract_element(vector, ir.Constant(ir.IntType(32), j))
        for vector in vectors
        for j in range(LANES)
    ]
    return context.make_tuple(builder, return_type, items)


@intrinsic
def _lane_rows_squares(typingctx, xs, rows):
    """The 8 lane sums of ``float64(x)**2`` over ``rows`` full rows of 8 (a UniTuple).

    Numba does not vectorise eight scalar accumulators, and cannot prove its arrays
    free of aliasing; this emits the lane vector directly: one ``<8 x double>``
    accumulator, lane ``j`` adding row after row in order, exactly the contract's sum.
    """
    signature = types.UniTuple(types.float64, LANES)(xs, types.int64)

    def codegen(context, builder, sig, args):
        total = cgutils.alloca_once_value(builder, ir.Constant(_LANE_VECTOR, [0.0] * LANES))

        def body(row):
            builder.store(builder.fadd(builder.load(total), builder.fmul(row, row)), total)

        _lane_rows(context, builder, sig.args[0], args[0], args[1], body)
        return _lane_tuple(context, builder, sig.return_type, [builder.load(total)])

    return signature, codegen


@intrinsic
def lane_rows_by_sign(typingctx, xs, rows):
    """Lane sums over ``rows`` rows of 8: 8 lanes of ``x >= 0`` (or NaN), 8 of ``x < 0``.

    An element of the other group adds +0.0 to a lane, which leaves it unchanged (lanes
    start at +0.0, so none is ever -0.0): the contract's sum over the group's members.
    """
    signature = types.UniTuple(types.float64, 2 * LANES)(xs, types.int64)

    def codegen(context, builder, sig, args):
        zero = ir.Constant(_LANE_VECTOR, [0.0] * LANES)
        positive = cgutils.alloca_once_value(builder, zero)
        negative = cgutils.alloca_once_value(builder, zero)

        def body(row):
            is_negative = builder.fcmp_ordered("<", row, zero)
            builder.store(
                builder.fadd(builder.load(positive), builder.select(is_negative, zero, row)),
                positive,
            )
            builder.store(
                builder.fadd(builder.load(negative), builder.select(is_negative, row, zero)),
                negative,
            )

        _lane_rows(context, builder, sig.args[0], args[0], args[1], body)
        vectors = [builder.load(positive), builder.load(negative)]
        return _lane_tuple(context, builder, sig.return_type, vectors)

    return signature, codegen


@njit(cache=True, nogil=True)
def combine_lanes(l0, l1, l2, l3, l4, l5, l6, l7):
    """The contract's combination of the 8 lanes."""
    return ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))


@njit(cache=True, nogil=True)
def lane_sum_squares(x, start, stop):
    """Contract ``lane_sum`` of ``float64(x_i)**2`` over ``x[start:stop]``.

    Full rows of 8 go through the lane vector; the last ``< 8`` elements are the last
    terms of lanes ``0 .. r-1``.
    """
    xs = x[start:stop]
    rows = xs.size // LANES
    a0, a1, a2, a3, a4, a5, a6, a7 = _lane_rows_squares(xs, rows)
    tail = xs[LANES * rows :]
    r = tail.size
    if r > 0:
        a0 += np.float64(tail[0]) * np.float64(tail[0])
    if r > 1:
        a1 += np.float64(tail[1]) * np.float64(tail[1])
    if r > 2:
        a2 += np.float64(tail[2]) * np.float64(tail[2])
    if r > 3:
        a3 += np.float64(tail[3]) * np.float64(tail[3])
    if r > 4:
        a4 += np.float64(tail[4]) * np.float64(tail[4])
    if r > 5:
        a5 += np.float64(tail[5]) * np.float64(tail[5])
    if r > 6:
        a6 += np.float64(tail[6]) * np.float64(tail[6])
    return combine_lanes(a0, a1, a2, a3, a4, a5, a6, a7)


def typed_arrays(arrays) -> List:
    """A sequence of same-dtype 1-D arrays as one ``numba.typed.List`` argument.

    One compiled specialisation serves any number of arrays (a tuple would compile one
    per length), and the list is built without reflection.  Each array is made
    C-contiguous, so all share one type (a no-op for the payload views passed here).
    """
    typed = List()
    for array in arrays:
        typed.append(np.ascontiguousarray(array))
    return typed
