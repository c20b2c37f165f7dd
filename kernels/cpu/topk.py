"""Exact top-k of ``|x|`` by radix select over the float bit pattern.

Clearing the sign bit of an IEEE float leaves an unsigned integer that is monotone in
``|x|`` (``-0.0`` and ``+0.0`` both map to 0; inf and NaN sit above every finite value),
so selection runs on integers and never sorts.  Steps, for ``0 < k < n``:

1. **Bound.**  The exact ``r``-th largest key of a strided sample of ``S`` keys
   (``r`` = the sample's expected count above the k-th largest, plus four standard
   deviations) is a threshold ``T`` a little below the true k-th largest key.  For
   ``n <= S`` the sample is all of ``x`` and ``T`` is exact.
2. **One pass.**  Parallel chunks stream ``x`` once, 16 keys per vector: a compare
   with ``T`` gives a lane mask, the chunk offsets and raw bits of the keys above ``T``
   are packed by a vector compress (no data-dependent branch), and the keys equal to
   ``T`` are counted by popcounts.  The non-finite keys are counted afterwards among the
   stored ones (they are all above ``T``, or equal to it when ``T`` is inf's key): a
   third compare and popcount in every row cost a quarter of the pass.  Each chunk has its own
   slots, sized from the sample; a chunk that overflows them is detected and the scan
   redone with room for every key.
3. **Exact select.**  If fewer than ``k`` keys are above ``T`` but enough are at least
   ``T``, the k-th largest is ``T`` itself; if more than ``k`` are above, an MSD radix
   select (11-bit digits) over the few candidates finds it.  If the sample bound was too
   high (fewer than ``k`` keys at least ``T``) a full histogram of the top 11 bits gives a
   bound that cannot fail and step 2 runs again: correctness never rests on the sample.
4. **Output.**  Per chunk, counts of keys above and equal to the k-th largest give every
   chunk its output offset and its share of the ties (lowest indices first), so chunks
   write their ascending indices in parallel.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._common import abs_bits, abs_mask, as_key, inf_bits, n_chunks
from ._stores import store_fence, stream_copy

SCAN_CHUNK = 1 << 16
"""Elements per parallel task of the candidate pass."""
SAMPLE = 1 << 16
"""Keys in the strided sample that bounds the threshold."""
_ROW = 16
"""Keys compared and compressed together (one AVX-512 vector of float32 keys)."""
RADIX_BITS = 11
_DIGITS = 1 << RADIX_BITS


@njit(cache=True, nogil=True)
def _key_range(keys):
    low = keys[0]
    high = keys[0]
    for t in range(1, keys.size):
        low = min(low, keys[t])
        high = max(high, keys[t])
    return np.uint64(low), np.uint64(high)


@njit(cache=True, nogil=True)
def kth_largest(keys, r):
    """The ``r``-th largest value of the unsigned ``keys`` (``1 <= r <= keys.size``).

    MSD radix select: histogram one 11-bit digit of the keys still in play, keep the
    digit bucket that holds the ``r``-th largest, repeat on the next digit.  The first
    digit starts just below the highest bit where the smallest and largest key differ
    (all keys share the bits above it), so candidates packed in a narrow range of
    magnitudes are split at the first pass.
    """
    low, high = _key_range(keys)
    if low == high:
        return keys[0]
    spread = 0
    diff = low ^ high
    while diff:
        spread += 1
        diff >>= np.uint64(1)
    # The first pass filters from ``keys`` into ``work`` (no copy of all keys); later
    # passes filter ``work`` in place.
    source = keys
    work = np.empty_like(keys)
    m = keys.size
    need = r
    shift = max(spread - RADIX_BITS, 0)
    digit_mask = np.uint64(_DIGITS - 1)
    # Four interleaved sub-histograms: candidates crowd into a few digits, and a single
    # histogram would serialise on store-to-load forwarding of the same counter.
    hist = np.zeros((4, _DIGITS), dtype=np.int64)
    while True:
        s = np.uint64(shift)
        hist[:] = 0
        quads = m - m % 4
        for t in range(0, quads, 4):
            hist[0, np.int64((np.uint64(source[t]) >> s) & digit_mask)] += 1
            hist[1, np.int64((np.uint64(source[t + 1]) >> s) & digit_mask)] += 1
            hist[2, np.int64((np.uint64(source[t + 2]) >> s) & digit_mask)] += 1
            hist[3, np.int64((np.uint64(source[t + 3]) >> s) & digit_mask)] += 1
        for t in range(quads, m):
            hist[0, np.int64((np.uint64(source[t]) >> s) & digit_mask)] += 1
        d = _DIGITS - 1
        above = 0
        count = hist[0, d] + hist[1, d] + hist[2, d] + hist[3, d]
        while above + count < need:
            above += count
            d -= 1
            count = hist[0, d] + hist[1, d] + hist[2, d] + hist[3, d]
        need -= above
        j = 0
        for t in range(m):
            if np.int64((np.uint64(source[t]) >> s) & digit_mask) == d:
                work[j] = source[t]
                j += 1
        m = j
        source = work
        if shift == 0:
            return work[0]
        shift = max(shift - RADIX_BITS, 0)


@njit(cache=True, nogil=True)
def _sample_keys(bits, mask, n):
    """The strided sample of keys behind :func:`_sample_bound`."""
    size = min(n, SAMPLE)
    stride = n // size
    sample = np.empty(size, dtype=bits.dtype)
    # Serial on purpose: 64K strided loads take ~0.1 ms, less than waking the threads
    # costs on a busy machine.
    for j in range(size):
        sample[j] = bits[j * stride] & mask
    return sample


@njit(cache=True, nogil=True)
def _sample_keys_of_sum(a, b, mask, n, keys):
    """The keys of :func:`_sample_keys` for ``x = a + b`` (not yet written): the same
    positions, each ``a[i] + b[i]`` rounded once in the dtype, as ``add`` writes it."""
    size = min(n, SAMPLE)
    stride = n // size
    sample = np.empty(size, dtype=keys.dtype)
    one = np.empty(1, dtype=a.dtype)
    one_bits = abs_bits(one)
    for j in range(size):
        one[0] = a[j * stride] + b[j * stride]
        sample[j] = one_bits[0] & mask
    return sample


@njit(cache=True, nogil=True)
def _sample_bound(bits, mask, n, k):
    """A threshold key at or below the k-th largest, from a strided sample (usually).

    Returns the bound and a capacity per scan chunk for the candidates above it.
    """
    return _bound_of_sample(_sample_keys(bits, mask, n), n, k)


@njit(cache=True, nogil=True)
def _bound_of_sample(sample, n, k):
    """:func:`_sample_bound` given the sample of keys."""
    size = sample.size
    if size == n:
        return kth_largest(sample, k), SCAN_CHUNK
    expected = k * (size / n)
    r = min(size, np.int64(math.ceil(expected + 4.0 * math.sqrt(expected) + 8.0)))
    bound = kth_largest(sample, r)
    # Candidate slots per chunk: the sample's share of keys above the bound, with room
    # for chance (Poisson: 8 standard deviations) and uneven data.  A chunk that still
    # overflows is detected and the scan redone with room for every key.
    above = 0
    for t in range(size):
        above += sample[t] > bound
    per_chunk = SCAN_CHUNK * (above / size)
    cap = np.int64(2.0 * per_chunk + 8.0 * math.sqrt(per_chunk) + 1024.0)
    return bound, min(cap, SCAN_CHUNK)


@njit(cache=True, nogil=True)
def _histogram_chunk(bits, mask, shift, a, b, hist):
    s = np.uint64(shift)
    part = bits[a:b]
    for t in range(part.size):
        hist[np.int64(np.uint64(part[t] & mask) >> s)] += 1


@njit(cache=True, nogil=True, parallel=True)
def _histogram_bound(bits, mask, n, k):
    """The lower edge of the top-11-bit digit holding the k-th largest key: always safe."""
    shift = bits.itemsize * 8 - RADIX_BITS
    tasks = 64
    per = n_chunks(n, tasks)
    hists = np.zeros((tasks, _DIGITS), dtype=np.int64)
    for t in prange(tasks):
        _histogram_chunk(bits, mask, shift, min(n, t * per), min(n, (t + 1) * per), hists[t])
    hist = np.zeros(_DIGITS, dtype=np.int64)
    for t in range(tasks):
        for d in range(_DIGITS):
            hist[d] += hists[t, d]
    d = _DIGITS - 1
    above = 0
    while above + hist[d] < k:
        above += hist[d]
        d -= 1
    return as_key(np.uint64(d) << np.uint64(shift), bits)


def _splat(builder, vector_type, value):
    lanes = vector_type.count
    first = builder.insert_element(
        ir.Constant(vector_type, ir.Undefined), value, ir.Constant(ir.IntType(32), 0)
    )
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    return builder.shuffle_vector(first, ir.Constant(vector_type, ir.Undefined), zeros)


def _count_true(builder, flags):
    """Number of set lanes of an ``<N x i1>`` as i64 (a popcount of the mask register)."""
    width = ir.IntType(flags.type.count)
    bits = builder.bitcast(flags, width)
    popcount = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(width, [width]), f"llvm.ctpop.i{flags.type.count}"
    )
    return builder.zext(builder.call(popcount, [bits]), ir.IntType(64))


def _compress_into(builder, values, keep, array, slot):
    """Store the lanes of ``values`` where ``keep`` is set, packed, at ``array[slot]``.

    Compresses in registers (``llvm.experimental.vector.compress``, one ``vpcompress``
    with AVX-512), then stores the whole vector: lanes past the kept ones are scratch
    that later rows overwrite.  A compressing *store* would be microcoded and slow on
    AMD cores.
    """
    vector_type = values.type
    lanes = vector_type.count
    compress = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(
            vector_type, [vector_type, ir.VectorType(ir.IntType(1), lanes), vector_type]
        ),
        f"llvm.experimental.vector.compress.v{lanes}i{vector_type.element.width}",
    )
    packed = builder.call(compress, [values, keep, ir.Constant(vector_type, ir.Undefined)])
    target = builder.bitcast(builder.gep(array.data, [slot]), vector_type.as_pointer())
    builder.store(packed, target, align=1)


def _half(builder, vector, first):
    """Lanes ``first .. first+7`` of a 16-lane vector."""
    mask = ir.Constant(ir.VectorType(ir.IntType(32), _ROW // 2), list(range(first, first + 8)))
    return builder.shuffle_vector(vector, ir.Constant(vector.type, ir.Undefined), mask)


@intrinsic
def _compress_row(typingctx, part, first, mask, bound, out_idx, out_raw, slot, offset):
    """One row of 16 keys: store those above ``bound``, count those equal to it.

    ``part[first:first+16]`` is compared with ``bound`` after masking the sign bit; the
    indices (``offset + first + lane``, int32) and raw bits of the keys above are written
    contiguously from ``out_*[slot]`` (see :func:`_compress_into`): no branch depends on
    the data.  64-bit keys go in two halves of 8 lanes.  Returns ``(stored, equal)``.
    The caller guarantees 16 free slots.
    """
    signature = types.UniTuple(types.int64, 2)(
        part, types.int64, mask, bound, out_idx, out_raw, types.int64, types.int64
    )

    def codegen(context, builder, sig, args):
        part_v, first, mask_v, bound_v, idx_v, raw_v, slot_v, offset_v = args
        keys_in = context.make_array(sig.args[0])(context, builder, part_v)
        idx_out = context.make_array(sig.args[4])(context, builder, idx_v)
        raw_out = context.make_array(sig.args[5])(context, builder, raw_v)
        key_type = context.get_data_type(sig.args[0].dtype)
        row_type = ir.VectorType(key_type, _ROW)
        index_type = ir.VectorType(ir.IntType(32), _ROW)
        pointer = builder.gep(keys_in.data, [first])
        raw = builder.load(builder.bitcast(pointer, row_type.as_pointer()), align=1)
        keys = builder.and_(raw, _splat(builder, row_type, mask_v))
        above = builder.icmp_unsigned(">", keys, _splat(builder, row_type, bound_v))
        equal = builder.icmp_unsigned("==", keys, _splat(builder, row_type, bound_v))
        lane = ir.Constant(index_type, list(range(_ROW)))
        start = builder.trunc(builder.add(offset_v, first), ir.IntType(32))
        index = builder.add(_splat(builder, index_type, start), lane)
        if key_type.width == 32:
            _compress_into(builder, index, above, idx_out, slot_v)
            _compress_into(builder, raw, above, raw_out, slot_v)
        else:
            low_keep = _half(builder, above, 0)
            high_slot = builder.add(slot_v, _count_true(builder, low_keep))
            for half, target_slot in ((0, slot_v), (8, high_slot)):
                keep = _half(builder, above, half)
                _compress_into(builder, _half(builder, index, half), keep, idx_out, target_slot)
                _compress_into(builder, _half(builder, raw, half), keep, raw_out, target_slot)
        counts = [_count_true(builder, flags) for flags in (above, equal)]
        return context.make_tuple(builder, sig.return_type, counts)

    return signature, codegen


@njit(cache=True, nogil=True)
def _scan_chunk(bits, mask, bound, a, b, cand_idx, cand_key, base, cap):
    """Store the keys above ``bound`` in ``[a, b)`` at ``cand_*[base:base+cap]``.

    ``cand_idx`` receives offsets within the chunk (``i - a``), ``cand_key`` raw bits.

    Returns ``(above, equal)``.  Rows of 16 keys go through :func:`_compress_row` (one
    streaming, branch-free pass); the last ``< 16`` keys are done one by one.  A chunk
    with more keys above ``bound`` than its ``cap`` slots stops storing but keeps
    counting, and the caller, seeing ``above > cap``, scans again with room for every
    key.
    """
    part = bits[a:b]
    out_idx = cand_idx[base : base + cap]
    out_raw = cand_key[base : base + cap]
    # The row intrinsic splats these into vectors of the key type.
    mask = as_key(mask, bits)
    bound = as_key(bound, bits)
    return _scan_keys(part, part.size, 0, mask, bound, out_idx, out_raw, cap, 0, 0)


@njit(cache=True, nogil=True, inline="always")
def _scan_keys(keys, m, offset, mask, bound, out_idx, out_raw, cap, above, equal):
    """The scan of :func:`_scan_chunk` over ``keys[:m]`` (their offsets in the chunk
    start at ``offset``), continuing the counts ``above`` and ``equal``; returns them.
    Rows of 16 through :func:`_compress_row`, the last ``< 16`` one by one."""
    rows = m // _ROW
    for row in range(rows):
        first = row * _ROW
        if above + _ROW <= cap:
            stored, same = _compress_row(keys, first, mask, bound, out_idx, out_raw, above, offset)
        else:  # out of slots: count only (the scan is redone)
            stored = 0
            same = 0
            for j in range(first, first + _ROW):
                key = keys[j] & mask
                stored += key > bound
                same += key == bound
        above += stored
        equal += same
    for j in range(rows * _ROW, m):
        key = keys[j] & mask
        if key > bound and above < cap:
            out_idx[above] = offset + j
            out_raw[above] = keys[j]
        above += key > bound
        equal += key == bound
    return above, equal


@njit(cache=True, nogil=True)
def _add_chunk(a, b, out, start, stop):
    """``out = a + b`` on ``[start, stop)``: the contract's ``add``, one rounding each."""
    xa = a[start:stop]
    xb = b[start:stop]
    xo = out[start:stop]
    for t in range(xo.size):
        xo[t] = xa[t] + xb[t]


