"""Framework-agnostic gradient reduction: tensor fusion, a compression policy, overlap
of communication with computation, and checkpointable state.

:class:`GradientReducer` is the engine behind :class:`sparcomm.torch.DistributedOptimizer`
and is usable on its own from any training loop that holds its gradients as NumPy (or
CuPy) arrays.  One step goes:

1. Gradients are *submitted* as they become ready (``submit(name, array)``), in any order.
2. They are grouped into fixed **fusion buckets** (Horovod's tensor fusion; PyTorch DDP's
   gradient buckets): consecutive tensors of one dtype and one treatment, up to
   ``fusion_threshold_bytes``, so many small tensors cost one collective, not many.
3. A background **progress thread** reduces each bucket with :func:`sparcomm.comm.allreduce`
   as soon as all its members have arrived, while the caller keeps computing (the
   backward pass goes on).  Buckets are reduced in their fixed order on every rank, so the
   collectives match across ranks whatever order the gradients arrive in.
4. ``wait()`` blocks until every bucket is reduced and returns the reduced arrays.

The **policy** decides what each tensor goes through: tensors with fewer than
``dense_below`` elements are reduced dense (biases and norms gain nothing from
compression and lose accuracy); during the first ``warmup_steps`` steps everything is
dense (the warm-up of DGC, Lin et al., ICLR 2018; PowerSGD, Vogels et al., NeurIPS 2019;
1-bit Adam, Tang et al., ICML 2021); ``compression="layer"`` compresses each tensor on
its own (per-layer top-k and residuals, one collective each) except tensors below
``layer_fuse_below`` elements, which fuse as in the other mode (a collective's
fixed cost would dwarf their few values); ``compression="bucket"`` compresses each fused
bucket as one vector (fewer, larger collectives).  Element-wise codecs (``FP16``,
:attr:`~sparcomm.codecs.Codec.is_elementwise`) fuse in either mode, as dense tensors do:
a fused bucket gives each element the bits it would get alone.

``codec=`` may be a :class:`~sparcomm.policy.CodecPolicy` that chooses a codec per
tensor (PowerSGD for matrices, TopK for embedding tables, ...): buckets never mix codecs,
and each codec keeps its own state.  ``schedule=`` (:mod:`sparcomm.schedule`) sets a
codec's compression level (TopK's density, PowerSGD's rank) at each step as a function
of the step counter, the same on every rank.

The plan (which tensor is in which bucket) is a pure function of the registered
``(name, shape, dtype)`` list and the options; it is checked to be identical on all ranks
when it is built, so a model that differs between ranks raises instead of hanging.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import sys
import threading
import time
import weakref
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparcomm._backend import array_module, is_cupy_array

logger = logging.getLogger(__name__)

#: Default fusion threshold: 25 MiB, PyTorch DDP's ``bucket_cap_mb`` (Horovod fuses up
#: to 64 MiB): a network's per-message latency is paid once per bucket, and a model's
#: gradients still form several buckets that overlap with the backward pass.
DEFAULT_FUSION_THRESHOLD_BYTES = 25 * 2**20
#: Tensors with fewer elements than this are reduced dense by default.
DEFAULT_DENSE_BELOW = 1024
#: In ``"layer"`` mode, compressed tensors with fewer elements than this are fused and
#: compressed together (as in ``"bucket"`` mode) instead of paying a collective each:
#: at 1 % density such a tensor sends under 700 values (a few KiB, tens of microseconds
#: at 1 Gbit/s), far less than one collective's fixed cost (its latency rounds and the
#: call itself, a millisecond or more on a network), while large tensors keep their
#: own top-k and residual.
DEFAULT_LAYER_FUSE_BELOW = 65536
#: Elements of the reductions that compile the kernels at set-up (GradientReducer._warm_up).
WARM_UP_ELEMENTS = 4096
_WARM_UP_KEY = "sparcomm.reducer.warm-up"
COMPRESSION_MODES = ("layer", "bucket")
OPS = ("sum", "mean")
_STATE_FORMAT = 1


@dataclass(frozen=True)
class _Slot:
    """One tensor's place in a bucket: ``offset`` and ``size`` in elements."""

    name: Hashable
    shape: tuple[int, ...]
    size: int
    offset: int


@dataclass(frozen=True)
class _Bucket:
    """A group of tensors reduced by one collective call."""

    index: int
    slots: tuple[_Slot, ...]
    dtype: np.dtype
    size: int
    compressed: bool
    #: Key of the collective: the tensor's name for a one-tensor bucket (so per-layer
    #: error-feedback residuals and random streams follow the parameter), otherwise a
    #: name made of the first and last member.
    key: Hashable
    #: ``"layer"`` mode's small tensors fused into one bucket: each is still compressed
    #: on its own (its own key), and they share one collective where the family allows.
    per_tensor: bool = False
    #: Index of the bucket's codec in the reducer's codecs (a policy's; 0 for one codec),
    #: -1 for a dense bucket.
    codec: int = 0


@dataclass(frozen=True)
class _Plan:
    buckets: tuple[_Bucket, ...]
    #: name -> (bucket index, slot)
    lookup: Mapping[Hashable, tuple[int, _Slot]]


@dataclass
class ReductionStats:
    """What one step of reduction did, summed over its buckets (this rank's view).

    Attributes
    ----------
    step : int
        The step these figures belong to.
    buckets : int
        Number of collective calls.
    compressed_buckets : int
        How many of them went through the codec (the rest were dense).
    elements : int
        Gradient elements reduced.
    bytes_sent, bytes_received : int
        Bytes this rank sent and received, as reported by the collectives.
    seconds : float
        Wall time spent inside the collective calls.
    algorithms : list of str
        Algorithm each bucket's collective chose, in bucket order.
    phases : dict of str to float
        Seconds of the reduction's work by phase, summed over the buckets: ``fuse``
        (copying tensors into fusion buffers), then the collectives' phases by category
        (:data:`sparcomm.comm._stats.CATEGORIES`): ``encode`` (compression, error
        feedback), ``check`` (agreement, choice of algorithm), ``exchange`` (inside MPI,
        waiting for the slowest rank included), ``merge`` (sums, decodes), ``write_back``
        (the dense output) and ``other``.  They run on the progress thread, overlapped
        with the caller's backward pass; they add up to about ``seconds`` plus ``fuse``.
    wait_seconds : float
        Time the caller spent blocked in :meth:`GradientReducer.wait`: the part of the
        reduction the backward pass did not hide (all of it with ``overlap=False``).
    levels : dict of str to float or int
        The compression level each codec used this step, by its parameter
        (``{"density": 0.25}``; with a policy ``"<label>.<parameter>"``, e.g.
        ``{"default.density": 0.25, "matrices.rank": 4}``); empty during warm-up.
    """

    step: int = 0
    buckets: int = 0
    compressed_buckets: int = 0
    elements: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    algorithms: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=lambda: _empty_phases())
    wait_seconds: float = 0.0
    levels: dict[str, Any] = field(default_factory=dict)


def _empty_phases() -> dict[str, float]:
    from sparcomm.comm._stats import CATEGORIES  # sparcomm.comm imports mpi4py: lazily

    return dict.fromkeys(("fuse", *CATEGORIES), 0.0)


def _fused_key(slots: Sequence[_Slot]) -> Hashable:
    if len(slots) == 1:
        return slots[0].name
    return f"fused[{slots[0].name}..{slots[-1].name}]({len(slots)})"


