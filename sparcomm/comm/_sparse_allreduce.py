"""The sparse family's entry points: :func:`sparse_allreduce` (user streams) and the
collective of sparse codecs (:func:`sparse_codec_allreduce`).

Both prepare one sorted, duplicate-free stream per rank, agree (:mod:`._call`), choose an
algorithm (``auto``: the cost model of :mod:`._cost`), run it (:mod:`._sparse`) and build
the output, on the host or back on the device for CuPy inputs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

from sparcomm.comm import _cost, _device, _sparse, _tune
from sparcomm.comm._call import Call, Local, begin_call
from sparcomm.comm._protocol import (
    DTYPE_CODES,
    SIGNATURE_COLUMNS,
    SPARSE_ALGORITHM_CODES,
    code,
    describe_codec,
)
from sparcomm.comm._stats import AllreduceStats
from sparcomm.comm._validate import (
    check_common,
    check_out,
    check_tensor,
    check_values,
    index_dtype,
    prepare_stream,
)

#: What a sparse call may ask for.
_REQUESTABLE = ("auto", *_cost.ALL_ALGORITHMS)


def run_sparse(
    prepare: Callable[[_device.DeviceStaging], tuple[np.ndarray, np.ndarray]],
    n: int,
    dtype: np.dtype | None,
    comm: MPI.Comm | None,
    op: str,
    algorithm: str,
    dense_output: bool | None,
    out: Any,
    stats: AllreduceStats | None,
    codec_text: str,
    what: str,
    device: bool = False,
    codec: Any = None,
):
    """Prepare, check and reduce one sparse stream per rank.

    ``prepare(staging)`` returns this rank's host stream (it stages device data through
    ``staging``).  With ``device=True`` the input came from CuPy: ``out`` is a device
    array or None, and the result is returned on the device (see :mod:`._device`).
    ``codec``: the sparse codec that made the stream, whose encode and dense output
    ``auto``'s predictions then include (:func:`._cost.local_seconds`).
    """
    call = begin_call(comm, stats)
    state, stats, channel = call.state, call.stats, call.channel
    stream: dict[str, np.ndarray] = {}

    def prepare_call() -> Local:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        check_common(op, algorithm, _REQUESTABLE)
        if not (dense_output is None or isinstance(dense_output, bool)):
            raise ValueError(f"dense_output must be True, False or None, got {dense_output!r}")
        with stats._phase("prepare"):
            stream["indices"], stream["values"] = prepare(state.staging)
        check_out(out, int(n), stream["values"].dtype, device)
        return Local(
            int(n), stream["values"].dtype, index_dtype(int(n)).itemsize, stream["indices"].size
        )

    model = state.model
    table = call.agree(
        prepare_call,
        codec_text=codec_text,
        algorithm=code(SPARSE_ALGORITHM_CODES, algorithm),
        op=op,
        what=what,
        model_fingerprint=model.fingerprint() if model is not None else 0,
        steady=True,
    )
    host_out = None if device or dense_output is False else out
    if call.failed:  # steady state: take part with zeros of the agreed k, raise at settle
        n, dtype, algorithm, op = call.agreed()
        k = int(table[channel.rank, SIGNATURE_COLUMNS["k"]])
        indices, values = np.arange(k, dtype=index_dtype(n)), np.zeros(k, dtype=dtype)
        pieces = _reduce_stream(call, table, n, indices, values, algorithm, None)
    else:
        indices, values = stream["indices"], stream["values"]
        pieces = _reduce_stream(call, table, int(n), indices, values, algorithm, host_out, codec)
    if call.settle():  # a rank's k changed: every rank redoes the call with a full check
        table = call.recheck()
        indices, values = stream["indices"], stream["values"]
        pieces = _reduce_stream(call, table, int(n), indices, values, algorithm, host_out, codec)
    n = int(n)
    size = channel.size
    mean = float(size) if op == "mean" else None
    with stats._phase("output"):
        result = _output(pieces, n, values.dtype, indices.dtype, dense_output, mean, out, device)
    if call.tuning is not None:  # every rank got here: the call succeeded everywhere
        _tune.tuner_of(state).record(state.comm, call.tuning, stats)
    return result


def _output(
    pieces: list,
    n: int,
    dtype: np.dtype,
    index_type: np.dtype,
    dense_output: bool | None,
    mean: float | None,
    out: Any,
    device: bool,
) -> Any:
    """The result in the form asked for, on the host or back on the device."""
    host_out = None if device or dense_output is False else out
    if not device:
        return _sparse.finish(pieces, n, dtype, index_type, dense_output, mean, host_out)
    # The cheapest host form; a sparse sum is scattered on the device.
    form = False if dense_output is False else None
    result = _sparse.finish(pieces, n, dtype, index_type, form, mean, None)
    if isinstance(result, tuple) and dense_output is not True:
        cupy = sys.modules["cupy"]
        return cupy.asarray(result[0]), cupy.asarray(result[1])
    target = _device.device_output(out, (n,), dtype)
    return _device.result_to_device(result, target)


def _reduce_stream(
    call: Call,
    table: np.ndarray,
    n: int,
    indices: np.ndarray,
    values: np.ndarray,
    algorithm: str,
    host_out: Any,
    codec: Any = None,
) -> list:
    """Choose (``auto``) and run the algorithm on this rank's stream; the pieces."""
    state, stats, channel = call.state, call.stats, call.channel
    k_all = table[:, SIGNATURE_COLUMNS["k"]].copy()
    stats.requested, stats.size, stats.n = algorithm, channel.size, n
    stats.itemsize, stats.index_itemsize = values.dtype.itemsize, indices.dtype.itemsize
    stats.k, stats.k_all = int(indices.size), k_all.tolist()
    if algorithm == "auto":
        with stats._phase("choose"):
            model = _cost.cost_model(call.comm)
            # Training calls with the same sizes every step: predict once per shape.
            key = (model, n, tuple(k_all.tolist()), values.dtype.itemsize, indices.itemsize)
            if key not in state.choices:
                if len(state.choices) > 4096:
                    state.choices.clear()
                state.choices[key] = _cost.choose(
                    model, n, k_all, values.dtype.itemsize, indices.dtype.itemsize
                )
            _, predicted = state.choices[key]
            # The model proposes, the calls decide (sparcomm.comm._tune).
            call.tuning = _tune.tuner_of(state).decide(key, predicted, call.started)
            name, stats.tuning = call.tuning.name, call.tuning.mode
            stats.measured = dict(call.tuning.medians)
            # The encode and the dense output: the same for every candidate.
            local = 0.0 if codec is None else _cost.local_seconds(codec, n, values.dtype, model)
            stats.predicted = {candidate: t + local for candidate, t in predicted.items()}
    else:
        name = algorithm
    stats.algorithm = name
    stats.rank = channel.rank
    stats._predictor = _cost.lazy_predicted_bytes(stats)
    problem = _sparse.Problem(
        channel, n, indices, values, k_all, out=host_out, scratch=state.buffer
    )
    try:
        pieces = _sparse.ALGORITHMS[name](problem)
    except BaseException:
        call.drain()
        raise
    stats.nnz = _sparse.result_nnz(pieces)
    stats.fill = stats.nnz / max(1, int(k_all.max()))
    return pieces


