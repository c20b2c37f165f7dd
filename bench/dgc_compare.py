"""TopK + error feedback against the DGC options, on a small MLP, 4 workers in one process.

Plain, interleaved, fixed seeds: ``sparcomm bench train``'s teacher-student MLP task
(``sparcomm._train_tasks.Task``), smaller (``--inputs``, ``--width``, ``--depth``); every contender
trains its own copy of the same student from the same initial weights on the same
batches, one step of each contender in turn.  Each of ``--workers`` simulated workers
computes the gradient of its own batch, encodes it with its own codec instance (one key
per parameter), and the step applies the mean of the workers' decoded payloads (what
``sparcomm.allreduce(op="mean")`` computes; tests/mpi/test_dgc_collectives.py checks that).

Contenders (SGD, ``--lr``; TopK at ``--density`` for every compressed one):

- ``dense``: no compression, SGD momentum ``--momentum`` (the reference);
- ``topk-ef``: ``ErrorFeedback(TopK)``, SGD momentum ``--momentum``;
- ``dgc``: ``DGC(TopK, momentum=--momentum, masking=True)`` (momentum correction, factor
  masking),
  SGD without momentum (DGC's rule);
- ``dgc-nomask``: the same without factor masking;
- ``dgc-clip``: ``dgc`` (masking on) with local gradient clipping at ``--clip-norm`` (per tensor,
  ``clip_norm / sqrt(P)`` per worker).

Prints the test accuracy of each contender at every ``--eval-every`` steps, for each seed,
and the mean over seeds with its standard error, with the load average
(``os.getloadavg``) before and after.

    python bench/dgc_compare.py --seeds 0 1 2 --steps 300
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sparcomm import DGC, ErrorFeedback, TopK
from sparcomm._train_tasks import Task


class Contender:
    """One way of training: a student, an optimizer, one codec per worker."""

    def __init__(
        self,
        name: str,
        student: torch.nn.Module,
        make_codec: Callable[[], Any] | None,
        optimizer_momentum: float,
        args: argparse.Namespace,
    ) -> None:
        self.name = name
        self.model = student
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=args.lr, momentum=optimizer_momentum
        )
        self.codecs = [make_codec() for _ in range(args.workers)] if make_codec else None
        self.encode_seconds = 0.0
        self.clipped = 0
        self.encodes = 0

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> None:
        names = [name for name, _ in self.model.named_parameters()]
        total = {name: None for name in names}
        for worker, (x, y) in enumerate(batches):
            self.model.zero_grad()
            torch.nn.functional.cross_entropy(self.model(x), y).backward()
            for name, parameter in self.model.named_parameters():
                grad = parameter.grad.detach().numpy()
                if self.codecs is not None:
                    codec = self.codecs[worker]
                    started = time.perf_counter()
                    threshold = getattr(codec, "clip_threshold", lambda: None)()
                    if threshold is not None:
                        self.clipped += int(float(np.linalg.norm(grad)) > threshold)
                        self.encodes += 1
                    grad = codec.decode(codec.encode(grad, key=name, step=step, rank=worker))
                    self.encode_seconds += time.perf_counter() - started
                total[name] = grad.copy() if total[name] is None else total[name] + grad
        for name, parameter in self.model.named_parameters():
            parameter.grad = torch.from_numpy(total[name] / len(batches))
        self.optimizer.step()

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return 100.0 * float((self.model(x).argmax(1) == y).float().mean())


def _contenders(args: argparse.Namespace) -> dict[str, tuple[Callable[[], Any] | None, float]]:
    m, density, workers = args.momentum, args.density, args.workers
    return {
        "dense": (None, m),
        "topk-ef": (lambda: ErrorFeedback(TopK(density=density)), m),
        "dgc": (lambda: DGC(TopK(density=density), momentum=m, masking=True), 0.0),
        "dgc-nomask": (lambda: DGC(TopK(density=density), momentum=m, masking=False), 0.0),
        "dgc-clip": (
            lambda: DGC(
                TopK(density=density),
                momentum=m,
                masking=True,
                clip_norm=args.clip_norm,
                world_size=workers,
            ),
            0.0,
        ),
    }


def _task(args: argparse.Namespace, seed: int) -> Task:
    return Task("mlp", args.inputs, args.width, args.depth, args.classes, seed)


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, list[float]]:
    task = _task(args, seed)
    test_x, test_y = task.test_set(args.test_samples)
    contenders = []
    for name, (make, momentum) in _contenders(args).items():
        if name not in args.contenders:
            continue
        contenders.append(Contender(name, task.model(), make, momentum, args))
    curves: dict[str, list[float]] = {c.name: [] for c in contenders}
    for step in range(args.steps):
        batches = [task.batch(worker, step, args.batch) for worker in range(args.workers)]
        for contender in contenders:  # interleaved: one step of each in turn
            contender.step(batches, step)
        if (step + 1) % args.eval_every == 0:
            for contender in contenders:
                curves[contender.name].append(contender.accuracy(test_x, test_y))
    for contender in contenders:
        extra = ""
        if contender.encodes:
            extra = f", clipped {contender.clipped}/{contender.encodes} tensor encodes"
        print(
            f"  seed {seed} {contender.name:11s} acc % "
            + " ".join(f"{a:5.1f}" for a in curves[contender.name])
            + f"  (codec {contender.encode_seconds:.1f} s{extra})",
            flush=True,
        )
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="per worker")
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--test-samples", type=int, default=4096)
    parser.add_argument(
        "--contenders",
        nargs="+",
        default=["dense", "topk-ef", "dgc", "dgc-nomask", "dgc-clip"],
        choices=["dense", "topk-ef", "dgc", "dgc-nomask", "dgc-clip"],
        help="topk-ef is always run (the reference of the differences)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch and Numba threads")
    args = parser.parse_args()
    if "topk-ef" not in args.contenders:
        args.contenders.append("topk-ef")
    torch.set_num_threads(args.threads)
    import numba

    numba.set_num_threads(args.threads)
    task = _task(args, 0)
    parameters = sum(p.numel() for p in task.model().parameters())
    print(
        f"{task.describe()} ({parameters} parameters), "
        f"{args.workers} workers x batch {args.batch}, lr {args.lr}, momentum {args.momentum}, "
        f"TopK density {args.density}, clip_norm {args.clip_norm}, {args.steps} steps"
    )
    print(f"load before: {os.getloadavg()}", flush=True)
    started = time.perf_counter()
    finals: dict[str, list[float]] = {}
    for seed in args.seeds:
        for name, curve in run_seed(args, seed).items():
            finals.setdefault(name, []).append(curve[-1])
    print(f"load after: {os.getloadavg()}  ({time.perf_counter() - started:.0f} s)")
    reference = np.array(finals["topk-ef"])
    print(f"final test accuracy over seeds {args.seeds} (mean, s.e.; difference to topk-ef):")
    for name, values in finals.items():
        array = np.array(values)
        difference = array - reference
        error = float(difference.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else 0.0
        spread = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else 0.0
        print(
            f"  {name:11s} {array.mean():5.1f} % (s.e. {spread:.1f})  "
            f"vs topk-ef {difference.mean():+5.1f} (s.e. {error:.1f})"
        )


if __name__ == "__main__":
    main()
