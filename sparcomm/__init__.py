"""sparcomm: gradient compression and compressed collectives for data-parallel training.

The compute kernels live in the top-level ``kernels/`` directory of the source tree and
are installed as ``sparcomm.kernels`` (``cpu``: Numba, ``gpu``: CuPy/CUDA).

Importing sparcomm imports neither MPI, CuPy nor torch: the collectives
(``sparcomm.allreduce``, ``sparcomm.sparse_allreduce``) load ``mpi4py`` on first use.
"""

from __future__ import annotations

from typing import Any

from sparcomm._errors import NonFiniteError
from sparcomm.codecs import (
    FP16,
    QSGD,
    Codec,
    NoCompression,
    OneBit,
    PowerSGD,
    TernGrad,
    TopK,
)
from sparcomm.dgc import DGC
from sparcomm.feedback import ErrorFeedback
from sparcomm.payload import Payload
from sparcomm.policy import CodecPolicy, Rule
from sparcomm.schedule import Constant, Exponential, Linear, Schedule

__version__ = "0.1.0"

__all__ = [
    "FP16",
    "QSGD",
    "Codec",
    "CodecPolicy",
    "Constant",
    "DGC",
    "ErrorFeedback",
    "Exponential",
    "GradientReducer",
    "Linear",
    "NoCompression",
    "NonFiniteError",
    "OneBit",
    "Payload",
    "PowerSGD",
    "Rule",
    "Schedule",
    "TernGrad",
    "TopK",
    "AllreduceStats",
    "abort_on_exception",
    "allreduce",
    "init",
    "local_rank",
    "local_size",
    "rank",
    "size",
    "sparse_allreduce",
]

_LAZY = {
    "abort_on_exception": "sparcomm._abort",
    "allreduce": "sparcomm.comm",
    "sparse_allreduce": "sparcomm.comm",
    "AllreduceStats": "sparcomm.comm",
    "GradientReducer": "sparcomm.reducer",
    "init": "sparcomm._runtime",
    "rank": "sparcomm._runtime",
    "size": "sparcomm._runtime",
    "local_rank": "sparcomm._runtime",
    "local_size": "sparcomm._runtime",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparcomm' has no attribute {name!r}")
