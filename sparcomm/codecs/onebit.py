"""1-bit SGD: the sign of each element with per-bucket reconstruction means.

Reference: Seide, Fu, Droppo, Li, Yu, "1-Bit Stochastic Gradient Descent and its
Application to Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from sparcomm.codecs._base import Codec, check_int, non_finite_error
from sparcomm.codecs._registry import preset
from sparcomm.codecs._wire import INPUT, Packed, PerBucket, Wire
from sparcomm.codecs.qsgd import n_buckets, packed_nbytes
from sparcomm.payload import Payload


class OneBit(Codec, codec_id=6, family="quantized"):
    """Quantise by sign; reconstruct each bucket's entries by the mean of its group.

    Per bucket, the entries with ``x >= 0`` decode to their mean and those with
    ``x < 0`` to theirs.  The quantisation error must be carried to the next step, so
    ``OneBit()`` keeps error-feedback residuals itself (``error_feedback=True``, the
    paper's method); ``OneBit(error_feedback=False)`` is the bare quantiser.

    Parameters
    ----------
    bucket_size : int
        Elements per pair of reconstruction means (default 512).  For a row-major
        matrix with ``c`` columns, the paper's per-column means correspond to
        transposing first; buckets are the layout-independent form.
    error_feedback : bool
        Keep per-key residuals (default True).  Use :meth:`state_dict` to save them.

    Notes
    -----
    Wire: 1 bit per element packed (1 = negative) plus two means per bucket.
    """

    wire = (
        Wire("means", INPUT, PerBucket("bucket_size", per=2)),
        Wire("packed", np.uint8, Packed(1)),
    )
    presets = (
        # error feedback at the worker and at the owner
        preset("onebit", lambda: OneBit(), "allreduce", "demo"),
        # the bare quantizer (the collective without error feedback)
        preset("onebit-noef", lambda: OneBit(error_feedback=False), "bench"),
        preset("onebit-bucket4", lambda: OneBit(bucket_size=4, error_feedback=False), "test"),
    )

    def __init__(self, bucket_size: int = 512, *, error_feedback: bool = True) -> None:
        super().__init__()
        self.bucket_size = check_int(
            bucket_size, "bucket_size", 1, math.inf, "; 512 is the default"
        )
        self.error_feedback = bool(error_feedback)
        self._memory = None
        if self.error_feedback:
            from sparcomm.feedback import ErrorFeedback

            self._memory = ErrorFeedback(OneBit(bucket_size, error_feedback=False))

    def _describe(self) -> str:
        return f"bucket_size={self.bucket_size}, error_feedback={self.error_feedback}"

    def _params(self, n: int) -> tuple[int, ...]:
        return (self.bucket_size,)

    @property
    def feedback(self):
        """The internal :class:`~sparcomm.ErrorFeedback` (None without error feedback)."""
        return self._memory

    def encode(self, x: Any, **kwargs: Any) -> Payload:
        if self._memory is not None:
            return self._memory.encode(x, **kwargs)
        return super().encode(x, **kwargs)

    def state_dict(self) -> dict:
        """Residuals of the internal error feedback (empty without it)."""
        return {} if self._memory is None else self._memory.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self._memory is None:
            if state:
                raise ValueError("OneBit(error_feedback=False) has no residuals to load")
            return
        self._memory.load_state_dict(state)

    @property
    def fuses_compensation(self) -> bool:
        """Whether ``encode(x, residual=r, compensated=c)`` encodes ``c = x + r`` and
        leaves ``c`` as the new residual ``c - decode(payload)`` (``fuses_feedback``), in
        one pass over host memory (:class:`~sparcomm.ErrorFeedback` uses it; bit for
        bit ``add``, ``onebit_encode`` and the decode with ``accumulate=-1``).  False
        for a subclass with its own ``_encode_flat``."""
        return type(self)._encode_flat is OneBit._encode_flat

    fuses_feedback = fuses_compensation

    def _encode_flat(
        self, xp: ModuleType, kernels: ModuleType, flat: Any, stream: int, **options: Any
    ) -> dict[str, Any]:
        means = xp.empty(2 * n_buckets(flat.size, self.bucket_size), dtype=flat.dtype)
        packed = xp.empty(packed_nbytes(flat.size, 1), dtype=np.uint8)
        residual = options.get("residual")
        if residual is None:
            kernels.onebit_encode(flat, self.bucket_size, packed, means)
        else:
            compensated = options["compensated"].reshape(-1)
            fused = getattr(kernels, "onebit_encode_feedback", None)  # the host kernels
            if fused is not None:
                fused(flat, residual, self.bucket_size, packed, means, compensated)
            else:
                kernels.add(flat, residual, compensated)
                kernels.onebit_encode(compensated, self.bucket_size, packed, means)
                kernels.onebit_decode(packed, means, self.bucket_size, compensated, -1)
        if not bool(xp.isfinite(means).all()):
            raise non_finite_error()
        return {"means": means, "packed": packed}

    fused_accumulate = True

    def _decode_flat(
        self, xp: ModuleType, kernels: ModuleType, payload: Payload, out: Any, accumulate: int
    ) -> None:
        kernels.onebit_decode(
            payload.arrays["packed"], payload.arrays["means"], self.bucket_size, out, accumulate
        )

    def _decode_sum_flat(self, kernels: ModuleType, payloads: list[Payload], out: Any) -> bool:
        fused = getattr(kernels, "onebit_decode_sum", None)  # the host kernels have it
        # A subclass with its own decode sums with it (the contract's kernels in sequence).
        if fused is None or type(self)._decode_flat is not OneBit._decode_flat:
            return False
        packeds = [p.arrays["packed"] for p in payloads]
        fused(packeds, [p.arrays["means"] for p in payloads], self.bucket_size, out)
        return True
