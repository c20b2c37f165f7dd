"""``cupy.cuda`` of the host test double: pretend devices, synchronous streams.

Nothing here touches a GPU.  Device properties describe the double itself (its name
says so); streams and events are synchronous, event times are host wall-clock times;
pinned memory is ordinary host memory with the buffer protocol, as
``numpy.frombuffer(cupy.cuda.alloc_pinned_memory(n))`` needs.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

from . import nvrtc, runtime
from .runtime import CUDARuntimeError

__all__ = [
    "CUDARuntimeError",
    "Device",
    "Event",
    "MemoryPointer",
    "PinnedMemoryPointer",
    "Stream",
    "alloc_pinned_memory",
    "get_current_stream",
    "get_elapsed_time",
    "is_available",
    "nvrtc",
    "runtime",
]


def is_available() -> bool:
    return True


class Device:
    """A CUDA device (``runtime.getDeviceCount()`` of them; the current one by default)."""

    def __init__(self, device: int | None = None) -> None:
        device = runtime.getDevice() if device is None else int(device)
        if not 0 <= device < runtime.getDeviceCount():
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        self.id = device

    @property
    def compute_capability(self) -> str:
        props = runtime.getDeviceProperties(self.id)
        return f"{props['major']}{props['minor']}"

    @property
    def mem_info(self) -> tuple[int, int]:
        total = runtime.getDeviceProperties(self.id)["totalGlobalMem"]
        return total, total

    def synchronize(self) -> None:
        """Nothing is ever in flight: every call of the double completes before returning."""

    def use(self) -> None:
        """Make this device current for the calling thread (CUDA: per host thread)."""
        runtime.setDevice(self.id)

    def __enter__(self) -> Device:
        _thread_stack("devices").append(runtime.getDevice())
        self.use()
        return self

    def __exit__(self, *exc: Any) -> None:
        runtime.setDevice(_thread_stack("devices").pop())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __int__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"


class MemoryPointer:
    """A device pointer (``ndarray.data``): an address, not host-addressable here."""

    def __init__(self, ptr: int, device_id: int = 0) -> None:
        self.ptr = ptr
        self.device_id = device_id

    @property
    def device(self) -> Device:
        return Device(self.device_id)

    def __int__(self) -> int:
        return self.ptr


class Stream:
    """A CUDA stream; work on the double is synchronous, so every stream is idle."""

    null: Stream

    def __init__(self, null: bool = False, non_blocking: bool = False, ptr: int = 0) -> None:
        self.ptr = 0 if null else id(self)
        self.non_blocking = non_blocking

    def synchronize(self) -> None:
        """Nothing to wait for."""

    @property
    def done(self) -> bool:
        return True

    def use(self) -> Stream:
        """Make this stream current for the calling thread (thread-local, as in CuPy)."""
        _thread.stream = self
        return self

    def __enter__(self) -> Stream:
        _thread_stack("streams").append(get_current_stream())
        return self.use()

    def __exit__(self, *exc: Any) -> None:
        _thread.stream = _thread_stack("streams").pop()

    def record(self, event: Event | None = None) -> Event:
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event: Event) -> None:
        """Make later work on this stream wait for ``event`` (already complete here)."""
        if not isinstance(event, Event):
            raise TypeError(
                f"Argument 'event' has incorrect type (expected Event, got {type(event).__name__})"
            )


Stream.null = Stream(null=True)
_thread = threading.local()


def _thread_stack(name: str) -> list[Any]:
    if not hasattr(_thread, name):
        setattr(_thread, name, [])
    return getattr(_thread, name)


def get_current_stream(device_id: int = -1) -> Stream:
    return getattr(_thread, "stream", Stream.null)


class Event:
    """A CUDA event; ``record`` stamps the host clock (work here is synchronous)."""

    def __init__(
        self, block: bool = False, disable_timing: bool = False, interprocess: bool = False
    ) -> None:
        self.disable_timing = disable_timing
        self._time: float | None = None

    def record(self, stream: Stream | None = None) -> None:
        self._time = time.perf_counter()

    def synchronize(self) -> None:
        """Recorded work is complete already."""

    @property
    def done(self) -> bool:
        return True


def get_elapsed_time(start_event: Event, end_event: Event) -> float:
    """Milliseconds between two recorded events (host time on the double)."""
    for event in (start_event, end_event):
        if event.disable_timing:
            raise CUDARuntimeError("cudaErrorInvalidResourceHandle: event without timing")
        if event._time is None:
            raise CUDARuntimeError("cudaErrorInvalidResourceHandle: event never recorded")
    return (end_event._time - start_event._time) * 1e3  # type: ignore[operator]


class PinnedMemoryPointer(bytearray):
    """Page-locked host memory of ``size`` bytes (ordinary host memory on the double).

    A ``bytearray`` so that it exports the buffer protocol, like CuPy's pointer, for
    ``numpy.frombuffer``.
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size
        self.ptr = ctypes.addressof((ctypes.c_char * max(size, 1)).from_buffer(self)) if size else 0


def alloc_pinned_memory(size: int) -> PinnedMemoryPointer:
    size = int(size)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return PinnedMemoryPointer(size)
