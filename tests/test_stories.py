"""User stories: the tool run several times, with the user acting on either server between
the runs, against the fakes over real HTTP (docs/rules.md).

Every story checks the servers after each run, and that a run after which the user did
nothing writes nothing and moves nothing. Each sync keeps its sync state in the test's own
``--state`` file.
"""

from __future__ import annotations

import io
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import sageplex_sync
from tests.conftest import Env, Result, assert_no_secrets
from tests.fakes.world import (
    DAY,
    HOUR,
    MIN,
    PLEX_SWITCH_IDS,
    PLEX_SWITCHES,
    SEC,
    World,
    at,
    none,
    watched,
)
from tests.user import WATCHED, User, bounds, plex_state, progress, sage_state

TOLERANCE_MS = 2_000


def near(actual: int, expected: int) -> bool:
    return abs(actual - expected) < TOLERANCE_MS


@pytest.fixture(params=PLEX_SWITCHES, ids=PLEX_SWITCH_IDS)
def world(request: pytest.FixtureRequest) -> World:
    """Every story under every setting of what Plex does with a write the references leave
    open: each must come out right under each."""
    return World(plex_options=request.param)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state.sqlite"


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries as the tool does them, with a short pause (story d fails every read)."""
    monkeypatch.setattr(sageplex_sync, "RETRY_BACKOFF_S", 0.02, raising=False)


@pytest.fixture(autouse=True)
def no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdin is not a terminal (a cron job): nothing can be asked."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


def sync(env: Env, state: Path, *extra: str) -> Result:
    """One ``all -s`` run with its own request log."""
    env.clear_logs()
    return env.run("all", "-s", "--state", str(state), *extra)


def snapshot(world: World, extra_keys: tuple[int, ...] = ()) -> dict[str, Any]:
    """Both servers' raw watch state of every item (and of extra Plex items)."""
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


def assert_quiet_run(env: Env, state: Path, before: dict[str, Any],
                     extra_keys: tuple[int, ...] = ()) -> Result:
    """A run after which the user did nothing: exit 0, no write, nothing moved."""
    env.world.clock.advance(HOUR)
    r = sync(env, state)
    assert r.code == 0, r.out + r.err
    assert env.writes() == [], [(q.function, q.query) for q in env.writes()]
    assert snapshot(env.world, extra_keys) == before
    return r


def ok(r: Result, code: int = 0) -> Result:
    assert r.code == code, f"exit {r.code}\n{r.out}\n{r.err}"
    assert "Traceback" not in r.out + r.err + r.log
    assert_no_secrets(r.out, r.err, r.log)
    return r


# -- a. two recordings of one episode share SageTV's show flag ----------------------------

def test_a_show_flag_shared_by_two_recordings_never_wipes_a_plex_resume_point(
        world: World, start, state: Path) -> None:
    """Finishing recording A on Plex makes SageTV SetWatched A, which (one flag per unique
    show) makes recording B watched on SageTV too. B's Plex resume point must survive that
    run and the next ones: SageTV's flag is the server's truth, not the user's activity."""
    ext = "EP0000777001"
    first = world.episode("Castle", 1, 1, "Flowers for Your Grave", duration_ms=60 * MIN,
                          show_external_id=ext, sage=none(), plex=watched(ago=HOUR))
    second = world.episode("Castle", 1, 1, "Flowers for Your Grave", duration_ms=60 * MIN,
                           show_external_id=ext, sage=none(), plex=at(20 * MIN, ago=30 * MIN))
    env = start()
    user = User(world, env.plex)

    # run 1: A goes to SageTV; B's position goes to SageTV unless the flag already covers it
    ok(sync(env, state))
    assert world.sage_watched(first) and world.plex_item(first).view_count == 1
    assert world.plex_item(second).view_count == 0
    assert near(world.plex_item(second).view_offset_ms, 20 * MIN)
    assert world.sage_watched(second) or near(world.sage_position_ms(second), 20 * MIN)
    after_first = snapshot(world)

    # runs 2 and 3: nobody watched anything, nothing moves (no ClearWatched/SetWatched
    # ping-pong through the flag, no scrobble of B)
    assert_quiet_run(env, state, after_first)
    assert_quiet_run(env, state, after_first)

    # the user goes on with B on Plex: SageTV follows, A stays watched on both
    world.clock.advance(HOUR)
    user.plex_stop_at(second, 25 * MIN)
    ok(sync(env, state))
    assert world.sage_watched(second) is False
    assert near(world.sage_position_ms(second), 25 * MIN)
    assert near(world.plex_item(second).view_offset_ms, 25 * MIN)
    assert world.sage_watched(first) and world.plex_item(first).view_count == 1
    assert_quiet_run(env, state, snapshot(world))


