"""Q-DSAR: the DSAR sparse allreduce with a quantized dense phase (SparCML, Section 5).

Renggli, Ashkboos, Aghagolzadeh, Alistarh, Hoefler, "SparCML: High-Performance Sparse
Communication for Machine Learning", SC'19: once the sum of the sparse inputs has filled
up, the gather phase of DSAR moves dense data; quantizing that data with stochastic
rounding (QSGD) cuts its bytes by ``32 / bits`` while keeping the sum unbiased.

Schedule (``allreduce(x, codec=TopK(...), dense_phase=QSGD(bits=8))``):

1. Each rank encodes its top-k (with error feedback if the codec has it), exactly as the
   sparse path of :mod:`sparcomm.comm._allreduce` does, and the signature check runs.
2. DSAR's reduce-scatter (:func:`sparcomm.comm._sparse._reduce_scatter`): owner ``j``
   sums the entries of range ``j`` at full precision, sparse or dense by SparCML's rule.
3. Gather: an owner whose range is dense, or whose sparse range would take at least as
   many bytes as the quantized dense one, encodes the range with ``dense_phase`` (its
   rank, a key of its own) and sends the payload; other owners send their (values,
   indices).  One ``Allgather`` of the block kinds, one ``Allgatherv`` of the blocks;
   every rank decodes the same bytes, so the result is identical everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from sparcomm.comm import _cost, _sparse
from sparcomm.comm._call import Local, begin_call
from sparcomm.comm._device import device_output, is_device, result_to_device
from sparcomm.comm._protocol import (
    SIGNATURE_COLUMNS,
    SPARSE_ALGORITHM_CODES,
    STATUS_BYTES,
    code,
    describe_codec,
    error_code,
    first_failure,
    raise_failure,
    write_status,
)
from sparcomm.comm._quantized_layout import chunk_nbytes
from sparcomm.comm._stats import AllreduceStats
from sparcomm.comm._validate import (
    check_common,
    check_out,
    check_values,
    index_dtype,
    prepare_stream,
)
from sparcomm.feedback import unwrap
from sparcomm.payload import Payload

_REQUESTABLE = ("auto", "dsar")


def dense_phase_key(key: Any) -> str:
    """Key of the random stream an owner quantizes its dense range with."""
    return f"sparcomm.dense_phase:{key!r}"


def _padded(nbytes: float) -> float:
    return -(-nbytes // 8) * 8


def _check_dense_phase(codec: Any, dense_phase: Any) -> Any:
    bare, _ = unwrap(codec)
    if getattr(bare, "family", None) != "sparse":
        raise NotImplementedError(
            f"dense_phase= quantizes the dense phase of the sparse allreduce (SparCML's "
            f"Q-DSAR) and needs codec=TopK(...), ErrorFeedback(TopK(...)) or another codec "
            f"of the sparse family, got {type(bare).__name__}; drop dense_phase for this codec"
        )
    if not getattr(dense_phase, "dense_phase_capable", False):
        raise NotImplementedError(
            f"dense_phase must be a stateless quantized codec such as QSGD(...), "
            f"TernGrad(...) or FP16() (no error feedback: the owners change every step), "
            f"got {dense_phase!r}"
        )
    return bare


def _quantized_gather(
    problem: _sparse.Problem,
    bounds: np.ndarray,
    mine: _sparse.Piece,
    dense_codec: Any,
    key: Any,
    step: int | None,
) -> list[_sparse.Piece]:
    """Allgather every owner's range: dense ranges as ``dense_codec`` payloads."""
    channel = problem.channel
    stats, size, rank = channel.stats, channel.size, channel.rank
    dtype, entry = problem.values.dtype, problem.entry_bytes
    lengths = np.diff(bounds)
    quantized_bytes = [chunk_nbytes(dense_codec, int(m), dtype) for m in lengths]
    length = int(lengths[rank])
    quantize = length > 0 and (mine.dense or mine.nnz * entry >= quantized_bytes[rank])
    error: BaseException | None = None
    if quantize:
        block = np.zeros(STATUS_BYTES + quantized_bytes[rank], dtype=np.uint8)
        with stats._phase("quantize"):
            if mine.indices is None:
                dense = mine.values
            else:
                dense = _sparse._densify(mine.indices, mine.values, mine.start, length)
            try:
                payload = dense_codec.encode(dense, key=dense_phase_key(key), step=step, rank=rank)
                payload.to_bytes(out=block[STATUS_BYTES:])
                write_status(block, -1, 0)
            except Exception as caught:  # a sum that overflowed: raised on every rank below
                error = caught
                write_status(block, rank, error_code(caught))
    else:
        assert mine.indices is not None  # not quantized: the piece is sparse
        values_bytes = mine.nnz * dtype.itemsize
        block = np.zeros(STATUS_BYTES + int(_padded(mine.nnz * entry)), dtype=np.uint8)
        write_status(block, -1, 0)
        block[STATUS_BYTES : STATUS_BYTES + values_bytes] = mine.values.view(np.uint8)
        block[STATUS_BYTES + values_bytes : STATUS_BYTES + mine.nnz * entry] = mine.indices.astype(
            problem.indices.dtype, copy=False
        ).view(np.uint8)
    with stats._phase("allgather"):
        header = channel.allgather_array(np.array([-1 if quantize else mine.nnz], np.int64))
        header = header[:, 0]
        sizes = np.array(
            [
                STATUS_BYTES + (quantized_bytes[j] if header[j] < 0 else _padded(header[j] * entry))
                for j in range(size)
            ],
            dtype=np.int64,
        )
        gathered, offsets = channel.allgatherv(block, sizes)
    raise_failure(error, *first_failure(gathered, offsets))
    stats.dense_ranges = int(np.sum(header < 0))
    pieces = []
    with stats._phase("decode"):
        for j in range(size):
            start, stop = int(bounds[j]), int(bounds[j + 1])
            data = gathered[offsets[j] + STATUS_BYTES : offsets[j + 1]]
            if header[j] < 0:
                values = dense_codec.decode(Payload.from_bytes(data))
                pieces.append(_sparse.Piece(start, stop, None, values))
                continue
            count = int(header[j])
            values = data[: count * dtype.itemsize].view(dtype)
            indices = data[count * dtype.itemsize : count * entry].view(problem.indices.dtype)
            if not indices.flags.aligned:  # int64 indices behind an odd number of float32s
                indices = indices.copy()
            pieces.append(_sparse.Piece(start, stop, indices, values))
    return pieces


