"""What keeps a big run fast, against the fakes: the streamed Plex listing (every video
once, whatever the chunking, a cut-off reply resumed, plexapi's leniency kept), the SageTV
requests of split recordings, the write pool kept busy when few items need writes, and
the batched report output.

Speed itself is measured by bench/bench_sync.py, never asserted here.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import sageplex_sync
from tests.fakes.fake_http import Request, Response
from tests.fakes.world import DAY, HOUR, MIN, PLEX_TOKEN, World, at, none, watched


def declare_library(world: World, episodes: int = 24, movies: int = 5) -> list[int]:
    """A show of many episodes and a few movies, some out of sync; their Plex media ids."""
    keys = []
    for number in range(episodes):
        plex = watched(ago=DAY) if number % 5 == 0 else none()
        keys.append(world.episode("Long Show", 1 + number // 10, 1 + number % 10,
                                  f"Episode {number}", sage=none(), plex=plex).rating_key)
    for number in range(movies):
        sage = at(20 * MIN, ago=HOUR) if number % 2 else none()
        keys.append(world.movie(f"Film {number}", year=1990 + number, sage=sage,
                                plex=none()).rating_key)
    return keys


def listed(out: str) -> list[int]:
    """The media ids of the report's item lines, in order."""
    return [int(line.split()[0]) for line in out.splitlines()
            if line[:1] == " " and line.split()[0].isdigit()]


@pytest.mark.parametrize("chunk", [1, 97, 4096])
def test_every_video_is_listed_once_whatever_the_chunks(world: World, start: Any,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        chunk: int) -> None:
    keys = declare_library(world)
    monkeypatch.setattr(sageplex_sync, "PLEX_STREAM_CHUNK", chunk)
    env = start()

    r = env.run("all")

    assert r.code == 0, r.err
    assert sorted(listed(r.out)) == sorted(keys)
    assert f"Total: {len(keys)} videos" in r.total
    # each with its file, even when its Part came in a later chunk than its Video
    assert "not in SageTV" not in r.total and "out-of-sync" in r.total
    # one listing request per section, whatever the number of items
    assert len(env.plex.requests(function="section_all")) == 2


def test_a_listing_cut_off_half_way_is_read_again_without_repeating_items(
        world: World, start: Any) -> None:
    keys = declare_library(world, episodes=40)
    env = start()
    env.plex.add_fault(function="section_all", truncate=True, times=1)

    r = env.run("all", "-s")

    assert r.code == 0, r.err
    assert sorted(listed(r.out)) == sorted(keys)  # each once: none lost, none twice
    assert len(env.plex.requests(function="section_all")) == 3  # the cut-off one again


def test_control_characters_in_a_title_are_dropped_as_plexapi_does(world: World,
                                                                    start: Any) -> None:
    item = world.episode("Bell\x07Show", 1, 1, "Alarm\x01", sage=watched(ago=DAY), plex=none(),
                         file_name="BellShow-Alarm.mpg")
    env = start()

    r = env.run("all", "-s")

    assert r.code == 0, r.err
    line = r.line_for(item.rating_key)
    assert "BellShow - s01e01 - Alarm  [updated]" in line
    assert env.world.plex.item(item.rating_key).view_count == 1


def test_bytes_that_are_not_utf8_become_replacement_characters(world: World,
                                                               start: Any) -> None:
    world.movie("Heat", sage=none(), plex=none())
    env = start()
    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<MediaContainer size="1" totalSize="1">'
            b'<Video ratingKey="4321" type="movie" title="Caf\xe9 \xff" duration="60000">'
            b'<Media><Part file="/mnt/x/cafe.mpg"/></Media></Video></MediaContainer>')
    env.plex.add_fault(function="section_all", body=body, content_type="text/xml;charset=utf-8")

    r = env.run("all")

    assert r.code == 0, r.err
    assert "Caf\ufffd \ufffd" in r.line_for(4321)


def test_an_empty_listing_reply_is_a_section_without_videos(world: World, start: Any) -> None:
    world.movie("Heat", sage=watched(ago=DAY), plex=none())
    env = start()
    env.plex.add_fault(function="section_all", body=b"")

    r = env.run("all")

    assert r.code == 0, r.err
    # no Plex video; the SageTV recording is counted as one no Plex library holds
    assert r.total == "Total: 0 videos; 1 SageTV recording not in Plex."


def test_the_listing_sends_plexapis_headers_and_the_token_only_in_a_header(
        world: World, start: Any) -> None:
    world.movie("Heat")
    env = start()

    env.run("all")

    for request in env.plex.requests(function="section_all"):
        assert request.header("X-Plex-Token") == PLEX_TOKEN
        assert request.header("X-Plex-Client-Identifier")
        assert request.header("X-Plex-Container-Size") == str(sageplex_sync.PLEX_PAGE_SIZE)
        assert "X-Plex-Token" not in request.query


