"""The GPU kernels without CuPy: CUDA sources, launch logic and their NVRTC build.

``kernels/cuda/<family>.cu`` is the GPU twin of ``kernels/cpu/<family>.py`` (families in
``sparcomm.kernels._checks.FAMILIES``); ``common.cuh`` holds what the sources share.
:class:`GpuKernels` runs the kernel contract of ``kernels/__init__.py`` on any
:class:`Runtime` (allocate, copy a few words to the host, compile and launch):
``sparcomm.kernels.gpu`` binds it to CuPy, ``tests/gpu`` to a host emulation of the
sources.  :mod:`.nvrtc` compiles a source with the contract's IEEE options.

Nothing here imports CuPy at import time, so this package loads on any machine; the
kernels run only through a runtime.

Examples
--------
>>> from sparcomm.kernels import cuda
>>> 'include "common.cuh"' in cuda.source_text("topk")  # the header inlined
False
>>> cuda.FAMILIES["onebit_encode"]
'onebit'
"""

from __future__ import annotations

from sparcomm.kernels._checks import CONTRACT, EXTRA, FAMILIES

from ._kernels import (
    ITEMS,
    MAX_ABS_SEGMENT,
    MAX_BLOCK,
    SOURCE_DIR,
    TOPK_DIGIT_BITS,
    GpuKernels,
    Launcher,
    Runtime,
    compile_defines,
    export,
    radix_passes,
    source_text,
)

__all__ = [
    "CONTRACT",
    "EXTRA",
    "FAMILIES",
    "ITEMS",
    "MAX_ABS_SEGMENT",
    "MAX_BLOCK",
    "SOURCE_DIR",
    "TOPK_DIGIT_BITS",
    "GpuKernels",
    "Launcher",
    "Runtime",
    "compile_defines",
    "export",
    "radix_passes",
    "source_text",
]