@njit(cache=True, nogil=True, parallel=True)
def _add_all(a, b, out):
    n = out.size
    for c in prange(n_chunks(n, SCAN_CHUNK)):
        _add_chunk(a, b, out, c * SCAN_CHUNK, min(n, (c + 1) * SCAN_CHUNK))


_BLOCK = 2048
"""Elements of ``a + b`` computed, scanned and streamed out together (8-16 KiB: L1)."""


@njit(cache=True, nogil=True)
def _scan_chunk_of_sum(a, b, x, mask, bound, start, stop, cand_idx, cand_key, base, cap):
    """:func:`_scan_chunk` of ``x = a + b`` on ``[start, stop)``, writing ``x`` too.

    Block by block: the sum goes to a small buffer that stays in L1, is scanned there
    (the candidates exactly as :func:`_scan_chunk` stores them: ascending offsets within
    the chunk) and is then streamed to ``x`` (non-temporal stores: ``x``'s old contents
    are never read).  ``_BLOCK`` is a multiple of the row, so rows never straddle blocks.
    """
    block = np.empty(_BLOCK, dtype=x.dtype)
    block_bits = abs_bits(block)
    out_idx = cand_idx[base : base + cap]
    out_raw = cand_key[base : base + cap]
    mask = as_key(mask, block_bits)
    bound = as_key(bound, block_bits)
    above = 0
    equal = 0
    for s in range(start, stop, _BLOCK):
        m = min(stop, s + _BLOCK) - s
        xa = a[s : s + m]
        xb = b[s : s + m]
        for t in range(m):
            block[t] = xa[t] + xb[t]
        above, equal = _scan_keys(
            block_bits, m, s - start, mask, bound, out_idx, out_raw, cap, above, equal
        )
        stream_copy(block, x, s, m)
    store_fence()  # on this task's thread, before the parallel loop joins
    return above, equal


