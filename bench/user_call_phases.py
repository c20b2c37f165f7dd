"""The user call ``sparcomm.allreduce(x, codec=c, out=out)`` on a dense float32 vector,
per codec, beside MPI's ``Allreduce`` of the same vector, with each phase of the call.

Run under ``mpiexec``; every contender is interleaved round by round (so a burst of
load hits all alike); each round's time is the slowest rank's, the figure the median
over rounds, and the phases (``AllreduceStats.by_category()``) are the medians of
rank 0's.  The error-feedback codecs carry their residual from round to round, as in
training, and ``auto``'s race (its exploring calls) is over before the timed rounds.

    NUMBA_NUM_THREADS=1 MPIR_CVAR_ENABLE_HEAVY_YIELD=1 mpiexec -n 4 \\
        python bench/user_call_phases.py --log2n 24 --rounds 7 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
from mpi4py import MPI

import sparcomm
from sparcomm import QSGD, ErrorFeedback, OneBit, TopK
from sparcomm._cli_bench_quantized import settle_auto
from sparcomm.comm import AllreduceStats

CODECS = {
    "topk-0.01": lambda: TopK(density=0.01),
    "topk-0.01+ef": lambda: ErrorFeedback(TopK(density=0.01)),
    "qsgd4": lambda: QSGD(bits=4),
    "onebit": lambda: OneBit(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2n", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    parser.add_argument("--json", help="also write the results to this file (rank 0)")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), 1 << args.log2n
    x = np.random.default_rng([0, rank, n]).standard_normal(n).astype(np.float32)
    out, reduced = np.empty_like(x), np.empty_like(x)
    codecs = {name: CODECS[name]() for name in args.codecs}
    stats = {name: AllreduceStats() for name in codecs}

    def user_call(name: str):
        return lambda: sparcomm.allreduce(
            x, codec=codecs[name], comm=comm, key="x", out=out, stats=stats[name]
        )

    cases = {"mpi_allreduce": lambda: comm.Allreduce(x, reduced)}
    cases.update({name: user_call(name) for name in codecs})
    # Warm-up: compilation, calibration, first residuals, and auto's race (the tuner's
    # exploring calls alternate algorithms; a training loop's first steps make them).
    for call in cases.values():
        call()
        call()
    tuning_calls = {name: 2 + settle_auto(cases[name], stats[name]) for name in codecs}
    times: dict[str, list[float]] = {name: [] for name in cases}
    phases: dict[str, list[dict[str, float]]] = {name: [] for name in codecs}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, call in cases.items():
            comm.Barrier()
            start = time.perf_counter()
            call()
            elapsed = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
            times[name].append(elapsed)
            if name in phases:
                phases[name].append(stats[name].by_category())
        loads.append(os.getloadavg()[0])
    if rank:
        return
    mpi = statistics.median(times["mpi_allreduce"])
    result = {
        "ranks": comm.Get_size(),
        "n": n,
        "rounds": args.rounds,
        "load_1min": [min(loads), max(loads)],
        "median_ms": {name: statistics.median(t) * 1e3 for name, t in times.items()},
        "speedup_vs_mpi": {name: mpi / statistics.median(times[name]) for name in codecs},
        "phases_ms_rank0": {
            name: {
                phase: statistics.median(p.get(phase, 0.0) for p in rows) * 1e3 for phase in rows[0]
            }
            for name, rows in phases.items()
        },
        "algorithm": {name: stats[name].algorithm for name in codecs},
        "tuning_calls": tuning_calls,
    }
    print(f"load {min(loads):.1f}-{max(loads):.1f}, P={comm.Get_size()}, n=2^{args.log2n}")
    for name, ms in result["median_ms"].items():
        ratio = result["speedup_vs_mpi"].get(name)
        split = result["phases_ms_rank0"].get(name, {})
        parts = " ".join(f"{k} {v:.0f}" for k, v in split.items() if v >= 0.5)
        chosen = f" {result['algorithm'][name]}" if name in codecs else ""
        print(
            f"{name:14s} {ms:7.1f} ms"
            + (f"  MPI/this {ratio:.2f}x  [{parts}]{chosen}" if ratio else "")
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
