"""Acting as the user on each server, between two runs of the tool, and reading each side's
state the way the sync rules classify it (docs/rules.md: bounds and states).

On Plex the user's actions go through real HTTP (``/:/scrobble``, ``/:/unscrobble``,
``/:/timeline``) so the fake applies its own semantics (its clock stamps ``lastViewedAt``,
its played threshold and minimum progress apply). On SageTV they are what a viewing on the
TV leaves behind: a Watched record with real times, the show's watched flag, ClearWatched.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from urllib.parse import urlencode

from tests.fakes.fake_http import FakeServer
from tests.fakes.world import MIN, PLEX_TOKEN, SEC, Item, World, sage_time

IDENTIFIER = "com.plexapp.plugins.library"
PLAYER = "sageplex-test-player"  # X-Plex-Client-Identifier of the user's Plex player
TOLERANCE_MS = 2_000  # two PROGRESS states are equal when closer than this (§1.3)


class User:
    """The person at the TV: acts on one side, the clock of the world says when."""

    def __init__(self, world: World, plex_server: FakeServer) -> None:
        self.world = world
        self.plex_server = plex_server

    # -- Plex, over HTTP -------------------------------------------------------------------
    def _plex(self, path: str, *, client: str | None = None, **params: object) -> None:
        url = f"{self.plex_server.base_url}{path}?{urlencode(params)}"
        headers = {"X-Plex-Token": PLEX_TOKEN, "Accept": "application/xml"}
        if client is not None:
            headers["X-Plex-Client-Identifier"] = client
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310 (127.0.0.1)
            assert reply.status == 200, reply.status

    def _report(self, item: Item, state: str, position_ms: int, rating_key: int | None,
                client: str) -> None:
        """One timeline report of a Plex player, as players send every ~10 s and on each
        state change: the server applies it (§4.1) and notifies ``playing`` (§10)."""
        key = rating_key or item.rating_key
        duration = self.world.plex.item(key).duration_ms
        self._plex("/:/timeline", client=client, ratingKey=key,
                   key=f"/library/metadata/{key}", identifier=IDENTIFIER, state=state,
                   time=position_ms, duration=duration)

    def plex_play(self, item: Item, position_ms: int, rating_key: int | None = None,
                  client: str = PLAYER) -> None:
        """The Plex player is playing the item at ``position_ms`` (the first report starts
        a session; call again with a later position as playback goes on)."""
        self._report(item, "playing", position_ms, rating_key, client)

    def plex_pause(self, item: Item, position_ms: int, rating_key: int | None = None,
                   client: str = PLAYER) -> None:
        """The Plex player paused at ``position_ms``."""
        self._report(item, "paused", position_ms, rating_key, client)

    def plex_stop(self, item: Item, position_ms: int, rating_key: int | None = None,
                  client: str = PLAYER) -> None:
        """The Plex player stopped at ``position_ms``: its session ends (without a session
        before it, a lone stop: play and stop in one report)."""
        self._report(item, "stopped", position_ms, rating_key, client)

    def plex_stop_at(self, item: Item, position_ms: int, rating_key: int | None = None) -> None:
        """Play on Plex and stop at ``position_ms`` (a rewatch keeps the view count)."""
        self.plex_stop(item, position_ms, rating_key)

    def plex_finish(self, item: Item, rating_key: int | None = None) -> None:
        """Play to the end: the scrobble, leaving no resume point. A client that plays to
        the end leaves none, whatever the server's switch says about a bare scrobble (that
        switch is about what the server does with the tool's writes)."""
        plex = self.world.plex
        clears, plex.scrobble_clears_offset = plex.scrobble_clears_offset, True
        try:
            self._plex("/:/scrobble", key=rating_key or item.rating_key, identifier=IDENTIFIER)
        finally:
            plex.scrobble_clears_offset = clears

    def plex_unwatch(self, item: Item, rating_key: int | None = None) -> None:
        """Mark unplayed: the unscrobble (view count and position go)."""
        self._plex("/:/unscrobble", key=rating_key or item.rating_key, identifier=IDENTIFIER)

    # -- SageTV, as a viewing on the TV leaves it ----------------------------------------
    def _airing(self, item: Item) -> dict:
        assert item.airing_id is not None
        return self.world.sage.airing_json(item.airing_id)

    def sage_stop_at(self, item: Item, position_ms: int) -> None:
        """Watch on SageTV from the start and stop at ``position_ms`` (file-relative).
        Watching a watched show again clears *watched* first, as SageTV does."""
        assert item.airing_id is not None
        if self._airing(item).get("IsWatched"):
            self.world.sage.clear_watched(item.airing_id)
        now = self.world.clock.ms()
        start = max(self._airing(item)["AiringStartTime"], item.file_start_ms)
        self.world.sage.set_watch_record(item.airing_id, start, sage_time(item, position_ms),
                                         now - position_ms, now)

    def sage_finish(self, item: Item) -> None:
        """Watch on SageTV to the end: a full Watched record and the show's flag."""
        assert item.airing_id is not None and item.show_external_id is not None
        airing = self._airing(item)
        now = self.world.clock.ms()
        start = max(airing["AiringStartTime"], item.file_start_ms)
        end = airing["AiringEndTime"]
        self.world.sage.set_watch_record(item.airing_id, start, end, now - (end - start), now)
        self.world.sage.set_show_watched(item.show_external_id, airing["AiringStartTime"])

    def sage_play(self, item: Item, position_ms: int, client: str = "sagetv-client") -> None:
        """A SageTV client plays the item, now at ``position_ms`` (file-relative); the first
        call starts the playback (and, as the stock UI does, clears *watched* of a watched
        item). No watch record is written while it plays (sagex reference §10), except the
        player's completion check once the viewing counts as complete (§6.3)."""
        assert item.airing_id is not None
        self.world.sage.play(item.airing_id, sage_time(item, position_ms), client=client)

    def sage_stop(self, item: Item, position_ms: int) -> None:
        """The SageTV client stops at ``position_ms``: the watch record is written now
        (VideoFrame.logFileWatch), with the playback's real start and SageTV's "now"."""
        assert item.airing_id is not None
        self.world.sage.stop(item.airing_id, sage_time(item, position_ms))

    def sage_unwatch(self, item: Item) -> None:
        """"Mark unwatched" in SageTV's UI: ClearWatched."""
        assert item.airing_id is not None
        self.world.sage.clear_watched(item.airing_id)


