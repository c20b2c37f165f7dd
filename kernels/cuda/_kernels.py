"""Launch logic of the CUDA kernels in ``kernels/cuda/*.cu``, independent of CuPy.

:class:`GpuKernels` implements the kernel contract of ``kernels/__init__.py`` in terms of
a small *runtime* (allocate, copy a few words to the host, compile and launch).
``sparcomm.kernels.gpu`` binds it to CuPy (``kernels/gpu/_runtime.py``); ``tests/gpu``
binds the same class to a host emulation of the CUDA sources, so the launch sequences,
grid shapes and kernels are tested bit for bit against the NumPy reference even where no
GPU exists.

This module imports only NumPy, the standard library and ``sparcomm.kernels._checks``, on
purpose: ``sparcomm.kernels.cuda`` imports without CuPy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sparcomm.kernels._checks import CONTRACT, EXTRA, check_accumulate, check_divisor

SOURCE_DIR = Path(__file__).resolve().parent
"""Directory of the ``*.cu`` sources and ``common.cuh``."""

ITEMS = 8
"""Elements per thread of the tiled kernels (``SC_ITEMS`` in ``common.cuh``)."""

MAX_BLOCK = 1024
"""Largest block size the sources' static shared arrays allow (``SC_MAX_BLOCK``)."""

TOPK_DIGIT_BITS = 11
"""Widest radix-select digit (``SC_TOPK_MAX_BINS`` = 2**11 shared-memory bins)."""

MAX_ABS_SEGMENT = 2048
"""Elements one warp reduces in ``sc_max_abs`` before meeting the others in atomicMax."""

_INCLUDE = re.compile(r'^#include "common\.cuh"$', re.MULTILINE)


def source_text(name: str) -> str:
    """The CUDA source ``name``.cu with ``common.cuh`` inlined.

    Inlining (rather than an include path) makes the compile cache key on the whole
    text, so an edit to the header is never served a stale binary.
    """
    common = (SOURCE_DIR / "common.cuh").read_text().replace("#pragma once\n", "")
    return _INCLUDE.sub(lambda _: common, (SOURCE_DIR / f"{name}.cu").read_text())


def compile_defines(real: np.dtype | None, index: np.dtype | None) -> list[str]:
    """Preprocessor definitions selecting the dtypes of one compiled variant."""
    return [
        f"-DSPARCOMM_FLOAT64={int(real is not None and np.dtype(real) == np.float64)}",
        f"-DSPARCOMM_INDEX64={int(index is not None and np.dtype(index) == np.int64)}",
        f"-DSC_ITEMS={ITEMS}",
    ]


def radix_passes(key_bits: int) -> list[tuple[int, int]]:
    """``(shift, digit_bits)`` of each radix-select pass, most significant digit first."""
    passes = []
    top = key_bits
    while top > 0:
        width = min(TOPK_DIGIT_BITS, top)
        top -= width
        passes.append((top, width))
    return passes


class Launcher(Protocol):
    def __call__(self, grid: int, block: int, args: tuple[Any, ...]) -> None: ...


class Runtime(Protocol):
    """What :class:`GpuKernels` needs from the device layer."""

    block: int
    """Threads per block (a multiple of 32, at most :data:`MAX_BLOCK`)."""

    @property
    def max_blocks(self) -> int:
        """Cap on the grid of the grid-stride kernels."""
        ...

    def function(
        self, source: str, name: str, real: np.dtype | None, index: np.dtype | None
    ) -> Launcher: ...

    def is_device_array(self, x: Any) -> bool: ...

    def empty(self, n: int, dtype: Any) -> Any: ...

    def zeros(self, n: int, dtype: Any) -> Any: ...

    def to_host(self, array: Any) -> np.ndarray: ...

    def argsort_stable(self, indices: Any) -> Any: ...


# ----------------------------------------------------------------------------- checks

_REALS = (np.dtype(np.float32), np.dtype(np.float64))
_INDICES = (np.dtype(np.int32), np.dtype(np.int64))
_HALF = np.dtype(np.float16)


