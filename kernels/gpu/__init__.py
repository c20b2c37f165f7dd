"""CUDA kernels for CuPy arrays: the kernel contract of ``kernels/__init__.py`` on the GPU.

The CUDA C sources are ``kernels/gpu/*.cu`` (shared definitions in ``common.cuh``); they
are compiled by NVRTC with ``-fmad=false -ftz=false`` (:mod:`._nvrtc`), loaded through
``cupy.RawModule(path=...)`` once per device and dtype and memoised (:mod:`._runtime`).
The launch sequences live in :mod:`._kernels`, which does not import CuPy, so
``tests/gpu`` can also run them on a host emulation of the sources.
``sparcomm._backend.kernels_for`` imports this module only for CuPy inputs.

Functions (same names, signatures and bits as ``sparcomm.kernels.cpu``):
``stream_read``, ``uniform``, ``pack_bits``, ``unpack_bits``, ``topk``, ``scatter_add``,
``qsgd_encode``, ``qsgd_decode``, ``max_abs``, ``terngrad_encode``, ``terngrad_decode``,
``onebit_encode``, ``onebit_decode``, ``add``, ``subtract``, ``divide_scalar`` (keeping
the float32 subnormals that ``cupy.add`` / ``-=`` / ``/=`` flush), ``fp16_encode``,
``fp16_decode``, ``copy_finite`` (the FP16 and NoCompression baselines, one pass each),
``merge_sum_two`` /
``merge_sum_streams`` (the sparse allreduce's merges of sorted streams, twins of
``kernels/cpu/merge.py``), and ``std``
(TernGrad's clipping threshold, in the contract's fixed summation order).
See ``docs/gpu.md``.

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

from ._kernels import CONTRACT, EXTRA, GpuKernels  # noqa: E402
from ._runtime import CupyRuntime  # noqa: E402

runtime = CupyRuntime()
"""The process-wide CuPy runtime (memoised module builds)."""

kernels = GpuKernels(runtime)
"""The kernel contract bound to :data:`runtime`."""

stream_read = kernels.stream_read
uniform = kernels.uniform
pack_bits = kernels.pack_bits
unpack_bits = kernels.unpack_bits
topk = kernels.topk
scatter_add = kernels.scatter_add
qsgd_encode = kernels.qsgd_encode
qsgd_decode = kernels.qsgd_decode
max_abs = kernels.max_abs
terngrad_encode = kernels.terngrad_encode
terngrad_decode = kernels.terngrad_decode
onebit_encode = kernels.onebit_encode
onebit_decode = kernels.onebit_decode
add = kernels.add
subtract = kernels.subtract
divide_scalar = kernels.divide_scalar
std = kernels.std
fp16_encode = kernels.fp16_encode
fp16_decode = kernels.fp16_decode
copy_finite = kernels.copy_finite
merge_sum_two = kernels.merge_sum_two
merge_sum_streams = kernels.merge_sum_streams

__all__ = list(CONTRACT + EXTRA) + ["kernels", "runtime", "GpuKernels", "CupyRuntime"]
