"""The sync decision, row by row (sync-rules.md §§1-3), and its properties.

decide() is pure, so these tests need no server: every row of the table, the
boundaries of the normalisation, and hypothesis properties over random states.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sageplex_sync import (
    Kind,
    Options,
    PlexMarkWatched,
    PlexSetPosition,
    SageMarkWatched,
    SageSetPosition,
    SideState,
    Status,
    Verdict,
    classify,
    decide,
    decide_position,
    end_ms,
    parse_position,
    position_from_sage_time,
    sage_time_from_position,
)

MIN = 60_000
SHOW_MS = 30 * MIN  # finished from 25:00 on (5 min margin beats 5%)
MOVIE_MS = 120 * MIN  # finished from 110:00 on (10 min margin)
OLD, NEW = 1_700_000_000_000, 1_700_000_900_000
OPTS = Options()


def sage(watched: bool = False, position_ms: int = 0, at: int = OLD, duration: int = SHOW_MS,
         movie: bool = False) -> SideState:
    return SideState(watched, position_ms, duration, at, movie)


def plex(view_count: int = 0, offset_ms: int = 0, at: int = OLD, duration: int = SHOW_MS,
         movie: bool = False) -> SideState:
    return SideState(view_count > 0, offset_ms, duration, at, movie)


# -- normalisation (§1) ------------------------------------------------------------------

def test_sage_watched_means_watched_whatever_its_position() -> None:
    assert classify(sage(True, 10 * MIN), is_sage=True, ignore_ms=MIN) == Status(Kind.WATCHED)


def test_plex_rewatch_in_progress_is_progress_not_watched() -> None:
    assert classify(plex(3, 10 * MIN), is_sage=False, ignore_ms=MIN) == \
        Status(Kind.PROGRESS, 10 * MIN)


def test_position_under_the_ignore_time_is_none() -> None:
    assert classify(plex(0, MIN - 1), is_sage=False, ignore_ms=MIN).kind is Kind.NONE
    assert classify(plex(0, MIN), is_sage=False, ignore_ms=MIN).kind is Kind.PROGRESS


def test_position_inside_the_end_margin_is_watched() -> None:
    assert end_ms(plex(duration=SHOW_MS)) == 25 * MIN
    assert classify(plex(0, 25 * MIN - 1), is_sage=False, ignore_ms=MIN).kind is Kind.PROGRESS
    assert classify(plex(0, 25 * MIN), is_sage=False, ignore_ms=MIN).kind is Kind.WATCHED


def test_long_items_use_five_percent_and_movies_ten_minutes() -> None:
    three_hours = 180 * MIN
    assert end_ms(plex(duration=three_hours)) == three_hours * 0.95
    assert end_ms(plex(duration=MOVIE_MS, movie=True)) == 110 * MIN


def test_zero_ignore_never_makes_position_zero_progress() -> None:
    assert classify(plex(0, 0), is_sage=False, ignore_ms=0).kind is Kind.NONE


def test_unknown_duration_never_calls_a_position_finished() -> None:
    assert classify(plex(0, 50 * MIN, duration=0), is_sage=False, ignore_ms=MIN) == \
        Status(Kind.PROGRESS, 50 * MIN)


def test_progress_positions_within_two_seconds_are_equal() -> None:
    assert Status(Kind.PROGRESS, 10 * MIN) == Status(Kind.PROGRESS, 10 * MIN + 1_999)
    assert Status(Kind.PROGRESS, 10 * MIN) != Status(Kind.PROGRESS, 10 * MIN + 2_000)


# -- in sync (§2) --------------------------------------------------------------------------

@pytest.mark.parametrize("sage_side, plex_side", [
    pytest.param(sage(), plex(), id="none-none"),
    pytest.param(sage(True, SHOW_MS), plex(2, 0), id="watched-watched"),
    pytest.param(sage(False, 10 * MIN), plex(0, 10 * MIN + 1_500), id="same-position"),
    pytest.param(sage(False, 30_000), plex(0, 45_000), id="both-under-a-minute"),
    pytest.param(sage(False, 26 * MIN), plex(1, 0), id="sage-near-end-plex-watched"),
])
def test_same_state_on_both_sides_is_in_sync(sage_side: SideState, plex_side: SideState) -> None:
    action = decide(sage_side, plex_side, OPTS)
    assert action.verdict is Verdict.IN_SYNC and action.writes == ()


# -- the table (§3) ------------------------------------------------------------------------

ROWS = [
    # id, sage side, plex side, verdict, writes
    ("row-1-sage-watched-plex-none", sage(True, SHOW_MS, at=OLD), plex(0, 0, at=NEW),
     Verdict.PLEX_OUT_OF_SYNC, (PlexMarkWatched(),)),
    ("row-2-plex-watched-sage-none", sage(at=NEW), plex(1, 0, at=OLD),
     Verdict.SAGE_OUT_OF_SYNC, (SageMarkWatched(),)),
    ("row-3-sage-progress-plex-none", sage(False, 10 * MIN, at=OLD), plex(at=NEW),
     Verdict.PLEX_OUT_OF_SYNC, (PlexSetPosition(10 * MIN),)),
    ("row-4-plex-progress-sage-none", sage(at=NEW), plex(0, 12 * MIN, at=OLD),
     Verdict.SAGE_OUT_OF_SYNC, (SageSetPosition(12 * MIN, False, OLD - 12 * MIN),)),
    ("row-5-plex-newer", sage(True, SHOW_MS, at=OLD), plex(1, 7 * MIN, at=NEW),
     Verdict.SAGE_OUT_OF_SYNC, (SageSetPosition(7 * MIN, True, NEW - 7 * MIN),)),
    ("row-5-sage-newer", sage(True, SHOW_MS, at=NEW), plex(1, 7 * MIN, at=OLD),
     Verdict.PLEX_OUT_OF_SYNC, (PlexMarkWatched(),)),
    ("row-5-tie-goes-to-sage", sage(True, SHOW_MS, at=OLD), plex(0, 7 * MIN, at=OLD),
     Verdict.PLEX_OUT_OF_SYNC, (PlexMarkWatched(),)),
    ("row-6-plex-newer", sage(False, 9 * MIN, at=OLD), plex(1, 0, at=NEW),
     Verdict.SAGE_OUT_OF_SYNC, (SageMarkWatched(),)),
    ("row-6-sage-newer", sage(False, 9 * MIN, at=NEW), plex(1, 0, at=OLD),
     Verdict.PLEX_OUT_OF_SYNC, (PlexSetPosition(9 * MIN),)),
    ("row-6-tie-goes-to-sage", sage(False, 9 * MIN, at=OLD), plex(1, 0, at=OLD),
     Verdict.PLEX_OUT_OF_SYNC, (PlexSetPosition(9 * MIN),)),
    ("row-7-plex-newer-forward", sage(False, 5 * MIN, at=OLD), plex(0, 15 * MIN, at=NEW),
     Verdict.SAGE_OUT_OF_SYNC, (SageSetPosition(15 * MIN, False, NEW - 15 * MIN),)),
    ("row-7-plex-newer-backward-clears-first", sage(False, 20 * MIN, at=OLD),
     plex(0, 4 * MIN, at=NEW),
     Verdict.SAGE_OUT_OF_SYNC, (SageSetPosition(4 * MIN, True, NEW - 4 * MIN),)),
    ("row-7-sage-newer", sage(False, 20 * MIN, at=NEW), plex(0, 4 * MIN, at=OLD),
     Verdict.PLEX_OUT_OF_SYNC, (PlexSetPosition(20 * MIN),)),
]


@pytest.mark.parametrize("row_id, sage_side, plex_side, verdict, writes", ROWS,
                         ids=[r[0] for r in ROWS])
def test_decision_table_row(row_id: str, sage_side: SideState, plex_side: SideState,
                            verdict: Verdict, writes: tuple) -> None:
    action = decide(sage_side, plex_side, OPTS)
    assert (action.verdict, action.writes, action.blocked) == (verdict, writes, "")
    assert row_id.startswith(f"row-{action.row}-")


def test_none_never_wins_even_when_newer() -> None:
    # Plex was merely opened (NONE, newest); SageTV's watched mark must survive.
    action = decide(sage(True, SHOW_MS, at=OLD), plex(0, 20_000, at=NEW), OPTS)
    assert action.writes == (PlexMarkWatched(),)


def test_plex_position_of_a_minute_or_less_is_skipped_with_a_reason() -> None:
    action = decide(sage(False, 50_000), plex(), Options(ignore_ms=30_000))
    assert action.verdict is Verdict.PLEX_OUT_OF_SYNC
    assert action.writes == () and "a minute or less" in action.blocked


def test_ignore_of_two_minutes_hides_positions_under_two_minutes() -> None:
    assert decide(sage(False, 100_000), plex(), Options(ignore_ms=120_000)).verdict \
        is Verdict.IN_SYNC
    assert decide(sage(False, 130_000), plex(), Options(ignore_ms=120_000)).writes == \
        (PlexSetPosition(130_000),)


def test_position_override_writes_both_sides_and_skips_a_side_already_there() -> None:
    both = decide_position(sage(True, SHOW_MS), plex(1, 0), 10 * MIN, OPTS)
    assert both.writes == (PlexSetPosition(10 * MIN), SageSetPosition(10 * MIN, True, 0))
    plex_only = decide_position(sage(False, 10 * MIN), plex(0, 3 * MIN), 10 * MIN, OPTS)
    assert plex_only.writes == (PlexSetPosition(10 * MIN),)
    none = decide_position(sage(False, 10 * MIN), plex(0, 10 * MIN), 10 * MIN, OPTS)
    assert none.verdict is Verdict.IN_SYNC and none.writes == ()


# -- positions across segments (sagex-api.md §7.2) -----------------------------------------

SEGMENTS = ((1_000_000, 1_600_000), (1_700_000, 2_000_000))  # 600 s, gap of 100 s, 300 s


def test_position_maps_through_segments_and_gaps_round_forward() -> None:
    assert position_from_sage_time(1_100_000, SEGMENTS) == 100_000
    assert position_from_sage_time(1_650_000, SEGMENTS) == 600_000  # in the gap
    assert position_from_sage_time(1_800_000, SEGMENTS) == 700_000
    assert position_from_sage_time(5_000_000, SEGMENTS) == 900_000
    assert sage_time_from_position(700_000, SEGMENTS) == 1_800_000
    assert sage_time_from_position(600_000, SEGMENTS) == 1_700_000


@given(st.integers(0, 899_999))
def test_segment_conversion_round_trips(position_ms: int) -> None:
    assert position_from_sage_time(sage_time_from_position(position_ms, SEGMENTS),
                                   SEGMENTS) == position_ms


@pytest.mark.parametrize("text, ms", [("1:02:03", 3_723_000), ("42:10", 2_530_000),
                                      ("90", 90_000), ("0:00:00", 0)])
def test_position_formats(text: str, ms: int) -> None:
    assert parse_position(text) == ms


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "-5", "1:75", "1.5", "1::2", "1:00:60"])
def test_bad_position_formats_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_position(text)


# -- properties ----------------------------------------------------------------------------

def apply_model(sage_side: SideState, plex_side: SideState, writes: tuple, now: int
                ) -> tuple[SideState, SideState]:
    """What each write does to a side, per the server semantics (sync-rules.md §3)."""
    for write in writes:
        if isinstance(write, PlexMarkWatched):  # scrobble: count +1, offset cleared
            plex_side = replace(plex_side, watched=True, position_ms=0, last_watched_ms=now)
        elif isinstance(write, PlexSetPosition):  # timeline: offset set, count kept
            plex_side = replace(plex_side, position_ms=write.position_ms, last_watched_ms=now)
        elif isinstance(write, SageMarkWatched):  # SetWatched: record spans the airing
            sage_side = replace(sage_side, watched=True, position_ms=sage_side.duration_ms)
        elif isinstance(write, SageSetPosition):  # [ClearWatched,] SetWatchedTimes
            sage_side = replace(sage_side, watched=False, position_ms=write.position_ms,
                                last_watched_ms=now)
    return sage_side, plex_side


durations = st.sampled_from([SHOW_MS, 60 * MIN, MOVIE_MS, 5 * MIN])
times = st.integers(OLD - 10**9, OLD + 10**9)


@st.composite
def item_states(draw: st.DrawFn) -> tuple[SideState, SideState, Options]:
    duration = draw(durations)
    movie = draw(st.booleans())
    position = st.one_of(st.just(0), st.integers(0, duration))
    sage_side = SideState(draw(st.booleans()), draw(position), duration, draw(times), movie)
    plex_side = SideState(draw(st.booleans()), draw(position), duration, draw(times), movie)
    return sage_side, plex_side, Options(ignore_ms=draw(st.sampled_from([0, 30, 60, 120])) * 1000)


@settings(max_examples=500)
@given(item_states())
def test_applying_the_writes_then_deciding_again_is_in_sync(states: tuple) -> None:
    sage_side, plex_side, opts = states
    action = decide(sage_side, plex_side, opts)
    assume(not action.blocked)
    now = max(sage_side.last_watched_ms, plex_side.last_watched_ms) + 1
    after = apply_model(sage_side, plex_side, action.writes, now)
    assert decide(*after, opts).verdict is Verdict.IN_SYNC


@settings(max_examples=500)
@given(item_states())
def test_no_write_ever_turns_a_side_to_none(states: tuple) -> None:
    sage_side, plex_side, opts = states
    action = decide(sage_side, plex_side, opts)
    now = max(sage_side.last_watched_ms, plex_side.last_watched_ms) + 1
    new_sage, new_plex = apply_model(sage_side, plex_side, action.writes, now)
    for before, after, is_sage in ((sage_side, new_sage, True), (plex_side, new_plex, False)):
        if classify(before, is_sage=is_sage, ignore_ms=opts.ignore_ms).kind is not Kind.NONE:
            assert classify(after, is_sage=is_sage, ignore_ms=opts.ignore_ms).kind \
                is not Kind.NONE


@settings(max_examples=300)
@given(item_states())
def test_writes_only_ever_go_to_the_side_that_is_out_of_sync(states: tuple) -> None:
    sage_side, plex_side, opts = states
    action = decide(sage_side, plex_side, opts)
    plex_writes = {PlexMarkWatched, PlexSetPosition}
    kinds = {type(w) for w in action.writes}
    if action.verdict is Verdict.PLEX_OUT_OF_SYNC:
        assert kinds <= plex_writes
    elif action.verdict is Verdict.SAGE_OUT_OF_SYNC:
        assert kinds and not kinds & plex_writes
    else:
        assert not kinds
