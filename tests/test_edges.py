"""Edge stories: consecutive runs of every kind (full ``all -s``, ``-m ID -s``, ``--undo``,
``--plan F`` then ``--apply F``, ``-n``, failed runs, runs killed with ``kill -9``, changed
settings) against the fakes over real HTTP (sync-rules.md v3, §1.4, §5, §6, §6.1-§6.5).

Every test tells one story in its docstring and asserts only on what the servers hold (watched
flags, positions, view counts) and on what was written to them, never on the tool's internals.
"""

from __future__ import annotations

import contextlib
import io
import os
import pty
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import sageplex_sync
from tests.conftest import PROXY_VARIABLES, Env, Result, assert_no_secrets
from tests.fakes.fake_http import FakeServer, Fault, Request
from tests.fakes.world import DAY, HOUR, MIN, SEC, Item, World, at, none, watched
from tests.user import User

MAIN = Path(__file__).resolve().parent.parent
TOLERANCE_MS = 2_000
EXT = "EP0000555001"  # a show flag shared by two recordings of one episode


def near(actual: int, expected: int) -> bool:
    return abs(actual - expected) < TOLERANCE_MS


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "edges.state.sqlite"


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sageplex_sync, "RETRY_BACKOFF_S", 0.02, raising=False)


@pytest.fixture(autouse=True)
def no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdin is not a terminal (a cron job): nothing can be asked."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


def run(env: Env, state: Path, *argv: str) -> Result:
    """One in-process run with its own request log and the test's state file."""
    env.clear_logs()
    return env.run(*argv, "--state", str(state))


def sync(env: Env, state: Path, *extra: str) -> Result:
    return run(env, state, "all", "-s", *extra)


def ok(r: Result, code: int = 0) -> Result:
    assert r.code == code, f"exit {r.code} (wanted {code})\n{r.out}\n{r.err}"
    assert "Traceback" not in r.out + r.err + r.log
    assert_no_secrets(r.out, r.err, r.log)
    return r


def snapshot(world: World, extra_keys: tuple[int, ...] = ()) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for item in world.items:
        if item.airing_id is not None:
            airing = world.sage.airing_json(item.airing_id)
            raw[f"sage {item.title} {item.airing_id}"] = (
                bool(airing.get("IsWatched")), int(airing.get("WatchedEndTime") or 0) // 1000)
        if item.rating_key is not None:
            p = world.plex_item(item)
            raw[f"plex {item.title} {item.rating_key}"] = (p.view_count, p.view_offset_ms // 1000)
    for key in extra_keys:
        p = world.plex.item(key)
        raw[f"plex {key}"] = (p.view_count, p.view_offset_ms // 1000)
    return raw


def quiet(env: Env, state: Path, extra_keys: tuple[int, ...] = ()) -> None:
    """A full sync after which nobody did anything: exit 0, nothing written, nothing moved."""
    before = snapshot(env.world, extra_keys)
    env.world.clock.advance(HOUR)
    r = ok(sync(env, state))
    assert env.writes() == [], [(q.function, dict(q.query)) for q in env.writes()]
    assert snapshot(env.world, extra_keys) == before
    assert r.code == 0


def functions(requests: list[Request]) -> list[str | None]:
    return [q.function for q in requests]


def plex_writes_to(env: Env, key: int | None) -> list[str | None]:
    return [q.function for q in env.plex_writes()
            if (q.param("ratingKey") or q.param("key")) == str(key)]


def sage_writes_to(env: Env, item: Item) -> list[str | None]:
    return [q.function for q in env.sage_writes() if q.param("1") == f"airing:{item.airing_id}"]


def siblings(world: World, a_sage=None, a_plex=None, b_sage=None, b_plex=None
             ) -> tuple[Item, Item]:
    """Two recordings of one episode (a unique show): SageTV keeps one watched flag for both."""
    a = world.episode("Castle", 1, 1, "Flowers for Your Grave", duration_ms=60 * MIN,
                      show_external_id=EXT, sage=a_sage or none(), plex=a_plex or none())
    b = world.episode("Castle", 1, 1, "Flowers for Your Grave", duration_ms=60 * MIN,
                      show_external_id=EXT, sage=b_sage or none(), plex=b_plex or none())
    return a, b


def twin_section(world: World) -> int:
    return world.plex.add_section("Movies (all)", "movie", [world.plex_roots["movie"]],
                                  agent="com.plexapp.agents.imdb",
                                  scanner="SageTV Movie Scanner")


def add_twin(world: World, section: int, item: Item, *, view_count: int = 0,
             view_offset_ms: int = 0, ago_ms: int | None = None) -> int:
    """A second Plex item holding the same SageTV file (the same folder in two libraries)."""
    last = None if ago_ms is None else (world.clock.ms() - ago_ms) // 1000
    return world.plex.add_movie(section, item.title, world.plex_item(item).files,
                                item.duration_ms, year=1995, view_count=view_count,
                                view_offset_ms=view_offset_ms, last_viewed_at_s=last)


# -- running the tool as a separate process (kill -9, terminals) ------------------------------

def tool_environ(env: Env) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    environ.update(SAGEPLEX_CFG=str(env.config_path), SAGEPLEX_LOG=str(env.log_path),
                   PLEXAPI_CONFIG_PATH=os.environ["PLEXAPI_CONFIG_PATH"], PYTHONUNBUFFERED="1")
    return environ


def kill_at_write(server: FakeServer, write_functions: frozenset[str], k: int,
                  pid: list[int]) -> Fault:
    """A fault that, on the (k+1)-th write request to ``server``, kills the tool (kill -9)
    and drops that request: exactly k write steps reached the server."""
    seen = [0]

    def when(request: Request) -> bool:
        if request.function not in write_functions:
            return False
        seen[0] += 1
        if seen[0] == k + 1 and pid:
            os.kill(pid[0], signal.SIGKILL)
            return True
        return False

    return server.add_fault(Fault(when=when, drop=True))


def kill_after(server: FakeServer, function: str, pid: list[int]) -> Fault:
    """A fault that kills the tool (kill -9) on its first request to ``server`` after a
    ``function`` write went through (the read-back after the write, typically)."""
    done = [False]

    def when(request: Request) -> bool:
        if request.function == function and not done[0]:
            done[0] = True
            return False
        if done[0] and pid:
            os.kill(pid[0], signal.SIGKILL)
            return True
        return False

    return server.add_fault(Fault(when=when, drop=True))


def run_killed(env: Env, state: Path, argv: list[str], pid: list[int]) -> int:
    """Run the tool as a subprocess (its pid in ``pid`` for the faults) and wait for it."""
    env.clear_logs()
    process = subprocess.Popen(
        [sys.executable, str(MAIN / "sageplex_sync.py"), *argv, "--state", str(state)],
        cwd=MAIN, env=tool_environ(env), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid.append(process.pid)
    try:
        process.communicate(timeout=40)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode


def sync_killed_at_plex_write(env: Env, state: Path, k: int) -> None:
    """A full sync killed (kill -9) at its (k+1)-th Plex write, which is dropped: exactly k
    write steps reached Plex. The fault stays until the test clears it."""
    pid: list[int] = []
    kill_at_write(env.plex, env.world.plex.WRITE_FUNCTIONS, k, pid)
    run_killed(env, state, ["all", "-s"], pid)

# =============================================================================================
# 1. Side effects kept only by full syncs (§6.2)
# =============================================================================================

def _paused_siblings(world: World) -> tuple[Item, Item]:
    """A paused at 20:00 on both sides, B never seen anywhere."""
    return siblings(world, a_sage=at(20 * MIN, ago=DAY), a_plex=at(20 * MIN, ago=DAY))


def _assert_a_keeps_its_resume_point(world: World, env: Env, a: Item) -> None:
    plex = world.plex_item(a)
    assert plex.view_count == 0, "Plex's A was scrobbled: the tool took a side effect for the user"
    assert near(plex.view_offset_ms, 20 * MIN), plex
    assert "scrobble" not in plex_writes_to(env, a.rating_key)


def test_m_run_keeps_sibling_base_so_next_sync_keeps_resume_point(
        world: World, start, state: Path) -> None:
    """A and B are two recordings of one episode (one SageTV show flag). A is paused at 20:00
    on both sides. The user finishes B on Plex and syncs only B (``-m B -s``): SetWatched(B)
    makes A watched on SageTV through the flag. The next full sync must not take A's new
    SageTV state for the user's and scrobble Plex's A: its 20:00 resume point stays."""
    a, b = _paused_siblings(world)
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))
    assert env.writes() == []

    world.clock.advance(HOUR)
    user.plex_finish(b)
    ok(run(env, state, "-m", str(b.rating_key), "-s"))
    assert world.sage_watched(b)

    world.clock.advance(HOUR)
    ok(sync(env, state))
    _assert_a_keeps_its_resume_point(world, env, a)
    quiet(env, state)


def test_apply_keeps_sibling_base_so_next_sync_keeps_resume_point(
        world: World, start, state: Path, tmp_path: Path) -> None:
    """As with ``-m``, but B's SetWatched is carried out by ``--plan F`` then ``--apply F``:
    the apply must record A's base (its SageTV flag set as a side effect), so the next full
    sync leaves Plex's A at 20:00."""
    a, b = _paused_siblings(world)
    env: Env = start()
    user = User(world, env.plex)
    plan = tmp_path / "plan.json"
    ok(sync(env, state))

    world.clock.advance(HOUR)
    user.plex_finish(b)
    ok(run(env, state, "all", "--plan", str(plan)))
    assert env.writes() == []
    ok(run(env, state, "--apply", str(plan)))
    assert world.sage_watched(b)

    world.clock.advance(HOUR)
    ok(sync(env, state))
    _assert_a_keeps_its_resume_point(world, env, a)
    quiet(env, state)


def test_killed_run_after_setwatched_keeps_sibling_resume_point(
        world: World, start, state: Path) -> None:
    """A full sync does SetWatched(B) (B finished on Plex) and is killed (kill -9) right after
    the write reached SageTV, before it could record anything. A is now watched on SageTV
    through the show flag: the next sync must know that was the tool's own doing (the
    write-ahead journal) and leave Plex's A at 20:00."""
    a, b = _paused_siblings(world)
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))

    world.clock.advance(HOUR)
    user.plex_finish(b)
    pid: list[int] = []
    kill_after(env.sage, "SetWatched", pid)
    run_killed(env, state, ["all", "-s"], pid)
    assert world.sage_watched(b)  # the write reached SageTV
    env.sage.clear_faults()

    world.clock.advance(HOUR)
    ok(sync(env, state))
    _assert_a_keeps_its_resume_point(world, env, a)
    assert world.sage_watched(b) and world.plex_item(b).view_count >= 1
    quiet(env, state)