def test_split_recordings_cost_segment_requests_only_with_a_position(world: World,
                                                                      start: Any) -> None:
    world.episode("Split", 1, 1, "Unseen", sage=none(), plex=none(), segments=2)
    world.episode("Split", 1, 2, "Seen", sage=watched(ago=DAY), plex=watched(ago=DAY),
                  segments=2)
    world.episode("Split", 1, 3, "Plex only", sage=none(), plex=watched(ago=DAY), segments=2)
    halfway = world.episode("Split", 1, 4, "Half", sage=at(20 * MIN, ago=HOUR),
                            plex=at(20 * MIN, ago=HOUR), segments=2, duration_ms=60 * MIN)
    env = start()

    r = env.run("all")

    assert r.code == 0, r.err
    assert "[OK]" in r.line_for(halfway.rating_key)  # its position was placed on the segments
    segment_calls = [q.function for q in env.sage.requests()
                     if q.function in ("GetStartForSegment", "GetEndForSegment")]
    # the one with a SageTV position and the one whose sides differ: 2 x (2 segments x 2 calls)
    assert len(segment_calls) == 8
    assert len(env.sage.requests(function="GetMediaFiles")) == 1

    env.clear_logs()
    r = env.run("all", "-s")  # the SageTV write needs the segments of "Plex only"

    assert r.code == 0, r.err
    assert "1 updated" in r.total
    assert len([q for q in env.sage.requests()
                if q.function in ("GetStartForSegment", "GetEndForSegment")]) == 8


class ConcurrentWrites:
    """Wraps a fake app: each write takes a while, and the most writes seen at once is kept."""

    def __init__(self, app: Any, seconds: float) -> None:
        self.app = app
        self.seconds = seconds
        self.now = self.most = 0
        self.lock = threading.Lock()

    def function_of(self, request: Request) -> str | None:
        return self.app.function_of(request)

    def handle(self, request: Request) -> Response:
        if self.app.function_of(request) not in self.app.WRITE_FUNCTIONS:
            return self.app.handle(request)
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(self.seconds)  # a server committing the write
            return self.app.handle(request)
        finally:
            with self.lock:
                self.now -= 1


def test_writes_overlap_when_few_items_need_them(world: World, start: Any) -> None:
    """One item in twenty out of sync (a big library's first sync): the writes still go
    out through the pool side by side, not one at a time behind the items in sync."""
    for number in range(100):
        plex = watched(ago=DAY) if number % 20 == 3 else none()
        world.episode("Sparse", 1, number + 1, f"Episode {number}", sage=none(), plex=plex)
    env = start()
    probe = ConcurrentWrites(env.sage.app, seconds=0.05)
    env.sage.app = probe

    r = env.run("all", "-s")

    assert r.code == 0, r.err
    assert "5 updated" in r.total
    assert probe.most > 1


def js_lookup(base_url: str, name: str) -> dict:
    """The original tool's one request per Plex item."""
    import requests

    reply = requests.get(f"{base_url}/sagex/api", auth=("sage", "pw"), timeout=5,
                         params={"c": "plex:GetMediaFileForName", "1": name, "encoder": "json"})
    return reply.json()


def test_the_original_tools_js_service_scans_every_file_when_enabled() -> None:
    """plex:GetMediaFileForName (the sagex reference §5), opt-in: the first media file whose
    relative path is the name or one of whose segment paths contains it, in full."""
    from tests.fakes.fake_sagex import FakeSage, add_example_library, serve_sage

    sage = FakeSage("sage", "pw", plex_js_service=True)
    files = add_example_library(sage, base_ms=1_700_000_000_000, fillers=3)
    with serve_sage(sage) as server:
        found = js_lookup(server.base_url, "SplitShow-Restarted-4-1.mpg")  # a 2nd segment
        assert found["MediaFile"]["MediaFileID"] == files["two_segment"].media_file_id
        assert "MediaFileMetadataProperties" in found["MediaFile"]  # unfiltered, as served
        found = js_lookup(server.base_url, "Holiday Video.mkv")  # imported: relative path
        assert found["MediaFile"]["MediaFileID"] == files["imported"].media_file_id
        found = js_lookup(server.base_url, "Filler-Episode")  # a substring: the first file
        assert found["MediaFile"]["MediaFileID"] == files["filler_0"].media_file_id
        assert js_lookup(server.base_url, "No Such File.mpg") == {"Result": False}
    plain = FakeSage("sage", "pw")  # without the switch the service is not installed
    with serve_sage(plain) as server:
        assert "Missing Service File" in js_lookup(server.base_url, "x.mpg")["error"]


def test_fake_servers_count_what_serving_cost(world: World, start: Any) -> None:
    world.movie("Heat", sage=watched(ago=DAY), plex=none())
    env = start()
    env.plex.reset_stats()

    env.run("all")

    # A request is counted once its reply is written, which may end just after the client
    # has read the last byte: wait for the last one.
    deadline = time.monotonic() + 5
    while env.plex.stats().requests < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = env.plex.stats()
    assert stats.requests == len(env.plex.requests()) == 5  # with /:/prefs
    assert stats.bytes_sent > 0
    assert 0 < stats.app_s <= stats.serve_s
    env.plex.reset_stats()
    assert env.plex.stats().requests == 0
