"""Robustness: malformed records, non-ASCII ids, repeated runs in one process, Ctrl-C and
SIGTERM, large-library behaviour of the listings, and the write concurrency of the config.

Every case asserts on the exit code, the output and what the fake servers hold afterwards.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3.util.connection

import sageplex_sync
from tests.conftest import PROXY_VARIABLES, Env, Result, assert_no_secrets
from tests.fakes.fake_http import Request, Response
from tests.fakes.world import (
    DAY,
    HOUR,
    MIN,
    PLEX_TOKEN,
    SAGE_PASSWORD,
    SAGE_USER,
    Item,
    World,
    at,
    none,
    watched,
)

MAIN = Path(__file__).resolve().parent.parent
JSON_TYPE = "application/json;charset=UTF-8"
XML_TYPE = "text/xml;charset=utf-8"


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sageplex_sync, "RETRY_BACKOFF_S", 0.02)


def assert_clean(r: Result) -> None:
    for text in (r.out, r.err, r.log):
        assert "Traceback" not in text
    assert_no_secrets(r.out, r.err, r.log)


def one_error_line(r: Result, *says: str) -> str:
    lines = r.err.splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("sageplex-sync: error: "), r.err
    for words in says:
        assert words in lines[0], lines[0]
    return lines[0]


def wait_for(condition: Callable[[], Any], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# -- 1. malformed records: skipped and reported, the rest syncs, exit 1 -------------------------

def sage_listing(env: Env) -> dict:
    """The fake's real reply to the tool's listing request."""
    reply = requests.get(f"{env.sage.base_url}/sagex/api", auth=(SAGE_USER, SAGE_PASSWORD),
                         params={"c": "GetMediaFiles", "1": "TV", "encoder": "json",
                                 "start": 0, "size": sageplex_sync.SAGEX_PAGE_SIZE,
                                 "filter": "|".join(sageplex_sync.SAGE_FIELDS)}, timeout=5)
    assert reply.status_code == 200
    env.sage.clear_log()
    return reply.json()


def plex_listing(env: Env, section: int) -> str:
    reply = requests.get(f"{env.plex.base_url}/library/sections/{section}/all",
                         params={"type": 4}, headers={"X-Plex-Token": PLEX_TOKEN}, timeout=5)
    assert reply.status_code == 200
    env.plex.clear_log()
    return reply.text


def edit_video(xml: str, rating_key: int, attribute: str, value: str) -> str:
    """The listing with one attribute of one Video element set to ``value``."""
    def edit(tag: re.Match) -> str:
        text = tag.group(0)
        assert f' {attribute}="' in text, text
        return re.sub(rf' {attribute}="[^"]*"', f' {attribute}="{value}"', text)
    edited, count = re.subn(rf'<Video ratingKey="{rating_key}"[^>]*>', edit, xml)
    assert count == 1
    return edited


def declare_three(world: World) -> tuple[Item, Item, Item]:
    """The victim and another item that need a SageTV write, and one that needs Plex's."""
    victim = world.episode("Castle", 1, 1, "Flowers for Your Grave", sage=none(),
                           plex=watched(ago=HOUR))
    sage_other = world.episode("Bones", 1, 1, "Pilot", sage=none(), plex=watched(ago=HOUR))
    plex_other = world.movie("Heat", sage=watched(ago=DAY), plex=none())
    return victim, sage_other, plex_other


def assert_others_synced(env: Env, world: World, r: Result, sage_other: Item,
                         plex_other: Item) -> None:
    assert "[updated]" in r.line_for(sage_other.rating_key), r.out
    assert "[updated]" in r.line_for(plex_other.rating_key), r.out
    assert world.sage_watched(sage_other)
    assert world.plex_item(plex_other).view_count == 1


SAGE_RECORD_EDITS: dict[str, tuple[Callable[[list, int], None], str]] = {
    "null-record": (lambda records, mf: records.insert(1, None), ""),
    "media-file-without-airing": (
        lambda records, mf: next(r for r in records if r["MediaFileID"] == mf).pop("Airing"),
        "has no airing"),
    "airing-id-zero": (
        lambda records, mf: next(r for r in records if r["MediaFileID"] == mf)["Airing"].update(
            AiringID=0),
        "has no airing"),
    "file-start-time-a-string": (
        lambda records, mf: next(r for r in records if r["MediaFileID"] == mf).update(
            FileStartTime="1790020800005"),
        "FileStartTime is \"1790020800005\", not a number"),
}