@njit(cache=True, nogil=True, parallel=True)
def _scan_sum(a, b, x, mask, bound, n, cand_idx, cand_key, cap, above, equal):
    """:func:`_scan` of ``x = a + b``, each block of the sum scanned while it is in
    cache and then streamed to ``x``: one pass over memory instead of an add and a scan,
    and no read of ``x``'s old contents."""
    for c in prange(above.size):
        start = c * SCAN_CHUNK
        stop = min(n, start + SCAN_CHUNK)
        above[c], equal[c] = _scan_chunk_of_sum(
            a, b, x, mask, bound, start, stop, cand_idx, cand_key, c * cap, cap
        )


@njit(cache=True, nogil=True, parallel=True)
def _scan(bits, mask, bound, n, cand_idx, cand_key, cap, above, equal):
    for c in prange(above.size):
        a = c * SCAN_CHUNK
        above[c], equal[c] = _scan_chunk(
            bits, mask, bound, a, min(n, a + SCAN_CHUNK), cand_idx, cand_key, c * cap, cap
        )


@njit(cache=True, nogil=True, parallel=True)
def _count_non_finite(cand_key, mask, inf, bound, cap, above, equal):
    """The non-finite keys of a completed scan: those stored (every key above ``bound``
    is), plus the keys equal to ``bound`` when ``bound`` is inf's key."""
    counts = np.zeros(above.size, dtype=np.int64)
    for c in prange(above.size):
        keys = cand_key[c * cap : c * cap + above[c]]
        count = 0
        for t in range(keys.size):
            count += (keys[t] & mask) >= inf
        counts[c] = count
    total = counts.sum()
    if bound == inf:
        total += equal.sum()
    return total


