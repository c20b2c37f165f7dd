"""Element-wise codecs (FP16, NoCompression) fuse into buckets as dense tensors do,
whatever ``compression=`` says; codecs whose result depends on tensor boundaries
(scales, selection, residuals, random streams, PowerSGD's matrices) keep their mode.

The bit-identity of the fused result under several ranks is tests/mpi/test_fuse_elementwise.py.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mpi4py.MPI")

from sparcomm import (  # noqa: E402
    DGC,
    FP16,
    QSGD,
    CodecPolicy,
    ErrorFeedback,
    NoCompression,
    OneBit,
    PowerSGD,
    TernGrad,
    TopK,
)
from sparcomm.comm import allreduce  # noqa: E402
from sparcomm.reducer import (  # noqa: E402
    DEFAULT_LAYER_FUSE_BELOW,
    GradientReducer,
    _is_elementwise,
    build_plan,
)

# Sizes on both sides of layer_fuse_below (65536) and of dense_below (1024), in backward
# order: the 10-class head of an MLP first, as a model's gradients become ready.
SPECS = [
    ("head.bias", (10,), np.dtype(np.float32)),
    ("head.weight", (10, 512), np.dtype(np.float32)),
    ("fc2.bias", (512,), np.dtype(np.float32)),
    ("fc2.weight", (512, 512), np.dtype(np.float32)),
    ("fc1.bias", (512,), np.dtype(np.float32)),
    ("fc1.weight", (512, 300), np.dtype(np.float32)),
    ("emb.weight", (3000, 8), np.dtype(np.float32)),
]


def _members(plan, compressed=None):
    """Each bucket's tensor names (optionally only compressed or only dense buckets)."""
    return [
        [slot.name for slot in bucket.slots]
        for bucket in plan.buckets
        if compressed is None or bucket.compressed == compressed
    ]


def _dense_plan(specs, threshold, dense_below=0):
    return build_plan(
        specs,
        compress=False,
        fusion_threshold_bytes=threshold,
        dense_below=dense_below,
        compression="layer",
    )


def _grads(step, specs=SPECS):
    rng = np.random.default_rng(step)
    # Magnitudes over eight decades: float16 rounding (and its subnormals) matters.
    return {
        name: (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 2, shape)).astype(dtype)
        for name, shape, dtype in specs
    }


@pytest.mark.parametrize("compression", ["layer", "bucket"])
@pytest.mark.parametrize("threshold", [0, 200_000, 1 << 20, 25 * 2**20])
@pytest.mark.parametrize("codec", [FP16(), NoCompression()], ids=repr)
def test_elementwise_plan_has_the_dense_plan_buckets(codec, threshold, compression):
    reducer = GradientReducer(
        codec, fusion_threshold_bytes=threshold, dense_below=0, compression=compression
    )
    try:
        reducer.setup(SPECS)
        plan = reducer._plans[True]
        dense = _dense_plan(SPECS, threshold)
        assert _members(plan) == _members(dense)
        # FP16's buckets go through the codec, as one vector each (not per tensor).
        is_fp16 = isinstance(codec, FP16)
        assert all(b.compressed == is_fp16 and not b.per_tensor for b in plan.buckets)
        reducer.reduce(_grads(0))
        stats = reducer.last_stats
        assert stats.buckets == len(dense.buckets) == len(stats.algorithms)
        assert stats.compressed_buckets == (len(dense.buckets) if is_fp16 else 0)
    finally:
        reducer.close()


def test_fp16_keeps_tensors_below_dense_below_dense():
    """dense_below still applies: the FP16 tensors fuse as the dense plan of the same
    tensors, and the small ones form the dense buckets they formed before."""
    threshold = 25 * 2**20
    reducer = GradientReducer(FP16())  # the defaults: 25 MiB, dense_below 1024, "layer"
    try:
        reducer.setup(SPECS)
        plan = reducer._plans[True]
        small = [spec for spec in SPECS if int(np.prod(spec[1])) < 1024]
        large = [spec for spec in SPECS if int(np.prod(spec[1])) >= 1024]
        assert _members(plan, compressed=True) == _members(_dense_plan(large, threshold))
        assert _members(plan, compressed=False) == _members(_dense_plan(small, threshold))
        # One FP16 bucket and one dense: "layer" mode made 5 collectives, one per large
        # tensor (those below layer_fuse_below shared a bucket but not a collective).
        assert len(plan.buckets) == 2
        reducer.reduce(_grads(0))
        assert reducer.last_stats.buckets == 2
        assert reducer.last_stats.compressed_buckets == 1
    finally:
        reducer.close()


