"""One GradientReducer step (submit every gradient, wait) for a ~10M-parameter MLP's
gradients, TopK 1 % + error feedback, with the step's overheads switched on and off.

Run under MPI, one process per rank::

    sparcomm run -np 4 -- python bench/reducer_step.py --rounds 20

Contenders, interleaved round by round in one job so machine drift hits them alike:

* ``checked``: every collective starts with its signature Allgather, and each small
  compressed tensor (the biases) pays its own collective (``layer_fuse_below=0``): the
  reducer as it was before issue 11;
* ``agreed``: after each bucket's first check, steady-state calls check locally and carry
  their status beside the data (``sparcomm.comm._call.agreed_layout``);
* ``agreed+fused``: the same, and the biases share one collective (the default).

Reported: the slowest rank's median step in milliseconds, the signature checks per step,
the ratios to ``checked`` and rank 0's split of a step into phases
(``ReductionStats.phases``); the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
from mpi4py import MPI

from sparcomm import ErrorFeedback, TopK
from sparcomm.comm import _call
from sparcomm.reducer import GradientReducer

COMM = MPI.COMM_WORLD


def _shapes(inputs: int, hidden: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Gradients in the order backward produces them (last layer first)."""
    shapes, width = [], inputs
    for i in range(layers):
        shapes.append((f"fc{i}", (hidden, width)))
        width = hidden
    shapes.append((f"fc{layers}", (10, width)))
    out: list[tuple[str, tuple[int, ...]]] = []
    for name, shape in reversed(shapes):
        out += [(f"{name}.bias", (shape[0],)), (f"{name}.weight", shape)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--inputs", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--json", help="write the figures here (rank 0)")
    args = parser.parse_args()
    rank = COMM.Get_rank()
    shapes = _shapes(args.inputs, args.hidden, args.layers)
    rng = np.random.default_rng(rank)
    grads = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes}
    contenders = {
        "checked": (False, 0),
        "agreed": (True, 0),
        "agreed+fused": (True, None),
    }
    reducers = {}
    for label, (_, fuse) in contenders.items():
        options = {} if fuse is None else {"layer_fuse_below": fuse}
        reducers[label] = GradientReducer(ErrorFeedback(TopK(density=args.density)), **options)
    checks = {label: 0 for label in contenders}
    original = _call.check_signature
    current = [""]

    def counting(*a, **k):
        checks[current[0]] += 1
        return original(*a, **k)

    _call.check_signature = counting
    times: dict[str, list[float]] = {label: [] for label in contenders}
    phases: dict[str, dict[str, list[float]]] = {label: {} for label in contenders}
    load_before = os.getloadavg()
    for round_ in range(args.rounds + 2):  # two warm-up rounds (compile, first checks)
        for label, (steady, _) in contenders.items():
            _call.STEADY_STATE = steady
            current[0] = label
            if round_ == 2:
                checks[label] = 0
            COMM.Barrier()
            start = time.perf_counter()
            reducers[label].reduce(grads)
            elapsed = COMM.allreduce(time.perf_counter() - start, op=MPI.MAX)
            if round_ >= 2:
                times[label].append(elapsed)
                for name, value in reducers[label].last_stats.phases.items():
                    phases[label].setdefault(name, []).append(value)
    load_after = os.getloadavg()
    for reducer in reducers.values():
        reducer.close()
    if rank != 0:
        return
    medians = {label: statistics.median(values) for label, values in times.items()}
    params = sum(int(np.prod(shape)) for _, shape in shapes)
    print(
        f"P={COMM.Get_size()} params={params} TopK({args.density})+EF rounds={args.rounds} "
        f"load before {load_before[0]:.2f} after {load_after[0]:.2f}"
    )
    for label in contenders:
        print(
            f"{label:>14}: {1e3 * medians[label]:8.2f} ms/step  "
            f"checks/step {checks[label] / args.rounds:.1f}  "
            f"ratio to checked {medians[label] / medians['checked']:.3f}"
        )
        split = {name: statistics.median(v) for name, v in phases[label].items()}
        print(
            "                rank 0 phases (ms, median): "
            + "  ".join(f"{name} {1e3 * value:.1f}" for name, value in split.items())
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "ranks": COMM.Get_size(),
                    "params": params,
                    "load": [load_before, load_after],
                    "median_s": medians,
                    "checks_per_step": {k: v / args.rounds for k, v in checks.items()},
                },
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()
