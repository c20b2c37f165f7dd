"""``sparcomm bench allreduce``: launches its ranks, measures every algorithm and MPI's
Allreduce in one run, and writes a table, JSON and a plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparcomm.cli import main

ENTRY = "import sys; from sparcomm.cli import main; sys.exit(main(sys.argv[1:]))"


def test_bench_allreduce_relaunches_under_mpiexec_and_reports(tmp_path):
    pytest.importorskip("matplotlib")
    output, png = tmp_path / "a.json", tmp_path / "a.png"
    command = [sys.executable, "-c", ENTRY, "bench", "allreduce", "-np", "2", "--sizes", "12"]
    command += ["--densities", "0.01", "1", "--repeats", "1", "--cell-seconds", "0"]
    command += ["--no-progress", "--json"]
    command += ["--codecs"]  # none: the quantized section has its own tests
    command += ["--output", str(output), "--plot", str(png)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert json.loads(output.read_text()) == result and png.stat().st_size > 1000
    assert result["ranks"] == 2 and result["dtype"] == "float32"
    assert [(r["n"], r["density"]) for r in result["rows"]] == [(4096, 0.01), (4096, 1.0)]
    for row in result["rows"]:
        assert row["repeats"] == 1
        times = {name: a["median_s"] for name, a in row["algorithms"].items()}
        # every round recorded, so the referee's noise can be judged (auto_vs_best.py)
        for entry in [*row["algorithms"].values(), row["auto"]]:
            assert len(entry["rounds_s"]) == 1 and entry["median_s"] == entry["rounds_s"][0]
        assert set(times) == {"allgather", "recursive_doubling", "split_allgather", "dsar", "dense"}
        assert row["fastest"] == min(times, key=times.get)
        assert row["auto"]["choice"] in times
        assert row["auto"]["over_fastest"] == pytest.approx(
            row["auto"]["median_s"] / times[row["fastest"]]
        )
        assert row["algorithms"]["dense"]["speedup_vs_mpi"] == pytest.approx(
            row["mpi_allreduce_s"] / times["dense"]
        )
        # Two ranks: the dense path sends half the buffer twice (ring) plus the signature.
        assert row["algorithms"]["dense"]["bytes_sent_per_rank"] == 4 * 4096 + 80
    assert result["command"].startswith("sparcomm bench allreduce -np 2 --sizes 12")


def test_bench_allreduce_refuses_bad_options(capsys):
    assert main(["bench", "allreduce", "--densities", "1.5"]) == 2
    assert "--densities must lie in (0, 1], got 1.5" in capsys.readouterr().err
    assert main(["bench", "allreduce", "--algorithms", "ring"]) == 2
    assert "--algorithms must be among" in capsys.readouterr().err
