"""The codec API: shapes, dtypes, dispatch, reproducibility, and every bad-input path."""

from __future__ import annotations

import numpy as np
import pytest

from sparcomm import FP16, QSGD, ErrorFeedback, NoCompression, OneBit, TernGrad, TopK


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (511,), (513,), (4, 5, 6)])
def test_decode_restores_shape_and_dtype(codec, rng, dtype, shape):
    if isinstance(codec, TopK) and codec.k is not None and codec.k > int(np.prod(shape)):
        pytest.skip("k larger than the array")
    x = rng.standard_normal(shape).astype(dtype)
    y = codec.decode(codec.encode(x, key="t", step=1))
    assert y.shape == x.shape and y.dtype == x.dtype


def test_exact_codecs_are_exact(rng):
    x = rng.standard_normal((8, 9)).astype(np.float32)
    np.testing.assert_array_equal(NoCompression().decode(NoCompression().encode(x)), x)
    np.testing.assert_array_equal(FP16().decode(FP16().encode(x)), x.astype(np.float16))
    y = TopK(k=x.size).decode(TopK(k=x.size).encode(x))
    np.testing.assert_array_equal(y, x)


def test_non_contiguous_input_is_accepted(codec, rng):
    base = rng.standard_normal((40, 30)).astype(np.float32)
    view = base[::2, 1::3]
    assert not view.flags.c_contiguous
    a = codec.decode(codec.encode(view, key="v", step=3))
    b = codec.decode(codec.encode(np.ascontiguousarray(view), key="v", step=3))
    np.testing.assert_array_equal(a, b)


def test_decode_into_out(codec, rng):
    x = rng.standard_normal((6, 11)).astype(np.float64)
    payload = codec.encode(x, key="o", step=0)
    out = np.empty_like(x)
    assert codec.decode(payload, out=out) is out
    np.testing.assert_array_equal(out, codec.decode(payload))
    with pytest.raises(ValueError, match="elements"):
        codec.decode(payload, out=np.empty(5, dtype=np.float64))
    with pytest.raises(ValueError, match="contiguous"):
        codec.decode(payload, out=np.empty((11, 6)).T)


def test_stochastic_streams_are_reproducible_and_independent(rng):
    x = rng.standard_normal(4096).astype(np.float32)
    for codec in (QSGD(bits=3, seed=7), TernGrad(seed=7)):
        same = codec.encode(x, key="a", step=5, rank=1).arrays["packed"]
        again = (
            type(codec)(**({"bits": 3} if isinstance(codec, QSGD) else {}), seed=7)
            .encode(x, key="a", step=5, rank=1)
            .arrays["packed"]
        )
        np.testing.assert_array_equal(same, again)
        for other in (
            {"key": "b", "step": 5, "rank": 1},
            {"key": "a", "step": 6, "rank": 1},
            {"key": "a", "step": 5, "rank": 2},
        ):
            assert not np.array_equal(codec.encode(x, **other).arrays["packed"], same)
        # without a step, successive calls draw fresh numbers
        first = codec.encode(x, key="c").arrays["packed"]
        assert not np.array_equal(codec.encode(x, key="c").arrays["packed"], first)


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.complex64, np.float16, bool])
def test_wrong_dtype_raises_type_error(codec, dtype):
    with pytest.raises(TypeError, match="float32 or float64"):
        codec.encode(np.ones(10, dtype=dtype))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(codec, bad):
    x = np.ones(40, dtype=np.float32)
    x[17] = bad
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode(x, step=0)


def test_fp16_overflow_is_refused():
    with pytest.raises(ValueError, match="non-finite"):
        FP16().encode(np.array([1e6], dtype=np.float32))


def test_empty_and_zero_dimensional_arrays_raise(codec):
    with pytest.raises(ValueError, match="empty"):
        codec.encode(np.ones((3, 0), dtype=np.float32))
    with pytest.raises(ValueError, match="0-d"):
        codec.encode(np.ones((), dtype=np.float32))


