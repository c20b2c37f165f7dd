"""The dense family: an allreduce of the values themselves (no codec, ``NoCompression``).

Two algorithms: ``"mpi"``, MPI's own ``Allreduce``, and ``"ring"``, the pipelined ring
of :mod:`sparcomm.comm._ring` (reduce-scatter + allgather over nonblocking
point-to-point, segments summed while the next ones travel).  ``"auto"`` (and
``"dense"``) take the ring for host buffers of at least :data:`RING_MIN_BYTES` on more
than one rank, MPI otherwise: measured in the emulated cluster at 1 Gbit/s (MPICH 5.0
over libfabric's tcp provider), MPICH's ``Allreduce`` of the training benchmark's 16-24
MiB buckets took 1.12-1.46x gloo's allreduce whatever its algorithm CVAR, the ring of
``_ring`` 1.05-1.12x (docs/benchmarks.md, "Dense and FP16 against gloo").  The ring's
float sums are in ring order (documented in ``_ring``); every rank gets the same bits.

The input is copied into the output with the ``copy_finite`` kernel while preparing
(the copy MPI itself makes of a separate send buffer, with the non-finite count in the
same pass), and MPI reduces the output in place; ``out=x`` has no copy, so its check
is one read pass (``max_abs`` over the bit patterns: NaN and Inf beat every finite
value).  A rank's NaN or Inf is a :class:`~sparcomm.codecs._base.NonFiniteError` on
every rank through the agreement, before any data moves.  CuPy buffers go to a
CUDA-aware MPI as they are, or through one staged round trip in pinned host memory.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
from mpi4py import MPI

from sparcomm._backend import kernels_for
from sparcomm._errors import non_finite_error
from sparcomm.comm import _cost, _device, _ring
from sparcomm.comm._call import Local, begin_call
from sparcomm.comm._context import Channel, ring_allreduce_bytes
from sparcomm.comm._protocol import (
    DENSE_ALGORITHM_CODES,
    SIGNATURE_COLUMNS,
    code,
    describe_codec,
)
from sparcomm.comm._stats import AllreduceStats
from sparcomm.comm._validate import (
    check_common,
    check_no_partial_overlap,
    check_out,
    check_step,
    check_tensor,
    index_dtype,
)

#: What the dense path may ask for (``dense`` is ``auto``).
_REQUESTABLE = ("auto", "dense", "mpi", "ring")
#: ``auto`` runs the ring from this many bytes up (host buffers, more than one rank);
#: below it MPI's latency-optimal algorithms (recursive doubling) win: the ring's
#: ``2 (P - 1)`` steps each cost a latency.
RING_MIN_BYTES = 1 << 20


def _runs_ring(algorithm: str, nbytes: int, size: int, device: bool) -> bool:
    if algorithm in ("auto", "dense"):
        algorithm = choose_dense(nbytes, size, device)
    return algorithm == "ring" and size > 1


def choose_dense(nbytes: int, size: int, device: bool) -> str:
    """``auto``'s dense algorithm: ``"ring"`` or ``"mpi"`` (the same on every rank: it
    depends on agreed inputs only)."""
    if device or size == 1 or nbytes < RING_MIN_BYTES:
        return "mpi"
    return "ring"


def dense_allreduce(
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
    """The dense family's collective (no codec, ``NoCompression`` or another dense
    codec): MPI's own ``Allreduce`` of the values themselves."""
    call = begin_call(comm, stats)
    state, stats, channel = call.state, call.stats, call.channel
    device = _device.is_device(x)
    holder: dict[str, Any] = {}

    def prepare() -> Local:
        array = check_tensor(x, "x")
        check_common(op, algorithm, _REQUESTABLE)
        if algorithm == "ring" and device:
            raise NotImplementedError(
                "algorithm 'ring' reduces host buffers; for a CuPy buffer use 'mpi' or 'auto'"
            )
        check_step(step)  # unused here, but refused like the other families do
        check_out(out, array.size, array.dtype, device)
        check_no_partial_overlap(out, array)
        ring = _runs_ring(algorithm, array.nbytes, channel.size, device)
        with stats._phase("encode"):  # the check (and copy): the dense family's encode
            if ring and out is not array:
                # The ring reads x and writes the sums into out: no copy, one read.
                _checked_copy(array, array, device)
                holder["source"] = array
                holder["result"] = np.empty(array.shape, array.dtype) if out is None else out
            else:
                holder["result"] = holder["source"] = _checked_copy(array, out, device)
        return Local(array.size, array.dtype, index_dtype(array.size).itemsize, array.size)

    # The dense path never consults the cost model.
    table = call.agree(
        prepare,
        codec_text=describe_codec(codec),
        algorithm=code(DENSE_ALGORITHM_CODES, algorithm),
        op=op,
        steady=True,
    )
    if call.failed:  # steady state (_call.agreed_layout): send zeros, raise at settle
        _, _, algorithm, op = call.agreed()
        result, device = call.placeholder(), False
        source = result
    else:
        result, source = holder["result"], holder["source"]
    n = result.size
    ring = _runs_ring(algorithm, result.nbytes, channel.size, device)
    # ``algorithm`` stays the family's ("dense": what the byte model and the step
    # predictor key on); which one ran shows in the phases: "allreduce" (MPI) or
    # "exchange" (the ring).
    stats.requested, stats.algorithm, stats.size, stats.n = algorithm, "dense", channel.size, n
    stats.itemsize, stats.k = result.dtype.itemsize, n
    stats.k_all = table[:, SIGNATURE_COLUMNS["k"]].tolist()
    stats.nnz, stats.fill, stats.dense_ranges = n, 1.0, 1
    stats.index_itemsize, stats.rank = index_dtype(n).itemsize, channel.rank
    stats._predictor = _cost.lazy_predicted_bytes(stats)
    flat = result.reshape(-1)
    try:
        if device:
            result = _dense_allreduce_device(result, channel, state.staging, op, stats)
        elif ring:
            with stats._phase("exchange"):
                _ring.ring_allreduce(channel.comm, source.reshape(-1), flat, scratch=state.buffer)
            # Counted as for MPI's Allreduce (the byte model's convention: 2 m (P-1)/P);
            # the ring's own count differs by the rounding of uneven chunks.
            moved = ring_allreduce_bytes(flat.nbytes, channel.size)
            stats._add_bytes(moved, moved)
        else:
            with stats._phase("allreduce"):
                channel.allreduce_dense(MPI.IN_PLACE, flat)
    except BaseException:
        call.drain()
        raise
    call.settle()  # steady state: raises on every rank if one failed
    if op == "mean" and not device:
        with stats._phase("output"):
            flat /= result.dtype.type(channel.size)
    return result


