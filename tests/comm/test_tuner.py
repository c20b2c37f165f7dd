"""auto's measured choice (sparcomm.comm._tune) on one process: which calls it times,
what it chooses from the times, when it explores again.  Times are injected through
each decision's start, so nothing here depends on the machine's speed."""

from __future__ import annotations

import time

import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm.comm import AllreduceStats, _tune  # noqa: E402
from sparcomm.comm._tune import (  # noqa: E402
    CHECK_EVERY,
    CHECKS,
    DRIFT,
    FINALISTS,
    MAX_CANDIDATES,
    SCREEN_TRIALS,
    TRIALS,
    Tuner,
)

PREDICTED = {"a": 1.0, "b": 1.2, "c": 1.9, "d": 2.5, "e": 1.5}
#: What each candidate "takes" in these tests: b is the fastest, against the model.  All
#: at least CHEAP_CALL_S: each round has its base number of trials.
SECONDS = {"a": 0.030, "b": 0.012, "c": 0.060, "e": 0.036}


def _run(tuner: Tuner, key="k", seconds=SECONDS, stats=None):
    """One call: decide, pretend the algorithm took ``seconds[name]``, record."""
    decision = tuner.decide(key, PREDICTED, time.perf_counter())
    if decision.timed:
        decision.start = time.perf_counter() - seconds[decision.name]
    tuner.record(MPI.COMM_SELF, decision, AllreduceStats() if stats is None else stats)
    return decision


def _explore(tuner: Tuner, key="k", seconds=SECONDS) -> list[str]:
    """The first call and the whole exploration; the names explored, in order."""
    first = _run(tuner, key, seconds)
    assert (first.name, first.mode, first.timed) == ("a", "model", False)
    explored = []
    while True:
        decision = _run(tuner, key, seconds)
        if decision.mode != "explore":
            return explored
        assert decision.timed
        explored.append(decision.name)


def _race(candidates: list[str], finalists: list[str]) -> list[str]:
    """The calls of a race: every candidate's first round, then the finalists' rest,
    one candidate's calls back to back."""
    first = [name for name in candidates for _ in range(SCREEN_TRIALS)]
    return first + [name for name in finalists for _ in range(TRIALS - SCREEN_TRIALS)]


def test_first_call_is_the_models_then_close_candidates_race():
    tuner = Tuner()
    explored = _explore(tuner)
    # Within EXPLORE_WITHIN (2x) of the best: a, b, e, c (d is 2.5x), best predicted first;
    # the two fastest of the first round (b 12 ms, a 30 ms) run on.
    assert MAX_CANDIDATES >= 4 and FINALISTS == 2
    assert explored == _race(["a", "b", "e", "c"], ["b", "a"])
    assert tuner.choices() == {"k": "b"}  # the measured fastest, not the predicted one


def test_two_candidates_race_without_a_first_round():
    tuner = Tuner()
    predicted = {"a": 1.0, "b": 1.5, "c": 9.0}
    first = tuner.decide("k", predicted, 0.0)
    assert (first.name, first.mode) == ("a", "model")
    tuner.record(MPI.COMM_SELF, first, AllreduceStats())  # first sighting, untimed
    names = []
    for _ in range(2 * TRIALS):
        decision = tuner.decide("k", predicted, time.perf_counter())
        names.append(decision.name)
        decision.start = time.perf_counter() - SECONDS[decision.name]
        tuner.record(MPI.COMM_SELF, decision, AllreduceStats())
    assert names == ["a"] * TRIALS + ["b"] * TRIALS
    assert tuner.choices() == {"k": "b"}


@pytest.mark.parametrize(
    ("b_seconds", "chosen"),
    [(0.0100, "a"), (0.0097, "a"), (0.0090, "b")],
)
def test_a_tie_goes_to_the_models_choice(b_seconds, chosen):
    """Finalists within TIE of each other are tied: the model's favourite (a) is kept
    unless the other is measured clearly faster (10 % here; 3 % is a tie)."""
    assert _tune.TIE == 1.05
    tuner = Tuner()
    predicted = {"a": 1.0, "b": 1.5}
    seconds = {"a": 0.0100, "b": b_seconds}
    first = tuner.decide("k", predicted, 0.0)
    tuner.record(MPI.COMM_SELF, first, AllreduceStats())
    for _ in range(2 * _tune.CHEAP_FACTOR * TRIALS):
        decision = tuner.decide("k", predicted, time.perf_counter())
        if decision.mode != "explore":
            break
        decision.start = time.perf_counter() - seconds[decision.name]
        tuner.record(MPI.COMM_SELF, decision, AllreduceStats())
    assert tuner.choices() == {"k": chosen}