def test_undo_keeps_sibling_base_so_next_sync_keeps_plex_watched(
        world: World, start, state: Path) -> None:
    """A is watched on Plex and on SageTV only through the show flag that B's viewing set.
    The user un-watches B on Plex (sync: ClearWatched(B), A loses the flag on SageTV), then
    finishes B again (sync: SetWatched(B), A gets the flag back). ``--undo`` of that last sync
    clears B again, and A loses the flag as a side effect: the undo must record A's base, so
    the next full sync does not take A's un-watch for the user's and unscrobble Plex's A."""
    a, b = siblings(world, a_sage=none(), a_plex=watched(ago=DAY),
                    b_sage=watched(ago=DAY), b_plex=watched(ago=DAY))
    env: Env = start()
    user = User(world, env.plex)
    assert world.sage_watched(a)  # through B's flag
    ok(sync(env, state))
    assert env.writes() == []

    world.clock.advance(HOUR)
    user.plex_unwatch(b)
    ok(sync(env, state))
    assert world.sage_watched(b) is False and world.sage_watched(a) is False
    assert world.plex_item(a).view_count == 1

    world.clock.advance(HOUR)
    user.plex_finish(b)
    ok(sync(env, state))
    assert world.sage_watched(b) and world.sage_watched(a)

    ok(run(env, state, "--undo"))
    assert world.sage_watched(b) is False  # B put back as it was before that sync
    assert world.plex_item(a).view_count == 1

    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert world.plex_item(a).view_count == 1, "Plex's A was un-watched by a side effect"
    assert "unscrobble" not in plex_writes_to(env, a.rating_key)
    quiet(env, state)


# =============================================================================================
# 2. Half-done writes (§6.3)
# =============================================================================================

def _sage_newer_watched_plex_paused(world: World) -> Item:
    """SageTV watched an hour ago; Plex paused at 20:00 a day ago: Plex gets 'mark watched',
    done as unscrobble (to drop the resume point) then scrobble."""
    return world.episode("Bones", 1, 1, "Pilot", duration_ms=60 * MIN,
                         sage=watched(ago=HOUR), plex=at(20 * MIN, ago=DAY))


def test_failed_scrobble_after_unscrobble_is_finished_not_taken_for_an_unwatch(
        world: World, start, state: Path) -> None:
    """First sync: Plex must be marked watched (unscrobble, then scrobble); the scrobble fails.
    Run 2 must not take the tool's own unscrobble for the user's un-watch and clear SageTV:
    it finishes the write, and both sides end watched."""
    item = _sage_newer_watched_plex_paused(world)
    env: Env = start()
    env.plex.add_fault(function="scrobble", status=500)

    r = ok(sync(env, state), 1)
    assert "unscrobble" in functions(env.plex_writes())
    assert "[failed]" in r.line_for(item.rating_key)
    assert world.sage_watched(item)

    env.plex.clear_faults()
    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert world.sage_watched(item), "SageTV cleared: the unscrobble taken for the user's"
    assert "ClearWatched" not in functions(env.sage_writes())
    assert world.plex_item(item).view_count >= 1
    quiet(env, state)


def test_failed_scrobble_puts_back_the_resume_point_the_unscrobble_took(
        world: World, start, state: Path) -> None:
    """The same failed 'mark watched' on Plex: within the run, the failing scrobble puts back
    what the unscrobble took, so Plex never ends less watched than it was (20:00 again)."""
    item = _sage_newer_watched_plex_paused(world)
    env: Env = start()
    env.plex.add_fault(function="scrobble", status=500)

    ok(sync(env, state), 1)
    plex = world.plex_item(item)
    assert near(plex.view_offset_ms, 20 * MIN), plex


def test_killed_between_unscrobble_and_scrobble_is_finished_next_run(
        world: World, start, state: Path) -> None:
    """The first sync is killed (kill -9) after its unscrobble reached Plex and before the
    scrobble. The next run reads the journal: the unscrobble was the tool's, the 'mark
    watched' is pending. It is finished: SageTV stays watched, Plex ends watched."""
    item = _sage_newer_watched_plex_paused(world)
    env: Env = start()
    sync_killed_at_plex_write(env, state, 1)
    assert functions(env.plex_writes())[:1] == ["unscrobble"]
    env.plex.clear_faults()

    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert world.sage_watched(item), "SageTV cleared after a half-done write of the tool's own"
    assert world.plex_item(item).view_count >= 1
    quiet(env, state)


def test_sagetv_gone_after_clearwatched_does_not_unwatch_plex_next_run(
        world: World, start, state: Path) -> None:
    """First sync: Plex's rewatch at 10:00 (newer) must go to SageTV, watched: ClearWatched then
    SetWatchedTimes; SageTV goes away right after the ClearWatched. Run 2 must not take that
    ClearWatched for the user's and unscrobble Plex: SageTV ends at 10:00, Plex keeps it."""
    item = world.episode("Bones", 1, 2, "The Man in the Suv", duration_ms=60 * MIN,
                         sage=watched(ago=DAY), plex=at(10 * MIN, ago=HOUR, view_count=1))
    env: Env = start()
    gone = [False]

    def after_clear(request: Request) -> bool:
        if request.function == "ClearWatched" and not gone[0]:
            gone[0] = True
            return False
        return gone[0]

    env.sage.add_fault(Fault(when=after_clear, drop=True))
    ok(sync(env, state), 1)
    assert "ClearWatched" in functions(env.sage_writes())
    env.sage.clear_faults()

    world.clock.advance(HOUR)
    ok(sync(env, state))
    plex = world.plex_item(item)
    assert plex.view_count == 1 and near(plex.view_offset_ms, 10 * MIN), plex
    assert "unscrobble" not in functions(env.plex_writes())
    assert world.sage_watched(item) is False
    assert near(world.sage_position_ms(item), 10 * MIN)
    quiet(env, state)


