"""How each gradient of :func:`sparcomm.torch.DistributedOptimizer` reaches the reducer
and comes back: dtype conversion (fp16/bf16 reduced in float32), sparse embedding
gradients (:func:`sparcomm.sparse_allreduce`), Horovod's ``sparse_as_dense``,
``gradient_predivide_factor`` and ``num_groups``, and the GradScaler-compatible handling
of non-finite gradients.

The plan is made at the first ``synchronize()`` (not at construction): only then is it
known which parameters have sparse gradients (``torch.nn.Embedding(sparse=True)``), and
every rank agrees on it before the reducer's buckets are built.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparcomm._errors import NonFiniteError
from sparcomm._torch_arrays import as_array as _as_array
from sparcomm._torch_arrays import as_tensor as _as_tensor
from sparcomm.reducer import GradientReducer, build_plan

#: Gradients in these dtypes are reduced in float32 (the codecs compute in float32, and
#: NumPy has no bfloat16).
WIDENED = (torch.float16, torch.bfloat16)
NON_FINITE_MODES = ("raise", "propagate")


@dataclass(frozen=True)
class GradOptions:
    """Options of the torch boundary (validated by :func:`check_options`)."""

    sparse_as_dense: bool = False
    gradient_predivide_factor: float = 1.0
    num_groups: int | None = None
    non_finite: str = "raise"


def check_options(options: GradOptions, op: str) -> None:
    """Raise TypeError/ValueError for a bad option (on every rank alike: no collective)."""
    if not isinstance(options.sparse_as_dense, bool):
        raise TypeError(f"sparse_as_dense must be a bool, got {options.sparse_as_dense!r}")
    factor = options.gradient_predivide_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise TypeError(f"gradient_predivide_factor must be a float, got {factor!r}")
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"gradient_predivide_factor must be finite and > 0, got {factor}")
    if factor != 1.0 and op != "mean":
        raise ValueError(
            "gradient_predivide_factor splits the averaging before and after the sum, so it "
            f"needs op=Average, got op={op!r} (as in Horovod)"
        )
    groups = options.num_groups
    if groups is not None and (
        isinstance(groups, bool) or not isinstance(groups, int) or groups < 1
    ):
        raise ValueError(f"num_groups must be None or an int >= 1, got {groups!r}")
    if options.non_finite not in NON_FINITE_MODES:
        raise ValueError(
            f"non_finite must be one of {NON_FINITE_MODES}, got {options.non_finite!r}"
        )


def reduced_dtype(p: torch.Tensor) -> np.dtype:
    """The NumPy dtype a parameter's gradient is reduced in."""
    if p.dtype in (torch.float32, torch.float64):
        return np.dtype(torch.empty((), dtype=p.dtype).numpy().dtype)
    if p.dtype in WIDENED:
        return np.dtype(np.float32)
    raise TypeError(
        f"parameter of dtype {p.dtype}: sparcomm reduces float16, bfloat16, float32 and "
        "float64 gradients"
    )


def threshold_for_groups(
    specs: Sequence[tuple[Hashable, tuple[int, ...], np.dtype]], groups: int, compression: str
) -> int:
    """The smallest fusion threshold with which the dense plan has at most ``groups``
    buckets (Horovod's ``num_groups``; next-fit packing never needs more buckets for a
    larger threshold, so a bisection finds it)."""

    def count(threshold: int) -> int:
        plan = build_plan(
            specs,
            compress=False,
            fusion_threshold_bytes=threshold,
            dense_below=0,
            compression=compression,
        )
        return len(plan.buckets)

    low = 0
    high = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for _, shape, dtype in specs)
    while low < high:
        middle = (low + high) // 2
        if count(middle) <= groups:
            high = middle
        else:
            low = middle + 1
    return high