# -- b. a SageTV write fails once; the restore's own stamp is not newer information ---------

def test_b_restore_after_a_failed_write_does_not_make_sagetv_newer(
        world: World, start, state: Path) -> None:
    """Plex newer at 10:00, SageTV older at 20:00: ClearWatched, then SetWatchedTimes fails;
    the tool restores 20:00 (SageTV stamps RealWatchedEndTime with its now). The next run
    must carry out the pending decision, not copy SageTV's 20:00 over Plex's 10:00."""
    item = world.episode("Castle", 3, 3, "Kill the Messenger", sage=at(20 * MIN, ago=DAY),
                         plex=at(10 * MIN, ago=HOUR))
    env = start()
    user = User(world, env.plex)
    env.sage.add_fault(function="SetWatchedTimes", status=500, times=1)

    r = ok(sync(env, state), 1)
    assert "[failed]" in r.line_for(item.rating_key)
    assert near(world.sage_position_ms(item), 20 * MIN)  # restored
    assert near(world.plex_item(item).view_offset_ms, 10 * MIN)
    assert env.plex_writes() == []

    # run 2: the retry; Plex's 10:00 is what the user last did
    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert env.plex_writes() == []
    assert near(world.plex_item(item).view_offset_ms, 10 * MIN)
    assert world.sage_watched(item) is False
    assert near(world.sage_position_ms(item), 10 * MIN)

    assert_quiet_run(env, state, snapshot(world))

    world.clock.advance(HOUR)
    user.plex_stop_at(item, 15 * MIN)
    ok(sync(env, state))
    assert near(world.sage_position_ms(item), 15 * MIN)
    assert_quiet_run(env, state, snapshot(world))


# -- c. one file in two Plex libraries; -m SHOW EPISODE overlapping --------------------------