# -- what each side shows, classified with the item's bounds ---------------------------------

@dataclass(frozen=True)
class State:
    """NONE, WATCHED or PROGRESS(position); equality of PROGRESS is within 2 s."""

    kind: str
    position_ms: int = 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, State) or self.kind != other.kind:
            return False
        return self.kind != "PROGRESS" or abs(self.position_ms - other.position_ms) < TOLERANCE_MS

    def __hash__(self) -> int:
        return hash(self.kind)

    def __repr__(self) -> str:
        if self.kind == "PROGRESS":
            return f"PROGRESS({self.position_ms / MIN:.2f} min)"
        return self.kind


NONE, WATCHED = State("NONE"), State("WATCHED")


def progress(position_ms: int) -> State:
    return State("PROGRESS", position_ms)


@dataclass(frozen=True)
class Bounds:
    start_ms: int
    done_ms: int


def bounds(world: World, item: Item, *, ignore_ms: int = 60 * SEC,
           plex_played: float = 0.9) -> Bounds:
    """§1.2 for a one-segment recording whose ShowDuration is its AiringDuration."""
    airing = world.sage.airing_json(item.airing_id)
    lead = max(0, airing["AiringStartTime"] - item.file_start_ms)
    length = airing["AiringDuration"]
    margin = 10 * MIN if item.kind == "movie" else 5 * MIN
    sage_done = lead + max(length - margin, int(0.66 * length) + 1)
    duration = item.duration_ms
    return Bounds(max(ignore_ms, lead + 5 * SEC),
                  int(min(0.95 * duration, plex_played * duration, sage_done)))


def classify(position_ms: int, flag: bool, b: Bounds) -> State:
    if b.start_ms <= position_ms < b.done_ms:
        return progress(position_ms)
    if position_ms >= b.done_ms or flag:
        return WATCHED
    return NONE


def sage_state(world: World, item: Item, b: Bounds | None = None) -> State:
    if world.sage_watched(item):
        return WATCHED
    return classify(world.sage_position_ms(item), False, b or bounds(world, item))


def plex_state(world: World, item: Item, b: Bounds | None = None,
               rating_key: int | None = None) -> State:
    plex = world.plex.item(rating_key or item.rating_key)
    return classify(plex.view_offset_ms, plex.view_count > 0, b or bounds(world, item))
