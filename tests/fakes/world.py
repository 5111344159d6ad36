"""One world, two servers: declare items once, get a fake SageTV and a fake Plex that
agree about them.

    world = World()
    heat = world.movie("Heat", sage=watched(ago=DAY), plex=none())
    pilot = world.episode("Castle", 1, 1, "Pilot", sage=at(12 * MIN), plex=watched())
    with world.running() as servers:          # both fakes on free ports
        servers.write_config(path)            # sageplex_cfg.json in the original schema

Each item is one recording: SageTV sees it as a MediaFile with an airing (file names in
Windows form, as a SageTV server on Windows reports them) and Plex as a movie or episode
whose parts are the same files seen through a share. Watch states are given per side
(``none()``, ``watched(...)``, ``at(position, ...)``) with wall-clock times relative to
the world's clock.

The world's clock is the real one (plus an offset: ``world.clock.advance(ms)`` moves it
forward), so the tool sees servers whose clocks agree with its own unless a skew says
otherwise, and time passes during a test: compare stamps by their order, and advance the
clock where a test needs "a newer viewing". ``World(now_ms=..., frozen=True)`` fixes the date.

Each fake has its own clock: the world's plus a skew (``World(sage_skew_ms=...,
plex_skew_ms=...)``, or the ``sage_skew_ms``/``plex_skew_ms`` attributes later), as two
real servers' clocks disagree. Every stamp a server makes (Plex ``lastViewedAt``, SageTV
``RealWatchedEndTime``, ...) and its replies' ``Date`` header come from its own clock, and
so do the stamps of the watch states declared here (``ago`` is real time before "now",
written down by that server). ``world.clock.advance(ms)`` moves both.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.fakes.fake_http import FakeServer
from tests.fakes.fake_plex import FakePlex, PlexItem
from tests.fakes.fake_sagex import FakeSage

SEC = 1_000
MIN = 60 * SEC
HOUR = 60 * MIN
DAY = 24 * HOUR
#: 2026-11-20 20:00 UTC: a fixed date for the rare test that needs one
#: (``World(now_ms=FIXED_NOW_MS, frozen=True)``); by default the world follows the real clock.
FIXED_NOW_MS = 1_795_204_800_000

SAGE_USER, SAGE_PASSWORD = "sage", "s3cret-sage-pw"
PLEX_TOKEN = "plexTOKEN-9f8e7d6c5b4a"
TV_SECTION, MOVIE_SECTION = "TV Shows", "Movies"


class Clock:
    """'Now' for both fakes: the real clock plus an offset, so time passes during a test as
    it does between two real servers' replies; ``advance(ms)`` moves it forward (a test that
    needs "later" says so). ``Clock(start_ms)`` starts it at a given date (still running);
    ``Clock(start_ms, frozen=True)`` stops it there, for the rare test that needs a fixed
    date to the millisecond (the tool then sees servers whose clocks are far from its own)."""

    def __init__(self, start_ms: int | None = None, *, frozen: bool = False) -> None:
        import time

        self._time = time.time
        real = int(time.time() * 1000)
        self._offset_ms = 0 if start_ms is None else start_ms - real
        self.frozen = frozen
        self._frozen_ms = real if start_ms is None else start_ms

    def ms(self) -> int:
        if self.frozen:
            return self._frozen_ms
        return int(self._time() * 1000) + self._offset_ms

    def s(self) -> float:
        return self.ms() / 1000

    def advance(self, ms: int) -> None:
        if self.frozen:
            self._frozen_ms += ms
        else:
            self._offset_ms += ms


@dataclass(frozen=True)
class Watch:
    """One side's watch state before the run."""

    watched: bool = False
    position_ms: int = 0
    ago_ms: int | None = None  # how long ago it was last watched (None: no time known)
    view_count: int = 0  # Plex only; 0 means 1 when watched


def none() -> Watch:
    return Watch()


def watched(ago: int | None = DAY, times: int = 1) -> Watch:
    return Watch(True, 0, ago, times)


