"""PowerSGD's collective under MPI: equal to the algorithm run on the gathered inputs,
bitwise identical on every rank, exact on low-rank sums, batched (two allreduces for
any number of tensors), refusals on every rank, GradientReducer with several buckets and
a bit-exact resume, and convergence on a least-squares task.  Every body works at any
number of ranks; tests/test_mpi_ranks.py runs this directory at 2 to 5.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import AllreduceStats, ErrorFeedback, PowerSGD, allreduce  # noqa: E402
from sparcomm.codecs.powersgd import initial_q, orthogonalize  # noqa: E402
from sparcomm.comm._lowrank import powersgd_allreduce  # noqa: E402
from sparcomm.reducer import GradientReducer  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


def _same_on_all_ranks(arrays):
    root = COMM.bcast(arrays if RANK == 0 else None, root=0)
    for mine, first in zip(arrays, root, strict=True):
        assert np.array_equal(mine, first), "result differs between ranks"


def _reference_step(matrices, q, rank, mean=True):
    """PowerSGD's step 3-5 in float64 on every rank's matrix (gathered): the sum
    computed in one place, as the definition states it."""
    qt = q.astype(np.float64).copy()
    orthogonalize(qt)
    pt = sum(qt @ m.T for m in matrices)
    orthogonalize(pt)
    qt = sum(pt @ m for m in matrices) / len(matrices)
    out = pt.T @ qt
    return out if mean else out * len(matrices)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ["mean", "sum"])
def test_allreduce_equals_the_algorithm_on_gathered_inputs(dtype, op):
    rng = np.random.default_rng(100 + RANK)
    codec = PowerSGD(rank=2, error_feedback=False, warm_start=False)
    x = rng.standard_normal((40, 6, 5)).astype(dtype)
    stats = AllreduceStats()
    out = allreduce(x, codec=codec, op=op, key="w", stats=stats)
    _same_on_all_ranks([out])
    gathered = [g.reshape(40, 30).astype(np.float64) for g in COMM.allgather(x)]
    expected = _reference_step(gathered, initial_q(0, "w", 0, 2, 30, dtype), 2, op == "mean")
    eps = np.finfo(dtype).eps
    # Sums of SIZE terms in another order, and the orthogonalisation of those sums:
    # a relative error of a few hundred eps on these well-conditioned random inputs.
    scale = np.abs(expected).max()
    assert np.abs(out.reshape(40, 30) - expected).max() <= 500 * eps * SIZE * scale
    assert stats.algorithm == "powersgd" and stats.k == (40 + 30) * 2
    if SIZE > 1:  # two ring allreduces of k values each
        assert stats.bytes_sent >= 2 * (SIZE - 1) * stats.k * x.itemsize // SIZE


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_on_a_sum_of_rank_r(dtype):
    # Every rank's matrix has its columns in one k-dimensional space: the sum has rank
    # k <= r, so P spans it and P Q^T is the mean up to rounding (see the codec tests for
    # the tolerance: eps * cond(P) * sqrt(n + m) * ||M||; cond(P) <= 1e3 here).
    shared = np.random.default_rng(9).standard_normal((50, 2))
    mine = np.random.default_rng(RANK).standard_normal((2, 36))
    x = (shared @ mine).astype(dtype)
    codec = PowerSGD(rank=3)
    out = allreduce(x, codec=codec, op="mean", key="m")
    mean = sum(g.astype(np.float64) for g in COMM.allgather(x)) / SIZE
    tolerance = np.finfo(dtype).eps * 1e3 * np.sqrt(86) * np.linalg.norm(mean)
    assert np.linalg.norm(out - mean) <= tolerance
    _same_on_all_ranks([out])


def test_batched_call_equals_separate_calls_and_sends_two_allreduces():
    rng = np.random.default_rng(RANK)
    shapes = [(64, 32), (100,), (32, 8, 3), (7, 5), (48, 48)]
    steps = [[rng.standard_normal(s) for s in shapes] for _ in range(3)]
    keys = ["a", "b", "c", "d", "e"]
    batched, separate = PowerSGD(rank=2), PowerSGD(rank=2)
    stats = AllreduceStats()
    for arrays in steps:
        together = powersgd_allreduce(arrays, batched, keys, COMM, stats=stats)
        alone = [
            allreduce(a, codec=separate, key=k, op="mean")
            for a, k in zip(arrays, keys, strict=True)
        ]
        _same_on_all_ranks(together)
        for t, a in zip(together, alone, strict=True):
            # Same arithmetic per element; only MPI's summation order may differ between
            # one long buffer and short ones (a few eps after the orthogonalisation).
            np.testing.assert_allclose(t, a, rtol=1e-9, atol=1e-12)
    assert stats.k == sum(batched.wire_values(s) for s in shapes)
    phases = list(stats.phases)
    assert phases.count("allreduce_p") == 1 and phases.count("allreduce_q") == 1


def test_bad_input_on_one_rank_raises_on_every_rank():
    codec = PowerSGD(rank=1)
    x = np.ones((20, 10))
    allreduce(x, codec=codec, key="w")
    before = codec.state_dict()
    bad = x.copy()
    if RANK == SIZE - 1:
        bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite|rejected its input"):
        allreduce(bad, codec=codec, key="w")
    after = codec.state_dict()
    assert np.array_equal(before["residuals"]["w"], after["residuals"]["w"])
    # shapes that differ between ranks (same total size)
    odd = np.ones((10, 20)) if RANK == SIZE - 1 else np.ones((20, 10))
    if SIZE > 1:
        with pytest.raises(ValueError, match="shapes or keys"):
            allreduce(odd, codec=PowerSGD(), key="x")
    with pytest.raises(NotImplementedError, match="keeps its error feedback itself"):
        allreduce(x, codec=ErrorFeedback(PowerSGD(error_feedback=False)), key="w")
    with pytest.raises(ValueError, match="keys must be distinct"):
        powersgd_allreduce([x, x], PowerSGD(), ["k", "k"], COMM)
    with pytest.raises(ValueError, match="op must be one of"):
        powersgd_allreduce([x], PowerSGD(), ["k"], COMM, op="max")


SHAPES = {"w1": (64, 32), "b1": (32,), "w2": (32, 10), "b2": (10,), "emb": (500, 8), "w3": (96, 64)}


def _grads(step):
    rng = np.random.default_rng(1000 * step + RANK)
    return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}


def _reducer(**kwargs):
    return GradientReducer(PowerSGD(rank=2), fusion_threshold_bytes=20000, dense_below=64, **kwargs)


@pytest.mark.parametrize("overlap", [True, False])
def test_reducer_several_buckets_equals_the_collective(overlap):
    reducer = _reducer(overlap=overlap)
    reference = PowerSGD(rank=2)
    try:
        for step in range(3):
            grads = _grads(step)
            reduced = reducer.reduce(grads)
            _same_on_all_ranks([reduced[name] for name in SHAPES])
            stats = reducer.last_stats
            assert stats.buckets >= 3 and stats.compressed_buckets >= 2
            names = [n for n in SHAPES if int(np.prod(SHAPES[n])) >= 64]
            expected = powersgd_allreduce([grads[n] for n in names], reference, names, COMM)
            for name, value in zip(names, expected, strict=True):
                np.testing.assert_allclose(reduced[name], value, rtol=1e-9, atol=1e-12)
            for name in ("b2",):  # below dense_below: plain dense mean
                total = np.empty_like(grads[name])
                COMM.Allreduce(grads[name], total)
                np.testing.assert_allclose(reduced[name], total / SIZE, rtol=1e-12)
    finally:
        reducer.close()


def test_reducer_state_resumes_bit_exactly():
    first = _reducer()
    try:
        for step in range(2):
            first.reduce(_grads(step))
        state = first.state_dict()
        later = [first.reduce(_grads(step)) for step in (2, 3)]
    finally:
        first.close()
    second = _reducer()
    try:
        second.setup([(name, shape, np.float64) for name, shape in SHAPES.items()])
        second.load_state_dict(state)
        for step, expected in zip((2, 3), later, strict=True):
            got = second.reduce(_grads(step))
            for name in SHAPES:
                assert np.array_equal(got[name], expected[name]), name
    finally:
        second.close()


def _least_squares(seed, rank_of_w_star=None):
    """The same problem at every rank count: ``A`` (240 x 24) and ``W*`` (24 x 16) from
    a fixed seed, ``B = A W*``; rank ``w`` holds rows ``w, w + P, ...``.  Returns this
    rank's shard, ``W*`` and the Hessian's extreme eigenvalues (mu, L).  The shard
    gradients (``op="sum"``, divided by all 240 rows) sum to the full gradient, and
    PowerSGD is linear, so the iteration is the same at every P up to rounding."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((240, 24))
    if rank_of_w_star is None:
        w_star = rng.standard_normal((24, 16))
    else:
        w_star = rng.standard_normal((24, rank_of_w_star)) @ rng.standard_normal(
            (rank_of_w_star, 16)
        )
    eig = np.linalg.eigvalsh(a.T @ a / len(a))
    shard = a[RANK::SIZE]
    return shard, shard @ w_star, w_star, eig[0], eig[-1]


