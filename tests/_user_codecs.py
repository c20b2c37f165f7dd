"""A codec defined outside sparcomm, as a user would write it: random-k sparsification.

It reuses the sparse family, so ``sparcomm.allreduce``, ``GradientReducer`` and
``DistributedOptimizer`` run it through SparCML's collectives with no change to sparcomm.
The same code is the worked example of docs/api.md ("Writing a codec"); tests/conftest.py
imports it (one line), which adds its ``"test"`` preset to the every-codec fixture.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from sparcomm import Codec, Payload
from sparcomm.codecs import INPUT, Entries, Preset, Wire


class RandomK(Codec, codec_id=200, family="sparse"):
    """Keep ``k`` entries chosen uniformly at random (without replacement).

    Biased as sent (the others are dropped): run it under ``ErrorFeedback``.  The
    choice depends on (seed, rank, key, step) only, so it is reproducible.
    """

    wire = (
        Wire("indices", np.int64, Entries(lambda codec, n: codec.k_for(n))),
        Wire("values", INPUT, Entries(lambda codec, n: codec.k_for(n))),
    )
    presets = (Preset("randomk-8", lambda: RandomK(8), frozenset({"test"})),)
    is_stochastic = True

    def __init__(self, k: int, *, seed: int = 0) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = k
        self.seed = seed

    def _describe(self) -> str:
        return f"k={self.k}"

    def k_for(self, n: int) -> int:
        return min(self.k, n)

    def _params(self, n: int) -> tuple[int, ...]:
        return (self.k_for(n),)

    def _encode_flat(
        self, xp: ModuleType, kernels: ModuleType, flat: Any, stream: int, **options: Any
    ) -> dict[str, Any]:
        if not bool(xp.isfinite(flat).all()):
            raise ValueError("x contains NaN or Inf; RandomK refuses non-finite values")
        chosen = np.random.default_rng(stream).choice(
            flat.size, self.k_for(flat.size), replace=False
        )
        indices = xp.asarray(np.sort(chosen).astype(np.int64))  # ascending, unique
        return {"indices": indices, "values": flat[indices]}

    def _decode_flat(
        self, xp: ModuleType, kernels: ModuleType, payload: Payload, out: Any, accumulate: int
    ) -> None:
        out.fill(0)
        out[payload.arrays["indices"]] = payload.arrays["values"]
