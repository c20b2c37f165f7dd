"""``sparcomm bench train``: data-parallel training of every contender, side by side.

Every contender trains its own copy of the same model (same initialisation, same
batches, same optimizer: SGD with momentum) on N ranks in ONE job, interleaved in
round-robin blocks of ``--block`` steps, so that machine drift and other users' load hit
all of them alike.  Contenders (``--contenders`` filters them by id, globs allowed):

- ``local``: no communication at all, each rank trains alone (the compute floor of a
  step; its accuracy is the mean of the ranks' local models, each trained on a quarter
  of the data, and is not comparable);
- ``sparcomm-<codec>``: :func:`sparcomm.torch.DistributedOptimizer` with each codec of
  :mod:`sparcomm.codecs` (:func:`contender_specs` is the one place that lists them;
  TopK runs under ErrorFeedback, OneBit with its built-in error feedback);
- ``ddp``, ``ddp-fp16``, ``ddp-powersgd1``, ``ddp-powersgd4``: PyTorch
  ``DistributedDataParallel`` over gloo, plain, with ``fp16_compress_hook``, and with the
  PowerSGD hook at rank 1 and 4 (one DDP bucket: torch's PowerSGD hook hung on CPU gloo
  with several buckets).

Per contender it reports the median step time of the slowest rank and its split
(forward+backward, waiting in ``synchronize``, optimizer update; for sparcomm also the
collectives' own phases, run in the reducer's thread), bytes sent per rank per step
(sparcomm's payload count, and under ``--emulate`` the bytes the rank's interface
sent), test accuracy against steps and against wall time, the time to a target
accuracy and the accuracy at a fixed time budget, and the step time the predictor
(:mod:`sparcomm.predict`) expects (from what each contender computed as it ran: the
phases of sparcomm's collectives, and the work of DDP's hooks, timed in every step).

``--emulate RATE`` runs the ranks in an emulated cluster (:mod:`sparcomm._emulate`, root
only); without it the ranks use whatever network ``mpiexec`` gives them.

``python -m sparcomm._cli_bench_train --rank-main ...`` is the per-rank entry point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparcomm._contenders import (
    POWERSGD_BUCKET_MB,
    POWERSGD_START_ITER,
    ContenderSpec,
    select_contenders,
)
from sparcomm.cli import arguments, command

# -- phases of sparcomm's collectives ----------

#: AllreduceStats phase name -> the category of the benchmark's split.
PHASE_CATEGORY = {
    "prepare": "encode",
    "encode": "encode",
    "quantize": "encode",
    "scale": "encode",
    "stage": "encode",
    "densify_input": "encode",
    "orthogonalize": "encode",  # PowerSGD (sparcomm.comm._lowrank)
    "allreduce_p": "exchange",
    "allreduce_q": "exchange",
    "check": "check",
    "choose": "check",
    "allgather": "exchange",
    "reduce_scatter": "exchange",
    "exchange": "exchange",
    "allreduce": "exchange",
    "scale_allreduce": "exchange",
    "merge": "merge",
    "decode": "merge",
    "owner_sum": "merge",
    "integer_sum": "merge",
    "densify": "merge",
    "output": "write_back",
    # ReductionStats.phases' own categories (the reducer's split), and its fusion copies.
    "write_back": "write_back",
    "fuse": "fuse",
}
#: The benchmark's split of a step's reduction: ``fuse`` (the reducer's copies into its
#: fusion buffers), then the collectives' categories (sparcomm.comm._stats.CATEGORIES).
CATEGORIES = ("fuse", "encode", "check", "exchange", "merge", "write_back", "other")


class _PhaseRecorder:
    """Sums the per-call phases of sparcomm's collectives over a step.

    ``GradientReducer``'s stats carry the total time in collectives but not the phases
    of each call; until they do, the benchmark wraps ``sparcomm.comm.allreduce`` (which
    the reducer looks up on every call) to read each call's ``AllreduceStats.phases``.
    If the reducer's stats gain a ``phases`` field, that is used instead.
    """

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.calls = 0
        import sparcomm.comm as comm_module

        original = comm_module.allreduce
        if getattr(original, "_sparcomm_bench_wrapped", False):
            original = original.__wrapped__  # type: ignore[attr-defined]

        def allreduce(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            stats = kwargs.get("stats")
            if stats is not None:
                self.calls += 1
                for name, seconds in stats.phases.items():
                    self.current[name] = self.current.get(name, 0.0) + seconds
            return result

        allreduce._sparcomm_bench_wrapped = True  # type: ignore[attr-defined]
        allreduce.__wrapped__ = original  # type: ignore[attr-defined]
        comm_module.allreduce = allreduce

    def take(self, reducer_stats: Any) -> dict[str, float]:
        phases = getattr(reducer_stats, "phases", None) or self.current
        split = dict.fromkeys(CATEGORIES, 0.0)
        for name, seconds in phases.items():
            split[PHASE_CATEGORY.get(name, "other")] += seconds
        self.current = {}
        return split


class _HookTimer:
    """Times the work of DDP's communication hooks as they run in training.

    A hook returns at once with a chain of futures: its work runs in its body and in the
    callbacks of that chain, and the callbacks also wait for the hook's allreduces (torch's
    PowerSGD hook waits for P's and Q's inside them).  The hooks call
    ``torch.distributed.all_reduce`` by attribute on every call, so the benchmark wraps it
    (in the ranks' own processes): the futures the hooks get back run their callbacks
    under a clock, and time the waits inside them.  A step's hook compute is the wall time
    of the body and of every callback, less the waits inside them; the time between them,
    when the chain waits for an allreduce, is communication and is not counted.  Measured
    this way, step by step under the run's own load, it is what the predictor charges a
    DDP hook, as sparcomm's contenders are charged the phases their collectives reported.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self._lock = threading.Lock()
        self._local = threading.local()
        self.seconds = 0.0
        self.allreduces = 0
        original = dist.all_reduce
        if getattr(original, "_sparcomm_bench_wrapped", False):
            original = original.__wrapped__  # type: ignore[attr-defined, unused-ignore]

        def all_reduce(*args: Any, **kwargs: Any) -> Any:
            work = original(*args, **kwargs)
            if work is None:  # a synchronous call: nothing to chain
                return work
            with self._lock:
                self.allreduces += 1
            return _TimedWork(work, self)

        all_reduce._sparcomm_bench_wrapped = True  # type: ignore[attr-defined]
        all_reduce.__wrapped__ = original  # type: ignore[attr-defined]
        dist.all_reduce = all_reduce

    def wrap(self, hook: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """``hook`` timed; DDP gets the hook's own future back."""

        def timed_hook(state: Any, bucket: Any) -> Any:
            result = self.run(hook, state, bucket)
            return result.future if isinstance(result, _TimedFuture) else result

        timed_hook.__name__ = f"timed_{getattr(hook, '__name__', 'hook')}"
        # DDP checks a hook's annotations against torch's own classes; these are strings.
        timed_hook.__annotations__ = {}
        return timed_hook

    def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)``, its time less the waits inside it added to the step's.

        A callback that torch runs inline (its future already complete) is counted once,
        by the outermost call on its thread.
        """
        local = self._local
        depth = getattr(local, "depth", 0)
        waited = getattr(local, "waited", 0.0)
        local.depth = depth + 1
        start = time.perf_counter()
        try:
            return function(*args)
        finally:
            local.depth = depth
            if depth == 0:
                busy = time.perf_counter() - start - (getattr(local, "waited", 0.0) - waited)
                with self._lock:
                    self.seconds += max(0.0, busy)

    def wait(self, waitable: Any) -> Any:
        start = time.perf_counter()
        try:
            return waitable.wait()
        finally:
            self._local.waited = getattr(self._local, "waited", 0.0) + (time.perf_counter() - start)

    def take(self) -> float | None:
        """Seconds of hook compute since the last call; None if no hook allreduced (then
        the hooks' communication did not pass through the timer, and their time would be
        mixed with it)."""
        with self._lock:
            seconds, calls = self.seconds, self.allreduces
            self.seconds, self.allreduces = 0.0, 0
        return seconds if calls else None


class _TimedWork:
    """An allreduce's work handle whose future times its callbacks and waits."""

    def __init__(self, work: Any, timer: _HookTimer) -> None:
        self.work, self.timer = work, timer

    def get_future(self) -> _TimedFuture:
        return _TimedFuture(self.work.get_future(), self.timer)

    def wait(self, *args: Any) -> Any:
        return self.timer.wait(self.work) if not args else self.work.wait(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.work, name)


class _TimedFuture:
    """A ``torch.futures.Future`` whose ``then`` callbacks and ``wait`` are timed."""

    def __init__(self, future: Any, timer: _HookTimer) -> None:
        self.future, self.timer = future, timer

    def then(self, callback: Callable[[Any], Any]) -> _TimedFuture:
        timer = self.timer
        return _TimedFuture(self.future.then(lambda f: timer.run(callback, f)), timer)

    def wait(self) -> Any:
        return self.timer.wait(self.future)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.future, name)