@njit(cache=True, nogil=True)
def _count_chunk_candidates(cand_key, mask, a, count, kth):
    greater = 0
    equal = 0
    keys = cand_key[a : a + count]
    for t in range(keys.size):
        key = keys[t] & mask
        if key > kth:
            greater += 1
        elif key == kth:
            equal += 1
    return greater, equal


@njit(cache=True, nogil=True)
def _write_from_candidates(
    cand_idx, cand_key, mask, chunk_start, a, count, kth, ties, out_indices, out_values, offset
):
    """Write a chunk's kept candidates; values come from the stored raw bits.

    ``cand_idx`` holds offsets within the chunk (int32: a chunk is 64K keys).
    """
    out_bits = abs_bits(out_values)
    p = offset
    raws = cand_key[a : a + count]
    where = cand_idx[a : a + count]
    for t in range(raws.size):
        key = raws[t] & mask
        if key > kth or (key == kth and ties > 0):
            if key == kth:
                ties -= 1
            out_indices[p] = chunk_start + where[t]
            out_bits[p] = raws[t]
            p += 1


@njit(cache=True, nogil=True)
def _write_from_data(x, bits, mask, a, b, kth, ties, out_indices, out_values, offset):
    p = offset
    part = bits[a:b]
    for t in range(part.size):
        i = a + t
        key = part[t] & mask
        if key > kth or (key == kth and ties > 0):
            if key == kth:
                ties -= 1
            out_indices[p] = i
            out_values[p] = x[i]
            p += 1


