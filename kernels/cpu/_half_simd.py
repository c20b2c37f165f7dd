"""float32 <-> float16 conversion in the CPU's own instructions (x86 F16C's ``vcvtps2ph``
and ``vcvtph2ps``), eight lanes at a time, for :mod:`kernels.cpu.convert`.

The integer kernels of ``convert.py`` reproduce NumPy's conversion on the bit patterns,
one element at a time: 18 ms for 2^23 float32 on one core, against 1.8 ms for PyTorch's
F16C loop.  LLVM's ``fptrunc float to half`` and ``fpext half to float`` are IEEE 754
conversions (round to nearest even, subnormal halves, overflow to infinity), the same
rounding as NumPy's ``astype``; with the F16C feature LLVM lowers them to those
instructions.  What differs from ``astype`` is a NaN's payload (the instructions make
every NaN quiet): the encode and the contract's store (``accumulate=0``, which keeps
payloads) rewrite their NaNs with the integer path.  Each instruction also counts its
lanes whose exponent bits are all ones (a compare, a mask and a popcount), so the
rewrite runs only where there is something to rewrite; a scalar loop that counted them
afterwards had cost three times the conversion.  The kernel tests compare with NumPy bit
for bit, NaNs included.

Used only where the feature is present and Numba compiles for the host CPU
(:data:`AVAILABLE`); elsewhere ``convert.py`` keeps its integer kernels, so no soft-float
library call is ever needed.
"""

from __future__ import annotations

import platform

from llvmlite import binding, ir
from numba import config, njit, types
from numba.extending import intrinsic

LANES = 8
"""Elements per instruction (a 256-bit register of float32)."""


def _host_has_f16c() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if config.CPU_NAME is not None or config.CPU_FEATURES is not None:
        return False  # a cross or generic target: its features are not the host's
    try:
        return bool(binding.get_host_cpu_features().get("f16c", False))
    except RuntimeError:  # features unknown on this platform
        return False


AVAILABLE = _host_has_f16c()
"""Whether the F16C paths run on this machine."""


def _count_exponent_ones(builder, halves):
    """The lanes of ``halves`` (``<8 x half>``) whose exponent bits are all ones (inf or
    NaN), as an int64: a compare, a mask and a popcount per eight lanes, where a scalar
    loop over the halves afterwards cost 3x the conversion itself."""
    words = ir.VectorType(ir.IntType(16), LANES)
    exponent = ir.Constant(words, [0x7C00] * LANES)
    bits = builder.and_(builder.bitcast(halves, words), exponent)
    mask = builder.bitcast(builder.icmp_unsigned("==", bits, exponent), ir.IntType(LANES))
    return builder.zext(builder.ctpop(mask), ir.IntType(64))


_FLOATS = ir.VectorType(ir.FloatType(), LANES)
_HALVES = ir.VectorType(ir.HalfType(), LANES)


def _lanes(context, builder, sig, args, source_lanes, target_lanes):
    """Pointers to the eight lanes at index ``args[1]`` of the arrays ``args[0]`` (read
    as ``source_lanes``) and ``args[2]`` (``target_lanes``)."""
    source = context.make_array(sig.args[0])(context, builder, args[0])
    target = context.make_array(sig.args[2])(context, builder, args[2])
    read = builder.gep(source.data, [args[1]])
    write = builder.gep(target.data, [args[1]])
    return (
        builder.bitcast(read, source_lanes.as_pointer()),
        builder.bitcast(write, target_lanes.as_pointer()),
    )


@intrinsic
def _to_half8(typingctx, x, i, out):
    """``out[i:i+8] = float16(x[i:i+8])`` (``x`` float32, ``out`` the uint16 view);
    returns how many of the eight came out inf or NaN."""

    def codegen(context, builder, sig, args):
        read, write = _lanes(context, builder, sig, args, _FLOATS, _HALVES)
        value = builder.fptrunc(builder.load(read, align=4), _HALVES)
        builder.store(value, write, align=2)
        return _count_exponent_ones(builder, value)

    return types.int64(x, types.int64, out), codegen


@intrinsic
def _from_half8(typingctx, half, i, out):
    """``out[i:i+8] = float32(half[i:i+8])`` (exact; ``half`` the uint16 view); returns
    how many of the eight halves are inf or NaN (the instruction quiets a signalling
    NaN, so the caller rewrites NaNs to keep NumPy's bits)."""

    def codegen(context, builder, sig, args):
        read, write = _lanes(context, builder, sig, args, _HALVES, _FLOATS)
        value = builder.load(read, align=2)
        builder.store(builder.fpext(value, _FLOATS), write, align=4)
        return _count_exponent_ones(builder, value)

    return types.int64(half, types.int64, out), codegen


@intrinsic
def _add_half8(typingctx, half, i, out, subtract):
    """``out[i:i+8] += float32(half[i:i+8])`` (``-=`` when ``subtract``): the
    conversion is exact, the one rounding is the addition in float32."""

    def codegen(context, builder, sig, args):
        read, where = _lanes(context, builder, sig, args, _HALVES, _FLOATS)
        value = builder.fpext(builder.load(read, align=2), _FLOATS)
        old = builder.load(where, align=4)
        new = builder.select(args[3], builder.fsub(old, value), builder.fadd(old, value))
        builder.store(new, where, align=4)
        return context.get_dummy_value()

    return types.void(half, types.int64, out, types.boolean), codegen


@njit(cache=True, nogil=True)
def encode_range(x, out, lo, hi):
    """``out[lo:hi]`` (uint16 view of the halves) from float32 ``x[lo:hi]``, whole
    groups of eight only (the caller converts the rest, and rewrites NaNs: the
    instruction makes every NaN quiet, NumPy keeps the payload's top bits); returns
    how many halves came out inf or NaN."""
    bad = 0
    for t in range(lo, hi - (hi - lo) % LANES, LANES):
        bad += _to_half8(x, t, out)
    return bad


@njit(cache=True, nogil=True)
def store_range(half, out, lo, hi):
    """``out[lo:hi] =`` the float32 values of the halves (uint16 view), whole groups of
    eight only (the caller stores the rest, and rewrites NaNs); returns how many of
    the halves are inf or NaN."""
    bad = 0
    for t in range(lo, hi - (hi - lo) % LANES, LANES):
        bad += _from_half8(half, t, out)
    return bad


@njit(cache=True, nogil=True)
def accumulate_range(half, out, subtract, lo, hi):
    """``out[lo:hi] +=`` (or ``-=``) the float32 values of the halves (uint16 view),
    whole groups of eight only (the caller adds the rest)."""
    for t in range(lo, hi - (hi - lo) % LANES, LANES):
        _add_half8(half, t, out, subtract)