# -- one rank ----------


def _wire_counter() -> Callable[[], int] | None:
    """Reads this rank's interface tx byte counter (the emulated cluster's ``sc0``)."""
    iface = os.environ.get("SPARCOMM_IFACE")
    if not iface:
        return None
    path = Path(f"/sys/class/net/{iface}/statistics/tx_bytes")
    if not path.exists():
        return None
    return lambda: int(path.read_text())


def _register_hook(
    ddp: Any, spec: ContenderSpec, group: Any, timer: _HookTimer | None = None
) -> None:
    """The contender's communication hook on ``ddp`` (none for plain DDP), timed by
    ``timer`` when given."""
    wrap = timer.wrap if timer is not None else (lambda hook: hook)
    if spec.hook == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(group, wrap(default_hooks.fp16_compress_hook))
    elif spec.hook == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        state = powerSGD_hook.PowerSGDState(
            process_group=group,
            matrix_approximation_rank=spec.powersgd_rank,
            # torch's default (1000 dense steps first) would hide the method in a short
            # run; 2 is the smallest that error feedback allows.
            start_powerSGD_iter=2,
            warm_start=True,
            use_error_feedback=True,
        )
        ddp.register_comm_hook(state, wrap(powerSGD_hook.powerSGD_hook))


class _Runner:
    """One contender on this rank: its model, optimizer and step."""

    def __init__(
        self,
        spec: ContenderSpec,
        task: Any,
        args: argparse.Namespace,
        comm: Any,
        hooks: _HookTimer | None = None,
    ):
        import torch

        self.spec = spec
        self.hooks = hooks if spec.hook is not None else None
        self.torch = torch
        model = task.model()
        self.module = model
        self.loss = torch.nn.CrossEntropyLoss()
        momentum = args.momentum if spec.momentum is None else spec.momentum
        make_sgd = lambda params: torch.optim.SGD(  # noqa: E731
            params, lr=args.lr, momentum=momentum
        )
        self.ddp: Any = None
        self.optimizer: Any
        if spec.kind == "local":
            self.forward = model
            self.optimizer = make_sgd(model.parameters())
        elif spec.kind == "sparcomm":
            from sparcomm.torch import DistributedOptimizer

            assert spec.codec is not None
            self.forward = model
            self.optimizer = DistributedOptimizer(
                make_sgd(model.parameters()),
                named_parameters=model.named_parameters(),
                codec=spec.codec(),
                comm=comm,
                # As torch's hook below (start_powerSGD_iter=2): the same dense steps first.
                warmup_steps=POWERSGD_START_ITER if spec.codec_name == "PowerSGD" else 0,
                **spec.optimizer_options(),
            )
        else:
            from torch.nn.parallel import DistributedDataParallel

            bucket = POWERSGD_BUCKET_MB if spec.hook == "powersgd" else args.ddp_bucket_mb
            self.ddp = DistributedDataParallel(model, bucket_cap_mb=bucket)
            _register_hook(self.ddp, spec, None, self.hooks)
            self.forward = self.ddp
            self.optimizer = make_sgd(self.ddp.parameters())

    def step(self, x: Any, y: Any, wire: Callable[[], int] | None, phases: Any) -> dict:
        perf = time.perf_counter
        sent = wire() if wire else 0
        if self.hooks is not None:
            self.hooks.take()  # nothing but this step's hook work
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = perf()
        self.optimizer.zero_grad()
        self.loss(self.forward(x), y).backward()
        t1 = perf()
        if self.spec.kind == "sparcomm":
            self.optimizer.synchronize()
            t2 = perf()
            with self.optimizer.skip_synchronize():
                self.optimizer.step()
        else:
            t2 = perf()
            self.optimizer.step()
        t3 = perf()
        record: dict[str, Any] = {
            "total": t3 - t0,
            # All of the rank's threads (reducer, MPI, torch): against "total", whether
            # a step is CPU-bound (ranks sharing cores) or waits on the network.
            "cpu": (cpu1 := resource.getrusage(resource.RUSAGE_SELF)).ru_utime
            + cpu1.ru_stime
            - cpu0.ru_utime
            - cpu0.ru_stime,
            "cpu_system": cpu1.ru_stime - cpu0.ru_stime,  # the kernel: TCP, page faults
            "page_faults": cpu1.ru_minflt - cpu0.ru_minflt,  # first touches of new memory
            "forward_backward": t1 - t0,
            "wait": t2 - t1,
            "update": t3 - t2,
            "wire_bytes": (wire() - sent) if wire else None,
        }
        if self.spec.kind == "sparcomm":
            stats = self.optimizer.last_stats
            record["payload_bytes"] = stats.bytes_sent
            record["collective_seconds"] = stats.seconds
            record["collectives"] = stats.buckets
            record["algorithms"] = list(stats.algorithms)
            record["phases"] = phases.take(stats)
        if self.hooks is not None:
            record["hook_compute"] = self.hooks.take()
        return record

    def evaluate(self, x: Any, y: Any) -> int:
        with self.torch.no_grad():
            correct = 0
            for start in range(0, len(y), 512):
                logits = self.module(x[start : start + 512])
                correct += int((logits.argmax(dim=1) == y[start : start + 512]).sum())
        return correct

    def checksum(self) -> float:
        with self.torch.no_grad():
            return float(sum(p.double().abs().sum() for p in self.module.parameters()))

    def close(self) -> None:
        if self.spec.kind == "sparcomm":
            self.optimizer.close()


