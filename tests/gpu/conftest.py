"""Fixtures of the tests that run ``kernels/cuda`` on the host CUDA emulation.

64-thread blocks and a grid cap of 3 blocks make the multi-block, multi-tile and
grid-stride paths run on small inputs (see ``_gpu_emulator.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from _gpu_cases import Device
from _gpu_emulator import EmulatedRuntime
from sparcomm.kernels.cuda import GpuKernels


@pytest.fixture(scope="module")
def runtime():
    return EmulatedRuntime(block=64, max_blocks=3)


@pytest.fixture(scope="module")
def kernels(runtime):
    return GpuKernels(runtime)


@pytest.fixture(scope="module")
def dev(runtime):
    return Device(put=np.array, get=np.array, empty=runtime.empty)
