"""Corrupted payloads: every single-byte mutation of every codec's packed payload either
decodes or raises ValueError/TypeError (never IndexError, a Numba error or a crash),
and with ``to_bytes(checksum=True)`` every mutation of the array data is detected."""

from __future__ import annotations

import numpy as np
import pytest

from sparcomm import Payload, TopK
from sparcomm.codecs import CODECS
from sparcomm.payload import CHECKSUM_BYTES, header_nbytes

# sparcomm's own codecs (ids below 128; the tests' user codecs are not held to this).
PRESETS = [
    p for p in CODECS.presets("test") if p.make().family != "low-rank" and p.make().codec_id < 128
]
# Flip every bit; set the low bit; and the sign bit of a byte (one bit of an index).
MUTATIONS = (0xFF, 0x01, 0x80)


def _payload(make, dtype):
    codec = make()
    x = np.random.default_rng(11).standard_normal((2, 13)).astype(dtype)
    return codec, codec.encode(x, key="w", step=0)


def _decode_or_refuse(codec, buffer):
    try:
        payload = Payload.from_bytes(buffer)
        out = codec.decode(payload)
    except (ValueError, TypeError):
        return "refused"
    assert out.shape == payload.shape and out.dtype == payload.dtype
    return "decoded"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.label)
def test_every_byte_mutation_decodes_or_raises_value_error(preset, dtype):
    codec, payload = _payload(preset.make, dtype)
    buffer = payload.to_bytes()
    outcomes = set()
    for position in range(buffer.size):
        for mask in MUTATIONS:
            mutated = buffer.copy()
            mutated[position] ^= mask
            outcomes.add(_decode_or_refuse(codec, mutated))
    assert "refused" in outcomes  # header mutations at least are caught


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.label)
def test_checksum_detects_every_data_mutation(preset, dtype):
    codec, payload = _payload(preset.make, dtype)
    plain = payload.to_bytes()
    buffer = payload.to_bytes(checksum=True)
    assert buffer.size == payload.nbytes + CHECKSUM_BYTES
    # The header differs only in its flags and CRC; the data are the same bytes.
    start = header_nbytes(len(payload.shape), len(payload.params), len(payload.arrays))
    np.testing.assert_array_equal(buffer[start : plain.size], plain[start:])
    back = Payload.from_bytes(buffer)
    np.testing.assert_array_equal(codec.decode(back), codec.decode(payload))
    for position in range(start, buffer.size):
        for mask in MUTATIONS:
            mutated = buffer.copy()
            mutated[position] ^= mask
            with pytest.raises(ValueError, match="checksum mismatch|corrupted"):
                Payload.from_bytes(mutated)


def test_checksum_flag_is_covered_by_the_header_crc():
    _, payload = _payload(lambda: TopK(k=5), np.float32)
    buffer = payload.to_bytes(checksum=True)
    stripped = buffer[: payload.nbytes].copy()
    stripped[18] = 0  # drop the flag: the header CRC no longer matches
    with pytest.raises(ValueError, match="header checksum mismatch"):
        Payload.from_bytes(stripped)
    with pytest.raises(TypeError, match="checksum must be True or False"):
        payload.to_bytes(checksum=1)


def test_corrupted_topk_indices_raise_value_error():
    codec = TopK(k=4)
    x = np.zeros(50)
    x[[3, 10, 20, 40]] = [1.0, -2.0, 3.0, -4.0]
    payload = codec.encode(x)
    cases = {
        "out of range": np.array([3, 10, 20, 50], dtype=np.int32),
        "negative in range": np.array([-7, 10, 20, 40], dtype=np.int32),
        "unsorted": np.array([10, 3, 20, 40], dtype=np.int32),
        "duplicated": np.array([3, 10, 10, 40], dtype=np.int32),
    }
    for what, indices in cases.items():
        bad = Payload(
            payload.codec_id,
            payload.n,
            payload.dtype,
            payload.shape,
            payload.params,
            {"indices": indices, "values": payload.arrays["values"]},
        )
        with pytest.raises(ValueError, match=r"strictly ascending in \[0, n\) = \[0, 50\)"):
            codec.decode(bad)
        assert what
    np.testing.assert_array_equal(codec.decode(payload), x)
