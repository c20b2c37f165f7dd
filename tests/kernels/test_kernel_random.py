"""The kernels' counter-hash uniform equals ``sparcomm._random.uniform_reference``."""

from __future__ import annotations

import numpy as np
import pytest
from sparcomm.kernels import cpu
from sparcomm.kernels import reference as ref

from sparcomm._random import stream_key, uniform_reference


@pytest.mark.parametrize(
    "stream",
    [
        0,
        1,
        2**63 - 1,
        2**63,
        2**64 - 1,
        stream_key(0, 0, "fc1.weight", 0),
        stream_key(7, 3, 12, 99),
    ],
)
@pytest.mark.parametrize("start", [0, 12345, 2**32 - 100, 2**40 + 3])
def test_uniform_matches_reference(stream: int, start: int) -> None:
    n = 70_001  # several parallel tasks; from 2**32 - 100 it crosses the hi-word boundary
    out = np.empty(n, dtype=np.float64)
    cpu.uniform(stream, start, out)
    want = uniform_reference(stream, np.arange(start, start + n, dtype=np.uint64))
    assert np.array_equal(out, want)
    ref_out = np.empty(n, dtype=np.float64)
    ref.uniform(stream, start, ref_out)
    assert np.array_equal(ref_out, want)


def test_stream_argument_types_do_not_collide() -> None:
    # Numba types a Python int as int64 below 2**63 and uint64 above; a compiled int64
    # specialisation must not be reused (and overflow) for a key above 2**63.
    out = np.empty(8, dtype=np.float64)
    for stream in (5, 2**64 - 5, 6, 2**63 + 1):
        cpu.uniform(stream, 0, out)
        assert np.array_equal(out, uniform_reference(stream, np.arange(8, dtype=np.uint64)))


def test_uniform_is_24_bit_and_in_range() -> None:
    out = np.empty(1 << 16, dtype=np.float64)
    cpu.uniform(stream_key(1, 0, None, 0), 0, out)
    assert out.min() >= 0.0 and out.max() < 1.0
    assert np.array_equal(out * 2.0**24, np.floor(out * 2.0**24))
    # The mean of 65536 uniforms: standard error 1/sqrt(12 * 65536) ~ 0.00113; 5 sigma.
    assert abs(out.mean() - 0.5) < 5 * 0.00113
