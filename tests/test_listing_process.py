"""Plex's listing read in a child process (PlexClient.listing) while SageTV's is read in the
tool's own: the same items, the same errors and the same report as the listing read in the
tool's own process, and a run that ends (never hangs) whatever the child does.

In-process tests run with the fakes' threads going, where the tool itself never forks: the
``forked`` mode forces it (the child only talks HTTP to the fakes); one test runs the tool
as a real command, where it forks of its own accord.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

import sageplex_sync
from tests.conftest import Env
from tests.fakes.world import DAY, HOUR, MIN, PLEX_TOKEN, World, at, none, watched

TOOL = Path(sageplex_sync.__file__)
FORKED = "Plex's listing is read in process"
pytestmark = pytest.mark.skipif(not sageplex_sync.LISTING_PROCESS,
                                reason="the listing's process is for Linux only")


def declare_library(world: World) -> None:
    """Items of every kind the listing carries: watched, in progress, split, movies."""
    for number in range(12):
        sage = [none(), watched(ago=DAY), at(7 * MIN, ago=HOUR)][number % 3]
        plex = [none(), at(9 * MIN, ago=2 * HOUR), watched(ago=3 * DAY)][number % 3 - 1]
        world.episode("Show", 1 + number // 6, 1 + number % 6, f"Episode {number}", sage=sage,
                      plex=plex, **({"segments": 2} if number == 4 else {}))
    world.movie("Heat", year=1995, sage=watched(ago=DAY), plex=none())
    world.movie("Ronin", year=1998, sage=none(), plex=at(20 * MIN, ago=HOUR))


@pytest.fixture
def forked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sageplex_sync, "_listing_may_fork", lambda: True)


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sageplex_sync, "_listing_may_fork", lambda: False)


def run_both(env: Env, monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[Any, Any]:
    """The same command with the listing in a child process, then in the tool's own."""
    monkeypatch.setattr(sageplex_sync, "_listing_may_fork", lambda: True)
    child = env.run(*argv)
    assert FORKED in child.log
    env.log_path.unlink()
    monkeypatch.setattr(sageplex_sync, "_listing_may_fork", lambda: False)
    own = env.run(*argv)
    assert FORKED not in own.log
    return child, own


def undated(text: str) -> str:
    """A report without its run's date and time (the two runs were seconds apart)."""
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "DATE", text)


def same_run(child: Any, own: Any) -> bool:
    return (child.code, undated(child.out), child.err) == (own.code, undated(own.out), own.err)


def listing_snapshot(env: Env) -> tuple[list[Any], int]:
    """Every value the listing hands on, in order, and the Plex requests it counted."""
    config = sageplex_sync.load_config(env.config_path)
    with sageplex_sync.PlexClient(config.plex) as plex:
        sections = sageplex_sync.resolve_sections(["all"], plex.sections())
        before = plex.request_count
        listing = plex.listing(sections)
        try:
            listed = [value for batch in listing for value in batch]
        finally:
            listing.close()
        return listed, plex.request_count - before


