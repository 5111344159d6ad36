"""The fault matrix: every way SageTV or Plex can fail, while the tool reads and while it
writes, served on purpose by the fakes over real HTTP.

For every case: the exit code, one line on stderr naming the server (when the run cannot
go on) or a ``failed`` item line (when one write failed), no traceback, neither the SageTV
password nor the Plex token in stdout, stderr or the log, and both servers consistent
afterwards: no write at all when reading failed, and no item less watched than before.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import sageplex_sync
from tests.conftest import PROXY_VARIABLES, Env, Result, assert_no_secrets
from tests.fakes.fake_http import Request
from tests.fakes.world import DAY, HOUR, MIN, Item, World, at, none, watched

MAIN = Path(__file__).resolve().parent.parent

SAGEX_ERROR = (b'{"sagexVersion":"9.2.8.1","error":"Unknown Sage Command: GetMediaFiles",'
               b'"exception":"java.lang.RuntimeException: Unknown Sage Command: GetMediaFiles'
               b'\\n\\tat sagex.remote.factory.request.SageRPCRequestFactory.createRequest('
               b'SageRPCRequestFactory.java:58)"}')
SAGEX_WRITE_ERROR = (b'{"sagexVersion":"9.2.8.1","error":"For input string: \\"abc\\"",'
                     b'"exception":"java.lang.NumberFormatException: For input string: '
                     b'\\"abc\\"\\n\\tat java.lang.Integer.parseInt(Integer.java:580)"}')
FAST = 0.3  # seconds: the timeout given in the config for the slow-server cases
SLOW = 0.8  # seconds: how long a slow server takes, well past FAST
REAL_BACKOFF_S = sageplex_sync.RETRY_BACKOFF_S


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries as the tool does them, with a shorter pause: the matrix has many failing
    reads (test_retries_back_off checks the real backoff)."""
    monkeypatch.setattr(sageplex_sync, "RETRY_BACKOFF_S", 0.02)


# -- the world every matrix case runs in -----------------------------------------------------

def declare(world: World) -> SimpleNamespace:
    """Two items that need a SageTV write, two that need a Plex write, one in sync."""
    return SimpleNamespace(
        sage1=world.episode("Castle", 1, 1, "Flowers for Your Grave", sage=none(),
                            plex=watched(ago=HOUR)),
        sage2=world.episode("Castle", 1, 2, "Nanny McDead", sage=none(), plex=watched(ago=HOUR)),
        plex1=world.episode("Castle", 1, 3, "Hedge Fund Homeboys", sage=watched(ago=DAY),
                            plex=none()),
        plex2=world.movie("Heat", sage=watched(ago=DAY), plex=none()),
        in_sync=world.episode("Castle", 1, 4, "Hell Hath No Fury", sage=watched(ago=DAY),
                              plex=watched(ago=DAY)),
    )


@dataclass(frozen=True)
class State:
    sage_watched: bool
    sage_end_ms: int
    plex_count: int
    plex_offset_ms: int


def snapshot(world: World) -> dict[str, State]:
    """Each item's watch state on both servers, as they serve it now."""
    states = {}
    for item in world.items:
        assert item.airing_id is not None and item.rating_key is not None
        airing = world.sage.airing_json(item.airing_id)
        plex = world.plex.item(item.rating_key)
        states[item.title] = State(bool(airing.get("IsWatched")),
                                   int(airing.get("WatchedEndTime") or 0),
                                   plex.view_count, plex.view_offset_ms)
    return states


def assert_not_less_watched(before: dict[str, State], after: dict[str, State]) -> None:
    """No item lost a watched mark, a view or its resume position."""
    for title, old in before.items():
        new = after[title]
        assert new.sage_watched or not old.sage_watched, f"{title}: SageTV lost its watched mark"
        assert new.sage_watched or new.sage_end_ms >= old.sage_end_ms, \
            f"{title}: SageTV position went back"
        assert new.plex_count >= old.plex_count, f"{title}: Plex lost a view"
        assert new.plex_count > old.plex_count or new.plex_offset_ms >= old.plex_offset_ms, \
            f"{title}: Plex position went back"


def assert_clean(r: Result) -> None:
    """No traceback anywhere, no secret anywhere (urls included)."""
    for text in (r.out, r.err, r.log):
        assert "Traceback" not in text
    assert_no_secrets(r.out, r.err, r.log)


