"""A PyTorch DDP communication hook that reduces DDP's buckets with sparcomm.

``model.register_comm_hook(DDPCommState(codec=...), ddp_comm_hook)`` keeps everything
DDP does (bucketing, overlap of communication with the backward pass, ``no_sync``,
unused-parameter detection) and replaces only the allreduce of each bucket: the bucket
goes through a sparcomm codec and a sparcomm collective over an MPI communicator whose
ranks are the DDP process group's ranks.

The hook follows the shape of PyTorch's PowerSGD hook (Vogels, Karimireddy, Jaggi,
NeurIPS 2019; ``torch/distributed/algorithms/ddp_comm_hooks/powerSGD_hook.py``): a
stateless function of ``(state, bucket)``, all changing state in one object.

This module imports torch; ``import sparcomm`` never imports it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed

from sparcomm._names import normalize_op

__all__ = ["DDPCommState", "ddp_comm_hook"]

logger = logging.getLogger(__name__)

_REDUCED_DTYPES = (torch.float32, torch.float64)
#: Gradients in these dtypes are reduced in float32 (the codecs compute in float32).
_WIDENED_DTYPES = (torch.float16, torch.bfloat16)
NON_FINITE_MODES = ("raise", "propagate")


@dataclass
class _Job:
    """One bucket handed from DDP's autograd thread to the reducing thread."""

    index: int
    is_last: bool
    buffer: torch.Tensor
    layout: tuple[tuple[int, int], ...]  # (id of the parameter, numel) in bucket order
    future: torch.futures.Future[torch.Tensor]


def _bucket_key(index: int) -> str:
    return f"ddp.bucket{index}"


