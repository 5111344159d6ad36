"""What a run leaves behind for its user (issue 19, docs/rules.md §7): each item once under
the heading of what happened to it, a total whose parts add up, a dated run line, -q for
cron, --history, the log file's line per item written, errors on stderr and in --json,
and progress on a terminal."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import sqlite3
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest

import sageplex_sync
from tests.conftest import Env, assert_no_secrets
from tests.fakes.world import DAY, HOUR, MIN, SEC, World, at, none, watched
from tests.user import User

TOOL = Path(sageplex_sync.__file__).resolve()
ROOT = TOOL.parent
RUN_LINE = re.compile(r"^(Run \d+|Report-only run \(not numbered\)), "
                      r"\w{3} \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: ")


def main(*argv: str) -> tuple[int, str, str]:
    """The tool as a user runs it (no --all-items added)."""
    out, err = io.StringIO(), io.StringIO()
    code = sageplex_sync.main(list(argv), out=out, err=err, stdin=io.StringIO())
    return int(code), out.getvalue(), err.getvalue()


def every_kind(world: World) -> dict[str, Any]:
    """A library with an item of every kind the report has a heading for."""
    return {
        "to_plex": world.episode("Castle", 1, 1, "Pilot", sage=watched(), plex=none()),
        "to_plex_2": world.episode("Castle", 1, 2, "Nanny", sage=at(20 * MIN), plex=none()),
        "to_sage": world.movie("Collateral", year=2004, sage=none(), plex=watched(ago=DAY)),
        "in_sync": world.episode("Castle", 1, 3, "Hedge", sage=none(), plex=none()),
        "skipped": world.episode("Castle", 1, 4, "Forty-five", sage=at(45 * SEC), plex=none()),
        "failing": world.movie("Ronin", year=1998, sage=at(50 * MIN), plex=none()),
        "not_in_sage": world.movie("Blu-ray Rip", year=2010, in_sage=False, plex=watched()),
        "twin": world.episode("Twins", 1, 1, "First", file_name="Twins-S01E01.mpg",
                              plex=watched()),
        "twin_2": world.episode("Twins", 1, 2, "Second", file_name="Twins-S01E01.mpg",
                                in_plex=False, sage=watched(ago=DAY)),
        "sage_only": world.episode("Castle", 1, 5, "Sleeper", in_plex=False, sage=none()),
    }


def fail_plex_writes_of(env: Env, rating_key: int | None) -> None:
    for function, name in (("timeline", "ratingKey"), ("progress", "key"), ("scrobble", "key")):
        env.plex.add_fault(function=function, status=500,
                           when=lambda r, n=name: r.param(n) == str(rating_key))


def ids_listed(out: str) -> list[int]:
    """The ids of the report's item lines (Plex media ids, SageTV media file ids)."""
    return [int(line.split()[0]) for line in out.splitlines()
            if line[:1] == " " and line.split()[0].isdigit()]


def total_parts(total: str) -> dict[str, int]:
    """'Total: 9 videos, 1 in-sync, ...; 1 SageTV recording not in Plex.' as numbers."""
    videos_part, _, sage_part = total.removeprefix("Total: ").rstrip(".").partition("; ")
    parts = {}
    for part in videos_part.split(", "):
        number, words = part.split(" ", 1)
        parts[words] = int(number)
    if sage_part:
        parts["SageTV not in Plex"] = int(sage_part.split()[0])
    return parts


VIDEO_KINDS = ("in-sync", "PLEX out-of-sync", "SageTV out-of-sync", "out-of-sync on both",
               "left as is", "not in SageTV", "ambiguous in SageTV", "unreadable")


# -- the report: each item once, under the heading of what happened ----------------------------

