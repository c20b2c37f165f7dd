"""Schedules of a codec's level (sparcomm.schedule) and the ``schedule=`` option of
GradientReducer: values, the codecs' level hook, errors, resume, and convergence on
least-squares tasks (one rank; tests/mpi/test_schedule_policy.py runs several)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparcomm import (
    FP16,
    QSGD,
    Constant,
    ErrorFeedback,
    Exponential,
    Linear,
    NoCompression,
    PowerSGD,
    TopK,
)
from sparcomm.codecs.powersgd import initial_q
from sparcomm.schedule import Schedule, as_schedule

MPI = pytest.importorskip("mpi4py.MPI")
from sparcomm.reducer import GradientReducer  # noqa: E402


# -- the schedules ---------------------------------------------------------------------------
def test_constant_linear_exponential_values():
    assert [Constant(0.05)(s) for s in (0, 7, 10**6)] == [0.05] * 3
    linear = Linear(0.5, 0.1, 4)
    assert [linear(s) for s in range(6)] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1, 0.1])
    assert linear(4) == 0.1 and linear(10**9) == 0.1  # exactly end, held
    exponential = Exponential(0.25, 0.01, 100)
    assert exponential(0) == 0.25
    assert exponential(50) == pytest.approx(math.sqrt(0.25 * 0.01))  # geometric midpoint
    assert exponential(100) == 0.01 and exponential(5000) == 0.01
    ratios = [exponential(s + 1) / exponential(s) for s in range(99)]
    assert ratios == pytest.approx([(0.01 / 0.25) ** 0.01] * 99)  # a constant ratio
    assert repr(exponential) == "Exponential(start=0.25, end=0.01, steps=100)"


def test_callable_is_a_schedule_and_its_results_are_checked():
    def halve(step):
        return 0.5 if step < 3 else 0.25

    schedule = as_schedule(halve)
    assert isinstance(schedule, Schedule)
    assert [schedule(s) for s in range(5)] == [0.5, 0.5, 0.5, 0.25, 0.25]
    assert "halve" in repr(schedule) and "0x" not in repr(schedule)  # rank-independent
    with pytest.raises(TypeError, match="returned str"):
        as_schedule(lambda s: "0.1")(0)
    with pytest.raises(ValueError, match="expected finite"):
        as_schedule(lambda s: float("nan"))(0)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: Linear(0.1, 0.2, 0), ValueError, "steps must be >= 1"),
        (lambda: Linear(0.1, 0.2, 2.5), TypeError, "steps must be an int"),
        (lambda: Exponential(0.0, 0.1, 10), ValueError, "start > 0 and end > 0"),
        (lambda: Exponential(0.1, -1, 10), ValueError, "start > 0 and end > 0"),
        (lambda: Constant("0.1"), TypeError, "value must be a number"),
        (lambda: Constant(float("inf")), ValueError, "value must be finite"),
        (lambda: Linear(True, 0.1, 3), TypeError, "start must be a number"),
        (lambda: as_schedule(0.01), TypeError, r"Constant\(0.01\)"),
        (lambda: Constant(0.1)(-1), ValueError, "step must be an int >= 0"),
    ],
)
def test_schedule_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


# -- the codecs' level hook -------------------------------------------------------------------
def test_topk_level_is_density_or_k():
    codec = TopK(density=0.01)
    assert codec.level_parameter == "density"
    assert codec.set_level(0.25) == 0.25 and codec.density == 0.25 and codec.k_for(100) == 25
    built_with_k = TopK(k=10)
    assert built_with_k.level_parameter == "k"
    assert built_with_k.set_level(4.6) == 5 and built_with_k.k == 5  # rounded to nearest
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 1.5"):
        codec.set_level(1.5)
    with pytest.raises(ValueError, match="k must be in"):
        built_with_k.set_level(-2)


def test_powersgd_level_is_rank():
    codec = PowerSGD(rank=1)
    assert codec.level_parameter == "rank"
    assert codec.set_level(3.4) == 3 and codec.matrix_rank == 3 and codec.level == 3
    with pytest.raises(ValueError, match="rank must be in"):
        codec.set_level(0.3)
    with pytest.raises(TypeError, match="rank must be a number"):
        codec.set_level("2")


def test_powersgd_warm_start_across_rank_changes():
    """A lower rank keeps the leading rows of the warm-start Q; a higher one keeps them
    and draws the new rows from (seed, key, steps done); both runs agree bit for bit."""
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((24, 16)) for _ in range(5)]
    ranks = [2, 2, 4, 1, 3]

    def run():
        codec = PowerSGD(rank=2)
        qs, outs = [], []
        for x, rank in zip(xs, ranks, strict=True):
            codec.set_level(rank)
            if "w" in codec._q:
                qs.append(codec._q["w"].copy())
            outs.append(codec.decode(codec.encode(x, key="w")))
            assert codec._q["w"].shape == (rank, 16)
        return qs, outs

    qs, outs = run()
    again_qs, again_outs = run()
    for a, b in zip(outs + qs, again_outs + again_qs, strict=True):
        np.testing.assert_array_equal(a, b)
    # Rank 2 -> 4 at the third step: the start Q's new rows are those of the stream of
    # (seed 0, key "w", 2 steps done); orthogonalising [old rows; new rows] gives the
    # P of that step, which we recompute here.
    codec = PowerSGD(rank=2)
    for x in xs[:2]:
        codec.encode(x, key="w")
    old_q, residual = codec._q["w"].copy(), codec.residual("w").copy()
    expected_start = np.vstack([old_q, initial_q(0, "w", 2, 4, 16, np.float64)[2:]])
    codec.set_level(4)
    work = codec.start(xs[2], "w", np.empty(4 * 24), np.empty(4 * 16))
    from sparcomm.codecs.powersgd import orthogonalize

    orthogonalize(expected_start)
    np.testing.assert_array_equal(work.q, expected_start)
    np.testing.assert_array_equal(work.p, expected_start @ (xs[2] + residual.reshape(24, 16)).T)


def test_powersgd_rank_that_stops_compressing_sends_the_residual():
    """Raising the rank until a matrix travels dense sends its residual with it:
    conservation holds across the change (sent + kept == what came in)."""
    rng = np.random.default_rng(4)
    codec = PowerSGD(rank=1)
    x1, x2 = rng.standard_normal((12, 10)), rng.standard_normal((12, 10))
    sent1 = codec.decode(codec.encode(x1, key="m"))
    residual = codec.residual("m").reshape(12, 10).copy()
    np.testing.assert_allclose(sent1 + residual, x1, rtol=0, atol=1e-12)
    codec.set_level(8)  # (12 + 10) * 8 * 2 >= 120: dense
    assert codec.layout((12, 10))[2] == 0
    sent2 = codec.decode(codec.encode(x2, key="m"))
    np.testing.assert_array_equal(sent2, x2 + residual)
    assert codec.residual("m") is None


# -- the reducer's option ---------------------------------------------------------------------
SHAPES = {"w": (60, 50), "b": (50,)}


def _grads(step, dtype=np.float64):
    rng = np.random.default_rng(100 + step)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}


def test_levels_follow_the_step_counter_after_warm_up():
    schedule = Exponential(0.25, 0.01, 4)
    with GradientReducer(
        ErrorFeedback(TopK(density=0.01)), dense_below=100, warmup_steps=2, schedule=schedule
    ) as reducer:
        seen = []
        for step in range(7):
            reducer.reduce(_grads(step))
            seen.append(reducer.last_stats.levels)
    assert seen[:2] == [{}, {}]  # dense warm-up
    assert seen[2:] == [{"density": schedule(s)} for s in range(2, 7)]
    assert seen[-1] == {"density": 0.01}


def test_levels_are_reported_without_a_schedule_too():
    with GradientReducer(PowerSGD(rank=2), dense_below=100) as reducer:
        reducer.reduce(_grads(0))
        assert reducer.last_stats.levels == {"rank": 2}


def test_topk_built_with_k_schedules_k():
    codec = ErrorFeedback(TopK(k=5))
    with GradientReducer(codec, dense_below=100, schedule=Linear(30, 10, 2)) as r:
        r.reduce(_grads(0))
        assert r.last_stats.levels == {"k": 30}
        r.reduce(_grads(1))
        assert r.last_stats.levels == {"k": 20}


def test_dgc_density_warm_up():
    """DGC's own recipe: momentum correction with an exponential density warm-up (the
    schedule reaches the TopK inside DGC; its momenta and residuals stay keyed by name)."""
    from sparcomm import DGC

    codec = DGC(TopK(density=0.01), momentum=0.9)
    with GradientReducer(codec, dense_below=100, schedule=Exponential(0.25, 0.01, 3)) as r:
        for step in range(4):
            r.reduce(_grads(step))
            assert r.last_stats.levels == {"density": Exponential(0.25, 0.01, 3)(step)}
        assert codec.codec.density == 0.01 and set(codec.keys()) == {"w"}


@pytest.mark.parametrize("codec", [QSGD(bits=4), FP16(), NoCompression()], ids=repr)
def test_codecs_without_a_level_refuse_a_schedule(codec):
    with pytest.raises(NotImplementedError, match=r"takes none.*TopK.*PowerSGD"):
        GradientReducer(codec, schedule=Constant(0.1))


def test_schedule_errors_at_construction():
    topk = ErrorFeedback(TopK(density=0.01))
    with pytest.raises(ValueError, match=r"takes level 2.0: density must be in \(0, 1\]"):
        GradientReducer(topk, schedule=Linear(2.0, 0.01, 10))
    with pytest.raises(ValueError, match="takes level 0.0: rank must be in"):
        GradientReducer(PowerSGD(rank=1), schedule=Linear(0.0, 4, 10))
    with pytest.raises(TypeError, match="schedule must be a sparcomm schedule"):
        GradientReducer(topk, schedule="exponential")
    with pytest.raises(ValueError, match="sets 'rank', but no codec"):
        GradientReducer(topk, schedule={"rank": Constant(2)})
    assert topk.codec.density == 0.01  # the probes ran on a copy


def test_a_callable_that_fails_later_raises_at_that_step():
    def schedule(step):
        return 0.1 if step < 1 else 2.0  # an invalid density from step 1

    with GradientReducer(ErrorFeedback(TopK(density=0.1)), dense_below=100, schedule=schedule) as r:
        r.reduce(_grads(0))
        with pytest.raises(ValueError, match="density must be in"):
            r.reduce(_grads(1))
        assert not r.in_flight  # nothing started: the step can be retried


def test_resume_mid_schedule_is_bit_exact():
    def make(codec):
        return GradientReducer(codec, dense_below=100, warmup_steps=1, schedule=schedule)

    schedule = Exponential(0.3, 0.02, 5)
    with make(ErrorFeedback(TopK(density=0.01))) as reducer:
        expected = [reducer.reduce(_grads(s)) for s in range(6)]
    with make(ErrorFeedback(TopK(density=0.01))) as reducer:
        for s in range(3):
            reducer.reduce(_grads(s))
        state = reducer.state_dict()
    assert state["levels"] == [schedule(2)] and state["step"] == 3
    with make(ErrorFeedback(TopK(density=0.01))) as resumed:
        resumed.load_state_dict(state)
        assert resumed.codec.codec.density == schedule(2)
        for s in range(3, 6):
            got = resumed.reduce(_grads(s))
            for name in SHAPES:
                np.testing.assert_array_equal(got[name], expected[s][name])


def test_resume_with_a_rank_schedule_is_bit_exact():
    schedule = Linear(1, 4, 4)
    with GradientReducer(PowerSGD(rank=1), dense_below=100, schedule=schedule) as reducer:
        expected = [reducer.reduce(_grads(s)) for s in range(6)]
    with GradientReducer(PowerSGD(rank=1), dense_below=100, schedule=schedule) as reducer:
        for s in range(2):
            reducer.reduce(_grads(s))
        state = reducer.state_dict()
    with GradientReducer(PowerSGD(rank=1), dense_below=100, schedule=schedule) as resumed:
        resumed.load_state_dict(state)
        for s in range(2, 6):
            np.testing.assert_array_equal(resumed.reduce(_grads(s))["w"], expected[s]["w"])


def test_a_refused_state_leaves_the_levels_as_they_were():
    with GradientReducer(ErrorFeedback(TopK(density=0.01)), schedule=Constant(0.2)) as reducer:
        reducer.reduce(_grads(0))
        state = reducer.state_dict()
        state["codec_state"] = {**state["codec_state"], "codec": "TopK(density=0.5)"}
        with pytest.raises(ValueError):
            reducer.load_state_dict(state)
        assert reducer.codec.codec.density == 0.2
        with pytest.raises(ValueError, match=r"refuses it: density must be in \(0, 1\]"):
            reducer.load_state_dict({**reducer.state_dict(), "levels": [3.0]})
        assert reducer.codec.codec.density == 0.2


def test_agreed_layouts_of_old_levels_are_dropped():
    """A schedule that never repeats a level must not grow the collectives' cache."""
    from sparcomm.comm._context import comm_state

    with GradientReducer(
        ErrorFeedback(TopK(density=0.01)),
        dense_below=100,
        schedule=lambda s: 0.3 / (1 + s),
    ) as reducer:
        for step in range(8):
            reducer.reduce(_grads(step))
        layouts = list(comm_state(reducer.comm).agreed)
    compressed = [layout for layout in layouts if layout[1] is True and layout[2] >= 0]
    assert compressed and {layout[3] for layout in compressed} == {0.3 / 8}


