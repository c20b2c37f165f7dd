"""DGC (Lin et al., ICLR 2018): the update equations against a NumPy reference, bit for
bit; conservation; masking; clipping; snapshot/restore; state round trip; errors;
the optimizer-momentum rule of :func:`sparcomm.dgc.check_setup`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparcomm import DGC, QSGD, ErrorFeedback, NoCompression, OneBit, PowerSGD, TernGrad, TopK
from sparcomm.dgc import check_setup

N = 64


def _reference_top_k(v: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest |v|, lowest index first among ties (TopK's rule), sorted."""
    order = np.argsort(-np.abs(v), kind="stable")[:k]
    return np.sort(order)


def _reference(gradients, *, k, momentum, masking, clip_norm=None, world_size=1):
    """Plain NumPy DGC: the sent dense vectors, and the final u and v."""
    u = np.zeros_like(gradients[0])
    v = np.zeros_like(gradients[0])
    sent = []
    for g in gradients:
        if clip_norm is not None:
            threshold = clip_norm / math.sqrt(world_size)
            norm = math.sqrt(float(g @ g))
            if norm > threshold:
                g = g * (threshold / norm)
        u = momentum * u + g
        v = v + u
        chosen = _reference_top_k(v, k)
        out = np.zeros_like(v)
        out[chosen] = v[chosen]
        sent.append(out)
        v[chosen] = 0
        if masking:
            u[chosen] = 0
    return sent, u, v


def _same(a, b) -> bool:
    """Whether two payloads are the same bytes."""
    return np.array_equal(a.to_bytes(), b.to_bytes())


def _run(dgc, gradients, key="w"):
    return [dgc.decode(dgc.encode(g, key=key, step=step)) for step, g in enumerate(gradients)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("momentum", "masking", "clip_norm"),
    [(0.9, True, None), (0.9, False, None), (0.5, True, 2.0), (0.0, False, 1.5)],
)
def test_matches_the_numpy_reference_bit_for_bit(rng, dtype, momentum, masking, clip_norm):
    gradients = [rng.standard_normal(N).astype(dtype) for _ in range(6)]
    dgc = DGC(TopK(k=5), momentum=momentum, masking=masking, clip_norm=clip_norm, world_size=4)
    sent = _run(dgc, gradients)
    expected, u, v = _reference(
        gradients, k=5, momentum=momentum, masking=masking, clip_norm=clip_norm, world_size=4
    )
    for got, want in zip(sent, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(dgc.residual("w"), v)
    np.testing.assert_array_equal(dgc.momentum_buffer("w"), u)
    assert dgc.residual("w").dtype == dtype and dgc.momentum_buffer("w").dtype == dtype


def test_without_momentum_masking_or_clipping_it_is_error_feedback(rng):
    gradients = [rng.standard_normal(N).astype(np.float32) for _ in range(5)]
    dgc = DGC(TopK(density=0.1), momentum=0.0, masking=False)
    ef = ErrorFeedback(TopK(density=0.1))
    for step, g in enumerate(gradients):
        a, b = dgc.encode(g, key="w", step=step), ef.encode(g, key="w", step=step)
        assert _same(a, b)
    np.testing.assert_array_equal(dgc.residual("w"), ef.residual("w"))


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(
        arrays(np.float32, 37, elements=st.floats(-1e4, 1e4, width=32)), min_size=1, max_size=5
    ),
    k=st.integers(0, 37),
    masking=st.booleans(),
)
def test_conservation_sent_plus_kept_is_old_accumulation_plus_velocity(steps, k, masking):
    # Nothing is lost: v_old + u (what step 3 accumulates) == decode(payload) + v_new,
    # bit for bit, whatever the masking does to u afterwards.
    dgc = DGC(TopK(k=k), momentum=0.75, masking=masking)
    v = np.zeros(37, np.float32)
    u = np.zeros(37, np.float32)
    for x in steps:
        velocity = np.float32(0.75) * u + x
        accumulated = v + velocity
        decoded = dgc.decode(dgc.encode(x, key="w"))
        v, u = dgc.residual("w"), dgc.momentum_buffer("w")
        np.testing.assert_array_equal(decoded + v, accumulated)
        sent = np.flatnonzero(decoded)
        if masking:
            assert not u[sent].any()
        else:
            np.testing.assert_array_equal(u, velocity)


