"""The decision, row by row and property by property (sync-rules.md version 2).

Everything here is pure: the states and bounds of one item (§1.2, §1.3, §1.4), the
two-way table (§3), the three-way merge over every combination of base and current
states (§6), the writes that carry a decision out, and hypothesis properties over random
recordings (paddings, late starts, split files, Plex thresholds, -x).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sageplex_sync import (
    NO_END_MS,
    NOT_WATCHED,
    WATCHED,
    Airing,
    Base,
    Bounds,
    Decision,
    Kind,
    PlexMarkUnwatched,
    PlexMarkWatched,
    PlexSetPosition,
    SageClearWatched,
    SageItem,
    SageMarkWatched,
    SageSetPosition,
    Status,
    Verdict,
    after_sage_write,
    classify,
    decide,
    decide_position,
    decide_two_way,
    format_hms,
    item_bounds,
    moves_back,
    plex_write,
    position_from_sage_time,
    sage_done_time,
    sage_status,
    sage_time_from_position,
    sage_write,
)

SEC = 1_000
MIN = 60_000
HOUR = 60 * MIN
T = 1_700_000_000_000  # a file start on SageTV's airing timeline
OLD, NEW = T + 2 * HOUR, T + 3 * HOUR  # last-watched times
FAST = settings(max_examples=200, deadline=None)


def progress(ms: int) -> Status:
    return Status(Kind.PROGRESS, ms)


P10, P20 = progress(10 * MIN), progress(20 * MIN)


def spec_sage_done(airing_ms: int, show_ms: int, movie: bool) -> float:
    """§1.2's covered length for "watched", straight from the formula (floats, no rounding)."""
    lengths = [airing_ms]
    if 10 * SEC < show_ms < airing_ms and airing_ms - show_ms < 20 * MIN:
        lengths.append(show_ms)
    margin = (10 if movie else 5) * MIN
    return min(max(d - margin, 0.66 * d + 1) for d in lengths)


def recording(segments: Sequence[tuple[int, int]], airing: Airing, *, watched: bool = False,
              watched_end_ms: int = 0) -> SageItem:
    """A SageTV media file of the given segments (airing timeline)."""
    item = SageItem(
        media_file_id=7, airing_id=70, paths=tuple(f"rec-{i}.ts" for i in range(len(segments))),
        segment_count=len(segments), file_start_ms=segments[0][0],
        file_duration_ms=segments[-1][1] - segments[0][0], airing=airing, watched=watched,
        watched_completely=watched, watched_end_ms=watched_end_ms, real_start_ms=0,
        real_end_ms=0, show_id="EP0001")
    item.segments = tuple(segments)
    return item


# A 30-minute episode, no padding: progress from 1:00, watched from 25:00.
EPISODE_AIRING = Airing(T, T + 30 * MIN, 0, T, False)
EPISODE_SEGMENTS = ((T, T + 30 * MIN),)
EPISODE_BOUNDS = item_bounds(EPISODE_AIRING, EPISODE_SEGMENTS, 30 * MIN, 0.9, 60 * SEC)


def episode_in(status: Status) -> SageItem:
    """The episode on SageTV, with raw values that read as ``status``."""
    if status.kind is Kind.WATCHED:
        return recording(EPISODE_SEGMENTS, EPISODE_AIRING, watched=True,
                         watched_end_ms=T + 30 * MIN)
    end = T + status.position_ms if status.kind is Kind.PROGRESS else 0
    return recording(EPISODE_SEGMENTS, EPISODE_AIRING, watched_end_ms=end)


def test_the_episode_helper_reads_back_as_the_state_it_was_made_for() -> None:
    for status in (NOT_WATCHED, P10, P20, WATCHED):
        assert sage_status(episode_in(status), EPISODE_SEGMENTS, EPISODE_BOUNDS) == status


def expected_plex_write(current: Status, target: Status) -> object:
    if current == target:
        return None
    if target.kind is Kind.WATCHED:
        return PlexMarkWatched()
    if target.kind is Kind.NONE:
        return PlexMarkUnwatched()
    return PlexSetPosition(target.position_ms)


def expected_sage_write(current: Status, target: Status, viewed_at: int) -> object:
    """On the single-segment episode (it holds the last segment)."""
    if current == target:
        return None
    if target.kind is Kind.WATCHED:
        return SageMarkWatched()
    if target.kind is Kind.NONE:
        return SageClearWatched()
    back = current.kind is Kind.WATCHED or (
        current.kind is Kind.PROGRESS and current.position_ms > target.position_ms)
    return SageSetPosition(target.position_ms, T + target.position_ms, back, viewed_at)


def writes_for(decision: Decision, sage: Status, plex: Status, viewed_at: int
               ) -> tuple[object, object]:
    """The two writes a decision makes on the episode: (SageTV's, Plex's)."""
    to_sage = (sage_write(episode_in(sage), EPISODE_SEGMENTS, sage, decision.to_sage, viewed_at)
               if decision.to_sage is not None else None)
    to_plex = plex_write(plex, decision.to_plex)[0] if decision.to_plex is not None else None
    return to_sage, to_plex


###############################################################################
# 1. The two-way table (§3)
###############################################################################

S_NEWER, P_NEWER, TIE = (NEW, OLD), (OLD, NEW), (OLD, OLD)
TIMES = {"sage-newer": S_NEWER, "plex-newer": P_NEWER, "tie": TIE}

