"""The bad-input matrix: a config file that is missing or wrong, and command lines that
ask for something impossible.

For every case: one line on stderr that names the problem (and the fix), exit 2 for a
usage error and 1 for a run-time or config error, no traceback, nothing written on either
server, and neither the SageTV password nor the Plex token in stdout, stderr or the log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env, Result, assert_no_secrets
from tests.fakes.world import HOUR, MIN, PLEX_TOKEN, SAGE_PASSWORD, World, at, none, watched


@pytest.fixture
def env(world: World, start: Callable[..., Env]) -> Env:
    """A world where a sync would write on both sides (so a case that writes shows)."""
    world.episode("Castle", 1, 1, "Flowers for Your Grave", sage=none(), plex=watched())
    world.episode("Castle", 1, 2, "Nanny McDead", sage=watched(), plex=none())
    world.episode("Castle", 1, 3, "Hedge Fund Homeboys", sage=at(12 * MIN), plex=none())
    world.movie("Heat", duration_ms=2 * HOUR, sage=none(), plex=at(40 * MIN))
    return start()


def check(r: Result, code: int, *says: str) -> str:
    """The common assertions; returns the one error line."""
    assert r.code == code, r.out + r.err
    lines = r.err.splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("sageplex-sync: error: "), r.err
    for words in says:
        assert words in lines[0]
    for text in (r.out, r.err, r.log):
        assert "Traceback" not in text
    assert_no_secrets(r.out, r.err, r.log)
    return lines[0]


def assert_nothing_asked(env: Env) -> None:
    """Neither server got any request: the problem was found before either was asked."""
    assert env.sage.requests() == [] and env.plex.requests() == []


# -- the config file ----------------------------------------------------------------------------

def write_config(env: Env, data: Any) -> Path:
    text = data if isinstance(data, str) else json.dumps(data)
    env.config_path.write_text(text, encoding="utf-8")
    return env.config_path


def test_config_missing(env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAGEPLEX_CFG", str(tmp_path / "nowhere" / "sageplex_cfg.json"))
    line = check(env.run("all", "-s"), 1, "does not exist", "sageplex_cfg.json.example",
                 "SAGEPLEX_CFG")
    assert str(tmp_path / "nowhere") in line
    assert_nothing_asked(env)


def test_config_folder_without_the_file(env: Env, monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    folder = tmp_path / "empty-folder"
    folder.mkdir()
    monkeypatch.setenv("SAGEPLEX_CFG", str(folder))
    line = check(env.run("all", "-s"), 1, "does not exist")
    assert str(folder / "sageplex_cfg.json") in line
    assert_nothing_asked(env)


def test_config_dash_c_names_a_missing_file(env: Env, tmp_path: Path) -> None:
    check(env.run("all", "-s", "-c", str(tmp_path / "typo.json")), 1, "typo.json",
          "does not exist")
    assert_nothing_asked(env)


def test_config_found_nowhere(env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SAGEPLEX_CFG")
    monkeypatch.delenv("PLEX_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    check(env.run("all", "-s"), 1, "no sageplex_cfg.json found", "looked in",
          "point SAGEPLEX_CFG or -c at your file")
    assert_nothing_asked(env)


@pytest.mark.parametrize("text, says", [
    ('{"sagex": {"host": "127.0.0.1",}', ("not valid JSON", "line 1", "fix the syntax")),
    ("", ("not valid JSON",)),
    ("sagex.host = 127.0.0.1\n", ("not valid JSON",)),
    ('["sagex", "plex"]', ("must hold a JSON object",)),
    ("null", ("must hold a JSON object",)),
], ids=["syntax", "empty", "ini-style", "array", "null"])
def test_config_not_json(env: Env, text: str, says: tuple[str, ...]) -> None:
    write_config(env, text)
    line = check(env.run("all", "-s"), 1, *says)
    assert str(env.config_path) in line
    assert_nothing_asked(env)


def test_config_not_utf8(env: Env) -> None:
    env.config_path.write_bytes(b'{"sagex": {"host": "caf\xe9"}}')
    check(env.run("all", "-s"), 1, str(env.config_path), "not UTF-8", "save it as UTF-8")
    assert_nothing_asked(env)


@pytest.mark.parametrize("key", ["sagex", "plex", "sagex.host", "sagex.port", "sagex.user",
                                 "sagex.password", "plex.host", "plex.port"])
def test_config_key_missing(env: Env, key: str) -> None:
    data = env.servers.config()
    section, _, name = key.partition(".")
    if name:
        del data[section][name]
    else:
        del data[section]
    write_config(env, data)
    check(env.run("all", "-s"), 1, f"'{key}' is missing")
    assert_nothing_asked(env)


@pytest.mark.parametrize("key, value, says", [
    ("sagex.port", "8080", ("'sagex.port' must be a number from 1 to 65535", "without quotes",
                             '"8080"')),
    ("plex.port", "32400", ("'plex.port' must be a number", '"32400"')),
    ("sagex.port", -8080, ("'sagex.port' must be a number from 1 to 65535", "-8080")),
    ("plex.port", 0, ("'plex.port'", "from 1 to 65535")),
    ("plex.port", 70000, ("'plex.port'", "70000")),
    ("sagex.port", 8080.5, ("'sagex.port'", "8080.5")),
    ("sagex.port", True, ("'sagex.port'",)),
    ("sagex.host", 192168, ("'sagex.host' must be a non-empty string",)),
    ("plex.host", "", ("'plex.host' must be a non-empty string",)),
    ("plex.host", ["a", "b"], ("'plex.host'",)),
    ("sagex.user", 7, ("'sagex.user' must be a non-empty string",)),
    ("sagex.password", 12345, ("'sagex.password' must be a non-empty string",)),
    ("plex.token", 42, ("'plex.token' must be a non-empty string",)),
    ("sagex.timeout", -5, ("'sagex.timeout' must be a positive number", "-5")),
    ("plex.timeout", 0, ("'plex.timeout' must be a positive number",)),
    ("plex.timeout", "30", ("'plex.timeout' must be a positive number", '"30"')),
    ("sagex", "127.0.0.1:8080", ("'sagex' must be an object",)),
    ("plex", [], ("'plex' must be an object",)),
    ("guard", "20", ("'guard' must be a whole number of items", "'20'")),
    ("guard", -1, ("'guard' must be a whole number of items", "0 turns the guard off")),
    ("guard", True, ("'guard' must be a whole number",)),
    ("guard", 20.5, ("'guard' must be a whole number", "20.5")),
], ids=lambda v: v if isinstance(v, str) and "." in v and " " not in v else None)
def test_config_wrong_type(env: Env, key: str, value: Any, says: tuple[str, ...]) -> None:
    data = env.servers.config()
    section, _, name = key.partition(".")
    if name:
        data[section][name] = value
    else:
        data[section] = value
    write_config(env, data)
    line = check(env.run("all", "-s"), 1, *says)
    assert str(env.config_path) in line
    assert_nothing_asked(env)


@pytest.mark.parametrize("server", ["sagex", "plex"])
def test_config_unknown_host(world: World, start: Callable[..., Env], server: str) -> None:
    world.episode("Castle", 1, 1, "Flowers for Your Grave", sage=none(), plex=watched())
    env = start(**{f"{server}__host": "no-such-host.invalid"})
    began = time.monotonic()
    r = env.run("all", "-s")
    label = "SageTV" if server == "sagex" else "Plex"
    check(r, 1, f"cannot reach {label}", "'no-such-host.invalid' is not known",
          f"{server}.host")
    assert time.monotonic() - began < 15
    assert env.writes() == []


# -- the command line ---------------------------------------------------------------------------

USAGE_CASES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "nothing-to-do": ([], ("nothing to do", "--help")),
    "unknown-option": (["all", "--frobnicate"], ("unrecognized arguments: --frobnicate",
                                                 "--help")),
    "x-negative": (["all", "-s", "-x", "-5"], ("-x must be 0 or more seconds", "-5")),
    "x-not-a-number": (["all", "-x", "ten"], ("-x", "invalid int value: 'ten'")),
    "x-missing-value": (["all", "-x"], ("-x", "expected one argument")),
    "media-id-not-numeric": (["-m", "abc", "-s"], ("media ids are numbers", "'abc'")),
    "media-id-digits-then-letters": (["-m", "12x", "-s"], ("media ids are numbers", "'12x'")),
    "media-id-a-name": (["-m", "Castle"], ("media ids are numbers", "'Castle'")),
    "media-id-negative": (["-m", "-s", "--", "-12"], ("media ids are numbers", "'-12'")),
    "media-without-ids": (["-m", "-s"], ("-m needs one or more media ids",)),
    "position-letters": (["-m", "1002", "-s", "--position", "abc"],
                         ("--position takes h:m:s", "'abc'")),
    "position-too-many-fields": (["-m", "1002", "-s", "--position", "1:2:3:4"],
                                 ("--position takes h:m:s", "'1:2:3:4'")),
    "position-minutes-60": (["-m", "1002", "-s", "--position", "1:60:00"],
                            ("--position takes h:m:s", "'1:60:00'")),
    "position-seconds-75": (["-m", "1002", "-s", "--position", "10:75"],
                            ("--position takes h:m:s",)),
    "position-negative": (["-m", "1002", "-s", "--position", "-5"],
                          ("--position takes h:m:s", "'-5'")),
    "position-negative-with-equals": (["-m", "1002", "-s", "--position=-0:10"],
                                      ("--position takes h:m:s", "'-0:10'")),
    "position-decimal": (["-m", "1002", "-s", "--position", "90.5"],
                         ("--position takes h:m:s",)),
    "position-empty": (["-m", "1002", "-s", "--position", ""], ("--position takes h:m:s",)),
    "position-without-media": (["all", "-s", "--position", "0:10:00"],
                               ("--position needs -m", "-s")),
    "position-without-sync": (["-m", "1002", "--position", "0:10:00"],
                              ("--position needs -m", "-s")),
    "list-and-sync": (["-l", "-s"], ("not allowed with",)),
    "list-with-ids": (["-l", "all"], ("-l lists the sections and takes no ids",)),
    "list-with-media": (["-l", "-m"], ("go with a sync or report",)),
    "refresh-with-media": (["--refresh", "1", "-m"], ("go with a sync or report",)),
    "prompt-without-sync": (["all", "-p"], ("-p confirms sync writes; add -s",)),
    "sagedata-without-media": (["all", "--sagedata"], ("--sagedata needs -m",)),
    "sagedata-with-sync": (["-m", "1002", "--sagedata", "-s"], ("--sagedata only shows",)),
    "yes-with-list": (["-l", "-y"], ("-y only answers --delsec",)),
    "addtv-without-path": (["--addtv", "Recorded TV"], ("--addtv needs a NAME and at least "
                                                        "one PATH",)),
    "delsec-with-ids": (["--delsec", "1", "2"], ("take no other ids",)),
    "delsec-and-refresh": (["--delsec", "1", "--refresh", "2"], ("not allowed with",)),
}


@pytest.mark.parametrize("argv, says", list(USAGE_CASES.values()), ids=list(USAGE_CASES))
def test_usage_error(env: Env, capsys: pytest.CaptureFixture[str], argv: list[str],
                     says: tuple[str, ...]) -> None:
    r = env.run(*argv)
    check(r, 2, *says)
    assert r.out == ""
    assert capsys.readouterr().err == ""  # all of it on the run's own stderr (argparse too)
    assert_nothing_asked(env)


def test_help_and_version_still_work(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert env.run("--help").code == 0
    assert "exit codes:" in capsys.readouterr().out
    assert env.run("--version").code == 0
    assert "sageplex-sync" in capsys.readouterr().out
    assert_nothing_asked(env)


# -- things only Plex can tell: exit 2, Plex asked, nothing written ------------------------------

@pytest.mark.parametrize("argv, says", [
    (["Cartoons", "-s"], ("Plex has no library section 'Cartoons'", "sections are:",
                          "TV Shows", "Movies")),
    (["99", "-s"], ("Plex has no library section '99'",)),
    (["TV Shows", "Cartoons", "-s"], ("Plex has no library section 'Cartoons'",)),
    (["--refresh", "Cartoons"], ("Plex has no library section 'Cartoons'",)),
    (["--delsec", "99", "-y"], ("Plex has no library section '99'",)),
], ids=["unknown-name", "unknown-id", "one-of-two-unknown", "refresh-unknown",
        "delsec-unknown"])
def test_unknown_section(env: Env, argv: list[str], says: tuple[str, ...]) -> None:
    check(env.run(*argv), 2, *says)
    assert env.writes() == []
    assert env.sage_writes() == []  # SageTV is read at the same time, but never written


def test_media_id_that_does_not_exist(env: Env) -> None:
    check(env.run("-m", "99999", "-s"), 2, "Plex has no media id 99999",
          "run with a section name")
    assert env.writes() == []


def test_one_media_id_of_several_does_not_exist(env: Env, world: World) -> None:
    good = world.items[0].rating_key
    check(env.run("-m", str(good), "99999", "-s"), 2, "Plex has no media id 99999")
    assert env.writes() == []  # the good one is not written either


def test_section_id_given_as_a_media_id(env: Env, world: World) -> None:
    """-m takes media ids; a section id is not one (the error points at the report)."""
    check(env.run("-m", str(world.tv_section), "-s"), 2, "Plex has no media id")
    assert env.writes() == []


@pytest.mark.parametrize("position", ["0:30:00", "0:45:10", "2:00:00", "7200"])
def test_position_past_the_end(env: Env, world: World, position: str) -> None:
    episode = world.items[0]  # 30 minutes long
    check(env.run("-m", str(episode.rating_key), "-s", "--position", position), 2,
          f"--position {position} is past the end of media id {episode.rating_key}",
          "(0:29:59)", "give a position inside the item")
    assert env.writes() == []


def test_position_past_the_end_of_one_of_several(env: Env, world: World) -> None:
    """Checked for every item before any is written: the movie fits, the episode does not."""
    episode, movie = world.items[0], world.items[3]
    check(env.run("-m", str(movie.rating_key), str(episode.rating_key), "-s",
                  "--position", "0:50:00"), 2, f"past the end of media id {episode.rating_key}")
    assert env.writes() == []


def test_position_inside_the_item_is_written(env: Env, world: World) -> None:
    """The counter-check: the same command with a position that fits does write."""
    episode = world.items[0]
    r = env.run("-m", str(episode.rating_key), "-s", "--position", "0:10:00")
    assert r.code == 0, r.out + r.err
    assert env.writes()
    assert_no_secrets(r.out, r.err, r.log)


def test_secrets_are_set_up_for_these_cases(env: Env) -> None:
    """The config every case starts from holds the real secrets, so their absence above
    means something."""
    text = env.config_path.read_text(encoding="utf-8")
    assert SAGE_PASSWORD in text and PLEX_TOKEN in text
