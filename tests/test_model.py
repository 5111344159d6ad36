"""Model test (issue 16): random user actions on either server interleaved with runs of every
kind, with faults, crashes, changed settings and skewed clocks, checked against a small
reference model of docs' sync-rules.md (version 3) that never looks at the tool's code.

The world: a movie watched on both sides, an episode half-way on both, two recordings of one
episode sharing SageTV's show flag (siblings), a
movie Plex holds twice (twins: the same file in two libraries) and a recording split in two
files that Plex stacks as one item.

Steps (hypothesis' stateful testing):
- the user: stop at any position (the first minute and the last 10 % included), finish,
  un-watch, on SageTV or Plex (a twin picked at random; a stop on a watched Plex item is a
  re-watch); time passes;
- the tool: ``all -s``, ``-m ID -s``, ``--undo`` and ``--undo RUN``, ``all --plan F`` then
  ``--apply F`` later, ``-n`` / report-only runs, with and without ``-y``; a full sync with a
  failing write (500 or a dropped connection on the k-th write request) and a full sync killed
  (SIGKILL, as a subprocess) on its (k+1)-th write;
- settings: ``-x`` 30/60/120 and Plex's LibraryVideoPlayedThreshold 80/90/95 %;
- each example draws clock skews for both servers and the Plex server's open switches.

The model keeps, per recording and per side, the base (raw values, as the last run that
wrote left them) and what the user did since (raw values and time of each change seen on that
side: a sibling's flag going up or down with the user's SetWatched/ClearWatched is the user's
change on the sibling too). Runs are classified with today's bounds (§1.2, §6.1). Invariants:
(a) after a successful sync each item shows the three-way merge (§6) of the user's changes on
    both sides (a side the user changed wins; both: §3, the newer, NONE never wins); after a
    failed or ``-n`` run, every side is as it was or as the sync would leave it, and what the
    user did last is still on the side it was done on (after a crash too);
(b) the tool's own writes, half-done steps and side effects are never the user's: nothing is
    written for an item the model says neither side changed (write requests are checked per
    item), and the next sync after a failure or a crash still ends at the merge;
(c) a second quiescent full sync writes nothing;
(d) ``--undo`` puts back the states before the run it names on the items that run wrote,
    unless they changed since; ``--apply`` carries out the plan on items unchanged since it.
Documented exceptions, encoded as such: SageTV's show flag couples the siblings (their SageTV
states are what the writes decided, done in either order, leave: §3.2 Siblings); Plex cannot
take a position at or under 60 s (with ``-x`` under 60: skipped, Plex keeps its state, §3.2);
a Plex server whose scrobble keeps the resume point leaves "watched, resume at p" (§9.3 of the
Plex reference); a run killed after finishing an item may or may not have recorded its base.

``SAGEPLEX_MODEL_EXAMPLES`` (the generated batches run only when it is set) sets the
examples, half of them derandomized (the same every run) and half new; ``SAGEPLEX_MODEL_STEPS``
(default 30) the steps per example; shrinking is on (``SAGEPLEX_MODEL_SHRINK=0`` turns it off).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

import sageplex_sync
from tests.conftest import PROXY_VARIABLES, Env
from tests.fakes.fake_http import Fault
from tests.fakes.world import DAY, HOUR, MIN, SEC, Item, World, at, none, sage_time, watched
from tests.user import NONE, WATCHED, State, User, progress

SHARED_FLAG = "EP0000555001"
PLEX_MIN_PROGRESS_MS = 60_000  # Plex ignores a timeline at or under this (§3.2)
TOLERANCE_MS = 2_000
EXAMPLES = int(os.environ.get("SAGEPLEX_MODEL_EXAMPLES", "50"))
#: The generated batches run on request (SAGEPLEX_MODEL_EXAMPLES=N): the fakes' clocks
#: follow real time, so even the derandomized sequences are not the same from run to run,
#: and long hunts still find, now and then, a case not yet settled (see README, "Model
#: test"). CI runs the pinned sequences below and tests/test_model_classic.py.
random_sequences = pytest.mark.skipif(
    "SAGEPLEX_MODEL_EXAMPLES" not in os.environ,
    reason="the generated model batches run with SAGEPLEX_MODEL_EXAMPLES=N")
STEPS = int(os.environ.get("SAGEPLEX_MODEL_STEPS", "30"))
SHRINK = os.environ.get("SAGEPLEX_MODEL_SHRINK", "1") != "0"
MAIN = Path(sageplex_sync.__file__).resolve()


# -- raw values and states -------------------------------------------------------------------

@dataclass(frozen=True)
class SageRaw:
    watched: bool
    position_ms: int
    stamp_ms: int  # RealWatchedEndTime (SageTV's clock), 0 without a record


@dataclass(frozen=True)
class PlexRaw:
    count: int
    offset_ms: int
    stamp_s: int  # lastViewedAt (Plex's clock), 0 when absent


@dataclass(frozen=True)
class Bounds:
    start_ms: int
    done_ms: int


def classify(position_ms: int, flag: bool, b: Bounds) -> State:
    if b.start_ms <= position_ms < b.done_ms:
        return progress(position_ms)
    if position_ms >= b.done_ms or flag:
        return WATCHED
    return NONE


def sage_cls(raw: SageRaw, b: Bounds) -> State:
    return WATCHED if raw.watched else classify(raw.position_ms, False, b)


def plex_cls(raw: PlexRaw, b: Bounds) -> State:
    return classify(raw.offset_ms, raw.count > 0, b)


def position_at(item: Item, time_ms: int) -> int:
    """The file position of an airing-timeline time (the start of the next segment in a gap)."""
    offset = 0
    for start, end in item.segments:
        if time_ms < start:
            return offset
        if time_ms < end:
            return offset + time_ms - start
        offset += end - start
    return offset


def bounds_of(world: World, item: Item, ignore_ms: int, played: float) -> Bounds:
    """§1.2 (and §1.4 for a stacked split recording), from the servers' facts."""
    airing = world.sage.airing_json(item.airing_id)
    a_start, a_end = airing["AiringStartTime"], airing["AiringEndTime"]
    length = a_end - a_start
    lead = max(0, a_start - item.file_start_ms)
    margin = 10 * MIN if item.kind == "movie" else 5 * MIN
    need = max(length - margin, int(0.66 * length) + 1)
    sage_done = position_at(item, max(a_start, item.file_start_ms) + need)
    duration = item.duration_ms
    return Bounds(max(ignore_ms, lead + 5 * SEC),
                  int(min(0.95 * duration, played * duration, sage_done)))


def same(a: State, b: State) -> bool:
    return a == b


# -- the world -------------------------------------------------------------------------------

@dataclass
class Unit:
    """One SageTV recording and the Plex items holding it (twins: more than one)."""

    name: str
    item: Item
    keys: list[int]
    sibling: str | None = None


