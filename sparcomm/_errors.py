"""Errors shared by the layers: defined below both the codecs and the collectives, so
that :mod:`sparcomm.comm` names them without importing a codec module."""

from __future__ import annotations


class NonFiniteError(ValueError):
    """A value to send is NaN or Inf (or a scale computed from it overflowed).

    A ``ValueError``: sparcomm refuses non-finite values on every path (every codec's
    encode, the dense path, ``sparse_allreduce``), and the collectives raise this class
    on every rank when any rank's input is non-finite, so no rank sums garbage and a
    GradScaler can skip the step everywhere (docs/api.md, "Non-finite values").
    """


def non_finite_error(count: int | None = None, name: str = "x") -> NonFiniteError:
    """The error of every non-finite check (``count`` entries, when known)."""
    what = f"{count} non-finite values" if count else "non-finite values"
    return NonFiniteError(
        f"{name} contains {what} (NaN or Inf, or an overflow of the bucket norm); "
        "expected finite values: sparcomm refuses them so no rank sums garbage; check the "
        "loss scale or clip gradients first (error-feedback residuals are left unchanged)"
    )