#: The one host array whose read-only check this thread may skip (see :func:`finite`).
_KNOWN_FINITE: ContextVar[Any] = ContextVar("sparcomm_known_finite", default=None)


@contextmanager
def finite(array: np.ndarray) -> Iterator[None]:
    """Within this block, a dense collective of ``array`` itself skips the read-only
    non-finite check of its input.

    For :class:`~sparcomm.GradientReducer`, which fills a fused bucket with
    ``copy_finite`` as its gradients arrive and found no NaN or Inf: the check would
    be a second read of the bucket between two collectives, with the link idle.  A
    caller that found a non-finite value does not enter the block, so the collective
    raises the error on every rank as usual.
    """
    token = _KNOWN_FINITE.set(array)
    try:
        yield
    finally:
        _KNOWN_FINITE.reset(token)


def _checked_copy(x: Any, out: Any, device: bool) -> Any:
    """The buffer MPI reduces in place: ``x`` copied into ``out`` (or a new array) by
    ``copy_finite``, or ``x`` itself for ``out=x`` after a read-only check (none inside
    :func:`finite` for ``x``); raises :class:`~sparcomm.codecs._base.NonFiniteError` on
    NaN or Inf."""
    xp = sys.modules["cupy"] if device else np
    kernels = kernels_for(xp)
    if out is x:
        if not device and _KNOWN_FINITE.get() is x:
            return x
        flat = x.reshape(-1)
        largest = xp.empty(1, dtype=x.dtype)
        kernels.max_abs(flat, flat.size, largest)
        if not np.isfinite(float(largest[0])):
            # The error path only: count them for the message.
            raise non_finite_error(int(xp.count_nonzero(~xp.isfinite(flat))))
        return x
    result = xp.empty(x.shape, dtype=x.dtype) if out is None else out
    bad = kernels.copy_finite(xp.ascontiguousarray(x).reshape(-1), result.reshape(-1))
    if bad:
        raise non_finite_error(int(bad))
    return result


def _dense_allreduce_device(
    result: Any,
    channel: Channel,
    staging: _device.DeviceStaging,
    op: str,
    stats: AllreduceStats,
) -> Any:
    """The dense path for a CuPy input, reduced in place in ``result`` (the checked copy):
    device buffers straight to a CUDA-aware MPI, else one staged round trip through
    pinned host memory."""
    flat = result.reshape(-1)
    if channel.size > 1 and _device.cuda_aware():
        with stats._phase("allreduce"):
            _device.synchronize()  # MPI reads the buffer outside CuPy's stream order
            channel.allreduce_dense(MPI.IN_PLACE, flat)
        if op == "mean":
            with stats._phase("output"):
                _device.divide(flat, channel.size)
        return result
    with stats._phase("stage"):
        host = staging.array_to_host(result, "dense")
    with stats._phase("allreduce"):
        channel.allreduce_dense(MPI.IN_PLACE, host.reshape(-1))
    with stats._phase("output"):
        if op == "mean":
            host /= result.dtype.type(channel.size)
        _device.dense_to_device(host, result)
    return result
