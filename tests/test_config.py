"""Finding and reading sageplex_cfg.json the way the original tool did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sageplex_sync
from sageplex_sync import ConfigError, find_config, load_config

ORIGINAL_STYLE = {  # the original tool's shipped file: no token, scanner/agent sections
    "sagex": {"host": "localhost", "port": 8080, "user": "sage", "password": "frey-pw"},
    "plex": {"host": "localhost", "port": 32400},
    "scanner": {"ext": [".mpg"], "log": "%LOCALAPPDATA%\\x.log", "debug": True},
    "agent": {"locking": True},
    "ignored": {"dummy": "last"},
}


def write(folder: Path, data: object = ORIGINAL_STYLE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sageplex_cfg.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_original_config_file_is_accepted_unchanged(tmp_path: Path) -> None:
    config = load_config(write(tmp_path))
    assert config.sage.base_url == "http://localhost:8080"
    assert config.plex.base_url == "http://localhost:32400"
    assert config.plex.token == ""  # a PMS that trusts the LAN needs none
    assert config.sage.timeout_s == sageplex_sync.DEFAULT_TIMEOUT_S


def test_a_config_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Windows editors (Notepad until 2019) save UTF-8 with a byte order mark first."""
    path = write(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    config = load_config(path)
    assert config.sage.base_url == "http://localhost:8080"


def test_sageplex_cfg_may_name_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "cfgdir")
    monkeypatch.setenv("SAGEPLEX_CFG", str(tmp_path / "cfgdir"))
    assert find_config() == path


def test_dash_c_wins_over_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGEPLEX_CFG", str(write(tmp_path / "env")))
    explicit = write(tmp_path / "explicit")
    assert find_config(str(explicit)) == explicit


def test_plex_data_folder_is_searched_without_sageplex_cfg(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PLEX_HOME", raising=False)
    path = write(tmp_path / "Library" / "Application Support" / "Plex Media Server")
    assert find_config() == path


def test_no_config_anywhere_names_the_places_searched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="Plex Media Server.*SAGEPLEX_CFG"):
        find_config()


def test_windows_data_folders_follow_localappdata(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALAPPDATA", "C:\\Users\\me\\AppData\\Local")
    first = sageplex_sync.plex_data_dirs("win32")[0]
    assert str(first).endswith("Plex Media Server") and "AppData" in str(first)


def test_https_host_keeps_its_scheme(tmp_path: Path) -> None:
    data = json.loads(json.dumps(ORIGINAL_STYLE))
    data["plex"]["host"] = "https://plex.example"
    assert load_config(write(tmp_path, data)).plex.base_url == "https://plex.example:32400"


def test_secrets_never_appear_in_the_config_repr(tmp_path: Path) -> None:
    data = json.loads(json.dumps(ORIGINAL_STYLE))
    data["plex"]["token"] = "tok-abcdef"
    text = repr(load_config(write(tmp_path, data)))
    assert "frey-pw" not in text and "tok-abcdef" not in text


def test_loaded_secrets_are_redacted_from_any_text(tmp_path: Path) -> None:
    data = json.loads(json.dumps(ORIGINAL_STYLE))
    data["plex"]["token"] = "tok-abcdef"
    secrets = sageplex_sync.Secrets()
    load_config(write(tmp_path, data), secrets)
    assert secrets.redact("GET /?X-Plex-Token=tok-abcdef pw=frey-pw") == \
        "GET /?X-Plex-Token=<hidden> pw=<hidden>"
