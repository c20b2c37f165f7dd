"""The codec interface: validation, flattening, dispatch to kernels, payload checks.

A codec subclass states its parameters and its algorithm in terms of kernel calls
(``_encode_flat`` / ``_decode_flat``) and its exact wire layout (``_wire_arrays``);
everything shared — input checks, the array-module dispatch, header parameters,
payload validation, output allocation — lives here once.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from sparcomm._backend import array_module, kernels_for
from sparcomm._random import stream_key
from sparcomm.kernels._checks import check_accumulate
from sparcomm.payload import CODEC_IDS, Payload, wire_nbytes

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_array(x: Any, name: str = "x") -> tuple[ModuleType, Any]:
    """Validate a gradient array and return ``(xp, flat)``; flat is 1-D contiguous.

    Non-contiguous inputs are accepted and copied once into a contiguous buffer.
    """
    xp = array_module(x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32 or float64, got {x.dtype}; convert with "
            f"{name}.astype(numpy.float32)"
        )
    if x.ndim == 0:
        raise ValueError(
            f"{name} is a 0-d array; codecs take arrays with at least one dimension: "
            f"pass {name}.reshape(1)"
        )
    if x.size == 0:
        raise ValueError(
            f"{name} is empty (shape {x.shape}); there is nothing to compress: skip it"
        )
    return xp, xp.ascontiguousarray(x).reshape(-1)


def check_int(value: Any, name: str, low: int, high: float, hint: str = "") -> int:
    """Validate an integer parameter in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        bound = "inf" if math.isinf(high) else int(high)
        raise ValueError(f"{name} must be in [{low}, {bound}], got {value}{hint}")
    return int(value)


def non_finite_error(count: int | None = None) -> ValueError:
    what = f"{count} non-finite values" if count else "non-finite values"
    return ValueError(
        f"x contains {what} (NaN or Inf, or an overflow of the bucket norm); sparcomm "
        "refuses them so no rank sums garbage; check the loss scale or clip gradients "
        "first (error-feedback residuals are left unchanged)"
    )


