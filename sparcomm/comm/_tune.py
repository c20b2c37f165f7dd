"""``auto``'s measured choice: the cost model proposes, the calls decide (issue 11).

The cost model (:mod:`._cost`) is calibrated once, on a machine whose load changes, and
its predictions of two algorithms are often within a few per cent of each other; a
model chosen that way was up to 1.2-1.4x slower than the fastest algorithm in the
allreduce grid, and stayed wrong when the load changed.  So ``auto`` measures, as
MPI libraries' run-time tuners and Horovod's autotuner do, on the user's own calls:

1. **First sighting** of a *key* (the agreed shape of a call: sizes, every rank's
   non-zero count, dtype, codec, ranks): the model's choice, untimed.  A key that never
   repeats (a codec whose ``k`` changes every step) never pays for tuning.
2. **Exploring**, from the second call of the key, as a race: the candidates (every
   algorithm the model predicts within :data:`EXPLORE_WITHIN` of its best, at most
   :data:`MAX_CANDIDATES`, best first) run :data:`SCREEN_TRIALS` timed calls each;
   the :data:`FINALISTS` fastest of them run on to :data:`TRIALS` timed calls each.
   Cheap calls race longer: a candidate's round goes on past its trials until they add
   up to :data:`CHEAP_CALL_S` each, at most :data:`CHEAP_FACTOR` times the trials, so a
   call of a few milliseconds is judged on the median of up to 15 (single calls that
   short swing by 20-40 % under load).  One candidate's calls run back to back: the
   part of a call's time that the previous call leaves behind (ranks it left out of
   step, waiting in the next agreement) is then charged to the candidate that caused
   it, and each call finds the buffers and caches its own previous call left, as in
   steady state.  Taking turns (a, b, a, b) was tried in session 11: eight allreduce
   grid runs, the orders alternated, could not tell them apart (105 and 106 of 120
   cells within 1.1x), and in training FP16's first bucket chose the slower
   ``reduce_scatter_allgather`` in 1 of 4 runs at 1 Gbit/s (docs/benchmarks.md).  One
   key races at a time on a communicator: a training step's buckets are keys
   called in turn, and a race beside another would time each bucket behind whichever
   candidate the bucket before it is trying.  Measured at 1 Gbit/s
   (docs/benchmarks.md, issue 11, session 9): with races side by side, FP16's last
   bucket chose ``reduce_scatter_allgather`` in 3 of 6 training runs, a step 7-10 %
   slower than ``pipelined``'s; one at a time, in 3 of 3 it chose ``pipelined``.  A
   key waiting for its turn runs the model's choice, untimed, until the racing key has
   been silent for more than twice the longest stretch of calls seen between two
   calls of one key (a step, whatever the number of buckets in it): then the racing
   key is taken to be no longer called, and the waiting key goes ahead.  (A fixed
   limit of 64 calls was reached inside every step of a model with more buckets, and
   "called twice with no call of the racing key in between" let keys called twice in
   a row take turns racing.)
3. **Measured**: the finalist with the least median time runs from then on, unless
   another finalist is within :data:`TIE` of it and the model ranks that one higher:
   a tie goes to the model.  Every
   :data:`CHECK_EVERY`-th call is timed again; when the median of the last
   :data:`CHECKS` checks is more than :data:`DRIFT` times slower or faster than when
   it was chosen (the load changed), the candidates are explored again.

A timed call's seconds (the whole call, agreement and encode included, as a training
loop or a benchmark sees it back to back; this rank's) travel in
one 8-byte ``Allreduce`` (maximum) after the call, so every rank decides on the same
figure: the slowest rank's, which is what the collective cost.  Every decision depends
only on agreed values (the key, the call count of the key, the agreed seconds), so
every rank chooses alike, and a call that raises (on every rank, as the agreement
guarantees) records nothing anywhere.  Timed calls are the exploring ones and one in
:data:`CHECK_EVERY` afterwards; the others add nothing.

Results are identical on every rank whatever the choice; for the codecs whose
algorithms round differently (QSGD's ``reduce_scatter_allgather`` re-quantizes at the
owners), the choice, and so the last bits, can differ from one run to the next, as a
model calibrated on a different day would make it.  :func:`set_tuning` turns the
measurement off for a communicator (the model's choice, always), and
``SPARCOMM_TUNE=0`` in every rank's environment for every communicator.
"""

