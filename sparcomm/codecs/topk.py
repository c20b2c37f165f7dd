"""Top-k sparsification (exact), meant to run under error feedback.

References: Alistarh et al., "The Convergence of Sparsified Gradient Methods",
NeurIPS 2018; Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from sparcomm.codecs._base import Codec, check_int, non_finite_error
from sparcomm.codecs._registry import preset
from sparcomm.codecs._wire import INPUT, Entries, Wire
from sparcomm.payload import Payload

INT32_LIMIT = 2**31


def index_dtype(n: int) -> np.dtype:
    """int32 indices below 2**31 elements, int64 above (the wire rule)."""
    return np.dtype(np.int32) if n < INT32_LIMIT else np.dtype(np.int64)


def _check_density(density: Any) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float, np.floating)):
        raise TypeError(f"density must be a float, got {type(density).__name__}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}; 0.01 keeps 1% of entries")
    return float(density)


def _with_feedback(codec: Codec) -> Any:
    from sparcomm.feedback import ErrorFeedback  # feedback builds on the codecs

    return ErrorFeedback(codec)


class TopK(Codec, codec_id=3, family="sparse"):
    """Keep the k entries of largest magnitude; send their indices and values.

    Selection is exact: a radix select over the float bit pattern of ``|x|`` (see
    ``kernels/cpu/topk.py``).  Indices are sent in ascending order; among equal
    magnitudes at the threshold the lowest indices are kept.

    Parameters
    ----------
    k : int, optional
        Number of entries kept (``0 <= k <= n``).
    density : float, optional
        Fraction kept, ``k = ceil(density * n)`` (at least 1); ``0 < density <= 1``.
        Exactly one of ``k`` and ``density`` is given.

    Notes
    -----
    Wire: ``k`` indices (int32 below 2**31 elements, else int64) and ``k`` values in the
    input dtype.  Biased: wrap it in :class:`~sparcomm.ErrorFeedback`.
    """

    wire = (
        Wire("indices", lambda codec, n: index_dtype(n), Entries(lambda codec, n: codec.k_for(n))),
        Wire("values", INPUT, Entries(lambda codec, n: codec.k_for(n))),
    )
    presets = (
        preset("topk-0.01", lambda: TopK(density=0.01), "bench"),
        preset("topk-0.01+ef", lambda: _with_feedback(TopK(density=0.01)), "demo"),
        preset("topk-0.1", lambda: TopK(density=0.1), "test"),
        preset("topk-k3", lambda: TopK(k=3), "test"),
    )

    def __init__(self, k: int | None = None, *, density: float | None = None) -> None:
        super().__init__()
        if (k is None) == (density is None):
            raise ValueError(
                f"give exactly one of k and density, got k={k!r}, density={density!r}; "
                "for example TopK(density=0.01)"
            )
        if k is not None:
            k = check_int(k, "k", 0, math.inf)
        else:
            density = _check_density(density)
        self.k = k
        self.density = density

    # -- the level a schedule sets (sparcomm.schedule) ------------------------------------
    @property
    def level_parameter(self) -> str:
        """The parameter a schedule sets: ``"density"``, or ``"k"`` for a TopK built with k."""
        return "k" if self.k is not None else "density"

    @property
    def level(self) -> float | int:
        """The current level: the density, or ``k`` for a TopK built with k."""
        return self.k if self.k is not None else float(self.density)  # type: ignore[arg-type]

    def set_level(self, value: float) -> float | int:
        """Set the density (or ``k``, rounded to the nearest int, for a TopK built with k)
        to a schedule's value; returns the value used.  Error-feedback residuals are
        keyed by tensor and stay as they are.

        Raises
        ------
        TypeError, ValueError
            For a value the constructor would refuse.
        """
        if self.k is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise TypeError(f"k must be a number, got {type(value).__name__} {value!r}")
            self.k = check_int(math.floor(float(value) + 0.5), "k", 0, math.inf)
            return self.k
        self.density = _check_density(value)
        return self.density

    def _describe(self) -> str:
        return f"k={self.k}" if self.k is not None else f"density={self.density}"

    def k_for(self, n: int) -> int:
        """The number of entries kept for an input of ``n`` elements."""
        if self.k is not None:
            if self.k > n:
                raise ValueError(
                    f"k={self.k} exceeds the number of elements n={n}; pass k <= n or use density="
                )
            return self.k
        assert self.density is not None  # one of k and density is set (constructor)
        return min(n, max(1, math.ceil(self.density * n)))

    def _params(self, n: int) -> tuple[int, ...]:
        return (self.k_for(n),)

    @property
    def fuses_compensation(self) -> bool:
        """Whether ``encode(x, residual=r, compensated=c)`` selects from ``c = x + r``
        and leaves ``c`` as the new residual (the kept entries +0: ``fuses_feedback``),
        in one pass over host memory: error feedback's compensation fused with the
        selection (:class:`~sparcomm.ErrorFeedback` uses it; bit for bit ``add``,
        ``topk`` and :meth:`residual_into`).  False for a subclass with its own
        ``_encode_flat``."""
        return type(self)._encode_flat is TopK._encode_flat

    fuses_feedback = fuses_compensation

    def _encode_flat(
        self, xp: ModuleType, kernels: ModuleType, flat: Any, stream: int, **options: Any
    ) -> dict[str, Any]:
        k = self.k_for(flat.size)
        indices = xp.empty(k, dtype=index_dtype(flat.size))
        values = xp.empty(k, dtype=flat.dtype)
        residual = options.get("residual")
        if residual is None:
            bad = kernels.topk(flat, k, indices, values)
        else:
            compensated = options["compensated"].reshape(-1)
            fused = getattr(kernels, "topk_of_sum", None)  # the host kernels have it
            if fused is not None:
                bad = fused(flat, residual, compensated, k, indices, values)
            else:
                kernels.add(flat, residual, compensated)
                bad = kernels.topk(compensated, k, indices, values)
                compensated[indices] = 0
        if bad:
            raise non_finite_error(int(bad))
        return {"indices": indices, "values": values}

    def _decode_flat(
        self, xp: ModuleType, kernels: ModuleType, payload: Payload, out: Any, accumulate: int
    ) -> None:
        indices = payload.arrays["indices"]
        n = out.size
        # A payload from bytes may be corrupted: a wrong index must not write elsewhere
        # (a negative one would land from the end) or fail as an IndexError.  Ascending
        # indices are in range when the first and last are: one pass over the k entries.
        if indices.size and not (
            int(indices[0]) >= 0 and int(indices[-1]) < n and bool((xp.diff(indices) > 0).all())
        ):
            raise ValueError(
                f"TopK payload indices must be strictly ascending in [0, n) = [0, {n}), got "
                f"first {int(indices[0])}, last {int(indices[-1])} (or unsorted): corrupted "
                "payload; encode again, or send it with Payload.to_bytes(checksum=True)"
            )
        out.fill(0)
        out[indices] = payload.arrays["values"]

    def residual_into(self, compensated: Any, payload: Payload) -> None:
        """Turn ``compensated`` into ``compensated - decode(payload)`` in place.

        Exact: the kept entries become 0 and the others are untouched, so
        ``decode(payload) + residual == compensated`` bit for bit.
        """
        compensated.reshape(-1)[payload.arrays["indices"]] = 0
