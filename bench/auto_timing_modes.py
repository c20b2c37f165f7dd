"""Time two or more algorithms of one allreduce cell several ways, to check a cell of the
``auto`` grid (bench/auto_vs_best.py) against its own referee (issue 11).

``auto``'s race (sparcomm.comm._tune) times single calls, each followed by an 8-byte
agreement that brings the ranks back in step; ``sparcomm bench allreduce`` times
batches of back-to-back calls; a training step makes one call per bucket between
stretches of other work.  Under load, or for cheap calls, they can disagree, so this
script times the same algorithms, in one job, in the ``--modes`` asked for:

* ``block``: single synchronised calls, one algorithm's calls back to back (as the race);
* ``inter``: single synchronised calls, the algorithms alternating call by call;
* ``batch``: back-to-back batches after a barrier (as the grid), alternating batch by batch;
* ``unsynced``: single calls, one algorithm's back to back, timed on each rank with no
  agreement between them; the slowest rank's median, agreed once per round;
* ``step<ms>`` (``step2``, ``step8``, ...): batches of steps of about ``ms`` milliseconds
  of local work (a 4 MiB sum and a small matrix product, a stand-in for a backward pass)
  followed by the call, back to back, no barrier.  Steps with no call are timed too,
  and the figure is what the call adds to a step.

and prints each median (slowest rank's seconds) and the ratio to the fastest of its mode.
Run it with one thread per library, as a training job's ranks::

    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 MPIR_CVAR_ENABLE_HEAVY_YIELD=1 \\
        mpiexec -n 4 python bench/auto_timing_modes.py \\
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


#: The pseudo-algorithm of a step mode that makes no call (the steps' local work alone).
NONE = "none"


def _step_ms(mode: str) -> float | None:
    """The milliseconds of local work of a ``step<ms>`` mode; None for other modes."""
    if not mode.startswith("step"):
        return None
    try:
        milliseconds = float(mode[4:])
    except ValueError:
        return None
    return milliseconds if 0 < milliseconds < 1e6 else None  # finite, positive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", default="qsgd4", help="fp16, qsgd4, terngrad, onebit, topk")
    parser.add_argument("--density", type=float, default=0.01, help="topk's density")
    parser.add_argument("--log2n", type=int, default=16)
    parser.add_argument("--algorithms", nargs="+", required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per round and mode")
    parser.add_argument(
        "--batch", type=int, default=10, help="calls (or steps) per batch: batch, step<ms>"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["block", "inter", "batch"],
        help="block, inter, batch, unsynced, step<ms> (e.g. step2 step8)",
    )
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    known = {"block", "inter", "batch", "unsynced"}
    for mode in args.modes:
        if mode not in known and not _step_ms(mode):
            parser.error(f"unknown mode {mode!r}: expected one of {sorted(known)} or step<ms>")
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if args.codec == "topk":
        codec = TopK(density=args.density)
    else:
        codec = CODECS[args.codec]()
    n = 1 << args.log2n
    x = np.random.default_rng([0, rank, n]).standard_normal(n).astype(np.float32)
    out = np.empty_like(x)

    work = np.random.default_rng(rank).standard_normal(1 << 20).astype(np.float32)
    matrix = np.random.default_rng(rank).standard_normal((160, 160)).astype(np.float32)

    def call(algorithm: str) -> None:
        if algorithm != NONE:
            allreduce(x, codec=codec, algorithm=algorithm, out=out, comm=comm)

    def single(algorithm: str) -> float:
        start = time.perf_counter()
        call(algorithm)
        return comm.allreduce(time.perf_counter() - start, op=MPI.MAX)

    def batch(algorithm: str, seconds_of_work: float = 0.0) -> float:
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(args.batch):
            if seconds_of_work:
                begun = time.perf_counter()
                while time.perf_counter() - begun < seconds_of_work:
                    work.sum()
                    matrix @ matrix
            call(algorithm)
        return comm.allreduce(time.perf_counter() - start, op=MPI.MAX) / args.batch

    def unsynced(algorithm: str) -> float:
        seconds = []
        for _ in range(args.calls):
            start = time.perf_counter()
            call(algorithm)
            seconds.append(time.perf_counter() - start)
        return comm.allreduce(statistics.median(seconds), op=MPI.MAX)

    for algorithm in args.algorithms:  # warm-up: compilation, buffers
        for _ in range(3):
            call(algorithm)
    steps = [mode for mode in args.modes if _step_ms(mode)]
    times: dict[str, dict[str, list[float]]] = {
        mode: {a: [] for a in args.algorithms + ([NONE] if mode in steps else [])}
        for mode in args.modes
    }
    for _ in range(args.rounds):
        for mode, by in times.items():
            if mode == "block":
                for algorithm in by:
                    by[algorithm] += [single(algorithm) for _ in range(args.calls)]
            elif mode == "inter":
                for _ in range(args.calls):
                    for algorithm in by:
                        by[algorithm].append(single(algorithm))
            elif mode == "unsynced":
                for algorithm in by:
                    by[algorithm].append(unsynced(algorithm))
            else:  # batch, step<ms>
                for algorithm in by:
                    by[algorithm].append(batch(algorithm, (_step_ms(mode) or 0.0) / 1e3))
    if rank == 0:
        medians = {
            mode: {a: statistics.median(v) for a, v in by.items()} for mode, by in times.items()
        }
        # A step mode's figure: what the call adds to a step of the same local work.
        added = {
            mode: {a: s - by.get(NONE, 0.0) for a, s in by.items() if a != NONE}
            for mode, by in medians.items()
        }
        print(f"{args.codec} n=2^{args.log2n}  load {os.getloadavg()[0]:.1f}")
        for mode, by in added.items():
            fastest = min(by.values())
            cells = "  ".join(f"{a} {s * 1e3:7.2f} ms ({s / fastest:.2f})" for a, s in by.items())
            print(f"  {mode:<8} {cells}" + ("  (added to a step)" if mode in steps else ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"args": vars(args), "medians_s": medians, "added_s": added, "times_s": times},
                    f,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