from __future__ import annotations

import os
import time
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
from mpi4py import MPI

from sparcomm.comm._context import _CommState, comm_state, ring_allreduce_bytes
from sparcomm.comm._stats import AllreduceStats

#: Candidates are the algorithms predicted within this factor of the model's best.
EXPLORE_WITHIN = 2.0
#: At most this many candidates (the best predicted first): every sparse algorithm.  With
#: three, the fastest (the model's fifth, 1.5x its best) was left out of the race in a
#: cell of the allreduce grid, chosen 1.18x slower in two runs.
MAX_CANDIDATES = 5
#: Timed calls of every candidate in the first round of the race.
SCREEN_TRIALS = 2
#: The candidates that run on after the first round.
FINALISTS = 2
#: Timed calls of each finalist in all (their median decides).  Five: on 4 ranks sharing
#: 2 cores, single calls of a few milliseconds swing by 20-30 % under load, and with
#: three the allreduce grid chose a 1.2-1.3x slower candidate in 3 of 30 cells.
TRIALS = 5
#: Finalists whose medians are within this factor of the fastest one's are tied, and
#: the tie goes to the one the model predicts fastest.  A median of 5-15 calls under
#: load does not separate algorithms a few per cent apart; the model's ranking is the
#: better guess then.  In the allreduce grid (docs/benchmarks.md, issue 11, session
#: 12), three of seven cells where the choice was 1.1x slower than the fastest came
#: from races won by 0.4-1.3 % against the model's choice, which the grid then timed
#: 1.14-1.16x faster than the race's winner.
TIE = 1.05
#: Once chosen, every this-many-th call of the key is timed again.
CHECK_EVERY = 32
#: The median of the last CHECKS checks this many times slower (or faster) than the
#: chosen candidate's median when it was chosen starts a new exploration.  On 4 ranks
#: sharing 2 cores under load, single calls swing past 1.5x often: "two checks in a
#: row" re-explored inside steady state (grid run 3), and with a median of three at
#: 1.5x, 3,000 calls of one 2^16 shape beside two busy loops started 10-15 races each
#: (10-12 % of the calls exploring).  A median of five at 2x started 3-4, and the calls
#: were 1-8 % faster on average (docs/benchmarks.md, issue 11, session 12).  The price:
#: a change of load that slows or speeds the calls by less than 2x no longer re-explores.
DRIFT = 2.0
CHECKS = 5
#: Keys remembered per communicator (a program with more distinct shapes starts over).
MAX_KEYS = 4096
#: A candidate's round ends at its trials (SCREEN_TRIALS, then TRIALS) once they add up
#: to this many seconds per trial, else at CHEAP_FACTOR times the trials: calls below
#: 10 ms get more trials, up to 3x.  They cost little, and single calls of a few ms swing
#: the most under load.  The allreduce grid with it (docs/benchmarks.md, issue 11,
#: session 10): 29/30 cells idle and 22/30 under two busy loops, within the spread of
#: the runs before it; kept as the better estimate of a cheap call's median.
CHEAP_CALL_S = 0.010
CHEAP_FACTOR = 3


@dataclass
class _Entry:
    """What the tuner knows of one key."""

    seen: int = 0
    candidates: tuple[str, ...] = ()
    finalists: tuple[str, ...] = ()  # empty during the first round
    times: dict[str, list[float]] = field(default_factory=dict)
    choice: str | None = None
    medians: dict[str, float] = field(default_factory=dict)
    baseline: float = 0.0
    since: int = 0  # calls since the choice
    checks: list[float] = field(default_factory=list)  # the last CHECKS checks
    generation: int = 0  # the Tuner's generation it was last copied in (snapshot)


@dataclass
class Decision:
    """The algorithm a call runs and whether it is timed (:meth:`Tuner.record`)."""

    name: str
    timed: bool
    mode: str  # "model" (first sighting, one candidate, or tuning off), "explore", "measured"
    key: Hashable = None
    start: float = 0.0
    #: The medians (agreed seconds) of the exploration that chose ("measured" only).
    medians: dict[str, float] = field(default_factory=dict)


def _start_race(entry: _Entry) -> None:
    """Few candidates need no first round: all of them are finalists."""
    entry.finalists = entry.candidates if len(entry.candidates) <= FINALISTS else ()