@pytest.mark.parametrize("failing", ["plex", "sagetv"])
def test_a_failed_resume_point_is_written_again_over_the_older_position(
        world: World, start, state: Path, failing: str) -> None:
    """Synced at 10:00 on both. The user plays on to 25:00 on one side; the sync's write of
    25:00 to the other fails, which still shows 10:00. A position is not the one the write
    carried because it is a position too: the next sync writes 25:00 again."""
    item = world.movie("Ronin", year=1998, duration_ms=2 * HOUR, sage=at(10 * MIN, ago=DAY),
                       plex=at(10 * MIN, ago=DAY))
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))

    world.clock.advance(HOUR)
    if failing == "plex":
        user.sage_stop_at(item, 25 * MIN)
        env.plex.add_fault(function="timeline", status=500)
        env.plex.add_fault(function="progress", status=500)
    else:
        user.plex_stop_at(item, 25 * MIN)
        env.sage.add_fault(function="SetWatchedTimes", status=500)
    ok(sync(env, state), 1)
    env.plex.clear_faults()
    env.sage.clear_faults()
    assert near(world.plex_item(item).view_offset_ms if failing == "plex"
                else world.sage_position_ms(item), 10 * MIN)

    world.clock.advance(HOUR)
    r = ok(sync(env, state))
    assert near(world.plex_item(item).view_offset_ms, 25 * MIN), world.plex_item(item)
    assert near(world.sage_position_ms(item), 25 * MIN)
    assert "out-of-sync, 1 updated" in r.total and "left as is" not in r.total, r.out
    quiet(env, state)


def test_a_killed_runs_write_done_by_the_next_sync_is_never_carried_out_again(
        world: World, start, state: Path) -> None:
    """Synced unwatched on both. The user finishes the film on SageTV; the sync is killed
    (kill -9) before Plex's scrobble, and the next sync scrobbles it. Days later the user
    marks it unwatched on Plex. That un-watch is the user's latest word: the killed run's
    scrobble was done long ago, so it is not carried out again, and SageTV follows Plex."""
    item = world.movie("Ronin", year=1998, sage=none(), plex=none())
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))

    world.clock.advance(HOUR)
    user.sage_finish(item)
    sync_killed_at_plex_write(env, state, 0)
    env.plex.clear_faults()
    assert world.plex_item(item).view_count == 0
    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert world.plex_item(item).view_count == 1

    world.clock.advance(DAY)
    user.plex_unwatch(item)
    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert world.plex_item(item).view_count == 0, "the killed run's scrobble came back"
    assert world.sage_watched(item) is False
    quiet(env, state)

# =============================================================================================
# 3. A newer viewing beats a stale decision (§6.1, §6.4)
# =============================================================================================


def test_undo_skips_an_item_watched_again_on_plex_after_the_sync(
        world: World, start, state: Path) -> None:
    """The sync scrobbles Plex (SageTV watched). The user then watches it again on Plex (view
    count 2, a newer lastViewedAt, still watched). ``--undo`` must skip it (changed since) and
    leave Plex watched; the other item of that sync is undone."""
    item = world.episode("Bones", 2, 1, "The Titan on the Tracks", sage=watched(ago=HOUR),
                         plex=none())
    other = world.episode("Bones", 2, 2, "Mayhem on a Cross", sage=watched(ago=HOUR),
                          plex=none())
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))
    assert world.plex_item(item).view_count == 1

    world.clock.advance(HOUR)
    user.plex_finish(item)
    r = ok(run(env, state, "--undo"))
    assert world.plex_item(item).view_count == 2, "undo un-watched a viewing made after the sync"
    assert "unscrobble" not in plex_writes_to(env, item.rating_key)
    assert "[skipped]" in r.line_for(item.rating_key)
    assert world.plex_item(other).view_count == 0  # undone


def test_undo_skips_an_item_watched_again_on_sagetv_after_the_sync(
        world: World, start, state: Path) -> None:
    """The sync marks SageTV watched (Plex watched). The user then watches it on SageTV from
    start to end (a newer RealWatchedEndTime, still watched). ``--undo`` must not ClearWatched
    it."""
    item = world.episode("Bones", 2, 3, "Judas on a Pole", sage=none(), plex=watched(ago=HOUR))
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))
    assert world.sage_watched(item)

    world.clock.advance(HOUR)
    user.sage_finish(item)
    r = ok(run(env, state, "--undo"))
    assert world.sage_watched(item), "undo cleared a viewing made after the sync"
    assert sage_writes_to(env, item) == []
    assert "[skipped]" in r.line_for(item.rating_key)


def test_undo_skips_a_plex_position_moved_since(world: World, start, state: Path) -> None:
    """The sync sets Plex's position to SageTV's 40:00. The user then plays on to 50:00 on
    Plex (same kind of state, another position). ``--undo`` must skip it: Plex stays at 50:00
    and SageTV keeps 40:00 (an undo that looked only at SageTV, or only at the kind of state,
    would take Plex back to nothing)."""
    item = world.movie("Ronin", year=1998, sage=at(40 * MIN, ago=HOUR), plex=none())
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))
    assert near(world.plex_item(item).view_offset_ms, 40 * MIN)

    world.clock.advance(HOUR)
    user.plex_stop_at(item, 50 * MIN)
    ok(run(env, state, "--undo"))
    assert near(world.plex_item(item).view_offset_ms, 50 * MIN)
    assert plex_writes_to(env, item.rating_key) == []
    assert near(world.sage_position_ms(item), 40 * MIN)


def test_undo_skips_a_sagetv_position_moved_since(world: World, start, state: Path) -> None:
    """The sync sets SageTV's position to Plex's 40:00. The user then plays on to 50:00 on
    SageTV. ``--undo`` must leave SageTV at 50:00."""
    item = world.movie("Ronin", year=1998, sage=none(), plex=at(40 * MIN, ago=HOUR))
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))
    assert near(world.sage_position_ms(item), 40 * MIN)

    world.clock.advance(HOUR)
    user.sage_stop_at(item, 50 * MIN)
    ok(run(env, state, "--undo"))
    assert near(world.sage_position_ms(item), 50 * MIN)
    assert sage_writes_to(env, item) == []


def test_apply_does_not_unwatch_plex_over_a_viewing_made_after_the_plan(
        world: World, start, state: Path, tmp_path: Path) -> None:
    """Both sides watched and synced. The user un-watches on SageTV; ``--plan F`` says
    'un-watch Plex'. Before ``--apply F`` the user watches it again on Plex (view count 2).
    The apply must skip it: Plex stays watched."""
    item = world.episode("Bones", 2, 4, "Two Bodies in the Lab", sage=watched(ago=DAY),
                         plex=watched(ago=DAY))
    env: Env = start()
    user = User(world, env.plex)
    plan = tmp_path / "plan.json"
    ok(sync(env, state))

    world.clock.advance(HOUR)
    user.sage_unwatch(item)
    ok(run(env, state, "all", "--plan", str(plan)))
    world.clock.advance(HOUR)
    user.plex_finish(item)
    r = ok(run(env, state, "--apply", str(plan)))
    assert world.plex_item(item).view_count == 2, "a stale plan un-watched a newer viewing"
    assert plex_writes_to(env, item.rating_key) == []
    assert "[skipped]" in r.line_for(item.rating_key)


def test_apply_skips_a_plex_position_moved_since_the_plan(
        world: World, start, state: Path, tmp_path: Path) -> None:
    """SageTV's newer 40:00 is planned for Plex (at 20:00). Before the apply the user plays on
    Plex to 25:00: only Plex changed, only its position. The apply must skip it."""
    item = world.movie("Ronin", year=1998, sage=at(40 * MIN, ago=HOUR),
                       plex=at(20 * MIN, ago=DAY))
    env: Env = start()
    user = User(world, env.plex)
    plan = tmp_path / "plan.json"
    ok(run(env, state, "all", "--plan", str(plan)))

    world.clock.advance(HOUR)
    user.plex_stop_at(item, 25 * MIN)
    r = ok(run(env, state, "--apply", str(plan)))
    assert near(world.plex_item(item).view_offset_ms, 25 * MIN)
    assert env.writes() == []
    assert "[skipped]" in r.line_for(item.rating_key)


