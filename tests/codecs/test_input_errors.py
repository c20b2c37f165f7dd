"""Codec-level input errors: the right class and a message with the expected value, the
actual one and the fix (empty or non-array inputs, read-only outputs, negative steps,
ranks and sizes)."""

from __future__ import annotations

import numpy as np
import pytest

from sparcomm import QSGD, ErrorFeedback, TopK
from sparcomm.codecs import CODECS

CODECS_UNDER_TEST = [p for p in CODECS.presets("test") if p.make().family != "low-rank"]


@pytest.mark.parametrize("make", [lambda: TopK(k=3), lambda: TopK(density=0.5)])
def test_topk_refuses_empty_arrays_and_lists(make):
    with pytest.raises(ValueError, match=r"x is empty \(shape \(0,\)\); there is nothing"):
        make().encode(np.zeros(0, dtype=np.float32))
    with pytest.raises(TypeError, match="got builtins.list; convert it with numpy.asarray"):
        make().encode([1.0, 2.0, 3.0])


@pytest.mark.parametrize("preset", CODECS_UNDER_TEST, ids=lambda p: p.label)
def test_decode_into_a_read_only_out_is_a_value_error(preset):
    codec = preset.make()
    x = np.random.default_rng(1).standard_normal(40).astype(np.float32)
    payload = codec.encode(x, key="w", step=0)
    out = np.zeros_like(x)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable, got a read-only array; pass"):
        codec.decode(payload, out=out)
    np.testing.assert_array_equal(out, 0)


@pytest.mark.parametrize("preset", CODECS_UNDER_TEST, ids=lambda p: p.label)
def test_encoded_nbytes_refuses_sizes_below_one(preset):
    codec = preset.make()
    for n in (0, -1):
        with pytest.raises(ValueError, match=rf"n must be in \[1, inf\], got {n}; pass the"):
            codec.encoded_nbytes(n)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        codec.encoded_nbytes(4.0)
    assert codec.encoded_nbytes(40) > 0


@pytest.mark.parametrize("codec", [QSGD(bits=4), ErrorFeedback(QSGD(bits=4)), TopK(k=2)])
def test_negative_step_and_rank_are_value_errors(codec):
    x = np.ones(8, dtype=np.float32)
    with pytest.raises(ValueError, match=r"step must be in \[0, inf\], got -1; steps count"):
        codec.encode(x, key="w", step=-1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, inf\], got -1; pass comm"):
        codec.encode(x, key="w", step=0, rank=-1)
    with pytest.raises(TypeError, match="step must be an int, got float"):
        codec.encode(x, key="w", step=1.5)