# row, SageTV, Plex, times, verdict, state written, SageTV's write, Plex's write
TABLE = [
    *[(1, WATCHED, NOT_WATCHED, t, Verdict.PLEX_OUT_OF_SYNC, WATCHED, None, PlexMarkWatched())
      for t in TIMES],
    *[(2, NOT_WATCHED, WATCHED, t, Verdict.SAGE_OUT_OF_SYNC, WATCHED, SageMarkWatched(), None)
      for t in TIMES],
    *[(3, P10, NOT_WATCHED, t, Verdict.PLEX_OUT_OF_SYNC, P10, None, PlexSetPosition(10 * MIN))
      for t in TIMES],
    *[(4, NOT_WATCHED, P10, t, Verdict.SAGE_OUT_OF_SYNC, P10,
       SageSetPosition(10 * MIN, T + 10 * MIN, False, TIMES[t][1]), None) for t in TIMES],
    (5, WATCHED, P10, "plex-newer", Verdict.SAGE_OUT_OF_SYNC, P10,
     SageSetPosition(10 * MIN, T + 10 * MIN, True, NEW), None),
    (5, WATCHED, P10, "sage-newer", Verdict.PLEX_OUT_OF_SYNC, WATCHED, None, PlexMarkWatched()),
    (5, WATCHED, P10, "tie", Verdict.PLEX_OUT_OF_SYNC, WATCHED, None, PlexMarkWatched()),
    (6, P10, WATCHED, "plex-newer", Verdict.SAGE_OUT_OF_SYNC, WATCHED, SageMarkWatched(), None),
    (6, P10, WATCHED, "sage-newer", Verdict.PLEX_OUT_OF_SYNC, P10, None,
     PlexSetPosition(10 * MIN)),
    (6, P10, WATCHED, "tie", Verdict.PLEX_OUT_OF_SYNC, P10, None, PlexSetPosition(10 * MIN)),
    (7, P10, P20, "plex-newer", Verdict.SAGE_OUT_OF_SYNC, P20,
     SageSetPosition(20 * MIN, T + 20 * MIN, False, NEW), None),
    (7, P20, P10, "plex-newer", Verdict.SAGE_OUT_OF_SYNC, P10,
     SageSetPosition(10 * MIN, T + 10 * MIN, True, NEW), None),  # back: clear first
    (7, P10, P20, "sage-newer", Verdict.PLEX_OUT_OF_SYNC, P10, None, PlexSetPosition(10 * MIN)),
    (7, P10, P20, "tie", Verdict.PLEX_OUT_OF_SYNC, P10, None, PlexSetPosition(10 * MIN)),
]


@pytest.mark.parametrize(
    "row, sage, plex, times, verdict, result, sage_change, plex_change", TABLE,
    ids=[f"row{r[0]}-sage-{r[1].to_text()}-plex-{r[2].to_text()}-{r[3]}" for r in TABLE])
def test_two_way_table_row_decides_and_writes_as_the_table_says(
        row: int, sage: Status, plex: Status, times: str, verdict: Verdict, result: Status,
        sage_change: object, plex_change: object) -> None:
    sage_last, plex_last = TIMES[times]
    decision = decide_two_way(sage, plex, sage_last, plex_last)
    assert decision.verdict is verdict
    assert (decision.to_sage, decision.to_plex) == (result, result)
    assert f"row {row}" in decision.rule
    assert writes_for(decision, sage, plex, plex_last) == (sage_change, plex_change)
    # Without a base, decide() is the table.
    assert decide(sage, plex, sage_last, plex_last, None) == decision


@pytest.mark.parametrize("loser", [NOT_WATCHED], ids=["none"])
@pytest.mark.parametrize("winner", [WATCHED, P10], ids=["watched", "progress"])
def test_none_never_wins_even_when_it_is_newer(winner: Status, loser: Status) -> None:
    on_plex = decide_two_way(winner, loser, OLD, NEW)  # Plex merely opened, and newer
    assert (on_plex.to_sage, on_plex.to_plex) == (winner, winner)
    assert on_plex.verdict is Verdict.PLEX_OUT_OF_SYNC
    on_sage = decide_two_way(loser, winner, NEW, OLD)
    assert (on_sage.to_sage, on_sage.to_plex) == (winner, winner)
    assert on_sage.verdict is Verdict.SAGE_OUT_OF_SYNC


@pytest.mark.parametrize("sage, plex", [
    (NOT_WATCHED, NOT_WATCHED), (WATCHED, WATCHED), (P10, progress(10 * MIN + 1_999)),
    (progress(10 * MIN + 1_999), P10)], ids=["none", "watched", "plex-1.999s-on", "sage-on"])
@pytest.mark.parametrize("times", TIMES)
def test_same_state_on_both_sides_is_in_sync_and_writes_nothing(
        sage: Status, plex: Status, times: str) -> None:
    decision = decide_two_way(sage, plex, *TIMES[times])
    assert decision == Decision(Verdict.IN_SYNC, None, None, "in sync")


def test_progress_two_seconds_apart_is_no_longer_equal() -> None:
    assert P10 == progress(10 * MIN + 1_999) and P10 != progress(10 * MIN + 2_000)
    decision = decide_two_way(P10, progress(10 * MIN + 2_000), *P_NEWER)
    assert decision.to_sage.position_ms == 10 * MIN + 2_000 and "row 7" in decision.rule


def test_position_override_sets_both_sides_and_skips_the_side_already_there() -> None:
    both = decide_position(WATCHED, NOT_WATCHED, 12 * MIN)
    assert (both.verdict, both.to_sage, both.to_plex) == (
        Verdict.BOTH_OUT_OF_SYNC, progress(12 * MIN), progress(12 * MIN))
    assert writes_for(both, WATCHED, NOT_WATCHED, 0) == (
        SageSetPosition(12 * MIN, T + 12 * MIN, True, 0), PlexSetPosition(12 * MIN))
    plex_only = decide_position(progress(12 * MIN), P20, 12 * MIN)
    assert plex_only.verdict is Verdict.PLEX_OUT_OF_SYNC
    assert writes_for(plex_only, progress(12 * MIN), P20, 0) == (
        None, PlexSetPosition(12 * MIN))


