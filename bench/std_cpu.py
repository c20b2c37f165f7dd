"""``kernels.cpu.std`` (contract order) against ``np.std(x, dtype=np.float64)``, one run.

TernGrad's clipping threshold ``clip * std(x)`` is computed by the contract's ``std``
(blocks of 2**14, 8-lane sums, sequential combine), so that CPU and GPU agree bit for
bit; this measures what the fixed order costs (or saves) against NumPy's own, and
against ``stream_read`` (one parallel read of x: std needs two).  Medians
of ``--repeats`` calls after a warm-up, the cases interleaved round-robin
(``median_ms`` of ``bench/kernels_cpu.py``).  Thread count: ``NUMBA_NUM_THREADS``.

    NUMBA_NUM_THREADS=2 python bench/std_cpu.py --log2n 24 --repeats 9
"""

from __future__ import annotations

import argparse
import platform

import numba
import numpy as np
from kernels_cpu import median_ms, print_json
from sparcomm.kernels import cpu


def run(log2n: int, repeats: int, seed: int) -> dict[str, object]:
    x = np.random.default_rng(seed).standard_normal(1 << log2n).astype(np.float32)
    ours, numpy_std = cpu.std(x), float(np.std(x, dtype=np.float64))
    ms = median_ms(
        {
            "kernels.cpu.std": lambda: cpu.std(x),
            "np.std(dtype=float64)": lambda: np.std(x, dtype=np.float64),
            "stream_read (one read of x)": lambda: cpu.stream_read(x),
        },
        repeats,
    )
    return {
        "n": x.size,
        "dtype": "float32",
        "threads": numba.get_num_threads(),
        "repeats": repeats,
        "median_ms": ms,
        "speedup_vs_numpy": ms["np.std(dtype=float64)"] / ms["kernels.cpu.std"],
        # std reads x twice (the mean first): 2.0 would be two reads at full bandwidth.
        "std_in_reads": ms["kernels.cpu.std"] / ms["stream_read (one read of x)"],
        "relative_difference": abs(ours - numpy_std) / numpy_std,
        "machine": platform.processor() or platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2n", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    print_json(run(args.log2n, args.repeats, args.seed), args.json)


if __name__ == "__main__":
    main()