def _nbytes_packed(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


class GpuKernels:
    """The kernel contract on a :class:`Runtime` (see ``kernels/__init__.py``).

    Every method checks shapes and dtypes on the host (no device work, no sync), so a
    wrong buffer raises instead of being written out of bounds.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    # ------------------------------------------------------------------ helpers

    def _array(self, name: str, a: Any, dtypes: Sequence[np.dtype], size: int | None) -> None:
        if not self.runtime.is_device_array(a):
            raise TypeError(
                f"{name} must be a cupy.ndarray on the GPU, got {type(a).__module__}."
                f"{type(a).__qualname__}; move it with cupy.asarray()"
            )
        if a.dtype not in dtypes:
            allowed = " or ".join(str(d) for d in dtypes)
            raise TypeError(f"{name} must have dtype {allowed}, got {a.dtype}; cast it first")
        if a.ndim != 1 or not a.flags.c_contiguous:
            raise ValueError(
                f"{name} must be 1-D and C-contiguous, got shape {a.shape}; "
                "pass cupy.ascontiguousarray(a).ravel()"
            )
        if size is not None and a.size != size:
            raise ValueError(f"{name} must have {size} elements, got {a.size}")

    @staticmethod
    def _positive(name: str, value: int, low: int = 1, high: int | None = None) -> int:
        value = int(value)
        if value < low or (high is not None and value > high):
            bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"{name} must be in {bounds}, got {value}")
        return value

    def _grid(self, work: int) -> int:
        """Blocks of a grid-stride kernel with ``work`` independent items."""
        return max(1, min(self.runtime.max_blocks, -(-work // self.runtime.block)))

    def _fn(self, source: str, name: str, real: Any = None, index: Any = None) -> Launcher:
        return self.runtime.function(
            source,
            name,
            None if real is None else np.dtype(real),
            None if index is None else np.dtype(index),
        )

    # ------------------------------------------------------------------ contract

    def stream_read(self, x: Any) -> float:
        """Sum of ``x`` read once, in parallel (float64, fixed order)."""
        self._array("x", x, _REALS, None)
        n = x.size
        block = self.runtime.block
        grid = self._grid(-(-n // 4))
        partial = self.runtime.empty(grid, np.float64)
        total = self.runtime.empty(1, np.float64)
        self._fn("reduce", "sc_stream_read_partial", x.dtype)(
            grid, block, (x, np.int64(n), partial)
        )
        self._fn("reduce", "sc_stream_read_final", x.dtype)(
            1, block, (partial, np.int64(grid), total)
        )
        return float(self.runtime.to_host(total)[0])

    def uniform(self, stream: int, start: int, out: Any) -> None:
        """``out[i] = u(stream, start + i)`` as float64."""
        self._array("out", out, (np.dtype(np.float64),), None)
        if out.size == 0:
            return
        self._fn("random", "sc_uniform")(
            self._grid(out.size),
            self.runtime.block,
            (np.uint64(stream), np.int64(start), np.int64(out.size), out),
        )

    def pack_bits(self, fields: Any, bits: int, out: Any) -> None:
        """Pack ``bits``-wide uint8 fields LSB-first into ``out``."""
        bits = self._positive("bits", bits, 1, 8)
        self._array("fields", fields, (np.dtype(np.uint8),), None)
        nbytes = _nbytes_packed(fields.size, bits)
        self._array("out", out, (np.dtype(np.uint8),), nbytes)
        if nbytes == 0:
            return
        self._fn("packing", "sc_pack_bits")(
            self._grid(nbytes),
            self.runtime.block,
            (fields, np.int64(fields.size), np.int32(bits), out, np.int64(nbytes)),
        )

    def unpack_bits(self, packed: Any, bits: int, out: Any) -> None:
        """Inverse of :meth:`pack_bits`; ``out`` (uint8) has one entry per field."""
        bits = self._positive("bits", bits, 1, 8)
        self._array("out", out, (np.dtype(np.uint8),), None)
        nbytes = _nbytes_packed(out.size, bits)
        self._array("packed", packed, (np.dtype(np.uint8),), nbytes)
        if out.size == 0:
            return
        self._fn("packing", "sc_unpack_bits")(
            self._grid(out.size),
            self.runtime.block,
            (packed, np.int64(out.size), np.int32(bits), out, np.int64(nbytes)),
        )

    def topk(self, x: Any, k: int, out_indices: Any, out_values: Any) -> int:
        """Exact top-k of ``|x|`` by radix select; returns the count of non-finite entries.

        Steps: (1) a histogram of the first digit of every key (the bits of ``|x|``,
        11-bit digits, most significant first) and a one-block select that fixes the
        digit and how many elements of that prefix are still wanted; (2) the keys sharing
        that digit are compacted (one host read sizes the buffer) and the remaining
        digits are resolved on them alone, fixing the threshold key ``T`` and the number
        of ties ``kt`` to keep; (3) per-tile counts of keys above / equal to ``T`` and
        their exclusive scans; (4) a stable compaction writing indices ascending, ties to
        the lowest indices.  ``x`` is read four times.
        """
        self._array("x", x, _REALS, None)
        n = x.size
        k = self._positive("k", k, 0, n)
        self._array("out_indices", out_indices, _INDICES, k)
        self._array("out_values", out_values, (x.dtype,), k)
        if n == 0:
            return 0
        rt = self.runtime
        block = rt.block

        def fn(name: str) -> Launcher:
            return self._fn("topk", name, x.dtype, out_indices.dtype)

        state = rt.zeros(4, np.uint64)
        hist = rt.zeros(1 << TOPK_DIGIT_BITS, np.uint64)
        fn("sc_topk_init")(1, 32, (state, np.int64(k)))
        passes = radix_passes(31 if x.dtype == np.float32 else 63)
        shift, width = passes[0]
        fn("sc_topk_histogram")(
            self._grid(n),
            block,
            (x, np.int64(n), np.int32(shift), np.int32(width), np.int32(1), state, hist),
        )
        if k == 0:  # the first pass counted the non-finite entries; nothing to select
            return int(rt.to_host(state)[2])
        fn("sc_topk_select")(1, block, (hist, np.int32(width), np.int32(shift), state))
        # Resolve the remaining digits on the elements that share the first digit only.
        # One host read sizes their buffer (usually a small fraction of n).
        m = int(rt.to_host(state)[3])
        keys = rt.empty(m, np.uint32 if x.dtype == np.float32 else np.uint64)
        counter = rt.zeros(1, np.uint64)
        fn("sc_topk_collect")(
            self._grid(-(-n // ITEMS)),
            block,
            (x, np.int64(n), np.int32(shift), state, keys, counter),
        )
        for shift, width in passes[1:]:
            fn("sc_topk_histogram_keys")(
                self._grid(m),
                block,
                (keys, np.int64(m), np.int32(shift), np.int32(width), state, hist),
            )
            fn("sc_topk_select")(1, block, (hist, np.int32(width), np.int32(shift), state))
        tiles = -(-n // (block * ITEMS))
        counts = rt.empty(2 * tiles, np.uint64)
        offsets = rt.empty(2 * tiles, np.uint64)
        totals = rt.empty(2, np.uint64)
        fn("sc_topk_count")(tiles, block, (x, np.int64(n), state, counts, np.int64(tiles)))
        fn("sc_scan_rows")(2, block, (counts, np.int64(tiles), np.int64(tiles), offsets, totals))
        fn("sc_topk_write")(
            tiles,
            block,
            (x, np.int64(n), state, offsets, np.int64(tiles), out_indices, out_values),
        )
        return int(rt.to_host(state)[2])

    def _index_flags(self, indices: Any, size: int, flags: Any) -> None:
        """Launch ``sc_check_indices``: out-of-range count, descents, repeats into flags."""
        if indices.size == 0:
            return
        self._fn("sparse", "sc_check_indices", None, indices.dtype)(
            self._grid(indices.size),
            self.runtime.block,
            (indices, np.int64(indices.size), np.int64(size), flags),
        )

    def scatter_add(self, indices: Any, values: Any, out: Any) -> None:
        """``out[indices[j]] += values[j]``, duplicates summed in order of ``j``.

        Deterministic: one pass classifies the indices (one device-to-host copy of three
        counters); ascending indices are added directly, one thread per run of equal
        indices; otherwise a stable argsort orders them first.  Raises ValueError for an
        index outside ``[0, out.size)`` (negative indices do not wrap).
        """
        self._array("out", out, _REALS, None)
        self._array("indices", indices, _INDICES, None)
        self._array("values", values, (out.dtype,), indices.size)
        m = indices.size
        if m == 0:
            return
        rt = self.runtime
        flags = rt.zeros(3, np.uint64)
        self._index_flags(indices, out.size, flags)
        outside, descents, _ = (int(v) for v in rt.to_host(flags))
        if outside:
            raise ValueError(
                f"scatter_add: {outside} of {m} indices lie outside [0, {out.size}); "
                "indices must address the dense buffer (negative indices do not wrap)"
            )
        if descents:
            order = rt.argsort_stable(indices)
            use_order = 1
        else:
            order = rt.zeros(1, np.int64)  # not read
            use_order = 0
        self._fn("sparse", "sc_scatter_add_runs", out.dtype, indices.dtype)(
            self._grid(m),
            rt.block,
            (indices, values, order, np.int32(use_order), np.int64(m), out),
        )

    def merge_sum_two(
        self,
        a_indices: Any,
        a_values: Any,
        b_indices: Any,
        b_values: Any,
        out_indices: Any,
        out_values: Any,
    ) -> int:
        """Merge two strictly ascending sparse streams, summing ``a + b`` at shared indices.

        Same result as ``kernels.cpu.merge.merge_sum_two``: an index in one stream only is
        copied; ``out_*`` need room for ``len(a) + len(b)`` entries; returns the merged
        count.  Raises ValueError when a stream is not strictly ascending.
        """
        self._array("a_values", a_values, _REALS, None)
        real = a_values.dtype
        self._array("a_indices", a_indices, _INDICES, a_values.size)
        index = a_indices.dtype
        self._array("b_indices", b_indices, (index,), None)
        self._array("b_values", b_values, (real,), b_indices.size)
        self._array("out_indices", out_indices, (index,), None)
        self._array("out_values", out_values, (real,), out_indices.size)
        na, nb = a_indices.size, b_indices.size
        if out_indices.size < na + nb:
            raise ValueError(
                f"out_indices/out_values need room for {na + nb} entries "
                f"(len(a) + len(b)), got {out_indices.size}"
            )
        if na + nb == 0:
            return 0
        rt = self.runtime
        block = rt.block
        tile = block * ITEMS
        tiles_a, tiles_b = -(-na // tile), -(-nb // tile)
        row = max(tiles_a, tiles_b)
        # info[0:3], info[3:6]: index flags of a and b; info[6:8]: match totals.
        info = rt.zeros(8, np.uint64)
        self._index_flags(a_indices, np.iinfo(np.int64).max, info[0:3])
        self._index_flags(b_indices, np.iinfo(np.int64).max, info[3:6])
        counts = rt.zeros(2 * row, np.uint64)
        offsets = rt.empty(2 * row, np.uint64)
        fn_count = self._fn("merge", "sc_merge_count", real, index)
        fn_count(
            tiles_a + tiles_b,
            block,
            (
                a_indices,
                np.int64(na),
                b_indices,
                np.int64(nb),
                np.int64(tiles_a),
                np.int64(row),
                counts,
            ),
        )
        self._fn("topk", "sc_scan_rows", real, index)(
            2, block, (counts, np.int64(row), np.int64(row), offsets, info[6:8])
        )
        self._fn("merge", "sc_merge_write", real, index)(
            tiles_a + tiles_b,
            block,
            (
                a_indices,
                a_values,
                np.int64(na),
                b_indices,
                b_values,
                np.int64(nb),
                np.int64(tiles_a),
                np.int64(row),
                offsets,
                out_indices,
                out_values,
            ),
        )
        host = rt.to_host(info)
        if host[1] or host[2] or host[4] or host[5]:
            raise ValueError(
                "merge_sum_two needs strictly ascending indices in both streams "
                f"(a: {int(host[1])} descents, {int(host[2])} repeats; b: {int(host[4])} "
                f"descents, {int(host[5])} repeats); coalesce them first"
            )
        return int(na + nb - host[6])

    def merge_sum_streams(
        self,
        indices: Any,
        values: Any,
        offsets: Any,
        out_indices: Any,
        out_values: Any,
        work_indices: Any,
        work_values: Any,
    ) -> int:
        """Merge ``s`` sorted streams stored back to back, summing equal indices.

        The GPU twin of ``kernels.cpu.merge.merge_sum_streams``, with the same fixed
        pairwise tree ``((s0 + s1) + (s2 + s3)) + ...`` (an odd last stream carried up
        unchanged), so the bits equal the CPU's.  Stream ``t`` is
        ``indices[offsets[t]:offsets[t + 1]]``; ``offsets`` (host or device, ``s + 1``
        entries) is read on the host.  ``out_*`` and ``work_*`` hold ``offsets[s]``
        entries each; returns the merged count ``K`` (the result is ``out_*[:K]``).
        Each pairwise merge reads its count back (``s - 1`` small host reads).
        """
        rt = self.runtime
        host = rt.to_host(offsets) if rt.is_device_array(offsets) else np.asarray(offsets)
        bounds = np.asarray(host, dtype=np.int64).reshape(-1)
        if bounds.size == 0 or bounds[0] != 0 or bool((np.diff(bounds) < 0).any()):
            raise ValueError(
                f"offsets must start at 0 and never decrease, got {bounds[:8].tolist()}"
            )
        starts = [int(v) for v in bounds]
        self._array("values", values, _REALS, None)
        self._array("indices", indices, _INDICES, values.size)
        total = starts[-1]
        if total > indices.size:
            raise ValueError(f"offsets[-1] = {total} exceeds the {indices.size} entries given")
        for name, a, dtypes in (
            ("out_indices", out_indices, (indices.dtype,)),
            ("out_values", out_values, (values.dtype,)),
            ("work_indices", work_indices, (indices.dtype,)),
            ("work_values", work_values, (values.dtype,)),
        ):
            self._array(name, a, dtypes, None)
            if a.size < total:
                raise ValueError(f"{name} needs room for {total} entries, got {a.size}")
        count = len(starts) - 1
        if count == 0 or total == 0:
            return 0
        levels = (count - 1).bit_length()  # ceil(log2(count))
        # Ping-pong so that the last level lands in out_*, as the CPU twin does.
        if levels % 2 == 1:
            dst_i, dst_v, other_i, other_v = out_indices, out_values, work_indices, work_values
        else:
            dst_i, dst_v, other_i, other_v = work_indices, work_values, out_indices, out_values
        src_i, src_v = indices, values
        empty_i, empty_v = indices[:0], values[:0]
        if levels == 0:  # one stream: a copy (merge with an empty stream copies)
            return self.merge_sum_two(
                src_i[:total], src_v[:total], empty_i, empty_v, out_indices, out_values
            )
        while count > 1:
            position = 0
            new_starts = [0]
            for p in range((count + 1) // 2):
                a0, a1 = starts[2 * p], starts[2 * p + 1]
                b1 = starts[2 * p + 2] if 2 * p + 1 < count else a1
                position += self.merge_sum_two(
                    src_i[a0:a1],
                    src_v[a0:a1],
                    src_i[a1:b1] if b1 > a1 else empty_i,
                    src_v[a1:b1] if b1 > a1 else empty_v,
                    dst_i[position:],
                    dst_v[position:],
                )
                new_starts.append(position)
            starts = new_starts
            count = len(starts) - 1
            src_i, src_v = dst_i, dst_v
            dst_i, dst_v, other_i, other_v = other_i, other_v, dst_i, dst_v
        return starts[1]

    def max_abs(self, x: Any, bucket: int, out: Any) -> None:
        """``out[b] = max |x_i|`` over bucket ``b``, exact (integer max of the bit pattern)."""
        self._array("x", x, _REALS, None)
        bucket = self._positive("bucket", bucket)
        nb = -(-x.size // bucket)
        self._array("out", out, (x.dtype,), nb)
        if nb == 0:
            return
        out.fill(0)
        segment = MAX_ABS_SEGMENT
        per_bucket = -(-bucket // segment)
        total = nb * per_bucket
        warps_per_block = self.runtime.block // 32
        grid = max(1, min(self.runtime.max_blocks, -(-total // warps_per_block)))
        bits_view = out.view(np.uint32 if x.dtype == np.float32 else np.uint64)
        self._fn("reduce", "sc_max_abs", x.dtype)(
            grid,
            self.runtime.block,
            (
                x,
                np.int64(x.size),
                np.int64(bucket),
                np.int64(segment),
                np.int64(per_bucket),
                np.int64(total),
                bits_view,
            ),
        )

    def _lane_grid(self, nb: int) -> int:
        """Blocks for the lane-sum kernels: 8 threads per bucket."""
        return self._grid(nb * 8)

    def qsgd_encode(
        self,
        x: Any,
        levels: int,
        bits: int,
        bucket: int,
        norm: int,
        stream: int,
        out_scales: Any,
        out_packed: Any,
    ) -> None:
        """QSGD stochastic rounding (Alistarh et al., NeurIPS 2017), contract arithmetic."""
        self._array("x", x, _REALS, None)
        bits = self._positive("bits", bits, 1, 8)
        levels = self._positive("levels", levels, 1, (1 << (bits - 1)) - 1)
        bucket = self._positive("bucket", bucket)
        if norm not in (0, 1):
            raise ValueError(f"norm must be 0 (L2) or 1 (max), got {norm}")
        n = x.size
        nb = -(-n // bucket)
        self._array("out_scales", out_scales, (x.dtype,), nb)
        self._array("out_packed", out_packed, (np.dtype(np.uint8),), _nbytes_packed(n, bits))
        if n == 0:
            return
        if norm == 0:
            self._fn("quantize", "sc_l2_norm", x.dtype)(
                self._lane_grid(nb),
                self.runtime.block,
                (x, np.int64(n), np.int64(bucket), np.int64(nb), out_scales),
            )
        else:
            self.max_abs(x, bucket, out_scales)
        self._fn("quantize", "sc_qsgd_encode", x.dtype)(
            self._grid(-(-n // 8)),
            self.runtime.block,
            (
                x,
                np.int64(n),
                np.int32(levels),
                np.int32(bits),
                np.int64(bucket),
                np.uint64(stream),
                out_scales,
                out_packed,
                np.int64(out_packed.size),
            ),
        )

    def qsgd_decode(
        self,
        packed: Any,
        scales: Any,
        levels: int,
        bits: int,
        bucket: int,
        out: Any,
        accumulate: int = 0,
    ) -> None:
        """``d_i = ±(level_i * (scale_b / levels))`` into ``out`` by ``accumulate``.

        ``accumulate`` 0 / 1 / -1: ``out = d`` / ``out += d`` / ``out -= d`` in the one
        decoding pass, bit for bit a separate decode followed by :meth:`add` /
        :meth:`subtract`; any other value raises ValueError.
        """
        accumulate = check_accumulate(accumulate)
        self._array("out", out, _REALS, None)
        bits = self._positive("bits", bits, 1, 8)
        levels = self._positive("levels", levels, 1, (1 << (bits - 1)) - 1)
        bucket = self._positive("bucket", bucket)
        n = out.size
        self._array("scales", scales, (out.dtype,), -(-n // bucket))
        self._array("packed", packed, (np.dtype(np.uint8),), _nbytes_packed(n, bits))
        if n == 0:
            return
        self._fn("quantize", "sc_qsgd_decode", out.dtype)(
            self._grid(-(-n // 8)),
            self.runtime.block,
            (
                packed,
                scales,
                np.int64(n),
                np.int32(levels),
                np.int32(bits),
                np.int64(bucket),
                np.int64(packed.size),
                np.int32(accumulate),
                out,
            ),
        )

    def terngrad_encode(
        self, x: Any, scales: Any, bucket: int, clip: float, stream: int, out_packed: Any
    ) -> None:
        """TernGrad (Wen et al., NeurIPS 2017): 2-bit codes, ``P(keep) = min(|x|, clip) / s_b``."""
        self._array("x", x, _REALS, None)
        bucket = self._positive("bucket", bucket)
        n = x.size
        self._array("scales", scales, (x.dtype,), -(-n // bucket))
        self._array("out_packed", out_packed, (np.dtype(np.uint8),), _nbytes_packed(n, 2))
        if math.isnan(float(clip)):
            raise ValueError("clip must be a number or inf, got nan")
        if n == 0:
            return
        self._fn("quantize", "sc_terngrad_encode", x.dtype)(
            self._grid(out_packed.size),
            self.runtime.block,
            (
                x,
                np.int64(n),
                scales,
                np.int64(bucket),
                x.dtype.type(clip),
                np.uint64(stream),
                out_packed,
                np.int64(out_packed.size),
            ),
        )

    def terngrad_decode(
        self, packed: Any, scales: Any, bucket: int, out: Any, accumulate: int = 0
    ) -> None:
        """``d_i``: code 1 -> ``+s_b``, 2 -> ``-s_b``, 0 and 3 -> 0; ``accumulate`` as in
        :meth:`qsgd_decode`."""
        accumulate = check_accumulate(accumulate)
        self._array("out", out, _REALS, None)
        bucket = self._positive("bucket", bucket)
        n = out.size
        self._array("scales", scales, (out.dtype,), -(-n // bucket))
        self._array("packed", packed, (np.dtype(np.uint8),), _nbytes_packed(n, 2))
        if n == 0:
            return
        self._fn("quantize", "sc_terngrad_decode", out.dtype)(
            self._grid(n),
            self.runtime.block,
            (packed, scales, np.int64(n), np.int64(bucket), np.int32(accumulate), out),
        )

    def onebit_encode(self, x: Any, bucket: int, out_packed: Any, out_means: Any) -> None:
        """1-bit SGD (Seide et al., 2014): sign bits and two lane-sum means per bucket."""
        self._array("x", x, _REALS, None)
        bucket = self._positive("bucket", bucket)
        n = x.size
        nb = -(-n // bucket)
        self._array("out_packed", out_packed, (np.dtype(np.uint8),), _nbytes_packed(n, 1))
        self._array("out_means", out_means, (x.dtype,), 2 * nb)
        if n == 0:
            return
        self._fn("onebit", "sc_onebit_signs", x.dtype)(
            self._grid(out_packed.size),
            self.runtime.block,
            (x, np.int64(n), out_packed, np.int64(out_packed.size)),
        )
        self._fn("onebit", "sc_onebit_means", x.dtype)(
            self._lane_grid(nb),
            self.runtime.block,
            (x, np.int64(n), np.int64(bucket), np.int64(nb), out_means),
        )

    def onebit_decode(
        self, packed: Any, means: Any, bucket: int, out: Any, accumulate: int = 0
    ) -> None:
        """``d_i = means[2b + bit_i]``; ``accumulate`` as in :meth:`qsgd_decode`."""
        accumulate = check_accumulate(accumulate)
        self._array("out", out, _REALS, None)
        bucket = self._positive("bucket", bucket)
        n = out.size
        self._array("means", means, (out.dtype,), 2 * (-(-n // bucket)))
        self._array("packed", packed, (np.dtype(np.uint8),), _nbytes_packed(n, 1))
        if n == 0:
            return
        self._fn("onebit", "sc_onebit_decode", out.dtype)(
            self._grid(n),
            self.runtime.block,
            (packed, means, np.int64(n), np.int64(bucket), np.int32(accumulate), out),
        )

    # ------------------------------------------------------------------ moments

    STD_BLOCK = 1 << 14
    """Elements per block of the contract's ``std`` (``SC_STD_BLOCK`` in moments.cu)."""

    def std(self, x: Any) -> float:
        """Population standard deviation in the contract's fixed order (moments.cu).

        Each pass is two launches: ``sc_std_block_sums`` (one CUDA block per
        :attr:`STD_BLOCK` elements, threads 0-7 running the 8 lane chains over tiles the
        whole CUDA block stages in shared memory) writes the block sums to a device array,
        and the one-thread ``sc_std_combine`` adds them in order and divides by n.  The
        combine stays on the device so the mean reaches pass 2 without a host round trip;
        the only transfer is the 8-byte result (one synchronisation).  Sequential over
        ``n / 2**14`` sums: about 4096 dependent additions at 2**26 elements.

        Raises ValueError for an empty ``x``; NaN or inf in ``x`` give NaN.
        """
        self._array("x", x, _REALS, None)
        n = x.size
        if n == 0:
            raise ValueError(
                "std of an empty array is undefined (n = 0); pass at least one element"
            )
        rt = self.runtime
        nblocks = -(-n // self.STD_BLOCK)
        grid = max(1, min(rt.max_blocks, nblocks))
        sums = rt.empty(nblocks, np.float64)
        mean = rt.empty(1, np.float64)
        result = rt.empty(1, np.float64)
        block_sums = self._fn("moments", "sc_std_block_sums", x.dtype)
        combine = self._fn("moments", "sc_std_combine", x.dtype)
        for centered, out in ((0, mean), (1, result)):
            block_sums(grid, rt.block, (x, np.int64(n), mean, np.int32(centered), sums))
            combine(1, 1, (sums, np.int64(nblocks), np.int64(n), np.int32(centered), out))
        return float(rt.to_host(result)[0])

    # ------------------------------------------------------------------ elementwise

    def add(self, a: Any, b: Any, out: Any) -> None:
        """``out[i] = a[i] + b[i]``, IEEE round-to-nearest, subnormals kept (no -ftz).

        ``b`` and ``out`` have ``a``'s dtype and size; ``out`` may be ``a`` or ``b``.
        Use this rather than ``cupy.add``, whose build flushes float32 subnormals.
        """
        self._elementwise("sc_add", a, b, out)

    def subtract(self, a: Any, b: Any, out: Any) -> None:
        """``out[i] = a[i] - b[i]``, IEEE round-to-nearest, subnormals kept (no -ftz).

        ``b`` and ``out`` have ``a``'s dtype and size; ``out`` may be ``a`` or ``b``.
        Use this rather than ``cupy.subtract`` / ``-=``, whose build flushes subnormals.
        """
        self._elementwise("sc_subtract", a, b, out)

    def divide_scalar(self, x: Any, divisor: float, out: Any) -> None:
        """``out[i] = x[i] / x.dtype(divisor)``, one IEEE division, subnormals kept.

        ``out`` has ``x``'s dtype and size and may be ``x``.  Use this rather than
        ``cupy`` ``/=``, whose build flushes float32 subnormals.
        """
        self._array("x", x, _REALS, None)
        self._array("out", out, (x.dtype,), x.size)
        self._in_place_or_apart(out, "x", x)
        divisor = check_divisor(divisor)
        if x.size == 0:
            return
        self._fn("elementwise", "sc_divide_scalar", x.dtype)(
            self._grid(x.size),
            self.runtime.block,
            (x, x.dtype.type(divisor), out, np.int64(x.size)),
        )

    @staticmethod
    def _in_place_or_apart(out: Any, name: str, other: Any) -> None:
        """``out`` may be ``other`` itself (in place) or a separate buffer, not a part of it."""
        if _partly_overlap(out, other):
            raise ValueError(
                f"out partly overlaps {name}: out may be {name} itself (in place) or a "
                "separate buffer, not a shifted view of it; pass a copy"
            )

    def _elementwise(self, name: str, a: Any, b: Any, out: Any) -> None:
        self._array("a", a, _REALS, None)
        self._array("b", b, (a.dtype,), a.size)
        self._array("out", out, (a.dtype,), a.size)
        self._in_place_or_apart(out, "a", a)
        self._in_place_or_apart(out, "b", b)
        n = a.size
        if n == 0:
            return
        # One thread per 16-byte vector (4 floats or 2 doubles) of the aligned middle.
        vector = 16 // a.dtype.itemsize
        self._fn("elementwise", name, a.dtype)(
            self._grid(-(-n // vector)), self.runtime.block, (a, b, out, np.int64(n))
        )

    # ------------------------------------------------------------------ conversions

    def _no_overlap(self, out: Any, source_name: str, source: Any) -> None:
        if out.size and source.size and _ranges_meet(out, source):
            raise ValueError(
                f"out overlaps {source_name}: the conversion reads and writes different "
                "element widths, so out must be a separate buffer; pass a new array"
            )

    def fp16_encode(self, x: Any, out: Any) -> int:
        """``out[i] = float16(x[i])``, round to nearest even, bit for bit NumPy's ``astype``.

        Integer operations on the bit patterns (convert.cu), one pass over ``x``; returns
        the number of non-finite outputs (NaN, inf or an overflow beyond ±65504) from a
        device counter read once (one synchronisation).  ``out`` is float16 of
        ``x.size`` elements and must not overlap ``x``.
        """
        self._array("x", x, _REALS, None)
        self._array("out", out, (_HALF,), x.size)
        self._no_overlap(out, "x", x)
        if x.size == 0:
            return 0
        counter = self.runtime.zeros(1, np.uint64)
        self._fn("convert", "sc_fp16_encode", x.dtype)(
            self._grid(x.size),
            self.runtime.block,
            (x, np.int64(x.size), out.view(np.uint8), counter),
        )
        return int(self.runtime.to_host(counter)[0])

    def fp16_decode(self, half: Any, out: Any, accumulate: int = 0) -> None:
        """``d_i = out.dtype(half[i])`` (exact) into ``out`` by ``accumulate``, as in
        :meth:`qsgd_decode`; ``half`` (float16) must not overlap ``out``."""
        accumulate = check_accumulate(accumulate)
        self._array("out", out, _REALS, None)
        self._array("half", half, (_HALF,), out.size)
        self._no_overlap(out, "half", half)
        if out.size == 0:
            return
        self._fn("convert", "sc_fp16_decode", out.dtype)(
            self._grid(out.size),
            self.runtime.block,
            (half.view(np.uint8), np.int64(out.size), np.int32(accumulate), out),
        )

    def copy_finite(self, x: Any, out: Any) -> int:
        """``out[i] = x[i]``; returns the number of non-finite entries of ``x`` (one pass,
        one device counter read once).  ``out`` has ``x``'s dtype and size, no overlap."""
        self._array("x", x, _REALS, None)
        self._array("out", out, (x.dtype,), x.size)
        self._no_overlap(out, "x", x)
        if x.size == 0:
            return 0
        counter = self.runtime.zeros(1, np.uint64)
        self._fn("convert", "sc_copy_finite", x.dtype)(
            self._grid(x.size), self.runtime.block, (x, np.int64(x.size), out, counter)
        )
        return int(self.runtime.to_host(counter)[0])


def _ranges_meet(a: Any, b: Any) -> bool:
    """Whether contiguous ``a`` and ``b`` share any byte (also when they are one buffer)."""
    a_range, b_range = _address_range(a), _address_range(b)
    return a_range[0] < b_range[1] and b_range[0] < a_range[1]


def _address_range(a: Any) -> tuple[int, int]:
    """``[first byte, end byte)`` of a contiguous array (CuPy, or NumPy on the emulator)."""
    pointer = getattr(a.data, "ptr", None)  # cupy.cuda.MemoryPointer; cheaper than the
    if pointer is None:  # __cuda_array_interface__ dict, built anew on every access
        pointer = a.__array_interface__["data"][0]
    start = int(pointer)
    return start, start + a.size * a.dtype.itemsize


def _partly_overlap(a: Any, b: Any) -> bool:
    """Whether contiguous ``a`` and ``b`` share memory without being the same buffer."""
    if a is b or a.size == 0 or b.size == 0:
        return False
    return _address_range(a) != _address_range(b) and _ranges_meet(a, b)


def export(kernels: GpuKernels) -> dict[str, Callable[..., Any]]:
    """The bound methods to publish as module-level functions."""
    return {name: getattr(kernels, name) for name in CONTRACT + EXTRA}
