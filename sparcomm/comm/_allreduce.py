"""Public allreduce entry points: :func:`allreduce` (by codec) and :func:`sparse_allreduce`.

Every call runs in three steps:

1. *Prepare* locally: validate, encode with the codec, bring indices to the wire dtype.
   Nothing here talks to other ranks, and any exception is held back.
2. *Check* collectively: one ``Allgather`` of a small int64 row per rank (version, n,
   dtype, index size, codec, algorithm, op, cost model, k, error).  A rank whose input
   failed raises its own error and every other rank raises a matching one; ranks that
   disagree on n, dtype, codec, op or algorithm all raise ``ValueError``.  So a mistake
   on one rank is an error on every rank, never a hang or a wrong sum.
3. *Reduce*: resolve ``auto`` with the cost model from the agreed ``k`` of every rank,
   run the algorithm, build the output.

Collectives per codec live in a registry (:func:`register_collective`) keyed by codec
class; ``ErrorFeedback(codec)`` is looked up by its inner codec.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

from sparcomm.comm import _cost, _device, _sparse
from sparcomm.comm._context import SIGNATURE_FIELDS, Channel, comm_state
from sparcomm.comm._stats import AllreduceStats
from sparcomm.kernels.cpu import merge as _merge

_VERSION = 1
_DTYPES: dict[np.dtype, int] = {np.dtype(np.float32): 1, np.dtype(np.float64): 2}
_OPS = ("sum", "mean")
_ALGORITHMS = ("auto", *_cost.ALL_ALGORITHMS)
_DENSE_ALGORITHMS = ("auto", "dense")
# Exception classes a rank's local failure is reported with on the other ranks.
_ERROR_CLASSES: tuple[type[Exception], ...] = (
    TypeError,
    ValueError,
    NotImplementedError,
    RuntimeError,
)
_FIELD = {name: i for i, name in enumerate(SIGNATURE_FIELDS)}
#: Signature codes of algorithms outside ``_ALGORITHMS`` -> their names, for messages;
#: registered by the collectives that use them (``sparcomm.comm._quantized``).
ALGORITHM_CODES: dict[int, str] = {}


# ------------------------------------------------------------------ signature


def describe_codec(codec: Any) -> str:
    """A rank-independent description of a codec: class and scalar parameters.

    ``ErrorFeedback(c)`` is described as ``ErrorFeedback(<c>)``; per-rank state
    (residuals) is left out.
    """
    if codec is None:
        return "dense"
    inner = _inner_codec(codec)
    if inner is not codec:
        return f"ErrorFeedback({describe_codec(inner)})"
    params = {
        name: value
        for name, value in sorted(vars(codec).items())
        if isinstance(value, (int, float, str, bool, type(None)))
    }
    body = ", ".join(f"{name.lstrip('_')}={value!r}" for name, value in params.items())
    return f"{type(codec).__qualname__}({body})"


def _inner_codec(codec: Any) -> Any:
    """The codec inside an ``ErrorFeedback`` wrapper (``codec`` itself otherwise)."""
    from sparcomm.feedback import ErrorFeedback

    return codec.codec if isinstance(codec, ErrorFeedback) else codec


def _fingerprint(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _error_code(error: BaseException | None) -> int:
    if error is None:
        return 0
    for code, cls in enumerate(_ERROR_CLASSES, start=1):
        if isinstance(error, cls):
            return code
    return len(_ERROR_CLASSES)  # RuntimeError on the others


def _describe_field(name: str, value: int, codec_names: dict[int, str]) -> str:
    if name == "dtype":
        names = {code: dtype.name for dtype, code in _DTYPES.items()}
        return names.get(value, "an invalid dtype")
    if name == "algorithm":
        if value in ALGORITHM_CODES:  # codes of other families (the quantized collectives)
            return repr(ALGORITHM_CODES[value])
        return repr(_ALGORITHMS[value]) if 0 <= value < len(_ALGORITHMS) else "invalid"
    if name == "op":
        return repr(_OPS[value]) if 0 <= value < len(_OPS) else "invalid"
    if name == "codec":
        return codec_names.get(value, f"a different codec (fingerprint {value})")
    if name == "cost_model":
        return "no cost model" if value == 0 else f"cost model {value}"
    return str(value)


def _check_signature(
    channel: Channel,
    row: np.ndarray,
    error: BaseException | None,
    codec_text: str,
    what: str,
) -> np.ndarray:
    """Allgather every rank's row; raise the same kind of error on every rank if any
    rank failed locally or the ranks disagree.  Returns the ``(P, fields)`` table."""
    row[_FIELD["error"]] = _error_code(error)
    with channel.stats._phase("check"):
        table = channel.allgather_array(row)
    failed = np.flatnonzero(table[:, _FIELD["error"]])
    if failed.size:
        if error is not None:
            raise error
        first = int(failed[0])
        cls = _ERROR_CLASSES[int(table[first, _FIELD["error"]]) - 1]
        raise cls(
            f"{what}: rank {first} rejected its input ({cls.__name__}; ranks "
            f"{failed.tolist()} failed); its own message says why; no data was exchanged"
        )
    codec_names = {int(row[_FIELD["codec"]]): codec_text}
    for name in ("version", "n", "dtype", "index_itemsize", "codec", "op", "algorithm"):
        column = table[:, _FIELD[name]]
        if np.any(column != column[0]):
            other = int(np.flatnonzero(column != column[0])[0])
            raise ValueError(
                f"{what}: ranks disagree on {name}: rank 0 has "
                f"{_describe_field(name, int(column[0]), codec_names)}, rank {other} has "
                f"{_describe_field(name, int(column[other]), codec_names)}; every rank "
                f"must call with the same {name}"
            )
    if table[0, _FIELD["algorithm"]] == 0:  # auto: every rank must predict alike
        column = table[:, _FIELD["cost_model"]]
        if np.any(column != column[0]):
            raise ValueError(
                f"{what}: ranks hold different cost models (fingerprints "
                f"{column.tolist()}); call sparcomm.comm.calibrate(comm) on every rank, or "
                "install the same model everywhere with set_cost_model"
            )
    return table


def _signature_row(
    n: int,
    dtype: np.dtype | None,
    index_itemsize: int,
    codec_text: str,
    algorithm: str,
    op: str,
    model_fingerprint: int,
    k: int,
) -> np.ndarray:
    row = np.zeros(len(SIGNATURE_FIELDS), dtype=np.int64)
    row[_FIELD["version"]] = _VERSION
    row[_FIELD["n"]] = n
    row[_FIELD["dtype"]] = _DTYPES.get(np.dtype(dtype), 0) if dtype is not None else 0
    row[_FIELD["index_itemsize"]] = index_itemsize
    row[_FIELD["codec"]] = _fingerprint(codec_text)
    row[_FIELD["algorithm"]] = _ALGORITHMS.index(algorithm) if algorithm in _ALGORITHMS else -1
    row[_FIELD["op"]] = _OPS.index(op) if op in _OPS else -1
    row[_FIELD["cost_model"]] = model_fingerprint
    row[_FIELD["k"]] = k
    return row


# ------------------------------------------------------------------ call set-up


def begin_call(
    comm: MPI.Comm | None, stats: AllreduceStats | None
) -> tuple[MPI.Comm, Any, AllreduceStats, Channel]:
    """What every collective starts with: the communicator (``COMM_WORLD`` by default),
    its cached state, the (reset) stats to fill and a channel on the private duplicate."""
    comm = MPI.COMM_WORLD if comm is None else comm
    state = comm_state(comm)
    stats = AllreduceStats() if stats is None else stats
    stats.reset()
    return comm, state, stats, Channel(state.comm, stats)


# ------------------------------------------------------------------ validation


def _index_dtype(n: int) -> np.dtype:
    """int32 indices while they fit (below 2**31 elements), else int64."""
    return np.dtype(np.int32) if n <= np.iinfo(np.int32).max else np.dtype(np.int64)


def _check_common(op: str, algorithm: str, allowed: tuple[str, ...]) -> None:
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")
    if algorithm not in allowed:
        raise ValueError(f"algorithm must be one of {allowed}, got {algorithm!r}")


def _check_values(x: Any, name: str) -> Any:
    """``x`` if it is a float32/float64 NumPy or CuPy array, else a clear TypeError."""
    if not isinstance(x, np.ndarray) and not _device.is_device(x):
        raise TypeError(
            f"{name} must be a numpy.ndarray or cupy.ndarray, got "
            f"{type(x).__module__}.{type(x).__qualname__}; convert it with numpy.asarray() "
            "(a torch tensor: tensor.numpy(), or cupy.from_dlpack(tensor) on a GPU)"
        )
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"{name} must be float32 or float64, got {x.dtype}; cast it with "
            f"{name}.astype(numpy.float32)"
        )
    return x


def _check_out(out: Any, n: int, dtype: np.dtype, device: bool = False) -> None:
    """``out`` must be None or a C-contiguous array of ``n`` x ``dtype`` on the input's
    device (NumPy for host inputs, CuPy for device inputs)."""
    if out is None:
        return
    kind = "cupy.ndarray" if device else "numpy.ndarray"
    on_device = _device.is_device(out)
    if not (on_device if device else isinstance(out, np.ndarray)) or out.dtype != dtype:
        raise TypeError(
            f"out must be a {kind} of dtype {dtype} (on the input's device), got "
            f"{type(out).__module__}.{type(out).__qualname__}"
            + (f" of dtype {out.dtype}" if hasattr(out, "dtype") else "")
        )
    if out.size != n or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be C-contiguous with {n} elements, got {out.size} elements "
            f"(contiguous: {out.flags.c_contiguous})"
        )


def _check_no_partial_overlap(out: Any, x: Any) -> None:
    """``out=x`` works in place; a buffer that overlaps ``x`` only in part is refused."""
    if out is None or out is x:
        return
    xp = sys.modules["cupy"] if _device.is_device(x) else np
    if xp.shares_memory(out, x):
        raise ValueError("out overlaps x partially; pass out=x or a separate buffer")


def _prepare_stream(indices: Any, values: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a user stream; sort it and sum duplicates when needed (stable order)."""
    values = _check_values(values, "values")
    if not isinstance(indices, np.ndarray) or indices.dtype.kind not in "iu":
        raise TypeError(
            f"indices must be a numpy.ndarray of integers, got "
            f"{getattr(indices, 'dtype', type(indices).__qualname__)}"
        )
    if indices.ndim != 1 or values.ndim != 1 or indices.size != values.size:
        raise ValueError(
            f"indices and values must be 1-D of the same length, got shapes "
            f"{indices.shape} and {values.shape}"
        )
    wire = _index_dtype(n)
    if indices.dtype.kind == "u" and indices.size and int(indices.max()) >= n:
        raise ValueError(f"indices must lie in [0, n) = [0, {n}), got max {int(indices.max())}")
    indices = np.ascontiguousarray(indices, dtype=np.int64 if indices.dtype.kind == "u" else None)
    values = np.ascontiguousarray(values)
    state = _merge.check_stream(indices, n)
    if state == 2:
        raise ValueError(
            f"indices must lie in [0, n) = [0, {n}), got min {int(indices.min())}, "
            f"max {int(indices.max())}"
        )
    if state == 1:
        # Unsorted or duplicated (an embedding gradient): sort stably and sum duplicates
        # in their input order, so the result does not depend on the sort algorithm.
        order = np.argsort(indices, kind="stable")
        sorted_i, sorted_v = indices[order], values[order]
        out_i = np.empty_like(sorted_i)
        out_v = np.empty_like(sorted_v)
        count = _merge.coalesce_sorted(sorted_i, sorted_v, out_i, out_v)
        indices, values = out_i[:count], out_v[:count]
    return np.ascontiguousarray(indices, dtype=wire), values


