"""A minimal data-parallel PyTorch training script with sparcomm.

Run on 4 local ranks::

    sparcomm run -np 4 -- python examples/train.py --codec topk --epochs 5

Each rank trains on its shard; gradients are compressed with top-k (1 %) and error
feedback, fused and reduced while the backward pass runs.  A checkpoint (one file per
rank: error-feedback residuals differ between ranks) is written every epoch and picked
up again with ``--resume``.
"""

from __future__ import annotations

import argparse
import os

import torch
from mpi4py import MPI

from sparcomm import QSGD, ErrorFeedback, NoCompression, OneBit, TernGrad, TopK
from sparcomm.demo import load_task, make_model
from sparcomm.torch import DistributedOptimizer, broadcast_optimizer_state, broadcast_parameters

CODECS = {
    "dense": NoCompression,
    "topk": lambda: ErrorFeedback(TopK(density=0.01)),
    "qsgd": lambda: QSGD(bits=4),
    "terngrad": TernGrad,
    "onebit": OneBit,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--codec", choices=sorted(CODECS), default="topk")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    x_train, y_train, x_test, y_test = load_task("digits")
    x_local, y_local = torch.from_numpy(x_train[rank::size]), torch.from_numpy(y_train[rank::size])

    model = make_model(seed=0)
    optimizer = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        named_parameters=model.named_parameters(),
        codec=CODECS[args.codec](),
        warmup_steps=10,  # a few dense steps before compression starts
    )
    path = os.path.join(args.checkpoint_dir, f"rank{rank}.pt")
    start_epoch = 0
    if args.resume and os.path.exists(path):
        checkpoint = torch.load(path, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])  # includes the residuals
        start_epoch = checkpoint["epoch"] + 1
    else:
        # Every rank starts from rank 0's weights and optimizer state.
        broadcast_parameters(model.state_dict(), root_rank=0)
        broadcast_optimizer_state(optimizer, root_rank=0)

    loss_fn = torch.nn.CrossEntropyLoss()
    steps_per_epoch = (len(y_train) // size) // args.batch_size
    for epoch in range(start_epoch, args.epochs):
        order = torch.randperm(len(y_local), generator=torch.Generator().manual_seed(epoch))
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x_local[batch]), y_local[batch])
            loss.backward()
            optimizer.step()
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
            path,
        )
        with torch.no_grad():
            accuracy = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
        if rank == 0:
            stats = optimizer.last_stats
            print(
                f"epoch {epoch}: loss {loss.item():.3f}, test accuracy {100 * accuracy:.1f} %, "
                f"{stats.bytes_sent} bytes sent in the last step"
            )
    optimizer.close()


if __name__ == "__main__":
    main()
