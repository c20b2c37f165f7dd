"""Per-tensor codec choice (sparcomm.CodecPolicy): rules, the plan's grouping by codec,
the reducer against one reducer per codec, state, schedules per codec, and errors (one
rank; tests/mpi/test_schedule_policy.py runs several)."""

from __future__ import annotations

import numpy as np
import pytest

from sparcomm import (
    QSGD,
    CodecPolicy,
    Constant,
    ErrorFeedback,
    Linear,
    NoCompression,
    PowerSGD,
    Rule,
    TopK,
)
from sparcomm.reducer import build_plan

MPI = pytest.importorskip("mpi4py.MPI")
from sparcomm.reducer import GradientReducer  # noqa: E402

SPECS = [
    ("embedding.weight", (500, 16), np.float32),
    ("encoder.0.weight", (64, 16), np.float32),
    ("encoder.0.bias", (64,), np.float32),
    ("encoder.1.weight", (32, 64), np.float32),
    ("encoder.1.bias", (32,), np.float32),
    ("head.weight", (3000,), np.float32),
]


def _policy():
    topk = ErrorFeedback(TopK(density=0.05))
    return CodecPolicy(
        ErrorFeedback(TopK(density=0.01)),
        matrices=PowerSGD(rank=2),
        embeddings=topk,
        rules=[("*.bias", None)],
    )


# -- choosing -----------------------------------------------------------------------------
def test_rules_then_embeddings_then_matrices_then_default():
    policy = _policy()
    chosen = {name: policy.choose(name, shape) for name, shape, _ in SPECS}
    assert chosen["embedding.weight"] is policy.embeddings  # an embedding, though 2-D
    assert chosen["encoder.0.weight"] is policy.matrices
    assert chosen["encoder.1.weight"] is policy.matrices
    assert chosen["encoder.0.bias"] is None and chosen["encoder.1.bias"] is None
    assert chosen["head.weight"] is policy.default  # 1-D
    assert policy.labels == ("embeddings", "matrices", "default")
    assert policy.assign(SPECS) == [0, 1, -1, 1, -1, 2]


def test_predicates_globs_and_shared_codecs():
    shared = ErrorFeedback(TopK(density=0.1))
    policy = CodecPolicy(
        NoCompression(),  # dense by default
        rules=[
            Rule(lambda name, shape: len(shape) == 2 and shape[0] > 100, shared),
            Rule(["encoder.*.weight", "head.*"], shared),  # the same object: one codec
        ],
    )
    assert policy.codecs == (shared,) and policy.labels == ("rules[0]",)
    assert policy.assign(SPECS) == [0, 0, -1, 0, -1, 0]
    assert CodecPolicy(TopK(k=3), rules=[("1?", None)]).assign([(12, (9,), None)]) == [-1]


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: CodecPolicy(TopK), TypeError, r"an instance, e.g. TopK\(...\)"),
        (lambda: CodecPolicy("topk"), TypeError, "default must be a sparcomm codec"),
        (lambda: CodecPolicy(rules=("*", None)), TypeError, r"rules\[0\] must be a Rule"),
        (lambda: CodecPolicy(rules=Rule("*", None)), TypeError, "rules must be a list"),
        (lambda: Rule(3, None), TypeError, "match must be a glob"),
        (lambda: Rule("", None), ValueError, "glob is empty"),
        (lambda: Rule([], None), ValueError, "list of globs is empty"),
        (lambda: Rule("*", CodecPolicy()), TypeError, "cannot nest"),
        (
            lambda: CodecPolicy(matrices=ErrorFeedback(PowerSGD(rank=2, error_feedback=False))),
            NotImplementedError,
            "keeps its error feedback itself",
        ),
    ],
)
def test_bad_policies(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_bad_predicates_name_the_rule_and_the_tensor():
    def returns_int(name, shape):
        return 1

    def raises(name, shape):
        raise KeyError(name)

    with pytest.raises(TypeError, match=r"returns_int returned int 1 for tensor 'w'"):
        CodecPolicy(rules=[(returns_int, None)]).choose("w", (3,))
    with pytest.raises(ValueError, match=r"raises raised KeyError on tensor 'w' of shape \(3,\)"):
        CodecPolicy(rules=[(raises, None)]).choose("w", (3,))


# -- the plan --------------------------------------------------------------------------------
def test_buckets_never_mix_codecs_and_the_plan_is_pure():
    policy = _policy()
    specs = [(name, shape, np.dtype(dtype)) for name, shape, dtype in SPECS]

    def plan():
        return build_plan(
            specs,
            compress=True,
            fusion_threshold_bytes=1 << 20,
            dense_below=1,
            compression="bucket",
            choices=policy.assign(specs),
            modes={1: "bucket"},
        )

    first = plan()
    assert first == plan()
    choice = dict(zip([s[0] for s in specs], policy.assign(specs), strict=True))
    for bucket in first.buckets:
        assert {choice[slot.name] for slot in bucket.slots} == {bucket.codec}
        assert bucket.compressed == (bucket.codec >= 0)
    assert sorted(b.codec for b in first.buckets) == [-1, 0, 1, 2]


# -- the reducer ----------------------------------------------------------------------------
def _grads(step):
    rng = np.random.default_rng(step)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape, dtype in SPECS}


