"""End to end: the real tool against the fake SageTV and the fake Plex over HTTP.

Every test declares its items in a World, serves it (``start()``), runs
``sageplex_sync.main`` in-process and asserts on what the two fake servers hold
afterwards and on their request logs: never on the tool's internals.
Row numbers refer to the decision table of docs/rules.md (the first-sync table).
"""

from __future__ import annotations

import io
import sys
import unicodedata
from dataclasses import dataclass

import pytest

from tests.conftest import assert_no_secrets
from tests.fakes.world import (
    DAY,
    HOUR,
    MIN,
    PLEX_SWITCH_IDS,
    PLEX_SWITCHES,
    SEC,
    Item,
    Watch,
    World,
    at,
    none,
    watched,
)
from tests.sandbox import demo_world


@pytest.fixture(params=PLEX_SWITCHES, ids=PLEX_SWITCH_IDS)
def world(request: pytest.FixtureRequest) -> World:
    """Every test under every setting of what Plex does with a write the references
    leave open: the outcome must be right under each."""
    return World(plex_options=request.param)


TOLERANCE_MS = 2_000  # SageTV's watched times do not round-trip to the millisecond


def near(actual: int, expected: int) -> bool:
    return abs(actual - expected) < TOLERANCE_MS


class Terminal(io.StringIO):
    """stdin as an interactive terminal that types the given answers (the one thing no
    fake server can stand in for)."""

    def isatty(self) -> bool:
        return True


# -- the decision table, row by row ------------------------------------------------------

@dataclass(frozen=True)
class Expect:
    sage_watched: bool
    sage_position_ms: int | None  # None: not checked (a watched SageTV item's end position)
    plex_view_count: int
    plex_offset_ms: int
    written: str  # the one side that gets writes: "plex" or "sage"
    verdict: str  # the report-mode verdict


ROWS = [
    pytest.param(watched(ago=DAY), none(),
                 Expect(True, None, 1, 0, "plex", "PLEX out of sync"),
                 id="row1-sage-watched-marks-plex-watched"),
    pytest.param(none(), watched(ago=DAY),
                 Expect(True, None, 1, 0, "sage", "SageTV out of sync"),
                 id="row2-plex-watched-marks-sage-watched"),
    pytest.param(at(20 * MIN), none(),
                 Expect(False, 20 * MIN, 0, 20 * MIN, "plex", "PLEX out of sync"),
                 id="row3-sage-position-goes-to-plex"),
    pytest.param(none(), at(12 * MIN),
                 Expect(False, 12 * MIN, 0, 12 * MIN, "sage", "SageTV out of sync"),
                 id="row4-plex-position-goes-to-sage"),
    pytest.param(watched(ago=DAY), at(10 * MIN, ago=HOUR, view_count=1),
                 Expect(False, 10 * MIN, 1, 10 * MIN, "sage", "SageTV out of sync"),
                 id="row5-plex-newer-rewatch-unwatches-sage-at-position"),
    pytest.param(watched(ago=HOUR), at(10 * MIN, ago=DAY, view_count=1),
                 Expect(True, None, 2, 0, "plex", "PLEX out of sync"),
                 id="row5-sage-newer-marks-plex-watched"),
    pytest.param(watched(ago=HOUR), at(10 * MIN, ago=HOUR, view_count=1),
                 Expect(True, None, 2, 0, "plex", "PLEX out of sync"),
                 id="row5-tie-goes-to-sage"),
    pytest.param(at(10 * MIN, ago=DAY), watched(ago=HOUR),
                 Expect(True, None, 1, 0, "sage", "SageTV out of sync"),
                 id="row6-plex-newer-marks-sage-watched"),
    pytest.param(at(10 * MIN, ago=HOUR), watched(ago=DAY),
                 Expect(False, 10 * MIN, 1, 10 * MIN, "plex", "PLEX out of sync"),
                 id="row6-sage-newer-sets-plex-position-keeping-view-count"),
    pytest.param(at(10 * MIN, ago=HOUR), watched(ago=HOUR),
                 Expect(False, 10 * MIN, 1, 10 * MIN, "plex", "PLEX out of sync"),
                 id="row6-tie-goes-to-sage"),
    pytest.param(at(5 * MIN, ago=DAY), at(15 * MIN, ago=HOUR),
                 Expect(False, 15 * MIN, 0, 15 * MIN, "sage", "SageTV out of sync"),
                 id="row7-plex-newer-moves-sage-forward"),
    pytest.param(at(15 * MIN, ago=DAY), at(5 * MIN, ago=HOUR),
                 Expect(False, 5 * MIN, 0, 5 * MIN, "sage", "SageTV out of sync"),
                 id="row7-plex-newer-moves-sage-back"),
    pytest.param(at(15 * MIN, ago=HOUR), at(5 * MIN, ago=DAY),
                 Expect(False, 15 * MIN, 0, 15 * MIN, "plex", "PLEX out of sync"),
                 id="row7-sage-newer-sets-plex-position"),
    pytest.param(at(15 * MIN, ago=HOUR), at(5 * MIN, ago=HOUR),
                 Expect(False, 15 * MIN, 0, 15 * MIN, "plex", "PLEX out of sync"),
                 id="row7-tie-goes-to-sage"),
]


