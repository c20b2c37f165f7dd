"""Test bodies shared by the real-GPU tests and the host-emulated ones.

Each case runs one kernel of the contract through ``kernels`` (the GPU kernel module, or
``GpuKernels`` on the emulated runtime) on device copies made by ``dev.put`` and holds
the result to ``sparcomm.kernels.reference`` -- bit for bit, except ``stream_read``
(a float sum in a different order).  Sizes are awkward on purpose: not multiples of the
bucket, of 8 fields, of a tile (block * 8 elements) or of a warp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from sparcomm.kernels import reference

SIZES = (1, 7, 9, 100, 1001, 3001)
STREAM = 0x0123_4567_89AB_CDEF


@dataclass
class Device:
    put: Callable[[np.ndarray], Any]
    get: Callable[[Any], np.ndarray]
    empty: Callable[[int, Any], Any]


def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.view(np.uint8).tobytes() == b.view(np.uint8).tobytes()
    )


def gradient_like(n: int, dtype: Any, seed: int = 0, specials: bool = True) -> np.ndarray:
    """Normal values over several magnitudes, with ties, zeros of both signs, subnormals."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * np.exp(rng.uniform(-6, 3, n))
    x = x.astype(dtype)
    if specials and n >= 9:
        x[::5] = x[1]  # ties (also at the top-k threshold)
        x[2] = -0.0
        x[3] = 0.0
        x[4] = -x[1]  # same |x|, other sign
        # Subnormals: a flush-to-zero build (CuPy's default) would change their bits.
        x[6] = 3 * np.finfo(dtype).smallest_subnormal
        x[7] = -77 * np.finfo(dtype).smallest_subnormal
    return x


def case_uniform(kernels: Any, dev: Device, start: int, n: int) -> None:
    out = dev.empty(n, np.float64)
    kernels.uniform(STREAM, start, out)
    expected = np.empty(n)
    reference.uniform(STREAM, start, expected)
    assert bitwise_equal(dev.get(out), expected)


def case_pack(kernels: Any, dev: Device, bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + n)
    fields = rng.integers(0, 256, n, dtype=np.uint8)  # high bits must be ignored
    nbytes = (n * bits + 7) // 8
    packed = dev.empty(nbytes, np.uint8)
    kernels.pack_bits(dev.put(fields), bits, packed)
    expected = np.empty(nbytes, np.uint8)
    reference.pack_bits(fields, bits, expected)
    assert bitwise_equal(dev.get(packed), expected)
    unpacked = dev.empty(n, np.uint8)
    kernels.unpack_bits(dev.put(expected), bits, unpacked)
    assert bitwise_equal(dev.get(unpacked), fields & np.uint8((1 << bits) - 1))


def case_topk(kernels: Any, dev: Device, x: np.ndarray, k: int, index_dtype: Any) -> None:
    indices = dev.empty(k, index_dtype)
    values = dev.empty(k, x.dtype)
    bad = kernels.topk(dev.put(x), k, indices, values)
    ref_indices = np.empty(k, index_dtype)
    ref_values = np.empty(k, x.dtype)
    ref_bad = reference.topk(x, k, ref_indices, ref_values)
    assert bad == ref_bad
    assert bitwise_equal(dev.get(indices), ref_indices)
    assert bitwise_equal(dev.get(values), ref_values)


def case_scatter_add(kernels: Any, dev: Device, indices: np.ndarray, dtype: Any) -> None:
    m = indices.size
    rng = np.random.default_rng(m)
    # Mixed magnitudes: a different summation order would change the bits.
    values = (rng.standard_normal(m) * 10.0 ** rng.integers(-8, 8, m)).astype(dtype)
    base = rng.standard_normal(int(indices.max(initial=0)) + 5).astype(dtype)
    out = dev.put(base)
    kernels.scatter_add(dev.put(indices), dev.put(values), out)
    expected = base.copy()
    reference.scatter_add(indices, values, expected)
    assert bitwise_equal(dev.get(out), expected)