def test_a_policy_reduces_as_one_reducer_per_codec():
    """Bit for bit what each codec gives its own tensors in a reducer of its own: a
    policy routes, nothing more; the dense ones (the rule, and tensors below
    dense_below) come back unchanged."""
    parts = [
        (ErrorFeedback(TopK(density=0.05)), ["embedding.weight"]),
        (PowerSGD(rank=2), ["encoder.0.weight", "encoder.1.weight"]),
        (ErrorFeedback(TopK(density=0.01)), ["head.weight"]),
    ]
    alone = [GradientReducer(codec, dense_below=1) for codec, _ in parts]
    try:
        with GradientReducer(_policy(), dense_below=100, fusion_threshold_bytes=1 << 14) as r:
            for step in range(3):
                grads = _grads(step)
                got = r.reduce(grads)
                assert r.last_stats.compressed_buckets == 3
                for name in ("encoder.0.bias", "encoder.1.bias"):
                    np.testing.assert_array_equal(got[name], grads[name])
                for reducer, (_, names) in zip(alone, parts, strict=True):
                    expected = reducer.reduce({name: grads[name] for name in names})
                    for name in names:
                        np.testing.assert_array_equal(got[name], expected[name])
    finally:
        for reducer in alone:
            reducer.close()


def test_state_dict_covers_every_codec_and_resumes_bit_exactly():
    def make():
        return GradientReducer(
            _policy(), dense_below=100, schedule={"density": Linear(0.3, 0.02, 4)}
        )

    with make() as reducer:
        expected = [reducer.reduce(_grads(s)) for s in range(5)]
    with make() as reducer:
        for s in range(2):
            reducer.reduce(_grads(s))
        state = reducer.state_dict()
    assert isinstance(state["codec_state"], list) and len(state["codec_state"]) == 3
    assert set(state["codec_state"][0]) >= {"residuals"} and "q" in state["codec_state"][1]
    with make() as resumed:
        resumed.load_state_dict(state)
        for s in range(2, 5):
            got = resumed.reduce(_grads(s))
            for name in got:
                np.testing.assert_array_equal(got[name], expected[s][name])
        with pytest.raises(ValueError, match="must list the states of the policy's 3 codecs"):
            resumed.load_state_dict({**state, "codec_state": state["codec_state"][0]})


def test_schedules_per_codec_of_a_policy():
    policy = _policy()
    with GradientReducer(
        policy,
        dense_below=100,
        schedule={"density": Constant(0.2), "embeddings": Constant(0.5), "rank": Constant(3)},
    ) as reducer:
        reducer.reduce(_grads(0))
        assert reducer.last_stats.levels == {
            "embeddings.density": 0.5,
            "matrices.rank": 3,
            "default.density": 0.2,
        }
    with pytest.raises(ValueError, match=r"take different levels \['density', 'rank'\]"):
        GradientReducer(_policy(), schedule=Constant(0.1))
    with pytest.raises(ValueError, match="sets 'k', but no codec"):
        GradientReducer(_policy(), schedule={"k": Constant(3)})
    with pytest.raises(NotImplementedError, match="takes none"):
        GradientReducer(CodecPolicy(QSGD(bits=4)), schedule=Constant(0.1))
    only_topk = CodecPolicy(ErrorFeedback(TopK(density=0.01)), matrices=QSGD(bits=4))
    with GradientReducer(only_topk, dense_below=100, schedule=Constant(0.3)) as reducer:
        reducer.reduce(_grads(0))
        assert reducer.last_stats.levels == {"default.density": 0.3}


def test_an_all_dense_policy_compresses_nothing():
    with GradientReducer(CodecPolicy(None), dense_below=1) as reducer:
        grads = _grads(0)
        got = reducer.reduce(grads)
        assert reducer.last_stats.compressed_buckets == 0
        for name in grads:
            np.testing.assert_array_equal(got[name], grads[name])


def test_reducer_refuses_other_codec_types():
    with pytest.raises(TypeError, match="ErrorFeedback or CodecPolicy"):
        GradientReducer({"default": TopK(density=0.1)})
