"""One allreduce call of two or more algorithms, timed as the grid, the race and a step time it.

``sparcomm bench allreduce`` (the grid) times batches of back-to-back calls of one
algorithm; ``auto``'s race times single calls, each followed by the 8-byte agreement on
its seconds; a training step makes one call per bucket between stretches of other work.
Where the grid and the race rank two algorithms in opposite order (docs/benchmarks.md,
issue 11, sessions 12-13), this script says which protocol a training loop agrees with:

- ``batch``: ``--batch`` calls back to back after a barrier, seconds per call of the
  slowest rank (the grid's protocol);
- ``single``: one call, then an ``Allreduce`` of its seconds (maximum): the race's;
- ``unsynced``: single calls timed on each rank with no agreement between them, the
  slowest rank's median agreed once at the end;
- ``step<ms>``: ``--batch`` steps of about ``ms`` milliseconds of local work (a 4 MiB
  sum and a small matrix product, the stand-in for a backward pass) followed by the call,
  back to back, no barrier; seconds per step of the slowest rank.  The contender
  ``none`` makes no call, so a step's figure less ``none``'s is what the call adds.

Every round times every protocol and algorithm, the order rotated; medians over rounds.
Run with one thread per library (``OPENBLAS_NUM_THREADS=1``), as the ranks of a
training job are::

    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 MPIR_CVAR_ENABLE_HEAVY_YIELD=1 \\
        mpiexec -n 4 python bench/call_protocols.py --log2n 16 --density 1 \\
        --algorithms recursive_doubling dense none --rounds 21 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
from mpi4py import MPI

from sparcomm import TopK
from sparcomm.comm import allreduce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2n", type=int, default=16)
    parser.add_argument("--density", type=float, default=1.0, help="TopK's density")
    parser.add_argument("--algorithms", nargs="+", default=["recursive_doubling", "dense", "none"])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--batch", type=int, default=12, help="calls or steps per figure")
    parser.add_argument(
        "--step-ms", type=float, nargs="+", default=[2.0, 8.0], help="local work per step"
    )
    parser.add_argument("--json", help="also write the results to this file (rank 0)")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), 1 << args.log2n
    x = np.random.default_rng([7, rank, n]).standard_normal(n).astype(np.float32)
    out = np.zeros_like(x)
    codec = TopK(density=args.density)
    work = np.random.default_rng(rank).standard_normal(1 << 20).astype(np.float32)
    matrix = np.random.default_rng(rank).standard_normal((160, 160)).astype(np.float32)

    def local_work(seconds: float) -> None:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            work.sum()
            matrix @ matrix

    def call(algorithm: str) -> None:
        if algorithm != "none":
            allreduce(x, codec=codec, comm=comm, algorithm=algorithm, out=out)

    def batch(algorithm: str) -> float:
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(args.batch):
            call(algorithm)
        return comm.allreduce(time.perf_counter() - start, op=MPI.MAX) / args.batch

    def single(algorithm: str) -> float:
        seconds = []
        for _ in range(args.batch):
            start = time.perf_counter()
            call(algorithm)
            seconds.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
        return statistics.median(seconds)

    def unsynced(algorithm: str) -> float:
        seconds = []
        for _ in range(args.batch):
            start = time.perf_counter()
            call(algorithm)
            seconds.append(time.perf_counter() - start)
        return comm.allreduce(statistics.median(seconds), op=MPI.MAX)

    def step(milliseconds: float) -> Callable[[str], float]:
        def run(algorithm: str) -> float:
            comm.Barrier()
            start = time.perf_counter()
            for _ in range(args.batch):
                local_work(milliseconds / 1e3)
                call(algorithm)
            return comm.allreduce(time.perf_counter() - start, op=MPI.MAX) / args.batch

        return run

    protocols: dict[str, Callable[[str], float]] = {
        "batch": batch,
        "single": single,
        "unsynced": unsynced,
    }
    protocols.update({f"step{ms:g}": step(ms) for ms in args.step_ms})
    for algorithm in args.algorithms:  # compilation, first touches, buffers
        for _ in range(3):
            call(algorithm)
    times = {p: {a: [] for a in args.algorithms} for p in protocols}
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        names = list(protocols)
        names = names[r % len(names) :] + names[: r % len(names)]
        for protocol in names:
            order = args.algorithms if r % 2 == 0 else args.algorithms[::-1]
            for algorithm in order:
                times[protocol][algorithm].append(protocols[protocol](algorithm))
    if rank != 0:
        return
    load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
    print(f"load {load}, P={comm.Get_size()}, n=2^{args.log2n}, density {args.density}")
    medians = {
        p: {a: statistics.median(v) for a, v in by_algorithm.items()}
        for p, by_algorithm in times.items()
    }
    calls = [a for a in args.algorithms if a != "none"]
    for protocol, median in medians.items():
        added = {
            a: median[a] - median.get("none", 0.0) if protocol.startswith("step") else median[a]
            for a in calls
        }
        best = min(added, key=lambda a: added[a])
        text = "  ".join(f"{a} {added[a] * 1e3:.2f}" for a in calls)
        ratios = "  ".join(f"{a} {added[a] / added[best]:.2f}x" for a in calls)
        what = "ms a call adds to a step" if protocol.startswith("step") else "ms a call"
        print(f"  {protocol:7s} {what}: {text}   ({ratios} the fastest)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "command": vars(args),
                    "ranks": comm.Get_size(),
                    "load": load,
                    "seconds": times,
                    "medians_s": medians,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
