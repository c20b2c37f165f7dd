"""PyTorch integration: a Horovod-style :func:`DistributedOptimizer` over
:class:`sparcomm.reducer.GradientReducer`.

This module imports torch; ``import sparcomm`` never does (install the ``[torch]`` extra).

How a step runs (Horovod, Sergeev and Del Balso, arXiv:1802.05799; PyTorch DDP, Li et
al., VLDB 2020):

1. Every parameter carries a ``register_post_accumulate_grad_hook``: when its gradient
   is final for the step (after ``backward_passes_per_step`` backward passes), the hook
   hands a zero-copy NumPy view of ``param.grad`` (CPU; CUDA tensors go to CuPy through
   DLPack) to the reducer.
2. The reducer fuses gradients into buckets and a background thread reduces each full
   bucket while the backward pass goes on computing the remaining gradients.
3. ``step()`` (or ``synchronize()``) waits for the last bucket, writes the reduced
   gradients into ``param.grad`` and applies the wrapped optimizer's update.

The CUDA path (DLPack to CuPy and back) is written but only exercised where a GPU and
the GPU kernels are present.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from sparcomm._checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from sparcomm._ddp_hook import DDPCommState, ddp_comm_hook
from sparcomm._names import Average, Compression, ReduceOp, Sum, normalize_op
from sparcomm._torch_grads import GradientRouting, GradOptions, check_options
from sparcomm.reducer import (
    DEFAULT_DENSE_BELOW,
    DEFAULT_FUSION_THRESHOLD_BYTES,
    GradientReducer,
    ReductionStats,
)

__all__ = [
    "Average",
    "Compression",
    "DDPCommState",
    "DistributedOptimizer",
    "ReduceOp",
    "Sum",
    "ddp_comm_hook",
    "load_checkpoint",
    "load_optimizer_state",
    "save_checkpoint",
    "broadcast_parameters",
    "broadcast_optimizer_state",
]

logger = logging.getLogger(__name__)

_STATE_KEY = "sparcomm"


class _DistributedOptimizer(torch.optim.Optimizer):
    """The hooks and Horovod's methods, placed before the user's optimizer class.

    :func:`DistributedOptimizer` builds ``class SGD(_DistributedOptimizer, torch.optim.SGD)``
    (the user's class), so ``super()`` here is the user's optimizer and the result is an
    instance of both.
    """

    _sparcomm_reducer: GradientReducer

    def __init__(
        self,
        params: Any,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
        reducer: GradientReducer,
        backward_passes_per_step: int,
        options: GradOptions | None = None,
    ) -> None:
        # The next class in the MRO is the user's optimizer, whose param_groups already
        # carry every hyper-parameter.
        super().__init__(params)  # type: ignore[call-arg, unused-ignore]
        self._sparcomm_reducer = reducer
        self._passes = backward_passes_per_step
        self._names = _parameter_names(self.param_groups, named_parameters)
        self._counts: dict[torch.Tensor, int] = {}
        self._synchronized = False
        self._skip_synchronize = False
        self._hooks = []
        ordered = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        # Gradients become ready roughly in reverse order of definition (the last layer's
        # first), so buckets are planned in that order, as DDP does.
        self._ordered = ordered[::-1]
        # The reducer's plan is built at the first synchronize(), when it is known which
        # gradients are sparse (sparcomm/_torch_grads.py).
        self._routing = GradientRouting(
            reducer, self._names, self._ordered, backward_passes_per_step, options or GradOptions()
        )
        for p in ordered:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook()))
        # The hooks hold the optimizer weakly, so a dropped optimizer is collected (and
        # its reducer's thread ended); this then takes the hooks off the parameters.
        self._remove_hooks = weakref.finalize(self, _remove_hooks, self._hooks)

    # -- hooks -----------------------------------------------------------------------------
    def _make_hook(self) -> Any:
        # A strong reference would let the model's parameters keep a dropped optimizer
        # alive, with its reducer's thread and communicator.
        owner = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            optimizer = owner()
            if optimizer is None:
                return
            count = optimizer._counts.get(p, 0) + 1
            if count > optimizer._passes:
                raise RuntimeError(
                    f"gradient of {optimizer._names[p]!r} was computed {count} times before "
                    f"step(), but backward_passes_per_step={optimizer._passes}; call step() "
                    "(or synchronize()) every backward_passes_per_step backward passes, or "
                    "raise backward_passes_per_step"
                )
            optimizer._counts[p] = count
            if count == optimizer._passes:
                optimizer._synchronized = False
                if optimizer._routing.planned:  # else synchronize() submits it
                    optimizer._routing.submit(p)

        return hook

    # -- Horovod's API -------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for every gradient's reduction and write the results into ``p.grad``.

        Gradients whose hooks did not fire this step (unused parameters, or fewer
        backward passes than ``backward_passes_per_step``) are submitted now, as they
        are (zeros where ``p.grad`` is None), so all ranks run the same collectives.
        """
        routing = self._routing
        try:
            if not routing.planned:
                routing.plan()
            routing.submit_missing()
            # Sparse gradients, dtype conversions, scaling, non-finite gradients:
            # sparcomm/_torch_grads.py.
            routing.finish()
        finally:
            self._counts.clear()
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Let ``step()`` apply the gradients without reducing them again.

        Use after an explicit :meth:`synchronize` (to clip gradients, for instance)::

            loss.backward()
            optimizer.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            with optimizer.skip_synchronize():
                optimizer.step()
        """
        self._skip_synchronize = True
        try:
            yield
        finally:
            self._skip_synchronize = False

    def step(self, closure: Any = None) -> Any:
        """Reduce the gradients (unless already synchronized) and apply the update."""
        if not self._skip_synchronize and not self._synchronized:
            self.synchronize()
        self._synchronized = False
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As the wrapped optimizer's; refuses to drop a reduction in flight."""
        # Before the first synchronize() the plan is not built and nothing is submitted
        # yet: gradients complete for the step are pending all the same.
        pending = any(count == self._passes for count in self._counts.values())
        if self._sparcomm_reducer.in_flight or pending:
            raise RuntimeError(
                "zero_grad() was called after backward() but before step() or "
                "synchronize(): the gradient reduction in flight would be lost; call "
                "step() (or synchronize()) first"
            )
        return super().zero_grad(set_to_none=set_to_none)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus the reducer's (step, error-feedback residuals).

        Residuals differ between ranks: save one file per rank.
        """
        state = super().state_dict()
        state[_STATE_KEY] = self._sparcomm_reducer.state_dict()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; a plain optimizer state dict is accepted too."""
        state = dict(state_dict)
        reducer_state = state.pop(_STATE_KEY, None)
        # sparcomm's part is checked before torch loads its own and applied after (it
        # cannot fail then): a refused checkpoint changes nothing.
        load_reducer_state = (
            None if reducer_state is None else self._sparcomm_reducer._prepare_load(reducer_state)
        )
        super().load_state_dict(state)
        if load_reducer_state is not None:
            load_reducer_state()

    @property
    def reducer(self) -> GradientReducer:
        """The :class:`~sparcomm.reducer.GradientReducer` doing the communication."""
        return self._sparcomm_reducer

    @property
    def last_stats(self) -> ReductionStats | None:
        """Statistics of the last reduction (bytes sent and received, time, buckets)."""
        return self._sparcomm_reducer.last_stats

    def close(self) -> None:
        """Remove the hooks, stop the reducer's thread and free its communicator.

        Collective (``MPI_Comm_free``): call it on every rank; a second call does
        nothing.  A dropped optimizer is not leaked either (see
        :class:`~sparcomm.reducer.GradientReducer`).
        """
        self._remove_hooks()
        self._sparcomm_reducer.close()

    def __enter__(self) -> _DistributedOptimizer:
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        """:meth:`close`, or after an exception the non-blocking release of
        :meth:`GradientReducer.__exit__ <sparcomm.reducer.GradientReducer.__exit__>`."""
        self._remove_hooks()
        self._sparcomm_reducer.__exit__(kind, error, traceback)


def _remove_hooks(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _parameter_names(
    param_groups: list[dict[str, Any]],
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
) -> dict[torch.Tensor, str]:
    params = [p for group in param_groups for p in group["params"]]
    if named_parameters is None:
        return {p: f"param.{i}" for i, p in enumerate(params)}
    names: dict[torch.Tensor, str] = {}
    for item in named_parameters:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                "named_parameters must be (name, tensor) pairs, as model.named_parameters() "
                f"gives, got {type(item).__name__}"
            )
        name, p = item
        if name in names.values():
            raise ValueError(f"parameter name {name!r} appears twice in named_parameters")
        names[p] = name
    unnamed = sum(1 for p in params if p not in names)
    if unnamed:
        raise ValueError(
            f"named_parameters covers only {len(params) - unnamed} of the optimizer's "
            f"{len(params)} parameters; pass model.named_parameters() of the model the "
            "optimizer was built from"
        )
    return names


def DistributedOptimizer(  # noqa: N802 - a factory named like the class it returns (Horovod)
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
    codec: Any = None,
    comm: Any = None,
    op: Any = "mean",
    backward_passes_per_step: int = 1,
    fusion_threshold_bytes: int = DEFAULT_FUSION_THRESHOLD_BYTES,
    dense_below: int = DEFAULT_DENSE_BELOW,
    warmup_steps: int = 0,
    compression: Any = "layer",
    overlap: bool = True,
    *,
    sparse_as_dense: bool = False,
    gradient_predivide_factor: float = 1.0,
    num_groups: int | None = None,
    non_finite: str = "raise",
    schedule: Any = None,
) -> _DistributedOptimizer:
    """Wrap ``optimizer`` so that ``step()`` applies gradients reduced across ranks.

    The result is an instance of a subclass of ``optimizer``'s class (as in Horovod), so
    learning-rate schedulers and ``isinstance`` checks keep working.  The wrapped
    optimizer's state (momentum buffers, ...) is carried over.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The local optimizer.
    named_parameters : iterable of (str, Tensor), optional
        ``model.named_parameters()``: names key the error-feedback residuals and the
        random streams (default: ``"param.<i>"`` in optimizer order).
    codec : Codec, ErrorFeedback or CodecPolicy, optional
        Compression (default ``NoCompression()``); e.g. ``ErrorFeedback(TopK(density=0.01))``,
        or a :class:`~sparcomm.CodecPolicy` choosing per parameter, e.g.
        ``CodecPolicy(ErrorFeedback(TopK(density=0.01)), matrices=PowerSGD(rank=4))``
        (buckets never mix codecs; each codec keeps its own state in ``state_dict()``).
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``; collective: build the optimizer on all ranks.
    op : {"mean", "sum"} or Average, Sum
        ``"mean"`` (also ``"average"``, Horovod's ``Average``): the gradient of the mean
        loss over all ranks and all ``backward_passes_per_step`` micro-batches (equal to
        single-process training on the concatenated batches).  ``"sum"`` (``Sum``): the
        plain sum over ranks and passes.
    backward_passes_per_step : int
        Backward passes accumulated locally before each reduction.
    fusion_threshold_bytes, dense_below, warmup_steps, overlap
        See :class:`~sparcomm.reducer.GradientReducer`.
    compression : {"layer", "bucket"}, codec, or Compression.none / Compression.fp16
        A string is the reducer's mode (see :class:`~sparcomm.reducer.GradientReducer`);
        a codec (or Horovod's ``Compression`` names) is Horovod's spelling of ``codec=``.
    sparse_as_dense : bool
        Reduce sparse gradients (``torch.nn.Embedding(sparse=True)``) as dense tensors,
        as Horovod's option does; by default they go through
        :func:`sparcomm.sparse_allreduce` and come back as sparse COO tensors.
    gradient_predivide_factor : float
        Horovod's: with ``op=Average``, gradients are multiplied by
        ``1 / gradient_predivide_factor`` before the sum and by
        ``gradient_predivide_factor / size`` after it.
    num_groups : int, optional
        Horovod's: fuse the dense gradients into at most this many buckets (the fusion
        threshold becomes the smallest one that gives at most ``num_groups``).
    non_finite : {"raise", "propagate"}
        A non-finite gradient on any rank: ``"raise"`` the collective's error on every
        rank, or ``"propagate"`` (for ``torch.amp.GradScaler``): every rank's gradients
        become NaN, so ``scaler.step`` skips the step on every rank and the scale backs
        off; error-feedback residuals are left as they were before the step.
    schedule : Schedule, callable, or dict, optional
        The codec's compression level per step, e.g. DGC's density warm-up
        ``Exponential(0.25, 0.01, 100)`` or a PowerSGD rank ramp ``Linear(1, 4, 50)``:
        see :class:`~sparcomm.reducer.GradientReducer` and :mod:`sparcomm.schedule`.
        Steps count optimizer steps (reductions), warm-up steps included.

    Returns
    -------
    torch.optim.Optimizer
        With ``synchronize()``, ``skip_synchronize()``, ``reducer``, ``last_stats`` and
        ``state_dict()`` / ``load_state_dict()`` carrying the error-feedback residuals.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if isinstance(optimizer, _DistributedOptimizer):
        raise ValueError("optimizer is already a sparcomm DistributedOptimizer")
    if (
        isinstance(backward_passes_per_step, bool)
        or not isinstance(backward_passes_per_step, int)
        or backward_passes_per_step < 1
    ):
        raise ValueError(
            f"backward_passes_per_step must be an int >= 1, got {backward_passes_per_step!r}"
        )
    if not isinstance(compression, str):  # Horovod's compression=: a codec
        if codec is not None:
            raise ValueError(
                "pass the codec once: codec= or compression= (Horovod's name), not both"
            )
        codec, compression = compression, "layer"
    op = normalize_op(op)
    options = GradOptions(sparse_as_dense, gradient_predivide_factor, num_groups, non_finite)
    check_options(options, op)
    _check_codecs_with(codec, optimizer)
    reducer = GradientReducer(
        codec,
        comm,
        op=op,
        fusion_threshold_bytes=fusion_threshold_bytes,
        dense_below=dense_below,
        warmup_steps=warmup_steps,
        compression=compression,
        overlap=overlap,
        schedule=schedule,
    )
    cls = type(optimizer.__class__.__name__, (_DistributedOptimizer, optimizer.__class__), {})
    try:
        wrapped = cls(
            optimizer.param_groups, named_parameters, reducer, backward_passes_per_step, options
        )
    except BaseException:
        reducer.close()
        raise
    if optimizer.state:
        torch.optim.Optimizer.load_state_dict(wrapped, optimizer.state_dict())
    return wrapped


def _check_codecs_with(codec: Any, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer that applies momentum under DGC's momentum correction (the
    momentum would count twice), for the codec or any codec of a policy."""
    from sparcomm.dgc import check_setup
    from sparcomm.policy import CodecPolicy

    for each in codec.codecs if isinstance(codec, CodecPolicy) else (codec,):
        check_setup(each, optimizer=optimizer)


def broadcast_parameters(
    params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    root_rank: int = 0,
    comm: Any = None,
) -> None:
    """Overwrite every rank's tensors with ``root_rank``'s, in place.

    Parameters
    ----------
    params : dict or iterable of (name, Tensor)
        ``model.state_dict()`` or ``model.named_parameters()``.
    root_rank : int
    comm : mpi4py.MPI.Comm, optional
    """
    from sparcomm.reducer import _default_comm

    comm = _default_comm(comm)
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    names = [name for name, _ in items]
    root_names = comm.bcast(names, root=root_rank)
    if root_names != names:
        raise ValueError(
            f"rank {comm.Get_rank()} has parameters {names[:3]}..., rank {root_rank} has "
            f"{root_names[:3]}...: build the same model on every rank"
        )
    with torch.no_grad():
        for _, tensor in items:
            if tensor.device.type == "cpu" and tensor.is_contiguous():
                comm.Bcast(_bits(tensor.detach()), root=root_rank)
            else:
                # Non-contiguous or device tensors travel through a host copy: MPI may not
                # be CUDA-aware.
                host = tensor.detach().cpu().contiguous()
                comm.Bcast(_bits(host), root=root_rank)
                tensor.copy_(host)


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory; bfloat16 (no NumPy dtype) as its int16 bits."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def broadcast_optimizer_state(
    optimizer: torch.optim.Optimizer, root_rank: int = 0, comm: Any = None
) -> None:
    """Overwrite every rank's optimizer state (hyper-parameters, buffers) with the root's.

    Error-feedback residuals are per rank and are not broadcast.
    """
    from sparcomm.reducer import _default_comm

    comm = _default_comm(comm)
    state = comm.bcast(
        torch.optim.Optimizer.state_dict(optimizer) if comm.Get_rank() == root_rank else None,
        root=root_rank,
    )
    if comm.Get_rank() != root_rank:
        torch.optim.Optimizer.load_state_dict(optimizer, state)
