"""Shared fixtures: every codec in one list, so each test runs for all of them."""

from __future__ import annotations

import numpy as np
import pytest

from sparcomm import FP16, QSGD, NoCompression, OneBit, TernGrad, TopK


def all_codecs():
    return [
        NoCompression(),
        FP16(),
        TopK(density=0.1),
        TopK(k=3),
        QSGD(bits=4, bucket_size=7),
        QSGD(levels=1, bucket_size=512, norm="max"),
        TernGrad(),
        TernGrad(bucket_size=5, clip=2.5),
        OneBit(bucket_size=4, error_feedback=False),
    ]


@pytest.fixture(params=all_codecs(), ids=repr)
def codec(request):
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