@njit(cache=True, nogil=True, parallel=True)
def _output(
    x, bits, mask, n, k, bound, kth, cand_idx, cand_key, cap, above, equal, out_indices, out_values
):
    """Write the k kept entries, ascending, ties at ``kth`` to the lowest indices."""
    nc = above.size
    greater = np.empty(nc, dtype=np.int64)
    ties = np.empty(nc, dtype=np.int64)
    if kth == bound:
        for c in range(nc):
            greater[c] = above[c]
            ties[c] = equal[c]
    else:
        for c in prange(nc):
            greater[c], ties[c] = _count_chunk_candidates(cand_key, mask, c * cap, above[c], kth)
    # Share the ties out in chunk order: the lowest indices win.
    left = k - greater.sum()
    offsets = np.empty(nc, dtype=np.int64)
    p = 0
    for c in range(nc):
        take = min(ties[c], left)
        left -= take
        ties[c] = take
        offsets[c] = p
        p += greater[c] + take
    for c in prange(nc):
        a = c * SCAN_CHUNK
        if kth == bound and ties[c] > 0:
            # Keys equal to the bound were counted, not stored: read the chunk again.
            _write_from_data(
                x,
                bits,
                mask,
                a,
                min(n, a + SCAN_CHUNK),
                kth,
                ties[c],
                out_indices,
                out_values,
                offsets[c],
            )
        else:
            _write_from_candidates(
                cand_idx,
                cand_key,
                mask,
                a,
                c * cap,
                above[c],
                kth,
                ties[c],
                out_indices,
                out_values,
                offsets[c],
            )