def assert_one_error_line(r: Result, server: str) -> str:
    lines = r.err.splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("sageplex-sync: error: "), r.err
    assert server in lines[0], r.err
    return lines[0]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# -- the matrix: reading ------------------------------------------------------------------------

@dataclass(frozen=True)
class ReadCase:
    server: str  # "sage" or "plex": whose fake gets the fault
    fault: dict[str, Any] = field(default_factory=dict)  # FakeServer.add_fault arguments
    config: dict[str, Any] = field(default_factory=dict)  # start() overrides
    says: tuple[str, ...] = ()  # words the error line has
    attempts: int | None = None  # how many times the failing request is tried


SAGE_LIST = {"function": "GetMediaFiles"}
PLEX_LIST = {"function": "section_all"}

READ_CASES = {
    "sage-read-401": ReadCase("sage", {**SAGE_LIST, "status": 401},
                              says=("refused the user name or password", "sagex.password"),
                              attempts=1),
    "sage-read-401-wrong-user": ReadCase("sage", config={"sagex__user": "not-sage"},
                                         says=("HTTP 401", "sagex.user")),
    "sage-read-403": ReadCase("sage", {**SAGE_LIST, "status": 403}, says=("HTTP 403",),
                              attempts=1),
    "sage-read-404": ReadCase("sage", {**SAGE_LIST, "status": 404},
                              says=("HTTP 404", "sagex-api plugin"), attempts=1),
    "sage-read-500": ReadCase("sage", {**SAGE_LIST, "status": 500}, says=("HTTP 500",),
                              attempts=4),
    # a listing that times out is not asked again: the server is still building it
    "sage-read-timeout": ReadCase("sage", {**SAGE_LIST, "delay_s": SLOW},
                                  {"sagex__list_timeout": FAST},
                                  says=(f"did not answer within {FAST:g} s",
                                        "sagex.list_timeout"),
                                  attempts=1),
    "sage-read-refused": ReadCase("sage", config={"sagex__port": "CLOSED"},
                                  says=("cannot reach SageTV", "connection refused",
                                        "sagex.port")),
    "sage-read-goes-away": ReadCase("sage", {**SAGE_LIST, "drop": True},
                                    says=("cannot reach SageTV", "connection lost"), attempts=3),
    "sage-read-malformed": ReadCase("sage", {**SAGE_LIST, "body": b"not json"},
                                    says=("not JSON",), attempts=1),
    "sage-read-html": ReadCase("sage", {**SAGE_LIST, "body": b"<html><body>Jetty</body></html>"},
                               says=("not JSON",), attempts=1),
    "sage-read-truncated": ReadCase("sage", {**SAGE_LIST, "truncate": True},
                                    says=("cut its reply off",), attempts=4),
    "sage-read-sagex-error": ReadCase("sage", {**SAGE_LIST, "body": SAGEX_ERROR},
                                      says=("reported an error",
                                            "Unknown Sage Command: GetMediaFiles"), attempts=1),
    "sage-read-no-result": ReadCase("sage", {**SAGE_LIST, "body": b'{"Result":"Castle"}'},
                                    says=("without a 'Result' list",), attempts=1),
    "plex-read-401": ReadCase("plex", {**PLEX_LIST, "status": 401},
                              says=("refused the token", "plex.token"), attempts=1),
    "plex-read-401-wrong-token": ReadCase("plex", config={"plex__token": "not-the-token-123"},
                                          says=("refused the token", "plex.token")),
    "plex-read-403": ReadCase("plex", {**PLEX_LIST, "status": 403}, says=("HTTP 403",),
                              attempts=1),
    "plex-read-404": ReadCase("plex", {**PLEX_LIST, "status": 404}, says=("HTTP 404",),
                              attempts=1),
    "plex-read-500": ReadCase("plex", {**PLEX_LIST, "status": 500}, says=("HTTP 500",),
                              attempts=4),
    "plex-read-connect-500": ReadCase("plex", {"function": "root", "status": 500},
                                      says=("HTTP 500", "connecting"), attempts=4),
    "plex-read-sections-500": ReadCase("plex", {"function": "sections", "status": 500},
                                       says=("HTTP 500", "section listing"), attempts=4),
    "plex-read-timeout": ReadCase("plex", {**PLEX_LIST, "delay_s": SLOW}, {"plex__timeout": FAST},
                                  says=(f"did not answer within {FAST:g} s", "plex.timeout"),
                                  attempts=3),
    "plex-read-refused": ReadCase("plex", config={"plex__port": "CLOSED"},
                                  says=("cannot reach Plex", "connection refused", "plex.port")),
    "plex-read-goes-away": ReadCase("plex", {**PLEX_LIST, "drop": True},
                                    says=("cannot reach Plex", "connection lost"), attempts=3),
    # (not asked again for a transient failure; how often it is read is up to the parser)
    "plex-read-malformed": ReadCase("plex", {**PLEX_LIST, "body": b"<MediaContainer"},
                                    says=("not valid XML",)),
    "plex-read-not-xml": ReadCase("plex", {**PLEX_LIST, "body": b"not xml at all"},
                                  says=("not valid XML",)),
    "plex-read-truncated": ReadCase("plex", {**PLEX_LIST, "truncate": True},
                                    says=("cut its reply off",), attempts=4),
}


