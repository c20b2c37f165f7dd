"""The fusion plan: a pure function of the registered tensors and the options."""

from __future__ import annotations

import numpy as np
import pytest

from sparcomm.reducer import build_plan

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
SPECS = [
    ("fc2.bias", (10,), F32),
    ("fc2.weight", (10, 300), F32),  # 3000 elements, 12000 bytes
    ("fc1.bias", (300,), F32),
    ("fc1.weight", (300, 64), F32),  # 19200 elements
    ("head", (7,), F64),
]


def _layout(plan):
    return [
        ([slot.name for slot in bucket.slots], bucket.compressed, bucket.dtype.name)
        for bucket in plan.buckets
    ]


def test_dense_plan_fuses_consecutive_tensors_of_one_dtype_up_to_the_threshold():
    plan = build_plan(
        SPECS, compress=False, fusion_threshold_bytes=16_000, dense_below=0, compression="layer"
    )
    assert _layout(plan) == [
        (["fc2.bias", "fc2.weight", "fc1.bias"], False, "float32"),  # 40+12000+1200 bytes
        (["fc1.weight"], False, "float32"),  # larger than the threshold alone
        (["head"], False, "float64"),
    ]
    first = plan.buckets[0]
    assert [slot.offset for slot in first.slots] == [0, 10, 3010]
    assert first.size == 3310 and first.key == "fused[fc2.bias..fc1.bias](3)"
    assert plan.buckets[1].key == "fc1.weight"
    assert plan.lookup["fc1.bias"][0] == 0 and plan.lookup["head"][0] == 2


def test_zero_threshold_means_one_bucket_per_tensor():
    plan = build_plan(
        SPECS, compress=True, fusion_threshold_bytes=0, dense_below=0, compression="bucket"
    )
    assert [len(bucket.slots) for bucket in plan.buckets] == [1] * len(SPECS)


def test_layer_mode_gives_each_compressed_tensor_its_own_bucket_and_fuses_small_ones():
    plan = build_plan(
        SPECS,
        compress=True,
        fusion_threshold_bytes=1 << 20,
        dense_below=1024,
        compression="layer",
        layer_fuse_below=1000,
    )
    assert _layout(plan) == [
        (["fc2.weight"], True, "float32"),
        (["fc2.bias", "fc1.bias"], False, "float32"),  # ready with fc1.bias
        (["fc1.weight"], True, "float32"),
        (["head"], False, "float64"),
    ]


def test_layer_mode_fuses_compressed_tensors_below_layer_fuse_below():
    specs = [
        ("fc3.bias", (2048,), F32),
        ("fc3.weight", (2048, 2048), F32),
        ("fc2.bias", (2048,), F32),
        ("fc2.weight", (2048, 2048), F32),
        ("fc1.bias", (2048,), F32),
        ("fc1.weight", (2048, 512), F32),
    ]
    # The defaults: the 10M-parameter MLP, whose three 2048-element biases each
    # paid a collective of their own.
    plan = build_plan(
        specs, compress=True, fusion_threshold_bytes=25 << 20, dense_below=1024, compression="layer"
    )
    assert _layout(plan) == [
        (["fc3.weight"], True, "float32"),
        (["fc2.weight"], True, "float32"),
        (["fc3.bias", "fc2.bias", "fc1.bias"], True, "float32"),  # ready with fc1.bias
        (["fc1.weight"], True, "float32"),
    ]
    plan = build_plan(
        SPECS,
        compress=True,
        fusion_threshold_bytes=1 << 20,
        dense_below=1024,
        compression="layer",
        layer_fuse_below=10_000,
    )
    assert _layout(plan) == [
        (["fc2.weight"], True, "float32"),  # the only small compressed tensor
        (["fc2.bias", "fc1.bias"], False, "float32"),
        (["fc1.weight"], True, "float32"),
        (["head"], False, "float64"),
    ]


def test_bucket_mode_fuses_compressed_tensors():
    plan = build_plan(
        SPECS, compress=True, fusion_threshold_bytes=1 << 20, dense_below=1024, compression="bucket"
    )
    assert _layout(plan) == [
        # the dense bucket is complete when fc1.bias arrives, before fc1.weight
        (["fc2.bias", "fc1.bias"], False, "float32"),
        (["fc2.weight", "fc1.weight"], True, "float32"),
        (["head"], False, "float64"),
    ]


@pytest.mark.parametrize("compression", ["layer", "bucket"])
@pytest.mark.parametrize("threshold", [0, 100, 16_000, 1 << 30])
def test_every_tensor_is_placed_exactly_once_without_overlap(compression, threshold):
    plan = build_plan(
        SPECS,
        compress=True,
        fusion_threshold_bytes=threshold,
        dense_below=500,
        compression=compression,
    )
    names = [slot.name for bucket in plan.buckets for slot in bucket.slots]
    assert sorted(names) == sorted(name for name, _, _ in SPECS)
    for bucket in plan.buckets:
        end = 0
        for slot in bucket.slots:
            assert slot.offset == end
            end += slot.size
        assert end == bucket.size
        if len(bucket.slots) > 1:
            assert bucket.size * bucket.dtype.itemsize <= max(threshold, 1)
