"""Contract tests of following SageTV playback (the sagex reference §10): a client playing a
file (``FakeSage.play``/``stop``, the watch record written when playback ends, §6.3) and
``GetRecentlyWatched`` over raw HTTP: its arguments, its reply, the playing set and the
look-back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes.fake_http import FakeServer
from tests.fakes.fake_sagex import FakeSage, SageMediaFile, add_example_library
from tests.fakes.test_sagex_contract import BASE, NOW, Api, Clock
from tests.fakes.world import World, at, none, watched
from tests.user import User

MIN = 60_000
HOUR = 60 * MIN


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def sage(clock: Clock) -> FakeSage:
    return FakeSage(clock_ms=clock)


@pytest.fixture
def server(sage: FakeSage) -> Iterator[FakeServer]:
    with FakeServer(sage) as srv:
        yield srv
    assert not srv.errors, srv.errors


@pytest.fixture
def lib(sage: FakeSage) -> dict[str, SageMediaFile]:
    return add_example_library(sage, base_ms=BASE)


@pytest.fixture
def api(server: FakeServer) -> Api:
    return Api(server.base_url)


def recent(api: Api, look_back_ms: int, **params: Any) -> list[dict[str, Any]]:
    return api.json("GetRecentlyWatched", look_back_ms, **params)["Result"]


def ids(airings: list[dict[str, Any]]) -> list[int]:
    return [a["AiringID"] for a in airings]


# --- the call ------------------------------------------------------------------------------------
def test_nothing_watched_is_an_empty_result(api: Api, lib: dict) -> None:
    assert api.json("GetRecentlyWatched", 60_000) == {"Result": []}
    assert api.json("Global.GetRecentlyWatched", 60_000) == {"Result": []}


@pytest.mark.parametrize("args, message", [
    ((), "Too few args; Your Arg Count: 0; Required Arg Count: 1"),
    ((60_000, 1), "Too many args; Your Arg Count: 2; Required Arg Count: 1"),
    (("a minute",), 'For input string: "a minute"'),
])
def test_one_long_argument(api: Api, lib: dict, args: tuple, message: str) -> None:
    assert api.error("GetRecentlyWatched", *args) == message


def test_it_is_a_global_function(api: Api, lib: dict) -> None:
    assert api.error("AiringAPI.GetRecentlyWatched", 60_000) == (
        "Invalid AiringAPIFactory Command: GetRecentlyWatched")


def test_reply_is_a_list_of_bare_airings(api: Api, lib: dict, sage: FakeSage,
                                         clock: Clock) -> None:
    on_time = lib["on_time"]
    sage.play(on_time.airing_id, on_time.airing_start_ms + 10 * MIN)
    clock.now += 10 * MIN
    sage.stop(on_time.airing_id)
    [airing] = recent(api, MIN)
    assert airing == api.airing(on_time)  # the Airing object as GetMediaFileForID nests it
    assert airing["AiringID"] == on_time.airing_id and "Show" in airing
    assert "MediaFileID" not in airing  # an Airing, not a MediaFile
    [filtered] = recent(api, MIN, filter="AiringID|RealWatchedEndTime")
    assert filtered == {"AiringID": on_time.airing_id, "RealWatchedEndTime": NOW + 10 * MIN}


# --- playing, stopping, the watch record --------------------------------------------------------
def test_a_playing_file_is_listed_whatever_the_look_back_and_unchanged_until_stop(
        api: Api, lib: dict, sage: FakeSage, clock: Clock) -> None:
    item = lib["padded"]
    sage.play(item.airing_id, item.airing_start_ms + 5 * MIN)
    clock.now += 20 * MIN
    sage.play(item.airing_id, item.airing_start_ms + 25 * MIN)
    assert ids(recent(api, 1)) == [item.airing_id]
    assert ids(recent(api, 0)) == [item.airing_id]
    playing = api.airing(item)
    assert playing["WatchedEndTime"] == 0 and playing["RealWatchedEndTime"] == 0
    assert sage.watch_record(item.airing_id) is None  # nothing written while it plays

    clock.now += 5 * MIN
    sage.stop(item.airing_id, item.airing_start_ms + 30 * MIN)
    record = api.airing(item)
    assert record["WatchedStartTime"] == item.airing_start_ms  # file start, clamped
    assert record["WatchedEndTime"] == item.airing_start_ms + 30 * MIN
    assert record["RealWatchedStartTime"] == NOW  # when the playback began
    assert record["RealWatchedEndTime"] == NOW + 25 * MIN  # SageTV's clock at the stop
    assert record["IsWatched"] is False
    assert sage.playing() == {}
    assert ids(recent(api, MIN)) == [item.airing_id]  # ended within the look-back
    clock.now += 2 * MIN
    assert recent(api, MIN) == []  # no longer playing, ended before the look-back
    assert ids(recent(api, 3 * MIN)) == [item.airing_id]


def test_stop_writes_the_same_math_as_set_watched_times(api: Api, lib: dict, sage: FakeSage,
                                                         clock: Clock) -> None:
    """A short viewing (<= 5 s) writes nothing; a viewing to near the end marks watched."""
    sage.complete_check_while_playing = False
    short, full = lib["on_time"], lib["late"]
    sage.play(short.airing_id, short.airing_start_ms)
    sage.stop(short.airing_id, short.airing_start_ms + 4_000)
    assert sage.watch_record(short.airing_id) is None
    sage.play(full.airing_id, full.airing_start_ms + 20 * MIN)
    assert api.airing(full)["IsWatched"] is False
    clock.now += 40 * MIN
    sage.stop(full.airing_id, full.airing_end_ms - 2 * MIN)
    airing = api.airing(full)
    assert airing["IsWatched"] is True and airing["IsWatchedCompletely"] is True
    assert airing["WatchedStartTime"] == full.file_start_ms  # the late start: the file's
    assert ids(recent(api, MIN)) == [full.airing_id]


def test_the_completion_check_writes_during_playback(api: Api, lib: dict, sage: FakeSage,
                                                      clock: Clock) -> None:
    item = lib["on_time"]
    sage.play(item.airing_id, item.airing_start_ms + 30 * MIN)
    assert sage.watch_record(item.airing_id) is None
    clock.now += 25 * MIN
    sage.play(item.airing_id, item.airing_end_ms - 3 * MIN)  # now a complete viewing
    airing = api.airing(item)
    assert airing["IsWatched"] is True
    assert airing["RealWatchedEndTime"] == NOW + 25 * MIN
    assert ids(recent(api, 1)) == [item.airing_id]  # listed once, though playing and recent
    clock.now += 2 * MIN
    sage.stop(item.airing_id, item.airing_end_ms - MIN)
    assert api.airing(item)["WatchedEndTime"] == item.airing_end_ms - MIN  # end only grows
    assert api.airing(item)["RealWatchedEndTime"] == NOW + 27 * MIN


def test_playing_a_watched_item_clears_watched_first_unless_switched_off(
        api: Api, lib: dict, sage: FakeSage) -> None:
    first, second = lib["rerun_a"], lib["movie"]
    assert api.json("SetWatched", f"airing:{first.airing_id}") == {}
    assert api.json("SetWatched", f"airing:{second.airing_id}") == {}
    sage.play(first.airing_id, first.airing_start_ms + MIN)
    assert api.airing(first)["IsWatched"] is False
    assert api.airing(first)["WatchedEndTime"] == 0  # ClearWatched took the record too
    sage.reset_watched_when_played = False
    sage.play(second.airing_id, second.airing_start_ms + MIN)
    assert api.airing(second)["IsWatched"] is True


def test_stopping_what_is_not_playing_is_a_test_error(lib: dict, sage: FakeSage) -> None:
    with pytest.raises(ValueError, match="not being played"):
        sage.stop(lib["on_time"].airing_id, lib["on_time"].airing_start_ms + MIN)


# --- what is listed ------------------------------------------------------------------------------
def test_watches_by_set_watched_times_are_listed_manual_marks_are_not(
        api: Api, lib: dict, clock: Clock) -> None:
    marked, timed = lib["on_time"], lib["padded"]
    assert api.json("SetWatched", f"airing:{marked.airing_id}") == {}
    assert api.json("SetWatchedTimes", f"airing:{timed.airing_id}",
                    timed.airing_start_ms + 20 * MIN, NOW - 20 * MIN) == {}
    assert ids(recent(api, MIN)) == [timed.airing_id]
    assert ids(recent(api, 1000 * 24 * HOUR)) == [timed.airing_id]  # no real end time


def test_playing_first_then_watches_oldest_end_first(api: Api, lib: dict, sage: FakeSage,
                                                     clock: Clock) -> None:
    a, b, c, d = lib["on_time"], lib["padded"], lib["late"], lib["movie"]
    for item in (a, b):
        sage.play(item.airing_id, item.airing_start_ms + 10 * MIN)
        clock.now += MIN
        sage.stop(item.airing_id)
    sage.play(d.airing_id, d.airing_start_ms + 10 * MIN)
    sage.play(c.airing_id, c.airing_start_ms + 10 * MIN)
    assert ids(recent(api, 10 * MIN)) == [d.airing_id, c.airing_id, a.airing_id, b.airing_id]
    assert ids(recent(api, MIN - 1)) == [d.airing_id, c.airing_id, b.airing_id]


def test_the_list_is_paged_like_every_sagex_array(api: Api, lib: dict, sage: FakeSage) -> None:
    fillers = [mf for name, mf in lib.items() if name.startswith("filler_")]
    for mf in fillers:
        sage.set_watched_times(mf.airing_id, mf.airing_start_ms + 20 * MIN, NOW - HOUR)
    assert len(recent(api, MIN)) == 50  # the default size
    assert len(recent(api, MIN, size=1000)) == len(fillers)
    assert ids(recent(api, MIN, start=50, size=1000)) == [mf.airing_id for mf in fillers[50:]]


# --- the user's actions in a world --------------------------------------------------------------
def test_user_plays_and_stops_on_sagetv_through_the_fake() -> None:
    world = World()
    resumed = world.episode("Castle", 1, 1, "Pilot", sage=at(5 * MIN), plex=none())
    fresh = world.episode("Castle", 1, 2, "Nanny McDead", sage=none(), plex=none())
    seen = world.movie("Heat", sage=watched(), plex=none())
    user = User(world, plex_server=None)  # type: ignore[arg-type]  # SageTV only
    before = world.sage.airing_json(resumed.airing_id)
    user.sage_play(resumed, 5 * MIN)
    start_lo = world.sage_clock_ms()
    user.sage_play(fresh, 0)
    start_hi = world.sage_clock_ms()
    world.clock.advance(10 * MIN)
    user.sage_play(resumed, 15 * MIN)
    user.sage_play(fresh, 10 * MIN)
    assert world.sage.airing_json(resumed.airing_id) == before  # unchanged while playing
    assert world.sage_position_ms(resumed) == 5 * MIN
    assert world.sage.watch_record(fresh.airing_id) is None
    user.sage_play(seen, 30 * MIN)
    assert world.sage_watched(seen) is False  # the UI clears watched when playing it again
    world.clock.advance(MIN)
    stop_lo = world.sage_clock_ms()
    user.sage_stop(resumed, 16 * MIN)
    user.sage_stop(fresh, 11 * MIN)
    stop_hi = world.sage_clock_ms()
    assert world.sage_position_ms(resumed) == 16 * MIN
    assert world.sage_position_ms(fresh) == 11 * MIN
    after = world.sage.airing_json(resumed.airing_id)
    assert after["RealWatchedStartTime"] == before["RealWatchedStartTime"]  # merge keeps min
    assert stop_lo <= after["RealWatchedEndTime"] <= stop_hi
    fresh_record = world.sage.airing_json(fresh.airing_id)
    assert start_lo <= fresh_record["RealWatchedStartTime"] <= start_hi
    assert stop_lo <= fresh_record["RealWatchedEndTime"] <= stop_hi
    assert list(world.sage.playing()) == [seen.airing_id]