def _done(times: dict[str, list[float]], name: str, trials: int) -> bool:
    """Whether candidate ``name`` has run its ``trials`` of this round: that many, and
    more for cheap calls (see :data:`CHEAP_CALL_S`)."""
    values = times.get(name, ())
    if len(values) < trials:
        return False
    return len(values) >= CHEAP_FACTOR * trials or sum(values) >= trials * CHEAP_CALL_S


def _medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: float(np.median(values)) for name, values in times.items()}


class Tuner:
    """The measured choices of one communicator (see the module docstring)."""

    def __init__(self) -> None:
        self.enabled = os.environ.get("SPARCOMM_TUNE", "1").strip() not in ("0", "")
        self._entries: dict[Hashable, _Entry] = {}
        self._generation = 0
        #: The key whose race is running (one at a time).
        self._exploring: Hashable = None
        #: Calls counted (decide), each key's last call by that count, and the longest
        #: stretch seen between two calls of one key.
        self._calls = 0
        self._last: dict[Hashable, int] = {}
        self._longest_gap = 0

    def snapshot(self) -> object:
        """A handle on the measurements for :meth:`restore` (a ``GradientReducer`` step
        that fails puts them back, as it does the codecs' state).  Copy on write: an
        entry is copied when it first changes after the snapshot, not before."""
        self._generation += 1
        return (
            dict(self._entries),
            self._exploring,
            (self._calls, dict(self._last), self._longest_gap),
        )

    def restore(self, saved: object) -> None:
        """Put the measurements back as :meth:`snapshot` found them."""
        entries, self._exploring, (self._calls, last, self._longest_gap) = cast(
            "tuple[dict[Hashable, _Entry], Hashable, tuple[int, dict[Hashable, int], int]]",
            saved,
        )
        self._entries = dict(entries)
        self._last = dict(last)
        self._generation += 1

    def _writable(self, key: Hashable, entry: _Entry) -> _Entry:
        if entry.generation != self._generation:  # a snapshot may hold it: copy
            entry = replace(
                entry,
                times={name: list(values) for name, values in entry.times.items()},
                medians=dict(entry.medians),
                checks=list(entry.checks),
                generation=self._generation,
            )
            self._entries[key] = entry
        return entry

    def decide(self, key: Hashable, predicted: dict[str, float], started: float) -> Decision:
        """The algorithm for this call of ``key``, given the model's ``predicted``
        seconds per candidate (every rank passes the same); ``started``: the
        ``time.perf_counter()`` at which the call began (a timed call counts from it)."""
        best = min(predicted, key=predicted.__getitem__)
        if not self.enabled:
            return Decision(best, False, "model")
        self._calls += 1
        last = self._last.get(key)
        if last is not None:
            self._longest_gap = max(self._longest_gap, self._calls - last)
        self._last[key] = self._calls
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= MAX_KEYS:
                self._forget()
                self._last[key] = self._calls
            ranked = sorted(predicted, key=predicted.__getitem__)
            limit = EXPLORE_WITHIN * predicted[best]
            entry = _Entry(
                candidates=tuple(n for n in ranked if predicted[n] <= limit)[:MAX_CANDIDATES]
            )
            self._entries[key] = entry
            _start_race(entry)
        if entry.seen == 0 or len(entry.candidates) < 2:
            return Decision(best, False, "model", key)
        if entry.choice is None and self._exploring not in (None, key):
            # Another key's race is running.  Two races at once (a training step's
            # buckets) would time each key's calls behind whichever candidate the
            # other is trying, so this key waits, on the model's choice, untimed,
            # unless the racing key is no longer called (see the module docstring).
            silent = self._calls - self._last.get(self._exploring, self._calls)
            if silent <= 2 * self._longest_gap:
                return Decision(best, False, "model", key)
        if entry.choice is None:  # one candidate's trials back to back (see above)
            self._exploring = key
            if entry.finalists:
                name = next(n for n in entry.finalists if not _done(entry.times, n, TRIALS))
            else:
                name = next(n for n in entry.candidates if not _done(entry.times, n, SCREEN_TRIALS))
            return Decision(name, True, "explore", key, started)
        timed = (entry.since + 1) % CHECK_EVERY == 0
        return Decision(entry.choice, timed, "measured", key, started, entry.medians)

    def record(self, comm: MPI.Comm, decision: Decision, stats: AllreduceStats) -> None:
        """After a call succeeded on every rank: count it and, if it was timed, agree on
        its seconds (the slowest rank's; the ``tune`` phase) and update the key.  A call
        that raised is never recorded, so it leaves no trace in any rank's tuner."""
        entry = self._entries.get(decision.key) if decision.key is not None else None
        if entry is not None:
            entry = self._writable(decision.key, entry)
            entry.seen += 1
            if decision.mode == "measured":
                entry.since += 1
        if not decision.timed:
            return
        local = np.array([time.perf_counter() - decision.start], dtype=np.float64)
        slowest = np.empty(1, dtype=np.float64)
        with stats._phase("tune"):
            comm.Allreduce(local, slowest, op=MPI.MAX)
        moved = ring_allreduce_bytes(local.nbytes, comm.Get_size())
        stats._add_bytes(moved, moved)
        seconds = float(slowest[0])
        if entry is None:  # forgotten (MAX_KEYS) since the decision: nothing to update
            return
        if entry.choice is None:
            entry.times.setdefault(decision.name, []).append(seconds)
            if not entry.finalists and all(
                _done(entry.times, n, SCREEN_TRIALS) for n in entry.candidates
            ):
                medians = _medians(entry.times)
                ranked = sorted(entry.candidates, key=medians.__getitem__)
                entry.finalists = tuple(ranked[:FINALISTS])
            if entry.finalists and all(_done(entry.times, n, TRIALS) for n in entry.finalists):
                medians = _medians(entry.times)
                fastest = min(medians[n] for n in entry.finalists)
                # The candidates are in the model's order, best first: a tie goes to it.
                entry.choice = next(
                    n
                    for n in entry.candidates
                    if n in entry.finalists and medians[n] <= TIE * fastest
                )
                entry.medians = medians
                entry.baseline = medians[entry.choice]
                entry.since, entry.checks = 0, []
                if self._exploring == decision.key:  # the next key's race may start
                    self._exploring = None
            return
        entry.checks = [*entry.checks, seconds][-CHECKS:]
        if len(entry.checks) < CHECKS or entry.baseline <= 0:
            return
        ratio = float(np.median(entry.checks)) / entry.baseline
        if ratio > DRIFT or ratio < 1 / DRIFT:  # the load changed: try the candidates again
            entry.choice, entry.times, entry.since, entry.checks = None, {}, 0, []
            _start_race(entry)

    def choices(self) -> dict[Hashable, str | None]:
        """Each key's measured choice (None: not measured yet)."""
        return {key: entry.choice for key, entry in self._entries.items()}

    def reset(self) -> None:
        """Forget every measurement (the next calls explore again)."""
        self._forget()

    def _forget(self) -> None:
        self._entries.clear()
        self._exploring = None
        self._calls, self._last, self._longest_gap = 0, {}, 0


