"""The dispatch table: which collective runs ``allreduce(x, codec=c)``.

A codec names its family in its class statement (``family="sparse"``); the table maps
each family to its collective.  The built-in families are listed here, explicitly, so
that no collective registers itself as a side effect of some module being imported:

========== ==============================================================
dense      :func:`._dense.dense_allreduce` (MPI's own ``Allreduce``)
sparse     :func:`._sparse_allreduce.sparse_codec_allreduce` (SparCML)
quantized  :func:`._quantized.quantized_allreduce`
low-rank   :func:`._lowrank.lowrank_allreduce` (PowerSGD: dense allreduces of factors)
========== ==============================================================

A collective is ``collective(x, codec, *, comm, op, algorithm, key, step, stats, out)``:
it receives the codec as the user passed it (``ErrorFeedback`` included), returns the
reduced array with ``x``'s shape, identical on every rank, and starts with
:func:`._call.begin_call` and :meth:`._call.Call.agree`, so a failing rank cannot hang
the others.  :func:`register_collective` overrides the family for one codec class (and
its subclasses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparcomm.codecs._registry import add_family
from sparcomm.comm._call import begin_call
from sparcomm.comm._dense import dense_allreduce
from sparcomm.comm._lowrank import lowrank_allreduce
from sparcomm.comm._protocol import code, describe_codec
from sparcomm.comm._quantized import quantized_allreduce
from sparcomm.comm._sparse_allreduce import sparse_codec_allreduce
from sparcomm.feedback import unwrap

Collective = Callable[..., Any]

#: family -> collective.
FAMILY_COLLECTIVES: dict[str, Collective] = {
    "dense": dense_allreduce,
    "sparse": sparse_codec_allreduce,
    "quantized": quantized_allreduce,
    "low-rank": lowrank_allreduce,
}

#: codec class -> collective, overriding the family (see :func:`register_collective`).
CODEC_COLLECTIVES: dict[type, Collective] = {}


def register_family(family: str, collective: Collective) -> None:
    """Route every codec of ``family`` to ``collective`` (one call plugs a family in).

    Parameters
    ----------
    family : str
        A family name: ``"low-rank"``, or a new one, which codec classes may then
        declare (``class MyCodec(Codec, codec_id=201, family=family)``).
    collective : callable
        ``collective(x, codec, *, comm, op, algorithm, key, step, stats, out)``; see
        the module docstring for its contract.
    """
    if not isinstance(family, str) or not family:
        raise TypeError(f"family must be a non-empty str, got {family!r}")
    if not callable(collective):
        raise TypeError(f"collective must be callable, got {type(collective).__name__}")
    add_family(family)
    FAMILY_COLLECTIVES[family] = collective


def register_collective(codec_type: type, collective: Collective) -> None:
    """Route ``allreduce(x, codec=c)`` to ``collective`` when ``c`` (or the codec inside
    an ``ErrorFeedback``) is an instance of ``codec_type``, whatever its family.

    ``collective(x, codec, *, comm, op, algorithm, key, step, stats, out)`` receives the
    codec as the user passed it (``ErrorFeedback`` included), must return the reduced
    dense array with ``x``'s shape, identical on every rank, and must begin with the
    agreement of :mod:`sparcomm.comm._call` so that a failing rank cannot hang the others.
    """
    if not isinstance(codec_type, type):
        raise TypeError(f"codec_type must be a class, got {codec_type!r}")
    CODEC_COLLECTIVES[codec_type] = collective


def lookup(codec: Any) -> Collective:
    """The collective of ``codec`` (``None``: the dense family)."""
    if codec is None:
        return dense_allreduce
    bare = unwrap(codec)[0]
    for cls in type(bare).__mro__:
        if cls in CODEC_COLLECTIVES:
            return CODEC_COLLECTIVES[cls]
    family = getattr(bare, "family", None)
    if isinstance(family, str) and family in FAMILY_COLLECTIVES:
        return FAMILY_COLLECTIVES[family]
    families = ", ".join(sorted(FAMILY_COLLECTIVES))
    classes = "".join(f", {cls.__name__}" for cls in CODEC_COLLECTIVES)
    what = f"family {family!r}" if isinstance(family, str) else "not a sparcomm codec"
    return _refuse(
        NotImplementedError(
            f"no allreduce for codec {type(bare).__name__} ({what}); supported: codecs of "
            f"the families {families}{classes} (also under ErrorFeedback); register a "
            "collective with sparcomm.comm.register_family(family, collective), or use "
            "codec=NoCompression() for a dense allreduce"
        )
    )


def _refuse(error: Exception) -> Collective:
    def refuse(x, codec, *, comm, op, algorithm, key, step, stats, out):
        # Tell the other ranks before raising, so that none waits for us.
        def prepare() -> Any:
            raise error

        begin_call(comm, stats).agree(
            prepare, codec_text=describe_codec(codec), algorithm=code({}, algorithm), op=op
        )
        raise error  # pragma: no cover - agree raised already

    return refuse
