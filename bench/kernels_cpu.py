"""Kernel-level benchmark of the Numba CPU kernels against their peers, in one run.

Figures are medians of ``--repeats`` timed calls after one warm-up call (the cases
interleaved round-robin), each reported as
a ratio to a peer measured in the same run: ``stream_read`` (one parallel read of the
input, the physical limit of a kernel that must read it once) and, for top-k,
``np.argpartition(np.abs(x), n - k)``.  Thread count: set ``NUMBA_NUM_THREADS``.

    NUMBA_NUM_THREADS=2 python bench/kernels_cpu.py --log2n 24 --repeats 9 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numba
import numpy as np
from sparcomm.kernels import cpu


def print_json(result: object, path: str | None) -> None:
    """Print ``result`` as JSON, and write it to ``path`` too when one is given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        with open(path, "w") as handle:
            handle.write(text + "\n")


def sizes_main(doc: str, run: Callable[[int, int, int], dict[str, object]]) -> None:
    """Command line of the per-size kernel benchmarks: ``run(log2n, repeats, seed)`` for
    each of ``--sizes``, the list printed (and written with ``--json``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 26], metavar="LOG2N")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    print_json([run(log2n, args.repeats, args.seed) for log2n in args.sizes], args.json)


def median_ms(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each case in ms, the cases interleaved round-robin.

    Interleaving makes a burst of load on a shared machine hit every case alike, so the
    ratios between cases stay meaningful even when the absolute times move.
    """
    for call in cases.values():
        call()  # warm-up: compilation (or cache load) and first-touch page faults
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, call in cases.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


_EVICT = np.zeros(1 << 24)  # 128 MiB: more than the last-level cache of this class of CPU


def median_ms_cold(
    cases: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, float], float]:
    """:func:`median_ms` of each case on operands that are no longer in cache (a 128 MiB
    buffer is written before every call), minus the median cost of that write alone.

    Returns the net medians and the write's own median (ms).
    """

    def cold(call: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            _EVICT[:] = 1.0
            return call()

        return run

    timed = {name: cold(call) for name, call in cases.items()}
    timed["evict only"] = cold(lambda: None)
    ms = median_ms(timed, repeats)
    base = ms.pop("evict only")
    return {name: value - base for name, value in ms.items()}, base


def run(log2n: int, density: float, repeats: int, seed: int) -> dict[str, object]:
    n = 1 << log2n
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    k = max(1, int(density * n))
    bucket = 512
    nb = -(-n // bucket)
    indices = np.empty(k, dtype=np.int32 if n < 2**31 else np.int64)
    values = np.empty(k, dtype=np.float32)
    scales = np.empty(nb, dtype=np.float32)
    packed4 = np.empty(-(-n * 4 // 8), dtype=np.uint8)
    packed2 = np.empty(-(-n * 2 // 8), dtype=np.uint8)
    packed1 = np.empty(-(-n // 8), dtype=np.uint8)
    means = np.empty(2 * nb, dtype=np.float32)
    stream = 0x1234_5678_9ABC_DEF0

    def terngrad() -> None:
        cpu.max_abs(x, bucket, scales)
        cpu.terngrad_encode(x, scales, bucket, np.inf, stream, packed2)

    cases: dict[str, Callable[[], object]] = {
        "stream_read": lambda: cpu.stream_read(x),
        "np.argpartition(|x|)": lambda: np.argpartition(np.abs(x), n - k),
        "topk": lambda: cpu.topk(x, k, indices, values),
        "qsgd_encode(bits=4, l2)": lambda: cpu.qsgd_encode(
            x, 7, 4, bucket, 0, stream, scales, packed4
        ),
        "qsgd_encode(bits=4, max)": lambda: cpu.qsgd_encode(
            x, 7, 4, bucket, 1, stream, scales, packed4
        ),
        "terngrad(max_abs+encode)": terngrad,
        "onebit_encode": lambda: cpu.onebit_encode(x, bucket, packed1, means),
    }
    timings = median_ms(cases, repeats)
    read = timings["stream_read"]
    return {
        "n": n,
        "dtype": "float32",
        "density": density,
        "bucket": bucket,
        "repeats": repeats,
        "threads": numba.get_num_threads(),
        "threading_layer": numba.threading_layer(),
        "machine": platform.processor() or platform.machine(),
        "loadavg_1min": os.getloadavg()[0],
        "ms": timings,
        "x_stream_read": {name: t / read for name, t in timings.items()},
        "topk_speedup_vs_argpartition": timings["np.argpartition(|x|)"] / timings["topk"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2n", type=int, default=24)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    result = run(args.log2n, args.density, args.repeats, args.seed)
    print(
        f"n = 2^{args.log2n}, float32, {result['threads']} threads "
        f"({result['threading_layer']}), median of {args.repeats}, "
        f"load average {result['loadavg_1min']:.2f}"
    )
    for name, ms in result["ms"].items():
        print(f"  {name:28s} {ms:9.3f} ms   {result['x_stream_read'][name]:6.2f} x stream_read")
    print(f"  topk speed-up over np.argpartition: {result['topk_speedup_vs_argpartition']:.1f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
