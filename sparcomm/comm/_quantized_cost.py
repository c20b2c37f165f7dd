"""Cost model of the quantized allreduce family: exact bytes per rank and predicted time.

Bytes follow the schedules of :mod:`sparcomm.comm._quantized` exactly (payload sizes are
known from ``codec.encoded_nbytes``), under the counting conventions of
:mod:`sparcomm.comm._context` (``Alltoallv`` exact, ``Allgatherv`` as a ring moves it, a
dense ``Allreduce`` of ``m`` bytes as ``2 m (P - 1) / P`` each way); a test holds the
measured bytes to :meth:`QuantizedPrediction.bytes`.

Time is the alpha-beta model of :class:`sparcomm.comm.CostModel` (``alpha`` per message
on the critical path, ``beta`` per byte of the busiest rank) plus the compute of the
busiest rank, priced per element by :class:`CodecCosts`, which :func:`codec_costs`
measures once per communicator, codec and dtype (a few milliseconds; every rank agrees on
the maximum, so every rank predicts the same and ``auto`` chooses alike everywhere).

Schedules (``P`` ranks, ``n`` elements, ``C(m)`` the payload bytes of ``m`` elements,
``m_j`` the owners' chunks; per rank and leaving out the signature check):

* ``allgather`` -- allgather of ``P`` payloads: ``(P - 1) C(n)`` each way; decode
  ``P n`` elements.
* ``reduce_scatter_allgather`` -- ``Alltoallv`` of chunk payloads, then an allgather
  of the owners' re-encoded chunks: about ``2 (P - 1) / P C(n)`` each way; decode ``2 n``,
  encode ``n + n / P``.
* ``shared_scale`` (TernGrad) -- a max-``Allreduce`` of the scales, ``Alltoallv`` of the
  2-bit codes and an allgather of the sums, ``ceil(log2(2P + 1))`` bits each: about
  ``(P - 1) / P n (2 + ceil(log2(2P + 1))) / 8`` bytes each way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from mpi4py import MPI

from sparcomm.codecs import TernGrad
from sparcomm.comm._context import SIGNATURE_FIELDS, ring_allreduce_bytes
from sparcomm.comm._cost import CostModel
from sparcomm.comm._quantized_layout import (
    MAX_INT16_RANKS,
    STATUS_BYTES,
    TERNARY_BITS,
    apply_scales,
    chunk_alignment,
    chunk_bounds,
    chunk_nbytes,
    expand_sums,
    pack_sums,
    sum_dtype,
    sums_nbytes,
    ternary_accumulate,
)

QUANTIZED_ALGORITHMS = ("allgather", "reduce_scatter_allgather", "shared_scale")

#: Chunk alignment of the shared-scale path: the scale is known to every rank, so only
#: the packed 2-bit codes and w-bit sums need byte boundaries.
SHARED_SCALE_ALIGNMENT = 8

_SIGNATURE_BYTES = 8 * len(SIGNATURE_FIELDS)
_CALIBRATION_ELEMENTS = 1 << 17


def candidates(codec: Any, size: int) -> tuple[str, ...]:
    """The algorithms that can run ``codec`` on ``size`` ranks."""
    if isinstance(codec, TernGrad) and size <= MAX_INT16_RANKS:
        return QUANTIZED_ALGORITHMS
    return QUANTIZED_ALGORITHMS[:2]


@dataclass(frozen=True)
class CodecCosts:
    """Seconds per element of the local work of the quantized collectives.

    Attributes
    ----------
    encode, decode : float
        ``codec.encode`` / ``codec.decode`` (into a given buffer).
    add : float
        ``out += scratch``: one pass over a float buffer.
    decode_add : float
        ``out += decode(payload)`` as the sums run it: ``decode(..., accumulate=1)``, one
        pass for codecs that fuse it, a decode and an add for the others.
    accumulate, pack, expand : float
        TernGrad's shared-scale path: add 2-bit codes into integer sums, pack the sums,
        unpack them and multiply by the scale (``expand`` times both of these last
        passes, as the ``output`` phase runs them; 0 for other codecs).
    """

    encode: float
    decode: float
    add: float
    decode_add: float
    accumulate: float = 0.0
    pack: float = 0.0
    expand: float = 0.0

    def as_array(self) -> np.ndarray:
        return np.array(
            [
                self.encode,
                self.decode,
                self.add,
                self.decode_add,
                self.accumulate,
                self.pack,
                self.expand,
            ]
        )


@dataclass
class QuantizedPhase:
    """One phase: messages on the critical path, bytes of every rank, and the local work
    of the busiest rank as element counts per :class:`CodecCosts` field."""

    name: str
    messages: float
    sent: np.ndarray
    received: np.ndarray
    compute: dict[str, float] = field(default_factory=dict)


@dataclass
class QuantizedPrediction:
    """The predicted schedule of one quantized algorithm on every rank."""

    algorithm: str
    phases: list[QuantizedPhase] = field(default_factory=list)

    def bytes(self, rank: int) -> tuple[int, int]:
        """(sent, received) bytes of ``rank`` over the whole call, signature included."""
        sent = sum(float(p.sent[rank]) for p in self.phases)
        received = sum(float(p.received[rank]) for p in self.phases)
        return round(sent), round(received)

    def time(self, model: CostModel, costs: CodecCosts) -> float:
        """Predicted seconds: phases in sequence, each paced by its busiest rank."""
        total = 0.0
        for p in self.phases:
            busiest = float(np.max(np.maximum(p.sent, p.received)))
            total += model.alpha * p.messages + model.beta * busiest
            total += sum(getattr(costs, kind) * count for kind, count in p.compute.items())
        return total


def _ring(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank (sent, received) of a ring ``Allgather`` of ``blocks`` bytes (the
    fixed-size signature row)."""
    blocks = np.asarray(blocks, dtype=np.float64)
    size = blocks.size
    if size == 1:
        return np.zeros(1), np.zeros(1)
    total = blocks.sum()
    return total - blocks[(np.arange(size) + 1) % size], total - blocks


