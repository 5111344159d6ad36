"""The plan phase, pure (sync-rules.md §1.4, §4, §6, §6.3-6.4, §5 --position).

``plan_run(facts, options, replays) -> Plan`` is a pure function: no server, no state
file. The items here are built by hand and measured as reading measures them
(``measured``), put in a ``Facts``, and planned. Each test asserts on the decision
(verdict, targets, rule) and the writes planned for each Plex item.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

import sageplex_sync
from sageplex_sync import (
    NOT_WATCHED,
    WATCHED,
    Airing,
    BaseRecord,
    Decision,
    Facts,
    Item,
    Kind,
    Options,
    Outcome,
    Pending,
    Planned,
    PlexItem,
    PlexMarkUnwatched,
    PlexMarkWatched,
    PlexSetPosition,
    Replay,
    RunKind,
    SageClearWatched,
    SageIndex,
    SageItem,
    SageMarkWatched,
    SageSetPosition,
    Status,
    Verdict,
    base_of,
    file_name,
    measured,
    plan_run,
)

SEC = 1_000
MIN = 60_000
HOUR = 60 * MIN
T = 1_700_000_000_000  # the recordings' start, on SageTV's airing timeline
# Last-watched stamps (both servers' clocks agree: no offsets in these runs).
OLD, MID, NEW = T + 3 * HOUR, T + 4 * HOUR, T + 5 * HOUR
PLAYED = 0.9  # Plex's played threshold


def at(ms: int) -> Status:
    return Status(Kind.PROGRESS, ms)


P10, P20, P30 = at(10 * MIN), at(20 * MIN), at(30 * MIN)


# -- SageTV ------------------------------------------------------------------------------
# A two-hour movie, no padding: progress from 1:00:01, watched from 1:48:00 (Plex's 90 %).
def movie(mfid: int = 1, *, watched: bool = False, pos: int = 0, stamp: int = 0,
          completely: bool | None = None, show_id: str = "MV0001") -> SageItem:
    """A movie recording: watched, at ``pos`` (ms into the file), or neither."""
    end = T + 2 * HOUR if watched else (T + pos if pos else 0)
    return SageItem(mfid, 100 + mfid, (f"/tv/film{mfid}.mpg",), 1, T, 2 * HOUR,
                    Airing(T, T + 2 * HOUR, 0, T, True), watched,
                    watched if completely is None else completely, end, 0, stamp, show_id)


# A one-hour episode recorded in two files of 30 minutes each.
SEG1, SEG2 = (T, T + 30 * MIN), (T + 30 * MIN, T + HOUR)
PART1, PART2 = "/tv/rec-0.mpg", "/tv/rec-1.mpg"


def split(*, watched: bool = False, end: int = 0, stamp: int = 0) -> SageItem:
    """A split recording (segment times read, as ``assess`` reads them when needed)."""
    item = SageItem(2, 102, (PART1, PART2), 2, T, HOUR, Airing(T, T + HOUR, 0, T, False),
                    watched, watched, T + HOUR if watched else end, 0, stamp, "EP0002")
    item.segments = (SEG1, SEG2)
    return item


# -- Plex --------------------------------------------------------------------------------
def plex(key: int, *paths: str, count: int = 0, pos: int = 0, stamp: int = 0,
         duration: int = 2 * HOUR) -> PlexItem:
    return PlexItem(key, f"item {key}", paths or ("/media/film1.mpg",), count, pos, duration,
                    stamp)


def p_watched(key: int, stamp: int = MID, *paths: str, duration: int = 2 * HOUR) -> PlexItem:
    return plex(key, *paths, count=1, stamp=stamp, duration=duration)


def p_at(key: int, pos: int, stamp: int = MID, *paths: str, count: int = 0) -> PlexItem:
    return plex(key, *paths, count=count, pos=pos, stamp=stamp)


def p_none(key: int, stamp: int = 0, *paths: str, duration: int = 2 * HOUR) -> PlexItem:
    return plex(key, *paths, stamp=stamp, duration=duration)


# -- runs, items, bases ------------------------------------------------------------------
@dataclass
class Run:
    """What a plan is made with besides the facts: the options and the replays."""

    opts: Options
    replays: dict[int, Replay] = field(default_factory=dict)
    orders: itertools.count = field(default_factory=itertools.count)


def new_run(*, position_ms: int | None = None, overrides: dict[int, Replay] | None = None,
            kind: RunKind = RunKind.SYNC) -> Run:
    return Run(Options(kind=kind, position_ms=position_ms), overrides or {})


def base_record(sage_then: SageItem, plex_then: PlexItem,
                pending: Pending | None = None) -> BaseRecord:
    """A stored base: the raw values the last sync read back (classified under the run's
    bounds by base_of; the stored states are only a fallback and unused here)."""
    return BaseRecord(sage_then.media_file_id, file_name(plex_then.paths[0]), NOT_WATCHED,
                      NOT_WATCHED, sage_then.raw(), plex_then.raw(), pending)


def pending(to_sage: Status | None, to_plex: Status | None, sage_on: SageItem,
            plex_on: PlexItem, own_sage: tuple[Status, ...] = (),
            own_plex: tuple[Status, ...] = ()) -> Pending:
    return Pending(to_sage, to_plex, sage_on.raw(), plex_on.raw(), own_sage, own_plex)


def entry(run: Run, p: PlexItem, s: SageItem, base: BaseRecord | None = None) -> Item:
    """Matched and measured as reading does it (listed in the order made)."""
    item = measured(Item(p, next(run.orders)), s, (PLAYED, run.opts.ignore_ms), (0, 0))
    if base is not None:
        item = item._replace(base=base_of(base, item), base_record=base)
    return item


def plan(run: Run, items: Sequence[Item], *sage: SageItem) -> list[Planned]:
    """The plan of ``items``, in the order given (an item in sync with nothing to
    decide, left out of the plan's decided items, as Planned with no decision)."""
    sage_items = sage or tuple({i.sage.media_file_id: i.sage for i in items
                                if i.sage is not None}.values())
    made = plan_run(Facts(tuple(sorted(items, key=lambda i: i.order)), SageIndex(sage_items),
                          PLAYED, "test"), run.opts, run.replays)
    by_order = {p.item.order: p for p in made.decided}
    by_order.update((i.order, Planned(i)) for i in made.quiet)
    assert len(by_order) == len(items)
    return [by_order[i.order] for i in items]


def sage_writes(*planned: Planned) -> list[object]:
    return [w for p in planned for w in p.writes
            if isinstance(w, (SageMarkWatched, SageClearWatched, SageSetPosition))]


def test_helpers_read_back_as_the_states_they_were_made_for() -> None:
    run = new_run()
    assert entry(run, p_at(1, 20 * MIN), movie(pos=10 * MIN)).sage_status == P10
    e = entry(run, p_at(1, 20 * MIN), movie(pos=10 * MIN))
    assert (e.sage_status, e.plex_status) == (P10, P20)
    e = entry(run, p_watched(1), movie(watched=True))
    assert (e.sage_status, e.plex_status) == (WATCHED, WATCHED)
    e = entry(run, p_none(1, 0, PART2, duration=30 * MIN), split(end=T + 40 * MIN))
    assert e.segments == (SEG2,) and e.sage_status == P10


# == the fast path (§2) ======================================================================
@pytest.mark.parametrize("sage, plex_item", [
    (movie(watched=True, stamp=OLD), p_watched(1)),
    (movie(pos=10 * MIN, stamp=OLD), p_at(1, 10 * MIN + 1_500)),  # equal within 2 s
    (movie(), p_none(1)),
], ids=["watched", "progress-within-2s", "not-watched"])
def test_sides_that_agree_without_a_pending_write_are_in_sync_with_no_writes(
        sage: SageItem, plex_item: PlexItem, monkeypatch: pytest.MonkeyPatch) -> None:
    run = new_run()

    def never(*args: object) -> None:
        raise AssertionError("an item whose sides agree is not decided")

    monkeypatch.setattr(sageplex_sync, "plan_recording", never)
    # A base both sides moved away from: the sides agreeing is enough.
    e = entry(run, plex_item, sage, base_record(movie(pos=50 * MIN), p_at(1, 50 * MIN)))
    (e,) = plan(run, [e])
    assert e.decision.verdict is Verdict.IN_SYNC
    assert (e.decision.to_sage, e.decision.to_plex) == (None, None)
    assert e.writes == ()


def test_positions_2_5_s_apart_are_not_in_sync() -> None:
    run = new_run()
    e = entry(run, p_at(1, 10 * MIN + 2_500, NEW), movie(pos=10 * MIN, stamp=OLD))
    (e,) = plan(run, [e])
    assert e.decision.verdict is Verdict.SAGE_OUT_OF_SYNC
    assert e.decision.rule == "row 7: Plex newer"


# == one decision per recording: twins (§4) ===================================================
def test_twins_without_a_base_follow_the_newest_twin() -> None:
    run = new_run()
    sage = movie(pos=10 * MIN, stamp=MID)
    older = entry(run, p_at(1, 30 * MIN, OLD), sage)  # listed first, older than SageTV
    newest = entry(run, p_at(2, 20 * MIN, NEW), sage)
    older, newest = plan(run, [older, newest])
    for e in (older, newest):
        assert e.decision.to_sage == P20 and e.decision.to_plex == P20
        assert e.decision.rule == "row 7: Plex newer"
    assert older.writes == (SageSetPosition(20 * MIN, T + 20 * MIN, False, NEW),
                            PlexSetPosition(20 * MIN))
    assert newest.writes == ()  # already there
    assert newest.sage_expected == P20


def test_twins_with_a_base_follow_the_twin_that_was_unwatched() -> None:
    run = new_run()
    sage = movie(watched=True, stamp=OLD)
    kept = entry(run, p_watched(1, NEW), sage, base_record(sage, p_watched(1, NEW)))
    unwatched = entry(run, p_none(2, OLD), sage, base_record(sage, p_watched(2, OLD)))
    kept, unwatched = plan(run, [kept, unwatched])
    for e in (kept, unwatched):
        assert (e.decision.to_sage, e.decision.to_plex) == (NOT_WATCHED, NOT_WATCHED)
        assert e.decision.rule == "Plex changed since the last sync"
    assert kept.writes == (SageClearWatched(), PlexMarkUnwatched())
    assert unwatched.writes == ()
    assert kept.decision.verdict is Verdict.BOTH_OUT_OF_SYNC
    assert unwatched.decision.verdict is Verdict.SAGE_OUT_OF_SYNC


def test_a_twin_with_a_pending_write_leads_over_a_newer_twin() -> None:
    # The last sync propagated SageTV's un-watch; the unscrobble of twin 1 failed. Twin 2
    # (no base: newly in a library) is newer, and alone would re-watch SageTV (row 2).
    run = new_run()
    sage = movie(stamp=0)
    was = movie(watched=True, stamp=OLD)
    failed = entry(run, p_watched(1, OLD - HOUR), sage, base_record(
        was, p_watched(1, OLD - HOUR),
        pending(None, NOT_WATCHED, sage, p_watched(1, OLD - HOUR))))
    newer = entry(run, p_watched(2, OLD), sage)
    failed, newer = plan(run, [failed, newer])
    for e in (failed, newer):
        assert (e.decision.to_sage, e.decision.to_plex) == (None, NOT_WATCHED)
        assert e.decision.rule == "the last sync's unfinished write, again"
    assert failed.writes == (PlexMarkUnwatched(),)
    assert newer.writes == (PlexMarkUnwatched(),)
    assert sage_writes(failed, newer) == []


def test_a_pending_write_on_one_twin_yields_to_a_newer_viewing_on_the_other() -> None:
    # The last sync propagated SageTV's un-watch; twin 2's unscrobble took (its base is
    # new), twin 1's failed. Since then the user played twin 2 to 20:00: Plex's side of
    # the recording changed, so the pending decision must not be carried out.
    run = new_run()
    sage = movie(stamp=0)
    failed = entry(run, p_watched(1, OLD), sage, base_record(
        movie(watched=True, stamp=OLD), p_watched(1, OLD),
        pending(None, NOT_WATCHED, sage, p_watched(1, OLD))))
    viewed = entry(run, p_at(2, 20 * MIN, NEW), sage, base_record(sage, p_none(2, OLD)))
    failed, viewed = plan(run, [failed, viewed])
    assert PlexMarkUnwatched() not in viewed.writes  # the newer viewing is kept
    assert viewed.decision.to_sage == P20


def test_a_sagetv_unwatch_after_a_twins_failed_write_reaches_the_written_twin() -> None:
    # The last sync set both twins to SageTV's 20:00: twin 2 took it (its base is new),
    # twin 1's write failed (its base is the one before, SageTV not watched). The user then
    # un-watched SageTV: the failed twin's pending no longer holds, and its stale base must
    # not make the recording "in sync"; the un-watch reaches twin 2.
    run = new_run()
    at_20 = movie(pos=20 * MIN, stamp=MID)
    sage = movie(stamp=0)
    failed = entry(run, p_none(1), sage, base_record(
        movie(stamp=0), p_none(1), pending(None, P20, at_20, p_none(1))))
    written = entry(run, p_at(2, 20 * MIN, MID), sage, base_record(at_20, p_at(2, 20 * MIN, MID)))
    failed, written = plan(run, [failed, written])
    assert written.decision.to_plex == NOT_WATCHED, written.decision
    assert written.writes == (PlexMarkUnwatched(),)
    assert failed.writes == ()


def test_a_twin_in_sync_with_sagetv_gives_its_state_to_a_lagging_twin() -> None:
    run = new_run()
    sage = movie(watched=True, stamp=OLD)
    leader = entry(run, p_watched(1, NEW), sage)
    lagging = entry(run, p_none(2), sage)
    leader, lagging = plan(run, [leader, lagging])
    assert leader.decision.verdict is Verdict.IN_SYNC and leader.writes == ()
    assert lagging.decision.verdict is Verdict.PLEX_OUT_OF_SYNC
    assert lagging.writes == (PlexMarkWatched(),)


def test_twins_plan_one_sagetv_write_and_none_for_a_twin_already_there() -> None:
    run = new_run()
    sage = movie(stamp=0)
    first = entry(run, p_watched(1, NEW), sage)
    second = entry(run, p_watched(2, OLD), sage)
    third = entry(run, p_none(3), sage)
    first, second, third = plan(run, [first, second, third])
    assert sage_writes(first, second, third) == [SageMarkWatched()]
    assert first.writes == (SageMarkWatched(),)
    assert second.writes == ()
    assert third.writes == (PlexMarkWatched(),)
    assert all(e.decision.to_sage == WATCHED for e in (first, second, third))


# == siblings (§3.1) ===========================================================================
def test_a_recording_watched_through_its_show_flag_has_no_time_of_its_own() -> None:
    """§1.1: SageTV's last-watched time is the recording's own RealWatchedEndTime; one
    watched only through its show's flag has none, so a rewatch in progress on Plex is
    newer, whatever its sibling's time."""
    run = new_run()
    by_flag = movie(1, watched=True, completely=False, stamp=0, show_id="EP0009")
    sibling = movie(3, watched=True, stamp=NEW, show_id="EP0009")
    e = entry(run, p_at(1, 20 * MIN, MID, count=1), by_flag)
    (e,) = plan(run, [e], by_flag, sibling)
    assert e.decision.rule == "row 5: Plex newer"
    assert e.decision.to_sage == at(20 * MIN)


# == split recordings (§1.4, §4) ================================================================
def test_watched_from_the_part_without_the_last_segment_sets_the_end_of_its_segment() -> None:
    run = new_run()
    sage = split()
    e = entry(run, p_watched(1, NEW, PART1, duration=30 * MIN), sage)
    (e,) = plan(run, [e])
    assert e.decision.to_sage == WATCHED
    assert e.writes == (SageSetPosition(30 * MIN, T + 30 * MIN, False, NEW),)


def test_watched_from_a_stacked_item_holding_every_segment_marks_the_recording() -> None:
    run = new_run()
    e = entry(run, p_watched(1, NEW, PART1, PART2, duration=HOUR), split())
    (e,) = plan(run, [e])
    assert e.writes == (SageMarkWatched(),)


def test_unwatched_from_the_part_without_the_first_segment_sets_its_start() -> None:
    run = new_run()
    sage = split(watched=True, stamp=OLD)
    then = p_watched(1, OLD, PART2, duration=30 * MIN)
    e = entry(run, p_none(1, OLD, PART2, duration=30 * MIN), sage, base_record(sage, then))
    (e,) = plan(run, [e])
    assert e.decision.to_sage == NOT_WATCHED
    assert e.writes == (SageSetPosition(0, T + 30 * MIN, True, OLD),)


def test_unwatched_from_the_part_with_the_first_segment_clears_the_recording() -> None:
    run = new_run()
    sage = split(watched=True, stamp=OLD)
    then = p_watched(1, OLD, PART1, duration=30 * MIN)
    e = entry(run, p_none(1, OLD, PART1, duration=30 * MIN), sage, base_record(sage, then))
    (e,) = plan(run, [e])
    assert e.writes == (SageClearWatched(),)


def test_parts_are_decided_in_segment_order_against_sagetv_as_the_last_one_leaves_it(
) -> None:
    # Listed part 2 first: the stacked item (from segment 1) is still decided first, and
    # its SetWatched makes SageTV watched as seen from the part-2 item.
    run = new_run()
    sage = split()
    part2 = entry(run, p_none(2, 0, PART2, duration=30 * MIN), sage)
    stacked = entry(run, p_watched(1, NEW, PART1, PART2, duration=HOUR), sage)
    part2, stacked = plan(run, [part2, stacked])
    assert stacked.writes == (SageMarkWatched(),)
    assert part2.item.sage_status == WATCHED
    assert part2.writes == (PlexMarkWatched(),)
    assert sage_writes(part2, stacked) == [SageMarkWatched()]


def test_each_part_writes_its_own_segment_of_sagetv() -> None:
    run = new_run()
    sage = split()
    part1 = entry(run, p_watched(1, NEW, PART1, duration=30 * MIN), sage)
    part2 = entry(run, p_at(2, 10 * MIN, NEW, PART2), sage)
    part1, part2 = plan(run, [part1, part2])
    assert part1.writes == (SageSetPosition(30 * MIN, T + 30 * MIN, False, NEW),)
    assert part2.writes == (SageSetPosition(10 * MIN, T + 40 * MIN, False, NEW),)


# == pending decisions (§6, §6.3, §6.4) ===========================================================
# A failed undo of a "mark watched on SageTV": both sides watched, the old base (watched on
# both) kept, and SageTV's un-watch pending. Without it the merge finds nothing to do.
def failed_undo(sage_now: SageItem, plex_now: PlexItem, **own: tuple[Status, ...]
                ) -> BaseRecord:
    both = movie(watched=True, stamp=OLD)
    return base_record(both, p_watched(1, MID),
                       pending(NOT_WATCHED, None, both, p_watched(1, MID), **own))


def test_a_pending_write_is_carried_out_when_neither_side_changed() -> None:
    run = new_run()
    sage, plex_item = movie(watched=True, stamp=OLD), p_watched(1, MID)
    e = entry(run, plex_item, sage, failed_undo(sage, plex_item))
    (e,) = plan(run, [e])
    assert e.decision.rule == "the last sync's unfinished write, again"
    assert e.writes == (SageClearWatched(),)


def test_a_pending_write_is_decided_afresh_when_plex_moved() -> None:
    run = new_run()
    sage, plex_item = movie(watched=True, stamp=OLD), p_at(1, 20 * MIN, NEW, count=1)
    e = entry(run, plex_item, sage, failed_undo(sage, plex_item))
    (e,) = plan(run, [e])
    assert e.decision.rule == "Plex changed since the last sync"
    assert e.writes == (SageSetPosition(20 * MIN, T + 20 * MIN, True, NEW),)


@pytest.mark.parametrize("sage, plex_item", [
    (movie(watched=True, stamp=OLD + 5 * SEC), p_watched(1, MID)),
    (movie(watched=True, stamp=OLD), p_watched(1, MID + 5 * SEC)),
], ids=["sagetv-watched-again", "plex-watched-again"])
def test_a_pending_write_is_decided_afresh_after_a_newer_viewing_in_the_same_state(
        sage: SageItem, plex_item: PlexItem) -> None:
    run = new_run()
    e = entry(run, plex_item, sage, failed_undo(sage, plex_item))
    (e,) = plan(run, [e])
    assert e.decision.verdict is Verdict.IN_SYNC
    assert e.writes == ()


def test_a_pending_write_holds_over_a_sagetv_state_the_tools_own_step_left() -> None:
    # The pending write is "set SageTV to 20:00" (clear watched, then set): the clear
    # took, the set did not. SageTV not watched is the tool's doing, not the user's.
    run = new_run()
    both = movie(watched=True, stamp=OLD)
    record = base_record(both, p_watched(1, MID), pending(
        P20, None, both, p_watched(1, MID), own_sage=(P20, NOT_WATCHED, WATCHED)))
    e = entry(run, p_watched(1, MID), movie(stamp=OLD), record)
    (e,) = plan(run, [e])
    assert e.decision.rule == "the last sync's unfinished write, again"
    assert e.writes == (SageSetPosition(20 * MIN, T + 20 * MIN, False, MID),)


def test_a_pending_write_holds_over_a_plex_state_the_tools_own_step_left() -> None:
    # Pending "put Plex back to 20:00, never played": the unscrobble took, the set did not.
    run = new_run()
    both = movie(watched=True, stamp=OLD)
    record = base_record(both, p_watched(1, MID), pending(
        None, P20, both, p_watched(1, MID), own_plex=(P20, NOT_WATCHED, WATCHED)))
    e = entry(run, p_none(1, MID), both, record)
    (e,) = plan(run, [e])
    assert e.decision.rule == "the last sync's unfinished write, again"
    assert e.writes == (PlexSetPosition(20 * MIN),)


def test_a_pending_write_decided_afresh_still_takes_the_tools_own_state_for_no_change(
) -> None:
    # The pending "set SageTV to 20:00" did take (stamped by SageTV when it did) but was
    # never recorded; the user has since played Plex to 30:00. Only Plex changed.
    run = new_run()
    both = movie(watched=True, stamp=OLD)
    record = base_record(both, p_watched(1, MID), pending(
        P20, None, both, p_watched(1, MID), own_sage=(P20, NOT_WATCHED, WATCHED)))
    e = entry(run, p_at(1, 30 * MIN, MID + 10 * SEC, count=1), movie(pos=20 * MIN, stamp=NEW),
              record)
    (e,) = plan(run, [e])
    assert e.decision.rule == "Plex changed since the last sync"
    assert e.writes == (SageSetPosition(30 * MIN, T + 30 * MIN, False, MID + 10 * SEC),)


# == undo and apply (§6, §6.4) ====================================================================
UNDO_WATCHED = Decision(Verdict.BOTH_OUT_OF_SYNC, NOT_WATCHED, NOT_WATCHED, "undo of run 7")


def replay(sage: Status = WATCHED, plex_state: Status = WATCHED, sage_ms: int = OLD,
           plex_ms: int = MID, decision: Decision = UNDO_WATCHED) -> Replay:
    return Replay(sage, plex_state, sage_ms, plex_ms, decision)


@pytest.mark.parametrize("kind", [RunKind.UNDO, RunKind.APPLY])
def test_a_replay_is_carried_out_when_the_item_is_as_it_expects(kind: RunKind) -> None:
    run = new_run(overrides={1: replay()}, kind=kind)
    e = entry(run, p_watched(1, MID), movie(watched=True, stamp=OLD))
    (e,) = plan(run, [e])
    assert e.outcome is Outcome.UNCHANGED
    assert e.decision.rule == "undo of run 7"
    assert e.writes == (SageClearWatched(), PlexMarkUnwatched())


@pytest.mark.parametrize("sage, plex_item", [
    (movie(), p_watched(1, MID)),
    (movie(watched=True, stamp=OLD), p_at(1, 20 * MIN, MID, count=1)),
    (movie(watched=True, stamp=OLD + 5 * SEC), p_watched(1, MID)),
    (movie(watched=True, stamp=OLD), p_watched(1, MID + 5 * SEC)),
], ids=["sagetv-state", "plex-state", "sagetv-newer-stamp", "plex-newer-stamp"])
def test_a_replay_is_skipped_when_a_side_changed_since(sage: SageItem,
                                                      plex_item: PlexItem) -> None:
    run = new_run(overrides={1: replay()}, kind=RunKind.UNDO)
    e = entry(run, plex_item, sage)
    (e,) = plan(run, [e])
    assert e.outcome is Outcome.SKIPPED and e.keep_base
    assert e.detail.startswith("changed since")
    assert e.decision.verdict is Verdict.SETTLED
    assert e.writes == ()


@pytest.mark.parametrize("moved_ms, skipped", [(1_500, False), (3_000, True)])
def test_a_replay_tolerates_a_position_moved_by_less_than_2_s(moved_ms: int,
                                                             skipped: bool) -> None:
    back = Decision(Verdict.BOTH_OUT_OF_SYNC, P10, P10, "undo of run 7")
    run = new_run(overrides={1: replay(P20, P20, decision=back)}, kind=RunKind.UNDO)
    e = entry(run, p_at(1, 20 * MIN + moved_ms, MID), movie(pos=20 * MIN, stamp=OLD))
    (e,) = plan(run, [e])
    assert (e.outcome is Outcome.SKIPPED) is skipped
    assert e.writes == (() if skipped else (
        SageSetPosition(10 * MIN, T + 10 * MIN, True, 0), PlexSetPosition(10 * MIN)))


def test_twins_are_each_put_back_to_their_own_before_state() -> None:
    to_none = UNDO_WATCHED
    to_p20 = Decision(Verdict.BOTH_OUT_OF_SYNC, NOT_WATCHED, P20, "undo of run 7")
    run = new_run(overrides={1: replay(decision=to_none), 2: replay(decision=to_p20)},
                  kind=RunKind.UNDO)
    sage = movie(watched=True, stamp=OLD)
    one, two = entry(run, p_watched(1, MID), sage), entry(run, p_watched(2, MID), sage)
    one, two = plan(run, [one, two])
    assert one.decision.to_plex == NOT_WATCHED and two.decision.to_plex == P20
    assert one.writes == (SageClearWatched(), PlexMarkUnwatched())
    assert two.writes == (PlexSetPosition(20 * MIN),)


def test_a_twin_the_undone_run_did_not_write_is_left_as_it_was() -> None:
    # The undone sync watched SageTV and twin 1; twin 2 was watched already (no write, so
    # no journal row). Its before-state is watched: the undo must not unscrobble it.
    run = new_run(overrides={1: replay()}, kind=RunKind.UNDO)
    sage = movie(watched=True, stamp=OLD)
    written = entry(run, p_watched(1, MID), sage)
    untouched = entry(run, p_watched(2, OLD - HOUR), sage)
    written, untouched = plan(run, [written, untouched])
    assert written.writes == (SageClearWatched(), PlexMarkUnwatched())
    assert untouched.writes == ()


def test_a_twin_changed_since_skips_the_recordings_replay() -> None:
    run = new_run(overrides={1: replay(), 2: replay()}, kind=RunKind.UNDO)
    sage = movie(watched=True, stamp=OLD)
    kept = entry(run, p_watched(1, MID), sage)
    moved = entry(run, p_at(2, 30 * MIN, NEW, count=1), sage)
    kept, moved = plan(run, [kept, moved])
    assert kept.outcome is Outcome.SKIPPED and moved.outcome is Outcome.SKIPPED
    assert moved.detail.startswith("changed since")
    assert kept.writes == () and moved.writes == ()


@pytest.mark.parametrize("unplayed, writes", [
    (True, (PlexMarkUnwatched(), PlexSetPosition(20 * MIN))),
    (False, (PlexSetPosition(20 * MIN),)),
], ids=["never-played", "played-before"])
def test_an_undo_to_a_never_played_resume_point_unscrobbles_first(
        unplayed: bool, writes: tuple[object, ...]) -> None:
    back = Decision(Verdict.PLEX_OUT_OF_SYNC, None, P20, "undo of run 7",
                    plex_unplayed=unplayed)
    run = new_run(overrides={1: replay(decision=back)}, kind=RunKind.UNDO)
    e = entry(run, p_watched(1, MID), movie(watched=True, stamp=OLD))
    (e,) = plan(run, [e])
    assert e.writes == writes


# == --position (§5) ==============================================================================
@pytest.mark.parametrize("sage, plex_item", [
    (movie(watched=True, stamp=OLD), p_none(1)),
    (movie(watched=True, stamp=OLD), p_watched(1, MID)),  # in sync: no fast path
    (movie(pos=10 * MIN, stamp=OLD), p_at(1, 10 * MIN, MID)),
], ids=["differ", "both-watched", "both-at-10"])
def test_position_sets_that_position_on_both_sides_whatever_the_states(
        sage: SageItem, plex_item: PlexItem) -> None:
    run = new_run(position_ms=30 * MIN)
    e = entry(run, plex_item, sage, base_record(sage, plex_item))
    (e,) = plan(run, [e])
    assert (e.decision.to_sage, e.decision.to_plex, e.decision.rule) == (P30, P30, "--position")
    assert e.decision.verdict is Verdict.BOTH_OUT_OF_SYNC
    assert e.writes == (SageSetPosition(30 * MIN, T + 30 * MIN, sage.watched, 0),
                        PlexSetPosition(30 * MIN))


def test_position_on_twins_plans_one_sagetv_write() -> None:
    run = new_run(position_ms=30 * MIN)
    sage = movie(watched=True, stamp=OLD)
    one, two = entry(run, p_watched(1, MID), sage), entry(run, p_none(2), sage)
    one, two = plan(run, [one, two])
    assert sage_writes(one, two) == [SageSetPosition(30 * MIN, T + 30 * MIN, True, 0)]
    assert one.writes[-1] == two.writes[-1] == PlexSetPosition(30 * MIN)
