"""sparcomm: gradient compression and compressed collectives for data-parallel training.

The compute kernels live in the top-level ``kernels/`` directory of the source tree and
are installed as ``sparcomm.kernels`` (``cpu``: Numba, ``gpu``: CuPy/CUDA).
"""

from __future__ import annotations

__version__ = "0.1.0"