def test_every_progress_under_the_default_x_can_be_written_to_plex() -> None:
    # §3.2: "By §1.2 a position written to Plex is always ... above one minute"; only
    # -x below 60 makes positions Plex cannot take.
    first = classify(False, 60 * SEC, EPISODE_BOUNDS, is_sage=True)
    assert first.kind is not Kind.PROGRESS or plex_write(NOT_WATCHED, first)[0] == \
        PlexSetPosition(60 * SEC), (EPISODE_BOUNDS, first)


def test_plex_position_of_a_minute_or_less_is_skipped_with_a_reason() -> None:
    assert plex_write(NOT_WATCHED, progress(60_000)) == (
        None, "Plex ignores positions of a minute or less (0:01:00)")
    assert plex_write(NOT_WATCHED, progress(60_001)) == (PlexSetPosition(60_001), "")
    assert plex_write(P10, progress(10 * MIN + 1_000)) == (None, "")


###############################################################################
# 2. The three-way merge (§6): every combination of base and current states
###############################################################################

STATES = {"none": NOT_WATCHED, "at10": P10, "at20": P20, "watched": WATCHED}
COMBINATIONS = list(itertools.product(STATES, repeat=4))


@pytest.mark.parametrize("base_sage, base_plex, sage_now, plex_now", COMBINATIONS,
                         ids=["base-{}-{}-now-{}-{}".format(*c) for c in COMBINATIONS])
def test_three_way_merge_copies_the_side_that_changed(
        base_sage: str, base_plex: str, sage_now: str, plex_now: str) -> None:
    base = Base(STATES[base_sage], STATES[base_plex])
    sage, plex = STATES[sage_now], STATES[plex_now]
    sage_changed, plex_changed = sage_now != base_sage, plex_now != base_plex
    for times_name, (sage_last, plex_last) in TIMES.items():
        case = (f"base (SageTV {base_sage}, Plex {base_plex}), now (SageTV {sage_now}, "
                f"Plex {plex_now}), {times_name}")
        decision = decide(sage, plex, sage_last, plex_last, base)
        change = writes_for(decision, sage, plex, plex_last)
        if not sage_changed and not plex_changed:
            verdict = Verdict.IN_SYNC if sage == plex else Verdict.SETTLED
            assert (decision.verdict, decision.to_sage, decision.to_plex) == (
                verdict, None, None), case
            assert change == (None, None), case
        elif sage_changed and plex_changed:
            two_way = decide_two_way(sage, plex, sage_last, plex_last)
            assert (decision.verdict, decision.to_sage, decision.to_plex) == (
                two_way.verdict, two_way.to_sage, two_way.to_plex), case
            assert "both changed" in decision.rule, case
        else:
            changed, other = (sage, plex) if sage_changed else (plex, sage)
            assert decision.to_sage == changed and decision.to_plex == changed, case
            assert decision.to_sage.kind is changed.kind, case
            expected = (None, expected_plex_write(plex, sage)) if sage_changed else (
                expected_sage_write(sage, plex, plex_last), None)
            assert change == expected, case
            verdict = (Verdict.IN_SYNC if other == changed else
                       Verdict.PLEX_OUT_OF_SYNC if sage_changed else Verdict.SAGE_OUT_OF_SYNC)
            assert decision.verdict is verdict, case


@pytest.mark.parametrize("sage_now, plex_now", list(itertools.product(STATES, repeat=2)))
def test_without_a_base_the_merge_is_the_two_way_table(sage_now: str, plex_now: str) -> None:
    for sage_last, plex_last in TIMES.values():
        sage, plex = STATES[sage_now], STATES[plex_now]
        assert decide(sage, plex, sage_last, plex_last, None) == \
            decide_two_way(sage, plex, sage_last, plex_last)


def test_an_unwatch_on_either_side_is_copied_to_the_other() -> None:
    on_plex = decide(WATCHED, NOT_WATCHED, NEW, OLD, Base(WATCHED, WATCHED))
    assert writes_for(on_plex, WATCHED, NOT_WATCHED, OLD) == (SageClearWatched(), None)
    on_sage = decide(NOT_WATCHED, WATCHED, OLD, NEW, Base(WATCHED, WATCHED))
    assert writes_for(on_sage, NOT_WATCHED, WATCHED, NEW) == (None, PlexMarkUnwatched())


def test_a_position_moved_back_on_plex_clears_sagetv_first() -> None:
    decision = decide(P20, P10, NEW, OLD, Base(P20, P20))  # SageTV newer: no matter
    assert writes_for(decision, P20, P10, OLD) == (
        SageSetPosition(10 * MIN, T + 10 * MIN, True, OLD), None)


PENDING_ON = (P10, NOT_WATCHED)
PENDING = Base(NOT_WATCHED, NOT_WATCHED, pending=(None, P10), pending_on=PENDING_ON)


def test_a_pending_decision_is_carried_out_when_neither_side_changed_since() -> None:
    decision = decide(P10, NOT_WATCHED, OLD, NEW, PENDING)
    assert (decision.verdict, decision.to_sage, decision.to_plex) == (
        Verdict.PLEX_OUT_OF_SYNC, None, P10)
    assert "again" in decision.rule
    # A restore's stamps are no change: the newer Plex time does not matter, nor 1.5 s.
    assert decide(progress(10 * MIN + 1_500), NOT_WATCHED, OLD, NEW + HOUR, PENDING) \
        == decision


@pytest.mark.parametrize("sage, plex", [
    (P20, NOT_WATCHED), (WATCHED, NOT_WATCHED), (P10, P20), (P10, WATCHED),
    (NOT_WATCHED, NOT_WATCHED), (progress(10 * MIN + 2_000), NOT_WATCHED)])
def test_a_pending_decision_is_dropped_when_either_side_changed(
        sage: Status, plex: Status) -> None:
    fresh = decide(sage, plex, OLD, NEW, Base(PENDING.sage, PENDING.plex))
    again = decide(sage, plex, OLD, NEW, PENDING)
    assert (again.verdict, again.to_sage, again.to_plex) == (
        fresh.verdict, fresh.to_sage, fresh.to_plex)
    assert "again" not in again.rule


