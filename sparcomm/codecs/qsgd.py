"""QSGD: stochastic rounding of each element to one of ``s`` levels of its bucket norm.

Reference: Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD
via Gradient Quantization and Encoding", NeurIPS 2017.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from sparcomm._backend import is_cupy_array
from sparcomm.codecs._base import Codec, check_int, non_finite_error
from sparcomm.codecs._registry import preset
from sparcomm.codecs._wire import INPUT, Packed, PerBucket, Wire
from sparcomm.payload import Payload

NORMS = {"l2": 0, "max": 1}
MAX_BITS = 8


def bits_for_levels(levels: int) -> int:
    """Bits per element on the wire: ``ceil(log2(levels + 1)) + 1`` (magnitude + sign)."""
    return math.ceil(math.log2(levels + 1)) + 1


def packed_nbytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)


def n_buckets(n: int, bucket_size: int) -> int:
    return -(-n // bucket_size)


class QSGD(Codec, codec_id=4, family="quantized"):
    """Unbiased stochastic quantisation with ``s`` levels per bucket.

    For each bucket ``v`` of ``bucket_size`` elements, ``scale = ||v||_2`` (or
    ``max |v_i|``); element ``i`` is sent as its sign and the level
    ``l = floor(s |v_i| / scale)``, rounded up with probability equal to the remainder,
    so ``E[decode] = v``.  Variance: ``E||decode - v||^2 <= min(d / s^2, sqrt(d) / s)
    ||v||^2`` for the L2 norm (Alistarh et al., Lemma 3.1).

    Parameters
    ----------
    bits : int, optional
        Bits per element on the wire, 2..8; ``levels = 2**(bits-1) - 1``.  Default 4.
    levels : int, optional
        Number of levels ``s`` (1..127); ``bits = ceil(log2(s + 1)) + 1``.  Give at most
        one of ``bits`` and ``levels``.
    bucket_size : int
        Elements per bucket (default 512), each with its own scale.
    norm : {"l2", "max"}
        Bucket scale: the L2 norm (QSGD) or the max-norm (lower variance in practice).
    seed : int
        Seed of the counter-based random stream (with rank, key and step).

    Notes
    -----
    Wire: ``ceil(n * bits / 8)`` bytes of packed ``(level << 1) | sign`` fields plus one
    scale per bucket in the input dtype.
    """

    wire = (
        Wire("scales", INPUT, PerBucket("bucket_size")),
        Wire("packed", np.uint8, Packed("bits")),
    )
    presets = (
        preset("qsgd2", lambda: QSGD(bits=2)),
        preset("qsgd4", lambda: QSGD(bits=4), "bench", "allreduce", "demo"),
        preset("qsgd8", lambda: QSGD(bits=8), "bench", "allreduce"),
        preset("qsgd4-bucket7", lambda: QSGD(bits=4, bucket_size=7), "test"),
        preset("qsgd-levels1-max", lambda: QSGD(levels=1, norm="max"), "test"),
    )
    is_unbiased = True
    is_stochastic = True
    dense_phase_capable = True

    def __init__(
        self,
        bits: int | None = None,
        *,
        levels: int | None = None,
        bucket_size: int = 512,
        norm: str = "l2",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if bits is not None and levels is not None:
            raise ValueError(
                f"give at most one of bits and levels, got bits={bits}, levels={levels}"
            )
        if levels is not None:
            levels = check_int(levels, "levels", 1, 2 ** (MAX_BITS - 1) - 1)
            bits = bits_for_levels(levels)
        else:
            bits = check_int(
                4 if bits is None else bits,
                "bits",
                2,
                MAX_BITS,
                "; 2 bits = sign + 1 level, 8 bits = sign + 127 levels",
            )
            levels = 2 ** (bits - 1) - 1
        self.bits = bits
        self.levels = levels
        self.bucket_size = check_int(
            bucket_size, "bucket_size", 1, math.inf, "; 512 is the default"
        )
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
        self.norm = norm
        self.seed = check_int(seed, "seed", 0, 2**64 - 1)

    def _describe(self) -> str:
        return (
            f"bits={self.bits}, levels={self.levels}, bucket_size={self.bucket_size}, "
            f"norm={self.norm!r}"
        )

    def _params(self, n: int) -> tuple[int, ...]:
        return (self.levels, self.bits, self.bucket_size, NORMS[self.norm])

    def _encode_flat(
        self, xp: ModuleType, kernels: ModuleType, flat: Any, stream: int, **options: Any
    ) -> dict[str, Any]:
        scales = xp.empty(n_buckets(flat.size, self.bucket_size), dtype=flat.dtype)
        packed = xp.empty(packed_nbytes(flat.size, self.bits), dtype=np.uint8)
        kernels.qsgd_encode(
            flat, self.levels, self.bits, self.bucket_size, NORMS[self.norm], stream, scales, packed
        )
        if not bool(xp.isfinite(scales).all()):
            raise non_finite_error()
        return {"scales": scales, "packed": packed}

    fused_accumulate = True

    def _decode_flat(
        self, xp: ModuleType, kernels: ModuleType, payload: Payload, out: Any, accumulate: int
    ) -> None:
        kernels.qsgd_decode(
            payload.arrays["packed"],
            payload.arrays["scales"],
            self.levels,
            self.bits,
            self.bucket_size,
            out,
            accumulate,
        )

    def _decode_sum_flat(self, kernels: ModuleType, payloads: list[Payload], out: Any) -> bool:
        fused = getattr(kernels, "qsgd_decode_sum", None)  # the host kernels have it
        # A subclass with its own decode sums with it (the contract's kernels in sequence).
        if fused is None or type(self)._decode_flat is not QSGD._decode_flat:
            return False
        packeds = [p.arrays["packed"] for p in payloads]
        fused(
            packeds,
            [p.arrays["scales"] for p in payloads],
            self.levels,
            self.bits,
            self.bucket_size,
            out,
        )
        return True

    def variance_bound(self, x: Any) -> float:
        """Upper bound on ``E||decode(encode(x)) - x||^2`` (sum over buckets).

        ``x`` may be a NumPy or CuPy array (a CuPy one is copied to the host once: the
        bound is a float64 statistic computed with NumPy).
        """
        if is_cupy_array(x):
            x = x.get()
        flat = np.asarray(x, dtype=np.float64).reshape(-1)
        total = 0.0
        for start in range(0, flat.size, self.bucket_size):
            bucket = flat[start : start + self.bucket_size]
            d = bucket.size
            if self.norm == "l2":
                factor = min(d / self.levels**2, math.sqrt(d) / self.levels)
                total += factor * float(bucket @ bucket)
            else:
                # each element's rounding variance is at most (scale / s)^2 / 4
                total += d * (float(np.abs(bucket).max()) / self.levels) ** 2 / 4
        return total
