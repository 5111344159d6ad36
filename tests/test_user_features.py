"""The user-facing features end to end, against the fake servers: --json and --sagedata,
what the default report lists and its headings, the progress bar, --check, --interval, the
library commands, -n, -p without a terminal, the log file and the sandbox."""

from __future__ import annotations

import calendar
import fcntl
import io
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import sageplex_sync
from tests.conftest import Env, assert_no_secrets
from tests.fakes import fake_plex
from tests.fakes.world import DAY, MIN, SEC, World, at, none, watched

TOOL = Path(sageplex_sync.__file__).resolve()
ROOT = TOOL.parent

ITEM_KEYS = {"media_id", "title", "show", "show_id", "season", "season_id", "episode",
             "media_file_id", "sage", "plex", "verdict", "rule", "action", "outcome", "detail"}
SIDE_KEYS = {"state", "position_ms", "last_watched"}


class Items:
    """One item in each state a report has a heading for (see ``declare``)."""

    def __init__(self, world: World) -> None:
        self.to_plex = world.episode("Castle", 1, 1, "Pilot", sage=watched(), plex=none())
        self.to_sage = world.episode("Castle", 1, 2, "Nanny", sage=none(), plex=watched(ago=DAY))
        self.in_sync = world.episode("Castle", 1, 3, "Hedge", sage=none(), plex=none())
        self.movie = world.movie("Heat", sage=at(20 * MIN), plex=none())
        self.not_in_sage = world.movie("Blu-ray Rip", in_sage=False, plex=watched())
        self.twin = world.episode("Twins", 1, 1, "First", file_name="Twins-S01E01.mpg",
                                  plex=watched())
        world.episode("Twins", 1, 2, "Second", file_name="Twins-S01E01.mpg", in_plex=False,
                      sage=watched(ago=DAY))

    @property
    def count(self) -> int:
        return 6  # Plex items (the second twin is SageTV's only)


def main(*argv: str, stdin: Any = None) -> tuple[int, str, str]:
    """The tool as a user runs it: no --all-items added."""
    out, err = io.StringIO(), io.StringIO()
    code = sageplex_sync.main(list(argv), out=out, err=err, stdin=stdin)
    return int(code), out.getvalue(), err.getvalue()


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def snapshot(world: World) -> list[tuple]:
    state = []
    for item in world.items:
        if item.airing_id is not None:
            state.append(("sage", item.airing_id, world.sage_watched(item),
                          world.sage_position_ms(item)))
        if item.rating_key is not None:
            plex = world.plex_item(item)
            state.append(("plex", item.rating_key, plex.view_count, plex.view_offset_ms))
    return state


# -- 1. --json and --sagedata ------------------------------------------------------------------