def test_a_pending_position_is_not_taken_by_another_position() -> None:
    """A failed write of 0:20:00 to a side that still shows 0:10:00 is still to do: the same
    kind of state is not the state the write carried."""
    to_plex = decide(P20, P10, OLD, OLD, Base(P10, P10, pending=(None, P20),
                                                pending_on=(P20, P10)))
    assert (to_plex.verdict, to_plex.to_plex) == (Verdict.PLEX_OUT_OF_SYNC, P20), to_plex
    to_sage = decide(P10, P20, OLD, OLD, Base(P10, P10, pending=(P20, None),
                                                pending_on=(P10, P20)))
    assert (to_sage.verdict, to_sage.to_sage) == (Verdict.SAGE_OUT_OF_SYNC, P20), to_sage


@pytest.mark.parametrize("sage_last_ms, plex_last_ms", [(NEW, NEW), (NEW, OLD), (OLD, NEW)])
def test_a_side_changed_after_a_failed_write_was_decided_is_newer_whatever_its_stamp(
        sage_last_ms: int, plex_last_ms: int) -> None:
    """SageTV moved to 0:20:00 and the write of it to Plex failed; the user then stopped
    Plex at 0:05:00 within the same second (Plex's stamps are whole seconds, a tie goes to
    SageTV): Plex's stop came after the decision that read SageTV at 0:20:00, so it wins."""
    base = Base(P10, P10, pending=(None, P20), pending_on=(P20, P10))
    five = progress(5 * MIN)
    decision = decide(P20, five, sage_last_ms, plex_last_ms, base)
    assert (decision.to_sage, decision.to_plex) == (five, five), decision
    # and the other way round: SageTV un-watched after a failed write of Plex's position
    base = Base(P10, P10, pending=(P20, None), pending_on=(P10, P20))
    decision = decide(NOT_WATCHED, P20, sage_last_ms, plex_last_ms, base)
    assert (decision.to_sage, decision.to_plex) == (NOT_WATCHED, NOT_WATCHED), decision


def test_a_pending_decision_on_both_sides_names_both() -> None:
    base = Base(P10, P10, pending=(WATCHED, WATCHED), pending_on=(P20, NOT_WATCHED))
    decision = decide(P20, NOT_WATCHED, OLD, OLD, base)
    assert (decision.verdict, decision.to_sage, decision.to_plex) == (
        Verdict.BOTH_OUT_OF_SYNC, WATCHED, WATCHED)


###############################################################################
# 3. The bounds of one item (§1.2, §1.4)
###############################################################################


def bounds_of(airing: Airing, segments: Sequence[tuple[int, int]] | None = None,
              duration: int | None = None, played: float = 0.9, ignore: int = 60 * SEC
              ) -> Bounds:
    if segments is None:
        segments = ((airing.file_start_ms, airing.end_ms),)
    if duration is None:
        duration = sum(end - start for start, end in segments)
    return item_bounds(airing, segments, duration, played, ignore)


def plex_state(position: int, bounds: Bounds, watched: bool = False) -> Status:
    return classify(watched, position, bounds, is_sage=False)


def test_bounds_of_a_30_minute_episode_without_padding() -> None:
    bounds = bounds_of(EPISODE_AIRING)
    assert spec_sage_done(30 * MIN, 0, False) == 25 * MIN
    assert (bounds.start_ms, bounds.done_ms, bounds.duration_ms) == (MIN + 1, 25 * MIN, 30 * MIN)
    assert sage_done_time(EPISODE_AIRING) == T + 25 * MIN
    assert bounds.done_by == "where SageTV calls it watched"
    assert plex_state(25 * MIN - 1, bounds) == progress(25 * MIN - 1)
    assert plex_state(25 * MIN, bounds) is WATCHED
    assert plex_state(MIN - 1, bounds) is NOT_WATCHED
    assert plex_state(MIN, bounds) is NOT_WATCHED  # Plex cannot store a minute or less
    assert plex_state(MIN + 1, bounds) == progress(MIN + 1)


def test_bounds_of_a_padded_hour_are_measured_from_the_airing() -> None:
    # A 60-minute airing in a 63-minute file: 3 minutes of end padding.
    airing = Airing(T, T + 60 * MIN, 0, T, False)
    bounds = bounds_of(airing, ((T, T + 63 * MIN),))
    assert bounds.duration_ms == 63 * MIN
    assert bounds.done_ms == 55 * MIN == spec_sage_done(60 * MIN, 0, False)
    # Start padding moves it by the lead-in: 2 min in, 1 min after.
    padded = Airing(T + 2 * MIN, T + 62 * MIN, 0, T, False)
    bounds = bounds_of(padded, ((T, T + 63 * MIN),), played=1.0)  # Plex 90 % would be 56:42
    assert bounds.done_ms == 57 * MIN
    assert sage_done_time(padded) == T + 57 * MIN


def test_bounds_of_a_two_hour_movie_stop_at_plex_90_percent() -> None:
    airing = Airing(T, T + 2 * HOUR, 0, T, True)
    assert sage_done_time(airing) == T + 110 * MIN  # the 10-minute margin
    bounds = bounds_of(airing)
    assert bounds.done_ms == 108 * MIN and format_hms(bounds.done_ms) == "1:48:00"
    assert "Plex" in bounds.done_by
    assert plex_state(108 * MIN - 1, bounds).kind is Kind.PROGRESS


def test_an_8_minute_film_needs_two_thirds_seen() -> None:
    for movie in (True, False):
        airing = Airing(T, T + 8 * MIN, 0, T, movie)
        bounds = bounds_of(airing)
        assert abs(bounds.done_ms - spec_sage_done(8 * MIN, 0, movie)) <= 1
        assert format_hms(bounds.done_ms + 999) == "0:05:17"
        assert plex_state(90 * SEC, bounds) == progress(90 * SEC)
        assert plex_state(5 * MIN, bounds) == progress(5 * MIN)
        assert plex_state(bounds.done_ms, bounds) is WATCHED


