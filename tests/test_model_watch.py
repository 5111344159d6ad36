"""Model test of the continuous mode (issue 17): the real tool runs ``--watch`` in a thread
(tests/test_watch.py's ``Watching``) against the fakes, while a driver acts as the user on
either server, runs ``all -s -y`` by hand, idles and lets hours pass; a small model of what
the user did last on each recording says where both servers must end.

The world: two episodes of one Plex show ("pilot", "nanny"), a movie watched on both sides
from the start ("heat"), and a movie that Plex holds twice (twins, "ronin": the same file in
two libraries).

Steps (one pinned evening, and seeded random evenings):
- ``Act``: the user, on one side of one recording (on Plex, one twin):
  Plex: play then stop at a position, play then pause there (synced once the pause settles),
  play to the end (the server scrobbles as the session crosses its played threshold), mark
  played, mark unplayed; SageTV: play then stop at a position (the watch record keeps the
  furthest point: a stop short of it leaves it, with a new viewing time), play to the end,
  the menu's mark watched and mark unwatched (no viewing time: GetRecentlyWatched does not
  list them; the backstop full pass every ``--interval`` or a manual run finds them).
  ``race``: a manual ``all -s -y`` right after the action, racing the watcher's own sync of it
  (either may find the state locked: the watcher retries, the manual run exits 1 saying so).
- ``TwoScreens``: stop on one server and, 1.1 s later, go on on the other (before or after the
  tool synced the first: both orders must end at the second);
- ``ManualRun``, ``Idle`` (seconds of nothing) and ``TimePasses`` (both servers' clocks jump).
Half the random evenings run the watcher's backstop full pass every 1.8 s (``--interval
0.03``), between and during steps; the others (and the pinned evening) have none, so that a
pass cannot hide what the event path got wrong or left undone: there a SageTV menu mark is
followed by a manual run.

Invariants, after each step:
(a) nothing the user did last is lost: the side the user acted on shows the model's state on
    every sample while the tool syncs (the tool never writes over it), and once quiescent both
    servers show it (every twin too): a watched mark, a resume point, an un-watch;
(b) the tool's own writes and their side effects are never taken for the user's: every write
    request of the step is to the other side of what the user acted on (none to other
    recordings, none for a manual run, idle time or a clock jump: the stamps of the tool's own
    SetWatchedTimes put the airing in GetRecentlyWatched, and that sync must write nothing);
(c) once quiet, a further quiet period writes nothing, and neither does a manual full sync.

What the model leaves out, on purpose:
- Sub-second races. Plex stamps ``lastViewedAt`` in whole seconds and SageTV in ms, and a tie
  goes to SageTV (rules §3.1), so of two viewings on the two servers less than a second apart
  the tool cannot tell which came last (and a last-watched time must move by more than 1 s to
  count as a new viewing). The driver leaves 1.1 s between a user action and the next on the
  same recording (after a Plex pause, 1.1 s after the pause has settled and is synced: the
  tool reads and writes within a fraction of a second, and neither server offers a write
  that checks what it overwrites).
- An un-watch, or a mark on SageTV (no viewing time), as the second of two screens: if the tool
  has not synced the first viewing yet, both sides changed and "not watched" never wins
  (§3.1). Those are single steps, after the previous one is quiescent.
- Transient states while a player plays (a full pass may carry a position reached mid-play):
  only where each step ends is checked.

Runs: the pinned evening and ``SAGEPLEX_WATCH_EXAMPLES`` (default 1) seeded evenings of
``SAGEPLEX_WATCH_STEPS`` (default 4) steps each; seeds start at ``SAGEPLEX_WATCH_SEED``
(default 1), so an evening is the same steps every run (the fakes follow real time, so its
timing is not); a failure prints its steps as code to pin.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

import sageplex_sync
from tests.conftest import Env
from tests.fakes.world import DAY, MIN, SEC, Item, World, none, watched
from tests.test_watch import POLL_S, Watching, eventually
from tests.user import NONE, PLAYER, WATCHED, State, User, bounds, plex_state, progress, sage_state

INTERVAL_MIN = 0.03  # the backstop full pass: every 1.8 s
FULL_PASS_S = INTERVAL_MIN * 60
PAUSE_S = 1.0  # a Plex pause this long is synced (PAUSE_SETTLE_S, 10 s in real life)
GAP_S = 1.1  # between two user actions on one recording (more than Plex's 1 s resolution)
SETTLE_S = POLL_S  # after both sides agree: the next poll (which lists the tool's own
#: SageTV write) and its sync write nothing
#: How long a step may take to be synced: a SageTV poll, a full pass (a SageTV menu mark),
#: a retry after the manual run held the state's lock, and a few seconds for a busy machine.
QUIESCENT_S = POLL_S + FULL_PASS_S + sageplex_sync.RETRY_S + 5
EXAMPLES = int(os.environ.get("SAGEPLEX_WATCH_EXAMPLES", "1"))
STEPS = int(os.environ.get("SAGEPLEX_WATCH_STEPS", "4"))
SEED = int(os.environ.get("SAGEPLEX_WATCH_SEED", "1"))


# -- the steps -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Act:
    """The user on one ``side`` ("plex" or "sage") of one recording: ``what`` is "stop",
    "pause" (Plex), "finish", "mark" or "unmark"; ``twin`` picks the Plex item of twins."""

    side: str
    what: str
    name: str
    position_ms: int = 0
    twin: int = 0
    race: bool = False  # a manual `all -s -y` right after, racing the watcher

    def __repr__(self) -> str:
        """As code to pin: only what differs from the defaults."""
        args = [repr(self.side), repr(self.what), repr(self.name)]
        if self.position_ms:
            minutes, rest = divmod(self.position_ms, MIN)
            args.append(f"{minutes} * MIN" + (f" + {rest:_}" if rest else ""))
        args += [f"twin={self.twin}"] * bool(self.twin) + ["race=True"] * self.race
        return f"Act({', '.join(args)})"


@dataclass(frozen=True)
class TwoScreens:
    """A viewing on one server, then 1.1 s later one on the other (same recording)."""

    first: Act
    second: Act


@dataclass(frozen=True)
class ManualRun:
    """`all -s -y` by hand, between events: nothing to write."""


@dataclass(frozen=True)
class Idle:
    seconds: float


@dataclass(frozen=True)
class TimePasses:
    minutes: int


Step = Act | TwoScreens | ManualRun | Idle | TimePasses


def after(state: State, act: Act) -> State:
    """What the recording shows once the user's action is synced: the action's own result,
    except that SageTV's watch record keeps its furthest point (a stop short of it leaves it)."""
    if act.what in ("finish", "mark"):
        return WATCHED
    if act.what == "unmark":
        return NONE
    if act.side == "sage" and state.kind == "PROGRESS":
        return progress(max(state.position_ms, act.position_ms))
    return progress(act.position_ms)


