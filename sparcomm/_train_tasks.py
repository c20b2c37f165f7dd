"""Training tasks of ``sparcomm bench train``: generated data, no downloads.

Two tasks, each a classification problem whose data comes from a fixed seed, so every
contender of a benchmark sees the same batches in the same order and the same test set:

- ``mlp``: teacher-student.  Inputs are standard normal vectors of ``inputs`` features;
  the label is the argmax of a fixed random teacher network (``inputs -> teacher_width
  -> classes``, tanh), a task a wide MLP learns steadily but not in a few steps.  The
  student is an MLP ``inputs -> width x depth -> classes`` with ReLU: with the defaults
  (1024 inputs, width 2048, depth 3, 10 classes) it has 10.5 M parameters, the
  communication-heavy model of the cluster benchmark.
- ``convnet``: 3x32x32 images, one smooth random pattern per class, shifted by up to 4
  pixels, scaled by a random contrast and buried in noise; the student is a small
  convnet (three 3x3 convolutions of ``width``, ``2 width``, ``4 width`` channels, max
  pooling, global average pooling, a linear classifier): compute-heavier per parameter.

Batches are generated on the fly from ``(seed, rank, step)``: no data set is held in
memory and no rank needs another's data.  Model, width, depth and batch are options, so
the ratio of communication to computation can be set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TASKS", "Task", "make_task"]

TASKS = ("mlp", "convnet")


@dataclass(frozen=True)
class Task:
    """A generated classification task and the student model trained on it.

    Parameters
    ----------
    name : {"mlp", "convnet"}
    inputs : int
        Input features of the MLP task (ignored by ``convnet``: 3x32x32 images).
    width : int
        Hidden width of the MLP, or channels of the convnet's first layer.
    depth : int
        Hidden layers of the MLP (ignored by ``convnet``).
    classes : int
    seed : int
        Seed of the teacher, of the data and of the student's initialisation.
    """

    name: str = "mlp"
    inputs: int = 1024
    width: int = 2048
    depth: int = 3
    classes: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.name!r}")
        for field_name in ("inputs", "width", "depth", "classes"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{field_name} must be an int, got {type(value).__name__}")
            if value < (2 if field_name == "classes" else 1):
                raise ValueError(f"{field_name} must be >= 1 (classes >= 2), got {value}")

    # -- the student -------------------------------------------------------------------------
    def model(self) -> torch.nn.Module:
        """A fresh student, initialised from ``seed``: identical in every call."""
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            if self.name == "mlp":
                layers: list[torch.nn.Module] = []
                width = self.inputs
                for _ in range(self.depth):
                    layers += [torch.nn.Linear(width, self.width), torch.nn.ReLU()]
                    width = self.width
                layers.append(torch.nn.Linear(width, self.classes))
                return torch.nn.Sequential(*layers)
            c = self.width
            return torch.nn.Sequential(
                torch.nn.Conv2d(3, c, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
                torch.nn.Conv2d(c, 2 * c, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
                torch.nn.Conv2d(2 * c, 4 * c, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1),
                torch.nn.Flatten(),
                torch.nn.Linear(4 * c, self.classes),
            )
        finally:
            torch.random.set_rng_state(generator_state)

    def describe(self) -> str:
        """``"MLP 1024-2048-2048-2048-10"`` or ``"convnet 64-128-256-10 on 3x32x32"``."""
        if self.name == "mlp":
            return f"MLP {self.inputs}-" + f"{self.width}-" * self.depth + str(self.classes)
        c = self.width
        return f"convnet {c}-{2 * c}-{4 * c}-{self.classes} on 3x32x32"

    def parameter_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the student's parameters, in definition order."""
        return [tuple(p.shape) for p in self.model().parameters()]

    # -- the data ------------------------------------------------------------------------------
    def _generator(self, *stream: int) -> torch.Generator:
        # A distinct, reproducible stream per (purpose, rank, step): hash the tuple into
        # a 63-bit seed (Python's hash of ints is stable across runs).
        seed = hash((self.seed, *stream)) & (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def _teacher(self) -> Any:
        if not hasattr(self, "_teacher_cache"):
            g = self._generator(1, 0, 0)
            if self.name == "mlp":
                hidden = max(4 * self.classes, self.inputs // 4)
                w1 = torch.randn(self.inputs, hidden, generator=g) / math.sqrt(self.inputs)
                w2 = torch.randn(hidden, self.classes, generator=g) / math.sqrt(hidden)
                teacher: Any = (w1, w2)
            else:
                # Smooth patterns: 8x8 noise upsampled to 32x32.
                coarse = torch.randn(self.classes, 3, 8, 8, generator=g)
                teacher = torch.nn.functional.interpolate(
                    coarse, size=(32, 32), mode="bicubic", align_corners=False
                )
            object.__setattr__(self, "_teacher_cache", teacher)
        return self._teacher_cache  # type: ignore[attr-defined]

    def _sample(self, count: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = self._teacher()
        if self.name == "mlp":
            w1, w2 = teacher
            x = torch.randn(count, self.inputs, generator=g)
            y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
            return x, y
        y = torch.randint(0, self.classes, (count,), generator=g)
        shifts = torch.randint(-4, 5, (count, 2), generator=g)
        contrast = 0.5 + torch.rand(count, 1, 1, 1, generator=g)
        images = teacher[y] * contrast
        for i in range(count):  # a small loop: batches are tens of images
            images[i] = torch.roll(images[i], tuple(shifts[i].tolist()), dims=(1, 2))
        images += 1.5 * torch.randn(images.shape, generator=g)
        return images, y

    def batch(self, rank: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank ``rank``'s training batch of step ``step``: the same for every contender."""
        return self._sample(size, self._generator(2, rank, step))

    def test_set(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out test set (its own stream, disjoint from every training batch)."""
        return self._sample(size, self._generator(3, 0, 0))


def make_task(
    name: str = "mlp",
    *,
    inputs: int = 1024,
    width: int | None = None,
    depth: int = 3,
    classes: int = 10,
    seed: int = 0,
) -> Task:
    """A :class:`Task` with the default width of its kind (2048 for the MLP, 64 channels)."""
    if width is None:
        width = 2048 if name == "mlp" else 64
    return Task(name, inputs, width, depth, classes, seed)