def test_measured_choice_runs_and_is_timed_every_check_every_calls():
    tuner = Tuner()
    _explore(tuner)  # its last call was the first "measured" one (since = 1)
    timed = []
    for call in range(2, 3 * CHECK_EVERY + 1):
        decision = _run(tuner)
        assert (decision.name, decision.mode) == ("b", "measured")
        if decision.timed:
            timed.append(call)
    assert timed == [CHECK_EVERY, 2 * CHECK_EVERY, 3 * CHECK_EVERY]


def test_timed_calls_count_their_agreement_in_the_stats():
    tuner = Tuner()
    untimed = AllreduceStats()
    _run(tuner, stats=untimed)  # first sighting
    assert "tune" not in untimed.phases and untimed.bytes_sent == 0
    timed = AllreduceStats()
    decision = _run(tuner, stats=timed)
    assert decision.timed and "tune" in timed.phases
    assert timed.bytes_sent == 0  # one rank sends nothing; at P ranks 2 (P-1)/P 8 bytes
    assert timed.by_category()["check"] == timed.phases["tune"]


def test_the_median_of_the_last_checks_drifted_explores_again():
    tuner = Tuner()
    _explore(tuner)
    slow = dict(SECONDS, b=SECONDS["b"] * DRIFT * 2.5)  # 60 ms: slower than a and e

    def until_check(seconds):
        while not (decision := _run(tuner, seconds=seconds)).timed:
            assert decision.mode == "measured"
        return decision

    half = CHECKS // 2  # at most this many slow checks leave the median normal
    sequence = [slow] * half + [SECONDS] * (CHECKS - half) + [slow] * half
    for seconds in sequence:  # every window of the last CHECKS: at most half slow
        until_check(seconds)
        assert tuner.choices() == {"k": "b"}
    until_check(slow)  # now the last CHECKS hold half + 1 slow checks
    assert tuner.choices() == {"k": None}
    # Exploring again finds the new fastest: b is now slower than a.
    explored = []
    while (decision := _run(tuner, seconds=slow)).mode == "explore":
        explored.append(decision.name)
    assert explored == _race(["a", "b", "e", "c"], ["a", "e"])  # a 30 ms, e 36, b 60
    assert tuner.choices() == {"k": "a"}


def test_a_faster_check_also_drifts():
    tuner = Tuner()
    _explore(tuner)
    fast = dict(SECONDS, b=SECONDS["b"] / DRIFT / 1.5)
    checks = 0
    while checks < CHECKS:
        decision = _run(tuner, seconds=fast)
        checks += decision.timed
    assert tuner.choices() == {"k": None}


def test_one_candidate_or_tuning_off_is_the_models_choice_untimed():
    lone = Tuner()
    for _ in range(5):
        decision = lone.decide("k", {"a": 1.0, "b": 9.0}, 0.0)  # b is beyond EXPLORE_WITHIN
        assert (decision.name, decision.mode, decision.timed) == ("a", "model", False)
    off = Tuner()
    off.enabled = False
    for _ in range(5):
        decision = off.decide("k", PREDICTED, 0.0)
        assert (decision.name, decision.mode, decision.timed) == ("a", "model", False)


def test_keys_are_tuned_separately_and_forgotten_past_the_limit(monkeypatch):
    tuner = Tuner()
    _explore(tuner, "k")
    assert _run(tuner, "other").mode == "model"  # a new key starts at its first sighting
    assert tuner.choices() == {"k": "b", "other": None}
    monkeypatch.setattr(_tune, "MAX_KEYS", 2)
    _run(tuner, "third")
    assert tuner.choices() == {"third": None}
    tuner.reset()
    assert tuner.choices() == {}


def test_one_key_races_at_a_time():
    """A training step's buckets are keys called in turn: the second key waits on the
    model's choice, untimed, until the first key's race has chosen, then races alone."""
    tuner = Tuner()
    modes: dict[str, list[str]] = {"k1": [], "k2": []}
    for _ in range(40):
        for key in ("k1", "k2"):
            modes[key].append(_run(tuner, key).mode)
    race = len(_race(["a", "b", "e", "c"], ["b", "a"]))
    assert modes["k1"] == ["model"] + ["explore"] * race + ["measured"] * (39 - race)
    # k1's last trial comes just before k2's call of the same round: k2 waited `race`
    # calls (its first sighting included) and races from there.
    assert modes["k2"] == ["model"] * race + ["explore"] * race + ["measured"] * (40 - 2 * race)
    assert tuner.choices() == {"k1": "b", "k2": "b"}


def test_a_race_held_up_by_a_key_no_longer_called_goes_ahead():
    tuner = Tuner()
    _run(tuner, "gone")
    _run(tuner, "gone")  # its race starts, then the key is never called again
    # The longest stretch between two calls of a key so far: 1 (gone, gone).  k's first
    # sighting, one call held up (gone silent for 2 calls), then gone has been silent
    # for 3 > 2 x 1: k takes over.
    assert [_run(tuner, "k").mode for _ in range(3)] == ["model", "model", "explore"]
    assert _run(tuner, "gone").mode == "model"  # now gone waits for k's race