def position(state: State) -> int:
    return state.position_ms if state.kind == "PROGRESS" else 0


# -- the world -------------------------------------------------------------------------------

@dataclass
class Recording:
    """One SageTV recording and the Plex items holding it (more than one: twins)."""

    item: Item
    keys: list[int]


def declare(world: World) -> dict[str, Recording]:
    pilot = world.episode("Castle", 1, 1, "Flowers for Your Grave", duration_ms=45 * MIN,
                          sage=none(), plex=none())
    nanny = world.episode("Castle", 1, 2, "Nanny McDead", duration_ms=45 * MIN,
                          sage=none(), plex=none())
    heat = world.movie("Heat", duration_ms=120 * MIN, sage=watched(ago=DAY),
                       plex=watched(ago=DAY))
    ronin = world.movie("Ronin", year=1998, duration_ms=90 * MIN, sage=none(), plex=none())
    copies = world.plex.add_section("Movies (all)", "movie", [world.plex_roots["movie"]],
                                    agent="com.plexapp.agents.imdb",
                                    scanner="SageTV Movie Scanner")
    ronin_copy = world.plex.add_movie(copies, "Ronin", world.plex_item(ronin).files,
                                      ronin.duration_ms, year=1998)
    assert None not in (pilot.rating_key, nanny.rating_key, heat.rating_key, ronin.rating_key)
    return {"pilot": Recording(pilot, [pilot.rating_key or 0]),
            "nanny": Recording(nanny, [nanny.rating_key or 0]),
            "heat": Recording(heat, [heat.rating_key or 0]),
            "ronin": Recording(ronin, [ronin.rating_key or 0, ronin_copy])}


