"""PowerSGD as a codec at one process: exact on low-rank inputs, error-feedback
conservation, warm start converging like subspace iteration, bit-exact resume, the
payload, and every refusal.  The collective is tested in tests/mpi/test_powersgd_collective.py."""

from __future__ import annotations

import numpy as np
import pytest

from sparcomm import ErrorFeedback, Payload, PowerSGD
from sparcomm.codecs.powersgd import initial_q, matrix_shape, orthogonalize

DTYPES = [np.float32, np.float64]


def _low_rank(rng, rows, cols, k, dtype, condition=10.0):
    """``U diag(s) V^T`` with orthonormal U, V and singular values from 1 down to
    ``1 / condition``: rank k, condition number ``condition``."""
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    s = np.geomspace(1.0, 1.0 / condition, k)
    return ((u * s) @ v.T).astype(dtype)


def _projection_tolerance(m, q, dtype, k):
    """Bound on ``||P P^T M - M||_F`` when rank(M) <= r (so ``P = M Q`` spans col(M)).

    Orthogonalising ``P`` (twice-is-enough Gram-Schmidt) finds its span to a relative
    accuracy of about ``eps * cond(P)``; each product adds ``eps * sqrt(length)`` per
    entry.  So ``||error||_F <= eps cond(P) sqrt(n + m) ||M||_F`` (measured: at most
    0.15 of it).  ``cond(P)`` is computed from the codec's own initial Q (orthonormalised,
    as the codec does) over P's k = rank(M) nonzero singular values.
    """
    eps = np.finfo(dtype).eps
    qt = q.astype(np.float64)
    orthogonalize(qt)
    p = m.astype(np.float64) @ qt.T
    s = np.linalg.svd(p, compute_uv=False)
    s = s[:k]
    return eps * (s[0] / s[-1]) * np.sqrt(sum(m.shape)) * np.linalg.norm(m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "rank", "k"), [((64, 48), 2, 2), ((80, 60), 4, 1), ((30, 20, 3), 3, 3)]
)
def test_exact_when_the_rank_is_at_most_r(dtype, shape, rank, k):
    rng = np.random.default_rng(7)
    rows, cols = matrix_shape(shape)
    m = _low_rank(rng, rows, cols, k, dtype)
    codec = PowerSGD(rank=rank, error_feedback=False)
    decoded = codec.decode(codec.encode(m.reshape(shape), key="w"))
    assert decoded.shape == shape and decoded.dtype == dtype
    q = initial_q(0, "w", 0, rank, cols, dtype)
    error = np.linalg.norm(decoded.reshape(rows, cols).astype(np.float64) - m)
    assert error <= _projection_tolerance(m, q, dtype, k)


def test_the_exactness_tolerance_is_not_vacuous():
    # A rank-3 input at r = 2 cannot be reproduced: the error is the size of the lost
    # singular value, far above the tolerance of the exact case.
    rng = np.random.default_rng(1)
    m = _low_rank(rng, 64, 48, 3, np.float64, condition=2.0)
    codec = PowerSGD(rank=2, error_feedback=False)
    error = np.linalg.norm(codec.decode(codec.encode(m, key="w")) - m)
    assert error > 0.4  # at least the smallest singular value, 0.5, in part
    assert error > 1e6 * _projection_tolerance(m, initial_q(0, "w", 0, 2, 48, m.dtype), m.dtype, 2)


