"""``cupy.cuda.runtime`` of the host test double: one pretend device, named as such."""

from __future__ import annotations

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


def getDeviceCount() -> int:  # noqa: N802 - CuPy's name
    return 1


def getDevice() -> int:  # noqa: N802
    return 0


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