def _init_gloo(comm: Any) -> None:
    import socket

    import torch.distributed as dist

    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        address, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    else:
        port_value = None
        if comm.Get_rank() == 0:
            with socket.socket() as probe:
                probe.bind(("", 0))
                port_value = probe.getsockname()[1]
        port = str(comm.bcast(port_value, root=0))
        address = os.environ.get("MASTER_ADDR") or comm.bcast(
            socket.gethostbyname(socket.gethostname()) if comm.Get_rank() == 0 else None, root=0
        )
        if comm.Get_size() > 1 and address.startswith("127.") and "MASTER_ADDR" not in os.environ:
            address = "127.0.0.1"
    os.environ.update(MASTER_ADDR=address, MASTER_PORT=port)
    dist.init_process_group(
        "gloo", rank=comm.Get_rank(), world_size=comm.Get_size(), init_method="env://"
    )


def _latency(comm: Any, repeats: int = 30) -> float:
    """Median seconds of an 8-byte Allreduce: the α of this network, as MPI sees it."""
    import numpy as np
    from mpi4py import MPI

    x = np.zeros(1)
    times = []
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, x)
        times.append(time.perf_counter() - start)
    return comm.allreduce(statistics.median(times), op=MPI.MAX)


def _median_seconds(function: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):  # PowerSGD's hook runs dense for its first 2 steps
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _hook_costs(specs: list[ContenderSpec], task: Any, batch: int) -> dict[str, float]:
    """Seconds per step that each DDP hook adds to a backward pass, on this rank alone.

    Each rank builds a one-rank process group (collective: every rank calls this) and
    times DDP's backward with the hook against the same backward without DDP: the hook's
    arithmetic (casts; PowerSGD's products, orthogonalisation and error feedback) and
    DDP's bucket copies, with no network in it.  All ranks measure at once, as they train.
    """
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    hooked = [s for s in specs if s.kind == "ddp"]
    if not hooked:
        return {}
    group, _ = dist.new_subgroups(group_size=1)
    x, y = task.batch(dist.get_rank(), 0, batch)
    loss = torch.nn.CrossEntropyLoss()

    def backward(model: Any) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad()
            loss(model(x), y).backward()

        return run

    base = _median_seconds(backward(task.model()), warmup=3)
    costs: dict[str, float] = {}
    for spec in hooked:
        bucket = POWERSGD_BUCKET_MB if spec.hook == "powersgd" else 25.0
        ddp = DistributedDataParallel(task.model(), process_group=group, bucket_cap_mb=bucket)
        _register_hook(ddp, spec, group)
        costs[spec.id] = max(0.0, _median_seconds(backward(ddp), warmup=3) - base)
    return costs


class _DDPOwnWork:
    """DDP's own work in a step (its bucket copies in and out, on a one-rank group: no
    network), timed once per round of blocks through the run, as the load moves.

    Every rank builds it (``new_subgroups`` is collective) and samples at the same
    moment, after each round: a backward pass of a bare model and of the same model under
    DDP.  :meth:`median` is what plain DDP adds per step, and what every DDP contender
    adds around its hook.
    """

    def __init__(self, task: Any, batch: int, bucket_mb: float) -> None:
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        group, _ = dist.new_subgroups(group_size=1)
        x, y = task.batch(dist.get_rank(), 0, batch)
        loss = torch.nn.CrossEntropyLoss()
        bare = task.model()
        ddp = DistributedDataParallel(task.model(), process_group=group, bucket_cap_mb=bucket_mb)

        def backward(model: Any) -> float:
            start = time.perf_counter()
            model.zero_grad()
            loss(model(x), y).backward()
            return time.perf_counter() - start

        self._backward = backward
        self._models = (bare, ddp)
        backward(bare), backward(ddp)  # first allocations
        self.samples: list[float] = []

    def sample(self) -> None:
        bare, ddp = self._models
        self.samples.append(self._backward(ddp) - self._backward(bare))

    def median(self) -> float | None:
        return max(0.0, statistics.median(self.samples)) if self.samples else None


def _calibrated(comm: Any) -> dict[str, Any]:
    """sparcomm's cost model calibrated on this network (its constants, or the error)."""
    import dataclasses

    try:
        from sparcomm.comm import calibrate

        return {"constants": dataclasses.asdict(calibrate(comm))}
    except Exception as error:  # reported in the results, never hidden
        return {"error": f"{type(error).__name__}: {error}"}