def build_plan(
    specs: Sequence[tuple[Hashable, tuple[int, ...], np.dtype]],
    *,
    compress: bool,
    fusion_threshold_bytes: int,
    dense_below: int,
    compression: str,
    layer_fuse_below: int = DEFAULT_LAYER_FUSE_BELOW,
    choices: Sequence[int] | None = None,
    modes: Mapping[int, str] | None = None,
) -> _Plan:
    """Group tensors into fusion buckets (pure: the same on every rank for the same input).

    Tensors are taken in ``specs`` order (the order gradients are expected to become
    ready).  A dense tensor joins the open dense bucket of its dtype and a compressed one
    (in ``"bucket"`` mode) the open compressed bucket of its dtype; a bucket closes when
    the next tensor would take it past the threshold.  In ``"layer"`` mode every
    compressed tensor of at least ``layer_fuse_below`` elements is a bucket of its own,
    and the smaller ones fuse into compressed buckets as in ``"bucket"`` mode.  Buckets
    are numbered by the position of their last member: the order in which they can start.

    With a codec policy, ``choices`` gives each tensor's codec index (-1: dense) and
    ``modes`` the compression mode of each codec index (default ``compression``): tensors
    of different codecs never share a bucket.
    """
    GroupKey = tuple[int, np.dtype, bool]  # codec index (-1: dense), dtype, a layer of its own
    closed: list[tuple[GroupKey, list[tuple[Hashable, tuple[int, ...], int]]]] = []
    open_groups: dict[GroupKey, list[tuple[Hashable, tuple[int, ...], int]]] = {}
    open_bytes: dict[GroupKey, int] = {}

    def close(group_key: GroupKey) -> None:
        closed.append((group_key, open_groups.pop(group_key)))
        open_bytes.pop(group_key)

    if choices is not None and len(choices) != len(specs):
        raise ValueError(f"choices has {len(choices)} entries for {len(specs)} tensors")
    modes = dict(modes or {})
    for number, (name, shape, dtype) in enumerate(specs):
        size = int(np.prod(shape, dtype=np.int64))
        choice = 0 if choices is None else int(choices[number])
        compressed = compress and size >= dense_below and choice >= 0
        mode = modes.get(choice, compression)
        own = compressed and mode == "layer" and size >= layer_fuse_below
        group_key = (choice if compressed else -1, np.dtype(dtype), own)
        nbytes = size * group_key[1].itemsize
        if group_key in open_groups and (
            own or open_bytes[group_key] + nbytes > fusion_threshold_bytes
        ):
            close(group_key)
        open_groups.setdefault(group_key, []).append((name, shape, size))
        open_bytes[group_key] = open_bytes.get(group_key, 0) + nbytes
    for group_key in list(open_groups):
        close(group_key)
    # A bucket can start when its last member is ready: number them in that order.
    position = {name: i for i, (name, _, _) in enumerate(specs)}
    closed.sort(key=lambda item: position[item[1][-1][0]])
    buckets: list[_Bucket] = []
    for (choice, dtype, own), members in closed:
        slots, offset = [], 0
        for name, shape, size in members:
            slots.append(_Slot(name, shape, size, offset))
            offset += size
        compressed = choice >= 0
        per_tensor = compressed and modes.get(choice, compression) == "layer" and not own
        buckets.append(
            _Bucket(
                len(buckets),
                tuple(slots),
                dtype,
                offset,
                compressed,
                _fused_key(slots),
                per_tensor,
                choice,
            )
        )
    lookup = {slot.name: (bucket.index, slot) for bucket in buckets for slot in bucket.slots}
    return _Plan(tuple(buckets), lookup)


def _is_dense_codec(codec: Any) -> bool:
    from sparcomm.feedback import unwrap

    return getattr(unwrap(codec)[0], "family", None) == "dense"


def _family(codec: Any) -> str | None:
    """The family of ``codec`` (under ErrorFeedback: of the codec it wraps)."""
    from sparcomm.feedback import unwrap

    return getattr(unwrap(codec)[0], "family", None)


def _is_low_rank(codec: Any) -> bool:
    """Whether ``codec`` is of the low-rank family (PowerSGD), reduced per bucket."""
    return getattr(codec, "family", None) == "low-rank"


def _is_elementwise(codec: Any) -> bool:
    """Whether ``codec`` is a bare stateless element-wise codec (``FP16``): fusing its
    tensors changes no element's result (:attr:`sparcomm.codecs.Codec.is_elementwise`),
    so they fuse into buckets whatever the compression mode.  Not under ErrorFeedback
    or DGC, whose residuals and random streams are keyed per tensor."""
    from sparcomm.feedback import unwrap

    bare, memory = unwrap(codec)
    return (
        bare is codec
        and memory is None
        and getattr(codec, "is_elementwise", False) is True
        and not getattr(codec, "is_stochastic", False)
    )


def _default_comm(comm: Any) -> Any:
    """``comm``, or ``MPI.COMM_WORLD`` for None; a TypeError for anything else."""
    from mpi4py import MPI

    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(
            f"comm must be an mpi4py.MPI.Comm, got {type(comm).__name__} {comm!r}; pass "
            "MPI.COMM_WORLD (the default) or a communicator made from it"
        )
    return comm


def thread_support_ok() -> bool:
    """True when MPI was initialised with ``MPI_THREAD_MULTIPLE``.

    The progress thread calls MPI while the caller may call MPI too, which only
    ``MPI_THREAD_MULTIPLE`` allows (mpi4py asks for it by default).
    """
    from mpi4py import MPI

    return MPI.Query_thread() >= MPI.THREAD_MULTIPLE


@dataclass
class _Filled:
    """A fused host bucket that ``submit`` fills as its gradients arrive."""

    buffer: Any
    #: NaN and Inf among the tensors copied so far; None once one was copied without
    #: counting (another dtype, a strided or overlapping array).
    non_finite: int | None = 0
    copied: int = 0


def _submitted_twice(name: Hashable, step: int) -> ValueError:
    return ValueError(
        f"gradient {name!r} submitted twice in step {step}; call wait() between steps"
    )


class _StepRun:
    """The mutable state of one step in flight (shared by the caller and the thread)."""

    def __init__(self, plan: _Plan, step: int) -> None:
        self.plan = plan
        self.step = step
        self.pending = [len(bucket.slots) for bucket in plan.buckets]
        self.inputs: dict[Hashable, Any] = {}
        #: Names whose input the caller gave up (``submit(..., in_place=True)``).
        self.in_place: set[Hashable] = set()
        self.outputs: dict[Hashable, Any] = {}
        self.condition = threading.Condition()
        self.done = threading.Event()
        self.cancelled = False
        self.error: BaseException | None = None
        self.stats = ReductionStats(step=step)
        #: This step's plan as the collectives' agreed layout (with the bucket index):
        #: after a bucket's first full signature check, its later steps check locally
        #: and carry the status with the data (sparcomm.comm._call.agreed_layout).
        self.layout: tuple[int, bool] = (0, False)
        #: The level of each codec this step (None: no level, or a dense step): part of
        #: a bucket's layout, as a new level changes the payload's size and codec text.
        self.levels: tuple[Any, ...] = ()
        self.device: Any = None  # the cupy.cuda.Device of CuPy gradients, else None
        self.ready: dict[Hashable, Any] = {}  # name -> CUDA event: the gradient is written
        #: Fused host buckets filled as their gradients arrive (``submit``), by index.
        self.fused: dict[int, _Filled] = {}
        #: Names whose submit is copying them into their bucket's fusion buffer.
        self.filling: set[Hashable] = set()

    def cancel(self) -> None:
        with self.condition:
            self.cancelled = True
            self.condition.notify_all()


# -- communicators ----------------------------------------------------------------------------
_DUPLICATES_KEYVAL: int | None = None