def test_pending_clear_is_not_retried_over_a_full_rewatch_on_sagetv(
        world: World, start, state: Path) -> None:
    """Synced watched on both. The user un-watches on Plex; the sync's ClearWatched fails (the
    decision is pending). Then the user watches it on SageTV from start to end. The next sync
    must not carry out the stale ClearWatched: SageTV stays watched, and Plex follows."""
    item = world.episode("Bones", 2, 5, "Aliens in a Spaceship", sage=watched(ago=DAY),
                         plex=watched(ago=DAY))
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))

    world.clock.advance(HOUR)
    user.plex_unwatch(item)
    env.sage.add_fault(function="ClearWatched", status=500)
    ok(sync(env, state), 1)
    env.sage.clear_faults()
    assert world.sage_watched(item)

    world.clock.advance(HOUR)
    user.sage_finish(item)
    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert world.sage_watched(item), "a pending clear wiped a newer viewing"
    assert "ClearWatched" not in sage_writes_to(env, item)
    assert world.plex_item(item).view_count >= 1
    quiet(env, state)


def test_a_sagetv_finish_during_the_write_of_a_plex_position_is_kept(
        world: World, start, state: Path) -> None:
    """The user stops Plex at 8:04; the sync sets SageTV to 8:04, and the user finishes the
    show on SageTV before the sync reads it back (two screens): the read-back shows watched,
    with a new watch record. That is the user's viewing, not the run's doing: the next sync
    keeps SageTV watched and marks Plex watched, rather than retrying 8:04 over it."""
    item = world.episode("Bones", 2, 7, "The Woman in the Sand", duration_ms=60 * MIN,
                         sage=at(20 * MIN, ago=DAY), plex=at(20 * MIN, ago=DAY))
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))

    world.clock.advance(HOUR)
    user.plex_stop(item, 8 * MIN + 4 * SEC)
    written = [False]

    def finish_before_the_read_back(request: Request) -> bool:
        if request.function == "SetWatchedTimes":
            written[0] = True
        elif written[0] and request.function not in world.sage.WRITE_FUNCTIONS:
            written[0] = False
            world.clock.advance(2 * SEC)
            user.sage_finish(item)
        return False

    env.sage.add_fault(Fault(when=finish_before_the_read_back))
    sync(env, state)
    env.sage.clear_faults()
    assert world.sage_watched(item)

    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert world.sage_watched(item), "the stale 8:04 was written over the user's finish"
    assert world.plex_item(item).view_count >= 1 and world.plex_item(item).view_offset_ms == 0
    quiet(env, state)


def test_rewatch_on_sagetv_after_unwatch_on_plex_keeps_both_watched(
        world: World, start, state: Path) -> None:
    """Synced watched on both. The user un-watches on Plex, and later watches it again on
    SageTV from start to end (same state as the base, newer stamp): both sides changed, and
    the later viewing wins: Plex is marked watched, SageTV is not cleared."""
    item = world.episode("Bones", 2, 6, "The Girl in the Gator", sage=watched(ago=DAY),
                         plex=watched(ago=DAY))
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))

    world.clock.advance(HOUR)
    user.plex_unwatch(item)
    world.clock.advance(HOUR)
    user.sage_finish(item)
    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert world.sage_watched(item)
    assert "ClearWatched" not in sage_writes_to(env, item)
    assert world.plex_item(item).view_count >= 1
    quiet(env, state)


def test_rewatch_on_plex_after_unwatch_on_sagetv_keeps_both_watched(
        world: World, start, state: Path) -> None:
    """The mirror: un-watched on SageTV, then watched again on Plex (view count 2): Plex's
    later viewing is a change too; SageTV is marked watched, Plex is not unscrobbled."""
    item = world.episode("Bones", 2, 7, "The Blonde in the Game", sage=watched(ago=DAY),
                         plex=watched(ago=DAY))
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))

    world.clock.advance(HOUR)
    user.sage_unwatch(item)
    world.clock.advance(HOUR)
    user.plex_finish(item)
    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert world.plex_item(item).view_count == 2
    assert "unscrobble" not in plex_writes_to(env, item.rating_key)
    assert world.sage_watched(item)
    quiet(env, state)


# =============================================================================================
# 4. A changed setting is never a user change (§6.1)
# =============================================================================================

def test_changing_x_back_to_the_default_does_not_unwatch_plex(
        world: World, start, state: Path) -> None:
    """A run with ``-x 30`` sees SageTV at 0:45 (newer) as a position against Plex's watched
    item; Plex cannot take a position under a minute, so nothing is written. The next run
    with the default -x (0:45 is now 'not started') sees no server change: it must write
    nothing, and never un-watch Plex. A ``-n`` run in between changes nothing either."""
    item = world.episode("Bones", 3, 1, "Yanks in the U.K.", sage=at(45 * SEC, ago=HOUR),
                         plex=watched(ago=DAY))
    env: Env = start()
    ok(sync(env, state, "-x", "30"))
    assert world.plex_item(item).view_count == 1

    world.clock.advance(HOUR)
    ok(run(env, state, "all", "-s", "-n"))
    assert env.writes() == []
    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert world.plex_item(item).view_count == 1, "a changed -x un-watched Plex"
    assert env.writes() == []
    quiet(env, state)


def test_plex_threshold_raised_from_80_to_90_writes_no_resume_point(
        world: World, start, state: Path) -> None:
    """Plex's played threshold is 80 %: SageTV at 50:00 of 60 is watched, like Plex; synced.
    The admin raises the threshold to 90 %: 50:00 is now a position, but no server changed,
    so nothing may be written (no resume point on Plex, no clear on SageTV)."""
    world.plex.played_threshold = 0.8
    item = world.episode("Bones", 3, 2, "Death in the Saddle", duration_ms=60 * MIN,
                         sage=at(50 * MIN, ago=DAY), plex=watched(ago=DAY))
    env: Env = start()
    ok(sync(env, state))
    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert env.writes() == []

    world.plex.played_threshold = 0.9
    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert env.writes() == [], "a changed Plex setting was taken for a user change"
    plex = world.plex_item(item)
    assert plex.view_count == 1 and plex.view_offset_ms == 0
    quiet(env, state)


def test_prefs_403_falls_back_to_90_and_is_not_a_user_change(
        world: World, start, state: Path) -> None:
    """Threshold 80 % read fine at the first sync; the next run's token gets 403 on /:/prefs.
    The run goes on with 90 % (exit 0, the other item's change written) and takes the changed
    bounds for no one's doing: the 50:00 item is not written."""
    world.plex.played_threshold = 0.8
    item = world.episode("Bones", 3, 3, "The Secret in the Soil", duration_ms=60 * MIN,
                         sage=at(50 * MIN, ago=DAY), plex=watched(ago=DAY))
    other = world.movie("Heat", sage=none(), plex=watched(ago=DAY))
    env: Env = start()
    ok(sync(env, state))
    assert world.sage_watched(other)

    world.clock.advance(HOUR)
    User(world, env.plex).plex_unwatch(other)
    env.plex.add_fault(path="/:/prefs", status=403)
    ok(sync(env, state))
    assert world.sage_watched(other) is False  # the run went on
    assert plex_writes_to(env, item.rating_key) == []
    assert sage_writes_to(env, item) == []
    assert world.plex_item(item).view_count == 1


def test_prefs_403_on_a_first_sync_falls_back_to_90_percent(
        world: World, start, state: Path) -> None:
    """A token that cannot read /:/prefs (403): the sync is not aborted; it uses 90 %."""
    item = world.movie("Heat", sage=watched(ago=HOUR), plex=none())
    env: Env = start()
    env.plex.add_fault(path="/:/prefs", status=403)
    ok(sync(env, state))
    assert world.plex_item(item).view_count == 1


def test_plex_threshold_70_is_used_so_a_watched_item_is_scrobbled(start, state: Path) -> None:
    """Plex's threshold is 70 % and Plex ignores a position past it: SageTV's 45:00 of 60
    (newer) is watched by Plex's own measure, so Plex gets a scrobble, not a position it
    would drop; the next run is quiet."""
    world = World(plex_options={"progress_past_threshold": "ignore", "played_threshold": 0.7})
    item = world.episode("Bones", 3, 4, "Judas on a Pole", duration_ms=60 * MIN,
                         sage=at(45 * MIN, ago=HOUR), plex=none())
    with world.running() as servers:
        config = servers.write_config(state.parent / "seventy.json")
        env = Env(world, servers, config, Path(os.environ["SAGEPLEX_LOG"]))
        ok(run(env, state, "all", "-s", "-c", str(config)))
        assert world.plex_item(item).view_count == 1
        env.clear_logs()
        ok(run(env, state, "all", "-s", "-c", str(config)))
        assert env.writes() == []