def kept_by_the_server(world: World, plex: Watch, expect: Expect) -> bool:
    """Marking watched on Plex an item being watched again (a view count and a resume
    point), on a server whose scrobble keeps the point (a switch of the fake)."""
    return (expect.written == "plex" and expect.plex_offset_ms == 0 and plex.position_ms > 0
            and plex.view_count > 0 and not world.plex.scrobble_clears_offset)


@pytest.mark.parametrize(("sage", "plex", "expect"), ROWS)
def test_decision_table_row_syncs_server_state(world: World, start, sage: Watch, plex: Watch,
                                               expect: Expect) -> None:
    item = world.episode("Castle", 1, 1, "Flowers for Your Grave", sage=sage, plex=plex)
    bystander = world.movie("Heat", sage=watched(), plex=watched())
    env = start()

    report = env.run("all")
    assert report.code == 0
    assert f"[{expect.verdict}]" in report.line_for(item.rating_key)
    assert env.writes() == []

    result = env.run("all", "-s")

    assert result.code == 0, result.err
    assert "[updated]" in result.line_for(item.rating_key)
    assert "[OK]" in result.line_for(bystander.rating_key)
    assert world.sage_watched(item) is expect.sage_watched
    if expect.sage_position_ms is not None:
        assert near(world.sage_position_ms(item), expect.sage_position_ms)
    after = world.plex_item(item)
    assert after.view_count == expect.plex_view_count
    if kept_by_the_server(world, plex, expect):
        # a server whose scrobble keeps the resume point of an item being watched again:
        # Plex counts it watched, keeps the point, and the tool says so (reported once)
        assert near(after.view_offset_ms, plex.position_ms)
        assert "kept its resume point" in result.line_for(item.rating_key)
    else:
        assert near(after.view_offset_ms, expect.plex_offset_ms)
    if expect.written == "plex":
        assert env.sage_writes() == []
        assert env.written_rating_keys() == {item.rating_key}
    else:
        assert env.plex_writes() == []
        assert env.written_airings() == {item.airing_id}


def test_plex_position_lands_file_relative_on_sage_with_viewing_start(world: World,
                                                                      start) -> None:
    """Row 4 in detail: WatchedEndTime - FileStartTime is the Plex position, SageTV stays
    unwatched, and the real-time start is Plex's last view minus the position."""
    declared_ms = world.clock.ms()  # Plex's clock when the viewing was written down
    item = world.episode("Castle", 1, 2, "Nanny McDead", sage=none(),
                         plex=at(12 * MIN, ago=HOUR))
    env = start()

    assert env.run("all", "-s").code == 0

    airing = world.sage.airing_json(item.airing_id)
    media = world.sage.media_file_json(item.media_file_id)
    assert near(airing["WatchedEndTime"] - media["FileStartTime"], 12 * MIN)
    assert airing["IsWatched"] is False
    assert near(airing["RealWatchedStartTime"], declared_ms - HOUR - 12 * MIN)
    assert [r.function for r in env.sage_writes()] == ["SetWatchedTimes"]


def test_plex_newer_position_clears_sage_watched_before_setting_it(world: World,
                                                                    start) -> None:
    item = world.episode("Castle", 1, 3, "Hedge Fund Homeboys", sage=watched(ago=DAY),
                         plex=at(10 * MIN, ago=HOUR, view_count=1))
    env = start()

    result = env.run("all", "-s")

    assert result.code == 0
    assert "clear watched, then set SageTV position to 0:10:00" in \
        result.line_for(item.rating_key)
    assert [r.function for r in env.sage_writes()] == ["ClearWatched", "SetWatchedTimes"]
    assert world.sage_watched(item) is False
    assert near(world.sage_position_ms(item), 10 * MIN)


def test_newer_plex_none_never_unwatches_sage(world: World, start) -> None:
    """Plex was opened more recently (a few seconds, under -x) but NONE never wins."""
    item = world.episode("Castle", 1, 4, "A Chill Goes Through Her Veins",
                         sage=watched(ago=DAY), plex=at(30 * SEC, ago=MIN))
    env = start()

    assert env.run("all", "-s").code == 0

    assert world.sage_watched(item) is True
    assert world.plex_item(item).view_count == 1
    assert env.sage_writes() == []


