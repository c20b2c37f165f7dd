"""TernGrad: stochastic ternarisation ``{-s, 0, +s}`` with a max-norm scale.

Reference: Wen, Xu, Yan, Wu, Wang, Chen, Li, "TernGrad: Ternary Gradients to Reduce
Communication in Distributed Deep Learning", NeurIPS 2017.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from sparcomm._backend import array_module, kernels_for
from sparcomm.codecs._base import Codec, check_array, check_int, non_finite_error
from sparcomm.codecs._registry import preset
from sparcomm.codecs._wire import INPUT, Packed, PerBucket, Wire
from sparcomm.codecs.qsgd import n_buckets, packed_nbytes
from sparcomm.payload import Payload

BITS = 2


_BITS = {np.dtype(np.float32): np.dtype(np.uint32), np.dtype(np.float64): np.dtype(np.uint64)}
_SIGNED: dict[np.dtype, np.dtype] = {
    np.dtype(np.float32): np.dtype(np.int32),
    np.dtype(np.float64): np.dtype(np.int64),
}


def _below(xp: ModuleType, scales: Any, local: Any) -> bool:
    """Whether a shared scale is non-finite or below this rank's ``local`` scale anywhere.

    Compared on the bit patterns (``local`` is a max of ``|x|``, so non-negative), which
    is exact on both devices: CuPy's float comparisons would treat subnormals as zero.
    """
    if not bool(xp.isfinite(scales).all()):
        return True
    signed = _SIGNED[scales.dtype]
    ints = xp.ascontiguousarray(scales).view(signed)
    magnitude = ints & signed.type(2 ** (8 * signed.itemsize - 1) - 1)  # all but the sign
    negative = (ints < 0) & (magnitude != 0)
    return bool((negative | (magnitude < local.view(signed))).any())


class TernGrad(Codec, codec_id=5, family="quantized"):
    """Unbiased ternary quantisation: ``g~ = s * sign(g) * Bernoulli(|g| / s)``.

    ``s = max |g|`` over the tensor (``bucket_size=None``) or per bucket.  With
    ``clip=c`` the gradient is first clipped to ``[-c*sigma, c*sigma]`` (sigma its
    standard deviation; the paper uses c = 2.5); the codec is then unbiased for the
    clipped gradient.

    Scaler sharing: ``encode(x, scale=S)`` uses a given scale (per bucket, or one value),
    for example the max over ranks, so that the ternary values of all ranks sum exactly
    as small integers.  ``S`` must be at least the local (clipped) max, or the codec
    would be biased; this is checked.

    Parameters
    ----------
    bucket_size : int, optional
        Elements per scale; ``None`` (default) means one scale for the whole tensor.
    clip : float, optional
        Clip at ``clip * std(x)`` before quantising (``None``: no clipping).
    seed : int
        Seed of the counter-based random stream.

    Notes
    -----
    Wire: 2 bits per element (0 -> 0, 1 -> +s, 2 -> -s) packed, plus the scales.
    """

    wire = (
        Wire("scales", INPUT, PerBucket("bucket_size")),  # None: one scale per tensor
        Wire("packed", np.uint8, Packed(BITS)),
    )
    presets = (
        preset("terngrad", lambda: TernGrad(), "bench", "allreduce", "demo", "test"),
        preset("terngrad-bucket5-clip", lambda: TernGrad(bucket_size=5, clip=2.5), "test"),
    )
    is_unbiased = True
    is_stochastic = True
    dense_phase_capable = True
    shares_scale = True

    def __init__(
        self, bucket_size: int | None = None, *, clip: float | None = None, seed: int = 0
    ) -> None:
        super().__init__()
        if bucket_size is not None:
            bucket_size = check_int(
                bucket_size, "bucket_size", 1, math.inf, "; None means one scale per tensor"
            )
        self.bucket_size = bucket_size
        if clip is not None:
            if isinstance(clip, bool) or not isinstance(clip, (int, float, np.floating)):
                raise TypeError(f"clip must be a float or None, got {type(clip).__name__}")
            if not (clip > 0 and math.isfinite(clip)):
                raise ValueError(
                    f"clip must be a positive finite float, got {clip}; 2.5 is "
                    "the paper's choice, None disables clipping"
                )
            clip = float(clip)
        self.clip = clip
        self.seed = check_int(seed, "seed", 0, 2**64 - 1)

    def _describe(self) -> str:
        return f"bucket_size={self.bucket_size}, clip={self.clip}"

    def bucket_for(self, n: int) -> int:
        return n if self.bucket_size is None else self.bucket_size

    def _params(self, n: int) -> tuple[int, ...]:
        return (self.bucket_for(n),)

    def clip_threshold(self, flat: Any) -> float:
        """``clip * std(x)``, or inf without clipping.

        ``std`` is the kernel contract's (``kernels_for(xp).std``: two passes in one fixed
        summation order), so the threshold is the same float64 on CPU and GPU and a
        clipped payload has the same bits on both.  NaN for non-finite ``x``, which the
        scale check then refuses.
        """
        if self.clip is None:
            return math.inf
        return self.clip * kernels_for(array_module(flat)).std(flat)

    def local_scales(self, x: Any) -> Any:
        """The scales this rank would use: ``max |clip(x)|`` per bucket.

        For scaler sharing, take the elementwise max of these over ranks and pass it
        to :meth:`encode` as ``scale``.
        """
        xp, flat = check_array(x)
        return self._scales(xp, kernels_for(xp), flat, self.clip_threshold(flat))

    def _scales(self, xp: ModuleType, kernels: ModuleType, flat: Any, clip: float) -> Any:
        scales = xp.empty(n_buckets(flat.size, self.bucket_for(flat.size)), dtype=flat.dtype)
        kernels.max_abs(flat, self.bucket_for(flat.size), scales)
        if not bool(xp.isfinite(scales).all()):
            raise non_finite_error()
        if math.isfinite(clip):
            # min(scale, clip) on the bit patterns: for non-negative floats the integer
            # order is the float order, and integer ops cannot flush a subnormal to zero
            # the way CuPy's float ufuncs do (-ftz=true), so both devices agree.
            bits = scales.view(_BITS[flat.dtype])
            limit = np.asarray(clip, dtype=flat.dtype).view(bits.dtype)[()]  # a NumPy scalar
            xp.minimum(bits, limit, out=bits)
        return scales

    def _encode_flat(
        self,
        xp: ModuleType,
        kernels: ModuleType,
        flat: Any,
        stream: int,
        scale: Any = None,
        **options: Any,
    ) -> dict[str, Any]:
        if options:
            raise TypeError(f"unexpected options {sorted(options)}; TernGrad takes scale=")
        clip = self.clip_threshold(flat)
        local = self._scales(xp, kernels, flat, clip)
        if scale is None:
            scales = local
        else:
            scales = xp.asarray(scale, dtype=flat.dtype).reshape(-1)
            if scales.size == 1 and local.size > 1:
                scales = xp.full(local.size, scales[0], dtype=flat.dtype)
            if scales.size != local.size:
                raise ValueError(
                    f"scale must hold 1 or {local.size} values (one per bucket), got {scales.size}"
                )
            if _below(xp, scales, local):
                raise ValueError(
                    "a shared scale must be finite and at least this rank's max |x| per "
                    "bucket (take the max over ranks of local_scales(x)), or TernGrad is "
                    "biased"
                )
            scales = xp.ascontiguousarray(scales)
        packed = xp.empty(packed_nbytes(flat.size, BITS), dtype=np.uint8)
        kernels.terngrad_encode(flat, scales, self.bucket_for(flat.size), clip, stream, packed)
        return {"scales": scales, "packed": packed}

    fused_accumulate = True

    def _decode_flat(
        self, xp: ModuleType, kernels: ModuleType, payload: Payload, out: Any, accumulate: int
    ) -> None:
        kernels.terngrad_decode(
            payload.arrays["packed"],
            payload.arrays["scales"],
            self.bucket_for(payload.n),
            out,
            accumulate,
        )