def assert_failure_said_once(r: Any, rating_key: int | None) -> None:
    """A failed write is said on stderr too: one line, naming the (first) item."""
    assert len(r.err.splitlines()) == 1 and r.err.startswith("sageplex-sync: error: "), r.err
    assert "failed" in r.err and f"[{rating_key}]" in r.err


@pytest.mark.parametrize("case", list(READ_CASES.values()), ids=list(READ_CASES))
def test_read_failure_stops_the_run_before_any_write(world: World, start: Any,
                                                     case: ReadCase) -> None:
    declare(world)
    config = {k: closed_port() if v == "CLOSED" else v for k, v in case.config.items()}
    env: Env = start(**config)
    fake = env.sage if case.server == "sage" else env.plex
    if case.fault:
        fake.add_fault(**case.fault)
    before = snapshot(world)

    r = env.run("all", "-s")

    assert r.code == 1, r.out + r.err
    line = assert_one_error_line(r, "SageTV" if case.server == "sage" else "Plex")
    for words in case.says:
        assert words in line
    assert "Total:" not in r.out  # nothing was done, so there is no summary to give
    assert env.writes() == []
    assert snapshot(world) == before
    if case.attempts is not None:
        assert len(fake.requests(function=case.fault["function"])) == case.attempts
    assert_clean(r)
    assert "not-the-token-123" not in r.out + r.err + r.log


# -- the matrix: writing ------------------------------------------------------------------------

@dataclass(frozen=True)
class WriteCase:
    server: str  # "sage" or "plex": whose write (to the first item of that side) fails
    fault: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    says: tuple[str, ...] = ()  # words the failed item's line has
    function: str = ""  # the request the fault hits (default: the write itself)
    outcome: str = "failed"  # "updated" when the read-back shows the write took after all


SAGE_WRITE_CASES = {
    "sage-write-401": WriteCase("sage", {"status": 401}, says=("refused the user name",)),
    "sage-write-403": WriteCase("sage", {"status": 403}, says=("HTTP 403",)),
    "sage-write-404": WriteCase("sage", {"status": 404}, says=("HTTP 404",)),
    "sage-write-500": WriteCase("sage", {"status": 500}, says=("HTTP 500",)),
    "sage-write-timeout": WriteCase("sage", {"delay_s": SLOW}, {"sagex__timeout": FAST},
                                    says=(f"did not answer within {FAST:g} s",)),
    "sage-write-goes-away": WriteCase("sage", {"drop": True},
                                      says=("cannot reach SageTV", "connection lost")),
    "sage-write-malformed": WriteCase("sage", {"body": b"not json"}, says=("not JSON",)),
    "sage-write-sagex-error": WriteCase("sage", {"body": SAGEX_WRITE_ERROR},
                                        says=("reported an error", "For input string")),
    "sage-write-no-op": WriteCase("sage", {"body": b"{}"},
                                  says=("accepted SetWatched", "still not watched")),
    # the reply is cut off but the write took: the read-back says so, the item is done
    "sage-write-truncated": WriteCase("sage", {"truncate": True}, outcome="updated"),
    "sage-write-readback-500": WriteCase("sage", {"status": 500}, function="GetMediaFileForID",
                                         says=("HTTP 500", "GetMediaFileForID")),
}
PLEX_WRITE_CASES = {
    "plex-write-401": WriteCase("plex", {"status": 401}, says=("refused the token",)),
    "plex-write-403": WriteCase("plex", {"status": 403}, says=("HTTP 403",)),
    "plex-write-404": WriteCase("plex", {"status": 404}, says=("HTTP 404",)),
    "plex-write-500": WriteCase("plex", {"status": 500}, says=("HTTP 500",)),
    "plex-write-timeout": WriteCase("plex", {"delay_s": SLOW}, {"plex__timeout": FAST},
                                    says=(f"did not answer within {FAST:g} s",)),
    "plex-write-goes-away": WriteCase("plex", {"drop": True},
                                      says=("cannot reach Plex", "connection lost")),
    "plex-write-malformed": WriteCase("plex", {"body": b"<MediaContainer"},
                                      says=("not valid XML",)),
    "plex-write-no-op": WriteCase("plex", {"body": b""},
                                  says=("Plex accepted the write", "not watched")),
}
WRITE_CASES = {**SAGE_WRITE_CASES, **PLEX_WRITE_CASES}


