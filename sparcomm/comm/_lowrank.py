"""The low-rank family: PowerSGD's collective, two dense allreduces of small factors.

PowerSGD is linear (``P = sum_w M_w Q``, ``Q = sum_w M_w^T P``), so the ranks sum their
factors instead of exchanging payloads: nobody decodes what another rank sent.  One call
reduces any number of tensors (a fusion bucket) with exactly two allreduces:

1. *Prepare* (local): each tensor's ``P`` (or, for a tensor sent dense, its values) is
   computed into one concatenated buffer; the initial ``Q`` into another.  Errors are
   held back (a non-finite input shows up as a non-finite ``P``, which is checked).
2. *Check*: the signature row of :mod:`sparcomm.comm._allreduce` (so a failing rank
   raises on every rank instead of hanging), plus a fingerprint of the tensors' shapes
   and keys.  On an agreed layout (a reducer's bucket after its first step) the check is
   local and a status travels beside the ``P`` allreduce: a failing rank sends zeros and
   every rank raises after it, before anything is committed (:mod:`._call`).
3. ``Allreduce`` of the P buffer (dense tensors are summed here too); every rank
   orthogonalises the same sums; ``Q = M^T P`` into the Q buffer; ``Allreduce`` of it.
4. Each tensor's result ``P Q^T`` (mean or sum), residuals and warm-start ``Q`` committed.

MPI's ``Allreduce`` returns the same bits on every rank for the same inputs (MPICH
reduces each element once, in one order, and distributes the result; the tests check it
at 2 to 5 ranks); the orthogonalisation runs element-wise on those identical sums, so
every rank ends with the same result.  CuPy inputs compute on the device and stage only
the two small factor buffers through host memory.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from mpi4py import MPI

from sparcomm._backend import array_module
from sparcomm._errors import non_finite_error
from sparcomm.comm._call import Call, Local, begin_call
from sparcomm.comm._context import Channel
from sparcomm.comm._protocol import (
    LOWRANK_ALGORITHM_CODES,
    SIGNATURE_COLUMNS,
    code,
    describe_codec,
    fingerprint,
)
from sparcomm.comm._stats import AllreduceStats
from sparcomm.comm._validate import check_common, check_values

if TYPE_CHECKING:  # comm reads a codec's family, never its class
    from sparcomm.codecs.powersgd import LowRankWork, PowerSGD

_ALGORITHMS = tuple(LOWRANK_ALGORITHM_CODES)
_K_FIELD = SIGNATURE_COLUMNS["k"]


def powersgd_allreduce(
    arrays: Sequence[Any],
    codec: PowerSGD,
    keys: Sequence[Hashable],
    comm: MPI.Comm | None = None,
    *,
    op: str = "mean",
    algorithm: str = "auto",
    stats: AllreduceStats | None = None,
    outs: Sequence[Any] | None = None,
) -> list[Any]:
    """Reduce several tensors through PowerSGD with one allreduce for all their ``P``
    factors and one for all their ``Q`` factors.

    Parameters
    ----------
    arrays : sequence of numpy.ndarray or cupy.ndarray
        This rank's tensors (float32 or float64, one dtype and one device for all); every
        rank passes the same shapes in the same order.  Each is compressed as a
        ``shape[0] x rest`` matrix; those rank ``r`` would not compress (1-D ones) are
        summed dense in the first allreduce.
    codec : PowerSGD
        Holds the per-key state (residuals, warm-start ``Q``).
    keys : sequence of str or int
        One distinct key per tensor (the parameter names), the same on every rank.
    comm : mpi4py.MPI.Comm, optional
        Communicator, ``MPI.COMM_WORLD`` by default.
    op : {"mean", "sum"}
    algorithm : {"auto", "powersgd"}
        The family has one algorithm; ``auto`` names it.
    stats : AllreduceStats, optional
        Filled in place (``n`` elements, ``k`` values sent per rank, bytes, phases
        ``check``, ``encode``, ``allreduce_p``, ``orthogonalize``, ``allreduce_q``,
        ``decode``).
    outs : sequence of arrays or None, optional
        Output buffers shaped like ``arrays`` (new arrays when omitted, or for a None
        entry); an out may be its input array itself (computed in place).

    Returns
    -------
    list of arrays
        The reduced tensors, shaped like the inputs, bitwise identical on every rank.

    Raises
    ------
    TypeError, ValueError, NotImplementedError
        On every rank, when any rank's input is invalid or the ranks disagree on the
        tensors, the codec or ``op``.
    """
    call = begin_call(comm, stats)
    stats, channel = call.stats, call.channel
    codec_text = describe_codec(codec)
    works: list[LowRankWork] = []
    p_buffer = q_buffer = None
    n, dtype = -1, None

    def prepare() -> Local:
        nonlocal works, p_buffer, q_buffer, n, dtype
        nonlocal arrays, keys
        check_common(op, algorithm, _ALGORITHMS)
        arrays, keys = _check_inputs(arrays, codec, keys, outs)
        n, dtype = sum(int(a.size) for a in arrays), arrays[0].dtype
        layout_text = repr([(k, tuple(a.shape)) for k, a in zip(keys, arrays, strict=True)])
        with stats._phase("encode"):
            works, p_buffer, q_buffer = _start_all(codec, arrays, keys)
            xp = array_module(p_buffer)
            if not bool(xp.isfinite(p_buffer).all()):
                raise non_finite_error()
        # The k column carries a fingerprint of the tensors' keys and shapes.
        return Local(n=n, dtype=dtype, k=fingerprint(layout_text))

    table = call.agree(
        prepare,
        codec_text=codec_text,
        algorithm=code(LOWRANK_ALGORITHM_CODES, algorithm),
        op=op,
        steady=True,
    )
    if call.failed:  # steady state: take part with zeros, every rank raises at settle
        _, agreed_dtype, _, _ = call.agreed()
        sent = np.zeros(call.state.factor_sizes[call.layout][0], dtype=agreed_dtype)
    else:
        if not call.in_steady_state:
            _check_layouts(table)
        assert p_buffer is not None and q_buffer is not None
        _remember_sizes(call, p_buffer, q_buffer)
        sent = p_buffer
    _exchange_p(call, sent)
    if call.settle():  # a rank's tensors changed: every rank redoes with a full check
        _check_layouts(call.recheck())
        with stats._phase("encode"):
            works, p_buffer, q_buffer = _start_all(codec, list(arrays), list(keys))
        _remember_sizes(call, p_buffer, q_buffer)
        _exchange_p(call, p_buffer)
    assert p_buffer is not None and q_buffer is not None
    size = channel.size
    with stats._phase("orthogonalize"):
        for work in works:
            codec.project(work)
    if q_buffer.size:
        with stats._phase("allreduce_q"):
            _allreduce(channel, q_buffer)
    results = []
    with stats._phase("decode"):
        for number, work in enumerate(works):
            out = None if outs is None else outs[number]
            results.append(codec.finish(work, size, op == "mean", out))
    stats.requested, stats.algorithm = algorithm, "powersgd"
    stats.size, stats.n, stats.rank = size, n, channel.rank
    stats.itemsize = np.dtype(dtype).itemsize
    stats.k = int(p_buffer.size + q_buffer.size)
    stats.k_all = [stats.k] * size
    stats.nnz, stats.fill = n, 1.0
    return results


def lowrank_allreduce(
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
) -> Any:
    """``sparcomm.allreduce(x, codec=PowerSGD(...), key=...)``: one tensor through
    :func:`powersgd_allreduce` (``step`` is unused: PowerSGD counts steps per key)."""
    return powersgd_allreduce(
        [x],
        codec,
        [key],
        comm,
        op=op,
        algorithm=algorithm,
        stats=stats,
        outs=None if out is None else [out],
    )[0]


def _check_layouts(table: np.ndarray) -> None:
    """Every rank's fingerprint of its tensors' keys and shapes (the k column) agrees."""
    column = table[:, _K_FIELD]
    if np.any(column != column[0]):
        raise ValueError(
            f"allreduce: ranks disagree on the tensors' shapes or keys (rank "
            f"{int(np.flatnonzero(column != column[0])[0])} differs from rank 0); every "
            "rank must reduce the same tensors in the same order"
        )


def _remember_sizes(call: Call, p_buffer: Any, q_buffer: Any) -> None:
    """The layout's factor sizes, for a rank that sends placeholders in steady state."""
    if call.layout is not None:
        call.state.factor_sizes[call.layout] = (int(p_buffer.size), int(q_buffer.size))


