"""Plain NumPy reference of every sparcomm kernel (see the contract in ``kernels/__init__.py``).

Each function has the signature of its Numba twin in ``kernels/cpu`` and writes the same
``out*`` buffers; the tests hold the fast kernels to these bit for bit, and ``sparcomm
bench codecs`` measures them as the "plain NumPy" peer.  They are vectorised NumPy (no
Python loop per element) but make no effort to be fast: padded per-bucket matrices,
full-size temporaries, a stable argsort for top-k.

References
----------
D. Alistarh et al., "QSGD: Communication-efficient SGD via gradient quantization and
encoding", NeurIPS 2017.  W. Wen et al., "TernGrad: Ternary gradients to reduce
communication in distributed deep learning", NeurIPS 2017.  F. Seide et al., "1-bit
stochastic gradient descent and its application to data-parallel distributed training of
speech DNNs", Interspeech 2014.
"""

from __future__ import annotations

import numpy as np
from sparcomm.kernels._checks import check_accumulate, check_divisor

from sparcomm._random import uniform_reference

LANES = 8
"""Number of float64 lanes of the deterministic bucket sum (``lane_sum``)."""


def _abs_bits(x: np.ndarray) -> np.ndarray:
    """``|x|`` as its bit pattern (sign bit cleared), uint32 or uint64: monotone in |x|."""
    if x.dtype == np.float32:
        return x.view(np.uint32) & np.uint32(0x7FFFFFFF)
    return x.view(np.uint64) & np.uint64(0x7FFFFFFFFFFFFFFF)


def _inf_bits(x: np.ndarray) -> int:
    """Bit pattern of +inf for ``x.dtype``: abs bits at or above it are inf or NaN."""
    return 0x7F800000 if x.dtype == np.float32 else 0x7FF0000000000000