def test_json_report_is_one_object_per_item_then_the_summary(world: World, start) -> None:
    items = Items(world)
    env = start()

    code, out, err = main("all", "--json")

    assert code == 0 and err == ""
    objects = json_lines(out)  # every line parses: nothing else is on stdout
    assert len(objects) == items.count + 1
    *entries, summary = objects
    for entry in entries:
        assert set(entry) == ITEM_KEYS
    by_id = {e["media_id"]: e for e in entries}
    assert set(by_id) == {i.rating_key for i in (items.to_plex, items.to_sage, items.in_sync,
                                                   items.movie, items.not_in_sage, items.twin)}
    pilot = by_id[items.to_plex.rating_key]
    assert (pilot["show"], pilot["season"], pilot["episode"]) == ("Castle", 1, 1)
    assert "Pilot" in pilot["title"]
    assert pilot["media_file_id"] == items.to_plex.media_file_id
    assert set(pilot["sage"]) == SIDE_KEYS and set(pilot["plex"]) == SIDE_KEYS
    assert pilot["sage"]["state"] == "watched"
    watched_at_s = calendar.timegm(time.strptime(pilot["sage"]["last_watched"],
                                                 "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(watched_at_s - (world.clock.ms() - DAY) / 1000) < 120  # watched a day ago
    assert pilot["plex"] == {"state": "none", "position_ms": 0, "last_watched": None}
    assert pilot["verdict"] == "PLEX out of sync"
    assert pilot["rule"].startswith("row 1")
    assert pilot["action"] == ["mark watched on Plex"]
    assert pilot["outcome"] == "unchanged"  # a report writes nothing
    heat = by_id[items.movie.rating_key]
    assert (heat["show"], heat["season"], heat["episode"]) == (None, None, None)
    assert heat["sage"]["state"] == "progress" and heat["sage"]["position_ms"] == 20 * MIN
    hedge = by_id[items.in_sync.rating_key]
    assert (hedge["verdict"], hedge["action"], hedge["outcome"]) == ("OK", [], "unchanged")
    rip = by_id[items.not_in_sage.rating_key]
    assert (rip["verdict"], rip["sage"], rip["rule"]) == ("not in SageTV", None, None)
    assert by_id[items.twin.rating_key]["verdict"] == "ambiguous in SageTV"
    # the summary: every count present (0 when none), and the exit code
    assert summary["exit_code"] == 0
    assert set(summary["summary"]) == set(sageplex_sync.Report.JSON_COUNTS)
    counts = summary["summary"]
    assert (counts["videos"], counts["in_sync"], counts["plex_out_of_sync"],
            counts["sage_out_of_sync"], counts["not_in_sage"], counts["ambiguous"],
            counts["updated"], counts["failed"]) == (6, 1, 2, 1, 1, 1, 0, 0)
    assert env.writes() == []


def test_json_sync_reports_the_outcome_of_each_item(world: World, start) -> None:
    items = Items(world)
    env = start()

    code, out, err = main("all", "-s", "--json")

    assert code == 0 and err == ""
    *entries, summary = json_lines(out)
    by_id = {e["media_id"]: e for e in entries}
    assert by_id[items.to_plex.rating_key]["outcome"] == "updated"
    assert by_id[items.to_sage.rating_key]["action"] == ["mark watched on SageTV"]
    assert by_id[items.to_sage.rating_key]["outcome"] == "updated"
    assert by_id[items.in_sync.rating_key]["outcome"] == "unchanged"
    assert summary == {"summary": {**dict.fromkeys(sageplex_sync.Report.JSON_COUNTS, 0),
                                   "videos": 6, "in_sync": 1, "plex_out_of_sync": 2,
                                   "sage_out_of_sync": 1, "not_in_sage": 1, "ambiguous": 1,
                                   "updated": 3, "unchanged": 1},
                       "error": None, "exit_code": 0,
                       "run": summary["run"]}
    assert summary["run"].startswith("Run 1, ") and summary["run"].endswith(
        ": sync of all sections")
    assert world.plex_item(items.to_plex).view_count == 1
    assert world.sage_watched(items.to_sage)
    assert env.writes()


def test_json_failed_write_gives_exit_1_in_the_summary_and_the_exit_code(world: World,
                                                                          start) -> None:
    items = Items(world)
    env = start()
    env.plex.add_fault(function="scrobble", status=500)

    code, out, err = main("all", "-s", "--json")

    assert code == 1
    *entries, summary = json_lines(out)
    assert {e["media_id"]: e for e in entries}[items.to_plex.rating_key]["outcome"] == "failed"
    assert summary["exit_code"] == 1 and summary["summary"]["failed"] == 1
    assert f"[{items.to_plex.rating_key}]" in summary["error"] and "HTTP 500" in summary["error"]
    # the failure is said on stderr too, once
    assert err.count("error:") == 1 and f"[{items.to_plex.rating_key}]" in err


@pytest.mark.parametrize(("argv", "config", "code", "says"), [
    (["Cartoons", "--json"], {}, 2, "Plex has no library section 'Cartoons'"),
    (["-l", "--json"], {}, 2, "--json goes with a sync or report"),
    (["all", "--json"], {"plex__token": "wrong-token-42"}, 1, "refused the token"),
    (["all", "--json"], {"sagex__password": "wrong-pw-42"}, 1, "SageTV"),
], ids=["unknown-section", "with-list", "plex-refuses", "sage-refuses"])
def test_json_errors_are_one_line_on_stderr_and_one_summary_on_stdout(
        world: World, start, argv: list[str], config: dict, code: int, says: str) -> None:
    Items(world)
    env = start(**config)

    result = main(*argv)

    assert result[0] == code
    if "-l" in argv:  # --json does not go with -l: no JSON at all
        assert result[1] == ""
    else:  # the run could not start: still one summary object, with the error and code
        assert json_lines(result[1]) == [{"summary": None, "error": json_lines(result[1])[0][
            "error"], "exit_code": code}]
        assert says in json_lines(result[1])[0]["error"]
    assert len(result[2].splitlines()) == 1 and says in result[2]
    assert "Traceback" not in result[2]
    assert_no_secrets(*result[1:])
    assert "wrong-token-42" not in result[2] and "wrong-pw-42" not in result[2]
    assert env.writes() == []


def test_sagedata_prints_only_json_on_stdout(world: World, start) -> None:
    items = Items(world)
    env = start()

    code, out, err = main("-m", str(items.to_plex.rating_key), str(items.movie.rating_key),
                          "--sagedata")

    assert code == 0
    data = json.loads(out)  # the whole of stdout is one JSON document
    assert set(data) == {str(items.to_plex.rating_key), str(items.movie.rating_key)}
    assert data[str(items.to_plex.rating_key)]["MediaFileID"] == items.to_plex.media_file_id
    assert "SageTV data" in err  # the heading is a message, on stderr
    assert_no_secrets(out, err)
    assert env.writes() == []


# -- 2. what the default report lists -------------------------------------------------------

def test_default_report_counts_in_sync_items_but_does_not_list_them(world: World,
                                                                    start) -> None:
    items = Items(world)
    env = start()

    result = env.run("all", every_item=False)

    assert result.code == 0
    keys = {ln.split()[0] for ln in result.lines if ln[:7].strip().isdigit()}
    assert str(items.in_sync.rating_key) not in keys
    assert keys == {str(i.rating_key) for i in (items.to_plex, items.to_sage, items.movie,
                                                 items.not_in_sage, items.twin)}
    assert "1 in-sync" in result.total
    assert "[OK]" not in result.out


@pytest.mark.parametrize("flag", ["--all-items", "-v"])
def test_all_items_and_verbose_list_in_sync_items_too(world: World, start, flag: str) -> None:
    items = Items(world)
    start()

    code, out, err = main("all", flag)

    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.split()[:1] == [str(items.in_sync.rating_key)])
    assert "[OK]" in line
    if flag == "-v":
        assert err  # -v adds debug detail on stderr
    assert_no_secrets(out, err)


def test_sync_summary_headings_come_in_order_then_the_total(world: World, start) -> None:
    items = Items(world)
    skipped = world.episode("Castle", 3, 4, "Forty-five", sage=at(45 * SEC), plex=none())
    failing = world.movie("Ronin", year=1998, sage=at(50 * MIN), plex=none())
    env = start()
    env.plex.add_fault(function="timeline", status=500,
                       when=lambda r: r.param("ratingKey") == str(failing.rating_key))
    env.plex.add_fault(function="progress", status=500,
                       when=lambda r: r.param("key") == str(failing.rating_key))

    code, out, _ = main("all", "-s", "-x", "30")

    assert code == 1  # a write failed
    lines = out.splitlines()
    assert lines[0].startswith("Run 1, ")
    headings = [ln for ln in lines if ln and not ln[0].isspace() and ln.endswith(":")]
    assert headings == [
        "Updated on Plex (2):", "Updated on SageTV (1):", "Skipped (1):", "Failed (1):",
        "Not in SageTV (1; Plex items whose file SageTV does not have):",
        "Ambiguous in SageTV (1; the same file name twice):"]

    def under(heading: str) -> list[str]:
        """The media ids of the item lines under a heading (season lines skipped)."""
        at_ = lines.index(heading) + 1
        keys = []
        while at_ < len(lines) and lines[at_]:
            if not lines[at_].startswith("== "):
                keys.append(int(lines[at_].split()[0]))
            at_ += 1
        return keys
    assert items.to_plex.rating_key in under("Updated on Plex (2):")
    assert under("Updated on SageTV (1):") == [items.to_sage.rating_key]
    assert under("Skipped (1):") == [skipped.rating_key]
    assert under("Failed (1):") == [failing.rating_key]
    listed = [k for h in headings for k in under(h)]
    assert len(listed) == len(set(listed)) == 2 + 1 + 1 + 1 + 1 + 1  # each item once
    assert lines[-1].startswith("Total: 8 videos, ")
    assert lines[-1].endswith(".") and "1 failed" in lines[-1] and "1 skipped" in lines[-1]


def test_total_says_video_in_the_singular_for_one(world: World, start) -> None:
    world.movie("Heat", sage=none(), plex=none())
    start()

    code, out, _ = main("all")

    assert code == 0
    assert out.splitlines()[-1] == "Total: 1 video, 1 in-sync."


# -- 3. the progress bar ---------------------------------------------------------------------

def _run_with_stderr_on_a_terminal(env: Env, *argv: str) -> tuple[int, str, str]:
    """``python sageplex_sync.py ARGV`` with stderr on a pseudo-terminal; (code, out, err)."""
    master, slave = os.openpty()
    # a terminal 24 lines by 100 columns (a new pseudo-terminal has 0 columns: no room for a bar)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    environment = {**os.environ, "SAGEPLEX_CFG": str(env.config_path)}
    try:
        proc = subprocess.Popen([sys.executable, str(TOOL), *argv], stdout=subprocess.PIPE,
                                stderr=slave, stdin=subprocess.DEVNULL, env=environment)
    finally:
        os.close(slave)
    seen = bytearray()
    while True:
        ready, _, _ = select.select([master], [], [], 30)
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
    code = proc.wait(30)
    return code, out, seen.decode("utf-8", "replace")


def test_progress_bar_is_shown_on_a_terminal(world: World, start) -> None:
    Items(world)
    env = start()

    env.sage.add_fault(function="GetMediaFiles", delay_s=0.6)  # time to show the count

    code, out, err = _run_with_stderr_on_a_terminal(env, "all", "-s")

    assert code == 0
    assert "reading Plex: " in err and " items" in err  # the status line, on stderr
    assert "writing" in err  # tqdm's bar
    assert "reading Plex" not in out and "Total:" in out


def test_no_progress_turns_the_bar_off_on_a_terminal(world: World, start) -> None:
    Items(world)
    env = start()

    code, out, err = _run_with_stderr_on_a_terminal(env, "all", "--no-progress")

    assert code == 0 and "Total:" in out
    assert err == ""


def test_no_progress_bar_without_a_terminal(world: World, start) -> None:
    Items(world)
    env = start()

    proc = subprocess.run([sys.executable, str(TOOL), "all", "-s"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "SAGEPLEX_CFG": str(env.config_path)})

    assert proc.returncode == 0 and "Total:" in proc.stdout
    assert proc.stderr == ""


# -- 4. --check --------------------------------------------------------------------------------

def test_check_passes_and_describes_both_servers(world: World, start) -> None:
    Items(world)
    env = start()

    code, out, err = main("--check")

    assert code == 0, out + err
    assert f"config: {env.config_path}" in out
    assert "SageTV at 127.0.0.1:" in out and ": 6 media files; clock" in out
    assert "Plex at 127.0.0.1:" in out and "fake-plex (version 1." in out
    assert "  section 1: TV Shows (show)" in out and "  section 2: Movies (movie)" in out
    assert "played threshold 90%" in out and "writes: allowed (owner token)" in out
    assert out.count("clock ") == 2
    assert out.splitlines()[-1] == "check passed"
    assert err == ""
    assert_no_secrets(out, err, env.log_path.read_text(encoding="utf-8"))
    assert env.writes() == []


def test_check_with_a_wrong_sagex_password_fails_naming_sagetv(world: World, start) -> None:
    Items(world)
    env = start(sagex__password="wrong-pw-42")

    code, out, err = main("--check")

    assert code == 1
    assert "SageTV: FAILED:" in out and "sagex.password" in out
    assert "fake-plex" in out  # Plex is still checked
    assert out.splitlines()[-1] == "check failed"
    assert "wrong-pw-42" not in out + err
    assert_no_secrets(out, err, env.log_path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("where", ["port", "host"])
def test_check_with_plex_unreachable_fails(world: World, start, where: str) -> None:
    Items(world)
    # 127.0.0.2 (on Linux, loopback too) has nothing listening on the fake's port
    overrides = ({"plex__port": closed_port()} if where == "port" else
                 {"plex__host": "127.0.0.2"})
    start(**overrides)

    code, out, err = main("--check")

    assert code == 1
    assert "Plex: FAILED:" in out and "cannot reach Plex" in out
    assert "media files" in out  # SageTV is still checked
    assert out.splitlines()[-1] == "check failed"
    assert_no_secrets(out, err)


def test_check_warns_about_an_unknown_key_once(world: World, start) -> None:
    Items(world)
    start(plex__tokn="x")

    code, out, err = main("--check")

    assert code == 0
    assert "warning:" in out and "did you mean 'plex.token'?" in out
    assert "did you mean" not in err  # said once, in the check's own output


def test_check_warns_about_a_placeholder_value(world: World, start) -> None:
    Items(world)
    start(sagex__password="enter_password")

    code, out, _ = main("--check")

    assert code == 1  # the placeholder is not SageTV's password
    assert "warning:" in out and "'sagex.password' is still the example's placeholder" in out


def test_check_warns_about_the_example_files_placeholders(world: World, start,
                                                          tmp_path: Path) -> None:
    Items(world)
    env = start()
    data = json.loads((ROOT / "sageplex_cfg.json.example").read_text(encoding="utf-8"))
    for section, server in (("sagex", env.sage), ("plex", env.plex)):
        data[section].update(host="127.0.0.1", port=server.port)
    env.config_path.write_text(json.dumps(data), encoding="utf-8")

    _, out, _ = main("--check")

    assert "placeholder" in out


# -- 5. --interval ------------------------------------------------------------------------------

class Rounds:
    """``python sageplex_sync.py ARGV`` in the background; its stdout read as it comes."""

    def __init__(self, env: Env, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(TOOL), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, "SAGEPLEX_CFG": str(env.config_path)})
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def totals(self) -> list[str]:
        return [ln for ln in list(self.lines) if ln.startswith("Total:")]

    def wait_for_rounds(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.totals()) < count:
            assert self.proc.poll() is None, f"stopped early: {self.proc.stderr.read()}"
            assert time.monotonic() < deadline, f"only {self.lines}"
            time.sleep(0.02)

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.reader.join(10)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


def test_interval_syncs_in_rounds_until_stopped_then_exits_130(world: World, start) -> None:
    items = Items(world)
    env = start()
    rounds = Rounds(env, "--interval", "0.01", "all", "-s")

    rounds.wait_for_rounds(2)
    code, err = rounds.stop()

    assert code == 130
    first, second = rounds.totals()[:2]
    assert "3 updated" in first
    assert "updated" not in second and "4 in-sync" in second  # the first round synced all
    assert world.plex_item(items.to_plex).view_count == 1
    assert "Traceback" not in err
    assert_no_secrets("\n".join(rounds.lines), err)


def test_interval_goes_on_after_a_failed_round(world: World, start) -> None:
    items = Items(world)
    env = start()
    env.sage.add_fault(function="GetMediaFiles", status=404, times=1)  # the first round only

    rounds = Rounds(env, "--interval", "0.01", "all", "-s")
    rounds.wait_for_rounds(1)
    code, err = rounds.stop()

    assert code == 130
    assert "round failed" in err and "SageTV" in err
    assert "3 updated" in rounds.totals()[0]  # the next round ran, and synced
    assert world.sage_watched(items.to_sage)
    assert "round failed" in env.log_path.read_text(encoding="utf-8")


@pytest.mark.parametrize("minutes", ["0", "-1"])
def test_interval_must_be_above_zero(world: World, start, minutes: str) -> None:
    start()

    code, out, err = main("--interval", minutes, "all", "-s")

    assert code == 2 and out == ""
    assert "--interval needs -s and a number of minutes above 0" in err


# -- 6. the library commands --------------------------------------------------------------------

@pytest.mark.parametrize("extra", [[], ["-y"]])
def test_delsec_all_is_refused(world: World, start, extra: list[str]) -> None:
    env = start()

    code, out, err = main("--delsec", "all", *extra)

    assert code == 2
    assert "--delsec deletes one section at a time" in err
    assert len(world.plex.sections) == 2
    assert env.plex_writes() == []


def test_refresh_all_refreshes_every_section(world: World, start) -> None:
    start()

    code, out, _ = main("--refresh", "all")

    assert code == 0
    assert out.splitlines() == ["Refreshing library [1]: TV Shows",
                                "Refreshing library [2]: Movies"]
    assert [s.refreshed_count for s in world.plex.sections.values()] == [1, 1]


@pytest.mark.parametrize("argv", [["movies"], ["movies", "-s"], ["--refresh", "Movies"],
                                  ["--delsec", "MOVIES", "-y"]])
def test_a_section_name_two_sections_share_is_a_usage_error_naming_both(
        world: World, start, argv: list[str]) -> None:
    Items(world)
    twin = world.plex.add_section("Movies", "movie", ["/mnt/other/movies"])
    env = start()

    code, out, err = main(*argv)

    assert code == 2 and out == ""
    name = argv[1] if argv[0].startswith("--") else argv[0]
    assert f"two Plex sections are named {name!r}" in err
    assert f"id {world.movie_section}, id {twin}" in err
    assert "give the section's id" in err
    assert len(world.plex.sections) == 3
    assert all(s.refreshed_count == 0 for s in world.plex.sections.values())
    assert env.writes() == []


@pytest.mark.parametrize(("flag", "name"), [("--addtv", "tv shows"), ("--addmovie", "Movies"),
                                            ("--addtv", "MOVIES")])
def test_adding_a_section_with_a_name_taken_is_refused(world: World, start, flag: str,
                                                       name: str) -> None:
    env = start()

    code, out, err = main(flag, name, "/mnt/sagetv/tv")

    assert code == 2
    assert f"Plex already has a section named {name!r}" in err and "choose another name" in err
    assert len(world.plex.sections) == 2
    assert env.plex_writes() == []


@pytest.fixture
def music(world: World, monkeypatch: pytest.MonkeyPatch) -> int:
    """A music library. The fake Plex serves movie and show sections only; its table of
    section types is widened here so that a non-video section exists."""
    monkeypatch.setitem(fake_plex._DEFAULTS, "artist",
                        ("tv.plex.agents.music", "Plex Music", "artist"))
    return world.plex.add_section("Music", "artist", ["/mnt/music"])


def test_refresh_works_on_a_music_section(world: World, start, music: int) -> None:
    start()
    assert main("-l")[1].splitlines()[-1] == f"{music:>3}: Music (artist)"

    code, out, err = main("--refresh", "music")

    assert code == 0, err
    assert out == f"Refreshing library [{music}]: Music\n"
    assert world.plex.sections[music].refreshed_count == 1

    code, out, _ = main("--refresh", "all")  # all: every section, the music one too
    assert code == 0 and f"[{music}]: Music" in out
    assert world.plex.sections[music].refreshed_count == 2


def test_delsec_works_on_a_music_section(world: World, start, music: int) -> None:
    start()

    code, out, err = main("--delsec", str(music), "-y")

    assert code == 0, err
    assert out == f"Library [{music}] Music deleted.\n"
    assert set(world.plex.sections) == {world.tv_section, world.movie_section}


def test_a_music_section_cannot_be_synced(world: World, start, music: int) -> None:
    start()

    code, out, err = main("Music", "-s")

    assert code == 2 and out == ""
    assert f"section {music} (Music) is a artist library" in err and "only movie and show" in err
    code, out, _ = main("all")  # all skips it
    assert code == 0 and "Total: 0 videos." in out


# -- 7. -n wherever -s is accepted ------------------------------------------------------------

def test_simulated_position_writes_nothing(world: World, start) -> None:
    items = Items(world)
    env = start()
    before = snapshot(world)

    code, out, err = main("-m", str(items.movie.rating_key), "-n", "--position", "0:10:00")

    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.split()[:1] == [str(items.movie.rating_key)])
    assert "[simulated]" in line and "0:10:00" in line
    assert "1 simulated" in out.splitlines()[-1]
    assert env.writes() == []
    assert snapshot(world) == before
    assert not sageplex_sync.default_state_path(env.config_path).exists()


