"""``cupy.cuda.runtime`` of the host test double: pretend devices, named as such.

One device by default; ``SPARCOMM_HOST_CUPY_DEVICES=N`` pretends N.  The current device
is per host thread, as in the CUDA runtime (``cudaSetDevice``): a new thread starts on
device 0 whatever device the thread that started it uses.
"""

from __future__ import annotations

import os
import threading
from typing import Any

_VERSION = 12080  # reported CUDA runtime/driver version (12.8)
_PROPERTIES: dict[str, Any] = {
    "name": b"sparcomm host CuPy double (no GPU)",
    "major": 9,
    "minor": 0,
    "totalGlobalMem": 16 * 2**30,
    "multiProcessorCount": 4,
    "warpSize": 32,
    "maxThreadsPerBlock": 1024,
}


class CUDARuntimeError(RuntimeError):
    """Raised like CuPy's ``cupy_backends.cuda.api.runtime.CUDARuntimeError``."""


_thread = threading.local()


def getDeviceCount() -> int:  # noqa: N802 - CuPy's name
    return int(os.environ.get("SPARCOMM_HOST_CUPY_DEVICES", "1"))


def getDevice() -> int:  # noqa: N802
    return getattr(_thread, "device", 0)


def setDevice(device: int) -> None:  # noqa: N802
    if not 0 <= int(device) < getDeviceCount():
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    _thread.device = int(device)


def getDeviceProperties(device: int) -> dict[str, Any]:  # noqa: N802
    if not 0 <= int(device) < getDeviceCount():
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    return dict(_PROPERTIES)


def runtimeGetVersion() -> int:  # noqa: N802
    return _VERSION


def driverGetVersion() -> int:  # noqa: N802
    return _VERSION


def deviceSynchronize() -> None:  # noqa: N802
    """Nothing is ever in flight on the double."""
