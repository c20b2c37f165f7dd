"""The declaration of a codec's wire layout, from which everything else is derived.

A codec class lists its payload arrays once, in wire order::

    class QSGD(Codec, codec_id=4, family="quantized"):
        wire = (
            Wire("scales", INPUT, PerBucket("bucket_size")),
            Wire("packed", np.uint8, Packed("bits")),
        )

and :class:`~sparcomm.codecs.Codec` derives from it the array names the payload header
checks, the exact sizes (``encoded_nbytes``), the payload checks of ``decode``, and, for
the quantized collectives, how a payload is cut into the payloads of contiguous chunks
(:meth:`Count.bounds`) and on which element boundaries that is possible
(:meth:`Count.alignment`).

Parameters of a count (``"bits"``, ``"bucket_size"``) are an int, the name of a codec
attribute, or a callable ``(codec, n) -> value``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: A parameter of a count: a constant, a codec attribute's name, or ``(codec, n) -> value``.
Param = int | str | Callable[[Any, int], Any]

#: The dtype of an array that travels in the input's own dtype (float32 or float64).
INPUT = "input"


def _value(codec: Any, param: Param, n: int) -> Any:
    if isinstance(param, str):
        return getattr(codec, param)
    if callable(param):
        return param(codec, n)
    return param


class Count:
    """How many items an array holds for ``n`` input elements, and how it is sliced."""

    #: Whether a payload's array can be cut into the arrays of contiguous chunks.
    sliceable = True

    def count(self, codec: Any, n: int) -> int:
        raise NotImplementedError

    def bounds(self, codec: Any, n: int, start: int, stop: int) -> tuple[int, int] | None:
        """Items ``[a, b)`` of the array that encode elements ``[start, stop)`` of an
        ``n``-element payload; ``None`` means the whole array (a per-tensor value)."""
        raise NotImplementedError

    def alignment(self, codec: Any) -> int:
        """Chunk boundaries must be multiples of this many elements."""
        raise NotImplementedError


@dataclass(frozen=True)
class Elements(Count):
    """One item per element (dense values)."""

    def count(self, codec: Any, n: int) -> int:
        return n

    def bounds(self, codec: Any, n: int, start: int, stop: int) -> tuple[int, int] | None:
        return start, stop

    def alignment(self, codec: Any) -> int:
        return 1


@dataclass(frozen=True)
class Packed(Count):
    """``bits`` bits per element, bit-packed into ``ceil(n * bits / 8)`` bytes."""

    bits: Param

    def count(self, codec: Any, n: int) -> int:
        return -(-n * int(_value(codec, self.bits, n)) // 8)

    def bounds(self, codec: Any, n: int, start: int, stop: int) -> tuple[int, int] | None:
        bits = int(_value(codec, self.bits, n))
        return start * bits // 8, -(-stop * bits // 8)

    def alignment(self, codec: Any) -> int:
        # A chunk must start on a byte: bits * start a multiple of 8.
        return 8 // math.gcd(int(_value(codec, self.bits, 0)), 8)


@dataclass(frozen=True)
class PerBucket(Count):
    """``per`` items per bucket of ``bucket`` elements (the last one may be short); a
    bucket of ``None`` means one bucket for the whole tensor."""

    bucket: Param
    per: int = 1

    def count(self, codec: Any, n: int) -> int:
        bucket = _value(codec, self.bucket, n)
        return self.per * (1 if bucket is None else -(-n // int(bucket)))

    def bounds(self, codec: Any, n: int, start: int, stop: int) -> tuple[int, int] | None:
        bucket = _value(codec, self.bucket, n)
        if bucket is None:
            return None  # the per-tensor value holds for every chunk
        bucket = int(bucket)
        return self.per * (start // bucket), self.per * -(-stop // bucket)

    def alignment(self, codec: Any) -> int:
        bucket = _value(codec, self.bucket, 0)
        return 1 if bucket is None else int(bucket)


@dataclass(frozen=True)
class Entries(Count):
    """A data-dependent number of entries (a sparse list): not sliceable by position."""

    number: Param
    sliceable = False

    def count(self, codec: Any, n: int) -> int:
        return int(_value(codec, self.number, n))

    def bounds(self, codec: Any, n: int, start: int, stop: int) -> tuple[int, int] | None:
        raise NotImplementedError(
            f"{type(codec).__name__} payloads hold a list of entries, which cannot be cut "
            "into contiguous chunks by position"
        )

    def alignment(self, codec: Any) -> int:
        raise NotImplementedError(f"{type(codec).__name__} payloads cannot be sliced")


@dataclass(frozen=True)
class Wire:
    """One array of a payload: its name, dtype and count.

    Parameters
    ----------
    name : str
        The array's name in :attr:`sparcomm.Payload.arrays`.
    dtype : numpy dtype, ``INPUT``, or callable ``(codec, n) -> dtype``
        ``INPUT``: the dtype of the encoded array (float32 or float64).
    count : Count
        :class:`Elements`, :class:`Packed`, :class:`PerBucket` or :class:`Entries`.
    """

    name: str
    dtype: Any
    count: Count

    def dtype_for(self, codec: Any, n: int, dtype: np.dtype) -> np.dtype:
        if isinstance(self.dtype, str) and self.dtype == INPUT:
            return np.dtype(dtype)
        if callable(self.dtype) and not isinstance(self.dtype, type):
            return np.dtype(self.dtype(codec, n))
        return np.dtype(self.dtype)
