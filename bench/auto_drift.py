"""How often ``auto`` explores again in steady state (issue 11, session 12).

Calls ``sparcomm.allreduce(x, codec=..., algorithm="auto")`` on one shape, ``--calls``
times, for TopK (density 1e-4), QSGD 4-bit and OneBit, and prints per codec: the races
the tuner started (the first one included: every further one is a drift check that
fired), the calls that ran as exploration, the final choice and the mean time per call.
``--checks`` and ``--drift`` override :data:`sparcomm.comm._tune.CHECKS` and
:data:`~sparcomm.comm._tune.DRIFT` to compare settings in one sitting.  Run it beside
busy loops to see what load does::

    MPIR_CVAR_ENABLE_HEAVY_YIELD=1 NUMBA_NUM_THREADS=1 mpiexec -n 4 \\
        python bench/auto_drift.py --calls 3000 --log2n 16
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from mpi4py import MPI

from sparcomm.codecs import QSGD, OneBit, TopK
from sparcomm.comm import AllreduceStats, _tune, allreduce


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--log2n", type=int, default=16)
    parser.add_argument("--checks", type=int, help="override _tune.CHECKS")
    parser.add_argument("--drift", type=float, help="override _tune.DRIFT")
    args = parser.parse_args(argv)
    if args.checks is not None:
        _tune.CHECKS = args.checks
    if args.drift is not None:
        _tune.DRIFT = args.drift
    races = [0]
    start_race = _tune._start_race

    def counting(entry):  # every race, the first and the re-explorations
        races[0] += 1
        return start_race(entry)

    _tune._start_race = counting
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    n = 1 << args.log2n
    x = np.random.default_rng(rank).standard_normal(n).astype(np.float32)
    out = np.zeros_like(x)
    if rank == 0:
        print(f"CHECKS={_tune.CHECKS} DRIFT={_tune.DRIFT}, n=2^{args.log2n}, {args.calls} calls")
    codecs = {"topk": TopK(density=1e-4), "qsgd4": QSGD(bits=4), "onebit": OneBit()}
    for name, codec in codecs.items():
        stats = AllreduceStats()
        races[0] = 0
        explored = 0
        started = time.perf_counter()
        for step in range(args.calls):
            allreduce(x, codec=codec, comm=comm, out=out, stats=stats, key=name, step=step)
            explored += stats.tuning == "explore"
        seconds = (time.perf_counter() - started) / args.calls
        if rank == 0:
            print(
                f"{name:<7} races {races[0]:3d}  exploring calls {explored:4d}  "
                f"final {stats.algorithm:<26} {seconds * 1e3:.3f} ms/call"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
