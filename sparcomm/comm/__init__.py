"""Collectives over MPI: the SparCML sparse allreduce family, the dense path, the cost
model that chooses between them, and per-call statistics.

One module per concern: ``_allreduce`` (public entry points, signature check, codec
registry), ``_sparse`` (allgather, SSAR recursive doubling, SSAR split-allgather, DSAR),
``_cost`` (alpha-beta cost model, calibration, ``auto``), ``_context`` (private duplicate
communicator, byte-counted MPI calls), ``_stats`` (:class:`AllreduceStats`).  The merge
kernels live in ``sparcomm.kernels.cpu.merge``.
"""

from __future__ import annotations

from sparcomm.comm._allreduce import allreduce, register_collective, sparse_allreduce
from sparcomm.comm._cost import (
    ALL_ALGORITHMS,
    SPARSE_ALGORITHMS,
    CostModel,
    calibrate,
    choose,
    cost_model,
    predict,
    set_cost_model,
)
from sparcomm.comm._lowrank import powersgd_allreduce
from sparcomm.comm._stats import AllreduceStats

__all__ = [
    "ALL_ALGORITHMS",
    "SPARSE_ALGORITHMS",
    "AllreduceStats",
    "CostModel",
    "allreduce",
    "calibrate",
    "choose",
    "cost_model",
    "powersgd_allreduce",
    "predict",
    "register_collective",
    "set_cost_model",
    "sparse_allreduce",
]
