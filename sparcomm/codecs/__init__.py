"""The codecs: one module per codec; they call kernels, never Numba or CuPy directly."""

from __future__ import annotations

from sparcomm.codecs._base import Codec
from sparcomm.codecs.baselines import FP16, NoCompression
from sparcomm.codecs.onebit import OneBit
from sparcomm.codecs.powersgd import PowerSGD
from sparcomm.codecs.qsgd import QSGD
from sparcomm.codecs.terngrad import TernGrad
from sparcomm.codecs.topk import TopK

__all__ = ["Codec", "FP16", "NoCompression", "OneBit", "PowerSGD", "QSGD", "TernGrad", "TopK"]
