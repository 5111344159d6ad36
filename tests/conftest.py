"""Shared fixtures: a clean environment, a world to declare items in, and ``start()``
which serves the world on two free ports, writes sageplex_cfg.json and runs the tool."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# plexapi reads its config file at import: a developer's own must not leak into tests.
os.environ["PLEXAPI_CONFIG_PATH"] = os.devnull + ".plexapi-config-not-here.ini"

import sageplex_sync  # noqa: E402
from tests.fakes.fake_http import FakeServer, Request  # noqa: E402
from tests.fakes.world import PLEX_TOKEN, SAGE_PASSWORD, Servers, World  # noqa: E402

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
                   "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SAGEPLEX_CFG", raising=False)
    monkeypatch.setenv("SAGEPLEX_LOG", str(tmp_path / "sageplex_sync.log"))


@dataclass
class Result:
    code: int
    out: str
    err: str
    log: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    def line_for(self, rating_key: int | None) -> str:
        """The report line of one Plex media id."""
        matches = [ln for ln in self.lines if ln.split()[:1] == [str(rating_key)]]
        assert matches, f"no report line for {rating_key} in:\n{self.out}"
        return matches[0]

    def under(self, heading: str) -> list[int]:
        """The media ids listed under the heading that starts with ``heading``, in order
        (the season lines above episodes skipped); [] when there is no such heading."""
        lines = self.lines
        starts = [i for i, ln in enumerate(lines) if ln.startswith(heading) and ln.endswith(":")]
        assert len(starts) <= 1, f"{heading!r} is more than one heading in:\n{self.out}"
        keys = []
        for line in lines[starts[0] + 1:] if starts else []:
            if not line:
                break
            if not line.startswith("== ") and line.split()[0].isdigit():
                keys.append(int(line.split()[0]))
        return keys

    @property
    def total(self) -> str:
        return next(ln for ln in self.lines if ln.startswith("Total:"))


@dataclass
class Env:
    """A started world: the two fakes, the config file, and a way to run the tool."""

    world: World
    servers: Servers
    config_path: Path
    log_path: Path

    @property
    def sage(self) -> FakeServer:
        return self.servers.sage

    @property
    def plex(self) -> FakeServer:
        return self.servers.plex

    def run(self, *argv: str, every_item: bool = True) -> Result:
        """Run the tool in-process; ``every_item`` lists in-sync items too (--all-items),
        so that tests can read any item's line."""
        out, err = io.StringIO(), io.StringIO()
        args = list(argv) + (["--all-items"] if every_item and _takes_all_items(argv) else [])
        # stdin given explicitly: a test never asks on the developer's own terminal
        code = sageplex_sync.main(args, out=out, err=err, stdin=sys.stdin)
        log = self.log_path.read_text(encoding="utf-8") if self.log_path.exists() else ""
        return Result(int(code), out.getvalue(), err.getvalue(), log)

    def sage_writes(self) -> list[Request]:
        return [r for r in self.sage.requests() if r.function in self.world.sage.WRITE_FUNCTIONS]

    def plex_writes(self) -> list[Request]:
        return [r for r in self.plex.requests() if r.function in self.world.plex.WRITE_FUNCTIONS]

    def writes(self) -> list[Request]:
        return self.sage_writes() + self.plex_writes()

    def written_airings(self) -> set[int]:
        """The SageTV airing ids that got a write request (``airing:ID`` arguments)."""
        refs = (r.param("1") or "" for r in self.sage_writes())
        return {int(ref.split(":", 1)[1]) for ref in refs if ref.startswith("airing:")}

    def written_rating_keys(self) -> set[int]:
        """The Plex media ids that got a watch-state write (scrobble, timeline, ...)."""
        keys = (r.param("ratingKey") or r.param("key") or "" for r in self.plex_writes())
        return {int(k) for k in keys if k.isdigit()}

    def clear_logs(self) -> None:
        self.sage.clear_log()
        self.plex.clear_log()


def _takes_all_items(argv: tuple[str, ...]) -> bool:
    """Whether a command line is a sync or report (where --all-items is allowed)."""
    others = {"-l", "--list", "--check", "--addtv", "--addmovie", "--delsec", "--refresh",
              "--why", "--sagedata", "--help", "-h", "--version"}
    return bool(argv) and not others.intersection(argv)


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def start(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[Callable[..., Env]]:
    """``start(**config_overrides)`` serves the world and points SAGEPLEX_CFG at a config
    for it; call it after declaring the items."""
    stack = contextlib.ExitStack()

    def _start(**overrides: object) -> Env:
        servers = stack.enter_context(world.running())
        config_path = servers.write_config(tmp_path / "sageplex_cfg.json", **overrides)
        monkeypatch.setenv("SAGEPLEX_CFG", str(config_path))
        return Env(world, servers, config_path, Path(os.environ["SAGEPLEX_LOG"]))

    with stack:
        yield _start


def assert_no_secrets(*texts: str) -> None:
    """Neither the SageTV password nor the Plex token appears anywhere (URLs included)."""
    for text in texts:
        assert SAGE_PASSWORD not in text
        assert PLEX_TOKEN not in text
