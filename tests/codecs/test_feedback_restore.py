"""ErrorFeedback.snapshot / restore: by reference for the built-in codecs, any number of
encodes since a by-reference snapshot beyond one is refused (the old residual was
overwritten), per-key snapshots leave other keys alone; DGC and PowerSGD alike."""

from __future__ import annotations

import numpy as np
import pytest

from sparcomm import DGC, QSGD, ErrorFeedback, OneBit, PowerSGD, TopK
from sparcomm.feedback import unwrap

MAKERS = {
    "topk-ef": lambda: ErrorFeedback(TopK(k=3)),
    "qsgd-ef": lambda: ErrorFeedback(QSGD(bits=2, bucket_size=8)),
    "onebit": lambda: OneBit(),
    "dgc": lambda: DGC(TopK(k=3), momentum=0.9),
}


def _memory(codec):
    return unwrap(codec)[1]


def _encode(codec, key, seed):
    x = np.random.default_rng([seed, len(str(key))]).standard_normal(40).astype(np.float32)
    codec.encode(x, key=key, step=seed)


def _residuals(memory):
    return {key: value.copy() for key, value in memory.state_dict()["residuals"].items()}


@pytest.mark.parametrize("name", list(MAKERS))
def test_snapshot_of_builtin_codecs_is_by_reference(name):
    codec = MAKERS[name]()
    _encode(codec, "a", 0)
    handle = _memory(codec).snapshot()
    if name == "dgc":  # (error feedback's handle, the velocities)
        handle, momenta = handle
        assert momenta["a"] is codec.momentum_buffer("a")
    assert not handle.copied
    assert handle.residuals["a"] is _memory(codec).residual("a")


@pytest.mark.parametrize("times", [2, 3, 4])
@pytest.mark.parametrize("name", list(MAKERS))
def test_restore_refuses_a_key_encoded_more_than_once(name, times):
    # Two encodes swap the two buffers back, so the live residual *is* the snapshot's
    # array, overwritten: identity alone cannot tell; the encode count does.
    codec = MAKERS[name]()
    memory = _memory(codec)
    _encode(codec, "a", 0)
    _encode(codec, "b", 0)
    handle = memory.snapshot()
    for step in range(1, times + 1):
        _encode(codec, "a", step)
    _encode(codec, "b", 9)
    state = _residuals(memory)
    with pytest.raises(RuntimeError, match="key 'a' was encoded more than once"):
        memory.restore(handle)
    after = _residuals(memory)  # refused as a whole: nothing changed
    assert list(after) == list(state)
    for key in state:
        np.testing.assert_array_equal(after[key], state[key])


@pytest.mark.parametrize("name", list(MAKERS))
def test_restore_after_one_encode_then_restore_again(name):
    # restore() resets the encode count: a second step, then a second restore, works.
    codec = MAKERS[name]()
    memory = _memory(codec)
    _encode(codec, "a", 0)
    before = _residuals(memory)
    for attempt in range(3):
        handle = memory.snapshot()
        _encode(codec, "a", 1 + attempt)
        _encode(codec, "new", 1 + attempt)
        memory.restore(handle)
        after = _residuals(memory)
        assert list(after) == ["a"]
        np.testing.assert_array_equal(after["a"], before["a"])


@pytest.mark.parametrize("name", list(MAKERS))
def test_per_key_snapshot_leaves_other_keys_alone(name):
    codec = MAKERS[name]()
    memory = _memory(codec)
    _encode(codec, "a", 0)
    _encode(codec, "b", 0)
    before = _residuals(memory)
    handle = memory.snapshot(("a", "fresh"))
    _encode(codec, "a", 1)
    _encode(codec, "fresh", 1)
    _encode(codec, "b", 1)  # not covered: keeps this step
    _encode(codec, "other", 1)  # not covered: kept although new
    b_now = memory.residual("b").copy()
    memory.restore(handle)
    assert sorted(memory.keys()) == ["a", "b", "other"]
    np.testing.assert_array_equal(memory.residual("a"), before["a"])
    np.testing.assert_array_equal(memory.residual("b"), b_now)
    # The restored key encodes on from its restored residual, as after any encode.
    _encode(codec, "a", 1)
    handle = memory.snapshot(["a"])
    _encode(codec, "a", 2)
    _encode(codec, "a", 3)
    with pytest.raises(RuntimeError, match="more than once"):
        memory.restore(handle)


def test_copied_snapshot_allows_any_number_of_encodes():
    # A codec without residual_into or a fused decode: the snapshot copies, so several
    # encodes since it are fine.
    codec = ErrorFeedback(QSGD(bits=2, bucket_size=8))
    codec.codec.fused_accumulate = False  # instance attribute: this codec only
    _encode(codec, "a", 0)
    before = _residuals(codec)
    handle = codec.snapshot()
    assert handle.copied
    for step in range(1, 4):
        _encode(codec, "a", step)
    codec.restore(handle)
    np.testing.assert_array_equal(codec.residual("a"), before["a"])


def test_powersgd_per_key_snapshot_and_twice_detected():
    codec = PowerSGD(rank=1)
    rng = np.random.default_rng(0)
    for key in ("a", "b"):
        codec.encode(rng.standard_normal((6, 5)).astype(np.float32), key=key)
    before = codec.state_dict()
    handle = codec.snapshot(["a", "fresh"])
    for key in ("a", "b", "fresh"):
        codec.encode(rng.standard_normal((6, 5)).astype(np.float32), key=key)
    b_now = codec.residual("b").copy()
    codec.restore(handle)
    assert sorted(codec.keys()) == ["a", "b"]
    np.testing.assert_array_equal(codec.residual("a"), before["residuals"]["a"])
    np.testing.assert_array_equal(codec.residual("b"), b_now)
    assert codec.state_dict()["calls"]["a"] == before["calls"]["a"]
    handle = codec.snapshot(["a"])
    for _ in range(2):
        codec.encode(rng.standard_normal((6, 5)).astype(np.float32), key="a")
    with pytest.raises(RuntimeError, match="more than one step"):
        codec.restore(handle)
