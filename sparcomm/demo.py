"""``sparcomm demo``: data-parallel training of a small MLP, once dense and once per codec.

The task is scikit-learn's bundled ``digits`` set (8x8 images, 10 classes; no download,
the ``[demo]`` extra) or, with ``--data synthetic`` (no scikit-learn needed), a generated
Gaussian-mixture classification problem.  Each rank trains on its shard with
:func:`sparcomm.torch.DistributedOptimizer` (PyTorch installed) or with
:class:`sparcomm.reducer.GradientReducer` on a NumPy MLP (``--framework numpy``, the
default without PyTorch); the table compares final test accuracy,
bytes sent per rank per step, the ratio of bytes to the dense run, and time per step.

``sparcomm demo`` relaunches itself under ``mpiexec`` (``-np 4`` by default) through the
``sparcomm run`` launcher; ``python -m sparcomm.demo`` is the per-rank entry point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from sparcomm.cli import arguments, command

#: Width of the MLP's two hidden layers.
HIDDEN = 256

#: The runs of the demo: label -> codec factory.  Fresh codec objects per run, so no
#: error-feedback state leaks from one run into the next.
RUNS: dict[str, Callable[[], Any]] = {}


def _register_runs() -> None:
    from sparcomm.codecs import CODECS  # the codec registry's presets tagged "demo"

    RUNS.update({p.label: p.make for p in CODECS.presets("demo")})


def load_task(
    data: str = "digits", seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: float32 features (standardised), int64 labels.

    ``data="digits"``: scikit-learn's digits (1797 samples, 64 features, 10 classes),
    80/20 split.  ``data="synthetic"``: 2400 samples of a 10-class Gaussian mixture in 64
    dimensions, generated from ``seed``.
    """
    rng = np.random.default_rng(seed)
    if data == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise ImportError(
                "the digits data set needs scikit-learn: pip install 'sparcomm[demo]', "
                "or run with --data synthetic"
            ) from error
        features, labels = load_digits(return_X_y=True)
    elif data == "synthetic":
        centres = rng.standard_normal((10, 64)) * 1.5
        labels = rng.integers(0, 10, 2400)
        features = centres[labels] + rng.standard_normal((2400, 64)) * 2.0
    else:
        raise ValueError(f"data must be 'digits' or 'synthetic', got {data!r}")
    order = rng.permutation(len(labels))
    features, labels = features[order].astype(np.float64), labels[order].astype(np.int64)
    split = int(0.8 * len(labels))
    mean = features[:split].mean(axis=0)
    std = features[:split].std(axis=0) + 1e-6
    features = ((features - mean) / std).astype(np.float32)
    return features[:split], labels[:split], features[split:], labels[split:]