def case_max_abs(kernels: Any, dev: Device, x: np.ndarray, bucket: int) -> None:
    nb = -(-x.size // bucket)
    out = dev.empty(nb, x.dtype)
    kernels.max_abs(dev.put(x), bucket, out)
    expected = np.empty(nb, x.dtype)
    reference.max_abs(x, bucket, expected)
    assert bitwise_equal(dev.get(out), expected)


def case_qsgd(
    kernels: Any, dev: Device, x: np.ndarray, levels: int, bucket: int, norm: int
) -> None:
    bits = int(levels).bit_length() + 1
    nb = -(-x.size // bucket)
    nbytes = (x.size * bits + 7) // 8
    scales, packed = dev.empty(nb, x.dtype), dev.empty(nbytes, np.uint8)
    kernels.qsgd_encode(dev.put(x), levels, bits, bucket, norm, STREAM, scales, packed)
    ref_scales, ref_packed = np.empty(nb, x.dtype), np.empty(nbytes, np.uint8)
    reference.qsgd_encode(x, levels, bits, bucket, norm, STREAM, ref_scales, ref_packed)
    assert bitwise_equal(dev.get(scales), ref_scales)
    assert bitwise_equal(dev.get(packed), ref_packed)
    out = dev.empty(x.size, x.dtype)
    kernels.qsgd_decode(dev.put(ref_packed), dev.put(ref_scales), levels, bits, bucket, out)
    expected = np.empty(x.size, x.dtype)
    reference.qsgd_decode(ref_packed, ref_scales, levels, bits, bucket, expected)
    assert bitwise_equal(dev.get(out), expected)


def case_terngrad(kernels: Any, dev: Device, x: np.ndarray, bucket: int, clip: float) -> None:
    nb = -(-x.size // bucket)
    scales = np.empty(nb, x.dtype)
    reference.max_abs(x, bucket, scales)
    scales = np.minimum(scales, x.dtype.type(clip))
    nbytes = (x.size * 2 + 7) // 8
    packed = dev.empty(nbytes, np.uint8)
    kernels.terngrad_encode(dev.put(x), dev.put(scales), bucket, clip, STREAM, packed)
    expected = np.empty(nbytes, np.uint8)
    reference.terngrad_encode(x, scales, bucket, clip, STREAM, expected)
    assert bitwise_equal(dev.get(packed), expected)
    out = dev.empty(x.size, x.dtype)
    kernels.terngrad_decode(dev.put(expected), dev.put(scales), bucket, out)
    ref_out = np.empty(x.size, x.dtype)
    reference.terngrad_decode(expected, scales, bucket, ref_out)
    assert bitwise_equal(dev.get(out), ref_out)


def case_onebit(kernels: Any, dev: Device, x: np.ndarray, bucket: int) -> None:
    nb = -(-x.size // bucket)
    nbytes = (x.size + 7) // 8
    packed, means = dev.empty(nbytes, np.uint8), dev.empty(2 * nb, x.dtype)
    kernels.onebit_encode(dev.put(x), bucket, packed, means)
    ref_packed, ref_means = np.empty(nbytes, np.uint8), np.empty(2 * nb, x.dtype)
    reference.onebit_encode(x, bucket, ref_packed, ref_means)
    assert bitwise_equal(dev.get(packed), ref_packed)
    assert bitwise_equal(dev.get(means), ref_means)
    out = dev.empty(x.size, x.dtype)
    kernels.onebit_decode(dev.put(ref_packed), dev.put(ref_means), bucket, out)
    expected = np.empty(x.size, x.dtype)
    reference.onebit_decode(ref_packed, ref_means, bucket, expected)
    assert bitwise_equal(dev.get(out), expected)


def case_stream_read(kernels: Any, dev: Device, x: np.ndarray) -> None:
    total = kernels.stream_read(dev.put(x))
    exact = float(np.sum(x.astype(np.float64)))
    # Float64 sums of n terms in two orders differ by at most ~2 n eps sum|x|.
    bound = 2 * x.size * np.finfo(np.float64).eps * float(np.abs(x.astype(np.float64)).sum())
    assert abs(total - exact) <= bound


def sorted_stream(n_range: int, m: int, seed: int, index_dtype: Any, dtype: Any):
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(n_range, size=m, replace=False)).astype(index_dtype)
    values = rng.standard_normal(m).astype(dtype)
    if m > 2:
        values[1] = -0.0  # a copied -0.0 must survive
    return indices, values


def merge_expected(a_i, a_v, b_i, b_v):
    """``a + b`` at shared indices, copies elsewhere (the CPU twin's semantics)."""
    both = np.union1d(a_i, b_i).astype(a_i.dtype)
    values = np.empty(both.size, a_v.dtype)
    in_a = np.isin(both, a_i)
    in_b = np.isin(both, b_i)
    pa = np.searchsorted(a_i, both)
    pb = np.searchsorted(b_i, both)
    only_a, only_b, shared = in_a & ~in_b, in_b & ~in_a, in_a & in_b
    values[only_a] = a_v[pa[only_a]]
    values[only_b] = b_v[pb[only_b]]
    values[shared] = a_v[pa[shared]] + b_v[pb[shared]]
    return both, values


def case_merge(kernels: Any, dev: Device, na: int, nb: int, index_dtype: Any, dtype: Any):
    a_i, a_v = sorted_stream(4 * (na + nb) + 1, na, na, index_dtype, dtype)
    b_i, b_v = sorted_stream(4 * (na + nb) + 1, nb, nb + 7, index_dtype, dtype)
    out_i = dev.empty(na + nb, index_dtype)
    out_v = dev.empty(na + nb, dtype)
    count = kernels.merge_sum_two(
        dev.put(a_i), dev.put(a_v), dev.put(b_i), dev.put(b_v), out_i, out_v
    )
    exp_i, exp_v = merge_expected(a_i, a_v, b_i, b_v)
    assert count == exp_i.size
    assert bitwise_equal(dev.get(out_i)[:count], exp_i)
    assert bitwise_equal(dev.get(out_v)[:count], exp_v)


def case_merge_streams(kernels: Any, dev: Device, lengths: list[int], index_dtype: Any, dtype):
    """``merge_sum_streams`` against the CPU twin's NumPy reference (same pairwise tree)."""
    from sparcomm.kernels.cpu.merge import merge_sum_streams_reference

    parts = [
        sorted_stream(3 * sum(lengths) + 1, m, 31 * t + m, index_dtype, dtype)
        for t, m in enumerate(lengths)
    ]
    indices = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, index_dtype)
    values = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    buffers = [
        dev.empty(total, index_dtype),
        dev.empty(total, dtype),
        dev.empty(total, index_dtype),
        dev.empty(total, dtype),
    ]
    count = kernels.merge_sum_streams(dev.put(indices), dev.put(values), offsets, *buffers)
    exp_i, exp_v = merge_sum_streams_reference(indices, values, offsets)
    assert count == exp_i.size
    assert bitwise_equal(dev.get(buffers[0])[:count], exp_i.astype(index_dtype))
    assert bitwise_equal(dev.get(buffers[1])[:count], exp_v.astype(dtype))


def values_equal(got: np.ndarray, want: np.ndarray) -> bool:
    """Bit for bit, except that a NaN matches any NaN.

    The contract leaves a NaN result's sign and payload open: x86 (NumPy) keeps an input
    NaN's payload and makes ``inf - inf`` a negative NaN, CUDA returns its canonical NaN.
    """
    got, want = np.ascontiguousarray(got), np.ascontiguousarray(want)
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    nan = np.isnan(want)
    return np.array_equal(np.isnan(got), nan) and bitwise_equal(got[~nan], want[~nan])


def elementwise_operands(n: int, dtype: Any, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)``: gradient-like values with special pairs at every third position.

    The pairs give subnormal sums and differences (from subnormal and from normal
    operands: a flush-to-zero build returns 0 for them), signed zeros (``-0 + -0`` is
    ``-0``, ``0 + -0`` is ``+0``), NaN and inf operands, ``inf - inf`` and overflow.
    """
    info = np.finfo(dtype)
    tiny, normal, big = info.smallest_subnormal, info.tiny, info.max
    pairs = np.array(
        [
            (3 * tiny, 2 * tiny),
            (3 * tiny, -5 * tiny),
            (1.5 * normal, -normal),  # a + b subnormal
            (1.5 * normal, normal),  # a - b subnormal
            (-1.25 * normal, 1.0 * normal),
            (0.0, -0.0),
            (-0.0, -0.0),
            (-0.0, 0.0),
            (np.nan, 1.0),
            (2.0, np.nan),
            (np.inf, -np.inf),
            (np.inf, np.inf),
            (-np.inf, 3.0),
            (big, big),  # overflow to inf
            (-big, big),
            (1.0, -1.0),
        ],
        dtype=dtype,
    )
    a = gradient_like(n, dtype, seed=seed)
    b = gradient_like(n, dtype, seed=seed + 1)
    slots = np.arange(0, n, 3)
    chosen = pairs[np.arange(slots.size) % len(pairs)]
    a[slots], b[slots] = chosen[:, 0], chosen[:, 1]
    return a, b


def _on_device(dev: Device, host: np.ndarray, offset: int) -> Any:
    """A device copy of ``host`` that starts ``offset`` elements into its allocation."""
    return dev.put(np.concatenate([np.zeros(offset, host.dtype), host]))[offset:]


def case_elementwise(
    kernels: Any,
    dev: Device,
    name: str,
    a: np.ndarray,
    b: np.ndarray,
    out_is: str = "new",
    offsets: tuple[int, int, int] = (0, 0, 0),
) -> None:
    """``add`` or ``subtract`` against the reference; ``out_is`` "new", "a" or "b".

    ``offsets`` (in elements, for a, b and a new out) move the operands off the 16-byte
    alignment of fresh allocations: equal offsets take the kernel's vector path after a
    short scalar head, unequal ones its all-scalar path.
    """
    n = a.size
    a_dev, b_dev = _on_device(dev, a, offsets[0]), _on_device(dev, b, offsets[1])
    if out_is == "a":
        out = a_dev
    elif out_is == "b":
        out = b_dev
    else:
        out = dev.empty(n + offsets[2], a.dtype)[offsets[2] :]
    getattr(kernels, name)(a_dev, b_dev, out)
    expected = np.empty(n, a.dtype)
    getattr(reference, name)(a, b, expected)
    assert values_equal(dev.get(out), expected)
    # The operands that are not out are read, never written.
    if out_is != "a":
        assert bitwise_equal(dev.get(a_dev), a)
    if out_is != "b":
        assert bitwise_equal(dev.get(b_dev), b)


# ------------------------------------------------------------------ fused decode + add

DECODERS = ("qsgd", "terngrad", "onebit")
"""Codecs whose decode kernel takes ``accumulate``."""


def decode_inputs(codec: str, x: np.ndarray, bucket: int) -> tuple[Any, ...]:
    """The reference encoding of ``x``: the arguments of ``{codec}_decode`` before ``out``.

    QSGD: 7 levels in 4 bits, L2 norm; TernGrad: max-abs scales, no clipping.
    """
    n, nb = x.size, -(-x.size // bucket)
    if codec == "qsgd":
        scales, packed = np.empty(nb, x.dtype), np.empty((n * 4 + 7) // 8, np.uint8)
        reference.qsgd_encode(x, 7, 4, bucket, 0, STREAM, scales, packed)
        return packed, scales, 7, 4, bucket
    if codec == "terngrad":
        scales, packed = np.empty(nb, x.dtype), np.empty((n * 2 + 7) // 8, np.uint8)
        reference.max_abs(x, bucket, scales)
        reference.terngrad_encode(x, scales, bucket, np.inf, STREAM, packed)
        return packed, scales, bucket
    packed, means = np.empty((n + 7) // 8, np.uint8), np.empty(2 * nb, x.dtype)
    reference.onebit_encode(x, bucket, packed, means)
    return packed, means, bucket


def accumulate_base(decoded: np.ndarray, seed: int) -> np.ndarray:
    """An ``out`` to decode into: gradient values with specials where the sum is delicate.

    Every fourth entry is a subnormal, a signed zero, an infinity or a NaN (subnormal
    and zero results, ``-0 + +0``, ``inf - inf``); entries ``i = 1 mod 7`` equal the
    decoded value and ``i = 2 mod 7`` its negation, so ``out - d`` and ``out + d`` are
    exact zeros there (+0.0, whatever the sign of d).
    """
    dtype = decoded.dtype
    info = np.finfo(dtype)
    tiny, normal = info.smallest_subnormal, info.tiny
    specials = np.array(
        [3 * tiny, -5 * tiny, 0.0, -0.0, np.inf, -np.inf, np.nan, 1.5 * normal, -normal],
        dtype=dtype,
    )
    base = gradient_like(decoded.size, dtype, seed=seed)
    slots = np.arange(0, decoded.size, 4)
    base[slots] = specials[np.arange(slots.size) % specials.size]
    base[1::7] = decoded[1::7]
    base[2::7] = -decoded[2::7]
    return base


def case_decode_accumulate(
    kernels: Any, dev: Device, codec: str, x: np.ndarray, bucket: int, accumulate: int
) -> None:
    """``{codec}_decode(..., out, accumulate)`` is bit for bit the decode into a separate
    buffer followed by ``add(out, d, out)`` / ``subtract(out, d, out)`` (NaN positions
    compared, not their payloads): against the reference's two steps, the reference's
    own fused call, and the kernels' own two steps on the device."""
    name = f"{codec}_decode"
    args = decode_inputs(codec, x, bucket)
    n = x.size
    decoded = np.empty(n, x.dtype)
    getattr(reference, name)(*args, decoded)
    base = accumulate_base(decoded, seed=n)
    op = "add" if accumulate > 0 else "subtract"
    if accumulate == 0:
        want = decoded.copy()
    else:
        want = base.copy()
        getattr(reference, op)(want, decoded, want)
    fused_reference = base.copy()
    getattr(reference, name)(*args, fused_reference, accumulate)
    assert values_equal(fused_reference, want)
    device_args = tuple(dev.put(a) if isinstance(a, np.ndarray) else a for a in args)
    out = dev.put(base)
    getattr(kernels, name)(*device_args, out, accumulate)
    got = dev.get(out)
    assert values_equal(got, want), f"{name} accumulate={accumulate} n={n} bucket={bucket}"
    if accumulate != 0:
        separate = dev.empty(n, x.dtype)
        getattr(kernels, name)(*device_args, separate)
        two_steps = dev.put(base)
        getattr(kernels, op)(two_steps, separate, two_steps)
        assert values_equal(got, dev.get(two_steps))


def case_decode_rejects_accumulate(kernels: Any, dev: Device, codec: str, n: int) -> None:
    """Every value but 0, 1 and -1 (ints) is a ValueError naming them; ``out`` untouched."""
    x = gradient_like(n, np.float32, seed=1)
    args = tuple(dev.put(a) if isinstance(a, np.ndarray) else a for a in decode_inputs(codec, x, 7))
    base = np.arange(n, dtype=np.float32)
    out = dev.put(base)
    for bad in (2, -2, 0.5, 1.0, True, "1", None, np.int64(3)):
        with pytest.raises(ValueError, match=r"accumulate must be 0 .*, 1 .* or -1 .*, got"):
            getattr(kernels, f"{codec}_decode")(*args, out, bad)
    assert bitwise_equal(dev.get(out), base)
    getattr(kernels, f"{codec}_decode")(*args, out, np.int64(-1))  # a NumPy int is fine
