"""PowerSGD: rank-r compression of each gradient matrix by one step of power iteration.

Reference: Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient
Compression for Distributed Optimization", NeurIPS 2019; the semantics follow PyTorch's
``powerSGD_hook`` (``torch/distributed/algorithms/ddp_comm_hooks/powerSGD_hook.py``).

Per tensor ``x`` (reshaped as PyTorch does: first dimension x the rest, ``M`` is
``n x m``) and per step, with ``W`` ranks:

1. ``M = x + e`` (the error-feedback residual ``e`` of this tensor's key, 0 at first);
2. ``Q`` (``m x r``): the previous step's ``Q`` (warm start), or at the first step a
   Gaussian matrix drawn from a counter-based stream of ``(seed, key)`` (identical on
   every rank); orthogonalised;
3. ``P = M Q``; allreduce (sum) ``P`` over the ranks; orthogonalise ``P``;
4. ``Q = M^T P``; allreduce ``Q`` and divide by ``W``;
5. the result is ``P Q^T`` (the mean of the ranks' ``M`` projected on ``span(P)``);
   the residual becomes ``e = M - P Q^T``, and ``Q`` is kept for the next step.

Because every step is linear in ``M``, the sum of the ranks' compressed gradients is
the compression of their sum: the collective (:mod:`sparcomm.comm._lowrank`) is two
dense allreduces of the small factors, and no rank decodes another rank's payload.
Tensors where rank ``r`` would not compress (1-D tensors among them) travel dense.

The steps are methods of the codec (:meth:`PowerSGD.start`, :meth:`PowerSGD.project`,
:meth:`PowerSGD.finish`) so the single-process :meth:`PowerSGD.encode` and the
collective run the same code; the collective only inserts the two allreduces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from sparcomm._backend import array_module
from sparcomm._random import stream_key, uniform_reference
from sparcomm.codecs._base import Codec, check_array, check_int, non_finite_error
from sparcomm.codecs._registry import preset
from sparcomm.codecs._wire import INPUT, Entries, Wire
from sparcomm.payload import Payload, wire_nbytes

#: Header parameters of a PowerSGD payload: rows, columns and the rank used (0: dense).
_NPARAMS = 3
#: A key's entry in a per-key snapshot when the key had no state then.
_MISSING: Any = object()


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(rows, cols)`` a tensor of ``shape`` is compressed as: first dimension x the
    rest (PyTorch's ``tensor.view(tensor.shape[0], -1)``); 1-D tensors are ``(n, 1)``."""
    rows = int(shape[0])
    return rows, int(math.prod(shape[1:]))


def _shape_sized(codec: Any, n: int) -> int:
    raise NotImplementedError(
        "PowerSGD's factor sizes depend on the tensor's shape, not only its element "
        "count n: use PowerSGD.encoded_nbytes(shape) or PowerSGD.factor_sizes(shape)"
    )


@dataclass
class LowRankWork:
    """One tensor between :meth:`PowerSGD.start` and :meth:`PowerSGD.finish`.

    ``p`` (``rank x rows``) and ``q`` (``rank x cols``) are the transposed factors,
    views into the caller's buffers (the collective concatenates every tensor's factors
    into one buffer per phase); a dense tensor carries its values in ``p`` and an empty
    ``q``.  Nothing in the codec's state changes until :meth:`PowerSGD.finish`.
    """

    key: Hashable
    shape: tuple[int, ...]
    rows: int
    cols: int
    rank: int  # 0: sent dense
    matrix: Any  # the compensated (rows, cols) matrix (x itself without error feedback)
    p: Any
    q: Any