class _Duplicates:
    """The reducers' duplicates of one parent communicator, and the dropped ones to free.

    ``MPI_Comm_free`` is collective, and a dropped reducer is collected whenever each
    rank's garbage collector gets to it, not at the same point of the program on every
    rank.  So a dropped reducer's duplicate is not freed by its finalizer: once the
    reducer's thread has stopped using it, it is *parked* here under its number (the
    same on every rank: the duplicates of one parent are made by collective calls, in
    one order), and the next :class:`GradientReducer` built on the same parent, a
    collective point, frees the duplicates that every rank has parked.  Kept as an MPI
    attribute of the parent, so it lives as long as the parent does.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.made = 0  # duplicates made so far: the next one's number
        self.open = 0  # reducers built and neither closed nor dropped
        self.parked: dict[int, Any] = {}  # number -> duplicate of a dropped reducer

    @staticmethod
    def of(parent: Any) -> _Duplicates:
        global _DUPLICATES_KEYVAL
        from mpi4py import MPI

        if _DUPLICATES_KEYVAL is None:
            _DUPLICATES_KEYVAL = MPI.Comm.Create_keyval()
        found = parent.Get_attr(_DUPLICATES_KEYVAL)
        if not isinstance(found, _Duplicates):
            found = _Duplicates()
            parent.Set_attr(_DUPLICATES_KEYVAL, found)
        return found

    def free_parked(self, parent: Any) -> int:
        """Free the duplicates parked on every rank (collective on ``parent``); returns
        how many were freed."""
        with self.lock:
            mine = sorted(self.parked)
        everyone = parent.allgather(mine)
        agreed = sorted(set(everyone[0]).intersection(*everyone[1:]))
        for number in agreed:
            with self.lock:
                comm = self.parked.pop(number)
            comm.Free()
        return len(agreed)

    def duplicate(self, parent: Any) -> tuple[Any, int]:
        """A new duplicate of ``parent`` and its number (collective on ``parent``).

        Raises
        ------
        RuntimeError
            If MPI has no communicator left to give, with how many reducers hold one.
        """
        from mpi4py import MPI

        self.free_parked(parent)
        try:
            comm = parent.Dup()
        except MPI.Exception as error:
            with self.lock:
                parked = len(self.parked)
            reason = str(error).strip().splitlines()[-1].strip()
            raise RuntimeError(
                f"MPI could not create a communicator for a new GradientReducer ({reason}): "
                f"{self.open} GradientReducer(s) on this communicator are open and "
                f"{parked} dropped one(s) wait to be freed; each holds two communicators "
                "(its duplicate and the collectives' private one). Call close() on the "
                "reducers (and DistributedOptimizers) you no longer use, or build them in "
                "a with-block: with GradientReducer(...) as reducer: ..."
            ) from error
        with self.lock:
            number = self.made
            self.made += 1
            self.open += 1
        return comm, number

    def park(self, number: int, comm: Any) -> None:
        with self.lock:
            self.parked[number] = comm
            self.open -= 1

    def closed(self) -> None:
        with self.lock:
            self.open -= 1


# -- the work ---------------------------------------------------------------------------------
class _Engine:
    """What the progress thread works with: codec, communicator, fusion buffers, queue.

    Nothing here refers back to the :class:`GradientReducer`, so the thread does not keep
    a dropped reducer alive; the reducer's finalizer (:func:`_abandon`) stops the thread,
    which then parks the communicator for a collective free (see :class:`_Duplicates`).
    """

    def __init__(
        self, codecs: Sequence[Any], op: str, comm: Any, duplicates: _Duplicates, number: int
    ) -> None:
        from sparcomm.codecs import NoCompression

        #: The compressing codecs, by a bucket's ``codec`` index (one, or a policy's).
        self.codecs = tuple(codecs)
        #: What keeps each codec's state (its error-feedback memory, or PowerSGD
        #: itself), None for a stateless codec: a failed step restores it.
        self.state_holders = tuple(_state_holder(codec) for codec in self.codecs)
        self.dense_codec = NoCompression()
        self.op = op
        self.comm = comm
        self.duplicates = duplicates
        self.number = number
        self.fusion_buffers: dict[tuple[int, int], Any] = {}
        self.run: _StepRun | None = None
        self.queue: queue.Queue[_StepRun | None] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.abandoned = False

    def start_thread(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(
                target=self._progress_loop, name="sparcomm-reducer", daemon=True
            )
            self.thread.start()

    def stop_thread(self) -> None:
        """End the thread after the work it has; wait for it (unless called from it)."""
        thread = self.thread
        if thread is None:
            return
        self.queue.put(None)
        if thread is not threading.current_thread():
            thread.join()
        self.thread = None

    def park(self) -> None:
        self.duplicates.park(self.number, self.comm)

    def _progress_loop(self) -> None:
        while True:
            run = self.queue.get()
            if run is None:
                break
            self.reduce_all(run)
        if self.abandoned:
            self.park()  # the communicator is no longer in use: free it collectively later

    def reduce_all(self, run: _StepRun) -> None:
        # Before the step's first encode, on the thread that encodes: a step that fails
        # puts every codec's state back (see snapshot()).
        saved = self.snapshot() if any(b.compressed for b in run.plan.buckets) else None
        # auto's measurements too: the failed step's calls that succeeded leave no trace.
        from sparcomm.comm._context import comm_state
        from sparcomm.comm._tune import tuner_of

        tuner = tuner_of(comm_state(self.comm))
        measured = tuner.snapshot() if saved is not None else None
        try:
            for bucket in run.plan.buckets:
                with run.condition:
                    while run.pending[bucket.index] > 0 and not run.cancelled:
                        run.condition.wait()
                    if run.cancelled:
                        return
                self._reduce_bucket(run, bucket)
        except BaseException as error:  # handed to wait() on the caller's thread
            run.error = error
            if saved is not None:
                try:
                    self.restore(saved)
                    tuner.restore(measured)
                except BaseException as failure:  # the step's error is its __context__
                    run.error = failure
        finally:
            run.done.set()

    def snapshot(self) -> list[Any]:
        """A handle on every codec's state (error-feedback residuals, DGC's velocities,
        PowerSGD's residuals and warm-start ``Q``) for :meth:`restore`.

        A collective that fails raises on every rank, but only after the other ranks
        (and, in steady state, all of them) have encoded: their residuals have moved the
        encoded mass into a sum that is discarded, and the buckets reduced earlier in the
        step have committed theirs.  So the step as a whole is undone, on every rank
        alike.  The built-in codecs keep each key's previous state alive until its next
        encode, so the handle holds references: a dict per codec, no copy (an
        ErrorFeedback around a codec with neither ``residual_into`` nor a fused decode
        copies its residuals, see :meth:`~sparcomm.ErrorFeedback.snapshot`).
        """
        return [None if holder is None else holder.snapshot() for holder in self.state_holders]

    def restore(self, saved: list[Any]) -> None:
        """Put every codec's state back as :meth:`snapshot` found it."""
        for holder, handle in zip(self.state_holders, saved, strict=True):
            if holder is not None:
                holder.restore(handle)

    def _reduce_bucket(self, run: _StepRun, bucket: _Bucket) -> None:
        if run.device is None:
            self._reduce_bucket_here(run, bucket)
            return
        with run.device:
            stream = sys.modules["cupy"].cuda.get_current_stream()
            for slot in bucket.slots:
                event = run.ready.get(slot.name)
                if event is not None:
                    stream.wait_event(event)
            self._reduce_bucket_here(run, bucket)
            # The caller reads the outputs on its own stream after wait().
            stream.synchronize()

    def _reduce_bucket_here(self, run: _StepRun, bucket: _Bucket) -> None:
        codec = self.codecs[bucket.codec] if bucket.compressed else self.dense_codec
        if bucket.compressed and _is_low_rank(codec):
            self._reduce_low_rank(run, bucket, codec)
            return
        if bucket.per_tensor and len(bucket.slots) > 1:
            self._reduce_layers(run, bucket, codec)
            return
        if len(bucket.slots) == 1:
            slot = bucket.slots[0]
            x = run.inputs[slot.name]
            result = self._allreduce(run, bucket, codec, x, out=_given_up(run, slot.name, x))
            run.outputs[slot.name] = result.reshape(slot.shape)
            return
        buffer_key = (id(run.plan), bucket.index)
        filled = run.fused.get(bucket.index)
        prefilled = filled is not None and filled.copied == len(bucket.slots)
        if filled is not None and prefilled:
            # Filled by submit() as the gradients arrived.
            fused, non_finite = filled.buffer, filled.non_finite
        else:
            fused = self.fusion_buffer(run, bucket, array_module(run.inputs[bucket.slots[0].name]))
            non_finite = None
            start = time.perf_counter()
            for slot in bucket.slots:
                target = fused[slot.offset : slot.offset + slot.size].reshape(slot.shape)
                target[...] = run.inputs[slot.name]
            run.stats.phases["fuse"] += time.perf_counter() - start
        if prefilled and _is_dense_codec(codec):
            # The dense sum goes into the buffer itself (handed over below), and a buffer
            # counted finite while it was filled is not read again before it travels.
            from sparcomm.comm._dense import finite

            with finite(fused) if non_finite == 0 else contextlib.nullcontext():
                result = self._allreduce(run, bucket, codec, fused, out=fused)
        else:
            result = self._allreduce(run, bucket, codec, fused)
        if result is fused or getattr(result, "base", None) is fused:
            # The collective answered in place: hand this buffer to the caller and use a
            # fresh one next step, so returned views are never overwritten.
            del self.fusion_buffers[buffer_key]
        for slot in bucket.slots:
            run.outputs[slot.name] = result[slot.offset : slot.offset + slot.size].reshape(
                slot.shape
            )

    def fusion_buffer(self, run: _StepRun, bucket: _Bucket, xp: Any) -> Any:
        """The fusion buffer of ``bucket`` in this step's plan: one per bucket of each
        plan (warm-up and compressed plans differ), kept between steps unless handed to
        the caller."""
        buffer_key = (id(run.plan), bucket.index)
        fused = self.fusion_buffers.get(buffer_key)
        if fused is None or array_module(fused) is not xp:
            fused = xp.empty(bucket.size, dtype=bucket.dtype)
            self.fusion_buffers[buffer_key] = fused
        return fused

    def fills_on_submit(self, bucket: _Bucket) -> bool:
        """Whether ``submit`` copies a host gradient of ``bucket`` into its fusion buffer
        at once: a dense bucket of several tensors.

        Not FP16's fused buckets: filled this way at 1 Gbit/s (docs/benchmarks.md,
        issue 11, session 9) their step went from 432-434 to 473-477 ms, with ``auto``
        choosing ``reduce_scatter_allgather`` over ``pipelined`` for the last bucket;
        the dense buckets' step went from 663-675 to 655-658 ms."""
        if len(bucket.slots) < 2 or bucket.per_tensor:
            return False
        codec = self.codecs[bucket.codec] if bucket.compressed else self.dense_codec
        return _is_dense_codec(codec)

    def _reduce_layers(self, run: _StepRun, bucket: _Bucket, codec: Any) -> None:
        """Small tensors of ``"layer"`` mode: each compressed with its own key.  A sparse
        codec on NumPy gradients sends them in one collective (their streams concatenated);
        otherwise each takes its own, as large tensors do."""
        inputs = [run.inputs[slot.name] for slot in bucket.slots]
        if _family(codec) != "sparse" or not all(isinstance(x, np.ndarray) for x in inputs):
            for slot in bucket.slots:
                single = _Bucket(
                    0, (slot,), bucket.dtype, slot.size, True, slot.name, codec=bucket.codec
                )
                x = run.inputs[slot.name]
                out = _given_up(run, slot.name, x)
                result = self._allreduce(run, single, codec, x, bucket, out=out)
                run.outputs[slot.name] = result.reshape(slot.shape)
            return
        from sparcomm.comm import AllreduceStats
        from sparcomm.comm._call import agreed_layout
        from sparcomm.comm._sparse_allreduce import sparse_codec_allreduce_layers

        info = AllreduceStats()
        start = time.perf_counter()
        # A fresh buffer each step: the outputs are views of it, handed to the caller.
        flat = np.empty(bucket.size, dtype=bucket.dtype)
        with agreed_layout((*_layout_head(run, bucket), bucket.index)):
            sparse_codec_allreduce_layers(
                inputs,
                codec,
                [slot.name for slot in bucket.slots],
                comm=self.comm,
                op=self.op,
                step=run.step,
                stats=info,
                out=flat,
            )
        for slot in bucket.slots:
            run.outputs[slot.name] = flat[slot.offset : slot.offset + slot.size].reshape(slot.shape)
        self._account(run, bucket, info, start)

    def _reduce_low_rank(self, run: _StepRun, bucket: _Bucket, codec: Any) -> None:
        """PowerSGD: the bucket's tensors, each its own matrix keyed by its name, share
        one allreduce of their P factors and one of their Q factors."""
        from sparcomm.comm import AllreduceStats
        from sparcomm.comm._call import agreed_layout
        from sparcomm.comm._lowrank import powersgd_allreduce

        info = AllreduceStats()
        start = time.perf_counter()
        names = [slot.name for slot in bucket.slots]
        inputs = [run.inputs[name] for name in names]
        # An input given up by the caller takes its own result: no new array (whose first
        # touch would fault in fresh pages) per tensor and step.
        outs = [x if name in run.in_place else None for name, x in zip(names, inputs, strict=True)]
        # After the bucket's first full check, its calls check locally and the status
        # travels with the P factors (no round trip per step: sparcomm.comm._call).
        with agreed_layout((*_layout_head(run, bucket), bucket.index)):
            results = powersgd_allreduce(
                inputs, codec, names, self.comm, op=self.op, stats=info, outs=outs
            )
        run.outputs.update(zip(names, results, strict=True))
        self._account(run, bucket, info, start)

    def _allreduce(
        self,
        run: _StepRun,
        bucket: _Bucket,
        codec: Any,
        x: Any,
        parent: _Bucket | None = None,
        out: Any = None,
    ) -> Any:
        from sparcomm.comm import AllreduceStats, allreduce
        from sparcomm.comm._call import agreed_layout

        info = AllreduceStats()
        start = time.perf_counter()
        # A tensor of a fused bucket reduced alone: its layout is (bucket, its name).
        index = bucket.index if parent is None else (parent.index, bucket.key)
        layout = (*_layout_head(run, bucket), index)
        with agreed_layout(layout):
            result = allreduce(
                x,
                codec=codec,
                comm=self.comm,
                op=self.op,
                key=bucket.key,
                step=run.step,
                stats=info,
                out=out,
            )
        self._account(run, bucket, info, start)
        return result

    @staticmethod
    def _account(run: _StepRun, bucket: _Bucket, info: Any, start: float) -> None:
        """Add one collective's figures to the step's stats."""
        stats = run.stats
        stats.seconds += time.perf_counter() - start
        stats.buckets += 1
        stats.compressed_buckets += int(bucket.compressed)
        stats.elements += int(bucket.size)
        stats.bytes_sent += info.bytes_sent
        stats.bytes_received += info.bytes_received
        stats.algorithms.append(info.algorithm)
        for category, seconds in info.by_category().items():
            stats.phases[category] += seconds