def run_ranks(args: argparse.Namespace) -> int:
    """The per-rank body: train every contender, interleaved; rank 0 writes the results."""
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    from sparcomm._train_tasks import make_task

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(args.threads_per_rank)
    specs = select_contenders(args.contenders)
    task = make_task(
        args.task, inputs=args.inputs, width=args.width, depth=args.depth, seed=args.seed
    )
    _init_gloo(comm)
    latency = _latency(comm)
    cost_model = _calibrated(comm)
    phases = _PhaseRecorder()
    hooks = _HookTimer()
    wire = _wire_counter()
    x_test, y_test = task.test_set(args.test_samples)
    x_test, y_test = x_test[rank::size], y_test[rank::size]
    runners = [_Runner(spec, task, args, comm, hooks) for spec in specs]
    ddp_own = (
        _DDPOwnWork(task, args.batch, args.ddp_bucket_mb)
        if any(s.kind == "ddp" for s in specs)
        else None
    )
    records: dict[str, list[list[dict]]] = {s.id: [] for s in specs}  # per step: per rank
    curves: dict[str, list[tuple[int, float]]] = {s.id: [] for s in specs}  # (step, accuracy)
    loads: list[float] = []
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps * len(specs), desc="bench train", unit="step", file=sys.stderr)

    def evaluate(runner: _Runner, step: int) -> None:
        correct = comm.allreduce(runner.evaluate(x_test, y_test), op=MPI.SUM)
        curves[runner.spec.id].append((step, 100.0 * correct / args.test_samples))

    for runner in runners:
        evaluate(runner, 0)
    done = 0
    order = list(range(len(runners)))
    while done < args.steps:
        block = min(args.block, args.steps - done)
        for runner in (runners[i] for i in order):
            mine = []
            for step in range(done, done + block):
                x, y = task.batch(rank, step, args.batch)
                comm.Barrier()  # every step starts together: its time is its own
                mine.append(runner.step(x, y, wire, phases))
                finished = step + 1
                if finished % args.eval_every == 0 or finished == args.steps:
                    evaluate(runner, finished)
            gathered = comm.gather(mine, root=0)
            if rank == 0:
                assert gathered is not None
                for i in range(block):
                    records[runner.spec.id].append([per_rank[i] for per_rank in gathered])
                if bar is not None:
                    bar.set_postfix_str(runner.spec.id)
                    bar.update(block)
        if ddp_own is not None:
            ddp_own.sample()
        if rank == 0:
            loads.append(os.getloadavg()[0])
        done += block
        order = order[1:] + order[:1]  # rotate: no contender always follows the same one
    if bar is not None:
        bar.close()
    checksums = {r.spec.id: comm.allgather(r.checksum()) for r in runners}
    for runner in runners:
        runner.close()
    # What DDP's hooks compute, measured apart from training on all ranks at once (the
    # same contention as a step): an input of the predictor (sparcomm's own collectives
    # report their phases).
    comm.Barrier()
    local_costs = {
        cid: comm.allreduce(t, op=MPI.MAX)
        for cid, t in _hook_costs(specs, task, args.batch).items()
    }
    own = ddp_own.median() if ddp_own is not None else None
    ddp_own_s = comm.allreduce(own, op=MPI.MAX) if own is not None else None
    dist.destroy_process_group()
    if rank == 0:
        result = {
            "ranks": size,
            "threads_per_rank": args.threads_per_rank,
            "latency_s": latency,
            "cost_model": cost_model,
            "local_costs_s": local_costs,
            "ddp_own_s": ddp_own_s,
            "loads_during": loads,
            "contenders": {},
        }
        for spec in specs:
            sums = checksums[spec.id]
            result["contenders"][spec.id] = {
                "label": spec.label,
                "kind": spec.kind,
                "steps": records[spec.id],
                "accuracy": curves[spec.id],
                "ranks_agree": spec.kind == "local" or len(set(sums)) == 1,
            }
        Path(args.result).write_text(json.dumps(result))
    return 0


# -- summary ----------


def _phase(record: dict[str, Any], category: str) -> float:
    """A step's seconds in one category of its collectives' phases; ``other`` is the time
    inside the collectives that no named phase covers (PowerSGD's products, for one)."""
    phases = record["phases"]
    if category != "other":
        return float(phases.get(category, 0.0))
    # The fusion copies run outside the collectives' calls (the reducer's own, or on the
    # caller's thread as gradients are submitted).
    named = sum(v for k, v in phases.items() if k not in ("other", "fuse"))
    return float(phases.get("other", 0.0)) + max(0.0, record["collective_seconds"] - named)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarise(
    raw: dict[str, Any],
    warmup: int,
    target: float | None,
    budget: float | None,
    target_step: int | None = None,
) -> dict:
    """From the ranks' per-step records: medians, splits, curves and time-to-accuracy.

    A step's time is its slowest rank's; its split is that rank's.  The first ``warmup``
    steps (compilation, calibration, first allocation) are left out of the medians, and
    count at the median on the wall-time axis (their one-off excess is reported as
    ``first_steps_extra_s``).  ``target`` defaults to the final accuracy of ``ddp`` (or of
    the first synchronous contender), or with ``target_step`` to its accuracy at that
    step (what dense reaches in a budget of that many steps); ``budget`` defaults to the
    shortest wall time of the synchronous contenders.
    """
    summary: dict[str, Any] = {}
    for cid, data in raw["contenders"].items():
        slowest = [max(per_rank, key=lambda r: r["total"]) for per_rank in data["steps"]]
        timed = slowest[warmup:] or slowest
        timed_steps = data["steps"][warmup:] or data["steps"]
        median_total = _median([r["total"] for r in timed])
        split = {
            key: _median([r[key] for r in timed]) for key in ("forward_backward", "wait", "update")
        }
        entry: dict[str, Any] = {
            "label": data["label"],
            "kind": data["kind"],
            "steps": len(slowest),
            "step_s": median_total,
            "step_iqr_s": _iqr([r["total"] for r in timed]),
            "split_s": split,
            # A rank's CPU seconds per step (all its threads), the mean over ranks; None
            # in a report from before it was recorded.
            **{
                name: _median([statistics.fmean(r[key] for r in step) for step in timed_steps])
                if all(key in r for step in timed_steps for r in step)
                else None
                for key, name in (
                    ("cpu", "cpu_s"),
                    ("cpu_system", "cpu_system_s"),
                    ("page_faults", "page_faults"),
                )
            },
            "first_steps_extra_s": sum(r["total"] for r in slowest[:warmup])
            - median_total * min(warmup, len(slowest)),
            "ranks_agree": data["ranks_agree"],
        }
        wires = [[r["wire_bytes"] for r in per_rank] for per_rank in data["steps"][warmup:]]
        if wires and wires[0][0] is not None:  # None: not counted (no --emulate)
            entry["wire_bytes"] = _median([float(max(w)) for w in wires])
        if data["kind"] == "sparcomm":
            entry["payload_bytes"] = _median(
                [float(max(r["payload_bytes"] for r in p)) for p in data["steps"][warmup:]]
            )
            entry["collective_s"] = _median([r["collective_seconds"] for r in timed])
            entry["collectives"] = timed[-1]["collectives"]
            entry["algorithms"] = timed[-1]["algorithms"]
            entry["phases_s"] = {c: _median([_phase(r, c) for r in timed]) for c in CATEGORIES}
        hook_compute = [r.get("hook_compute") for r in timed]
        if hook_compute and all(t is not None for t in hook_compute):
            # The slowest rank's, as the rest of the split: what its hook computed.
            entry["hook_compute_s"] = _median([float(t) for t in hook_compute])
        step_times = [median_total if i < warmup else r["total"] for i, r in enumerate(slowest)]
        elapsed = [0.0]
        for seconds in step_times:
            elapsed.append(elapsed[-1] + seconds)
        entry["curve"] = [
            {"step": step, "time_s": elapsed[step], "accuracy": acc}
            for step, acc in data["accuracy"]
        ]
        _count_bytes(entry, data["steps"])
        entry["final_accuracy"] = data["accuracy"][-1][1]
        summary[cid] = entry
    return apply_target(summary, target, budget, target_step)


