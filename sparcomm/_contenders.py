"""The contenders of ``sparcomm bench train`` and ``sparcomm predict``, listed once.

A module of its own so that the benchmark (:mod:`sparcomm._cli_bench_train`) and the
predictor (:mod:`sparcomm.predict`) both read it without importing each other.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Settings for codecs whose defaults are not what a user would train with.  A codec of
#: ``sparcomm.codecs`` missing here runs with its default constructor.
_CODEC_SETTINGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "TopK": ("TopK(density=0.01)+EF", lambda cls: _error_feedback(cls(density=0.01))),
    "QSGD": ("QSGD(bits=4)", lambda cls: cls(bits=4)),
    "OneBit": ("OneBit (EF built in)", lambda cls: cls()),
    "PowerSGD": ("PowerSGD(rank=1)", lambda cls: cls(rank=1)),
}

#: DDP's bucket for the PowerSGD hook: one bucket for the whole model (see module doc).
POWERSGD_BUCKET_MB = 4096
#: Dense steps before PowerSGD starts, for torch's hook and sparcomm's PowerSGD alike.
POWERSGD_START_ITER = 2


def _error_feedback(codec: Any) -> Any:
    from sparcomm import ErrorFeedback

    return ErrorFeedback(codec)


@dataclass(frozen=True)
class ContenderSpec:
    """One way of training: ``kind`` is ``"local"``, ``"sparcomm"`` or ``"ddp"``."""

    id: str
    label: str
    kind: str
    codec: Callable[[], Any] | None = None
    hook: str | None = None
    powersgd_rank: int = 0
    codec_name: str = ""


def _codec_classes() -> list[tuple[str, type]]:
    """Every codec class of the registry (``sparcomm.codecs.CODECS``), in id order.

    The one place where the benchmark discovers codecs: a codec defined anywhere becomes
    a contender ``sparcomm-<name>``, with the settings of ``_CODEC_SETTINGS`` or its
    default constructor.
    """
    from sparcomm.codecs import CODECS

    return list(CODECS.items())


def _codec_factory(name: str, cls: type) -> tuple[str, Callable[[], Any]]:
    """How the benchmark builds codec ``name``: its entry in ``_CODEC_SETTINGS``, else its
    default constructor, else its first registered preset.

    Raises
    ------
    TypeError
        If none of these builds it (naming the fix).
    """
    if name in _CODEC_SETTINGS:
        label, make = _CODEC_SETTINGS[name]
        return label, functools.partial(make, cls)
    try:
        cls()
        return name, cls
    except TypeError as error:
        presets = list(getattr(cls, "presets", ()))
        if presets:
            return f"{name} ({presets[0].label})", presets[0].make
        raise TypeError(
            f"codec {name} has no default configuration ({error}) and no preset; give it "
            "presets (sparcomm.codecs.Preset) or default arguments"
        ) from error


def contender_specs() -> list[ContenderSpec]:
    """All contenders, in the order they run in a round."""
    specs = [ContenderSpec("local", "no communication (floor)", "local")]
    for name, cls in _codec_classes():
        label, make = _codec_factory(name, cls)
        specs.append(
            ContenderSpec(
                f"sparcomm-{name.lower()}",
                f"sparcomm {label}",
                "sparcomm",
                codec=make,
                codec_name=name,
            )
        )
    specs += [
        ContenderSpec("ddp", "DDP (gloo)", "ddp"),
        ContenderSpec("ddp-fp16", "DDP + fp16_compress_hook", "ddp", hook="fp16"),
        ContenderSpec(
            "ddp-powersgd1", "DDP + PowerSGD rank 1", "ddp", hook="powersgd", powersgd_rank=1
        ),
        ContenderSpec(
            "ddp-powersgd4", "DDP + PowerSGD rank 4", "ddp", hook="powersgd", powersgd_rank=4
        ),
    ]
    return specs


def select_contenders(patterns: list[str] | None) -> list[ContenderSpec]:
    """The contenders whose id matches any of ``patterns`` (globs); all when None.

    Raises
    ------
    ValueError
        If a pattern matches no contender (naming the ids there are).
    """
    specs = contender_specs()
    if not patterns:
        return specs
    chosen = []
    for pattern in patterns:
        matched = [s for s in specs if fnmatch.fnmatchcase(s.id, pattern)]
        if not matched:
            raise ValueError(
                f"--contenders {pattern!r} matches no contender; the ids are "
                f"{', '.join(s.id for s in specs)}"
            )
        chosen += [s for s in matched if s not in chosen]
    return [s for s in specs if s in chosen]