# -- convergence on least squares -------------------------------------------------------------
# min_w 0.5 ||A w - b||^2 with b = A w* (optimum 0), A with nearly orthonormal columns
# (condition number ~2), so a few dozen steps suffice.  Error feedback with a compressor
# that keeps a fraction delta of the gradient is stable at step size eta = delta / L (the
# step-size scaling of the error-feedback analyses: Stich, Cordonnier, Jaggi, NeurIPS
# 2018; Karimireddy et al., ICML 2019), and then contracts the loss at least as fast as
# gradient descent at that step: f_T <= (1 - eta mu)^T f_0, with mu, L the extreme
# eigenvalues of A^T A and delta the smallest level the schedule takes.  That is the
# tolerance; a schedule applied wrongly (a level of 0, a diverging step) breaks it.
# The ramps are short: each new TopK level costs a timing of its encode in the cost
# model (sparcomm.comm._cost.local_seconds).
STEPS = 30


def _least_squares(rows, cols, rank=None, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, cols[0])) / np.sqrt(rows)
    if rank is None:
        target = rng.standard_normal(cols)
    else:  # a low-rank optimum: the gradient H (W - W*) keeps rank <= rank
        target = rng.standard_normal((cols[0], rank)) @ rng.standard_normal((rank, cols[1]))
    eigenvalues = np.linalg.eigvalsh(a.T @ a)
    return a, a @ target, eigenvalues[0], eigenvalues[-1]


