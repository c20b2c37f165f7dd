"""CuPy inputs to the collectives: encode and decode on the device, merge on the host.

Every collective of :mod:`sparcomm.comm` accepts a ``cupy.ndarray`` for ``x`` (and
``out``) and returns a ``cupy.ndarray``, bitwise equal to what the same call returns for
the NumPy copy of the input.  The work is split where it is cheapest:

* **Encoding runs on the device**, with the GPU kernels and the codec's error-feedback
  residuals kept on the device.  Only the payload -- ``k`` entries for TopK, ``n/8`` bytes
  for 4-bit QSGD -- crosses to the host, in one copy into a reusable page-locked buffer
  (:class:`~sparcomm.kernels.gpu.staging.PinnedStaging`, one set per communicator).
* **Exchanges and merges run on the host**, in the same code as for NumPy inputs: the
  sparse algorithms' merges, the owner sums of ``reduce_scatter_allgather``, TernGrad's
  integer sums.  MPI needs host buffers unless it is CUDA-aware, and this data is small.
* **Decoding runs on the device** where the result is a sum of decoded payloads (the
  quantized ``allgather`` and ``reduce_scatter_allgather``): the gathered payloads cross
  back in one copy (:func:`payloads_to_device`) and are decoded and added in rank
  order, each in one pass (``decode(..., accumulate=1)``).  Other results go back once:
  a sparse sum is scattered into a zeroed device array (only its nonzeros cross), a
  dense one is copied from pinned memory.

The bits are the NumPy path's because the GPU kernels produce the CPU kernels' bits
(``kernels/gpu``), the device sums add in the host's order with the same IEEE additions,
and everything else is the CPU code.

The dense path (no codec, ``NoCompression``) has no encoding to do on the device.  When
the MPI library is CUDA-aware (:func:`sparcomm._gpu_info.cuda_aware_mpi`, asked once per
process) it hands the device buffers straight to ``MPI_Allreduce``; otherwise it stages
them through pinned memory.  The sparse and quantized paths stage their payloads in
both cases, because their merges run on the host.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np

from sparcomm._backend import is_cupy_array
from sparcomm.payload import Payload

_CUDA_AWARE: bool | None = None


def is_device(x: Any) -> bool:
    """Whether ``x`` is a CuPy array (never imports CuPy)."""
    return is_cupy_array(x)


def cuda_aware() -> bool:
    """Whether MPI accepts device buffers (asked once per process; False when unknown)."""
    global _CUDA_AWARE
    if _CUDA_AWARE is None:
        from sparcomm._gpu_info import cuda_aware_mpi

        _CUDA_AWARE = bool(cuda_aware_mpi()["cuda_aware"])
    return _CUDA_AWARE


def synchronize() -> None:
    """Wait for the current CUDA stream: device buffers are complete before MPI reads them."""
    sys.modules["cupy"].cuda.get_current_stream().synchronize()


class DeviceStaging:
    """Page-locked host buffers of one communicator, created on first use.

    A view handed out for a slot stays valid until the next use of that slot; every
    collective consumes its views before it returns, and a communicator runs one
    collective at a time.
    """

    def __init__(self) -> None:
        self._pinned: Any = None

    @property
    def pinned(self) -> Any:
        if self._pinned is None:
            from sparcomm.kernels.gpu.staging import PinnedStaging

            self._pinned = PinnedStaging()
        return self._pinned

    def array_to_host(self, x: Any, slot: str) -> np.ndarray:
        """A host copy of the device array ``x`` (a view of the slot's pinned buffer)."""
        return self.pinned.to_host(x, slot=slot)

    def payload_to_host(self, payload: Payload, slot: str) -> Payload:
        """The payload with its arrays in host memory (one packed device-to-host copy)."""
        if not any(is_device(array) for array in payload.arrays.values()):
            return payload
        return Payload.from_bytes(self.array_to_host(payload.to_bytes(), slot))

    def host_buffer(self, size: int, dtype: Any, slot: str) -> np.ndarray:
        """An uninitialised pinned host array of ``size`` elements."""
        dtype = np.dtype(dtype)
        return self.pinned.buffer(slot, size * dtype.itemsize).view(dtype)


def payloads_to_device(payloads: list[Payload], buffer: np.ndarray) -> list[Payload]:
    """The payloads, whose arrays are host views into ``buffer``, as the same views into
    one device copy of ``buffer`` (a single host-to-device copy for all of them).

    Payload arrays are 8-byte aligned within their payload and every block of a gathered
    buffer is a multiple of 8 bytes, so the device views are aligned for their dtype.
    """
    device = sys.modules["cupy"].asarray(buffer)
    base = buffer.ctypes.data
    moved = []
    for payload in payloads:
        arrays = {}
        for name, array in payload.arrays.items():
            offset = array.ctypes.data - base
            arrays[name] = device[offset : offset + array.nbytes].view(array.dtype)
        moved.append(dataclasses.replace(payload, arrays=arrays))
    return moved


def device_output(out: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """``out``, or a new device array of ``shape`` and ``dtype``."""
    if out is not None:
        return out
    return sys.modules["cupy"].empty(shape, dtype=dtype)


def dense_to_device(host: np.ndarray, out: Any) -> Any:
    """Copy the host result into the device array ``out`` (same size); returns ``out``."""
    out.reshape(-1).set(np.ascontiguousarray(host).reshape(-1))
    # The host buffer is a pinned slot the next collective reuses: the copy must be done
    # (CuPy may run it asynchronously on a non-default current stream).
    synchronize()
    return out


def sparse_to_device(indices: np.ndarray, values: np.ndarray, out: Any) -> Any:
    """Write a sorted, duplicate-free sparse sum into ``out`` (zero elsewhere); only the
    nonzeros cross to the device, and placing them is a copy, so the bits are exact."""
    cupy = sys.modules["cupy"]
    flat = out.reshape(-1)
    flat.fill(0)
    if indices.size:
        flat[cupy.asarray(indices)] = cupy.asarray(values)
    synchronize()  # as in dense_to_device: the host arrays may be reused buffers
    return out


def result_to_device(result: Any, out: Any) -> Any:
    """Place what :func:`sparcomm.comm._sparse.finish` returned (a dense host array or a
    sorted ``(indices, values)`` pair) into the device array ``out``."""
    if isinstance(result, tuple):
        return sparse_to_device(result[0], result[1], out)
    return dense_to_device(result, out)


def divide(flat: Any, divisor: int) -> None:
    """``flat /= divisor`` in place on the device, keeping float32 subnormals.

    CuPy's own ``/=`` is compiled with ``-ftz=true`` and would flush them, so the mean
    of a CUDA-aware allreduce uses the kernel layer's division (built ``-ftz=false``),
    which rounds like NumPy's.
    """
    from sparcomm._backend import kernels_for

    kernels_for(sys.modules["cupy"]).divide_scalar(flat, divisor, flat)
