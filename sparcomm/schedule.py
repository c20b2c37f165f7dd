"""Schedules of a codec's compression level over training steps.

A schedule maps the reduction step ``s`` (0, 1, 2, ... the step counter that every rank
of a :class:`~sparcomm.reducer.GradientReducer` agrees on) to a *level*: TopK's density
(or ``k`` for a TopK built with ``k``), PowerSGD's rank.  Pass one as ``schedule=`` to
:class:`~sparcomm.reducer.GradientReducer` or
:func:`sparcomm.torch.DistributedOptimizer`::

    # DGC's density warm-up (Lin et al., ICLR 2018): 25 % -> 1 % over 100 steps
    GradientReducer(ErrorFeedback(TopK(density=0.01)), schedule=Exponential(0.25, 0.01, 100))

Any callable ``step -> value`` is accepted too (``schedule=lambda s: 0.1 if s < 50 else
0.01``); it must be a pure function of the step, the same on every rank.

A codec takes a level when it defines ``level_parameter`` (the name of the parameter a
schedule sets), ``level`` (its current value) and ``set_level(value)`` (validates and
sets it in place, returns the value used; its state, error-feedback residuals and
PowerSGD's warm-start ``Q``, stays keyed by tensor).  TopK and PowerSGD do; a codec of
your own can.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["Constant", "Exponential", "Linear", "Schedule", "as_schedule"]


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {type(steps).__name__} {steps!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}; Constant(value) holds one level")
    return int(steps)


class Schedule:
    """Base class: ``schedule(step)`` is the level at reduction step ``step`` (>= 0).

    Subclasses implement :meth:`value`; :meth:`__call__` checks the step.  ``probes``
    are levels the schedule takes (checked against the codec when the reducer is built).
    """

    def value(self, step: int) -> float:
        """The level at ``step`` (a non-negative int)."""
        raise NotImplementedError

    def probes(self) -> tuple[float, ...]:
        """Levels the schedule takes, among them its extremes where known."""
        return (self.value(0),)

    def __call__(self, step: int) -> float:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"a schedule's step must be an int >= 0, got {step!r}")
        return self.value(int(step))


class Constant(Schedule):
    """The same level at every step.

    Parameters
    ----------
    value : float
        The level (a density, a rank...).
    """

    def __init__(self, value: float) -> None:
        self.level = _number(value, "value")

    def value(self, step: int) -> float:
        return self.level

    def __repr__(self) -> str:
        return f"Constant({self.level!r})"


class Linear(Schedule):
    """Linear interpolation from ``start`` (step 0) to ``end`` (step ``steps``), then
    ``end``.

    Parameters
    ----------
    start, end : float
        Levels at step 0 and from step ``steps`` on.
    steps : int
        Length of the ramp, ``>= 1``.
    """

    def __init__(self, start: float, end: float, steps: int) -> None:
        self.start = _number(start, "start")
        self.end = _number(end, "end")
        self.steps = _steps(steps)

    def value(self, step: int) -> float:
        if step >= self.steps:
            return self.end
        return self.start + (self.end - self.start) * (step / self.steps)

    def probes(self) -> tuple[float, ...]:
        return (self.start, self.end)

    def __repr__(self) -> str:
        return f"Linear(start={self.start!r}, end={self.end!r}, steps={self.steps})"


class Exponential(Schedule):
    """Geometric interpolation from ``start`` (step 0) to ``end`` (step ``steps``), then
    ``end``: ``start * (end / start) ** (step / steps)``.

    DGC's density warm-up (Lin, Han, Mao, Wang, Dally, "Deep Gradient Compression",
    ICLR 2018) raises the sparsity exponentially over the first epochs, for instance
    ``Exponential(0.25, 0.01, 100)``: density 25 % at step 0, 1 % from step 100 on.

    Parameters
    ----------
    start, end : float
        Levels at step 0 and from step ``steps`` on, both ``> 0``.
    steps : int
        Length of the ramp, ``>= 1``.
    """

    def __init__(self, start: float, end: float, steps: int) -> None:
        self.start = _number(start, "start")
        self.end = _number(end, "end")
        if self.start <= 0 or self.end <= 0:
            raise ValueError(
                f"Exponential needs start > 0 and end > 0, got start={self.start}, "
                f"end={self.end}; use Linear for a ramp through 0"
            )
        self.steps = _steps(steps)

    def value(self, step: int) -> float:
        if step >= self.steps:
            return self.end
        return self.start * (self.end / self.start) ** (step / self.steps)

    def probes(self) -> tuple[float, ...]:
        return (self.start, self.end)

    def __repr__(self) -> str:
        return f"Exponential(start={self.start!r}, end={self.end!r}, steps={self.steps})"


class _Function(Schedule):
    """A user's callable ``step -> level``, its results checked."""

    def __init__(self, function: Callable[[int], Any]) -> None:
        self.function = function

    def value(self, step: int) -> float:
        result = self.function(step)
        if isinstance(result, bool) or not isinstance(
            result, (int, float, np.integer, np.floating)
        ):
            raise TypeError(
                f"schedule {self!r} returned {type(result).__name__} {result!r} at step "
                f"{step}; a schedule returns a number (a density, a rank)"
            )
        if not math.isfinite(float(result)):
            raise ValueError(f"schedule {self!r} returned {result} at step {step}; expected finite")
        return float(result)

    def __repr__(self) -> str:
        # Rank-independent (no memory address): part of the options checked on all ranks.
        function = self.function
        name = getattr(function, "__qualname__", type(function).__qualname__)
        return f"{getattr(function, '__module__', '?')}.{name}"