def test_plex_threshold_95_keeps_110_of_120_minutes_a_position(
        world: World, start, state: Path) -> None:
    """Plex's threshold is 95 %: Plex's 1:50:00 of a 2-hour episode is not watched (SageTV
    would call it watched only at 1:54:00), so SageTV gets that position, not SetWatched."""
    world.plex.played_threshold = 0.95
    item = world.episode("Bones", 3, 5, "Double Episode", duration_ms=120 * MIN,
                         sage=none(), plex=at(110 * MIN, ago=HOUR))
    env: Env = start()
    ok(sync(env, state))
    assert world.sage_watched(item) is False
    assert near(world.sage_position_ms(item), 110 * MIN)
    assert "SetWatched" not in sage_writes_to(env, item)
    quiet(env, state)


def test_plex_threshold_100_percent_is_used_not_replaced_by_90(
        world: World, start, state: Path) -> None:
    """Plex's threshold is 100 %: the seed's 95 % still bounds 'watched'. SageTV's finished
    film goes to Plex as a scrobble; Plex's 1:56:00 of 2 h (past 95 %) is watched for SageTV;
    Plex's 1:50:00 of a 2-hour episode (92 %, under SageTV's 1:55:00) is a position, which a
    tool that took 100 % for unreadable (90 %) would turn into SetWatched. Then quiet."""
    world.plex.played_threshold = 1.0
    film = world.movie("Heat", sage=watched(ago=HOUR), plex=none())
    nearly = world.movie("Ronin", year=1998, sage=none(), plex=at(116 * MIN, ago=HOUR))
    long_one = world.episode("Bones", 3, 7, "Double Episode", duration_ms=120 * MIN,
                             sage=none(), plex=at(110 * MIN, ago=HOUR))
    env: Env = start()
    ok(sync(env, state))
    assert world.plex_item(film).view_count == 1
    assert world.sage_watched(nearly)
    assert world.sage_watched(long_one) is False
    assert near(world.sage_position_ms(long_one), 110 * MIN)
    assert "SetWatched" not in sage_writes_to(env, long_one)
    quiet(env, state)


def test_movie_category_without_ismovie_uses_the_ten_minute_margin(start, state: Path) -> None:
    """An old sagex without IsMovie; the show's category is 'Movie' (its external id is not
    MV...). SageTV calls a film watched 10 min before its end: Plex's 1:52:00 of 2 h (threshold
    99 %) is watched, so SageTV gets SetWatched; the next run is quiet."""
    world = World(sage_options={"field_set": "2015"})
    world.plex.played_threshold = 0.99
    film = world.movie("Heat", show_external_id="SH0000123456", sage=none(),
                       plex=at(112 * MIN, ago=HOUR))
    with world.running() as servers:
        config = servers.write_config(state.parent / "old.json")
        env = Env(world, servers, config, Path(os.environ["SAGEPLEX_LOG"]))
        ok(run(env, state, "all", "-s", "-c", str(config)))
        assert sage_writes_to(env, film) == ["SetWatched"]
        assert world.sage_watched(film)
        env.clear_logs()
        ok(run(env, state, "all", "-s", "-c", str(config)))
        assert env.writes() == []


def test_plex_rewatch_in_progress_goes_to_sagetv_as_a_position(
        world: World, start, state: Path) -> None:
    """Watched on both and synced. The user starts it again on Plex and stops at 10:00 (view
    count stays 1): a rewatch in progress is a position, not 'watched'. SageTV follows to
    10:00 (no longer watched); the next run is quiet."""
    item = world.episode("Bones", 3, 6, "The Woman in Limbo", sage=watched(ago=DAY),
                         plex=watched(ago=DAY))
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))

    world.clock.advance(HOUR)
    user.plex_stop_at(item, 10 * MIN)
    assert world.plex_item(item).view_count == 1
    ok(sync(env, state))
    assert world.sage_watched(item) is False
    assert near(world.sage_position_ms(item), 10 * MIN)
    quiet(env, state)


@pytest.mark.parametrize("sage_skew, plex_skew", [(10 * MIN, 0), (0, -10 * MIN),
                                                  (7 * MIN, -7 * MIN)],
                         ids=["sage-ahead", "plex-behind", "both"])
def test_each_servers_clock_offset_comes_from_its_own_date_header(
        start, state: Path, sage_skew: int, plex_skew: int) -> None:
    """SageTV's clock runs ahead of Plex's. The user stops at 20:00 on SageTV, then 5 minutes
    later at 30:00 on Plex: Plex's is the later viewing, once each stamp is corrected with
    its own server's offset. SageTV follows Plex to 30:00 and Plex keeps it."""
    world = World(sage_skew_ms=sage_skew, plex_skew_ms=plex_skew)
    item = world.episode("Bones", 4, 1, "Harbingers in a Fountain", duration_ms=60 * MIN,
                         sage=none(), plex=none())
    with world.running() as servers:
        config = servers.write_config(state.parent / "skew.json")
        env = Env(world, servers, config, Path(os.environ["SAGEPLEX_LOG"]))
        user = User(world, env.plex)
        ok(run(env, state, "all", "-s", "-c", str(config)))
        world.clock.advance(HOUR)
        user.sage_stop_at(item, 20 * MIN)
        # User.sage_stop_at stamps with the world's clock: SageTV stamps with its own
        airing = world.sage.watch_record(item.airing_id)
        assert airing is not None
        ws, we, rs, re_ = airing
        world.sage.set_watch_record(item.airing_id, ws, we, rs + sage_skew, re_ + sage_skew)
        world.clock.advance(5 * MIN)
        user.plex_stop_at(item, 30 * MIN)
        ok(run(env, state, "all", "-s", "-c", str(config)))
        assert near(world.plex_item(item).view_offset_ms, 30 * MIN)
        assert near(world.sage_position_ms(item), 30 * MIN)


def test_the_first_reply_of_a_run_sets_the_clock_offset(world: World, start,
                                                        state: Path) -> None:
    """Plex's clock is right when the run starts; after its first reply, its Date headers
    run two hours ahead (its clock stepped by a bad time source while the tool reads). The
    run keeps the offset its first reply gave: the user's later viewing on Plex (30:00, five
    minutes after 20:00 on SageTV) stays the newer one, not two hours older than it is."""
    item = world.episode("Bones", 4, 1, "Harbingers in a Fountain", duration_ms=60 * MIN,
                         sage=none(), plex=none())
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))
    world.clock.advance(HOUR)
    user.sage_stop_at(item, 20 * MIN)
    world.clock.advance(5 * MIN)
    user.plex_stop_at(item, 30 * MIN)

    replies = [0]
    right_clock_s = world.plex.date_clock_s

    def stepped_clock_s() -> float:
        replies[0] += 1
        return right_clock_s() + (0 if replies[0] == 1 else 2 * HOUR / 1000)

    world.plex.date_clock_s = stepped_clock_s  # type: ignore[method-assign]
    ok(sync(env, state))
    assert replies[0] > 1
    assert near(world.plex_item(item).view_offset_ms, 30 * MIN), world.plex_item(item)
    assert near(world.sage_position_ms(item), 30 * MIN)

# =============================================================================================
# 5. State and plans belong to one pair of servers (§6.5)
# =============================================================================================


@contextlib.contextmanager
def other_servers(tmp_path: Path, name: str, declare: Callable[[World], Item]
                  ) -> Iterator[tuple[Env, Item]]:
    """A second pair of servers, its config ``name`` in the same folder as the first's.
    Worlds declared alike give the same ids (rating keys, media files, file names)."""
    world = World()
    item = declare(world)
    with world.running() as servers:
        config = servers.write_config(tmp_path / name)
        yield Env(world, servers, config, Path(os.environ["SAGEPLEX_LOG"])), item