def _exchange_p(call: Call, buffer: Any) -> None:
    """The first allreduce (the P factors), with the steady-state status in flight."""
    try:
        with call.stats._phase("allreduce_p"):
            _allreduce(call.channel, buffer)
    except BaseException:
        call.drain()
        raise


def _check_inputs(
    arrays: Sequence[Any], codec: Any, keys: Sequence[Hashable], outs: Sequence[Any] | None
) -> tuple[list[Any], list[Hashable]]:
    from sparcomm.feedback import ErrorFeedback

    if isinstance(codec, ErrorFeedback):
        raise NotImplementedError(
            f"{codec!r}: PowerSGD keeps its error feedback itself (error_feedback=True, the "
            "default); pass the PowerSGD codec unwrapped"
        )
    if getattr(codec, "family", None) != "low-rank":
        raise TypeError(
            f"codec must be a low-rank codec (family 'low-rank', e.g. sparcomm.PowerSGD), "
            f"got {type(codec).__name__}"
        )
    if isinstance(arrays, (str, bytes)) or not isinstance(arrays, Sequence) or not arrays:
        raise TypeError(f"arrays must be a non-empty list of arrays, got {type(arrays).__name__}")
    arrays = [check_values(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    keys = list(keys)
    if len(keys) != len(arrays):
        raise ValueError(f"give one key per array: {len(arrays)} arrays, {len(keys)} keys")
    if len(set(keys)) != len(keys):
        raise ValueError(f"keys must be distinct (they name each tensor's state), got {keys}")
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) > 1:
        raise TypeError(
            f"arrays must share one dtype, got {sorted(d.name for d in dtypes)}; reduce each "
            "dtype in its own call"
        )
    xp = array_module(*arrays)  # a TypeError for mixed NumPy and CuPy arrays
    for i, a in enumerate(arrays):
        if a.ndim == 0 or a.size == 0:
            raise ValueError(f"arrays[{i}] has shape {a.shape}; give tensors with elements")
    if outs is not None:
        if len(outs) != len(arrays):
            raise ValueError(f"give one out per array: {len(arrays)} arrays, {len(outs)} outs")
        for i, (a, o) in enumerate(zip(arrays, outs, strict=True)):
            if o is None:
                continue
            if (
                array_module(o) is not xp
                or o.dtype != a.dtype
                or o.size != a.size
                or not o.flags.c_contiguous
            ):
                raise ValueError(
                    f"outs[{i}] must be a C-contiguous {xp.__name__} array of {a.size} x "
                    f"{a.dtype}, got {getattr(o, 'size', '?')} x {getattr(o, 'dtype', '?')}"
                )
            if xp.shares_memory(o, a) and o is not a:
                raise ValueError(f"outs[{i}] overlaps arrays[{i}] partially")
    return arrays, keys


def _start_all(
    codec: PowerSGD, arrays: list[Any], keys: list[Hashable]
) -> tuple[list[LowRankWork], Any, Any]:
    """Lay every tensor's factors end to end in one P and one Q buffer and run the
    codec's first steps into them."""
    xp = array_module(*arrays)
    sizes = [codec.factor_sizes(tuple(a.shape)) for a in arrays]
    p_buffer = xp.empty(sum(p for p, _ in sizes), dtype=arrays[0].dtype)
    q_buffer = xp.empty(sum(q for _, q in sizes), dtype=arrays[0].dtype)
    works, p_at, q_at = [], 0, 0
    for array, key, (p_size, q_size) in zip(arrays, keys, sizes, strict=True):
        p = p_buffer[p_at : p_at + p_size]
        q = q_buffer[q_at : q_at + q_size]
        works.append(codec.start(array, key, p, q))
        p_at, q_at = p_at + p_size, q_at + q_size
    return works, p_buffer, q_buffer


def _allreduce(channel: Channel, buffer: Any) -> None:
    """Sum ``buffer`` over the ranks in place; a CuPy buffer is staged through host
    memory (the factors are small next to the gradients)."""
    if isinstance(buffer, np.ndarray):
        channel.allreduce_dense(MPI.IN_PLACE, buffer)
        return
    host = buffer.get()
    channel.allreduce_dense(MPI.IN_PLACE, host)
    buffer.set(host)