def test_masking_clears_velocity_exactly_at_the_sent_coordinates(rng):
    g = rng.standard_normal(N)
    dgc = DGC(TopK(k=7), momentum=0.9, masking=True)
    payload = dgc.encode(g, key="w")
    sent = payload.arrays["indices"]
    u = dgc.momentum_buffer("w")
    assert not u[sent].any()
    others = np.setdiff1d(np.arange(N), sent)
    np.testing.assert_array_equal(u[others], g[others])
    np.testing.assert_array_equal(dgc.residual("w")[others], g[others])


@pytest.mark.parametrize("world_size", [1, 4, 9])
def test_clipping_bounds_each_gradient_at_clip_norm_over_sqrt_p(rng, world_size):
    clip_norm = 3.0
    threshold = clip_norm / math.sqrt(world_size)
    assert DGC(TopK(k=1), clip_norm=clip_norm, world_size=world_size).clip_threshold() == threshold
    large = rng.standard_normal(N) * 10 * threshold  # norm ~ 80 x threshold
    dgc = DGC(TopK(k=N), momentum=0.0, clip_norm=clip_norm, world_size=world_size)
    sent = dgc.decode(dgc.encode(large, key="w"))  # k = n: everything is sent
    assert np.linalg.norm(sent) == pytest.approx(threshold, rel=1e-12)
    np.testing.assert_allclose(sent, large * (threshold / np.linalg.norm(large)), rtol=1e-15)
    small = large * (0.5 * threshold / np.linalg.norm(large))
    np.testing.assert_array_equal(dgc.decode(dgc.encode(small, key="s")), small)


def test_clipping_size_comes_from_check_setup():
    class Comm:
        def Get_size(self):  # noqa: N802 - mpi4py's name
            return 16

    dgc = DGC(TopK(k=1), clip_norm=8.0)
    check_setup(dgc, comm=Comm())
    assert dgc.clip_threshold() == 2.0
    with pytest.raises(ValueError, match="world_size=4, but the collective runs on 16 ranks"):
        check_setup(DGC(TopK(k=1), clip_norm=1.0, world_size=4), comm=Comm())