def test_the_child_and_the_own_process_list_the_same_items(
        world: World, start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    declare_library(world)
    env = start()

    monkeypatch.setattr(sageplex_sync, "_listing_may_fork", lambda: True)
    from_child = listing_snapshot(env)
    monkeypatch.setattr(sageplex_sync, "_listing_may_fork", lambda: False)
    from_own = listing_snapshot(env)

    assert from_child == from_own
    listed, requests_made = from_child
    assert len(listed) == 14 and requests_made == 2  # one listing request per section
    assert {sageplex_sync.PlexItem(*v).title for v in listed} >= {"Heat (1995)",
                                                                  "Show - s01e05 - Episode 4"}


def test_a_check_and_a_sync_report_alike(world: World, start: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    declare_library(world)
    env = start()

    child, own = run_both(env, monkeypatch, "all")

    assert same_run(child, own)
    assert "out-of-sync" in child.total
    monkeypatch.setattr(sageplex_sync, "_listing_may_fork", lambda: True)
    synced = env.run("all", "-s", "-y")
    assert synced.code == 0, synced.err
    after = env.run("all")
    assert "out-of-sync" not in after.total and after.code == 0


def test_many_batches_arrive_whole_and_in_order(world: World, start: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    declare_library(world)
    env = start()
    monkeypatch.setattr(sageplex_sync, "LISTING_BATCH", 3)

    child, own = run_both(env, monkeypatch, "all")

    assert same_run(child, own)
    assert "Total: 14 videos" in child.total


def listing_files_held() -> int:
    """Bytes in the listing process's files that this process has open."""
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "sageplex-listing" in os.readlink(f"/proc/self/fd/{fd}"):
                held += os.stat(f"/proc/self/fd/{fd}").st_size
    return held


def test_each_batch_of_the_listing_process_is_freed_once_read() -> None:
    """What this process holds of the child's batches never grows with the listing (a
    100,000-item listing is 12 MB of them): each batch's file is closed once read."""
    batches = 20
    process = sageplex_sync._ListingProcess.start(
        lambda: (list(range(first, first + 50_000)) for first in range(0, batches * 50_000,
                                                                        50_000)))
    assert process is not None
    held, received = [], []
    try:
        for value in process.values():
            received.append(value[0])
            held.append(listing_files_held())
    finally:
        process.close()
    assert received == list(range(0, batches * 50_000, 50_000))
    assert held == [0] * batches


def movie_section_listing(env: Env) -> tuple[str, bytes]:
    """The movie section's path and its listing as the server sends it."""
    headers = {"X-Plex-Token": PLEX_TOKEN}
    base = f"http://127.0.0.1:{env.plex.port}"
    sections = requests.get(f"{base}/library/sections", headers=headers, timeout=10).text
    key = re.search(r'<Directory[^>]*key="(\d+)"[^>]*type="movie"', sections)
    assert key is not None
    path = f"/library/sections/{key.group(1)}/all"
    reply = requests.get(f"{base}{path}?type=1", headers=headers, timeout=10)
    reply.raise_for_status()
    return path, reply.content


@pytest.mark.parametrize("odd", [
    b'<Video ratingKey="abc" type="movie" title="No key"/>',
    b'<Video type="movie" title="No key at all"/>',
    b'<Video ratingKey="901" type="movie" title="Odd count" viewCount="many">'
    b'<Media><Part file="/mnt/m/odd.mpg"/></Media></Video>',
], ids=["bad-key", "no-key", "bad-number"])
def test_a_record_the_tool_cannot_read_is_reported_alike(
        world: World, start: Any, monkeypatch: pytest.MonkeyPatch, odd: bytes) -> None:
    declare_library(world)
    env = start()
    path, body = movie_section_listing(env)
    env.plex.add_fault(path=path, body=body.replace(b"</MediaContainer>",
                                                    odd + b"</MediaContainer>"),
                       content_type="text/xml;charset=utf-8")

    child, own = run_both(env, monkeypatch, "all")

    assert same_run(child, own)
    assert "unreadable from Plex" in child.out


@pytest.mark.parametrize("fault", [
    {"status": 500},
    {"status": 401},
    {"body": b"<html>not xml", "content_type": "text/xml"},
    {"delay_s": 3.0},  # past plex.timeout
    {"drop": True},
], ids=["500", "401", "not-xml", "timeout", "dropped"])
def test_a_failed_listing_gives_the_same_one_line_error(
        world: World, start: Any, monkeypatch: pytest.MonkeyPatch, fault: dict) -> None:
    declare_library(world)
    env = start(plex__timeout=1)
    env.plex.add_fault(function="section_all", **fault)

    child, own = run_both(env, monkeypatch, "all")

    assert child.code == own.code == 1
    assert same_run(child, own)
    assert child.err.startswith("sageplex-sync: error: ") and child.err.count("\n") == 1


def test_a_child_that_gives_no_answer_means_reading_the_listing_here(
        world: World, start: Any, monkeypatch: pytest.MonkeyPatch, forked: None) -> None:
    declare_library(world)
    env = start()
    monkeypatch.setattr(sageplex_sync.PlexClient, "_listing_answer",
                        lambda self, sections: os._exit(9))

    r = env.run("all")

    assert r.code == 0, r.err
    assert "Total: 14 videos" in r.total
    assert "listing process gave no answer: reading the listing here" in r.log
    assert len(env.plex.requests(function="section_all")) == 2  # the child's never came


def test_a_child_that_fails_half_way_leaves_the_rest_to_this_process(
        world: World, start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    declare_library(world)
    env = start()
    own = env.run("all")
    monkeypatch.setattr(sageplex_sync, "LISTING_BATCH", 4)
    monkeypatch.setattr(sageplex_sync, "_listing_may_fork", lambda: True)
    answer = sageplex_sync.PlexClient._listing_answer

    def broken(self: Any, sections: Any) -> Any:
        for number, value in enumerate(answer(self, sections)):
            if number == 2:
                raise RuntimeError("a bug after two batches")
            yield value
    monkeypatch.setattr(sageplex_sync.PlexClient, "_listing_answer", broken)

    r = env.run("all")

    assert same_run(r, own)  # each item once: the eight handed on are not listed again
    assert "Total: 14 videos" in r.total


def test_a_child_killed_by_a_signal_is_a_one_line_error_not_a_second_listing(
        world: World, start: Any, monkeypatch: pytest.MonkeyPatch, forked: None) -> None:
    declare_library(world)
    env = start()
    monkeypatch.setattr(sageplex_sync.PlexClient, "_listing_answer",
                        lambda self, sections: os.kill(os.getpid(), signal.SIGKILL))

    r = env.run("all")

    assert r.code == 1
    assert r.err == ("sageplex-sync: error: Plex's listing process was killed (signal 9) "
                     "while it read the listing\n")
    assert not env.plex.requests(function="section_all")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "term"])
def test_a_child_stopped_with_the_process_group_is_an_interrupted_run(
        world: World, start: Any, monkeypatch: pytest.MonkeyPatch, forked: None,
        stop: signal.Signals) -> None:
    declare_library(world)
    env = start()
    monkeypatch.setattr(sageplex_sync.PlexClient, "_listing_answer",
                        lambda self, sections: os.kill(os.getpid(), stop))

    r = env.run("all", "-s", "-y")

    assert r.code == 130
    assert r.err == "sageplex-sync: interrupted\n"
    assert env.writes() == []


def test_a_failed_sagetv_read_ends_the_listing_process(
        world: World, start: Any, forked: None) -> None:
    declare_library(world)
    env = start(plex__timeout=60)
    env.plex.add_fault(function="section_all", delay_s=30)
    env.sage.add_fault(function="GetMediaFiles", status=500, body=b"broken")

    began = time.monotonic()
    r = env.run("all")

    assert r.code == 1 and "SageTV" in r.err
    assert time.monotonic() - began < 20
    pid = int(re.search(FORKED + r" (\d+)", r.log).group(1))  # type: ignore[union-attr]
    with pytest.raises(ProcessLookupError):  # killed and reaped before the run ended
        os.kill(pid, 0)


def test_the_command_forks_by_itself_and_reports_as_the_library_call(
        world: World, start: Any, in_process: None, tmp_path: Path) -> None:
    declare_library(world)
    env = start()
    own = env.run("all")
    log = tmp_path / "command.log"

    proc = subprocess.run([sys.executable, str(TOOL), "all", "--all-items"],
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL,
                          env={**os.environ, "SAGEPLEX_CFG": str(env.config_path),
                               "SAGEPLEX_LOG": str(log)})

    assert proc.returncode == own.code, proc.stderr
    assert undated(proc.stdout) == undated(own.out)
    assert FORKED in log.read_text(encoding="utf-8")