def _given_up(run: _StepRun, name: Hashable, x: Any) -> Any:
    """``x`` itself as the output of its collective when the caller gave it up
    (``submit(..., in_place=True)``) and it is a writable C-contiguous NumPy array, else
    None (a new array).

    Every collective reads all of its input before it writes its output
    (tests/mpi/test_in_place_out.py), so the result can take the gradient's memory.  A
    new 40 MB output per step was freed at the next ``zero_grad`` and allocated again:
    measured, 4,200 page faults and 12 ms of kernel time per rank and step at 10.5 M
    parameters (docs/benchmarks.md, issue 11).  CuPy's memory pool has no such cost.
    """
    usable = isinstance(x, np.ndarray) and x.flags.writeable and x.flags.c_contiguous
    return x if usable and name in run.in_place else None


def _state_holder(codec: Any) -> Any:
    """The object whose ``snapshot()`` / ``restore()`` cover ``codec``'s state, or None."""
    from sparcomm.feedback import unwrap

    memory = unwrap(codec)[1]
    if memory is not None:
        return memory
    if callable(getattr(codec, "snapshot", None)) and callable(getattr(codec, "restore", None)):
        return codec  # keeps its state itself (PowerSGD)
    return None


def _layout_head(run: _StepRun, bucket: _Bucket) -> tuple[Any, ...]:
    """The agreed layout of a bucket's collective, before its index: the plan's (its
    generation, compressing or not), then the bucket's codec and that codec's level this
    step.  A new level (a schedule) is a new layout: its first call checks in full, as
    its payload size and codec parameters changed (sparcomm.comm._call)."""
    level = run.levels[bucket.codec] if bucket.compressed and run.levels else None
    return (*run.layout, bucket.codec, level)


def _abandon(engine: _Engine) -> None:
    """Finalizer of a reducer that was dropped (or left a with-block by an exception)
    without :meth:`GradientReducer.close`: cancel its step, end its thread, and park
    its communicator for the next collective free.  Never blocks and never calls MPI, as
    it may run at any point of the program, on any thread."""
    run = engine.run
    if run is not None:
        run.cancel()
    engine.abandoned = True
    thread = engine.thread
    if thread is not None and thread.is_alive():
        engine.queue.put(None)  # the thread parks the communicator when it ends
    else:
        engine.park()


