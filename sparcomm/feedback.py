"""Error feedback (local error accumulation) around any codec.

References: Seide et al., Interspeech 2014 (1-bit SGD); Stich, Cordonnier, Jaggi,
"Sparsified SGD with Memory", NeurIPS 2018; Karimireddy et al., "Error Feedback Fixes
SignSGD", ICML 2019.

Per key::

    compensated = x + residual[key]
    payload     = codec.encode(compensated)
    residual[key] = compensated - codec.decode(payload)

so ``decode(payload) + new residual == x + old residual``: nothing is lost, only
delayed.  For TopK the identity holds bit for bit (kept entries leave the residual,
the others stay untouched); for quantising codecs up to one float rounding per element.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any, NamedTuple

import numpy as np

from sparcomm._backend import array_module, kernels_for
from sparcomm.codecs._base import Codec, check_array
from sparcomm.payload import Payload


class FeedbackSnapshot(NamedTuple):
    """What :meth:`ErrorFeedback.snapshot` returns, for :meth:`ErrorFeedback.restore`."""

    #: Whether ``residuals`` holds copies (True) or the live arrays (False).
    copied: bool
    #: Key -> residual at the snapshot (a listed key without one maps to None).
    residuals: dict[Hashable, Any]
    #: Key -> number of encodes committed at the snapshot (0 for a key never encoded).
    encodes: dict[Hashable, int]
    #: The keys covered, or None for every key (then keys absent from ``residuals``
    #: had no residual and lose the one they gained since).
    keys: tuple[Hashable, ...] | None


class ErrorFeedback:
    """Wrap a codec with a per-key residual memory.

    Parameters
    ----------
    codec : Codec
        The codec to compensate (typically :class:`~sparcomm.TopK`).

    Notes
    -----
    Two buffers per key are kept and swapped (the consumed residual doubles as the
    decode buffer), so steady-state encoding allocates nothing beyond the payload, and
    a failed encode (for example on NaN input) leaves the residual exactly as it was.
    """

    def __init__(self, codec: Codec) -> None:
        if isinstance(codec, ErrorFeedback):
            raise TypeError(
                f"codec is already wrapped in {type(codec).__name__}; wrap it only once"
            )
        if not isinstance(codec, Codec):
            raise TypeError(
                f"codec must be a sparcomm codec such as TopK(density=0.01), got "
                f"{type(codec).__name__}"
            )
        if getattr(codec, "error_feedback", False):
            raise ValueError(
                f"{codec!r} keeps its own error feedback already; wrap "
                f"{type(codec).__name__}(error_feedback=False) instead"
            )
        self.codec = codec
        self._residuals: dict[Hashable, Any] = {}
        self._scratch: dict[Hashable, Any] = {}
        # Encodes committed per key: restore() tells one encode since a by-reference
        # snapshot (its old residual is intact in the spare buffer) from several (the
        # two buffers have swapped again, so the old residual was overwritten).
        self._encodes: dict[Hashable, int] = {}

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.codec!r})"

    # A wrapped codec answers the codec questions of its inner codec.
    codec_id = property(lambda self: self.codec.codec_id)
    name = property(lambda self: self.codec.name)
    is_sparse = property(lambda self: self.codec.is_sparse)
    family = property(lambda self: self.codec.family)
    is_stochastic = property(lambda self: self.codec.is_stochastic)
    is_unbiased = False

    def encoded_nbytes(self, n: int, dtype: Any = np.float32, ndim: int = 1) -> int:
        return self.codec.encoded_nbytes(n, dtype, ndim)

    def check_payload(self, payload: Payload) -> None:
        self.codec.check_payload(payload)

    def decode(self, payload: Payload, out: Any = None, *, accumulate: int = 0) -> Any:
        return self.codec.decode(payload, out=out, accumulate=accumulate)

    def residual(self, key: Hashable = None) -> Any:
        """The residual kept for ``key`` (None before its first encode)."""
        return self._residuals.get(key)

    def residual_for(self, key: Hashable, flat: Any) -> Any:
        """The residual of ``key`` for the 1-D array ``flat``: None before the first encode,
        else on ``flat``'s device (moved there once if it is on the other one).

        The residual follows the data (host after :meth:`load_state_dict`, device after a
        model moved to the GPU): one copy, at the first use on the new device.

        Raises
        ------
        ValueError
            If the residual does not have ``flat``'s size and dtype.
        """
        return keyed_on_device(self._residuals, self._scratch, key, flat, "residual")

    def keys(self) -> list[Hashable]:
        return list(self._residuals)

    def encode(
        self,
        x: Any,
        *,
        key: Hashable = None,
        step: int | None = None,
        rank: int | None = None,
        **options: Any,
    ) -> Payload:
        """Encode ``x + residual[key]`` and keep what the payload does not carry."""
        xp, flat = check_array(x)
        kernels = kernels_for(xp)
        residual = self.residual_for(key, flat)
        compensated = self._scratch.pop(key, None)
        if compensated is None:
            compensated = xp.empty_like(flat)
        # The codec adds the residual in its own pass where it can (TopK on the host:
        # one pass over memory less), when what is encoded is the plain x + residual.
        fuse = (
            residual is not None
            and type(self)._compensate is ErrorFeedback._compensate
            and getattr(self.codec, "fuses_compensation", False)
        )
        try:
            if fuse:
                payload = self.codec.encode(
                    flat.reshape(x.shape),  # a view: the payload keeps x's shape
                    key=key,
                    step=step,
                    rank=rank,
                    residual=residual,
                    compensated=compensated,
                    **options,
                )
            else:
                self._compensate(key, flat, residual, compensated)
                payload = self.codec.encode(
                    compensated.reshape(x.shape), key=key, step=step, rank=rank, **options
                )
        except BaseException:
            self._scratch[key] = compensated
            raise
        residual_into = getattr(self.codec, "residual_into", None)
        if fuse and getattr(self.codec, "fuses_feedback", False):
            pass  # the codec's pass left compensated - decode(payload) in compensated
        elif residual_into is not None:
            residual_into(compensated, payload)
        elif self.codec.fused_accumulate:
            # compensated -= decode(payload) in the decode pass itself (same bits as
            # decoding into a buffer and subtracting: one IEEE subtraction per element).
            self.codec.decode(payload, out=compensated, accumulate=-1)
        else:
            # The old residual is consumed: decode into it rather than into a fresh
            # array (a fresh n-element array per call costs its page faults every step).
            decoded = residual if residual is not None else xp.empty_like(flat)
            self.codec.decode(payload, out=decoded)
            kernels.subtract(compensated, decoded, compensated)
            residual = decoded
        if residual is not None:
            self._scratch[key] = residual
        self._residuals[key] = compensated
        self._encodes[key] = self._encodes.get(key, 0) + 1
        return payload

    def _compensate(self, key: Hashable, flat: Any, residual: Any, out: Any) -> None:
        """Write what is encoded for ``key`` into ``out``: ``flat + residual`` (``flat``
        alone before the first encode).  Subclasses (:class:`~sparcomm.DGC`) change
        what is accumulated; the residual bookkeeping around it stays here."""
        if residual is None:
            out[...] = flat
        else:
            # The kernel layer's add, not xp.add: CuPy's operators flush float32
            # subnormals (-ftz=true), which would lose residual mass on the GPU only.
            kernels_for(array_module(flat)).add(flat, residual, out)

    def state_dict(self) -> dict[str, Any]:
        """Copies of the residuals (host NumPy arrays) keyed by tensor key, and their
        dtypes (so a state stored as lists, in JSON for instance, loads back exactly)."""
        residuals = {}
        for key, value in self._residuals.items():
            residuals[key] = value.copy() if isinstance(value, np.ndarray) else value.get()
        dtypes = {key: np.dtype(value.dtype).name for key, value in residuals.items()}
        return {"codec": repr(self.codec), "residuals": residuals, "dtypes": dtypes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore residuals saved by :meth:`state_dict` (onto the host; a residual moves
        to the GPU at its key's first encode of a CuPy array).

        Atomic: every residual is checked before any is replaced.

        Raises
        ------
        TypeError
            If ``state`` or its residuals have the wrong type, or a residual given as a
            list has no saved dtype.
        ValueError
            If the state was saved from a different codec, or a residual is not a 1-D
            float32/float64 array matching its saved dtype.
        """
        self._install(self.checked_residuals(state))

    def checked_residuals(self, state: dict[str, Any]) -> dict[Hashable, np.ndarray]:
        """The residuals :meth:`load_state_dict` would install, checked and converted,
        without installing them (to validate a whole checkpoint before loading any of it).

        A residual given as a list (a state stored as JSON, say) takes its dtype from the
        state's ``"dtypes"``: NumPy would make it float64, and every later encode of a
        float32 tensor would then fail.

        Raises
        ------
        TypeError, ValueError
            As :meth:`load_state_dict`.
        """
        if not isinstance(state, dict):
            raise TypeError(
                f"state must be a dict from ErrorFeedback.state_dict(), got {type(state).__name__}"
            )
        if "residuals" not in state:
            raise ValueError(
                "state must be a dict from ErrorFeedback.state_dict(), with a 'residuals' "
                f"key, got keys {sorted(map(str, state))}"
            )
        if state.get("codec") != repr(self.codec):
            raise ValueError(
                f"state was saved from {state.get('codec')}, this ErrorFeedback wraps "
                f"{self.codec!r}; load it into a matching codec"
            )
        residuals, dtypes = state["residuals"], state.get("dtypes") or {}
        for name, value in (("residuals", residuals), ("dtypes", dtypes)):
            if not isinstance(value, dict):
                raise TypeError(
                    f"state[{name!r}] must be a dict keyed by tensor key, got "
                    f"{type(value).__name__}; pass what ErrorFeedback.state_dict() returned"
                )
        restored = {}
        for key, value in residuals.items():
            restored[key] = _checked_residual(key, value, dtypes.get(key))
        return restored

    def _install(self, residuals: dict[Hashable, np.ndarray]) -> None:
        self._residuals = residuals
        self._scratch = {}

    def snapshot(self, keys: Iterable[Hashable] | None = None) -> FeedbackSnapshot:
        """A handle on the residuals as they are now, for :meth:`restore`.

        A step that is then abandoned (a failed collective, a skipped mixed-precision
        step) undoes its encodes with it.  Each key's previous residual survives its
        next encode in the spare buffer when the codec has TopK's ``residual_into`` or a
        fused decode (every built-in codec), so the handle holds references (no copy);
        other codecs decode into the old residual, so their residuals are copied here.

        Parameters
        ----------
        keys : iterable of keys, optional
            Cover these keys only (one allreduce call: a dict lookup per key instead of
            a copy of the whole table); :meth:`restore` then leaves every other key
            alone.  None covers every key.
        """
        copied = not self._keeps_old_residual()
        if keys is None:
            table = self._residuals
            encodes = dict(self._encodes)
            covered = None
        else:
            covered = tuple(dict.fromkeys(keys))
            table = {key: self._residuals.get(key) for key in covered}
            encodes = {key: self._encodes.get(key, 0) for key in covered}
        if copied:
            residuals = {k: None if v is None else v.copy() for k, v in table.items()}
        else:
            residuals = dict(table)
        return FeedbackSnapshot(copied, residuals, encodes, covered)

    def restore(self, snapshot: FeedbackSnapshot) -> None:
        """Put back the residuals of :meth:`snapshot`: encodes since then leave no trace.

        Raises
        ------
        RuntimeError
            If a key was encoded more than once since a by-reference snapshot (its old
            residual was overwritten): restore undoes one step.  Nothing is changed then.
        """
        copied, residuals, encodes, covered = snapshot
        if not copied:
            for key in residuals:
                if self._encodes.get(key, 0) > encodes.get(key, 0) + 1:
                    raise RuntimeError(
                        f"residual of key {key!r} was encoded more than once since the "
                        "snapshot; restore() undoes one step only"
                    )
        for key, old in residuals.items():
            new = self._residuals.get(key)
            count = encodes.get(key, 0)
            if count:
                self._encodes[key] = count
            else:
                self._encodes.pop(key, None)
            if new is old:
                continue
            if old is None:  # first encoded after the snapshot: it had no residual then
                del self._residuals[key]
                self._scratch.pop(key, None)
                continue
            self._residuals[key] = old
            if new is not None and not copied:
                self._scratch[key] = new  # the spare buffer again, as after any encode
            else:
                self._scratch.pop(key, None)
        if covered is None:
            for key in [key for key in self._residuals if key not in residuals]:
                # First encoded after the snapshot: it had no residual then.
                del self._residuals[key]
                self._scratch.pop(key, None)
                self._encodes.pop(key, None)

    def set_residual(self, key: Hashable, value: Any) -> None:
        """Replace the residual of ``key`` by the 1-D float array ``value`` (None removes
        it); for callers whose keys change layout (DDP's bucket rebuild).

        Raises
        ------
        TypeError
            If ``value`` is not a 1-D float32/float64 array.
        """
        if value is not None:
            array_module(value)
            if value.dtype not in (np.float32, np.float64) or value.ndim != 1:
                raise TypeError(
                    f"residual for key {key!r} must be a 1-D float32 or float64 array, got "
                    f"{value.ndim}-D {value.dtype}"
                )
            self._residuals[key] = value
        else:
            self._residuals.pop(key, None)
        self._scratch.pop(key, None)

    def _keeps_old_residual(self) -> bool:
        return getattr(self.codec, "residual_into", None) is not None or bool(
            self.codec.fused_accumulate
        )

    def to_device(self, xp: Any) -> None:
        """Move every residual to the array module ``xp`` (``numpy`` or ``cupy``) now.

        Optional: a residual on the other device is moved at its key's next encode.
        """
        moved = {}
        for key, value in self._residuals.items():
            same = array_module(value) is xp
            moved[key] = value if same else (value.get() if xp is np else xp.asarray(value))
        self._residuals = moved
        self._scratch = {}