def make_model(seed: int, hidden: int = HIDDEN) -> Any:
    """The demo's MLP in PyTorch: 64 -> hidden -> hidden -> 10 with ReLU."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )


class _TorchTrainer:
    """The MLP in PyTorch, reduced by :func:`sparcomm.torch.DistributedOptimizer`."""

    def __init__(self, codec: Any, comm: Any, seed: int, lr: float, **options: Any) -> None:
        import torch

        from sparcomm.torch import DistributedOptimizer, broadcast_parameters

        self.torch = torch
        self.model = make_model(seed)
        broadcast_parameters(self.model.state_dict(), root_rank=0, comm=comm)
        self.optimizer = DistributedOptimizer(
            torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9),
            named_parameters=self.model.named_parameters(),
            codec=codec,
            comm=comm,
            **options,
        )
        self.loss = torch.nn.CrossEntropyLoss()

    def step(self, x: np.ndarray, y: np.ndarray) -> None:
        self.optimizer.zero_grad()
        self.loss(self.model(self.torch.from_numpy(x)), self.torch.from_numpy(y)).backward()
        self.optimizer.step()

    def bytes_sent(self) -> int:
        stats = self.optimizer.last_stats
        return stats.bytes_sent if stats is not None else 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(self.torch.from_numpy(x)).argmax(dim=1).numpy()

    def close(self) -> None:
        self.optimizer.close()


class _NumpyTrainer:
    """The same MLP in plain NumPy, reduced by :class:`sparcomm.reducer.GradientReducer`.

    Initialised like ``torch.nn.Linear`` (uniform in +-1/sqrt(fan_in)), trained by SGD with
    momentum 0.9 as ``torch.optim.SGD`` defines it.  The backward pass submits each
    gradient as soon as it is computed (last layer first), so the reducer's thread
    starts on full buckets while the earlier layers' gradients are being computed.
    """

    def __init__(self, codec: Any, comm: Any, seed: int, lr: float, **options: Any) -> None:
        from sparcomm.reducer import GradientReducer

        rng = np.random.default_rng(seed)
        widths = [64, HIDDEN, HIDDEN, 10]
        self.params: dict[str, np.ndarray] = {}
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            bound = 1.0 / np.sqrt(fan_in)
            self.params[f"{2 * i}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in))
            self.params[f"{2 * i}.bias"] = rng.uniform(-bound, bound, fan_out)
        for name, value in self.params.items():
            self.params[name] = value.astype(np.float32)
            comm.Bcast(self.params[name], root=0)
        self.momentum = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.lr = lr
        self.reducer = GradientReducer(codec, comm, **options)
        self.reducer.setup([(n, p.shape, p.dtype) for n, p in reversed(self.params.items())])

    def _forward(self, x: np.ndarray) -> list[np.ndarray]:
        activations = [x]
        for i in range(3):
            z = activations[-1] @ self.params[f"{2 * i}.weight"].T + self.params[f"{2 * i}.bias"]
            activations.append(np.maximum(z, 0.0) if i < 2 else z)
        return activations

    def step(self, x: np.ndarray, y: np.ndarray) -> None:
        activations = self._forward(x)
        logits = activations[-1]
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        delta = probabilities
        delta[np.arange(len(y)), y] -= 1.0
        delta /= len(y)  # d(mean cross-entropy)/d(logits)
        for i in (2, 1, 0):
            self.reducer.submit(f"{2 * i}.weight", delta.T @ activations[i])
            self.reducer.submit(f"{2 * i}.bias", delta.sum(axis=0))
            if i:
                delta = (delta @ self.params[f"{2 * i}.weight"]) * (activations[i] > 0)
        grads = self.reducer.wait()
        for name, param in self.params.items():
            buffer = self.momentum[name]
            buffer *= 0.9
            buffer += grads[name]
            param -= self.lr * buffer

    def bytes_sent(self) -> int:
        stats = self.reducer.last_stats
        return stats.bytes_sent if stats is not None else 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._forward(x)[-1].argmax(axis=1)

    def close(self) -> None:
        self.reducer.close()


def default_framework() -> str:
    """``"torch"`` when PyTorch is installed, else ``"numpy"``."""
    import importlib.util

    return "torch" if importlib.util.find_spec("torch") is not None else "numpy"


def train(
    codec: Any,
    *,
    comm: Any = None,
    framework: str | None = None,
    data: str = "digits",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 0.05,
    seed: int = 0,
    warmup_steps: int = 0,
    compression: str = "bucket",
    progress: Any = None,
) -> dict[str, Any]:
    """Train the demo MLP data-parallel on ``comm``; every rank returns the same summary.

    Each rank takes the training samples ``rank::size`` and, per step, a mini-batch of
    ``batch_size`` of them (the global batch is ``size * batch_size``), SGD with momentum
    0.9: through :func:`sparcomm.torch.DistributedOptimizer` (``framework="torch"``) or
    :class:`sparcomm.reducer.GradientReducer` on NumPy arrays (``"numpy"``).

    Returns
    -------
    dict
        ``accuracy`` (test, percent), ``bytes_per_step`` (mean bytes this rank sent per
        step, gathered as the maximum over ranks), ``seconds_per_step`` (median wall time
        of a training step, maximum over ranks), ``steps``, ``ranks``, ``framework``.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    framework = framework or default_framework()
    if framework not in ("torch", "numpy"):
        raise ValueError(f"framework must be 'torch' or 'numpy', got {framework!r}")
    rank, size = comm.Get_rank(), comm.Get_size()
    x_train, y_train, x_test, y_test = load_task(data, seed)
    x_local, y_local = x_train[rank::size], y_train[rank::size]
    trainer_cls = _TorchTrainer if framework == "torch" else _NumpyTrainer
    trainer = trainer_cls(codec, comm, seed, lr, warmup_steps=warmup_steps, compression=compression)
    # Every rank runs the same number of steps per epoch: the smallest shard decides.
    steps_per_epoch = (len(y_train) // size) // batch_size
    rng = np.random.default_rng(seed + 1000 * rank)
    step_seconds, step_bytes = [], []
    try:
        for _ in range(epochs):
            order = rng.permutation(len(y_local))
            for step in range(steps_per_epoch):
                batch = order[step * batch_size : (step + 1) * batch_size]
                start = time.perf_counter()
                trainer.step(x_local[batch], y_local[batch])
                step_seconds.append(time.perf_counter() - start)
                step_bytes.append(trainer.bytes_sent())
            if progress is not None:
                progress()
        accuracy = 100.0 * float((trainer.predict(x_test) == y_test).mean())
    finally:
        trainer.close()
    # Skip the first epoch's steps in the timing: they include the cost model's one-off
    # calibration and the kernels' first compilation.
    timed = step_seconds[steps_per_epoch:] or step_seconds
    summary = {
        "accuracy": accuracy,
        "bytes_per_step": comm.allreduce(float(np.mean(step_bytes)), op=MPI.MAX),
        "seconds_per_step": comm.allreduce(float(np.median(timed)), op=MPI.MAX),
        "steps": len(step_seconds),
        "ranks": size,
        "framework": framework,
    }
    accuracies = comm.allgather(accuracy)
    if len(set(accuracies)) != 1:
        raise RuntimeError(f"ranks ended with different models: test accuracies {accuracies}")
    return summary


def _format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'codec':<14} {'accuracy %':>10} {'bytes/step':>12} {'vs dense':>9} {'ms/step':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['codec']:<14} not available: {row['error']}")
            continue
        lines.append(
            f"{row['codec']:<14} {row['accuracy']:>10.2f} {row['bytes_per_step']:>12,.0f} "
            f"{row['ratio']:>8.1f}x {1e3 * row['seconds_per_step']:>8.2f}"
        )
    return "\n".join(lines)