def _descend(codec, shard, b, lr, steps):
    w = np.zeros((shard.shape[1], b.shape[1]))
    for _ in range(steps):
        grad = shard.T @ (shard @ w - b) / 240
        w -= lr * allreduce(grad, codec=codec, op="sum", key="W")
    return w


def test_least_squares_converges_at_the_dense_rate_when_gradients_have_rank_r():
    """rank(W*) = r.  From W_0 = 0 every gradient ``H (W - W*)`` has its rows in row(W*)
    (by induction: each update does), so its rank is at most r and PowerSGD rank r sends
    it exactly: the iteration is gradient descent, whose error contracts by at most
    ``rho = 1 - mu / L`` per step at lr = 1 / L.  Tolerance: ``rho^T ||W*||`` plus a
    rounding floor of ``T * 1e3 * eps * ||W*||``.
    """
    shard, b, w_star, mu, big_l = _least_squares(42, rank_of_w_star=2)
    steps, rho = 60, 1.0 - mu / big_l
    w = _descend(PowerSGD(rank=2), shard, b, 1.0 / big_l, steps)
    norm = np.linalg.norm(w_star)
    bound = rho**steps * norm + steps * 1e3 * np.finfo(float).eps * norm
    assert np.linalg.norm(w - w_star) <= bound
    assert rho**steps < 1e-3  # the bound says something


