"""``sparcomm bench allreduce --codecs``: the quantized section measures every algorithm,
``auto`` and MPI's Allreduce in one run, and reports bytes the cost model predicted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparcomm import _cli_bench_quantized as quantized
from sparcomm.cli import main

ENTRY = "import sys; from sparcomm.cli import main; sys.exit(main(sys.argv[1:]))"


def test_bench_allreduce_reports_the_quantized_codecs():
    command = [sys.executable, "-c", ENTRY, "bench", "allreduce", "-np", "2", "--sizes", "12"]
    command += [
        "--densities",
        "--codecs",
        "qsgd4",
        "terngrad",
        "--repeats",
        "1",
        "--cell-seconds",
        "0",
        "--no-progress",
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["rows"] == [] and result["codecs"] == ["qsgd4", "terngrad"]
    rows = result["quantized"]
    assert [(r["n"], r["codec"]) for r in rows] == [(4096, "qsgd4"), (4096, "terngrad")]
    for row in rows:
        assert row["repeats"] == 1  # --cell-seconds 0: --repeats alone
        names = set(row["algorithms"])
        expected = {"allgather", "reduce_scatter_allgather"}
        assert names == (expected | {"shared_scale"} if row["codec"] == "terngrad" else expected)
        assert row["auto"]["choice"] in names
        assert row["fastest"] == min(names, key=lambda a: row["algorithms"][a]["median_s"])
        for entry in row["algorithms"].values():
            assert entry["rounds_s"] == [entry["median_s"]]  # one round, recorded
            assert entry["bytes_sent_per_rank"] == entry["predicted_bytes_sent"]
            assert entry["speedup_vs_mpi"] == pytest.approx(
                row["mpi_allreduce_s"] / entry["median_s"]
            )
            assert entry["fewer_bytes_than_dense"] > 1
    assert "--codecs qsgd4 terngrad" in result["command"]


def test_bench_allreduce_refuses_unknown_codecs(capsys):
    assert main(["bench", "allreduce", "--codecs", "qsgd3"]) == 2
    assert "--codecs must be among" in capsys.readouterr().err
    assert main(["bench", "allreduce", "--cell-seconds", "-1"]) == 2
    assert "--cell-seconds must be at least 0, got -1.0" in capsys.readouterr().err


class _OneRank:
    """Enough of a communicator for :func:`time_rounds` on one process."""

    def Barrier(self) -> None:
        pass

    def allreduce(self, value, op=None):
        return value


@pytest.mark.parametrize(
    ("repeats", "cell_seconds", "rounds"),
    [(2, 0.0, 2), (2, 0.27, 5), (7, 0.27, 7), (2, 100.0, quantized.MAX_REPEATS)],
)
def test_time_rounds_adds_repeats_until_the_cell_has_its_seconds(
    monkeypatch, repeats, cell_seconds, rounds
):
    """Every contender is timed once per round; rounds go on past ``repeats`` until the
    timed calls add up to ``cell_seconds`` (each call here "takes" 10 ms, so a round of
    two contenders of three 10 ms calls takes 60 ms), and stop at the cap."""
    calls = {"a": 0, "b": 0}

    def timed(comm, function, iterations=1):
        for _ in range(iterations):
            function()
        return 0.01

    monkeypatch.setattr(quantized, "timed", timed)

    def counter(name):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    functions = {name: counter(name) for name in calls}
    times = quantized.time_rounds(_OneRank(), functions, repeats, cell_seconds)
    assert {name: len(t) for name, t in times.items()} == {"a": rounds, "b": rounds}
    # one sizing call each, then three calls (30 ms / 10 ms) per round
    assert calls == {"a": 1 + 3 * rounds, "b": 1 + 3 * rounds}


def test_time_rounds_rotates_the_order_so_no_contender_always_follows_another(monkeypatch):
    """Round r starts at the r-th contender: over three rounds of three contenders,
    each is timed first, second and third once."""
    order: list[str] = []

    def timed(comm, function, iterations=1):
        function()
        return 1.0  # one call per round (iterations_for(1 s) is 1)

    monkeypatch.setattr(quantized, "timed", timed)
    functions = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = quantized.time_rounds(_OneRank(), functions, 3)
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    rounds = order[3:]  # after one sizing call each, in the given order
    assert rounds == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_fp16_is_timed_with_its_pipelined_schedule_and_the_table_prints():
    """FP16's own schedule is one of its measured algorithms, and the terminal table
    (printed after the grid) names whatever auto chose."""
    command = [sys.executable, "-c", ENTRY, "bench", "allreduce", "-np", "2", "--sizes", "12"]
    command += ["--densities", "--codecs", "fp16", "--repeats", "1", "--cell-seconds", "0.5"]
    command += ["--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    header, row = done.stdout.strip().splitlines()[-2:]
    assert "pipelined" in header.split() and row.split()[1] == "fp16"
    assert row.split()[-3] in {"allgather", "rs+ag", "pipelined"}  # auto's choice