def targets(case: WriteCase, items: SimpleNamespace) -> Any:
    """A predicate for the fault: only requests about the first item of the failing side."""
    if case.server == "sage":
        ref = f"airing:{items.sage1.airing_id}"
        media_file = str(items.sage1.media_file_id)
        return lambda r: r.param("1") in (ref, media_file)
    key = str(items.plex1.rating_key)
    return lambda r: r.param("key") == key or r.path == f"/library/metadata/{key}"


@pytest.mark.parametrize("case", list(WRITE_CASES.values()), ids=list(WRITE_CASES))
def test_failed_write_fails_the_item_and_the_run_goes_on(world: World, start: Any,
                                                         case: WriteCase) -> None:
    items = declare(world)
    env: Env = start(**case.config)
    fake = env.sage if case.server == "sage" else env.plex
    function = case.function or ("SetWatched" if case.server == "sage" else "scrobble")
    fault = fake.add_fault(function=function, when=targets(case, items), **case.fault)
    before = snapshot(world)

    r = env.run("all", "-s")
    if case.fault.get("delay_s"):  # the slow server still does the write, late
        time.sleep(case.fault["delay_s"])

    failing, other = (items.sage1, items.sage2) if case.server == "sage" else \
        (items.plex1, items.plex2)
    line = r.line_for(failing.rating_key)
    assert f"[{case.outcome}]" in line, r.out
    for words in case.says:
        assert words in line
    # the run went on: the other item of that side and both of the other side are done
    for item in (other, items.plex1, items.plex2, items.sage1, items.sage2):
        if item is not failing:
            assert "[updated]" in r.line_for(item.rating_key), r.out
    assert "[OK]" in r.line_for(items.in_sync.rating_key)
    if case.outcome == "failed":
        assert r.code == 1
        assert r.under("Failed (1):") == [failing.rating_key] and "1 failed." in r.total
        assert_failure_said_once(r, failing.rating_key)
    else:
        assert r.code == 0
        assert r.err == ""
    # writes are never retried blindly: the failing write went out exactly once
    write = "SetWatched" if case.server == "sage" else "scrobble"
    assert len([q for q in fake.requests(function=write) if fault.when(q)]) == 1
    assert fault.hits >= 1
    assert_not_less_watched(before, snapshot(world))
    assert_clean(r)


# -- transient failures: reads are retried with backoff -----------------------------------------

@pytest.mark.parametrize("server, fault, attempts", [
    ("sage", {**SAGE_LIST, "status": 500, "times": 2}, 3),
    ("sage", {**SAGE_LIST, "status": 503, "times": 3}, 4),
    ("sage", {**SAGE_LIST, "drop": True, "times": 1}, 2),
    ("sage", {**SAGE_LIST, "truncate": True, "times": 2}, 3),
    ("plex", {**PLEX_LIST, "status": 500, "times": 2}, 4),  # two sections: 2 + 1 + 1
    ("plex", {"function": "root", "status": 502, "times": 2}, 3),
    ("plex", {**PLEX_LIST, "drop": True, "times": 1}, 3),
    ("plex", {**PLEX_LIST, "truncate": True, "times": 1}, 3),
    ("plex", {"function": "metadata", "status": 500, "times": 1}, 2),  # the batched read-back
    ("plex", {**PLEX_LIST, "delay_s": SLOW, "times": 1}, 3),
], ids=["sage-500-twice", "sage-503-three-times", "sage-goes-away-once", "sage-truncated-twice",
        "plex-500-twice", "plex-connect-502-twice", "plex-goes-away-once",
        "plex-truncated-once", "plex-readback-500-once", "plex-slow-once"])