def test_least_squares_full_rank_converges_with_error_feedback():
    """Full-rank W* and PowerSGD rank r = 1 of min(n, m) = 16 directions; error feedback
    keeps what is not sent.  Error-feedback compressed descent converges at the dense
    rate slowed by the compressor's quality delta (Stich and Karimireddy, 2019); with
    delta = r / min(n, m) (rank r of 16 equally sized directions, the worst case of a
    best rank-r step), the error contracts by ``rho = 1 - lr * mu * r / 16`` per step
    at ``lr = 0.2 / L`` (the stable range: at ``1 / L`` the delayed mass overshoots).
    Tolerance: ``rho^T ||W*||``.  Measured: 7e-4 of it at P = 1, 3, 4 (the run is the
    same at every P); without error feedback the error is 370-500x larger (checked: > 10x)."""
    shard, b, w_star, mu, big_l = _least_squares(43)
    steps, lr = 400, 0.2 / big_l
    rho = 1.0 - lr * mu * 1 / 16
    bound = rho**steps * np.linalg.norm(w_star)
    with_feedback = np.linalg.norm(_descend(PowerSGD(rank=1), shard, b, lr, steps) - w_star)
    without = np.linalg.norm(
        _descend(PowerSGD(rank=1, error_feedback=False), shard, b, lr, steps) - w_star
    )
    assert with_feedback <= bound
    assert without > 10 * with_feedback


def test_distributed_optimizer_with_several_buckets_and_exact_resume():
    torch = pytest.importorskip("torch", reason="the PyTorch integration needs torch")
    from sparcomm.torch import DistributedOptimizer

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(12, 64),
            torch.nn.Tanh(),
            torch.nn.Linear(64, 48),
            torch.nn.Tanh(),
            torch.nn.Linear(48, 4),
        ).double()

    def optimizer(net):
        return DistributedOptimizer(
            torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
            named_parameters=net.named_parameters(),
            codec=PowerSGD(rank=2),
            fusion_threshold_bytes=16_000,
            dense_below=32,
        )

    rng = np.random.default_rng(7 + RANK)
    batches = [
        (torch.from_numpy(rng.standard_normal((8, 12))), torch.from_numpy(rng.integers(0, 4, 8)))
        for _ in range(5)
    ]

    def step(net, opt, batch):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(batch[0]), batch[1]).backward()
        opt.step()

    net = model()
    opt = optimizer(net)
    try:
        for batch in batches[:2]:
            step(net, opt, batch)
        stats = opt.last_stats
        assert stats.compressed_buckets >= 2 and "powersgd" in stats.algorithms
        saved_model = {k: v.clone() for k, v in net.state_dict().items()}
        saved_opt = copy.deepcopy(opt.state_dict())  # torch's holds live buffers
        for batch in batches[2:]:
            step(net, opt, batch)
        final = [p.detach().numpy().copy() for p in net.parameters()]
    finally:
        opt.close()
    _same_on_all_ranks(final)
    net2 = model()
    net2.load_state_dict(saved_model)
    opt2 = optimizer(net2)
    try:
        opt2.load_state_dict(saved_opt)
        for batch in batches[2:]:
            step(net2, opt2, batch)
        for p, expected in zip(net2.parameters(), final, strict=True):
            assert np.array_equal(p.detach().numpy(), expected)
    finally:
        opt2.close()