INITIAL = {"pilot": NONE, "nanny": NONE, "heat": WATCHED, "ronin": NONE}
NAMES = tuple(INITIAL)
TWINS = {"ronin": 2}  # recordings Plex holds more than once: how many times


# -- random evenings -------------------------------------------------------------------------

PLEX_ACTS = ("stop", "stop", "stop", "pause", "finish", "mark", "unmark")
SAGE_ACTS = ("stop", "stop", "stop", "stop", "finish", "mark", "unmark")


def random_evening(seed: int, steps: int, last_ms: dict[str, int]
                   ) -> tuple[list[Step], bool]:
    """``steps`` random steps, and whether the backstop full pass runs (without it, a
    SageTV menu mark is followed by a manual run); ``last_ms`` is, per recording, the last
    position that is still a resume point on both sides, so stops stay clear of the end."""
    chooser = random.Random(seed)
    backstop = chooser.random() < 0.5
    model = dict(INITIAL)
    out: list[Step] = []

    def where(name: str, above: int = 0) -> int | None:
        low = max(2 * MIN, above + MIN)
        if low >= last_ms[name]:
            return None
        spot = chooser.randrange(low, last_ms[name], 7_919)
        return spot if abs(spot - position(model[name])) > 5 * SEC else spot + 30 * SEC

    def act(name: str, side: str, whats: tuple[str, ...], above: int = 0) -> Act:
        what = chooser.choice(whats)
        spot = where(name, above) if what in ("stop", "pause") else 0
        if spot is None:
            what, spot = "finish", 0
        twin = chooser.randrange(TWINS[name]) if name in TWINS else 0
        return Act(side, what, name, spot or 0, twin)

    for _ in range(steps):
        roll = chooser.random()
        name = chooser.choice(NAMES)
        if roll < 0.06:
            out.append(TimePasses(chooser.choice([10, 90, 600])))
        elif roll < 0.12:
            out.append(Idle(chooser.choice([0.5, 1.5])))
        elif roll < 0.2:
            out.append(ManualRun())
        elif roll < 0.4:
            # a viewing on one screen, then on the other: SageTV's second stop goes past
            # both the first and what SageTV held before (its record keeps the furthest)
            first_side = chooser.choice(("plex", "sage"))
            first = act(name, first_side, ("stop", "stop", "finish") + (
                ("pause",) if first_side == "plex" else ()))
            model[name] = after(model[name], first)
            if first_side == "sage":
                second = act(name, "plex", ("stop", "stop", "pause", "finish", "mark"))
            else:
                above = max(position(model[name]), position(INITIAL[name]),
                            *(position(s) for s in _states(out, name)))
                second = act(name, "sage", ("stop", "stop", "finish"), above)
            model[name] = after(model[name], second)
            out.append(TwoScreens(first, second))
        else:
            side = chooser.choice(("plex", "sage"))
            one = act(name, side, PLEX_ACTS if side == "plex" else SAGE_ACTS)
            menu = side == "sage" and one.what in ("mark", "unmark")
            if chooser.random() < 0.15 or (menu and not backstop):
                one = Act(one.side, one.what, one.name, one.position_ms, one.twin, race=True)
            model[name] = after(model[name], one)
            out.append(one)
    return out, backstop


def _states(steps: list[Step], name: str) -> list[State]:
    """Every state the recording was left in by ``steps`` (SageTV may still hold any)."""
    state, seen = INITIAL[name], []
    for step in steps:
        acts = [step] if isinstance(step, Act) else \
            [step.first, step.second] if isinstance(step, TwoScreens) else []
        for one in acts:
            if one.name == name:
                state = after(state, one)
                seen.append(state)
    return seen


