"""Bit packing: ``bits``-wide fields, LSB-first, 8 fields -> ``bits`` bytes per group.

Eight ``bits``-wide fields fill exactly ``bits`` bytes, so every group of 8 elements
starts on a byte boundary and groups pack independently (in parallel, without carries
between tasks).  Inside a group the fields sit one per byte of a uint64.  At 1, 2 and 4
bits, the widths the codecs use, no field straddles a byte: each packed byte is built
from (or split into) its 8, 4 or 2 lanes with shifts, which LLVM vectorises.  Other
widths are squeezed together by three shift-and-mask steps (a portable ``pext``),
vectorised over groups; unpacking runs the steps backwards.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import CHUNK, n_chunks

_M8 = np.uint64(0x00FF00FF00FF00FF)
_M16 = np.uint64(0x0000FFFF0000FFFF)
_M32 = np.uint64(0x00000000FFFFFFFF)
_ONES = np.uint64(0x0101010101010101)
_SHIFT8 = np.uint64(8)
_SHIFT16 = np.uint64(16)
_SHIFT32 = np.uint64(32)


@njit(cache=True, nogil=True)
def compress_group(word, bits):
    """Squeeze 8 byte-lane fields of ``word`` into its low ``8*bits`` bits."""
    b = np.uint64(bits)
    word = np.uint64((word & _M8) | ((word & ~_M8) >> (_SHIFT8 - b)))
    word = np.uint64((word & _M16) | ((word & ~_M16) >> (_SHIFT16 - b - b)))
    return np.uint64((word & _M32) | ((word & ~_M32) >> (_SHIFT32 - np.uint64(4) * b)))


@njit(cache=True, nogil=True)
def expand_group(word, bits):
    """Inverse of :func:`compress_group`: one field per byte lane (upper bits zero)."""
    b = np.uint64(bits)
    lane = np.uint64(0xFF) >> (_SHIFT8 - b)  # the low `bits` bits of each byte
    low4 = (np.uint64(1) << (np.uint64(4) * b)) - np.uint64(1)
    word = np.uint64((word & low4) | ((word & ~low4) << (_SHIFT32 - np.uint64(4) * b)))
    low2 = ((np.uint64(1) << (b + b)) - np.uint64(1)) * np.uint64(0x0000000100000001)
    word = np.uint64((word & low2) | ((word & ~low2) << (_SHIFT16 - b - b)))
    low1 = ((np.uint64(1) << b) - np.uint64(1)) * np.uint64(0x0001000100010001)
    word = np.uint64((word & low1) | ((word & ~low1) << (_SHIFT8 - b)))
    return np.uint64(word & (lane * _ONES))


@njit(cache=True, nogil=True)
def pack_groups(fields, ngroups, bits, out, first_group):
    """Pack ``ngroups`` whole groups from ``fields`` (uint64 words, one field per byte).

    Writes bytes ``[first_group*bits, (first_group+ngroups)*bits)`` of ``out``.  The
    fields must already fit in ``bits`` bits.  For 1, 2 and 4 bits no field straddles a
    byte, so each output byte is its 8, 4 or 2 lanes shifted and or-ed together (the
    inverse of :func:`unpack_groups`' split; ``fields`` is left as it was).  Other widths
    squeeze each group in place, after which group ``g``'s bytes are the low ``bits``
    bytes of its word, copied out by loops spelled out for LLVM's vector shuffles.
    """
    # Slices indexed from 0 (and unsigned indices below) spare Numba's wraparound test.
    ob = out[first_group * bits : (first_group + ngroups) * bits]
    fb = fields.view(np.uint8)
    if bits == 4:
        for j in range(ob.size):
            ob[j] = fb[2 * j] | (fb[2 * j + 1] << np.uint8(4))
        return
    if bits == 2:
        for j in range(ob.size):
            ob[j] = (
                fb[4 * j]
                | (fb[4 * j + 1] << np.uint8(2))
                | (fb[4 * j + 2] << np.uint8(4))
                | (fb[4 * j + 3] << np.uint8(6))
            )
        return
    if bits == 1:
        for j in range(ob.size):
            v = np.uint8(0)
            for t in range(8):
                v |= fb[8 * j + t] << np.uint8(t)
            ob[j] = v
        return
    for g in range(ngroups):
        fields[g] = compress_group(fields[g], bits)
    if bits == 8:
        for t in range(8 * ngroups):
            ob[t] = fb[t]
    else:
        width = np.uint64(bits)
        for g in range(ngroups):
            p = np.uint64(g) * width
            q = np.uint64(8 * g)
            for j in range(bits):
                ob[p + np.uint64(j)] = fb[q + np.uint64(j)]


@njit(cache=True, nogil=True)
def pack_tail(fields, n_fields, bits, out, first_group):
    """Pack the last, partial group of ``n_fields < 8`` fields; trailing bits are zero."""
    mask = np.uint64((1 << (8 * n_fields)) - 1)
    word = compress_group(fields[0] & mask, bits)
    nbytes = (n_fields * bits + 7) // 8
    p = first_group * bits
    for j in range(nbytes):
        out[p + j] = np.uint8((word >> np.uint64(8 * j)) & np.uint64(0xFF))


@njit(cache=True, nogil=True)
def unpack_groups(packed, bits, first_group, ngroups, fields):
    """Expand groups ``first_group ...`` into ``fields`` (uint64 words, a field per byte).

    Reads at most to the end of ``packed`` (the last group may be partial).  For 1, 2
    and 4 bits a field never straddles a byte, so each packed byte is split straight
    into its 8, 4 or 2 lanes (LSB first, the layout the squeeze steps undo), which LLVM
    vectorises as shifts and byte shuffles: 4-6x faster than the squeeze steps backwards.
    """
    fb = fields.view(np.uint8)
    start = first_group * bits
    pb = packed[start : min(packed.size, start + ngroups * bits)]
    whole = pb.size // bits
    if bits == 1 or bits == 2 or bits == 4:
        for g in range(whole, ngroups):  # lanes past the last packed byte stay zero
            fields[g] = 0
        if bits == 4:
            for j in range(pb.size):
                v = pb[j]
                fb[2 * j] = v & np.uint8(15)
                fb[2 * j + 1] = v >> np.uint8(4)
        elif bits == 2:
            for j in range(pb.size):
                v = pb[j]
                fb[4 * j] = v & np.uint8(3)
                fb[4 * j + 1] = (v >> np.uint8(2)) & np.uint8(3)
                fb[4 * j + 2] = (v >> np.uint8(4)) & np.uint8(3)
                fb[4 * j + 3] = v >> np.uint8(6)
        else:
            for j in range(pb.size):
                v = pb[j]
                for t in range(8):
                    fb[8 * j + t] = (v >> np.uint8(t)) & np.uint8(1)
        return
    for g in range(ngroups):
        fields[g] = 0
    if bits == 8:
        for t in range(8 * whole):
            fb[t] = pb[t]
    else:
        width = np.uint64(bits)
        for g in range(whole):
            p = np.uint64(g) * width
            q = np.uint64(8 * g)
            for j in range(bits):
                fb[q + np.uint64(j)] = pb[p + np.uint64(j)]
    for j in range(pb.size - whole * bits):  # a last, partial group
        fb[8 * whole + j] = pb[whole * bits + j]
    for g in range(ngroups):
        fields[g] = expand_group(fields[g], bits)


@njit(cache=True, nogil=True)
def _pack_chunk(src, a, b, bits, out, scratch):
    """Pack elements ``[a, b)`` (``a`` a multiple of 8) of the uint8 ``src``."""
    mask = np.uint8((1 << bits) - 1)
    lanes = scratch.view(np.uint8)
    part = src[a:b]
    for t in range(part.size):
        lanes[t] = part[t] & mask
    n = b - a
    full = n // 8
    pack_groups(scratch, full, bits, out, a // 8)
    if n % 8:
        scratch[0] = scratch[full]
        pack_tail(scratch, n % 8, bits, out, a // 8 + full)


@njit(cache=True, nogil=True, parallel=True)
def _pack_bits(fields, bits, out):
    n = fields.size
    for c in prange(n_chunks(n, CHUNK)):
        scratch = np.zeros(CHUNK // 8, dtype=np.uint64)
        _pack_chunk(fields, c * CHUNK, min(n, (c + 1) * CHUNK), bits, out, scratch)


@njit(cache=True, nogil=True)
def _unpack_chunk(packed, bits, a, b, out, scratch):
    n = b - a
    unpack_groups(packed, bits, a // 8, (n + 7) // 8, scratch)
    lanes = scratch.view(np.uint8)
    part = out[a:b]
    for t in range(n):
        part[t] = lanes[t]


@njit(cache=True, nogil=True, parallel=True)
def _unpack_bits(packed, bits, out):
    n = out.size
    for c in prange(n_chunks(n, CHUNK)):
        scratch = np.empty(CHUNK // 8, dtype=np.uint64)
        _unpack_chunk(packed, bits, c * CHUNK, min(n, (c + 1) * CHUNK), out, scratch)


def pack_bits(fields: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Pack ``bits``-wide fields (uint8, length n) into ``out`` (``ceil(n*bits/8)`` bytes).

    Bits of a field above ``bits`` are ignored.
    """
    _pack_bits(fields, int(bits), out)


def unpack_bits(packed: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Unpack ``out.size`` fields of ``bits`` bits from ``packed`` into ``out`` (uint8)."""
    _unpack_bits(packed, int(bits), out)