def test_in_sync_items_get_no_writes(world: World, start) -> None:
    items = [
        world.episode("Castle", 2, 1, "Both new", sage=none(), plex=none()),
        world.episode("Castle", 2, 2, "Both watched", sage=watched(ago=5 * DAY),
                      plex=watched(ago=HOUR, times=3)),
        world.episode("Castle", 2, 3, "Same place", sage=at(12 * MIN, ago=DAY),
                      plex=at(12 * MIN + 1500, ago=HOUR)),
        world.episode("Castle", 2, 4, "Under a minute", sage=at(40 * SEC), plex=none()),
        world.episode("Castle", 2, 5, "Near the end", sage=at(26 * MIN), plex=watched()),
        world.episode("Castle", 2, 6, "Plex rewatch, same place", sage=at(9 * MIN, ago=DAY),
                      plex=at(9 * MIN, ago=HOUR, view_count=2)),
        world.movie("Heat", sage=watched(ago=DAY), plex=watched(ago=DAY)),
    ]
    env = start()

    result = env.run("all", "-s")

    assert result.code == 0
    for item in items:
        assert result.line_for(item.rating_key).endswith("[OK]")
    assert env.writes() == []
    assert result.total == f"Total: {len(items)} videos, {len(items)} in-sync."


# -- report mode, simulation and the report ---------------------------------------------

def mixed_world(world: World) -> dict[str, Item]:
    return {
        "fresh": world.episode("Bones", 1, 1, "Pilot", sage=none(), plex=none()),
        "both": world.episode("Bones", 1, 2, "The Man in the SUV", sage=watched(),
                              plex=watched()),
        "to_plex": world.episode("Bones", 1, 3, "A Boy in a Tree", sage=watched(ago=DAY),
                                 plex=none()),
        "to_sage": world.episode("Bones", 1, 4, "The Man in the Bear", sage=none(),
                                 plex=watched(ago=DAY)),
        "position": world.movie("Ronin", year=1998, sage=none(), plex=at(50 * MIN)),
        "missing": world.movie("Blu-ray Rip", year=2010, in_sage=False, plex=watched()),
    }


def test_report_mode_writes_nothing_and_prints_verdicts_and_summary(world: World,
                                                                     start) -> None:
    items = mixed_world(world)
    env = start()

    result = env.run("all")

    assert result.code == 0
    assert env.writes() == []
    assert result.line_for(items["fresh"].rating_key).endswith("[OK]")
    assert "[PLEX out of sync]  SageTV watched, Plex not watched" in \
        result.line_for(items["to_plex"].rating_key)
    assert "[SageTV out of sync]  SageTV not watched, Plex watched" in \
        result.line_for(items["to_sage"].rating_key)
    assert "[SageTV out of sync]  SageTV not watched, Plex at 0:50:00" in \
        result.line_for(items["position"].rating_key)
    assert "[not in SageTV]" in result.line_for(items["missing"].rating_key)
    out = result.out
    assert out.index("\nPLEX out of sync (1):") < out.index("\nSageTV out of sync (2):") \
        < out.index("\nNot in SageTV (1; ") < out.index("\nIn sync (2):") < out.index("Total:")
    assert result.under("PLEX out of sync") == [items["to_plex"].rating_key]
    assert sorted(result.under("SageTV out of sync")) == sorted(
        [items["to_sage"].rating_key, items["position"].rating_key])
    assert result.under("Not in SageTV") == [items["missing"].rating_key]
    item_lines = [ln for ln in result.lines if ln[:7].strip().isdigit()]
    assert len(item_lines) == 6  # each item once, under the heading of what it is
    assert result.total == ("Total: 6 videos, 2 in-sync, 1 PLEX out-of-sync, "
                            "2 SageTV out-of-sync, 1 not in SageTV.")
    assert_no_secrets(result.out, result.err, result.log)


@pytest.mark.parametrize("argv", [("all", "-n"), ("all", "-s", "-n")], ids=["-n", "-s -n"])
def test_simulation_writes_nothing_and_says_what_it_would_do(world: World, start,
                                                             argv: tuple[str, ...]) -> None:
    items = mixed_world(world)
    env = start()

    result = env.run(*argv)

    assert result.code == 0
    assert env.writes() == []
    assert "[simulated]" in result.line_for(items["to_plex"].rating_key)
    assert "would mark watched on Plex" in result.line_for(items["to_plex"].rating_key)
    assert "would mark watched on SageTV" in result.line_for(items["to_sage"].rating_key)
    assert "would set SageTV position to 0:50:00" in \
        result.line_for(items["position"].rating_key)
    assert result.line_for(items["fresh"].rating_key).endswith("[OK]")
    assert result.total == ("Total: 6 videos, 2 in-sync, 1 PLEX out-of-sync, "
                            "2 SageTV out-of-sync, 1 not in SageTV, 3 simulated.")
    assert world.plex_item(items["to_plex"]).view_count == 0
    assert world.sage_watched(items["to_sage"]) is False


