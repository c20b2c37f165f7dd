"""Shared fixtures: every codec in one list, so each test runs for all of them."""

from __future__ import annotations

import _user_codecs  # noqa: F401  (a codec defined outside sparcomm: RandomK)
import numpy as np
import pytest

from sparcomm.codecs import CODECS


def all_codecs():
    """Every registered codec's test configurations (``CODECS.presets("test")``)."""
    return [preset.make() for preset in CODECS.presets("test")]


@pytest.fixture(params=all_codecs(), ids=repr)
def codec(request):
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
