"""A :class:`Runtime` that runs ``kernels/cuda/*.cu`` on the host (``cuda_emulator.h``).

Each source is compiled with g++ together with generated launch wrappers, one per
``extern "C" __global__`` kernel, and called through ctypes.  Launch arguments are
checked against the kernel's C signature -- scalar widths and pointee dtypes -- because
``cupy.RawKernel`` packs arguments by their Python-side type: an ``np.int64`` passed for
an ``int`` parameter would shift every later argument on a real GPU.  ``empty`` returns
buffers filled with a 0xA5 pattern so that a kernel relying on zeroed memory shows up.

The launch logic under test is ``sparcomm.kernels.cuda`` (``GpuKernels``), which imports
without CuPy.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from sparcomm.kernels import cuda

HERE = Path(__file__).resolve().parent
CXX = shutil.which("g++")
CXX_FLAGS = ["-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]

_KERNEL = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)', re.DOTALL)


def _parameters(text: str) -> list[tuple[str, str]]:
    """``[(type, name), ...]`` of a C parameter list."""
    result = []
    for part in text.split(","):
        words = part.replace("*", "* ").split()
        words = [w for w in words if w not in ("const", "__restrict__")]
        result.append((" ".join(words[:-1]).replace(" *", "*"), words[-1]))
    return result


def _c_types(real: np.dtype | None, index: np.dtype | None) -> dict[str, Any]:
    """C type name -> numpy dtype of a scalar or of a pointee."""
    real = np.dtype(np.float32) if real is None else real
    index = np.dtype(np.int32) if index is None else index
    return {
        "real_t": real,
        "bits_t": np.dtype(np.uint32) if real == np.float32 else np.dtype(np.uint64),
        "index_t": index,
        "i64": np.dtype(np.int64),
        "u64": np.dtype(np.uint64),
        "u32": np.dtype(np.uint32),
        "u8": np.dtype(np.uint8),
        "int": np.dtype(np.int32),
        "double": np.dtype(np.float64),
    }


_CTYPES = {
    np.dtype(np.float32): ctypes.c_float,
    np.dtype(np.float64): ctypes.c_double,
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.uint32): ctypes.c_uint32,
    np.dtype(np.uint64): ctypes.c_uint64,
    np.dtype(np.uint8): ctypes.c_uint8,
}


class EmulatedRuntime:
    """Host emulation of the device layer, for :class:`GpuKernels` under test.

    Small blocks and a small grid cap (the defaults) make multi-block and grid-stride
    paths run on tiny inputs.
    """

    def __init__(self, block: int = 64, max_blocks: int = 3) -> None:
        if CXX is None:
            raise RuntimeError("the CUDA emulation needs g++ (C++20)")
        self.block = block
        self.max_blocks = max_blocks
        self._libraries: dict[tuple[str, str, str], tuple[ctypes.CDLL, dict]] = {}
        self._lock = threading.Lock()
        self.launches: list[tuple[str, int, int]] = []

    def _library(self, source: str, real: np.dtype | None, index: np.dtype | None):
        key = (source, str(real), str(index))
        with self._lock:
            if key in self._libraries:
                return self._libraries[key]
            text = cuda.source_text(source)
            signatures = {name: _parameters(params) for name, params in _KERNEL.findall(text)}
            wrappers = []
            for name, params in signatures.items():
                declared = ", ".join(f"{t} {n}" for t, n in params)
                passed = ", ".join(n for _, n in params)
                # An error of the launch (a deadlock, an exception in a thread) comes
                # back as its message: a C++ exception must not cross into ctypes.
                wrappers.append(
                    f'extern "C" const char* emu_{name}(unsigned grid, unsigned block, '
                    f"{declared}) {{ return sc_emu::launch_or_message(grid, block, "
                    f"[=] {{ {name}({passed}); }}); }}"
                )
            program = '#include "cuda_emulator.h"\n' + text + "\n" + "\n".join(wrappers) + "\n"
            defines = cuda.compile_defines(real, index)
            digest = hashlib.sha256(
                (program + " ".join(defines + CXX_FLAGS)).encode()
                + (HERE / "cuda_emulator.h").read_bytes()
            ).hexdigest()[:20]
            build = Path(tempfile.gettempdir()) / "sparcomm-cuda-emulator"
            build.mkdir(exist_ok=True)
            library_path = build / f"{source}-{digest}.so"
            if not library_path.exists():
                cpp = build / f"{source}-{digest}.cpp"
                cpp.write_text(program)
                partial = build / f"{source}-{digest}.so.partial-{threading.get_ident()}"
                subprocess.run(
                    [CXX, *CXX_FLAGS, *defines, f"-I{HERE}", str(cpp), "-o", str(partial)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                partial.replace(library_path)
            library = ctypes.CDLL(str(library_path))
            types = _c_types(real, index)
            self._libraries[key] = (library, {"signatures": signatures, "types": types})
            return self._libraries[key]

    def function(self, source: str, name: str, real: np.dtype | None, index: np.dtype | None):
        library, info = self._library(source, real, index)
        params = info["signatures"][name]
        types = info["types"]
        entry = getattr(library, f"emu_{name}")
        argtypes = [ctypes.c_uint, ctypes.c_uint]
        for ctype_name, _ in params:
            argtypes.append(
                ctypes.c_void_p if ctype_name.endswith("*") else _CTYPES[types[ctype_name]]
            )
        entry.argtypes = argtypes
        entry.restype = ctypes.c_char_p

        def launch(grid: int, block: int, args: tuple[Any, ...]) -> None:
            if len(args) != len(params):
                raise TypeError(f"{name}: {len(params)} arguments expected, got {len(args)}")
            converted = []
            for (ctype_name, pname), value in zip(params, args, strict=True):
                pointee = ctype_name.rstrip("*")
                expected = types[pointee]
                if ctype_name.endswith("*"):
                    if not isinstance(value, np.ndarray) or not value.flags.c_contiguous:
                        raise TypeError(f"{name}({pname}): contiguous array expected")
                    if value.dtype != expected:
                        raise TypeError(
                            f"{name}({pname}): {ctype_name} needs {expected}, got {value.dtype}"
                        )
                    converted.append(ctypes.c_void_p(value.ctypes.data))
                else:
                    if not isinstance(value, np.generic) or value.dtype != expected:
                        raise TypeError(
                            f"{name}({pname}): {ctype_name} needs a numpy {expected} scalar "
                            f"(CuPy packs arguments by their Python type), got {value!r}"
                        )
                    converted.append(value.item())
            if not 1 <= grid < 2**31 or not 1 <= block <= 1024:
                raise ValueError(f"{name}: bad launch shape grid={grid} block={block}")
            self.launches.append((name, grid, block))
            error = entry(grid, block, *converted)
            if error is not None:
                raise RuntimeError(f"{name}: {error.decode()}")

        return launch

    def is_device_array(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def empty(self, n: int, dtype: Any) -> np.ndarray:
        out = np.empty(n, dtype=dtype)
        out.view(np.uint8)[:] = 0xA5
        return out

    def zeros(self, n: int, dtype: Any) -> np.ndarray:
        return np.zeros(n, dtype=dtype)

    def to_host(self, array: np.ndarray) -> np.ndarray:
        return np.array(array)

    def argsort_stable(self, indices: np.ndarray) -> np.ndarray:
        return np.argsort(indices, kind="stable")


class HostCupyRuntime(EmulatedRuntime):
    """:class:`EmulatedRuntime` on the arrays of the host CuPy double (``_host_cupy``).

    Allocations are ``cupy.ndarray`` of the double; a launch unwraps them to their host
    storage for the emulated kernel and refuses a NumPy array, as ``RawKernel`` does
    (``Unsupported type``), so a host buffer that slipped into a GPU path fails here.
    ``_modules`` mirrors ``CupyRuntime._modules`` (keyed by device, source, dtypes).
    """

    def __init__(self, cupy: ModuleType, block: int = 64, max_blocks: int = 3) -> None:
        super().__init__(block=block, max_blocks=max_blocks)
        self._cupy = cupy
        self._modules: dict[tuple[int, str, str, str], ctypes.CDLL] = {}

    def _library(self, source: str, real: np.dtype | None, index: np.dtype | None):
        built = super()._library(source, real, index)
        device = self._cupy.cuda.Device().id
        self._modules.setdefault((device, source, str(real), str(index)), built[0])
        return built

    def function(self, source: str, name: str, real: np.dtype | None, index: np.dtype | None):
        launch = super().function(source, name, real, index)
        cupy = self._cupy

        def device_launch(grid: int, block: int, args: tuple[Any, ...]) -> None:
            host = []
            for value in args:
                if isinstance(value, np.ndarray):
                    raise TypeError(
                        f"{name}: Unsupported type {type(value)} (a host array passed to a "
                        "device kernel)"
                    )
                host.append(cupy._host_view(value) if isinstance(value, cupy.ndarray) else value)
            launch(grid, block, tuple(host))

        return device_launch

    def is_device_array(self, x: Any) -> bool:
        return isinstance(x, self._cupy.ndarray)

    def empty(self, n: int, dtype: Any) -> Any:
        return self._cupy.empty(n, dtype=dtype)  # 0xA5-filled, like EmulatedRuntime

    def zeros(self, n: int, dtype: Any) -> Any:
        return self._cupy.zeros(n, dtype=dtype)

    def to_host(self, array: Any) -> np.ndarray:
        return self._cupy.asnumpy(array)

    def argsort_stable(self, indices: Any) -> Any:
        return self._cupy.argsort(indices)


def install_host_cupy() -> ModuleType:
    """Bind ``sparcomm.kernels.gpu`` to :class:`HostCupyRuntime`; return the double.

    Only for the child process of ``tests/gpu/test_host_cupy.py``, where the host CuPy
    double (``tests/gpu/_host_cupy``) is first on ``sys.path``.  Rebinds ``runtime``,
    ``kernels`` and every kernel function of the package (the codecs look them up at call
    time through ``sparcomm._backend.kernels_for``), so production code needs no hook.
    """
    import cupy

    if not getattr(cupy, "HOST_DOUBLE", False):
        raise RuntimeError(
            f"SPARCOMM_TEST_HOST_CUPY=1 needs the host CuPy double first on sys.path "
            f"(tests/gpu/_host_cupy), but cupy comes from {cupy.__file__}"
        )
    import sparcomm.kernels.gpu as gpu

    if not isinstance(gpu.runtime, HostCupyRuntime):
        runtime = HostCupyRuntime(cupy)
        kernels = cuda.GpuKernels(runtime)
        gpu.runtime = runtime
        gpu.kernels = kernels
        for name, function in cuda.export(kernels).items():
            setattr(gpu, name, function)
    return cupy
