"""The host-only fused sums ``qsgd_decode_sum`` / ``onebit_decode_sum`` (kernels/cpu).

``out = d_0 + d_1 + ...`` must be bit for bit ``{codec}_decode`` of the first payload
followed by ``accumulate=1`` decodes of the others in list order, which the quantized
collectives' sums were before the fusion.  Sizes cover a partial 8-element group, a
partial bucket, several parallel tasks (``CHUNK``) and the streamed output
(``STREAM_MIN``); payloads hold terms whose sum overflows to inf (as a sum of decodes
does) and empty buckets.
"""

from __future__ import annotations

import numpy as np
import pytest
from sparcomm.kernels import cpu
from sparcomm.kernels.cpu._common import CHUNK
from sparcomm.kernels.cpu._stores import STREAM_MIN

STREAM = 0x5EED_0000_0000_0017


def _payloads(codec: str, n: int, dtype: type, bucket: int, count: int):
    """``count`` payloads of n elements: (packed arrays, scale or mean arrays, params)."""
    rng = np.random.default_rng([n, count, bucket])
    packeds, others = [], []
    nb = -(-n // bucket)
    for r in range(count):
        x = (rng.standard_normal(n) * np.exp(rng.uniform(-4, 4, n))).astype(dtype)
        x[: min(n, bucket)] = 0.0  # an all-zero first bucket: scale 0, means 0
        if r >= 1:
            x[-1] = np.finfo(dtype).max  # QSGD decodes it to max: two of them overflow
        if codec == "qsgd":
            scales, packed = np.empty(nb, dtype), np.empty(-(-n * 4 // 8), np.uint8)
            cpu.qsgd_encode(x, 7, 4, bucket, 0, STREAM + r, scales, packed)
            others.append(scales)
        else:
            means, packed = np.empty(2 * nb, dtype), np.empty(-(-n // 8), np.uint8)
            cpu.onebit_encode(x, bucket, packed, means)
            others.append(means)
        packeds.append(packed)
    return packeds, others


def _sequential(codec, packeds, others, bucket, out):
    for r, (packed, other) in enumerate(zip(packeds, others, strict=True)):
        if codec == "qsgd":
            cpu.qsgd_decode(packed, other, 7, 4, bucket, out, 1 if r else 0)
        else:
            cpu.onebit_decode(packed, other, bucket, out, 1 if r else 0)


def _fused(codec, packeds, others, bucket, out):
    if codec == "qsgd":
        cpu.qsgd_decode_sum(packeds, others, 7, 4, bucket, out)
    else:
        cpu.onebit_decode_sum(packeds, others, bucket, out)


@pytest.mark.parametrize("codec", ["qsgd", "onebit"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("n", "bucket", "count"),
    [(1, 4, 2), (13, 4, 3), (3 * CHUNK + 5, 512, 4), (3 * CHUNK, 1000, 1)],
)
def test_fused_sum_is_the_sequence_of_decodes(codec, dtype, n, bucket, count):
    packeds, others = _payloads(codec, n, dtype, bucket, count)
    want = np.full(n, np.nan, dtype=dtype)
    _sequential(codec, packeds, others, bucket, want)
    got = np.full(n, 7.0, dtype=dtype)  # every entry is overwritten
    _fused(codec, packeds, others, bucket, got)
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("codec", ["qsgd", "onebit"])
def test_streamed_fused_sum_is_the_sequence_of_decodes(codec):
    n = STREAM_MIN + 37  # the output streamed from blocks in cache, a partial last line
    packeds, others = _payloads(codec, n, np.float32, 512, 3)
    want = np.empty(n, dtype=np.float32)
    _sequential(codec, packeds, others, 512, want)
    got = np.full(n, np.nan, dtype=np.float32)
    _fused(codec, packeds, others, 512, got)
    assert got.tobytes() == want.tobytes()
    if codec == "qsgd":
        assert np.isinf(got[-1])  # max + max overflowed, as in the decodes


def test_the_collectives_sum_checks_every_payload_before_the_fused_kernel():
    from sparcomm import QSGD
    from sparcomm.comm._sums import FUSED_SUM_MIN, decode_sum

    codec, n = QSGD(bits=4), FUSED_SUM_MIN + 3
    x = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    good = codec.encode(x, key="w", step=0, rank=0)
    out = np.full(n, 5.0, dtype=np.float32)
    decode_sum(codec, [good, good], out)
    assert out.tobytes() == (codec.decode(good) + codec.decode(good)).tobytes()
    short = codec.encode(x[:-8], key="w", step=0, rank=1)
    with pytest.raises(ValueError, match="cannot be summed into"):
        decode_sum(codec, [good, short], out)
    with pytest.raises(ValueError, match="parameters"):
        decode_sum(codec, [good, QSGD(bits=3).encode(x, key="w", step=0, rank=1)], out)


def test_a_subclass_with_its_own_decode_is_summed_with_it():
    from sparcomm import QSGD
    from sparcomm.comm._sums import FUSED_SUM_MIN, decode_sum

    class Halved(QSGD):  # a user's variant: the fused kernel would skip its decode
        def _decode_flat(self, xp, kernels, payload, out, accumulate):
            decoded = np.empty_like(out)
            super()._decode_flat(xp, kernels, payload, decoded, 0)
            decoded *= 0.5
            out[...] = decoded if accumulate == 0 else out + accumulate * decoded

    codec, n = Halved(bits=4), FUSED_SUM_MIN + 3
    x = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    payload = codec.encode(x, key="w", step=0, rank=0)
    out = np.empty(n, dtype=np.float32)
    decode_sum(codec, [payload, payload], out)
    half = codec.decode(payload)
    assert out.tobytes() == (half + half).tobytes()


@pytest.mark.parametrize("codec", ["qsgd", "onebit"])
def test_no_payloads_or_unpaired_arrays_are_refused(codec):
    packeds, others = _payloads(codec, 64, np.float32, 16, 2)
    out = np.empty(64, dtype=np.float32)
    with pytest.raises(ValueError, match="one or more payloads"):
        _fused(codec, [], [], 16, out)
    with pytest.raises(ValueError, match="got 2 packed and 1"):
        _fused(codec, packeds, others[:1], 16, out)
