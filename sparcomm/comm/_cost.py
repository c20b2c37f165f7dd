"""Cost model of the allreduce algorithms: bytes per rank and predicted time.

The model is the alpha-beta model of SparCML (Renggli et al., SC'19, Section 5) with two
compute terms: a message costs ``alpha + beta * bytes``; merging sorted streams costs
``merge`` seconds per element per tree level; a pass over a dense buffer (zeroing,
adding, copying) costs ``dense`` seconds per element; MPI's own ``Allreduce`` costs
``2 ceil(log2 P) alpha + beta_allreduce * bytes``, ``beta_allreduce`` being measured
rather than derived, because the library's algorithm is a black box.

Fill: the expected number of distinct indices in the union of streams with ``k_r``
entries each, drawn independently and uniformly from ``[0, n)``, is
``n (1 - prod_r (1 - k_r / n))``; a range of length ``L`` holds a fraction ``L / n`` of it.
Identical supports fill less and disjoint ones more, so the model is exact only for
random supports; the byte counts of :func:`predict` follow the schedule of
``sparcomm.comm._sparse`` exactly for given fills, and the tests hold measured bytes to
the prediction.

:func:`calibrate` measures the five constants once per communicator (a few hundred
milliseconds), agrees on them across ranks (the maximum of each), and caches them on
the communicator; every rank then predicts the same times and ``auto`` makes the same
choice everywhere.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from mpi4py import MPI

from sparcomm.comm import _sparse
from sparcomm.comm._context import Channel, comm_state, ring_allreduce_bytes
from sparcomm.comm._protocol import SIGNATURE_BYTES, SIGNATURE_FIELDS, STATUS_BYTES
from sparcomm.comm._quantized_layout import (
    MAX_INT16_RANKS,
    SHARED_SCALE_ALIGNMENT,
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
from sparcomm.comm._ring import chunk_bounds as ring_chunk_bounds
from sparcomm.comm._ring import half_segment_count
from sparcomm.comm._stats import AllreduceStats
from sparcomm.comm._sums import decode_sum
from sparcomm.kernels.cpu import merge as _merge

SPARSE_ALGORITHMS = ("allgather", "recursive_doubling", "split_allgather", "dsar")
ALL_ALGORITHMS = (*SPARSE_ALGORITHMS, "dense")
QUANTIZED_ALGORITHMS = ("allgather", "reduce_scatter_allgather", "shared_scale")
#: The quantized family's algorithms for plain ``FP16`` only (float16 values on the
#: wire, no payload framing: :func:`sparcomm.comm._ring.half_allreduce`); ``auto`` takes
#: it for plain FP16 on host buffers (measured: docs/benchmarks.md, issue 11).
HALF_ALGORITHMS = ("pipelined",)

_CALIBRATION_ELEMENTS = 1 << 17


@dataclass(frozen=True)
class CostModel:
    """Machine constants of the alpha-beta model (seconds).

    Parameters
    ----------
    alpha : float
        Latency of one synchronising step among all ranks (a small collective, or an
        exchange with every peer); the schedules count such steps.
    beta : float
        Seconds per byte moved by ``Allgatherv``/``Alltoallv``/point-to-point.
    beta_allreduce : float
        Seconds per byte of buffer in MPI's own ``Allreduce`` (whole operation).
    merge : float
        Seconds per element per level of the merge tree.
    dense : float
        Seconds per element of one pass over a dense buffer.
    alpha_pair, beta_pair : float, optional
        Latency and seconds per byte of an exchange between two partners (recursive
        doubling's rounds), which differ from the all-peer figures where ranks share
        cores (only two ranks must run, but only two streams move at once).
    """

    alpha: float
    beta: float
    beta_allreduce: float
    merge: float
    dense: float
    calibration_seconds: float = 0.0
    alpha_pair: float | None = None
    beta_pair: float | None = None

    def as_array(self) -> np.ndarray:
        return np.array([self.alpha, self.beta, self.beta_allreduce, self.merge, self.dense])

    @property
    def pair_latency(self) -> float:
        """Latency of a step between two partners (``alpha`` when not measured)."""
        return self.alpha if self.alpha_pair is None else self.alpha_pair

    @property
    def pair_byte_time(self) -> float:
        """Seconds per byte between two partners (``beta`` when not measured)."""
        return self.beta if self.beta_pair is None else self.beta_pair

    def fingerprint(self) -> int:
        """A 31-bit hash of the constants: ranks compare it before ``auto`` chooses."""
        constants = np.append(self.as_array(), [self.pair_latency, self.pair_byte_time])
        return zlib.crc32(constants.tobytes()) & 0x7FFFFFFF


@dataclass
class Phase:
    """One phase of a schedule: messages on the critical path, bytes per rank, compute."""

    name: str
    messages: float
    sent: np.ndarray  # bytes per rank
    received: np.ndarray
    merge_elements: float = 0.0
    dense_elements: float = 0.0
    allreduce_bytes: float = 0.0
    pair_steps: float = 0.0
    # False for MPI's Allreduce: its bytes are accounted, its time is beta_allreduce's.
    bytes_timed: bool = True
    # Local work of the busiest rank priced by a codec's CodecCosts: field -> elements.
    compute: dict[str, float] = field(default_factory=dict)


#: The phases of a pipelined schedule (``Prediction.segments > 1``) that overlap: the
#: encode, both exchanges, the owners' sums and the decode; the check before and the
#: status after stay in sequence.
PIPELINED_PHASES = frozenset({"encode", "reduce_scatter", "owner_sum", "allgather", "decode"})


@dataclass
class Prediction:
    """The predicted schedule of one algorithm on every rank."""

    algorithm: str
    phases: list[Phase] = field(default_factory=list)
    #: Segments per chunk of a pipelined schedule (1: none): its phases named in
    #: :data:`PIPELINED_PHASES` overlap their transfers with their codec work.
    segments: int = 1

    def bytes(self, rank: int) -> tuple[int, int]:
        """(sent, received) bytes of ``rank`` over the whole call, signature included."""
        sent = sum(float(p.sent[rank]) for p in self.phases)
        received = sum(float(p.received[rank]) for p in self.phases)
        return round(sent), round(received)

    def time(self, model: CostModel, costs: CodecCosts | None = None) -> float:
        """Predicted seconds: phases in sequence, each paced by its busiest rank.

        ``costs`` prices the codec work of the quantized schedules (phases with
        ``compute``); the sparse schedules need none.  In a pipelined schedule
        (``segments > 1``) the phases of :data:`PIPELINED_PHASES` run segment by
        segment, each segment's transfers beside the next one's codec work: they take
        ``max(T, C) + min(T, C) / segments`` for their transfers ``T`` and codec work
        ``C`` (the slower stream, plus the other's first or last segment).
        """
        total = transfers = work = 0.0
        for p in self.phases:
            busiest = float(np.max(np.maximum(p.sent, p.received))) if p.sent.size else 0.0
            busiest = busiest if p.bytes_timed else 0.0
            byte_time = model.pair_byte_time if p.pair_steps else model.beta
            moved = (
                model.alpha * p.messages
                + model.pair_latency * p.pair_steps
                + byte_time * busiest
                + model.merge * p.merge_elements
                + model.dense * p.dense_elements
                + model.beta_allreduce * p.allreduce_bytes
            )
            computed = 0.0
            if p.compute:
                if costs is None:
                    raise ValueError(f"phase {p.name!r} prices codec work: pass costs=")
                computed = sum(getattr(costs, kind) * count for kind, count in p.compute.items())
            if self.segments > 1 and p.name in PIPELINED_PHASES:
                transfers += moved
                work += computed
            else:
                total += moved + computed
        if transfers or work:
            total += max(transfers, work) + min(transfers, work) / self.segments
        return total


def expected_union(k: np.ndarray, n: int, length: float | None = None) -> float:
    """Expected distinct indices in the union of uniform random streams of sizes ``k``,
    restricted to a range of ``length`` indices (the whole ``[0, n)`` by default)."""
    if n == 0:
        return 0.0
    length = n if length is None else length
    miss = np.prod(1.0 - np.minimum(np.asarray(k, dtype=np.float64), n) / n)
    return float(length * (1.0 - miss))


def _ring(blocks, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank (sent, received) of a ring ``Allgather`` of ``blocks`` bytes (the
    fixed-size signature row)."""
    blocks = np.asarray(blocks, dtype=np.float64)
    total = blocks.sum()
    ranks = np.arange(size)
    if size == 1:
        return np.zeros(1), np.zeros(1)
    return total - blocks[(ranks + 1) % size], total - blocks


def _direct(blocks, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank (sent, received) of a direct allgather of ``blocks`` bytes."""
    blocks = np.asarray(blocks, dtype=np.float64)
    return (size - 1) * blocks, blocks.sum() - blocks


def predict(
    algorithm: str,
    n: int,
    k_all,
    itemsize: int,
    index_itemsize: int,
    dense_output: bool | None = True,
) -> Prediction:
    """The schedule of ``algorithm`` for streams of ``k_all[r]`` entries on each rank.

    Parameters
    ----------
    algorithm : str
        One of ``allgather``, ``recursive_doubling``, ``split_allgather``, ``dsar``,
        ``dense``.
    n, itemsize, index_itemsize : int
        Vector length, bytes per value and per index on the wire.
    k_all : sequence of int
        Entries per rank (the fill of sums is the random-support expectation).
    dense_output : bool or None
        Whether the result is written to a dense buffer (adds one dense pass).
    """
    k = np.asarray(k_all, dtype=np.float64)
    size = k.size
    entry = index_itemsize + itemsize
    log = math.ceil(math.log2(size)) if size > 1 else 0
    prediction = Prediction(algorithm)
    add = prediction.phases.append
    sent, received = _ring([SIGNATURE_BYTES] * size, size)
    add(Phase("check", 1, sent, received))
    zeros = np.zeros(size)
    if size == 1:
        add(Phase("output", 0, zeros, zeros, dense_elements=n if dense_output else 0))
        return prediction

    if algorithm == "allgather":
        si, ri = _direct(k * index_itemsize, size)
        sv, rv = _direct(k * itemsize, size)
        add(Phase("allgather", 1, si + sv, ri + rv))
        add(Phase("merge", 0, zeros, zeros, merge_elements=k.sum() * log))
    elif algorithm == "recursive_doubling":
        _predict_recursive_doubling(add, n, k, itemsize, entry)
    elif algorithm in ("split_allgather", "dsar"):
        _predict_split(add, n, k, itemsize, entry, switch=algorithm == "dsar")
    elif algorithm == "dense":
        # Zero-fill and scatter (a scattered write costs about a merge step per entry);
        # a full stream is already its dense vector.
        full = bool(np.all(k >= n))
        add(
            Phase(
                "densify_input",
                0,
                zeros,
                zeros,
                dense_elements=0 if full else n,
                merge_elements=0 if full else float(k.max()),
            )
        )
        both = np.full(size, float(ring_allreduce_bytes(n * itemsize, size)))
        add(Phase("allreduce", 1, both, both, allreduce_bytes=n * itemsize, bytes_timed=False))
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALL_ALGORITHMS}")
    if dense_output:
        add(Phase("output", 0, zeros, zeros, dense_elements=n))
    return prediction


def lazy_predicted_bytes(stats: AllreduceStats) -> Callable[[], tuple[int, int]]:
    """The :func:`predict` bytes of the sparse or dense call that ``stats`` describes,
    as a function: ``stats.predicted_bytes`` calls it on first access, so the calls
    themselves do not pay for the prediction."""

    def predicted() -> tuple[int, int]:
        if stats.algorithm not in ALL_ALGORITHMS or not stats.k_all:
            return (0, 0)
        prediction = predict(
            stats.algorithm, stats.n, stats.k_all, stats.itemsize, stats.index_itemsize, None
        )
        return prediction.bytes(stats.rank)

    return predicted


def _predict_recursive_doubling(add, n, k, itemsize, entry) -> None:
    size = k.size
    low = 1 << (size.bit_length() - 1)
    extra = size - low

    def wire(count: float) -> float:  # the dense switch of _sparse.Problem.goes_dense
        return n * itemsize if count * entry >= n * itemsize else count * entry

    groups = [[r] + ([r + low] if r < extra else []) for r in range(low)]
    if extra:
        sent, received = np.zeros(size), np.zeros(size)
        for r in range(extra):
            sent[r + low] = received[r] = wire(k[r + low])
        add(Phase("fold", 0, sent, received, merge_elements=2 * float(k.max()), pair_steps=1))
    mask = 1
    while mask < low:
        sent, received = np.zeros(size), np.zeros(size)
        merged = 0.0
        for r in range(low):
            base = r & ~(2 * mask - 1)
            own_block = [
                m
                for q in range(base, base + 2 * mask)
                if (q & mask) == (r & mask)
                for m in groups[q]
            ]
            other_block = [
                m
                for q in range(base, base + 2 * mask)
                if (q & mask) != (r & mask)
                for m in groups[q]
            ]
            sent[r] = wire(expected_union(k[own_block], n))
            received[r] = wire(expected_union(k[other_block], n))
            merged = max(merged, (sent[r] + received[r]) / entry)
        add(Phase(f"round{mask}", 0, sent, received, merge_elements=merged, pair_steps=1))
        mask <<= 1
    if extra:
        sent, received = np.zeros(size), np.zeros(size)
        final = wire(expected_union(k, n))
        sent[:extra] = final
        received[low:] = final
        add(Phase("unfold", 0, sent, received, pair_steps=1))


def _predict_split(add, n, k, itemsize, entry, switch: bool) -> None:
    size = k.size
    log = math.ceil(math.log2(size))
    bounds = (np.arange(size + 1, dtype=np.int64) * n) // size
    lengths = np.diff(bounds).astype(np.float64)
    # parts[r, j]: bytes rank r sends to owner j
    counts = np.outer(k, lengths) / n if n else np.zeros((size, size))
    part_bytes = counts * entry
    if switch:
        dense = (counts > 0) & (counts * entry >= lengths[None, :] * itemsize)
        part_bytes = np.where(dense, lengths[None, :] * itemsize, part_bytes)
    np.fill_diagonal(part_bytes, 0.0)
    header = np.full(size, 8.0 * (size - 1))
    add(
        Phase(
            "reduce_scatter",
            2,
            header + part_bytes.sum(axis=1),
            header + part_bytes.sum(axis=0),
            merge_elements=float(counts.sum(axis=0).max()) * log,
        )
    )
    owned = np.array([expected_union(k, n, lengths[j]) for j in range(size)])
    block = owned * entry
    if switch:
        block = np.where(block >= lengths * itemsize, lengths * itemsize, block)
    sh, rh = _ring([8] * size, size)
    sb, rb = _direct(block, size)
    add(Phase("allgather", 2, sh + sb, rh + rb))


# ------------------------------------------------------------------ calibration


def _best_time(function, repeats: int) -> float:
    """The fastest of ``repeats`` runs (the undisturbed cost on a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.min(times))


def _load_kernels() -> None:
    """Load the merge kernels (Numba cache) for int32/float32 before the calibration
    clock starts: a one-time import cost, not part of any measurement."""
    from sparcomm.comm._sparse import load_kernels

    load_kernels(np.dtype(np.int32), np.dtype(np.float32))


def calibrate(comm: MPI.Comm | None = None, *, repeats: int = 5) -> CostModel:
    """Measure the cost-model constants on ``comm`` and cache them there (collective).

    Takes a few hundred milliseconds: a signature check plus a one-entry
    split-allgather for ``alpha``, one-element and 256 KiB swaps between partners for
    ``alpha_pair`` and ``beta_pair``, a 256 KiB per rank exchange for ``beta``, a 16 MiB
    ``Allreduce`` for ``beta_allreduce``, and local merge and dense passes.  Every rank
    measures, the maximum of each constant is agreed, so all ranks hold the same model.
    Call again to re-calibrate (for example after the machine's load changed).

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        The communicator (``MPI.COMM_WORLD`` by default).
    repeats : int
        Timings per constant; the median is kept.
    """
    comm = MPI.COMM_WORLD if comm is None else comm
    state = comm_state(comm)
    inner = state.comm
    size = inner.Get_size()
    _load_kernels()
    start = time.perf_counter()

    # Compute terms first.
    rng = np.random.default_rng(12345)
    m = 1 << 18  # two 1 MiB streams: larger than the caches, as the streams that matter
    a_i = np.sort(rng.choice(4 * m, m, replace=False)).astype(np.int32)
    b_i = np.sort(rng.choice(4 * m, m, replace=False)).astype(np.int32)
    a_v = rng.standard_normal(m).astype(np.float32)
    out_i = np.empty(2 * m, np.int32)
    out_v = np.empty(2 * m, np.float32)
    _merge.merge_sum_two(a_i, a_v, b_i, a_v, out_i, out_v)
    merge = _best_time(lambda: _merge.merge_sum_two(a_i, a_v, b_i, a_v, out_i, out_v), repeats)
    merge /= 2 * m
    # A dense pass over a reused (already mapped) 8 MiB buffer, as the dense paths make it.
    big = np.zeros(1 << 21, np.float32)
    dense = _best_time(lambda: big.fill(1.0), repeats) / big.size

    # Network terms through the primitives the algorithms use: the direct exchange of
    # Channel.allgatherv for alpha and beta, MPI's Allreduce for beta_allreduce.
    channel = Channel(inner, AllreduceStats())
    if size > 1:
        # alpha: one synchronising step, the unit in which predict() counts latency.
        # Measured on the real pattern, the signature check and a split-allgather of
        # one entry per rank (1 + 4 steps): ranks that arrive at a step at different
        # times, after some work, wait longer than ranks looping in lock-step would.
        row = np.zeros(len(SIGNATURE_FIELDS), np.int64)
        problem = _sparse.Problem(
            channel,
            2 * size,
            np.array([2 * inner.Get_rank()], np.int32),
            np.ones(1, np.float32),
            np.ones(size, np.int64),
        )

        def tiny_call() -> None:
            channel.allgather_array(row)
            _sparse.split_allgather(problem)

        # alpha_pair, beta_pair: one-element and 256 KiB swaps between partners r and
        # r ^ 1 (a rank without a partner, when P is odd, measures nothing: zero).
        partner = inner.Get_rank() ^ 1
        paired = partner < size
        one, other = np.zeros(1, np.float32), np.zeros(1, np.float32)
        big_one, big_other = np.zeros(1 << 16, np.float32), np.zeros(1 << 16, np.float32)
        block = np.zeros(1 << 16, np.float32)  # beta: 256 KiB per rank to every peer
        counts = np.full(size, block.size, np.int64)
        # beta_allreduce from 16 MiB: MPI's large-message schedule (smaller buffers
        # overstate its per-byte time by up to 1.7x, steering auto away from dense).
        buffer = np.zeros(1 << 22, np.float32)
        reduced = np.empty_like(buffer)
        probes = {
            "steps": tiny_call,
            "swap": lambda: (
                paired and channel.transfer([(one, partner, 99)], [(other, partner, 99)])
            ),
            "big_swap": lambda: (
                paired and channel.transfer([(big_one, partner, 98)], [(big_other, partner, 98)])
            ),
            "exchange": lambda: channel.allgatherv(block, counts),
            "allreduce": lambda: inner.Allreduce(buffer, reduced),
        }
        # Interleaved, each after a barrier, and the fastest of the repeats kept: a
        # shared machine's load then shifts no constant against the others, so the
        # comparisons auto makes stay fair (min estimates the undisturbed cost).
        samples: dict[str, list[float]] = {name: [] for name in probes}
        for repeat in range(repeats + 1):
            for name, probe in probes.items():
                inner.Barrier()
                begin = time.perf_counter()
                probe()
                if repeat:  # the first round warms up
                    samples[name].append(time.perf_counter() - begin)
        best = {name: min(times) for name, times in samples.items()}
        alpha = best["steps"] / 5
        alpha_pair = best["swap"] if paired else 0.0

        # A large transfer's time is mostly bandwidth.  alpha comes from other, tiny
        # probes; on a loaded machine it can exceed a large probe's time, and plain
        # subtraction would leave a zero (free) bandwidth term that makes auto pick
        # byte-heavy algorithms.  So at least half of each large probe counts as bytes.
        def per_byte(seconds: float, latency: float, nbytes: int) -> float:
            return max(seconds - latency, seconds / 2) / nbytes

        beta_pair = per_byte(best["big_swap"], alpha_pair, big_one.nbytes) if paired else 0.0
        beta = per_byte(best["exchange"], alpha, (size - 1) * block.nbytes)
        beta_allreduce = per_byte(best["allreduce"], alpha, buffer.nbytes)
    else:
        alpha = alpha_pair = beta = beta_pair = beta_allreduce = 0.0
    local = np.array([alpha, beta, beta_allreduce, merge, dense, alpha_pair, beta_pair])
    agreed = np.empty_like(local)
    inner.Allreduce(local, agreed, op=MPI.MAX)
    alpha, beta, beta_allreduce, merge, dense, alpha_pair, beta_pair = (float(v) for v in agreed)
    model = CostModel(
        alpha,
        beta,
        beta_allreduce,
        merge,
        dense,
        calibration_seconds=time.perf_counter() - start,
        alpha_pair=alpha_pair,
        beta_pair=beta_pair,
    )
    state.model = model
    _GROUP_MODELS[_group_key(comm)] = model
    return model


# Models by the set of processes they were measured on: a duplicate of a communicator
# (a reducer's private one, say) reuses its model instead of measuring afresh, so two
# communicators over the same processes predict, choose, and sum alike.
_GROUP_MODELS: dict[tuple[int, ...], CostModel] = {}


def _group_key(comm: MPI.Comm) -> tuple[int, ...]:
    """The ranks in ``MPI.COMM_WORLD`` of ``comm``'s processes, in ``comm``'s order."""
    if comm.Is_inter():
        return (-1, id(comm))  # intercommunicators are not shared
    group, world = comm.Get_group(), MPI.COMM_WORLD.Get_group()
    try:
        ranks = MPI.Group.Translate_ranks(group, list(range(group.Get_size())), world)
    finally:
        group.Free()
        world.Free()
    return tuple(int(r) for r in ranks)


def cost_model(comm: MPI.Comm | None = None) -> CostModel:
    """The cached cost model of ``comm``, calibrating on first use (collective then).

    A model measured on another communicator over the same processes (``comm`` itself
    before a ``Dup``, for example) is reused: the key is the processes' ranks in
    ``MPI.COMM_WORLD``, the same on every rank, so all ranks reuse or measure together.
    """
    comm = MPI.COMM_WORLD if comm is None else comm
    state = comm_state(comm)
    if state.model is None:
        shared = _GROUP_MODELS.get(_group_key(comm))
        if shared is None:
            return calibrate(comm)
        state.model = shared
    return state.model


def set_cost_model(comm: MPI.Comm, model: CostModel) -> None:
    """Install a model (for example one saved from an earlier run) without measuring.

    Every rank must install the same model, or ``auto`` may choose differently on
    different ranks; the next call then fails the signature check instead of hanging.
    """
    comm_state(comm).model = model


def choose(
    model: CostModel,
    n: int,
    k_all,
    itemsize: int,
    index_itemsize: int,
    candidates: tuple[str, ...] = ALL_ALGORITHMS,
) -> tuple[str, dict[str, float]]:
    """The candidate with the least predicted time, and every candidate's prediction.

    The output conversion is left out: it is one dense pass whichever algorithm ran, so
    it cannot change the choice (and ranks may ask for different output forms).
    """
    predicted = {
        name: predict(name, n, k_all, itemsize, index_itemsize, None).time(model)
        for name in candidates
    }
    return min(predicted, key=predicted.__getitem__), predicted


# ------------------------------------------------------------------ quantized schedules
#
# The schedules of sparcomm.comm._quantized (``P`` ranks, ``n`` elements, ``C(m)`` the
# payload bytes of ``m`` elements, ``m_j`` the owners' chunks; per rank):
#
# * ``allgather`` -- allgather of ``P`` payloads: ``(P - 1) C(n)`` each way; decode
#   ``P n`` elements.
# * ``reduce_scatter_allgather`` -- ``Alltoallv`` of chunk payloads, then an allgather
#   of the owners' re-encoded chunks: about ``2 (P - 1) / P C(n)`` each way; decode
#   ``2 n``, encode ``n + n / P``.
# * ``shared_scale`` (codecs with ``shares_scale``: TernGrad) -- a max-``Allreduce`` of
#   the scales, ``Alltoallv`` of the 2-bit codes and an allgather of the sums,
#   ``ceil(log2(2P + 1))`` bits each: about ``(P - 1) / P n (2 + ceil(log2(2P + 1))) / 8``
#   bytes each way.
#
# Their codec work is priced per element by CodecCosts, which codec_costs measures once
# per communicator, codec and dtype (every rank agrees on the maximum, so every rank
# predicts the same and ``auto`` chooses alike everywhere).


def candidates(codec: Any, size: int) -> tuple[str, ...]:
    """The algorithms that can run ``codec`` on ``size`` ranks."""
    if codec.shares_scale and size <= MAX_INT16_RANKS:
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
        ``out += decode(payload)`` as the sums run it: for codecs that fuse it, one more
        payload in the collectives' sum (``_sums.decode_sum``: QSGD's and OneBit's fused host
        kernel adds it to a block in cache), a decode and an add for the others.
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


def _alltoall(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank (sent, received) of an ``Alltoallv`` where ``parts[r, j]`` goes r -> j."""
    parts = np.array(parts, dtype=np.float64)
    np.fill_diagonal(parts, 0.0)
    return parts.sum(axis=1), parts.sum(axis=0)


def predict_quantized(algorithm: str, codec: Any, n: int, dtype: Any, size: int) -> Prediction:
    """The schedule of ``algorithm`` for the bare codec ``codec`` on ``size`` ranks.

    Parameters
    ----------
    algorithm : str
        One of :data:`QUANTIZED_ALGORITHMS`.
    codec : Codec
        The bare codec of the quantized family (without error feedback: it changes no
        byte).
    n : int
        Elements of the vector.
    dtype : numpy.dtype
        float32 or float64.
    size : int
        Number of ranks.
    """
    known = (*QUANTIZED_ALGORITHMS, *HALF_ALGORITHMS)
    if algorithm not in known:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {known}")
    dtype = np.dtype(dtype)
    log = math.ceil(math.log2(size)) if size > 1 else 0
    prediction = Prediction(algorithm)
    add = prediction.phases.append
    zeros = np.zeros(size)
    add(Phase("check", log, *_ring(np.full(size, SIGNATURE_BYTES), size)))
    if algorithm == "allgather":
        payload = STATUS_BYTES + chunk_nbytes(codec, n, dtype)
        add(Phase("encode", 0, zeros, zeros, compute={"encode": n}))
        add(Phase("allgather", size - 1, *_direct(np.full(size, payload), size)))
        add(Phase("decode", 0, zeros, zeros, compute={"decode": n, "decode_add": (size - 1) * n}))
        return prediction
    if algorithm == "pipelined":  # float16 values, no status in the blocks
        lengths = np.diff(ring_chunk_bounds(n, size))
        chunk = 2.0 * lengths
        busiest = float(lengths.max())
        prediction.segments = half_segment_count(n, size)  # as half_allreduce cuts
        add(Phase("encode", 0, zeros, zeros, compute={"encode": n}))
        add(Phase("reduce_scatter", size - 1, *_alltoall(np.tile(chunk, (size, 1)))))
        compute = {"decode": busiest, "decode_add": (size - 1) * busiest, "encode": busiest}
        add(Phase("owner_sum", 0, zeros, zeros, compute=compute))
        add(Phase("allgather", size - 1, *_direct(chunk, size)))
        status = float(ring_allreduce_bytes(8, size))
        add(Phase("status", 2 * log, np.full(size, status), np.full(size, status)))
        add(Phase("decode", 0, zeros, zeros, compute={"decode": n}))
        return prediction
    if algorithm == "reduce_scatter_allgather":
        bounds = chunk_bounds(n, size, chunk_alignment(codec))
        lengths = np.diff(bounds)
        chunk = STATUS_BYTES + np.array(
            [chunk_nbytes(codec, int(m), dtype) for m in lengths], dtype=float
        )
        busiest = float(lengths.max())
        add(Phase("encode", 0, zeros, zeros, compute={"encode": n}))
        add(Phase("reduce_scatter", size - 1, *_alltoall(np.tile(chunk, (size, 1)))))
        add(
            Phase(
                "owner_sum",
                0,
                zeros,
                zeros,
                compute={"decode": busiest, "decode_add": (size - 1) * busiest, "encode": busiest},
            )
        )
        add(Phase("allgather", size - 1, *_direct(chunk, size)))
        add(Phase("decode", 0, zeros, zeros, compute={"decode": n}))
        return prediction
    if not codec.shares_scale:
        raise NotImplementedError(
            f"algorithm 'shared_scale' sums ternary values as integers (TernGrad's "
            f"scaler sharing); {type(codec).__name__} has no shared scale: use 'allgather' or "
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
    add(Phase("scale", 0, zeros, zeros, compute={"add": n}))
    add(
        Phase(
            "scale_allreduce",
            2 * log,
            np.full(size, scale_bytes),
            np.full(size, scale_bytes) if size > 1 else zeros,
        )
    )
    add(Phase("encode", 0, zeros, zeros, compute={"encode": n}))
    add(Phase("reduce_scatter", size - 1, *_alltoall(np.tile(codes, (size, 1)))))
    add(
        Phase(
            "integer_sum",
            0,
            zeros,
            zeros,
            compute={"accumulate": size * busiest, "pack": busiest},
        )
    )
    add(Phase("allgather", size - 1, *_direct(sums, size)))
    add(Phase("output", 0, zeros, zeros, compute={"expand": n}))
    return prediction


def choose_quantized(
    model: CostModel,
    costs: CodecCosts,
    codec: Any,
    n: int,
    dtype: Any,
    size: int,
    names: tuple[str, ...] | None = None,
) -> tuple[str, dict[str, float]]:
    """The candidate with the least predicted time, and every candidate's prediction
    (``names``: the candidates, by default :func:`candidates`)."""
    predicted = {
        name: predict_quantized(name, codec, n, dtype, size).time(model, costs)
        for name in (candidates(codec, size) if names is None else names)
    }
    return min(predicted, key=predicted.__getitem__), predicted


_CODEC_KEYVAL: int | None = None


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
        # As the collectives' sums run it: the cost of one more payload in decode_sum
        # (one fused pass for QSGD and OneBit on the host, accumulate=1 decodes else).
        parts = [payload] * 4
        decode_sum(codec, parts, out)  # compiles or loads the fused kernel
        summed = _median_time(lambda: decode_sum(codec, parts, out), repeats)
        decode_add = max(summed - decode, 0.0) / (len(parts) - 1)
    else:
        decode_add = decode + add
    accumulate = pack = expand = 0.0
    if codec.shares_scale:
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
    global _CODEC_KEYVAL
    if _CODEC_KEYVAL is None:
        _CODEC_KEYVAL = MPI.Comm.Create_keyval()
    cache = cast("dict[tuple[str, str], CodecCosts] | None", comm.Get_attr(_CODEC_KEYVAL))
    if cache is None:
        cache = {}
        comm.Set_attr(_CODEC_KEYVAL, cache)
    entry = (describe, np.dtype(dtype).str)
    if entry not in cache:
        local = _measure(codec, np.dtype(dtype), repeats).as_array()
        agreed = np.empty_like(local)
        comm.Allreduce(local, agreed, op=MPI.MAX)
        cache[entry] = CodecCosts(*(float(v) for v in agreed))
    return cache[entry]


# ------------------------------------------------------------------ local work of a call

_LOCAL_COSTS: dict[tuple[str, str, bool], CodecCosts] = {}


def local_seconds(codec: Any, n: int, dtype: Any, model: CostModel) -> float:
    """Predicted seconds of a sparse codec call's local work, beside its exchange: the
    encode (``codec.encode`` timed once per codec and dtype on this rank, plus error
    feedback's add pass) and the dense n-element output (one pass of ``model.dense``).

    Local on purpose (no agreement): it shifts every candidate alike, so it never
    changes ``auto``'s choice; it makes ``AllreduceStats.predicted`` comparable with
    the measured call.
    """
    from sparcomm.comm._protocol import describe_codec
    from sparcomm.feedback import unwrap

    bare, memory = unwrap(codec)
    # A codec that takes a level (TopK's density under a schedule) is timed once per
    # class, not per level: a density ramp would time every step's new density (most of
    # the step, measured) and grow this cache without bound, while the encode's cost per
    # element barely depends on the level.
    leveled = getattr(bare, "level_parameter", None) is not None
    described = type(bare).__qualname__ if leveled else describe_codec(bare)
    entry = (described, np.dtype(dtype).str, memory is not None)
    costs = _LOCAL_COSTS.get(entry)
    if costs is None:
        try:
            costs = _measure(bare, np.dtype(dtype), 3)
        except Exception:  # a codec that cannot be timed alone: predict the exchange only
            costs = CodecCosts(0.0, 0.0, 0.0, 0.0)
        _LOCAL_COSTS[entry] = costs
    encode = costs.encode + (costs.add if memory is not None else 0.0)
    return n * (encode + model.dense)
