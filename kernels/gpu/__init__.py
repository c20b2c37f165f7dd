"""CUDA kernels for CuPy arrays: the kernel contract of ``kernels/__init__.py`` on the GPU.

The CUDA C sources and their CuPy-free launch logic (:class:`GpuKernels`) are
``sparcomm.kernels.cuda`` (``kernels/cuda/<family>.cu``, the twin of
``kernels/cpu/<family>.py``); here they are bound to CuPy: compiled by NVRTC with
``-fmad=false -ftz=false`` (``sparcomm.kernels.cuda.nvrtc``), loaded through
``cupy.RawModule(path=...)`` once per device and dtype and memoised
(:class:`CupyRuntime`, ``_runtime.py``).  :mod:`.staging` holds the pinned host buffers
of a host-only MPI.  ``sparcomm._backend.kernels_for`` imports this module only for CuPy
inputs.

Functions: every kernel of ``sparcomm.kernels._checks.FAMILIES`` (the contract's, then
``merge_sum_two`` / ``merge_sum_streams``, the sparse allreduce's merges of sorted
streams), with the same names, signatures and bits as ``sparcomm.kernels.cpu``;
``add`` / ``subtract`` / ``divide_scalar`` keep the float32 subnormals that ``cupy.add``
/ ``-=`` / ``/=`` flush.  See ``docs/gpu.md``.

Raises
------
ImportError
    At import, when CuPy is not installed (``pip install 'sparcomm[gpu]'``).
RuntimeError
    At import, when CuPy finds no usable CUDA device.
"""

from __future__ import annotations

try:
    import cupy
except ImportError as error:  # the message names the fix; kernels_for re-raises it
    raise ImportError(
        f"sparcomm.kernels.gpu needs CuPy, which failed to import ({error}); install the "
        "[gpu] extra: pip install 'sparcomm[gpu]' (CuPy for CUDA 12)"
    ) from error


def _device_count() -> tuple[int, str]:
    try:
        return int(cupy.cuda.runtime.getDeviceCount()), ""
    except Exception as error:  # noqa: BLE001 - CUDARuntimeError, or no driver at all
        return 0, str(error)


_COUNT, _WHY = _device_count()
if _COUNT == 0:
    raise RuntimeError(
        "sparcomm.kernels.gpu found no usable CUDA device"
        + (f" ({_WHY})" if _WHY else "")
        + "; run on a machine with an NVIDIA GPU and driver, or use NumPy arrays "
        "(the CPU kernels)"
    )

from sparcomm.kernels.cuda import CONTRACT, EXTRA, GpuKernels, export  # noqa: E402

from ._runtime import CupyRuntime  # noqa: E402

runtime = CupyRuntime()
"""The process-wide CuPy runtime (memoised module builds)."""

kernels = GpuKernels(runtime)
"""The kernel contract bound to :data:`runtime`."""

# One module-level function per kernel, named by sparcomm.kernels._checks.FAMILIES.
globals().update(export(kernels))

__all__ = list(CONTRACT + EXTRA) + ["kernels", "runtime", "GpuKernels", "CupyRuntime"]
