"""The CuPy runtime of ``sparcomm.kernels.cuda.GpuKernels``: memoised builds and launches.

Each CUDA source is compiled once per (device, source, real dtype, index dtype) by
``sparcomm.kernels.cuda.nvrtc`` -- with ``-ftz=false -fmad=false``, which
``cupy.RawModule(code=...)`` cannot give (it forces ``-ftz=true``) -- cached on disk,
loaded with ``cupy.RawModule(path=...)`` and kept for the life of the process.
"""

from __future__ import annotations

import threading
from typing import Any

import cupy
import numpy as np
from sparcomm.kernels.cuda import MAX_BLOCK, Launcher, compile_defines, nvrtc, source_text


class CupyRuntime:
    """Allocation, host copies and memoised ``RawModule`` builds on the current device."""

    def __init__(self, block: int = 256, blocks_per_sm: int = 8) -> None:
        if block % 32 or not 32 <= block <= MAX_BLOCK:
            raise ValueError(f"block must be a multiple of 32 in [32, 1024], got {block}")
        self.block = block
        self._blocks_per_sm = blocks_per_sm
        self._max_blocks: dict[int, int] = {}
        self._modules: dict[tuple[int, str, str, str], cupy.RawModule] = {}
        self._lock = threading.Lock()

    @property
    def max_blocks(self) -> int:
        """Grid cap of the grid-stride kernels: a few resident blocks per multiprocessor."""
        device = cupy.cuda.Device().id
        if device not in self._max_blocks:
            sms = cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"]
            self._max_blocks[device] = int(sms) * self._blocks_per_sm
        return self._max_blocks[device]

    def module(self, source: str, real: np.dtype | None, index: np.dtype | None) -> Any:
        """The compiled ``RawModule`` of ``source`` for the current device and dtypes."""
        key = (cupy.cuda.Device().id, source, str(real), str(index))
        with self._lock:
            module = self._modules.get(key)
            if module is None:
                path = nvrtc.build(
                    source_text(source),
                    source,
                    compile_defines(real, index),
                    int(cupy.cuda.Device().compute_capability),
                )
                module = cupy.RawModule(path=str(path))
                self._modules[key] = module
        return module

    def function(
        self, source: str, name: str, real: np.dtype | None, index: np.dtype | None
    ) -> Launcher:
        kernel = self.module(source, real, index).get_function(name)

        def launch(grid: int, block: int, args: tuple[Any, ...]) -> None:
            kernel((int(grid),), (int(block),), args)

        return launch

    def is_device_array(self, x: Any) -> bool:
        return isinstance(x, cupy.ndarray)

    def empty(self, n: int, dtype: Any) -> cupy.ndarray:
        return cupy.empty(n, dtype=dtype)

    def zeros(self, n: int, dtype: Any) -> cupy.ndarray:
        return cupy.zeros(n, dtype=dtype)

    def to_host(self, array: cupy.ndarray) -> np.ndarray:
        return cupy.asnumpy(array)

    def argsort_stable(self, indices: cupy.ndarray) -> cupy.ndarray:
        # cupy.argsort is always stable (its documentation; Thrust's stable sort).
        return cupy.argsort(indices)