def at(position_ms: int, ago: int | None = HOUR, view_count: int = 0) -> Watch:
    """In progress at a position (on Plex, ``view_count`` > 0 is a rewatch)."""
    return Watch(view_count > 0, position_ms, ago, view_count)


@dataclass
class Item:
    """What the world made for one declared item: ids on both sides."""

    title: str
    kind: str  # "movie" or "episode"
    file_names: list[str]
    duration_ms: int
    rating_key: int | None = None
    media_file_id: int | None = None
    airing_id: int | None = None
    show_external_id: str | None = None
    file_start_ms: int = 0
    segments: list[tuple[int, int]] = field(default_factory=list)


def _safe(text: str) -> str:
    return re.sub(r'[\\/:*?"<>|]', "", text).replace(" ", "")


class World:
    def __init__(self, *, now_ms: int | None = None, frozen: bool = False,
                 sage_options: dict | None = None, plex_options: dict | None = None,
                 sage_skew_ms: int = 0, plex_skew_ms: int = 0) -> None:
        self.clock = Clock(now_ms, frozen=frozen)
        self.sage_skew_ms = sage_skew_ms  # SageTV's clock minus the world's (may change later)
        self.plex_skew_ms = plex_skew_ms  # Plex's clock minus the world's
        self.sage = FakeSage(SAGE_USER, SAGE_PASSWORD, clock_ms=self.sage_clock_ms,
                             **(sage_options or {}))
        self.plex = FakePlex(PLEX_TOKEN, clock=self.plex_clock_s, **(plex_options or {}))
        self.sage_root = "D:\\SageTV\\TV"
        self.plex_roots = {"show": "/mnt/sagetv/tv", "movie": "/mnt/sagetv/movies"}
        self.tv_section = self.plex.add_section(TV_SECTION, "show", [self.plex_roots["show"]],
                                                agent="com.plexapp.agents.bmtagenttvshows",
                                                scanner="SageTV Scanner")
        self.movie_section = self.plex.add_section(MOVIE_SECTION, "movie",
                                                   [self.plex_roots["movie"]],
                                                   agent="com.plexapp.agents.imdb",
                                                   scanner="SageTV Movie Scanner")
        self.items: list[Item] = []
        self._next_airing = 3_490_000
        self._next_slot_ms = self.clock.ms() - 60 * DAY  # recordings are weeks old

    # -- the servers' clocks ----------------------------------------------------------------
    def sage_clock_ms(self) -> int:
        """SageTV's "now" (epoch ms): the world's clock plus ``sage_skew_ms``."""
        return self.clock.ms() + self.sage_skew_ms

    def plex_clock_s(self) -> float:
        """Plex's "now" (epoch s): the world's clock plus ``plex_skew_ms``."""
        return (self.clock.ms() + self.plex_skew_ms) / 1000

    # -- declaring items -------------------------------------------------------------------
    def movie(self, title: str, *, year: int = 1995, duration_ms: int = 2 * HOUR,
              sage: Watch | None = None, plex: Watch | None = None, **options) -> Item:
        return self._add("movie", title, duration_ms, sage or none(), plex or none(),
                         year=year, **options)

    def episode(self, show: str, season: int, episode: int, title: str, *,
                duration_ms: int = 30 * MIN, sage: Watch | None = None, plex: Watch | None = None,
                **options) -> Item:
        return self._add("episode", title, duration_ms, sage or none(), plex or none(),
                         show=show, season=season, episode=episode, **options)

    def _add(self, kind: str, title: str, duration_ms: int, sage: Watch, plex: Watch, *,
             show: str = "", season: int = 0, episode: int = 0, year: int = 1995,
             in_sage: bool = True, in_plex: bool = True, segments: int = 1,
             gap_ms: int = 2 * MIN, pad_start_ms: int = 0, pad_end_ms: int = 0,
             late_start_ms: int = 0, folder: str | None = None, is_tv: bool = True,
             show_external_id: str | None = None, file_name: str | None = None,
             plex_files: list[str] | None = None) -> Item:
        """One recording. ``segments`` > 1 splits it (with gaps) into several files that
        Plex stacks as parts of one item; ``pad_start_ms``/``late_start_ms`` move the file
        start before/after the airing; ``folder`` nests the Plex file (and SageTV's) in
        sub-folders; ``file_name`` forces a name (two items with one name are ambiguous)."""
        airing_id = self._next_airing
        self._next_airing += 7
        airing_start = self._next_slot_ms
        self._next_slot_ms += 3 * HOUR
        airing_end = airing_start + duration_ms
        label = f"{show}-{title}" if show else title
        base = file_name or f"{_safe(label)}-{airing_id}"
        # File timeline: padding before/after the airing, or a late start (the sagex reference §7.1)
        file_start = airing_start - pad_start_ms + late_start_ms + (5 if is_tv else 0)
        file_end = airing_end + pad_end_ms
        if not is_tv:
            file_start, file_end = airing_start, airing_end
        total = file_end - file_start
        seg_times: list[tuple[int, int]] = []
        if segments == 1:
            seg_times = [(file_start, file_end)]
        else:
            span = (total - gap_ms * (segments - 1)) // segments
            cursor = file_start
            for index in range(segments):
                end = file_end if index == segments - 1 else cursor + span
                seg_times.append((cursor, end))
                cursor = end + gap_ms
        names = [f"{base}-{i}.mpg" if not file_name else
                 (file_name if segments == 1 else f"{i}-{file_name}") for i in range(segments)]
        item = Item(label if kind == "episode" else title, kind, names,
                    sum(e - s for s, e in seg_times), file_start_ms=file_start,
                    segments=seg_times)
        sub = f"{folder}\\" if folder else ""
        if in_sage:
            media = self.sage.add_media_file(
                title=show or title,
                segments=[(f"{self.sage_root}\\{sub}{name}", start, end)
                          for name, (start, end) in zip(names, seg_times, strict=True)],
                airing_start_ms=airing_start, airing_end_ms=airing_end,
                schedule_start_ms=airing_start - pad_start_ms,
                schedule_end_ms=airing_end + pad_end_ms,
                is_tv=is_tv, show_external_id=show_external_id or
                (f"MV{airing_id:010d}" if kind == "movie" else f"EP{airing_id:010d}"),
                episode_title=title if kind == "episode" else "",
                season=season, episode=episode, is_movie=kind == "movie",
                airing_id=airing_id)
            item.media_file_id, item.airing_id = media.media_file_id, media.airing_id
            item.show_external_id = show_external_id or (
                f"MV{airing_id:010d}" if kind == "movie" else f"EP{airing_id:010d}")
            self._set_sage(item, sage, airing_start, airing_end)
        if in_plex:
            root = self.plex_roots["movie" if kind == "movie" else "show"]
            plex_sub = folder.replace("\\", "/") + "/" if folder else ""
            files = plex_files or [f"{root}/{plex_sub}{name}" for name in names]
            watch = dict(view_count=plex.view_count or (1 if plex.watched else 0),
                         view_offset_ms=plex.position_ms,
                         last_viewed_at_s=None if plex.ago_ms is None or
                         (not plex.watched and not plex.position_ms)
                         else (self.clock.ms() + self.plex_skew_ms - plex.ago_ms) // 1000)
            if kind == "movie":
                item.rating_key = self.plex.add_movie(self.movie_section, title, files,
                                                      item.duration_ms, year=year, **watch)
            else:
                item.rating_key = self.plex.add_episode(self.tv_section, show, season, episode,
                                                        title, files, item.duration_ms, **watch)
        self.items.append(item)
        return item

    def _set_sage(self, item: Item, sage: Watch, airing_start: int, airing_end: int) -> None:
        assert item.airing_id is not None
        now = self.sage_clock_ms()  # SageTV wrote the record with its own clock
        if sage.watched:
            if sage.ago_ms is None:
                self.sage.set_watched(item.airing_id)  # the "manual" path: no real times
                return
            seen_at = now - sage.ago_ms
            start = max(airing_start, item.file_start_ms)
            self.sage.set_watch_record(item.airing_id, start, airing_end,
                                       seen_at - (airing_end - start), seen_at)
            assert item.show_external_id is not None
            self.sage.set_show_watched(item.show_external_id, airing_start)
        elif sage.position_ms:
            seen_at = now - (sage.ago_ms or 0)
            end = sage_time(item, sage.position_ms)
            self.sage.set_watch_record(item.airing_id, max(airing_start, item.file_start_ms),
                                       end, seen_at - sage.position_ms, seen_at)

    # -- running ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self) -> Iterator[Servers]:
        with FakeServer(self.sage) as sage_server, FakeServer(self.plex) as plex_server:
            yield Servers(self, sage_server, plex_server)

    # -- reading state back (what end-to-end tests assert on) ------------------------------
    def sage_watched(self, item: Item) -> bool:
        """SageTV's IsWatched of the item's airing, as sagex serves it now."""
        assert item.airing_id is not None
        return bool(self.sage.airing_json(item.airing_id).get("IsWatched"))

    def sage_position_ms(self, item: Item) -> int:
        """SageTV's resume position as a file offset: WatchedEndTime mapped through the
        segments (for one segment: WatchedEndTime - FileStartTime); 0 without a record."""
        assert item.airing_id is not None
        end = int(self.sage.airing_json(item.airing_id).get("WatchedEndTime") or 0)
        if not end:
            return 0
        offset = 0
        for start, stop in item.segments:
            if end < start:
                return offset
            if end < stop:
                return offset + end - start
            offset += stop - start
        return offset

    def plex_item(self, item: Item) -> PlexItem:
        """The fake Plex's snapshot of the item (view_count, view_offset_ms, ...)."""
        assert item.rating_key is not None
        return self.plex.item(item.rating_key)


def sage_time(item: Item, position_ms: int) -> int:
    """A file position as SageTV's airing-timeline time (through the segments)."""
    offset = 0
    for start, end in item.segments:
        if position_ms < offset + end - start:
            return start + position_ms - offset
        offset += end - start
    return item.segments[-1][1]


@dataclass
class Servers:
    world: World
    sage: FakeServer
    plex: FakeServer

    def config(self, **overrides: object) -> dict:
        """A sageplex_cfg.json in the original schema (plus the scanner/agent sections the
        original file has, which the tool must ignore)."""
        data = {
            "sagex": {"host": "127.0.0.1", "port": self.sage.port, "user": SAGE_USER,
                      "password": SAGE_PASSWORD, "timeout": 5},
            "plex": {"host": "127.0.0.1", "port": self.plex.port, "token": PLEX_TOKEN,
                     "timeout": 5},
            "scanner": {"ext": [".mpg", ".ts", ".mkv"], "debug": True},
            "agent": {"locking": True},
        }
        for key, value in overrides.items():
            section, _, name = key.partition("__")
            if name:
                data[section][name] = value
            else:
                data[section] = value
        return data

    def write_config(self, path: Path, **overrides: object) -> Path:
        path.write_text(json.dumps(self.config(**overrides), indent=2), encoding="utf-8")
        return path


#: What a Plex server does with a write the references leave open: a position past the
#: played threshold (played, stored, ignored) and whether a scrobble clears the resume point.
#: End-to-end tests run under each (``plex_options`` of World).
PLEX_SWITCHES = [{"progress_past_threshold": past, "scrobble_clears_offset": clears}
                 for past in ("played", "offset", "ignore") for clears in (True, False)]
PLEX_SWITCH_IDS = [f"{o['progress_past_threshold']}-clears-{o['scrobble_clears_offset']}"
                   for o in PLEX_SWITCHES]
