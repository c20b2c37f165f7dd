"""The inputs of the golden-bytes test: fixed arrays, seeds, keys and steps per codec.

Kept apart from the expected digests so that the cases can be read (and regenerated)
without the digests; ``tests/codecs/test_golden_bytes.py`` holds the digests taken from
the code before the codec-architecture refactor (issue 12).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sparcomm import FP16, QSGD, ErrorFeedback, NoCompression, OneBit, TernGrad, TopK


def _x(seed: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * rng.uniform(0.5, 2.0)).astype(dtype)


def _plain(make: Callable[[], Any], shape: tuple[int, ...], dtype: Any, **options: Any):
    def run() -> bytes:
        x = _x(7, shape, dtype)
        return bytes(make().encode(x, key="layer.weight", step=3, **options).to_bytes())

    return run


def _two_steps(make: Callable[[], Any], shape: tuple[int, ...], dtype: Any):
    """Error feedback: the second payload depends on the residual of the first."""

    def run() -> bytes:
        codec = make()
        codec.encode(_x(1, shape, np.dtype(dtype)), key="w", step=0)
        return bytes(codec.encode(_x(2, shape, np.dtype(dtype)), key="w", step=1).to_bytes())

    return run


def _shared_scale() -> bytes:
    codec = TernGrad(bucket_size=64)
    x = _x(11, (1000,), np.float32)
    scale = codec.local_scales(x) * np.float32(1.5)
    return bytes(codec.encode(x, key=5, step=2, scale=scale).to_bytes())


#: case name -> a function returning the payload's bytes.
CASES: dict[str, Callable[[], bytes]] = {
    "NoCompression-f32": _plain(NoCompression, (17, 33), np.float32),
    "NoCompression-f64": _plain(NoCompression, (100,), np.float64),
    "FP16-f32": _plain(FP16, (17, 33), np.float32),
    "FP16-f64": _plain(FP16, (1001,), np.float64),
    "TopK-k-f32": _plain(lambda: TopK(k=37), (17, 33), np.float32),
    "TopK-density-f64": _plain(lambda: TopK(density=0.05), (2000,), np.float64),
    "QSGD-4bit-f32": _plain(lambda: QSGD(bits=4, seed=3), (3, 1000), np.float32),
    "QSGD-levels1-max-f32": _plain(
        lambda: QSGD(levels=1, bucket_size=100, norm="max", seed=9), (999,), np.float32
    ),
    "QSGD-8bit-f64": _plain(lambda: QSGD(bits=8, bucket_size=7), (1000,), np.float64),
    "TernGrad-f32": _plain(lambda: TernGrad(seed=2), (40, 25), np.float32),
    "TernGrad-bucket-clip-f64": _plain(
        lambda: TernGrad(bucket_size=5, clip=2.5, seed=1), (777,), np.float64
    ),
    "TernGrad-shared-scale-f32": _shared_scale,
    "OneBit-noef-f32": _plain(
        lambda: OneBit(bucket_size=4, error_feedback=False), (999,), np.float32
    ),
    "OneBit-ef-f32": _two_steps(OneBit, (2000,), np.float32),
    "OneBit-ef-f64": _two_steps(lambda: OneBit(bucket_size=100), (1000,), np.float64),
    "ErrorFeedback-TopK-f32": _two_steps(
        lambda: ErrorFeedback(TopK(density=0.01)), (5000,), np.float32
    ),
    "ErrorFeedback-QSGD-f64": _two_steps(lambda: ErrorFeedback(QSGD(bits=3)), (1500,), np.float64),
}


def payload_bytes(name: str) -> bytes:
    return CASES[name]()


def _slice(codec: Any, payload: Any, start: int, stop: int) -> Any:
    """The quantized collectives' payload slicing (elements ``[start, stop)``)."""
    return codec.slice_payload(payload, start, stop)


def _alignment(codec: Any) -> int:
    from sparcomm.comm._quantized_layout import chunk_alignment

    return chunk_alignment(codec)


#: case name -> (codec factory, n, dtype); sliced at every chunk of 3 owners.
SLICE_CODECS: dict[str, tuple[Callable[[], Any], int, Any]] = {
    "FP16": (FP16, 1003, np.float32),
    "QSGD-4bit-bucket7": (lambda: QSGD(bits=4, bucket_size=7, seed=1), 1003, np.float32),
    "QSGD-3bit": (lambda: QSGD(bits=3, bucket_size=64), 2000, np.float64),
    "TernGrad-tensor": (lambda: TernGrad(seed=4), 1003, np.float32),
    "TernGrad-bucket5": (lambda: TernGrad(bucket_size=5), 1003, np.float32),
    "OneBit-bucket4": (lambda: OneBit(bucket_size=4, error_feedback=False), 1003, np.float32),
}
SLICES = list(SLICE_CODECS)


def sliced_bytes(name: str) -> bytes:
    """Alignment, then the bytes of the slices of every owner's chunk (P = 3)."""
    make, n, dtype = SLICE_CODECS[name]
    codec = make()
    payload = codec.encode(_x(5, (n,), dtype), key="s", step=1)
    align = _alignment(codec)
    units = -(-n // align)
    bounds = [min(n, (j * units // 3) * align) for j in range(4)]
    parts = [str(align).encode()]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        if stop > start:
            parts.append(bytes(_slice(codec, payload, start, stop).to_bytes()))
    return b"|".join(parts)