def test_start_padding_puts_progress_after_the_lead_in() -> None:
    airing = Airing(T + 2 * MIN, T + 32 * MIN, 0, T, False)
    for ignore in (0, 30 * SEC, 60 * SEC):
        bounds = bounds_of(airing, ((T, T + 33 * MIN),), ignore=ignore)
        assert bounds.start_ms == 2 * MIN + 5 * SEC
        assert plex_state(100 * SEC, bounds) is NOT_WATCHED  # inside the lead-in
        assert plex_state(2 * MIN + 4_999, bounds) is NOT_WATCHED
        assert plex_state(2 * MIN + 5_000, bounds) == progress(2 * MIN + 5_000)
        assert bounds.done_ms == 27 * MIN
    assert bounds_of(airing, ((T, T + 33 * MIN),), ignore=5 * MIN).start_ms == 5 * MIN


def test_a_late_start_is_measured_from_the_file() -> None:
    # Recording began 10 minutes into a 60-minute airing: 50 minutes of file.
    airing = Airing(T - 10 * MIN, T + 50 * MIN, 0, T, False)
    assert sage_done_time(airing) == T + 55 * MIN  # past the file: SageTV never calls it
    bounds = bounds_of(airing, ((T, T + 50 * MIN),))
    assert (bounds.start_ms, bounds.done_ms) == (MIN + 1, 45 * MIN)  # Plex's 90 %
    # Five minutes late into a 60-minute airing with 10 minutes of end padding.
    airing = Airing(T - 5 * MIN, T + 55 * MIN, 0, T, False)
    bounds = bounds_of(airing, ((T, T + 65 * MIN),))
    assert bounds.done_ms == 55 * MIN
    assert abs(bounds.done_ms - spec_sage_done(60 * MIN, 0, False)) <= 1


@pytest.mark.parametrize("airing_ms, show_ms, used", [
    (60 * MIN, 50 * MIN, True),
    (60 * MIN, 40 * MIN + 1, True),
    (60 * MIN, 40 * MIN, False),  # 20 minutes shorter: not the show's running time
    (60 * MIN, 30 * MIN, False),
    (60 * MIN, 60 * MIN, False),
    (60 * MIN, 61 * MIN, False),
    (60 * MIN, 0, False),
    (MIN, 10 * SEC, False),
    (MIN, 10 * SEC + 1, True),
])
def test_show_duration_is_used_only_as_a_shorter_running_time(
        airing_ms: int, show_ms: int, used: bool) -> None:
    airing = Airing(T, T + airing_ms, show_ms, T, False)
    expected = spec_sage_done(airing_ms, show_ms, False)
    assert (expected < spec_sage_done(airing_ms, 0, False)) is used
    assert abs(sage_done_time(airing) - T - expected) <= 1
    bounds = bounds_of(airing, played=1.0)
    assert abs(bounds.done_ms - min(expected, 0.95 * airing_ms)) <= 1


@pytest.mark.parametrize("played, done", [
    (0.9, 25 * MIN), (1.0, 25 * MIN), (0.8, 24 * MIN), (0.5, 15 * MIN), (0.84, 25 * MIN)])
def test_plex_played_threshold_lowers_watched_only_where_it_is_earliest(
        played: float, done: int) -> None:
    assert bounds_of(EPISODE_AIRING, played=played).done_ms == done


def test_plex_played_threshold_on_a_long_item_where_95_percent_binds() -> None:
    airing = Airing(T, T + 4 * HOUR, 0, T, False)  # SageTV: 3:55:00; 95 %: 3:48:00
    assert bounds_of(airing, played=1.0).done_ms == 228 * MIN
    assert bounds_of(airing, played=0.9).done_ms == 216 * MIN
    assert bounds_of(airing, played=0.96).done_ms == 228 * MIN


def test_an_item_of_no_known_length_is_never_finished_by_position() -> None:
    bounds = item_bounds(None, (), 0, 0.9, 60 * SEC)
    assert (bounds.start_ms, bounds.done_ms) == (60 * SEC + 1, NO_END_MS)
    assert plex_state(10 * HOUR, bounds) == progress(10 * HOUR)
    assert plex_state(30 * SEC, bounds) is NOT_WATCHED
    assert plex_state(0, bounds, watched=True) is WATCHED
    # SageTV knows neither the file's nor the airing's length either.
    unknown = Airing(0, 0, 0, T, False)
    bounds = item_bounds(unknown, ((T, T),), 0, 0.9, 60 * SEC)
    assert (bounds.start_ms, bounds.done_ms) == (60 * SEC + 1, NO_END_MS)


@pytest.mark.parametrize("airing, segments", [
    (None, ()),
    (Airing(0, 0, 0, T, False), ((T, T),)),
    (Airing(T, T + 60 * MIN, 0, T, False), ((T + 31 * MIN, T + 61 * MIN),)),
], ids=["no-airing", "no-length", "second-segment-only"])
def test_position_zero_is_never_progress_even_with_x_0(
        airing: Airing | None, segments: tuple) -> None:
    # §1.2: start_ms = max(ignore_ms, lead_ms + 5 000) is never below 5 s, so a
    # watched Plex item (offset 0) reads as watched and an untouched one as not watched.
    bounds = item_bounds(airing, segments, sum(e - s for s, e in segments), 0.9, 0)
    assert bounds.start_ms >= 5 * SEC, bounds
    assert plex_state(0, bounds, watched=True) is WATCHED
    assert plex_state(0, bounds) is NOT_WATCHED


# A recording split in two files: 0:00-0:30 and 0:31-1:01 of a 60-minute airing.
SEG1, SEG2 = (T, T + 30 * MIN), (T + 31 * MIN, T + 61 * MIN)
SPLIT_AIRING = Airing(T, T + 60 * MIN, 0, T, False)


