"""Input validation of the collectives: local checks, run before the agreement.

Nothing here talks to other ranks: a collective runs these checks while preparing its
input, holds back any exception, and the signature check (:mod:`._protocol`) raises it
on every rank.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from sparcomm._errors import non_finite_error
from sparcomm.comm import _device
from sparcomm.comm._protocol import DTYPE_CODES, OP_CODES
from sparcomm.kernels.cpu import merge as _merge
from sparcomm.kernels.cpu import reduce as _reduce

#: The reductions, in the order messages list them.
OPS = tuple(OP_CODES)


def index_dtype(n: int) -> np.dtype:
    """int32 indices while they fit (below 2**31 elements), else int64."""
    return np.dtype(np.int32) if n <= np.iinfo(np.int32).max else np.dtype(np.int64)


def check_common(op: str, algorithm: str, allowed: tuple[str, ...]) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if algorithm not in allowed:
        raise ValueError(f"algorithm must be one of {allowed}, got {algorithm!r}")


def check_values(x: Any, name: str) -> Any:
    """``x`` if it is a float32/float64 NumPy or CuPy array, else a clear TypeError."""
    if not isinstance(x, np.ndarray) and not _device.is_device(x):
        raise TypeError(
            f"{name} must be a numpy.ndarray or cupy.ndarray, got "
            f"{type(x).__module__}.{type(x).__qualname__}; convert it with numpy.asarray() "
            "(a torch tensor: tensor.numpy(), or cupy.from_dlpack(tensor) on a GPU)"
        )
    if x.dtype not in DTYPE_CODES:
        raise TypeError(
            f"{name} must be float32 or float64, got {x.dtype}; cast it with "
            f"{name}.astype(numpy.float32)"
        )
    return x


def check_tensor(x: Any, name: str = "x") -> Any:
    """:func:`check_values`, and at least one dimension and one element: the input of
    a dense-buffer collective (``allreduce``)."""
    x = check_values(x, name)
    if x.ndim == 0:
        raise ValueError(
            f"{name} must have at least one dimension, got a 0-d array; pass "
            f"{name}.reshape(1) (and take element 0 of the result)"
        )
    if x.size == 0:
        raise ValueError(
            f"{name} is empty (shape {x.shape}); expected at least one element: there is "
            "nothing to reduce, skip the call on every rank"
        )
    return x


def check_step(step: Any) -> None:
    """``step`` is None or an int >= 0 (the random stream's step; checked where no codec
    encode would check it)."""
    if step is None:
        return
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int or None, got {type(step).__name__} {step!r}")
    if step < 0:
        raise ValueError(f"step must be in [0, inf], got {step}; steps count from 0")


def check_out(out: Any, n: int, dtype: np.dtype, device: bool = False) -> None:
    """``out`` must be None or a C-contiguous array of ``n`` x ``dtype`` on the input's
    device (NumPy for host inputs, CuPy for device inputs)."""
    if out is None:
        return
    kind = "cupy.ndarray" if device else "numpy.ndarray"
    on_device = _device.is_device(out)
    if not (on_device if device else isinstance(out, np.ndarray)) or out.dtype != dtype:
        raise TypeError(
            f"out must be a {kind} of dtype {dtype} (on the input's device), got "
            f"{type(out).__module__}.{type(out).__qualname__}"
            + (f" of dtype {out.dtype}" if hasattr(out, "dtype") else "")
        )
    if out.size != n or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be C-contiguous with {n} elements, got {out.size} elements "
            f"(contiguous: {out.flags.c_contiguous})"
        )


def check_no_partial_overlap(out: Any, x: Any) -> None:
    """``out=x`` works in place; a buffer that overlaps ``x`` only in part is refused."""
    if out is None or out is x:
        return
    xp = sys.modules["cupy"] if _device.is_device(x) else np
    if xp.shares_memory(out, x):
        raise ValueError("out overlaps x partially; pass out=x or a separate buffer")


def check_finite(values: np.ndarray, name: str) -> None:
    """Raise :class:`~sparcomm.codecs._base.NonFiniteError` if ``values`` (host, 1-D,
    contiguous) holds NaN or Inf: one read pass, ``max_abs`` over the bit patterns (NaN
    and Inf beat every finite value).  For streams of k entries, whose values nothing
    else reads before they travel (a codec's own payload, or the user's)."""
    if values.size == 0:
        return
    largest = np.empty(1, dtype=values.dtype)
    _reduce.max_abs(values, values.size, largest)
    if not np.isfinite(largest[0]):
        raise non_finite_error(int(np.count_nonzero(~np.isfinite(values))), name)


def prepare_stream(indices: Any, values: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a user stream; sort it and sum duplicates when needed (stable order)."""
    values = check_values(values, "values")
    if not isinstance(indices, np.ndarray) or indices.dtype.kind not in "iu":
        raise TypeError(
            f"indices must be a numpy.ndarray of integers, got "
            f"{getattr(indices, 'dtype', type(indices).__qualname__)}"
        )
    if indices.ndim != 1 or values.ndim != 1 or indices.size != values.size:
        raise ValueError(
            f"indices and values must be 1-D of the same length, got shapes "
            f"{indices.shape} and {values.shape}"
        )
    wire = index_dtype(n)
    if indices.dtype.kind == "u" and indices.size and int(indices.max()) >= n:
        raise ValueError(f"indices must lie in [0, n) = [0, {n}), got max {int(indices.max())}")
    indices = np.ascontiguousarray(indices, dtype=np.int64 if indices.dtype.kind == "u" else None)
    values = np.ascontiguousarray(values)
    check_finite(values, "values")
    state = _merge.check_stream(indices, n)
    if state == 2:
        raise ValueError(
            f"indices must lie in [0, n) = [0, {n}), got min {int(indices.min())}, "
            f"max {int(indices.max())}"
        )
    if state == 1:
        # Unsorted or duplicated (an embedding gradient): sort stably and sum duplicates
        # in their input order, so the result does not depend on the sort algorithm.
        order = np.argsort(indices, kind="stable")
        sorted_i, sorted_v = indices[order], values[order]
        out_i = np.empty_like(sorted_i)
        out_v = np.empty_like(sorted_v)
        count = _merge.coalesce_sorted(sorted_i, sorted_v, out_i, out_v)
        indices, values = out_i[:count], out_v[:count]
    return np.ascontiguousarray(indices, dtype=wire), values