def sparse_allreduce(
    indices: np.ndarray,
    values: np.ndarray,
    n: int,
    comm: MPI.Comm | None = None,
    *,
    op: str = "sum",
    algorithm: str = "auto",
    dense_output: bool | None = True,
    out: Any = None,
    stats: AllreduceStats | None = None,
):
    """Sum sparse vectors over all ranks (SparCML's sparse allreduce).

    Parameters
    ----------
    indices : numpy.ndarray of int
        Positions of this rank's non-zeros in ``[0, n)``.  Any order; duplicate
        indices are **summed** (in their input order, so the result is deterministic),
        as an embedding-table gradient expects.  Sorted unique input is used as is.
    values : numpy.ndarray of float32 or float64
        The values at ``indices`` (same length).  Every rank must use the same dtype.
    n : int
        Length of the dense vector (the same on every rank).
    comm : mpi4py.MPI.Comm, optional
        Communicator, ``MPI.COMM_WORLD`` by default.
    op : {"sum", "mean"}
        ``mean`` divides the sum by the number of ranks.
    algorithm : {"auto", "allgather", "recursive_doubling", "split_allgather", "dsar", "dense"}
        ``auto`` chooses by the cost model (:func:`sparcomm.comm.calibrate`).
    dense_output : bool or None
        ``True``: return a dense array of ``n`` values.  ``False``: return the sum as a
        sorted ``(indices, values)`` pair.  ``None``: return whichever form the
        algorithm ended in (dense array if any part went dense, else the pair), with no
        conversion cost.
    out : numpy.ndarray, optional
        Dense output buffer (``n`` elements, values' dtype), used when the output is dense.
    stats : AllreduceStats, optional
        Filled in place with what the call did.

    Returns
    -------
    numpy.ndarray or tuple of numpy.ndarray
        The sum, bitwise identical on every rank.

    Raises
    ------
    TypeError, ValueError
        On every rank when any rank's input is invalid, or when ranks disagree on ``n``,
        dtype, ``op`` or ``algorithm``.

    References
    ----------
    Renggli, Ashkboos, Aghagolzadeh, Alistarh, Hoefler, "SparCML: High-Performance
    Sparse Communication for Machine Learning", SC'19.
    """
    dtype = getattr(values, "dtype", None)
    device = _device.is_device(values) or _device.is_device(indices)

    def prepare(staging: _device.DeviceStaging) -> tuple[np.ndarray, np.ndarray]:
        if not device:
            return prepare_stream(indices, values, n)
        if not (_device.is_device(values) and _device.is_device(indices)):
            raise TypeError(
                "indices and values must be on the same device: one is a cupy.ndarray and "
                "the other is not; move both with cupy.asarray() or cupy.asnumpy()"
            )
        check_values(values, "values")
        host_values = staging.array_to_host(values, "values")
        return prepare_stream(staging.array_to_host(indices, "indices"), host_values, n)

    return run_sparse(
        prepare,
        n,
        dtype if dtype in DTYPE_CODES else None,
        comm,
        op,
        algorithm,
        dense_output,
        out,
        stats,
        "sparse",
        "sparse_allreduce",
        device,
    )