def split_item(watched: bool = False, end: int = 0) -> SageItem:
    return recording((SEG1, SEG2), SPLIT_AIRING, watched=watched, watched_end_ms=end)


def test_an_item_of_the_first_segment_sees_sagetv_past_it_as_watched() -> None:
    bounds = bounds_of(SPLIT_AIRING, (SEG1,))
    assert (bounds.start_ms, bounds.done_ms, bounds.duration_ms) == (MIN + 1, 27 * MIN, 30 * MIN)
    assert sage_status(split_item(end=T + 10 * MIN), (SEG1,), bounds) == P10
    assert sage_status(split_item(end=T + 30 * MIN + 30 * SEC), (SEG1,), bounds) is WATCHED
    assert sage_status(split_item(end=T + 40 * MIN), (SEG1,), bounds) is WATCHED
    assert sage_status(split_item(watched=True, end=T + 60 * MIN), (SEG1,), bounds) is WATCHED
    assert sage_status(split_item(), (SEG1,), bounds) is NOT_WATCHED


def test_an_item_of_the_second_segment_sees_sagetv_before_it_as_not_watched() -> None:
    bounds = bounds_of(SPLIT_AIRING, (SEG2,))
    assert bounds.done_ms == 24 * MIN  # SageTV's 55:00 of the airing
    assert sage_status(split_item(end=T + 10 * MIN), (SEG2,), bounds) is NOT_WATCHED
    assert sage_status(split_item(end=T + 30 * MIN + 30 * SEC), (SEG2,), bounds) is NOT_WATCHED
    assert sage_status(split_item(end=T + 40 * MIN), (SEG2,), bounds) == progress(9 * MIN)
    assert sage_status(split_item(end=T + 56 * MIN), (SEG2,), bounds) is WATCHED


def test_a_stacked_item_maps_positions_through_the_gap() -> None:
    bounds = bounds_of(SPLIT_AIRING, (SEG1, SEG2))
    assert bounds.duration_ms == 60 * MIN and bounds.done_ms == 54 * MIN
    assert sage_status(split_item(end=T + 40 * MIN), (SEG1, SEG2), bounds) == \
        progress(39 * MIN)
    assert sage_status(split_item(end=T + 30 * MIN + 20 * SEC), (SEG1, SEG2), bounds) == \
        progress(30 * MIN)  # a time in the gap rounds forward
    assert sage_time_from_position(30 * MIN, (SEG1, SEG2)) == SEG2[0]
    assert sage_time_from_position(39 * MIN, (SEG1, SEG2)) == T + 40 * MIN


@pytest.mark.parametrize("current", [NOT_WATCHED, P10])
def test_watched_from_an_item_without_the_last_segment_is_a_position_never_setwatched(
        current: Status) -> None:
    item = split_item(end=T + current.position_ms if current.kind is Kind.PROGRESS else 0)
    write = sage_write(item, (SEG1,), current, WATCHED, NEW)
    assert write == SageSetPosition(30 * MIN, SEG1[1], False, NEW)
    bounds = bounds_of(SPLIT_AIRING, (SEG1,))
    after = after_sage_write(item, write)
    assert sage_status(after, (SEG1,), bounds) is WATCHED
    # From the item that holds the last segment it is SetWatched.
    assert sage_write(item, (SEG2,), NOT_WATCHED, WATCHED, NEW) == SageMarkWatched()
    assert sage_write(item, (SEG1, SEG2), current, WATCHED, NEW) == SageMarkWatched()


###############################################################################
# 4. Properties over random recordings
###############################################################################


@dataclass
class Layout:
    airing: Airing
    all_segments: tuple[tuple[int, int], ...]
    segments: tuple[tuple[int, int], ...]  # those the Plex item plays
    duration: int
    played: float
    ignore: int
    bounds: Bounds

    def item(self, watched: bool = False, end: int = 0) -> SageItem:
        return recording(self.all_segments, self.airing, watched=watched, watched_end_ms=end)


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    lead = draw(st.integers(-20 * MIN, 5 * MIN))  # < 0: a late start
    airing_ms = draw(st.integers(2 * MIN, 4 * HOUR))
    assume(-lead < airing_ms - MIN)
    count = draw(st.integers(1, 3))
    segments, start = [], T
    for i in range(count):
        length = draw(st.integers(MIN, 2 * HOUR))
        segments.append((start, start + length))
        start += length + (draw(st.integers(SEC, 5 * MIN)) if i < count - 1 else 0)
    if count == 1:  # end padding or an early stop: the file against the airing
        end = T + lead + airing_ms + draw(st.integers(-10 * MIN, 15 * MIN))
        assume(end > T + MIN)
        segments = [(T, end)]
    show = draw(st.one_of(st.just(0), st.integers(0, airing_ms + 5 * MIN)))
    airing = Airing(T + lead, T + lead + airing_ms, show, T, draw(st.booleans()))
    held = draw(st.lists(st.sampled_from(range(count)), min_size=1, unique=True))
    played_segments = tuple(segments[i] for i in sorted(held))
    length = sum(e - s for s, e in played_segments)
    duration = draw(st.sampled_from([length, length - SEC, length + SEC]))
    played = draw(st.floats(0.5, 1.0))
    ignore = draw(st.sampled_from([0, 10, 30, 60, 120, 300])) * SEC
    # Left out: a held segment that ends within SageTV's first 5 s of record (all in the
    # start padding): SageTV cannot store a position at its end, so "watched" written from
    # it does not take (a corner §1.4 does not cover).
    assume(all(end > max(airing.start_ms, T) + 5 * SEC for _, end in played_segments))
    bounds = item_bounds(airing, played_segments, duration, played, ignore)
    return Layout(airing, tuple(segments), played_segments, duration, played, ignore, bounds)