def test_c_one_recording_in_two_libraries_and_overlapping_ids_are_decided_once(
        world: World, start, state: Path) -> None:
    heat = world.movie("Heat", sage=watched(ago=DAY), plex=none())
    ronin = world.movie("Ronin", year=1998, duration_ms=2 * HOUR, sage=at(30 * MIN, ago=DAY),
                        plex=at(50 * MIN, ago=HOUR))
    pilot = world.episode("Castle", 1, 1, "Flowers for Your Grave", sage=watched(ago=DAY),
                          plex=none())
    nanny = world.episode("Castle", 1, 2, "Nanny McDead", sage=watched(ago=DAY), plex=none())
    # a second movie library on the same folder: every movie is there twice
    copies = world.plex.add_section("Movies (all)", "movie", [world.plex_roots["movie"]],
                                    agent="com.plexapp.agents.imdb",
                                    scanner="SageTV Movie Scanner")
    now_s = world.clock.ms() // 1000
    heat_copy = world.plex.add_movie(copies, "Heat", world.plex_item(heat).files,
                                     heat.duration_ms, year=1995)
    ronin_copy = world.plex.add_movie(copies, "Ronin", world.plex_item(ronin).files,
                                      ronin.duration_ms, year=1998, view_offset_ms=40 * MIN,
                                      last_viewed_at_s=now_s - 2 * HOUR // 1000)
    copies_keys = (heat_copy, ronin_copy)
    env = start()
    user = User(world, env.plex)
    show = world.plex.show_key(world.tv_section, "Castle")

    # run 1: the show and one of its episodes: every episode once
    env.clear_logs()
    ok(env.run("-m", str(show), str(pilot.rating_key), "-s", "--state", str(state)))
    assert world.plex_item(pilot).view_count == 1
    assert world.plex_item(nanny).view_count == 1
    assert len(env.plex.requests(function="scrobble")) == 2
    assert env.sage_writes() == []

    # run 2: everything; both copies of a recording get the one decision, the newest
    # Plex position (50:00 on the first copy) wins over SageTV's older 30:00
    world.clock.advance(HOUR)
    ok(sync(env, state))
    for key in (heat.rating_key, heat_copy):
        assert world.plex.item(key).view_count == 1
    for key in (ronin.rating_key, ronin_copy):
        assert near(world.plex.item(key).view_offset_ms, 50 * MIN)
        assert world.plex.item(key).view_count == 0
    assert near(world.sage_position_ms(ronin), 50 * MIN)
    assert world.sage_watched(heat) and world.plex_item(pilot).view_count == 1
    assert len(env.sage.requests(function="SetWatchedTimes")) == 1
    assert_quiet_run(env, state, snapshot(world, copies_keys), copies_keys)

    # the user goes on with Ronin in the second library: SageTV and the first copy follow
    world.clock.advance(HOUR)
    user.plex_stop_at(ronin, 70 * MIN, rating_key=ronin_copy)
    ok(sync(env, state))
    for key in (ronin.rating_key, ronin_copy):
        assert near(world.plex.item(key).view_offset_ms, 70 * MIN)
    assert near(world.sage_position_ms(ronin), 70 * MIN)
    for key in (heat.rating_key, heat_copy, pilot.rating_key, nanny.rating_key):
        assert world.plex.item(key).view_count == 1  # never 2 or 3
    assert_quiet_run(env, state, snapshot(world, copies_keys), copies_keys)


# -- d. no write before every read and every check is done ---------------------------------

def test_d_listing_cut_off_ends_the_run_before_any_write(world: World, start,
                                                        state: Path) -> None:
    castle = world.episode("Castle", 1, 1, "Flowers for Your Grave", sage=none(),
                           plex=watched(ago=HOUR))
    heat = world.movie("Heat", sage=watched(ago=DAY), plex=none())
    env = start()
    movies = f"/library/sections/{world.movie_section}/all"
    env.plex.add_fault(function="section_all", truncate=True,
                       when=lambda q: q.path == movies)  # every retry is cut off too
    before = snapshot(world)

    r = ok(sync(env, state), 1)
    assert r.err.startswith("sageplex-sync: error: ") and "Plex" in r.err
    assert env.writes() == []  # not even the TV section's item, listed in full
    assert snapshot(world) == before

    world.clock.advance(HOUR)
    ok(sync(env, state), 1)
    assert env.writes() == []

    env.plex.clear_faults()
    world.clock.advance(HOUR)
    ok(sync(env, state))
    assert world.sage_watched(castle) and world.plex_item(heat).view_count == 1
    assert_quiet_run(env, state, snapshot(world))


def test_d_position_past_the_end_of_one_item_writes_nothing(world: World, start,
                                                            state: Path) -> None:
    heat = world.movie("Heat", duration_ms=2 * HOUR, sage=none(), plex=none())
    pilot = world.episode("Castle", 1, 1, "Flowers for Your Grave", duration_ms=30 * MIN,
                          sage=none(), plex=none())
    env = start()
    before = snapshot(world)
    ids = (str(heat.rating_key), str(pilot.rating_key))  # the short one last

    env.clear_logs()
    r = ok(env.run("-m", *ids, "-s", "--position", "1:00:00", "--state", str(state)), 2)
    assert r.err.startswith("sageplex-sync: error: ")
    assert env.writes() == []
    assert snapshot(world) == before

    env.clear_logs()
    ok(env.run("-m", *ids, "-s", "--position", "0:20:00", "--state", str(state)))
    for item in (heat, pilot):
        assert near(world.plex_item(item).view_offset_ms, 20 * MIN)
        assert near(world.sage_position_ms(item), 20 * MIN)
    assert_quiet_run(env, state, snapshot(world))


# -- e. un-watching propagates both ways -------------------------------------------------

def test_e_unwatch_on_either_side_propagates(world: World, start, state: Path) -> None:
    beckett = world.episode("Castle", 2, 1, "Deep in Death", sage=watched(ago=DAY),
                            plex=none())
    esposito = world.episode("Castle", 2, 2, "The Double Down", sage=none(),
                             plex=watched(ago=DAY))
    env = start()
    user = User(world, env.plex)

    ok(sync(env, state))
    for item in (beckett, esposito):
        assert world.sage_watched(item) and world.plex_item(item).view_count == 1
    assert_quiet_run(env, state, snapshot(world))

    world.clock.advance(HOUR)
    user.plex_unwatch(beckett)
    user.sage_unwatch(esposito)
    ok(sync(env, state))
    assert [q.function for q in env.sage_writes()] == ["ClearWatched"]
    assert env.written_airings() == {beckett.airing_id}
    assert [q.function for q in env.plex_writes()] == ["unscrobble"]
    assert env.written_rating_keys() == {esposito.rating_key}
    for item in (beckett, esposito):
        assert world.sage_watched(item) is False and world.sage_position_ms(item) == 0
        assert world.plex_item(item).view_count == 0
        assert world.plex_item(item).view_offset_ms == 0

    assert_quiet_run(env, state, snapshot(world))
    assert_quiet_run(env, state, snapshot(world))


# -- f. end padding: Plex's 56:00 of a 63-minute file of a 60-minute airing -----------------

def test_f_position_in_the_end_padding_is_measured_from_the_airing(
        world: World, start, state: Path) -> None:
    item = world.episode("Castle", 2, 3, "Inventing the Girl", duration_ms=60 * MIN,
                         pad_end_ms=3 * MIN, sage=none(), plex=at(56 * MIN, ago=HOUR))
    env = start()
    user = User(world, env.plex)
    b = bounds(world, item)
    assert b.done_ms <= 56 * MIN  # SageTV calls 56 of 60 minutes watched

    ok(sync(env, state))
    both_watched = sage_state(world, item, b) == WATCHED == plex_state(world, item, b)
    both_resume = (sage_state(world, item, b) == progress(56 * MIN)
                   == plex_state(world, item, b))
    assert both_watched or both_resume
    plex = world.plex_item(item)
    assert (plex.view_count, near(plex.view_offset_ms, 56 * MIN)) == (0, True)
    after_first = snapshot(world)

    # run 2 (and 3): no scrobble takes Plex's 56:00 away
    assert_quiet_run(env, state, after_first)
    assert_quiet_run(env, state, after_first)

    # the user starts it again on Plex: SageTV follows to 10:00
    world.clock.advance(HOUR)
    user.plex_stop_at(item, 10 * MIN)
    ok(sync(env, state))
    assert world.sage_watched(item) is False
    assert near(world.sage_position_ms(item), 10 * MIN)
    assert_quiet_run(env, state, snapshot(world))


# -- g. Plex's played threshold -----------------------------------------------------------

def test_g_past_plex_played_threshold_counts_as_watched_and_nothing_flips(
        world: World, start, state: Path) -> None:
    episode = world.episode("Castle", 2, 4, "He's Dead, She's Dead", duration_ms=60 * MIN,
                            sage=at(54 * MIN + 30 * SEC, ago=HOUR), plex=none())
    film = world.movie("Heat", duration_ms=2 * HOUR,
                       sage=at(HOUR + 48 * MIN + 30 * SEC, ago=HOUR), plex=none())
    env = start()
    sage_before = {i.title: world.sage.airing_json(i.airing_id) for i in (episode, film)}

    ok(sync(env, state))
    for item in (episode, film):
        assert sage_state(world, item) == WATCHED  # >= 90 % of the duration
        assert world.plex_item(item).view_count == 1  # marked watched on Plex
        airing = world.sage.airing_json(item.airing_id)
        before = sage_before[item.title]
        # SageTV is not given something it did not have: its own record stays
        assert (airing["IsWatched"], airing["WatchedEndTime"]) == (
            before["IsWatched"], before["WatchedEndTime"])
    assert env.sage_writes() == []
    after_first = snapshot(world)

    assert_quiet_run(env, state, after_first)
    assert_quiet_run(env, state, after_first)


# -- h. short items -----------------------------------------------------------------------

def test_h_short_film_paused_early_is_not_watched(world: World, start, state: Path) -> None:
    film = world.movie("La Jetee", duration_ms=8 * MIN, sage=none(),
                       plex=at(90 * SEC, ago=HOUR))
    env = start()
    user = User(world, env.plex)

    ok(sync(env, state))
    assert world.sage_watched(film) is False
    assert near(world.sage_position_ms(film), 90 * SEC)
    assert world.plex_item(film).view_count == 0
    assert near(world.plex_item(film).view_offset_ms, 90 * SEC)
    assert_quiet_run(env, state, snapshot(world))

    # the user watches on to 6:00 (past 66 % of the 8 minutes: SageTV would call it watched)
    world.clock.advance(HOUR)
    user.plex_stop_at(film, 6 * MIN)
    ok(sync(env, state))
    assert sage_state(world, film) == WATCHED == plex_state(world, film)
    assert_quiet_run(env, state, snapshot(world))


# -- i. start padding ---------------------------------------------------------------------

def test_i_position_inside_the_lead_in_is_not_started(world: World, start,
                                                      state: Path) -> None:
    item = world.episode("Castle", 2, 5, "When the Bough Breaks", duration_ms=60 * MIN,
                         pad_start_ms=2 * MIN, sage=none(), plex=at(90 * SEC, ago=HOUR))
    env = start()
    user = User(world, env.plex)
    assert bounds(world, item).start_ms > 90 * SEC

    for _ in range(3):  # not a failure repeated forever: nothing to do, every time
        world.clock.advance(HOUR)
        r = ok(sync(env, state))
        assert "[failed]" not in r.out
        assert env.writes() == []
        assert world.sage.watch_record(item.airing_id) is None
        assert near(world.plex_item(item).view_offset_ms, 90 * SEC)

    world.clock.advance(HOUR)
    user.plex_stop_at(item, 10 * MIN)
    ok(sync(env, state))
    assert near(world.sage_position_ms(item), 10 * MIN)
    assert world.sage_watched(item) is False
    assert_quiet_run(env, state, snapshot(world))


# -- j. a split recording shown as one Plex item per segment -------------------------------

def test_j_split_recording_as_separate_plex_items(world: World, start, state: Path) -> None:
    item = world.episode("Castle", 2, 6, "Sucker Punch", duration_ms=60 * MIN, segments=2,
                         in_plex=False, sage=none(), plex=none())
    root = world.plex_roots["show"]
    lengths = [end - begin for begin, end in item.segments]
    now_s = world.clock.ms() // 1000
    part1 = world.plex.add_episode(world.tv_section, "Castle", 2, 6, "Sucker Punch (1)",
                                   [f"{root}/{item.file_names[0]}"], lengths[0],
                                   view_count=1, last_viewed_at_s=now_s - 2 * HOUR // 1000)
    part2 = world.plex.add_episode(world.tv_section, "Castle", 2, 6, "Sucker Punch (2)",
                                   [f"{root}/{item.file_names[1]}"], lengths[1],
                                   view_offset_ms=5 * MIN, last_viewed_at_s=now_s - HOUR // 1000)
    parts = (part1, part2)
    env = start()
    user = User(world, env.plex)

    ok(sync(env, state))
    assert world.sage_watched(item) is False  # part 2 is not finished
    assert near(world.sage_position_ms(item), lengths[0] + 5 * MIN)
    assert world.plex.item(part1).view_count == 1
    assert world.plex.item(part2).view_count == 0
    assert near(world.plex.item(part2).view_offset_ms, 5 * MIN)
    assert_quiet_run(env, state, snapshot(world, parts), parts)
    assert_quiet_run(env, state, snapshot(world, parts), parts)

    # the user finishes part 2 on Plex: now the whole recording is watched
    world.clock.advance(HOUR)
    user.plex_finish(item, rating_key=part2)
    ok(sync(env, state))
    assert world.sage_watched(item)
    assert world.plex.item(part1).view_count == 1
    assert_quiet_run(env, state, snapshot(world, parts), parts)


# -- k. clock skew ------------------------------------------------------------------------

class TestClockSkew:
    @pytest.fixture
    def world(self) -> World:
        # Plex's clock 10 minutes ahead: its lastViewedAt stamps and its Date header
        return World(plex_skew_ms=10 * MIN)

    def test_k_later_viewing_on_sagetv_wins_over_a_plex_clock_ahead(
            self, world: World, start, state: Path) -> None:
        item = world.episode("Castle", 2, 7, "Ghosts", duration_ms=60 * MIN, sage=none(),
                             plex=none())
        env = start()
        user = User(world, env.plex)

        ok(sync(env, state))
        assert env.writes() == []

        # watched to 20:00 on Plex (stamped 10 min ahead), then 5 minutes later on
        # SageTV on to 30:00: SageTV's is the later viewing
        world.clock.advance(HOUR)
        user.plex_stop_at(item, 20 * MIN)
        world.clock.advance(5 * MIN)
        user.sage_stop_at(item, 30 * MIN)
        ok(sync(env, state))
        assert near(world.sage_position_ms(item), 30 * MIN)  # not moved back to 20:00
        assert near(world.plex_item(item).view_offset_ms, 30 * MIN)
        assert_quiet_run(env, state, snapshot(world))


# -- l. the guard against mass un-watching ------------------------------------------------

def test_l_mass_unwatch_needs_yes(world: World, start, state: Path) -> None:
    items = [world.episode("Bones", 1, n, f"Episode {n}", sage=watched(ago=DAY),
                           plex=watched(ago=DAY)) for n in range(1, 26)]
    env = start()
    user = User(world, env.plex)

    ok(sync(env, state))
    assert env.writes() == []

    world.clock.advance(HOUR)
    for item in items:  # the user un-watches 25 episodes on Plex
        user.plex_unwatch(item)
    r = ok(sync(env, state), 1)  # stdin is no terminal and there is no -y: refused
    assert env.writes() == []
    assert all(world.sage_watched(item) for item in items)
    assert r.err.strip()

    world.clock.advance(HOUR)
    ok(sync(env, state, "-y"))
    assert not any(world.sage_watched(item) for item in items)
    assert all(world.plex_item(item).view_count == 0 for item in items)
    assert_quiet_run(env, state, snapshot(world))


# -- m. a second run while one is running -------------------------------------------------

def test_m_second_run_with_the_same_state_file_is_refused(world: World, start,
                                                         state: Path) -> None:
    item = world.episode("Castle", 2, 8, "Tick, Tick, Tick...", sage=none(),
                         plex=watched(ago=HOUR))
    env = start()
    env.sage.add_fault(function="SetWatched", delay_s=2.0)  # the write takes its time
    first: list[Result] = []
    runner = threading.Thread(
        target=lambda: first.append(env.run("all", "-s", "--state", str(state))))

    runner.start()
    deadline = time.monotonic() + 10
    while not env.sage.requests(function="SetWatched") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert env.sage.requests(function="SetWatched"), "the first run never wrote"
    second = env.run("all", "-s", "--state", str(state))
    runner.join(timeout=30)

    assert second.code == 1, second.out + second.err
    assert re.search(r"running|in progress", second.err, re.IGNORECASE), second.err
    assert first and first[0].code == 0, first
    assert len(env.sage.requests(function="SetWatched")) == 1
    assert world.sage_watched(item)

    env.sage.clear_faults()
    assert_quiet_run(env, state, snapshot(world))


# -- n. a damaged state file --------------------------------------------------------------

def test_n_damaged_state_file_stops_the_run_and_is_left_alone(world: World, start,
                                                             state: Path) -> None:
    item = world.episode("Castle", 2, 9, "Little Girl Lost", sage=none(),
                         plex=watched(ago=HOUR))
    env = start()
    garbage = b"\x00\xffnot a sync state\x13\x37" * 50
    state.write_bytes(garbage)

    for _ in range(2):
        r = ok(sync(env, state), 1)
        lines = r.err.splitlines()
        assert len(lines) == 1, r.err
        assert lines[0].startswith("sageplex-sync: error: ")
        assert str(state) in lines[0] or state.name in lines[0]
        assert re.search(r"delete|remove|rename|move|--state", lines[0]), lines[0]
        assert env.writes() == []
        assert state.read_bytes() == garbage
        assert world.sage_watched(item) is False

    # the way out: put the damaged file aside; the next sync starts afresh
    state.rename(state.with_suffix(".damaged"))
    ok(sync(env, state))
    assert world.sage_watched(item)
    assert_quiet_run(env, state, snapshot(world))
