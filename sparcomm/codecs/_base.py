"""The codec interface: registration, validation, dispatch to kernels, payload checks.

A codec subclass is one module: its id and family in the class statement
(``class TopK(Codec, codec_id=3, family="sparse")``, which registers it), its parameters,
its wire layout declared once (``wire``, see :mod:`sparcomm.codecs._wire`), and its
algorithm in terms of kernel calls (``_encode_flat`` / ``_decode_flat``).  Everything
derived or shared — sizes, payload checks, slicing for the collectives, input checks,
the array-module dispatch, output allocation — lives here once.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from sparcomm._backend import array_module, kernels_for
from sparcomm._errors import NonFiniteError as NonFiniteError  # re-exported
from sparcomm._errors import non_finite_error as non_finite_error
from sparcomm._random import stream_key
from sparcomm.codecs._registry import CODECS, Preset, known_families
from sparcomm.codecs._wire import Wire
from sparcomm.kernels._checks import check_accumulate
from sparcomm.payload import Payload, register_layout, wire_nbytes

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_array(x: Any, name: str = "x") -> tuple[ModuleType, Any]:
    """Validate a gradient array and return ``(xp, flat)``; flat is 1-D contiguous.

    Non-contiguous inputs are accepted and copied once into a contiguous buffer.
    """
    xp = array_module(x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32 or float64, got {x.dtype}; convert with "
            f"{name}.astype(numpy.float32)"
        )
    if x.ndim == 0:
        raise ValueError(
            f"{name} is a 0-d array; codecs take arrays with at least one dimension: "
            f"pass {name}.reshape(1)"
        )
    if x.size == 0:
        raise ValueError(
            f"{name} is empty (shape {x.shape}); there is nothing to compress: skip it"
        )
    return xp, xp.ascontiguousarray(x).reshape(-1)


def check_int(value: Any, name: str, low: int, high: float, hint: str = "") -> int:
    """Validate an integer parameter in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        bound = "inf" if math.isinf(high) else int(high)
        raise ValueError(f"{name} must be in [{low}, {bound}], got {value}{hint}")
    return int(value)