@pytest.mark.parametrize("case", list(SAGE_RECORD_EDITS), ids=list(SAGE_RECORD_EDITS))
def test_a_malformed_sagetv_record_is_skipped_and_reported_while_the_rest_syncs(
        world: World, start: Any, case: str) -> None:
    victim, sage_other, plex_other = declare_three(world)
    env: Env = start()
    listing = sage_listing(env)
    edit, says = SAGE_RECORD_EDITS[case]
    edit(listing["Result"], victim.media_file_id)
    env.sage.add_fault(function="GetMediaFiles", body=json.dumps(listing).encode(),
                       content_type=JSON_TYPE, times=1)

    r = env.run("all", "-s")

    assert r.code == 1, r.out + r.err
    # the report says what was skipped; why the exit code is 1 is said on stderr, once
    assert len(r.err.splitlines()) == 1 and "1 SageTV record(s) could not be read" in r.err
    assert "1 SageTV record(s) could not be read (see the log)." in r.out
    assert "SageTV record skipped" in r.log
    assert_others_synced(env, world, r, sage_other, plex_other)
    if says:  # the victim's record was the broken one: reported, and nothing written
        line = r.line_for(victim.rating_key)
        assert "[skipped]" in line and says in line, line
        assert r.under("Unreadable (1):") == [victim.rating_key] and "1 unreadable" in r.total
        assert victim.airing_id not in env.written_airings()
        assert victim.rating_key not in env.written_rating_keys()
        assert not world.sage_watched(victim)
    else:  # a null beside the records: every real item synced
        assert "[updated]" in r.line_for(victim.rating_key)
        assert world.sage_watched(victim)
    assert_clean(r)


def test_a_plex_episode_whose_view_count_is_not_a_number_is_skipped_while_the_rest_syncs(
        world: World, start: Any) -> None:
    victim, sage_other, plex_other = declare_three(world)
    env: Env = start()
    xml = edit_video(plex_listing(env, world.tv_section), victim.rating_key, "viewCount", "abc")
    env.plex.add_fault(path=f"/library/sections/{world.tv_section}/all", body=xml.encode(),
                       content_type=XML_TYPE, times=1)

    r = env.run("all", "-s")

    assert r.code == 1, r.out + r.err
    assert r.err == "sageplex-sync: error: 1 Plex item(s) could not be read; see the report " \
        "above\n"
    line = r.line_for(victim.rating_key)
    assert "[skipped]" in line and "viewCount is 'abc', not a number" in line, line
    assert "1 unreadable" in r.total
    assert_others_synced(env, world, r, sage_other, plex_other)
    assert victim.airing_id not in env.written_airings()
    assert victim.rating_key not in env.written_rating_keys()
    assert not world.sage_watched(victim)
    assert_clean(r)


def test_a_plex_episode_with_an_empty_index_syncs_normally(world: World, start: Any) -> None:
    victim, sage_other, plex_other = declare_three(world)
    env: Env = start()
    xml = edit_video(plex_listing(env, world.tv_section), victim.rating_key, "index", "")
    env.plex.add_fault(path=f"/library/sections/{world.tv_section}/all", body=xml.encode(),
                       content_type=XML_TYPE, times=1)

    r = env.run("all", "-s")

    assert r.code == 0, r.out + r.err
    assert r.err == ""
    assert "[updated]" in r.line_for(victim.rating_key)
    assert world.sage_watched(victim)
    assert_others_synced(env, world, r, sage_other, plex_other)
    assert "unreadable" not in r.total
    assert_clean(r)


