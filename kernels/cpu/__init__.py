"""Numba CPU kernels of sparcomm (NumPy arrays); the contract is in ``kernels/__init__.py``.

Every kernel is ``@njit(cache=True, nogil=True)``, parallel over chunks where it pays, and
writes into caller-allocated ``out`` buffers.  The plain NumPy twin of each is in
``kernels/reference.py``.  Kernels that take a stream key or small integer parameters are
thin Python wrappers that normalise those arguments' types (a Python int above 2**63
types differently in Numba) before calling the compiled code.
"""

from __future__ import annotations

from . import _cache  # noqa: F401 - drops stale Numba caches before any kernel runs
from ._random import uniform
from .convert import copy_finite, fp16_decode, fp16_encode
from .elementwise import add, divide_scalar, subtract
from .moments import std
from .onebit import onebit_decode, onebit_encode
from .packing import pack_bits, unpack_bits
from .quantize import qsgd_decode, qsgd_encode, terngrad_decode, terngrad_encode
from .reduce import max_abs, stream_read
from .sparse import scatter_add
from .topk import topk

__all__ = [
    "add",
    "copy_finite",
    "divide_scalar",
    "fp16_decode",
    "fp16_encode",
    "max_abs",
    "onebit_decode",
    "onebit_encode",
    "pack_bits",
    "qsgd_decode",
    "qsgd_encode",
    "scatter_add",
    "std",
    "stream_read",
    "subtract",
    "terngrad_decode",
    "terngrad_encode",
    "topk",
    "uniform",
    "unpack_bits",
]