class GradientReducer:
    """Reduce named gradient arrays across ranks with fusion, compression and overlap.

    Parameters
    ----------
    codec : Codec, ErrorFeedback or CodecPolicy, optional
        How compressed tensors travel (default: ``NoCompression()``, plain dense
        allreduce).  Wrap biased codecs (TopK, OneBit) in
        :class:`~sparcomm.ErrorFeedback`; its residuals are then part of
        :meth:`state_dict`.  A :class:`~sparcomm.CodecPolicy` chooses a codec per tensor
        (by name, shape, or the keywords ``matrices=`` and ``embeddings=``); each of its
        codecs keeps its own state, and a bucket holds tensors of one codec only.
    comm : mpi4py.MPI.Comm, optional
        Communicator (default ``MPI.COMM_WORLD``).  The reducer works on a duplicate
        (``comm.Dup()``, collective: construct the reducer on all ranks together) so its
        background collectives never interleave with the caller's own.
    op : {"mean", "sum"}
        Reduction across ranks.
    fusion_threshold_bytes : int
        Largest fused bucket in bytes (a single larger tensor still forms a bucket).
        0 disables fusion: one collective per tensor.
    dense_below : int
        Tensors with fewer elements than this are reduced dense, uncompressed.
    warmup_steps : int
        Number of initial steps reduced dense before compression starts.
    compression : {"layer", "bucket"}
        Compress each tensor separately (tensors below ``layer_fuse_below`` elements
        fuse into shared compressed buckets), or each fused bucket as one vector.
        Element-wise codecs (``FP16``) and PowerSGD fuse in either mode (FP16's buckets
        give the bits of its tensors reduced one by one).
    overlap : bool
        Reduce buckets in a background thread as they fill (needs
        ``MPI_THREAD_MULTIPLE``; without it the reducer logs a warning and reduces in
        :meth:`wait`, on the caller's thread).  ``False`` always reduces in :meth:`wait`.
    layer_fuse_below : int
        In ``"layer"`` mode, compressed tensors with fewer elements fuse into shared
        compressed buckets (default :data:`DEFAULT_LAYER_FUSE_BELOW`); 0: every
        compressed tensor is its own collective.
    schedule : Schedule, callable, or dict of str to Schedule, optional
        The codec's compression level at each step (:mod:`sparcomm.schedule`): at
        reduction step ``s`` (counted from 0, warm-up steps included) the level is
        ``schedule(s)``: TopK's density (``k`` for a TopK built with ``k``, rounded),
        PowerSGD's rank (rounded to the nearest int).  For example DGC's density warm-up
        ``Exponential(0.25, 0.01, 100)``.  With a policy, a schedule applies to every
        codec of the policy that takes its level; a dict keyed by parameter
        (``{"density": ..., "rank": ...}``) gives each kind its own, and one keyed by
        policy entry (``"default"``, ``"matrices"``, ``"embeddings"``, ``"rules[0]"``)
        one codec its own.  The level is a
        function of the step counter, so it is the same on every rank and resumes
        exactly from :meth:`state_dict`; :attr:`last_stats` reports it (``levels``).

    Raises
    ------
    TypeError
        For a codec, policy or schedule of the wrong type.
    ValueError
        For an option out of range, or a schedule whose levels the codec refuses.
    NotImplementedError
        For ``schedule=`` with codecs that take no level (QSGD, FP16, NoCompression...).
    RuntimeError
        If MPI has no communicator left for the reducer's duplicate (too many reducers
        left open): the message says how many are open.

    Notes
    -----
    Usage from a NumPy loop::

        with GradientReducer(codec=ErrorFeedback(TopK(density=0.01))) as reducer:
            grads = reducer.reduce({"w1": g1, "b1": gb1})    # dict in, dict out

    or, to overlap with computation, ``reducer.setup(specs)`` once, then per step
    ``reducer.submit(name, grad)`` as each gradient is ready and ``reducer.wait()``.

    :meth:`close` (collective) stops the progress thread and frees the duplicated
    communicator.  A reducer that is dropped without it is not leaked: its thread holds
    no reference to it, and once collected its thread ends and its communicator is
    freed at the next construction of a reducer on the same communicator (a collective
    point; ``MPI_Comm_free`` is collective) or at ``MPI_Finalize``.
    """

    def __init__(
        self,
        codec: Any = None,
        comm: Any = None,
        *,
        op: str = "mean",
        fusion_threshold_bytes: int = DEFAULT_FUSION_THRESHOLD_BYTES,
        dense_below: int = DEFAULT_DENSE_BELOW,
        warmup_steps: int = 0,
        compression: str = "layer",
        overlap: bool = True,
        layer_fuse_below: int = DEFAULT_LAYER_FUSE_BELOW,
        schedule: Any = None,
    ) -> None:
        from sparcomm._abort import install_abort_hook
        from sparcomm.codecs import Codec, NoCompression
        from sparcomm.dgc import check_setup
        from sparcomm.feedback import ErrorFeedback
        from sparcomm.policy import CodecPolicy

        self._closed = True  # until the communicator exists: close() has nothing to do
        if codec is None:
            codec = NoCompression()
        self._policy: CodecPolicy | None = None
        if isinstance(codec, CodecPolicy):
            self._policy = codec
            codecs: tuple[Any, ...] = codec.codecs
        elif isinstance(codec, (Codec, ErrorFeedback)):
            codecs = (codec,)
        else:
            raise TypeError(
                f"codec must be a sparcomm codec (TopK, QSGD, ...), ErrorFeedback or "
                f"CodecPolicy, got {type(codec).__name__}; for example "
                "codec=ErrorFeedback(TopK(density=0.01))"
            )
        # Levels change the codecs' reprs: the options are described as constructed.
        self._codec_text = repr(codec)
        self._schedules = _resolve_schedules(codecs, schedule, codec)
        self._levels: tuple[Any, ...] | None = None  # the last compressed step's
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if compression not in COMPRESSION_MODES:
            raise ValueError(f"compression must be one of {COMPRESSION_MODES}, got {compression!r}")
        for name, value in (
            ("fusion_threshold_bytes", fusion_threshold_bytes),
            ("dense_below", dense_below),
            ("warmup_steps", warmup_steps),
            ("layer_fuse_below", layer_fuse_below),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.fusion_threshold_bytes = int(fusion_threshold_bytes)
        self.dense_below = int(dense_below)
        self.warmup_steps = int(warmup_steps)
        self.layer_fuse_below = int(layer_fuse_below)
        self.compression = compression
        parent = _default_comm(comm)
        for each in codecs:  # DGC's clipping takes P from the communicator
            check_setup(each, comm=parent)
        install_abort_hook()  # from here on a rank that dies must not leave others hanging
        duplicates = _Duplicates.of(parent)
        duplicate, number = duplicates.duplicate(parent)
        self._engine = _Engine(codecs, op, duplicate, duplicates, number)
        self._closed = False
        self._finalizer = weakref.finalize(self, _abandon, self._engine)
        self.overlap = bool(overlap)
        if self.overlap and not thread_support_ok():
            from mpi4py import MPI

            logger.warning(
                "sparcomm: MPI thread level is %d, below MPI_THREAD_MULTIPLE (%d): gradient "
                "reduction will run in wait()/step() on the calling thread, without overlap "
                "with the backward pass; initialise MPI with mpi4py.rc.thread_level = "
                "'multiple' (the default) to enable it",
                MPI.Query_thread(),
                MPI.THREAD_MULTIPLE,
            )
            self.overlap = False
        self.step = 0
        self.last_stats: ReductionStats | None = None
        self._specs: list[tuple[Hashable, tuple[int, ...], np.dtype]] | None = None
        self._plans: dict[bool, _Plan] = {}
        self._plan_generation = 0  # counts setup() calls: a new plan is a new layout

    # -- set-up ---------------------------------------------------------------------------
    @property
    def comm(self) -> Any:
        """The reducer's private duplicate of the communicator."""
        return self._engine.comm

    @property
    def codec(self) -> Any:
        """The codec compressed tensors go through (or the :class:`~sparcomm.CodecPolicy`).

        With ``schedule=`` its level is set in place at each step: it shows the level of
        the last step."""
        return self._policy if self._policy is not None else self._engine.codecs[0]

    @property
    def codecs(self) -> tuple[Any, ...]:
        """The compressing codecs: the codec, or a policy's distinct codecs."""
        return self._engine.codecs

    @property
    def schedules(self) -> tuple[Any, ...]:
        """The schedule of each of :attr:`codecs` (None: its level stays as built)."""
        return self._schedules

    @property
    def op(self) -> str:
        """The reduction across ranks, ``"mean"`` or ``"sum"``."""
        return self._engine.op

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def _run(self) -> _StepRun | None:
        return self._engine.run

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise ValueError(
                f"{method}() called on a closed GradientReducer; build a new one (close() "
                "ends its thread and frees its communicator for good)"
            )

    def setup(self, specs: Iterable[tuple[Hashable, Sequence[int], Any]]) -> None:
        """Register the gradients, as ``(name, shape, dtype)`` in expected ready order.

        Collective: every rank must call it with the same list; a mismatch raises
        ValueError on every rank.  :meth:`reduce` calls it on first use.

        Raises
        ------
        TypeError
            For a name that is not str or int, or a dtype other than float32/float64.
        ValueError
            For a repeated name, an empty shape, no gradients, a second call, or
            gradients or options that differ between ranks.
        """
        self._check_open("setup")
        if self._specs is not None:
            raise ValueError(
                f"setup() was already called (with {len(self._specs)} gradients); the "
                "bucket plan is built once per reducer: build a new GradientReducer for "
                "another set of gradients"
            )
        cleaned: list[tuple[Hashable, tuple[int, ...], np.dtype]] = []
        seen: set[Hashable] = set()
        for name, shape, dtype in specs:
            if not isinstance(name, (str, int)) or isinstance(name, bool):
                raise TypeError(
                    f"gradient names must be str or int, got {type(name).__name__} {name!r}"
                )
            if name in seen:
                raise ValueError(f"gradient name {name!r} registered twice; names must be unique")
            seen.add(name)
            dtype = np.dtype(dtype)
            if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
                raise TypeError(
                    f"gradient {name!r} has dtype {dtype}; sparcomm reduces float32 and "
                    "float64 gradients: keep the parameters in one of them"
                )
            shape = tuple(int(s) for s in shape)
            if int(np.prod(shape, dtype=np.int64)) == 0:
                raise ValueError(f"gradient {name!r} is empty (shape {shape}); leave it out")
            cleaned.append((name, shape, dtype))
        if not cleaned:
            raise ValueError("no gradients to reduce: register at least one (name, shape, dtype)")
        # A policy's predicate that fails is reported after the signature exchange, so a
        # rank where it fails does not leave the others waiting in the allgather.
        choices: list[int] = []
        failure: Exception | None = None
        try:
            choices = self._choices(cleaned)
        except Exception as error:
            failure = error
        self._check_same_on_all_ranks(cleaned, choices, failure)
        self._specs = cleaned
        self._plan_generation += 1
        # A low-rank codec compresses each tensor as its own matrix and sums a whole
        # bucket's factors in one call, and an element-wise one (FP16) gives each element
        # the same bits fused or not: fuse their tensors into buckets, as dense ones.
        modes = {
            index: "bucket" if _is_low_rank(codec) or _is_elementwise(codec) else self.compression
            for index, codec in enumerate(self.codecs)
        }
        for compressing in (True, False):
            self._plans[compressing] = build_plan(
                cleaned,
                compress=compressing,
                fusion_threshold_bytes=self.fusion_threshold_bytes,
                dense_below=self.dense_below,
                compression=self.compression,
                layer_fuse_below=self.layer_fuse_below,
                choices=choices,
                modes=modes,
            )
        self._warm_up()

    def _choices(self, specs: Sequence[tuple[Hashable, tuple[int, ...], np.dtype]]) -> list[int]:
        """Each tensor's codec index (-1: dense)."""
        if self._policy is not None:
            return self._policy.assign(specs)
        return [-1 if _is_dense_codec(self.codecs[0]) else 0] * len(specs)

    def _warm_up(self) -> None:
        """Compile (or load from Numba's cache) every CPU kernel the steps will call.

        Numba compiles a kernel variant on its first call, which can take seconds; left
        to the steps, that lands in a timed step (the first one with a non-zero
        error-feedback residual, say).  So set-up runs, collectively on the reducer's
        communicator, a small reduction of each bucket dtype through the dense path and
        through every algorithm of the codec's family, twice (the second encode adds a
        non-zero residual), on a key of its own whose codec state is dropped afterwards;
        ``auto`` first, so that the cost model's calibration (and a quantized codec's
        timing) happens here too.  CuPy kernels and the low-rank family compile on first
        use.
        """
        from sparcomm.comm import allreduce

        all_buckets = [bucket for plan in self._plans.values() for bucket in plan.buckets]
        dense_dtypes = sorted({b.dtype for b in all_buckets if not b.compressed}, key=str)
        for dtype in dense_dtypes:
            x = np.random.default_rng(0).standard_normal(WARM_UP_ELEMENTS).astype(dtype)
            allreduce(x, codec=self._engine.dense_codec, comm=self.comm, op=self.op)
            self._warm_up_large_dense(dtype, [b for b in all_buckets if b.dtype == dtype])
        # Each codec of a policy in turn (the same order on every rank: the plan's).
        for index, codec in enumerate(self.codecs):
            buckets = [b for b in all_buckets if b.compressed and b.codec == index]
            if buckets:
                self._warm_up_codec(codec, buckets)

    def _warm_up_large_dense(self, dtype: np.dtype, buckets: list[_Bucket]) -> None:
        """The kernel variants of large dense buckets, which the small reduction of
        :meth:`_warm_up` does not reach: ``copy_finite`` past one chunk (a gradient
        copied into its bucket by ``submit``) and the ring with its sums (buckets from
        ``RING_MIN_BYTES``), run on buffers just past those sizes."""
        from sparcomm.comm import allreduce
        from sparcomm.comm._dense import RING_MIN_BYTES
        from sparcomm.kernels import cpu
        from sparcomm.kernels.cpu.convert import PARALLEL_FROM

        dense = [b for b in buckets if not b.compressed]
        if any(
            self._engine.fills_on_submit(b) and max(s.size for s in b.slots) > PARALLEL_FROM
            for b in dense
        ):
            x = np.zeros(PARALLEL_FROM + 1, dtype=dtype)
            cpu.copy_finite(x, np.empty_like(x))
        if any(b.size * dtype.itemsize >= RING_MIN_BYTES for b in dense):
            x = np.zeros(RING_MIN_BYTES // dtype.itemsize, dtype=dtype)
            allreduce(x, codec=self._engine.dense_codec, comm=self.comm, op=self.op, out=x)

    def _warm_up_codec(self, codec: Any, buckets: list[_Bucket]) -> None:
        """:meth:`_warm_up` of one codec, on the dtypes of its ``buckets``."""
        from sparcomm.comm import allreduce, sparse_allreduce
        from sparcomm.comm._cost import ALL_ALGORITHMS
        from sparcomm.comm._quantized import plain_half
        from sparcomm.feedback import unwrap
        from sparcomm.kernels.cpu import convert, elementwise

        compressed_dtypes = sorted({b.dtype for b in buckets}, key=str)
        bare, memory = unwrap(codec)
        family = _family(codec)
        algorithms: tuple[str, ...] = ()
        # "auto" first: its first call calibrates the cost model (and, for a quantized
        # codec, times the codec), a second or more that would land in the first step.
        if family == "sparse":
            algorithms = ("auto", *ALL_ALGORITHMS)
        elif family == "quantized":
            algorithms = ("auto", "allgather", "reduce_scatter_allgather")
            algorithms += ("shared_scale",) if getattr(bare, "shares_scale", False) else ()
            # Plain FP16's own schedule, auto's choice for large buckets.
            algorithms += ("pipelined",) if plain_half(bare, memory) else ()
        known = set(memory._residuals) if memory is not None else set()
        # A dtype with a bucket past one kernel chunk warms up just past it too: the
        # parallel variants of the encode, the decodes (from convert's threshold) and
        # error feedback's add and subtract (from elementwise's) are other compiled
        # functions, which a small reduction never reaches.
        switches = (convert.PARALLEL_FROM, elementwise.PARALLEL_FROM)
        past = max(switches) + 1
        sizes = {
            dtype: (WARM_UP_ELEMENTS, past)
            if any(b.size > min(switches) for b in buckets if b.dtype == dtype)
            else (WARM_UP_ELEMENTS,)
            for dtype in compressed_dtypes
        }
        sample = np.random.default_rng(0).standard_normal(past)
        if family == "sparse":  # the merges that only some data reach
            from sparcomm.comm._sparse import load_kernels
            from sparcomm.comm._validate import index_dtype

            largest = max((b.size for b in buckets), default=1)
            for dtype in compressed_dtypes:
                load_kernels(index_dtype(largest), dtype)
        try:
            for dtype, size in ((d, size) for d in compressed_dtypes for size in sizes[d]):
                x = sample[:size].astype(dtype)
                for number, algorithm in enumerate(algorithms):
                    # The second encode adds a non-zero residual; the sparse algorithms
                    # after the first need only their merges (a stream, no encode).
                    if family == "sparse" and number > 0:
                        if size != WARM_UP_ELEMENTS:  # merges do not depend on n
                            continue
                        indices = np.arange(0, WARM_UP_ELEMENTS, 7, dtype=np.int64)
                        sparse_allreduce(
                            indices,
                            x[indices],
                            WARM_UP_ELEMENTS,
                            self.comm,
                            op=self.op,
                            algorithm=algorithm,
                        )
                        continue
                    for step in range(2):
                        allreduce(
                            x,
                            codec=codec,
                            comm=self.comm,
                            op=self.op,
                            algorithm=algorithm,
                            key=f"{_WARM_UP_KEY}.{size}",  # a residual per size
                            step=step,
                        )
        finally:
            if memory is not None:  # the warm-up leaves no residual behind
                for key in set(memory._residuals) - known:
                    memory._residuals.pop(key, None)
                    memory._scratch.pop(key, None)

    def _signature(
        self,
        specs: Sequence[tuple[Hashable, tuple[int, ...], np.dtype]],
        choices: Sequence[int] = (),
        failure: Exception | None = None,
    ) -> str:
        text = repr(
            (
                [(name, shape, dtype.str) for name, shape, dtype in specs],
                self._codec_text,
                list(choices),
                repr(self._schedules),
                type(failure).__name__ if failure is not None else None,
                self.op,
                self.fusion_threshold_bytes,
                self.dense_below,
                self.warmup_steps,
                self.compression,
                self.layer_fuse_below,
            )
        )
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def _check_same_on_all_ranks(
        self,
        specs: Sequence[Any],
        choices: Sequence[int] = (),
        failure: Exception | None = None,
    ) -> None:
        signatures = self.comm.allgather(self._signature(specs, choices, failure))
        if failure is not None:
            raise failure  # this rank's own error (the others raise theirs, or the one below)
        if len(set(signatures)) > 1:
            odd = [rank for rank, s in enumerate(signatures) if s != signatures[0]]
            raise ValueError(
                "the registered gradients (names, shapes, dtypes) or reducer options (codec "
                f"policy's choices, schedules included) differ between ranks (ranks {odd} "
                "differ from rank 0); every rank must build the same model and pass the "
                "same options"
            )

    # -- one step ---------------------------------------------------------------------------
    @property
    def compressing(self) -> bool:
        """Whether the current step goes through the codec (False during warm-up)."""
        return self.step >= self.warmup_steps

    def _begin(self) -> _StepRun:
        levels = self._apply_levels(self.step) if self.compressing else ()
        run = _StepRun(self._next_plan(), self.step)
        run.layout = (self._plan_generation, self.compressing)
        run.levels = levels
        run.stats.levels = self._level_stats(levels)
        self._engine.run = run
        if self.overlap:
            self._engine.start_thread()
            self._engine.queue.put(run)
        return run

    def _apply_levels(self, step: int) -> tuple[Any, ...]:
        """Set each scheduled codec's level for ``step``; return every codec's level.

        Runs on the caller's thread between steps (the progress thread is idle), from
        the step counter alone: every rank sets the same levels."""
        from sparcomm.schedule import current_level, set_level

        for codec, schedule in zip(self.codecs, self._schedules, strict=True):
            if schedule is not None:
                set_level(codec, schedule(step))
        levels = tuple(current_level(codec) for codec in self.codecs)
        if self._levels is not None and levels != self._levels:
            self._forget_layouts(levels)
        self._levels = levels
        return levels

    def _forget_layouts(self, levels: tuple[Any, ...]) -> None:
        """Drop the agreed layouts of levels no longer in use (the collectives' cache of
        :mod:`sparcomm.comm._call`), so a schedule that never repeats a level does not
        grow it without bound.  The reducer's communicator is its own: every layout
        there is one of its buckets (:func:`_layout_head`)."""
        from sparcomm.comm._context import comm_state

        state = comm_state(self.comm)

        def stale(layout: Any) -> bool:
            return (
                isinstance(layout, tuple)
                and len(layout) >= 5
                and layout[1] is True
                and isinstance(layout[2], int)
                and 0 <= layout[2] < len(levels)
                and layout[3] != levels[layout[2]]
            )

        for layout in [layout for layout in state.agreed if stale(layout)]:
            del state.agreed[layout]
        state.unsteady -= {layout for layout in state.unsteady if stale(layout)}

    def _level_stats(self, levels: tuple[Any, ...]) -> dict[str, Any]:
        """``ReductionStats.levels``: each codec's level by its parameter's name."""
        from sparcomm.schedule import level_parameter

        found = {}
        labels = self._policy.labels if self._policy is not None else ("",)
        for codec, label, level in zip(self.codecs, labels, levels, strict=False):
            if level is not None:
                parameter = level_parameter(codec)
                found[f"{label}.{parameter}" if label else str(parameter)] = level
        return found

    @property
    def in_flight(self) -> bool:
        """True between the first :meth:`submit` of a step and its :meth:`wait`."""
        return self._run is not None

    def submitted(self, name: Hashable) -> bool:
        """Whether ``name`` was submitted in the step in flight."""
        return self._run is not None and name in self._run.inputs

    def submit(self, name: Hashable, grad: Any, *, in_place: bool = False) -> None:
        """Hand over the gradient ``name`` for this step; its bucket starts when full.

        The array must not be modified until :meth:`wait` returns (it is read in place,
        without a copy, when it forms a bucket of its own).

        With ``in_place=True`` the caller gives the array up, as Horovod's
        ``allreduce_``: the reducer may write the result into it (and :meth:`wait`
        then returns it) instead of a new array.  PowerSGD's buckets do; other
        collectives return new arrays.  After a failed step such an array may hold the
        reduced values (the codecs' state is restored as always).

        Raises
        ------
        TypeError
            If ``grad`` is not a NumPy/CuPy array or has another dtype than registered.
        ValueError
            If no gradients were registered, ``name`` was not registered, the shape
            differs from the registered one, or ``name`` was already submitted this step.
        """
        self._check_open("submit")
        array_module(grad)  # a clear TypeError for tensors, lists and mixed devices
        # Everything is checked before a step begins: a refused gradient starts nothing.
        plan = self._run.plan if self._run is not None else self._next_plan()
        bucket_index, slot = self._check_name(name, plan)
        if tuple(grad.shape) != slot.shape:
            raise ValueError(
                f"gradient {name!r} has shape {tuple(grad.shape)}, registered as {slot.shape}"
            )
        if grad.dtype != plan.buckets[bucket_index].dtype:
            raise TypeError(
                f"gradient {name!r} has dtype {grad.dtype}, registered as "
                f"{plan.buckets[bucket_index].dtype}"
            )
        run = self._run or self._begin()
        bucket = plan.buckets[bucket_index]
        if isinstance(grad, np.ndarray) and self._engine.fills_on_submit(bucket):
            self._fill(run, bucket, slot, name, grad)
        ready = self._device_ready(run, name, grad) if is_cupy_array(grad) else None
        with run.condition:
            run.filling.discard(name)
            if ready is not None:
                run.ready[name] = ready
            if name in run.inputs:
                raise _submitted_twice(name, run.step)
            run.inputs[name] = grad
            if in_place:
                run.in_place.add(name)
            run.pending[bucket_index] -= 1
            if run.pending[bucket_index] == 0:
                run.condition.notify_all()

    def _fill(self, run: _StepRun, bucket: _Bucket, slot: _Slot, name: Hashable, grad: Any) -> None:
        """Copy a host gradient into its bucket's fusion buffer now, on the caller's
        thread, as DDP copies into its buckets from the autograd hooks: the copy runs
        during the backward pass, beside the previous bucket's transfer, not between two
        collectives on the progress thread.  float32 and float64 are copied by
        ``copy_finite``, which counts the NaN and Inf on the way: a dense bucket with none
        skips the collective's own read of it (:func:`sparcomm.comm._dense.finite`).
        Raises before copying if ``name`` is already in this step, so a bucket in flight
        is never written."""
        with run.condition:
            if name in run.inputs or name in run.filling:
                raise _submitted_twice(name, run.step)
            run.filling.add(name)
            filled = run.fused.get(bucket.index)
            if filled is None:
                filled = _Filled(self._engine.fusion_buffer(run, bucket, np))
                run.fused[bucket.index] = filled
        try:
            start = time.perf_counter()
            target = filled.buffer[slot.offset : slot.offset + slot.size]
            bad: int | None = None
            if (
                grad.dtype in (np.float32, np.float64)
                and grad.flags.c_contiguous
                and not np.may_share_memory(grad, target)
            ):
                from sparcomm.kernels import cpu

                bad = cpu.copy_finite(grad.reshape(-1), target)
            else:
                target.reshape(slot.shape)[...] = grad
            seconds = time.perf_counter() - start
        except BaseException:
            with run.condition:
                run.filling.discard(name)
            raise
        with run.condition:
            if bad is None or filled.non_finite is None:
                filled.non_finite = None
            else:
                filled.non_finite += bad
            filled.copied += 1
            run.stats.phases["fuse"] += seconds

    def _next_plan(self) -> _Plan:
        if self._specs is None:
            raise ValueError(
                "submit() called before the gradients were registered: call "
                "setup([(name, shape, dtype), ...]) once first (reduce(grads) does it on "
                "its first call)"
            )
        return self._plans[self.compressing]

    @staticmethod
    def _check_name(name: Hashable, plan: _Plan) -> tuple[int, _Slot]:
        try:
            return plan.lookup[name]
        except (KeyError, TypeError):
            registered = list(plan.lookup)
            raise ValueError(
                f"gradient {name!r} was not registered in setup(); the registered names are "
                f"{registered[:5]}{' ...' if len(registered) > 5 else ''} ({len(registered)}): "
                "submit one of them, or register every gradient in setup()"
            ) from None

    def wait(self) -> dict[Hashable, Any]:
        """Finish the step: block until every bucket is reduced; return ``{name: array}``.

        Every registered gradient must have been submitted.  The returned arrays are
        fresh (views into the reduced fused buffers), safe to keep.

        Raises
        ------
        ValueError
            If no step is in flight, or a registered gradient was not submitted (the
            step is cancelled).
        """
        self._check_open("wait")
        run = self._run
        if run is None:
            raise ValueError(
                "wait() called with no step in flight: submit() the step's gradients "
                "first (or call reduce(grads), which does both)"
            )
        missing = [name for name in run.plan.lookup if name not in run.inputs]
        if missing:
            run.cancel()
            self._engine.run = None
            raise ValueError(
                f"wait() called before all gradients were submitted; missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of "
                f"{len(run.plan.lookup)}); submit every registered gradient each step"
            )
        start = time.perf_counter()
        if self.overlap:
            run.done.wait()
        else:
            self._engine.reduce_all(run)
        run.stats.wait_seconds = time.perf_counter() - start
        self._engine.run = None
        if run.error is not None:
            # The collective's own exception (same type, traceback from the thread that
            # raised it): the collectives raise on every rank alike, so all ranks see it.
            raise run.error
        self.step += 1
        self.last_stats = run.stats
        return run.outputs

    def reduce(self, grads: Mapping[Hashable, Any] | Sequence[Any]) -> Any:
        """Reduce a dict or list of arrays in one call; returns the same structure.

        On first use the dict's keys (or the list positions) and the arrays' shapes and
        dtypes are registered, in the given order.
        """
        self._check_open("reduce")
        if isinstance(grads, Mapping):
            items = list(grads.items())
        elif isinstance(grads, Sequence) and not isinstance(grads, (str, bytes)):
            items = list(enumerate(grads))
        else:
            raise TypeError(f"grads must be a dict or a list of arrays, got {type(grads).__name__}")
        for _, array in items:
            array_module(array)  # a clear TypeError for torch tensors and lists
        if self._specs is None:
            self.setup([(name, array.shape, array.dtype) for name, array in items])
        for name, array in items:
            self.submit(name, array)
        outputs = self.wait()
        if isinstance(grads, Mapping):
            return {name: outputs[name] for name, _ in items}
        reduced = [outputs[name] for name, _ in items]
        return tuple(reduced) if isinstance(grads, tuple) else reduced

    def close(self) -> None:
        """Stop the progress thread and free the duplicated communicator.

        Collective (``MPI_Comm_free``): call it on every rank.  A second call does
        nothing.  A step in flight is cancelled.
        """
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        engine = self._engine
        if engine.run is not None:
            engine.run.cancel()
            engine.run = None
        engine.stop_thread()
        engine.comm.Free()
        engine.duplicates.closed()

    def __enter__(self) -> GradientReducer:
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if kind is None:
            self.close()
            return
        # An exception on this rank: the other ranks may not be leaving their block at
        # the same point, so neither wait for the thread (it may be in a collective they
        # will never join) nor free the communicator now (collective): abandon the
        # reducer, as if it were dropped.
        if not self._closed:
            self._closed = True
            self._finalizer()

    def _device_ready(self, run: _StepRun, name: Hashable, grad: Any) -> Any:
        """Note a CuPy gradient's device; return an event recorded after its producer.

        The progress thread has its own current device and stream (both are per thread
        in CUDA): it reduces on the gradients' device, after the event, so it neither
        runs kernels on another GPU nor reads a gradient still being written.
        """
        device = grad.device
        if run.device is None:
            run.device = device
        elif run.device != device:
            raise ValueError(
                f"gradient {name!r} is on GPU {device.id}, this step's other gradients on "
                f"GPU {run.device.id}; keep each rank's gradients on one GPU"
            )
        event = sys.modules["cupy"].cuda.Event(block=False, disable_timing=True)
        event.record()  # on the caller's current stream, after the gradient's producer
        return event

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The reducer's state: step counter, the codec's (error-feedback) state and its
        level (with a policy: a list of every codec's state, in :attr:`codecs` order).

        Residuals differ between ranks: save one state per rank.

        Raises
        ------
        ValueError
            If a step is in flight (call :meth:`wait` first) or the reducer is closed.
        """
        self._check_open("state_dict")
        if self._run is not None:
            raise ValueError("state_dict() called with a step in flight; call wait() first")
        from sparcomm.schedule import current_level

        states = [c.state_dict() if hasattr(c, "state_dict") else None for c in self.codecs]
        return {
            "format": _STATE_FORMAT,
            "step": self.step,
            "codec": self._codec_text,
            "codec_state": states if self._policy is not None else states[0],
            "levels": [current_level(codec) for codec in self.codecs],
            "rank": self.comm.Get_rank(),
            "size": self.comm.Get_size(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (from the same rank of the same job size).

        Atomic: the whole state is checked before anything is changed.

        Raises
        ------
        TypeError
            If ``state`` is not a mapping, or a field has the wrong type.
        ValueError
            If it is not a reducer state, was saved with another codec, by another rank
            or job size, or a step is in flight.
        """
        self._prepare_load(state)()

    def _prepare_load(self, state: Mapping[str, Any]) -> Any:
        """Check ``state`` completely; return the function that loads it (cannot fail)."""
        from sparcomm.schedule import current_level

        self._check_open("load_state_dict")
        if self._run is not None:
            raise ValueError("load_state_dict() called with a step in flight; call wait() first")
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state must be a dict from GradientReducer.state_dict(), got "
                f"{type(state).__name__}"
            )
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"not a GradientReducer state (format {_STATE_FORMAT} expected, got "
                f"{state.get('format')!r}); pass what GradientReducer.state_dict() returned"
            )
        missing = [k for k in ("step", "codec", "codec_state", "rank", "size") if k not in state]
        if missing:
            raise ValueError(
                f"GradientReducer state lacks {missing}; pass what state_dict() returned, unchanged"
            )
        if state["codec"] != self._codec_text:
            raise ValueError(
                f"state was saved with codec {state['codec']}, this reducer uses "
                f"{self._codec_text}; load it into a reducer with the same codec"
            )
        here = (self.comm.Get_rank(), self.comm.Get_size())
        if (state["rank"], state["size"]) != here:
            raise ValueError(
                f"state was saved by rank {state['rank']} of {state['size']}, loading on "
                f"rank {here[0]} of {here[1]}: error-feedback residuals are per rank; load "
                "each rank's own state"
            )
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"state['step'] must be an int, got {type(step).__name__} {step!r}")
        if step < 0:
            raise ValueError(f"state['step'] must be >= 0, got {step}")
        codec_state = state["codec_state"]
        codecs = self.codecs
        if self._policy is None:
            states = [codec_state]
        elif isinstance(codec_state, (list, tuple)) and len(codec_state) == len(codecs):
            states = list(codec_state)
        else:
            raise ValueError(
                f"state['codec_state'] must list the states of the policy's {len(codecs)} "
                f"codecs, got {type(codec_state).__name__}; pass what state_dict() returned"
            )
        levels = self._checked_levels(state.get("levels"))
        # The codecs' states name the codec at the level it had when saved: check them
        # at that level (then put the current levels back: nothing changes here).
        current = [current_level(codec) for codec in codecs]
        try:
            self._set_levels(levels)
            loaders = [
                _prepare_codec_load(codec, saved)
                for codec, saved in zip(codecs, states, strict=True)
            ]
        finally:
            self._set_levels(current)

        def load() -> None:
            for loader in loaders:
                if loader is not None:
                    loader()
            self._set_levels(levels)
            self.step = int(step)

        return load

    def _checked_levels(self, levels: Any) -> list[Any]:
        """The saved levels (a state saved before schedules existed has none: None)."""
        from sparcomm.schedule import level_parameter

        if levels is None:
            return [None] * len(self.codecs)
        if not isinstance(levels, (list, tuple)) or len(levels) != len(self.codecs):
            raise ValueError(
                f"state['levels'] must list {len(self.codecs)} level(s), got {levels!r}; pass "
                "what state_dict() returned"
            )
        for codec, level in zip(self.codecs, levels, strict=True):
            if level is not None and level_parameter(codec) is None:
                raise ValueError(
                    f"state holds level {level!r} for {codec!r}, which takes none; load it "
                    "into a reducer with the codec that saved it"
                )
        return list(levels)

    def _set_levels(self, levels: Sequence[Any]) -> None:
        from sparcomm.schedule import set_level

        for codec, level in zip(self.codecs, levels, strict=True):
            if level is not None:
                try:
                    set_level(codec, level)
                except (TypeError, ValueError) as error:
                    raise ValueError(
                        f"state holds level {level!r} for {codec!r}, which refuses it: {error}"
                    ) from None


