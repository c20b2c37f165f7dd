"""The CLI: ``sparcomm info`` and a tiny ``sparcomm bench codecs`` run."""

from __future__ import annotations

import json

import pytest

from sparcomm.cli import main


def test_info_reports_the_stack(capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    for key in ("python", "numpy", "numba", "numba_threads", "mpi4py", "mpi_library", "backends"):
        assert key in facts
    assert facts["backends"]["cpu"] is True


def test_bench_codecs_measures_every_codec(capsys):
    assert (
        main(
            ["bench", "codecs", "--sizes", "12", "--repeats", "1", "--numpy-repeats", "1", "--json"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    codecs = {row["codec"] for row in rows}
    from sparcomm.codecs import CODECS

    assert codecs == {p.label for p in CODECS.presets("bench")}
    assert {"dense", "fp16", "topk-0.01", "qsgd4", "terngrad", "onebit-noef"} <= codecs
    for row in rows:
        assert row["n"] == 4096
        assert row["encode_s"] > 0 and row["read_s"] > 0 and row["numpy_encode_s"] > 0
        assert row["compression_ratio"] == pytest.approx(4 * 4096 / row["payload_bytes"])


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as error:
        main(["frobnicate"])
    assert error.value.code == 2
