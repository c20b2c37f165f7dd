"""Error feedback fused into the codec's pass on the host: ``ErrorFeedback(TopK)`` adds
the residual inside the top-k pass (``kernels.cpu.topk_of_sum``), ``OneBit()`` adds,
encodes and subtracts the decode in one (``kernels.cpu.onebit_encode_feedback``).
Payloads and residuals must be bit for bit those of the unfused path (``add``, encode,
decode), step after step, for every shape of input."""

from __future__ import annotations

import types

import numpy as np
import pytest
from sparcomm.kernels import cpu

from sparcomm import ErrorFeedback, OneBit, TopK


class _UnfusedTopK(TopK):
    """TopK with its own ``_encode_flat``: error feedback then adds, then selects."""

    def _encode_flat(self, xp, kernels, flat, stream, **options):
        return super()._encode_flat(xp, kernels, flat, stream, **options)


class _UnfusedOneBit(OneBit):
    def _encode_flat(self, xp, kernels, flat, stream, **options):
        return super()._encode_flat(xp, kernels, flat, stream, **options)


def _steps(dtype, shape, density, steps=4, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3)).astype(dtype)
        for _ in range(steps)
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape, density",
    [((1,), 1.0), ((7,), 0.5), ((1000,), 0.01), ((300, 700), 0.01), (((1 << 17) + 3,), 0.001)],
)
def test_fused_feedback_matches_unfused(dtype, shape, density):
    fused, plain = (
        ErrorFeedback(TopK(density=density)),
        ErrorFeedback(_UnfusedTopK(density=density)),
    )
    assert fused.codec.fuses_compensation and not plain.codec.fuses_compensation
    for x in _steps(dtype, shape, density):
        a, b = fused.encode(x, key="w"), plain.encode(x, key="w")
        assert a.shape == b.shape == x.shape
        for name in ("indices", "values"):
            assert a.arrays[name].tobytes() == b.arrays[name].tobytes()
        assert fused.residual("w").tobytes() == plain.residual("w").tobytes()


def test_fused_feedback_non_contiguous_input_and_ties():
    x = np.zeros((64, 64), np.float32)
    x[::3, ::5] = 1.0  # many ties at the threshold
    fused, plain = ErrorFeedback(TopK(k=50)), ErrorFeedback(_UnfusedTopK(k=50))
    for _ in range(3):
        view = x.T  # not C-contiguous
        a, b = fused.encode(view, key=0), plain.encode(view, key=0)
        assert a.arrays["indices"].tobytes() == b.arrays["indices"].tobytes()
        assert fused.residual(0).tobytes() == plain.residual(0).tobytes()


def test_fused_feedback_non_finite_keeps_the_residual():
    feedback = ErrorFeedback(TopK(density=0.1))
    x = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    feedback.encode(x, key="k")
    before = feedback.residual("k").copy()
    bad = x.copy()
    bad[17] = np.nan
    with pytest.raises(ValueError, match="non-finite|NaN|finite"):
        feedback.encode(bad, key="k")
    assert feedback.residual("k").tobytes() == before.tobytes()
    feedback.encode(x, key="k")  # and it goes on from the same residual


def test_topk_of_sum_kernel_checks_and_matches_add_then_topk():
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal(200_003).astype(np.float32) for _ in range(2))
    total, idx, val = np.empty_like(a), np.empty(2000, np.int32), np.empty(2000, np.float32)
    assert cpu.topk_of_sum(a, b, total, 2000, idx, val) == 0
    expected = np.empty_like(a)
    cpu.add(a, b, expected)
    idx2, val2 = np.empty_like(idx), np.empty_like(val)
    cpu.topk(expected, 2000, idx2, val2)
    expected[idx2] = 0  # the new residual
    assert total.tobytes() == expected.tobytes()
    assert idx.tobytes() == idx2.tobytes() and val.tobytes() == val2.tobytes()
    with pytest.raises(ValueError, match="overlap"):
        cpu.topk_of_sum(a, b, a, 2000, idx, val)
    with pytest.raises(TypeError, match="dtype"):
        cpu.topk_of_sum(a, b.astype(np.float64), total, 2000, idx, val)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bucket", [1, 4, 7, 512, 5000, 40000])
@pytest.mark.parametrize("shape", [(1,), (13,), (300, 70), ((1 << 16) + 5,)])
def test_onebit_fused_feedback_matches_unfused(dtype, bucket, shape):
    fused = ErrorFeedback(OneBit(bucket, error_feedback=False))
    plain = ErrorFeedback(_UnfusedOneBit(bucket, error_feedback=False))
    assert fused.codec.fuses_feedback and not plain.codec.fuses_feedback
    for x in _steps(dtype, shape, 0.0):
        a, b = fused.encode(x, key="w"), plain.encode(x, key="w")
        assert a.shape == b.shape == x.shape
        for name in ("means", "packed"):
            assert a.arrays[name].tobytes() == b.arrays[name].tobytes()
        assert fused.residual("w").tobytes() == plain.residual("w").tobytes()


def test_onebit_default_error_feedback_is_fused_and_keeps_state_on_failure():
    codec = OneBit()
    x = np.random.default_rng(2).standard_normal(10_000).astype(np.float32)
    codec.encode(x, key="k")
    codec.encode(x, key="k")
    before = codec.feedback.residual("k").copy()
    bad = x.copy()
    bad[5] = np.inf
    with pytest.raises(ValueError, match="non-finite|finite"):
        codec.encode(bad, key="k")
    assert codec.feedback.residual("k").tobytes() == before.tobytes()


def test_onebit_encode_feedback_kernel_checks_overlap():
    x = np.ones(64, np.float32)
    packed, means = np.empty(8, np.uint8), np.empty(2, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        cpu.onebit_encode_feedback(x, x.copy(), 64, packed, means, x)
    with pytest.raises(ValueError, match="dtype and size"):
        cpu.onebit_encode_feedback(x, np.ones(63, np.float32), 64, packed, means, x.copy())


def test_codecs_without_the_host_fusion_give_the_same_bits():
    """Where the kernels lack the fused kernel (the GPU's), the codecs run the
    contract's kernels in sequence and leave the same payload and residual."""
    rng = np.random.default_rng(5)
    flat = rng.standard_normal(50_000).astype(np.float32)
    residual = rng.standard_normal(50_000).astype(np.float32)
    contract = types.SimpleNamespace(
        **{name: getattr(cpu, name) for name in ("add", "topk", "onebit_encode", "onebit_decode")}
    )
    for codec in (TopK(density=0.01), OneBit(error_feedback=False)):
        results = []
        for kernels in (cpu, contract):
            compensated = np.full_like(flat, np.nan)
            arrays = codec._encode_flat(
                np, kernels, flat, 0, residual=residual, compensated=compensated
            )
            results.append((arrays, compensated))
        (fused, c1), (plain, c2) = results
        assert c1.tobytes() == c2.tobytes()
        assert all(fused[name].tobytes() == plain[name].tobytes() for name in fused)
