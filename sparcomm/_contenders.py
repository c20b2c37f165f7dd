"""The contenders of ``sparcomm bench train`` and ``sparcomm predict``, listed once.

A module of its own so that the benchmark (:mod:`sparcomm._cli_bench_train`) and the
predictor (:mod:`sparcomm.predict`) both read it without importing each other.
"""

from __future__ import annotations

import fnmatch
import functools
import math
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
    """One way of training: ``kind`` is ``"local"``, ``"sparcomm"`` or ``"ddp"``.

    ``codec`` builds the codec (or :class:`~sparcomm.CodecPolicy`) of a sparcomm
    contender; ``options`` the other keyword arguments of its ``DistributedOptimizer``
    (``schedule=`` and the like), fresh for every run; ``momentum`` replaces the
    benchmark's SGD momentum (DGC's momentum correction needs the optimizer's at 0).
    ``default``: run when ``--contenders`` is not given (the configurations beyond one
    codec per class run when named: ``--contenders 'sparcomm-*'``).
    """

    id: str
    label: str
    kind: str
    codec: Callable[[], Any] | None = None
    hook: str | None = None
    powersgd_rank: int = 0
    codec_name: str = ""
    options: Callable[[], dict[str, Any]] | None = None
    momentum: float | None = None
    default: bool = True

    def optimizer_options(self) -> dict[str, Any]:
        """The keyword arguments ``options`` gives (none without it)."""
        return dict(self.options()) if self.options is not None else {}


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


def _topk(density: float) -> Any:
    from sparcomm import TopK

    return _error_feedback(TopK(density=density))


def _density_warmup() -> dict[str, Any]:
    # Issue 13's warm-up: exponential from 25 % to 1 % over the first 100 steps.
    from sparcomm import Exponential

    return {"schedule": Exponential(0.25, 0.01, 100)}


def _powersgd(rank: int) -> Any:
    from sparcomm.codecs import PowerSGD

    return PowerSGD(rank=rank)


#: Matrices at least this large go through PowerSGD in the policy contender.
POLICY_MATRIX_ELEMENTS = 65536


def _large_matrix(name: Any, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and math.prod(shape) >= POLICY_MATRIX_ELEMENTS


def _policy() -> Any:
    from sparcomm import CodecPolicy

    # PowerSGD rank 4 for the large matrices; biases and the small classifier (2048 x 10
    # in the benchmark MLP) dense.
    return CodecPolicy(None, rules=[(_large_matrix, _powersgd(4))])


def _dgc(masking: bool) -> Any:
    from sparcomm import DGC, TopK

    return DGC(TopK(density=0.01), momentum=0.9, masking=masking)


def configuration_specs() -> list[ContenderSpec]:
    """Configurations beyond one codec per class (issue 13): densities, a schedule, a
    higher PowerSGD rank, a per-tensor policy, DGC.  Not in the default run."""

    def spec(cid: str, label: str, codec: Callable[[], Any], **extra: Any) -> ContenderSpec:
        return ContenderSpec(cid, label, "sparcomm", codec=codec, default=False, **extra)

    return [
        spec("sparcomm-topk10", "sparcomm TopK(density=0.1)+EF", lambda: _topk(0.1)),
        spec(
            "sparcomm-topk-warmup",
            "sparcomm TopK 25%->1%+EF",
            lambda: _topk(0.01),
            options=_density_warmup,
        ),
        spec(
            "sparcomm-powersgd4",
            "sparcomm PowerSGD(rank=4)",
            lambda: _powersgd(4),
            codec_name="PowerSGD",
        ),
        spec(
            "sparcomm-policy",
            "sparcomm policy PowerSGD4/dense",
            _policy,
            codec_name="PowerSGD",
        ),
        spec(
            "sparcomm-dgc",
            "sparcomm DGC(TopK 1%, masking)",
            lambda: _dgc(True),
            momentum=0.0,
        ),
        spec(
            "sparcomm-dgc-nomask",
            "sparcomm DGC(TopK 1%, no mask)",
            lambda: _dgc(False),
            momentum=0.0,
        ),
        spec(
            "sparcomm-dgc-warmup",
            "sparcomm DGC(25%->1%, masking)",
            lambda: _dgc(True),
            options=_density_warmup,
            momentum=0.0,
        ),
    ]


def contender_specs(everything: bool = False) -> list[ContenderSpec]:
    """The contenders of a default run, in the order they run in a round; with
    ``everything``, also :func:`configuration_specs` (after the sparcomm codecs)."""
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
    if everything:
        specs += configuration_specs()
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
    """The contenders whose id matches any of ``patterns`` (globs, over every contender
    and configuration); the default run's when None.

    Raises
    ------
    ValueError
        If a pattern matches no contender (naming the ids there are).
    """
    if not patterns:
        return contender_specs()
    specs = contender_specs(everything=True)
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
