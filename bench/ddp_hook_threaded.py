"""The sparcomm DDP hook: reduce on a worker thread or inside the hook?

Run under MPI (``sparcomm run -np 2 -- python bench/ddp_hook_threaded.py``).  The same
MLP is trained with DDP (gloo) and the sparcomm hook in two modes, ``threaded=True``
(the hook queues the bucket and returns a pending future; a thread reduces it while the
backward pass computes the next buckets) and ``threaded=False`` (the hook reduces and
returns a completed future), plus DDP without a hook as the reference, in alternating
rounds.  Prints the slowest rank's median ms per step of each and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI
from torch.nn.parallel import DistributedDataParallel as DDP

from sparcomm import ErrorFeedback, NoCompression, TopK
from sparcomm.torch import DDPCommState, ddp_comm_hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--bucket-cap-mb", type=float, default=4.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    port = None
    if comm.rank == 0:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    port = comm.bcast(port)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.rank, world_size=comm.size
    )
    load_start = os.getloadavg()
    width = args.width
    rng = np.random.default_rng(comm.rank)
    x = torch.from_numpy(rng.standard_normal((64, width)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, 64))

    def make(label: str):
        torch.manual_seed(0)
        layers = []
        for _ in range(3):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        model = DDP(
            torch.nn.Sequential(*layers, torch.nn.Linear(width, 10)),
            bucket_cap_mb=args.bucket_cap_mb,
        )
        state = None
        if label != "ddp":
            codec_name, mode = label.split("-")
            codec = NoCompression() if codec_name == "dense" else ErrorFeedback(TopK(density=0.01))
            state = DDPCommState(codec, threaded=mode == "threaded", dense_below=0)
            model.register_comm_hook(state, ddp_comm_hook)
        return model, torch.optim.SGD(model.parameters(), lr=0.01), state

    labels = ["ddp", "dense-threaded", "dense-inline", "topk-threaded", "topk-inline"]
    contenders = {label: make(label) for label in labels}
    times: dict[str, list[float]] = {label: [] for label in labels}
    for _round in range(args.rounds):
        for label in labels:
            model, optimizer, _ = contenders[label]
            for step in range(args.steps + 2):
                comm.Barrier()
                start = time.perf_counter()
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                elapsed = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
                if step >= 2:  # warm-up (and DDP's bucket rebuild) not timed
                    times[label].append(elapsed)
    medians = {label: 1e3 * statistics.median(values) for label, values in times.items()}
    result = {
        "command": f"sparcomm run -np {comm.size} -- python bench/ddp_hook_threaded.py",
        "ranks": comm.size,
        "width": width,
        "bucket_cap_mb": args.bucket_cap_mb,
        "median_ms": medians,
        "threaded_over_inline": {
            codec: medians[f"{codec}-threaded"] / medians[f"{codec}-inline"]
            for codec in ("dense", "topk")
        },
        "over_ddp": {label: medians[label] / medians["ddp"] for label in labels},
        "load_start": load_start,
        "load_end": os.getloadavg(),
    }
    for _, _, state in contenders.values():
        if state is not None:
            state.close()
    if comm.rank == 0:
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(result, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