def test_not_an_array_raises():
    with pytest.raises(TypeError, match="numpy.ndarray"):
        TopK(k=1).encode([1.0, 2.0])


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: TopK(density=0.0), ValueError, r"density must be in \(0, 1\], got 0.0"),
        (lambda: TopK(density=1.5), ValueError, r"density must be in \(0, 1\], got 1.5"),
        (lambda: TopK(k=-1), ValueError, r"k must be in \[0, inf\], got -1"),
        (lambda: TopK(k=2.5), TypeError, "k must be an int"),
        (lambda: TopK(), ValueError, "exactly one of k and density"),
        (lambda: TopK(k=3, density=0.1), ValueError, "exactly one of k and density"),
        (lambda: QSGD(bits=1), ValueError, r"bits must be in \[2, 8\], got 1"),
        (lambda: QSGD(bits=9), ValueError, r"bits must be in \[2, 8\], got 9"),
        (lambda: QSGD(levels=0), ValueError, r"levels must be in \[1, 127\], got 0"),
        (lambda: QSGD(levels=128), ValueError, r"levels must be in \[1, 127\], got 128"),
        (lambda: QSGD(bits=4, levels=7), ValueError, "at most one of bits and levels"),
        (lambda: QSGD(bucket_size=0), ValueError, r"bucket_size must be in \[1, inf\], got 0"),
        (lambda: QSGD(norm="l1"), ValueError, "norm must be one of"),
        (lambda: TernGrad(bucket_size=0), ValueError, r"bucket_size must be in \[1, inf\]"),
        (lambda: TernGrad(clip=-1.0), ValueError, "clip must be a positive finite float"),
        (lambda: OneBit(bucket_size=0), ValueError, r"bucket_size must be in \[1, inf\]"),
    ],
)
def test_bad_parameters_raise(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_k_larger_than_n_raises_at_encode():
    with pytest.raises(ValueError, match="k=10 exceeds the number of elements n=5"):
        TopK(k=10).encode(np.ones(5, dtype=np.float32))


def test_k_zero_is_allowed(rng):
    payload = TopK(k=0).encode(rng.standard_normal(9).astype(np.float32))
    assert payload.arrays["indices"].size == 0
    np.testing.assert_array_equal(TopK(k=0).decode(payload), np.zeros(9, np.float32))


def test_payload_decoded_by_the_wrong_codec_raises(rng):
    x = rng.standard_normal(100).astype(np.float32)
    payload = QSGD(bits=4).encode(x)
    with pytest.raises(ValueError, match="encoded by QSGD, cannot decode it with TopK"):
        TopK(k=3).decode(payload)
    with pytest.raises(ValueError, match="do not match"):
        QSGD(bits=8).decode(payload)
    with pytest.raises(TypeError, match="Payload"):
        QSGD(bits=4).decode(payload.to_bytes())


def test_payload_with_wrong_array_length_raises(rng):
    payload = TopK(k=5).encode(rng.standard_normal(100).astype(np.float32))
    payload.arrays["values"] = payload.arrays["values"][:4]
    with pytest.raises(ValueError, match="corrupted payload"):
        TopK(k=5).decode(payload)


def test_terngrad_shared_scale_must_cover_the_local_max(rng):
    x = rng.standard_normal(64).astype(np.float32)
    local = TernGrad().local_scales(x)
    with pytest.raises(ValueError, match="at least this rank's max"):
        TernGrad().encode(x, scale=local * 0.5)
    with pytest.raises(ValueError, match="one per bucket"):
        TernGrad(bucket_size=8).encode(x, scale=np.ones(3, np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_terngrad_shared_scale_edges_compare_exactly(dtype):
    # Compared on bit patterns, so subnormals count (a GPU float compare would flush them).
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.array([tiny, 0.0, -tiny], dtype=dtype)
    with pytest.raises(ValueError, match="at least this rank's max"):
        TernGrad().encode(x, scale=np.zeros(1, dtype))
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="at least this rank's max"):
            TernGrad().encode(np.ones(4, dtype), scale=np.array([bad], dtype))
    zeros = np.zeros(4, dtype)
    payload = TernGrad().encode(zeros, scale=np.array([-0.0], dtype))  # -0 covers 0
    assert not TernGrad().decode(payload).any()
    assert TernGrad().decode(TernGrad().encode(x, scale=np.array([2 * tiny], dtype))).dtype == dtype


def test_terngrad_clip_keeps_subnormal_scales():
    tiny = np.finfo(np.float32).smallest_subnormal  # float32: where a GPU would flush
    x = np.array([100 * tiny] + [tiny, -tiny] * 25, dtype=np.float32)
    codec = TernGrad(clip=2.5)
    threshold = np.float32(codec.clip_threshold(x))
    assert 0 < threshold < 100 * tiny  # the clip binds, at a subnormal value
    assert codec.local_scales(x)[0] == threshold


def test_wrapping_twice_or_wrapping_self_feeding_codecs_raises():
    with pytest.raises(TypeError, match="already wrapped"):
        ErrorFeedback(ErrorFeedback(TopK(k=1)))
    with pytest.raises(ValueError, match="keeps its own error feedback"):
        ErrorFeedback(OneBit())
    with pytest.raises(TypeError, match="sparcomm codec"):
        ErrorFeedback("topk")


def test_key_must_be_hashable_text_or_int():
    with pytest.raises(TypeError, match="key must be a str, an int or None"):
        QSGD().encode(np.ones(4, np.float32), key=("a", 1))


def test_payload_with_a_missing_array_raises(rng):
    payload = TopK(k=5).encode(rng.standard_normal(100).astype(np.float32))
    del payload.arrays["values"]
    with pytest.raises(ValueError, match="must carry 2 arrays, got 1"):
        TopK(k=5).decode(payload)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: TopK(density="0.1"), TypeError, "density must be a float"),
        (lambda: TernGrad(clip="2.5"), TypeError, "clip must be a float or None"),
        (lambda: QSGD(bits=4.0), TypeError, "bits must be an int"),
    ],
)
def test_parameters_of_the_wrong_type_raise(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_terngrad_refuses_unknown_options():
    with pytest.raises(TypeError, match="unexpected options"):
        TernGrad().encode(np.ones(8, np.float32), scales=1.0)


@pytest.mark.parametrize("accumulate", [1, -1])
def test_decode_accumulate_equals_decode_then_add_or_subtract(codec, rng, accumulate):
    # Fused in the decode pass (QSGD, TernGrad, OneBit) or through a temporary (the
    # others): the same bits either way, signed zeros and subnormals included.
    x = rng.standard_normal((37, 11)).astype(np.float32)
    payload = codec.encode(x, key="w", step=0)
    tiny = np.finfo(np.float32).smallest_subnormal
    start = rng.standard_normal(x.shape).astype(np.float32)
    start.flat[::5] = -0.0
    start.flat[1::5] = tiny
    expected = start + codec.decode(payload) if accumulate == 1 else start - codec.decode(payload)
    out = start.copy()
    assert codec.decode(payload, out=out, accumulate=accumulate) is out
    assert out.tobytes() == expected.tobytes()


def test_decode_accumulate_rejects_bad_arguments(rng):
    codec = QSGD(bits=4)
    payload = codec.encode(rng.standard_normal(100).astype(np.float32), key=0, step=0)
    for bad in (2, True, 0.5, "1"):
        with pytest.raises(ValueError, match=r"accumulate must be 0 \(out = decoded\)"):
            codec.decode(payload, out=np.zeros(100, np.float32), accumulate=bad)
    with pytest.raises(ValueError, match="pass the buffer as out="):
        codec.decode(payload, accumulate=1)
