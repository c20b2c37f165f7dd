"""The main job: ``sparcomm demo`` on 4 ranks, and convergence under every codec.

One run of the demo (fixed seeds, 10 epochs; PyTorch's DistributedOptimizer where torch is
installed, the NumPy GradientReducer MLP otherwise) serves the convergence tests.
Tolerances are the issue's: TopK(0.01) with error feedback within 1 point of dense test
accuracy; QSGD 4-bit, TernGrad and OneBit within 2 points (the test set has 360
samples, so a point is 3.6 samples).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("sklearn", reason="the demo's digits data set comes with scikit-learn")

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

EPOCHS = 10


@pytest.fixture(scope="module")
def demo_runs() -> dict[str, dict]:
    command = [
        sys.executable,
        "-c",
        "import sys; from sparcomm.cli import main; sys.exit(main())",
        "demo",
        "-np",
        "4",
        "--json",
        "--no-progress",
        "--epochs",
        str(EPOCHS),
        "--timeout",
        "400",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=450)
    assert result.returncode == 0, f"demo failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    assert report["ranks"] == 4
    return {row["codec"]: row for row in report["runs"]}


def _row(demo_runs, label):
    row = demo_runs[label]
    if "error" in row:
        if "no allreduce for codec" in row["error"]:
            pytest.skip(f"{label}: no collective for this codec yet ({row['error']})")
        pytest.fail(f"{label} failed: {row['error']}")
    return row


def test_dense_learns_the_task(demo_runs):
    dense = _row(demo_runs, "dense")
    assert dense["accuracy"] >= 95.0
    assert dense["ratio"] == pytest.approx(1.0)
    assert dense["steps"] == EPOCHS * ((1437 // 4) // 32)


def test_topk_with_error_feedback_within_one_point_of_dense(demo_runs):
    dense, topk = _row(demo_runs, "dense"), _row(demo_runs, "topk-0.01+ef")
    assert topk["accuracy"] >= dense["accuracy"] - 1.0
    assert topk["bytes_per_step"] * 10 < dense["bytes_per_step"]


@pytest.mark.parametrize("label", ["qsgd4", "terngrad", "onebit"])
def test_quantized_codecs_within_two_points_of_dense(demo_runs, label):
    dense, row = _row(demo_runs, "dense"), _row(demo_runs, label)
    assert row["accuracy"] >= dense["accuracy"] - 2.0
    assert row["bytes_per_step"] < dense["bytes_per_step"]


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_one_rank_trainers_learn(framework):
    """Both trainers of the demo, in this process (one rank): the NumPy MLP and the
    PyTorch one reach the same ballpark on the same data."""
    if framework == "torch":
        pytest.importorskip("torch")
    from sparcomm import NoCompression
    from sparcomm.demo import train

    result = train(NoCompression(), framework=framework, epochs=3, batch_size=64)
    assert result["framework"] == framework and result["ranks"] == 1
    assert result["accuracy"] >= 90.0
    assert result["steps"] == 3 * (1437 // 64)


def test_bad_framework_is_refused():
    from sparcomm import NoCompression
    from sparcomm.demo import train

    with pytest.raises(ValueError, match="framework must be 'torch' or 'numpy', got 'jax'"):
        train(NoCompression(), framework="jax")


def test_unknown_codec_is_refused_before_launching(capsys):
    from sparcomm.cli import main

    assert main(["demo", "--codecs", "dense", "topk-0.5"]) == 2
    assert "unknown codec ['topk-0.5']; choose from ['dense'" in capsys.readouterr().err