@pytest.mark.parametrize("server, fault, says", [
    ("sage", {"function": "GetMediaFiles", "body": b"not json at all"}, "not JSON"),
    ("sage", {"function": "GetMediaFiles", "body": b'{"Result": [1, 2'}, "not JSON"),
    ("plex", {"function": "section_all", "body": b"not xml at all"}, "not valid XML"),
    ("plex", {"function": "section_all", "body": b"<MediaContainer><Video "}, "not valid XML"),
], ids=["sage-not-json", "sage-cut-json", "plex-not-xml", "plex-broken-xml"])
def test_a_listing_that_cannot_be_parsed_ends_the_run_before_any_write(
        world: World, start: Any, server: str, fault: dict, says: str) -> None:
    victim, sage_other, plex_other = declare_three(world)
    env: Env = start()
    (env.sage if server == "sage" else env.plex).add_fault(**fault)

    r = env.run("all", "-s")

    assert r.code == 1, r.out + r.err
    one_error_line(r, "SageTV" if server == "sage" else "Plex", says)
    assert "Total:" not in r.out
    assert env.writes() == []
    assert not world.sage_watched(sage_other) and world.plex_item(plex_other).view_count == 0
    assert_clean(r)


# -- 2. ids are ASCII digits --------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["-m", "²"], ["-m", "１００３"], ["-m", "1002", "٣"],
                                  ["-m", "-s", "²"], ["--undo", "²"], ["--undo", "１"],
                                  ["--why", "²"]],
                         ids=["superscript", "fullwidth", "arabic-indic", "sync-superscript",
                              "undo-superscript", "undo-fullwidth", "why-superscript"])
def test_ids_that_are_not_ascii_digits_are_usage_errors(world: World, start: Any,
                                                        argv: list[str]) -> None:
    world.episode("Castle", 1, 1, "Flowers for Your Grave", sage=none(), plex=watched())
    env: Env = start()

    r = env.run(*argv)

    assert r.code == 2, r.out + r.err
    one_error_line(r)
    assert r.out == ""
    assert env.sage.requests() == [] and env.plex.requests() == []
    assert_clean(r)


# -- 3. two main() calls in one process leave nothing behind ------------------------------------

LOGGERS = ("sageplex_sync", "plexapi", "urllib3")


def logger_state() -> list[tuple[str, list[logging.Handler], int, bool]]:
    return [(name, list(logging.getLogger(name).handlers), logging.getLogger(name).level,
             logging.getLogger(name).propagate) for name in LOGGERS]


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_two_runs_in_one_process_leave_no_handler_level_or_signal_handler_behind(
        world: World, start: Any, verbose: bool) -> None:
    world.episode("Castle", 1, 1, "Flowers for Your Grave", sage=none(), plex=watched())
    world.movie("Heat", sage=watched(), plex=none())
    env: Env = start()
    # plexapi sets its own logger up when first imported (a NullHandler, level INFO): that
    # is the library's, once per process, not something a run leaves behind
    importlib.import_module("plexapi.server")
    loggers_before = logger_state()
    root_before = list(logging.getLogger().handlers)
    signals_before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    extra = ["-v"] if verbose else []

    first = env.run("all", "-s", *extra)
    assert logger_state() == loggers_before
    second = env.run("all", "-s", *extra)

    assert first.code == 0 and second.code == 0, first.err + second.err
    assert "2 updated" in first.total and "2 in-sync" in second.total
    if verbose:
        assert "sagex GetMediaFiles" in second.err  # -v did reach stderr in the run
    assert logger_state() == loggers_before
    assert list(logging.getLogger().handlers) == root_before
    for sig, handler in signals_before.items():
        assert signal.getsignal(sig) is handler
    assert_clean(first)
    assert_clean(second)