@FAST
@given(layouts())
def test_bounds_are_ordered_within_the_item(layout: Layout) -> None:
    bounds = layout.bounds
    assert 0 < bounds.done_ms <= layout.duration
    assert bounds.done_ms <= layout.played * layout.duration
    assert bounds.start_ms >= max(layout.ignore, 5 * SEC)  # §1.2: never below lead + 5 s
    # The formula leaves no room for progress only on a very short item or show, or on an
    # item that begins past SageTV's watched point (a later segment of a split recording).
    airing = layout.airing
    ordinary = (layout.segments[0] == layout.all_segments[0] and layout.duration >= 15 * MIN
                and airing.end_ms - airing.start_ms >= 10 * MIN
                and (airing.show_duration_ms == 0 or airing.show_duration_ms >= 10 * MIN))
    if ordinary:
        assert bounds.start_ms <= bounds.done_ms
    if bounds.start_ms > bounds.done_ms:  # then no position is progress
        for position in (0, bounds.done_ms - 1, bounds.done_ms, bounds.start_ms):
            assert classify(False, position, bounds, is_sage=False).kind is not Kind.PROGRESS


@FAST
@given(layouts())
def test_bounds_of_a_single_file_follow_the_formula(layout: Layout) -> None:
    assume(len(layout.all_segments) == 1)
    airing, duration = layout.airing, layout.duration
    lead = max(0, airing.start_ms - airing.file_start_ms)
    sage_done = lead + spec_sage_done(airing.end_ms - airing.start_ms,
                                      airing.show_duration_ms, airing.is_movie)
    done = min(0.95 * duration, layout.played * duration,
               sage_done if sage_done <= layout.all_segments[0][1] - T else NO_END_MS)
    # a minute means what Plex means by it: more than 60 000 ms
    plex_minute = MIN + 1 if layout.ignore >= MIN else 0
    assert layout.bounds.start_ms == max(layout.ignore, lead + 5 * SEC, plex_minute)
    assert abs(layout.bounds.done_ms - max(done, 1)) <= 1


def positions_in(layout: Layout) -> st.SearchStrategy[int]:
    bounds = layout.bounds
    return st.integers(bounds.start_ms, bounds.done_ms - 1)


@FAST
@given(st.data())
def test_a_progress_position_reads_back_the_same_from_both_sides(data: st.DataObject) -> None:
    layout = data.draw(layouts())
    bounds = layout.bounds
    assume(bounds.start_ms < bounds.done_ms)
    position = data.draw(positions_in(layout))
    state = progress(position)
    assert classify(False, position, bounds, is_sage=False) == state
    assert classify(True, position, bounds, is_sage=False) == state  # a rewatch on Plex
    time = sage_time_from_position(position, layout.segments)
    assert abs(position_from_sage_time(time, layout.segments) - position) < 2 * SEC
    assert classify(False, position_from_sage_time(time, layout.segments), bounds,
                    is_sage=True) == state
    # Written to SageTV through sage_write and read back.
    before = data.draw(st.sampled_from([NOT_WATCHED, WATCHED]))
    item = layout.item(watched=before is WATCHED,
                       end=layout.airing.end_ms if before is WATCHED else 0)
    write = sage_write(item, layout.segments, before, state, NEW)
    assert isinstance(write, SageSetPosition) and write.time_ms == time
    assert sage_status(after_sage_write(item, write), layout.segments, bounds) == state
    # Written to Plex: above a minute and below its played threshold.
    change, why = plex_write(before, state)
    if change is None:
        assert position <= 60 * SEC and layout.ignore < 60 * SEC and why
    else:
        assert 60 * SEC < change.position_ms < layout.played * layout.duration


@FAST
@given(st.data())
def test_sagetv_never_calls_a_written_progress_position_watched(data: st.DataObject) -> None:
    layout = data.draw(layouts())
    bounds, airing = layout.bounds, layout.airing
    assume(bounds.start_ms < bounds.done_ms)
    time = sage_time_from_position(data.draw(positions_in(layout)), layout.segments)
    covered = min(airing.end_ms, time) - max(airing.start_ms, airing.file_start_ms)
    needed = spec_sage_done(airing.end_ms - airing.start_ms, airing.show_duration_ms,
                            airing.is_movie)
    assert time < sage_done_time(airing)
    assert covered < needed


# A simple model of both servers, per sync-rules.md §3.2 and the APIs' documented behaviour.
@dataclass
class Sides:
    sage: SageItem
    plex_views: int
    plex_offset: int


def apply_writes(layout: Layout, sides: Sides, writes: Sequence[object]) -> Sides:
    item, views, offset = sides.sage, sides.plex_views, sides.plex_offset
    watched, end = item.watched, item.watched_end_ms
    for write in writes:
        if isinstance(write, PlexMarkWatched):  # scrobble: one more view, offset cleared
            views, offset = views + 1, 0
        elif isinstance(write, PlexMarkUnwatched):
            views, offset = 0, 0
        elif isinstance(write, PlexSetPosition):  # past the threshold Plex scrobbles instead
            if write.position_ms >= layout.played * layout.duration:
                views, offset = views + 1, 0
            elif write.position_ms > 60 * SEC:
                offset = write.position_ms
        elif isinstance(write, SageMarkWatched):
            watched, end = True, layout.airing.end_ms
        elif isinstance(write, SageClearWatched):
            watched, end = False, 0
        elif isinstance(write, SageSetPosition):
            if write.clear_first:
                watched, end = False, 0
            record_start = max(layout.airing.start_ms, layout.airing.file_start_ms)
            if not watched and write.time_ms >= record_start + 5 * SEC:  # forward only
                end = max(end, write.time_ms)
    return Sides(layout.item(watched, end), views, offset)


def states_of(layout: Layout, sides: Sides) -> tuple[Status, Status]:
    return (sage_status(sides.sage, layout.segments, layout.bounds),
            classify(sides.plex_views > 0, sides.plex_offset, layout.bounds, is_sage=False))