# ------------------------------------------------------------------ sparse path


def _run_sparse(
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
):
    """Prepare, check and reduce one sparse stream per rank.

    ``prepare(staging)`` returns this rank's host stream (it stages device data through
    ``staging``).  With ``device=True`` the input came from CuPy: ``out`` is a device
    array or None, and the result is returned on the device (see :mod:`._device`).
    """
    comm, state, stats, channel = begin_call(comm, stats)
    error: BaseException | None = None
    indices = values = None
    index_dtype = _index_dtype(n) if isinstance(n, (int, np.integer)) and n >= 0 else None
    try:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        _check_common(op, algorithm, _ALGORITHMS)
        if not (dense_output is None or isinstance(dense_output, bool)):
            raise ValueError(f"dense_output must be True, False or None, got {dense_output!r}")
        with stats._phase("prepare"):
            indices, values = prepare(state.staging)
        dtype = values.dtype
        _check_out(out, int(n), dtype, device)
    except Exception as caught:  # held back until every rank has heard of it
        error = caught
    model = state.model
    row = _signature_row(
        int(n) if error is None else -1,
        dtype,
        index_dtype.itemsize if index_dtype is not None else 0,
        codec_text,
        algorithm,
        op,
        model.fingerprint() if model is not None else 0,
        0 if indices is None else indices.size,
    )
    table = _check_signature(channel, row, error, codec_text, what)
    assert indices is not None and values is not None
    n = int(n)
    k_all = table[:, _FIELD["k"]].copy()
    size = channel.size
    stats.requested, stats.size, stats.n = algorithm, size, n
    stats.itemsize, stats.index_itemsize = values.dtype.itemsize, indices.dtype.itemsize
    stats.k, stats.k_all = int(indices.size), k_all.tolist()
    if algorithm == "auto":
        with stats._phase("choose"):
            model = _cost.cost_model(comm)
            # Training calls with the same sizes every step: predict once per shape.
            key = (model, n, tuple(k_all.tolist()), values.dtype.itemsize, indices.itemsize)
            if key not in state.choices:
                if len(state.choices) > 4096:
                    state.choices.clear()
                state.choices[key] = _cost.choose(
                    model, n, k_all, values.dtype.itemsize, indices.dtype.itemsize
                )
            name, predicted = state.choices[key]
            stats.predicted = dict(predicted)
    else:
        name = algorithm
    stats.algorithm = name
    stats.rank = channel.rank
    host_out = None if device or dense_output is False else out
    problem = _sparse.Problem(
        channel, n, indices, values, k_all, out=host_out, scratch=state.buffer
    )
    pieces = _sparse.ALGORITHMS[name](problem)
    stats.nnz = _sparse.result_nnz(pieces)
    stats.fill = stats.nnz / max(1, int(k_all.max()))
    mean = float(size) if op == "mean" else None
    with stats._phase("output"):
        if not device:
            return _sparse.finish(
                pieces, n, values.dtype, indices.dtype, dense_output, mean, host_out
            )
        # The cheapest host form; a sparse sum is scattered on the device.
        form = False if dense_output is False else None
        result = _sparse.finish(pieces, n, values.dtype, indices.dtype, form, mean, None)
        if isinstance(result, tuple) and dense_output is not True:
            cupy = sys.modules["cupy"]
            return cupy.asarray(result[0]), cupy.asarray(result[1])
        target = _device.device_output(out, (n,), values.dtype)
        return _device.result_to_device(result, target)


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
            return _prepare_stream(indices, values, n)
        if not (_device.is_device(values) and _device.is_device(indices)):
            raise TypeError(
                "indices and values must be on the same device: one is a cupy.ndarray and "
                "the other is not; move both with cupy.asarray() or cupy.asnumpy()"
            )
        _check_values(values, "values")
        host_values = staging.array_to_host(values, "values")
        return _prepare_stream(staging.array_to_host(indices, "indices"), host_values, n)

    return _run_sparse(
        prepare,
        n,
        dtype if dtype in _DTYPES else None,
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


# ------------------------------------------------------------------ dense path


def _dense_allreduce(
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
    """Dense path (no codec or ``NoCompression``): MPI's own ``Allreduce``."""
    comm, state, stats, channel = begin_call(comm, stats)
    codec_text = describe_codec(codec)
    error: BaseException | None = None
    n, dtype = -1, None
    device = _device.is_device(x)
    try:
        x = _check_values(x, "x")
        n, dtype = x.size, x.dtype
        _check_common(op, algorithm, _DENSE_ALGORITHMS)
        _check_out(out, n, dtype, device)
        _check_no_partial_overlap(out, x)
    except Exception as caught:
        error = caught
    index_size = _index_dtype(max(n, 0)).itemsize
    row = _signature_row(n, dtype, index_size, codec_text, algorithm, op, 0, max(n, 0))
    row[_FIELD["cost_model"]] = 0  # the dense path never consults the model
    table = _check_signature(channel, row, error, codec_text, "allreduce")
    stats.requested, stats.algorithm, stats.size, stats.n = algorithm, "dense", channel.size, n
    stats.itemsize, stats.k = x.dtype.itemsize, n
    stats.k_all = table[:, _FIELD["k"]].tolist()
    stats.nnz, stats.fill, stats.dense_ranges = n, 1.0, 1
    stats.index_itemsize, stats.rank = index_size, channel.rank  # predicted_bytes: lazily
    if device:
        return _dense_allreduce_device(x, channel, state.staging, op, stats, out)
    source = np.ascontiguousarray(x).reshape(-1)
    result = np.empty(x.shape, dtype=x.dtype) if out is None else out
    flat = result.reshape(-1)
    with stats._phase("allreduce"):
        in_place = np.shares_memory(flat, source)
        channel.allreduce_dense(MPI.IN_PLACE if in_place else source, flat)
    if op == "mean":
        with stats._phase("output"):
            flat /= x.dtype.type(channel.size)
    return result


def _dense_allreduce_device(
    x: Any,
    channel: Channel,
    staging: _device.DeviceStaging,
    op: str,
    stats: AllreduceStats,
    out: Any,
) -> Any:
    """The dense path for a CuPy ``x``: device buffers straight to a CUDA-aware MPI,
    else one staged round trip through pinned host memory."""
    cupy = sys.modules["cupy"]
    result = _device.device_output(out, x.shape, x.dtype)
    flat = result.reshape(-1)
    if channel.size > 1 and _device.cuda_aware():
        source = cupy.ascontiguousarray(x).reshape(-1)
        with stats._phase("allreduce"):
            _device.synchronize()  # MPI reads the buffer outside CuPy's stream order
            in_place = cupy.shares_memory(flat, source)
            channel.allreduce_dense(MPI.IN_PLACE if in_place else source, flat)
        if op == "mean":
            with stats._phase("output"):
                _device.divide(flat, channel.size)
        return result
    with stats._phase("stage"):
        host = staging.array_to_host(x, "dense")
    with stats._phase("allreduce"):
        channel.allreduce_dense(MPI.IN_PLACE, host.reshape(-1))
    with stats._phase("output"):
        if op == "mean":
            host /= x.dtype.type(channel.size)
        _device.dense_to_device(host, result)
    return result


# ------------------------------------------------------------------ registry

#: codec class -> collective; see :func:`register_collective`.
_COLLECTIVES: dict[type, Callable[..., np.ndarray]] = {}
_BUILTINS_LOADED = False


def register_collective(codec_type: type, collective: Callable[..., np.ndarray]) -> None:
    """Route ``allreduce(x, codec=c)`` to ``collective`` when ``c`` (or the codec inside
    an ``ErrorFeedback``) is an instance of ``codec_type``.

    ``collective(x, codec, *, comm, op, algorithm, key, step, stats, out)`` receives the
    codec as the user passed it (``ErrorFeedback`` included), must return the reduced
    dense array with ``x``'s shape, identical on every rank, and must begin with the
    signature check of this module so that a failing rank cannot hang the others.
    """
    _COLLECTIVES[codec_type] = collective


def _sparse_codec_allreduce(
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
    """Sparse family for sparse codecs (TopK, plain or under ErrorFeedback)."""
    holder: dict[str, Any] = {}
    device = _device.is_device(x)

    def prepare(staging: _device.DeviceStaging) -> tuple[np.ndarray, np.ndarray]:
        array = _check_values(x, "x")
        rank = comm.Get_rank() if comm is not None else MPI.COMM_WORLD.Get_rank()
        payload = codec.encode(array, key=key, step=step, rank=rank)
        if device:  # encoded on the device: only the k entries cross to the host
            payload = staging.payload_to_host(payload, "payload")
        holder["shape"] = array.shape
        return _prepare_stream(payload.arrays["indices"], payload.arrays["values"], array.size)

    is_array = isinstance(x, np.ndarray) or device
    n = x.size if is_array else -1
    dtype = x.dtype if is_array and x.dtype in _DTYPES else None
    flat_out: Any = out
    if (isinstance(out, np.ndarray) or _device.is_device(out)) and out.flags.c_contiguous:
        flat_out = out.reshape(-1)
    result = _run_sparse(
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
    )
    return result.reshape(holder["shape"]) if out is None else out


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    try:
        from sparcomm.codecs import NoCompression, TopK
    except ImportError:  # pragma: no cover - only while the codecs package is incomplete
        return
    _COLLECTIVES.setdefault(TopK, _sparse_codec_allreduce)
    _COLLECTIVES.setdefault(NoCompression, _dense_allreduce)
    # QSGD, TernGrad, OneBit and FP16 register on import (issue 4, sparcomm.comm._quantized)
    import sparcomm.comm._quantized  # noqa: F401
    from sparcomm.codecs.powersgd import PowerSGD  # the low-rank family (issue 13)
    from sparcomm.comm._lowrank import lowrank_allreduce

    _COLLECTIVES.setdefault(PowerSGD, lowrank_allreduce)


def _lookup(codec: Any) -> Callable[..., np.ndarray]:
    if codec is None:
        return _dense_allreduce
    _load_builtins()
    base = _inner_codec(codec)
    for cls in type(base).__mro__:
        if cls in _COLLECTIVES:
            return _COLLECTIVES[cls]
    supported = ", ".join(sorted(cls.__name__ for cls in _COLLECTIVES)) or "none"
    error = NotImplementedError(
        f"no allreduce for codec {type(base).__name__}; supported: {supported} "
        "(TopK also under ErrorFeedback); use codec=NoCompression() for a dense allreduce"
    )

    def refuse(x, codec, *, comm, op, algorithm, key, step, stats, out):
        # Tell the other ranks before raising, so that none waits for us.
        channel = begin_call(comm, stats)[3]
        row = _signature_row(-1, None, 0, describe_codec(codec), algorithm, op, 0, 0)
        _check_signature(channel, row, error, describe_codec(codec), "allreduce")
        raise error  # pragma: no cover - _check_signature raised already

    return refuse


def allreduce(
    x: np.ndarray,
    codec: Any = None,
    comm: MPI.Comm | None = None,
    *,
    op: str = "sum",
    algorithm: str = "auto",
    key: Any = None,
    step: int | None = None,
    stats: AllreduceStats | None = None,
    out: Any = None,
    dense_phase: Any = None,
) -> np.ndarray:
    """Allreduce a dense buffer through a codec: the result is the same on every rank.

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64
        This rank's buffer (any shape; the same size and dtype on every rank).
    codec : codec, optional
        ``TopK`` (optionally wrapped in ``ErrorFeedback``): each rank's top-k entries
        are summed with the sparse family (SparCML).  ``NoCompression`` or ``None``:
        MPI's dense ``Allreduce``.  ``QSGD``, ``TernGrad``, ``OneBit``, ``FP16``
        (optionally under ``ErrorFeedback``): the quantized collectives of
        :mod:`sparcomm.comm._quantized` (docs/quantized.md).  Other codecs register with
        :func:`register_collective`; an unregistered one raises ``NotImplementedError``.
    comm : mpi4py.MPI.Comm, optional
        Communicator, ``MPI.COMM_WORLD`` by default.
    op : {"sum", "mean"}
        ``mean`` divides by the number of ranks.
    algorithm : str
        ``auto`` (cost model) or one of ``allgather``, ``recursive_doubling``,
        ``split_allgather``, ``dsar``, ``dense``.  The dense path accepts ``auto`` and
        ``dense``; quantized codecs ``auto``, ``allgather``, ``reduce_scatter_allgather``
        and, for TernGrad, ``shared_scale``.
    key, step :
        Passed to ``codec.encode`` (the error-feedback residual's key, the RNG step).
    stats : AllreduceStats, optional
        Filled in place.
    out : numpy.ndarray, optional
        Output buffer with ``x``'s size and dtype (``out=x`` reduces in place).
    dense_phase : QSGD, TernGrad or FP16, optional
        With a ``TopK`` codec: SparCML's Q-DSAR, DSAR whose dense gather phase is
        quantized with this codec (see :mod:`sparcomm.comm._quantized_dsar`).

    Returns
    -------
    numpy.ndarray
        The reduced array, shaped like ``x``, bitwise identical on every rank.

    Raises
    ------
    TypeError, ValueError, NotImplementedError
        On every rank, when any rank's input is invalid or ranks disagree on size,
        dtype, codec, op or algorithm.
    """
    if dense_phase is not None:  # Q-DSAR (issue 4): sparcomm.comm._quantized_dsar
        from sparcomm.comm._quantized_dsar import qdsar_allreduce

        return qdsar_allreduce(
            x,
            codec,
            dense_phase,
            comm=comm,
            op=op,
            algorithm=algorithm,
            key=key,
            step=step,
            stats=stats,
            out=out,
        )
    collective = _lookup(codec)
    return collective(
        x, codec, comm=comm, op=op, algorithm=algorithm, key=key, step=step, stats=stats, out=out
    )