def declare(world: World) -> dict[str, Unit]:
    heat = world.movie("Heat", duration_ms=2 * HOUR, sage=watched(ago=DAY), plex=watched(ago=DAY))
    castle = world.episode("Castle", 1, 1, "Flowers for Your Grave", duration_ms=60 * MIN,
                           sage=at(20 * MIN, ago=2 * HOUR), plex=at(20 * MIN, ago=2 * HOUR))
    nanny_a = world.episode("Castle", 1, 2, "Nanny McDead", duration_ms=30 * MIN,
                            show_external_id=SHARED_FLAG, sage=none(), plex=none())
    nanny_b = world.episode("Castle", 1, 2, "Nanny McDead", duration_ms=30 * MIN,
                            show_external_id=SHARED_FLAG, sage=none(), plex=none())
    ronin = world.movie("Ronin", year=1998, duration_ms=90 * MIN)
    copies = world.plex.add_section("Movies (all)", "movie", [world.plex_roots["movie"]],
                                    agent="com.plexapp.agents.imdb",
                                    scanner="SageTV Movie Scanner")
    ronin_copy = world.plex.add_movie(copies, "Ronin", world.plex_item(ronin).files,
                                      ronin.duration_ms, year=1998)
    split = world.episode("Castle", 1, 3, "Hedge Fund Homeboys", duration_ms=60 * MIN,
                          segments=2, sage=none(), plex=none())
    return {
        "heat": Unit("heat", heat, [heat.rating_key]),
        "castle": Unit("castle", castle, [castle.rating_key]),
        "nanny-a": Unit("nanny-a", nanny_a, [nanny_a.rating_key], sibling="nanny-b"),
        "nanny-b": Unit("nanny-b", nanny_b, [nanny_b.rating_key], sibling="nanny-a"),
        "ronin": Unit("ronin", ronin, [ronin.rating_key, ronin_copy]),
        "split": Unit("split", split, [split.rating_key]),
    }


NAMES = ("heat", "castle", "nanny-a", "nanny-b", "ronin", "split")
PAIR = ("nanny-a", "nanny-b")


@dataclass
class Change:
    """What the user left on one side of one recording (one Plex item for twins)."""

    time_ms: int  # the world's clock
    raw: SageRaw | PlexRaw
    key: int | None = None  # the Plex item (twins)
    stamped: bool = False


@dataclass
class View:
    """One reading of what the tool should hold for a recording: its base and the user's
    changes since (a crash leaves two readings: the base recorded or not)."""

    sage: SageRaw
    plex: dict[int, PlexRaw]
    sage_changes: list[Change] = field(default_factory=list)
    plex_changes: list[Change] = field(default_factory=list)


@dataclass
class Snapshot:
    sage: SageRaw
    plex: dict[int, PlexRaw]


@dataclass
class Outcome:
    """What may be left on each side after a run: a set of states for SageTV, and for each
    Plex item; ``writes`` says which sides may get write requests."""

    sage: list[State]
    plex: dict[int, list[State]]
    sage_write: bool = False
    plex_write: set[int] = field(default_factory=set)


def either(one: Outcome, other: Outcome) -> Outcome:
    """What may be left when either of two outcomes is right."""
    return Outcome(one.sage + [s for s in other.sage if s not in one.sage],
                   {k: one.plex[k] + [s for s in other.plex[k] if s not in one.plex[k]]
                    for k in one.plex},
                   one.sage_write or other.sage_write, one.plex_write | other.plex_write)


@dataclass
class Run:
    kind: str  # sync, m, apply, undo, failed, crashed
    before: dict[str, Snapshot]
    after: dict[str, Snapshot]
    written: set[str]  # recordings with a write request
    run_id: int | None = None
    undone: bool = False
    time_ms: int = 0

    @property
    def ok(self) -> bool:
        return self.kind not in ("failed", "crashed")


def note_failure(context: str) -> None:
    """A failed check, kept in ``SAGEPLEX_MODEL_FAILURES`` (a file) when set: a hunt whose
    failing example does not replay (real-time fakes) still says what failed."""
    path = os.environ.get("SAGEPLEX_MODEL_FAILURES")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(context + "\n" + "=" * 79 + "\n")


class SyncModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()
        self.world: World | None = None

    def teardown(self) -> None:
        if os.environ.get("SAGEPLEX_MODEL_TRACE") and self.world is not None:
            print("\n--- example:", *self.log, sep="\n  ", file=sys.stderr)
        self.stack.close()

    # == setting up =========================================================================
    @initialize(skew=st.sampled_from([(0, 0), (0, 0), (7 * MIN, 0), (0, -11 * MIN),
                                      (3 * HOUR, -2 * HOUR)]),
                clears=st.booleans(), past=st.sampled_from(["played", "offset", "ignore"]))
    def start_world(self, skew: tuple[int, int], clears: bool, past: str) -> None:
        self.setup(skew, clears, past)

    def setup(self, skew: tuple[int, int] = (0, 0), clears: bool = True,
              past: str = "played") -> None:
        self.world = World(sage_skew_ms=skew[0], plex_skew_ms=skew[1],
                           plex_options={"scrobble_clears_offset": clears,
                                         "progress_past_threshold": past})
        self.units = declare(self.world)
        servers = self.stack.enter_context(self.world.running())
        self.folder = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
        config = servers.write_config(self.folder / "sageplex_cfg.json")
        self.old_environ = {k: os.environ.get(k) for k in ("SAGEPLEX_CFG", "SAGEPLEX_LOG")}
        self.stack.callback(self.restore_environ)
        os.environ["SAGEPLEX_CFG"] = str(config)
        os.environ["SAGEPLEX_LOG"] = str(self.folder / "sageplex_sync.log")
        self.env = Env(self.world, servers, config, self.folder / "sageplex_sync.log")
        self.state_file = self.folder / "state.sqlite"
        self.user = User(self.world, servers.plex)
        self.ignore_s = 60
        self.played = 0.9
        snap = self.snapshot()
        self.views: dict[str, list[View]] = {
            n: [View(snap[n].sage, dict(snap[n].plex))] for n in NAMES}
        self.history: list[Run] = []
        self.user_times: dict[str, list[tuple[int, bool]]] = {n: [] for n in NAMES}
        self.plan: tuple[Path, dict[str, Snapshot], dict[str, Outcome]] | None = None
        self.crashed_units: set[str] = set()
        self.log: list[str] = []  # the steps, for failure messages
        # the first sync: everything is in sync already, it writes nothing
        self.sync(0, True, True)

    def restore_environ(self) -> None:
        for key, value in self.old_environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    # == reading ============================================================================
    def bounds(self, name: str) -> Bounds:
        return bounds_of(self.world, self.units[name].item, self.ignore_s * SEC, self.played)

    def sage_raw(self, name: str) -> SageRaw:
        item = self.units[name].item
        record = self.world.sage.watch_record(item.airing_id)
        return SageRaw(self.world.sage_watched(item), self.world.sage_position_ms(item),
                       record[3] if record else 0)

    def plex_raw(self, key: int) -> PlexRaw:
        p = self.world.plex.item(key)
        return PlexRaw(p.view_count, p.view_offset_ms, p.last_viewed_at_s or 0)

    def snapshot(self) -> dict[str, Snapshot]:
        return {n: Snapshot(self.sage_raw(n), {k: self.plex_raw(k) for k in u.keys})
                for n, u in self.units.items()}

    def states(self, snap: dict[str, Snapshot], name: str) -> tuple[State, dict[int, State]]:
        b = self.bounds(name)
        s = snap[name]
        return sage_cls(s.sage, b), {k: plex_cls(r, b) for k, r in s.plex.items()}

    def describe(self, name: str) -> str:
        sage, plex = self.states(self.snapshot(), name)
        return f"SageTV {sage}, Plex {list(plex.values())}"

    # == the user ===========================================================================
    POSITIONS = st.one_of(
        st.tuples(st.just("ms"), st.integers(1 * SEC, 3 * MIN)),      # the first minutes
        st.tuples(st.just("frac"), st.floats(0.05, 0.85)),
        st.tuples(st.just("frac"), st.floats(0.85, 0.999)),          # the last 10-15 %
    )

    def act(self, name: str, on_plex: bool, action: str, where: tuple[str, float],
            twin: int, wait_min: int) -> None:
        self.world.clock.advance(wait_min * MIN)
        unit = self.units[name]
        item = unit.item
        kind, value = where
        position = int(value) if kind == "ms" else int(value * item.duration_ms)
        b = self.bounds(name)
        for edge in (b.start_ms, b.done_ms, PLEX_MIN_PROGRESS_MS):
            if abs(position - edge) < 1500:
                position = edge + 1500  # not on a boundary: rounding is not what is tested
        key = unit.keys[twin % len(unit.keys)]
        self.log.append(f"user: {action} {name} on {'Plex ' + str(key) if on_plex else 'SageTV'}"
                        + (f" at {position / MIN:.2f} min" if action == "watch" else ""))
        before = self.snapshot()
        if on_plex:
            {"watch": lambda: self.user.plex_stop_at(item, position, rating_key=key),
             "finish": lambda: self.user.plex_finish(item, rating_key=key),
             "unwatch": lambda: self.user.plex_unwatch(item, rating_key=key)}[action]()
        else:
            {"watch": lambda: self.sage_stop_at(item, position),
             "finish": lambda: self.sage_finish(item),
             "unwatch": lambda: self.world.sage.clear_watched(item.airing_id)}[action]()
        self.record_user_changes(before, self.snapshot())

    # the user acts more often than the tool runs: the same rule registered several times
    ACT = rule(name=st.sampled_from(NAMES + PAIR), on_plex=st.booleans(),
               action=st.sampled_from(("watch", "watch", "finish", "unwatch")),
               where=POSITIONS, twin=st.integers(0, 1), wait_min=st.integers(1, 600))

    @ACT
    def act_1(self, **kw) -> None:
        self.act(**kw)

    @ACT
    def act_2(self, **kw) -> None:
        self.act(**kw)

    @ACT
    def act_3(self, **kw) -> None:
        self.act(**kw)

    @ACT
    def act_4(self, **kw) -> None:
        self.act(**kw)

    @ACT
    def act_5(self, **kw) -> None:
        self.act(**kw)

    def sage_stop_at(self, item: Item, position_ms: int) -> None:
        """A viewing on the TV from the start, stopped at ``position_ms``: stamped with
        SageTV's own clock. Watching a watched show again clears *watched* first."""
        sage = self.world.sage
        if sage.airing_json(item.airing_id).get("IsWatched"):
            sage.clear_watched(item.airing_id)
        now = self.world.sage_clock_ms()
        airing = sage.airing_json(item.airing_id)
        start = max(airing["AiringStartTime"], item.file_start_ms)
        sage.set_watch_record(item.airing_id, start, sage_time(item, position_ms),
                              now - position_ms, now)

    def sage_finish(self, item: Item) -> None:
        sage = self.world.sage
        airing = sage.airing_json(item.airing_id)
        now = self.world.sage_clock_ms()
        start = max(airing["AiringStartTime"], item.file_start_ms)
        end = airing["AiringEndTime"]
        sage.set_watch_record(item.airing_id, start, end, now - (end - start), now)
        sage.set_show_watched(item.show_external_id, airing["AiringStartTime"])

    def record_user_changes(self, before: dict[str, Snapshot], after: dict[str, Snapshot]
                            ) -> None:
        now = self.world.clock.ms()
        for name in NAMES:
            b, a = before[name], after[name]
            if a != b:
                self.user_times[name].append((now, a.sage.stamp_ms not in (0, b.sage.stamp_ms)
                                              or any(a.plex[k].stamp_s not in (0, b.plex[k].stamp_s)
                                                     for k in a.plex)))
            if a.sage != b.sage:
                change = Change(now, a.sage, stamped=a.sage.stamp_ms not in (0, b.sage.stamp_ms))
                for view in self.views[name]:
                    view.sage_changes.append(change)
            for key in a.plex:
                if a.plex[key] != b.plex[key]:
                    stamped = a.plex[key].stamp_s not in (0, b.plex[key].stamp_s)
                    change = Change(now, a.plex[key], key, stamped)
                    for view in self.views[name]:
                        view.plex_changes.append(change)

    @rule(minutes=st.integers(1, 3 * 24 * 60))
    def time_passes(self, minutes: int) -> None:
        self.world.clock.advance(minutes * MIN)

    # == settings ===========================================================================
    @rule(ignore_s=st.sampled_from([30, 60, 120]), played=st.sampled_from([0.8, 0.9, 0.95]))
    def change_settings(self, ignore_s: int, played: float) -> None:
        self.log.append(f"settings: -x {ignore_s}, Plex threshold {played:.0%}")
        if ignore_s != self.ignore_s:
            # A plan's positions are written as planned: one made with another -x may hold
            # a position that today's -x ignores. The model applies a plan under the -x it
            # was made with (the server's threshold may change in between).
            self.plan = None
        self.ignore_s = ignore_s
        self.played = played
        self.world.plex.played_threshold = played

    # == the reference model ================================================================
    def user_side(self, name: str, view: View, b: Bounds
                  ) -> tuple[bool, list[State], int, bool, list[State], int]:
        """(SageTV changed, its states, time; Plex changed, its states, time) per §6.1."""
        sage_changed, sage_states, sage_time_ms = False, [], 0
        if view.sage_changes:
            last = view.sage_changes[-1]
            state = sage_cls(last.raw, b)
            if state != sage_cls(view.sage, b) or last.raw.stamp_ms > view.sage.stamp_ms:
                # §1.1: SageTV's last-watched time is the recording's own watch record; a
                # change that left none (the show flag set through a sibling, a menu mark)
                # has no time, and any dated viewing on Plex is newer.
                sage_changed, sage_states = True, [state]
                sage_time_ms = last.time_ms if last.stamped else 0
        plex_changed, plex_states, plex_time_ms = False, [], 0
        latest: dict[int, Change] = {}
        for change in view.plex_changes:
            latest[change.key] = change
        changed = [c for k, c in latest.items()
                   if plex_cls(c.raw, b) != plex_cls(view.plex[k], b)
                   or c.raw.stamp_s > view.plex[k].stamp_s]
        if changed:
            changed.sort(key=lambda c: c.time_ms)
            plex_changed = True
            last = changed[-1]
            plex_states = [plex_cls(last.raw, b)]
            plex_time_ms = last.time_ms
            stamped = [c for c in changed if c.raw.stamp_s]
            if stamped and stamped[-1] is not last:  # "the newest of theirs" (§4)
                newest = max(stamped, key=lambda c: c.raw.stamp_s)
                if plex_cls(newest.raw, b) not in plex_states:
                    plex_states.append(plex_cls(newest.raw, b))
        return sage_changed, sage_states, sage_time_ms, plex_changed, plex_states, plex_time_ms

    def results(self, name: str) -> list[State | None]:
        """The merge (§6) of each reading of the recording: None when neither side changed."""
        b = self.bounds(name)
        out: list[State | None] = []
        for view in self.views[name]:
            sc, ss, st_, pc, ps, pt = self.user_side(name, view, b)
            if not sc and not pc:
                out.append(None)
            elif sc and not pc:
                out.extend(ss)
            elif pc and not sc:
                out.extend(ps)
            else:
                for s, p in itertools.product(ss, ps):
                    if s == p or p == NONE:
                        out.append(s)
                    elif s == NONE:
                        out.append(p)
                    else:
                        out.append(p if pt > st_ else s)  # a tie goes to SageTV
        return out

    def plex_after(self, key: int, result: State, b: Bounds) -> list[State]:
        """What a Plex item shows after the tool writes ``result`` to it."""
        now = plex_cls(self.plex_raw(key), b)
        if now == result:
            return [now]
        if result.kind == "PROGRESS" and result.position_ms <= PLEX_MIN_PROGRESS_MS:
            return [now]  # Plex cannot take it: skipped (§3.2)
        raw = self.plex_raw(key)
        if result == WATCHED and not self.world.plex.scrobble_clears_offset and raw.offset_ms:
            return [WATCHED, classify(raw.offset_ms, True, b)]  # the offset may stay
        return [result]

    def expect(self, scope: set[str], targets: dict[str, list[State | None]]
               ) -> dict[str, Outcome]:
        """Per recording, what each side may show after a successful run that carries out
        ``targets`` (None: write nothing) on the recordings in ``scope``."""
        snap = self.snapshot()
        out: dict[str, Outcome] = {}
        sage_targets: dict[str, list[State]] = {}
        for name in NAMES:
            b = self.bounds(name)
            sage_now, plex_now = self.states(snap, name)
            outcome = Outcome([sage_now], {k: [v] for k, v in plex_now.items()})
            if name in scope:
                sage_opts: list[State] = []
                plex_opts: dict[int, list[State]] = {k: [] for k in plex_now}
                for result in targets[name]:
                    if result is None:
                        sage_opts.append(sage_now)
                        for k, v in plex_now.items():
                            plex_opts[k].append(v)
                        continue
                    sage_opts.append(result)
                    if sage_now != result:
                        outcome.sage_write = True
                        sage_targets.setdefault(name, []).append(result)
                    for k, v in plex_now.items():
                        after = self.plex_after(k, result, b)
                        plex_opts[k].extend(after)
                        if v != result:
                            outcome.plex_write.add(k)
                outcome.sage = sage_opts
                outcome.plex = plex_opts
            out[name] = outcome
        # SageTV's show flag: the siblings end as the writes decided leave them (either order)
        if any(n in sage_targets for n in PAIR):
            options = self.simulate_pair({n: sage_targets[n] for n in PAIR if n in sage_targets})
            for name in PAIR:
                out[name].sage = sorted({o[name] for o in options}, key=repr)
        return out

    def simulate_pair(self, writes: dict[str, list[State]]) -> list[dict[str, State]]:
        """Carry out the siblings' SageTV writes on the fake itself, in every order, put
        everything back, and return what each order left (§3.2)."""
        outcomes: list[dict[str, State]] = []
        names = list(writes)
        choices = [[(n, r) for r in writes[n]] for n in names]
        for combo in itertools.product(*choices):
            for order in itertools.permutations(combo):
                for skip in (False, True):
                    saved = self.save_sage()
                    try:
                        for index, (name, result) in enumerate(order):
                            if skip and index > 0 and sage_cls(
                                    self.sage_raw(name), self.bounds(name)) == result:
                                continue
                            self.sage_write(name, result)
                        outcomes.append({n: sage_cls(self.sage_raw(n), self.bounds(n))
                                         for n in PAIR})
                    finally:
                        self.restore_sage(saved)
        return outcomes

    def sage_write(self, name: str, result: State) -> None:
        """§3.2: how the tool writes one state to SageTV."""
        sage, item = self.world.sage, self.units[name].item
        if result == WATCHED:
            sage.set_watched(item.airing_id)
        elif result == NONE:
            sage.clear_watched(item.airing_id)
        else:
            target = sage_time(item, result.position_ms)
            airing = sage.airing_json(item.airing_id)
            if airing.get("IsWatched") or (airing.get("WatchedEndTime") or 0) > target:
                sage.clear_watched(item.airing_id)
            sage.set_watched_times(item.airing_id, target,
                                   self.world.sage_clock_ms() - result.position_ms)

    def save_sage(self) -> tuple[dict, dict]:
        sage = self.world.sage
        with sage._lock:
            return dict(sage._watch), {k: s.last_watched for k, s in sage._shows.items()}

    def restore_sage(self, saved: tuple[dict, dict]) -> None:
        sage = self.world.sage
        with sage._lock:
            sage._watch.clear()
            sage._watch.update(saved[0])
            for key, value in saved[1].items():
                sage._shows[key].last_watched = value
            for cache in sage._frags.values():
                cache.clear()

    # == running the tool ===================================================================
    def run(self, *argv: str) -> tuple[int, str]:
        self.env.clear_logs()
        result = self.env.run(*argv)
        return result.code, f"exit {result.code}\n{result.out}\n{result.err}"

    def common(self, yes: bool = True) -> list[str]:
        return ["--state", str(self.state_file), "-x", str(self.ignore_s)] + (["-y"] if yes
                                                                              else [])

    def written(self) -> tuple[set[int], set[int]]:
        return self.env.written_airings(), self.env.written_rating_keys()

    def written_units(self) -> set[str]:
        airings, keys = self.written()
        return {n for n, u in self.units.items()
                if u.item.airing_id in airings or keys.intersection(u.keys)}

    def run_ids(self) -> list[int]:
        if not self.state_file.exists():
            return []
        try:
            with contextlib.closing(sqlite3.connect(self.state_file)) as db:
                return [r[0] for r in db.execute("SELECT run_id FROM runs ORDER BY run_id")]
        except sqlite3.Error:
            return []

    def check(self, name: str, outcome: Outcome, what: str, out: str) -> None:
        sage, plex = self.states(self.snapshot(), name)
        context = (f"{what}: {name}: expected SageTV in {outcome.sage}, Plex in "
                   f"{list(outcome.plex.values())}; got SageTV {sage}, Plex {list(plex.values())}"
                   f"\nsteps:\n  " + "\n  ".join(self.log[-25:]) + f"\n{out}")
        if sage not in outcome.sage or any(s not in outcome.plex[k] for k, s in plex.items()):
            note_failure(context)
        assert sage in outcome.sage, context
        for key, state in plex.items():
            assert state in outcome.plex[key], context

    def check_writes(self, expected: dict[str, Outcome], allowed: set[str], out: str) -> None:
        """(b) no write request for a side the model says needs none."""
        airings, keys = self.written()
        for name, outcome in expected.items():
            unit = self.units[name]
            if name in allowed:
                continue
            if unit.item.airing_id in airings:
                assert outcome.sage_write, (
                    f"{name}: SageTV written though neither side changed it (the user's last "
                    f"change: {self.last_changes(name)})\nsteps:\n  "
                    + "\n  ".join(self.log[-25:]) + f"\n{out}")
            for key in keys.intersection(unit.keys):
                assert key in outcome.plex_write, (
                    f"{name}: Plex {key} written though the model wants nothing written there "
                    f"(the user's changes: {self.last_changes(name)})\nsteps:\n  "
                    + "\n  ".join(self.log[-25:]) + f"\n{out}")

    def last_changes(self, name: str) -> str:
        view = self.views[name][0]
        return f"SageTV {view.sage_changes[-1:]}, Plex {view.plex_changes[-1:]}"

    def rebase(self, names: set[str], snap: dict[str, Snapshot]) -> None:
        for name in names:
            self.views[name] = [View(snap[name].sage, dict(snap[name].plex))]

    def rebase_sage(self, name: str, raw: SageRaw) -> None:
        """A side effect of the run's writes on a sibling: its SageTV base moves, whatever the
        user did there before is overwritten by the flag (§3.2 Siblings)."""
        for view in self.views[name]:
            view.sage = raw
            view.sage_changes = []

    def after_success(self, kind: str, scope: set[str], expected: dict[str, Outcome],
                      before: dict[str, Snapshot], out: str, touched: set[str] | None = None
                      ) -> Run:
        after = self.snapshot()
        for name in NAMES:
            self.check(name, expected[name], kind, out)
        allowed = set(self.crashed_units)
        self.check_writes(expected, allowed, out)
        self.crashed_units = set()
        self.rebase(touched if touched is not None else scope, after)
        for name in set(NAMES) - (touched if touched is not None else scope):
            if after[name].sage != before[name].sage:
                self.rebase_sage(name, after[name].sage)
        run = Run(kind, before, after, self.written_units())
        self.record_run(run)
        return run

    def record_run(self, run: Run) -> None:
        run.time_ms = self.world.clock.ms()
        known = {r.run_id for r in self.history}
        new = [i for i in self.run_ids() if i not in known]
        if new:
            run.run_id = new[-1]
        self.history.append(run)

    def quiet(self) -> None:
        """(c) a second full sync right after writes nothing and changes nothing."""
        before = self.snapshot()
        code, out = self.run("all", "-s", *self.common())
        assert code == 0, out
        writes = [(q.function, dict(q.query)) for q in self.env.writes()]
        assert writes == [], f"a second sync wrote: {writes}\nsteps:\n  " + "\n  ".join(
            self.log[-25:]) + f"\n{out}"
        assert self.snapshot() == before
        self.record_run(Run("sync", before, before, set()))

    # -- full sync -------------------------------------------------------------------------
    @rule(wait_min=st.integers(0, 600), yes=st.booleans(), quiet=st.booleans())
    def sync(self, wait_min: int, yes: bool, quiet: bool) -> None:
        self.world.clock.advance(wait_min * MIN)
        self.log.append(f"run: all -s{' -y' if yes else ''} -x {self.ignore_s}")
        scope = set(NAMES)
        expected = self.expect(scope, {n: self.results(n) for n in NAMES})
        before = self.snapshot()
        code, out = self.run("all", "-s", *self.common(yes))
        assert code == 0, out
        self.after_success("sync", scope, expected, before, out)
        if quiet:
            self.quiet()

    # -- one item --------------------------------------------------------------------------
    @rule(name=st.sampled_from(NAMES), twin=st.integers(0, 1), yes=st.booleans())
    def sync_one(self, name: str, twin: int, yes: bool) -> None:
        unit = self.units[name]
        key = unit.keys[twin % len(unit.keys)]
        self.log.append(f"run: -m {key} ({name}) -s")
        expected = self.expect({name}, {name: self.results(name)})
        before = self.snapshot()
        code, out = self.run("-m", str(key), "-s", *self.common(yes))
        assert code == 0, out
        self.after_success("m", {name}, expected, before, out)

    # -- writes nothing --------------------------------------------------------------------
    @rule(how=st.sampled_from(["-n", "report", "-m -n", "undo -n"]), name=st.sampled_from(NAMES))
    def simulate(self, how: str, name: str) -> None:
        argv = {"-n": ["all", "-s", "-n"], "report": ["all"],
                "-m -n": ["-m", str(self.units[name].keys[0]), "-s", "-n"],
                "undo -n": ["--undo", "-n"]}[how]
        self.log.append(f"run: {' '.join(argv)}")
        before = self.snapshot()
        state_before = self.state_file.read_bytes() if self.state_file.exists() else None
        code, out = self.run(*argv, *self.common())
        assert code in (0, 1), out  # --undo -n with nothing to undo says so
        assert self.env.writes() == [], f"{how} wrote: {self.env.writes()}\n{out}"
        assert self.snapshot() == before
        if state_before is not None:
            assert self.state_file.read_bytes() == state_before, f"{how} changed the state"

    # -- plan and apply --------------------------------------------------------------------
    @rule()
    def make_plan(self) -> None:
        path = self.folder / f"plan-{len(self.log)}.json"
        self.log.append(f"run: all --plan {path.name}")
        code, out = self.run("all", "--plan", str(path), *self.common())
        assert code == 0, out
        assert self.env.writes() == []
        targets = {n: self.results(n) for n in NAMES}
        self.plan = (path, self.snapshot(), self.expect(set(NAMES), targets))
        self.plan_time = self.world.clock.ms()
        self.plan_targets = targets

    @precondition(lambda self: self.plan is not None)
    @rule(yes=st.booleans())
    def apply_plan(self, yes: bool) -> None:
        path, then, planned = self.plan
        self.plan = None  # a plan is applied once
        self.log.append(f"run: --apply {path.name}")
        now = self.snapshot()
        writing = {n for n in NAMES if planned[n].sage_write or planned[n].plex_write}
        unchanged = {n for n in writing
                     if self.unchanged_since(n, then[n], now[n], self.plan_time)}
        targets = {n: [t for t in self.plan_targets[n]] for n in writing}
        expected = self.expect(unchanged, {n: targets[n] for n in unchanged})
        # A run killed since the plan may have changed an item by its own steps: §6.4
        # excepts those, so the plan may still hold there (the model does not follow
        # which steps took): carried out or skipped, either is right.
        maybe = (writing - unchanged) & self.crashed_units
        if maybe:
            applied = self.expect(unchanged | maybe, {n: targets[n] for n in unchanged | maybe})
            expected = {n: either(expected[n], applied[n]) for n in NAMES}
        # Runs with today's -x, as the model classifies with it.
        argv = ["--apply", str(path), *self.common(yes)]
        code, out = self.run(*argv)
        assert code == 0, out
        after = self.snapshot() if maybe else now
        carried = {n for n in maybe if after[n] != now[n]}
        self.after_success("apply", unchanged | carried, expected, now, out)

    def unchanged_since(self, name: str, then: Snapshot, now: Snapshot, since_ms: int) -> bool:
        """§6.4: neither side changed by state (today's bounds; positions within 2 s) nor
        viewed by the user since (a newer last-watched time; the tool's own stamps are not a
        viewing)."""
        b = self.bounds(name)
        if sage_cls(then.sage, b) != sage_cls(now.sage, b):
            return False
        for key, raw in now.plex.items():
            if plex_cls(then.plex[key], b) != plex_cls(raw, b):
                return False
        return not any(t > since_ms and stamped for t, stamped in self.user_times[name])

    # -- undo ------------------------------------------------------------------------------
    def undo_target(self) -> Run | None:
        for run in reversed(self.history):
            if run.kind != "undo" and run.written and not run.undone:
                return run
        return None

    def bare_undo_is_defined(self) -> bool:
        target = self.undo_target()
        if target is None:
            return False
        later = self.history[self.history.index(target):]
        return all(r.ok for r in later)

    @precondition(lambda self: self.bare_undo_is_defined())
    @rule()
    def undo(self) -> None:
        self.do_undo(self.undo_target(), [])

    @precondition(lambda self: any(r.ok and r.written and r.run_id for r in self.history))
    @rule(pick=st.integers(0, 10))
    def undo_run(self, pick: int) -> None:
        runs = [r for r in self.history if r.ok and r.written and r.run_id]
        target = runs[pick % len(runs)]
        self.do_undo(target, [str(target.run_id)])

    def do_undo(self, target: Run, number: list[str]) -> None:
        self.log.append(f"run: --undo {' '.join(number)} (a {target.kind} run)")
        now = self.snapshot()
        restore = {n for n in target.written
                   if self.unchanged_since(n, target.after[n], now[n], target.time_ms)
                   and self.states(target.before, n) != self.states(target.after, n)}
        expected: dict[str, Outcome] = {}
        targets: dict[str, list[State | None]] = {}
        for name in restore:
            sage_before, _ = self.states(target.before, name)
            targets[name] = [sage_before]
        expected = self.expect(restore, targets)
        for name in restore:  # each Plex item back to its own state before (twins)
            b = self.bounds(name)
            _, plex_before = self.states(target.before, name)
            for key, state in plex_before.items():
                expected[name].plex[key] = self.plex_after(key, state, b)
                if plex_cls(now[name].plex[key], b) != state:
                    expected[name].plex_write.add(key)
        code, out = self.run("--undo", *number, *self.common(False))
        assert code == 0, out
        for name in restore:
            self.log.append(f"  undo restores {name}")
        run = self.after_success("undo", restore, expected, now, out)
        target.undone = True
        run.undone = False

    # -- a write fails ---------------------------------------------------------------------
    def write_counter(self, k: int, then: callable) -> callable:
        lock = threading.Lock()
        seen = [0]
        writes = self.world.sage.WRITE_FUNCTIONS | self.world.plex.WRITE_FUNCTIONS

        def when(request) -> bool:
            if request.function not in writes:
                return False
            with lock:
                seen[0] += 1
                hit = seen[0] == k
            if hit:
                then()
            return hit
        return when

    @rule(k=st.integers(1, 4), drop=st.booleans())
    def sync_with_failing_write(self, k: int, drop: bool) -> None:
        self.log.append(f"run: all -s, write {k} {'dropped' if drop else 'answered 500'}")
        expected = self.expect(set(NAMES), {n: self.results(n) for n in NAMES})
        before = self.snapshot()
        when = self.write_counter(k, lambda: None)
        fault = Fault(when=when, drop=drop, status=None if drop else 500, times=1)
        self.env.sage.add_fault(fault)
        self.env.plex.add_fault(fault)
        try:
            code, out = self.run("all", "-s", *self.common())
        finally:
            self.env.sage.clear_faults()
            self.env.plex.clear_faults()
        if fault.hits == 0 or code == 0:
            assert code == 0, out
            self.after_success("sync", set(NAMES), expected, before, out)
            return
        assert code == 1, out
        self.after_failure("failed", expected, before, out)

    def after_failure(self, kind: str, expected: dict[str, Outcome],
                      before: dict[str, Snapshot], out: str) -> None:
        """(a) every side as it was or as the sync would leave it (a crash: what the user did
        last is still where it was done); the recordings the run finished get their base."""
        after = self.snapshot()
        done: set[str] = set()
        # The report names the items whose write failed: their state may look like an
        # accepted outcome (a scrobble that keeps the offset) but their base is not new.
        failed = {int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s.*\[failed\]", out, re.M)}
        for name in NAMES:
            sage, plex = self.states(after, name)
            sage_was, plex_was = self.states(before, name)
            finished = sage in expected[name].sage and all(
                plex[k] in expected[name].plex[k] for k in plex) and not failed & set(plex)
            if finished:
                done.add(name)
            if kind == "failed" and name not in PAIR:
                assert sage in expected[name].sage or sage == sage_was, \
                    f"{name}: SageTV {sage} after a failed run (was {sage_was}, expected " \
                    f"{expected[name].sage})\n{out}"
                for key in plex:
                    assert plex[key] in expected[name].plex[key] or plex[key] == plex_was[key], \
                        f"{name}: Plex {plex[key]} after a failed run\n{out}"
            self.check_user_side_kept(name, after)
        written = self.written_units()
        run = Run(kind, before, after, written)
        if kind == "failed":
            self.rebase(done, after)
        else:
            for name in done:
                self.views[name].append(View(after[name].sage, dict(after[name].plex)))
            self.crashed_units |= written
        self.record_run(run)

    def check_user_side_kept(self, name: str, after: dict[str, Snapshot]) -> None:
        """What the user did last, when it wins, is still on the side it was done on."""
        if name in PAIR:
            return
        b = self.bounds(name)
        view = self.views[name][0]
        last_sage = view.sage_changes[-1] if view.sage_changes else None
        last_plex = view.plex_changes[-1] if view.plex_changes else None
        results = self.results(name)
        if last_sage and (not last_plex or last_sage.time_ms > last_plex.time_ms):
            state = sage_cls(last_sage.raw, b)
            if results == [state]:
                assert sage_cls(after[name].sage, b) == state, \
                    f"{name}: the user's {state} on SageTV is gone: {sage_cls(after[name].sage, b)}"
        elif last_plex:
            state = plex_cls(last_plex.raw, b)
            if results == [state] and len(self.units[name].keys) == 1:
                assert plex_cls(after[name].plex[last_plex.key], b) == state, \
                    f"{name}: the user's {state} on Plex is gone"

    # -- the run is killed -----------------------------------------------------------------
    @precondition(lambda self: len([r for r in self.history if r.kind == "crashed"]) < 2)
    @rule(k=st.integers(0, 3))
    def sync_killed(self, k: int) -> None:
        self.log.append(f"run: all -s killed at write {k + 1}")
        expected = self.expect(set(NAMES), {n: self.results(n) for n in NAMES})
        before = self.snapshot()
        holder: list[subprocess.Popen] = []

        def kill() -> None:
            if holder:
                os.kill(holder[0].pid, signal.SIGKILL)
        when = self.write_counter(k + 1, kill)
        fault = Fault(when=when, drop=True, times=1)
        self.env.clear_logs()
        self.env.sage.add_fault(fault)
        self.env.plex.add_fault(fault)
        environ = {key: v for key, v in os.environ.items() if key not in PROXY_VARIABLES}
        try:
            process = subprocess.Popen(
                [sys.executable, str(MAIN), "all", "-s", *self.common()], cwd=MAIN.parent,
                env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)
            holder.append(process)
            out, err = process.communicate(timeout=60)
        finally:
            self.env.sage.clear_faults()
            self.env.plex.clear_faults()
        text = f"exit {process.returncode}\n{out}\n{err}"
        if fault.hits == 0:
            assert process.returncode == 0, text
            self.after_success("sync", set(NAMES), expected, before, text)
            return
        assert process.returncode == -signal.SIGKILL, text
        self.after_failure("crashed", expected, before, text)


# -- the tests -----------------------------------------------------------------------------

def machine_settings(examples: int, derandomize: bool) -> settings:
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if SHRINK else [])
    return settings(max_examples=examples, stateful_step_count=STEPS, deadline=None,
                    database=None, phases=phases, derandomize=derandomize,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(autouse=True)
def no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


@random_sequences
def test_model_fixed_seed() -> None:
    """The same sequences every run (hypothesis derandomized)."""
    run_state_machine_as_test(SyncModel, settings=machine_settings(max(1, EXAMPLES // 2), True))


@random_sequences
def test_model_random() -> None:
    """New sequences every run: a failure prints the shrunk steps."""
    run_state_machine_as_test(SyncModel, settings=machine_settings(max(1, EXAMPLES - EXAMPLES // 2),
                                                                   False))


SEPARATE = int(os.environ.get("SAGEPLEX_MODEL_SEPARATE", "0"))


@pytest.mark.skipif(not SEPARATE, reason="separate sequences run with SAGEPLEX_MODEL_SEPARATE=N")
@pytest.mark.parametrize("number", range(SEPARATE))
def test_model_separate(number: int) -> None:
    """One new sequence per test (for a long hunt): the fakes follow real time, so an
    engine generating many sequences can meet one that went differently the second time
    (FlakyStrategyDefinition) and stop the batch; a sequence of its own never does, and
    the batch spreads over the suite's workers."""
    run_state_machine_as_test(SyncModel, settings=machine_settings(1, False))


# -- pinned sequences ------------------------------------------------------------------------

@contextlib.contextmanager
def machine(skew: tuple[int, int] = (0, 0), clears: bool = True, past: str = "played"):
    m = SyncModel()
    try:
        m.setup(skew, clears, past)
        yield m
    finally:
        m.teardown()


def test_pinned_sibling_flag_hides_and_exposes_an_own_resume_point() -> None:
    """Recording B's own SageTV resume point (3:10): the sync's SetWatched of A (finished on
    Plex) makes B watched through the shared show flag, a later ClearWatched of A (un-watched on
    Plex) exposes the 3:10 again: it must reach Plex, not be "neither side changed"."""
    with machine() as m:
        m.act("nanny-b", False, "watch", ("ms", 3 * MIN + 10 * SEC), 0, 30)
        m.act("nanny-a", True, "finish", ("frac", 0.5), 0, 30)
        m.sync(10, True, False)
        m.act("nanny-a", True, "unwatch", ("frac", 0.5), 0, 30)
        m.sync(10, True, True)
    with machine() as m:  # the same with the user's own SetWatched and ClearWatched of A
        m.act("nanny-b", False, "watch", ("ms", 3 * MIN + 10 * SEC), 0, 30)
        m.sync(10, True, False)
        m.act("nanny-a", False, "finish", ("frac", 0.5), 0, 30)
        m.sync(10, True, False)
        m.act("nanny-a", False, "unwatch", ("frac", 0.5), 0, 30)
        m.sync(10, True, True)


def test_pinned_rewatch_on_plex_is_progress() -> None:
    """A re-watch on Plex (viewCount > 0, a position) is PROGRESS, not WATCHED (§1.3)."""
    with machine() as m:
        m.act("heat", True, "watch", ("frac", 0.4), 0, 60)
        m.sync(10, True, True)


def test_pinned_sibling_side_effect_of_one_item_run() -> None:
    """``-m A``'s ClearWatched un-watches B on SageTV: the next full sync must not take that
    for the user's un-watch of B."""
    with machine() as m:
        m.act("nanny-a", False, "finish", ("frac", 0.5), 0, 30)
        m.act("nanny-b", True, "finish", ("frac", 0.5), 0, 30)
        m.sync(10, True, False)
        m.act("nanny-a", True, "unwatch", ("frac", 0.5), 0, 30)
        m.sync_one("nanny-a", 0, True)
        m.sync(10, True, True)


def test_pinned_half_done_write_is_not_an_unwatch() -> None:
    """A re-watch on Plex needs ClearWatched then SetWatchedTimes on SageTV; the second fails
    or the run is killed after the first: the next sync finishes it, never un-watches Plex."""
    with machine() as m:
        m.act("castle", False, "finish", ("frac", 0.5), 0, 30)
        m.sync(10, True, False)
        m.act("castle", True, "watch", ("frac", 0.3), 0, 30)
        m.sync_with_failing_write(2, False)
        m.sync(10, True, True)
        m.act("heat", True, "watch", ("frac", 0.3), 0, 30)
        m.sync_killed(1)
        m.sync(10, True, True)


def test_pinned_undo_and_apply_skip_a_newer_viewing() -> None:
    """An undo or a plan never beats a newer viewing (§6.4): a state changed since, or the
    same state viewed again (a newer last-watched time)."""
    with machine() as m:
        m.act("castle", False, "finish", ("frac", 0.5), 0, 30)
        m.sync(10, True, False)
        m.act("castle", True, "finish", ("frac", 0.5), 0, 30)  # watched again: newer
        m.undo()
        m.sync(10, True, True)
    with machine() as m:
        m.act("ronin", True, "watch", ("frac", 0.3), 0, 30)
        m.sync(10, True, False)
        m.act("ronin", False, "watch", ("frac", 0.6), 0, 30)
        m.undo()
        m.act("castle", True, "finish", ("frac", 0.3), 0, 30)
        m.make_plan()
        m.act("castle", False, "watch", ("frac", 0.5), 0, 30)
        m.apply_plan(True)
        m.sync(10, True, True)


def test_pinned_changed_settings_are_not_user_changes() -> None:
    """A base taken at 90 % and a position of 85 % (PROGRESS on both sides) is WATCHED on both
    sides at 80 %: that is not SageTV changing, so the user's un-watch on Plex wins."""
    with machine() as m:
        m.act("castle", True, "watch", ("frac", 0.85), 0, 30)
        m.sync(10, True, False)
        m.change_settings(60, 0.8)
        m.act("castle", True, "unwatch", ("frac", 0.5), 0, 30)
        m.sync(10, True, True)
    with machine() as m:
        m.act("castle", True, "watch", ("frac", 0.85), 0, 30)
        m.act("split", False, "watch", ("ms", 100 * SEC), 0, 30)
        m.sync(10, True, True)
        m.change_settings(120, 0.8)
        m.sync(10, True, True)
        m.change_settings(30, 0.95)
        m.sync(10, True, True)


def test_pinned_killed_run_sibling_flag_over_a_newer_position() -> None:
    """The user stops B at 6:22 on SageTV (its own record) and finishes A on Plex. The sync
    does SetWatched(A), which makes B watched through the shared show flag, and is killed
    before B's position reaches Plex. B watched on SageTV is the killed run's doing: the
    next sync must still give Plex B's 6:22, never mark it watched over it."""
    with machine() as m:
        m.sync(10, True, False)
        m.act("nanny-b", False, "watch", ("ms", 6 * MIN + 22 * SEC), 0, 30)
        m.act("nanny-a", True, "finish", ("frac", 0.5), 0, 30)
        m.sync_killed(1)
        m.sync(10, True, True)
    with machine() as m:  # the same with B's write to Plex failing instead
        m.sync(10, True, False)
        m.act("nanny-b", False, "watch", ("ms", 6 * MIN + 22 * SEC), 0, 30)
        m.act("nanny-a", True, "finish", ("frac", 0.5), 0, 30)
        m.sync_with_failing_write(2, False)
        m.sync(10, True, True)


def test_pinned_flag_only_watch_has_no_time_of_its_own() -> None:
    """Plex A at 15:52, then B finished on SageTV (A watched there through the show flag,
    with no watch record of its own): both sides of A changed, and §1.1 gives SageTV's side
    no time, so Plex's dated viewing is the newer (its resume point kept on both sides)."""
    with machine() as m:
        m.sync(10, True, False)
        m.act("nanny-a", True, "watch", ("ms", 15 * MIN + 52 * SEC), 0, 30)
        m.act("nanny-b", False, "finish", ("frac", 0.5), 0, 30)
        m.sync(10, True, True)


def test_pinned_undo_of_a_killed_run_under_a_lower_played_threshold() -> None:
    """A sync killed half way wrote a position of 85 % to Plex; Plex's played threshold then
    drops to 80 %, so that position now reads as watched. It is still the killed run's own
    step (§6.1: classified under today's bounds), so ``--undo`` of that run puts it back."""
    with machine() as m:
        m.sync(10, True, False)
        m.act("castle", False, "watch", ("frac", 0.85), 0, 30)
        m.act("heat", False, "unwatch", ("frac", 0.5), 0, 30)
        m.sync_killed(1)
        m.change_settings(60, 0.8)
        m.undo()
        m.sync(10, True, True)


def test_pinned_apply_skips_a_recording_whose_unwritten_twin_was_viewed_since() -> None:
    """A plan sets the second Plex item of a twin pair to SageTV's 78:44 (the first is
    there already, so it has no write). The user then finishes the first: the plan is stale
    for the whole recording and ``--apply`` must leave it to the next sync (§4, §6.4)."""
    with machine() as m:
        m.sync(10, True, False)
        m.act("ronin", False, "watch", ("ms", 78 * MIN + 44 * SEC), 0, 30)
        m.act("ronin", True, "watch", ("ms", 78 * MIN + 44 * SEC), 0, 30)
        m.make_plan()
        m.act("ronin", True, "finish", ("frac", 0.5), 0, 30)
        m.apply_plan(True)
        m.sync(10, True, True)


def test_pinned_undo_skips_a_recording_whose_unwritten_twin_was_viewed_since() -> None:
    """The same for ``--undo``: the sync set only the second Plex item of the pair; the user
    then finished the first. Undoing that sync would record the first's finish as synced
    and lose it: the recording is left to the next sync."""
    with machine() as m:
        m.sync(10, True, False)
        m.act("ronin", False, "watch", ("ms", 78 * MIN + 44 * SEC), 0, 30)
        m.act("ronin", True, "watch", ("ms", 78 * MIN + 44 * SEC), 0, 30)
        m.sync(10, True, False)
        m.act("ronin", True, "finish", ("frac", 0.5), 0, 30)
        m.undo()
        m.sync(10, True, True)


def test_pinned_an_item_decided_again_to_nothing_in_a_later_round() -> None:
    """Nanny's two recordings share SageTV's show flag: a write to one in the run's first
    round leaves the other, decided again before the next round, with nothing to write.
    That round starts with no write at all (the run stopped with an internal error)."""
    with machine(clears=False, past="offset") as m:
        m.make_plan()
        m.sync_one("nanny-b", 1, False)
        m.act("nanny-a", True, "watch", ("frac", 0.8771594661214683), 1, 524)
        m.sync_one("heat", 1, True)
        m.act("nanny-b", True, "unwatch", ("frac", 0.8784579420566093), 1, 287)
        m.act("nanny-b", True, "watch", ("frac", 0.08237205513368676), 0, 375)
        m.act("nanny-b", True, "finish", ("frac", 0.6282521984479028), 1, 194)
        m.time_passes(256)
        m.act("split", True, "watch", ("frac", 0.9455033136352123), 0, 272)
        m.change_settings(30, 0.9)
        m.sync_one("split", 0, True)
        m.act("castle", False, "watch", ("ms", 18048), 1, 66)
        m.sync_killed(2)
        m.sync(10, True, True)


def test_pinned_undo_of_a_plex_position_that_a_lower_threshold_reads_as_watched() -> None:
    """A sync set Plex to SageTV's 88 % (SageTV itself not written); Plex's played threshold
    then drops to 80 %. SageTV's side as that sync left it is read again under today's
    bounds (watched), as today's read shows it: the undo puts Plex back, not "changed since"."""
    with machine(past="offset") as m:
        m.act("split", False, "watch", ("frac", 0.882209617983819), 1, 30)
        m.sync(10, True, False)
        m.change_settings(60, 0.8)
        m.undo()
        m.sync(10, True, True)


def test_pinned_a_viewing_after_a_failed_write_is_the_users_even_in_a_state_it_restored() -> None:
    """Heat re-watched on Plex to 31 min; the sync's ClearWatched took on SageTV, its
    SetWatchedTimes failed, so SageTV was put back to watched (the run's own state, with a
    new stamp). The user then watches it to the end on SageTV: watched again, stamped after
    the failed run's read-back. That is the user's viewing, and the pending write of 31 min
    must not be carried out over it (§6.4)."""
    with machine() as m:
        m.act("heat", True, "finish", ("frac", 0.5), 0, 30)
        m.sync(10, True, False)
        m.act("heat", True, "watch", ("frac", 0.26), 0, 30)
        m.sync_with_failing_write(k=2, drop=False)
        m.act("heat", False, "watch", ("frac", 0.97), 0, 30)
        m.sync(10, True, True)


def test_pinned_an_undo_puts_back_only_what_the_run_changed_under_todays_bounds() -> None:
    """A sync under an 80 % threshold found Nanny's first recording at 83 % on SageTV (so
    watched) and marked Plex watched; SageTV it did not write. The threshold goes back to
    90 %: SageTV's 83 % is a resume point again. Undoing that sync un-marks Plex and leaves
    SageTV alone (its before-state, read under today's bounds, is what it shows), rather
    than marking it watched."""
    with machine(clears=False, past="ignore") as m:
        m.change_settings(60, 0.8)
        m.act("nanny-a", False, "watch", ("frac", 0.8301721430368125), 0, 63)
        m.sync(10, True, False)
        m.change_settings(120, 0.9)
        m.undo()
        m.sync(10, True, True)


def test_pinned_an_undo_takes_the_tools_own_later_restamps_of_a_side_for_no_viewing() -> None:
    """Run A marked Plex watched for nanny-b; through the show flag the user un-watched and
    re-watched it on SageTV, and in between a sync un-marked Plex and an undo of that sync
    marked it again (a new lastViewedAt, the tool's own). Undoing A must follow the tool's
    own writes on the Plex side and put nanny-b back, not take the restamp for a viewing."""
    with machine(clears=False, skew=(0, -660000), past="offset") as m:
        m.make_plan()
        m.act("nanny-b", True, "watch", ("ms", 3161), 1, 326)
        m.sync(quiet=True, wait_min=17, yes=False)
        m.make_plan()
        m.make_plan()
        m.simulate("-m -n", "split")
        m.act("nanny-b", False, "unwatch", ("frac", 0.713325), 0, 513)
        m.sync(quiet=True, wait_min=71, yes=False)
        m.act("nanny-b", True, "watch", ("frac", 0.513976), 0, 258)
        m.sync(quiet=True, wait_min=101, yes=False)
        m.simulate("report", "heat")
        m.undo_run(pick=2)
        m.act("castle", True, "finish", ("frac", 0.95), 1, 387)
        m.act("ronin", True, "watch", ("ms", 100001), 1, 224)
        m.act("nanny-a", False, "finish", ("ms", 25052), 0, 19)
        m.make_plan()
        m.act("nanny-b", True, "watch", ("ms", 5090), 1, 100)
        m.sync(quiet=False, wait_min=287, yes=True)
        m.simulate("report", "ronin")
        m.make_plan()
        m.sync(quiet=True, wait_min=494, yes=False)
        m.act("nanny-a", False, "watch", ("ms", 131072), 0, 82)
        m.sync(quiet=True, wait_min=0, yes=False)
        m.simulate("report", "heat")
        m.undo()
        m.simulate("-n", "ronin")
        m.act("nanny-a", False, "finish", ("frac", 0.334803), 0, 34)
        m.undo()