@pytest.mark.parametrize("argv", [["all", "-n"], ["all", "-s", "-n"], ["-m", "KEY", "-n"],
                                  ["-m", "KEY", "-s", "-n", "--position", "0:10:00"]])
def test_n_simulates_wherever_s_is_accepted(world: World, start, argv: list[str]) -> None:
    items = Items(world)
    env = start()
    before = snapshot(world)
    argv = [str(items.to_plex.rating_key) if a == "KEY" else a for a in argv]

    code, out, err = main(*argv)

    assert code == 0, err
    assert "simulated" in out.splitlines()[-1]
    assert "updated" not in out
    assert env.writes() == []
    assert snapshot(world) == before


def test_n_undo_shows_the_undo_and_writes_nothing(world: World, start) -> None:
    items = Items(world)
    env = start()
    assert main("all", "-s")[0] == 0
    after_sync = snapshot(world)
    env.clear_logs()

    code, out, err = main("-n", "--undo")

    assert code == 0, err
    assert "3 simulated" in out.splitlines()[-1]
    assert env.writes() == [] and snapshot(world) == after_sync
    assert world.plex_item(items.to_plex).view_count == 1


# -- 8. -p with no terminal ------------------------------------------------------------------

def test_prompt_without_a_terminal_says_so_and_answers_no(world: World, start) -> None:
    items = Items(world)
    env = start()
    before = snapshot(world)

    code, out, err = main("all", "-s", "-p", stdin=io.StringIO("y\ny\ny\n"))

    assert code == 0
    assert err.count("no (no terminal to ask on)") == 3  # one question per item to write
    line = next(ln for ln in out.splitlines() if ln.split()[:1] == [str(items.to_plex.rating_key)])
    assert "[skipped]" in line and "not confirmed" in line
    assert "3 skipped" in out.splitlines()[-1]
    assert env.writes() == [] and snapshot(world) == before


