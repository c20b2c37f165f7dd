"""Checkpoints that survive a change of world size, and single-file checkpoints.

Error-feedback residuals are per rank: a job resumed at another number of ranks has no
residual of its own to load.  Two ways on:

- ``residuals="drop"``: start with empty residuals.  Loses the gradient mass that was
  held back when the checkpoint was taken (at most what top-k left out over the last
  few steps; error feedback then rebuilds it).
- ``residuals="redistribute"`` (default): sum each residual over the old ranks and give
  every new rank an equal share, chosen so the next reduction applies the same held-back
  mass: with ``op="sum"`` the sum over ranks is what is applied, so each new rank gets
  ``total / P_new``; with ``op="mean"`` the mean over ranks is applied, so each new rank
  gets ``total / P_old`` (the mean of the old residuals).  Nothing is lost; the split
  over ranks differs from the one training would have produced.

At the same world size, every rank gets its own residuals back (an exact resume).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RESIDUAL_MODES = ("redistribute", "drop")
_STATE_KEY = "sparcomm"  # the optimizer state_dict entry of sparcomm.torch
_FILE_FORMAT = 1


def reshard_reducer_state(
    states: Sequence[Mapping[str, Any]],
    rank: int,
    size: int,
    *,
    op: str,
    residuals: str = "redistribute",
) -> dict[str, Any]:
    """A :class:`~sparcomm.reducer.GradientReducer` state for ``rank`` of ``size`` from
    the states that the ranks of an earlier job saved.

    Parameters
    ----------
    states : sequence of dict
        ``reducer.state_dict()`` of every rank of the old job, in rank order (one state
        is enough for ``residuals="drop"``).
    rank, size : int
        The loading rank and the new world size.
    op : {"mean", "sum"}
        The loading reducer's op (decides the redistributed share, see module notes).
    residuals : {"redistribute", "drop"}

    Returns
    -------
    dict
        A state that ``load_state_dict`` of rank ``rank`` of ``size`` accepts.

    Raises
    ------
    ValueError
        For an unknown mode, an empty or inconsistent list, or a redistribution from an
        incomplete list of ranks.
    NotImplementedError
        For a codec state other than error-feedback residuals at a new world size.
    """
    if residuals not in RESIDUAL_MODES:
        raise ValueError(f"residuals must be one of {RESIDUAL_MODES}, got {residuals!r}")
    if not states:
        raise ValueError("states is empty: pass every old rank's optimizer/reducer state")
    first = states[0]
    old_size = int(first["size"])
    for index, state in enumerate(states):
        if state.get("codec") != first.get("codec") or state.get("step") != first.get("step"):
            raise ValueError(
                f"states come from different jobs or steps: rank 0 saved {first.get('codec')} "
                f"at step {first.get('step')}, entry {index} {state.get('codec')} at step "
                f"{state.get('step')}"
            )
    complete = len(states) == old_size and all(
        int(state["rank"]) == index and int(state["size"]) == old_size
        for index, state in enumerate(states)
    )
    if residuals == "redistribute" and not complete:
        raise ValueError(
            f"redistributing residuals needs the states of all {old_size} old ranks in rank "
            f"order, got {len(states)}; pass every rank's state, or residuals='drop'"
        )
    result = dict(first)
    result["rank"], result["size"] = rank, size
    if residuals == "redistribute" and old_size == size:
        result["codec_state"] = states[rank]["codec_state"]  # exact resume
        return result
    codec_state = first["codec_state"]
    if codec_state is None or codec_state == {}:
        return result
    if not (isinstance(codec_state, Mapping) and "residuals" in codec_state):
        raise NotImplementedError(
            f"the state of codec {first.get('codec')} is not error-feedback residuals and "
            f"cannot move from {old_size} to {size} ranks; resume at {old_size} ranks"
        )
    shared: dict[Any, np.ndarray] = {}
    if residuals == "redistribute":
        totals: dict[Any, np.ndarray] = {}
        for state in states:
            for key, value in state["codec_state"]["residuals"].items():
                array = np.asarray(value)
                if key in totals:
                    totals[key] = totals[key] + array
                else:
                    totals[key] = array.astype(array.dtype, copy=True)
        share = old_size if op == "mean" else size
        shared = {key: total / total.dtype.type(share) for key, total in totals.items()}
    new_state = dict(codec_state)
    new_state["residuals"] = shared
    if "dtypes" in codec_state:
        new_state["dtypes"] = {key: value.dtype.name for key, value in shared.items()}
    result["codec_state"] = new_state
    return result


def load_optimizer_state(
    optimizer: Any,
    states: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    *,
    residuals: str = "redistribute",
) -> None:
    """Load a :func:`~sparcomm.torch.DistributedOptimizer` state saved at any world size.

    Parameters
    ----------
    optimizer : DistributedOptimizer
    states : dict or sequence of dict
        ``optimizer.state_dict()`` of every rank of the old job, in rank order (for
        instance every per-rank file, read on every rank); a single one with
        ``residuals="drop"``.
    residuals : {"redistribute", "drop"}
        See :mod:`sparcomm._checkpoint`.
    """
    # Duck-typed (sparcomm.torch imports this module): what DistributedOptimizer adds.
    if not hasattr(optimizer, "_sparcomm_reducer"):
        raise TypeError(
            f"optimizer must be a sparcomm DistributedOptimizer, got {type(optimizer).__name__}"
        )
    if isinstance(states, Mapping):
        states = [states]
    missing = [index for index, state in enumerate(states) if _STATE_KEY not in state]
    if missing:
        raise ValueError(
            f"states {missing} have no {_STATE_KEY!r} entry: they are not "
            "DistributedOptimizer.state_dict() outputs"
        )
    reducer = optimizer.reducer
    comm = reducer.comm
    # torch's load_state_dict keeps tensors that already have the parameter's dtype and
    # device: copy them, or two optimizers loaded from one state would share buffers.
    state = copy.deepcopy({k: v for k, v in states[0].items() if k != _STATE_KEY})
    state[_STATE_KEY] = reshard_reducer_state(
        [s[_STATE_KEY] for s in states],
        comm.Get_rank(),
        comm.Get_size(),
        op=reducer.op,
        residuals=residuals,
    )
    optimizer.load_state_dict(state)


def save_checkpoint(path: Any, model: Any, optimizer: Any, comm: Any = None, **extra: Any) -> None:
    """Write one checkpoint file from rank 0: the model, the optimizer and every rank's
    error-feedback residuals (gathered).  Collective.

    Parameters
    ----------
    path : str or os.PathLike
        Written by rank 0 only (``torch.save``).
    model : torch.nn.Module
        Identical on every rank (data parallel): rank 0's state is saved.
    optimizer : DistributedOptimizer
    comm : mpi4py.MPI.Comm, optional
    **extra
        Saved as they are (epoch, scheduler state, ...) and returned by
        :func:`load_checkpoint`.
    """
    import torch

    from sparcomm.reducer import _default_comm

    comm = _default_comm(comm)
    state = optimizer.state_dict()
    reducer_states = comm.gather(state.pop(_STATE_KEY), root=0)
    error = None
    if comm.Get_rank() == 0:
        try:
            torch.save(
                {
                    "format": _FILE_FORMAT,
                    "world_size": comm.Get_size(),
                    "model": model.state_dict(),
                    "optimizer": state,
                    _STATE_KEY: reducer_states,
                    "extra": extra,
                },
                path,
            )
        except Exception as caught:  # told to every rank below
            error = f"{type(caught).__name__}: {caught}"
    error = comm.bcast(error, root=0)
    if error is not None:
        raise OSError(f"rank 0 could not write the checkpoint {path}: {error}")


def load_checkpoint(
    path: Any,
    model: Any,
    optimizer: Any = None,
    comm: Any = None,
    *,
    residuals: str = "redistribute",
) -> dict[str, Any]:
    """Read a :func:`save_checkpoint` file on rank 0, broadcast it, load it everywhere,
    at any world size.  Collective.

    Parameters
    ----------
    path : str or os.PathLike
        Read by rank 0 only.
    model : torch.nn.Module
    optimizer : DistributedOptimizer, optional
    comm : mpi4py.MPI.Comm, optional
    residuals : {"redistribute", "drop"}
        At another world size: see :mod:`sparcomm._checkpoint`.  At the same world
        size ``"redistribute"`` gives every rank its own residuals back.

    Returns
    -------
    dict
        The ``**extra`` saved with the checkpoint.
    """
    import torch

    from sparcomm.reducer import _default_comm

    if residuals not in RESIDUAL_MODES:
        raise ValueError(f"residuals must be one of {RESIDUAL_MODES}, got {residuals!r}")
    comm = _default_comm(comm)
    content, error = None, None
    if comm.Get_rank() == 0:
        try:
            content = torch.load(path, weights_only=False)
            if not (isinstance(content, dict) and content.get("format") == _FILE_FORMAT):
                raise ValueError("not a sparcomm.torch.save_checkpoint file")
        except Exception as caught:
            content, error = None, f"{type(caught).__name__}: {caught}"
    content, error = comm.bcast((content, error), root=0)
    if error is not None:
        raise ValueError(f"rank 0 could not read the checkpoint {path}: {error}")
    model.load_state_dict(content["model"])
    if optimizer is not None:
        states = [
            dict(content["optimizer"], **{_STATE_KEY: reducer_state})
            for reducer_state in content[_STATE_KEY]
        ]
        load_optimizer_state(optimizer, states, residuals=residuals)
    return dict(content["extra"])
