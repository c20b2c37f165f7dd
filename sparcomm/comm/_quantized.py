"""Allreduce of quantized gradients: QSGD, TernGrad, 1-bit SGD and FP16 over MPI.

Quantized values cannot be added in their packed form, so each algorithm decides where
the decoding and summing happens:

``allgather``
    Every rank gathers every rank's payload, decodes and sums them locally in rank
    order (the GRACE baseline: Xu et al., "GRACE: A Compressed Communication Framework
    for Distributed Machine Learning", ICDCS 2021).  Bytes grow as ``(P - 1) C``.
``reduce_scatter_allgather``
    Owner ``j`` holds chunk ``j`` of the vector.  Workers encode once and send each
    owner the slice of their payload for its chunk (``Alltoallv``); owners decode and
    sum at full precision in rank order, re-encode their chunk, and the encoded chunks
    are allgathered.  Error feedback at the worker *and* at the owner for codecs under
    error feedback (``OneBit()`` by default, ``ErrorFeedback(QSGD(...))`` on request), as
    in DeepSpeed's compressed allreduce (Tang et al., "1-bit Adam: Communication
    Efficient Large-Scale Training with Adam's Convergence Speed", ICML 2021).  Bytes
    ``~ 2 (P - 1) / P C``.
``pipelined`` (plain ``FP16`` only; a device input is staged to the host once)
    The reduce-scatter + allgather above with float16 values on the wire and no payload
    framing, pipelined in segments (:func:`sparcomm.comm._ring.half_allreduce`): the
    same float32 sums in rank order, rounded once, so the result is bit for bit
    ``reduce_scatter_allgather``'s, with one encode and one decode pass and no copies
    into payload buffers.  (Plain ``FP16``'s ``allgather`` rounds its sum once too, so
    its three algorithms agree bit for bit and ``auto`` may measure and pick any.)  A
    non-finite input or an owner's overflow travels as one
    rank number in a nonblocking reduction beside the gather; every rank raises.
``shared_scale`` (TernGrad only)
    TernGrad's scaler sharing (Wen et al., NeurIPS 2017): one max-``Allreduce`` of the
    per-bucket scales, every rank ternarizes with the shared scale, owners add the
    ternary values of all ranks *exactly* as small integers (int8 up to 127 ranks,
    int16 above), the sums are allgathered bit-packed, and every rank multiplies by the
    scale once.  No second quantization.

The result is bitwise identical on every rank: every entry of it is decoded from the
same bytes, by the same code, in the same order, on every rank.  Random streams use the
rank and distinct keys (:func:`~sparcomm.comm._quantized_layout.owner_key` for owners),
so ranks draw independent numbers.

Failures cannot hang the others: the call begins with the signature check of
:mod:`sparcomm.comm._allreduce`, and every data block carries an 8-byte status (the rank
that failed and its error class) so that an encode failing on one rank after the check
(non-finite input, a sum that overflows at an owner) is raised on every rank at the end
of the schedule, which all ranks complete.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from mpi4py import MPI

from sparcomm._backend import array_module, kernels_for
from sparcomm._errors import NonFiniteError, non_finite_error
from sparcomm.comm import _cost, _ring, _tune
from sparcomm.comm._call import Local, begin_call
from sparcomm.comm._context import Channel, ring_allreduce_bytes
from sparcomm.comm._device import (
    DeviceStaging,
    dense_to_device,
    device_output,
    divide,
    is_device,
    payloads_to_device,
)
from sparcomm.comm._protocol import (
    ERROR_CODES,
    QUANTIZED_ALGORITHM_CODES,
    STATUS_BYTES,
    code,
    describe_codec,
    error_code,
    first_failure,
    raise_failure,
    write_status,
)
from sparcomm.comm._quantized_layout import (
    SHARED_SCALE_ALIGNMENT,
    TERNARY_BITS,
    apply_scales,
    chunk_alignment,
    chunk_bounds,
    chunk_nbytes,
    expand_sums,
    owner_key,
    pack_sums,
    sum_dtype,
    sums_nbytes,
    ternary_accumulate,
)
from sparcomm.comm._stats import AllreduceStats
from sparcomm.comm._sums import decode_sum
from sparcomm.comm._validate import (
    check_common,
    check_no_partial_overlap,
    check_out,
    check_tensor,
)
from sparcomm.feedback import ErrorFeedback, unwrap
from sparcomm.payload import Payload

_REQUESTABLE = ("auto", *_cost.QUANTIZED_ALGORITHMS, *_cost.HALF_ALGORITHMS)


# ------------------------------------------------------------------ scratch

_KEYVAL: int | None = None


class _Scratch:
    """Work buffers reused from call to call on one communicator, grown on demand.

    A fresh multi-megabyte array costs a page fault per 4 KiB on first touch, which at
    n = 2^24 is a sizeable part of a collective; the buffers never leave this module
    (results are written to the caller's ``out`` or a fresh array).  One set per private
    communicator: calls on one communicator are ordered, as MPI requires.
    """

    def __init__(self) -> None:
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    def get(self, name: str, size: int, dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        array = self._arrays.get((name, dtype.str))
        if array is None or array.size < size:
            array = np.empty(size, dtype=dtype)
            self._arrays[(name, dtype.str)] = array
        return array[:size]


def _scratch(comm: MPI.Comm) -> _Scratch:
    global _KEYVAL
    if _KEYVAL is None:
        _KEYVAL = MPI.Comm.Create_keyval()
    scratch = cast("_Scratch | None", comm.Get_attr(_KEYVAL))
    if scratch is None:
        scratch = _Scratch()
        comm.Set_attr(_KEYVAL, scratch)
    return scratch


# ------------------------------------------------------------------ problem


@dataclass
class _Problem:
    """One rank's input to a quantized algorithm."""

    channel: Channel
    codec: Any  # the bare codec
    memory: ErrorFeedback | None  # worker- and owner-side residuals, if any
    x: np.ndarray  # the user's array, flattened
    key: Any
    step: int | None
    out: np.ndarray  # flat result buffer, n elements (host memory, also for CuPy inputs)
    scratch: _Scratch
    staging: DeviceStaging | None = None  # set for CuPy inputs: device payloads go through it
    device_out: Any = None  # CuPy inputs: the flat device result, where the decodes can go
    result_on_device: bool = False  # set by an algorithm that decoded into device_out
    # Plain FP16 (plain_half): allgather rounds its sum to float16 as the owners do.
    round_half: bool = False

    @property
    def n(self) -> int:
        return self.x.size

    @property
    def dtype(self) -> np.dtype:
        return self.x.dtype

    def encode(self, values: np.ndarray, key: Any, **options: Any) -> Payload:
        """Encode through the error-feedback memory when there is one."""
        encoder = self.codec if self.memory is None else self.memory
        payload = encoder.encode(values, key=key, step=self.step, rank=self.channel.rank, **options)
        if self.staging is not None and is_device(values):
            # Encoded on the device; the rest of the algorithm runs on the host.
            payload = self.staging.payload_to_host(payload, "payload")
        return payload


def _allgatherv(problem: _Problem, send: np.ndarray, counts: np.ndarray):
    """``Channel.allgatherv`` into a reused receive buffer: (buffer, block offsets)."""
    counts = np.asarray(counts, dtype=np.int64)
    recv = problem.scratch.get("gathered", int(counts.sum()), send.dtype)
    return problem.channel.allgatherv_many([send], [counts], recvs=[recv])[0]


def _alltoallv(problem: _Problem, send, send_counts, send_offsets, recv_counts):
    """``Channel.alltoallv`` into a reused receive buffer: (buffer, block offsets)."""
    recv = problem.scratch.get("received", int(np.sum(recv_counts)), send.dtype)
    item = (send, send_counts, send_offsets, recv_counts)
    return problem.channel.alltoallv_many([item], recvs=[recv])[0]


def _exchange_counts(blocks: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Send counts and offsets of an ``Alltoallv`` that sends ``blocks[j]`` bytes to j."""
    counts = blocks.astype(np.int64)
    counts[rank] = 0
    offsets = np.zeros(counts.size, dtype=np.int64)
    np.cumsum(counts[:-1], out=offsets[1:])
    return counts, offsets


# ------------------------------------------------------------------ allgather


def allgather(problem: _Problem) -> None:
    """Gather every payload, decode and sum in rank order (GRACE's baseline)."""
    channel, codec = problem.channel, problem.codec
    stats, size, rank = channel.stats, channel.size, channel.rank
    block = STATUS_BYTES + chunk_nbytes(codec, problem.n, problem.dtype)
    send = problem.scratch.get("send", block, np.uint8)
    error: BaseException | None = None
    with stats._phase("encode"):
        try:
            problem.encode(problem.x, problem.key).to_bytes(out=send[STATUS_BYTES:])
            write_status(send, -1, 0)
        except Exception as caught:
            error = caught
            write_status(send, rank, error_code(caught))
    with stats._phase("allgather"):
        recv, offsets = _allgatherv(problem, send, np.full(size, block, dtype=np.int64))
    raise_failure(error, *first_failure(recv, offsets))
    with stats._phase("decode"):
        payloads = [
            Payload.from_bytes(recv[offsets[r] + STATUS_BYTES : offsets[r + 1]])
            for r in range(size)
        ]
        if problem.device_out is not None:
            # CuPy input: the compressed payloads go to the device, not the dense sum.
            decode_sum(codec, payloads_to_device(payloads, recv), problem.device_out, blocked=False)
            problem.result_on_device = True
            if problem.round_half:
                _round_half(problem.device_out, None)
            return
        decode_sum(codec, payloads, problem.out)
        if problem.round_half:
            _round_half(problem.out, problem.scratch.get("half_sum", problem.n, np.float16))


def _round_half(total: Any, half: Any) -> None:
    """Plain ``FP16``'s result whatever the algorithm: the rank-order sum rounded once to
    float16, as the owners of ``reduce_scatter_allgather`` and ``pipelined`` send it, so
    all three give the same bits (and ``auto`` may pick any).  The sum is the same on
    every rank, so an overflow is found, and raised, on every rank alike."""
    xp = array_module(total)
    if half is None:
        half = xp.empty(total.size, dtype=xp.float16)
    kernels = kernels_for(xp)
    with np.errstate(over="ignore"):
        bad = int(kernels.fp16_encode(total, half))
    if bad:
        raise NonFiniteError(
            f"allreduce: the sum of the FP16 values has {bad} non-finite entries (beyond "
            "float16's range, +-65504); expected sums within it; the result was discarded "
            "on every rank; scale the gradients down (op='mean', a loss scale) or use a "
            "codec with a wider range"
        )
    kernels.fp16_decode(half, total, 0)


# ----------------------------------------------------- reduce-scatter + allgather


def reduce_scatter_allgather(problem: _Problem) -> None:
    """Owners sum their chunk at full precision and re-encode it (DeepSpeed's scheme)."""
    channel, codec = problem.channel, problem.codec
    stats, size, rank = channel.stats, channel.size, channel.rank
    bounds = chunk_bounds(problem.n, size, chunk_alignment(codec))
    lengths = np.diff(bounds)
    blocks = STATUS_BYTES + np.array(
        [chunk_nbytes(codec, int(m), problem.dtype) for m in lengths], dtype=np.int64
    )
    send_counts, send_offsets = _exchange_counts(blocks, rank)
    send = problem.scratch.get("send", int(send_counts.sum()), np.uint8)
    parts: list[Payload | None] = [None] * size
    error: BaseException | None = None
    with stats._phase("encode"):
        try:
            payload = problem.encode(problem.x, problem.key)
            for j in range(size):
                if lengths[j]:
                    parts[j] = codec.slice_payload(payload, int(bounds[j]), int(bounds[j + 1]))
            for j in range(size):
                if j != rank:
                    target = send[send_offsets[j] : send_offsets[j] + send_counts[j]]
                    write_status(target, -1, 0)
                    part = parts[j]
                    if part is not None:
                        part.to_bytes(out=target[STATUS_BYTES:])
        except Exception as caught:
            error = caught
            for j in range(size):
                if j != rank:
                    write_status(send[send_offsets[j] :], rank, error_code(caught))
    recv_counts = np.where(np.arange(size) == rank, 0, blocks[rank]).astype(np.int64)
    with stats._phase("reduce_scatter"):
        recv, recv_offsets = _alltoallv(problem, send, send_counts, send_offsets, recv_counts)
    mine = problem.scratch.get("mine", int(blocks[rank]), np.uint8)
    failed, code = (rank, error_code(error)) if error else first_failure(recv, recv_offsets)
    with stats._phase("owner_sum"):
        if failed < 0 and lengths[rank]:
            try:
                own = parts[rank]
                assert own is not None  # this rank's chunk is not empty
                received = [
                    own
                    if r == rank
                    else Payload.from_bytes(
                        recv[recv_offsets[r] + STATUS_BYTES : recv_offsets[r + 1]]
                    )
                    for r in range(size)
                ]
                total = problem.scratch.get("total", int(lengths[rank]), problem.dtype)
                decode_sum(codec, received, total)
                reencoded = problem.encode(total, owner_key(problem.key))
                reencoded.to_bytes(out=mine[STATUS_BYTES:])
            except Exception as caught:
                error = caught
                failed, code = rank, error_code(caught)
        write_status(mine, failed, code)
    with stats._phase("allgather"):
        gathered, offsets = _allgatherv(problem, mine, blocks)
    raise_failure(error, *first_failure(gathered, offsets))
    with stats._phase("decode"):
        chunks = [
            Payload.from_bytes(gathered[offsets[j] + STATUS_BYTES : offsets[j + 1]])
            for j in range(size)
            if lengths[j]
        ]
        target = problem.out
        if problem.device_out is not None:  # CuPy input: decode the chunks on the device
            chunks = payloads_to_device(chunks, gathered)
            target = problem.device_out
            problem.result_on_device = True
        owners = [j for j in range(size) if lengths[j]]
        for j, chunk in zip(owners, chunks, strict=True):
            codec.decode(chunk, out=target[bounds[j] : bounds[j + 1]])


# ------------------------------------------------------------------ shared scale


def _compensated(problem: _Problem) -> Any:
    """``x + residual`` as error feedback will encode it (the scale must cover it)."""
    flat = problem.x.reshape(-1)
    residual = None if problem.memory is None else problem.memory.residual_for(problem.key, flat)
    if residual is None:
        return flat
    xp = array_module(flat)
    compensated = xp.empty_like(flat)
    # The kernel layer's add, the one ErrorFeedback uses: same bits on both devices.
    kernels_for(xp).add(flat, residual, compensated)
    return compensated


def shared_scale(problem: _Problem) -> None:
    """TernGrad with scaler sharing: ternary values of all ranks summed as integers."""
    channel, codec = problem.channel, problem.codec
    stats, size, rank = channel.stats, channel.size, channel.rank
    n, dtype = problem.n, problem.dtype
    bucket = codec.bucket_for(n)
    error: BaseException | None = None
    with stats._phase("scale"):
        try:
            local = codec.local_scales(_compensated(problem))
            if is_device(local):
                local = local.get()  # one scale per bucket: the scale allreduce is on the host
        except Exception as caught:
            # An infinite scale is the in-band failure signal of this phase.
            error = caught
            local = np.full(-(-n // bucket), np.inf, dtype=dtype)
    with stats._phase("scale_allreduce"):
        shared = np.empty_like(local)
        if size > 1:
            channel.comm.Allreduce(local, shared, op=MPI.MAX)
            moved = ring_allreduce_bytes(local.nbytes, size)
            stats._add_bytes(moved, moved)
        else:
            shared[:] = local
    if error is not None:
        raise error
    if not np.isfinite(shared).all():
        raise ValueError(
            "allreduce: another rank rejected its input (non-finite values or a bad "
            "residual), so the shared TernGrad scale is not finite; that rank's own message "
            "says why; no ternary values were exchanged"
        )
    with stats._phase("encode"):
        # Cannot fail: the scale is finite and covers every rank's compensated input.
        packed = problem.encode(problem.x, problem.key, scale=shared).arrays["packed"]
    bounds = chunk_bounds(n, size, SHARED_SCALE_ALIGNMENT)
    lengths = np.diff(bounds)
    code_bytes = -(-lengths * TERNARY_BITS // 8)
    starts = bounds[:-1] * TERNARY_BITS // 8
    send_counts, send_offsets = _exchange_counts(code_bytes, rank)
    send = problem.scratch.get("send", int(send_counts.sum()), np.uint8)
    for j in range(size):
        if j != rank:
            send[send_offsets[j] : send_offsets[j] + send_counts[j]] = packed[
                starts[j] : starts[j] + code_bytes[j]
            ]
    recv_counts = np.where(np.arange(size) == rank, 0, code_bytes[rank]).astype(np.int64)
    with stats._phase("reduce_scatter"):
        recv, recv_offsets = _alltoallv(problem, send, send_counts, send_offsets, recv_counts)
    length = int(lengths[rank])
    gather_bytes = np.array([sums_nbytes(int(m), size) for m in lengths], dtype=np.int64)
    mine = problem.scratch.get("mine", int(gather_bytes[rank]), np.uint8)
    with stats._phase("integer_sum"):
        if length:
            total = problem.scratch.get("sums", length, sum_dtype(size))
            total[:] = 0
            codes = problem.scratch.get("codes", length, np.uint8)
            ones = problem.scratch.get("ones", length, np.uint8)
            for r in range(size):
                part = (
                    packed[starts[rank] : starts[rank] + code_bytes[rank]]
                    if r == rank
                    else recv[recv_offsets[r] : recv_offsets[r + 1]]
                )
                ternary_accumulate(part, total, codes, ones)
            pack_sums(total, size, codes, mine)
    with stats._phase("allgather"):
        gathered, offsets = _allgatherv(problem, mine, gather_bytes)
    with stats._phase("output"):
        fields = problem.scratch.get("codes", n, np.uint8)
        for j in range(size):
            a, b = int(bounds[j]), int(bounds[j + 1])
            if b > a:
                expand_sums(
                    gathered[offsets[j] : offsets[j + 1]], size, fields[a:b], problem.out[a:b]
                )
        apply_scales(problem.out, shared, bucket)


# ------------------------------------------------------------------ pipelined (FP16)


#: The codec class ``pipelined`` runs, by module and name (comm reads codecs, never
#: imports their classes: tests/test_imports.py).
_HALF_CODEC = ("sparcomm.codecs.baselines", "FP16")


def plain_half(bare: Any, memory: Any) -> bool:
    """Whether ``pipelined`` can run the codec: ``FP16`` itself (not a subclass, whose
    encode may differ), without error feedback (it needs owner-side residuals)."""
    cls = type(bare)
    return (cls.__module__, cls.__qualname__) == _HALF_CODEC and memory is None


def pipelined(problem: _Problem) -> None:
    """Float16 on the wire, summed in float32 by the owners (``_ring.half_allreduce``)."""
    channel = problem.channel
    stats = channel.stats
    with stats._phase("exchange"):
        sent, received, bad, failed = _ring.half_allreduce(
            channel.comm, problem.x, problem.out, scratch=problem.scratch.get
        )
    status = ring_allreduce_bytes(8, channel.size)  # the failed-rank reduction
    stats._add_bytes(sent + status, received + status)
    if failed >= 0:
        own = non_finite_error(bad) if bad else None
        raise_failure(own, failed, ERROR_CODES[NonFiniteError])


ALGORITHMS = {
    "allgather": allgather,
    "reduce_scatter_allgather": reduce_scatter_allgather,
    "shared_scale": shared_scale,
    "pipelined": pipelined,
}


# ------------------------------------------------------------------ entry point


def _check_request(
    x: np.ndarray, bare: Any, algorithm: str, op: str, size: int, memory: Any, device: bool
) -> None:
    if getattr(bare, "family", None) != "quantized":
        raise NotImplementedError(
            f"the quantized allreduce takes codecs of the quantized family, got "
            f"{type(bare).__name__} (family {getattr(bare, 'family', None)!r})"
        )
    check_common(op, algorithm, _REQUESTABLE)
    if algorithm == "shared_scale":
        if not bare.shares_scale:
            raise NotImplementedError(
                f"algorithm 'shared_scale' sums ternary values as integers (TernGrad's "
                f"scaler sharing); {type(bare).__name__} has no shared scale: use 'allgather' or "
                "'reduce_scatter_allgather'"
            )
        sum_dtype(size)
    if algorithm == "pipelined" and not plain_half(bare, memory):
        raise NotImplementedError(
            f"algorithm 'pipelined' runs plain FP16() (no error feedback), got "
            f"{describe_codec(bare if memory is None else ErrorFeedback(bare))}: use "
            "'reduce_scatter_allgather' or 'auto'"
        )
    if x.size == 0:
        raise ValueError(f"x is empty (shape {x.shape}); there is nothing to reduce: skip it")


def _predicted(
    state: Any, comm: MPI.Comm, bare: Any, memory: Any, n: int, dtype: np.dtype, size: int
) -> tuple[tuple, dict[str, float]]:
    """``auto``'s tuner key and the model's seconds for every candidate, predicted once
    per shape: a training loop calls the same shapes every step, and predicting the
    candidates' schedules took 0.3 ms of a 3 ms call (QSGD, 2^16 elements, 4 ranks).
    A new model (``calibrate``, ``set_cost_model``) is a new entry; the codec's kernel
    costs are measured once per description and dtype (``_cost.codec_costs``)."""
    text = describe_codec(bare)
    fitted = _cost.cost_model(comm)
    entry = ("quantized", fitted, text, memory is None, n, dtype.str)
    cached = state.choices.get(entry)
    if cached is None:
        costs = _cost.codec_costs(state.comm, bare, dtype, text)
        names = _cost.candidates(bare, size)
        if plain_half(bare, memory):
            # Plain FP16: every algorithm gives the same bits (see allgather), so the
            # choice is free; a device input's pipeline is staged to the host once.
            names = (*names, "pipelined")
        _, predicted = _cost.choose_quantized(fitted, costs, bare, n, dtype, size, names)
        shape = ("quantized", text, memory is None, n, dtype.str, fitted.fingerprint())
        if len(state.choices) > 4096:
            state.choices.clear()
        cached = state.choices[entry] = (shape, predicted)
    return cached


def _predicted_bytes(
    name: str, bare: Any, n: int, dtype: np.dtype, size: int, rank: int
) -> tuple[int, int]:
    return _cost.predict_quantized(name, bare, n, dtype, size).bytes(rank)


def quantized_allreduce(
    x: Any,
    codec: Any,
    *,
    comm: MPI.Comm | None,
    op: str,
    algorithm: str,
    key: Any,
    step: int | None,
    stats: AllreduceStats | None,
    out: Any,
) -> np.ndarray:
    """Allreduce ``x`` through a quantizing codec (``sparcomm.allreduce`` routes here).

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64
        This rank's buffer (same size and dtype on every rank).
    codec : a codec of the quantized family (QSGD, TernGrad, OneBit, FP16, or your
        own), optionally under ErrorFeedback
        ``OneBit()`` keeps its own error feedback; its memory (or the ``ErrorFeedback``
        wrapper's) also holds the owner-side residuals of ``reduce_scatter_allgather``
        under :func:`~sparcomm.comm._quantized_layout.owner_key`, so ``state_dict()``
        saves both levels.
    comm : mpi4py.MPI.Comm or None
        Communicator (``MPI.COMM_WORLD`` by default).
    op : {"sum", "mean"}
    algorithm : {"auto", "allgather", "reduce_scatter_allgather", "shared_scale", "pipelined"}
        ``auto`` chooses by the cost model, then by measurement (:mod:`._tune`);
        ``shared_scale`` is for codecs that share a scale (``shares_scale``: TernGrad).
    key, step :
        Tensor key (residual and random stream) and training step (random stream).
    stats : AllreduceStats, optional
        Filled in place: algorithm, bytes sent and received, time per phase, the
        predicted bytes and, for ``auto``, each candidate's predicted time.
    out : numpy.ndarray, optional
        Output buffer (``x``'s size and dtype; ``out=x`` works in place).

    Returns
    -------
    numpy.ndarray
        The reduced array shaped like ``x``, bitwise identical on every rank.
    """
    call = begin_call(comm, stats)
    state, stats, channel = call.state, call.stats, call.channel
    bare, memory = unwrap(codec)
    device = is_device(x)

    def prepare() -> Local:
        array = check_tensor(x, "x")
        _check_request(array, bare, algorithm, op, channel.size, memory, device)
        check_out(out, array.size, array.dtype, device)
        check_no_partial_overlap(out, array)
        return Local(array.size, array.dtype, 0, array.size)

    model = state.model if algorithm == "auto" else None
    call.agree(
        prepare,
        codec_text=describe_codec(codec),
        algorithm=code(QUANTIZED_ALGORITHM_CODES, algorithm),
        op=op,
        model_fingerprint=model.fingerprint() if model else 0,
        steady=True,
    )
    if call.failed:  # steady state: take part with zeros, every rank raises at settle
        _, _, algorithm, op = call.agreed()
        x, out, device = call.placeholder(), None, False
    n, dtype = x.size, x.dtype
    size, rank = channel.size, channel.rank
    stats.requested, stats.size, stats.n = algorithm, size, n
    stats.itemsize, stats.k, stats.k_all = dtype.itemsize, n, [n] * size
    stats.nnz, stats.fill = n, 1.0
    if algorithm != "auto":
        name = algorithm
    elif size == 1:
        name = "allgather"  # every algorithm is one local encode and decode at P = 1
    else:
        with stats._phase("choose"):
            shape, predicted = _predicted(state, call.comm, bare, memory, n, dtype, size)
            stats.predicted = dict(predicted)
            # The model proposes, the calls decide (sparcomm.comm._tune).
            call.tuning = _tune.tuner_of(state).decide(shape, predicted, call.started)
            name, stats.tuning = call.tuning.name, call.tuning.mode
            stats.measured = dict(call.tuning.medians)
    stats.algorithm = name
    # Computed when read (stats.predicted_bytes), not in every call.
    stats._predictor = functools.partial(_predicted_bytes, name, bare, n, dtype, size, rank)
    result: Any
    if device:  # payloads are decoded on the device, or the sum copied there once
        flat = state.staging.host_buffer(n, dtype, "result")
        result = device_output(out, x.shape, dtype)
    else:
        result = np.empty(x.shape, dtype=dtype) if out is None else out
        flat = result.reshape(-1)
    source = x.reshape(-1)
    if device and name == "pipelined":  # the pipeline reads host memory: one copy
        source = state.staging.array_to_host(source, "pipelined")
    # Encode the flat view: payload sizes then follow chunk_nbytes (a 1-D header).
    problem = _Problem(
        channel,
        bare,
        # The placeholder never goes through error feedback: its encode would move this
        # rank's residual (worker and owner side) into a call whose result is discarded.
        None if call.failed else memory,
        source,
        key,
        step,
        flat,
        _scratch(state.comm),
        state.staging if device else None,
        result.reshape(-1) if device else None,
        round_half=plain_half(bare, memory),
    )
    try:
        ALGORITHMS[name](problem)
    except BaseException:
        call.drain()
        raise
    call.settle()  # no k to change here: raises or returns False
    with stats._phase("output"):
        if problem.result_on_device:
            if op == "mean":
                divide(problem.device_out, size)
        else:
            if op == "mean":
                flat /= dtype.type(size)
            if device:
                dense_to_device(flat, result)
    if call.tuning is not None:  # every rank got here: the call succeeded everywhere
        _tune.tuner_of(state).record(state.comm, call.tuning, stats)
    return result