def test_second_config_in_the_same_folder_does_not_inherit_the_first_ones_base(
        world: World, start, tmp_path: Path) -> None:
    """Two configs in one folder, two pairs of servers holding 'the same' item (same ids). The
    first pair has it watched on both and is synced. The second pair's first sync (its own
    default state file) must decide with no base: Plex watched, SageTV not -> SageTV is
    marked watched, and Plex is never un-watched."""
    world.episode("Bones", 5, 1, "Mayhem", sage=watched(ago=DAY), plex=watched(ago=DAY))
    env: Env = start()
    ok(env.run("all", "-s"))

    def declare(w: World) -> Item:
        return w.episode("Bones", 5, 1, "Mayhem", sage=none(), plex=watched(ago=DAY))

    with other_servers(tmp_path, "other.json", declare) as (other, item):
        assert item.rating_key == world.items[0].rating_key  # the same ids
        other.clear_logs()
        r = ok(other.run("all", "-s", "-c", str(other.config_path)))
        assert other.world.plex_item(item).view_count == 1, "inherited the other servers' base"
        assert other.world.sage_watched(item)
        assert r.code == 0
    assert (tmp_path / "other.state.sqlite").exists()
    assert (tmp_path / "sageplex_cfg.state.sqlite").exists()


def test_a_state_file_used_with_other_servers_stops_the_run_before_any_write(
        world: World, start, tmp_path: Path, state: Path) -> None:
    """The first pair is synced into a state file; the same file named with ``--state`` for
    another pair stops the run with exit 1, a message naming --state, and no write."""
    world.episode("Bones", 5, 2, "Mayhem", sage=watched(ago=DAY), plex=watched(ago=DAY))
    env: Env = start()
    ok(sync(env, state))

    def declare(w: World) -> Item:
        return w.episode("Bones", 5, 2, "Mayhem", sage=none(), plex=watched(ago=DAY))

    with other_servers(tmp_path, "other.json", declare) as (other, item):
        before = snapshot(other.world)
        other.clear_logs()
        r = other.run("all", "-s", "-c", str(other.config_path), "--state", str(state))
        assert r.code == 1, r.out + r.err
        assert "--state" in r.err
        assert other.writes() == []
        assert snapshot(other.world) == before


def test_a_plan_made_for_one_pair_is_not_applied_to_another(
        world: World, start, tmp_path: Path, state: Path) -> None:
    """``--plan F`` with the first pair (mark SageTV watched), then ``--apply F`` with the
    second pair's config: refused (non-zero exit), nothing written to the second pair."""
    world.episode("Bones", 5, 3, "Mayhem", sage=none(), plex=watched(ago=DAY))
    env: Env = start()
    plan = tmp_path / "plan.json"
    ok(run(env, state, "all", "--plan", str(plan)))

    def declare(w: World) -> Item:
        return w.episode("Bones", 5, 3, "Mayhem", sage=none(), plex=watched(ago=DAY))

    with other_servers(tmp_path, "other.json", declare) as (other, item):
        other.clear_logs()
        r = other.run("--apply", str(plan), "-c", str(other.config_path),
                      "--state", str(tmp_path / "other.sqlite"))
        assert r.code != 0, r.out + r.err
        assert other.writes() == []
        assert other.world.sage_watched(item) is False


# =============================================================================================
# 6. Twins: Plex items holding the same SageTV file (§4, §6.4)
# =============================================================================================

def test_failed_write_to_the_second_twin_is_retried(world: World, start, state: Path) -> None:
    """SageTV watched; the film is in two Plex libraries, unwatched in both. The scrobble of
    the second fails. The next sync scrobbles it: both twins end watched; then quiet."""
    film = world.movie("Heat", sage=watched(ago=HOUR), plex=none())
    twin = add_twin(world, twin_section(world), film)
    env: Env = start()
    env.plex.add_fault(function="scrobble", status=500,
                       when=lambda q: q.param("key") == str(twin))
    ok(sync(env, state), 1)
    assert world.plex_item(film).view_count == 1
    env.plex.clear_faults()

    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert world.plex.item(twin).view_count == 1, "the failed twin was never retried"
    assert world.plex_item(film).view_count == 1
    quiet(env, state, (twin,))


def test_undo_puts_back_each_twin_to_its_own_before_state(world: World, start,
                                                          state: Path) -> None:
    """SageTV watched an hour ago; the first twin was paused at 30:00 a day ago, the second
    never played. The sync marks both watched. ``--undo`` puts each back to its own
    before-state: the first at 30:00, the second unplayed; SageTV stays watched."""
    film = world.movie("Heat", sage=watched(ago=HOUR), plex=at(30 * MIN, ago=DAY))
    twin = add_twin(world, twin_section(world), film)
    env: Env = start()
    ok(sync(env, state))
    assert world.plex.item(twin).view_count == 1 and world.plex_item(film).view_count == 1

    ok(run(env, state, "--undo"))
    first, second = world.plex_item(film), world.plex.item(twin)
    assert first.view_count == 0 and near(first.view_offset_ms, 30 * MIN), first
    assert second.view_count == 0 and second.view_offset_ms == 0, "undo missed the 2nd twin"
    assert world.sage_watched(film)


def test_killed_between_the_twins_writes_the_second_twin_gets_the_result(
        world: World, start, state: Path) -> None:
    """Synced at nothing; then the user finishes the film on SageTV. The sync scrobbles the
    first twin and is killed (kill -9) before the second twin's scrobble. The next sync
    finishes the job: the second twin is marked watched too."""
    film = world.movie("Heat", sage=none(), plex=none())
    twin = add_twin(world, twin_section(world), film)
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))

    world.clock.advance(HOUR)
    user.sage_finish(film)
    sync_killed_at_plex_write(env, state, 1)
    assert functions(env.plex_writes()).count("scrobble") == 2  # the second one dropped
    env.plex.clear_faults()
    scrobbled = sum(world.plex.item(k).view_count for k in (film.rating_key, twin))
    assert scrobbled == 1

    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert world.plex_item(film).view_count == 1
    assert world.plex.item(twin).view_count == 1, "the killed run's second twin never got it"
    assert world.sage_watched(film)
    quiet(env, state, (twin,))


def test_m_on_one_twin_gives_the_result_to_the_other(world: World, start, state: Path) -> None:
    """Synced at nothing. The user pauses the film at 30:00 in the first library and syncs it
    alone (``-m FIRST -s``): SageTV and the second library's copy both get 30:00. The next
    full sync writes nothing."""
    film = world.movie("Heat", sage=none(), plex=none())
    twin = add_twin(world, twin_section(world), film)
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))

    world.clock.advance(HOUR)
    user.plex_stop_at(film, 30 * MIN)
    ok(run(env, state, "-m", str(film.rating_key), "-s"))
    assert near(world.sage_position_ms(film), 30 * MIN)
    assert near(world.plex.item(twin).view_offset_ms, 30 * MIN), "the twin never got the result"
    quiet(env, state, (twin,))


def test_why_on_the_second_twin_agrees_with_the_sync(world: World, start, state: Path) -> None:
    """The first twin paused at 30:00 (newest), the second and SageTV never played. ``--why``
    on the second twin says what the sync will do to it (30:00), not 'nothing'; the sync
    then does it."""
    film = world.movie("Heat", sage=none(), plex=at(30 * MIN, ago=HOUR))
    twin = add_twin(world, twin_section(world), film)
    env: Env = start()

    why = ok(run(env, state, "--why", str(twin)))
    would = next(ln for ln in why.out.splitlines() if "would do:" in ln)
    assert "0:30:00" in would, why.out
    assert env.writes() == []

    ok(sync(env, state))
    assert near(world.plex.item(twin).view_offset_ms, 30 * MIN)
    assert near(world.sage_position_ms(film), 30 * MIN)


# =============================================================================================
# 7. Others
# =============================================================================================