def predict_qdsar(
    n: int, k_all: Any, itemsize: int, index_itemsize: int, dense_codec: Any, dtype: Any
) -> _cost.Prediction:
    """DSAR's predicted schedule with the gather phase of :func:`_quantized_gather`.

    The reduce-scatter is DSAR's (:func:`sparcomm.comm._cost.predict`); each owner's
    range is gathered as a ``dense_codec`` payload when its expected fill (random
    supports) makes sparse at least as large, else as padded (values, indices).
    """
    prediction = _cost.predict("dsar", n, k_all, itemsize, index_itemsize, True)
    k = np.asarray(k_all, dtype=np.float64)
    size = k.size
    if size == 1:
        return prediction
    bounds = _sparse.split_bounds(n, size)
    lengths = np.diff(bounds)
    blocks = np.empty(size)
    for j in range(size):
        owned = _cost.expected_union(k, n, float(lengths[j]))
        quantized = chunk_nbytes(dense_codec, int(lengths[j]), dtype)
        sparse = owned * (itemsize + index_itemsize)
        blocks[j] = STATUS_BYTES + (
            quantized if lengths[j] and sparse >= quantized else _padded(sparse)
        )
    header_sent = header_received = np.full(size, 8.0 * (size - 1))
    for i, phase in enumerate(prediction.phases):
        if phase.name == "allgather":
            prediction.phases[i] = _cost.Phase(
                "allgather",
                phase.messages,
                header_sent + (size - 1) * blocks,
                header_received + blocks.sum() - blocks,
            )
    return prediction