@njit(cache=True, nogil=True)
def _gather_keys(cand_key, mask, cap, above, out):
    """Concatenate the chunks' candidate keys (few: a sequential copy is enough)."""
    p = 0
    for c in range(above.size):
        a = c * cap
        for t in range(above[c]):
            out[p + t] = cand_key[a + t] & mask
        p += above[c]


@njit(cache=True, nogil=True, parallel=True)
def _keep_all_or_none(x, keep_all, out_indices, out_values):
    """``k == n`` or ``k == 0``: copy everything (or nothing), count non-finite entries."""
    n = x.size
    bits = abs_bits(x)
    mask = abs_mask(x)
    inf = inf_bits(x)
    nc = n_chunks(n, SCAN_CHUNK)
    counts = np.zeros(nc, dtype=np.int64)
    for c in prange(nc):
        a = c * SCAN_CHUNK
        part = bits[a : min(n, a + SCAN_CHUNK)]
        count = 0
        for t in range(part.size):
            count += (part[t] & mask) >= inf
        counts[c] = count
        if keep_all:
            for t in range(part.size):
                out_indices[a + t] = a + t
                out_values[a + t] = x[a + t]
    return counts.sum()


@njit(cache=True, nogil=True)
def _clear_kept(bits, indices, k):
    """Set the ``k`` kept entries to +0 (error feedback's residual keeps the rest)."""
    zero = as_key(0, bits)
    for j in range(k):
        bits[indices[j]] = zero


@njit(cache=True, nogil=True)
def _topk(x, k, out_indices, out_values, spare_idx, spare_key, a, b, fused):
    """The kernel behind :func:`topk`; ``spare_*`` are reusable candidate buffers.

    With ``fused``, ``x`` is first written as ``a + b`` (error feedback's compensated
    gradient), chunk by chunk inside the candidate pass, and ends with the kept entries
    set to +0 (the new residual); otherwise ``a`` and ``b`` are not read.  Returns
    ``(non_finite, spare_idx, spare_key)``: the spare buffers, grown if this call needed
    more, for the next call.
    """
    n = x.size
    bits = abs_bits(x)
    mask = abs_mask(x)
    inf = inf_bits(x)
    if k == 0 or k == n:
        if fused:
            _add_all(a, b, x)
        bad_all = _keep_all_or_none(x, k == n, out_indices, out_values)
        if fused:
            _clear_kept(bits, out_indices, k)
        return bad_all, spare_idx, spare_key
    nc = n_chunks(n, SCAN_CHUNK)
    above = np.empty(nc, dtype=np.int64)
    equal = np.empty(nc, dtype=np.int64)
    if fused:
        sample = _sample_keys_of_sum(a, b, mask, n, bits)
    else:
        sample = _sample_keys(bits, mask, n)
    bound, cap = _bound_of_sample(sample, n, k)
    bound = min(bound, inf)
    # Candidate slots: chunk c writes at c * cap, so no atomics.  Sized from the sample
    # and kept between calls: fresh pages (zeroed huge pages, with transparent huge
    # pages) would cost more than the scan itself.
    if spare_idx.size < nc * cap:
        spare_idx = np.empty(nc * cap, dtype=np.int32)
        spare_key = np.empty(nc * cap, dtype=bits.dtype)
    cand_idx = spare_idx
    cand_key = spare_key
    if fused:
        _scan_sum(a, b, x, mask, bound, n, cand_idx, cand_key, cap, above, equal)
    else:
        _scan(bits, mask, bound, n, cand_idx, cand_key, cap, above, equal)
    short = above.sum() + equal.sum() < k
    if short or above.max() > cap:
        if short:
            # The sample overshot: this bound has at least k keys at or above it.
            bound = min(_histogram_bound(bits, mask, n, k), inf)
        # Room for every key: a one-off, not kept.
        cap = SCAN_CHUNK
        cand_idx = np.empty(nc * cap, dtype=np.int32)
        cand_key = np.empty(nc * cap, dtype=bits.dtype)
        _scan(bits, mask, bound, n, cand_idx, cand_key, cap, above, equal)
    bad = _count_non_finite(cand_key, mask, inf, bound, cap, above, equal)
    total_above = above.sum()
    if total_above >= k:
        keys = np.empty(total_above, dtype=bits.dtype)
        _gather_keys(cand_key, mask, cap, above, keys)
        kth = kth_largest(keys, k)
    else:
        kth = bound
    _output(
        x,
        bits,
        mask,
        n,
        k,
        bound,
        kth,
        cand_idx,
        cand_key,
        cap,
        above,
        equal,
        out_indices,
        out_values,
    )
    if fused:
        _clear_kept(bits, out_indices, k)
    return bad, spare_idx, spare_key