def apply_target(
    summary: dict[str, Any],
    target: float | None,
    budget: float | None,
    target_step: int | None = None,
) -> dict[str, Any]:
    """Time, steps and accuracy against a target accuracy and a time budget, from each
    contender's curve (defaults as in :func:`summarise`)."""
    synchronous = [c for c, e in summary.items() if e["kind"] != "local"]
    reference = ("ddp" if "ddp" in summary else synchronous[0]) if synchronous else None
    if target is not None and target_step is not None:
        raise ValueError("give --target or --target-step, not both")
    if target_step is not None:
        if reference is None:
            raise ValueError("--target-step needs a synchronous contender (ddp, say)")
        points = [p for p in summary[reference]["curve"] if p["step"] == target_step]
        if not points:
            steps = [p["step"] for p in summary[reference]["curve"]]
            raise ValueError(
                f"--target-step {target_step}: {reference} was evaluated at steps {steps}; "
                "give one of them (a multiple of --eval-every up to --steps)"
            )
        target = points[0]["accuracy"]
    elif target is None and reference is not None:
        target = summary[reference]["final_accuracy"]
    if budget is None and synchronous:
        budget = min(summary[c]["curve"][-1]["time_s"] for c in synchronous)
    for entry in summary.values():
        reached = [p for p in entry["curve"] if target is not None and p["accuracy"] >= target]
        entry["time_to_target_s"] = reached[0]["time_s"] if reached else None
        entry["steps_to_target"] = reached[0]["step"] if reached else None
        within = [
            p for p in entry["curve"] if budget is not None and p["time_s"] <= budget * 1.0001
        ]
        entry["accuracy_at_budget"] = within[-1]["accuracy"] if within else None
    return {
        "target_accuracy": target,
        "target_step": target_step,
        "target_reference": reference,
        "budget_s": budget,
        "contenders": summary,
    }


def _count_bytes(entry: dict[str, Any], steps: list[list[dict[str, Any]]]) -> None:
    """Cumulative bytes sent per rank at each point of the curve, where every step
    counted them: on the interface under ``--emulate`` (``wire``), else sparcomm's payload
    count (``payload``); the busiest rank's, step by step, warm-up steps included (a
    schedule sends more early on).  Contenders without a count get the algorithm's
    (:func:`attach_bytes`)."""
    for key, source in (("wire_bytes", "wire"), ("payload_bytes", "payload")):
        if not steps or any(r.get(key) is None for per_rank in steps for r in per_rank):
            continue
        sent = [0.0]
        for per_rank in steps:
            sent.append(sent[-1] + max(float(r[key]) for r in per_rank))
        for point in entry["curve"]:
            point["bytes"] = sent[point["step"]]
        entry["bytes_source"] = source
        return


def attach_bytes(summary: dict[str, Any], *, shapes: list[tuple[int, ...]], ranks: int) -> None:
    """Bytes on every curve (see :func:`_count_bytes`; else the median step's count, else
    the algorithm's, :func:`sparcomm.predict.traffic`), and each contender's bytes sent per
    rank until the target accuracy (``bytes_to_target``)."""
    from sparcomm._contenders import contender_specs
    from sparcomm.predict import traffic

    specs = {s.id: s for s in contender_specs(everything=True)}
    target = summary.get("target_accuracy")
    for cid, entry in summary["contenders"].items():
        curve = entry["curve"]
        if curve and "bytes" not in curve[0]:
            per_step = entry.get("wire_bytes", entry.get("payload_bytes"))
            entry["bytes_source"] = "median step" if per_step is not None else "algorithm"
            if per_step is None:
                spec = specs.get(cid)
                codec = spec.codec() if spec is not None and spec.codec is not None else None
                try:
                    per_step = traffic(cid, shapes, ranks, codec=codec).bytes_sent
                except ValueError:  # a contender the model does not know
                    per_step, entry["bytes_source"] = None, None
            for point in curve:
                point["bytes"] = None if per_step is None else point["step"] * per_step
        reached = [
            p
            for p in curve
            if target is not None and p["accuracy"] >= target and p.get("bytes") is not None
        ]
        entry["bytes_to_target"] = reached[0]["bytes"] if reached else None


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return float("nan")
    q = statistics.quantiles(values, n=4)
    return float(q[2] - q[0])


def _predictor_costs(report: dict[str, Any]) -> dict[str, float]:
    """The costs timed apart from the steps that the predictor takes: the hooks' (at the
    end of the job), and DDP's own work timed through the run where a report has it
    (``ddp_own_s``, the median of one sample per round) instead of at the end."""
    costs = dict(report.get("local_costs_s") or {})
    if report.get("ddp_own_s") is not None:
        costs["ddp"] = report["ddp_own_s"]
    return costs


def attach_predictions(
    summary: dict[str, Any],
    *,
    rate_bps: float | None,
    latency_s: float,
    cost_model: dict[str, float] | None,
    ranks: int,
    local_costs: dict[str, float] | None = None,
    task: Any,
    batch: int,
) -> None:
    """Add ``predicted_step_s`` to every contender (see :func:`sparcomm.predict.from_benchmark`)."""
    from sparcomm.predict import from_benchmark

    if rate_bps is None or "local" not in summary["contenders"]:
        return
    predictions = from_benchmark(
        summary["contenders"],
        rate_bps=rate_bps,
        latency_s=latency_s,
        beta_allreduce=(cost_model or {}).get("beta_allreduce"),
        local_costs=local_costs,
        ranks=ranks,
        shapes=task.parameter_shapes(),
        batch=batch,
    )
    for cid, prediction in predictions.items():
        entry = summary["contenders"][cid]
        entry["predicted_step_s"] = prediction["step"].total
        entry["predicted_split_s"] = prediction["step"].as_dict()
        entry["predicted_bytes"] = prediction["traffic"].bytes_sent
        entry["crossover_bps"] = prediction["crossover_bps"]


