"""``sparcomm bench train``: contenders, the summary arithmetic, and a small emulated run."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import time

import pytest

from sparcomm._cli_bench_train import CATEGORIES, summarise
from sparcomm._contenders import contender_specs, select_contenders
from sparcomm.cli import main

pytest.importorskip("torch")


def test_every_codec_is_a_contender_beside_ddp_and_the_floor():
    from sparcomm.codecs import CODECS

    ids = [s.id for s in contender_specs()]
    assert len(CODECS) >= 7
    for name in CODECS:
        assert f"sparcomm-{name.lower()}" in ids
    assert {"local", "ddp", "ddp-fp16", "ddp-powersgd1", "ddp-powersgd4"} <= set(ids)
    topk = next(s for s in contender_specs() if s.id == "sparcomm-topk")
    assert repr(topk.codec()).startswith("ErrorFeedback(TopK(")


def test_contender_filter_takes_globs_and_names_the_ids_on_a_miss():
    assert [s.id for s in select_contenders(["ddp-*"])] == [
        "ddp-fp16",
        "ddp-powersgd1",
        "ddp-powersgd4",
    ]
    with pytest.raises(ValueError, match="matches no contender; the ids are local, "):
        select_contenders(["horovod"])


def _records(totals_per_rank):
    return [
        [
            {
                "total": t,
                "forward_backward": t / 2,
                "wait": t / 4,
                "update": t / 4,
                "wire_bytes": 100,
            }
            for t in per_rank
        ]
        for per_rank in totals_per_rank
    ]


def test_summary_takes_the_slowest_rank_skips_warmup_and_reads_the_curves():
    raw = {
        "contenders": {
            "ddp": {
                "label": "DDP",
                "kind": "ddp",
                # 5 steps on 2 ranks; the first is a slow warm-up step.
                "steps": _records([(9.0, 1.0), (1.0, 2.0), (2.0, 1.0), (1.0, 3.0), (2.0, 2.0)]),
                "accuracy": [(0, 10.0), (2, 30.0), (4, 50.0), (5, 60.0)],
                "ranks_agree": True,
            },
            "fast": {
                "label": "fast",
                "kind": "sparcomm",
                "steps": [
                    [
                        dict(
                            r,
                            payload_bytes=7,
                            collective_seconds=0.1,
                            collectives=2,
                            algorithms=["dense"],
                            phases={
                                "encode": 0.01,
                                "check": 0.0,
                                "exchange": 0.05,
                                "merge": 0.02,
                                "other": 0,
                            },
                            # Rank 0 used 0.4 s of CPU, rank 1 0.6 s, in every step.
                            cpu=0.4 + 0.2 * rank,
                            cpu_system=0.1,
                            page_faults=3 * rank,
                        )
                        for rank, r in enumerate(step)
                    ]
                    for step in _records(
                        [(5.0, 1.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)]
                    )
                ],
                "accuracy": [(0, 10.0), (2, 20.0), (4, 55.0), (5, 58.0)],
                "ranks_agree": True,
            },
        }
    }
    summary = summarise(raw, warmup=1, target=None, budget=None)
    ddp, fast = summary["contenders"]["ddp"], summary["contenders"]["fast"]
    assert ddp["step_s"] == 2.0  # median of the slowest ranks 2, 2, 3, 2
    assert ddp["split_s"]["forward_backward"] == 1.0
    assert ddp["first_steps_extra_s"] == pytest.approx(9.0 - 2.0)
    # The warm-up step counts at the median on the time axis.
    assert [p["time_s"] for p in ddp["curve"]] == [0.0, 4.0, 9.0, 11.0]
    assert summary["target_accuracy"] == 60.0  # DDP's final accuracy
    assert summary["budget_s"] == 5.0  # the shortest run: "fast"
    assert ddp["time_to_target_s"] == 11.0 and fast["time_to_target_s"] is None
    assert fast["accuracy_at_budget"] == 58.0 and ddp["accuracy_at_budget"] == 30.0
    assert fast["payload_bytes"] == 7 and fast["phases_s"]["exchange"] == 0.05
    assert fast["wire_bytes"] == 100
    # CPU per rank and step: the ranks' mean; none recorded (an older report): None.
    assert fast["cpu_s"] == pytest.approx(0.5) and fast["cpu_system_s"] == pytest.approx(0.1)
    assert fast["page_faults"] == pytest.approx(1.5)
    assert ddp["cpu_s"] is None and ddp["page_faults"] is None
    # Bytes on the curves: the wire's count, step by step (the busiest rank's).
    assert [p["bytes"] for p in ddp["curve"]] == [0, 200, 400, 500]
    assert ddp["bytes_source"] == "wire"


def test_target_step_is_ddps_accuracy_at_that_step_and_render_recomputes_it(tmp_path):
    from sparcomm._cli_bench_train import apply_target

    def contender(kind, accuracy, step_s):
        curve = [{"step": s, "time_s": s * step_s, "accuracy": a} for s, a in accuracy]
        return {"kind": kind, "curve": curve, "final_accuracy": accuracy[-1][1]}

    contenders = {
        "ddp": contender("ddp", [(0, 10.0), (10, 40.0), (20, 50.0)], 3.0),
        "fast": contender("sparcomm", [(0, 10.0), (10, 35.0), (20, 42.0)], 1.0),
    }
    summary = apply_target(contenders, None, None, target_step=10)
    assert summary["target_accuracy"] == 40.0 and summary["target_reference"] == "ddp"
    assert contenders["ddp"]["time_to_target_s"] == 30.0
    assert (
        contenders["fast"]["steps_to_target"] == 20
        and contenders["fast"]["time_to_target_s"] == 20.0
    )
    with pytest.raises(ValueError, match="evaluated at steps"):
        apply_target(contenders, None, None, target_step=15)
    with pytest.raises(ValueError, match="not both"):
        apply_target(contenders, 40.0, None, target_step=10)
    # Without it: DDP's final accuracy, which "fast" never reaches.
    assert apply_target(contenders, None, None)["target_accuracy"] == 50.0
    assert contenders["fast"]["time_to_target_s"] is None


def test_bytes_to_target_from_counts_or_from_the_algorithm():
    from sparcomm._cli_bench_train import attach_bytes
    from sparcomm.predict import traffic

    shapes = [(64, 32), (64,), (10, 64), (10,)]
    plain = _records([(1.0, 1.0)] * 4)
    for per_rank in plain:
        for r in per_rank:
            r["wire_bytes"] = None  # shared memory: nothing counted
    counted = [
        [dict(r, payload_bytes=10 * (i + 1)) for r in per_rank] for i, per_rank in enumerate(plain)
    ]
    reducer = {"collective_seconds": 0.1, "collectives": 1, "algorithms": [], "phases": {}}
    raw = {
        "contenders": {
            "ddp": {
                "label": "DDP", "kind": "ddp", "steps": plain, "ranks_agree": True,
                "accuracy": [(0, 10.0), (2, 30.0), (4, 40.0)],
            },
            "sparcomm-topk": {
                "label": "TopK", "kind": "sparcomm", "ranks_agree": True,
                "steps": [[dict(r, **reducer) for r in per_rank] for per_rank in counted],
                "accuracy": [(0, 10.0), (2, 40.0), (4, 45.0)],
            },
        }
    }  # fmt: skip
    summary = summarise(raw, warmup=0, target=None, budget=None)
    attach_bytes(summary, shapes=shapes, ranks=4)
    ddp, topk = summary["contenders"]["ddp"], summary["contenders"]["sparcomm-topk"]
    per_step = traffic("ddp", shapes, 4).bytes_sent
    assert ddp["bytes_source"] == "algorithm"
    assert [p["bytes"] for p in ddp["curve"]] == [0, 2 * per_step, 4 * per_step]
    assert ddp["bytes_to_target"] == 4 * per_step  # target: DDP's final 40 %
    # The payload counted in each step, warm-up steps and all: 10 + 20 by step 2.
    assert topk["bytes_source"] == "payload" and topk["bytes_to_target"] == 30


def test_configurations_run_when_named():
    from sparcomm import DGC, CodecPolicy, Exponential

    default = {s.id for s in contender_specs()}
    extra = {s.id: s for s in contender_specs(everything=True) if s.id not in default}
    assert {"sparcomm-topk10", "sparcomm-topk-warmup", "sparcomm-powersgd4", "sparcomm-policy",
            "sparcomm-dgc"} <= set(extra)  # fmt: skip
    assert not any(s.default for s in extra.values())
    assert set(extra) <= {s.id for s in select_contenders(["sparcomm-*"])}
    warmup = extra["sparcomm-topk-warmup"].optimizer_options()["schedule"]
    assert isinstance(warmup, Exponential) and warmup(0) == 0.25 and warmup(100) == 0.01
    dgc = extra["sparcomm-dgc"]
    assert isinstance(dgc.codec(), DGC) and dgc.momentum == 0.0  # no momentum applied twice
    policy = extra["sparcomm-policy"].codec()
    assert isinstance(policy, CodecPolicy)
    assert policy.choose("0.weight", (2048, 1024)) is not None
    assert (
        policy.choose("6.weight", (10, 2048)) is None and policy.choose("0.bias", (2048,)) is None
    )


def _spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_hook_timer_counts_the_hooks_work_and_not_its_waits(monkeypatch):
    import torch
    import torch.distributed as dist

    from sparcomm._cli_bench_train import _HookTimer

    latency = 0.3  # each fake allreduce completes this long after it starts

    class Work:
        def __init__(self):
            self.future = torch.futures.Future()
            threading.Timer(latency, self.future.set_result, args=([torch.zeros(1)],)).start()

        def get_future(self):
            return self.future

    monkeypatch.setattr(dist, "all_reduce", lambda tensor, async_op=False: Work())
    timer = _HookTimer()
    assert timer.take() is None  # no hook ran: nothing measured

    def hook(state, bucket):
        # As torch's PowerSGD hook: work in the body, an allreduce, a callback that works
        # and waits for a second allreduce inside, and a last callback that works.
        _spin(0.03)
        first = dist.all_reduce(torch.zeros(1), async_op=True).get_future()

        def middle(fut):
            _spin(0.02)
            return dist.all_reduce(fut.value()[0], async_op=True).get_future().wait()[0]

        def last(fut):
            _spin(0.01)
            return fut.value()

        return first.then(middle).then(last)

    result = timer.wrap(hook)(None, bucket=None)
    assert isinstance(result, torch._C.Future)  # DDP gets torch's own future
    result.wait()
    measured = timer.take()
    # 60 ms of work; each of the two waits (300 ms) would show if it were counted.
    assert measured is not None and 0.06 <= measured < 0.06 + latency / 2
    assert timer.take() is None


def test_bad_options_are_errors_before_anything_starts(capsys):
    assert main(["bench", "train", "--contenders", "nope", "--steps", "2", "--warmup", "0"]) == 2
    assert "matches no contender" in capsys.readouterr().err
    assert main(["bench", "train", "--steps", "3", "--warmup", "3"]) == 2
    assert "--warmup must be in [0, --steps), got 3" in capsys.readouterr().err


def _root_tools() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the emulated cluster needs root on Linux"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"{missing[0]} (iproute2) is not installed" if missing else None


@pytest.mark.skipif(_root_tools() is not None, reason=str(_root_tools()))
def test_small_emulated_run_reports_every_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from sparcomm import _emulate

    report_path, plot_path = tmp_path / "report.json", tmp_path / "plot.png"
    argv = [
        "bench", "train", "-np", "2", "--emulate", "300mbit", "--inputs", "64", "--width", "64",
        "--depth", "1", "--steps", "6", "--block", "3", "--warmup", "1", "--eval-every", "3",
        "--test-samples", "128", "--contenders", "local", "sparcomm-topk", "ddp", "ddp-powersgd1",
        "--no-progress", "--json", str(report_path), "--plot", str(plot_path), "--timeout", "120",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "measured" in out and "DDP (gloo)" in out
    report = json.loads(report_path.read_text())
    assert plot_path.stat().st_size > 10_000
    assert 0.8 * 300e6 < report["rate_bps"] < 1.02 * 300e6
    contenders = report["summary"]["contenders"]
    assert list(contenders) == ["local", "sparcomm-topk", "ddp", "ddp-powersgd1"]
    n = report["parameters"]
    ddp, topk, local = contenders["ddp"], contenders["sparcomm-topk"], contenders["local"]
    # The wire carries the ring allreduce's payload plus TCP/IP headers and ACKs.
    ring = 2 * (2 - 1) / 2 * 4 * n
    assert ring < ddp["wire_bytes"] < 1.25 * ring + 20_000
    assert topk["payload_bytes"] < ddp["wire_bytes"] / 3
    assert local["wire_bytes"] < 2_000  # no communication, nothing sent
    for entry in contenders.values():
        assert [p["step"] for p in entry["curve"]] == [0, 3, 6]
        assert entry["ranks_agree"]
        assert entry["step_s"] > 0 and math.isfinite(entry["predicted_step_s"])
    assert tuple(topk["phases_s"]) == CATEGORIES
    assert {"fuse", "write_back"} <= set(CATEGORIES)
    # TopK's dense output (the gradients written back) has its own column, not "other".
    assert topk["phases_s"]["write_back"] > 0 and topk["phases_s"]["encode"] > 0
    # torch's PowerSGD hook is charged its own work as timed in training.
    hook = contenders["ddp-powersgd1"]
    assert 0 < hook["hook_compute_s"] < hook["step_s"]
    # DDP's own bucket work, timed once per round through the run, charged to every DDP.
    ddp_own = report["ddp_own_s"]
    assert ddp_own is not None and ddp["predicted_split_s"]["codec"] == ddp_own
    assert hook["predicted_split_s"]["codec"] == pytest.approx(hook["hook_compute_s"] + ddp_own)
    prefix = f"{_emulate.PREFIX}{os.getpid()}x"
    assert not [name for name in _emulate._namespaces() if name.startswith(prefix)]


def _ranks_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    words = f.read().split(b"\0")
            except OSError:
                continue
            if b"--rank-main" in words and marker.encode() in words:
                found.append(int(entry))
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sigterm_ends_the_job_without_emulation():
    import signal
    import subprocess

    marker = str(900_000 + os.getpid() % 99_999)  # a seed no other job uses
    command = [
        sys.executable, "-m", "sparcomm", "bench", "train", "-np", "2", "--inputs", "64",
        "--width", "64", "--depth", "1", "--steps", "100000", "--eval-every", "100000",
        "--test-samples", "64", "--contenders", "ddp", "--no-progress", "--seed", marker,
        "--timeout", "120",
    ]  # fmt: skip
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while len(_ranks_with(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(_ranks_with(marker)) >= 2, "the ranks never started"  # and mpiexec
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while _ranks_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _ranks_with(marker) == []  # no rank outlives the command
    finally:
        parent.kill()
        for pid in _ranks_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_plot_without_a_link_rate_has_no_predicted_marks(tmp_path):
    pytest.importorskip("matplotlib")
    from sparcomm._cli_bench_train import attach_bytes, plot_report

    shapes = [(64, 32), (32,)]
    raw = {
        "contenders": {
            "ddp": {
                "label": "DDP", "kind": "ddp", "ranks_agree": True,
                "steps": _records([(1.0, 1.0)] * 4),
                "accuracy": [(0, 10.0), (2, 30.0), (4, 40.0)],
            }
        }
    }  # fmt: skip
    summary = summarise(raw, warmup=0, target=None, budget=None)
    attach_bytes(summary, shapes=shapes, ranks=2)
    report = {
        "summary": summary, "model": "MLP", "ranks": 2, "batch": 8, "link": "shared memory",
        "measured_rate": "not measured", "load_text": "1.0-1.0",
    }  # fmt: skip
    path = tmp_path / "plot.png"
    plot_report(report, str(path))  # no predicted_step_s anywhere: no scatter of NaNs
    assert path.stat().st_size > 10_000
