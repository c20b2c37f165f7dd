"""Collectives over MPI: the SparCML sparse allreduce family, the quantized family, the
dense path, the cost model that chooses between algorithms, and per-call statistics.

One concern per module; imports point down this list (tests/comm/test_imports.py):

* ``_allreduce`` -- the public entry point :func:`allreduce` (dispatch only);
* ``_dispatch`` -- the table family -> collective (:func:`register_family`,
  :func:`register_collective`);
* the families: ``_dense``, ``_sparse_allreduce`` (entry) and ``_sparse`` (SparCML's
  algorithms), ``_quantized``, ``_quantized_dsar`` (Q-DSAR);
* ``_cost`` -- the one cost model (alpha-beta, calibration, ``auto``), with
  ``_quantized_layout`` (chunks, integer sums);
* ``_call`` -- the start of every collective (``begin_call``, the agreement);
* ``_validate`` -- local input checks;
* ``_protocol`` -- the agreement protocol and its code tables;
* ``_context`` (private communicator, byte-counted channel), ``_stats``
  (:class:`AllreduceStats`), ``_device`` (CuPy staging).

No module here names a codec class: codecs describe themselves (family, wire layout,
capabilities).  The merge kernels live in ``sparcomm.kernels.cpu.merge``.
"""

from __future__ import annotations

from sparcomm.comm._allreduce import (
    allreduce,
    register_collective,
    register_family,
    sparse_allreduce,
)
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
from sparcomm.comm._tune import set_tuning

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
    "register_family",
    "set_cost_model",
    "set_tuning",
    "sparse_allreduce",
]
