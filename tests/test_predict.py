"""The step-time predictor: arithmetic, byte counts of each contender, crossover, errors."""

from __future__ import annotations

import math

import pytest

from sparcomm import QSGD, ErrorFeedback, NoCompression, TopK
from sparcomm.cli import main
from sparcomm.predict import (
    StepPrediction,
    Traffic,
    crossover_bandwidth,
    predict,
    predict_step,
    traffic,
)

MLP = [(64, 32), (64,), (64, 64), (64,), (3, 64), (3,)]
N = sum(math.prod(s) for s in MLP)


def test_step_is_compute_plus_codec_plus_transfer_plus_latency():
    t = Traffic(bytes_sent=1e6, rounds=6, codec_s=0.01)
    p = predict_step(t, bandwidth_bps=1e9, latency_s=1e-4, compute_s=0.1)
    assert p.transfer == pytest.approx(8e-3)
    assert p.latency == pytest.approx(6e-4)
    assert p.total == pytest.approx(0.1 + 0.01 + 8e-3 + 6e-4)
    hidden = predict_step(t, bandwidth_bps=1e9, latency_s=1e-4, compute_s=0.1, overlap_s=1.0)
    # Overlap hides at most the communication itself.
    assert hidden.total == pytest.approx(0.11)
    assert isinstance(p, StepPrediction) and p.as_dict()["total"] == p.total


@pytest.mark.parametrize("ranks", [2, 3, 4, 8])
def test_dense_bytes_are_the_ring_allreduce(ranks):
    expected = 2 * (ranks - 1) / ranks * 4 * N
    assert traffic("ddp", MLP, ranks).bytes_sent == pytest.approx(expected)
    assert traffic("ddp-fp16", MLP, ranks).bytes_sent == pytest.approx(expected / 2)
    dense = traffic("sparcomm-nocompression", MLP, ranks, codec=NoCompression())
    assert dense.bytes_sent == pytest.approx(expected)
    assert traffic("local", MLP, ranks).bytes_sent == 0


def test_powersgd_sends_the_factors_of_compressible_matrices():
    ranks, r = 4, 2
    # (64, 64): 4096 >= 2 * 2 * 128, compressed; (64, 32): 2048 >= 2 * 2 * 96, compressed;
    # (3, 64): 192 < 2 * 2 * 67, sent dense like the vectors.
    elements = r * (64 + 32) + r * (64 + 64) + 192 + 64 + 64 + 3
    got = traffic(f"ddp-powersgd{r}", MLP, ranks).bytes_sent
    assert got == pytest.approx(2 * (ranks - 1) / ranks * 4 * elements)


def test_sparse_codec_bytes_are_an_allgather_of_each_payload():
    ranks = 4
    codec = ErrorFeedback(TopK(density=0.1))
    sizes = [math.prod(s) for s in MLP]
    compressed = [s for s in sizes if s >= 1024]
    expected = sum((ranks - 1) * codec.encoded_nbytes(s) for s in compressed)
    expected += 2 * (ranks - 1) / ranks * 4 * (N - sum(compressed))
    got = traffic("sparcomm-topk", MLP, ranks, codec=codec, dense_below=1024).bytes_sent
    assert got == pytest.approx(expected)


def test_quantized_codec_takes_the_algorithm_that_ran():
    ranks, codec = 4, QSGD(bits=4)
    gather = traffic(
        "sparcomm-qsgd", MLP, ranks, codec=codec, algorithms=["dense"] + ["allgather"] * 3
    )
    scatter = traffic(
        "sparcomm-qsgd",
        MLP,
        ranks,
        codec=codec,
        algorithms=["dense"] + ["reduce_scatter_allgather"] * 3,
    )
    # Reduce-scatter + allgather moves 2/P of what an allgather moves, per payload.
    payloads = sum(codec.encoded_nbytes(math.prod(s)) for s in MLP if math.prod(s) >= 1024)
    assert gather.bytes_sent - scatter.bytes_sent == pytest.approx(
        payloads * ((ranks - 1) - 2 * (ranks - 1) / ranks)
    )


def test_crossover_is_where_the_steps_are_equal():
    dense = Traffic(bytes_sent=60e6, rounds=12, codec_s=0.0)
    codec = Traffic(bytes_sent=2e6, rounds=24, codec_s=0.05)
    latency = 1e-4
    crossover = crossover_bandwidth(codec, dense, latency_s=latency)
    assert crossover == pytest.approx(8 * 58e6 / (0.05 + 12 * latency))

    def step(t, rate):
        return predict_step(t, bandwidth_bps=rate, latency_s=latency, compute_s=0.1).total

    assert step(codec, crossover) == pytest.approx(step(dense, crossover))
    assert step(codec, 0.9 * crossover) < step(dense, 0.9 * crossover)
    assert step(codec, 1.1 * crossover) > step(dense, 1.1 * crossover)
    assert crossover_bandwidth(Traffic(1e6, 0, 0.0), dense, latency_s=0) == math.inf
    assert crossover_bandwidth(Traffic(70e6, 0, 0.0), dense, latency_s=0) == 0.0