_spare = threading.local()
"""Per-thread candidate buffers of :func:`topk`, by dtype (kernels release the GIL)."""


def topk(x: np.ndarray, k: int, out_indices: np.ndarray, out_values: np.ndarray) -> int:
    """Exact top-k of ``|x|``: ascending indices, ties to the lowest indices.

    Returns the number of non-finite entries of ``x`` (the caller raises when it is not
    zero).  See the module docstring for the algorithm.  The candidate buffers (a few
    percent of ``x``) are kept per thread and dtype between calls.
    """
    return _run_topk(x, k, out_indices, out_values, x, x, False)


def topk_of_sum(
    a: np.ndarray,
    b: np.ndarray,
    out_sum: np.ndarray,
    k: int,
    out_indices: np.ndarray,
    out_values: np.ndarray,
) -> int:
    """:func:`topk` of ``x = a + b``, and ``out_sum`` = ``x`` with the kept entries +0.

    Bit for bit ``add(a, b, out_sum)``, ``topk(out_sum, k, ...)`` and
    ``out_sum[out_indices] = 0``: error feedback's compensated gradient, its selection
    and its new residual, in one pass over memory: each block of the sum is scanned
    while it is in cache and streamed to ``out_sum``.  ``a``, ``b`` and ``out_sum`` are
    1-D C-contiguous of one dtype and size; ``out_sum`` must not overlap ``a`` or ``b``.
    A host-only fusion (not part of the kernel contract): the GPU path runs ``add`` and
    ``topk``.
    """
    if a.dtype != out_sum.dtype or b.dtype != out_sum.dtype:
        raise TypeError(
            f"a, b and out_sum must share one dtype, got {a.dtype}, {b.dtype}, {out_sum.dtype}"
        )
    if a.size != out_sum.size or b.size != out_sum.size:
        raise ValueError(
            f"a, b and out_sum must have one size, got {a.size}, {b.size}, {out_sum.size}"
        )
    if np.may_share_memory(out_sum, a) or np.may_share_memory(out_sum, b):
        raise ValueError("out_sum must not overlap a or b; pass a separate buffer")
    return _run_topk(out_sum, k, out_indices, out_values, a, b, True)


def _run_topk(x, k, out_indices, out_values, a, b, fused) -> int:
    """Call :func:`_topk` with this thread's candidate buffers for ``x.dtype``."""
    spares = getattr(_spare, "buffers", None)
    if spares is None:
        spares = _spare.buffers = {}
    key_dtype = np.uint32 if x.dtype == np.float32 else np.uint64
    spare_idx, spare_key = spares.get(
        x.dtype, (np.empty(0, dtype=np.int32), np.empty(0, dtype=key_dtype))
    )
    bad, spare_idx, spare_key = _topk(
        x, int(k), out_indices, out_values, spare_idx, spare_key, a, b, fused
    )
    spares[x.dtype] = (spare_idx, spare_key)
    return int(bad)