def sparse_codec_allreduce(
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
    """The sparse family's collective: codecs whose payload is an (indices, values)
    list (TopK, or your own; plain or under ErrorFeedback), reduced by the SparCML
    algorithms."""
    holder: dict[str, Any] = {}
    device = _device.is_device(x)

    def prepare(staging: _device.DeviceStaging) -> tuple[np.ndarray, np.ndarray]:
        array = check_tensor(x, "x")
        rank = comm.Get_rank() if comm is not None else MPI.COMM_WORLD.Get_rank()
        payload = codec.encode(array, key=key, step=step, rank=rank)
        if device:  # encoded on the device: only the k entries cross to the host
            payload = staging.payload_to_host(payload, "payload")
        holder["shape"] = array.shape
        return prepare_stream(payload.arrays["indices"], payload.arrays["values"], array.size)

    is_array = isinstance(x, np.ndarray) or device
    # An invalid x (a list, None, empty) is prepare's error (check_tensor), not n's.
    n = x.size if is_array and x.size > 0 else 1
    dtype = x.dtype if is_array and x.dtype in DTYPE_CODES else None
    flat_out: Any = out
    if (isinstance(out, np.ndarray) or _device.is_device(out)) and out.flags.c_contiguous:
        flat_out = out.reshape(-1)
    result = run_sparse(
        prepare,
        n,
        dtype,
        comm,
        op,
        algorithm,
        True,
        flat_out,
        stats,
        describe_codec(codec),
        "allreduce",
        device,
        codec,
    )
    return result.reshape(holder["shape"]) if out is None else out


def sparse_codec_allreduce_layers(
    arrays: list[np.ndarray],
    codec: Any,
    keys: list[Any],
    *,
    comm: MPI.Comm | None,
    op: str,
    step: int | None,
    stats: AllreduceStats | None,
    out: np.ndarray | None,
) -> np.ndarray:
    """Several tensors in one sparse collective, each compressed on its own.

    Tensor ``i`` is encoded with its own key (its own top-k and error-feedback residual,
    as if it were reduced alone), its indices are shifted by the sizes of the tensors
    before it, and the concatenated stream is reduced once: the sum of the concatenation
    is the concatenation of the per-tensor sums, for the latency of one collective.
    Returns the flat sum (``out`` if given, of the total size).
    """
    sizes = [int(getattr(array, "size", 0)) for array in arrays]
    n = sum(sizes)
    dtypes = {getattr(array, "dtype", None) for array in arrays}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else None

    def prepare(staging: _device.DeviceStaging) -> tuple[np.ndarray, np.ndarray]:
        if dtype is None:
            raise TypeError(
                f"the fused tensors must share one dtype, got {sorted(map(str, dtypes))}"
            )
        rank = comm.Get_rank() if comm is not None else MPI.COMM_WORLD.Get_rank()
        wire = index_dtype(n)
        all_indices, all_values, offset = [], [], 0
        for array, key in zip(arrays, keys, strict=True):
            payload = codec.encode(check_values(array, "x"), key=key, step=step, rank=rank)
            all_indices.append(
                payload.arrays["indices"].astype(wire, copy=False) + wire.type(offset)
            )
            all_values.append(payload.arrays["values"])
            offset += array.size
        return prepare_stream(np.concatenate(all_indices), np.concatenate(all_values), n)

    return run_sparse(
        prepare,
        n,
        dtype if dtype in DTYPE_CODES else None,
        comm,
        op,
        "auto",
        True,
        out,
        stats,
        describe_codec(codec),
        "allreduce",
        False,
        codec,
    )