_RESIDUAL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _checked_residual(key: Hashable, value: Any, saved: Any) -> np.ndarray:
    """One saved residual as a fresh 1-D float32/float64 host array, or a clear error."""
    if saved is not None:
        try:
            saved = np.dtype(saved)
        except TypeError:
            saved = None  # reported below with the expected values
        if saved not in _RESIDUAL_DTYPES:
            raise ValueError(
                f"the saved dtype of the residual for key {key!r} must be float32 or "
                f"float64, got {saved!r}; pass the 'dtypes' of ErrorFeedback.state_dict()"
            )
    if isinstance(value, np.ndarray):
        array = value.copy()
    elif isinstance(value, (list, tuple)):
        if saved is None:
            raise TypeError(
                f"the residual for key {key!r} is a {type(value).__name__} and the state "
                "has no dtype for it (state['dtypes'][key]); numpy would guess float64 and "
                "every later encode of a float32 tensor would fail: save the residuals as "
                "numpy arrays (as state_dict() returns them) or keep its 'dtypes' entry"
            )
        try:
            array = np.array(value, dtype=saved)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"the residual for key {key!r} is not a list of numbers ({error})"
            ) from None
    else:
        raise TypeError(
            f"the residual for key {key!r} must be a numpy.ndarray (or a list with a saved "
            f"dtype), got {type(value).__module__}.{type(value).__qualname__}"
        )
    if array.dtype not in _RESIDUAL_DTYPES or array.ndim != 1:
        raise ValueError(
            f"the residual for key {key!r} must be a 1-D float array (float32 or float64), "
            f"got {array.ndim}-D {array.dtype}"
        )
    if saved is not None and array.dtype != saved:
        raise ValueError(
            f"the residual for key {key!r} is {array.dtype}, saved as {saved}; pass the "
            "residuals and dtypes of one ErrorFeedback.state_dict()"
        )
    return array


