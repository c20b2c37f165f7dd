"""The NumPy reference follows the contract in ``kernels/__init__.py``, checked against
element-by-element Python written straight from the contract's text (small inputs only).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sparcomm.kernels import reference as ref

from sparcomm._random import uniform_reference

STREAM = 987654321987654321


def lane_sum_loop(values: list[float]) -> float:
    lanes = [0.0] * 8
    for position, v in enumerate(values):
        lanes[position % 8] += v
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + (
        (lanes[4] + lanes[5]) + (lanes[6] + lanes[7])
    )


def fields_loop(packed: np.ndarray, bits: int, n: int) -> list[int]:
    stream = [(int(packed[b // 8]) >> (b % 8)) & 1 for b in range(n * bits)]
    return [sum(stream[i * bits + j] << j for j in range(bits)) for i in range(n)]


def sample(n: int, dtype: type, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(n).astype(dtype)
    x[::5] = 0.0
    x[2::9] = -0.0
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bucket", [1, 7, 16, 50])
def test_lane_sum_order(dtype: type, bucket: int) -> None:
    x = sample(43, dtype)
    got = ref.lane_sum(x.astype(np.float64) * x, bucket)
    for b in range(len(got)):
        part = x[b * bucket : (b + 1) * bucket].astype(np.float64)
        assert got[b] == lane_sum_loop([float(v) * float(v) for v in part])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", [0, 1])
def test_qsgd_encode_follows_contract(dtype: type, norm: int) -> None:
    n, bucket, levels, bits = 37, 8, 3, 3
    x = sample(n, dtype, seed=1)
    nb = -(-n // bucket)
    scales = np.empty(nb, dtype=dtype)
    packed = np.empty(-(-n * bits // 8), dtype=np.uint8)
    ref.qsgd_encode(x, levels, bits, bucket, norm, STREAM, scales, packed)
    u = uniform_reference(STREAM, np.arange(n, dtype=np.uint64))
    want = []
    for b in range(nb):
        part = x[b * bucket : (b + 1) * bucket]
        if norm == 0:
            scale = dtype(math.sqrt(lane_sum_loop([float(v) ** 2 for v in part])))
        else:
            scale = dtype(max(abs(v) for v in part))
        assert scales[b] == scale
        inv = dtype(levels) / scale if scale != 0 else dtype(0)
        for offset, v in enumerate(part):
            t = dtype(abs(v) * inv)
            low = dtype(np.floor(t))
            level = int(low) + (u[b * bucket + offset] < dtype(t - low))
            want.append((min(level, levels) << 1) | int(v < 0))
    assert fields_loop(packed, bits, n) == want


def test_qsgd_decode_follows_contract() -> None:
    fields = np.array([0, 1, 2, 3, 6, 7, 4, 5], dtype=np.uint8)
    packed = np.empty(3, dtype=np.uint8)
    ref.pack_bits(fields, 3, packed)
    scales = np.array([3.0, 1.5], dtype=np.float32)
    out = np.empty(8, dtype=np.float32)
    ref.qsgd_decode(packed, scales, 3, 3, 4, out)
    assert out.tolist() == [0.0, -0.0, 1.0, -1.0, 1.5, -1.5, 1.0, -1.0]
    assert np.signbit(out[1])


def test_terngrad_encode_follows_contract() -> None:
    n, bucket, clip = 29, 6, 0.8
    x = sample(n, np.float32, seed=2)
    nb = -(-n // bucket)
    scales = np.array(
        [np.abs(x[b * bucket : (b + 1) * bucket]).max() for b in range(nb)], dtype=np.float32
    )
    scales[1] = 0
    packed = np.empty(-(-n * 2 // 8), dtype=np.uint8)
    ref.terngrad_encode(x, scales, bucket, clip, STREAM, packed)
    u = uniform_reference(STREAM, np.arange(n, dtype=np.uint64))
    want = []
    for i, v in enumerate(x):
        s = scales[i // bucket]
        p = np.float32(min(abs(v), np.float32(clip))) / s if s != 0 else 0.0
        draw = s != 0 and u[i] < p
        want.append(0 if not draw else (1 if v > 0 else 2 if v < 0 else 0))
    assert fields_loop(packed, 2, n) == want


def test_onebit_encode_follows_contract() -> None:
    n, bucket = 30, 12
    x = sample(n, np.float64, seed=3)
    nb = -(-n // bucket)
    packed = np.empty(-(-n // 8), dtype=np.uint8)
    means = np.empty(2 * nb, dtype=np.float64)
    ref.onebit_encode(x, bucket, packed, means)
    assert fields_loop(packed, 1, n) == [int(v < 0) for v in x]
    for b in range(nb):
        part = x[b * bucket : (b + 1) * bucket]
        for bit in (0, 1):
            members = [float(v) if (v < 0) == bit else 0.0 for v in part]
            count = sum((v < 0) == bit for v in part)
            want = lane_sum_loop(members) / count if count else 0.0
            assert means[2 * b + bit] == want


def test_topk_reference_ties_and_signs() -> None:
    x = np.array([0.5, -2.0, 2.0, 0.0, -0.0, 2.0, 1.0], dtype=np.float32)
    idx = np.empty(4, dtype=np.int64)
    val = np.empty(4, dtype=np.float32)
    assert ref.topk(x, 4, idx, val) == 0
    assert idx.tolist() == [1, 2, 5, 6] and val.tolist() == [-2.0, 2.0, 2.0, 1.0]