def as_schedule(schedule: Any) -> Schedule:
    """``schedule`` as a :class:`Schedule` (a callable ``step -> level`` is wrapped).

    Raises
    ------
    TypeError
        For anything else, a plain number included (write ``Constant(value)``).
    """
    if isinstance(schedule, Schedule):
        return schedule
    if callable(schedule) and not isinstance(schedule, type):
        return _Function(schedule)
    hint = f"Constant({schedule!r})" if isinstance(schedule, (int, float)) else "Linear(...)"
    raise TypeError(
        f"schedule must be a sparcomm schedule (Constant, Linear, Exponential) or a callable "
        f"step -> level, got {type(schedule).__name__} {schedule!r}; for example {hint}"
    )


# -- the codec side: which parameter a codec's level is --------------------------------------
def level_parameter(codec: Any) -> str | None:
    """The parameter a schedule sets on ``codec`` (through ErrorFeedback), or None."""
    from sparcomm.feedback import unwrap

    bare = unwrap(codec)[0]
    if not callable(getattr(bare, "set_level", None)):
        return None
    return getattr(bare, "level_parameter", None)


def current_level(codec: Any) -> Any:
    """The current level of ``codec`` (None for a codec without one)."""
    from sparcomm.feedback import unwrap

    return getattr(unwrap(codec)[0], "level", None) if level_parameter(codec) else None


def set_level(codec: Any, value: Any) -> Any:
    """Set the level of ``codec`` (through ErrorFeedback) in place; returns the value used."""
    from sparcomm.feedback import unwrap

    bare: Any = unwrap(codec)[0]
    return bare.set_level(value)


def check_levels(codec: Any, schedule: Schedule) -> None:
    """Raise the codec's own error now if a level the schedule takes is invalid for it
    (on a shallow copy: ``codec`` is unchanged)."""
    import copy

    from sparcomm.feedback import unwrap

    trial: Any = copy.copy(unwrap(codec)[0])
    for value in schedule.probes():
        try:
            trial.set_level(value)
        except (TypeError, ValueError) as error:
            raise type(error)(f"schedule {schedule!r} takes level {value!r}: {error}") from None


def codecs_with_levels() -> str:
    """The registered codecs that take a level, for messages."""
    from sparcomm.codecs import CODECS

    found = []
    for name in CODECS:
        cls = CODECS[name]
        if callable(getattr(cls, "set_level", None)):
            found.append(name)
    return ", ".join(found) or "none"
