"""--watch end to end: the real tool follows the fake Plex's notification websocket and
polls the fake SageTV's GetRecentlyWatched, in a thread stopped by an injected event, and
the tests act as the user on each side and assert on what the other side shows."""

from __future__ import annotations

import fcntl
import io
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import sageplex_sync
from tests.conftest import Env, assert_no_secrets
from tests.fakes.world import MIN, Item, World, none
from tests.user import User

POLL_S = 0.5
TOLERANCE_MS = 2_000


def eventually(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def near(actual: int, expected: int) -> bool:
    return abs(actual - expected) < TOLERANCE_MS


@dataclass
class Watching:
    """The tool in --watch mode in a thread; ``stop`` ends it as SIGTERM would."""

    env: Env
    user: User
    args: list[str]
    stop: threading.Event = field(default_factory=threading.Event)
    out: io.StringIO = field(default_factory=io.StringIO)
    err: io.StringIO = field(default_factory=io.StringIO)
    code: int | None = None
    thread: threading.Thread | None = None

    def start(self) -> Watching:
        connected = self.env.world.plex.websocket_connections
        self.thread = threading.Thread(target=self._run, daemon=True, name="watch")
        self.thread.start()
        assert eventually(lambda: "watching both servers" in self.err.getvalue(), 15), \
            self.err.getvalue()
        assert eventually(lambda: self.env.world.plex.websocket_connections > connected, 5)
        time.sleep(0.2)  # the listener is connected before the first event
        self.env.clear_logs()
        return self

    def _run(self) -> None:
        self.code = sageplex_sync.main(["--watch", "--poll", str(POLL_S), *self.args],
                                       out=self.out, err=self.err, stdin=sys.stdin,
                                       stop=self.stop)

    def end(self) -> int | None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(10)
        assert not self.thread.is_alive(), "--watch did not end on stop"
        return self.code


@pytest.fixture
def item(world: World) -> Item:
    return world.episode("Castle", 1, 1, "Pilot", duration_ms=45 * MIN, sage=none(),
                         plex=none())


@pytest.fixture
def watching(start: Callable[..., Env], item: Item, world: World
             ) -> Iterator[Callable[..., Watching]]:
    started: list[Watching] = []

    def _watch(*args: str) -> Watching:
        env = start()
        watch = Watching(env, User(world, env.plex), list(args)).start()
        started.append(watch)
        return watch

    yield _watch
    for watch in started:
        watch.end()


def test_plex_stop_reaches_sagetv_in_seconds_never_while_playing_and_costs_no_listing(
        watching: Callable[..., Watching], item: Item, world: World) -> None:
    w = watching()
    w.user.plex_play(item, 10 * MIN)
    w.user.plex_play(item, 11 * MIN)
    time.sleep(1.0)
    assert w.env.sage_writes() == [], "written while it plays"
    stopped = time.monotonic()
    w.user.plex_stop(item, 12 * MIN)
    assert eventually(lambda: near(world.sage_position_ms(item), 12 * MIN), 5), w.out.getvalue()
    assert time.monotonic() - stopped < 5
    time.sleep(0.5)
    # an event is a run of its own, but costs no full listing on either side
    assert w.env.sage.requests("GetMediaFiles") == []
    assert w.env.plex.requests(path="/library/sections") == []
    line = next(ln for ln in w.out.getvalue().splitlines() if f" {item.rating_key} " in ln)
    assert line[:4].isdigit() and "Pilot" in line and "updated" in line
    assert w.end() == sageplex_sync.ExitCode.INTERRUPTED
    assert_no_secrets(w.out.getvalue(), w.err.getvalue(), w.env.log_path.read_text())


def test_a_long_pause_is_synced(watching: Callable[..., Watching], item: Item, world: World,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sageplex_sync, "PAUSE_SETTLE_S", 1.0)
    w = watching()
    w.user.plex_play(item, 14 * MIN)
    w.user.plex_pause(item, 15 * MIN)
    time.sleep(0.5)
    assert w.env.sage_writes() == []  # not yet: a short pause is not the end
    assert eventually(lambda: near(world.sage_position_ms(item), 15 * MIN), 4)


def test_a_pause_then_playing_again_is_not_synced(
        watching: Callable[..., Watching], item: Item, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sageplex_sync, "PAUSE_SETTLE_S", 0.5)
    w = watching()
    w.user.plex_play(item, 14 * MIN)
    w.user.plex_pause(item, 15 * MIN)
    w.user.plex_play(item, 15 * MIN)
    time.sleep(1.5)
    assert w.env.sage_writes() == []


def test_a_manual_mark_and_unmark_on_plex_reach_sagetv(
        watching: Callable[..., Watching], item: Item, world: World) -> None:
    w = watching()
    w.user.plex_finish(item)
    assert eventually(lambda: world.sage_watched(item), 5), w.out.getvalue()
    w.user.plex_unwatch(item)
    assert eventually(lambda: not world.sage_watched(item), 5), w.out.getvalue()


def test_a_mark_on_plex_while_the_item_plays_waits_for_its_stop(
        watching: Callable[..., Watching], item: Item, world: World) -> None:
    """Someone marks the episode watched on another screen while it plays on the TV: that
    mark is not synced while it plays; the stop that follows is."""
    w = watching()
    w.user.plex_play(item, 10 * MIN)
    w.user.plex_finish(item)
    time.sleep(1.5)
    assert w.env.sage_writes() == [], "written while it plays"
    w.user.plex_stop(item, 12 * MIN)
    assert eventually(lambda: w.env.sage_writes() != [], 5), w.out.getvalue()


def test_a_manual_sagetv_mark_waits_for_the_timed_backstop_pass(
        watching: Callable[..., Watching], item: Item, world: World) -> None:
    """SageTV's "mark watched" stamps no watch time, so GetRecentlyWatched never lists it:
    the full pass every --interval minutes (here 0.05, 3 s) finds it; until then nothing."""
    w = watching("--interval", "0.05")
    world.sage.set_watched(item.airing_id)  # the UI's mark: no RealWatchedEndTime
    time.sleep(2 * POLL_S)
    assert world.plex_item(item).view_count == 0  # no poll saw it
    assert eventually(lambda: world.plex_item(item).view_count == 1, 10), w.out.getvalue()
    assert w.env.sage.requests(function="GetMediaFiles"), "the pass is a full listing"


def test_a_sagetv_stop_reaches_plex_within_a_poll_and_seconds(
        watching: Callable[..., Watching], item: Item, world: World) -> None:
    w = watching()
    w.user.sage_play(item, 5 * MIN)
    w.user.sage_play(item, 8 * MIN)
    time.sleep(3 * POLL_S)
    assert w.env.plex_writes() == [], "written while it plays"
    stopped = time.monotonic()
    w.user.sage_stop(item, 20 * MIN)
    assert eventually(lambda: near(world.plex_item(item).view_offset_ms, 20 * MIN),
                      POLL_S + 5), w.out.getvalue() + w.err.getvalue()
    assert time.monotonic() - stopped < POLL_S + 5
    assert w.env.sage.requests("GetMediaFiles") == []
    assert w.env.plex.requests(path="/library/sections") == []


def test_websocket_dropped_reconnects_and_the_backstop_syncs_what_was_missed(
        watching: Callable[..., Watching], item: Item, world: World) -> None:
    w = watching()
    world.plex.refuse_websockets(1.5)
    world.plex.drop_websockets(abrupt=True)
    time.sleep(0.3)
    w.user.plex_stop(item, 17 * MIN)  # its notification goes nowhere
    assert eventually(lambda: near(world.sage_position_ms(item), 17 * MIN), 10), \
        w.err.getvalue()
    assert "Plex notifications" in w.err.getvalue()
    # and the events flow again
    w.user.plex_stop(item, 21 * MIN)
    assert eventually(lambda: near(world.sage_position_ms(item), 21 * MIN), 5)


def test_a_server_down_for_a_while_does_not_end_the_mode(
        watching: Callable[..., Watching], item: Item, world: World) -> None:
    w = watching()
    w.env.sage.stop()
    time.sleep(3 * POLL_S)
    w.user.plex_stop(item, 13 * MIN)  # its sync fails while SageTV is away, and is retried
    time.sleep(1.0)
    w.env.sage.start()
    assert eventually(lambda: near(world.sage_position_ms(item), 13 * MIN),
                      sageplex_sync.RETRY_S + 5), w.err.getvalue()
    assert w.thread is not None and w.thread.is_alive()
    assert w.err.getvalue().count("SageTV: ") == 1, w.err.getvalue()  # logged once


def test_an_item_sync_refused_by_a_run_holding_the_state_is_tried_again(
        watching: Callable[..., Watching], item: Item, world: World, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another run holds the sync state (a manual sync, say) when the user stops on Plex:
    that item's sync is refused, and tried again a few seconds later, once the state is
    free, without waiting for the hourly full pass."""
    monkeypatch.setattr(sageplex_sync, "RETRY_S", 1.0)
    state = tmp_path / "watch.sqlite"
    w = watching("--state", str(state))
    with open(state.with_name(state.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        w.user.plex_stop(item, 13 * MIN)
        assert eventually(lambda: "in progress" in w.err.getvalue(), 5), w.err.getvalue()
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    assert eventually(lambda: near(world.sage_position_ms(item), 13 * MIN), 5), \
        w.err.getvalue()


def test_a_manual_sync_runs_while_watching(watching: Callable[..., Watching], item: Item,
                                            world: World) -> None:
    w = watching()
    result = w.env.run("all", "-s")
    assert result.code == 0, result.err
    w.user.plex_stop(item, 12 * MIN)
    assert eventually(lambda: near(world.sage_position_ms(item), 12 * MIN), 5)


@pytest.mark.parametrize("extra", [["-n"], ["-p"], ["-m", "1"], ["--plan", "x.json"],
                                   ["--why", "1"], ["--undo"], ["--apply", "x.json"]],
                         ids=lambda extra: extra[0])
def test_watch_refuses_options_that_do_not_go_with_it(start: Callable[..., Env],
                                                      extra: list[str]) -> None:
    env = start()
    err = io.StringIO()
    codes: list[int] = []
    # A --watch that were let through would follow the servers for ever: in a thread.
    run = threading.Thread(target=lambda: codes.append(sageplex_sync.main(
        ["--watch", *extra], out=io.StringIO(), err=err, stdin=sys.stdin)), daemon=True)
    run.start()
    run.join(30)
    assert codes == [sageplex_sync.ExitCode.USAGE], err.getvalue()
    assert env.writes() == []


def test_check_reports_the_websocket(start: Callable[..., Env]) -> None:
    env = start()
    result = env.run("--check")
    assert "notification websocket: opens" in result.out, result.out
    assert_no_secrets(result.out, result.err)


@pytest.mark.parametrize("seed", [7, 11])
def test_random_stops_on_either_side_while_watching_keep_both_sides_in_step(
        watching: Callable[..., Watching], item: Item, world: World, seed: int) -> None:
    """A random evening: stops on either server, on either of two items, at positions
    anywhere from 2 to 40 minutes (back and forth on Plex, forward on SageTV, whose watch
    record keeps the furthest point). After each stop the other server shows
    the same resume point within seconds, the side it was made on keeps it (nothing the
    user did last is lost), and the other item is left as it was."""
    import random

    other = world.movie("Ronin", year=1998, duration_ms=90 * MIN, sage=none(), plex=none())
    w = watching()
    chooser = random.Random(seed)
    shows = {item.title: 0, other.title: 0}  # each item's resume point, as the user left it
    for _ in range(6):
        target = chooser.choice([item, other])
        position = chooser.randrange(2 * MIN, 40 * MIN, 7_919)
        on_plex = chooser.random() < 0.5
        if on_plex:
            w.user.plex_play(target, position - MIN)
            w.user.plex_stop(target, position)
        else:
            # SageTV merges a viewing into the recording's watch record: stopping short of
            # the resume point leaves it where it was. Its stops go forward.
            position = max(position, shows[target.title] + 2 * MIN)
            w.user.sage_play(target, position - MIN)
            w.user.sage_stop(target, position)
        shows[target.title] = position
        for each in (item, other):
            want = shows[each.title]
            assert eventually(lambda each=each, want=want: near(
                world.sage_position_ms(each), want) and near(
                world.plex_item(each).view_offset_ms, want), POLL_S + 5), (
                f"{each.title}: SageTV {world.sage_position_ms(each)}, Plex "
                f"{world.plex_item(each).view_offset_ms}, wanted {want} after a stop on "
                f"{'Plex' if on_plex else 'SageTV'}\n{w.out.getvalue()}{w.err.getvalue()}")
    w.env.clear_logs()
    time.sleep(2 * POLL_S)
    assert w.env.writes() == [], "a quiet minute wrote something"


@pytest.mark.parametrize("jump_ms", [0, -2 * MIN, 2 * MIN])
def test_a_sagetv_clock_set_while_watching_still_syncs_a_stop_within_a_poll_and_seconds(
        watching: Callable[..., Watching], item: Item, world: World, jump_ms: int) -> None:
    """SageTV's clock set back or forward (an NTP correction) while the mode runs: the poll
    measures it again, so a stop still reaches Plex within a poll and seconds, and the
    tool's own write is not taken for a new stop at every poll after."""
    w = watching()
    world.sage_skew_ms += jump_ms
    time.sleep(3 * POLL_S)
    w.user.sage_play(item, 5 * MIN)
    w.user.sage_stop(item, 20 * MIN)
    assert eventually(lambda: near(world.plex_item(item).view_offset_ms, 20 * MIN),
                      POLL_S + 5), w.out.getvalue() + w.err.getvalue()
    time.sleep(1.5)  # Plex's notifications of the tool's own write come and go
    w.env.clear_logs()
    time.sleep(6 * POLL_S)
    assert {r.function for r in w.env.sage.requests()} <= {"GetRecentlyWatched"}, \
        "the poll took the tool's own write for a new stop"
    assert w.out.getvalue().count(f" {item.rating_key} ") == 1, w.out.getvalue()


def test_a_sagetv_stop_just_after_its_clock_is_set_back_is_heard(
        watching: Callable[..., Watching], item: Item, world: World) -> None:
    """Polls 3 s apart. Just after a poll, SageTV's clock is set back 2 minutes and the user
    stops at once: the next poll finds both, puts the last poll's time on the new clock, and
    hears the stop (3 s old by then, past the second a poll's time is uncertain by)."""
    w = watching("--poll", "3")

    def polls() -> int:
        return len(w.env.sage.requests(function="GetRecentlyWatched"))

    time.sleep(0.5)
    seen = polls()
    assert eventually(lambda: polls() > seen, 10)
    world.sage_skew_ms -= 2 * MIN
    w.user.sage_play(item, 5 * MIN)
    w.user.sage_stop(item, 20 * MIN)
    assert eventually(lambda: near(world.plex_item(item).view_offset_ms, 20 * MIN), 8), \
        w.out.getvalue() + w.err.getvalue()


def test_a_stop_within_the_last_polls_second_is_heard_once(world: World, start: Any) -> None:
    """A poll's time is known to a Date header's second only: a watch record that ended
    just before the time the last poll was taken to be sent is still a stop, told once."""
    item = world.movie("Heat", sage=none(), plex=none())
    env = start()
    assert item.airing_id is not None
    config = sageplex_sync.load_config(env.config_path)
    with sageplex_sync.SageClient(config.sage) as sage:
        poll = sageplex_sync.SagePoll(1.0, 0)
        assert poll.stopped(sage) == set()  # the clock measured
        end_ms = sage.now_ms() - 2_000
        env.world.sage.set_watch_record(item.airing_id, 0, 20 * MIN, end_ms - 20 * MIN, end_ms)
        poll.last_ms = end_ms + 600  # the last poll's time, as its Date header put it

        assert poll.stopped(sage) == {item.airing_id}
        assert poll.stopped(sage) == set()  # the same end again: not a new stop
