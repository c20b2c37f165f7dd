"""Array-module dispatch: NumPy arrays run on ``sparcomm.kernels.cpu`` (Numba),
CuPy arrays on ``sparcomm.kernels.gpu`` (CUDA).

Detection never imports CuPy: an array is a CuPy array only if ``cupy`` is already in
``sys.modules`` (the user imported it) and the array is an instance of
``cupy.ndarray``.  Mixed NumPy/CuPy inputs are a TypeError, as in array-api-compat.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np


def is_cupy_array(x: Any) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


def array_module(*arrays: Any) -> ModuleType:
    """Return ``numpy`` or ``cupy`` for the given arrays (``None`` entries ignored).

    Raises
    ------
    TypeError
        If the arrays come from different modules, or one is neither NumPy nor CuPy.
    """
    modules = set()
    for x in arrays:
        if x is None:
            continue
        if isinstance(x, np.ndarray):
            modules.add("numpy")
        elif is_cupy_array(x):
            modules.add("cupy")
        else:
            raise TypeError(
                f"expected a numpy.ndarray or cupy.ndarray, got {type(x).__module__}."
                f"{type(x).__qualname__}; convert it with numpy.asarray() (or, for a "
                "torch tensor, tensor.numpy() / cupy.from_dlpack(tensor))"
            )
    if len(modules) > 1:
        raise TypeError(
            "mixed numpy and cupy arrays in one call; move them to one device first "
            "(cupy.asarray() or cupy.asnumpy())"
        )
    if modules == {"cupy"}:
        return sys.modules["cupy"]
    return np


def kernels_for(xp: ModuleType) -> ModuleType:
    """The kernel module for an array module: ``sparcomm.kernels.cpu`` or ``.gpu``."""
    if xp is np:
        from sparcomm.kernels import cpu

        return cpu
    try:
        from sparcomm.kernels import gpu
    except ImportError as error:  # pragma: no cover - needs CuPy
        raise RuntimeError(
            f"CuPy arrays need the GPU kernels, which failed to import ({error}); "
            "install the [gpu] extra: pip install 'sparcomm[gpu]'"
        ) from error
    return gpu
