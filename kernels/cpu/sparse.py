"""Scatter-add of sparse (index, value) lists into a dense buffer."""

from __future__ import annotations

from numba import njit


@njit(cache=True, nogil=True)
def scatter_add(indices, values, out):
    """``out[indices[j]] += values[j]``; duplicates are summed in order of ``j``.

    Sequential on purpose: with duplicates allowed, the order of the additions fixes the
    rounding, and a sparse list is small next to the dense buffer it lands in.
    """
    for j in range(indices.size):
        out[indices[j]] += values[j]