@pytest.mark.parametrize(
    ("schedule", "smallest"),
    [
        (Constant(0.2), 0.2),
        (Linear(0.6, 0.1, 5), 0.1),
        (Exponential(0.5, 0.1, 5), 0.1),
        (lambda s: 0.4 if s < 5 else 0.1, 0.1),
    ],
    ids=["constant", "linear", "exponential", "callable"],
)
def test_topk_density_schedules_converge(schedule, smallest):
    a, b, mu, lipschitz = _least_squares(1000, (50,))
    eta = smallest / lipschitz
    w = np.zeros(50)

    def loss(w):
        return 0.5 * float(np.sum((a @ w - b) ** 2))

    initial = loss(w)
    with GradientReducer(
        ErrorFeedback(TopK(density=0.01)), dense_below=1, schedule=schedule, overlap=False
    ) as reducer:
        for _ in range(STEPS):
            w -= eta * reducer.reduce({"w": a.T @ (a @ w - b)})["w"]
    assert loss(w) <= (1 - eta * mu) ** STEPS * initial


@pytest.mark.parametrize(
    ("schedule", "smallest"),
    [(Constant(2), 2), (Linear(1, 4, 10), 1), (Exponential(4, 1, 10), 1), (Linear(2, 12, 20), 2)],
    ids=["constant", "linear", "exponential", "into-dense"],
)
def test_powersgd_rank_schedules_converge(schedule, smallest):
    """The optimum has rank 4, so the gradient has rank <= 4 and rank r keeps at least
    r/4 of it: delta = smallest rank / 4.  "into-dense": from rank 9 the 40 x 30 matrix
    travels dense (the residual goes with it)."""
    a, b, mu, lipschitz = _least_squares(1000, (40, 30), rank=4, seed=1)
    eta = min(smallest, 4) / 4 / lipschitz
    w = np.zeros((40, 30))

    def loss(w):
        return 0.5 * float(np.sum((a @ w - b) ** 2))

    initial = loss(w)
    with GradientReducer(PowerSGD(rank=1), dense_below=1, schedule=schedule, overlap=False) as r:
        for _ in range(STEPS):
            w -= eta * r.reduce({"w": a.T @ (a @ w - b)})["w"]
    assert loss(w) <= (1 - eta * mu) ** STEPS * initial
