"""Error feedback: conservation (bit-exact for TopK), state, and no loss on failure."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparcomm import QSGD, ErrorFeedback, OneBit, TernGrad, TopK

finite32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(arrays(np.float32, 37, elements=finite32), min_size=1, max_size=4),
    k=st.integers(0, 37),
)
def test_topk_conservation_is_bit_exact(steps, k):
    ef = ErrorFeedback(TopK(k=k))
    residual = np.zeros(37, np.float32)
    for x in steps:
        compensated = x + residual
        decoded = ef.decode(ef.encode(x, key="w"))
        residual = ef.residual("w")
        np.testing.assert_array_equal(decoded + residual, compensated)
        # what was sent is exactly the k largest of the compensated gradient
        assert np.count_nonzero(decoded) <= k


@settings(max_examples=30, deadline=None)
@given(
    steps=st.lists(arrays(np.float64, 50, elements=st.floats(-100, 100)), min_size=1, max_size=4)
)
@pytest.mark.parametrize(
    "make",
    [
        lambda: QSGD(bits=3, bucket_size=8),
        lambda: TernGrad(),
        lambda: OneBit(bucket_size=6, error_feedback=False),
    ],
)
def test_quantizer_conservation_within_rounding(make, steps):
    ef = ErrorFeedback(make())
    sent = np.zeros(50)
    total = np.zeros(50)
    for step, x in enumerate(steps):
        total += x
        sent += ef.decode(ef.encode(x, key="w", step=step))
    # applied + kept == everything that came in, up to one rounding per step
    scale = max(1.0, float(np.abs(total).max()))
    np.testing.assert_allclose(
        sent + ef.residual("w"), total, rtol=0, atol=1e-12 * scale * len(steps) * 8
    )


def test_onebit_keeps_error_feedback_by_default(rng):
    codec = OneBit(bucket_size=4)
    x = rng.standard_normal(16)
    decoded = codec.decode(codec.encode(x, key="g"))
    np.testing.assert_allclose(decoded + codec.feedback.residual("g"), x, atol=1e-15)
    assert OneBit(error_feedback=False).feedback is None


def test_state_dict_round_trip_resumes_exactly(rng):
    xs = [rng.standard_normal(100).astype(np.float32) for _ in range(4)]
    a = ErrorFeedback(TopK(density=0.05))
    for x in xs[:2]:
        a.encode(x, key="w")
    b = ErrorFeedback(TopK(density=0.05))
    b.load_state_dict(a.state_dict())
    for x in xs[2:]:
        pa, pb = a.encode(x, key="w"), b.encode(x, key="w")
        np.testing.assert_array_equal(pa.to_bytes(), pb.to_bytes())
    np.testing.assert_array_equal(a.residual("w"), b.residual("w"))


def test_state_dict_of_another_codec_is_refused():
    a = ErrorFeedback(TopK(k=2))
    a.encode(np.ones(5, np.float32), key=1)
    with pytest.raises(ValueError, match="saved from TopK"):
        ErrorFeedback(TopK(k=3)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="residuals"):
        ErrorFeedback(TopK(k=3)).load_state_dict({})


def test_state_dict_is_a_copy(rng):
    ef = ErrorFeedback(TopK(k=1))
    ef.encode(rng.standard_normal(8).astype(np.float32), key="w")
    saved = ef.state_dict()["residuals"]["w"].copy()
    ef.encode(rng.standard_normal(8).astype(np.float32), key="w")
    np.testing.assert_array_equal(ef.state_dict()["residuals"]["w"] - 0, ef.residual("w"))
    assert not np.array_equal(saved, ef.residual("w"))


def test_failed_encode_loses_nothing(rng):
    ef = ErrorFeedback(TopK(k=2))
    ef.encode(rng.standard_normal(10).astype(np.float32), key="w")
    before = ef.residual("w").copy()
    bad = np.ones(10, np.float32)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ef.encode(bad, key="w")
    np.testing.assert_array_equal(ef.residual("w"), before)
    # and the memory keeps working afterwards
    x = rng.standard_normal(10).astype(np.float32)
    decoded = ef.decode(ef.encode(x, key="w"))
    np.testing.assert_array_equal(decoded.ravel() + ef.residual("w"), x + before)


def test_shape_change_under_one_key_is_refused():
    ef = ErrorFeedback(TopK(k=1))
    ef.encode(np.ones(4, np.float32), key="w")
    with pytest.raises(ValueError, match="give every tensor its own key"):
        ef.encode(np.ones(5, np.float32), key="w")


def test_state_dict_with_a_malformed_residual_is_refused():
    ef = ErrorFeedback(TopK(k=1))
    ef.encode(np.ones(4, np.float32), key="w")
    state = ef.state_dict()
    state["residuals"]["w"] = np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match="1-D float array"):
        ErrorFeedback(TopK(k=1)).load_state_dict(state)
