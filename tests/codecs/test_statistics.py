"""Unbiasedness and variance of the stochastic codecs, with tolerances from the variance.

For a fixed input x, R independent encodings (steps 0..R-1 select independent streams)
give decodes d_r.  Each element's exact variance sigma_i^2 is known in closed form
(a two-point distribution), so z_i = (mean_r d_ri - x_i) / (sigma_i / sqrt(R)) is close to
N(0, 1): the test bounds max |z_i| and the chi-square sum at about five standard
deviations.  Seeds are fixed, so the outcome is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparcomm import QSGD, TernGrad

R = 4000
N = 96


def _decodes(codec, x):
    return np.stack([codec.decode(codec.encode(x, key="stat", step=r)) for r in range(R)])


def _check_unbiased(decodes, x, variance):
    live = variance > 0
    mean = decodes.mean(axis=0)
    # elements with zero variance must be reproduced exactly
    np.testing.assert_array_equal(decodes[:, ~live], np.broadcast_to(x[~live], (R, (~live).sum())))
    z = (mean[live] - x[live]) / np.sqrt(variance[live] / R)
    m = int(live.sum())
    assert np.abs(z).max() < 5.0 + math.sqrt(2 * math.log(m))
    chi2 = float((z**2).sum())
    assert chi2 < m + 5 * math.sqrt(2 * m)


def _qsgd_exact_variance(codec, x):
    variance = np.empty_like(x)
    for start in range(0, x.size, codec.bucket_size):
        v = x[start : start + codec.bucket_size]
        scale = np.linalg.norm(v) if codec.norm == "l2" else np.abs(v).max()
        t = np.abs(v) * codec.levels / scale
        p = t - np.floor(t)
        variance[start : start + v.size] = (scale / codec.levels) ** 2 * p * (1 - p)
    return variance


@pytest.mark.parametrize(
    "codec",
    [
        QSGD(bits=2, bucket_size=32),
        QSGD(bits=4, bucket_size=512),
        QSGD(levels=5, bucket_size=7, norm="max"),
    ],
    ids=repr,
)
def test_qsgd_is_unbiased_and_within_its_variance_bound(codec):
    x = np.random.default_rng(3).standard_normal(N)
    decodes = _decodes(codec, x)
    variance = _qsgd_exact_variance(codec, x)
    _check_unbiased(decodes, x, variance)
    # the closed-form variance is below the paper's bound ...
    total = float(variance.sum())
    assert total <= codec.variance_bound(x) * (1 + 1e-12)
    # ... and the measured squared error matches it within five standard errors
    errors = ((decodes - x) ** 2).sum(axis=1)
    assert abs(errors.mean() - total) < 5 * errors.std() / math.sqrt(R)


@pytest.mark.parametrize("codec", [TernGrad(), TernGrad(bucket_size=10)], ids=repr)
def test_terngrad_is_unbiased(codec):
    x = np.random.default_rng(4).standard_normal(N)
    decodes = _decodes(codec, x)
    variance = np.empty_like(x)
    bucket = codec.bucket_for(N)
    for start in range(0, N, bucket):
        v = x[start : start + bucket]
        s = np.abs(v).max()
        p = np.abs(v) / s
        variance[start : start + v.size] = s**2 * p * (1 - p)
    _check_unbiased(decodes, x, variance)


def test_terngrad_with_clipping_is_unbiased_for_the_clipped_gradient():
    codec = TernGrad(clip=1.0)
    x = np.random.default_rng(5).standard_normal(N)
    clipped = np.clip(x, -x.std(), x.std())
    s = np.abs(clipped).max()
    p = np.abs(clipped) / s
    _check_unbiased(_decodes(codec, x), clipped, s**2 * p * (1 - p))


def test_terngrad_shared_scale_values_sum_as_integers():
    rng = np.random.default_rng(6)
    xs = [rng.standard_normal(200).astype(np.float32) for _ in range(3)]
    codec = TernGrad()
    shared = np.max([codec.local_scales(x) for x in xs], axis=0)
    decodes = [
        codec.decode(codec.encode(x, scale=shared, rank=r, step=0)) for r, x in enumerate(xs)
    ]
    units = [d / shared[0] for d in decodes]
    for u in units:
        np.testing.assert_array_equal(u, np.rint(u))
    np.testing.assert_array_equal(sum(decodes), shared[0] * sum(units))