def _prepare_codec_load(codec: Any, codec_state: Any) -> Any:
    """Check one codec's saved state; return the function that installs it (or None)."""
    from sparcomm.feedback import unwrap

    memory = unwrap(codec)[1]
    if memory is not None and codec_state is not None:
        residuals = memory.checked_residuals(codec_state)
        return lambda: memory._install(residuals)
    if codec_state and hasattr(codec, "prepare_load_state"):
        # A codec that keeps its state itself (PowerSGD), checked now.
        return codec.prepare_load_state(codec_state)
    if codec_state:
        raise ValueError(
            f"state holds error-feedback state, but {codec!r} keeps none; load it into a "
            "reducer with the codec that saved it"
        )
    return None


def _resolve_schedules(codecs: Sequence[Any], schedule: Any, codec: Any) -> tuple[Any, ...]:
    """The schedule of each codec (None: none) from the ``schedule=`` option."""
    from sparcomm.schedule import as_schedule, check_levels, codecs_with_levels, level_parameter

    if schedule is None:
        return (None,) * len(codecs)
    parameters = [level_parameter(c) for c in codecs]
    takes = sorted({p for p in parameters if p})
    labels: tuple[str, ...] = getattr(codec, "labels", ())  # a policy's: "default", ...
    by_parameter: dict[str, Any] = {}
    by_label: dict[str, Any] = {}
    if isinstance(schedule, Mapping):
        for name, value in schedule.items():
            if not isinstance(name, str):
                raise TypeError(
                    f"schedule's keys must name a level parameter or a policy's codec (str), "
                    f"got {type(name).__name__} {name!r}; e.g. {{'density': "
                    "Exponential(0.25, 0.01, 100)}"
                )
            if name in labels and parameters[labels.index(name)]:
                by_label[name] = as_schedule(value)
            elif name in takes:
                by_parameter[name] = as_schedule(value)
            else:
                pairs = zip(labels, parameters, strict=False)
                scheduled = [f"{label!r}" for label, p in pairs if p]
                raise ValueError(
                    f"schedule sets {name!r}, but no codec of {codec!r} takes it; its codecs "
                    f"take {takes or 'no level'}"
                    + (f" (by policy entry: {', '.join(scheduled)})" if scheduled else "")
                )
    else:
        single = as_schedule(schedule)
        if not takes:
            raise NotImplementedError(
                f"schedule= sets a codec's compression level, and {codec!r} takes none; the "
                f"codecs that take one are {codecs_with_levels()}: use one of them, or leave "
                "schedule= out"
            )
        if len(takes) > 1:
            raise ValueError(
                f"the codecs of {codec!r} take different levels {takes}: give each its "
                f"schedule, schedule={{{', '.join(repr(t) + ': ...' for t in takes)}}}"
            )
        by_parameter[takes[0]] = single
    result = tuple(
        by_label.get(label, by_parameter.get(p)) if p else None
        for label, p in zip(labels or ("",) * len(codecs), parameters, strict=True)
    )
    for each, chosen in zip(codecs, result, strict=True):
        if chosen is not None:
            check_levels(each, chosen)
    return result