GOLDEN_SYNC = """\
RUN LINE: sync of all sections

Updated on Plex (2):
== Castle, season 1 (-m 1000 for the show, 1001 for the season)
   1002  Castle - s01e01 - Pilot  [updated]  SageTV watched, Plex not watched: row 1: \
SageTV watched, Plex not: mark watched on Plex
   1003  Castle - s01e02 - Nanny  [updated]  SageTV at 0:20:00, Plex not watched: row 3: \
SageTV at 0:20:00, Plex not: set Plex position to 0:20:00

Updated on SageTV (1):
   1004  Collateral (2004)  [updated]  SageTV not watched, Plex watched: row 2: Plex \
watched, SageTV not: mark watched on SageTV

Skipped (1):
== Castle, season 1 (-m 1000 for the show, 1001 for the season)
   1006  Castle - s01e04 - Forty-five  [skipped]  SageTV at 0:00:45, Plex not watched: \
row 3: SageTV at 0:00:45, Plex not: Plex ignores positions of a minute or less (0:00:45)

Failed (1):
   1007  Ronin (1998)  [failed]  SageTV at 0:50:00, Plex not watched: row 3: SageTV at \
0:50:00, Plex not: set Plex position to 0:50:00: Plex at ADDRESS answered HTTP 500 to set \
the position of media id 1007

Not in SageTV (1; Plex items whose file SageTV does not have):
   1008  Blu-ray Rip (2010)  [not in SageTV]

Not in Plex (1; SageTV recordings, by media file id, that no Plex item holds):
 100009  Castle-Sleeper-3490063-0.mpg  [not in Plex]

Ambiguous in SageTV (1; the same file name twice):
== Twins, season 1 (-m 1009 for the show, 1010 for the season)
   1011  Twins - s01e01 - First  [ambiguous in SageTV]  media files 100007, 100008

Total: 8 videos, 1 in-sync, 4 PLEX out-of-sync, 1 SageTV out-of-sync, 1 not in SageTV, \
1 ambiguous in SageTV, 3 updated, 1 skipped, 1 failed; 1 SageTV recording not in Plex.
"""


def normalised(out: str) -> str:
    lines = out.splitlines()
    assert RUN_LINE.match(lines[0]), lines[0]
    lines[0] = "RUN LINE: " + lines[0].split(": ", 1)[1]
    return re.sub(r"Plex at 127\.0\.0\.1:\d+", "Plex at ADDRESS", "\n".join(lines) + "\n")


def test_a_sync_lists_each_item_once_under_what_happened_to_it(world: World, start) -> None:
    items = every_kind(world)
    env = start()
    fail_plex_writes_of(env, items["failing"].rating_key)

    code, out, err = main("all", "-s", "-x", "30")

    assert code == 1
    assert normalised(out) == GOLDEN_SYNC
    listed = ids_listed(out)
    assert len(listed) == len(set(listed))  # nothing printed twice
    assert items["in_sync"].rating_key not in listed  # counted, not listed
    # the one failure is said on stderr too, once
    assert err.count(f"{sageplex_sync.PROG}: error: 1 item(s) failed ([1007] Ronin") == 1
    assert len(err.splitlines()) == 1
    assert_no_secrets(out, err)


def test_the_totals_parts_add_up_and_count_sagetv_recordings_not_in_plex(world: World,
                                                                       start) -> None:
    items = every_kind(world)
    env = start()

    for argv in (["all"], ["all", "-s", "-x", "30"], ["all"]):
        code, out, _ = main(*argv)
        total = out.splitlines()[-1]
        parts = total_parts(total)
        plex_items = sum(1 for i in world.items if i.rating_key is not None)
        assert parts["videos"] == plex_items == 8
        assert sum(parts.get(kind, 0) for kind in VIDEO_KINDS) == parts["videos"], total
        assert parts["SageTV not in Plex"] == 1, total  # the sleeper; the twin is held
    assert env.world.sage_watched(items["to_sage"])


def test_every_item_lists_each_once_in_sync_ones_too(world: World, start) -> None:
    items = every_kind(world)
    start()

    for flag in ("--all-items", "-v"):
        code, out, _ = main("all", flag)
        listed = ids_listed(out)
        assert len(listed) == len(set(listed)) == 8 + 1  # every Plex item, the sleeper
        assert f"   {items['in_sync'].rating_key}  Castle - s01e03 - Hedge  [OK]" in out
        assert "\nIn sync (2):\n" in out  # 45 s is no position with the default -x 60