def test_many_keys_race_one_at_a_time():
    """A model of many buckets: 100 keys in turn, each once a step.  Exactly one races at
    a time, each in turn, however many calls of other keys a race waits through."""
    tuner = Tuner()
    keys = [f"bucket{i}" for i in range(100)]
    race = len(_race(["a", "b", "e", "c"], ["b", "a"]))
    racing = []  # the key of every timed race call, in call order
    for _ in range(3 * race):  # steps
        racing += [key for key in keys if _run(tuner, key).mode == "explore"]
    # Whole races, one after the other: bucket0's `race` calls (one a step, from the
    # second), then bucket1's from the step in which bucket0's ended, and so on.
    whole = ["bucket0"] * race + ["bucket1"] * race + ["bucket2"] * race
    assert racing[: len(whole)] == whole
    assert set(racing[len(whole) :]) == {"bucket3"}
    assert [tuner.choices()[key] for key in keys[:4]] == ["b", "b", "b", None]


def test_keys_called_twice_in_a_row_race_one_after_the_other():
    """Buckets of one shape are one key: a step calling b, b, c, c.  The waiting key
    (called twice while the racing one is silent for two calls) does not take over."""
    tuner = Tuner()
    racing = []
    for _ in range(40):
        for key in ("b", "b", "c", "c"):
            if _run(tuner, key).mode == "explore":
                racing.append(key)
    race = len(_race(["a", "b", "e", "c"], ["b", "a"]))
    assert racing == ["b"] * race + ["c"] * race
    assert tuner.choices() == {"b": "b", "c": "b"}


def test_cheap_calls_race_longer():
    """Calls below CHEAP_CALL_S run more trials: each round until its trials add up to
    CHEAP_CALL_S each, at most CHEAP_FACTOR times as many."""
    assert _tune.CHEAP_FACTOR == 3
    cheap = {"a": 0.004, "b": 0.0015, "c": 0.009, "e": 0.006}  # 4, 1.5, 9, 6 ms
    explored = _explore(Tuner(), seconds=cheap)
    counts = {n: explored.count(n) for n in "abce"}
    # First round, 2 trials each and more up to 20 ms: a 5, b 6 (capped), c 3, e 4.
    # Finalists b (1.5 ms) and a (4 ms) go on: 5 trials each and more up to 50 ms,
    # at most 15: a 13, b 15.
    assert counts == {"a": 13, "b": 15, "c": 3, "e": 4}
    assert explored == ["a"] * 5 + ["b"] * 6 + ["e"] * 4 + ["c"] * 3 + ["b"] * 9 + ["a"] * 8


@pytest.mark.parametrize(("value", "enabled"), [("0", False), ("", False), ("1", True)])
def test_environment_turns_tuning_off(monkeypatch, value, enabled):
    monkeypatch.setenv("SPARCOMM_TUNE", value)
    assert Tuner().enabled is enabled


def test_a_call_that_raised_leaves_no_trace():
    """Nothing is recorded for a call that failed (on every rank): the tuner then decides
    as if the call had never been made, as a run without the failure would."""
    clean, failed = Tuner(), Tuner()
    for tuner, fail in ((clean, False), (failed, True)):
        names = []
        for call in range(2 + 4 * TRIALS):
            decision = tuner.decide("k", PREDICTED, time.perf_counter())
            if fail and call in (0, 3, 7):
                continue  # raised on every rank: record() is never reached
            names.append(decision.name)
            if decision.timed:
                decision.start = time.perf_counter() - SECONDS[decision.name]
            tuner.record(MPI.COMM_SELF, decision, AllreduceStats())
        if tuner is clean:
            expected = names
    assert names == expected[: len(names)]
    assert failed.choices() == clean.choices() == {"k": "b"}


def test_restore_puts_the_measurements_back_and_snapshots_copy_on_write():
    tuner = Tuner()
    _run(tuner)  # first sighting
    _run(tuner)  # the race's first trial
    saved = tuner.snapshot()
    before = [list(v) for v in tuner._entries["k"].times.values()], tuner._entries["k"].seen
    for _ in range(4):
        _run(tuner)
    _run(tuner, "other")
    tuner.restore(saved)
    entry = tuner._entries["k"]
    assert ([list(v) for v in entry.times.values()], entry.seen) == before
    assert set(tuner.choices()) == {"k"}
    # After the restore the race goes on from where the snapshot was taken.
    assert _explore_rest(tuner) == _race(["a", "b", "e", "c"], ["b", "a"])[1:]
    assert tuner.choices() == {"k": "b"}


def _explore_rest(tuner: Tuner) -> list[str]:
    names = []
    while (decision := _run(tuner)).mode == "explore":
        names.append(decision.name)
    return names