class GradientRouting:
    """The torch side of one :func:`~sparcomm.torch.DistributedOptimizer`.

    Parameters
    ----------
    reducer : GradientReducer
    names : dict of Tensor to str
    ordered : list of Tensor
        Parameters in expected ready order (the bucket order).
    passes : int
        ``backward_passes_per_step``.
    options : GradOptions
    """

    def __init__(
        self,
        reducer: GradientReducer,
        names: dict[torch.Tensor, str],
        ordered: list[torch.Tensor],
        passes: int,
        options: GradOptions,
    ) -> None:
        for p in ordered:
            reduced_dtype(p)  # refuse integer or complex parameters now
        self.reducer = reducer
        self.names = names
        self.ordered = ordered
        self.passes = passes
        self.options = options
        self.planned = False
        self.sparse: list[torch.Tensor] = []
        self.dense: list[torch.Tensor] = list(ordered)
        self._sparse_dims: dict[torch.Tensor, int] = {}
        self._snapshot: Any = None

    # -- the plan, at the first synchronize ------------------------------------------------
    def plan(self) -> None:
        """Classify parameters (sparse where any rank's gradient is sparse, unless
        ``sparse_as_dense``) and build the reducer's plan.  Collective."""
        from mpi4py import MPI

        comm = self.reducer.comm
        flags = np.array(
            [
                0
                if self.options.sparse_as_dense or p.grad is None or not p.grad.is_sparse
                else 1 + p.grad.sparse_dim()
                for p in self.ordered
            ],
            dtype=np.int64,
        )
        comm.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)
        self.sparse = [p for p, flag in zip(self.ordered, flags, strict=True) if flag]
        self._sparse_dims = {
            p: int(flag) - 1 for p, flag in zip(self.ordered, flags, strict=True) if flag
        }
        self.dense = [p for p in self.ordered if p not in self._sparse_dims]
        specs = [(self.names[p], tuple(p.shape), reduced_dtype(p)) for p in self.dense]
        if self.options.num_groups is not None and specs:
            self.reducer.fusion_threshold_bytes = threshold_for_groups(
                specs, self.options.num_groups, self.reducer.compression
            )
        if specs:
            self.reducer.setup(specs)
        self.planned = True

    # -- submission --------------------------------------------------------------------------
    def submit(self, p: torch.Tensor) -> None:
        """Hand ``p``'s gradient to the reducer (dense parameters; sparse ones wait for
        :meth:`finish`)."""
        if p in self._sparse_dims:
            return
        reducer = self.reducer
        if not reducer.in_flight and self.options.non_finite == "propagate":
            # Before the step's first encode: a skipped step restores the state of every
            # codec (each of a policy's, PowerSGD's own), as a failed reducer step does.
            self._snapshot = reducer._engine.snapshot()
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grad = p.grad
        if grad.is_sparse:  # sparse_as_dense, or a gradient that became sparse later
            grad = grad.to_dense()
        if grad.dtype in WIDENED:
            grad = grad.float()
        factor = self.options.gradient_predivide_factor
        if factor != 1.0:
            with torch.no_grad():
                grad = grad.mul(1.0 / factor) if grad is p.grad else grad.mul_(1.0 / factor)
        # The gradient is ours until the step: the reducer may write its result into it.
        reducer.submit(self.names[p], _as_array(grad), in_place=True)

    def submit_missing(self) -> None:
        for p in self.dense:
            if not self.reducer.submitted(self.names[p]):
                self.submit(p)

    # -- completion --------------------------------------------------------------------------
    def _post_scale(self) -> float:
        scale = 1.0
        if self.reducer.op == "mean" and self.passes > 1:
            # The gradient of the mean loss over every micro-batch of every rank (Horovod
            # leaves the division by the local passes to the user's loss scaling).
            scale /= self.passes
        return scale * self.options.gradient_predivide_factor

    def finish(self) -> None:
        """Wait for the dense reduction, reduce the sparse gradients, write ``p.grad``."""
        propagate = self.options.non_finite == "propagate"
        outputs: dict[Hashable, Any] = {}
        if self.dense:
            try:
                outputs = self.reducer.wait()
            except (TypeError, ValueError, NotImplementedError, RuntimeError):
                # The collective raised on every rank: a non-finite gradient anywhere
                # makes it a step that every rank skips; anything else is an error.
                if not (propagate and self._any_rank_non_finite()):
                    raise
                self._skip()
                return
        scale = self._post_scale()
        with torch.no_grad():
            for p in self.dense:
                result = _as_tensor(outputs[self.names[p]])
                grad = p.grad
                if grad is None or grad.is_sparse:
                    p.grad = result.to(p.dtype).reshape(p.shape)
                elif _adoptable(result, grad):
                    # As Horovod's ``p.grad.set_(output)``: the gradient takes the
                    # result's memory instead of a copy (a pass over every gradient, 8-12
                    # ms a step at 10.5 M parameters).  The reducer never reuses an output
                    # it has handed out, so the memory is the gradient's alone.
                    view = result.view(grad.shape)
                    grad.set_(
                        view.untyped_storage(), view.storage_offset(), view.size(), view.stride()
                    )
                else:
                    grad.copy_(result)
                if scale != 1.0:
                    p.grad.mul_(scale)  # type: ignore[union-attr, unused-ignore]
            for p in self.sparse:
                try:
                    p.grad = self._reduce_sparse(p, scale)
                except NonFiniteError:
                    # Raised on every rank alike (sparse_allreduce checks the values
                    # through its agreement): a step that every rank skips.
                    if not propagate:
                        raise
                    self._skip()
                    return
        if propagate and not all(_finite(p.grad) for p in self.ordered):
            # Identical on every rank (the reduced values are), so no agreement needed.
            self._skip()
        self._snapshot = None

    def _any_rank_non_finite(self) -> bool:
        from mpi4py import MPI

        local = not all(_finite(p.grad) for p in self.ordered)
        return bool(self.reducer.comm.allreduce(int(local), op=MPI.MAX))

    def _skip(self) -> None:
        """Every rank: residuals as before the step, every gradient NaN (GradScaler's
        ``unscale_`` finds them and the step is skipped everywhere)."""
        if self._snapshot is not None:
            self.reducer._engine.restore(self._snapshot)
        self._snapshot = None
        with torch.no_grad():
            for p in self.ordered:
                if p.grad is None:
                    p.grad = torch.full_like(p, float("nan"))
                elif p.grad.is_sparse:
                    p.grad = torch.full_like(p, float("nan"))
                else:
                    p.grad.fill_(float("nan"))

    # -- sparse gradients ---------------------------------------------------------------------
    def _reduce_sparse(self, p: torch.Tensor, scale: float) -> torch.Tensor:
        """Sum ``p``'s COO gradient over ranks with :func:`sparcomm.sparse_allreduce`.

        Rows (the sparse dimensions) times the dense trailing dimensions become flat
        element indices; the sum comes back as a coalesced COO tensor of the same
        sparse dimensions (what ``SparseAdam`` and sparse ``SGD`` expect).
        """
        from sparcomm.comm import sparse_allreduce

        sparse_dim = self._sparse_dims[p]
        shape = tuple(p.shape)
        row_shape, dense_shape = shape[:sparse_dim], shape[sparse_dim:]
        width = int(np.prod(dense_shape, dtype=np.int64))
        grad = p.grad
        dtype = reduced_dtype(p)
        if grad is None:
            flat = np.empty(0, dtype=np.int64)
            values = np.empty(0, dtype=dtype)
        else:
            if not grad.is_sparse:
                grad = grad.to_sparse(sparse_dim)
            rows = np.ravel_multi_index(tuple(grad._indices().numpy()), row_shape)
            flat = (rows[:, None] * width + np.arange(width)).reshape(-1)
            wide = torch.float64 if dtype == np.float64 else torch.float32
            values = np.ascontiguousarray(grad._values().to(wide).numpy().reshape(-1))
        summed_indices, summed_values = sparse_allreduce(
            flat,
            values,
            p.numel(),
            comm=self.reducer.comm,
            op=self.reducer.op,
            dense_output=False,
        )
        rows = summed_indices // width
        unique_rows = np.unique(rows)
        block = np.zeros((unique_rows.size, width), dtype=summed_values.dtype)
        block[np.searchsorted(unique_rows, rows), summed_indices % width] = summed_values
        if scale != 1.0:
            block *= block.dtype.type(scale)
        index_tensor = torch.from_numpy(
            np.stack(np.unravel_index(unique_rows, row_shape)).astype(np.int64)
        ).reshape(sparse_dim, -1)
        value_tensor = torch.from_numpy(block).reshape(unique_rows.size, *dense_shape)
        # Built from sorted unique in-range rows: valid by construction, no check pass.
        return torch.sparse_coo_tensor(
            index_tensor,
            value_tensor.to(p.dtype),
            shape,
            is_coalesced=True,
            check_invariants=False,
        )


def _adoptable(result: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether ``grad`` can take ``result``'s memory as it is: same dtype and device,
    both dense and contiguous (else the result is copied into the gradient)."""
    return (
        result.dtype == grad.dtype
        and result.device == grad.device
        and result.numel() == grad.numel()
        and result.is_contiguous()
        and grad.is_contiguous()
        and grad.layout == torch.strided
    )


def _finite(t: torch.Tensor | None) -> bool:
    if t is None:
        return True
    values = t._values() if t.is_sparse else t
    return bool(torch.isfinite(values).all())
