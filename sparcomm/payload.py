"""The wire format: a :class:`Payload` is a small header plus a few typed arrays.

A payload packs into one contiguous ``uint8`` buffer (:meth:`Payload.to_bytes`) so a
collective sends one message, and :attr:`Payload.nbytes` is exactly that buffer's length.
Layout (all integers little-endian; documented byte by byte in docs/wire-format.md)::

    offset  size         field
    0       4            magic b"SPCM"
    4       1            format version (FORMAT_VERSION)
    5       1            codec id (CODEC_IDS, registered by the codec classes)
    6       1            dtype code of the decoded array (DTYPE_CODES)
    7       1            ndim of the decoded array (0..32)
    8       8            n, number of elements (uint64)
    16      1            number of codec parameters
    17      1            number of arrays
    18      2            flags (uint16): bit 0 = a data checksum follows the arrays;
                         other bits zero
    20      4            CRC-32 of the header and descriptors, computed with this field zero
    24      8 * ndim     shape (uint64 each)
    ...     8 * nparams  codec parameters (int64 each)
    ...     16 * narrays array descriptors: dtype code (uint8), 7 zero bytes, count (uint64)
    ...                  array data, each array starting at a multiple of 8 bytes (zero padding)
    ...     8            only with flag bit 0: CRC-32 (uint32) of the array data (padding
                         included), then 4 zero bytes

:meth:`Payload.from_bytes` validates everything it reads (magic, version, CRC, codes,
every length against the buffer's length), so a truncated or foreign buffer raises
``ValueError`` instead of crashing or decoding garbage.  The array data is checksummed
only on request (``to_bytes(checksum=True)``, the verify mode: a full pass over the
data on each side); the collectives leave it off, as MPI transports are reliable.
A reader verifies the data checksum whenever the flag says one is present.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparcomm._backend import array_module

MAGIC = b"SPCM"
FORMAT_VERSION = 1
ALIGNMENT = 8
MAX_NDIM = 32
#: Largest n or dimension a header may claim (int64 indices address below 2**63).
MAX_ELEMENTS = 2**62

_HEADER = struct.Struct("<4sBBBBQBBHI")  # 24 bytes
_DESCRIPTOR = struct.Struct("<B7xQ")  # 16 bytes
_CRC_OFFSET = 20
#: Flag bit of the header's flags field: a data checksum trailer follows the arrays.
FLAG_DATA_CHECKSUM = 1
#: Bytes of the data checksum trailer (CRC-32 and 4 zero bytes: keeps 8-byte alignment).
CHECKSUM_BYTES = 8
_TRAILER = struct.Struct("<II")  # CRC-32, then zero

#: codec id -> (codec name, names of its arrays in wire order).  Filled by the codec
#: classes themselves when they are defined (``class TopK(Codec, codec_id=3, ...)``, see
#: :func:`register_layout`); the built-in ids are pinned by tests/codecs/test_registry.py.
CODEC_IDS: dict[int, tuple[str, tuple[str, ...]]] = {}

#: Codec ids fit the one-byte header field.
MAX_CODEC_ID = 255


def register_layout(codec_id: int, name: str, array_names: tuple[str, ...]) -> None:
    """Record the name and wire-array names of codec ``codec_id`` for :class:`Payload`.

    Called by :class:`sparcomm.codecs.Codec` when a subclass with a ``codec_id`` is
    defined; the payload layer itself knows no codec.

    Raises
    ------
    ValueError
        If the id is outside 1..255 or already taken by a codec of another name.
    """
    if isinstance(codec_id, bool) or not isinstance(codec_id, int):
        raise TypeError(f"codec_id must be an int, got {type(codec_id).__name__} {codec_id!r}")
    if not 1 <= codec_id <= MAX_CODEC_ID:
        raise ValueError(
            f"codec_id must be in [1, {MAX_CODEC_ID}] (one header byte), got {codec_id}; "
            "ids 1..127 are sparcomm's, pick one in 128..255 for your own codec"
        )
    taken = CODEC_IDS.get(codec_id)
    if taken is not None and taken[0] != name:
        raise ValueError(
            f"codec_id {codec_id} is already used by {taken[0]}, cannot give it to {name}; "
            f"pick a free id (taken: {sorted(CODEC_IDS)})"
        )
    CODEC_IDS[codec_id] = (name, tuple(array_names))


#: dtype code <-> numpy dtype, for the decoded array and for each wire array.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.float64),
    3: np.dtype(np.float16),
    4: np.dtype(np.uint8),
    5: np.dtype(np.int32),
    6: np.dtype(np.int64),
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def header_nbytes(ndim: int, nparams: int, narrays: int) -> int:
    """Bytes of the header and descriptors (a multiple of 8)."""
    return _HEADER.size + 8 * ndim + 8 * nparams + _DESCRIPTOR.size * narrays


def wire_nbytes(ndim: int, nparams: int, arrays: list[tuple[np.dtype, int]]) -> int:
    """Exact bytes of a payload with these arrays ``(dtype, count)`` on the wire."""
    total = header_nbytes(ndim, nparams, len(arrays))
    for dtype, count in arrays:
        total += _padded(np.dtype(dtype).itemsize * int(count))
    return total


@dataclass
class Payload:
    """An encoded array: codec id, parameters, the decoded array's n/dtype/shape, arrays.

    Attributes
    ----------
    codec_id : int
        Key of :data:`CODEC_IDS`.
    n : int
        Number of elements of the decoded array.
    dtype : numpy.dtype
        dtype of the decoded array (float32 or float64).
    shape : tuple of int
        Shape of the decoded array.
    params : tuple of int
        Codec parameters needed to decode (for example QSGD's levels, bits and bucket).
    arrays : dict of str to array
        The wire arrays in :data:`CODEC_IDS` order; NumPy or CuPy, 1-D and contiguous.
    """

    codec_id: int
    n: int
    dtype: np.dtype
    shape: tuple[int, ...]
    params: tuple[int, ...]
    arrays: dict[str, Any] = field(default_factory=dict)

    @property
    def codec_name(self) -> str:
        return CODEC_IDS[self.codec_id][0]

    @property
    def nbytes(self) -> int:
        """Exact number of bytes :meth:`to_bytes` produces: what travels on the wire."""
        return wire_nbytes(
            len(self.shape),
            len(self.params),
            [(a.dtype, a.size) for a in self.arrays.values()],
        )

    @property
    def data_nbytes(self) -> int:
        """Bytes of the arrays alone, without header and padding."""
        return sum(int(a.nbytes) for a in self.arrays.values())

    def _header(self, flags: int = 0) -> bytes:
        names = CODEC_IDS[self.codec_id][1]
        if tuple(self.arrays) != names:
            raise ValueError(
                f"{self.codec_name} payload needs arrays {names}, got {tuple(self.arrays)}"
            )
        head = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            self.codec_id,
            _CODE_OF[np.dtype(self.dtype)],
            len(self.shape),
            self.n,
            len(self.params),
            len(self.arrays),
            flags,
            0,
        )
        parts = [head, struct.pack(f"<{len(self.shape)}Q", *self.shape)]
        parts.append(struct.pack(f"<{len(self.params)}q", *self.params))
        for array in self.arrays.values():
            parts.append(_DESCRIPTOR.pack(_CODE_OF[np.dtype(array.dtype)], array.size))
        header = bytearray(b"".join(parts))
        struct.pack_into("<I", header, _CRC_OFFSET, zlib.crc32(header))
        return bytes(header)

    def to_bytes(self, out: Any = None, *, checksum: bool = False) -> Any:
        """Pack into one contiguous uint8 buffer of :attr:`nbytes` bytes.

        Parameters
        ----------
        out : array, optional
            A uint8 buffer of at least :attr:`nbytes` bytes (NumPy or CuPy, matching the
            arrays) to fill; a new one is allocated when omitted.
        checksum : bool
            The verify mode: append a CRC-32 of the array data (:data:`CHECKSUM_BYTES`
            more bytes, one more pass over the data here and in :meth:`from_bytes`),
            so any corruption of the data raises ``ValueError`` at unpacking instead of
            decoding silently.  Off by default (the collectives' hot path; the bytes are
            then exactly those of format version 1 without flags).

        Returns
        -------
        array
            The filled uint8 buffer (``out[:nbytes]``, or ``out[:nbytes + 8]`` with
            ``checksum``, when ``out`` was given).
        """
        if not isinstance(checksum, bool):
            raise TypeError(f"checksum must be True or False, got {checksum!r}")
        xp = array_module(*self.arrays.values())
        header = self._header(FLAG_DATA_CHECKSUM if checksum else 0)
        total = self.nbytes + (CHECKSUM_BYTES if checksum else 0)
        if out is None:
            out = xp.empty(total, dtype=np.uint8)
        elif array_module(out) is not xp:
            raise TypeError(
                f"out must live on the same device as the payload's arrays (a {xp.__name__} "
                f"array), got {type(out).__module__}.{type(out).__qualname__}; allocate it "
                f"with {xp.__name__}.empty({total}, dtype=numpy.uint8)"
            )
        elif out.dtype != np.uint8 or out.ndim != 1 or out.size < total:
            raise ValueError(
                f"out must be a 1-D uint8 buffer of at least {total} bytes, got "
                f"{out.dtype} with shape {out.shape}"
            )
        buffer = out[:total]
        buffer[: len(header)] = xp.asarray(np.frombuffer(header, dtype=np.uint8))
        offset = len(header)
        for array in self.arrays.values():
            size = int(array.nbytes)
            buffer[offset : offset + size] = array.reshape(-1).view(np.uint8)
            padded = _padded(size)
            if padded > size:
                buffer[offset + size : offset + padded] = 0
            offset += padded
        if checksum:
            crc = zlib.crc32(_to_host(buffer[len(header) : offset]).data)
            buffer[offset:total] = xp.asarray(np.frombuffer(_TRAILER.pack(crc, 0), dtype=np.uint8))
        return buffer

    @classmethod
    def from_bytes(cls, buffer: Any) -> Payload:
        """Unpack a buffer made by :meth:`to_bytes`; the arrays are views into it.

        Raises
        ------
        ValueError
            If the buffer is truncated, too long, foreign, of another format version, or
            its header is corrupted; or, for a buffer written with
            ``to_bytes(checksum=True)``, if its data does not match its checksum.
        """
        if isinstance(buffer, (bytes, bytearray, memoryview)):
            buffer = np.frombuffer(buffer, dtype=np.uint8)
        array_module(buffer)  # a TypeError for anything but NumPy/CuPy arrays
        if buffer.dtype != np.uint8 or buffer.ndim != 1:
            raise ValueError(
                f"expected a 1-D uint8 buffer, got dtype {buffer.dtype} with shape "
                f"{buffer.shape}; pass the array returned by Payload.to_bytes()"
            )
        length = int(buffer.size)
        if length < _HEADER.size:
            raise ValueError(
                f"buffer of {length} bytes is shorter than the {_HEADER.size}-byte sparcomm "
                "header: truncated or not a sparcomm payload"
            )
        head = bytes(_to_host(buffer[: _HEADER.size]))
        magic, version, codec_id, dtype_code, ndim, n, nparams, narrays, flags, crc = (
            _HEADER.unpack(head)
        )
        if magic != MAGIC:
            raise ValueError(
                f"buffer starts with {magic!r}, expected {MAGIC!r}: not a sparcomm payload"
            )
        if version != FORMAT_VERSION:
            raise ValueError(
                f"payload format version {version}, this sparcomm reads version "
                f"{FORMAT_VERSION}; encode and decode with the same sparcomm release"
            )
        size = header_nbytes(ndim, nparams, narrays)
        if ndim > MAX_NDIM or length < size:
            raise ValueError(
                f"buffer of {length} bytes is shorter than its {size}-byte header: truncated"
            )
        header = bytearray(_to_host(buffer[:size]).tobytes())
        struct.pack_into("<I", header, _CRC_OFFSET, 0)
        if zlib.crc32(header) != crc:
            raise ValueError("payload header checksum mismatch: the buffer is corrupted")
        if flags & ~FLAG_DATA_CHECKSUM:
            raise ValueError(
                f"payload flags {flags:#06x} set unknown bits (this sparcomm knows "
                f"{FLAG_DATA_CHECKSUM:#06x}): payload from an incompatible sparcomm version"
            )
        if codec_id not in CODEC_IDS or dtype_code not in DTYPE_CODES:
            raise ValueError(
                f"unknown codec id {codec_id} or dtype code {dtype_code}: payload from an "
                "incompatible sparcomm version"
            )
        name, names = CODEC_IDS[codec_id]
        if narrays != len(names):
            raise ValueError(f"{name} payload must carry {len(names)} arrays, got {narrays}")
        offset = _HEADER.size
        shape = struct.unpack_from(f"<{ndim}Q", header, offset)
        offset += 8 * ndim
        params = struct.unpack_from(f"<{nparams}q", header, offset)
        offset += 8 * nparams
        descriptors = []
        for _ in range(narrays):
            code, count = _DESCRIPTOR.unpack_from(header, offset)
            offset += _DESCRIPTOR.size
            if code not in DTYPE_CODES:
                raise ValueError(f"unknown array dtype code {code} in {name} payload")
            descriptors.append((DTYPE_CODES[code], count))
        expected = wire_nbytes(ndim, nparams, descriptors)
        if flags & FLAG_DATA_CHECKSUM:
            expected += CHECKSUM_BYTES
        if expected != length:
            raise ValueError(
                f"{name} payload needs {expected} bytes, buffer has {length}: "
                + ("truncated" if length < expected else "trailing bytes")
            )
        if any(dim > MAX_ELEMENTS for dim in shape) or n > MAX_ELEMENTS:
            raise ValueError(f"payload shape {shape} or n={n} is out of range: corrupted")
        if int(np.prod(shape, dtype=object)) != n:
            raise ValueError(f"payload shape {shape} does not hold n={n} elements")
        if flags & FLAG_DATA_CHECKSUM:
            data_end = length - CHECKSUM_BYTES
            stored, zero = _TRAILER.unpack(bytes(_to_host(buffer[data_end:])))
            if zero != 0 or zlib.crc32(_to_host(buffer[offset:data_end]).data) != stored:
                raise ValueError(
                    f"{name} payload data checksum mismatch: the array data is corrupted "
                    "(the header is intact); send the payload again"
                )
        arrays = {}
        for array_name, (dtype, count) in zip(names, descriptors, strict=True):
            end = offset + dtype.itemsize * count
            arrays[array_name] = buffer[offset:end].view(dtype)
            offset += _padded(dtype.itemsize * count)
        return cls(codec_id, n, DTYPE_CODES[dtype_code], tuple(shape), tuple(params), arrays)


def _to_host(array: Any) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    return array.get()  # CuPy: a small header read