def test_sync_total_counts_updates(world: World, start) -> None:
    mixed_world(world)
    env = start()

    result = env.run("all", "-s")

    assert result.code == 0
    assert result.total == ("Total: 6 videos, 2 in-sync, 1 PLEX out-of-sync, "
                            "2 SageTV out-of-sync, 1 not in SageTV, 3 updated.")


# -- -p: confirm each item ----------------------------------------------------------------

def prompt_world(world: World) -> tuple[Item, Item]:
    return (world.episode("Castle", 1, 1, "Pilot", sage=watched(ago=DAY), plex=none()),
            world.episode("Castle", 1, 2, "Two", sage=none(), plex=at(12 * MIN)))


def test_prompt_without_terminal_answers_no_and_says_so(world: World, start,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    first, second = prompt_world(world)
    env = start()
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))  # piped "y": not a terminal

    result = env.run("all", "-s", "-p")

    assert result.code == 0
    assert env.writes() == []
    assert result.err.count("no (no terminal to ask on)") == 2
    assert "[skipped]" in result.line_for(first.rating_key)
    assert "not confirmed" in result.line_for(second.rating_key)
    assert world.plex_item(first).view_count == 0


def test_prompt_answered_yes_on_a_terminal_writes(world: World, start,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = prompt_world(world)
    env = start()
    monkeypatch.setattr(sys, "stdin", Terminal("y\nyes\n"))

    result = env.run("all", "-s", "-p")

    assert result.code == 0, result.err
    assert result.err.count("[y/N]") == 2
    assert f"[{first.rating_key}]" in result.err
    assert world.plex_item(first).view_count == 1
    assert near(world.sage_position_ms(second), 12 * MIN)
    assert env.written_rating_keys() == {first.rating_key}
    assert env.written_airings() == {second.airing_id}


def test_prompt_answered_no_on_a_terminal_writes_nothing(world: World, start,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    first, second = prompt_world(world)
    env = start()
    monkeypatch.setattr(sys, "stdin", Terminal("n\n\n"))  # "n", then just Enter (default)

    result = env.run("all", "-s", "-p")

    assert result.code == 0
    assert env.writes() == []
    assert "not confirmed" in result.line_for(first.rating_key)
    assert "not confirmed" in result.line_for(second.rating_key)


def test_prompt_yes_for_one_item_and_no_for_the_other(world: World, start,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = prompt_world(world)
    env = start()
    monkeypatch.setattr(sys, "stdin", Terminal("n\ny\n"))

    result = env.run("all", "-s", "-p")

    assert result.code == 0
    assert world.plex_item(first).view_count == 0
    assert near(world.sage_position_ms(second), 12 * MIN)
    assert env.plex_writes() == []


# -- -x: the ignore threshold ----------------------------------------------------------------

def test_ignore_threshold_skips_shorter_positions_and_syncs_longer(world: World,
                                                                   start) -> None:
    short = world.episode("Castle", 3, 1, "Short", sage=none(), plex=at(100 * SEC))
    longer = world.episode("Castle", 3, 2, "Longer", sage=none(), plex=at(130 * SEC))
    env = start()

    result = env.run("all", "-s", "-x", "120")

    assert result.code == 0
    assert result.line_for(short.rating_key).endswith("[OK]")
    assert "[updated]" in result.line_for(longer.rating_key)
    assert env.written_airings() == {longer.airing_id}
    assert world.sage_position_ms(short) == 0
    assert near(world.sage_position_ms(longer), 130 * SEC)


def test_default_ignore_threshold_is_a_minute(world: World, start) -> None:
    item = world.episode("Castle", 3, 3, "Fifty", sage=none(), plex=at(50 * SEC))
    env = start()

    result = env.run("all", "-s")

    assert result.line_for(item.rating_key).endswith("[OK]")
    assert env.writes() == []


def test_low_ignore_threshold_reports_unwritable_plex_position_as_skipped(world: World,
                                                                          start) -> None:
    """-x 30 makes a 45 s SageTV position count, but Plex ignores positions <= 60 s."""
    item = world.episode("Castle", 3, 4, "Forty-five", sage=at(45 * SEC), plex=none())
    env = start()

    result = env.run("all", "-s", "-x", "30")

    assert result.code == 0
    line = result.line_for(item.rating_key)
    assert "[skipped]" in line and "Plex ignores positions of a minute or less" in line
    assert "1 skipped" in result.total
    assert env.writes() == []
    assert world.plex_item(item).view_offset_ms == 0


def test_low_ignore_threshold_writes_short_plex_position_to_sage(world: World,
                                                                 start) -> None:
    item = world.episode("Castle", 3, 5, "Forty-five back", sage=none(), plex=at(45 * SEC))
    env = start()

    result = env.run("all", "-s", "-x", "30")

    assert result.code == 0
    assert "[updated]" in result.line_for(item.rating_key)
    assert near(world.sage_position_ms(item), 45 * SEC)


# -- -m: media ids ---------------------------------------------------------------------------

def media_world(world: World) -> dict[str, Item]:
    """Everything watched on SageTV only: a sync of an item marks it watched on Plex."""
    return {
        "s1e1": world.episode("Castle", 1, 1, "Pilot", sage=watched()),
        "s1e2": world.episode("Castle", 1, 2, "Nanny McDead", sage=watched()),
        "s2e1": world.episode("Castle", 2, 1, "Deep in Death", sage=watched()),
        "other": world.episode("Bones", 1, 1, "Pilot", sage=watched()),
        "movie": world.movie("Heat", sage=watched()),
    }


@pytest.mark.parametrize(("target", "synced"), [
    ("movie", {"movie"}),
    ("episode", {"s1e2"}),
    ("season", {"s1e1", "s1e2"}),
    ("show", {"s1e1", "s1e2", "s2e1"}),
])
def test_media_id_syncs_only_its_items(world: World, start, target: str,
                                       synced: set[str]) -> None:
    items = media_world(world)
    media_id = {"movie": items["movie"].rating_key, "episode": items["s1e2"].rating_key,
                "season": world.plex.season_key(world.tv_section, "Castle", 1),
                "show": world.plex.show_key(world.tv_section, "Castle")}[target]
    env = start()

    result = env.run("-m", str(media_id), "-s")

    assert result.code == 0, result.err
    for name, item in items.items():
        assert world.plex_item(item).view_count == (1 if name in synced else 0), name
    assert env.written_rating_keys() == {items[name].rating_key for name in synced}
    assert result.total.startswith(f"Total: {len(synced)} video{'s' if len(synced) != 1 else ''},")


def test_media_id_that_does_not_exist_is_a_usage_error_before_any_write(world: World,
                                                                         start) -> None:
    items = media_world(world)
    env = start()

    result = env.run("-m", str(items["movie"].rating_key), "987654", "-s")

    assert result.code == 2
    assert "Plex has no media id 987654" in result.err
    assert env.writes() == []
    assert world.plex_item(items["movie"]).view_count == 0


def test_sagedata_prints_the_sage_record_and_writes_nothing(world: World, start) -> None:
    item = world.episode("Castle", 1, 1, "Pilot", sage=watched(ago=DAY), plex=none())
    env = start()

    result = env.run("-m", str(item.rating_key), "--sagedata")

    assert result.code == 0, result.err
    assert env.writes() == []
    assert "SageTV data for the media ids" in result.err
    import json
    record = json.loads(result.out)[str(item.rating_key)]  # stdout is JSON and nothing else
    assert record["MediaFileID"] == item.media_file_id
    assert record["Airing"]["AiringID"] == item.airing_id
    assert record["Airing"]["IsWatched"] is True


# -- --position ------------------------------------------------------------------------------

@pytest.mark.parametrize(("sage", "plex"), [
    (none(), none()),
    (watched(ago=DAY), watched(ago=DAY)),
    (at(20 * MIN), at(3 * MIN)),
], ids=["unwatched", "watched-both", "in-progress"])
def test_position_option_sets_position_on_both_sides(world: World, start, sage: Watch,
                                                     plex: Watch) -> None:
    item = world.episode("Castle", 1, 1, "Pilot", sage=sage, plex=plex)
    other = world.episode("Castle", 1, 2, "Two", sage=watched(ago=DAY), plex=none())
    env = start()

    result = env.run("--position", "0:10:00", "-m", str(item.rating_key), "-s")

    assert result.code == 0, result.err
    assert "[updated]" in result.line_for(item.rating_key)
    assert world.plex_item(item).view_offset_ms == 600_000
    airing = world.sage.airing_json(item.airing_id)
    media = world.sage.media_file_json(item.media_file_id)
    assert near(airing["WatchedEndTime"] - media["FileStartTime"], 600_000)
    assert airing["IsWatched"] is False
    if sage.watched or sage.position_ms > 10 * MIN:
        assert "ClearWatched" in [r.function for r in env.sage_writes()]
    assert env.written_airings() == {item.airing_id}
    assert world.plex_item(other).view_count == 0


def test_position_past_the_end_is_refused_before_any_write(world: World, start) -> None:
    item = world.episode("Castle", 1, 1, "Pilot", sage=none(), plex=none())  # 30 min
    env = start()

    result = env.run("--position", "0:45:00", "-m", str(item.rating_key), "-s")

    assert result.code == 2
    assert "past the end" in result.err
    assert env.writes() == []


# -- matching: missing, ambiguous, unicode, folders, segments, padding ---------------------------

def test_item_not_in_sage_is_left_alone_and_listed(world: World, start) -> None:
    missing = world.movie("Blu-ray Rip", year=2010, in_sage=False, plex=at(30 * MIN))
    synced = world.movie("Heat", sage=watched(), plex=none())
    env = start()

    result = env.run("all", "-s")

    assert result.code == 0
    assert "[not in SageTV]" in result.line_for(missing.rating_key)
    assert result.under("Not in SageTV (1; ") == [missing.rating_key]
    assert result.under("Updated on Plex (1):") == [synced.rating_key]
    assert env.written_rating_keys() == {synced.rating_key}
    assert env.sage_writes() == []
    assert world.plex_item(missing).view_offset_ms == 30 * MIN


def test_ambiguous_file_name_is_reported_and_not_written(world: World, start) -> None:
    twin = world.episode("Twins", 1, 1, "First", file_name="Twins-S01E01.mpg",
                         sage=none(), plex=watched())
    other = world.episode("Twins", 1, 2, "Second", file_name="Twins-S01E01.mpg",
                          in_plex=False, sage=watched(ago=DAY))
    env = start()

    result = env.run("all", "-s")

    assert result.code == 0
    line = result.line_for(twin.rating_key)
    assert "[ambiguous in SageTV]" in line
    assert str(twin.media_file_id) in line and str(other.media_file_id) in line
    assert "Ambiguous in SageTV" in result.out
    assert env.writes() == []
    assert world.sage_watched(twin) is False


def test_unicode_titles_and_paths_sync(world: World, start) -> None:
    item = world.episode("Café Society", 1, 1, "Ünïcødé — 日本の夜", sage=none(),
                         plex=at(12 * MIN))
    env = start()

    result = env.run("all", "-s")

    assert result.code == 0, result.err
    line = result.line_for(item.rating_key)
    assert "Café Society - s01e01 - Ünïcødé — 日本の夜" in line and "[updated]" in line
    assert "日本" in world.sage.media_file_json(item.media_file_id)["SegmentFiles"][0]
    assert near(world.sage_position_ms(item), 12 * MIN)


def test_decomposed_unicode_plex_path_matches_composed_sage_name(world: World,
                                                                 start) -> None:
    """A Plex server on macOS reports file names in NFD; SageTV's are NFC."""
    name = "Café-Crème.mpg"
    item = world.episode("Café", 1, 1, "Crème", file_name=name, sage=watched(ago=DAY),
                         plex=none(), plex_files=[
                             "/mnt/sagetv/tv/" + unicodedata.normalize("NFD", name)])
    env = start()

    result = env.run("all", "-s")

    assert "[updated]" in result.line_for(item.rating_key)
    assert world.plex_item(item).view_count == 1


def test_nested_folders_match_by_file_name(world: World, start) -> None:
    item = world.episode("Doctor Who", 9, 1, "The Magician's Apprentice", sage=none(),
                         plex=at(20 * MIN), duration_ms=45 * MIN,
                         folder="Doctor Who\\Season 09\\Part One")
    env = start()

    result = env.run("all", "-s")

    assert result.code == 0
    assert "/Doctor Who/Season 09/Part One/" in world.plex_item(item).files[0]
    assert "[updated]" in result.line_for(item.rating_key)
    assert near(world.sage_position_ms(item), 20 * MIN)


def test_plex_position_lands_in_second_segment_of_sage_recording(world: World,
                                                                 start) -> None:
    item = world.episode("Nature", 34, 3, "Two Segments", sage=none(),
                         plex=at(40 * MIN), duration_ms=60 * MIN, segments=2)
    env = start()

    result = env.run("all", "-s")

    assert result.code == 0, result.err
    (first_start, first_end), (second_start, _) = item.segments
    watched_end = world.sage.airing_json(item.airing_id)["WatchedEndTime"]
    assert near(watched_end, second_start + 40 * MIN - (first_end - first_start))
    assert world.sage.airing_json(item.airing_id)["IsWatched"] is False


def test_sage_position_in_second_segment_goes_to_plex_as_file_offset(world: World,
                                                                      start) -> None:
    item = world.episode("Nature", 34, 4, "Two Segments Back", sage=at(40 * MIN),
                         plex=none(), duration_ms=60 * MIN, segments=2)
    env = start()

    assert env.run("all", "-s").code == 0

    assert near(world.plex_item(item).view_offset_ms, 40 * MIN)


@pytest.mark.parametrize("recording", [{"pad_start_ms": 2 * MIN, "pad_end_ms": 3 * MIN},
                                       {"late_start_ms": 90 * SEC}],
                         ids=["padded", "late-start"])
def test_plex_position_is_file_relative_on_sage(world: World, start,
                                                recording: dict[str, int]) -> None:
    item = world.episode("Nature", 34, 1, "Odd Start", sage=none(), plex=at(20 * MIN),
                         duration_ms=60 * MIN, **recording)
    env = start()

    assert env.run("all", "-s").code == 0

    airing = world.sage.airing_json(item.airing_id)
    media = world.sage.media_file_json(item.media_file_id)
    assert near(airing["WatchedEndTime"] - media["FileStartTime"], 20 * MIN)


@pytest.mark.parametrize("recording", [{"pad_start_ms": 2 * MIN, "pad_end_ms": 3 * MIN},
                                       {"late_start_ms": 90 * SEC}],
                         ids=["padded", "late-start"])
def test_sage_position_goes_to_plex_file_relative_not_watched_duration(
        world: World, start, recording: dict[str, int]) -> None:
    item = world.episode("Nature", 34, 2, "Odd Start Back", sage=at(15 * MIN), plex=none(),
                         duration_ms=60 * MIN, **recording)
    env = start()

    assert env.run("all", "-s").code == 0

    assert near(world.plex_item(item).view_offset_ms, 15 * MIN)
    if "pad_start_ms" in recording:  # the case where WatchedDuration would be 2 min short
        airing = world.sage.airing_json(item.airing_id)
        assert not near(airing["WatchedDuration"], 15 * MIN)


def test_imported_video_syncs_both_ways(world: World, start) -> None:
    to_sage = world.movie("Home Video", year=2024, is_tv=False, sage=none(),
                          plex=at(15 * MIN), duration_ms=40 * MIN)
    to_plex = world.movie("Birthday", year=2023, is_tv=False, sage=watched(ago=DAY),
                          plex=none(), duration_ms=40 * MIN)
    env = start()

    result = env.run("all", "-s")

    assert result.code == 0, result.err
    assert world.sage.media_file_json(to_sage.media_file_id)["IsTVFile"] is False
    assert near(world.sage_position_ms(to_sage), 15 * MIN)
    assert world.plex_item(to_plex).view_count == 1


# -- ClearWatched's side effect ----------------------------------------------------------------

def test_clear_watched_note_names_only_recordings_watched_through_the_show_flag(
        world: World, start) -> None:
    shared = "EP0012345678"
    own_record = world.episode("Reruns", 1, 1, "Aired Monday", show_external_id=shared,
                               sage=watched(ago=DAY), plex=watched(ago=DAY))
    second = world.episode("Reruns", 1, 1, "Aired Friday", show_external_id=shared,
                           sage=none(), plex=at(10 * MIN, ago=HOUR, view_count=1))
    flag_only = world.episode("Reruns", 1, 1, "Aired Sunday", show_external_id=shared,
                              sage=none(), plex=none(), in_plex=False)
    env = start()
    assert world.sage_watched(flag_only)  # watched through the show's flag alone

    result = env.run("all", "-s")

    assert result.code == 0, result.err
    line = result.line_for(second.rating_key)
    assert "[updated]" in line
    assert f"ClearWatched also un-watched media file {flag_only.media_file_id}" in line
    assert str(own_record.media_file_id) not in line
    assert near(world.sage_position_ms(second), 10 * MIN)
    assert world.sage_watched(second) is False
    assert world.sage_watched(own_record) is True  # its own full record keeps it watched
    assert world.sage_watched(flag_only) is False


# -- repeat runs -----------------------------------------------------------------------------

def all_rows_world(world: World) -> list[Item]:
    return [world.episode("Castle", 5, n, f"Row case {n}", sage=param.values[0],
                          plex=param.values[1]) for n, param in enumerate(ROWS, start=1)]


def test_second_sync_writes_nothing(world: World, start) -> None:
    items = all_rows_world(world)
    env = start()
    first = env.run("all", "-s")
    assert first.code == 0
    assert first.total.endswith(f"{len(items)} updated.")
    env.clear_logs()

    second = env.run("all", "-s")

    assert second.code == 0
    assert env.writes() == []
    # the rewatched items that a server keeping the resume point left "watched at a
    # position" differ, reported once and left as is; everything else is in sync
    kept = 0 if world.plex.scrobble_clears_offset else 2
    settled = f", {kept} left as is" if kept else ""
    assert second.total == \
        f"Total: {len(items)} videos, {len(items) - kept} in-sync{settled}."


class TestSandboxWorld:
    """The sandbox's demo library (tests/sandbox.py), on the real clock as the sandbox
    serves it."""

    @pytest.fixture
    def world(self) -> World:
        return demo_world()

    def test_sync_then_report_shows_every_matched_item_ok(self, world: World, start) -> None:
        env = start()
        first = env.run("all", "-s")
        assert first.code == 0, first.err
        assert "[failed]" not in first.out
        env.clear_logs()

        again = env.run("all", "-s")
        assert again.code == 0
        assert env.writes() == []
        report = env.run("all")

        assert report.code == 0
        assert env.writes() == []
        item_lines = [ln for ln in report.lines if ln[:7].strip().isdigit()]
        plex_lines = [ln for ln in item_lines if not ln.endswith("[not in Plex]")]
        assert len(plex_lines) == sum(1 for i in world.items if i.rating_key is not None)
        assert len(item_lines) == len(plex_lines) + 1  # the one recording Plex does not hold
        not_ok = [ln for ln in plex_lines if not ln.endswith("[OK]")]
        assert len(not_ok) == 3
        assert all("[not in SageTV]" in ln or "[ambiguous in SageTV]" in ln for ln in not_ok)
        assert report.total == ("Total: 30 videos, 27 in-sync, 2 not in SageTV, "
                                "1 ambiguous in SageTV; 1 SageTV recording not in Plex.")


# -- failed writes -------------------------------------------------------------------------

def test_sage_write_that_does_nothing_fails_the_item_restores_it_and_goes_on(
        world: World, start) -> None:
    rewatched = world.episode("Castle", 4, 1, "Rewatched on Plex", sage=watched(ago=DAY),
                              plex=at(10 * MIN, ago=HOUR, view_count=1))
    moved = world.episode("Castle", 4, 2, "Moved on Plex", sage=at(5 * MIN, ago=DAY),
                          plex=at(15 * MIN, ago=HOUR))
    fine = world.episode("Castle", 4, 3, "Watched on Plex", sage=none(), plex=watched())
    to_plex = world.movie("Heat", sage=watched(ago=DAY), plex=none())
    env = start()
    env.sage.add_fault(function="SetWatchedTimes", body=b"{}")  # accepted, does nothing

    result = env.run("all", "-s")

    assert result.code == 1
    assert "[failed]" in result.line_for(rewatched.rating_key)
    assert "[failed]" in result.line_for(moved.rating_key)
    assert "[updated]" in result.line_for(fine.rating_key)
    assert "[updated]" in result.line_for(to_plex.rating_key)
    assert sorted(result.under("Failed (2):")) == sorted([rewatched.rating_key,
                                                          moved.rating_key])
    assert "2 failed" in result.total and "2 updated" in result.total
    # never less watched than before: the cleared item is watched again, the other kept
    assert "ClearWatched" in [r.function for r in env.sage_writes()]
    assert world.sage_watched(rewatched) is True
    assert near(world.sage_position_ms(moved), 5 * MIN)
    assert world.sage_watched(fine) is True
    assert world.plex_item(to_plex).view_count == 1
    assert_no_secrets(result.out, result.err, result.log)


def test_position_write_that_does_nothing_restores_the_old_sage_position(world: World,
                                                                         start) -> None:
    """Moving SageTV back needs ClearWatched first; when the SetWatchedTimes after it does
    nothing, the old position is written back and the item is reported failed."""
    item = world.episode("Castle", 4, 4, "Moved back on Plex", sage=at(15 * MIN, ago=DAY),
                         plex=at(5 * MIN, ago=HOUR))
    env = start()
    env.sage.add_fault(function="SetWatchedTimes", body=b"{}", times=1)

    result = env.run("all", "-s")

    assert result.code == 1
    line = result.line_for(item.rating_key)
    assert "[failed]" in line and "restored what SageTV had" in line
    assert [r.function for r in env.sage_writes()] == ["ClearWatched", "SetWatchedTimes",
                                                       "SetWatchedTimes"]
    assert near(world.sage_position_ms(item), 15 * MIN)
    assert world.sage_watched(item) is False
