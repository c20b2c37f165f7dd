"""The one registry of codecs: every class with a ``codec_id`` enters it when defined.

``sparcomm.codecs.CODECS`` (also ``sparcomm.codecs.registry()``) maps codec names to
classes in id order, and lists the standard configurations (:class:`Preset`) that the
CLI, the demo, the benchmarks and the tests iterate, so that a new codec shows up
everywhere by being defined: nothing else keeps a list of codecs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: The built-in collective families; ``sparcomm.comm`` dispatches on a codec's family.
FAMILIES = ("sparse", "quantized", "low-rank", "dense")
_KNOWN_FAMILIES: list[str] = list(FAMILIES)


def add_family(family: str) -> None:
    """Make ``family`` declarable by codec classes (``sparcomm.comm.register_family``
    calls this when it plugs a new family's collective in)."""
    if family not in _KNOWN_FAMILIES:
        _KNOWN_FAMILIES.append(family)


def known_families() -> tuple[str, ...]:
    """The built-in families and those added by :func:`add_family`."""
    return tuple(_KNOWN_FAMILIES)


@dataclass(frozen=True)
class Preset:
    """A named standard configuration of a codec.

    Attributes
    ----------
    label : str
        Short stable name (``"qsgd4"``), used as a CLI choice and in result files.
    make : callable
        Builds a fresh codec (optionally under error feedback) each call, so no state
        is shared between runs.
    tags : frozenset of str
        Where the configuration is used: ``"bench"`` (``sparcomm bench codecs``),
        ``"allreduce"`` (the default codecs of ``sparcomm bench allreduce --codecs``),
        ``"demo"`` (``sparcomm demo``), ``"test"`` (the test-suite's every-codec fixture).
        A preset without tags is available by label only.
    """

    label: str
    make: Callable[[], Any]
    tags: frozenset[str] = field(default_factory=frozenset)


def preset(label: str, make: Callable[[], Any], *tags: str) -> Preset:
    """A :class:`Preset` (short form for the codec modules)."""
    return Preset(label, make, frozenset(tags))


class CodecRegistry(Mapping[str, type]):
    """Codec classes by name, in codec-id order (a read-only mapping)."""

    def __init__(self) -> None:
        self._by_id: dict[int, type] = {}

    def _add(self, cls: type) -> None:
        codec_id = cls.codec_id  # type: ignore[attr-defined]
        other = self._by_id.get(codec_id)
        if other is not None and _qualified(other) != _qualified(cls):
            raise ValueError(
                f"codec_id {codec_id} of {_qualified(cls)} is already registered by "
                f"{_qualified(other)}; give each codec class its own id"
            )
        for known in self._by_id.values():
            if known.__name__ == cls.__name__ and known.codec_id != codec_id:  # type: ignore[attr-defined]
                raise ValueError(
                    f"a codec named {cls.__name__} is already registered ({_qualified(known)}, "
                    f"id {known.codec_id}); rename {_qualified(cls)}"  # type: ignore[attr-defined]
                )
        self._by_id[codec_id] = cls

    def __getitem__(self, name: str) -> type:
        for cls in self._by_id.values():
            if cls.__name__ == name:
                return cls
        raise KeyError(f"no codec named {name!r}; registered: {list(self)}")

    def __iter__(self) -> Iterator[str]:
        return (self._by_id[i].__name__ for i in sorted(self._by_id))

    def __len__(self) -> int:
        return len(self._by_id)

    def __repr__(self) -> str:
        entries = ", ".join(f"{i}: {name}" for i, name in self.ids().items())
        return f"CodecRegistry({entries})"

    def by_id(self, codec_id: int) -> type:
        """The class registered under ``codec_id``."""
        try:
            return self._by_id[codec_id]
        except KeyError:
            raise KeyError(
                f"no codec with id {codec_id}; registered: {sorted(self._by_id)}"
            ) from None

    def ids(self) -> dict[int, str]:
        """``{codec_id: name}`` in id order."""
        return {i: self._by_id[i].__name__ for i in sorted(self._by_id)}

    def family(self, family: str) -> list[type]:
        """The classes of one family (``"sparse"``, ``"quantized"``, ...), in id order."""
        if family not in _KNOWN_FAMILIES:
            raise ValueError(f"family must be one of {known_families()}, got {family!r}")
        return [cls for cls in self.values() if cls.family == family]  # type: ignore[attr-defined]

    def presets(self, tag: str | None = None, *, family: str | None = None) -> list[Preset]:
        """The standard configurations of every codec, in id order.

        Parameters
        ----------
        tag : str, optional
            Only presets with this tag (see :class:`Preset`).
        family : str, optional
            Only presets of codecs of this family.
        """
        chosen = []
        for cls in self.values():
            if family is not None and cls.family != family:  # type: ignore[attr-defined]
                continue
            chosen += [p for p in cls.presets if tag is None or tag in p.tags]  # type: ignore[attr-defined]
        return chosen

    def preset(self, label: str) -> Preset:
        """The preset called ``label``."""
        for p in self.presets():
            if p.label == label:
                return p
        raise KeyError(
            f"no codec preset {label!r}; choose one of {[p.label for p in self.presets()]}"
        )


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


#: The registry (see :func:`registry`).
CODECS = CodecRegistry()


def registry() -> CodecRegistry:
    """The registry of codec classes: ``registry()["TopK"]``, ``registry().presets("bench")``."""
    return CODECS
