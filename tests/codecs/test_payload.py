"""Wire format: exact sizes, round trips, and refusal of truncated or foreign buffers."""

from __future__ import annotations

import numpy as np
import pytest

from sparcomm import Payload
from sparcomm.payload import wire_nbytes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_is_exact_and_nbytes_is_the_buffer_length(codec, rng, dtype):
    x = rng.standard_normal((3, 37)).astype(dtype)
    payload = codec.encode(x, key="w", step=0)
    buffer = payload.to_bytes()
    assert buffer.dtype == np.uint8 and buffer.size == payload.nbytes
    assert payload.nbytes == codec.encoded_nbytes(x.size, dtype, ndim=2)
    back = Payload.from_bytes(buffer)
    assert (back.codec_id, back.n, back.dtype, back.shape, back.params) == (
        payload.codec_id,
        payload.n,
        payload.dtype,
        payload.shape,
        payload.params,
    )
    for name in payload.arrays:
        np.testing.assert_array_equal(back.arrays[name], payload.arrays[name])
    np.testing.assert_array_equal(codec.decode(back), codec.decode(payload))
    # bytes, bytearray and memoryview are accepted too
    assert Payload.from_bytes(buffer.tobytes()).n == x.size


def test_to_bytes_into_a_given_buffer(codec, rng):
    payload = codec.encode(rng.standard_normal(100).astype(np.float32), key=0, step=0)
    out = np.full(payload.nbytes + 10, 255, dtype=np.uint8)
    filled = payload.to_bytes(out=out)
    np.testing.assert_array_equal(filled, payload.to_bytes())
    with pytest.raises(ValueError, match="at least"):
        payload.to_bytes(out=np.empty(payload.nbytes - 1, dtype=np.uint8))


def test_every_truncation_raises(codec, rng):
    buffer = codec.encode(rng.standard_normal(50).astype(np.float32), step=0).to_bytes()
    for length in range(buffer.size):
        with pytest.raises(ValueError):
            Payload.from_bytes(buffer[:length])


def test_trailing_bytes_raise(codec, rng):
    buffer = codec.encode(rng.standard_normal(50).astype(np.float32), step=0).to_bytes()
    with pytest.raises(ValueError, match="trailing"):
        Payload.from_bytes(np.concatenate([buffer, np.zeros(8, np.uint8)]))


@pytest.mark.parametrize("position", range(24))
def test_corrupted_header_byte_raises(rng, position):
    from sparcomm import QSGD

    buffer = QSGD(bits=3).encode(rng.standard_normal(999).astype(np.float32), step=0).to_bytes()
    corrupted = buffer.copy()
    corrupted[position] ^= 0x5A
    with pytest.raises(ValueError):
        Payload.from_bytes(corrupted)


def test_foreign_buffers_raise(rng):
    with pytest.raises(ValueError, match="not a sparcomm payload"):
        Payload.from_bytes(rng.integers(0, 256, 4096, dtype=np.uint8))
    with pytest.raises(ValueError, match="shorter"):
        Payload.from_bytes(b"SPCM")
    with pytest.raises(ValueError, match="uint8"):
        Payload.from_bytes(np.zeros(64, dtype=np.float32))
    with pytest.raises(TypeError, match="numpy"):
        Payload.from_bytes([1, 2, 3])


def test_wire_sizes_follow_the_documented_bit_counts():
    from sparcomm import FP16, QSGD, OneBit, TernGrad, TopK

    n = 1 << 20
    header = wire_nbytes(1, 0, [])  # 24-byte fixed header + 8 bytes of shape
    assert header == 32
    # TopK: k int32 indices + k values (+16-byte descriptors, 1 param)
    assert TopK(k=1000).encoded_nbytes(n) == 32 + 8 + 2 * 16 + 4000 + 4000
    # QSGD 4 bits: n/2 bytes + one float32 per 512-bucket
    assert QSGD(bits=4).encoded_nbytes(n) == 32 + 4 * 8 + 2 * 16 + n // 2 + 4 * (n // 512)
    # QSGD levels=2 -> ceil(log2 3) + 1 = 3 bits per element
    assert QSGD(levels=2).bits == 3
    assert TernGrad().encoded_nbytes(n) == 32 + 8 + 2 * 16 + 8 + n // 4
    assert OneBit().encoded_nbytes(n) == 32 + 8 + 2 * 16 + 8 * (n // 512) + n // 8
    assert FP16().encoded_nbytes(n) == 32 + 16 + 2 * n


def test_int64_indices_above_two_to_the_31():
    from sparcomm.codecs.topk import index_dtype

    assert index_dtype(2**31 - 1) == np.int32
    assert index_dtype(2**31) == np.int64