def test_a_second_run_knows_only_its_own_secrets(world: World, start: Any,
                                                 tmp_path: Path) -> None:
    world.episode("Castle", 1, 1, "Flowers for Your Grave", sage=none(), plex=watched())
    env: Env = start()
    first = env.run("all", "-s")
    assert first.code == 0, first.err

    other_password = "zz-other-password-42"
    other = json.loads(env.config_path.read_text(encoding="utf-8"))
    other["sagex"]["password"] = other_password
    other_path = tmp_path / "other" / "sageplex_cfg.json"
    other_path.parent.mkdir()
    other_path.write_text(json.dumps(other), encoding="utf-8")
    # SageTV's error quotes the password of this run, and that of the run before
    error = {"sagexVersion": "9.2.8.1",
             "error": f"bad login {other_password} (was {SAGE_PASSWORD})"}
    env.sage.add_fault(function="GetMediaFiles", body=json.dumps(error).encode(),
                       content_type=JSON_TYPE)

    second = env.run("all", "-s", "-c", str(other_path))

    assert second.code == 1
    line = one_error_line(second, "reported an error")
    assert other_password not in second.out + second.err + second.log
    assert f"bad login <hidden> (was {SAGE_PASSWORD})" in line, line
    # no secret store outlives a run: nothing at module level holds one
    stores = [name for name, value in vars(sageplex_sync).items()
              if isinstance(value, sageplex_sync.Secrets)]
    assert stores == []


# -- 4. Ctrl-C and SIGTERM in the middle of the writes ------------------------------------------

def sage_state(world: World, item: Item) -> tuple[bool, int]:
    airing = world.sage.airing_json(item.airing_id)
    return bool(airing.get("IsWatched")), int(airing.get("WatchedEndTime") or 0)


@pytest.mark.parametrize("signals", [(signal.SIGINT,), (signal.SIGINT, signal.SIGINT),
                                     (signal.SIGTERM,)],
                         ids=["sigint-once", "sigint-twice", "sigterm-once"])
def test_a_signal_during_the_writes_finishes_those_in_flight_and_prints_the_summary(
        world: World, start: Any, tmp_path: Path, signals: tuple[int, ...]) -> None:
    marks = [world.episode("Bones", 3, n, f"Mark {n}", sage=none(), plex=watched(ago=HOUR))
             for n in range(1, 7)]
    rewatches = [world.episode("Bones", 2, n, f"Rewatch {n}", sage=watched(ago=DAY),
                               plex=at(10 * MIN + n * MIN, ago=HOUR, view_count=1))
                 for n in range(1, 7)]
    env: Env = start()
    env.sage.write_delay_s = 0.5
    before = {item.title: sage_state(world, item) for item in marks + rewatches}
    environ = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    environ.update(SAGEPLEX_CFG=str(env.config_path), SAGEPLEX_LOG=str(env.log_path),
                   PLEXAPI_CONFIG_PATH=os.environ["PLEXAPI_CONFIG_PATH"], PYTHONUNBUFFERED="1")
    state = tmp_path / "state" / "sageplex_state.sqlite"

    began = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(MAIN / "sageplex_sync.py"), "all", "-s", "--state", str(state)],
        cwd=tmp_path, env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: env.sage_writes(), timeout_s=20)
        for number, sig in enumerate(signals):
            if number:
                time.sleep(0.1)
            process.send_signal(sig)
        # the writes in flight when the signal came have reached the fake by now; the next
        # slot frees only after a write's 0.5 s, so anything later is a write started anew
        time.sleep(0.25)
        in_flight = {q.param("1") for q in env.sage_writes()}
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    time.sleep(0.6)  # a write still in the fake lands (none should be left)

    assert process.returncode == 130, out + err
    assert "Interrupted: finishing the writes already started" in err
    assert "Traceback" not in out + err
    assert "Interrupted: the summary covers the items done so far." in out
    total = next(ln for ln in out.splitlines() if ln.startswith("Total:"))
    assert "12 videos" in total
    assert_no_secrets(out, err, env.log_path.read_text(encoding="utf-8"))
    for item in marks:  # as before, or watched
        assert sage_state(world, item) == before[item.title] or world.sage_watched(item)
    for item in rewatches:  # as before, or un-watched at Plex's position: never half-way
        watched_now, end = sage_state(world, item)
        plex_position = world.plex_item(item).view_offset_ms
        written = not watched_now and abs(end - item.file_start_ms - plex_position) < 2000
        assert (watched_now, end) == before[item.title] or written, \
            f"{item.title} is half-written: {world.sage.airing_json(item.airing_id)}"
    written_items = {q.param("1") for q in env.sage_writes()}
    assert len(in_flight) <= sageplex_sync.DEFAULT_SAGE_WRITE_WORKERS
    assert written_items == in_flight, (
        f"items written after the signal, though nothing new was to start: "
        f"{sorted(written_items - in_flight)}\n{out}")
    assert "[skipped]" in out and "interrupted before writing" in out
    updated = sum(1 for ln in out.splitlines() if "[updated]" in ln)
    assert updated == len(written_items) and f"{updated} updated" in total
    assert env.plex_writes() == []
    assert time.monotonic() - began < 25


