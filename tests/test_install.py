"""The README's "Install as a command" is true: ``pip install .`` into a fresh virtual
environment gives a ``sageplex-sync`` command that runs, names itself and its version, and
can check a configuration against live servers (the fakes).

The environment is a plain venv (no system site-packages): pip builds the project with the
build-system of pyproject.toml and fetches requests and plexapi from the machine's normal
package index, as a user's install would. The project is copied to tmp_path first so that
the build's own by-products (build/, *.egg-info/) never land in the working tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import sageplex_sync
from tests.conftest import Env, assert_no_secrets
from tests.fakes.world import MIN, World, at, watched

ROOT = Path(__file__).resolve().parent.parent
#: What a build of the project reads; anything else in the tree is not part of the package.
PROJECT_FILES = ("pyproject.toml", "sageplex_sync.py", "README.md", "LICENSE",
                 "requirements.txt")


def venv_bin(venv: Path, name: str) -> Path:
    scripts = venv / ("Scripts" if os.name == "nt" else "bin")
    return scripts / (name + (".exe" if os.name == "nt" else ""))


def clean_env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment (SAGEPLEX_CFG, SAGEPLEX_LOG, proxies already cleared) without
    anything that would let the repository's own module stand in for the installed one."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_CACHE_DIR"] = str(tmp_path / "pip-cache")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the project installed by ``pip install .`` (once for this module);
    returns the venv."""
    tmp_path = tmp_path_factory.mktemp("install")
    source = tmp_path / "src"
    source.mkdir()
    for name in PROJECT_FILES:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    result = subprocess.run([str(venv_bin(venv, "python")), "-m", "pip", "install", "--quiet",
                             "."], cwd=source, capture_output=True, text=True, timeout=180,
                            env=clean_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    return venv


def run_command(venv: Path, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    work = tmp_path / "elsewhere"  # not the repository: only the installed module is found
    work.mkdir(exist_ok=True)
    return subprocess.run([str(venv_bin(venv, "sageplex-sync")), *argv], cwd=work,
                          capture_output=True, text=True, timeout=60, env=clean_env(tmp_path))


def test_pip_install_gives_the_sageplex_sync_command(installed: Path, tmp_path: Path) -> None:
    command = venv_bin(installed, "sageplex-sync")
    assert command.exists(), f"pip install . made no {command.name} command"
    version = run_command(installed, tmp_path, "--version")
    assert version.returncode == 0, version.stderr
    assert "sageplex-sync" in version.stdout, version.stdout  # the name it was called by
    assert sageplex_sync.__version__ in version.stdout, version.stdout


def test_installed_command_checks_the_config_against_both_servers(
        installed: Path, tmp_path: Path, world: World, start: Callable[..., Env]) -> None:
    world.episode("Castle", 1, 1, "Pilot", sage=at(12 * MIN), plex=watched())
    world.movie("Heat", sage=watched(), plex=at(40 * MIN))
    env = start()  # serves the fakes and points SAGEPLEX_CFG at their config
    check = run_command(installed, tmp_path, "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Traceback" not in check.stderr
    for section in ("TV Shows", "Movies"):  # the Plex sections it found
        assert section in check.stdout, check.stdout
    assert "fake-plex" in check.stdout  # the Plex server's name ...
    assert env.world.plex.version in check.stdout  # ... and version
    assert_no_secrets(check.stdout, check.stderr)
    assert not env.writes(), "--check must not write to either server"