class Codec:
    """Base class of every codec: ``encode(x) -> Payload`` and ``decode(payload)``.

    A subclass names its id and family in the class statement, which registers it in
    :data:`sparcomm.codecs.CODECS` and with the payload header::

        class RandomK(Codec, codec_id=200, family="sparse"):
            wire = (Wire("indices", np.int64, Entries("k")), Wire("values", INPUT, Entries("k")))

    and implements ``_params``, ``_encode_flat`` and ``_decode_flat``.  Ids are stable
    (they are written in every payload): 1..127 are sparcomm's, 128..255 are free for
    codecs defined elsewhere.  A subclass without ``codec_id`` inherits its parent's
    id, family and wire layout.

    The family chooses the collective of ``sparcomm.allreduce`` (see
    :mod:`sparcomm.comm._dispatch`); each family asks for a little of its codecs:

    ``"sparse"``
        The payload holds ``indices`` (ascending, unique) and ``values`` arrays.
    ``"quantized"``
        Every wire array is sliceable (:class:`~sparcomm.codecs._wire.Elements`,
        :class:`~sparcomm.codecs._wire.Packed` or
        :class:`~sparcomm.codecs._wire.PerBucket`): the collectives cut payloads into
        chunks and decode-add them (``decode(..., accumulate=1)``).
    ``"dense"``
        The values themselves travel (MPI's own ``Allreduce``).
    ``"low-rank"``
        Linear codecs whose collective allreduces small factors (PowerSGD).
    """

    codec_id: ClassVar[int]
    #: The collective family: one of ``"sparse"``, ``"quantized"``, ``"low-rank"``, ``"dense"``.
    family: ClassVar[str]
    #: The payload arrays in wire order (see :mod:`sparcomm.codecs._wire`).
    wire: ClassVar[tuple[Wire, ...]] = ()
    #: Their names (derived from ``wire``).
    array_names: ClassVar[tuple[str, ...]] = ()
    #: Named standard configurations, for the CLI, demo, benchmarks and tests.
    presets: ClassVar[tuple[Preset, ...]] = ()
    #: True for codecs whose payload is a sparse (index, value) list (``family == "sparse"``).
    is_sparse: ClassVar[bool] = False
    #: True when ``E[decode(encode(x))] == x``.
    is_unbiased: ClassVar[bool] = False
    #: True for codecs that draw random numbers (and so use seed, rank, key, step).
    is_stochastic: ClassVar[bool] = False
    #: Capability: may quantize the dense phase of SparCML's Q-DSAR
    #: (``allreduce(x, codec=TopK(...), dense_phase=c)``): a stateless quantized codec
    #: that is unbiased or rounds to nearest.
    dense_phase_capable: ClassVar[bool] = False
    #: Capability of the quantized family's ``shared_scale`` algorithm (TernGrad's
    #: scaler sharing): the codec offers ``bucket_for(n)``, ``local_scales(x)`` and
    #: ``encode(x, scale=S)``, whose ``packed`` array holds 2-bit ternary codes
    #: (0 -> 0, 1 -> +S, 2 -> -S) that the ranks' owners sum exactly as integers.
    shares_scale: ClassVar[bool] = False
    #: Stateless and element-wise: each element's payload and decoded value depend on
    #: that element alone (no per-tensor or per-bucket scale, no selection, no random
    #: draw, no residual), and the family's collective sums each element across ranks on
    #: its own.  Tensors concatenated into one vector then reduce to their own results,
    #: so :class:`~sparcomm.GradientReducer` fuses such a codec's tensors into buckets in
    #: either ``compression`` mode, as it fuses dense tensors: bit for bit for ``FP16``
    #: (its ``pipelined`` collective sums in rank order), and for ``NoCompression`` up to
    #: the order of the dense collective's float sum, as for any dense bucket.  Not
    #: inherited: a subclass declares it again, as its encode may differ (and
    #: ``pipelined`` runs ``FP16`` itself only).
    is_elementwise: ClassVar[bool] = False

    seed: int = 0
    rank: int = 0

    def __init_subclass__(
        cls, *, codec_id: int | None = None, family: str | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if "is_elementwise" not in cls.__dict__:
            cls.is_elementwise = False  # a claim about this class's own algorithm
        if codec_id is None:
            if family is not None:
                raise TypeError(f"{cls.__name__}: family= needs a codec_id= as well")
            return  # a variant of its parent: same id, family and wire layout
        if family not in known_families():
            raise ValueError(
                f"{cls.__name__}: family must be one of {known_families()}, got {family!r}; "
                "a new family is added with sparcomm.comm.register_family(family, collective)"
            )
        if not cls.wire or not all(isinstance(w, Wire) for w in cls.wire):
            raise TypeError(
                f"{cls.__name__}: declare the payload arrays as a non-empty tuple of Wire "
                "in the class body, e.g. wire = (Wire('values', INPUT, Elements()),)"
            )
        names = tuple(w.name for w in cls.wire)
        if family == "sparse" and names != ("indices", "values"):
            raise TypeError(
                f"{cls.__name__}: a sparse codec's payload is ('indices', 'values'), got {names}"
            )
        if family == "quantized" and not all(w.count.sliceable for w in cls.wire):
            raise TypeError(
                f"{cls.__name__}: a quantized codec's arrays must be sliceable (Elements, "
                "Packed or PerBucket counts): the collectives cut payloads into chunks"
            )
        register_layout(codec_id, cls.__name__, names)
        cls.codec_id = codec_id
        cls.family = family
        cls.array_names = names
        cls.is_sparse = family == "sparse"
        CODECS._add(cls)

    def __init__(self) -> None:
        self._calls: dict[Hashable, int] = {}

    @property
    def name(self) -> str:
        """The registered name of the codec (its class's, or its parent's for a variant)."""
        return CODECS.by_id(self.codec_id).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"

    def _describe(self) -> str:
        return ""

    # -- to be provided by subclasses -------------------------------------------------
    def _params(self, n: int) -> tuple[int, ...]:
        """Integer parameters written in the header and needed to decode."""
        raise NotImplementedError

    def _encode_flat(
        self, xp: ModuleType, kernels: ModuleType, flat: Any, stream: int, **options: Any
    ) -> dict[str, Any]:
        raise NotImplementedError

    def _decode_flat(
        self, xp: ModuleType, kernels: ModuleType, payload: Payload, out: Any, accumulate: int
    ) -> None:
        """Decode into ``out``; ``accumulate`` is ±1 only where ``fused_accumulate``."""
        raise NotImplementedError

    def _decode_sum_flat(self, kernels: ModuleType, payloads: list[Payload], out: Any) -> bool:
        """``out = `` the sum of the (checked) payloads' decodes in list order, in one fused
        kernel pass where ``kernels`` has one for this codec (the host kernels' ``*_sum``
        fusions): bit for bit a decode followed by ``accumulate=1`` decodes.  Returns
        False, having written nothing, where there is none."""
        return False

    # -- derived from the wire layout ---------------------------------------------------
    def _wire_arrays(self, n: int, dtype: np.dtype) -> list[tuple[np.dtype, int]]:
        """``(dtype, count)`` of each wire array for an input of n elements."""
        return [(w.dtype_for(self, n, dtype), w.count.count(self, n)) for w in self.wire]

    def slice_alignment(self) -> int:
        """Elements: payloads can be cut on multiples of this (see :meth:`slice_payload`).

        Raises
        ------
        NotImplementedError
            For codecs whose payloads are entry lists (the sparse family).
        """
        return math.lcm(*(w.count.alignment(self) for w in self.wire))

    def slice_payload(self, payload: Payload, start: int, stop: int) -> Payload:
        """The payload of elements ``[start, stop)`` of ``payload``, as views (no copy).

        ``start`` must be a multiple of :meth:`slice_alignment`, and ``stop`` one too or
        ``payload.n``; the result decodes to exactly the elements ``[start, stop)`` of
        the whole (same scales, same random draws).  The quantized collectives send
        each owner its chunk this way after encoding the whole vector once.
        """
        arrays = {}
        for w in self.wire:
            bounds = w.count.bounds(self, payload.n, start, stop)
            array = payload.arrays[w.name]
            arrays[w.name] = array if bounds is None else array[bounds[0] : bounds[1]]
        length = stop - start
        return Payload(
            payload.codec_id, length, payload.dtype, (length,), self._params(length), arrays
        )

    # -- public API ---------------------------------------------------------------------
    def encoded_nbytes(self, n: int, dtype: Any = np.float32, ndim: int = 1) -> int:
        """Exact bytes of the payload for an array of n elements (for cost models).

        Raises
        ------
        TypeError, ValueError
            For an ``n`` that is not a positive int (or an ``ndim`` outside 1..32).
        """
        n = check_int(n, "n", 1, math.inf, "; pass the number of elements, x.size")
        ndim = check_int(ndim, "ndim", 1, 32, "; pass x.ndim")
        return wire_nbytes(ndim, len(self._params(n)), self._wire_arrays(n, np.dtype(dtype)))

    def encode(
        self,
        x: Any,
        *,
        key: Hashable = None,
        step: int | None = None,
        rank: int | None = None,
        **options: Any,
    ) -> Payload:
        """Compress ``x`` into a :class:`~sparcomm.payload.Payload`.

        Parameters
        ----------
        x : numpy.ndarray or cupy.ndarray
            float32 or float64, any shape (flattened, the shape is restored on decode).
        key : str or int, optional
            Names the tensor: selects the random stream (and, under error feedback, the
            residual).
        step : int, optional
            Training step for the random stream; when omitted, a per-key counter of
            calls is used, so successive calls draw fresh random numbers.
        rank : int, optional
            Rank for the random stream (default: the codec's ``rank``, 0); collectives
            pass the communicator's rank so ranks draw independent streams.

        Returns
        -------
        Payload
        """
        xp, flat = check_array(x)
        if step is not None:
            check_int(step, "step", 0, math.inf, "; steps count from 0 (or pass step=None)")
        if rank is not None:
            check_int(rank, "rank", 0, math.inf, "; pass comm.Get_rank() (or rank=None)")
        stream = 0
        if self.is_stochastic:
            if step is None:
                step = self._calls.get(key, 0)
                self._calls[key] = step + 1
            stream = stream_key(self.seed, self.rank if rank is None else rank, key, step)
        arrays = self._encode_flat(xp, kernels_for(xp), flat, stream, **options)
        return Payload(
            self.codec_id, flat.size, flat.dtype, tuple(x.shape), self._params(flat.size), arrays
        )

    #: Whether the decode kernels add into or subtract from ``out`` in the same pass
    #: (``accumulate=±1``); other codecs decode into a temporary first.
    fused_accumulate = False

    def decode(self, payload: Payload, out: Any = None, *, accumulate: int = 0) -> Any:
        """Decompress a payload made by this codec (same class and parameters).

        Parameters
        ----------
        payload : Payload
        out : array, optional
            Destination with the payload's shape and dtype (NumPy or CuPy like the
            payload); a new array is returned when omitted.
        accumulate : {0, 1, -1}
            ``0`` writes the decoded array into ``out``; ``1`` adds it (``out += d``),
            ``-1`` subtracts it (``out -= d``), each one IEEE operation per element: the
            bits of decoding into a separate buffer and then adding or subtracting
            (``out`` is required).  Error feedback (``-1``) and the quantized
            collectives' sums (``1``) use it; QSGD, TernGrad and OneBit do it in the
            decode pass itself (``fused_accumulate``).

        Raises
        ------
        ValueError
            If the payload comes from another codec, other parameters, or has arrays of
            the wrong length; for another ``accumulate``, or ``accumulate`` without ``out``.
        """
        self.check_payload(payload)
        accumulate = check_accumulate(accumulate)  # the kernels' own check and message
        xp = array_module(*payload.arrays.values())
        if out is None:
            if accumulate:
                raise ValueError("accumulate=±1 adds into out: pass the buffer as out=")
            out = xp.empty(payload.shape, dtype=payload.dtype)
        else:
            if array_module(out) is not xp:
                raise TypeError("out must live on the same device as the payload")
            if out.dtype != payload.dtype or out.size != payload.n:
                raise ValueError(
                    f"out must have {payload.n} elements of {payload.dtype}, got {out.size} "
                    f"of {out.dtype}"
                )
            if not out.flags.c_contiguous:
                raise ValueError("out must be C-contiguous; pass numpy.empty_like(...) instead")
            if not getattr(out.flags, "writeable", True):  # CuPy arrays are always writeable
                raise ValueError(
                    "out must be writeable, got a read-only array; pass a writeable buffer "
                    "(numpy.empty_like(out), or out.copy())"
                )
        kernels = kernels_for(xp)
        flat = out.reshape(-1)
        if accumulate == 0 or self.fused_accumulate:
            self._decode_flat(xp, kernels, payload, flat, accumulate)
        else:
            decoded = xp.empty_like(flat)
            self._decode_flat(xp, kernels, payload, decoded, 0)
            (kernels.add if accumulate == 1 else kernels.subtract)(flat, decoded, flat)
        return out

    def check_payload(self, payload: Payload) -> None:
        """Raise ValueError unless this codec, with these parameters, made ``payload``."""
        if not isinstance(payload, Payload):
            raise TypeError(
                f"expected a sparcomm Payload, got {type(payload).__name__}; use "
                "Payload.from_bytes(buffer) for raw bytes"
            )
        if payload.codec_id != self.codec_id:
            raise ValueError(
                f"payload was encoded by {payload.codec_name}, cannot decode it with "
                f"{self!r}; decode with the codec that encoded it"
            )
        expected = self._params(payload.n)
        if payload.params != expected:
            raise ValueError(
                f"payload parameters {payload.params} do not match {self!r} (expects "
                f"{expected}); decode with the same codec settings as the encoder"
            )
        layout = self._wire_arrays(payload.n, payload.dtype)
        if len(payload.arrays) != len(layout):
            raise ValueError(
                f"{self.name} payload must carry {len(layout)} arrays, got "
                f"{len(payload.arrays)} ({sorted(payload.arrays)}): corrupted payload"
            )
        for (name, array), (dtype, count) in zip(payload.arrays.items(), layout, strict=True):
            if array.dtype != dtype or array.size != count:
                raise ValueError(
                    f"{self.name} payload array {name!r} must hold {count} x {dtype}, got "
                    f"{array.size} x {array.dtype}: corrupted payload"
                )
