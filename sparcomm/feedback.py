"""Error feedback (local error accumulation) around any codec.

References: Seide et al., Interspeech 2014 (1-bit SGD); Stich, Cordonnier, Jaggi,
"Sparsified SGD with Memory", NeurIPS 2018; Karimireddy et al., "Error Feedback Fixes
SignSGD", ICML 2019.

Per key::

    compensated = x + residual[key]
    payload     = codec.encode(compensated)
    residual[key] = compensated - codec.decode(payload)

so ``decode(payload) + new residual == x + old residual``: nothing is lost, only
delayed.  For TopK the identity holds bit for bit (kept entries leave the residual,
the others stay untouched); for quantising codecs up to one float rounding per element.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from sparcomm._backend import array_module, kernels_for
from sparcomm.codecs._base import Codec, check_array
from sparcomm.payload import Payload


class ErrorFeedback:
    """Wrap a codec with a per-key residual memory.

    Parameters
    ----------
    codec : Codec
        The codec to compensate (typically :class:`~sparcomm.TopK`).

    Notes
    -----
    Two buffers per key are kept and swapped (the consumed residual doubles as the
    decode buffer), so steady-state encoding allocates nothing beyond the payload, and
    a failed encode (for example on NaN input) leaves the residual exactly as it was.
    """

    def __init__(self, codec: Codec) -> None:
        if isinstance(codec, ErrorFeedback):
            raise TypeError("codec is already wrapped in ErrorFeedback; wrap it only once")
        if not isinstance(codec, Codec):
            raise TypeError(
                f"codec must be a sparcomm codec such as TopK(density=0.01), got "
                f"{type(codec).__name__}"
            )
        if getattr(codec, "error_feedback", False):
            raise ValueError(
                f"{codec!r} keeps its own error feedback already; wrap "
                f"{type(codec).__name__}(error_feedback=False) instead"
            )
        self.codec = codec
        self._residuals: dict[Hashable, Any] = {}
        self._scratch: dict[Hashable, Any] = {}

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.codec!r})"

    # A wrapped codec answers the codec questions of its inner codec.
    codec_id = property(lambda self: self.codec.codec_id)
    name = property(lambda self: self.codec.name)
    is_sparse = property(lambda self: self.codec.is_sparse)
    family = property(lambda self: self.codec.family)
    is_stochastic = property(lambda self: self.codec.is_stochastic)
    is_unbiased = False

    def encoded_nbytes(self, n: int, dtype: Any = np.float32, ndim: int = 1) -> int:
        return self.codec.encoded_nbytes(n, dtype, ndim)

    def check_payload(self, payload: Payload) -> None:
        self.codec.check_payload(payload)

    def decode(self, payload: Payload, out: Any = None, *, accumulate: int = 0) -> Any:
        return self.codec.decode(payload, out=out, accumulate=accumulate)

    def residual(self, key: Hashable = None) -> Any:
        """The residual kept for ``key`` (None before its first encode)."""
        return self._residuals.get(key)

    def residual_for(self, key: Hashable, flat: Any) -> Any:
        """The residual of ``key`` for the 1-D array ``flat``: None before the first encode,
        else on ``flat``'s device (moved there once if it is on the other one).

        The residual follows the data (host after :meth:`load_state_dict`, device after a
        model moved to the GPU): one copy, at the first use on the new device.

        Raises
        ------
        ValueError
            If the residual does not have ``flat``'s size and dtype.
        """
        residual = self._residuals.get(key)
        if residual is None:
            return None
        if residual.size != flat.size or residual.dtype != flat.dtype:
            raise ValueError(
                f"the residual for key {key!r} holds {residual.size} x {residual.dtype}, got "
                f"{flat.size} x {flat.dtype}; give every tensor its own key"
            )
        xp = array_module(flat)
        if array_module(residual) is not xp:
            residual = xp.asarray(residual) if xp is not np else residual.get()
            self._residuals[key] = residual
            self._scratch.pop(key, None)
        return residual

    def keys(self) -> list[Hashable]:
        return list(self._residuals)

    def encode(
        self,
        x: Any,
        *,
        key: Hashable = None,
        step: int | None = None,
        rank: int | None = None,
        **options: Any,
    ) -> Payload:
        """Encode ``x + residual[key]`` and keep what the payload does not carry."""
        xp, flat = check_array(x)
        kernels = kernels_for(xp)
        residual = self.residual_for(key, flat)
        compensated = self._scratch.pop(key, None)
        if compensated is None:
            compensated = xp.empty_like(flat)
        if residual is None:
            compensated[...] = flat
        else:
            # The kernel layer's add, not xp.add: CuPy's operators flush float32
            # subnormals (-ftz=true), which would lose residual mass on the GPU only.
            kernels.add(flat, residual, compensated)
        try:
            payload = self.codec.encode(
                compensated.reshape(x.shape), key=key, step=step, rank=rank, **options
            )
        except BaseException:
            self._scratch[key] = compensated
            raise
        residual_into = getattr(self.codec, "residual_into", None)
        if residual_into is not None:
            residual_into(compensated, payload)
        elif self.codec.fused_accumulate:
            # compensated -= decode(payload) in the decode pass itself (same bits as
            # decoding into a buffer and subtracting: one IEEE subtraction per element).
            self.codec.decode(payload, out=compensated, accumulate=-1)
        else:
            # The old residual is consumed: decode into it rather than into a fresh
            # array (a fresh n-element array per call costs its page faults every step).
            decoded = residual if residual is not None else xp.empty_like(flat)
            self.codec.decode(payload, out=decoded)
            kernels.subtract(compensated, decoded, compensated)
            residual = decoded
        if residual is not None:
            self._scratch[key] = residual
        self._residuals[key] = compensated
        return payload

    def state_dict(self) -> dict[str, Any]:
        """Copies of the residuals (host NumPy arrays) keyed by tensor key."""
        residuals = {}
        for key, value in self._residuals.items():
            residuals[key] = value.copy() if isinstance(value, np.ndarray) else value.get()
        return {"codec": repr(self.codec), "residuals": residuals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore residuals saved by :meth:`state_dict` (onto the host; a residual moves
        to the GPU at its key's first encode of a CuPy array).

        Raises
        ------
        ValueError
            If the state was saved from a different codec.
        """
        if not isinstance(state, dict) or "residuals" not in state:
            raise ValueError(
                "state must be a dict from ErrorFeedback.state_dict(), with a 'residuals' key"
            )
        if state.get("codec") != repr(self.codec):
            raise ValueError(
                f"state was saved from {state.get('codec')}, this ErrorFeedback wraps "
                f"{self.codec!r}; load it into a matching codec"
            )
        restored = {}
        for key, value in state["residuals"].items():
            array = np.array(value, copy=True)
            if array.dtype not in (np.float32, np.float64) or array.ndim != 1:
                raise ValueError(f"residual for key {key!r} must be a 1-D float array")
            restored[key] = array
        self._residuals = restored
        self._scratch = {}

    def to_device(self, xp: Any) -> None:
        """Move every residual to the array module ``xp`` (``numpy`` or ``cupy``) now.

        Optional: a residual on the other device is moved at its key's next encode.
        """
        moved = {}
        for key, value in self._residuals.items():
            same = array_module(value) is xp
            moved[key] = value if same else (value.get() if xp is np else xp.asarray(value))
        self._residuals = moved
        self._scratch = {}


def unwrap(codec: Any) -> tuple[Codec, ErrorFeedback | None]:
    """Return ``(bare codec, error-feedback memory or None)`` for any codec form.

    ``ErrorFeedback(c)`` gives ``(c, it)``; ``OneBit()`` with its own feedback gives the
    inner bare OneBit and its memory; a bare codec gives ``(codec, None)``.
    """
    if isinstance(codec, ErrorFeedback):
        return codec.codec, codec
    memory = getattr(codec, "feedback", None)
    if isinstance(memory, ErrorFeedback):
        return memory.codec, memory
    return codec, None