@st.composite
def both_sides(draw: st.DrawFn, layout: Layout) -> Sides:
    span = (layout.all_segments[0][0], layout.all_segments[-1][1])
    watched = draw(st.booleans())
    end = draw(st.one_of(st.just(0), st.just(span[1]), st.integers(*span)))
    views = draw(st.integers(0, 2))
    offset = draw(st.one_of(st.just(0), st.integers(0, max(layout.duration, 0))))
    return Sides(layout.item(watched, end), views, offset)


def plan(layout: Layout, sides: Sides, decision: Decision, sage: Status, plex: Status
         ) -> tuple[list[object], bool]:
    writes, blocked = [], False
    if decision.to_sage is not None:
        change = sage_write(sides.sage, layout.segments, sage, decision.to_sage, NEW)
        writes += [change] if change is not None else []
    if decision.to_plex is not None:
        change, why = plex_write(plex, decision.to_plex)
        writes += [change] if change is not None else []
        blocked = bool(why)
    return writes, blocked


@FAST
@given(st.data())
def test_after_the_writes_deciding_again_writes_nothing(data: st.DataObject) -> None:
    layout = data.draw(layouts())
    sides = data.draw(both_sides(layout))
    sage, plex = states_of(layout, sides)
    base = data.draw(st.one_of(st.none(), st.builds(
        Base, st.sampled_from([NOT_WATCHED, P10, WATCHED]),
        st.sampled_from([NOT_WATCHED, P20, WATCHED]))))
    sage_last, plex_last = data.draw(st.sampled_from(list(TIMES.values())))
    decision = decide(sage, plex, sage_last, plex_last, base)
    writes, blocked = plan(layout, sides, decision, sage, plex)
    after = apply_writes(layout, sides, writes)
    sage_after, plex_after = states_of(layout, after)
    note = f"{layout.bounds}; {sage}/{plex} -> {decision} via {writes} -> {sage_after}/{plex_after}"
    if decision.to_sage is not None:
        assert sage_after == decision.to_sage, note
    if decision.to_plex is not None and not blocked:
        assert plex_after == decision.to_plex, note
    again = decide(sage_after, plex_after, NEW, NEW, Base(sage_after, plex_after))
    assert again.to_sage is None and again.to_plex is None, note
    if not blocked and (decision.to_sage is not None or decision.to_plex is not None):
        assert decide_two_way(sage_after, plex_after, NEW, OLD).verdict is Verdict.IN_SYNC, note


statuses = st.one_of(st.sampled_from([NOT_WATCHED, WATCHED]),
                     st.builds(progress, st.integers(0, 4 * HOUR)))
moments = st.integers(OLD - HOUR, OLD + HOUR)


@FAST
@given(statuses, statuses, moments, moments)
def test_the_two_way_table_never_turns_a_side_to_not_watched(
        sage: Status, plex: Status, sage_last: int, plex_last: int) -> None:
    decision = decide_two_way(sage, plex, sage_last, plex_last)
    for target in (decision.to_sage, decision.to_plex):
        assert target is None or target.kind is not Kind.NONE
    if sage != plex:  # the winner is one of the two, whole
        assert decision.to_sage == decision.to_plex and decision.to_sage in (sage, plex)


@FAST
@given(statuses, statuses)
def test_moves_back_is_exactly_an_unwatch_or_an_earlier_position(
        current: Status, result: Status) -> None:
    expected = current != result and (
        (current.kind is Kind.WATCHED and result.kind is not Kind.WATCHED)
        or (current.kind is Kind.PROGRESS and result.kind is Kind.NONE)
        or (current.kind is Kind.PROGRESS and result.kind is Kind.PROGRESS
            and result.position_ms < current.position_ms))
    assert moves_back(current, result) is expected


@pytest.mark.parametrize("current, result, back", [
    (WATCHED, NOT_WATCHED, True), (WATCHED, P10, True), (P20, P10, True),
    (P10, NOT_WATCHED, True), (P10, P20, False), (P10, WATCHED, False),
    (NOT_WATCHED, P10, False), (NOT_WATCHED, WATCHED, False), (WATCHED, WATCHED, False),
    (P10, progress(10 * MIN - 1_999), False)])
def test_moves_back_rows(current: Status, result: Status, back: bool) -> None:
    assert moves_back(current, result) is back


###############################################################################
# 5. Text forms
###############################################################################


@FAST
@given(statuses)
def test_status_text_round_trips(status: Status) -> None:
    again = Status.from_text(status.to_text())
    assert again == status and again.kind is status.kind
    assert again.position_ms == status.position_ms


@pytest.mark.parametrize("text, status", [
    ("none", NOT_WATCHED), ("watched", WATCHED), ("at:0", progress(0)),
    ("at:600000", P10)])
def test_status_text_forms(text: str, status: Status) -> None:
    assert Status.from_text(text) == status and status.to_text() == text


@pytest.mark.parametrize("text", ["", "at:", "at:-5", "at:1.5", "at:x", "At:5", "WATCHED",
                                  "at:5:6", "at: 5", "at:٣"])
def test_status_text_that_is_not_a_state_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Status.from_text(text)


@pytest.mark.parametrize("ms, text", [
    (0, "0:00:00"), (999, "0:00:00"), (1_000, "0:00:01"), (59_999, "0:00:59"),
    (60_000, "0:01:00"), (3_723_000, "1:02:03"), (108 * MIN, "1:48:00"),
    (100 * HOUR, "100:00:00"), (-5_000, "0:00:00"), (1_500.7, "0:00:01")])
def test_format_hms(ms: float, text: str) -> None:
    assert format_hms(ms) == text


def test_status_prints_as_the_report_says() -> None:
    assert (str(WATCHED), str(NOT_WATCHED), str(progress(3_723_000))) == (
        "watched", "not watched", "at 1:02:03")