def _buckets(v: np.ndarray, bucket: int, fill: float = 0) -> np.ndarray:
    """``v`` padded with ``fill`` to whole buckets, as an ``(nb, bucket)`` matrix."""
    nb = -(-v.size // bucket)
    padded = np.full(nb * bucket, fill, dtype=v.dtype)
    padded[: v.size] = v
    return padded.reshape(nb, bucket)


def _bucket_of(n: int, bucket: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) // bucket


def lane_sum(values: np.ndarray, bucket: int) -> np.ndarray:
    """Per-bucket deterministic sum of ``values`` (float64), in the contract's lane order.

    Lane ``j`` of a bucket adds its elements ``j, j+8, ...`` in order (``cumsum`` is a
    strictly sequential accumulation), starting from +0.0; the lanes are combined as
    ``((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))``.
    """
    values = values.astype(np.float64, copy=False)
    width = -(-bucket // LANES) * LANES
    rows = _buckets(values, bucket)
    if width != bucket:
        rows = np.concatenate([rows, np.zeros((rows.shape[0], width - bucket))], axis=1)
    lanes = rows.reshape(rows.shape[0], width // LANES, LANES)
    # Adding +0.0 turns an all-(-0.0) lane into +0.0, as a lane that starts at +0.0 does.
    sums = np.cumsum(lanes, axis=1)[:, -1, :] + 0.0
    return ((sums[:, 0] + sums[:, 1]) + (sums[:, 2] + sums[:, 3])) + (
        (sums[:, 4] + sums[:, 5]) + (sums[:, 6] + sums[:, 7])
    )


def stream_read(x: np.ndarray) -> float:
    """Sum of ``x``: one read of the buffer."""
    return float(np.sum(x))


def uniform(stream: int, start: int, out: np.ndarray) -> None:
    """``out[i] = u(stream, start + i)``, the contract's 24-bit uniform, as float64."""
    index = np.arange(start, start + out.size, dtype=np.uint64)
    out[:] = uniform_reference(stream, index)


def pack_bits(fields: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Pack ``bits``-wide fields LSB-first into ``out`` (``ceil(n*bits/8)`` bytes).

    Bits of a field above ``bits`` are ignored.
    """
    shifts = np.arange(bits, dtype=np.uint8)
    stream = ((fields[:, None] >> shifts) & np.uint8(1)).reshape(-1)
    out[:] = np.packbits(stream, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Inverse of :func:`pack_bits`: ``out`` (uint8, length n) receives the fields."""
    n = out.size
    stream = np.unpackbits(packed, count=n * bits, bitorder="little").reshape(n, bits)
    weights = (1 << np.arange(bits)).astype(np.uint8)
    out[:] = (stream * weights).sum(axis=1, dtype=np.uint8)


def topk(x: np.ndarray, k: int, out_indices: np.ndarray, out_values: np.ndarray) -> int:
    """Exact top-k of ``|x|`` by a stable sort: ties go to the lowest indices."""
    bits = _abs_bits(x)
    if k > 0:
        # ~bits sorts descending in |x|; a stable sort keeps equal keys in index order.
        order = np.argsort(~bits, kind="stable")[:k]
        order.sort()
        out_indices[:] = order
        out_values[:] = x[order]
    return int(np.count_nonzero(bits >= _inf_bits(x)))


def scatter_add(indices: np.ndarray, values: np.ndarray, out: np.ndarray) -> None:
    """``out[indices[j]] += values[j]``, duplicates summed in order of ``j``."""
    np.add.at(out, indices, values)


def max_abs(x: np.ndarray, bucket: int, out: np.ndarray) -> None:
    """``out[b] = max |x_i|`` over bucket ``b`` (over the bit pattern: NaN beats inf)."""
    bits = _buckets(_abs_bits(x), bucket).max(axis=1)
    out[:] = bits.view(x.dtype)


def qsgd_encode(
    x: np.ndarray,
    levels: int,
    bits: int,
    bucket: int,
    norm: int,
    stream: int,
    out_scales: np.ndarray,
    out_packed: np.ndarray,
) -> None:
    """QSGD stochastic rounding to ``levels`` levels of ``|x| / scale`` (Alistarh et al.)."""
    dtype = x.dtype.type
    if norm == 0:
        scales = np.sqrt(lane_sum(x.astype(np.float64) * x, bucket)).astype(x.dtype)
    else:
        scales = np.empty(out_scales.size, dtype=x.dtype)
        max_abs(x, bucket, scales)
    out_scales[:] = scales
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(scales == 0, dtype(0), dtype(levels) / scales).astype(x.dtype)
        t = np.abs(x) * inv[_bucket_of(x.size, bucket)]
        low = np.floor(t)
        u = uniform_reference(stream, np.arange(x.size, dtype=np.uint64))
        level = low + (u < t - low)
        # NaN fails the comparison and is clamped too, so the field is always defined.
        level = np.where(level <= levels, level, dtype(levels))
    fields = (level.astype(np.uint8) << np.uint8(1)) | (x < 0)
    pack_bits(fields, bits, out_packed)


def _store(decoded: np.ndarray, out: np.ndarray, accumulate: int) -> None:
    """``out = decoded``, ``out += decoded`` or ``out -= decoded``: the contract's
    ``add`` / ``subtract`` with ``out`` in place, so fused decodes are held to them."""
    if accumulate == 0:
        out[:] = decoded
    elif accumulate == 1:
        add(out, decoded, out)
    else:
        subtract(out, decoded, out)


def qsgd_decode(
    packed: np.ndarray,
    scales: np.ndarray,
    levels: int,
    bits: int,
    bucket: int,
    out: np.ndarray,
    accumulate: int = 0,
) -> None:
    """``d_i = ±(level_i * (scale_b / levels))`` from the packed QSGD fields, stored into
    ``out`` (``accumulate`` 0), added to it (1) or subtracted from it (-1)."""
    accumulate = check_accumulate(accumulate)
    fields = np.empty(out.size, dtype=np.uint8)
    unpack_bits(packed, bits, fields)
    step = scales.astype(out.dtype) / out.dtype.type(levels)
    with np.errstate(invalid="ignore"):  # 0 * inf (an inf scale) is NaN: a result here
        magnitude = (fields >> np.uint8(1)).astype(out.dtype) * step[_bucket_of(out.size, bucket)]
    _store(np.where(fields & np.uint8(1), -magnitude, magnitude), out, accumulate)


def terngrad_encode(
    x: np.ndarray,
    scales: np.ndarray,
    bucket: int,
    clip: float,
    stream: int,
    out_packed: np.ndarray,
) -> None:
    """TernGrad stochastic ternarisation with per-bucket scales (Wen et al.)."""
    s = scales.astype(x.dtype)[_bucket_of(x.size, bucket)]
    a = np.minimum(np.abs(x), x.dtype.type(clip))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = a / s
    u = uniform_reference(stream, np.arange(x.size, dtype=np.uint64))
    keep = (u < p) & (s != 0)
    codes = np.where(keep & (x > 0), 1, np.where(keep & (x < 0), 2, 0)).astype(np.uint8)
    pack_bits(codes, 2, out_packed)


def terngrad_decode(
    packed: np.ndarray, scales: np.ndarray, bucket: int, out: np.ndarray, accumulate: int = 0
) -> None:
    """Code 1 -> ``+s_b``, 2 -> ``-s_b``, 0 and 3 -> 0; ``accumulate`` as in qsgd_decode."""
    accumulate = check_accumulate(accumulate)
    codes = np.empty(out.size, dtype=np.uint8)
    unpack_bits(packed, 2, codes)
    s = scales.astype(out.dtype)[_bucket_of(out.size, bucket)]
    decoded = np.where(codes == 1, s, np.where(codes == 2, -s, out.dtype.type(0)))
    _store(decoded, out, accumulate)


def onebit_encode(
    x: np.ndarray, bucket: int, out_packed: np.ndarray, out_means: np.ndarray
) -> None:
    """1-bit SGD: sign bits and the two per-bucket reconstruction means (Seide et al.)."""
    negative = x < 0
    pack_bits(negative.astype(np.uint8), 1, out_packed)
    x64 = x.astype(np.float64)
    sum0 = lane_sum(np.where(negative, 0.0, x64), bucket)
    sum1 = lane_sum(np.where(negative, x64, 0.0), bucket)
    sums = np.stack([sum0, sum1], axis=1)
    count1 = _buckets(negative, bucket).sum(axis=1)
    count0 = _buckets(~negative, bucket, fill=False).sum(axis=1)
    counts = np.stack([count0, count1], axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = np.where(counts > 0, sums / counts, 0.0)
    out_means[:] = means.reshape(-1).astype(x.dtype)


def onebit_decode(
    packed: np.ndarray, means: np.ndarray, bucket: int, out: np.ndarray, accumulate: int = 0
) -> None:
    """``d_i = means[2b + bit_i]``; ``accumulate`` as in :func:`qsgd_decode`."""
    accumulate = check_accumulate(accumulate)
    bit = np.empty(out.size, dtype=np.uint8)
    unpack_bits(packed, 1, bit)
    _store(means.astype(out.dtype)[2 * _bucket_of(out.size, bucket) + bit], out, accumulate)


def add(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = a[i] + b[i]``, rounded to nearest in ``a.dtype``; ``out`` may be a or b."""
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are results here
        np.add(a, b, out=out)


def subtract(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = a[i] - b[i]``, rounded to nearest in ``a.dtype``; ``out`` may be a or b."""
    with np.errstate(over="ignore", invalid="ignore"):
        np.subtract(a, b, out=out)


STD_BLOCK = 1 << 14
"""Elements per block of the contract's ``std`` (fixed: independent of device and threads)."""


def _sequential_sum(values: np.ndarray) -> float:
    """``((0.0 + v0) + v1) + ...``: float64 additions one after another, in order."""
    total = 0.0
    for value in values.tolist():  # Python floats are IEEE float64
        total += value
    return total


def std(x: np.ndarray) -> float:
    """Population standard deviation of ``x`` in the contract's order (two passes).

    Block sums ``lane_sum`` over blocks of :data:`STD_BLOCK` elements, added in block
    order; first of ``float64(x)`` (the mean), then of ``(float64(x) - mean)**2``.
    Raises ValueError for an empty ``x``; NaN and inf in ``x`` give NaN.
    """
    n = x.size
    if n == 0:
        raise ValueError("std of an empty array is undefined (n = 0); pass at least one element")
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf propagate
        mean = _sequential_sum(lane_sum(x64, STD_BLOCK)) / n
        centered = x64 - mean
        variance = _sequential_sum(lane_sum(centered * centered, STD_BLOCK)) / n
        return float(np.sqrt(np.float64(variance)))  # IEEE sqrt, correctly rounded


def divide_scalar(x: np.ndarray, divisor: float, out: np.ndarray) -> None:
    """``out[i] = x[i] / x.dtype(divisor)``, one rounding in ``x.dtype``; ``out`` may be x."""
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        np.divide(x, x.dtype.type(check_divisor(divisor)), out=out)


def _count_non_finite_half(half: np.ndarray) -> int:
    """Entries of a float16 array whose exponent field is all ones (inf or NaN)."""
    return int(np.count_nonzero((half.view(np.uint16) & np.uint16(0x7C00)) == 0x7C00))


def fp16_encode(x: np.ndarray, out: np.ndarray) -> int:
    """``out[i] = float16(x[i])``, IEEE round to nearest even: NumPy's ``astype``.

    Returns the number of non-finite outputs (NaN, inf, or an overflow beyond ±65504).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is counted instead
        out[:] = x.astype(np.float16)
    return _count_non_finite_half(out)


def fp16_decode(half: np.ndarray, out: np.ndarray, accumulate: int = 0) -> None:
    """``d_i = out.dtype(half[i])`` (exact), stored, added or subtracted by ``accumulate``."""
    accumulate = check_accumulate(accumulate)
    _store(half.astype(out.dtype), out, accumulate)


def copy_finite(x: np.ndarray, out: np.ndarray) -> int:
    """``out[i] = x[i]``; returns the number of non-finite entries of ``x``."""
    out[:] = x
    return int(np.count_nonzero(_abs_bits(x) >= _inf_bits(x)))


# ------------------------------------------------------ merges (beyond the contract)


def merge_streams(
    indices: np.ndarray, values: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The merge of ``s`` sorted streams stored back to back, as new arrays.

    Stream ``t`` is ``indices[offsets[t]:offsets[t + 1]]``; streams merge as the fixed
    pairwise tree ``((s0 + s1) + (s2 + s3)) + ...`` (an odd last stream carried up
    unchanged) of ``kernels/cpu/merge.py``, so the bits are the kernels'.
    """
    streams = [
        (indices[offsets[t] : offsets[t + 1]], values[offsets[t] : offsets[t + 1]])
        for t in range(len(offsets) - 1)
    ]
    if not streams:
        return indices[:0].copy(), values[:0].copy()
    while len(streams) > 1:
        merged = []
        for p in range(0, len(streams) - 1, 2):
            (ai, av), (bi, bv) = streams[p], streams[p + 1]
            # A stable sort puts a's entry before b's for an equal index, so the run sum
            # below is a + b, as in the kernel.
            both_indices = np.concatenate([ai, bi])
            order = np.argsort(both_indices, kind="stable")
            merged.append(_sum_runs_of_two(both_indices[order], np.concatenate([av, bv])[order]))
        if len(streams) % 2:
            merged.append(streams[-1])
        streams = merged
    return np.array(streams[0][0]), np.array(streams[0][1])


def _sum_runs_of_two(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum runs of at most two equal indices (one from each operand): ``a + b``."""
    if indices.size == 0:
        return indices.copy(), values.copy()
    starts = np.flatnonzero(np.r_[True, indices[1:] != indices[:-1]])
    return indices[starts], np.add.reduceat(values, starts)


def merge_sum_two(
    a_indices: np.ndarray,
    a_values: np.ndarray,
    b_indices: np.ndarray,
    b_values: np.ndarray,
    out_indices: np.ndarray,
    out_values: np.ndarray,
) -> int:
    """Merge two strictly ascending streams, ``a + b`` at shared indices; the count."""
    merged_indices, merged_values = merge_streams(
        np.concatenate([a_indices, b_indices]),
        np.concatenate([a_values, b_values]),
        np.array([0, a_indices.size, a_indices.size + b_indices.size]),
    )
    count = merged_indices.size
    out_indices[:count] = merged_indices
    out_values[:count] = merged_values
    return count


def merge_sum_streams(
    indices: np.ndarray,
    values: np.ndarray,
    offsets: np.ndarray,
    out_indices: np.ndarray,
    out_values: np.ndarray,
    work_indices: np.ndarray,
    work_values: np.ndarray,
) -> int:
    """:func:`merge_streams` into ``out_*`` (``work_*`` unused); the merged count."""
    merged_indices, merged_values = merge_streams(indices, values, offsets)
    count = merged_indices.size
    out_indices[:count] = merged_indices
    out_values[:count] = merged_values
    return count
