"""``cupy.random`` of the host test double: NumPy's generator, results on the "device".

The numbers are NumPy's (PCG64), not cuRAND's: code under test must not depend on
CuPy's random bits (sparcomm's own streams come from ``sparcomm._random``).
"""

from __future__ import annotations

from typing import Any

import numpy as _np


class Generator:
    """``cupy.random.Generator`` with the methods sparcomm's benchmarks use."""

    def __init__(self, seed: Any = None) -> None:
        self._rng = _np.random.default_rng(seed)

    def standard_normal(self, size: Any = None, dtype: Any = _np.float64, out: Any = None):
        return self._device(self._rng.standard_normal(size, dtype=dtype))

    def random(self, size: Any = None, dtype: Any = _np.float64, out: Any = None):
        return self._device(self._rng.random(size, dtype=dtype))

    def integers(self, low: Any, high: Any = None, size: Any = None, dtype: Any = _np.int64):
        return self._device(self._rng.integers(low, high, size, dtype=dtype))

    @staticmethod
    def _device(values: Any):
        import cupy

        return cupy.array(values)


def default_rng(seed: Any = None) -> Generator:
    return Generator(seed)