# -- the driver ------------------------------------------------------------------------------

@dataclass
class Evening:
    """The world, the watcher once started, the model, and the steps so far."""

    world: World
    recordings: dict[str, Recording]
    start: Callable[..., Env]
    watching: Watching | None = None
    backstop: bool = True  # the full pass every 1.8 s (else every hour: never here)
    model: dict[str, State] = field(default_factory=lambda: dict(INITIAL))
    steps: list[Step] = field(default_factory=list)
    last_act: dict[str, float] = field(default_factory=dict)  # time.monotonic()

    @property
    def watch(self) -> Watching:
        assert self.watching is not None, "play() starts the watcher"
        return self.watching

    @property
    def env(self) -> Env:
        return self.watch.env

    @property
    def user(self) -> User:
        return self.watch.user

    # -- what each side shows ------------------------------------------------------------
    def sage_shows(self, name: str) -> State:
        item = self.recordings[name].item
        return sage_state(self.world, item, bounds(self.world, item))

    def plex_shows(self, name: str, key: int) -> State:
        item = self.recordings[name].item
        return plex_state(self.world, item, bounds(self.world, item), rating_key=key)

    def in_step(self, name: str) -> bool:
        want = self.model[name]
        return self.sage_shows(name) == want and all(
            self.plex_shows(name, key) == want for key in self.recordings[name].keys)

    def picture(self) -> str:
        lines = []
        for name, rec in self.recordings.items():
            plex = ", ".join(f"{k}: {self.plex_shows(name, k)}" for k in rec.keys)
            lines.append(f"  {name}: model {self.model[name]}; SageTV {self.sage_shows(name)}; "
                         f"Plex {plex}")
        return "\n".join(lines)

    def story(self, what: str) -> str:
        steps = "\n".join(f"    {step!r}," for step in self.steps)
        out = self.watch.out.getvalue().splitlines()[-15:]
        err = self.watch.err.getvalue().splitlines()[-10:]
        log_path = self.env.log_path
        log = log_path.read_text(encoding="utf-8").splitlines()[-40:] \
            if log_path.exists() else []
        return (f"{what}\n{self.picture()}\nsteps (to pin: evening.play([...], backstop="
                f"{self.backstop})):\n{steps}\n"
                "watcher output (last lines):\n  " + "\n  ".join(out) +
                "\nwatcher errors (last lines):\n  " + "\n  ".join(err) +
                "\nlog (last lines):\n  " + "\n  ".join(log))

    # -- the tool's writes ----------------------------------------------------------------
    def tool_writes(self) -> tuple[set[int], set[int]]:
        """The SageTV airings and Plex items the tool wrote since the logs were cleared (the
        user's own Plex requests, the player's timeline and bare marks, left out)."""
        plex = [r for r in self.env.plex_writes()
                if r.header("X-Plex-Client-Identifier") not in (None, PLAYER)]
        keys = {r.param("ratingKey") or r.param("key") or "" for r in plex}
        return self.env.written_airings(), {int(k) for k in keys if k.isdigit()}

    def allowed(self, acts: list[Act]) -> tuple[set[int], set[int]]:
        """The other side of each recording acted on (for Plex: every other twin too)."""
        airings: set[int] = set()
        keys: set[int] = set()
        for act in acts:
            rec = self.recordings[act.name]
            if act.side == "plex":
                assert rec.item.airing_id is not None
                airings.add(rec.item.airing_id)
                keys.update(k for k in rec.keys if k != self.key(act))
            else:
                keys.update(rec.keys)
        return airings, keys

    def key(self, act: Act) -> int:
        keys = self.recordings[act.name].keys
        return keys[act.twin % len(keys)]

    # -- the user -------------------------------------------------------------------------
    def act(self, act: Act) -> None:
        wait = self.last_act.get(act.name, float("-inf")) + GAP_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        item = self.recordings[act.name].item
        if act.side == "plex":
            self.plex_act(act.what, item, self.key(act), act.position_ms)
        else:
            self.sage_act(act.what, item, act.position_ms)
        # A pause is synced once it has settled: the next action waits for that too, or
        # the tool's read and write of the pause race it (the sub-second class above).
        settles = PAUSE_S if act.side == "plex" and act.what == "pause" else 0.0
        self.last_act[act.name] = time.monotonic() + settles
        self.model[act.name] = after(self.model[act.name], act)

    def plex_act(self, what: str, item: Item, key: int, at_ms: int) -> None:
        if what in ("stop", "pause"):
            self.user.plex_play(item, at_ms - MIN, key)
            (self.user.plex_stop if what == "stop" else self.user.plex_pause)(item, at_ms, key)
        elif what == "finish":  # the session crosses the played threshold: Plex scrobbles
            self.user.plex_play(item, item.duration_ms // 2, key)
            self.user.plex_play(item, item.duration_ms * 95 // 100, key)
            self.user.plex_stop(item, item.duration_ms - 5 * SEC, key)
        elif what == "mark":
            self.user.plex_finish(item, key)
        else:
            self.user.plex_unwatch(item, key)

    def sage_act(self, what: str, item: Item, at_ms: int) -> None:
        if what == "stop":
            self.user.sage_play(item, at_ms - MIN)
            self.user.sage_stop(item, at_ms)
        elif what == "finish":  # the player's completion check marks it while it plays
            self.user.sage_play(item, item.duration_ms - 3 * MIN)
            self.user.sage_stop(item, item.duration_ms - 10 * SEC)
        elif what == "mark":  # the menu's: no watch time
            assert item.airing_id is not None
            self.world.sage.set_watched(item.airing_id)
        else:
            self.user.sage_unwatch(item)

    def manual_run(self, insist: bool = False) -> None:
        """`all -s -y` by hand: it may find the watcher writing (exit 1, saying so);
        ``insist``: again until it runs (a SageTV menu mark that no poll lists, the quiet
        full sync)."""
        for _ in range(20):
            result = self.env.run("all", "-s", "-y")
            locked = result.code == 1 and "another sageplex_sync run is in progress" in result.err
            assert result.code == 0 or locked, self.story(
                f"the manual run ended {result.code}\n{result.out}\n{result.err}")
            if not (locked and insist):
                return
            time.sleep(0.2)
        raise AssertionError(self.story("the manual run never got the state's lock"))

    # -- a step and its checks ------------------------------------------------------------
    def play(self, steps: list[Step], *, backstop: bool) -> None:
        """Start the watcher (its full pass every 1.8 s, or not during the test), then each
        step and its checks, then the quiet period."""
        self.backstop = backstop
        interval = ["--interval", str(INTERVAL_MIN)] if backstop else []
        env = self.start()
        self.watching = Watching(env, User(self.world, env.plex), interval).start()
        for step in steps:
            self.step(step)
        self.quiet()

    def step(self, step: Step) -> None:
        self.steps.append(step)
        self.env.clear_logs()
        acts: list[Act] = []
        if isinstance(step, Act):
            self.act(step)
            acts = [step]
            if step.race:
                self.manual_run(insist=not self.backstop and step.side == "sage"
                                and step.what in ("mark", "unmark"))
        elif isinstance(step, TwoScreens):
            self.act(step.first)
            self.act(step.second)
            acts = [step.first, step.second]
        elif isinstance(step, ManualRun):
            self.manual_run()
        elif isinstance(step, Idle):
            time.sleep(step.seconds)
        else:
            self.world.clock.advance(step.minutes * MIN)
        self.settle(acts[-1] if acts else None)
        airings, keys = self.tool_writes()
        ok_airings, ok_keys = self.allowed(acts)
        assert airings <= ok_airings and keys <= ok_keys, self.story(
            f"(b) written beyond the other side of what the user did: SageTV airings "
            f"{sorted(airings - ok_airings)}, Plex items {sorted(keys - ok_keys)}")

    def settle(self, last: Act | None) -> None:
        """Until both sides of every recording show the model's state, the side of the last
        action keeps it on every look (a); then a little longer, and still in step."""

        def in_step() -> bool:
            if last is not None:
                shows = (self.plex_shows(last.name, self.key(last)) if last.side == "plex"
                         else self.sage_shows(last.name))
                assert shows == self.model[last.name], self.story(
                    f"(a) the user's {self.model[last.name]} on {last.side} of {last.name} "
                    f"was overwritten: it shows {shows}")
            return all(self.in_step(name) for name in NAMES)

        assert eventually(in_step, QUIESCENT_S), self.story(
            "(a) not in step with what the user did last")
        time.sleep(SETTLE_S)
        assert in_step(), self.story("(a) in step, then not")

    def quiet(self) -> None:
        """(c) a quiet period and a manual full sync write nothing."""
        self.env.clear_logs()
        time.sleep(2 * POLL_S + 0.2)
        assert self.env.writes() == [], self.story(
            f"(c) a quiet period wrote: {[(r.function, r.query) for r in self.env.writes()]}")
        self.manual_run(insist=True)  # the watcher may be in a sync of its own: again
        assert self.env.writes() == [], self.story(
            f"(c) a quiet full sync wrote: {[(r.function, r.query) for r in self.env.writes()]}")
        assert all(self.in_step(name) for name in NAMES), self.story("(c) quiet, not in step")
        assert "Traceback" not in self.watch.err.getvalue(), self.story("the watcher failed")


@pytest.fixture
def evening(start: Callable[..., Env], world: World, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[Evening]:
    monkeypatch.setattr(sageplex_sync, "PAUSE_SETTLE_S", PAUSE_S)
    evening = Evening(world, declare(world), start)
    try:
        yield evening
    finally:
        if evening.watching is not None:
            assert evening.watching.end() == sageplex_sync.ExitCode.INTERRUPTED


def resume_limits(evening: Evening) -> dict[str, int]:
    """Per recording, the last stop position that stays a resume point, 3 min short of the
    finished zone (rules §1.2)."""
    return {name: bounds(evening.world, rec.item).done_ms - 3 * MIN
            for name, rec in evening.recordings.items()}


# -- the tests -------------------------------------------------------------------------------

def test_pinned_evening_keeps_both_sides_on_what_the_user_did_last(evening: Evening) -> None:
    """Every kind of step once: stops both ways (SageTV's short stop keeps its furthest
    point), a manual run racing a twin's stop, a pause, two screens, finishing by playback,
    un-watches on both servers (a twin's on Plex; SageTV's found by a manual run), a jump of
    the clocks and a manual run between events. No backstop pass: every sync is the watcher's
    own event handling or a manual run, so a pass cannot mend what an event sync got wrong."""
    evening.play([
        Act("plex", "stop", "pilot", 12 * MIN),
        Act("sage", "stop", "pilot", 20 * MIN),
        Act("plex", "stop", "ronin", 30 * MIN, twin=1, race=True),
        Act("sage", "stop", "pilot", 15 * MIN),  # short of 20: SageTV keeps 20
        Act("plex", "pause", "nanny", 9 * MIN),
        TwoScreens(Act("sage", "stop", "ronin", 41 * MIN), Act("plex", "stop", "ronin", 25 * MIN)),
        Act("plex", "finish", "pilot"),
        Act("plex", "unmark", "ronin", twin=1),
        TimePasses(90),
        Act("sage", "unmark", "heat", race=True),  # no poll lists it: the manual run finds it
        ManualRun(),
    ], backstop=False)


@pytest.mark.parametrize("seed", range(SEED, SEED + EXAMPLES))
def test_random_evening_keeps_both_sides_on_what_the_user_did_last(
        evening: Evening, seed: int) -> None:
    """A seeded random evening of ``SAGEPLEX_WATCH_STEPS`` steps (see the module's doc)."""
    steps, backstop = random_evening(seed, STEPS, resume_limits(evening))
    evening.play(steps, backstop=backstop)