def test_a_long_heading_lists_ten_and_counts_the_rest(world: World, start) -> None:
    keys = [world.movie(f"Film {n}", year=1990, sage=watched(ago=DAY), plex=none()).rating_key
            for n in range(40)]
    start()

    code, out, _ = main("all", "-s")

    assert code == 0
    assert out.count("\nUpdated on Plex (40):\n") == 1
    listed = ids_listed(out)
    assert len(listed) == len(set(listed)) == 10 and set(listed) <= set(keys)
    assert ("   ... and 30 more (--all-items lists every item; the log file has a line for "
            "every item written)") in out
    assert "40 updated" in out.splitlines()[-1]


def test_items_with_nothing_to_do_are_counted_every_run_and_listed_when_new(
        world: World, start) -> None:
    items = every_kind(world)
    env = start()
    assert main("all", "-s", "-x", "30")[0] == 0  # the first sync lists every one
    known = (items["not_in_sage"].rating_key, items["sage_only"].media_file_id,
             items["twin"].rating_key)

    code, out, _ = main("all", "-s", "-x", "30")  # nothing new: counted, not listed
    assert code == 0
    assert not set(known) & set(ids_listed(out))
    assert "1 not in SageTV" in out and "1 SageTV recording not in Plex" in out

    new_rip = world.plex.add_movie(world.movie_section, "New Rip", "/mnt/sagetv/movies/New.mkv",
                                   90 * MIN, year=2025)
    code, out, _ = main("all", "-s")
    assert "\nNot in SageTV (2, 1 new since the last sync; Plex items whose file SageTV does " \
           "not have):\n" in out
    assert ids_listed(out) == [new_rip]
    code, out, _ = main("all", "--all-items")  # asked for: every one
    assert {items["not_in_sage"].rating_key, new_rip, items["sage_only"].media_file_id} \
        <= set(ids_listed(out))
    assert env.writes()


# -- the run line, -q for cron -----------------------------------------------------------------

def test_every_sync_begins_with_its_dated_run_line(world: World, start) -> None:
    every_kind(world)
    start()

    first = main("all", "-s", "-x", "30")[1].splitlines()[0]
    report = main("all")[1].splitlines()[0]
    second = main("TV Shows", "-s")[1].splitlines()[0]

    assert RUN_LINE.match(first) and first.startswith("Run 1, ")
    assert first.endswith(": sync of all sections")
    assert report.startswith("Report-only run (not numbered), ")
    assert report.endswith(": report of all sections")
    assert second.startswith("Run 2, ") and second.endswith(": sync of section(s) 'TV Shows'")


def test_quiet_cron_runs_print_the_changes_then_nothing_on_a_quiet_night(world: World,
                                                                        start) -> None:
    items = every_kind(world)
    env = start()

    code, busy, err = main("all", "-s", "-q", "-x", "30")  # the first night: changes

    assert code == 0, err
    lines = busy.splitlines()
    assert RUN_LINE.match(lines[0])
    headings = [ln for ln in lines if ln.endswith(":") and not ln.startswith(" ")]
    assert headings == ["Updated on Plex (3):", "Updated on SageTV (1):"]
    assert lines[-1].startswith("Total: 8 videos")

    assert main("all", "-s", "-q", "-x", "30") == (0, "", "")  # a quiet night: nothing at all

    User(world, env.plex).plex_finish(items["twin"])  # nothing to do about it either
    assert main("all", "-s", "-q", "-x", "30") == (0, "", "")
    User(world, env.plex).plex_unwatch(items["to_sage"])  # watched on Plex: one change
    code, night, _ = main("all", "-s", "-q", "-x", "30")
    assert code == 0
    assert RUN_LINE.match(night.splitlines()[0]) and night.startswith("Run 4, ")
    assert ids_listed(night) == [items["to_sage"].rating_key]
    assert "\nUpdated on SageTV (1):\n" in night and night.splitlines()[-1].startswith("Total:")


def test_quiet_still_says_a_failure(world: World, start) -> None:
    items = every_kind(world)
    env = start()
    fail_plex_writes_of(env, items["failing"].rating_key)

    code, out, err = main("all", "-s", "-q", "-x", "30")

    assert code == 1
    assert "\nFailed (1):\n" in out and "Skipped" not in out and "Not in SageTV" not in out
    assert "1 item(s) failed" in err


@pytest.mark.parametrize("argv", [["all", "-q", "-v"], ["all", "-q", "--all-items"],
                                  ["all", "-q", "--json"], ["--check", "-q"]])