# -- 5. large libraries -------------------------------------------------------------------------

def declare_two(world: World) -> tuple[Item, Item]:
    return (world.episode("Castle", 1, 1, "Flowers for Your Grave", sage=none(),
                          plex=watched(ago=HOUR)),
            world.movie("Heat", sage=watched(ago=DAY), plex=none()))


def test_a_slow_listing_is_waited_for_with_the_listing_timeout_not_the_request_timeout(
        world: World, start: Any) -> None:
    sage_item, plex_item = declare_two(world)
    world.sage.list_delay_s = 1.5
    env: Env = start(sagex__timeout=0.5, sagex__list_timeout=5)

    r = env.run("all", "-s")

    assert r.code == 0, r.out + r.err
    assert "2 updated" in r.total
    assert world.sage_watched(sage_item) and world.plex_item(plex_item).view_count == 1
    assert world.sage.listing_calls == 1
    assert world.sage.listings_in_flight_max == 1  # never asked twice at once
    assert_clean(r)


def test_a_listing_past_the_listing_timeout_is_asked_once_and_names_the_key(
        world: World, start: Any) -> None:
    declare_two(world)
    world.sage.list_delay_s = 1.5
    env: Env = start(sagex__timeout=5, sagex__list_timeout=0.5)

    r = env.run("all", "-s")

    assert r.code == 1, r.out + r.err
    one_error_line(r, "SageTV", "did not answer within 0.5 s", "sagex.list_timeout")
    assert env.writes() == []
    wait_for(lambda: world.sage.listings_in_flight == 0)
    assert world.sage.listing_calls == 1  # not asked again while the server builds it
    assert world.sage.listings_in_flight_max == 1
    assert_clean(r)


