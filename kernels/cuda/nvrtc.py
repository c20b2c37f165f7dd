"""Compile the CUDA sources with NVRTC under sparcomm's own options.

Why not ``cupy.RawModule(code=...)``: CuPy appends ``-ftz=true`` to every NVRTC build
(``cupy/cuda/compiler.py``), and with flush-to-zero a float32 subnormal becomes zero in
every arithmetic instruction, conversion and comparison -- the GPU bits would then differ
from the CPU's (NumPy and Numba keep subnormals).  So the sources are compiled here with
``-ftz=false -fmad=false`` and IEEE division and square root, and the binary is loaded
with ``cupy.RawModule(path=...)``.  ``tests/gpu/test_nvrtc_build.py`` checks the PTX
has no ``.ftz`` and no ``fma`` instruction.

CuPy is imported inside the functions only, so ``sparcomm.kernels.cuda`` imports without
CuPy, and the tests can build on a machine that has CuPy and NVRTC but no GPU.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

BUILD_OPTIONS = ("-fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true")
"""NVRTC options of every build: the kernel contract rounds each operation on its own."""

MIN_ARCH = 70
"""Oldest compute capability the sources support (``__match_any_sync`` needs Volta)."""


def nvrtc_version() -> tuple[int, int]:
    from cupy.cuda import nvrtc

    major, minor = nvrtc.getVersion()
    return int(major), int(minor)


def target(arch: int) -> tuple[str, str]:
    """``(-arch option, "cubin" | "ptx")`` for a device of compute capability ``arch``.

    A cubin when this NVRTC knows the architecture; otherwise PTX for the newest
    virtual architecture it knows below it, which the driver compiles at load time.
    """
    from cupy.cuda import nvrtc

    if arch < MIN_ARCH:
        raise RuntimeError(
            f"sparcomm's GPU kernels need compute capability {MIN_ARCH // 10}.{MIN_ARCH % 10} "
            f"or newer, got {arch // 10}.{arch % 10}; use NumPy arrays (the CPU kernels)"
        )
    supported = [int(a) for a in nvrtc.getSupportedArchs()]
    if arch in supported:
        return f"-arch=sm_{arch}", "cubin"
    older = [a for a in supported if a <= arch]
    if not older:
        raise RuntimeError(
            f"NVRTC {nvrtc_version()} supports architectures {supported}, none at or below "
            f"the device's sm_{arch}; install a CUDA toolkit that supports the device"
        )
    return f"-arch=compute_{max(older)}", "ptx"


def compile_source(
    text: str, name: str, defines: Sequence[str], arch: int, kind: str | None = None
) -> tuple[bytes, str]:
    """Compile ``text`` (``name``.cu, header inlined) for ``arch``.

    Returns the binary and its kind (``"cubin"`` or ``"ptx"``); ``kind="ptx"`` forces
    PTX (for inspection).  Raises RuntimeError with the NVRTC log on a compile error.
    """
    from cupy.cuda import nvrtc

    arch_option, chosen = target(arch)
    if kind == "ptx" and chosen == "cubin":
        arch_option, chosen = f"-arch=compute_{arch}", "ptx"
    options = (*BUILD_OPTIONS, *defines, arch_option)
    program = nvrtc.createProgram(text, f"{name}.cu", (), ())
    try:
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as error:
            log = nvrtc.getProgramLog(program)
            raise RuntimeError(
                f"NVRTC failed to compile kernels/cuda/{name}.cu with {' '.join(options)}:\n{log}"
            ) from error
        binary = nvrtc.getCUBIN(program) if chosen == "cubin" else nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    if isinstance(binary, str):
        binary = binary.encode()
    return bytes(binary), chosen


def cache_dir() -> Path:
    """``$SPARCOMM_KERNEL_CACHE``, else ``~/.cache/sparcomm/kernels`` (a temp dir if unwritable)."""
    configured = os.environ.get("SPARCOMM_KERNEL_CACHE")
    candidates = [Path(configured)] if configured else []
    candidates += [
        Path.home() / ".cache" / "sparcomm" / "kernels",
        Path(tempfile.gettempdir()) / f"sparcomm-kernels-{os.getuid()}",
    ]
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    raise RuntimeError(
        f"no writable directory for compiled kernels (tried {[str(p) for p in candidates]}); "
        "set SPARCOMM_KERNEL_CACHE"
    )


def build(text: str, name: str, defines: Sequence[str], arch: int) -> Path:
    """Path of the compiled module for ``arch``, compiling it once per text and options.

    The file name hashes the source text, the options, the architecture and the NVRTC
    version, so an edited source or a new toolkit never loads a stale binary.
    """
    arch_option, kind = target(arch)
    key = "\0".join([text, *BUILD_OPTIONS, *defines, arch_option, str(nvrtc_version())])
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    path = cache_dir() / f"{name}-{digest}.{kind}"
    if not path.exists():
        binary, kind = compile_source(text, name, defines, arch)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(binary)
        partial.replace(path)  # atomic: concurrent ranks never load half a file
    return path
