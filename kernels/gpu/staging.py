"""Reusable page-locked host buffers for sending CuPy arrays through a host-only MPI.

Where the MPI library is not CUDA-aware (``sparcomm._gpu_info.cuda_aware_mpi()``; the
``mpich`` wheel from PyPI is not), a collective must copy device buffers to host memory
and back.  Copies from and to page-locked (pinned) memory run at full PCIe/NVLink speed
and need no extra staging copy in the driver; allocating pinned memory is slow, so the
buffers are kept per slot and grown geometrically, never freed between calls.
"""

from __future__ import annotations

import cupy
import numpy as np


class PinnedStaging:
    """Named, growing pinned host buffers and the device <-> host copies through them.

    Examples
    --------
    >>> staging = PinnedStaging()
    >>> host = staging.to_host(grad, slot="send")       # numpy view of pinned memory
    >>> comm.Allreduce(MPI.IN_PLACE, host)
    >>> staging.to_device(host, out=grad)
    """

    def __init__(self) -> None:
        self._memory: dict[str, cupy.cuda.PinnedMemoryPointer] = {}
        self._sizes: dict[str, int] = {}

    def buffer(self, slot: str, nbytes: int) -> np.ndarray:
        """A uint8 view of at least ``nbytes`` pinned bytes, reused across calls."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if self._sizes.get(slot, -1) < nbytes:
            size = max(nbytes, 2 * self._sizes.get(slot, 0), 4096)
            self._memory[slot] = cupy.cuda.alloc_pinned_memory(size)
            self._sizes[slot] = size
        return np.frombuffer(self._memory[slot], dtype=np.uint8, count=nbytes)

    def to_host(self, x: cupy.ndarray, slot: str = "send") -> np.ndarray:
        """Copy ``x`` (C-contiguous) into the slot's pinned buffer; returns a NumPy view.

        The view is valid until the next use of the same slot.  Synchronises the
        current stream, so the data is on the host when this returns.
        """
        if not isinstance(x, cupy.ndarray):
            raise TypeError(f"x must be a cupy.ndarray, got {type(x).__qualname__}")
        x = cupy.ascontiguousarray(x)
        host = self.buffer(slot, x.nbytes).view(x.dtype).reshape(x.shape)
        x.get(out=host)  # blocking: waits for the current stream
        return host

    def to_device(self, host: np.ndarray, out: cupy.ndarray) -> cupy.ndarray:
        """Copy ``host`` into the device array ``out`` (same size and dtype); returns ``out``."""
        if not isinstance(out, cupy.ndarray):
            raise TypeError(
                f"out must be a cupy.ndarray, got {type(out).__qualname__}; allocate it with "
                "cupy.empty()"
            )
        if out.dtype != host.dtype or out.size != host.size or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be a C-contiguous {host.dtype} array of {host.size} elements, got "
                f"{out.dtype} with {out.size} elements"
            )
        out.set(host.reshape(out.shape))
        return out

    def nbytes(self) -> int:
        """Pinned bytes held by all slots."""
        return sum(self._sizes.values())
