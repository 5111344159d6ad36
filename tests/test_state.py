"""The sync state as a user meets it: where the file is, what report-only runs leave alone,
--undo, --plan/--apply and --why, all against the fakes over real HTTP and asserted on
the servers' state."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

import sageplex_sync
from tests.conftest import Env
from tests.fakes.world import DAY, HOUR, MIN, World, at, none, watched

TOLERANCE_MS = 2_000


def near(actual: int, expected: int) -> bool:
    return abs(actual - expected) < TOLERANCE_MS


@pytest.fixture(autouse=True)
def no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


def runs_in(state: Path) -> list[tuple[int, str, int]]:
    with sqlite3.connect(state) as db:
        return db.execute("SELECT run_id, kind, writes FROM runs ORDER BY run_id").fetchall()


def two_changes(world: World) -> tuple:
    """One item SageTV is behind on, one Plex is behind on, one in sync."""
    finished_on_plex = world.episode("Castle", 1, 1, "Flowers for Your Grave",
                                     sage=none(), plex=watched(ago=HOUR))
    paused_on_sage = world.movie("Ronin", year=1998, sage=at(40 * MIN, ago=HOUR), plex=none())
    in_sync = world.movie("Heat", sage=watched(ago=DAY), plex=watched(ago=DAY))
    return finished_on_plex, paused_on_sage, in_sync


def test_the_state_file_is_next_to_the_config_and_verbose_says_so(world: World, start) -> None:
    two_changes(world)
    env: Env = start()

    result = env.run("all", "-s", "-v")

    assert result.code == 0, result.err
    state = env.config_path.parent / "sageplex_cfg.state.sqlite"
    assert state.is_file()
    assert f"sync state: {state}" in result.err
    assert runs_in(state) == [(1, "sync", 2)]


def test_report_only_and_simulated_runs_leave_the_state_alone(world: World, start) -> None:
    two_changes(world)
    env: Env = start()
    state = env.config_path.parent / "sageplex_cfg.state.sqlite"

    assert env.run("all").code == 0
    assert env.run("all", "-n").code == 0
    assert not state.exists()  # nothing recorded, nothing created

    assert env.run("all", "-s").code == 0
    before = state.read_bytes()
    assert env.run("all").code == 0
    assert env.run("all", "-s", "-n").code == 0
    assert state.read_bytes() == before


def test_undo_puts_back_what_the_last_sync_changed_and_the_next_sync_keeps_it(
        world: World, start) -> None:
    finished_on_plex, paused_on_sage, in_sync = two_changes(world)
    env: Env = start()
    assert env.run("all", "-s").code == 0
    assert world.sage_watched(finished_on_plex)
    assert near(world.plex_item(paused_on_sage).view_offset_ms, 40 * MIN)
    env.clear_logs()

    undo = env.run("--undo")

    assert undo.code == 0, undo.out + undo.err
    assert world.sage_watched(finished_on_plex) is False  # ClearWatched
    assert world.plex_item(finished_on_plex).view_count == 1  # Plex was watched already
    assert world.plex_item(paused_on_sage).view_offset_ms == 0  # unscrobbled
    assert near(world.sage_position_ms(paused_on_sage), 40 * MIN)
    assert world.sage_watched(in_sync) and world.plex_item(in_sync).view_count == 1
    assert "[updated]" in undo.line_for(finished_on_plex.rating_key)
    state = env.config_path.parent / "sageplex_cfg.state.sqlite"
    assert [kind for _, kind, _ in runs_in(state)] == ["sync", "undo"]

    env.clear_logs()
    again = env.run("all", "-s")  # what was undone is not redone

    assert again.code == 0
    assert env.writes() == []


def test_undo_skips_and_reports_an_item_changed_since(world: World, start) -> None:
    finished_on_plex, paused_on_sage, _ = two_changes(world)
    env: Env = start()
    assert env.run("all", "-s").code == 0
    world.clock.advance(HOUR)
    world.sage.set_watched(paused_on_sage.airing_id)  # the user finishes Ronin on SageTV
    env.clear_logs()

    undo = env.run("--undo")

    assert undo.code == 0
    line = undo.line_for(paused_on_sage.rating_key)
    assert "[skipped]" in line and "changed since" in line
    assert world.sage_watched(paused_on_sage)  # the user's change stays
    assert world.sage_watched(finished_on_plex) is False  # the other item is undone
    assert not [w for w in env.plex_writes() if w.param("key") == str(paused_on_sage.rating_key)]

    env.clear_logs()
    assert env.run("all", "-s").code == 0  # and the next sync carries the user's change
    assert world.plex_item(paused_on_sage).view_count == 1


def test_undo_of_a_named_run_and_its_simulation(world: World, start) -> None:
    finished_on_plex, _, _ = two_changes(world)
    env: Env = start()
    assert env.run("all", "-s").code == 0
    env.clear_logs()

    simulated = env.run("--undo", "1", "-n")

    assert simulated.code == 0
    assert "[simulated]" in simulated.line_for(finished_on_plex.rating_key)
    assert env.writes() == []
    assert world.sage_watched(finished_on_plex)

    assert env.run("--undo", "1").code == 0
    assert world.sage_watched(finished_on_plex) is False


def test_undo_with_no_sync_yet_says_so(world: World, start) -> None:
    two_changes(world)
    env: Env = start()

    result = env.run("--undo")

    assert result.code == 1
    assert result.err.startswith("sageplex-sync: error: ") and "no sync to undo" in result.err
    assert env.writes() == []


def test_plan_saves_what_a_sync_would_do_and_apply_carries_it_out(world: World, start,
                                                                   tmp_path: Path) -> None:
    finished_on_plex, paused_on_sage, _ = two_changes(world)
    env: Env = start()
    plan = tmp_path / "plan.json"

    saved = env.run("all", "--plan", str(plan))

    assert saved.code == 0
    assert env.writes() == []
    items = json.loads(plan.read_text(encoding="utf-8"))["items"]
    assert {i["media_id"] for i in items} == {finished_on_plex.rating_key,
                                              paused_on_sage.rating_key}

    applied = env.run("--apply", str(plan))

    assert applied.code == 0, applied.out + applied.err
    assert world.sage_watched(finished_on_plex)
    assert near(world.plex_item(paused_on_sage).view_offset_ms, 40 * MIN)


def test_apply_skips_an_item_changed_since_the_plan(world: World, start,
                                                    tmp_path: Path) -> None:
    finished_on_plex, paused_on_sage, _ = two_changes(world)
    env: Env = start()
    plan = tmp_path / "plan.json"
    assert env.run("all", "--plan", str(plan)).code == 0
    world.clock.advance(HOUR)
    world.sage.set_watched(finished_on_plex.airing_id)  # done in SageTV meanwhile
    world.sage.clear_watched(paused_on_sage.airing_id)  # and Ronin un-watched there

    applied = env.run("--apply", str(plan))

    assert applied.code == 0
    assert "[skipped]" in applied.line_for(paused_on_sage.rating_key)
    assert world.plex_item(paused_on_sage).view_offset_ms == 0  # the plan's write not done


def test_apply_of_a_file_that_is_not_a_plan_is_a_usage_error(world: World, start,
                                                             tmp_path: Path) -> None:
    two_changes(world)
    env: Env = start()
    bad = tmp_path / "plan.json"
    bad.write_text('{"something": "else"}', encoding="utf-8")

    result = env.run("--apply", str(bad))

    assert result.code == 2
    assert "not a plan saved by --plan" in result.err
    assert env.writes() == []


def test_why_explains_the_decision_in_words_and_writes_nothing(world: World, start) -> None:
    _, paused_on_sage, _ = two_changes(world)
    env: Env = start()

    first = env.run("--why", str(paused_on_sage.rating_key))

    assert first.code == 0, first.err
    out = first.out
    for words in ("Plex raw:", "SageTV raw:", "bounds:", "watched from", "states:",
                  "SageTV at 0:40:00", "base:        none yet", "rule:", "would do:",
                  "set Plex position to 0:40:00"):
        assert words in out, words
    assert env.writes() == []

    assert env.run("all", "-s").code == 0
    again = env.run("--why", str(paused_on_sage.rating_key))
    assert "base:        SageTV at 0:40:00, Plex at 0:40:00" in again.out
    assert "would do:    nothing" in again.out


def test_steps_marked_by_many_writing_threads_at_once_all_reach_the_journal(
        tmp_path: Path) -> None:
    """The write phase's threads mark their steps without waiting for the disk; the marks
    are committed in groups, and every one is in the journal once the run is recorded or
    the state closed (here: a run that never finished, as after a kill)."""
    path = tmp_path / "state.sqlite"
    intended = [sageplex_sync.JournalRow(
        0, key, 1000 + key, f"item {key}", "plex newer", "SageTV SetWatched",
        sageplex_sync.NOT_WATCHED, sageplex_sync.WATCHED, None, None, "intended", "")
        for key in range(1, 201)]
    with sageplex_sync.StateStore(path, write=True) as store:
        run_id = store.begin_run("sync", ["all", "-s"], intended)

        def mark(keys: range) -> None:
            for key in keys:
                store.step_done(run_id, key, 1)
                store.step_done(run_id, key, 2)
        threads = [threading.Thread(target=mark, args=(range(first, first + 25),))
                   for first in range(1, 201, 25)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    with sageplex_sync.StateStore(path, write=False) as store:
        rows = store.journal(None)  # the unfinished run's items
    assert sorted(row.rating_key for row in rows) == list(range(1, 201))
    assert {row.steps_done for row in rows} == {2}


def test_a_journal_that_cannot_be_marked_fails_the_next_step_and_the_run_still_closes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fails while the steps are marked (nothing a fake server can cause): the
    thread that commits the marks stops, every later mark raises the state error to the
    writing thread that makes it, and closing the state neither hangs nor raises."""
    path = tmp_path / "state.sqlite"
    row = sageplex_sync.JournalRow(
        0, 1, 1001, "item 1", "plex newer", "SageTV SetWatched", sageplex_sync.NOT_WATCHED,
        sageplex_sync.WATCHED, None, None, "intended", "")
    store = sageplex_sync.StateStore(path, write=True)
    run_id = store.begin_run("sync", ["all", "-s"], [row])

    @contextlib.contextmanager
    def failing(what: str):
        raise sageplex_sync.StateError(f"cannot write the sync state file; {what}")
        yield  # pragma: no cover

    monkeypatch.setattr(store, "_writing", failing)
    store.step_done(run_id, 1, 1)  # queued: the marking thread meets the failure
    deadline = time.monotonic() + 5
    with pytest.raises(sageplex_sync.StateError, match="the journal misses a step"):
        while time.monotonic() < deadline:
            store.step_done(run_id, 1, 2)
            time.sleep(0.01)
    store.close()