def tuner_of(state: _CommState) -> Tuner:
    """The tuner of a communicator's state (made on first use)."""
    if state.tuner is None:
        state.tuner = Tuner()
    return cast(Tuner, state.tuner)


def set_tuning(comm: MPI.Comm | None = None, enabled: bool = True) -> None:
    """Measure ``auto``'s choices on ``comm`` (the default) or keep the cost model's.

    Collective: every rank of ``comm`` must pass the same ``enabled`` (ranks that chose
    differently would run different schedules), else every rank raises ``ValueError``.
    Turning it off forgets the measurements.  It applies to ``comm`` itself, not to
    duplicates made before or after (a ``GradientReducer`` duplicates its communicator:
    set ``SPARCOMM_TUNE=0`` in every rank's environment to turn tuning off everywhere).
    """
    comm = MPI.COMM_WORLD if comm is None else comm
    if not isinstance(enabled, bool):
        flag = -1
    else:
        flag = int(enabled)
    flags = comm.allgather(flag)
    if -1 in flags:
        raise TypeError(
            f"enabled must be True or False on every rank, got {enabled!r} on this rank "
            f"(ranks' flags {flags}, -1: not a bool); pass a bool"
        )
    if len(set(flags)) != 1:
        raise ValueError(
            f"set_tuning: ranks disagree on enabled ({[bool(f) for f in flags]} by rank); "
            "every rank must pass the same value, or auto would choose differently on them"
        )
    tuner = tuner_of(comm_state(comm))
    tuner.enabled = enabled
    if not enabled:
        tuner.reset()
