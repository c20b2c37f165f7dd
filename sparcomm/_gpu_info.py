"""Facts about the GPU stack for ``sparcomm info``: CuPy, CUDA, devices, CUDA-aware MPI.

Nothing here imports CuPy unless it is installed, and nothing raises: every probe that
fails reports why in the returned dictionary.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from typing import Any


def _loaded_mpi_library() -> str | None:
    """Path of the MPI shared library loaded into this process (Linux), if any."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                name = os.path.basename(path)
                if name.startswith(("libmpi.so", "libmpi_")) or name.startswith("libmpich"):
                    return path
    except OSError:
        return None
    return None


def cuda_aware_mpi() -> dict[str, Any]:
    """Whether the MPI library accepts device pointers (CUDA-aware), and how we know.

    Asks the library itself through ``MPIX_Query_cuda_support()`` (MPICH >= 4 and Open
    MPI export it); that answer covers both how the library was built and, for MPICH,
    whether GPU support is enabled at run time (``MPIR_CVAR_ENABLE_GPU``).  Imports
    ``mpi4py.MPI`` (initialising MPI) only when mpi4py is installed.

    Returns
    -------
    dict
        ``cuda_aware``: True, False, or None when it cannot be told; ``method``: how.
    """
    if importlib.util.find_spec("mpi4py") is None:
        return {"cuda_aware": None, "method": "mpi4py not installed"}
    try:
        from mpi4py import MPI  # noqa: F401 - loads the MPI library into the process
    except Exception as error:  # noqa: BLE001
        return {"cuda_aware": None, "method": f"mpi4py failed to load ({error})"}
    path = _loaded_mpi_library()
    if path is None:
        return {"cuda_aware": None, "method": "MPI library not found in the process map"}
    try:
        query = ctypes.CDLL(path).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return {
            "cuda_aware": None,
            "method": f"{os.path.basename(path)} has no "
            "MPIX_Query_cuda_support; check the MPI documentation",
        }
    query.restype = ctypes.c_int
    query.argtypes = []
    return {"cuda_aware": bool(query()), "method": f"MPIX_Query_cuda_support() in {path}"}


def _cupy_facts() -> dict[str, Any]:
    import cupy

    facts: dict[str, Any] = {"cupy": cupy.__version__}
    runtime = cupy.cuda.runtime
    try:
        facts["cuda_runtime"] = _cuda_version(runtime.runtimeGetVersion())
        driver = runtime.driverGetVersion()
        facts["cuda_driver"] = _cuda_version(driver) if driver else "none (no NVIDIA driver)"
    except Exception as error:  # noqa: BLE001
        facts["cuda_driver"] = f"unavailable ({error})"
    try:
        facts["nvrtc"] = "{}.{}".format(*cupy.cuda.nvrtc.getVersion())
    except Exception as error:  # noqa: BLE001
        facts["nvrtc"] = f"unavailable ({error})"
    try:
        count = int(runtime.getDeviceCount())
    except Exception as error:  # noqa: BLE001
        facts["devices"] = []
        facts["reason"] = f"no usable CUDA device ({error})"
        return facts
    devices = []
    for device in range(count):
        props = runtime.getDeviceProperties(device)
        name = props["name"]
        devices.append(
            {
                "id": device,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "compute_capability": f"{props['major']}.{props['minor']}",
                "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                "multiprocessors": props["multiProcessorCount"],
            }
        )
    facts["devices"] = devices
    if not devices:
        facts["reason"] = "CuPy sees no CUDA device"
    return facts


def _cuda_version(value: int) -> str:
    return f"{value // 1000}.{value % 1000 // 10}"


def gpu_info() -> dict[str, Any]:
    """CuPy, CUDA, device and CUDA-aware-MPI facts, for ``sparcomm info``.

    Returns
    -------
    dict
        ``usable`` (bool: CuPy installed, a device visible, NVRTC loadable and
        ``sparcomm.kernels.gpu`` importable), ``reason`` when not usable, ``cupy``,
        ``cuda_runtime``, ``cuda_driver``, ``nvrtc``, ``devices`` (id, name, compute
        capability, memory, multiprocessors), ``mpi`` (:func:`cuda_aware_mpi`).
    """
    facts: dict[str, Any] = {"usable": False}
    if importlib.util.find_spec("cupy") is None:
        facts["cupy"] = None
        facts["reason"] = "CuPy not installed: pip install 'sparcomm[gpu]'"
    else:
        try:
            facts.update(_cupy_facts())
        except Exception as error:  # noqa: BLE001 - a broken CuPy install
            facts["reason"] = f"CuPy failed to load ({error})"
        if facts.get("devices") and str(facts.get("nvrtc", "")).startswith("unavailable"):
            facts["reason"] = (
                "NVRTC (libnvrtc) not found: the kernels are compiled at run time; install "
                "the CUDA toolkit or pip install 'cupy-cuda12x[ctk]'"
            )
        elif facts.get("devices"):
            try:
                if "sparcomm.kernels.gpu" not in sys.modules:
                    import sparcomm.kernels.gpu  # noqa: F401
                facts["usable"] = True
            except Exception as error:  # noqa: BLE001
                facts["reason"] = f"sparcomm.kernels.gpu failed to import ({error})"
    facts["mpi"] = cuda_aware_mpi()
    return facts