def test_zero_gradient_gives_zero_not_nan():
    codec = PowerSGD(rank=2)
    out = codec.decode(codec.encode(np.zeros((32, 16)), key="z"))
    assert np.array_equal(out, np.zeros((32, 16)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_error_feedback_conservation(dtype):
    # compensated = x + e_old is one rounding; e_new = compensated - out is another:
    # |x + e_old - out - e_new| <= eps (|x + e_old| + |e_new|) element-wise.
    rng = np.random.default_rng(3)
    codec = PowerSGD(rank=1)
    eps = np.finfo(dtype).eps
    old = np.zeros(24 * 40)
    for _ in range(6):
        x = rng.standard_normal((24, 40)).astype(dtype)
        out = codec.decode(codec.encode(x, key="w"))
        new = codec.residual("w")
        assert new.dtype == dtype and new.shape == (24 * 40,)
        came_in = x.reshape(-1).astype(np.float64) + old
        gone = out.reshape(-1).astype(np.float64) + new
        assert np.all(np.abs(came_in - gone) <= eps * (np.abs(came_in) + np.abs(new)))
        assert np.linalg.norm(new) > 0.1 * np.linalg.norm(x)  # rank 1 of 24: much is kept
        old = new.astype(np.float64)


def test_warm_start_converges_like_subspace_iteration():
    # On a fixed matrix without error feedback, warm start is subspace iteration: the
    # error of step t approaches the best rank-r error sqrt(sum_{i>r} s_i^2), and the
    # excess shrinks like (s_{r+1} / s_r)^(2t).  Singular values 1, 0.5 | 0.05, 0.01:
    # ratio 0.1, so after 4 steps the excess is below 1e-8 of the best error.
    rng = np.random.default_rng(5)
    u, _ = np.linalg.qr(rng.standard_normal((50, 4)))
    v, _ = np.linalg.qr(rng.standard_normal((40, 4)))
    s = np.array([1.0, 0.5, 0.05, 0.01])
    m = (u * s) @ v.T
    best = np.sqrt(np.sum(s[2:] ** 2))
    warm, cold = (
        PowerSGD(rank=2, error_feedback=False),
        PowerSGD(rank=2, error_feedback=False, warm_start=False),
    )
    for _ in range(4):
        warm_error = np.linalg.norm(warm.decode(warm.encode(m, key="w")) - m)
        cold_error = np.linalg.norm(cold.decode(cold.encode(m, key="w")) - m)
    assert warm_error - best <= 1e-8 * best
    assert cold_error - best > 1e-6 * best  # a fresh random start every step does not converge


def test_one_dimensional_and_incompressible_tensors_travel_dense():
    codec = PowerSGD(rank=4)
    rng = np.random.default_rng(0)
    for shape in [(100,), (6, 5), (8, 3)]:  # (6 + 5) * 4 * 2 >= 30: no saving
        x = rng.standard_normal(shape)
        assert codec.layout(shape)[2] == 0
        payload = codec.encode(x, key=str(shape))
        assert payload.arrays["q"].size == 0
        assert np.array_equal(codec.decode(payload), x)
    assert codec.residual("(100,)") is None


def test_layout_and_wire_bytes():
    codec = PowerSGD(rank=2)
    assert codec.layout((512, 3, 3, 3)) == (512, 27, 2)
    assert codec.factor_sizes((512, 27)) == (1024, 54)
    assert codec.wire_values((1000, 500)) == (1000 + 500) * 2
    x = np.ones((1000, 500), dtype=np.float32)
    payload = codec.encode(x, key=0)
    assert payload.nbytes == codec.encoded_nbytes(x.size, np.float32, shape=x.shape)
    assert payload.data_nbytes == 4 * (1000 + 500) * 2
    back = Payload.from_bytes(payload.to_bytes())
    assert np.array_equal(codec.decode(back), codec.decode(payload))
    assert (
        codec.encoded_nbytes(100)
        == Payload(
            7,
            100,
            np.dtype(np.float32),
            (100,),
            (100, 1, 0),
            {"p": np.ones(100, np.float32), "q": np.ones(0, np.float32)},
        ).nbytes
    )


def _run(codec, steps, rng_seed=11):
    rng = np.random.default_rng(rng_seed)
    outs = []
    for _ in range(steps):
        grads = {"a": rng.standard_normal((30, 20)), "b": rng.standard_normal((16, 3, 3))}
        outs.append({k: codec.decode(codec.encode(g, key=k)) for k, g in grads.items()})
    return outs


def test_state_dict_resumes_bit_exactly():
    whole = _run(PowerSGD(rank=2), 5)
    first = PowerSGD(rank=2)
    rng = np.random.default_rng(11)
    for _ in range(2):
        grads = {"a": rng.standard_normal((30, 20)), "b": rng.standard_normal((16, 3, 3))}
        for k, g in grads.items():
            first.decode(first.encode(g, key=k))
    state = first.state_dict()
    resumed = PowerSGD(rank=2)
    resumed.load_state_dict(state)
    for step in range(2, 5):
        grads = {"a": rng.standard_normal((30, 20)), "b": rng.standard_normal((16, 3, 3))}
        for k, g in grads.items():
            assert np.array_equal(resumed.decode(resumed.encode(g, key=k)), whole[step][k])
    # the saved state is a copy, unaffected by later steps
    assert state["residuals"]["a"] is not resumed.residual("a")


def test_state_of_other_parameters_is_refused():
    state = PowerSGD(rank=2).state_dict()
    with pytest.raises(ValueError, match="saved from PowerSGD\\(rank=2"):
        PowerSGD(rank=1).load_state_dict(state)
    with pytest.raises(ValueError, match="state must be a dict from PowerSGD.state_dict"):
        PowerSGD().load_state_dict({"residuals": {}})


def test_non_finite_input_is_refused_and_state_kept():
    codec = PowerSGD(rank=1)
    x = np.ones((20, 10))
    codec.encode(x, key="w")
    before = codec.state_dict()
    bad = x.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode(bad, key="w")
    after = codec.state_dict()
    assert np.array_equal(before["residuals"]["w"], after["residuals"]["w"])
    assert np.array_equal(before["q"]["w"], after["q"]["w"])


def test_a_key_keeps_its_shape():
    codec = PowerSGD()
    codec.encode(np.ones((20, 10)), key="w")
    with pytest.raises(ValueError, match="give every tensor its own key"):
        codec.encode(np.ones((10, 20)), key="w")


def test_initial_q_is_deterministic_and_key_dependent():
    a = initial_q(0, "w", 0, 2, 100, np.float64)
    assert np.array_equal(a, initial_q(0, "w", 0, 2, 100, np.float64))
    assert not np.array_equal(a, initial_q(0, "v", 0, 2, 100, np.float64))
    assert not np.array_equal(a, initial_q(1, "w", 0, 2, 100, np.float64))
    # standard normal: mean 0 and variance 1 within 5 standard errors (n = 200)
    assert abs(a.mean()) < 5 / np.sqrt(a.size)
    assert abs(a.var() - 1) < 5 * np.sqrt(2 / a.size)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, "rank must be in \\[1, inf\\], got 0"),
        ({"rank": 1.5}, TypeError, "rank must be an int"),
        ({"rank": True}, TypeError, "rank must be an int"),
        ({"min_compression_rate": 0.5}, ValueError, "min_compression_rate must be a finite"),
        ({"min_compression_rate": "2"}, TypeError, "min_compression_rate must be a number"),
        ({"warm_start": 1}, TypeError, "warm_start must be True or False"),
        ({"error_feedback": None}, TypeError, "error_feedback must be True or False"),
        ({"seed": -1}, ValueError, "seed must be in"),
    ],
)
def test_bad_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        PowerSGD(**kwargs)


def test_bad_calls():
    codec = PowerSGD()
    with pytest.raises(ValueError, match="pass shape="):
        codec.encoded_nbytes(100, np.float32, ndim=2)
    with pytest.raises(TypeError, match="float32 or float64"):
        codec.encode(np.ones((4, 4), dtype=np.int32))
    with pytest.raises(TypeError, match="takes no options"):
        codec.encode(np.ones((40, 40)), key=1, threshold=3)
    payload = PowerSGD(rank=2).encode(np.ones((40, 40)), key=1)
    with pytest.raises(ValueError, match="do not match"):
        codec.decode(payload)
    with pytest.raises(ValueError, match="keeps its own error feedback"):
        ErrorFeedback(PowerSGD())
    with pytest.raises(ValueError, match="accumulate must be"):
        codec.decode(codec.encode(np.ones((40, 40)), key=2), out=np.empty((40, 40)), accumulate=2)
