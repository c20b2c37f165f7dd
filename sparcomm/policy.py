"""Per-tensor codec choice: a :class:`CodecPolicy` maps each gradient to a codec.

One codec rarely suits every tensor of a model: a Linear layer's gradient over a small
batch is nearly low-rank (PowerSGD captures it in a few vectors), an embedding table's
is sparse by rows (top-k suits it), and biases and norms are too small to gain from
compression.  A policy says which codec each tensor goes through, by name (shell-style
globs, :mod:`fnmatch`), by a predicate on ``(name, shape)``, or with the keywords
``matrices=`` and ``embeddings=``::

    policy = CodecPolicy(
        ErrorFeedback(TopK(density=0.01)),        # the default
        matrices=PowerSGD(rank=4),                # 2-D (and conv) weights
        rules=[("*.bias", None)],                 # None: dense
    )
    optimizer = sparcomm.torch.DistributedOptimizer(opt, model.named_parameters(), codec=policy)

The choice is a pure function of ``(name, shape)``: every rank makes the same one, and
the reducer checks it at set-up.  Buckets never mix codecs, and each codec keeps its
own state (error-feedback residuals, PowerSGD's factors).  The reducer's
``dense_below`` applies first: tensors below it are dense whatever the policy says.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Hashable, Sequence
from typing import Any

__all__ = ["CodecPolicy", "Rule"]

#: Names of embedding tables, for ``embeddings=`` (``nn.Embedding`` modules are usually
#: called ``embed``, ``embedding``, ``embeddings``, ``tok_embeddings``...).
DEFAULT_EMBEDDING_NAMES = ("*embed*",)


def _check_codec(codec: Any, where: str) -> Any:
    """``codec`` if it is a codec, ErrorFeedback or None (dense); TypeError otherwise."""
    from sparcomm.codecs import Codec
    from sparcomm.feedback import ErrorFeedback

    if codec is None or isinstance(codec, (Codec, ErrorFeedback)):
        if isinstance(codec, ErrorFeedback) and codec.family == "low-rank":
            raise NotImplementedError(
                f"{where}: {codec!r}: PowerSGD keeps its error feedback itself; pass it unwrapped"
            )
        return codec
    if isinstance(codec, CodecPolicy):
        raise TypeError(f"{where}: a CodecPolicy cannot nest another one; merge their rules")
    hint = (
        f"an instance, e.g. {codec.__name__}(...)"
        if isinstance(codec, type)
        else "e.g. ErrorFeedback(TopK(density=0.01)), PowerSGD(rank=4), or None for dense"
    )
    raise TypeError(
        f"{where} must be a sparcomm codec, ErrorFeedback or None (dense), got "
        f"{type(codec).__name__} {codec!r}; pass {hint}"
    )


def _describe_match(match: Any) -> str:
    if callable(match):
        return f"{getattr(match, '__module__', '?')}.{getattr(match, '__qualname__', '?')}"
    return repr(match)


class Rule:
    """Tensors that ``match`` go through ``codec``.

    Parameters
    ----------
    match : str, sequence of str, or callable
        A shell-style glob on the tensor's name (``"decoder.*.weight"``; an int name is
        matched as its decimal text), several globs (any matches), or a predicate
        ``match(name, shape) -> bool`` (``shape`` a tuple of ints).
    codec : Codec, ErrorFeedback or None
        The codec of the matching tensors; None (or ``NoCompression()``) sends them dense.

    Raises
    ------
    TypeError
        For a ``match`` or ``codec`` of another type.
    ValueError
        For an empty glob or an empty list of globs.
    """

    def __init__(self, match: str | Sequence[str] | Callable[..., bool], codec: Any) -> None:
        if isinstance(match, str):
            patterns: tuple[str, ...] | None = (match,)
        elif callable(match):
            patterns = None
        elif isinstance(match, Sequence) and all(isinstance(m, str) for m in match):
            patterns = tuple(match)
            if not patterns:
                raise ValueError("a rule's list of globs is empty; give at least one")
        else:
            raise TypeError(
                f"a rule's match must be a glob (str), a list of globs, or a predicate "
                f"(name, shape) -> bool, got {type(match).__name__} {match!r}"
            )
        if patterns is not None and any(not p for p in patterns):
            raise ValueError(f"a rule's glob is empty in {patterns!r}; '*' matches every name")
        self.match = match
        self.patterns = patterns
        self.codec = _check_codec(codec, f"the codec of rule {_describe_match(match)}")

    def matches(self, name: Hashable, shape: tuple[int, ...]) -> bool:
        """Whether the tensor ``name`` of ``shape`` falls under this rule."""
        if self.patterns is not None:
            text = str(name)
            return any(fnmatch.fnmatchcase(text, p) for p in self.patterns)
        try:
            result = self.match(name, shape)  # type: ignore[operator]
        except Exception as error:
            raise ValueError(
                f"the predicate of rule {_describe_match(self.match)} raised "
                f"{type(error).__name__} on tensor {name!r} of shape {shape}: {error}"
            ) from error
        if not isinstance(result, bool):
            raise TypeError(
                f"the predicate of rule {_describe_match(self.match)} returned "
                f"{type(result).__name__} {result!r} for tensor {name!r}; it must return "
                "True or False"
            )
        return result

    def __repr__(self) -> str:
        return f"Rule({_describe_match(self.match)}, {self.codec!r})"


class CodecPolicy:
    """Choose a codec per tensor: explicit rules, then embeddings, matrices, the default.

    The first that applies wins:

    1. ``rules``, in order (each a :class:`Rule` or a ``(match, codec)`` pair);
    2. ``embeddings``, for names matching ``embedding_names``;
    3. ``matrices``, for tensors of two or more dimensions (PowerSGD compresses a conv
       kernel as a ``shape[0] x rest`` matrix);
    4. ``default``.

    A codec of None or :class:`~sparcomm.NoCompression` sends the tensor dense.  The
    same codec object named in several places is one codec (one state, fused buckets);
    give distinct objects to keep their tensors apart.

    Parameters
    ----------
    default : Codec, ErrorFeedback or None
        The codec of the tensors no rule claims (None: dense).
    rules : sequence of Rule or (match, codec)
        Explicit choices, tried first, in order.
    matrices : Codec, optional
        Codec of tensors with ``ndim >= 2`` (e.g. ``PowerSGD(rank=4)``).
    embeddings : Codec, optional
        Codec of embedding tables (e.g. ``ErrorFeedback(TopK(density=0.01))``).
    embedding_names : sequence of str
        Globs that name embedding tables (default ``("*embed*",)``).

    Raises
    ------
    TypeError, ValueError, NotImplementedError
        For a rule or codec of the wrong type (an ErrorFeedback around PowerSGD:
        NotImplementedError).

    Notes
    -----
    With ``schedule=`` on the reducer, a schedule applies to the policy's codecs that
    take its level (see :class:`~sparcomm.reducer.GradientReducer`).
    """

    def __init__(
        self,
        default: Any = None,
        *,
        rules: Sequence[Rule | tuple[Any, Any]] = (),
        matrices: Any = None,
        embeddings: Any = None,
        embedding_names: Sequence[str] = DEFAULT_EMBEDDING_NAMES,
    ) -> None:
        if isinstance(rules, (str, bytes, Rule)) or not isinstance(rules, Sequence):
            raise TypeError(
                f"rules must be a list of Rule or (match, codec) pairs, got "
                f"{type(rules).__name__} {rules!r}; e.g. rules=[('*.bias', None)]"
            )
        checked: list[Rule] = []
        for number, rule in enumerate(rules):
            if isinstance(rule, Rule):
                checked.append(rule)
            elif isinstance(rule, tuple) and len(rule) == 2:
                checked.append(Rule(*rule))
            else:
                raise TypeError(
                    f"rules[{number}] must be a Rule or a (match, codec) pair, got "
                    f"{type(rule).__name__} {rule!r}; e.g. ('*.bias', None)"
                )
        self.rules = tuple(checked)
        rules = self.rules
        self.default = _check_codec(default, "default")
        self.matrices = _check_codec(matrices, "matrices")
        self.embeddings = _check_codec(embeddings, "embeddings")
        self.embedding_rule = Rule(tuple(embedding_names), self.embeddings)
        # The distinct compressing codecs (by identity), in the order of the choices.
        entries: list[tuple[str, Any]] = [(f"rules[{i}]", r.codec) for i, r in enumerate(rules)]
        entries += [("embeddings", self.embeddings), ("matrices", self.matrices)]
        entries += [("default", self.default)]
        codecs: list[Any] = []
        labels: list[str] = []
        for label, codec in entries:
            if not _is_dense(codec) and all(codec is not other for other in codecs):
                codecs.append(codec)
                labels.append(label)
        #: The distinct compressing codecs, and where each was named first.
        self.codecs: tuple[Any, ...] = tuple(codecs)
        self.labels: tuple[str, ...] = tuple(labels)

    def choose(self, name: Hashable, shape: Sequence[int]) -> Any:
        """The codec of tensor ``name`` of ``shape`` (None: dense)."""
        shape = tuple(int(s) for s in shape)
        codec = self._choose(name, shape)
        return None if _is_dense(codec) else codec

    def _choose(self, name: Hashable, shape: tuple[int, ...]) -> Any:
        for rule in self.rules:
            if rule.matches(name, shape):
                return rule.codec
        if self.embeddings is not None and self.embedding_rule.matches(name, shape):
            return self.embeddings
        if self.matrices is not None and len(shape) >= 2:
            return self.matrices
        return self.default

    def assign(self, specs: Sequence[tuple[Hashable, Sequence[int], Any]]) -> list[int]:
        """The index in :attr:`codecs` of each ``(name, shape, dtype)``'s codec (-1: dense)."""
        indices = []
        for name, shape, _ in specs:
            codec = self.choose(name, shape)
            indices.append(-1 if codec is None else self._index(codec))
        return indices

    def _index(self, codec: Any) -> int:
        for number, known in enumerate(self.codecs):
            if known is codec:
                return number
        raise AssertionError("a policy chose a codec it does not list")  # unreachable

    def __repr__(self) -> str:
        parts = [f"default={self.default!r}"]
        if self.rules:
            parts.append(f"rules={list(self.rules)!r}")
        if self.matrices is not None:
            parts.append(f"matrices={self.matrices!r}")
        if self.embeddings is not None:
            parts.append(
                f"embeddings={self.embeddings!r}, embedding_names={self.embedding_rule.patterns!r}"
            )
        return f"CodecPolicy({', '.join(parts)})"


def _is_dense(codec: Any) -> bool:
    from sparcomm.feedback import unwrap

    return codec is None or getattr(unwrap(codec)[0], "family", None) == "dense"