def keyed_on_device(
    table: dict[Hashable, Any], scratch: dict[Hashable, Any], key: Hashable, flat: Any, what: str
) -> Any:
    """``table[key]`` on ``flat``'s device (moved there once, its ``scratch`` spare
    dropped), or None; for per-key state such as residuals and DGC's velocities.

    Raises
    ------
    ValueError
        If the kept array does not have ``flat``'s size and dtype.
    """
    value = table.get(key)
    if value is None:
        return None
    if value.size != flat.size or value.dtype != flat.dtype:
        raise ValueError(
            f"the {what} for key {key!r} holds {value.size} x {value.dtype}, got "
            f"{flat.size} x {flat.dtype}; give every tensor its own key"
        )
    xp = array_module(flat)
    if array_module(value) is not xp:
        value = xp.asarray(value) if xp is not np else value.get()
        table[key] = value
        scratch.pop(key, None)
    return value


def unwrap(codec: Any) -> tuple[Codec, ErrorFeedback | None]:
    """Return ``(bare codec, error-feedback memory or None)`` for any codec form.

    ``ErrorFeedback(c)`` gives ``(c, it)``; ``OneBit()`` with its own feedback gives the
    inner bare OneBit and its memory; a bare codec gives ``(codec, None)``.
    """
    if isinstance(codec, ErrorFeedback):
        return codec.codec, codec
    memory = getattr(codec, "feedback", None)
    if isinstance(memory, ErrorFeedback):
        return memory.codec, memory
    return codec, None