def run_ranks(args: argparse.Namespace) -> int:
    """The per-rank body of the demo: train every selected codec, rank 0 reports."""
    import os

    from mpi4py import MPI

    # The table compares each codec's bytes: keep the cost model's algorithms (auto's
    # measured choice may move a small tensor dense where that is faster on this
    # machine, sparcomm.comm._tune); every rank reads the same variable.  Set
    # SPARCOMM_TUNE=1 to let auto measure here too.
    os.environ.setdefault("SPARCOMM_TUNE", "0")
    comm = MPI.COMM_WORLD
    _register_runs()
    labels = args.codecs or list(RUNS)
    unknown = [label for label in labels if label not in RUNS]
    if unknown:
        raise ValueError(f"unknown codec {unknown}; choose from {list(RUNS)}")
    framework = args.framework or default_framework()
    rows: list[dict[str, Any]] = []
    bar = None
    if comm.Get_rank() == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(labels) * args.epochs, desc="demo", unit="epoch", file=sys.stderr)
    for label in labels:
        if bar is not None:
            bar.set_postfix_str(label)
        done_before = bar.n if bar is not None else 0
        try:
            result = train(
                RUNS[label](),
                comm=comm,
                data=args.data,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                warmup_steps=args.warmup_steps,
                compression=args.compression,
                framework=framework,
                progress=bar.update if bar is not None else None,
            )
        except NotImplementedError as error:
            # A codec whose collective does not exist yet: reported, not hidden.
            rows.append({"codec": label, "error": str(error).splitlines()[0]})
            if bar is not None:
                bar.update(args.epochs - (bar.n - done_before))
            continue
        rows.append({"codec": label, **result})
    if bar is not None:
        bar.close()
    dense = next((row for row in rows if row["codec"] == "dense" and "error" not in row), None)
    for row in rows:
        if "error" not in row:
            row["ratio"] = (
                dense["bytes_per_step"] / row["bytes_per_step"]
                if dense and row["bytes_per_step"]
                else float("nan")
            )
    if comm.Get_rank() == 0:
        if args.json:
            report = {
                "ranks": comm.Get_size(),
                "data": args.data,
                "framework": framework,
                "epochs": args.epochs,
                "runs": rows,
            }
            print(json.dumps(report, indent=2))
        else:
            print(
                f"sparcomm demo: {args.data}, MLP 64-{HIDDEN}-{HIDDEN}-10 ({framework}), "
                f"{comm.Get_size()} ranks, {args.epochs} epochs, batch {args.batch_size} per rank"
            )
            print(_format_table(rows))
            if dense is not None:
                from sparcomm.predict import network_outlook

                shapes = [(HIDDEN, 64), (HIDDEN,), (HIDDEN, HIDDEN), (HIDDEN,), (10, HIDDEN), (10,)]
                print(
                    network_outlook(
                        shapes,
                        comm.Get_size(),
                        compute_s=dense["seconds_per_step"],
                        batch=args.batch_size,
                    )
                )
                print(
                    "These ranks share one machine's memory, where communication is nearly "
                    "free: this run cannot show a network's effect (compute is taken as the "
                    "dense step here); measure it with sparcomm bench train --emulate 1gbit."
                )
    return 0


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-np",
        "-n",
        dest="nprocs",
        type=int,
        default=4,
        metavar="N",
        help="number of ranks (default 4)",
    )
    parser.add_argument("--data", choices=["digits", "synthetic"], default="digits")
    parser.add_argument(
        "--framework",
        choices=["torch", "numpy"],
        default=None,
        help="PyTorch DistributedOptimizer or NumPy GradientReducer (default: torch if installed)",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warmup-steps", type=int, default=0, help="dense steps before compression starts"
    )
    parser.add_argument(
        "--compression",
        choices=["layer", "bucket"],
        default="bucket",
        help="compress each tensor, or each fused bucket (default: fewer collectives)",
    )
    parser.add_argument(
        "--codecs",
        nargs="+",
        metavar="NAME",
        help="subset of the codec presets tagged demo: dense topk-0.01+ef qsgd4 terngrad onebit",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--timeout", type=float, default=None, help="kill the job after this many seconds"
    )


