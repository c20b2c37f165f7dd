"""``cupy.cuda.nvrtc`` of the host test double: a version number and nothing to compile."""

from __future__ import annotations


def getVersion() -> tuple[int, int]:  # noqa: N802 - CuPy's name
    return (12, 8)
