"""What the three implementations of the kernel contract share: its names and the checks
of scalar arguments that must fail the same way on every device.

Pure Python and NumPy, so that ``kernels/reference.py``, ``kernels/cpu`` and
``kernels/gpu/_kernels.py`` (which the tests load by path, without CuPy) can all use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CONTRACT = (
    "stream_read",
    "uniform",
    "pack_bits",
    "unpack_bits",
    "topk",
    "scatter_add",
    "qsgd_encode",
    "qsgd_decode",
    "max_abs",
    "terngrad_encode",
    "terngrad_decode",
    "onebit_encode",
    "onebit_decode",
    "add",
    "subtract",
    "divide_scalar",
    "std",
    "fp16_encode",
    "fp16_decode",
    "copy_finite",
)
"""The kernel names of the contract (``kernels/__init__.py``), on every implementation."""

ACCUMULATE = (0, 1, -1)
"""``accumulate`` of the decode kernels: ``out = d``, ``out += d``, ``out -= d``."""


def check_accumulate(accumulate: object) -> int:
    """``accumulate`` as an int if it is 0, 1 or -1 (not a bool); ValueError otherwise.

    Checked before any compiled call: Numba would compile a float or bool specialisation,
    and the CUDA kernels read any positive ``int`` as 1 and any negative one as -1, so a 2
    would silently add.
    """
    if (
        isinstance(accumulate, (int, np.integer))
        and not isinstance(accumulate, (bool, np.bool_))
        and int(accumulate) in ACCUMULATE
    ):
        return int(accumulate)
    raise ValueError(
        "accumulate must be 0 (out = decoded), 1 (out += decoded) or -1 (out -= decoded), "
        f"got {accumulate!r} ({type(accumulate).__qualname__}); pass one of these ints"
    )


def check_divisor(divisor: Any) -> float:
    """``divisor`` of ``divide_scalar`` as a float: a finite, non-zero real number."""
    if isinstance(divisor, bool) or not isinstance(divisor, (int, float, np.integer, np.floating)):
        raise TypeError(f"divisor must be a real number, got {type(divisor).__qualname__}")
    if not (np.isfinite(divisor) and divisor != 0):
        raise ValueError(f"divisor must be finite and non-zero, got {divisor}")
    return float(divisor)