def _forwarded(args: argparse.Namespace) -> list[str]:
    argv = [
        "--data",
        args.data,
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        "--warmup-steps",
        str(args.warmup_steps),
        "--compression",
        args.compression,
    ]
    if args.framework:
        argv += ["--framework", args.framework]
    if args.codecs:
        argv += ["--codecs", *args.codecs]
    if args.json:
        argv.append("--json")
    if args.no_progress:
        argv.append("--no-progress")
    return argv


@command("demo", help="train a small MLP on N local ranks, dense and with every codec")
@arguments(_configure)
def demo(args: argparse.Namespace) -> int:
    from sparcomm._launch import launch

    _register_runs()
    unknown = [label for label in args.codecs or [] if label not in RUNS]
    if unknown:
        print(f"sparcomm demo: unknown codec {unknown}; choose from {list(RUNS)}", file=sys.stderr)
        return 2
    if args.framework == "torch" and default_framework() != "torch":
        print("--framework torch needs PyTorch: pip install 'sparcomm[torch]'", file=sys.stderr)
        return 2

    command_line = [sys.executable, "-m", "sparcomm.demo", *_forwarded(args)]
    return launch(args.nprocs, command_line, timeout=args.timeout)


def main(argv: list[str] | None = None) -> int:
    """Per-rank entry point: ``python -m sparcomm.demo [options]`` under mpiexec."""
    parser = argparse.ArgumentParser(prog="python -m sparcomm.demo")
    _configure(parser)
    return run_ranks(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
