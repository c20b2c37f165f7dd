"""Dense baselines kept in every table: :class:`NoCompression` and :class:`FP16`."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from sparcomm.codecs._base import Codec, non_finite_error
from sparcomm.codecs._registry import preset
from sparcomm.codecs._wire import INPUT, Elements, Wire
from sparcomm.payload import Payload

FP16_MAX = float(np.finfo(np.float16).max)


class NoCompression(Codec, codec_id=1, family="dense"):
    """The identity codec: values travel in their own dtype (the dense baseline).

    The payload owns a copy of the values, so it stays valid when the caller (or
    error feedback) reuses the input buffer.
    """

    wire = (Wire("values", INPUT, Elements()),)
    presets = (preset("dense", lambda: NoCompression(), "bench", "demo", "test"),)
    is_unbiased = True
    #: The identity: the reducer fuses it as it fuses dense tensors.
    is_elementwise = True

    def _params(self, n: int) -> tuple[int, ...]:
        return ()

    def _encode_flat(
        self, xp: ModuleType, kernels: ModuleType, flat: Any, stream: int, **options: Any
    ) -> dict[str, Any]:
        values = xp.empty_like(flat)
        bad = kernels.copy_finite(flat, values)  # the copy and the check in one pass
        if bad:
            raise non_finite_error(bad)
        return {"values": values}

    def _decode_flat(
        self, xp: ModuleType, kernels: ModuleType, payload: Payload, out: Any, accumulate: int
    ) -> None:
        out[...] = payload.arrays["values"]


class FP16(Codec, codec_id=2, family="quantized"):
    """Round to IEEE half precision (round to nearest even): 2 bytes per element.

    Values beyond the float16 range (|x| > 65504) would become Inf and are refused with
    the non-finite error; scale the loss (or use a float32 codec) instead.  Encode and
    decode are the ``fp16_encode`` / ``fp16_decode`` kernels (one pass each, bit for bit
    NumPy's ``astype``); the decode adds or subtracts in place (``fused_accumulate``).
    """

    wire = (Wire("values", np.float16, Elements()),)
    presets = (preset("fp16", lambda: FP16(), "bench", "allreduce", "test"),)
    dense_phase_capable = True
    #: Each element rounds on its own, and ``pipelined`` (``auto``'s choice for plain
    #: FP16 on more than one rank) sums each element's float16 values in rank order and
    #: rounds once, wherever the element sits: a fused bucket reduces bit for bit as its
    #: tensors one by one, so the reducer fuses FP16 tensors in either mode.
    is_elementwise = True

    def _params(self, n: int) -> tuple[int, ...]:
        return ()

    #: ``kernels.fp16_decode`` adds or subtracts in its decoding pass.
    fused_accumulate = True

    def _encode_flat(
        self, xp: ModuleType, kernels: ModuleType, flat: Any, stream: int, **options: Any
    ) -> dict[str, Any]:
        half = xp.empty(flat.size, dtype=np.float16)
        # Rounded and checked in one pass; an overflow (|x| >= 65520) counts as inf.
        bad = kernels.fp16_encode(flat, half)
        if bad:
            raise non_finite_error(bad)
        return {"values": half}

    def _decode_flat(
        self, xp: ModuleType, kernels: ModuleType, payload: Payload, out: Any, accumulate: int
    ) -> None:
        kernels.fp16_decode(payload.arrays["values"], out, accumulate)