def test_quiet_does_not_go_with_more_output(argv: list[str]) -> None:
    code, out, err = main(*argv)

    assert code == 2 and out == ""
    assert err.count("(see --help)") == 1 and "-q" in err


# -- --history -----------------------------------------------------------------------------

def test_history_lists_syncs_an_undo_and_a_failed_run(world: World, start) -> None:
    every_kind(world)
    env = start()
    assert main("all", "-s", "-x", "30")[0] == 0
    assert main("--undo")[0] == 0
    env.sage.add_fault(function="GetMediaFiles", status=500)
    code, out, err = main("all", "-s")
    assert code == 1 and "error:" in err
    assert RUN_LINE.match(out) and out.startswith("Run 3, ")  # a failed run is dated too
    env.sage.clear_faults()

    code, out, err = main("--history")

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Runs kept in ") and "--undo RUN" in lines[0]
    runs = [ln for ln in lines if ln[:5].strip().isdigit()]
    assert [ln.split()[:2][0] for ln in runs] == ["1", "2", "3"]
    assert re.match(r"\s+1  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d  sync   8 videos, 1 in-sync, "
                    r".*, 4 updated.*; 1 SageTV recording not in Plex; exit 0; undone by run 2$",
                    runs[0])
    assert re.match(r"\s+2  .*  undo   .*4 updated; exit 0$", runs[1])
    assert re.match(r"\s+3  .*  sync   FAILED: SageTV .*HTTP 500.*; exit 1$", runs[2])
    code, out, _ = main("--history", "1", "--json")
    assert code == 0
    [last] = [json.loads(line) for line in out.splitlines()]
    assert last["run"] == 3 and last["kind"] == "sync" and last["counts"]["exit_code"] == 1
    assert_no_secrets(out)


def test_history_says_when_there_are_no_runs_yet(world: World, start) -> None:
    start()

    code, out, err = main("--history")

    assert code == 0 and out == ""
    assert "no runs yet" in err