def _gather(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank (sent, received) of ``Channel.allgatherv``, a direct exchange: rank r
    sends its block to each of the others and receives every other block."""
    blocks = np.asarray(blocks, dtype=np.float64)
    return (blocks.size - 1) * blocks, blocks.sum() - blocks


def _alltoall(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank (sent, received) of an ``Alltoallv`` where ``parts[r, j]`` goes r -> j."""
    parts = np.array(parts, dtype=np.float64)
    np.fill_diagonal(parts, 0.0)
    return parts.sum(axis=1), parts.sum(axis=0)


def predict_quantized(
    algorithm: str, codec: Any, n: int, dtype: Any, size: int
) -> QuantizedPrediction:
    """The schedule of ``algorithm`` for the bare codec ``codec`` on ``size`` ranks.

    Parameters
    ----------
    algorithm : str
        One of :data:`QUANTIZED_ALGORITHMS`.
    codec : QSGD, TernGrad, OneBit or FP16
        The bare codec (without error feedback: it changes no byte).
    n : int
        Elements of the vector.
    dtype : numpy.dtype
        float32 or float64.
    size : int
        Number of ranks.
    """
    if algorithm not in QUANTIZED_ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {QUANTIZED_ALGORITHMS}")
    dtype = np.dtype(dtype)
    log = math.ceil(math.log2(size)) if size > 1 else 0
    prediction = QuantizedPrediction(algorithm)
    add = prediction.phases.append
    zeros = np.zeros(size)
    add(QuantizedPhase("check", log, *_ring(np.full(size, _SIGNATURE_BYTES))))
    if algorithm == "allgather":
        payload = STATUS_BYTES + chunk_nbytes(codec, n, dtype)
        add(QuantizedPhase("encode", 0, zeros, zeros, {"encode": n}))
        add(QuantizedPhase("allgather", size - 1, *_gather(np.full(size, payload))))
        add(QuantizedPhase("decode", 0, zeros, zeros, {"decode": n, "decode_add": (size - 1) * n}))
        return prediction
    if algorithm == "reduce_scatter_allgather":
        bounds = chunk_bounds(n, size, chunk_alignment(codec))
        lengths = np.diff(bounds)
        chunk = STATUS_BYTES + np.array(
            [chunk_nbytes(codec, int(m), dtype) for m in lengths], dtype=float
        )
        busiest = float(lengths.max())
        add(QuantizedPhase("encode", 0, zeros, zeros, {"encode": n}))
        add(QuantizedPhase("reduce_scatter", size - 1, *_alltoall(np.tile(chunk, (size, 1)))))
        add(
            QuantizedPhase(
                "owner_sum",
                0,
                zeros,
                zeros,
                {"decode": busiest, "decode_add": (size - 1) * busiest, "encode": busiest},
            )
        )
        add(QuantizedPhase("allgather", size - 1, *_gather(chunk)))
        add(QuantizedPhase("decode", 0, zeros, zeros, {"decode": n}))
        return prediction
    if not isinstance(codec, TernGrad):
        raise NotImplementedError(
            f"algorithm 'shared_scale' sums TernGrad's ternary values as integers; "
            f"{type(codec).__name__} has no shared scale: use 'allgather' or "
            "'reduce_scatter_allgather'"
        )
    sum_dtype(size)  # refuses too many ranks
    scales = -(-n // codec.bucket_for(n))
    scale_bytes = float(ring_allreduce_bytes(scales * dtype.itemsize, size))
    bounds = chunk_bounds(n, size, SHARED_SCALE_ALIGNMENT)
    lengths = np.diff(bounds)
    codes = np.array([-(-int(m) * TERNARY_BITS // 8) for m in lengths], dtype=float)
    sums = np.array([sums_nbytes(int(m), size) for m in lengths], dtype=float)
    busiest = float(lengths.max())
    add(QuantizedPhase("scale", 0, zeros, zeros, {"add": n}))
    add(
        QuantizedPhase(
            "scale_allreduce",
            2 * log,
            np.full(size, scale_bytes),
            np.full(size, scale_bytes) if size > 1 else zeros,
        )
    )
    add(QuantizedPhase("encode", 0, zeros, zeros, {"encode": n}))
    add(QuantizedPhase("reduce_scatter", size - 1, *_alltoall(np.tile(codes, (size, 1)))))
    add(
        QuantizedPhase(
            "integer_sum", 0, zeros, zeros, {"accumulate": size * busiest, "pack": busiest}
        )
    )
    add(QuantizedPhase("allgather", size - 1, *_gather(sums)))
    add(QuantizedPhase("output", 0, zeros, zeros, {"expand": n}))
    return prediction


def choose_quantized(
    model: CostModel, costs: CodecCosts, codec: Any, n: int, dtype: Any, size: int
) -> tuple[str, dict[str, float]]:
    """The candidate with the least predicted time, and every candidate's prediction."""
    predicted = {
        name: predict_quantized(name, codec, n, dtype, size).time(model, costs)
        for name in candidates(codec, size)
    }
    return min(predicted, key=predicted.__getitem__), predicted


# ------------------------------------------------------------------ calibration

_KEYVAL: int | None = None


def _median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _measure(codec: Any, dtype: np.dtype, repeats: int) -> CodecCosts:
    m = _CALIBRATION_ELEMENTS
    x = np.random.default_rng(2024).standard_normal(m).astype(dtype)
    out = np.empty_like(x)
    scratch = np.zeros_like(x)
    payload = codec.encode(x, key="sparcomm.calibration", step=0)  # compiles or loads
    codec.decode(payload, out=out)
    encode = _median_time(lambda: codec.encode(x, key="sparcomm.calibration", step=0), repeats)
    decode = _median_time(lambda: codec.decode(payload, out=out), repeats)
    add = _median_time(lambda: np.add(out, scratch, out=out), repeats)
    if codec.fused_accumulate:
        decode_add = _median_time(lambda: codec.decode(payload, out=out, accumulate=1), repeats)
    else:
        decode_add = decode + add
    accumulate = pack = expand = 0.0
    if isinstance(codec, TernGrad):
        packed = payload.arrays["packed"]
        acc = np.zeros(m, dtype=sum_dtype(2))
        codes = np.empty(m, np.uint8)
        ones = np.empty(m, np.uint8)
        wire = np.empty(sums_nbytes(m, 2), np.uint8)
        accumulate = _median_time(lambda: ternary_accumulate(packed, acc, codes, ones), repeats)
        acc[:] = 0
        pack = _median_time(lambda: pack_sums(acc, 2, codes, wire), repeats)
        scales, bucket = payload.arrays["scales"], codec.bucket_for(m)

        def output() -> None:  # the "output" phase of shared_scale: both passes
            expand_sums(wire, 2, codes, out)
            apply_scales(out, scales, bucket)

        expand = _median_time(output, repeats)
    values = (encode, decode, add, decode_add, accumulate, pack, expand)
    return CodecCosts(*(value / m for value in values))


def codec_costs(
    comm: MPI.Comm, codec: Any, dtype: Any, describe: str, *, repeats: int = 3
) -> CodecCosts:
    """The cached :class:`CodecCosts` of ``codec`` on ``comm`` (collective on first use).

    Every rank measures; the maximum of each constant is agreed with one ``Allreduce``
    so that every rank holds the same costs.  Cached per ``(describe, dtype)`` as an
    attribute of ``comm`` (the private duplicate the collectives run on).
    """
    global _KEYVAL
    if _KEYVAL is None:
        _KEYVAL = MPI.Comm.Create_keyval()
    cache = cast("dict[tuple[str, str], CodecCosts] | None", comm.Get_attr(_KEYVAL))
    if cache is None:
        cache = {}
        comm.Set_attr(_KEYVAL, cache)
    entry = (describe, np.dtype(dtype).str)
    if entry not in cache:
        local = _measure(codec, np.dtype(dtype), repeats).as_array()
        agreed = np.empty_like(local)
        comm.Allreduce(local, agreed, op=MPI.MAX)
        cache[entry] = CodecCosts(*(float(v) for v in agreed))
    return cache[entry]
