"""What the three implementations of the kernel contract share: the kernels' names and
families, and the checks of scalar arguments that must fail the same way on every device.

Pure Python and NumPy, so that ``kernels/reference.py``, ``kernels/cpu`` and
``kernels/cuda`` (the CuPy-free launch logic of the GPU kernels) can all use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FAMILIES: dict[str, str] = {
    "stream_read": "reduce",
    "uniform": "random",
    "pack_bits": "packing",
    "unpack_bits": "packing",
    "topk": "topk",
    "scatter_add": "sparse",
    "qsgd_encode": "quantize",
    "qsgd_decode": "quantize",
    "max_abs": "reduce",
    "terngrad_encode": "quantize",
    "terngrad_decode": "quantize",
    "onebit_encode": "onebit",
    "onebit_decode": "onebit",
    "add": "elementwise",
    "subtract": "elementwise",
    "divide_scalar": "elementwise",
    "std": "moments",
    "fp16_encode": "convert",
    "fp16_decode": "convert",
    "copy_finite": "convert",
    "merge_sum_two": "merge",
    "merge_sum_streams": "merge",
}
"""Every kernel, by name, and its family: the file it lives in on each implementation.

Kernel ``name`` of family ``f`` is ``sparcomm.kernels.cpu.f.name`` (``kernels/cpu/f.py``)
and is launched from ``kernels/cuda/f.cu`` by ``GpuKernels.name``; both packages export
it as ``name``.  The one list of kernel names: :data:`CONTRACT`, :data:`EXTRA`, the
packages' ``__all__`` and the tests derive from it.  To add a kernel, add it here, to
``kernels/cpu/f.py``, ``kernels/cuda/f.cu`` + ``GpuKernels`` and (contract kernels)
``kernels/reference.py`` and the contract in ``kernels/__init__.py``;
``tests/kernels/test_kernel_names.py`` fails until all of them have it.
"""

EXTRA = ("merge_sum_two", "merge_sum_streams")
"""Kernels beyond the contract (the sparse allreduce's merges of sorted streams): on the
CPU and the GPU, with their NumPy references beside the CPU kernels in ``cpu/merge.py``."""

CONTRACT = tuple(name for name in FAMILIES if name not in EXTRA)
"""The kernel names of the contract (``kernels/__init__.py``), on every implementation:
``kernels/reference.py``, ``kernels/cpu`` and ``kernels/gpu`` (``kernels/cuda``)."""

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