class Codec:
    """Base class of every codec: ``encode(x) -> Payload`` and ``decode(payload)``.

    Subclasses set ``codec_id`` and implement ``_params``, ``_wire_arrays``,
    ``_encode_flat`` and ``_decode_flat``.
    """

    codec_id: ClassVar[int]
    #: True for codecs whose payload is a sparse (index, value) list.
    is_sparse: ClassVar[bool] = False
    #: True when ``E[decode(encode(x))] == x``.
    is_unbiased: ClassVar[bool] = False
    #: True for codecs that draw random numbers (and so use seed, rank, key, step).
    is_stochastic: ClassVar[bool] = False

    seed: int = 0
    rank: int = 0

    def __init__(self) -> None:
        self._calls: dict[Hashable, int] = {}

    @property
    def name(self) -> str:
        return CODEC_IDS[self.codec_id][0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"

    def _describe(self) -> str:
        return ""

    # -- to be provided by subclasses -------------------------------------------------
    def _params(self, n: int) -> tuple[int, ...]:
        """Integer parameters written in the header and needed to decode."""
        raise NotImplementedError

    def _wire_arrays(self, n: int, dtype: np.dtype) -> list[tuple[np.dtype, int]]:
        """``(dtype, count)`` of each wire array for an input of n elements."""
        raise NotImplementedError

    def _encode_flat(
        self, xp: ModuleType, kernels: ModuleType, flat: Any, stream: int, **options: Any
    ) -> dict[str, Any]:
        raise NotImplementedError

    def _decode_flat(
        self, xp: ModuleType, kernels: ModuleType, payload: Payload, out: Any, accumulate: int
    ) -> None:
        """Decode into ``out``; ``accumulate`` is ±1 only where ``fused_accumulate``."""
        raise NotImplementedError

    # -- public API ---------------------------------------------------------------------
    def encoded_nbytes(self, n: int, dtype: Any = np.float32, ndim: int = 1) -> int:
        """Exact bytes of the payload for an array of n elements (for cost models)."""
        return wire_nbytes(ndim, len(self._params(n)), self._wire_arrays(n, np.dtype(dtype)))

    def encode(
        self,
        x: Any,
        *,
        key: Hashable = None,
        step: int | None = None,
        rank: int | None = None,
        **options: Any,
    ) -> Payload:
        """Compress ``x`` into a :class:`~sparcomm.payload.Payload`.

        Parameters
        ----------
        x : numpy.ndarray or cupy.ndarray
            float32 or float64, any shape (flattened, the shape is restored on decode).
        key : str or int, optional
            Names the tensor: selects the random stream (and, under error feedback, the
            residual).
        step : int, optional
            Training step for the random stream; when omitted, a per-key counter of
            calls is used, so successive calls draw fresh random numbers.
        rank : int, optional
            Rank for the random stream (default: the codec's ``rank``, 0); collectives
            pass the communicator's rank so ranks draw independent streams.

        Returns
        -------
        Payload
        """
        xp, flat = check_array(x)
        stream = 0
        if self.is_stochastic:
            if step is None:
                step = self._calls.get(key, 0)
                self._calls[key] = step + 1
            stream = stream_key(self.seed, self.rank if rank is None else rank, key, step)
        arrays = self._encode_flat(xp, kernels_for(xp), flat, stream, **options)
        return Payload(
            self.codec_id, flat.size, flat.dtype, tuple(x.shape), self._params(flat.size), arrays
        )

    #: Whether the decode kernels add into or subtract from ``out`` in the same pass
    #: (``accumulate=±1``); other codecs decode into a temporary first.
    fused_accumulate = False

    def decode(self, payload: Payload, out: Any = None, *, accumulate: int = 0) -> Any:
        """Decompress a payload made by this codec (same class and parameters).

        Parameters
        ----------
        payload : Payload
        out : array, optional
            Destination with the payload's shape and dtype (NumPy or CuPy like the
            payload); a new array is returned when omitted.
        accumulate : {0, 1, -1}
            ``0`` writes the decoded array into ``out``; ``1`` adds it (``out += d``),
            ``-1`` subtracts it (``out -= d``), each one IEEE operation per element: the
            bits of decoding into a separate buffer and then adding or subtracting
            (``out`` is required).  Error feedback (``-1``) and the quantized
            collectives' sums (``1``) use it; QSGD, TernGrad and OneBit do it in the
            decode pass itself (``fused_accumulate``).

        Raises
        ------
        ValueError
            If the payload comes from another codec, other parameters, or has arrays of
            the wrong length; for another ``accumulate``, or ``accumulate`` without ``out``.
        """
        self.check_payload(payload)
        accumulate = check_accumulate(accumulate)  # the kernels' own check and message
        xp = array_module(*payload.arrays.values())
        if out is None:
            if accumulate:
                raise ValueError("accumulate=±1 adds into out: pass the buffer as out=")
            out = xp.empty(payload.shape, dtype=payload.dtype)
        else:
            if array_module(out) is not xp:
                raise TypeError("out must live on the same device as the payload")
            if out.dtype != payload.dtype or out.size != payload.n:
                raise ValueError(
                    f"out must have {payload.n} elements of {payload.dtype}, got {out.size} "
                    f"of {out.dtype}"
                )
            if not out.flags.c_contiguous:
                raise ValueError("out must be C-contiguous; pass numpy.empty_like(...) instead")
        kernels = kernels_for(xp)
        flat = out.reshape(-1)
        if accumulate == 0 or self.fused_accumulate:
            self._decode_flat(xp, kernels, payload, flat, accumulate)
        else:
            decoded = xp.empty_like(flat)
            self._decode_flat(xp, kernels, payload, decoded, 0)
            (kernels.add if accumulate == 1 else kernels.subtract)(flat, decoded, flat)
        return out

    def check_payload(self, payload: Payload) -> None:
        """Raise ValueError unless this codec, with these parameters, made ``payload``."""
        if not isinstance(payload, Payload):
            raise TypeError(
                f"expected a sparcomm Payload, got {type(payload).__name__}; use "
                "Payload.from_bytes(buffer) for raw bytes"
            )
        if payload.codec_id != self.codec_id:
            raise ValueError(
                f"payload was encoded by {payload.codec_name}, cannot decode it with "
                f"{self!r}; decode with the codec that encoded it"
            )
        expected = self._params(payload.n)
        if payload.params != expected:
            raise ValueError(
                f"payload parameters {payload.params} do not match {self!r} (expects "
                f"{expected}); decode with the same codec settings as the encoder"
            )
        layout = self._wire_arrays(payload.n, payload.dtype)
        if len(payload.arrays) != len(layout):
            raise ValueError(
                f"{self.name} payload must carry {len(layout)} arrays, got "
                f"{len(payload.arrays)} ({sorted(payload.arrays)}): corrupted payload"
            )
        for (name, array), (dtype, count) in zip(payload.arrays.items(), layout, strict=True):
            if array.dtype != dtype or array.size != count:
                raise ValueError(
                    f"{self.name} payload array {name!r} must hold {count} x {dtype}, got "
                    f"{array.size} x {array.dtype}: corrupted payload"
                )