def test_history_shows_a_run_an_undo_put_back(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with sageplex_sync.StateStore(path, write=True) as state:
        first = state.finish_run(0, "sync", ["all", "-s"], (), (), counts={
            "videos": 3, "updated": 2, "exit_code": 0})
        state.finish_run(0, "undo", ["--undo"], (), (), counts={"updated": 2, "exit_code": 0},
                         undoes=first)
        [one, two] = state.history()
    assert sageplex_sync.history_words(one) == "3 videos, 2 updated; exit 0; undone by run 2"
    assert two.undone_by is None


def test_state_keeps_the_last_500_runs_and_every_base(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    base = sageplex_sync.BaseRecord(7, "a.mpg", sageplex_sync.NOT_WATCHED,
                                    sageplex_sync.NOT_WATCHED, {}, {})
    row = sageplex_sync.JournalRow(0, 1, 7, "A", "row 1", "[]", sageplex_sync.NOT_WATCHED,
                                   sageplex_sync.NOT_WATCHED, None, None, "updated", "")
    with sageplex_sync.StateStore(path, write=True) as state:
        state.finish_run(0, "sync", [], [(1, base)], [row])
        for _ in range(504):
            state.finish_run(0, "sync", [], (), [row], counts={"exit_code": 0})
        runs = state.history()
        assert state.db is not None
        journal_runs = {r[0] for r in state.db.execute("SELECT run_id FROM journal")}
        assert state.next_run_id() == 506
        assert set(state.bases()) == {1}  # the base is never pruned
    assert [r.run_id for r in runs] == list(range(6, 506))
    assert journal_runs == set(range(6, 506))


def test_a_schema_1_state_file_is_upgraded_in_place(tmp_path: Path, world: World,
                                                    start) -> None:
    world.movie("Heat", sage=watched(ago=DAY), plex=none())
    env = start()
    path = env.config_path.with_name(sageplex_sync.STATE_FILE_NAME)
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE base (rating_key INTEGER PRIMARY KEY, media_file_id INTEGER,
            file_name TEXT, sage TEXT, plex TEXT, sage_raw TEXT, plex_raw TEXT,
            pending_sage TEXT, pending_plex TEXT, pending_on TEXT, run_id INTEGER);
        CREATE TABLE runs (run_id INTEGER PRIMARY KEY, started_at TEXT, kind TEXT,
            argv TEXT, writes INTEGER);
        CREATE TABLE journal (run_id INTEGER, rating_key INTEGER, media_file_id INTEGER,
            title TEXT, rule TEXT, writes TEXT, sage_before TEXT, plex_before TEXT,
            sage_after TEXT, plex_after TEXT, outcome TEXT, detail TEXT);
        INSERT INTO runs VALUES (1, '2026-11-01 03:00:00', 'sync', '[]', 4);""")
    old.commit()
    old.close()

    assert main("--history")[1].splitlines()[-1].endswith("sync   4 item(s) written")
    code, out, err = main("all", "-s")

    assert code == 0, err
    assert out.startswith("Run 2, ")
    history = main("--history")[1].splitlines()
    assert history[-2].endswith("sync   4 item(s) written")  # the old run is kept
    assert history[-1].endswith("1 updated; exit 0")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)


# -- the log file ------------------------------------------------------------------------------

def test_the_log_has_a_dated_line_for_every_item_written_without_v(world: World,
                                                                    start) -> None:
    items = every_kind(world)
    env = start()
    fail_plex_writes_of(env, items["failing"].rating_key)

    r = env.run("all", "-s", "-x", "30", every_item=False)

    date = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\| "
    lines = r.log.splitlines()
    assert any(re.match(date + r"INFO    \| MainThread\| Run 1, ", ln) for ln in lines)
    written = [ln for ln in lines if re.search(r"\| (updated|failed) \[\d+\]", ln)]
    assert len(written) == 4
    pilot = items["to_plex"]
    assert any(re.match(date + r"INFO .*\| updated \[" + str(pilot.rating_key) + r"\] "
                        r"Castle - s01e01 - Pilot \(media file " + str(pilot.media_file_id)
                        + r"\): mark watched on Plex \(row 1: SageTV watched, Plex not\)$", ln)
               for ln in written)
    assert any(re.match(date + r"WARNING .*\| failed \[1007\] Ronin \(1998\) \(media file "
                        r"\d+\): set Plex position to 0:50:00 \(row 3: .*\); .*HTTP 500", ln)
               for ln in written)
    assert any("| Total: 8 videos" in ln for ln in lines)
    assert_no_secrets(r.log)


# -- errors: on stderr, once; --json's summary when the run cannot start ------------------------

def test_json_prints_one_summary_with_the_error_when_the_config_is_broken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sageplex_cfg.json"
    config.write_text("{not json", encoding="utf-8")
    monkeypatch.setenv("SAGEPLEX_CFG", str(config))

    code, out, err = main("all", "--json")

    assert code == 1
    [summary] = [json.loads(line) for line in out.splitlines()]
    assert summary["summary"] is None and summary["exit_code"] == 1
    assert str(config) in summary["error"]
    assert err == f"{sageplex_sync.PROG}: error: {summary['error']}\n"


def test_json_prints_one_summary_with_the_error_when_a_server_is_unreachable(
        world: World, start) -> None:
    world.movie("Heat")
    start(sagex__port=1)  # nothing listens there

    code, out, err = main("all", "-s", "--json")

    assert code == 1
    [summary] = [json.loads(line) for line in out.splitlines()]
    assert summary == {"summary": None, "error": summary["error"], "exit_code": 1}
    assert "cannot reach SageTV" in summary["error"] and len(err.splitlines()) == 1


def test_a_usage_error_says_see_help_once(world: World, start) -> None:
    start()

    for argv in ([], ["all", "--bogus"], ["-l", "all"]):
        code, out, err = main(*argv)
        assert code == 2 and out == ""
        assert err.count("see --help") == 1, err


def test_with_v_an_error_is_said_once(world: World, start) -> None:
    world.movie("Heat")
    env = start()
    env.sage.add_fault(function="GetMediaFiles", status=500)

    code, _, err = main("all", "-v")

    assert code == 1
    assert err.count("answered HTTP 500") == 1, err


# -- progress on a terminal ----------------------------------------------------------------------

def run_on_a_terminal(env: Env, *argv: str, columns: int = 100) -> tuple[int, str, str]:
    """``python sageplex_sync.py ARGV`` with stderr on a pseudo-terminal of a real size."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    environment = {**os.environ, "SAGEPLEX_CFG": str(env.config_path)}
    try:
        proc = subprocess.Popen([sys.executable, str(TOOL), *argv], stdout=subprocess.PIPE,
                                stderr=slave, stdin=subprocess.DEVNULL, env=environment)
    finally:
        os.close(slave)
    seen = bytearray()
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    out = proc.stdout.read().decode() if proc.stdout else ""
    code = proc.wait(60)
    return code, out, seen.decode("utf-8", "replace")


def test_progress_shows_time_while_sagetv_builds_its_listing_and_an_eta_for_the_writes(
        world: World, start) -> None:
    for n in range(6):
        world.movie(f"Film {n}", year=2000 + n, sage=watched(ago=DAY), plex=none())
    env = start(plex__write_workers=1)
    env.sage.add_fault(function="GetMediaFiles", delay_s=1.6)  # a big library's listing
    env.plex.add_fault(function="scrobble", delay_s=0.4)  # slow writes, one at a time

    code, out, err = run_on_a_terminal(env, "all", "-s", columns=72)

    assert code == 0, err
    frames = [f.replace("\x1b[K", "") for f in re.split(r"\r", err) if f.strip()]
    waiting = [f for f in frames if "waiting for SageTV's listing" in f]
    assert any("reading Plex: 6 items;" in f for f in waiting)  # counted while SageTV works
    assert any(re.search(r" 0:01$", f) for f in waiting)  # the time gone by moves
    assert {f[0] for f in waiting} >= {"|", "/"}  # the spinner turns
    writing = [f for f in frames if f.startswith("writing:")]
    assert any(re.search(r"\d+/6 \[\d\d:\d\d<\d\d:\d\d", f) for f in writing)  # total, ETA
    assert all(len(f) <= 72 for f in frames)  # one line of the terminal, never wrapped
    assert "Total: 6 videos" in out and "writing" not in out


def test_no_progress_and_nothing_on_stderr_without_a_terminal(world: World, start) -> None:
    world.movie("Heat", sage=watched(ago=DAY), plex=none())
    env = start()
    env.sage.add_fault(function="GetMediaFiles", delay_s=0.6)

    proc = subprocess.run([sys.executable, str(TOOL), "all", "-s"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "SAGEPLEX_CFG": str(env.config_path)})

    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("Run 1, ")


# -- the sandbox --------------------------------------------------------------------------------

def test_sandbox_explains_its_numbers_and_takes_a_run_that_starts_with_a_dash(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import sandbox
    monkeypatch.setenv("SAGEPLEX_CFG", "set-by-the-sandbox")

    code = sandbox.main(["--run", "--check", "--run", "all"])

    captured = capsys.readouterr()
    assert code == 0
    assert ("sandbox: 32 recordings: 30 in SageTV (media files: what --check counts), 30 in "
            "Plex (the report's videos)") in captured.err
    assert "SageTV at 127.0.0.1" in captured.out and ": 30 media files" in captured.out
    total = captured.out.splitlines()[-1]
    assert total.startswith("Total: 30 videos") and total.endswith(
        "; 1 SageTV recording not in Plex.")
    assert "$ sageplex_sync.py --check" in captured.err


# -- a big first sync ------------------------------------------------------------------------

def test_a_big_first_sync_prints_a_screenful_each_item_once(world: World, start) -> None:
    for n in range(400):
        sage, plex = [(watched(ago=DAY), none()), (none(), watched(ago=DAY)),
                      (watched(ago=2 * DAY), watched(ago=2 * DAY))][n % 3]
        world.episode(f"Show {n // 40}", 1, 1 + n % 40, f"Episode {n}", sage=sage, plex=plex,
                      duration_ms=HOUR)
    for n in range(30):
        world.movie(f"Rip {n}", in_sage=False, plex=none())
    start()

    code, out, _ = main("all", "-s")

    assert code == 0
    listed = ids_listed(out)
    assert len(listed) == len(set(listed)) == 30  # ten under each of three headings
    assert len(out.splitlines()) < 70
    assert "267 updated" in out.splitlines()[-1]
