"""Numba kernels for sparse streams: merge-and-sum, split by index range, scatter, coalesce.

A *sparse stream* is a pair ``(indices, values)`` of 1-D arrays with ``indices`` strictly
ascending (sorted, no duplicates).  These kernels are the inner loops of the SparCML
collectives in ``sparcomm.comm`` (Renggli et al., "SparCML: High-Performance Sparse
Communication for Machine Learning", SC'19): owners merge the streams they receive,
senders split their stream into index ranges, and results are written into dense buffers.

Every kernel has a plain NumPy reference (``*_reference``) below it; the tests in
``tests/comm/test_merge.py`` hold the kernels to them.  Kernels are serial on purpose: in
data-parallel training one process per core already occupies every core.

Summation order (this is what makes the collectives bitwise identical on every rank):
:func:`merge_sum_streams` merges ``s`` streams as a fixed pairwise tree, level by level,
``((s0 + s1) + (s2 + s3)) + ...``, an odd last stream carried up unchanged; an index present
in only one operand is copied, never added to zero (so ``-0.0`` survives).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from sparcomm.kernels import reference

from ._stores import LINE_BYTES, store_fence, stream_line_from

# ---------------------------------------------------------------------------- merge


@njit(cache=True, nogil=True)
def merge_sum_two(a_indices, a_values, b_indices, b_values, out_indices, out_values):
    """Merge two sorted streams, summing ``a + b`` where an index is in both.

    ``out_*`` need room for ``len(a) + len(b)`` entries; returns the merged count.
    The loop is branch-free (selects instead of an if-chain on the comparison): on
    random supports the comparison is a coin flip that a branch predictor cannot
    learn, and the branchy version measured 2.2x slower.
    """
    na = a_indices.size
    nb = b_indices.size
    i = 0
    j = 0
    m = 0
    while i < na and j < nb:
        ia = a_indices[i]
        ib = b_indices[j]
        va = a_values[i]
        vb = b_values[j]
        take_a = ia <= ib
        take_b = ib <= ia
        out_indices[m] = ia if take_a else ib
        single = va if take_a else vb
        out_values[m] = va + vb if (take_a and take_b) else single
        i += take_a
        j += take_b
        m += 1
    while i < na:
        out_indices[m] = a_indices[i]
        out_values[m] = a_values[i]
        i += 1
        m += 1
    while j < nb:
        out_indices[m] = b_indices[j]
        out_values[m] = b_values[j]
        j += 1
        m += 1
    return m


@njit(cache=True, nogil=True)
def merge_sum_streams(indices, values, offsets, out_indices, out_values, work_indices, work_values):
    """Merge ``s`` sorted streams stored back to back and sum equal indices.

    Stream ``t`` is ``indices[offsets[t]:offsets[t + 1]]`` (and the same slice of
    ``values``); ``offsets`` has ``s + 1`` entries.  The streams are merged as a fixed
    pairwise tree (see the module docstring), so the result depends only on the inputs,
    never on timing.  ``out_*`` and ``work_*`` must each hold ``offsets[s]`` entries;
    returns the merged count ``K``, the result being ``out_*[:K]``.
    """
    s = offsets.size - 1
    total = offsets[s]
    if s == 0 or total == 0:
        return 0
    # Ping-pong between two buffers; choose the starting buffer so the last level lands
    # in out_* (levels = ceil(log2 s)).
    levels = 0
    width = 1
    while width < s:
        width *= 2
        levels += 1
    starts = np.empty(s + 1, np.int64)
    for t in range(s + 1):
        starts[t] = offsets[t]
    if levels == 0:
        for t in range(total):
            out_indices[t] = indices[t]
            out_values[t] = values[t]
        return total
    # Level 0 reads the inputs; each later level reads what the previous one wrote.
    if levels % 2 == 1:
        dst_i, dst_v, oth_i, oth_v = out_indices, out_values, work_indices, work_values
    else:
        dst_i, dst_v, oth_i, oth_v = work_indices, work_values, out_indices, out_values
    src_i = indices
    src_v = values
    count = s
    while count > 1:
        pos = 0
        new_count = (count + 1) // 2
        for p in range(new_count):
            a0 = starts[2 * p]
            a1 = starts[2 * p + 1]
            start = pos
            if 2 * p + 1 < count:
                b1 = starts[2 * p + 2]
                pos += merge_sum_two(
                    src_i[a0:a1],
                    src_v[a0:a1],
                    src_i[a1:b1],
                    src_v[a1:b1],
                    dst_i[pos:],
                    dst_v[pos:],
                )
            else:
                for t in range(a0, a1):
                    dst_i[pos] = src_i[t]
                    dst_v[pos] = src_v[t]
                    pos += 1
            starts[p] = start
        starts[new_count] = pos
        count = new_count
        src_i, src_v = dst_i, dst_v
        dst_i, dst_v, oth_i, oth_v = oth_i, oth_v, dst_i, dst_v
    return starts[1]


def merge_sum_streams_reference(indices, values, offsets):
    """NumPy reference of :func:`merge_sum_streams`, as arrays (``reference.merge_streams``)."""
    return reference.merge_streams(indices, values, offsets)


# ----------------------------------------------------------------------------- split


@njit(cache=True, nogil=True)
def range_offsets(indices, bounds, out):
    """``out[j]`` = first position ``p`` with ``indices[p] >= bounds[j]`` (binary search).

    With ``bounds = [b_0, ..., b_P]`` the index ranges ``[b_j, b_{j+1})`` of ``P`` owners,
    stream ``j``'s part is ``indices[out[j]:out[j + 1]]``.
    """
    m = indices.size
    for j in range(bounds.size):
        lo = 0
        hi = m
        target = bounds[j]
        while lo < hi:
            mid = (lo + hi) // 2
            if indices[mid] < target:
                lo = mid + 1
            else:
                hi = mid
        out[j] = lo


def range_offsets_reference(indices, bounds):
    """NumPy reference of :func:`range_offsets`."""
    return np.searchsorted(indices, bounds, side="left").astype(np.int64)


# --------------------------------------------------------------------------- scatter


@njit(cache=True, nogil=True)
def scatter_assign(indices, values, offset, out):
    """``out[indices[j] - offset] = values[j]`` (unique indices: a sparse-to-dense write)."""
    for j in range(indices.size):
        out[indices[j] - offset] = values[j]


def scatter_assign_reference(indices, values, offset, out):
    """NumPy reference of :func:`scatter_assign`."""
    out[np.asarray(indices, dtype=np.int64) - offset] = values


@njit(cache=True, nogil=True)
def _put(out, i, v, divide, divisor):
    out[i] = v / divisor if divide else v


_SCATTER_BLOCK = 2048
"""Elements of :func:`scatter_dense`'s output staged together in a small buffer that
stays in L1 (a multiple of the cache line for every dtype)."""


@njit(cache=True, nogil=True)
def scatter_dense(indices, values, offset, out, divide, divisor):
    """``out[:] = 0; out[indices[j] - offset] = values[j]`` (divided by ``divisor`` when
    ``divide``), in one streaming pass over ``out``.

    Bit for bit zeroing ``out``, :func:`scatter_assign` and, with ``divide``, ``out /=
    divisor`` (``0 / d`` is ``+0``; each kept value divided once, rounded once), but
    ``out`` is written once, with non-temporal stores of whole cache lines (see
    ``_stores.py``): no read of ``out``'s old contents and no second pass over the
    entries.  Block by block, the entries are written into a zeroed buffer that stays
    in L1, the buffer is streamed out a line at a time, and the written slots are zeroed
    again for the next block: per element one vector store, per entry two scalar ones.
    ``indices`` in ``[offset, offset + out.size)``; ascending ones take the one pass,
    any others (unsorted, duplicates: the last one wins, as in :func:`scatter_assign`)
    are written again afterwards.  ``divisor`` has ``out``'s dtype.
    """
    n = out.size
    lanes = LINE_BYTES // out.itemsize
    block = np.zeros(_SCATTER_BLOCK, dtype=out.dtype)
    zero = block[0]
    m = indices.size
    address = out.ctypes.data
    head = n
    if address % out.itemsize == 0:
        head = min(n, (LINE_BYTES - address % LINE_BYTES) % LINE_BYTES // out.itemsize)
    j = 0
    previous = -1
    ordered = True
    for t in range(head):
        out[t] = zero
    while j < m and indices[j] - offset < head:
        i = indices[j] - offset
        ordered = ordered and i > previous
        previous = i
        _put(out, i, values[j], divide, divisor)
        j += 1
    a = head
    lines_end = head + (n - head) // lanes * lanes  # whole lines from the aligned head
    while a < lines_end:
        b = min(a + _SCATTER_BLOCK, lines_end)
        first = j
        while j < m and indices[j] - offset < b:
            i = indices[j] - offset
            ordered = ordered and i > previous
            previous = i
            if i >= a:
                _put(block, i - a, values[j], divide, divisor)
            j += 1
        for t in range(a, b, lanes):
            stream_line_from(block, t - a, out, t)
        for q in range(first, j):  # the slots written, back to +0 for the next block
            i = indices[q] - offset
            if i >= a:
                block[i - a] = zero
        a = b
    store_fence()
    for t in range(a, n):
        out[t] = zero
    while j < m:
        i = indices[j] - offset
        ordered = ordered and i > previous
        previous = i
        _put(out, i, values[j], divide, divisor)
        j += 1
    if not ordered:  # rare (callers pass sorted streams): the plain scatter, in order
        for j in range(m):
            _put(out, indices[j] - offset, values[j], divide, divisor)


def scatter_dense_reference(indices, values, offset, out, divide, divisor):
    """NumPy reference of :func:`scatter_dense`."""
    out[:] = 0
    out[np.asarray(indices, dtype=np.int64) - offset] = values
    if divide:
        out /= out.dtype.type(divisor)


@njit(cache=True, nogil=True)
def scatter_accumulate(indices, values, offset, out):
    """``out[indices[j] - offset] += values[j]``, in order of ``j`` (duplicates summed)."""
    for j in range(indices.size):
        out[indices[j] - offset] += values[j]


def scatter_accumulate_reference(indices, values, offset, out):
    """NumPy reference of :func:`scatter_accumulate` (``np.add.at`` adds in order)."""
    np.add.at(out, np.asarray(indices, dtype=np.int64) - offset, values)


@njit(cache=True, nogil=True)
def gather_nonzero(dense, offset, out_indices, out_values):
    """Write the non-zero entries of ``dense`` as a sorted stream (indices + ``offset``).

    ``out_*`` need room for ``dense.size`` entries; returns the count.
    """
    m = 0
    for i in range(dense.size):
        v = dense[i]
        if v != 0:
            out_indices[m] = i + offset
            out_values[m] = v
            m += 1
    return m


def gather_nonzero_reference(dense, offset):
    """NumPy reference of :func:`gather_nonzero`."""
    nz = np.flatnonzero(dense)
    return nz + offset, dense[nz]


# ---------------------------------------------------------------- validate / coalesce


@njit(cache=True, nogil=True)
def check_stream(indices, n):
    """Classify user indices: 0 = strictly ascending in ``[0, n)``, 1 = in range but
    unsorted or with duplicates, 2 = some index outside ``[0, n)``."""
    state = 0
    prev = -1
    for j in range(indices.size):
        i = indices[j]
        if i < 0 or i >= n:
            return 2
        if i <= prev:
            state = 1
        prev = i
    return state


def check_stream_reference(indices, n):
    """NumPy reference of :func:`check_stream`."""
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        return 2
    if indices.size > 1 and np.any(np.diff(indices) <= 0):
        return 1
    return 0


@njit(cache=True, nogil=True)
def coalesce_sorted(indices, values, out_indices, out_values):
    """Sum runs of equal indices of an ascending (non-strict) stream, in order.

    ``out_*`` need ``indices.size`` entries; returns the count of distinct indices.
    """
    m = -1
    prev = -1
    for j in range(indices.size):
        i = indices[j]
        if m >= 0 and i == prev:
            out_values[m] += values[j]
        else:
            m += 1
            out_indices[m] = i
            out_values[m] = values[j]
            prev = i
    return m + 1


def coalesce_sorted_reference(indices, values):
    """NumPy reference of :func:`coalesce_sorted`: ``np.add.at`` adds in input order
    (``np.add.reduceat`` would not: it sums long runs pairwise)."""
    indices = np.asarray(indices)
    unique, inverse = np.unique(indices, return_inverse=True)
    out = np.zeros(unique.size, dtype=np.asarray(values).dtype)
    np.add.at(out, inverse, values)
    return unique, out