def test_predict_orders_contenders_by_bytes_on_a_slow_link():
    results = predict(
        MLP,
        4,
        bandwidth_bps=1e6,
        latency_s=1e-5,
        compute_s=0.01,
        contenders={
            "ddp": None,
            "ddp-fp16": None,
            "sparcomm-topk": ErrorFeedback(TopK(density=0.01)),
        },
        codec_seconds={"sparcomm-topk": 1e-3, "ddp-fp16": 0.0},
    )
    steps = {cid: r["step"].total for cid, r in results.items()}
    assert steps["sparcomm-topk"] < steps["ddp-fp16"] < steps["ddp"]
    assert results["ddp"]["crossover_bps"] is None
    assert results["ddp-fp16"]["crossover_bps"] == math.inf  # fewer bytes, no added time


def test_bad_inputs_name_the_value():
    t = Traffic(1.0, 1.0)
    with pytest.raises(ValueError, match="bandwidth_bps must be > 0, got -1"):
        predict_step(t, bandwidth_bps=-1, latency_s=0, compute_s=0)
    with pytest.raises(TypeError, match="compute_s must be a number, got str"):
        predict_step(t, bandwidth_bps=1e9, latency_s=0, compute_s="1")
    with pytest.raises(ValueError, match="unknown contender 'horovod'"):
        traffic("horovod", MLP, 4)
    with pytest.raises(ValueError, match="ranks must be an int >= 1, got 0"):
        traffic("ddp", MLP, 0)


def test_predict_command_prints_both_rates(capsys):
    assert main(["predict", "--compute-ms", "50", "--params", "2e5", "-np", "4"]) == 0
    out = capsys.readouterr().out
    assert "at 1 Gbit/s:" in out and "at 10 Gbit/s:" in out
    assert "DDP + PowerSGD rank 1" in out and "sparcomm TopK(density=0.01)+EF" in out
    assert main(["predict", "--compute-ms", "50", "--params", "2e5", "--bandwidth", "100mbit"]) == 0
    out = capsys.readouterr().out
    assert "at 100 Mbit/s:" in out and "at 1 Gbit/s:" not in out


@pytest.mark.mpi
def test_demo_ends_with_the_network_outlook():
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "sparcomm", "demo", "-np", "2", "--data", "synthetic", "--epochs",
        "1", "--codecs", "dense", "topk-0.01+ef", "--no-progress", "--timeout", "200",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=250)
    assert result.returncode == 0, result.stderr[-3000:]
    tail = result.stdout.split("predicted step on a 2-rank cluster")[-1]
    assert "1 Gbit/s: " in tail and "10 Gbit/s: " in tail and "ddp " in tail
    assert "cannot show a network's effect" in tail


def test_benchmark_charges_a_ddp_hook_what_it_computed_in_training():
    from sparcomm.predict import from_benchmark

    def entry(step_s, **extra):
        return {"step_s": step_s, "kind": "ddp", **extra}

    contenders = {
        "local": entry(0.2, kind="local"),
        "ddp": entry(0.8),
        "ddp-powersgd1": entry(0.6, hook_compute_s=0.25),
        "ddp-powersgd4": entry(0.7),  # an older report: only the hook timed apart
    }
    out = from_benchmark(
        contenders,
        rate_bps=1e9,
        latency_s=1e-3,
        ranks=4,
        shapes=MLP,
        batch=32,
        local_costs={"ddp": 0.1, "ddp-powersgd1": 0.9, "ddp-powersgd4": 0.4},
    )
    # The hook's time measured in training wins over the hook timed apart, and DDP's own
    # bucket work (plain DDP's, timed apart) comes on top; without it, the hook apart.
    assert out["ddp"]["step"].codec == 0.1
    assert out["ddp-powersgd1"]["step"].codec == pytest.approx(0.25 + 0.1)
    assert out["ddp-powersgd4"]["step"].codec == 0.4
    step = out["ddp-powersgd1"]["step"]
    assert step.total == pytest.approx(0.2 + 0.35 + step.transfer + step.latency)


def test_a_policy_sends_what_each_of_its_codecs_sends():
    from sparcomm import CodecPolicy, PowerSGD

    shapes = [(256, 128), (256,), (10, 256), (10,)]
    powersgd = PowerSGD(rank=2)
    policy = CodecPolicy(None, rules=[(lambda name, shape: shape == (256, 128), powersgd)])
    got = traffic("sparcomm-policy", shapes, 4, codec=policy, dense_below=1024)
    matrix = traffic("sparcomm-powersgd", shapes[:1], 4, codec=powersgd, dense_below=1024)
    dense = traffic("sparcomm-nocompression", shapes[1:], 4, codec=None)
    assert got.bytes_sent == pytest.approx(matrix.bytes_sent + dense.bytes_sent)
    assert got.rounds == matrix.rounds + dense.rounds
    assert got.allreduce_bytes == 4 * (256 + 10 * 256 + 10)
