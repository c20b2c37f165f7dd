"""Module-level skip for the tests that need CuPy and a CUDA device."""

from __future__ import annotations

import pytest


def require_gpu():
    """Return the ``cupy`` module, or skip the calling test module."""
    cupy = pytest.importorskip("cupy", reason="CuPy not installed (pip install 'sparcomm[gpu]')")
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as error:  # noqa: BLE001 - no driver, or a broken one
        pytest.skip(f"no usable CUDA device ({error})", allow_module_level=True)
    if count == 0:
        pytest.skip("no CUDA device", allow_module_level=True)
    return cupy
