"""The dense family: MPI's own ``Allreduce`` of the values (no codec, ``NoCompression``).

Host buffers go straight to MPI; CuPy buffers go to a CUDA-aware MPI as they are, or
through one staged round trip in pinned host memory.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from mpi4py import MPI

from sparcomm.comm import _cost, _device
from sparcomm.comm._call import Local, begin_call
from sparcomm.comm._context import Channel
from sparcomm.comm._protocol import (
    SIGNATURE_COLUMNS,
    SPARSE_ALGORITHM_CODES,
    code,
    describe_codec,
)
from sparcomm.comm._stats import AllreduceStats
from sparcomm.comm._validate import (
    check_common,
    check_no_partial_overlap,
    check_out,
    check_values,
    index_dtype,
)

#: What the dense path may ask for.
_REQUESTABLE = ("auto", "dense")


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

    def prepare() -> Local:
        array = check_values(x, "x")
        check_common(op, algorithm, _REQUESTABLE)
        check_out(out, array.size, array.dtype, device)
        check_no_partial_overlap(out, array)
        return Local(array.size, array.dtype, index_dtype(array.size).itemsize, array.size)

    # The dense path never consults the cost model.
    table = call.agree(
        prepare,
        codec_text=describe_codec(codec),
        algorithm=code(SPARSE_ALGORITHM_CODES, algorithm),
        op=op,
    )
    n = x.size
    stats.requested, stats.algorithm, stats.size, stats.n = algorithm, "dense", channel.size, n
    stats.itemsize, stats.k = x.dtype.itemsize, n
    stats.k_all = table[:, SIGNATURE_COLUMNS["k"]].tolist()
    stats.nnz, stats.fill, stats.dense_ranges = n, 1.0, 1
    stats.index_itemsize, stats.rank = index_dtype(n).itemsize, channel.rank
    stats._predictor = _cost.lazy_predicted_bytes(stats)
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
