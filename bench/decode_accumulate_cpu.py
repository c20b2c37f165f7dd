"""Fused ``*_decode(..., out, accumulate=-1)`` against decode-then-``subtract``, one run.

Error feedback forms ``compensated - decoded`` and the quantized collectives ``sum +
decoded`` for every tensor and step; with ``accumulate`` (kernel contract,
``kernels/__init__.py``) the decode kernels do that add / subtract in their own pass
instead of writing ``d`` to a buffer and reading it back.  This measures, for QSGD (4
bits, 7 levels, bucket 512), TernGrad (bucket 512) and OneBit (bucket 512) on ``2**log2n``
float32, side by side: the decode alone into ``out`` (``accumulate=0``), the decode into
a separate ``d`` followed by ``kernels.cpu.subtract(out, d, out)`` (the two passes it
replaces), and the fused call.  Medians of ``--repeats`` calls, all cases interleaved
round-robin (``median_ms`` of ``bench/kernels_cpu.py``); every case streams at least
64 MiB, twice the last-level cache of the machine it was written on, so no case finds
its operands cached by the one before.  Thread count: ``NUMBA_NUM_THREADS``.

    NUMBA_NUM_THREADS=2 python bench/decode_accumulate_cpu.py --sizes 24 26 --repeats 9
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from kernels_cpu import median_ms, sizes_main
from sparcomm.kernels import cpu

BUCKET = 512


def _payloads(x: np.ndarray) -> dict[str, tuple[Any, ...]]:
    """Each codec's encoding of ``x``: the decode arguments before ``out``."""
    n, nb = x.size, -(-x.size // BUCKET)
    q_scales, q_packed = np.empty(nb, x.dtype), np.empty(n // 2, np.uint8)
    cpu.qsgd_encode(x, 7, 4, BUCKET, 0, 1, q_scales, q_packed)
    t_scales, t_packed = np.empty(nb, x.dtype), np.empty(n // 4, np.uint8)
    cpu.max_abs(x, BUCKET, t_scales)
    cpu.terngrad_encode(x, t_scales, BUCKET, np.inf, 2, t_packed)
    o_packed, o_means = np.empty(n // 8, np.uint8), np.empty(2 * nb, x.dtype)
    cpu.onebit_encode(x, BUCKET, o_packed, o_means)
    return {
        "qsgd": (q_packed, q_scales, 7, 4, BUCKET),
        "terngrad": (t_packed, t_scales, BUCKET),
        "onebit": (o_packed, o_means, BUCKET),
    }


def run(log2n: int, repeats: int, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(1 << log2n).astype(np.float32)
    out = rng.standard_normal(x.size).astype(np.float32)
    d = np.empty_like(out)
    cases: dict[str, Callable[[], object]] = {}
    for codec, args in _payloads(x).items():
        decode = getattr(cpu, f"{codec}_decode")

        def two_passes(decode=decode, args=args) -> None:
            decode(*args, d)
            cpu.subtract(out, d, out)

        cases[f"{codec}: decode only"] = lambda decode=decode, args=args: decode(*args, d)
        cases[f"{codec}: decode to d, subtract(out, d, out)"] = two_passes
        cases[f"{codec}: fused decode(..., out, -1)"] = lambda decode=decode, args=args: decode(
            *args, out, -1
        )
    ms = median_ms(cases, repeats)
    speedup = {
        codec: ms[f"{codec}: decode to d, subtract(out, d, out)"]
        / ms[f"{codec}: fused decode(..., out, -1)"]
        for codec in ("qsgd", "terngrad", "onebit")
    }
    return {
        "n": x.size,
        "dtype": "float32",
        "bucket": BUCKET,
        "threads": numba.get_num_threads(),
        "repeats": repeats,
        "median_ms": ms,
        "speedup_fused_vs_two_passes": speedup,
        "machine": platform.processor() or platform.machine(),
    }


def main() -> None:
    sizes_main(__doc__ or "", run)


if __name__ == "__main__":
    main()