def test_fused_fp16_equals_per_tensor_allreduce_at_this_size():
    """One rank (the MPI test covers 2 to 4): each tensor of a fused FP16 bucket has
    the bits of its own FP16 allreduce, and tensors below dense_below those of a dense one."""
    reducer = GradientReducer(FP16(), fusion_threshold_bytes=1 << 20, dense_below=600)
    try:
        for step in range(2):
            grads = _grads(step)
            reduced = reducer.reduce(grads)
            for name, grad in grads.items():
                codec = FP16() if grad.size >= 600 else NoCompression()
                expected = allreduce(grad, codec=codec, op="mean")
                assert reduced[name].dtype == grad.dtype
                np.testing.assert_array_equal(reduced[name], expected, err_msg=name)
    finally:
        reducer.close()


@pytest.mark.parametrize(
    "codec",
    [
        ErrorFeedback(FP16()),
        ErrorFeedback(NoCompression()),
        QSGD(bits=4),
        TernGrad(),
        OneBit(),
        ErrorFeedback(TopK(density=0.01)),
        DGC(TopK(density=0.01), momentum=0.9),
        PowerSGD(rank=2),
    ],
    ids=repr,
)
def test_codecs_with_boundaries_are_not_elementwise(codec):
    assert not _is_elementwise(codec)


def test_elementwise_is_declared_per_class():
    assert _is_elementwise(FP16()) and _is_elementwise(NoCompression())

    class RoundedDifferently(FP16):  # a variant: its encode may differ
        pass

    class Declared(FP16):
        is_elementwise = True

    assert not RoundedDifferently.is_elementwise and not _is_elementwise(RoundedDifferently())
    assert Declared.is_elementwise and _is_elementwise(Declared())
    assert not TopK.is_elementwise and not QSGD.is_elementwise


def test_error_feedback_fp16_keeps_layer_mode():
    """Residuals are keyed per tensor: ErrorFeedback(FP16()) is not fused."""
    reducer = GradientReducer(ErrorFeedback(FP16()), fusion_threshold_bytes=1 << 20, dense_below=0)
    try:
        reducer.setup(SPECS)
        plan = reducer._plans[True]
        large = [name for name, shape, _ in SPECS if np.prod(shape) >= DEFAULT_LAYER_FUSE_BELOW]
        own = [b.slots[0].name for b in plan.buckets if len(b.slots) == 1 and not b.per_tensor]
        assert large and set(large) <= set(own)
        assert any(b.per_tensor for b in plan.buckets)
    finally:
        reducer.close()


def test_policy_fuses_each_fp16_entry_with_itself_only():
    """A policy's FP16 entries fuse, each with its own tensors; its TopK tensors keep
    "layer" mode (each large one its own collective), and no bucket mixes codecs."""
    half, other_half = FP16(), FP16()
    topk = ErrorFeedback(TopK(density=0.1))
    policy = CodecPolicy(topk, rules=[("fc1.*", half), ("head.*", other_half), ("emb.*", half)])
    reducer = GradientReducer(policy, fusion_threshold_bytes=1 << 20, dense_below=0)
    try:
        reducer.setup(SPECS)
        plan = reducer._plans[True]
        codecs = reducer.codecs
        chosen = dict(zip([s[0] for s in SPECS], policy.assign(SPECS), strict=True))
        for bucket in plan.buckets:
            assert {chosen[slot.name] for slot in bucket.slots} == {bucket.codec}
        by_codec = {id(codecs[b.codec]): [slot.name for slot in b.slots] for b in plan.buckets}
        assert by_codec[id(half)] == ["fc1.bias", "fc1.weight", "emb.weight"]
        assert by_codec[id(other_half)] == ["head.bias", "head.weight"]
        # TopK: fc2.weight (262144 elements) alone, fc2.bias in "layer" mode's small bucket.
        topk_buckets = [b for b in plan.buckets if codecs[b.codec] is topk]
        assert sorted(len(b.slots) for b in topk_buckets) == [1, 1]
        assert all(not b.per_tensor for b in topk_buckets if b.slots[0].name == "fc2.weight")
        reducer.reduce(_grads(0))
        assert reducer.last_stats.buckets == len(plan.buckets) == 4
    finally:
        reducer.close()
