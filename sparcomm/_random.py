"""Counter-based random streams: one uint64 stream key per (seed, rank, key, step).

Randomness in sparcomm (QSGD, TernGrad stochastic rounding) is a pure function of
``(seed, rank, key, step, index)``.  The first four are folded here, once per call,
into a 64-bit *stream key*; the per-element part is a stateless 32-bit hash of the
element index under that key, evaluated inside the kernels (``kernels/cpu``,
``kernels/gpu``) and, for the tests, by :func:`uniform_reference` below.

Per-element definition (all arithmetic modulo 2**32)::

    k1, k2 = stream & 0xFFFFFFFF, stream >> 32
    lo, hi = index & 0xFFFFFFFF, index >> 32
    h = mix32((lo * 0x9E3779B9) ^ k1 ^ (hi * 0x85EBCA6B))
    h = mix32(h + k2)
    u = (h >> 8) * 2**-24            # uniform on [0, 1) with 24 bits

    mix32(x): x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16

``mix32`` is a bijective integer finaliser (the "lowbias32" constants); two rounds
keyed by the two halves of the stream key decorrelate neighbouring streams.  The
uniform has 24 bits, so a rounding probability ``p`` is realised as
``ceil(p * 2**24) / 2**24``: a bias below 6e-8 per element, documented in
docs/codecs.md.
"""

from __future__ import annotations

import hashlib

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN32 = 0x9E3779B9
HIGH32 = 0x85EBCA6B


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def key_hash(key: object) -> int:
    """Stable 64-bit hash of a tensor key (``str``, ``int`` or ``None``).

    Python's ``hash`` is salted per process; ranks must agree, so use BLAKE2b.
    """
    if key is None:
        return 0
    if isinstance(key, (int, np.integer)):
        data = b"i" + int(key).to_bytes(16, "little", signed=True)
    elif isinstance(key, str):
        data = b"s" + key.encode("utf-8")
    else:
        raise TypeError(
            f"key must be a str, an int or None, got {type(key).__name__}; "
            "pass the parameter name or its position"
        )
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def stream_key(seed: int, rank: int, key: object, step: int) -> int:
    """Fold ``(seed, rank, key, step)`` into one uint64 stream key (a Python int)."""
    z = _splitmix64(int(seed) & MASK64)
    z = _splitmix64(z ^ (int(rank) & MASK64))
    z = _splitmix64(z ^ key_hash(key))
    z = _splitmix64(z ^ (int(step) & MASK64))
    return z


def _mix32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    x = x ^ (x >> np.uint32(16))
    return x


def hash_reference(stream: int, index: np.ndarray) -> np.ndarray:
    """Plain NumPy reference of the per-element 32-bit hash (uint32 array)."""
    index = np.asarray(index, dtype=np.uint64)
    k1 = np.uint32(stream & 0xFFFFFFFF)
    k2 = np.uint32((stream >> 32) & 0xFFFFFFFF)
    lo = (index & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (index >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        h = _mix32((lo * np.uint32(GOLDEN32)) ^ k1 ^ (hi * np.uint32(HIGH32)))
        h = _mix32(h + k2)
    return h


def uniform_reference(stream: int, index: np.ndarray) -> np.ndarray:
    """Plain NumPy reference of the per-element uniform on [0, 1), as float64."""
    return (hash_reference(stream, index) >> np.uint32(8)).astype(np.float64) * 2.0**-24