# -- output ----------


def _fmt(value: float | None, scale: float = 1.0, spec: str = ".0f") -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return format(value * scale, spec)


def format_table(report: dict[str, Any]) -> str:
    """The terminal table of a report."""
    summary = report["summary"]
    contenders = summary["contenders"]
    floor = contenders.get("local", {}).get("step_s")
    lines = [
        f"sparcomm bench train: {report['model']} ({report['parameters'] / 1e6:.2f} M parameters), "
        f"{report['ranks']} ranks, batch {report['batch']} per rank, {report['steps']} steps",
        f"link: {report['link']}; measured {report['measured_rate']}; MPI latency "
        f"{report['latency_s'] * 1e6:.0f} us; load {report['load_text']}",
        f"target accuracy {_fmt(summary['target_accuracy'], 1, '.1f')} %{_target_origin(summary)}"
        f", budget {_fmt(summary['budget_s'], 1, '.1f')} s of steps",
    ]
    header = (
        f"{'contender':<32} {'step ms':>8} {'x floor':>7} {'pred ms':>8} {'fwd+bwd':>8} "
        f"{'wait':>7} {'update':>7} {'cpu':>6} {'sys':>5} {'fuse':>6} {'enc':>6} {'check':>6} "
        f"{'exch':>6} {'merge':>6} {'w-back':>6} {'other':>6} "
        f"{'MB sent':>8} {'acc %':>6} {'@budget':>7} {'t→target s':>10} {'MB→target':>9}"
    )
    lines += [header, "-" * len(header)]
    for entry in contenders.values():
        split = entry["split_s"]
        phases = entry.get("phases_s", {})
        sent = entry.get("wire_bytes", entry.get("payload_bytes"))
        ratio = entry["step_s"] / floor if floor else None
        lines.append(
            f"{entry['label']:<32.32} {_fmt(entry['step_s'], 1e3):>8} {_fmt(ratio, 1, '.2f'):>7} "
            f"{_fmt(entry.get('predicted_step_s'), 1e3):>8} "
            f"{_fmt(split['forward_backward'], 1e3):>8} {_fmt(split['wait'], 1e3):>7} "
            f"{_fmt(split['update'], 1e3):>7} {_fmt(entry.get('cpu_s'), 1e3):>6} "
            f"{_fmt(entry.get('cpu_system_s'), 1e3):>5} "
            + " ".join(f"{_fmt(phases.get(c), 1e3):>{6}}" for c in CATEGORIES)
            + f" {_fmt(sent, 1e-6, '.2f'):>8} {_fmt(entry['final_accuracy'], 1, '.1f'):>6} "
            f"{_fmt(entry['accuracy_at_budget'], 1, '.1f'):>7} "
            f"{_fmt(entry['time_to_target_s'], 1, '.1f'):>10} "
            f"{_fmt(entry.get('bytes_to_target'), 1e-6, '.0f'):>9}"
        )
    lines.append(
        "step ms: median of the slowest rank; cpu: a rank's CPU time per step (all its "
        "threads, mean of the ranks), sys of it in the kernel; fuse: the reducer's copies "
        "into fusion buffers; enc/check/exch/merge/w-back (the dense output): sparcomm's "
        "collectives "
        "(reducer thread, overlapping fwd+bwd); MB sent: per rank per step"
        + (" on the wire (TCP/IP included)" if report.get("wire_counted") else " (payload)")
        + "; MB→target: sent per rank until the target accuracy"
    )
    hooks = [
        f"{e['label']} {e['hook_compute_s'] * 1e3:.0f} ms"
        for e in contenders.values()
        if e.get("hook_compute_s") is not None
    ]
    if hooks:
        lines.append(
            "DDP hooks' own work per step, timed in training (inside fwd+bwd; the "
            "predictor adds DDP's own bucket work): " + ", ".join(hooks)
        )
    bad = [e["label"] for e in contenders.values() if not e["ranks_agree"]]
    if bad:
        lines.append(f"WARNING: ranks ended with different models in: {', '.join(bad)}")
    return "\n".join(lines)


def _crossover_text(entry: dict[str, Any]) -> str:
    from sparcomm._emulate import format_rate

    crossover = entry.get("crossover_bps")
    if crossover is None:
        return "-"
    if crossover == 0:
        return "never"
    return "always" if math.isinf(crossover) else format_rate(crossover)