def test_unwatching_part_two_of_a_split_recording_keeps_part_one(
        world: World, start, state: Path) -> None:
    """A recording in two files, one Plex item per file, all watched and synced. The user
    un-watches part 2 on Plex: SageTV goes back to the start of part 2 (part 1 still seen),
    never ClearWatched of the whole; part 1 stays watched on Plex; then quiet."""
    item = world.episode("Castle", 2, 6, "Sucker Punch", duration_ms=60 * MIN, segments=2,
                         in_plex=False, sage=watched(ago=DAY), plex=none())
    root = world.plex_roots["show"]
    lengths = [end - begin for begin, end in item.segments]
    last = (world.clock.ms() - DAY) // 1000
    part1 = world.plex.add_episode(world.tv_section, "Castle", 2, 6, "Sucker Punch (1)",
                                   [f"{root}/{item.file_names[0]}"], lengths[0],
                                   view_count=1, last_viewed_at_s=last)
    part2 = world.plex.add_episode(world.tv_section, "Castle", 2, 6, "Sucker Punch (2)",
                                   [f"{root}/{item.file_names[1]}"], lengths[1],
                                   view_count=1, last_viewed_at_s=last)
    env: Env = start()
    ok(sync(env, state))
    assert env.writes() == []

    world.clock.advance(HOUR)
    User(world, env.plex).plex_unwatch(item, rating_key=part2)
    ok(sync(env, state))
    assert world.sage_watched(item) is False
    assert near(world.sage_position_ms(item), lengths[0]), world.sage_position_ms(item)
    assert world.plex.item(part1).view_count == 1
    assert world.plex.item(part2).view_count == 0
    quiet(env, state, (part1, part2))


def test_state_folder_not_writable_stops_the_run_before_any_write(
        world: World, start, tmp_path: Path) -> None:
    """The state cannot be recorded (its folder is a file, or a read-only folder): the run
    stops with exit 1 before writing anything to either server."""
    item = world.episode("Bones", 6, 1, "Pilot", sage=none(), plex=watched(ago=HOUR))
    env: Env = start()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x", encoding="utf-8")
    r = run(env, blocker / "state.sqlite", "all", "-s")
    assert r.code == 1, r.out + r.err
    assert env.writes() == []
    assert world.sage_watched(item) is False
    if os.getuid() != 0:  # root writes in a read-only folder anyway
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            r = run(env, locked / "state.sqlite", "all", "-s")
            assert r.code == 1, r.out + r.err
            assert env.writes() == []
        finally:
            locked.chmod(0o755)


def test_zero_byte_state_file_is_damaged_and_left_alone(world: World, start,
                                                        state: Path) -> None:
    """A state file of 0 bytes (a full disk, a crash): ``-s`` stops with exit 1 and a message
    saying it is damaged; the file stays 0 bytes; nothing is written."""
    item = world.episode("Bones", 6, 2, "The Man in the Fallout Shelter", sage=none(),
                         plex=watched(ago=HOUR))
    env: Env = start()
    state.write_bytes(b"")
    r = sync(env, state)
    assert r.code == 1, r.out + r.err
    assert "damaged" in r.err.lower(), r.err
    assert state.read_bytes() == b""
    assert env.writes() == []
    assert world.sage_watched(item) is False


def test_two_bare_undos_put_back_the_last_two_syncs(world: World, start, state: Path) -> None:
    """Sync 1 marks X watched on SageTV, sync 2 marks Y. A bare ``--undo`` puts back sync 2;
    a second bare ``--undo`` puts back sync 1 (an undo is never the target of a bare undo):
    both end unwatched on SageTV, and the next sync writes nothing."""
    x = world.episode("Bones", 9, 1, "X", sage=none(), plex=watched(ago=HOUR))
    y = world.episode("Bones", 9, 2, "Y", sage=none(), plex=none())
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))
    assert world.sage_watched(x)

    world.clock.advance(HOUR)
    user.plex_finish(y)
    ok(sync(env, state))
    assert world.sage_watched(y)

    ok(run(env, state, "--undo"))
    assert world.sage_watched(y) is False and world.sage_watched(x)
    ok(run(env, state, "--undo"))
    assert world.sage_watched(y) is False, "the second bare --undo undid the first undo"
    assert world.sage_watched(x) is False
    quiet(env, state)


def _delete_plex_movie(world: World, key: int) -> None:
    plex = world.plex
    with plex.lock:
        plex._meta.pop(key)
        plex._order.clear()
        plex._drop_frags(key)
        plex._static.pop(key, None)
        for watches in plex._watch.values():
            watches.pop(key, None)


def test_undo_skips_a_deleted_item_and_undoes_the_rest(world: World, start,
                                                       state: Path) -> None:
    """The sync marks two films watched on Plex. One is then deleted from Plex. ``--undo``
    skips and reports the gone one and undoes the other."""
    gone = world.movie("Heat", sage=watched(ago=HOUR), plex=none())
    kept = world.movie("Ronin", year=1998, sage=watched(ago=HOUR), plex=none())
    env: Env = start()
    ok(sync(env, state))
    assert world.plex_item(kept).view_count == 1
    _delete_plex_movie(world, gone.rating_key)

    r = run(env, state, "--undo")
    assert r.code in (0, 1), r.out + r.err
    assert world.plex_item(kept).view_count == 0, "one gone item stopped the whole undo"
    assert str(gone.rating_key) in r.out + r.err
    assert world.sage_watched(kept) and world.sage_watched(gone)


def _mass_unwatch_world(world: World, count: int) -> list[Item]:
    return [world.episode("Bones", 7 + n // 100, n % 100 + 1, f"Episode {n}",
                          sage=watched(ago=DAY), plex=watched(ago=DAY)) for n in range(count)]


def test_guard_is_twenty_items_whatever_the_library_size(world: World, start,
                                                         state: Path) -> None:
    """A 300-item library (like a 4,890-item one, where 10 % would be 489). The user
    un-watches 20 episodes on Plex: no more than 20, the nightly cron run (no terminal, no -y)
    carries them out. Then 21 more: that run must refuse them all: exit 1, a message naming
    21 and -y, nothing written. With -y they go through."""
    items = _mass_unwatch_world(world, 300)
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))

    world.clock.advance(HOUR)
    for item in items[:20]:
        user.plex_unwatch(item)
    ok(sync(env, state))
    assert not any(world.sage_watched(item) for item in items[:20])

    world.clock.advance(HOUR)
    for item in items[20:41]:
        user.plex_unwatch(item)
    r = sync(env, state)
    assert r.code == 1, r.out + r.err
    assert "21" in r.err and "-y" in r.err, r.err
    assert env.writes() == []
    assert all(world.sage_watched(item) for item in items[20:])

    ok(sync(env, state, "-y"))
    assert not any(world.sage_watched(item) for item in items[20:41])


def test_guard_counts_positions_moved_back_on_plex(world: World, start, state: Path) -> None:
    """25 films paused at 40:00 on both sides; the user restarts each on SageTV and stops at
    10:00. Moving 25 Plex positions back is what the guard is for: refused without -y."""
    films = [world.movie(f"Film {n}", year=1990 + n % 20, sage=at(40 * MIN, ago=DAY),
                         plex=at(40 * MIN, ago=DAY)) for n in range(25)]
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))

    world.clock.advance(HOUR)
    for film in films:
        user.sage_stop_at(film, 10 * MIN)
    r = sync(env, state)
    assert r.code == 1, r.out + r.err
    assert env.writes() == []
    assert all(near(world.plex_item(f).view_offset_ms, 40 * MIN) for f in films)


def test_guard_limit_from_the_config(world: World, start, state: Path) -> None:
    """The config's ``"guard": 30`` lets 25 un-watches through without -y; ``"guard": 0``
    turns the guard off."""
    items = _mass_unwatch_world(world, 25)
    env: Env = start(guard=30)
    user = User(world, env.plex)
    ok(sync(env, state))

    world.clock.advance(HOUR)
    for item in items:
        user.plex_unwatch(item)
    ok(sync(env, state))
    assert not any(world.sage_watched(item) for item in items)


# -- the guard and terminals (subprocesses on a pty) ------------------------------------------

LAUNCHER = textwrap.dedent("""
    import os, signal, subprocess, sys
    tty, background = sys.argv[1], sys.argv[3] == "bg"
    out, err = open(sys.argv[4], "w"), open(sys.argv[5], "w")
    os.setsid()
    fd = os.open(tty, os.O_RDWR)  # our controlling terminal; our group in the foreground
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    process = subprocess.Popen(sys.argv[6:], stdin=fd, stdout=out, stderr=err,
                               process_group=0 if background else None)
    while True:
        pid, status = os.waitpid(process.pid, os.WUNTRACED)
        if os.WIFSTOPPED(status):
            os.kill(process.pid, signal.SIGKILL)
            os.waitpid(process.pid, 0)
            sys.exit(98)  # stopped on the terminal (SIGTTIN): it waited instead of refusing
        sys.exit(os.waitstatus_to_exitcode(status))
""")


