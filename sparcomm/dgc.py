"""Deep Gradient Compression options for sparse codecs: momentum correction, momentum
factor masking and local gradient clipping, as a wrapper like error feedback.

Reference: Lin, Han, Mao, Wang, Dally, "Deep Gradient Compression: Reducing the
Communication Bandwidth for Distributed Training", ICLR 2018 (sections 3.1-3.2).

Per key, with momentum ``m``, masking on and clipping threshold ``c``, on ``P`` ranks::

    g = g * min(1, (c / sqrt(P)) / ||g||)     # 1. local gradient clipping (if c is set)
    u = m * u + g                              # 2. momentum correction: local velocity
    v = v + u                                  # 3. accumulate the velocity (error feedback)
    payload = top-k(v)                         # 4. send the largest entries of v
    v[sent] = 0                                # 5. v keeps what was not sent
    u[sent] = 0                                # 6. momentum factor masking

Steps 3-5 are :class:`~sparcomm.ErrorFeedback` with ``u`` in place of the gradient, so
``decode(payload) + new v == old v + u`` holds bit for bit as it does there (nothing is
lost, only delayed), and :class:`DGC` subclasses it: residuals ``v``, their snapshot /
restore, state and device moves are error feedback's, extended by the momenta ``u``.

The sum over ranks of what was sent is the momentum-SGD update direction, so the
optimizer must apply it *without* momentum of its own (``SGD(momentum=0)``; learning
rate and weight decay stay the optimizer's): :func:`check_setup` refuses the
combination.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import numpy as np

from sparcomm._backend import array_module, kernels_for
from sparcomm.codecs._base import Codec
from sparcomm.feedback import ErrorFeedback, _checked_residual, keyed_on_device, unwrap
from sparcomm.payload import Payload


class DGC(ErrorFeedback):
    """Deep Gradient Compression (Lin et al., ICLR 2018) around a sparse codec.

    Parameters
    ----------
    codec : Codec
        A codec of the sparse family (:class:`~sparcomm.TopK`), bare: DGC keeps the
        error feedback itself.
    momentum : float
        Momentum ``m`` in ``[0, 1)`` of the local velocity ``u = m u + g`` (momentum
        correction).  ``0`` turns momentum correction off (plain error feedback, with
        clipping if ``clip_norm`` is set).  With ``momentum > 0`` the optimizer must not
        apply momentum again: use ``SGD(momentum=0)``.
    masking : bool
        Momentum factor masking: clear the velocity ``u`` at the coordinates sent, as
        the accumulation ``v`` is cleared there.  Off by default, unlike the paper:
        on the benchmark task (docs/benchmarks.md, "DGC options") momentum correction
        without masking gained 9.7 points of accuracy (s.e. 1.4, three seeds) over TopK
        with error feedback at equal steps, with masking -1.4 (s.e. 3.7); turn it on if
        training with long steps (``lr / (1 - m)`` near the stability limit) diverges,
        as it did without masking on the least-squares test task.  No effect at
        ``momentum=0``.
    clip_norm : float, optional
        Local gradient clipping: each key's gradient is scaled down so that its L2 norm
        is at most ``clip_norm / sqrt(P)`` before it enters ``u`` (the paper's per-worker
        threshold for a global threshold ``clip_norm``, assuming independent worker
        gradients).  ``None`` (default): no clipping.
    world_size : int, optional
        ``P`` for the clipping threshold.  ``None`` (default): the size of the
        collective's communicator as told by :func:`check_setup` (for the optimizer and
        reducer to call at construction), else the size of the
        communicator of :func:`sparcomm.init` (``MPI.COMM_WORLD`` by default), read at
        the first clipped encode.  Give it when the collective runs on another
        communicator and nothing calls :func:`check_setup`.

    Raises
    ------
    TypeError
        If ``codec`` is not a codec, is wrapped already (``ErrorFeedback``, ``DGC``), or
        a parameter has the wrong type.
    ValueError
        If ``momentum``, ``clip_norm`` or ``world_size`` is out of range, or ``codec``
        keeps its own error feedback.
    NotImplementedError
        If ``codec`` is not of the sparse family (masking needs the sent coordinates).

    Notes
    -----
    Per key the wrapper keeps ``v`` (the error-feedback residual, :meth:`residual`) and
    ``u`` (:meth:`momentum`); both are per rank, like residuals.  Clipping is per key
    (per tensor under ``DistributedOptimizer``, as in the paper's per-layer clipping).
    DGC's density warm-up is a density schedule of the codec, and its momentum-sampled
    top-k threshold is not used: selection stays exact.
    """

    def __init__(
        self,
        codec: Codec,
        *,
        momentum: float = 0.9,
        masking: bool = False,
        clip_norm: float | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(codec)
        if codec.family != "sparse":
            raise NotImplementedError(
                f"DGC needs a codec of the sparse family such as TopK(density=0.01), got "
                f"{codec!r} (family {codec.family!r}): momentum factor masking clears the "
                "coordinates sent; for other codecs use ErrorFeedback(codec)"
            )
        self.momentum = _checked_float(momentum, "momentum", "in [0, 1)", lambda m: 0.0 <= m < 1.0)
        if not isinstance(masking, (bool, np.bool_)):
            raise TypeError(f"masking must be a bool, got {type(masking).__name__} {masking!r}")
        self.masking = bool(masking)
        if clip_norm is not None:
            clip_norm = _checked_float(
                clip_norm,
                "clip_norm",
                "> 0 and finite (or None: no clipping)",
                lambda c: c > 0.0 and math.isfinite(c),
            )
        self.clip_norm = clip_norm
        if world_size is not None:
            if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)):
                raise TypeError(
                    f"world_size must be an int (or None: the communicator's size), got "
                    f"{type(world_size).__name__} {world_size!r}"
                )
            if world_size < 1:
                raise ValueError(f"world_size must be >= 1, got {world_size}")
            world_size = int(world_size)
        self.world_size = world_size
        self._bound_size: int | None = None  # from check_setup's communicator
        self._momenta: dict[Hashable, Any] = {}
        self._momentum_scratch: dict[Hashable, Any] = {}
        self._pending: dict[Hashable, Any] = {}  # u of an encode in progress, per key

    def __repr__(self) -> str:
        size = "" if self.world_size is None else f", world_size={self.world_size}"
        return (
            f"DGC({self.codec!r}, momentum={self.momentum}, masking={self.masking}, "
            f"clip_norm={self.clip_norm}{size})"
        )

    # -- the algorithm ------------------------------------------------------------------
    def clip_threshold(self) -> float | None:
        """The per-rank L2-norm bound ``clip_norm / sqrt(P)`` (None without clipping)."""
        if self.clip_norm is None:
            return None
        size = self.world_size or self._bound_size
        if size is None:
            from sparcomm._runtime import size as runtime_size

            size = self._bound_size = runtime_size()
        return self.clip_norm / math.sqrt(size)

    def encode(
        self,
        x: Any,
        *,
        key: Hashable = None,
        step: int | None = None,
        rank: int | None = None,
        **options: Any,
    ) -> Payload:
        """Steps 1-6 of the module docstring for ``x`` under ``key``; on failure (a
        non-finite entry, say) ``u`` and ``v`` stay as they were."""
        try:
            payload = super().encode(x, key=key, step=step, rank=rank, **options)
        except BaseException:
            pending = self._pending.pop(key, None)
            if pending is not None:
                self._momentum_scratch[key] = pending
            raise
        velocity = self._pending.pop(key)
        if self.masking and self.momentum > 0.0:
            velocity[payload.arrays["indices"]] = 0
        old = self._momenta.get(key)
        if old is not None:
            # The old velocity survives until the key's next encode: snapshot() refers
            # to it instead of copying (as error feedback does with its residual).
            self._momentum_scratch[key] = old
        self._momenta[key] = velocity
        return payload

    def _compensate(self, key: Hashable, flat: Any, residual: Any, out: Any) -> None:
        """``out = v + (u = m u + clip(g))``; the new ``u`` waits in ``_pending``."""
        xp = array_module(flat)
        kernels = kernels_for(xp)
        threshold = self.clip_threshold()
        gradient = flat
        if threshold is not None:
            norm = _l2_norm(xp, flat)
            if norm > threshold:  # False for NaN: the codec reports it as non-finite
                gradient = flat * (threshold / norm)
        # A key without a residual starts afresh (the reducer's warm-up drops residuals
        # only): a velocity left without its accumulation is stale.
        old = self._momentum_for(key, flat) if residual is not None else None
        velocity = self._momentum_scratch.pop(key, None)
        if velocity is None or array_module(velocity) is not xp or velocity.size != flat.size:
            velocity = xp.empty_like(flat)
        if old is None or self.momentum == 0.0:
            velocity[...] = gradient
        else:
            xp.multiply(old, self.momentum, out=velocity)
            kernels.add(velocity, gradient, velocity)
        self._pending[key] = velocity
        super()._compensate(key, velocity, residual, out)

    def _momentum_for(self, key: Hashable, flat: Any) -> Any:
        """The velocity of ``key`` on ``flat``'s device (moved there once), or None."""
        return keyed_on_device(self._momenta, self._momentum_scratch, key, flat, "momentum")

    def momentum_buffer(self, key: Hashable = None) -> Any:
        """The velocity ``u`` kept for ``key`` (None before its first encode)."""
        return self._momenta.get(key) if key in self._residuals else None

    def set_momentum_buffer(self, key: Hashable, value: Any) -> None:
        """Replace the velocity ``u`` of ``key`` (None: it restarts at zero); call it
        after :meth:`set_residual`, which restarts the velocity.  DDP's bucket rebuild
        carries velocities over this way, parameter by parameter."""
        self._momentum_scratch.pop(key, None)
        if value is None:
            self._momenta.pop(key, None)
        else:
            self._momenta[key] = value

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Error feedback's state (the accumulations ``v`` as ``"residuals"``) plus the
        velocities ``u`` as ``"momenta"`` (host NumPy copies), saved under this wrapper's
        repr: it loads only into a DGC with the same codec and options."""
        state = super().state_dict()
        momenta = {}
        for key in state["residuals"]:
            value = self._momenta.get(key)
            if value is not None:
                momenta[key] = value.copy() if isinstance(value, np.ndarray) else value.get()
        state["codec"] = repr(self)
        state["momenta"] = momenta
        return state

    def checked_residuals(self, state: dict[str, Any]) -> Any:
        """The (residuals, momenta) :meth:`load_state_dict` would install, checked and
        converted, without installing them.

        Raises
        ------
        TypeError, ValueError
            As :meth:`ErrorFeedback.load_state_dict`; also when the state has no momenta
            (saved by ``ErrorFeedback``) or a momentum does not match its residual.
        """
        if not isinstance(state, dict):
            raise TypeError(
                f"state must be a dict from DGC.state_dict(), got {type(state).__name__}"
            )
        if state.get("codec") != repr(self):
            raise ValueError(
                f"state was saved from {state.get('codec')}, this is {self!r}; load it into "
                "a wrapper with the same codec and options"
            )
        if "momenta" not in state:
            raise ValueError(
                "state has no 'momenta': pass what DGC.state_dict() returned, unchanged"
            )
        residuals = super().checked_residuals(dict(state, codec=repr(self.codec)))
        momenta, dtypes = state["momenta"], state.get("dtypes") or {}
        if not isinstance(momenta, dict):
            raise TypeError(
                f"state['momenta'] must be a dict keyed by tensor key, got "
                f"{type(momenta).__name__}; pass what DGC.state_dict() returned"
            )
        restored = {}
        for key, value in momenta.items():
            if key not in residuals:
                raise ValueError(
                    f"state has a momentum for key {key!r} but no residual; pass what "
                    "DGC.state_dict() returned, unchanged"
                )
            array = _checked_residual(key, value, dtypes.get(key))
            if array.shape != residuals[key].shape or array.dtype != residuals[key].dtype:
                raise ValueError(
                    f"the momentum for key {key!r} is {array.size} x {array.dtype}, its "
                    f"residual {residuals[key].size} x {residuals[key].dtype}; pass what "
                    "DGC.state_dict() returned, unchanged"
                )
            restored[key] = array
        return residuals, restored

    def _install(self, residuals: Any) -> None:
        residuals, momenta = residuals
        super()._install(residuals)
        self._momenta = momenta
        self._momentum_scratch = {}

    def snapshot(self, keys: Iterable[Hashable] | None = None) -> Any:
        """A handle on ``v`` and ``u`` as they are now, for :meth:`restore` (by
        reference where error feedback's is; copies otherwise); ``keys`` as in
        :meth:`ErrorFeedback.snapshot`."""
        base = super().snapshot(keys)
        if base.keys is None:
            table = self._momenta
        else:
            table = {key: self._momenta.get(key) for key in base.keys}
        if base.copied:
            return base, {k: None if v is None else v.copy() for k, v in table.items()}
        return base, dict(table)

    def restore(self, snapshot: Any) -> None:
        """Put back ``v`` and ``u`` of :meth:`snapshot`: encodes since then leave no trace.

        Raises
        ------
        RuntimeError
            As :meth:`ErrorFeedback.restore`: a key encoded twice since a by-reference
            snapshot.
        """
        base, momenta = snapshot
        super().restore(base)
        copied = base.copied
        for key, old in momenta.items():
            new = self._momenta.get(key)
            if new is old:
                continue
            if old is None:  # first encoded after the snapshot
                del self._momenta[key]
                self._momentum_scratch.pop(key, None)
                continue
            self._momenta[key] = old
            if new is not None and not copied:
                self._momentum_scratch[key] = new
            else:
                self._momentum_scratch.pop(key, None)
        if base.keys is None:
            for key in [key for key in self._momenta if key not in momenta]:
                del self._momenta[key]
                self._momentum_scratch.pop(key, None)

    def set_residual(self, key: Hashable, value: Any) -> None:
        """As :meth:`ErrorFeedback.set_residual`; the key's velocity restarts at zero
        (its layout changed: DDP's bucket rebuild)."""
        super().set_residual(key, value)
        self._momenta.pop(key, None)
        self._momentum_scratch.pop(key, None)

    def to_device(self, xp: Any) -> None:
        """Move every residual and velocity to ``xp`` (``numpy`` or ``cupy``) now."""
        super().to_device(xp)
        moved = {}
        for key, value in self._momenta.items():
            same = array_module(value) is xp
            moved[key] = value if same else (value.get() if xp is np else xp.asarray(value))
        self._momenta = moved
        self._momentum_scratch = {}


def _l2_norm(xp: Any, flat: Any) -> float:
    """``||flat||_2`` as a Python float: one BLAS dot product (``numpy.linalg.norm``'s
    own method; CuPy's cuBLAS), in float64 where a float32 sum of squares overflows."""
    with np.errstate(over="ignore"):  # an overflow is handled below
        squares = float(xp.dot(flat, flat))
    if math.isinf(squares) and flat.dtype != np.float64:
        wide = flat.astype(np.float64)
        squares = float(xp.dot(wide, wide))
    return math.sqrt(squares)


def _checked_float(value: Any, name: str, expected: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a float {expected}, got {type(value).__name__} {value!r}")
    if not ok(float(value)):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return float(value)


def check_setup(codec: Any, *, optimizer: Any = None, comm: Any = None) -> None:
    """Check a codec against the training set-up it runs in (a no-op unless it is a
    :class:`DGC`); for ``DistributedOptimizer`` and ``GradientReducer`` to call at
    construction, on every rank alike.

    Parameters
    ----------
    codec : Codec, ErrorFeedback or DGC
        The codec given to the optimizer or reducer.
    optimizer : torch.optim.Optimizer or any object with ``param_groups``, optional
        The wrapped optimizer.  With ``DGC(momentum > 0)`` its parameter groups must not
        apply momentum (``momentum`` 0; ``betas[0]`` 0 for the Adam family): momentum
        correction already sends the momentum-SGD update direction.
    comm : mpi4py.MPI.Comm, optional
        The collective's communicator: its size is the ``P`` of the clipping threshold
        ``clip_norm / sqrt(P)`` (a ``world_size`` given to DGC must equal it).

    Raises
    ------
    ValueError
        If the optimizer applies momentum under DGC momentum correction, or DGC's
        ``world_size`` differs from the communicator's size.
    """
    memory = unwrap(codec)[1]
    if not isinstance(memory, DGC):
        return
    if optimizer is not None and memory.momentum > 0.0:
        for number, group in enumerate(getattr(optimizer, "param_groups", ())):
            momentum = group.get("momentum", 0.0)
            betas = group.get("betas")
            if betas is not None and betas[0] > 0.0:
                momentum, field = betas[0], "betas[0]"
            else:
                field = "momentum"
            if momentum:
                raise ValueError(
                    f"{memory!r} applies momentum correction, and the optimizer's parameter "
                    f"group {number} applies momentum too ({field}={momentum}): the momentum "
                    f"would count twice; construct the optimizer with {field}=0, or use "
                    f"DGC(..., momentum=0) to keep only DGC's other options"
                )
    if comm is not None:
        size = int(comm.Get_size())
        if memory.world_size is not None and memory.world_size != size:
            raise ValueError(
                f"{memory!r} was given world_size={memory.world_size}, but the collective "
                f"runs on {size} ranks; pass world_size={size} or leave it None"
            )
        memory._bound_size = size
