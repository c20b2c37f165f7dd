"""Time per training step: sparcomm's DistributedOptimizer against PyTorch DDP (gloo).

Run under MPI, one process per rank::

    sparcomm run -np 2 -- python bench/ddp_step.py --json bench/results/ddp_step_np2.json

All contenders train the same MLP on the same synthetic data in the same job, in
alternating rounds (DDP, sparcomm dense, sparcomm TopK, sparcomm dense without overlap,
DDP, ...) so machine drift hits them alike.  A step is ``zero_grad + forward + backward
+ step`` including all communication.  Reported: median seconds per step (the slowest
rank's median), bytes this rank sent per step as counted by sparcomm's collectives, and
ratios: sparcomm dense / DDP time (target <= 1.2), dense / TopK(0.01)+EF bytes (target
>= 30) and dense with / without overlap time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI

from sparcomm import ErrorFeedback, NoCompression, TopK
from sparcomm.torch import DistributedOptimizer, broadcast_parameters

COMM = MPI.COMM_WORLD


def _model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    width = args.inputs
    for _ in range(args.layers):
        layers += [torch.nn.Linear(width, args.hidden), torch.nn.ReLU()]
        width = args.hidden
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers)


def _init_gloo() -> None:
    port = None
    if COMM.Get_rank() == 0:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    port = COMM.bcast(port, root=0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=COMM.Get_rank(), world_size=COMM.Get_size(), init_method="env://"
    )


class _Contender:
    """One way of training: a model, an optimizer, and how to read bytes per step."""

    def __init__(
        self, label: str, args: argparse.Namespace, codec: Any = None, overlap: bool = True
    ) -> None:
        self.label = label
        model = _model(args)
        if codec is None:
            self.model = torch.nn.parallel.DistributedDataParallel(
                model, bucket_cap_mb=args.fusion_mib
            )
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        else:
            broadcast_parameters(model.state_dict(), comm=COMM)
            self.model = model
            self.optimizer = DistributedOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                model.named_parameters(),
                codec=codec,
                comm=COMM,
                fusion_threshold_bytes=int(args.fusion_mib * 2**20),
                overlap=overlap,
            )
        self.seconds: list[float] = []
        self.bytes: list[int] = []

    def steps(self, batches: list[tuple[torch.Tensor, torch.Tensor]], record: bool) -> None:
        loss_fn = torch.nn.CrossEntropyLoss()
        for x, y in batches:
            COMM.Barrier()  # start every step together: a step's time is its own
            start = time.perf_counter()
            self.optimizer.zero_grad()
            loss_fn(self.model(x), y).backward()
            self.optimizer.step()
            elapsed = time.perf_counter() - start
            if record:
                self.seconds.append(elapsed)
                stats = getattr(self.optimizer, "last_stats", None)
                if stats is not None:
                    self.bytes.append(stats.bytes_sent)

    def summary(self) -> dict[str, Any]:
        median = COMM.allreduce(statistics.median(self.seconds), op=MPI.MAX)
        result: dict[str, Any] = {"seconds_per_step": median, "steps": len(self.seconds)}
        if self.bytes:
            result["bytes_sent_per_step"] = COMM.allreduce(float(np.mean(self.bytes)), op=MPI.MAX)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fusion-mib", type=float, default=25.0, help="DDP bucket_cap_mb too")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()

    _init_gloo()
    rng = np.random.default_rng(100 + COMM.Get_rank())
    batches = [
        (
            torch.from_numpy(rng.standard_normal((args.batch, args.inputs), dtype=np.float32)),
            torch.from_numpy(rng.integers(0, 10, args.batch)),
        )
        for _ in range(args.steps)
    ]
    contenders = [
        _Contender("torch DDP (gloo)", args),
        _Contender("sparcomm NoCompression", args, NoCompression()),
        _Contender("sparcomm TopK(0.01)+EF", args, ErrorFeedback(TopK(density=0.01))),
        _Contender("sparcomm NoCompression, no overlap", args, NoCompression(), overlap=False),
    ]
    for contender in contenders:
        contender.steps(batches[:3], record=False)  # warm-up: allocation, calibration, JIT
    for _ in range(args.rounds):
        for contender in contenders:
            contender.steps(batches, record=True)
    results = {c.label: c.summary() for c in contenders}
    for contender in contenders[1:]:
        contender.optimizer.close()
    dist.destroy_process_group()

    ddp, dense, topk, serial = (results[c.label] for c in contenders)
    parameters = sum(p.numel() for p in _model(args).parameters())
    report = {
        "command": "sparcomm run -np {} -- python {}".format(COMM.Get_size(), " ".join(sys.argv)),
        "ranks": COMM.Get_size(),
        "model": f"MLP {args.inputs}-" + f"{args.hidden}-" * args.layers + "10",
        "parameters": parameters,
        "batch_per_rank": args.batch,
        "threads_per_rank": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "results": results,
        "dense_over_ddp_time": dense["seconds_per_step"] / ddp["seconds_per_step"],
        "topk_over_ddp_time": topk["seconds_per_step"] / ddp["seconds_per_step"],
        "dense_over_topk_bytes": dense["bytes_sent_per_step"] / topk["bytes_sent_per_step"],
        "overlap_over_no_overlap_time": dense["seconds_per_step"] / serial["seconds_per_step"],
    }
    if COMM.Get_rank() == 0:
        text = json.dumps(report, indent=2)
        print(text)
        if args.json:
            with open(args.json, "w") as handle:
                handle.write(text + "\n")


if __name__ == "__main__":
    main()