def run_on_pty(env: Env, state: Path, tmp_path: Path, argv: list[str], *, background: bool,
               typed: bytes = b"") -> tuple[int, str, str]:
    master, slave = pty.openpty()
    name = os.ttyname(slave)  # kept open until the end: the terminal stays there
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, name, "", "bg" if background else "fg",
             str(out), str(err), sys.executable, str(MAIN / "sageplex_sync.py"), *argv,
             "--state", str(state)],
            cwd=MAIN, env=tool_environ(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if typed:
            os.write(master, typed)
        try:
            _, launcher_err = process.communicate(timeout=40)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert not launcher_err.strip() or process.returncode != 1, launcher_err
    finally:
        os.close(master)
        os.close(slave)
    return (process.returncode, out.read_text(encoding="utf-8"),
            err.read_text(encoding="utf-8"))


def _synced_25_unwatched_on_plex(world: World, env: Env, state: Path) -> list[Item]:
    items = world.items
    ok(sync(env, state))
    world.clock.advance(HOUR)
    user = User(world, env.plex)
    for item in items:
        user.plex_unwatch(item)
    env.clear_logs()
    return items


def test_guard_in_a_background_job_refuses_instead_of_stopping(
        world: World, start, state: Path, tmp_path: Path) -> None:
    """``sageplex_sync all -s &`` from a shell: the terminal is there but the job is not in its
    foreground group. The guard must refuse (exit 1, stderr naming 25 and -y, nothing written),
    never stop on SIGTTIN waiting for an answer that cannot come."""
    _mass_unwatch_world(world, 25)
    env: Env = start()
    items = _synced_25_unwatched_on_plex(world, env, state)

    code, out, err = run_on_pty(env, state, tmp_path, ["all", "-s"], background=True)
    assert code != 98, "the tool stopped on the terminal (SIGTTIN) instead of refusing"
    assert code == 1, out + err
    assert "25" in err and "-y" in err, err
    assert env.writes() == []
    assert all(world.sage_watched(item) for item in items)


def test_guard_on_a_terminal_asks_and_no_writes_nothing(
        world: World, start, state: Path, tmp_path: Path) -> None:
    """In the foreground of a terminal the guard asks; the user answers 'n': exit 1, nothing
    written. (A guard that went ahead on a terminal without asking would write 25 clears.)"""
    _mass_unwatch_world(world, 25)
    env: Env = start()
    items = _synced_25_unwatched_on_plex(world, env, state)

    code, out, err = run_on_pty(env, state, tmp_path, ["all", "-s"], background=False,
                                typed=b"n\n")
    assert env.writes() == [], "the guard went ahead on a terminal without asking"
    assert code == 1, out + err
    assert all(world.sage_watched(item) for item in items)


def test_position_is_checked_against_sagetvs_shorter_file(world: World, start,
                                                          state: Path) -> None:
    """Plex thinks the episode lasts 45 min, SageTV's file 30 min. ``--position 0:40:00`` is
    past SageTV's end: a usage error (exit 2) before any write, on either side."""
    item = world.episode("Bones", 8, 1, "The Hero in the Hold", duration_ms=30 * MIN,
                         in_plex=False, sage=none(), plex=none())
    key = world.plex.add_episode(world.tv_section, "Bones", 8, 1, "The Hero in the Hold",
                                 [f"{world.plex_roots['show']}/{item.file_names[0]}"],
                                 45 * MIN)
    env: Env = start()
    r = run(env, state, "-m", str(key), "-s", "--position", "0:40:00")
    assert r.code == 2, r.out + r.err
    assert env.writes() == []
    assert world.plex.item(key).view_offset_ms == 0


# -- an item decided again within its run (§4: no decision on a stale read) ----------------------

def test_undo_of_a_run_that_decided_a_sibling_again_puts_back_the_state_before_that_run(
        world: World, start, state: Path) -> None:
    """A is finished on Plex, B stopped at 20:00 on Plex; neither was watched on SageTV. The
    sync's SetWatched(A) makes B watched through the show flag, so B is read and decided
    again within the run (clear watched, then 20:00). ``--undo`` of that sync must put back
    what SageTV had before it, not the flag the sync's own first write set: neither
    recording watched (re-setting B's flag would re-watch A as well)."""
    a, b = siblings(world, a_sage=none(), a_plex=watched(ago=HOUR),
                    b_plex=at(20 * MIN, ago=30 * MIN))
    env: Env = start()
    r = ok(sync(env, state))
    assert "decided again" in r.out
    assert world.sage_watched(a) and not world.sage_watched(b)
    assert near(world.sage_position_ms(b), 20 * MIN)

    world.clock.advance(HOUR)
    ok(run(env, state, "--undo"))
    assert not world.sage_watched(a) and not world.sage_watched(b)
    assert "SetWatched" not in functions(env.sage_writes())
    # Plex was not written by the sync, so the undo leaves it as the user left it.
    assert world.plex_item(a).view_count == 1
    assert near(world.plex_item(b).view_offset_ms, 20 * MIN)


def test_a_sibling_decided_again_takes_the_show_flag_for_the_servers_not_the_users(
        world: World, start, state: Path) -> None:
    """Synced unwatched. The user finishes A on Plex and stops B on Plex at 20:00. The sync's
    SetWatched(A) makes B watched through the show flag, and B is decided again on the fresh
    read: that flag is the run's doing, not a viewing on SageTV newer than Plex's. B keeps
    its 20:00 on Plex and gets it on SageTV; A is watched on both."""
    a, b = siblings(world)
    env: Env = start()
    user = User(world, env.plex)
    ok(sync(env, state))

    world.clock.advance(HOUR)
    user.plex_finish(a)
    world.clock.advance(10 * MIN)
    user.plex_stop_at(b, 20 * MIN)
    world.clock.advance(10 * MIN)
    r = ok(sync(env, state))
    assert "decided again" in r.out
    plex_b = world.plex_item(b)
    assert plex_b.view_count == 0 and near(plex_b.view_offset_ms, 20 * MIN), plex_b
    assert not world.sage_watched(b) and near(world.sage_position_ms(b), 20 * MIN)
    assert world.sage_watched(a) and world.plex_item(a).view_count == 1
    quiet(env, state)


def test_a_sibling_decided_again_is_journalled_with_the_writes_made_and_the_state_found(
        world: World, start, state: Path) -> None:
    """The journal of a run that decided an item again records the writes it made (clear
    watched, then the position) with the state the run first found (not watched)."""
    a, b = siblings(world, a_sage=none(), a_plex=watched(ago=HOUR),
                    b_plex=at(20 * MIN, ago=30 * MIN))
    env: Env = start()
    ok(sync(env, state))
    with sageplex_sync.StateStore(state, write=False) as store:
        rows = {row.rating_key: row for row in store.journal(store.runs()[-1].run_id)}
    row = rows[world.plex_item(b).rating_key]
    assert row.sage_before == sageplex_sync.NOT_WATCHED
    assert "clear watched" in row.writes and "0:20:00" in row.writes
    assert row.outcome == "updated"


def test_a_run_killed_after_deciding_a_sibling_again_journals_what_it_meant_to_do(
        world: World, start, state: Path) -> None:
    """The same run killed (kill -9) half way through B's new writes, after its ClearWatched:
    the journal holds B's intent as decided again (clear watched, then 0:20:00), and the next
    sync finishes it: B at 20:00 on both sides, A watched on both."""
    a, b = siblings(world, a_sage=none(), a_plex=watched(ago=HOUR),
                    b_plex=at(20 * MIN, ago=30 * MIN))
    env: Env = start()
    pid: list[int] = []
    kill_after(env.sage, "ClearWatched", pid)
    run_killed(env, state, ["all", "-s"], pid)
    env.sage.clear_faults()
    with sageplex_sync.StateStore(state, write=False) as store:
        rows = {row.rating_key: row for row in store.journal(None)}
    row = rows[world.plex_item(b).rating_key]
    assert row.outcome == "intended"
    assert "clear watched" in row.writes and "0:20:00" in row.writes
    assert row.sage_before == sageplex_sync.NOT_WATCHED

    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert world.sage_watched(a) and world.plex_item(a).view_count == 1
    assert not world.sage_watched(b) and near(world.sage_position_ms(b), 20 * MIN)
    assert world.plex_item(b).view_count == 0
    assert near(world.plex_item(b).view_offset_ms, 20 * MIN)
    quiet(env, state)