def test_transient_read_failure_is_retried_and_the_run_succeeds(
        world: World, start: Any, server: str, fault: dict[str, Any], attempts: int) -> None:
    items = declare(world)
    env: Env = start(sagex__timeout=FAST * 2, plex__timeout=FAST * 2)
    fake = env.sage if server == "sage" else env.plex
    fake.add_fault(**fault)

    r = env.run("all", "-s")

    assert r.code == 0, r.out + r.err
    assert r.err == ""
    assert "5 videos, 1 in-sync, 2 PLEX out-of-sync, 2 SageTV out-of-sync, 4 updated." in r.total
    assert len(fake.requests(function=fault["function"])) == attempts
    assert world.sage.airing_json(items.sage1.airing_id)["IsWatched"] is True
    assert world.plex.item(items.plex1.rating_key).view_count == 1
    assert_clean(r)


def test_retries_back_off(world: World, start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three retries of a failing read are spread out: the first at once, then after
    0.6 s and 1.2 s (urllib3's backoff with a 0.3 s factor)."""
    monkeypatch.setattr(sageplex_sync, "RETRY_BACKOFF_S", REAL_BACKOFF_S)
    declare(world)
    env: Env = start()
    env.sage.add_fault(function="GetMediaFiles", status=500)
    began = time.monotonic()
    r = env.run("all", "-s")
    assert r.code == 1
    assert 0.6 + 1.2 - 0.1 <= time.monotonic() - began < 5
    assert len(env.sage.requests(function="GetMediaFiles")) == 4
    assert_clean(r)


def test_timeouts_come_from_the_config(world: World, start: Any) -> None:
    """A reply slower than the default would be fine with a larger sagex.timeout."""
    declare(world)
    env: Env = start(sagex__timeout=2 * SLOW)
    env.sage.add_fault(function="GetMediaFiles", delay_s=SLOW)
    r = env.run("all", "-s")
    assert r.code == 0, r.err
    assert len(env.sage.requests(function="GetMediaFiles")) == 1
    assert_clean(r)


# -- replies that set a cookie or redirect: taken as requests' Session.send takes them ----------

def test_a_cookie_plex_sets_is_sent_back_with_its_later_requests(world: World,
                                                                  start: Any) -> None:
    declare(world)
    env: Env = start()
    env.plex.add_fault(when=lambda r: r.path == "/", times=1,
                       headers={"Set-Cookie": "plexsession=abc123; Path=/"})
    r = env.run("all", "-s")
    assert r.code == 0, r.err
    requests_ = env.plex.requests()
    first = next(n for n, request in enumerate(requests_) if request.path == "/")
    # The reads after it, in the session that got the cookie: the writes have a session
    # of their own, and the sections' listings may be read in a process forked before.
    later = [request for request in requests_[first + 1:] if request.method == "GET"
             and not request.path.startswith(("/:/", "/library/sections/"))]
    assert later, [request.path for request in requests_]
    assert all(request.headers.get("cookie") == "plexsession=abc123" for request in later)
    assert_clean(r)


def test_a_redirected_write_is_followed_and_read_back(world: World, start: Any) -> None:
    items = declare(world)
    env: Env = start()
    airing = f"airing:{items.sage1.airing_id}"
    env.sage.add_fault(function="SetWatched", times=1, status=307,
                       when=lambda r: r.query.get("1") == [airing],
                       headers={"Location": f"/sagex/api?c=SetWatched&1={airing}&encoder=json"})
    r = env.run("all", "-s")
    assert r.code == 0, r.out + r.err
    assert "4 updated." in r.total
    sent = [request for request in env.sage.requests(function="SetWatched")
            if request.query.get("1") == [airing]]
    assert len(sent) == 2  # the redirect, then the write where it pointed
    assert world.sage.airing_json(items.sage1.airing_id)["IsWatched"] is True
    assert_clean(r)


# -- a server that goes away in the middle of a run ---------------------------------------------

def test_sagetv_goes_away_during_the_writes(world: World, start: Any) -> None:
    items = declare(world)
    env: Env = start()

    def go_away(request: Request) -> bool:
        env.sage.stop()  # stops listening and closes every open connection
        return True

    env.sage.add_fault(function="SetWatched", when=go_away, times=1, drop=True)
    before = snapshot(world)

    r = env.run("all", "-s")

    assert r.code == 1
    assert_failure_said_once(r, items.sage1.rating_key)
    for item in (items.sage1, items.sage2):
        line = r.line_for(item.rating_key)
        assert "[failed]" in line and "cannot reach SageTV" in line
    for item in (items.plex1, items.plex2):  # Plex was fine: its items are done
        assert "[updated]" in r.line_for(item.rating_key)
    assert "2 failed." in r.total
    assert_not_less_watched(before, snapshot(world))
    assert_clean(r)


def test_plex_goes_away_during_the_writes(world: World, start: Any) -> None:
    sage_item = world.episode("Castle", 2, 1, "Deep in Death", sage=none(), plex=watched())
    plex_items = [world.episode("Castle", 2, n, f"Episode {n}", sage=watched(), plex=none())
                  for n in (2, 3)]
    env: Env = start()

    def go_away(request: Request) -> bool:
        env.plex.stop()
        return True

    env.plex.add_fault(function="scrobble", when=go_away, times=1, drop=True)
    before = snapshot(world)

    r = env.run("TV Shows", "-s")

    assert r.code == 1
    assert_failure_said_once(r, plex_items[0].rating_key)
    for item in plex_items:
        line = r.line_for(item.rating_key)
        assert "[failed]" in line and "cannot reach Plex" in line
    assert "[updated]" in r.line_for(sage_item.rating_key)
    assert world.sage.airing_json(sage_item.airing_id)["IsWatched"] is True
    assert_not_less_watched(before, snapshot(world))
    assert_clean(r)


def test_listing_of_the_second_section_fails_before_any_write(world: World, start: Any) -> None:
    """Every listing is read before the first write: a failed one ends the run with one
    line saying why, and nothing is written, not even the first section's items."""
    declare(world)
    env: Env = start()
    env.plex.add_fault(path=f"/library/sections/{world.movie_section}/all", status=500)
    before = snapshot(world)

    r = env.run("all", "-s")

    assert r.code == 1
    line = assert_one_error_line(r, "Plex")
    assert f"section {world.movie_section}" in line and "HTTP 500" in line
    assert env.writes() == []
    assert snapshot(world) == before
    assert_clean(r)


# -- Plex listings without totalSize --------------------------------------------------------------

def test_listing_without_total_size_still_sees_every_item(world: World, start: Any) -> None:
    episodes = [world.episode("Bones", 1, n, f"Episode {n}", sage=none(), plex=watched())
                for n in range(1, 8)]
    movie = world.movie("Ronin", sage=watched(), plex=none())
    world.plex.omit_total_size = True
    env: Env = start()

    r = env.run("all", "-s")

    assert r.code == 0, r.err
    for item in [*episodes, movie]:
        assert "[updated]" in r.line_for(item.rating_key)
    assert r.total.startswith("Total: 8 videos")
    assert all(world.sage.airing_json(e.airing_id)["IsWatched"] for e in episodes)
    # each section: one full page, then an empty one that says it was the last
    assert len(env.plex.requests(function="section_all")) == 4
    assert "has no totalSize; paging on" in r.log
    assert_clean(r)


# -- SetWatchedTimes failing after ClearWatched succeeded -----------------------------------------

def rewatch_on_plex(world: World) -> Item:
    """Row 5, Plex newer: SageTV watched, Plex re-watching at 10 minutes."""
    return world.episode("Castle", 3, 1, "A Deadly Game", sage=watched(ago=DAY),
                         plex=at(10 * MIN, ago=HOUR, view_count=1))


@pytest.mark.parametrize("fault", [{"status": 500}, {"body": b"{}"}, {"drop": True}],
                         ids=["500", "no-op", "goes-away"])
def test_position_write_failing_after_clear_watched_restores_watched(
        world: World, start: Any, fault: dict[str, Any]) -> None:
    item = rewatch_on_plex(world)
    other = world.episode("Castle", 3, 2, "Setup", sage=none(), plex=watched())
    env: Env = start()
    env.sage.add_fault(function="SetWatchedTimes", **fault)

    r = env.run("all", "-s")

    assert r.code == 1
    line = r.line_for(item.rating_key)
    assert "[failed]" in line and "restored what SageTV had" in line
    assert "[updated]" in r.line_for(other.rating_key)
    functions = [q.function for q in env.sage.requests()
                 if q.param("1") == f"airing:{item.airing_id}"]
    assert functions == ["ClearWatched", "SetWatchedTimes", "SetWatched"]
    assert world.sage.airing_json(item.airing_id)["IsWatched"] is True
    assert_failure_said_once(r, item.rating_key)
    assert_clean(r)


def test_position_write_failing_restores_a_watched_mark_from_the_show_flag(world: World,
                                                                          start: Any) -> None:
    """Two recordings of one episode: A was watched on SageTV, so B is watched through the
    show's flag (not watched completely: B has no viewing of its own). Plex re-watches B at
    10:00, newer. When SetWatchedTimes fails after the ClearWatched, the restore marks B
    watched again: SageTV is never left less watched."""
    show = "EP0000555001"
    world.episode("Castle", 3, 1, "A Deadly Game", duration_ms=60 * MIN, show_external_id=show,
                  sage=watched(ago=DAY), plex=watched(ago=DAY))
    b = world.episode("Castle", 3, 1, "A Deadly Game", duration_ms=60 * MIN,
                      show_external_id=show, sage=none(), plex=at(10 * MIN, ago=HOUR,
                                                                   view_count=1))
    env: Env = start()
    airing = world.sage.airing_json(b.airing_id)
    assert airing["IsWatched"] is True and airing["IsWatchedCompletely"] is False
    env.sage.add_fault(function="SetWatchedTimes", status=500)

    r = env.run("all", "-s")

    assert r.code == 1
    assert "restored what SageTV had" in r.line_for(b.rating_key), r.out
    assert world.sage.airing_json(b.airing_id)["IsWatched"] is True
    assert_clean(r)


def test_a_plex_position_write_cut_off_is_sent_once_and_taken_next_run(
        world: World, start: Any, tmp_path: Path) -> None:
    """Plex's reply to the position write (a timeline, whose reply has a body) is cut off
    half-way. The write may have taken, so it is never sent again blindly: the item is
    reported failed, and the next sync finds the position there and writes nothing."""
    item = world.movie("Ronin", year=1998, sage=at(40 * MIN, ago=HOUR), plex=none())
    env: Env = start()
    state = str(tmp_path / "cut.sqlite")
    env.plex.add_fault(function="timeline", truncate=True)
    env.plex.add_fault(function="progress", truncate=True)

    r = env.run("all", "-s", "--state", state)

    assert "[failed]" in r.line_for(item.rating_key) and "cut its reply off" in r.out, r.out
    position_writes = [q for q in env.plex.requests() if q.function in ("timeline", "progress")]
    assert len(position_writes) == 1
    assert abs(world.plex_item(item).view_offset_ms - 40 * MIN) < 2_000  # it took
    env.plex.clear_faults()
    env.clear_logs()
    r = env.run("all", "-s", "--state", state)
    assert r.code == 0 and env.writes() == [], r.out
    assert_clean(r)


def test_position_write_failing_restores_the_old_position(world: World, start: Any) -> None:
    """Row 7, Plex newer and earlier: ClearWatched first; when SetWatchedTimes fails, the
    old SageTV position is written back."""
    item = world.episode("Castle", 3, 3, "Kill the Messenger", sage=at(20 * MIN, ago=DAY),
                         plex=at(10 * MIN, ago=HOUR))
    env: Env = start()
    old_end = world.sage.airing_json(item.airing_id)["WatchedEndTime"]
    env.sage.add_fault(function="SetWatchedTimes", status=500, times=1)

    r = env.run("all", "-s")

    assert r.code == 1
    line = r.line_for(item.rating_key)
    assert "[failed]" in line and "restored what SageTV had" in line
    airing = world.sage.airing_json(item.airing_id)
    assert airing["IsWatched"] is False
    assert abs(airing["WatchedEndTime"] - old_end) < 2000
    assert_clean(r)


def test_restore_failing_too_is_reported(world: World, start: Any) -> None:
    """When SageTV refuses the restore as well, the item line says what it was."""
    item = rewatch_on_plex(world)
    env: Env = start()
    env.sage.add_fault(function="SetWatchedTimes", status=500)
    env.sage.add_fault(function="SetWatched", status=500)

    r = env.run("all", "-s")

    assert r.code == 1
    line = r.line_for(item.rating_key)
    assert "[failed]" in line and "restoring failed too: it was watched before this run" in line
    assert_clean(r)


# -- Ctrl-C in the middle of a sync ---------------------------------------------------------------

def interrupted(env: Env, argv: list[str], started: Any) -> tuple[int, str, str]:
    """The tool as a command, sent Ctrl-C (SIGINT) once ``started()`` holds (the first
    write has reached a fake): its exit code, stdout and stderr."""
    environ = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    environ.update(SAGEPLEX_CFG=str(env.config_path), SAGEPLEX_LOG=str(env.log_path),
                   PLEXAPI_CONFIG_PATH=os.environ["PLEXAPI_CONFIG_PATH"],
                   PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, str(MAIN / "sageplex_sync.py"), *argv],
                               cwd=MAIN, env=environ, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(started, timeout_s=20)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out, err


def test_ctrl_c_between_an_items_two_writes_finishes_the_item(world: World, start: Any,
                                                              tmp_path: Path) -> None:
    """Plex paused a film at 30:00 (never played through); SageTV had it watched, so the sync
    marked Plex watched. ``--undo`` puts Plex back as unscrobble, then 30:00. Ctrl-C lands
    while the unscrobble is on its way: the item's second write is still sent, and Plex
    ends at 30:00, never un-watched without its resume point."""
    item = world.movie("Ronin", year=1998, sage=watched(ago=HOUR), plex=at(30 * MIN, ago=DAY))
    env: Env = start()
    state = str(tmp_path / "undo.sqlite")
    assert env.run("all", "-s", "--state", state).code == 0
    assert world.plex_item(item).view_count == 1
    env.clear_logs()
    env.plex.add_fault(function="unscrobble", delay_s=0.4)

    code, out, err = interrupted(env, ["--undo", "--state", state], env.plex_writes)

    assert code == 130, out + err
    assert [q.function for q in env.plex_writes()][0] == "unscrobble", out + err
    plex = world.plex_item(item)
    assert plex.view_count == 0 and abs(plex.view_offset_ms - 30 * MIN) < 2_000, plex
    assert "[updated]" in out and "Traceback" not in out + err


def test_ctrl_c_prints_the_summary_so_far_and_leaves_no_half_written_item(
        world: World, start: Any) -> None:
    rewatches = [world.episode("Bones", 2, n, f"Rewatch {n}", sage=watched(ago=DAY),
                               plex=at(10 * MIN + n * MIN, ago=HOUR, view_count=1))
                 for n in range(1, 9)]
    marks = [world.episode("Bones", 3, n, f"Mark {n}", sage=none(), plex=watched(ago=HOUR))
             for n in range(1, 9)]
    env: Env = start()
    for function in ("ClearWatched", "SetWatchedTimes", "SetWatched"):
        env.sage.add_fault(function=function, delay_s=0.4)
    before = snapshot(world)

    began = time.monotonic()
    code, out, err = interrupted(env, ["all", "-s"], env.sage_writes)
    time.sleep(0.5)  # any write still sleeping in the fake lands (none should be left)

    assert code == 130, out + err
    assert "Interrupted: finishing the writes already started" in err
    assert "Interrupted: the summary covers the items done so far." in out
    total = next(ln for ln in out.splitlines() if ln.startswith("Total:"))
    log = env.log_path.read_text(encoding="utf-8")
    for text in (out, err, log):
        assert "Traceback" not in text
    assert_no_secrets(out, err, log)

    after = snapshot(world)
    # every item is either untouched or fully written: a re-watch never ends cleared
    # without its position, and Plex is never written (SageTV is the side behind)
    for item in rewatches:
        airing = world.sage.airing_json(item.airing_id)
        untouched = after[item.title] == before[item.title]
        plex_position = world.plex.item(item.rating_key).view_offset_ms
        written = (not airing["IsWatched"]
                   and abs(airing["WatchedEndTime"] - item.file_start_ms - plex_position) < 2000)
        assert untouched or written, f"{item.title} is half-written: {airing}"
    for item in marks:
        assert after[item.title] == before[item.title] or after[item.title].sage_watched
    assert env.plex_writes() == []
    # Ctrl-C stops the run: not every out-of-sync item was written after it
    written_items = {q.param("1") for q in env.sage_writes()}
    assert len(written_items) < len(rewatches) + len(marks), "Ctrl-C did not stop the run"
    assert "[skipped]" in out and "interrupted before writing" in out
    # and the summary counts exactly what was done
    updated = sum(1 for ln in out.splitlines() if "[updated]" in ln)
    assert updated == len(written_items) and f"{updated} updated" in total
    assert time.monotonic() - began < 20