def test_failed_encode_leaves_velocity_and_accumulation_unchanged(rng):
    dgc = DGC(TopK(k=3), momentum=0.9)
    dgc.encode(rng.standard_normal(N), key="w")
    u, v = dgc.momentum_buffer("w").copy(), dgc.residual("w").copy()
    bad = rng.standard_normal(N)
    bad[5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        dgc.encode(bad, key="w")
    np.testing.assert_array_equal(dgc.momentum_buffer("w"), u)
    np.testing.assert_array_equal(dgc.residual("w"), v)


@pytest.mark.parametrize("make", [lambda: TopK(k=4), lambda: TopK(density=0.2)])
def test_snapshot_restore_undoes_one_step(rng, make):
    gradients = [rng.standard_normal(N) for _ in range(4)]
    reference = DGC(make(), momentum=0.9)
    dgc = DGC(make(), momentum=0.9)
    for step in range(2):
        reference.encode(gradients[step], key="w")
        dgc.encode(gradients[step], key="w")
    handle = dgc.snapshot()
    dgc.encode(gradients[2], key="w")  # an abandoned step ...
    dgc.encode(gradients[2], key="new")  # ... that also saw a new key
    dgc.restore(handle)
    assert dgc.momentum_buffer("new") is None and dgc.residual("new") is None
    for step in (2, 3):
        a = reference.encode(gradients[step], key="w")
        b = dgc.encode(gradients[step], key="w")
        assert _same(a, b)
    np.testing.assert_array_equal(reference.momentum_buffer("w"), dgc.momentum_buffer("w"))
    handle = dgc.snapshot()
    dgc.encode(gradients[0], key="w")
    dgc.encode(gradients[1], key="w")  # twice: the old u and v were overwritten
    with pytest.raises(RuntimeError, match="more than once"):
        dgc.restore(handle)


@pytest.mark.parametrize("as_lists", [False, True])
def test_state_dict_round_trip_resumes_bit_exactly(rng, as_lists):
    gradients = [rng.standard_normal(N).astype(np.float32) for _ in range(6)]
    a = DGC(TopK(k=6), momentum=0.9, clip_norm=4.0, world_size=2)
    for step in range(3):
        a.encode(gradients[step], key="w", step=step)
        a.encode(gradients[step][:10], key=("b", 1), step=step)
    state = a.state_dict()
    if as_lists:  # as after JSON: lists plus the saved dtypes
        state = dict(
            state,
            residuals={k: v.tolist() for k, v in state["residuals"].items()},
            momenta={k: v.tolist() for k, v in state["momenta"].items()},
        )
    b = DGC(TopK(k=6), momentum=0.9, clip_norm=4.0, world_size=2)
    b.load_state_dict(state)
    for step in range(3, 6):
        for key, g in (("w", gradients[step]), (("b", 1), gradients[step][:10])):
            assert _same(a.encode(g, key=key, step=step), b.encode(g, key=key, step=step))
    for key in ("w", ("b", 1)):
        np.testing.assert_array_equal(a.residual(key), b.residual(key))
        np.testing.assert_array_equal(a.momentum_buffer(key), b.momentum_buffer(key))
        assert b.momentum_buffer(key).dtype == np.float32


def test_state_loads_only_into_the_same_wrapper(rng):
    dgc = DGC(TopK(k=2), momentum=0.9)
    dgc.encode(rng.standard_normal(N), key="w")
    with pytest.raises(ValueError, match=r"saved from DGC\(TopK\(k=2\), momentum=0.9"):
        ErrorFeedback(TopK(k=2)).load_state_dict(dgc.state_dict())
    with pytest.raises(ValueError, match="this is DGC"):
        DGC(TopK(k=2), momentum=0.5).load_state_dict(dgc.state_dict())
    ef = ErrorFeedback(TopK(k=2))
    ef.encode(rng.standard_normal(N), key="w")
    with pytest.raises(ValueError, match=r"saved from TopK\(k=2\)"):
        DGC(TopK(k=2)).load_state_dict(ef.state_dict())
    state = dgc.state_dict()
    with pytest.raises(ValueError, match="has no 'momenta'"):
        DGC(TopK(k=2)).load_state_dict({k: v for k, v in state.items() if k != "momenta"})
    with pytest.raises(ValueError, match="momentum for key 'x' but no residual"):
        DGC(TopK(k=2)).load_state_dict(dict(state, momenta={"x": np.zeros(N, np.float64)}))
    with pytest.raises(ValueError, match="momentum for key 'w' is 3 x float64"):
        DGC(TopK(k=2)).load_state_dict(dict(state, momenta={"w": np.zeros(3)}))
    with pytest.raises(TypeError, match=r"state\['momenta'\] must be a dict"):
        DGC(TopK(k=2)).load_state_dict(dict(state, momenta=[1.0]))
    target = DGC(TopK(k=2))
    with pytest.raises(ValueError):
        target.load_state_dict(dict(state, momenta={"w": np.zeros(3)}))
    assert target.keys() == []  # atomic: nothing was installed


def test_a_residual_dropped_from_outside_drops_its_velocity(rng):
    # GradientReducer's warm-up removes the residuals of its own key directly; the
    # velocity left behind is stale: not used, not saved.
    dgc = DGC(TopK(k=2), momentum=0.9)
    g = rng.standard_normal(N)
    dgc.encode(g, key="warm")
    dgc._residuals.pop("warm")
    dgc._scratch.pop("warm", None)
    assert "warm" not in dgc.state_dict()["momenta"]
    assert dgc.momentum_buffer("warm") is None
    fresh = DGC(TopK(k=2), momentum=0.9)
    assert _same(dgc.encode(g, key="warm"), fresh.encode(g, key="warm"))
    dgc.set_residual("warm", None)
    assert dgc.momentum_buffer("warm") is None and "warm" not in dgc._momenta


def test_a_key_changing_size_is_refused(rng):
    dgc = DGC(TopK(k=2))
    dgc.encode(rng.standard_normal(N), key="w")
    with pytest.raises(ValueError, match="give every tensor its own key"):
        dgc.encode(rng.standard_normal(N + 1), key="w")


def test_to_device_numpy_keeps_the_state(rng):
    dgc = DGC(TopK(k=2))
    dgc.encode(rng.standard_normal(N), key="w")
    u, v = dgc.momentum_buffer("w").copy(), dgc.residual("w").copy()
    dgc.to_device(np)
    np.testing.assert_array_equal(dgc.momentum_buffer("w"), u)
    np.testing.assert_array_equal(dgc.residual("w"), v)


def test_repr_and_codec_questions():
    dgc = DGC(TopK(density=0.01))
    # Measured defaults: momentum correction on, masking and clipping off.
    assert repr(dgc) == "DGC(TopK(density=0.01), momentum=0.9, masking=False, clip_norm=None)"
    assert "world_size=3" in repr(DGC(TopK(k=1), clip_norm=1.0, world_size=3))
    assert dgc.family == "sparse" and dgc.is_sparse and not dgc.is_unbiased
    assert dgc.encoded_nbytes(1000) == TopK(density=0.01).encoded_nbytes(1000)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"momentum": 1.0}, ValueError, r"momentum must be in \[0, 1\), got 1.0"),
        ({"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\), got -0.1"),
        ({"momentum": "0.9"}, TypeError, "momentum must be a float .* got str"),
        ({"momentum": True}, TypeError, "momentum must be a float .* got bool"),
        ({"masking": 1}, TypeError, "masking must be a bool, got int"),
        ({"clip_norm": 0.0}, ValueError, "clip_norm must be > 0 and finite .* got 0.0"),
        ({"clip_norm": -1}, ValueError, "clip_norm must be > 0 and finite .* got -1"),
        ({"clip_norm": math.inf}, ValueError, "clip_norm must be > 0 and finite .* got inf"),
        ({"clip_norm": math.nan}, ValueError, "clip_norm must be > 0 and finite .* got nan"),
        ({"clip_norm": "1"}, TypeError, "clip_norm must be a float"),
        ({"world_size": 0}, ValueError, "world_size must be >= 1, got 0"),
        ({"world_size": 2.0}, TypeError, "world_size must be an int .* got float"),
    ],
)
def test_bad_options_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        DGC(TopK(k=1), **kwargs)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: QSGD(), NotImplementedError, "sparse family .* got QSGD.*family 'quantized'"),
        (lambda: TernGrad(), NotImplementedError, "family 'quantized'"),
        (lambda: NoCompression(), NotImplementedError, "family 'dense'"),
        (lambda: PowerSGD(rank=1, error_feedback=False), NotImplementedError, "'low-rank'"),
        (lambda: OneBit(), ValueError, "keeps its own error feedback"),
        (lambda: ErrorFeedback(TopK(k=1)), TypeError, "already wrapped in ErrorFeedback"),
        (lambda: DGC(TopK(k=1)), TypeError, "already wrapped in DGC"),
        (lambda: "topk", TypeError, "codec must be a sparcomm codec .* got str"),
    ],
)
def test_bad_codecs_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        DGC(make())