def test_a_listing_whose_connection_is_refused_once_is_asked_again(
        world: World, start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sage_item, plex_item = declare_two(world)
    env: Env = start()
    real = urllib3.util.connection.create_connection
    refused: list[tuple] = []

    def refuse_sagetv_once(address: tuple, *args: Any, **kwargs: Any) -> socket.socket:
        if address[1] == env.sage.port and not refused:
            refused.append(address)
            raise ConnectionRefusedError(111, "Connection refused")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", refuse_sagetv_once)

    r = env.run("all", "-s")

    assert refused, "no SageTV connection was refused"
    assert r.code == 0, r.out + r.err
    # the refused connection was the listing's: it is SageTV's first request
    assert env.sage.requests()[0].function == "GetMediaFiles"
    assert world.sage_watched(sage_item) and world.plex_item(plex_item).view_count == 1
    assert world.sage.listing_calls == 1
    assert_clean(r)


class RecordingDict(dict):
    """A dict that remembers every key read from it (get, [], in)."""

    def __init__(self, data: dict, read: set[str]) -> None:
        super().__init__(data)
        self.read = read

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def keys_read(record: dict) -> set[str]:
    """The sagex filter names of the fields sage_item_from_json reads from ``record``:
    the nested Airing is asked for as MediaFileAiring, the nested Show as Show."""
    top: set[str] = set()
    airing_keys: set[str] = set()
    show_keys: set[str] = set()
    airing = dict(record["Airing"])
    airing["Show"] = RecordingDict(airing["Show"], show_keys)
    wrapped = RecordingDict({**record, "Airing": RecordingDict(airing, airing_keys)}, top)
    sageplex_sync.sage_item_from_json(wrapped)
    names = (top - {"Airing"}) | airing_keys | show_keys
    if "Airing" in top:
        names.add("MediaFileAiring")
    return names


def test_the_sagex_fields_asked_for_are_exactly_those_the_converter_reads(
        world: World, start: Any) -> None:
    episode, movie = declare_two(world)
    env: Env = start()
    reply = requests.get(f"{env.sage.base_url}/sagex/api", auth=(SAGE_USER, SAGE_PASSWORD),
                         params={"c": "GetMediaFiles", "1": "TV", "encoder": "json"}, timeout=5)
    records = reply.json()["Result"]  # unfiltered: every field sagex has
    assert len(records) == 2
    read = set().union(*(keys_read(record) for record in records))
    assert read == set(sageplex_sync.SAGE_FIELDS)
    assert len(sageplex_sync.SAGE_FIELDS) == len(set(sageplex_sync.SAGE_FIELDS))
    env.sage.clear_log()

    r = env.run("all", "-s")

    assert r.code == 0, r.out + r.err
    listings = env.sage.requests(function="GetMediaFiles")
    assert [q.param("filter") for q in listings] == ["|".join(sageplex_sync.SAGE_FIELDS)]
    for q in env.sage.requests(function="GetMediaFileForID"):  # the read-backs too
        assert q.param("filter") == "|".join(sageplex_sync.SAGE_FIELDS)
    assert_clean(r)


@pytest.mark.parametrize("count", [1, 1000])
def test_a_library_of_any_size_costs_one_listing_request_on_each_server(
        world: World, start: Any, count: int) -> None:
    for n in range(count):
        world.episode(f"Show {n // 100}", 1 + n % 100 // 25, 1 + n % 25, f"Episode {n}")
    world.movie("Heat")
    env: Env = start()

    r = env.run("all")

    assert r.code == 0, r.out + r.err
    assert r.total.startswith(f"Total: {count + 1} video")
    assert len(env.sage.requests(function="GetMediaFiles")) == 1
    assert world.sage.listing_calls == 1
    for section in (world.tv_section, world.movie_section):
        assert len(env.plex.requests(path=f"/library/sections/{section}/all")) == 1
    assert env.writes() == []
    assert_clean(r)


# -- 6. write concurrency follows the config ----------------------------------------------------

def count_concurrent_writes(env: Env, world: World, delay_s: float) -> dict[str, int]:
    """Make each SageTV write take ``delay_s`` inside the app and count how many overlap."""
    seen = {"now": 0, "max": 0, "writes": 0}
    lock = threading.Lock()
    handle = world.sage.handle

    def counting(request: Request) -> Response:
        if request.function not in world.sage.WRITE_FUNCTIONS:
            return handle(request)
        with lock:
            seen["now"] += 1
            seen["writes"] += 1
            seen["max"] = max(seen["max"], seen["now"])
        try:
            time.sleep(delay_s)
            return handle(request)
        finally:
            with lock:
                seen["now"] -= 1

    world.sage.handle = counting  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("workers", [1, 3])
def test_sagetv_writes_overlap_no_more_than_the_configured_write_workers(
        world: World, start: Any, workers: int) -> None:
    items = [world.episode(f"Show {n}", 1, 1, f"Episode {n}", sage=none(), plex=watched())
             for n in range(6)]
    env: Env = start(sagex__write_workers=workers)
    seen = count_concurrent_writes(env, world, 0.2)

    r = env.run("all", "-s")

    assert r.code == 0, r.out + r.err
    assert "6 updated" in r.total
    assert all(world.sage_watched(item) for item in items)
    assert seen["writes"] == 6
    assert seen["max"] == workers
    assert_clean(r)


@pytest.mark.parametrize("key", ["sagex__write_workers", "plex__write_workers"])
@pytest.mark.parametrize("value", [0, 100, "4", 2.5, True])
def test_write_workers_out_of_range_or_quoted_is_a_one_line_config_error(
        world: World, start: Any, key: str, value: object) -> None:
    world.episode("Castle", 1, 1, "Flowers for Your Grave", sage=none(), plex=watched())
    env: Env = start(**{key: value})

    r = env.run("all", "-s")

    assert r.code == 1, r.out + r.err
    one_error_line(r, f"'{key.replace('__', '.')}' must be a number from 1 to 64",
                   json.dumps(value))
    assert env.sage.requests() == [] and env.plex.requests() == []
    assert_clean(r)
