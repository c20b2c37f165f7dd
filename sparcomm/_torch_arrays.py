"""Zero-copy views between torch tensors and NumPy/CuPy arrays (DLPack)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def as_array(tensor: torch.Tensor) -> Any:
    """A NumPy (CPU) or CuPy (CUDA) array sharing ``tensor``'s memory: no copy."""
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        return tensor.numpy()
    if tensor.device.type == "cuda":
        import cupy

        return cupy.from_dlpack(tensor)
    raise TypeError(
        f"sparcomm reduces CPU and CUDA tensors, got a tensor on {tensor.device}; "
        "move the model to 'cpu' or 'cuda'"
    )


def as_tensor(array: Any) -> torch.Tensor:
    """The inverse of :func:`as_array`: a tensor sharing the array's memory."""
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array)
    return torch.from_dlpack(array)
