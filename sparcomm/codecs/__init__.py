"""The codecs: one module per codec; they call kernels, never Numba or CuPy directly.

Every codec class registers itself when defined (``class TopK(Codec, codec_id=3,
family="sparse")``); :data:`CODECS` (or :func:`registry`) lists them, with their
standard configurations (``CODECS.presets(tag)``), for the CLI, demo, benchmarks and
tests.  A codec defined outside sparcomm registers the same way and runs through
``sparcomm.allreduce``, ``GradientReducer`` and ``DistributedOptimizer`` by its family
(docs/api.md, "Writing a codec").
"""

from __future__ import annotations

from sparcomm.codecs._base import Codec, NonFiniteError
from sparcomm.codecs._registry import CODECS, FAMILIES, CodecRegistry, Preset, registry
from sparcomm.codecs._wire import INPUT, Elements, Entries, Packed, PerBucket, Wire
from sparcomm.codecs.baselines import FP16, NoCompression
from sparcomm.codecs.onebit import OneBit
from sparcomm.codecs.powersgd import PowerSGD
from sparcomm.codecs.qsgd import QSGD
from sparcomm.codecs.terngrad import TernGrad
from sparcomm.codecs.topk import TopK

__all__ = [
    "CODECS",
    "FAMILIES",
    "FP16",
    "INPUT",
    "QSGD",
    "Codec",
    "CodecRegistry",
    "Elements",
    "Entries",
    "NoCompression",
    "NonFiniteError",
    "OneBit",
    "Packed",
    "PerBucket",
    "PowerSGD",
    "Preset",
    "TernGrad",
    "TopK",
    "Wire",
    "registry",
]