def test_error_feedback_refuses_to_wrap_dgc():
    with pytest.raises(TypeError, match="already wrapped in DGC; wrap it only once"):
        ErrorFeedback(DGC(TopK(k=1)))


class _Optimizer:
    def __init__(self, *groups):
        self.param_groups = list(groups)


def test_check_setup_refuses_optimizer_momentum_under_momentum_correction():
    dgc = DGC(TopK(k=1), momentum=0.9)
    check_setup(dgc, optimizer=_Optimizer({"lr": 0.1, "momentum": 0}))
    with pytest.raises(ValueError, match=r"group 1 applies momentum too \(momentum=0.9\)"):
        check_setup(dgc, optimizer=_Optimizer({"momentum": 0}, {"momentum": 0.9}))
    with pytest.raises(ValueError, match=r"betas\[0\]=0.9.* betas\[0\]=0"):
        check_setup(dgc, optimizer=_Optimizer({"betas": (0.9, 0.999)}))
    check_setup(dgc, optimizer=_Optimizer({"betas": (0.0, 0.999)}))
    # momentum 0 (clipping only) and plain codecs: nothing to check
    check_setup(DGC(TopK(k=1), momentum=0.0), optimizer=_Optimizer({"momentum": 0.9}))
    check_setup(ErrorFeedback(TopK(k=1)), optimizer=_Optimizer({"momentum": 0.9}))
    check_setup(TopK(k=1), optimizer=_Optimizer({"momentum": 0.9}))


def test_check_setup_with_a_torch_optimizer():
    torch = pytest.importorskip("torch")
    parameter = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="construct the optimizer with momentum=0"):
        check_setup(DGC(TopK(k=1)), optimizer=torch.optim.SGD([parameter], lr=0.1, momentum=0.9))
    check_setup(DGC(TopK(k=1)), optimizer=torch.optim.SGD([parameter], lr=0.1))


def test_clipping_a_float32_gradient_whose_sum_of_squares_overflows():
    # 1e20 squared overflows float32: the norm is taken in float64 instead of scaling the
    # gradient to zero.
    g = np.full(16, 1e20, np.float32)
    dgc = DGC(TopK(k=16), momentum=0.0, clip_norm=4.0, world_size=1)
    sent = dgc.decode(dgc.encode(g, key="w"))
    np.testing.assert_allclose(sent, np.full(16, 1.0, np.float32), rtol=1e-6)
