"""SageTV's bulk listing read in a child process (SageClient.listing): the same items, the
same errors and the same report as the listing read in the tool's own process, and a run
that ends (never hangs) whatever the child does.

In-process tests run with the fakes' threads going, where the tool itself never forks: the
``forked`` mode forces it (the child only talks HTTP to the fakes); one test runs the tool
as a real command, where it forks of its own accord.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

import sageplex_sync
from tests.conftest import Env
from tests.fakes.world import DAY, HOUR, MIN, SAGE_PASSWORD, SAGE_USER, World, at, none, watched

TOOL = Path(sageplex_sync.__file__)
FORKED = "SageTV's listing is read in process"
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


def index_snapshot(env: Env) -> tuple[dict[int, tuple], dict[str, str], int]:
    """Every SageTV item of the listing, field by field, and the unreadable records."""
    config = sageplex_sync.load_config(env.config_path)
    with sageplex_sync.SageClient(config.sage) as sage, ThreadPoolExecutor(1) as pool:
        listing = sage.listing(sageplex_sync.SAGE_FIELDS, pool, sageplex_sync.SageIndex)
        index = listing.result()
        listing.close()
        offset = sage.measured_offset_ms
    items = {key: tuple(getattr(item, name) for name in sageplex_sync.SageItem.__slots__)
             for key, item in index.items.items()}
    assert offset is not None  # the clock, learnt from the child's reply too
    return items, dict(index.unreadable), index.unreadable_count


def test_the_child_and_the_own_process_read_the_same_items(
        world: World, start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    declare_library(world)
    env = start()

    monkeypatch.setattr(sageplex_sync, "_listing_may_fork", lambda: True)
    from_child = index_snapshot(env)
    monkeypatch.setattr(sageplex_sync, "_listing_may_fork", lambda: False)
    from_own = index_snapshot(env)

    assert from_child == from_own
    assert len(from_child[0]) == 14
    assert any(fields[3] == 2 for fields in from_child[0].values())  # the split recording


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


def listing_body(env: Env) -> dict:
    """SageTV's listing reply as the tool asks for it."""
    params = {"c": "GetMediaFiles", "encoder": "json", "1": "TV", "start": 0,
              "size": sageplex_sync.SAGEX_PAGE_SIZE, "filter": "|".join(sageplex_sync.SAGE_FIELDS)}
    reply = requests.get(f"http://127.0.0.1:{env.sage.port}/sagex/api", params=params,
                         auth=(SAGE_USER, SAGE_PASSWORD), timeout=10)
    reply.raise_for_status()
    return reply.json()


@pytest.mark.parametrize("odd", [
    None,  # a null in the Result list
    {"Airing": {"AiringID": 5}, "SegmentFiles": ["x.mpg"]},  # no MediaFileID at all
    {"MediaFileID": None, "SegmentFiles": ["y.mpg"]},
    {"MediaFileID": 777, "Airing": None, "SegmentFiles": ["z.mpg"]},
    {"MediaFileID": 778, "Airing": [], "SegmentFiles": "w.mpg"},
    "a string",
], ids=["null", "no-id", "null-id", "null-airing", "odd-types", "string"])
def test_a_record_the_tool_cannot_read_is_skipped_alike(
        world: World, start: Any, monkeypatch: pytest.MonkeyPatch, odd: object) -> None:
    declare_library(world)
    env = start()
    body = listing_body(env)
    body["Result"].insert(3, odd)
    env.sage.add_fault(function="GetMediaFiles", body=json.dumps(body).encode(),
                       content_type="application/json")

    child, own = run_both(env, monkeypatch, "all")

    assert same_run(child, own)
    assert "Total: 14 videos" in child.total
    monkeypatch.setattr(sageplex_sync, "_listing_may_fork", lambda: True)
    items, unreadable, count = index_snapshot(env)
    monkeypatch.setattr(sageplex_sync, "_listing_may_fork", lambda: False)
    assert (items, unreadable, count) == index_snapshot(env)
    assert len(items) == 14 and count == 1


@pytest.mark.parametrize("fault", [
    {"status": 500},
    {"status": 401},
    {"body": b"<html>not json</html>"},
    {"body": b'{"Result": 3}'},
    {"body": b'{"error": {"message": "listing broke\\nat line 2"}}'},
    {"delay_s": 3.0},  # past sagex.list_timeout
    {"drop": True},
], ids=["500", "401", "not-json", "no-list", "error", "timeout", "dropped"])
def test_a_failed_listing_gives_the_same_one_line_error(
        world: World, start: Any, monkeypatch: pytest.MonkeyPatch, fault: dict) -> None:
    declare_library(world)
    env = start(sagex__list_timeout=1)
    env.sage.add_fault(function="GetMediaFiles", **fault)

    child, own = run_both(env, monkeypatch, "all")

    assert child.code == own.code == 1
    assert same_run(child, own)
    assert child.err.startswith("sageplex-sync: error: ") and child.err.count("\n") == 1


def test_a_child_that_gives_no_answer_means_reading_the_listing_here(
        world: World, start: Any, monkeypatch: pytest.MonkeyPatch, forked: None) -> None:
    declare_library(world)
    env = start()
    monkeypatch.setattr(sageplex_sync.SageClient, "_listing_answer",
                        lambda self, fields: os._exit(9))

    r = env.run("all")

    assert r.code == 0, r.err
    assert "Total: 14 videos" in r.total
    assert "listing process gave no answer: reading the listing here" in r.log
    assert len(env.sage.requests(function="GetMediaFiles")) == 1  # the child's never came


def test_a_child_that_fails_with_a_bug_means_reading_the_listing_here(
        world: World, start: Any, monkeypatch: pytest.MonkeyPatch, forked: None) -> None:
    declare_library(world)
    env = start()

    def broken(self: Any, fields: Any) -> tuple:
        raise RuntimeError("a bug")
    monkeypatch.setattr(sageplex_sync.SageClient, "_listing_answer", broken)

    r = env.run("all")

    assert r.code == 0, r.err
    assert "Total: 14 videos" in r.total


def test_a_child_killed_by_a_signal_is_a_one_line_error_not_a_second_listing(
        world: World, start: Any, monkeypatch: pytest.MonkeyPatch, forked: None) -> None:
    declare_library(world)
    env = start()
    monkeypatch.setattr(sageplex_sync.SageClient, "_listing_answer",
                        lambda self, fields: os.kill(os.getpid(), signal.SIGKILL))

    r = env.run("all")

    assert r.code == 1
    assert r.err == ("sageplex-sync: error: SageTV's listing process was killed (signal 9) "
                     "while it read the listing\n")
    assert not env.sage.requests(function="GetMediaFiles")


def test_a_failed_plex_read_ends_the_listing_process(
        world: World, start: Any, forked: None) -> None:
    declare_library(world)
    env = start()
    env.sage.add_fault(function="GetMediaFiles", delay_s=30)
    env.plex.add_fault(function="section_all", status=500, body=b"broken")

    began = time.monotonic()
    r = env.run("all")

    assert r.code == 1 and "Plex" in r.err
    assert time.monotonic() - began < 20
    pid = int(re.search(FORKED + r" (\d+)", r.log).group(1))  # type: ignore[union-attr]
    for _ in range(100):  # killed, then reaped by the listing's thread
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the listing's process {pid} is still there")


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
