"""Time two or more algorithms of one allreduce cell three ways, to check a cell of the
``auto`` grid (bench/auto_vs_best.py) against its own referee (issue 11).

``auto``'s race (sparcomm.comm._tune) times single calls, each followed by an 8-byte
agreement that brings the ranks back in step; ``sparcomm bench allreduce`` times
batches of back-to-back calls.  Under load the two can disagree, so this script times
the same algorithms, in one job, as

* ``block``: single synchronised calls, one algorithm's calls back to back (as the race);
* ``inter``: single synchronised calls, the algorithms alternating call by call;
* ``batch``: back-to-back batches after a barrier (as the grid), alternating batch by batch;

and prints each median (slowest rank's seconds) and the ratio to the fastest of its mode::

    MPIR_CVAR_ENABLE_HEAVY_YIELD=1 mpiexec -n 4 python bench/auto_timing_modes.py \\
        --codec qsgd4 --log2n 16 --algorithms allgather reduce_scatter_allgather
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
from mpi4py import MPI

from sparcomm import FP16, QSGD, OneBit, TernGrad, TopK
from sparcomm.comm import allreduce

CODECS = {
    "fp16": FP16,
    "qsgd4": lambda: QSGD(bits=4),
    "terngrad": TernGrad,
    "onebit": OneBit,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", default="qsgd4", help="fp16, qsgd4, terngrad, onebit, topk")
    parser.add_argument("--density", type=float, default=0.01, help="topk's density")
    parser.add_argument("--log2n", type=int, default=16)
    parser.add_argument("--algorithms", nargs="+", required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per round and mode")
    parser.add_argument("--batch", type=int, default=10, help="calls per batch (batch mode)")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if args.codec == "topk":
        codec = TopK(density=args.density)
    else:
        codec = CODECS[args.codec]()
    n = 1 << args.log2n
    x = np.random.default_rng([0, rank, n]).standard_normal(n).astype(np.float32)
    out = np.empty_like(x)

    def call(algorithm: str) -> None:
        allreduce(x, codec=codec, algorithm=algorithm, out=out, comm=comm)

    def single(algorithm: str) -> float:
        start = time.perf_counter()
        call(algorithm)
        return comm.allreduce(time.perf_counter() - start, op=MPI.MAX)

    def batch(algorithm: str) -> float:
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(args.batch):
            call(algorithm)
        return comm.allreduce(time.perf_counter() - start, op=MPI.MAX) / args.batch

    for algorithm in args.algorithms:  # warm-up: compilation, buffers
        for _ in range(3):
            call(algorithm)
    times: dict[str, dict[str, list[float]]] = {
        mode: {a: [] for a in args.algorithms} for mode in ("block", "inter", "batch")
    }
    for _ in range(args.rounds):
        for algorithm in args.algorithms:
            times["block"][algorithm] += [single(algorithm) for _ in range(args.calls)]
        for _ in range(args.calls):
            for algorithm in args.algorithms:
                times["inter"][algorithm].append(single(algorithm))
        for algorithm in args.algorithms:
            times["batch"][algorithm].append(batch(algorithm))
    if rank == 0:
        medians = {
            mode: {a: statistics.median(v) for a, v in by.items()} for mode, by in times.items()
        }
        print(f"{args.codec} n=2^{args.log2n}  load {os.getloadavg()[0]:.1f}")
        for mode, by in medians.items():
            fastest = min(by.values())
            cells = "  ".join(f"{a} {s * 1e3:7.2f} ms ({s / fastest:.2f})" for a, s in by.items())
            print(f"  {mode:<6} {cells}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "medians_s": medians, "times_s": times}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