def markdown_table(report: dict[str, Any]) -> str:
    """The report's main figures as a Markdown table (for docs)."""
    contenders = report["summary"]["contenders"]
    floor = contenders.get("local", {}).get("step_s")
    ddp = contenders.get("ddp", {}).get("step_s")
    rows = [
        "| contender | step ms | x floor | vs DDP | predicted ms | pred/meas | MB sent/rank | "
        f"acc % @{report['steps']} steps | acc % @budget | s to target | MB to target | "
        "pays below |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in contenders.values():
        step = entry["step_s"]
        predicted = entry.get("predicted_step_s")
        sent = entry.get("wire_bytes", entry.get("payload_bytes"))
        over_floor = step / floor if floor else None
        rows.append(
            f"| {entry['label']} | {_fmt(step, 1e3)} | {_fmt(over_floor, 1, '.2f')}"
            f" | {_fmt(step / ddp if ddp else None, 1, '.2f')} | {_fmt(predicted, 1e3)}"
            f" | {_fmt(predicted / step if predicted else None, 1, '.2f')}"
            f" | {_fmt(sent, 1e-6, '.2f')} | {_fmt(entry['final_accuracy'], 1, '.1f')}"
            f" | {_fmt(entry['accuracy_at_budget'], 1, '.1f')}"
            f" | {_fmt(entry['time_to_target_s'], 1, '.0f')}"
            f" | {_fmt(entry.get('bytes_to_target'), 1e-6, '.0f')} | {_crossover_text(entry)} |"
        )
    return "\n".join(rows)


def _target_origin(summary: dict[str, Any]) -> str:
    """Where the target accuracy came from, as the table's header says it."""
    if summary.get("target_step") is not None:
        return f" ({summary['target_reference']}'s at step {summary['target_step']})"
    return ""


def render_report(
    path: str,
    target: float | None = None,
    budget: float | None = None,
    target_step: int | None = None,
) -> dict[str, Any]:
    """A saved report, its predictions recomputed with this version of the predictor;
    its time to target and accuracy at budget recomputed from the curves when ``target``,
    ``budget`` or ``target_step`` is given."""
    from sparcomm._train_tasks import make_task

    report = json.loads(Path(path).read_text())
    if target is not None or budget is not None or target_step is not None:
        report["summary"] = apply_target(
            report["summary"]["contenders"], target, budget, target_step
        )
    for entry in report["summary"]["contenders"].values():
        phases = entry.get("phases_s")
        if phases is not None and not phases.get("other"):
            # Reports written before "other" was kept: the time inside the collectives
            # that no named phase covers, from the medians (approximately).
            named = sum(v for k, v in phases.items() if k != "other")
            phases["other"] = max(0.0, entry["collective_s"] - named)
    task_args = report.get("task_args") or {}
    task = make_task(report.get("task", "mlp"), **task_args)
    attach_bytes(report["summary"], shapes=task.parameter_shapes(), ranks=report["ranks"])
    attach_predictions(
        report["summary"],
        rate_bps=report["rate_bps"],
        latency_s=report["latency_s"],
        cost_model=(report.get("cost_model") or {}).get("constants"),
        ranks=report["ranks"],
        task=task,
        batch=report["batch"],
        local_costs=_predictor_costs(report),
    )
    # The measurements are the run's (``source``); the predictions and byte curves now
    # come from this version of the code.
    report["rendered_source"] = _source_version()
    return report


def plot_report(report: dict[str, Any], path: str) -> None:
    """Accuracy against wall time, steps and bytes sent, and step bars split by phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contenders = report["summary"]["contenders"]
    fig, grid = plt.subplots(2, 2, figsize=(16, 11))
    axes = [grid[0][0], grid[0][1], grid[1][0], grid[1][1]]
    palette = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]
    for number, entry in enumerate(contenders.values()):
        style = "--" if entry["kind"] == "ddp" else (":" if entry["kind"] == "local" else "-")
        color = palette[number % len(palette)]
        times = [p["time_s"] for p in entry["curve"]]
        steps = [p["step"] for p in entry["curve"]]
        accuracy = [p["accuracy"] for p in entry["curve"]]
        axes[0].plot(times, accuracy, style, marker=".", label=entry["label"], color=color)
        axes[1].plot(steps, accuracy, style, marker=".", label=entry["label"], color=color)
        # Bytes on a log axis: the first point (0 bytes) cannot be drawn there.
        sent = [
            (p["bytes"] / 1e6, p["accuracy"])
            for p in entry["curve"]
            if p.get("bytes") and entry["kind"] != "local"
        ]
        axes[3].plot(
            [b for b, _ in sent],
            [a for _, a in sent],
            style,
            marker=".",
            label=entry["label"],
            color=color,
        )
    target = report["summary"]["target_accuracy"]
    sources = sorted(
        {str(e.get("bytes_source")) for e in contenders.values() if e["kind"] != "local"}
    )
    for ax, xlabel in (
        (axes[0], "wall time of steps (s)"),
        (axes[1], "step"),
        (axes[3], f"MB sent per rank, cumulative (log; counted: {', '.join(sources)})"),
    ):
        if target is not None:
            ax.axhline(target, color="grey", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[3].set_xscale("log")
    axes[0].legend(fontsize=7)
    labels = list(contenders)
    bottoms = [0.0] * len(labels)
    parts = [
        ("forward+backward", lambda e: e["split_s"]["forward_backward"]),
        ("wait (synchronize)", lambda e: e["split_s"]["wait"]),
        ("update", lambda e: e["split_s"]["update"]),
    ]
    for name, get in parts:
        heights = [1e3 * get(contenders[c]) for c in labels]
        axes[2].barh(labels, heights, left=bottoms, label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    medians = [1e3 * contenders[c]["step_s"] for c in labels]
    axes[2].scatter(medians, labels, marker="|", color="k", s=200, label="median step")
    predicted = [1e3 * contenders[c].get("predicted_step_s", float("nan")) for c in labels]
    if any(math.isfinite(p) for p in predicted):  # none without a link rate (no --emulate)
        # (matplotlib's legend cannot place an all-NaN scatter: tight_layout raises.)
        axes[2].scatter(predicted, labels, marker="x", color="red", label="predicted")
    axes[2].set_xlabel("ms per step, slowest rank (DDP waits inside backward)")
    axes[2].legend(fontsize=7)
    axes[2].invert_yaxis()
    fig.suptitle(
        f"{report['model']}, {report['ranks']} ranks, batch {report['batch']}/rank; link "
        f"{report['link']} (measured {report['measured_rate']}); load {report['load_text']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the command ----------


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-np", "-n", dest="nprocs", type=int, default=4, metavar="N")
    parser.add_argument(
        "--emulate",
        metavar="RATE[,DELAY]",
        default=None,
        help="run in an emulated cluster (root): e.g. 1gbit, 100mbit, unshaped",
    )
    parser.add_argument("--task", choices=["mlp", "convnet"], default="mlp")
    parser.add_argument("--inputs", type=int, default=1024, help="MLP input features")
    parser.add_argument(
        "--width", type=int, default=None, help="MLP width (2048) or convnet channels (64)"
    )
    parser.add_argument("--depth", type=int, default=3, help="MLP hidden layers")
    parser.add_argument("--batch", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200, help="steps per contender")
    parser.add_argument("--block", type=int, default=10, help="steps per round-robin block")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of medians")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--test-samples", type=int, default=2048)
    parser.add_argument(
        "--contenders", nargs="+", metavar="ID", help="ids or globs (e.g. ddp* sparcomm-topk)"
    )
    parser.add_argument("--target", type=float, default=None, help="target accuracy, percent")
    parser.add_argument(
        "--target-step",
        type=int,
        default=None,
        metavar="N",
        help="target accuracy: ddp's at step N (dense's accuracy in a budget of N steps)",
    )
    parser.add_argument("--budget", type=float, default=None, help="time budget, seconds")
    parser.add_argument("--ddp-bucket-mb", type=float, default=25.0)
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the report here")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write the figure here")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--render",
        default=None,
        metavar="JSON",
        help="run nothing: print (and --plot) a saved report, predictions recomputed",
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the job")
    parser.add_argument(
        "--mpiexec-arg", action="append", default=[], metavar="ARG", help="(repeatable)"
    )


def _validate(args: argparse.Namespace) -> None:
    for name in ("nprocs", "steps", "block", "eval_every", "test_samples", "batch"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0 or args.warmup >= args.steps:
        raise ValueError(f"--warmup must be in [0, --steps), got {args.warmup}")
    if args.test_samples < args.nprocs:
        raise ValueError("--test-samples must be at least the number of ranks")
    select_contenders(args.contenders)
    if args.target is not None and args.target_step is not None:
        raise ValueError("give --target or --target-step, not both")
    if args.target_step is not None and (
        not 1 <= args.target_step <= args.steps or args.target_step % args.eval_every
    ):
        raise ValueError(
            f"--target-step must be a multiple of --eval-every ({args.eval_every}) in "
            f"[1, --steps={args.steps}], got {args.target_step}"
        )


def _rank_argv(args: argparse.Namespace, result: str) -> list[str]:
    argv = [sys.executable, "-m", "sparcomm._cli_bench_train", "--rank-main", "--result", result]
    for name in ("task", "inputs", "depth", "batch", "lr", "momentum", "seed", "steps", "block"):
        argv += [f"--{name}", str(getattr(args, name))]
    argv += ["--eval-every", str(args.eval_every), "--test-samples", str(args.test_samples)]
    argv += ["--threads-per-rank", str(args.threads_per_rank)]
    argv += ["--ddp-bucket-mb", str(args.ddp_bucket_mb)]
    if args.no_progress:
        argv.append("--no-progress")
    if args.width is not None:
        argv += ["--width", str(args.width)]
    if args.contenders:
        argv += ["--contenders", *args.contenders]
    return argv


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _run_job(command_line: list[str], env: dict[str, str], timeout: float) -> int:
    """Run the job in a session of its own; kill it on a timeout, an exception, or
    SIGTERM/SIGHUP (turned into SystemExit here, as the emulated cluster does, so that
    the ranks never outlive the command)."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for caught in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(caught) is signal.SIG_DFL:
                previous[caught] = signal.signal(caught, _stop)
    process = subprocess.Popen(command_line, env=env, start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"sparcomm bench train: job exceeded {timeout:g} s; killed", file=sys.stderr)
        return 124
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _source_version() -> str:
    """The checkout's commit, and whether the package differs from it (results move as
    the library does: every report names the code it measured)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "sparcomm", "kernels"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    changed = [line for line in dirty.stdout.splitlines() if line.strip()]
    return head.stdout.strip() + (f" + {len(changed)} uncommitted files" if changed else "")


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Launch the job (in an emulated cluster with ``--emulate``); return the report."""
    from sparcomm._emulate import EmulatedCluster, format_rate, parse_link
    from sparcomm._launch import find_mpiexec
    from sparcomm._train_tasks import make_task

    _validate(args)
    task = make_task(
        args.task, inputs=args.inputs, width=args.width, depth=args.depth, seed=args.seed
    )
    load_before = os.getloadavg()
    version = _source_version()
    env = dict(os.environ)
    for variable in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS"):
        env[variable] = str(args.threads_per_rank)
    # gloo warns once per connection that a namespace's peer has no hostname: noise.
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    with tempfile.TemporaryDirectory(prefix="sparcomm-bench-train-") as scratch:
        os.chmod(scratch, 0o777)
        result_path = os.path.join(scratch, "result.json")
        rank_command = _rank_argv(args, result_path)
        mpiexec = [find_mpiexec(), "-n", str(args.nprocs), *args.mpiexec_arg]
        rate: float | None = None
        if args.emulate is not None:
            link = parse_link(args.emulate)
            with EmulatedCluster(args.nprocs, link) as cluster:
                rate = cluster.measure_rate() if args.nprocs > 1 else None
                env.update(cluster.env())
                code = _run_job([*mpiexec, *cluster.wrap(rank_command)], env, args.timeout)
            link_text = str(link)
        else:
            code = _run_job([*mpiexec, *rank_command], env, args.timeout)
            link_text = "the ranks' own network (not emulated)"
        if code != 0 or not os.path.exists(result_path):
            raise RuntimeError(
                f"the benchmark job failed (exit status {code}); see its output above"
            )
        raw = json.loads(Path(result_path).read_text())
    load_after = os.getloadavg()
    summary = summarise(raw, args.warmup, args.target, args.budget, args.target_step)
    attach_bytes(summary, shapes=task.parameter_shapes(), ranks=args.nprocs)
    attach_predictions(
        summary,
        rate_bps=rate,
        latency_s=raw["latency_s"],
        cost_model=raw.get("cost_model", {}).get("constants"),
        local_costs=_predictor_costs(raw),
        ranks=args.nprocs,
        task=task,
        batch=args.batch,
    )
    loads = raw["loads_during"]
    report = {
        "command": "sparcomm " + shlex.join(sys.argv[1:]),
        "model": task.describe(),
        "task": args.task,
        "task_args": {
            "inputs": args.inputs,
            "width": args.width,
            "depth": args.depth,
            "seed": args.seed,
        },
        "parameters": sum(math.prod(shape) for shape in task.parameter_shapes()),
        "ranks": args.nprocs,
        "batch": args.batch,
        "steps": args.steps,
        "lr": args.lr,
        "momentum": args.momentum,
        "threads_per_rank": args.threads_per_rank,
        "link": link_text,
        "rate_bps": rate,
        "measured_rate": format_rate(rate) if rate else "not measured",
        "latency_s": raw["latency_s"],
        "cost_model": raw.get("cost_model"),
        "local_costs_s": raw.get("local_costs_s"),
        "ddp_own_s": raw.get("ddp_own_s"),
        "wire_counted": args.emulate is not None,
        "load_before": load_before,
        "load_after": load_after,
        "load_during": loads,
        "load_text": (
            f"{min(loads):.1f}-{max(loads):.1f} (1-min avg) on {os.cpu_count()} cores"
            if loads
            else "n/a"
        ),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "source": version,
        "summary": summary,
    }
    return report


@command("bench", "train", help="train every contender side by side: step time, bytes, accuracy")
@arguments(_configure)
def bench_train(args: argparse.Namespace) -> int:
    try:
        report = (
            render_report(args.render, args.target, args.budget, args.target_step)
            if args.render
            else run_benchmark(args)
        )
    except (ValueError, TypeError, PermissionError, FileNotFoundError, NotImplementedError) as e:
        print(f"sparcomm bench train: {e}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"sparcomm bench train: {error}", file=sys.stderr)
        return 1
    print(markdown_table(report) if args.markdown else format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot_report(report, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Per-rank entry point: ``python -m sparcomm._cli_bench_train --rank-main ...``."""
    parser = argparse.ArgumentParser(prog="python -m sparcomm._cli_bench_train")
    _configure(parser)
    parser.add_argument("--rank-main", action="store_true", required=True)
    parser.add_argument("--result", required=True)
    return run_ranks(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
