"""What the failure-state tests share: the codecs whose state a failed step must leave
untouched, a codec's whole state, and a bit-for-bit comparison of nested states."""

from __future__ import annotations

from typing import Any

import numpy as np

from sparcomm import DGC, QSGD, ErrorFeedback, OneBit, PowerSGD, TernGrad, TopK
from sparcomm.feedback import unwrap

#: Every kind of codec state: error-feedback residuals (worker and owner side), 1-bit
#: SGD's built-in feedback, PowerSGD's residuals and warm-start Q, DGC's velocities.
STATEFUL_CODECS = {
    "topk-ef": lambda: ErrorFeedback(TopK(density=0.1)),
    "qsgd-ef": lambda: ErrorFeedback(QSGD(bucket_size=64)),
    "onebit": lambda: OneBit(),
    "terngrad-ef": lambda: ErrorFeedback(TernGrad()),
    "powersgd": lambda: PowerSGD(rank=2),
    "dgc": lambda: DGC(TopK(density=0.1), momentum=0.9),
}


def codec_state(codec: Any) -> dict[str, Any]:
    """Host copies of the codec's whole state (its memory's, or its own: PowerSGD)."""
    memory = unwrap(codec)[1]
    return (memory if memory is not None else codec).state_dict()


def assert_same(actual: Any, expected: Any, where: str = "state", *, ordered: bool = True) -> None:
    """Equal nested dicts/lists of arrays, bit for bit (dtype and shape included); with
    ``ordered`` a dict's keys also come in the same order."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        if ordered:
            assert list(actual) == list(expected), f"{where}: keys {list(actual)}"
        else:
            assert sorted(map(repr, actual)) == sorted(map(repr, expected)), (
                f"{where}: keys {list(actual)} != {list(expected)}"
            )
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]", ordered=ordered)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), where
        for number, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{number}]", ordered=ordered)
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert np.array_equal(actual, expected), f"{where} changed"
    else:
        assert actual == expected, where
