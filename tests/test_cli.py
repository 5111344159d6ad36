"""The command line end to end: sections, the library commands and the
``python sageplex_sync.py`` entry point, against the fake servers over HTTP (the usage
errors, exit 2 before any request, are one table in test_bad_input.py)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sageplex_sync
from tests.conftest import assert_no_secrets
from tests.fakes.world import MOVIE_SECTION, TV_SECTION, World, at, none, watched

TOOL = Path(sageplex_sync.__file__).resolve()


class Terminal(io.StringIO):
    """stdin as an interactive terminal that types the given answers."""

    def isatty(self) -> bool:
        return True


def two_sections(world: World) -> tuple[int, int]:
    """One episode and one movie, each out of sync (watched on SageTV only)."""
    episode = world.episode("Castle", 1, 1, "Pilot", sage=watched(), plex=none())
    movie = world.movie("Heat", sage=watched(), plex=none())
    assert episode.rating_key is not None and movie.rating_key is not None
    return episode.rating_key, movie.rating_key


def reported_keys(out: str) -> set[int]:
    return {int(ln.split()[0]) for ln in out.splitlines() if ln[:7].strip().isdigit()}


# -- choosing sections -----------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "wanted"), [
    (["tv shows"], {"episode"}),
    (["MOVIES"], {"movie"}),
    (["1"], {"episode"}),
    (["2"], {"movie"}),
    (["Tv Shows", "2"], {"episode", "movie"}),
    (["all"], {"episode", "movie"}),
    (["ALL", "movies"], {"episode", "movie"}),
], ids=["name-lowercase", "name-uppercase", "id-tv", "id-movies", "name-and-id", "all",
        "all-and-name"])
def test_sections_by_name_id_or_all(world: World, start, argv: list[str],
                                    wanted: set[str]) -> None:
    episode, movie = two_sections(world)
    assert (world.tv_section, world.movie_section) == (1, 2)
    keys = {"episode": episode, "movie": movie}
    env = start()

    result = env.run(*argv, "-s")

    assert result.code == 0, result.err
    assert reported_keys(result.out) == {keys[k] for k in wanted}
    assert env.written_rating_keys() == {keys[k] for k in wanted}
    for name, key in keys.items():
        assert world.plex.item(key).view_count == (1 if name in wanted else 0)


def test_unknown_section_is_a_usage_error_listing_the_sections(world: World, start) -> None:
    two_sections(world)
    env = start()

    result = env.run("Cartoons", "-s")

    assert result.code == 2
    assert "Plex has no library section 'Cartoons'" in result.err
    assert f"1 ({TV_SECTION}), 2 ({MOVIE_SECTION})" in result.err
    assert env.writes() == []
    assert env.sage_writes() == []  # SageTV is listed at the same time, never written


def test_list_shows_both_sections(world: World, start) -> None:
    two_sections(world)
    env = start()

    result = env.run("-l")

    assert result.code == 0, result.err
    assert result.lines == [f"  1: {TV_SECTION} (show)", f"  2: {MOVIE_SECTION} (movie)"]
    assert env.writes() == []


# -- library commands ------------------------------------------------------------------------

@pytest.mark.parametrize(("flag", "kind", "scanner", "agent"), [
    ("--addtv", "show", "SageTV Scanner", "com.plexapp.agents.bmtagenttvshows"),
    ("--addmovie", "movie", "SageTV Movie Scanner", "com.plexapp.agents.imdb"),
])
def test_add_section_uses_the_original_scanner_and_agent(world: World, start, flag: str,
                                                         kind: str, scanner: str,
                                                         agent: str) -> None:
    world.plex.add_browse_dir("/mnt/recordings/new")
    world.plex.add_browse_dir("/mnt/recordings/more")
    env = start()

    result = env.run(flag, "SageTV New", "/mnt/recordings/new", "/mnt/recordings/more")

    assert result.code == 0, result.err
    assert "Plex library 'SageTV New' added" in result.out
    added = [s for s in world.plex.sections.values() if s.title == "SageTV New"]
    assert len(added) == 1
    section = added[0]
    assert (section.type, section.scanner, section.agent) == (kind, scanner, agent)
    assert section.locations == ["/mnt/recordings/new", "/mnt/recordings/more"]


def test_add_section_with_unknown_folder_is_refused(world: World, start) -> None:
    env = start()
    before = set(world.plex.sections)

    result = env.run("--addtv", "SageTV New", "/no/such/folder")

    assert result.code == 2
    assert "/no/such/folder" in result.err
    assert set(world.plex.sections) == before
    assert env.plex.requests(function="add_section") == []


@pytest.mark.parametrize("section", ["2", "movies"])
def test_refresh_scans_the_section(world: World, start, section: str) -> None:
    env = start()

    result = env.run("--refresh", section)

    assert result.code == 0, result.err
    assert world.plex.sections[world.movie_section].refreshed_count == 1
    assert world.plex.sections[world.tv_section].refreshed_count == 0
    assert f"Refreshing library [2]: {MOVIE_SECTION}" in result.out


def test_delete_section_without_terminal_refuses(world: World, start,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    env = start()
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # piped, not a terminal

    result = env.run("--delsec", "2")

    assert result.code == 2
    assert "-y" in result.err
    assert world.movie_section in world.plex.sections
    assert env.plex.requests(function="delete_section") == []


def test_delete_section_with_yes_deletes_it(world: World, start) -> None:
    _, movie = two_sections(world)
    env = start()

    result = env.run("--delsec", "2", "-y")

    assert result.code == 0, result.err
    assert f"Library [2] {MOVIE_SECTION} deleted." in result.out
    assert world.movie_section not in world.plex.sections
    assert world.tv_section in world.plex.sections
    with pytest.raises(KeyError):
        world.plex.item(movie)


@pytest.mark.parametrize(("answer", "deleted"), [("y\n", True), ("n\n", False), ("\n", False)],
                         ids=["yes", "no", "default-no"])
def test_delete_section_asks_on_a_terminal(world: World, start,
                                           monkeypatch: pytest.MonkeyPatch, answer: str,
                                           deleted: bool) -> None:
    env = start()
    monkeypatch.setattr(sys, "stdin", Terminal(answer))

    result = env.run("--delsec", MOVIE_SECTION)

    assert result.code == 0, result.err
    assert "[y/N]" in result.err
    assert (world.movie_section not in world.plex.sections) is deleted
    if not deleted:
        assert "Not deleted." in result.out


# -- the entry point in a real process -----------------------------------------------------

def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *argv], capture_output=True,
                          text=True, encoding="utf-8", timeout=60, env=dict(os.environ),
                          cwd=TOOL.parent, check=False)


def test_script_reports_an_error_in_one_line_with_its_exit_code(world: World,
                                                                start) -> None:
    item = world.episode("Castle", 1, 1, "Pilot", sage=none(), plex=at(12 * 60_000))
    env = start()  # SAGEPLEX_CFG and SAGEPLEX_LOG are in os.environ for the child

    missing = run_tool("-m", "987654", "-s")
    report = run_tool("all")

    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("sageplex-sync: error: Plex has no media id 987654")
    assert "Traceback" not in missing.stderr
    assert_no_secrets(missing.stderr, report.stdout, report.stderr)
    assert report.returncode == 0, report.stderr
    assert f"{item.rating_key}  Castle - s01e01 - Pilot  [SageTV out of sync]" in report.stdout
    assert report.stdout.splitlines()[-1].startswith("Total: 1 video,")
    assert env.writes() == []


def test_script_usage_error_exits_2_without_traceback(tmp_path: Path) -> None:
    result = run_tool("-l", "-s")

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "error:" in result.stderr and "-l" in result.stderr
    assert result.stdout == ""


def test_script_without_config_fails_in_one_line(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGEPLEX_CFG", str(tmp_path / "nowhere.json"))

    result = run_tool("all")

    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "nowhere.json does not exist" in result.stderr