# -- 9. the log file ------------------------------------------------------------------------

def test_log_file_is_created_0600_in_the_users_state_folder(world: World, start,
                                                            tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    Items(world)
    start()
    monkeypatch.delenv("SAGEPLEX_LOG")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    old_umask = os.umask(0o022)
    try:
        code, _, err = main("all")
    finally:
        os.umask(old_umask)

    assert code == 0, err
    path = tmp_path / "state" / "sageplex_sync" / "sageplex_sync.log"
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "sageplex_sync" in path.read_text(encoding="utf-8")
    assert_no_secrets(path.read_text(encoding="utf-8"))


def test_log_file_stays_0600_after_it_is_rotated(tmp_path: Path) -> None:
    path = tmp_path / "sageplex_sync.log"
    old_umask = os.umask(0o022)
    try:
        handler = sageplex_sync._PrivateLogHandler(path, maxBytes=10, backupCount=2,
                                                   encoding="utf-8")
        handler.doRollover()
        handler.close()
    finally:
        os.umask(old_umask)

    for log_file in (path, path.with_name(path.name + ".1")):
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


# -- the sandbox ---------------------------------------------------------------------------

def test_sandbox_runs_says_what_to_try_next_and_cleans_up(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import sandbox
    monkeypatch.setenv("SAGEPLEX_CFG", "set-by-the-sandbox")  # put back after the test

    code = sandbox.main(["all"])

    captured = capsys.readouterr()
    assert code == 0
    assert "Total:" in captured.out
    err = captured.err
    config = Path(next(ln.split("config ", 1)[1] for ln in err.splitlines()
                       if ln.startswith("sandbox: config ")))
    assert "/mnt/sagetv/tv" in err and "/mnt/sagetv/movies" in err
    tail = err[err.rindex("Total:") if "Total:" in err else err.rindex("$ sageplex_sync"):]
    assert '--run "all -s"' in tail and "--serve" in tail
    assert not config.parent.exists()  # its temporary folder is gone


def _interrupt_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def serve_sandbox() -> subprocess.Popen[str]:
    """``python -m tests.sandbox --serve`` as a terminal starts it: Ctrl-C at its default
    even when the tests themselves run in a background job (which ignores SIGINT)."""
    return subprocess.Popen([sys.executable, "-m", "tests.sandbox", "--serve"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, preexec_fn=_interrupt_as_in_a_terminal)


def test_sandbox_serve_prints_the_config_and_cleans_up_on_ctrl_c(tmp_path: Path) -> None:
    proc = serve_sandbox()
    assert proc.stderr is not None
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "serving until" in line:
                break
        while not any("SAGEPLEX_CFG=" in ln for ln in seen) and seen[-1:] != [""]:
            seen.append(proc.stderr.readline())
        said = [ln for ln in seen if "SAGEPLEX_CFG=" in ln]
        assert said, "".join(seen)
        config = Path(said[0].split("=", 1)[1].strip())
        assert config.is_file()
        # the tool, pointed at the sandbox from outside, reaches its fakes
        check = subprocess.run([sys.executable, str(TOOL), "--check"], capture_output=True,
                               text=True, timeout=60,
                               env={**os.environ, "SAGEPLEX_CFG": str(config),
                                    "SAGEPLEX_LOG": str(tmp_path / "log")})
        assert check.returncode == 0, check.stdout + check.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "/mnt/sagetv/tv" in "".join(seen)
    assert not config.parent.exists()


def test_sandbox_cleans_up_on_sigterm() -> None:
    proc = serve_sandbox()
    assert proc.stderr is not None
    try:
        config = None
        for line in proc.stderr:
            if line.startswith("sandbox: config "):
                config = Path(line.split("config ", 1)[1].strip())
            if "serving until" in line:
                break
        assert config is not None and config.is_file()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not config.parent.exists()


# -- -p asks on the terminal even with stdin in a pipe ------------------------------------------

def test_prompt_reads_the_answer_from_the_terminal_when_stdin_is_a_pipe(world: World,
                                                                         start) -> None:
    """``sageplex-sync all -s -p < file``: the questions go to the controlling terminal."""
    item = world.movie("Heat", sage=watched(ago=DAY), plex=none())
    env = start()
    master, slave = os.openpty()

    def own_terminal() -> None:  # in the child: a session whose terminal is the pty
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, str(TOOL), "all", "-s", "-p"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=own_terminal, pass_fds=(slave,),
                            env={**os.environ, "SAGEPLEX_CFG": str(env.config_path)})
    os.close(slave)
    assert proc.stdin is not None
    proc.stdin.close()  # stdin is an empty pipe: the answer must come from the terminal
    proc.stdin = None  # (communicate() below must not flush it again)
    seen = b""
    while b"[y/N]" not in seen:
        ready, _, _ = select.select([master], [], [], 30)
        assert ready, f"no question on the terminal: {seen!r}"
        try:
            seen += os.read(master, 4096)
        except OSError:  # EIO: the tool ended without asking
            proc.wait(60)
            assert proc.stdout is not None and proc.stderr is not None
            raise AssertionError(f"no question on the terminal: {seen!r}\n"
                                 f"{proc.stdout.read()!r}\n{proc.stderr.read()!r}") from None
    os.write(master, b"y\n")
    out, err = proc.communicate(timeout=60)
    os.close(master)

    assert proc.returncode == 0, err.decode()
    assert b"mark watched on Plex" in seen  # the question named the write
    assert world.plex_item(item).view_count == 1
    assert "[updated]" in out.decode()