class DDPCommState:
    """State of :func:`ddp_comm_hook`: hyper-parameters, internal state, statistics.

    Construct it on every rank, after ``torch.distributed.init_process_group`` (it
    checks that the MPI communicator and the DDP process group hold the same ranks in
    the same order) and register it with ``ddp_model.register_comm_hook(state,
    ddp_comm_hook)``.

    Parameters
    ----------
    codec : Codec or ErrorFeedback, optional
        How buckets travel (default ``NoCompression()``: MPI's dense allreduce, the
        same result as DDP without a hook).  ``ErrorFeedback(TopK(density=0.01))`` keeps
        one residual per bucket (keyed by ``bucket.index()``).
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.  The state works on a duplicate (``comm.Dup()``:
        collective).  Its ranks must be the process group's ranks, in the same order.
    process_group : torch.distributed.ProcessGroup, optional
        The group DDP reduces over (default: the default group), checked against
        ``comm``.
    op : {"mean", "sum"} or sparcomm.torch.Average / Sum
        ``"mean"`` (DDP's behaviour) multiplies each bucket by ``1 / world size`` before
        the sum, as DDP does without a hook, so the dense codec gives DDP's bits.
    dense_below : int
        Buckets with fewer elements are reduced dense.
    warmup_iterations : int
        Iterations reduced dense before the codec starts (PowerSGD's
        ``start_powerSGD_iter``).  Not needed for DDP's bucket rebuild: residuals are
        carried over to the rebuilt buckets parameter by parameter.
    threaded : bool
        Reduce buckets on a background thread (the backward pass goes on computing
        the next buckets meanwhile) and return a future that the thread completes; or
        reduce inside the hook and return a completed future.  Needs
        ``MPI_THREAD_MULTIPLE`` (mpi4py's default); without it the state reduces inside
        the hook and logs a warning.
    non_finite : {"raise", "propagate"}
        What a non-finite gradient on any rank does.  ``"raise"``: the collective's error
        on every rank (DDP's backward raises); at the iteration's last bucket every
        rank's residuals are restored to their state before the iteration (the buckets
        reduced before the failure moved mass into sums DDP discards) and
        ``iteration`` does not advance.  ``"propagate"`` (for
        ``torch.amp.GradScaler``): every rank's reduced buckets of that iteration are
        filled with NaN, so the scaler skips the step on every rank and backs off, and
        error-feedback residuals are restored to their state before the iteration.

    Attributes
    ----------
    iteration : int
        Iterations reduced so far (the random streams' step).
    skipped_iterations : int
        Iterations whose buckets were filled with NaN (``non_finite="propagate"``).
    buckets, compressed_buckets, bytes_sent, bytes_received : int
        Totals over all buckets reduced so far (this rank's view).
    seconds : float
        Wall time spent in the collectives.
    last_stats : AllreduceStats or None
        Statistics of the last bucket's collective.
    """

    def __init__(
        self,
        codec: Any = None,
        comm: Any = None,
        *,
        process_group: Any = None,
        op: Any = "mean",
        dense_below: int = 1024,
        warmup_iterations: int = 0,
        threaded: bool = True,
        non_finite: str = "raise",
    ) -> None:
        from sparcomm.codecs import Codec, NoCompression
        from sparcomm.feedback import ErrorFeedback, unwrap
        from sparcomm.reducer import _default_comm, thread_support_ok

        if codec is None:
            codec = NoCompression()
        if not isinstance(codec, (Codec, ErrorFeedback)):
            raise TypeError(
                f"codec must be a sparcomm codec or ErrorFeedback, got {type(codec).__name__}; "
                "for example codec=ErrorFeedback(TopK(density=0.01))"
            )
        if getattr(unwrap(codec)[0], "family", None) == "low-rank":
            # DDP hands the hook one flat bucket: there are no matrices left to factor.
            raise NotImplementedError(
                f"codec {unwrap(codec)[0]!r} is low-rank: a DDP bucket is one flat vector, so "
                "PowerSGD would send it dense; use sparcomm.torch.DistributedOptimizer("
                "codec=PowerSGD(...)) (which keeps each matrix) or torch's own powerSGD_hook"
            )
        for name, value in (("dense_below", dense_below), ("warmup_iterations", warmup_iterations)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if non_finite not in NON_FINITE_MODES:
            raise ValueError(f"non_finite must be one of {NON_FINITE_MODES}, got {non_finite!r}")
        # -- hyper-parameters
        self.codec: Any = codec
        self.op = normalize_op(op)
        self.dense_below = int(dense_below)
        self.warmup_iterations = int(warmup_iterations)
        self.non_finite = non_finite
        # -- internal state
        self._dense_codec = NoCompression()
        self._memory = unwrap(codec)[1]
        self._dense = isinstance(unwrap(codec)[0], NoCompression)
        self._comm = _default_comm(comm).Dup()
        self.world_size = self._comm.Get_size()
        try:
            _check_same_ranks(self._comm, process_group)
        except BaseException:
            self._comm.Free()
            raise
        self.threaded = bool(threaded)
        if self.threaded and not thread_support_ok():
            logger.warning(
                "sparcomm: MPI thread level below MPI_THREAD_MULTIPLE: the DDP hook reduces "
                "each bucket inside the hook, without overlap; initialise MPI with "
                "mpi4py.rc.thread_level = 'multiple' (the default)"
            )
            self.threaded = False
        self.iteration = 0
        self._layouts: dict[int, tuple[tuple[int, int], ...]] = {}
        # Residual pieces of buckets that DDP rebuilt, per parameter, waiting for the
        # new bucket that holds their parameter.
        self._orphans: dict[int, np.ndarray] = {}
        self._orphan_momenta: dict[int, np.ndarray] = {}  # DGC's velocities, likewise
        self._snapshot: Any = None
        self._measured: Any = None  # auto's measurements at the iteration's start
        self._iteration_non_finite = False
        self._iteration_failed = False
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        # -- statistics
        self.skipped_iterations = 0
        self.buckets = 0
        self.compressed_buckets = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.seconds = 0.0
        self.last_stats: Any = None

    def __repr__(self) -> str:
        return (
            f"DDPCommState(codec={self.codec!r}, op={self.op!r}, dense_below="
            f"{self.dense_below}, warmup_iterations={self.warmup_iterations}, threaded="
            f"{self.threaded}, non_finite={self.non_finite!r})"
        )

    @property
    def comm(self) -> Any:
        """The state's private duplicate of the communicator."""
        return self._comm

    # -- the hook's two halves -------------------------------------------------------------
    def _submit(self, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        if self._comm is None:
            raise RuntimeError("DDPCommState was closed; build a new one")
        buffer = bucket.buffer()
        if buffer.dtype not in _REDUCED_DTYPES + _WIDENED_DTYPES:
            raise TypeError(
                f"DDP bucket {bucket.index()} holds {buffer.dtype} gradients; the sparcomm "
                "hook reduces float32, float64, float16 and bfloat16"
            )
        if buffer.device.type != "cpu":
            raise NotImplementedError(
                f"the sparcomm DDP hook reduces CPU buckets, got one on {buffer.device}; "
                "use DistributedOptimizer for CUDA models, or DDP's own hooks"
            )
        layout = tuple((id(p), int(p.numel())) for p in bucket.parameters())
        job = _Job(bucket.index(), bucket.is_last(), buffer, layout, torch.futures.Future())
        if self.threaded:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="sparcomm-ddp-hook", daemon=True
                )
                self._thread.start()
            self._queue.put(job)
        else:
            self._run(job)
        return job.future

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._run(job)

    def _run(self, job: _Job) -> None:
        try:
            self._reduce(job)
        except BaseException as error:  # DDP raises it from backward on this rank
            job.future.set_exception(error)  # type: ignore[arg-type, unused-ignore]  # stub says Tensor
        else:
            job.future.set_result(job.buffer)

    def _reduce(self, job: _Job) -> None:
        """Steps of one bucket:

        1. at the first bucket of an iteration, remember the residuals (for a skip or a
           failure: by reference for the built-in codecs, no copy);
        2. carry residuals over to buckets that DDP rebuilt;
        3. widen fp16/bf16 to float32; for ``op="mean"`` multiply by 1/P (DDP's
           arithmetic without a hook);
        4. reduce (sum) with the codec's collective; on a non-finite gradient in
           ``"propagate"`` mode, agree across ranks and fill the bucket with NaN;
        5. write the result into DDP's buffer; at the last bucket of a skipped or
           failed iteration, restore the residuals (and, of a failed one, ``auto``'s
           measurements).

        A bucket that fails does so on every rank (the collective's agreement), so every
        rank restores at the same bucket.
        """
        if job.index == 0:
            self._iteration_non_finite = False
            self._iteration_failed = False
            if self._memory is not None:
                self._snapshot = self._memory.snapshot()
            # auto's measurements too, as GradientReducer's: the calls of a failed
            # iteration that succeeded leave no trace, so its retry runs the algorithms
            # that a run without the failure runs.
            self._measured = self._tuner().snapshot()
        try:
            if self._layouts.get(job.index) != job.layout:
                self._relayout(job.index, job.layout)
            buffer = job.buffer
            work = buffer if buffer.dtype in _REDUCED_DTYPES else buffer.float()
            if self.op == "mean" and self.world_size > 1:
                # DDP without a hook multiplies by the reciprocal (reducer.cpp,
                # mark_variable_ready_dense: at::mul_out(bucket_view, grad, 1. / div_factor)).
                work.mul_(1.0 / self.world_size)
            if self._iteration_non_finite:
                work.fill_(float("nan"))
            else:
                self._reduce_array(job, work.numpy())
            if work is not buffer:
                buffer.copy_(work)
        except BaseException:
            self._iteration_failed = True
            if job.is_last:
                self._end_iteration()
            raise
        if job.is_last:
            self._end_iteration()

    def _end_iteration(self) -> None:
        """After the last bucket: a skipped iteration counts and restores the residuals;
        a failed one restores them and does not count (its retry is the same step)."""
        if self._iteration_non_finite and not self._iteration_failed:
            self.skipped_iterations += 1
        if self._iteration_non_finite or self._iteration_failed:
            if self._snapshot is not None and self._memory is not None:
                self._memory.restore(self._snapshot)
        if self._iteration_failed and self._measured is not None:
            self._tuner().restore(self._measured)
        self._snapshot = self._measured = None
        if not self._iteration_failed:
            self.iteration += 1

    def _tuner(self) -> Any:
        from sparcomm.comm._context import comm_state
        from sparcomm.comm._tune import tuner_of

        return tuner_of(comm_state(self._comm))

    def _reduce_array(self, job: _Job, x: np.ndarray) -> None:
        from sparcomm.comm import AllreduceStats, allreduce

        compressed = (
            not self._dense
            and self.iteration >= self.warmup_iterations
            and x.size >= self.dense_below
        )
        codec = self.codec if compressed else self._dense_codec
        propagate = self.non_finite == "propagate"
        local_non_finite = propagate and not bool(np.isfinite(x).all())
        info = AllreduceStats()
        start = time.perf_counter()
        try:
            result = allreduce(
                x,
                codec=codec,
                comm=self._comm,
                op="sum",
                key=_bucket_key(job.index),
                step=self.iteration,
                stats=info,
            )
        except (TypeError, ValueError, NotImplementedError, RuntimeError):
            # Every rank raised; a non-finite gradient on any rank becomes a skipped step.
            if not (propagate and _any_rank(self._comm, local_non_finite)):
                raise
            self._iteration_non_finite = True
            x.fill(np.nan)
            return
        self.seconds += time.perf_counter() - start
        self.buckets += 1
        self.compressed_buckets += int(compressed)
        self.bytes_sent += info.bytes_sent
        self.bytes_received += info.bytes_received
        self.last_stats = info
        if propagate and not bool(np.isfinite(result).all()):
            # The dense path adds inf and NaN like any value: identical on every rank.
            self._iteration_non_finite = True
            x.fill(np.nan)
            return
        x[...] = result

    # -- DDP's bucket rebuild --------------------------------------------------------------
    def _relayout(self, index: int, layout: tuple[tuple[int, int], ...]) -> None:
        """Carry error-feedback residuals into a bucket whose parameters changed.

        DDP rebuilds its buckets once, after the first iteration, in the order the
        gradients became ready.  When bucket ``index`` changed, the buckets before it
        did not (buckets are checked in order), so the residuals of this bucket and all
        later ones are cut into their parameters' pieces, which the new buckets take up
        as they arrive: no residual mass is lost.  A snapshot of the iteration (for a
        skipped step) follows the same moves.
        """
        memory = self._memory
        # DGC keeps a velocity beside each residual: it moves the same way.
        from sparcomm.dgc import DGC

        dgc = memory if isinstance(memory, DGC) else None
        old = self._layouts.get(index)
        if old is not None:
            for other in sorted(i for i in self._layouts if i >= index):
                other_layout = self._layouts.pop(other)
                key = _bucket_key(other)
                residual = memory.residual(key) if memory is not None else None
                if memory is None or residual is None:
                    continue
                velocity = dgc.momentum_buffer(key) if dgc is not None else None
                for table, state in ((self._orphans, residual), (self._orphan_momenta, velocity)):
                    if state is None:
                        continue
                    state = state if isinstance(state, np.ndarray) else state.get()
                    offset = 0
                    for param, numel in other_layout:
                        table[param] = state[offset : offset + numel]
                        offset += numel
                memory.set_residual(key, None)
                if self._snapshot is not None:
                    _snapshot_set(self._snapshot, key, None)
        self._layouts[index] = layout
        pieces = [self._orphans.pop(param, None) for param, _ in layout]
        moving = [self._orphan_momenta.pop(param, None) for param, _ in layout]
        if memory is None or all(piece is None for piece in pieces):
            return
        residual = _joined(pieces, layout)
        velocity = None if all(v is None for v in moving) else _joined(moving, layout)
        key = _bucket_key(index)
        memory.set_residual(key, residual)
        if dgc is not None:
            dgc.set_momentum_buffer(key, velocity)
        if self._snapshot is not None:
            _snapshot_set(self._snapshot, key, residual, velocity)

    # -- end of life -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the reducing thread and free the duplicated communicator."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._comm is not None:
            self._comm.Free()
            self._comm = None

    def __enter__(self) -> DDPCommState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _joined(pieces: list[Any], layout: tuple[tuple[int, int], ...]) -> np.ndarray:
    """A rebuilt bucket's state from its parameters' pieces (zeros where none)."""
    dtype = next(piece.dtype for piece in pieces if piece is not None)
    return np.concatenate(
        [
            piece if piece is not None else np.zeros(numel, dtype=dtype)
            for piece, (_, numel) in zip(pieces, layout, strict=True)
        ]
    )


def _snapshot_set(snapshot: Any, key: Any, residual: Any, velocity: Any = None) -> None:
    """Make an iteration's snapshot follow a rebuilt bucket: ``key`` had ``residual``
    (None: nothing) and, under DGC, ``velocity`` (None: none), so a restore brings back
    the new layout's state."""
    from sparcomm.feedback import FeedbackSnapshot

    momenta = None
    if not isinstance(snapshot, FeedbackSnapshot):  # DGC's: (error feedback's, velocities)
        snapshot, momenta = snapshot
    if residual is None:
        snapshot.residuals.pop(key, None)
    else:
        snapshot.residuals[key] = residual.copy() if snapshot.copied else residual
    if momenta is not None:
        if velocity is None:
            momenta.pop(key, None)
        else:
            momenta[key] = velocity.copy() if snapshot.copied else velocity


def _any_rank(comm: Any, flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (collective)."""
    from mpi4py import MPI

    return bool(comm.allreduce(int(flag), op=MPI.MAX))


def _check_same_ranks(comm: Any, process_group: Any) -> None:
    """Raise on every rank unless ``comm`` and the DDP process group list the same ranks
    in the same order."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        group = process_group if process_group is not None else dist.group.WORLD
        mine = (dist.get_rank(group), dist.get_world_size(group))
    else:
        mine = (-1, -1)
    table = comm.allgather(mine)
    size = comm.Get_size()
    if any(entry == (-1, -1) for entry in table):
        missing = [rank for rank, entry in enumerate(table) if entry == (-1, -1)]
        raise RuntimeError(
            f"torch.distributed is not initialised on MPI ranks {missing}: call "
            "torch.distributed.init_process_group (and wrap the model in DDP) before "
            "building DDPCommState"
        )
    bad = [(rank, entry) for rank, entry in enumerate(table) if entry != (rank, size)]
    if bad:
        rank, (group_rank, group_size) = bad[0]
        raise ValueError(
            f"the MPI communicator and the DDP process group hold different ranks: MPI "
            f"rank {rank} of {size} is rank {group_rank} of {group_size} in the process "
            "group; launch with one MPI rank per DDP rank and pass rank=comm.Get_rank(), "
            "world_size=comm.Get_size() to init_process_group"
        )


def ddp_comm_hook(state: DDPCommState, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: reduce one gradient bucket with sparcomm.

    Register with ``ddp_model.register_comm_hook(state, ddp_comm_hook)``.

    Parameters
    ----------
    state : DDPCommState
        Codec, communicator, options and the per-bucket error-feedback residuals.
    bucket : torch.distributed.GradBucket
        DDP's flattened gradients of one bucket.

    Returns
    -------
    torch.futures.Future of torch.Tensor
        Completes with the reduced bucket (DDP's own buffer, written in place), the
        same on every rank.
    """
    if not isinstance(state, DDPCommState):
        raise TypeError(
            f"state must be a sparcomm.torch.DDPCommState, got {type(state).__name__}; "
            "register_comm_hook(DDPCommState(codec=...), ddp_comm_hook)"
        )
    return state._submit(bucket)


# DDP's register_comm_hook compares the annotations with the objects themselves
# (``from __future__ import annotations`` leaves strings).
ddp_comm_hook.__annotations__ = {
    "state": DDPCommState,
    "bucket": torch.distributed.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}
