"""Names users bring from Horovod: reduction ops and ``Compression``, mapped to sparcomm's.

``sparcomm.torch`` re-exports them (``sparcomm.torch.Average``, ``Sum``, ``Compression``),
so ``DistributedOptimizer(opt, op=Average, compression=Compression.fp16)`` reads as it
does with Horovod.  This module imports neither torch nor MPI.
"""

from __future__ import annotations

import enum
from typing import Any

from sparcomm.codecs import FP16, NoCompression


class ReduceOp(enum.Enum):
    """Horovod's reduction ops; the value is sparcomm's name for it."""

    AVERAGE = "mean"
    SUM = "sum"
    ADASUM = "adasum"


Average = ReduceOp.AVERAGE
Sum = ReduceOp.SUM
Adasum = ReduceOp.ADASUM

_SPELLINGS = {"mean": "mean", "average": "mean", "avg": "mean", "sum": "sum"}


def normalize_op(op: Any) -> str:
    """``"mean"`` or ``"sum"`` for any accepted spelling of a reduction op.

    Accepts :data:`Average`, :data:`Sum` and the strings ``"mean"``, ``"average"``,
    ``"avg"`` and ``"sum"`` (any case).

    Raises
    ------
    NotImplementedError
        For Horovod's ``Adasum``.
    TypeError, ValueError
        For anything else.
    """
    if isinstance(op, ReduceOp):
        name = op.value
    elif isinstance(op, str):
        name = op.lower()
    else:
        raise TypeError(
            f"op must be sparcomm.torch.Average, sparcomm.torch.Sum or one of the strings "
            f"{sorted(_SPELLINGS)}, got {type(op).__name__} {op!r}"
        )
    if name == "adasum":
        raise NotImplementedError(
            "op=Adasum is not supported: sparcomm reduces by sum or average; use "
            "op=sparcomm.torch.Average"
        )
    if name not in _SPELLINGS:
        raise ValueError(f"op must be one of {sorted(_SPELLINGS)} (or Average, Sum), got {op!r}")
    return _SPELLINGS[name]


class Compression:
    """Horovod's ``hvd.Compression`` names, as sparcomm codecs.

    ``Compression.none`` is :class:`~sparcomm.NoCompression` and ``Compression.fp16``
    :class:`~sparcomm.FP16` (values travel as IEEE half: Horovod's fp16 compressor).
    Any sparcomm codec may be passed as ``compression=`` as well.
    """

    none = NoCompression()
    fp16 = FP16()
