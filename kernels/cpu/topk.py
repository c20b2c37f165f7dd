"""Exact top-k of ``|x|`` by radix select over the float bit pattern.

Clearing the sign bit of an IEEE float leaves an unsigned integer that is monotone in
``|x|`` (``-0.0`` and ``+0.0`` both map to 0; inf and NaN sit above every finite value),
so selection runs on integers and never sorts.  Steps, for ``0 < k < n``:

1. **Bound.**  The exact ``r``-th largest key of a strided sample of ``S`` keys
   (``r`` = the sample's expected count above the k-th largest, plus four standard
   deviations) is a threshold ``T`` a little below the true k-th largest key.  For
   ``n <= S`` the sample is all of ``x`` and ``T`` is exact.
2. **One pass.**  Parallel chunks stream ``x`` once: each block of 64 keys is compared
   with ``T`` into a bit mask by vector compares, and only the set bits are visited: the
   keys above ``T`` are stored with their indices, those equal to ``T`` (and the
   non-finite ones) counted.
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

import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros

from ._common import abs_bits, abs_mask, as_key, inf_bits, n_chunks

SCAN_CHUNK = 1 << 16
"""Elements per parallel task of the candidate pass."""
SAMPLE = 1 << 16
"""Keys in the strided sample that bounds the threshold."""
BLOCK = 64
"""Keys compared with the threshold into one 64-bit mask."""
_MASKS = 64
_UNROLLED = 2
"""Masks computed before their set bits are visited (64 * 64 keys: 16 KB of float32)."""
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
    work = keys.copy()
    m = work.size
    need = r
    shift = max(spread - RADIX_BITS, 0)
    digit_mask = np.uint64(_DIGITS - 1)
    hist = np.zeros(_DIGITS, dtype=np.int64)
    while True:
        s = np.uint64(shift)
        for d in range(_DIGITS):
            hist[d] = 0
        for t in range(m):
            hist[np.int64((np.uint64(work[t]) >> s) & digit_mask)] += 1
        d = _DIGITS - 1
        above = 0
        while above + hist[d] < need:
            above += hist[d]
            d -= 1
        need -= above
        j = 0
        for t in range(m):
            if np.int64((np.uint64(work[t]) >> s) & digit_mask) == d:
                work[j] = work[t]
                j += 1
        m = j
        if shift == 0:
            return work[0]
        shift = max(shift - RADIX_BITS, 0)


@njit(cache=True, nogil=True)
def _sample_bound(bits, mask, n, k):
    """A threshold key at or below the k-th largest, from a strided sample (usually).

    Returns the bound and a capacity per scan chunk for the candidates above it.
    """
    size = min(n, SAMPLE)
    stride = n // size
    sample = np.empty(size, dtype=bits.dtype)
    # Serial on purpose: 64K strided loads take ~0.1 ms, less than waking the threads
    # costs on a busy machine.
    for j in range(size):
        sample[j] = bits[j * stride] & mask
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


@njit(cache=True, nogil=True)
def _take(part, mask, bound, inf, j, valid, a, out_idx, out_raw, above, equal, bad):
    """Branch-free bookkeeping of key ``j``: always written, kept only if above.

    The raw bits (sign included) are stored, so the output needs no gather from ``x``.
    ``valid`` False makes the step a no-op.  The slot is clamped to the chunk's
    capacity: a chunk that overflows keeps counting, and the caller, seeing
    ``above > capacity``, scans again with room for every key.
    """
    raw = part[j]
    key = raw & mask
    slot = min(above, out_idx.size - 1)
    out_idx[slot] = a + j
    out_raw[slot] = raw
    above += valid & (key > bound)
    equal += valid & (key == bound)
    bad += valid & (key >= inf)
    return above, equal, bad


@njit(cache=True, nogil=True)
def _scan_chunk(bits, mask, bound, inf, a, b, cand_idx, cand_key, base, cap):
    """Store the keys above ``bound`` in ``[a, b)`` at ``cand_*[base:base+cap]``.

    Returns ``(above, equal, non_finite)``; non-finite keys are counted only when they are
    at least ``bound`` (the caller keeps ``bound <= inf``, so that is all of them).
    Each block of 64 keys is compared with ``bound`` into a 64-bit mask (vector compares
    into mask registers), and only its set bits are visited.  Loops run over slices
    indexed from 0, so Numba omits its negative-index test, which would turn the loads
    into gathers.
    """
    part = bits[a:b]
    out_idx = cand_idx[base : base + cap]
    out_key = cand_key[base : base + cap]
    # Keys visited: those >= bound, except that with bound 0 (a gradient that is mostly
    # zeros) only the non-zero ones are visited and the zeros are counted by subtraction.
    one = mask & np.uint8(1)  # 1 in the key's unsigned type
    visit = one if bound == 0 else bound
    above = 0
    equal = 0
    bad = 0
    blocks = part.size // BLOCK
    masks = np.empty(_MASKS, dtype=np.uint64)
    for group in range(0, blocks, _MASKS):
        count = min(_MASKS, blocks - group)
        # Pass 1, branch-free: the masks of a few KB of keys.  Keeping the data-dependent
        # branches of pass 2 out of this loop lets the core stream memory at full speed.
        for m in range(count):
            first = (group + m) * BLOCK
            hits = np.uint64(0)
            for j in range(BLOCK):
                hits |= np.uint64((part[first + j] & mask) >= visit) << np.uint64(j)
            masks[m] = hits
        # Pass 2: visit the set bits, the keys now in L1.  The first few of a mask are
        # taken without branching (an empty step is a no-op on the last key); only a
        # mask with more set bits than that loops (rare at the densities top-k serves).
        for m in range(count):
            hits = masks[m]
            first = (group + m) * BLOCK
            last = first + BLOCK - 1
            for _ in range(_UNROLLED):
                j = min(first + np.int64(trailing_zeros(hits)), last)
                above, equal, bad = _take(
                    part, mask, bound, inf, j, hits != 0, a, out_idx, out_key, above, equal, bad
                )
                hits &= hits - np.uint64(1)
            while hits:
                j = first + np.int64(trailing_zeros(hits))
                hits &= hits - np.uint64(1)
                above, equal, bad = _take(
                    part, mask, bound, inf, j, True, a, out_idx, out_key, above, equal, bad
                )
    for j in range(blocks * BLOCK, part.size):
        if (part[j] & mask) >= visit:
            above, equal, bad = _take(
                part, mask, bound, inf, j, True, a, out_idx, out_key, above, equal, bad
            )
    if bound == 0:
        equal = part.size - above
    return above, equal, bad


@njit(cache=True, nogil=True, parallel=True)
def _scan(bits, mask, bound, inf, n, cand_idx, cand_key, cap, above, equal, bad):
    for c in prange(above.size):
        a = c * SCAN_CHUNK
        above[c], equal[c], bad[c] = _scan_chunk(
            bits, mask, bound, inf, a, min(n, a + SCAN_CHUNK), cand_idx, cand_key, c * cap, cap
        )


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
    cand_idx, cand_key, mask, a, count, kth, ties, out_indices, out_values, offset
):
    """Write a chunk's kept candidates; values come from the stored raw bits."""
    out_bits = abs_bits(out_values)
    p = offset
    raws = cand_key[a : a + count]
    where = cand_idx[a : a + count]
    for t in range(raws.size):
        key = raws[t] & mask
        if key > kth or (key == kth and ties > 0):
            if key == kth:
                ties -= 1
            out_indices[p] = where[t]
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
def topk(x, k, out_indices, out_values):
    """Exact top-k of ``|x|``: ascending indices, ties to the lowest indices.

    Returns the number of non-finite entries of ``x`` (the caller raises when it is not
    zero).  See the module docstring for the algorithm.
    """
    n = x.size
    bits = abs_bits(x)
    mask = abs_mask(x)
    inf = inf_bits(x)
    if k == 0 or k == n:
        return _keep_all_or_none(x, k == n, out_indices, out_values)
    nc = n_chunks(n, SCAN_CHUNK)
    above = np.empty(nc, dtype=np.int64)
    equal = np.empty(nc, dtype=np.int64)
    bad = np.empty(nc, dtype=np.int64)
    bound, cap = _sample_bound(bits, mask, n, k)
    bound = min(bound, inf)
    # Candidate slots: chunk c writes at c * cap, so no atomics.  Sized from the sample,
    # they stay small enough for malloc to reuse between calls: fresh pages (zeroed huge
    # pages, with transparent huge pages) would cost more than the scan itself.
    cand_idx = np.empty(nc * cap, dtype=np.int64)
    cand_key = np.empty(nc * cap, dtype=bits.dtype)
    _scan(bits, mask, bound, inf, n, cand_idx, cand_key, cap, above, equal, bad)
    short = above.sum() + equal.sum() < k
    if short or above.max() > cap:
        if short:
            # The sample overshot: this bound has at least k keys at or above it.
            bound = min(_histogram_bound(bits, mask, n, k), inf)
        cap = SCAN_CHUNK
        cand_idx = np.empty(nc * cap, dtype=np.int64)
        cand_key = np.empty(nc * cap, dtype=bits.dtype)
        _scan(bits, mask, bound, inf, n, cand_idx, cand_key, cap, above, equal, bad)
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
    return bad.sum()
