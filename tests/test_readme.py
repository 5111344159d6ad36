"""The README's promises stay true: its two first-screen commands, the command list
against --help, CI running exactly the README's test command, and clean lint and types
(ruff with complexity at most 10 per function, and mypy)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sageplex_sync

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def first_screen_commands() -> list[str]:
    """The shell commands in the README before the first horizontal rule."""
    first_screen = README.split("\n---\n", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", first_screen, flags=re.S)


def test_readme_first_screen_has_the_install_and_the_test_command() -> None:
    commands = first_screen_commands()
    assert len(commands) == 2
    install_and_demo, install_and_test = commands
    assert "pip install -r requirements.txt" in install_and_demo
    assert install_and_demo.endswith("python -m tests.sandbox")
    assert "pip install -r requirements-dev.txt" in install_and_test
    assert install_and_test.endswith("python -m pytest")


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_command = first_screen_commands()[1].rsplit("&& ", 1)[-1]
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    assert ci_lines[-1] == test_command
    assert any("requirements-dev.txt" in ln for ln in ci_lines)


def test_sandbox_demo_command_runs_and_reports_every_section(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tests.sandbox"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                 "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "Total: 30 videos" in result.stdout
    assert "Traceback" not in result.stderr


def test_every_option_in_help_is_documented_in_the_readme() -> None:
    options = {opt for action in sageplex_sync.build_parser()._actions
               for opt in action.option_strings if opt not in ("-h", "--help")}
    missing = sorted(opt for opt in options if opt not in README)
    assert not missing, f"options missing from README.md: {missing}"


def test_config_example_is_accepted_by_the_tool(tmp_path: Path) -> None:
    config = sageplex_sync.load_config(ROOT / "sageplex_cfg.json.example")
    assert (config.sage.port, config.plex.port) == (8080, 32400)


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff")
                    .exists(), reason="ruff is installed by requirements-dev.txt")
def test_code_is_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    paths = [p for p in ("sageplex_sync.py", "tests", "bench") if (ROOT / p).exists()]
    result = subprocess.run([ruff, "check", *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_module_is_mypy_clean() -> None:
    """The type gate CI runs: mypy on the module, with the settings in pyproject.toml."""
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
