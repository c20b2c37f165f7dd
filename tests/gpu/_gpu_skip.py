"""Module-level skip for the tests that need CuPy and a CUDA device.

With ``SPARCOMM_TEST_HOST_CUPY=1`` (set only by ``test_host_cupy.py`` for its child
process) the tests run instead on the host CuPy double (``tests/gpu/_host_cupy``) with
the kernels on the host CUDA emulator: see :func:`emulated`.
"""

from __future__ import annotations

import os

import pytest


def emulated() -> bool:
    """True when the GPU tests run on the host CuPy double and the CUDA emulator.

    The emulator runs one host thread per CUDA thread, so tests pick smaller sizes
    when this is true; on a real GPU they keep their full sizes.
    """
    return os.environ.get("SPARCOMM_TEST_HOST_CUPY") == "1"


def require_gpu():
    """Return the ``cupy`` module, or skip the calling test module."""
    if emulated():
        from _gpu_emulator import install_host_cupy

        return install_host_cupy()
    cupy = pytest.importorskip("cupy", reason="CuPy not installed (pip install 'sparcomm[gpu]')")
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as error:  # noqa: BLE001 - no driver, or a broken one
        pytest.skip(f"no usable CUDA device ({error})", allow_module_level=True)
    if count == 0:
        pytest.skip("no CUDA device", allow_module_level=True)
    return cupy