class PowerSGD(Codec, codec_id=7, family="low-rank"):
    """Low-rank gradient compression (PowerSGD) with warm start and error feedback.

    Parameters
    ----------
    rank : int
        Rank ``r`` of the approximation of each matrix (PyTorch's
        ``matrix_approximation_rank``), ``r >= 1``; 1 to 4 is typical.
    min_compression_rate : float
        A matrix ``n x m`` is compressed only when
        ``(n + m) * min(n, m, r) * min_compression_rate < n * m``; otherwise it travels
        dense (PyTorch's rule and default, 2).
    error_feedback : bool
        Keep ``M - P Q^T`` per key and add it to the next step's gradient (default on,
        as PowerSGD needs it to converge).
    warm_start : bool
        Start each step's power iteration from the previous step's ``Q`` (default on);
        off draws a new random ``Q`` every step.
    seed : int
        Seed of the initial ``Q`` (drawn from :mod:`sparcomm._random` by
        ``(seed, key)``, the same on every rank, independent of the rank).

    Notes
    -----
    Wire per compressed matrix and step: ``(n + m) * r`` values (``P`` and ``Q``), in two
    allreduces; dense tensors ``n * m`` values in the first.  State (residuals, warm-start
    ``Q``) is kept per key: give every tensor its own key; :meth:`state_dict` /
    :meth:`load_state_dict` save and restore it bit for bit.  PowerSGD keeps its own
    error feedback: do not wrap it in :class:`~sparcomm.ErrorFeedback`.

    The orthogonalisation is Gram-Schmidt in element-wise array operations (no BLAS
    reduction whose order could depend on threads), so every rank computes the same
    ``P`` from the same allreduced sum.  A column that is exactly zero (a zero gradient)
    stays zero instead of dividing by zero.

    References
    ----------
    Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for
    Distributed Optimization", NeurIPS 2019.
    """

    # The factors' sizes depend on the tensor's shape, not only on its element count:
    # PowerSGD sizes its payloads itself (encoded_nbytes, check_payload), and its
    # collective reduces the factors densely, so nothing slices these arrays.
    wire = (
        Wire("p", INPUT, Entries(_shape_sized)),
        Wire("q", INPUT, Entries(_shape_sized)),
    )
    presets = (
        preset("powersgd-r1", lambda: PowerSGD(rank=1)),
        preset("powersgd-r4", lambda: PowerSGD(rank=4), "demo"),
    )

    def __init__(
        self,
        rank: int = 1,
        *,
        min_compression_rate: float = 2.0,
        error_feedback: bool = True,
        warm_start: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.matrix_rank = check_int(rank, "rank", 1, math.inf, "; PowerSGD(rank=1) is common")
        if isinstance(min_compression_rate, bool) or not isinstance(
            min_compression_rate, (int, float, np.floating, np.integer)
        ):
            raise TypeError(
                "min_compression_rate must be a number, got "
                f"{type(min_compression_rate).__name__} {min_compression_rate!r}"
            )
        if not (math.isfinite(min_compression_rate) and min_compression_rate >= 1.0):
            raise ValueError(
                f"min_compression_rate must be a finite number >= 1, got {min_compression_rate}"
                "; 2 (the default) compresses a matrix only when it halves its size"
            )
        for name, value in (("error_feedback", error_feedback), ("warm_start", warm_start)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.min_compression_rate = float(min_compression_rate)
        self.error_feedback = error_feedback
        self.warm_start = warm_start
        self.seed = check_int(seed, "seed", 0, 2**63 - 1)
        self._residuals: dict[Hashable, Any] = {}
        self._scratch: dict[Hashable, Any] = {}
        self._q: dict[Hashable, Any] = {}
        self._shapes: dict[Hashable, tuple[int, int]] = {}

    # -- the level a schedule sets (sparcomm.schedule) ------------------------------------
    #: The parameter a schedule sets.
    level_parameter = "rank"

    @property
    def level(self) -> int:
        """The current rank ``r``."""
        return self.matrix_rank

    def set_level(self, value: float) -> int:
        """Set the rank to a schedule's value (rounded to the nearest int); returns it.

        The state stays keyed by tensor: at a key's next step its warm-start ``Q`` keeps
        its first ``min(old, new)`` columns, and new columns are drawn from the stream of
        ``(seed, key, steps done)``, the same on every rank (:meth:`start`).  A matrix
        that the new rank no longer compresses travels dense with its residual added.

        Raises
        ------
        TypeError, ValueError
            For a value that is not a number, or rounds below 1.
        """
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise TypeError(f"rank must be a number, got {type(value).__name__} {value!r}")
        self.matrix_rank = check_int(
            math.floor(float(value) + 0.5), "rank", 1, math.inf, "; PowerSGD needs rank >= 1"
        )
        return self.matrix_rank

    def _describe(self) -> str:
        return (
            f"rank={self.matrix_rank}, min_compression_rate={self.min_compression_rate}, "
            f"error_feedback={self.error_feedback}, warm_start={self.warm_start}, "
            f"seed={self.seed}"
        )

    # -- layout ---------------------------------------------------------------------------
    def layout(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """``(rows, cols, rank)`` of a tensor of ``shape``; rank 0 means it travels dense."""
        rows, cols = matrix_shape(tuple(shape))
        rank = min(rows, cols, self.matrix_rank)
        if (rows + cols) * rank * self.min_compression_rate < rows * cols:
            return rows, cols, rank
        return rows, cols, 0

    def factor_sizes(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Values of ``shape``'s tensor in the P phase and in the Q phase of a step."""
        rows, cols, rank = self.layout(shape)
        return (rows * rank, cols * rank) if rank else (rows * cols, 0)

    def wire_values(self, shape: tuple[int, ...]) -> int:
        """Values sent per step for a tensor of ``shape``: ``(n + m) r``, or ``n m`` dense."""
        return sum(self.factor_sizes(shape))

    def encoded_nbytes(
        self,
        n: int,
        dtype: Any = np.float32,
        ndim: int = 1,
        *,
        shape: tuple[int, ...] | None = None,
    ) -> int:
        """Exact bytes of :meth:`encode`'s payload; PowerSGD needs the ``shape`` beyond
        1-D (the size of the factors depends on it, not only on ``n``)."""
        if shape is None:
            if ndim != 1:
                raise ValueError(
                    f"PowerSGD's payload size depends on the matrix shape, not only on "
                    f"n={n}: pass shape=(rows, ...) for a {ndim}-D tensor"
                )
            shape = (int(n),)
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != n:
            raise ValueError(f"shape {shape} has {math.prod(shape)} elements, not n={n}")
        return wire_nbytes(len(shape), _NPARAMS, self._wire_layout(shape, np.dtype(dtype)))

    def _wire_layout(self, shape: tuple[int, ...], dtype: np.dtype) -> list[tuple[np.dtype, int]]:
        p_size, q_size = self.factor_sizes(shape)
        return [(dtype, p_size), (dtype, q_size)]

    # -- the algorithm, in the steps the collective interleaves with its allreduces -------
    def start(self, x: Any, key: Hashable, p: Any, q: Any) -> LowRankWork:
        """Steps 1-3 up to the first allreduce: ``M = x + e``, the initial ``Q`` into
        ``q`` and ``P^T = Q^T M^T`` into ``p`` (a dense tensor: its values into ``p``).

        ``p`` and ``q`` have :meth:`factor_sizes` elements (1-D, ``x``'s module and
        dtype).  The codec's state is read, not changed.
        """
        xp, flat = check_array(x)
        shape = tuple(int(s) for s in x.shape)
        rows, cols, rank = self.layout(shape)
        self._check_key(key, rows, cols)
        if not rank:
            # A residual here comes from steps at a rank that compressed this matrix (a
            # rank schedule): it is sent now, and dropped in finish().
            residual = self._state_array(self._residuals, key, xp) if self.error_feedback else None
            if residual is None:
                p[...] = flat
            else:
                xp.add(flat, residual, out=p)
            return LowRankWork(key, shape, rows, cols, 0, flat, p, q)
        pt = p.reshape(rank, rows)
        qt = q.reshape(rank, cols)
        matrix = flat.reshape(rows, cols)
        residual = compensated = None
        if self.error_feedback:
            residual = self._state_array(self._residuals, key, xp)
            compensated = self._scratch.get(key)
            if compensated is None or array_module(compensated) is not xp:
                compensated = xp.empty_like(flat)
            matrix = compensated.reshape(rows, cols)
        previous = self._state_array(self._q, key, xp) if self.warm_start else None
        if previous is None:
            step = 0 if self.warm_start else self._calls.get(key, 0)
            qt[...] = xp.asarray(initial_q(self.seed, key, step, rank, cols, flat.dtype))
        elif previous.shape[0] >= rank:  # the rank fell (a schedule): keep the leading rows
            qt[...] = previous[:rank]
        else:  # the rank rose: the new rows from the stream of (seed, key, steps done)
            have = previous.shape[0]
            drawn = initial_q(self.seed, key, self._calls.get(key, 0), rank, cols, flat.dtype)
            qt[:have] = previous
            qt[have:] = xp.asarray(drawn[have:])
        orthogonalize(qt)
        if compensated is None:
            xp.matmul(qt, matrix.T, out=pt)
        else:
            source = flat.reshape(rows, cols)
            old = None if residual is None else residual.reshape(rows, cols)
            # M = x + e and P^T = Q^T M^T block by block of rows, so that each block of
            # M is still in cache when the product reads it (one pass over M less).
            for r0, r1 in _row_blocks(xp, rows, cols, flat.itemsize):
                block = matrix[r0:r1]
                if old is None:
                    block[...] = source[r0:r1]
                else:
                    xp.add(source[r0:r1], old[r0:r1], out=block)
                xp.matmul(qt, block.T, out=pt[:, r0:r1])
        return LowRankWork(key, shape, rows, cols, rank, matrix, pt, qt)

    def project(self, work: LowRankWork) -> None:
        """Step 4 before its allreduce: orthogonalise the summed ``P``, ``Q^T = P^T M``."""
        if work.rank:
            orthogonalize(work.p)
            array_module(work.p).matmul(work.p, work.matrix, out=work.q)

    def finish(self, work: LowRankWork, size: int, mean: bool, out: Any = None) -> Any:
        """Step 5 after both allreduces (``p`` and ``q`` hold the sums over ``size``
        ranks): the result into ``out`` (a new array when None), shaped like the input;
        then commit the residual and the warm-start ``Q`` of ``work.key``."""
        xp = array_module(work.p)
        if out is None:
            out = xp.empty(work.shape, dtype=work.p.dtype)
        flat = out.reshape(-1)
        if not work.rank:
            self._residuals.pop(work.key, None)  # sent with the values (start)
            self._scratch.pop(work.key, None)
            if mean and size > 1:
                xp.divide(work.p, work.p.dtype.type(size), out=flat)
            else:
                flat[...] = work.p
            return out
        if size > 1:
            work.q /= work.q.dtype.type(size)
        result = flat.reshape(work.rows, work.cols)
        columns = xp.ascontiguousarray(work.p.T)  # rows x rank
        # M is the compensated buffer (scratch): it becomes the residual in place, block
        # by block of rows while the block of P Q^T is still in cache, and the old
        # residual's buffer is the next step's scratch.
        matrix = work.matrix if self.error_feedback else None
        for r0, r1 in _row_blocks(xp, work.rows, work.cols, flat.itemsize):
            block = result[r0:r1]
            if work.rank == 1:
                # An outer product: NumPy's matmul takes a slow non-BLAS loop for an
                # inner dimension of 1 (9x a broadcast multiply at 2048 x 2048, measured).
                xp.multiply(columns[r0:r1], work.q, out=block)
            else:
                xp.matmul(columns[r0:r1], work.q, out=block)
            if matrix is not None:
                xp.subtract(matrix[r0:r1], block, out=matrix[r0:r1])
        if self.error_feedback:
            residual = work.matrix.reshape(-1)
            old = self._residuals.get(work.key)
            if old is not None and array_module(old) is xp:
                self._scratch[work.key] = old
            else:
                self._scratch.pop(work.key, None)
            self._residuals[work.key] = residual
        if self.warm_start:
            self._q[work.key] = work.q.copy()
        self._calls[work.key] = self._calls.get(work.key, 0) + 1
        self._shapes[work.key] = (work.rows, work.cols)
        if not mean and size > 1:
            flat *= flat.dtype.type(size)
        return out

    def _check_key(self, key: Hashable, rows: int, cols: int) -> None:
        known = self._shapes.get(key)
        if known is not None and known != (rows, cols):
            raise ValueError(
                f"key {key!r} holds PowerSGD state of a {known[0]} x {known[1]} matrix, got "
                f"{rows} x {cols}; give every tensor its own key"
            )

    def _state_array(self, table: dict[Hashable, Any], key: Hashable, xp: ModuleType) -> Any:
        """``table[key]`` on ``xp``'s device (moved there once), or None."""
        value = table.get(key)
        if value is not None and array_module(value) is not xp:
            value = xp.asarray(value) if xp is not np else value.get()
            table[key] = value
            self._scratch.pop(key, None)
        return value

    # -- the codec API (one process: the allreduces are the identity) ----------------------
    def encode(
        self,
        x: Any,
        *,
        key: Hashable = None,
        step: int | None = None,
        rank: int | None = None,
        **options: Any,
    ) -> Payload:
        """Compress ``x`` as one rank would alone: ``P`` and ``Q`` of steps 1-5.

        Updates the key's residual and warm-start ``Q`` (as a collective step at one
        rank does).  ``step`` and ``rank`` are accepted for the codec API and unused:
        the initial ``Q`` depends on ``(seed, key)`` only.

        Raises
        ------
        ValueError
            If ``x`` holds NaN or Inf (the state is left unchanged), or ``key`` held a
            matrix of another shape.
        """
        if options:
            raise TypeError(f"PowerSGD.encode takes no options, got {sorted(options)}")
        xp, flat = check_array(x)
        p_size, q_size = self.factor_sizes(tuple(x.shape))
        p = xp.empty(p_size, dtype=flat.dtype)
        q = xp.empty(q_size, dtype=flat.dtype)
        work = self.start(x, key, p, q)
        if not bool(xp.isfinite(p).all()):
            raise non_finite_error()
        self.project(work)
        payload = Payload(
            self.codec_id,
            flat.size,
            flat.dtype,
            tuple(int(s) for s in x.shape),
            (work.rows, work.cols, work.rank),
            {"p": p.copy(), "q": q.copy()},
        )
        self.finish(work, 1, True)
        return payload

    def decode(self, payload: Payload, out: Any = None, *, accumulate: int = 0) -> Any:
        """``P Q^T`` reshaped to the tensor's shape (the values of a dense payload)."""
        self.check_payload(payload)
        if accumulate not in (0, 1, -1):
            raise ValueError(f"accumulate must be 0, 1 or -1, got {accumulate!r}")
        xp = array_module(*payload.arrays.values())
        if out is None:
            if accumulate:
                raise ValueError("accumulate=±1 adds into out: pass the buffer as out=")
            out = xp.empty(payload.shape, dtype=payload.dtype)
        elif (
            array_module(out) is not xp
            or out.dtype != payload.dtype
            or out.size != payload.n
            or not out.flags.c_contiguous
        ):
            raise ValueError(
                f"out must be a C-contiguous {xp.__name__} array of {payload.n} x "
                f"{payload.dtype}, got {out.size} x {out.dtype}"
            )
        rows, cols, rank = payload.params
        p, q = payload.arrays["p"], payload.arrays["q"]
        decoded = (
            p if not rank else xp.ascontiguousarray(p.reshape(rank, rows).T) @ q.reshape(rank, cols)
        )
        flat = out.reshape(-1)
        if accumulate == 0:
            flat[...] = decoded.reshape(-1)
        elif accumulate == 1:
            flat += decoded.reshape(-1)
        else:
            flat -= decoded.reshape(-1)
        return out

    def check_payload(self, payload: Payload) -> None:
        """Raise ValueError unless this codec, with these parameters, made ``payload``."""
        if not isinstance(payload, Payload):
            raise TypeError(f"expected a sparcomm Payload, got {type(payload).__name__}")
        if payload.codec_id != self.codec_id:
            raise ValueError(
                f"payload was encoded by {payload.codec_name}, cannot decode it with "
                f"{self!r}; decode with the codec that encoded it"
            )
        expected = self.layout(payload.shape)
        if tuple(payload.params) != expected:
            raise ValueError(
                f"payload parameters {payload.params} do not match {self!r} for shape "
                f"{payload.shape} (expects {expected}); decode with the encoder's settings"
            )
        layout = self._wire_layout(payload.shape, payload.dtype)
        for (name, array), (dtype, count) in zip(payload.arrays.items(), layout, strict=True):
            if array.dtype != dtype or array.size != count:
                raise ValueError(
                    f"PowerSGD payload array {name!r} must hold {count} x {dtype}, got "
                    f"{array.size} x {array.dtype}: corrupted payload"
                )

    # -- state ------------------------------------------------------------------------------
    def keys(self) -> list[Hashable]:
        """Keys with state (residual or warm-start ``Q``)."""
        return list(self._shapes)

    def residual(self, key: Hashable = None) -> Any:
        """The error-feedback residual of ``key`` (1-D; None before its first step)."""
        return self._residuals.get(key)

    def snapshot(self, keys: Iterable[Hashable] | None = None) -> tuple[Any, ...]:
        """A handle on the state as it is now, for :meth:`restore` (no copy).

        A step commits a key's state by replacing its arrays (the new residual is the
        step's compensated buffer, the new ``Q`` a fresh array); the old residual is
        kept as the key's spare buffer until its next step, so references suffice.
        ``keys`` (optional) limits the handle to those keys (one allreduce call):
        :meth:`restore` then leaves every other key alone.
        """
        tables = (self._residuals, self._q, self._calls, self._shapes)
        if keys is None:
            return (*(dict(table) for table in tables), None)
        covered = tuple(dict.fromkeys(keys))
        # _MISSING marks a key without an entry then (restore removes the one it gained).
        picked = ({key: table.get(key, _MISSING) for key in covered} for table in tables)
        return (*picked, covered)

    def restore(self, snapshot: tuple[dict[Hashable, Any], ...]) -> None:
        """Put back the state of :meth:`snapshot`: the steps since leave no trace.

        Raises
        ------
        RuntimeError
            If a key took more than one step since the snapshot (its old residual was
            reused as a buffer): restore undoes one step.
        """
        residuals, q, calls, shapes, covered = snapshot
        keys = list(self._calls) if covered is None else covered

        def before(key: Hashable) -> int:
            count = calls.get(key, 0)
            return 0 if count is _MISSING else count

        twice = [key for key in keys if self._calls.get(key, 0) > before(key) + 1]
        if twice:
            raise RuntimeError(
                f"PowerSGD state of key {twice[0]!r} took more than one step since the "
                "snapshot; restore() undoes one step only"
            )
        for key in self._residuals if covered is None else covered:
            new, old = self._residuals.get(key), residuals.get(key)
            if new is not None and new is not old:
                self._scratch[key] = new  # the spare buffer again, as after any step
        if covered is None:
            self._residuals, self._q = dict(residuals), dict(q)
            self._calls, self._shapes = dict(calls), dict(shapes)
            return
        tables: tuple[dict[Hashable, Any], ...] = (
            self._residuals,
            self._q,
            self._calls,
            self._shapes,
        )
        for mine, saved in zip(tables, (residuals, q, calls, shapes), strict=True):
            for key in covered:
                if saved[key] is _MISSING:
                    mine.pop(key, None)
                else:
                    mine[key] = saved[key]

    def state_dict(self) -> dict[str, Any]:
        """Host copies of the residuals, warm-start ``Q`` and step counts, by key.

        Residuals differ between ranks (save one state per rank); ``Q`` is the same on
        every rank.
        """

        def host(table: dict[Hashable, Any]) -> dict[Hashable, np.ndarray]:
            return {k: v.copy() if isinstance(v, np.ndarray) else v.get() for k, v in table.items()}

        return {
            "codec": repr(self),
            "residuals": host(self._residuals),
            "q": host(self._q),
            "calls": dict(self._calls),
            "shapes": dict(self._shapes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (onto the host; arrays move to the GPU at
        their key's first CuPy step).  Atomic: nothing changes unless all of it is valid.

        Raises
        ------
        ValueError
            If the state comes from a codec with other parameters, or is malformed.
        """
        self.prepare_load_state(state)()

    def prepare_load_state(self, state: dict[str, Any]) -> Callable[[], None]:
        """Check ``state`` completely and return the function that installs it (which
        cannot fail): lets a caller check several states before changing any."""
        names = ("codec", "residuals", "q", "calls", "shapes")
        if not isinstance(state, dict) or any(name not in state for name in names):
            raise ValueError(
                f"state must be a dict from PowerSGD.state_dict() with keys {names}, got "
                f"{sorted(state) if isinstance(state, dict) else type(state).__name__}"
            )
        if state["codec"] != repr(self):
            raise ValueError(
                f"state was saved from {state['codec']}, this codec is {self!r}; load it "
                "into a PowerSGD with the same parameters"
            )
        shapes = {k: (int(r), int(c)) for k, (r, c) in state["shapes"].items()}
        residuals, q = {}, {}
        for key, value in state["residuals"].items():
            array = np.array(value, copy=True)
            if key not in shapes or array.ndim != 1 or array.size != math.prod(shapes[key]):
                raise ValueError(f"residual of key {key!r} does not match its matrix shape")
            residuals[key] = array
        for key, value in state["q"].items():
            array = np.array(value, copy=True)
            if key not in shapes or array.ndim != 2 or array.shape[1] != shapes[key][1]:
                raise ValueError(f"warm-start Q of key {key!r} does not match its matrix shape")
            q[key] = array
        calls = {k: int(v) for k, v in state["calls"].items()}

        def install() -> None:
            self._residuals, self._q, self._shapes = residuals, q, shapes
            self._calls = calls
            self._scratch = {}

        return install


#: Bytes of one block of rows in :meth:`PowerSGD.start` and :meth:`PowerSGD.finish` on
#: the host: small enough that a block and its product stay in a core's L2 cache.
_BLOCK_BYTES = 1 << 18


def _row_blocks(xp: ModuleType, rows: int, cols: int, itemsize: int) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` to process a ``rows x cols`` matrix in: cache-sized blocks
    for NumPy, the whole matrix for a device (one kernel launch per operation)."""
    if xp is not np:
        return [(0, rows)]
    step = max(1, _BLOCK_BYTES // max(1, cols * itemsize))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def initial_q(
    seed: int, key: Hashable, step: int, rank: int, cols: int, dtype: np.dtype
) -> np.ndarray:
    """The initial ``Q^T`` (``rank x cols``, standard normal) of ``key``: a Box-Muller
    transform of the counter-based uniforms of stream ``(seed, rank 0, key, step)``, so
    every rank (and every device) draws the same matrix without communicating."""
    stream = stream_key(seed, 0, key, step)
    uniforms = uniform_reference(stream, np.arange(2 * rank * cols, dtype=np.uint64))
    u1, u2 = uniforms[0::2], uniforms[1::2]
    # 1 - u lies in (0, 1]: the logarithm stays finite.
    normal = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)
    return normal.reshape(rank, cols).astype(dtype)


def orthogonalize(rows: Any) -> None:
    """Orthonormalise the rows of ``rows`` (``r x n``, C-contiguous) in place: Gram-Schmidt
    with one re-orthogonalisation pass ("twice is enough", Giraud et al., Numer. Math.
    2005).

    PyTorch's hook runs one Gram-Schmidt pass for ``r <= 2`` and QR above.  One pass
    loses orthogonality when ``P`` is (nearly) rank-deficient, as the gradient of a layer
    is when its rank is below ``r``: the next row is then rounding noise with an O(1)
    component along the previous ones, and ``P P^T M`` would no longer reproduce ``M``.
    The second pass removes it, so the result is orthonormal to working precision
    whatever the rank.  Element-wise operations and sums only (no BLAS reduction whose
    order could depend on threads), so the result depends on the input bits alone and
    every rank computes the same factors.  An all-zero row stays zero.
    """
    xp = array_module(rows)
    for i in range(rows.shape[0]):
        row = rows[i]
        if i:
            done = rows[:i]
            for _ in range(2):
                row -= xp.sum(xp.sum(done * row, axis=1, keepdims=True) * done, axis=0)
        norm = xp.sqrt(xp.sum(row * row))
        if float(norm) > 0.0:
            row /= norm