def qdsar_allreduce(
    x: Any,
    codec: Any,
    dense_phase: Any,
    *,
    comm: MPI.Comm | None,
    op: str,
    algorithm: str,
    key: Any,
    step: int | None,
    stats: AllreduceStats | None,
    out: Any,
) -> np.ndarray:
    """``allreduce(x, codec=TopK(...), dense_phase=QSGD(...))``: Q-DSAR.

    Parameters are those of :func:`sparcomm.comm.allreduce`; ``algorithm`` may be
    ``"auto"`` or ``"dsar"`` (the only algorithm with a dense phase).  ``dense_phase``
    is a bare ``QSGD``, ``TernGrad`` or ``FP16`` (``dense_phase_capable``); its random
    stream uses the owner's
    rank and :func:`dense_phase_key`.

    Returns
    -------
    numpy.ndarray
        The sum (or mean), shaped like ``x``, bitwise identical on every rank; an
        unbiased estimate of the DSAR sum when the dense phase is QSGD or TernGrad.
    """
    call = begin_call(comm, stats)
    state, stats, channel = call.state, call.stats, call.channel
    codec_text = f"{describe_codec(codec)} with dense_phase {describe_codec(dense_phase)}"
    device = is_device(x)
    stream: dict[str, np.ndarray] = {}

    def prepare() -> Local:
        _check_dense_phase(codec, dense_phase)
        check_common(op, algorithm, _REQUESTABLE)
        array = check_values(x, "x")
        check_out(out, array.size, array.dtype, device)
        with stats._phase("prepare"):
            payload = codec.encode(array, key=key, step=step)
            if device:  # TopK ran on the device; the reduction runs on the host
                payload = state.staging.payload_to_host(payload, "payload")
            stream["indices"], stream["values"] = prepare_stream(
                payload.arrays["indices"], payload.arrays["values"], array.size
            )
        return Local(
            array.size, array.dtype, index_dtype(array.size).itemsize, stream["indices"].size
        )

    # Q-DSAR has one algorithm: no cost model is consulted.
    table = call.agree(
        prepare,
        codec_text=codec_text,
        algorithm=code(SPARSE_ALGORITHM_CODES, algorithm if algorithm in _REQUESTABLE else None),
        op=op,
    )
    indices, values = stream["indices"], stream["values"]
    n = x.size
    size = channel.size
    k_all = table[:, SIGNATURE_COLUMNS["k"]].copy()
    stats.requested, stats.algorithm, stats.size, stats.n = algorithm, "dsar", size, n
    stats.itemsize, stats.index_itemsize = values.dtype.itemsize, indices.dtype.itemsize
    stats.k, stats.k_all = int(indices.size), k_all.tolist()
    stats.predicted_bytes = predict_qdsar(
        n, k_all, values.dtype.itemsize, indices.dtype.itemsize, dense_phase, values.dtype
    ).bytes(channel.rank)
    problem = _sparse.Problem(channel, n, indices, values, k_all)
    bounds = _sparse.split_bounds(n, size)
    mine = _sparse._reduce_scatter(problem, bounds, switch=True)
    pieces = _quantized_gather(problem, bounds, mine, dense_phase, key, step)
    stats.nnz = _sparse.result_nnz(pieces)
    stats.fill = stats.nnz / max(1, int(k_all.max()))
    mean = float(size) if op == "mean" else None
    with stats._phase("output"):
        if device:
            result = _sparse.finish(pieces, n, values.dtype, indices.dtype, None, mean, None)
            return result_to_device(result, device_output(out, x.shape, values.dtype))
        flat = _sparse.finish(
            pieces,
            n,
            values.dtype,
            indices.dtype,
            True,
            mean,
            None if out is None else out.reshape(-1),
        )
    return flat.reshape(x.shape) if out is None else out
