"""``kernels.cpu`` fp16_encode / fp16_decode / copy_finite against the NumPy calls they
replace, one run.

The FP16 and NoCompression codecs (``sparcomm/codecs/baselines.py``) used to encode with
``x.astype(numpy.float16)`` or ``x.copy()`` followed by an ``isfinite`` pass, and decode
with ``out[...] = half``; the kernels convert (or copy) and count the non-finite values in
one pass over the Numba threads.  Medians of ``--repeats`` calls, the cases interleaved
round-robin (``median_ms`` of ``bench/kernels_cpu.py``), each call on operands of
``2**log2n`` float32 that no longer sit in the last-level cache (a 128 MiB buffer is
written before every call, and its cost, ``evict_ms``, subtracted).  The encodes write
into a new array on every call, as the codecs do (``astype`` and ``copy`` allocate too);
the decodes into one kept ``out``.  Thread count: ``NUMBA_NUM_THREADS``.

    NUMBA_NUM_THREADS=2 python bench/convert_cpu.py --sizes 24 26 --repeats 9 \\
        --json bench/results/convert_cpu.json
"""

from __future__ import annotations

import platform

import numba
import numpy as np
from kernels_cpu import median_ms_cold, sizes_main
from sparcomm.kernels import cpu


def _numpy_fp16_encode(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """The FP16 codec's encode before the kernel: round, then check."""
    with np.errstate(over="ignore"):
        half = x.astype(np.float16)
    return half, bool(np.isfinite(half).all())


def _numpy_copy_finite(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """NoCompression's encode before the kernel: check, then copy."""
    return x.copy(), bool(np.isfinite(x).all())


def _integer_path(call):
    """``call()`` with the F16C kernels (``kernels/cpu/_half_simd.py``) switched off."""
    from sparcomm.kernels.cpu import _half_simd

    available, _half_simd.AVAILABLE = _half_simd.AVAILABLE, False
    try:
        return call()
    finally:
        _half_simd.AVAILABLE = available


def run(log2n: int, repeats: int, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(1 << log2n).astype(np.float32)
    half = x.astype(np.float16)
    out = np.empty_like(x)
    cases = {
        "astype(float16) + isfinite": lambda: _numpy_fp16_encode(x),
        "kernels.cpu.fp16_encode(x, half)": lambda: cpu.fp16_encode(x, np.empty_like(half)),
        # The integer path, which CPUs without F16C take (and this one did before it).
        "fp16_encode, integer path": lambda: _integer_path(
            lambda: cpu.fp16_encode(x, np.empty_like(half))
        ),
        "fp16_decode(half, out, -1), integer path": lambda: _integer_path(
            lambda: cpu.fp16_decode(half, out, -1)
        ),
        "out[...] = half": lambda: out.__setitem__(Ellipsis, half),
        "kernels.cpu.fp16_decode(half, out)": lambda: cpu.fp16_decode(half, out),
        "out -= half.astype(float32)": lambda: np.subtract(out, half.astype(np.float32), out=out),
        "kernels.cpu.fp16_decode(half, out, -1)": lambda: cpu.fp16_decode(half, out, -1),
        "x.copy() + isfinite": lambda: _numpy_copy_finite(x),
        "kernels.cpu.copy_finite(x, out)": lambda: cpu.copy_finite(x, np.empty_like(x)),
    }
    net, base = median_ms_cold(cases, repeats)
    return {
        "n": x.size,
        "dtype": "float32",
        "threads": numba.get_num_threads(),
        "repeats": repeats,
        "median_ms_minus_evict": net,
        "evict_ms": base,
        "speedup_fp16_encode": net["astype(float16) + isfinite"]
        / net["kernels.cpu.fp16_encode(x, half)"],
        "speedup_fp16_decode": net["out[...] = half"] / net["kernels.cpu.fp16_decode(half, out)"],
        "speedup_fp16_decode_subtract": net["out -= half.astype(float32)"]
        / net["kernels.cpu.fp16_decode(half, out, -1)"],
        "speedup_copy_finite": net["x.copy() + isfinite"] / net["kernels.cpu.copy_finite(x, out)"],
        "f16c": _f16c(),
        "speedup_f16c_encode": net["fp16_encode, integer path"]
        / net["kernels.cpu.fp16_encode(x, half)"],
        "speedup_f16c_decode_subtract": net["fp16_decode(half, out, -1), integer path"]
        / net["kernels.cpu.fp16_decode(half, out, -1)"],
        "machine": platform.processor() or platform.machine(),
    }


def _f16c() -> bool:
    from sparcomm.kernels.cpu import _half_simd

    return _half_simd.AVAILABLE


def main() -> None:
    sizes_main(__doc__ or "", run)


if __name__ == "__main__":
    main()
