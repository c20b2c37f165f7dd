"""``kernels.cpu`` add / subtract / divide_scalar against NumPy's ufuncs, one run.

Error feedback forms ``x + residual`` and ``compensated - decoded`` for every tensor and
step through the kernel layer's ``add`` / ``subtract`` (the GPU twins keep float32
subnormals that CuPy's ufuncs flush); this measures the Numba CPU twins against the
NumPy calls they replace, side by side: medians of ``--repeats`` calls, the cases
interleaved round-robin (``median_ms`` of ``bench/kernels_cpu.py``), each call on
operands of ``2**log2n`` float32 that no longer sit in the last-level cache (a 128 MiB
buffer is written before every call).  Thread count: ``NUMBA_NUM_THREADS``.

    NUMBA_NUM_THREADS=2 python bench/elementwise_cpu.py --sizes 24 26 --repeats 9
"""

from __future__ import annotations

import platform

import numba
import numpy as np
from kernels_cpu import median_ms_cold, sizes_main
from sparcomm.kernels import cpu


def run(log2n: int, repeats: int, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(1 << log2n).astype(np.float32)
    b = rng.standard_normal(1 << log2n).astype(np.float32)
    out = np.empty_like(a)
    cases = {
        "np.add(a, b, out)": lambda: np.add(a, b, out=out),
        "kernels.cpu.add(a, b, out)": lambda: cpu.add(a, b, out),
        "np.subtract(out, b, out)": lambda: np.subtract(out, b, out=out),
        "kernels.cpu.subtract(out, b, out)": lambda: cpu.subtract(out, b, out),
        "np.divide(out, 4, out)": lambda: np.divide(out, np.float32(4), out=out),
        "kernels.cpu.divide_scalar(out, 4, out)": lambda: cpu.divide_scalar(out, 4, out),
    }
    net, base = median_ms_cold(cases, repeats)
    return {
        "n": a.size,
        "dtype": "float32",
        "threads": numba.get_num_threads(),
        "repeats": repeats,
        "median_ms_minus_evict": net,
        "evict_ms": base,
        "speedup_add": net["np.add(a, b, out)"] / net["kernels.cpu.add(a, b, out)"],
        "speedup_subtract_in_place": net["np.subtract(out, b, out)"]
        / net["kernels.cpu.subtract(out, b, out)"],
        "speedup_divide_in_place": net["np.divide(out, 4, out)"]
        / net["kernels.cpu.divide_scalar(out, 4, out)"],
        "machine": platform.processor() or platform.machine(),
    }


def main() -> None:
    sizes_main(__doc__ or "", run)


if __name__ == "__main__":
    main()
