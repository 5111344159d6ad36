#!/usr/bin/env python3
"""sageplex_sync: keep watch status and resume positions in step between SageTV and Plex.

Usage:  sageplex-sync all            report what is out of sync, write nothing
        sageplex-sync all -s         sync every movie and show section
        sageplex-sync --check        check the config and reach both servers

The module reads top to bottom, each section using only those above it: constants and
errors; configuration; the HTTP plumbing both clients share; the SageTV client; the Plex
client; watch states and the bounds of an item; items and their normalisation;
matching; the decision (pure functions); the sync state (SQLite); the run (read, check,
plan, guard, write, remember); the applier (the only code that writes); the report; the
commands (sync, --check, library commands, --interval); and the command line, last.
``main(argv) -> int`` is the only place that turns exceptions into messages and exit
codes, so the rest can be used as a library.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import codecs
import collections
import contextlib
import difflib
import email.utils
import gc
import heapq
import io
import itertools
import json
import logging
import logging.handlers
import marshal
import os
import re
import signal
import socket
import sqlite3
import sys
import threading
import time
import unicodedata
import urllib.parse
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum, IntEnum
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple, NoReturn, TextIO, TypeVar, cast
from xml.etree.ElementTree import Element, ParseError, fromstring
from xml.parsers import expat

if TYPE_CHECKING:
    import requests
    from urllib3 import exceptions as urllib3_errors
    from urllib3.util.retry import Retry

__version__ = "2.0.0"
PROG = "sageplex-sync"

###############################################################################
# Constants and errors: the numbers the rules name, and the errors users see ##
###############################################################################

#: Resume positions inside the first minute are noise (``-x`` changes it).
DEFAULT_IGNORE_S = 60
#: Positions this close are equal: SageTV's watched times do not round-trip to the ms.
POSITION_TOLERANCE_MS = 2_000
#: The seed's "within 5 % of the end" is finished.
DONE_FRACTION = 0.95
#: Plex's own "video played threshold" when its preference cannot be read.
DEFAULT_PLEX_PLAYED_PERCENT = 90
#: SageTV calls a viewing complete within this much of the airing's end (its
#: watch_ignore_time properties) once two thirds of it are covered.
SAGE_END_MARGIN_MS = 5 * 60_000
SAGE_END_MARGIN_MOVIE_MS = 10 * 60_000
SAGE_COVERED_FRACTION = 0.66
#: SageTV stores no watched record that ends within 5 s of where it starts.
SAGE_MIN_RECORD_MS = 5_000
#: SageTV measures against the show's running time when it is this close to the airing.
SAGE_RUNNING_TIME_SLACK_MS = 20 * 60_000
#: Plex ignores progress reports at or under one minute.
PLEX_MIN_PROGRESS_MS = 60_000
#: A server clock this far off the local one is corrected (and said with -v).
CLOCK_OFFSET_REPORTED_MS = 60_000
#: Page sizes no household reaches, so that one request lists a library; sagex gives no
#: total, so a full page costs one more (empty) request.
SAGEX_PAGE_SIZE = 1_000_000
PLEX_PAGE_SIZE = 1_000_000
#: A Plex listing is parsed as it arrives, this many bytes at a time.
PLEX_STREAM_CHUNK = 512 * 1024
#: A SageTV reply is read in pieces of this size.
SAGE_READ_CHUNK = 1024 * 1024
#: Plex items handed on at a time by the listing (from its process, in one message).
LISTING_BATCH = 2_000
#: Plex items read back in one request after the writes.
PLEX_BATCH = 100
#: Above this many SageTV files to read back, one listing is cheaper than one call each.
SAGE_REREAD_LISTING_ABOVE = 300
#: Control characters XML does not allow; plexapi drops them and so does the listing.
XML_C0_CONTROLS = bytes(c for c in range(32) if c not in (9, 10, 13))
#: Seconds to wait for any one reply; ``timeout`` in each config section changes it.
DEFAULT_TIMEOUT_S = 30.0
#: The one bulk SageTV listing: a real server takes minutes to build 100,000 items.
DEFAULT_LIST_TIMEOUT_S = 600.0
#: Retries of a failed read (connection refused, 5xx, timeout), with backoff.
READ_RETRIES = 3
RETRY_BACKOFF_S = 0.3
#: Concurrent writes per server. SageTV's web server has threads to spare, but each
#: watched write takes a lock on SageTV's database: a few in flight hide the network's
#: latency (8 do a 20 ms-a-write first sync 1.5x faster than 4), more only queue there.
#: Plex serves many at once. ``write_workers`` in each config section changes them.
DEFAULT_SAGE_WRITE_WORKERS = 8
DEFAULT_PLEX_WRITE_WORKERS = 8
#: The guard (§5): a plan that un-watches or moves back more items than this, whatever the
#: library's size, asks first (the config's "guard" sets another; 0 turns it off).
GUARD_ITEMS = 20
PLEX_LIBRARY = "com.plexapp.plugins.library"
CONFIG_FILE_NAME = "sageplex_cfg.json"
STATE_FILE_NAME = "sageplex_state.sqlite"  # before state files were named after the config
STATE_FILE_SUFFIX = ".state.sqlite"
LOG_FILE_NAME = "sageplex_sync.log"
LOG_FORMAT = "%(asctime)s| %(levelname)-8s| %(threadName)s| %(message)s"
#: Sections sageplex_sync can sync: Plex type name -> listing type number.
VIDEO_SECTION_TYPES = {"movie": 1, "show": 4}
#: The original tool's scanners and agents for --addtv / --addmovie.
TV_SECTION = {"type": "show", "scanner": "SageTV Scanner",
              "agent": "com.plexapp.agents.bmtagenttvshows"}
MOVIE_SECTION = {"type": "movie", "scanner": "SageTV Movie Scanner",
                 "agent": "com.plexapp.agents.imdb"}
#: Ids are ASCII digits: str.isdigit() would take "²" and "１００３".
ASCII_ID = re.compile(r"[0-9]+\Z")

log = logging.getLogger("sageplex_sync")


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    INTERRUPTED = 130


class SyncError(Exception):
    """An error reported to the user in one line (no traceback)."""

    exit_code = ExitCode.FAILED


class UsageError(SyncError):
    """The command line asks for something that cannot be done; the fix is to change it."""

    exit_code = ExitCode.USAGE


class ConfigError(SyncError):
    """sageplex_cfg.json is missing, unreadable or has a bad value."""


class SageError(SyncError):
    """The SageTV server failed or refused a request, or sent a record we cannot read."""


class PlexError(SyncError):
    """The Plex server failed or refused a request, or sent a record we cannot read."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of a refused request, else 0


class StateError(SyncError):
    """The sync state file is damaged, locked by another run, or cannot be written."""


class Secrets:
    """The passwords and tokens of one run, so that no output ever shows one."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add(self, *values: str | None) -> None:
        for value in values:
            if value and len(value) >= 3:  # a 1-2 character secret would mangle every line
                self._values.add(value)

    def redact(self, text: str) -> str:
        for value in sorted(self._values, key=len, reverse=True):
            text = text.replace(value, "<hidden>")
        return text


class _RedactingFormatter(logging.Formatter):
    def __init__(self, secrets: Secrets) -> None:
        super().__init__(LOG_FORMAT)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return self.secrets.redact(super().format(record))


def user_state_dir(platform: str = sys.platform) -> Path:
    """The user's own folder for state and logs, as each platform names it."""
    env = os.environ
    if platform.startswith("win"):
        root = env.get("LOCALAPPDATA") or os.path.join(env.get("USERPROFILE", "~"),
                                                       "AppData", "Local")
        return Path(os.path.expanduser(root)) / "sageplex_sync"
    if platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "sageplex_sync"
    root = env.get("XDG_STATE_HOME") or os.path.join("~", ".local", "state")
    return Path(os.path.expanduser(root)) / "sageplex_sync"


###############################################################################
# Configuration: sageplex_cfg.json in the original schema, checked ###########
###############################################################################


@dataclass(frozen=True)
class ServerConfig:
    """Where one server is and how to log in; secrets never appear in repr()."""

    name: str  # "sagex" or "plex": the config section, for messages
    host: str
    port: int
    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    timeout_s: float = DEFAULT_TIMEOUT_S
    list_timeout_s: float = DEFAULT_LIST_TIMEOUT_S
    write_workers: int = DEFAULT_SAGE_WRITE_WORKERS

    @property
    def label(self) -> str:
        return "SageTV" if self.name == "sagex" else "Plex"

    @property
    def base_url(self) -> str:
        # The original config holds a bare host name; an "https://host" is honoured too.
        scheme, host = ("http", self.host)
        if "://" in self.host:
            scheme, host = self.host.split("://", 1)
        return f"{scheme}://{host.rstrip('/')}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Config:
    path: Path
    sage: ServerConfig
    plex: ServerConfig
    warnings: tuple[str, ...] = ()
    #: The guard's limit (§5): un-watches or moves back that ask first; 0 turns it off.
    guard_items: int = GUARD_ITEMS


#: Keys each section knows; others get a "did you mean" warning.
KNOWN_KEYS = {
    "sagex": ("host", "port", "user", "password", "timeout", "list_timeout", "write_workers"),
    "plex": ("host", "port", "token", "timeout", "write_workers"),
}
#: The example file's values, which a user must replace.
PLACEHOLDERS = {("sagex", "user"): "enter_username", ("sagex", "password"): "enter_password",
                ("plex", "token"): "enter_plex_token"}


def plex_data_dirs(platform: str = sys.platform) -> list[Path]:
    """Where Plex Media Server keeps its data, where the original looked for the config."""
    env = os.environ
    if platform.startswith("win"):
        candidates = [os.path.join(env.get("LOCALAPPDATA", ""), "Plex Media Server"),
                      os.path.join(env.get("USERPROFILE", ""), "Local Settings",
                                   "Application Data", "Plex Media Server")]
    elif platform == "darwin":
        candidates = ["~/Library/Application Support/Plex Media Server"]
    else:
        candidates = ["~/Library/Application Support/Plex Media Server",
                      "/var/lib/plexmediaserver/Library/Application Support/Plex Media Server"]
        if env.get("PLEX_HOME"):
            candidates.insert(0, os.path.join(env["PLEX_HOME"], "Library", "Application Support",
                                              "Plex Media Server"))
    return [Path(os.path.expanduser(c)) for c in candidates]


def find_config(explicit: str | None = None) -> Path:
    """The config file: -c PATH, else $SAGEPLEX_CFG (a file or a folder), else PMS's folder,
    else the current folder."""
    if explicit:
        return _config_file(Path(os.path.expanduser(os.path.expandvars(explicit))))
    env_value = os.environ.get("SAGEPLEX_CFG")
    if env_value:
        return _config_file(Path(os.path.expanduser(os.path.expandvars(env_value))))
    searched = [d / CONFIG_FILE_NAME for d in plex_data_dirs()] + [Path.cwd() / CONFIG_FILE_NAME]
    for candidate in searched:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no {CONFIG_FILE_NAME} found (looked in {', '.join(str(s.parent) for s in searched)}); "
        f"copy {CONFIG_FILE_NAME}.example there, or point SAGEPLEX_CFG or -c at your file")


def _config_file(path: Path) -> Path:
    if path.is_dir():
        path = path / CONFIG_FILE_NAME
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; "
                          f"create it from {CONFIG_FILE_NAME}.example or fix SAGEPLEX_CFG / -c")
    return path


def load_config(path: Path, secrets: Secrets | None = None) -> Config:
    """Read and check the config file; every problem names the file and the key."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start + 1}); "
                          "save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.__class__.__name__}: "
                          f"{exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON (line {exc.lineno}, "
                          f"column {exc.colno}: {exc.msg}); fix the syntax") from None
    config = parse_config(data, path)
    if secrets is not None:
        secrets.add(config.sage.password, config.plex.token)
        if config.sage.user or config.sage.password:
            secrets.add(base64.b64encode(f"{config.sage.user}:{config.sage.password}".encode())
                        .decode())
    return config


class _Section:
    """One section of the config file, read key by key with messages that name the key."""

    def __init__(self, data: dict, name: str, path: Path) -> None:
        value = data.get(name)
        if value is None:
            raise ConfigError(f"config file {path}: key '{name}' is missing; "
                              f"copy it from {CONFIG_FILE_NAME}.example")
        if not isinstance(value, dict):
            raise ConfigError(f"config file {path}: '{name}' must be an object "
                              f"like {{\"host\": ..., \"port\": ...}}")
        self.values, self.name, self.path = value, name, path

    def text(self, key: str, required: bool = True) -> str:
        value = self.values.get(key)
        if value is None:
            if required:
                raise ConfigError(f"config file {self.path}: key '{self.name}.{key}' is "
                                  "missing; add it")
            return ""
        if not isinstance(value, str) or (required and not value.strip()):
            raise ConfigError(f"config file {self.path}: '{self.name}.{key}' must be a "
                              "non-empty string")
        return value.strip() if key == "host" else value

    def number(self, key: str, default: float, *, integer: bool = False,
               low: float = 0, high: float = float("inf"), unit: str = "") -> float:
        value = self.values.get(key, default)
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not low < value < high:
            span = (f"a number from {int(low) + 1} to {int(high) - 1}" if integer
                    else "a positive number of seconds")
            what = f" ({unit})" if unit else ""
            raise ConfigError(f"config file {self.path}: '{self.name}.{key}' must be {span}"
                              f"{what} without quotes, not {json.dumps(value)}")
        return value

    def warnings(self) -> list[str]:
        known = KNOWN_KEYS[self.name]
        found = []
        for key in self.values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean '{self.name}.{close[0]}'?" if close else " (ignored)"
                found.append(f"config file {self.path}: unknown key '{self.name}.{key}'{hint}")
        for (section, key), placeholder in PLACEHOLDERS.items():
            if section == self.name and self.values.get(key) == placeholder:
                found.append(f"config file {self.path}: '{section}.{key}' is still the "
                             f"example's placeholder {placeholder!r}; put yours in")
        return found


def parse_config(data: object, path: Path) -> Config:
    """Check the original schema: {"sagex": {host, port, user, password}, "plex": {host, port,
    token}} plus optional timeouts and write workers; other sections (the scanner's, the
    agent's) are ignored."""
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object with 'sagex' and 'plex'")
    sagex, plex = _Section(data, "sagex", path), _Section(data, "plex", path)

    def port(sect: _Section) -> int:
        if sect.values.get("port") is None:
            raise ConfigError(f"config file {path}: key '{sect.name}.port' is missing; add it")
        return int(sect.number("port", 0, integer=True, high=65536, unit="the port"))

    sage_config = ServerConfig(
        "sagex", sagex.text("host"), port(sagex), user=sagex.text("user"),
        password=sagex.text("password"),
        timeout_s=float(sagex.number("timeout", DEFAULT_TIMEOUT_S)),
        list_timeout_s=float(sagex.number("list_timeout", DEFAULT_LIST_TIMEOUT_S)),
        write_workers=int(sagex.number("write_workers", DEFAULT_SAGE_WRITE_WORKERS,
                                       integer=True, high=65, unit="writes at a time")))
    # The original config had no token: a PMS that trusts its LAN needs none.
    plex_config = ServerConfig(
        "plex", plex.text("host"), port(plex), token=plex.text("token", required=False),
        timeout_s=float(plex.number("timeout", DEFAULT_TIMEOUT_S)),
        write_workers=int(plex.number("write_workers", DEFAULT_PLEX_WRITE_WORKERS,
                                      integer=True, high=65, unit="writes at a time")))
    guard = data.get("guard", GUARD_ITEMS)
    if not isinstance(guard, int) or isinstance(guard, bool) or guard < 0:
        raise ConfigError(f"config file {path}: 'guard' must be a whole number of items, 0 or "
                          f"more (0 turns the guard off), not {guard!r}")
    return Config(path, sage_config, plex_config, tuple(sagex.warnings() + plex.warnings()),
                  guard)


###############################################################################
# HTTP plumbing: sessions, retries, clocks and transport errors of both clients
###############################################################################


class _LazyModule:
    """A module imported where it is first used, which then takes its place among the
    module's names: --version, --help and the commands that reach no server start without
    requests and urllib3 (half of the tool's start-up)."""

    def __init__(self, name: str, alias: str) -> None:
        self._name, self._alias = name, alias

    def __getattr__(self, attr: str) -> Any:
        import importlib

        module = importlib.import_module(self._name)
        globals()[self._alias] = module
        return getattr(module, attr)


if not TYPE_CHECKING:
    requests = _LazyModule("requests", "requests")
    urllib3_errors = _LazyModule("urllib3.exceptions", "urllib3_errors")


class _Counter:
    """Counts a client's replies (the benchmark reports them) and measures its server's
    clock from their Date headers."""

    def __init__(self, local_ms: Callable[[], int]) -> None:
        self.count = 0
        self.local_ms = local_ms
        self.offset_ms: int | None = None
        self.again = False

    def measure_again(self) -> None:
        """The next reply measures the clock again (a long-running mode: a server's clock
        can be set while it runs)."""
        self.again = True

    def __call__(self, response: requests.Response, *args: object, **kwargs: object) -> None:
        self.count += 1
        # The first reply of a run sets the offset: later ones would only add jitter, and
        # are not parsed.
        date = response.headers.get("Date") if self.offset_ms is None or self.again else None
        self.again = False
        if date:
            try:
                server_ms = int(email.utils.parsedate_to_datetime(date).timestamp() * 1000)
            except (TypeError, ValueError, IndexError, OverflowError):
                return
            # Whole seconds: the header has no finer grain, and the reply took time to come.
            self.offset_ms = round((server_ms - self.local_ms()) / 1000) * 1000


def _session(retries: Retry, counter: _Counter, pool_size: int) -> requests.Session:
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    session.hooks["response"].append(counter)
    session.trust_env = False  # a proxy from the environment has no business with a LAN server
    adapter = HTTPAdapter(max_retries=retries, pool_connections=2, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _read_retries(read: int = 2) -> Retry:
    from urllib3.util.retry import Retry

    return Retry(total=READ_RETRIES, connect=READ_RETRIES, read=read, status=READ_RETRIES,
                 other=0, backoff_factor=RETRY_BACKOFF_S,
                 status_forcelist=(429, 500, 502, 503, 504), allowed_methods={"GET"},
                 raise_on_status=False)


def _listing_retries() -> Retry:
    """Retries of the bulk listing: as any read, except that a read timeout is not
    retried, since the server is most likely still building the first reply."""
    from urllib3.util.retry import Retry

    class _ListingRetry(Retry):
        def increment(self, method: str | None = None, url: str | None = None,
                      response: Any = None, error: Exception | None = None,
                      _pool: Any = None, _stacktrace: Any = None) -> _ListingRetry:
            if isinstance(error, urllib3_errors.ReadTimeoutError):
                raise error
            return cast(_ListingRetry, super().increment(method, url, response, error, _pool,
                                                         _stacktrace))

    reads = _read_retries()
    return _ListingRetry(**{k: getattr(reads, k) for k in (
        "total", "connect", "read", "status", "other", "backoff_factor", "status_forcelist",
        "allowed_methods", "raise_on_status")})


def _write_retries() -> Retry:
    from urllib3.util.retry import Retry

    # Only a refused connection is retried: the request never reached the server.
    return Retry(total=2, connect=2, read=0, status=0, other=0, redirect=0,
                 backoff_factor=RETRY_BACKOFF_S, raise_on_status=False)


def _read_again_if_cut_off(read: Callable[[], Any]) -> Any:
    """A read whose reply was cut off mid-body, asked again with backoff: urllib3's Retry
    sees only the status line and headers, and requests reads the body after it."""
    for attempt in range(READ_RETRIES):
        try:
            return read()
        except requests.exceptions.ChunkedEncodingError as exc:
            log.debug("reply cut off (%r); asking again", exc)
            time.sleep(RETRY_BACKOFF_S * 2 ** attempt)
    return read()


def _reply_decoder(content_type: str) -> Callable[..., str]:
    """An incremental decoder of a reply in its charset (UTF-8 when it names none or an
    unknown one), as lenient as plexapi: undecodable bytes become U+FFFD and the control
    characters XML does not allow are dropped."""
    found = re.search(r"charset=([\w.:-]+)", content_type)
    try:
        codec = codecs.lookup(found.group(1) if found else "utf-8")
    except LookupError:
        codec = codecs.lookup("utf-8")
    decode = codec.incrementaldecoder(errors="replace").decode
    if codec.encode("\x01")[0] != b"\x01":
        return decode  # not ASCII-based (UTF-16...): no control bytes to drop
    return lambda data, final=False: decode(data.translate(None, XML_C0_CONTROLS), final)


def _transport_error(server: ServerConfig, exc: requests.RequestException, what: str,
                     timeout_s: float | None = None, timeout_key: str = "timeout") -> str:
    label = server.label
    # Once its retries are used up, requests reports a timeout or a failed name lookup as
    # a ConnectionError around urllib3's MaxRetryError: the reason says what it was.
    # (urllib3's NewConnectionError, a refused connection, is a TimeoutError by descent.)
    reason_exc = getattr(exc.args[0], "reason", None) if exc.args else None
    if isinstance(reason_exc, urllib3_errors.NameResolutionError):
        return (f"cannot reach {label}: the host name {server.host!r} is not known ({what}); "
                f"check {server.name}.host in the config")
    if isinstance(exc, requests.Timeout) or (
            isinstance(reason_exc, urllib3_errors.TimeoutError)
            and not isinstance(reason_exc, urllib3_errors.NewConnectionError)):
        return (f"{label} at {server.address} did not answer within "
                f"{timeout_s or server.timeout_s:g} s ({what}); check the server, or raise "
                f"{server.name}.{timeout_key} in the config")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return (f"{label} at {server.address} cut its reply off {what} (connection lost); "
                "check that the server is running, then try again")
    if isinstance(exc, requests.ConnectionError):
        reason = "connection refused" if "refused" in str(exc).lower() else "connection lost"
        return (f"cannot reach {label} at {server.address} ({reason}, {what}); check "
                f"{server.name}.host and {server.name}.port and that the server is running")
    return f"{label} at {server.address} failed {what}: {exc.__class__.__name__}"


_ClientT = TypeVar("_ClientT", bound="_Client")
#: A URL's path and query that requests would send as they are: nothing to quote, and
#: escapes only as urllib.parse.quote makes them (of reserved characters, upper case).
_PLAIN_URL_TAIL = re.compile(r"/(?:[A-Za-z0-9._~:/?\[\]@!$&'()*+,;=-]|%[0-9A-F]{2})*\Z")


class _Prepared:
    """Requests prepared from a template per session, method and headers, and handed to
    the session's adapter: requests would merge the session's settings, cookies and auth
    into every request afresh (a third of a small request's time), and ``Session.send``
    would look for proxies, cookies and redirects in every reply (about a tenth of a
    write's CPU, spent under the one interpreter lock the write threads share). A reply
    that sets a cookie or redirects is taken as ``Session.send`` takes it; a session holding
    cookies, or one that reads proxies from the environment, goes the whole way each time."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._templates: dict[tuple, tuple[requests.PreparedRequest, Any]] = {}
        self._base: str | None = None  # base_url as requests normalises it

    def send(self, session: requests.Session, method: str, tail: str,
             headers: dict[str, str] | None, timeout: float, stream: bool
             ) -> requests.Response:
        """``tail``: the path and query after the base URL, already quoted."""
        if session.cookies or session.trust_env or not _PLAIN_URL_TAIL.match(tail):
            return session.request(method, self.base_url + tail, headers=headers,
                                   timeout=timeout, stream=stream)
        key = (id(session), method, tuple(sorted((headers or {}).items())))
        found = self._templates.get(key)
        if found is None:
            template = session.prepare_request(requests.Request(
                method.upper(), self.base_url + "/", headers=headers))
            found = self._templates[key] = (template, session.get_adapter(self.base_url))
        template, adapter = found
        if self._base is None:
            self._base = cast(str, template.url).rstrip("/")
        prepared = template.copy()
        prepared.url = self._base + tail
        settings: dict[str, Any] = {"stream": stream, "timeout": timeout, "verify": session.verify,
                                    "cert": session.cert, "proxies": session.proxies}
        response = requests.hooks.dispatch_hook(
            "response", prepared.hooks, adapter.send(prepared, **settings), **settings)
        if "set-cookie" in response.headers or "set-cookie2" in response.headers:
            requests.cookies.extract_cookies_to_jar(session.cookies, prepared, response.raw)
        if response.is_redirect:
            history = [response, *session.resolve_redirects(response, prepared, **settings)]
            response = history.pop()
            response.history = history
        if not stream:
            response.content  # noqa: B018 - read now, as Session.send does: the connection goes back
        return response


def _local_ms() -> int:
    return int(time.time() * 1000)


class _Client:
    """What both clients share: a session for reads (retried) and one for writes (not
    retried once sent), counted, clocked, and closed on leaving a ``with`` block."""

    def __init__(self, server: ServerConfig, local_ms: Callable[[], int] = _local_ms) -> None:
        self.server = server
        self._counter = _Counter(local_ms)
        pool = server.write_workers + 2
        self._reads = _session(_read_retries(), self._counter, pool)
        self._writes = _session(_write_retries(), self._counter, pool)
        self._prepared = _Prepared(server.base_url.rstrip("/"))

    @property
    def request_count(self) -> int:
        return self._counter.count

    @property
    def clock_offset_ms(self) -> int:
        """How far the server's clock is ahead of ours (0 until a reply said, or within
        the minute the rules let pass)."""
        offset = self._counter.offset_ms or 0
        return offset if abs(offset) > CLOCK_OFFSET_REPORTED_MS else 0

    @property
    def measured_offset_ms(self) -> int | None:
        return self._counter.offset_ms

    def __enter__(self: _ClientT) -> _ClientT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._reads.close()
        self._writes.close()


###############################################################################
# The SageTV client: every sagex request goes through SageClient.call #########
###############################################################################


class SageClient(_Client):
    """The sagex HTTP API: one bulk listing, lookups by id, and the three watched writes.

    Credentials travel in the Authorization header (never in a URL, which would put
    them in error messages). Reads are retried on transient failures; writes are not;
    the bulk listing is not asked again while a server may still be building it.
    """

    def __init__(self, server: ServerConfig, local_ms: Callable[[], int] = _local_ms) -> None:
        super().__init__(server, local_ms)
        self.url = f"{server.base_url}/sagex/api"
        # A read timeout on the listing means the server is still building it: asking
        # again would make it build a second one beside the first.
        self._listing = _session(_listing_retries(), self._counter, 2)
        for session in (self._reads, self._writes, self._listing):
            session.auth = (server.user, server.password)

    def close(self) -> None:
        super().close()
        self._listing.close()

    def call(self, function: str, *args: object, write: bool = False, listing: bool = False,
             start: int | None = None, size: int | None = None,
             fields: Sequence[str] | None = None,
             convert: Callable[[dict], Any] | None = None) -> dict:
        """Call one sagex function and return the decoded JSON object: the choke point."""
        params: dict[str, Any] = {"c": function, "encoder": "json"}
        for number, arg in enumerate(args, start=1):
            params[str(number)] = arg
        if start is not None:
            params["start"] = start
        if size is not None:
            params["size"] = size
        if fields:
            params["filter"] = "|".join(fields)
        what = f"to {function}"
        # "airing:ID" as it is: a query with nothing to escape takes urllib3's fast path
        # (re-escaping "%3A" cost a write 0.15 ms of its 1.1 ms of CPU).
        query = "/sagex/api?" + urllib.parse.urlencode(params, safe=":")
        log.debug("sagex %s %s", function, args)
        session = self._writes if write else self._listing if listing else self._reads
        timeout = self.server.list_timeout_s if listing else self.server.timeout_s

        def get() -> tuple[requests.Response, bytearray]:
            with self._prepared.send(session, "get", query, None, timeout, True) as response:
                # The body in big pieces: in requests' own 10 KB ones, a 50 MB listing
                # spends a fifth of its read in Python. Into one buffer, which _decode
                # empties: joined pieces would hold the body twice.
                body = bytearray()
                for piece in response.iter_content(SAGE_READ_CHUNK):
                    body += piece
                return response, body
        try:
            response, body = get() if write else _read_again_if_cut_off(get)
        except requests.RequestException as exc:
            log.debug("sagex %s failed: %r", function, exc)
            raise SageError(_transport_error(
                self.server, exc, what, timeout,
                "list_timeout" if listing else "timeout")) from None
        return self._decode(response, body, what, convert)

    def _decode(self, response: requests.Response, body: bytearray, what: str,
                convert: Callable[[dict], Any] | None = None) -> dict:
        where = f"SageTV at {self.server.address}"
        if response.status_code in (401, 403):
            raise SageError(f"{where} refused the user name or password (HTTP "
                            f"{response.status_code}); check sagex.user and sagex.password")
        if response.status_code == 404:
            raise SageError(f"{where} has no sagex API at /sagex/api (HTTP 404); is the "
                            "sagex-api plugin installed and sagex.port the web server's port?")
        if response.status_code != 200:
            raise SageError(f"{where} answered HTTP {response.status_code} {what}")
        try:
            # From the bytes: response.json() would first make a full-size str copy; each
            # media file is converted as soon as it is parsed, so the raw ones never pile up.
            hook = None if convert is None else (
                lambda obj: convert(obj) if "MediaFileID" in obj else obj)
            size = len(body)
            # As json.loads decodes bytes, but the bytes let go before the parse builds
            # its objects: a 100,000-file listing's peak is 50 MB lower.
            text = body.decode(json.detect_encoding(body), "surrogatepass")
            body.clear()
            data = json.loads(text, object_hook=hook)
        except ValueError:
            raise SageError(f"{where} sent a reply {what} that is not JSON "
                            f"({size} bytes); is this a sagex server?") from None
        if not isinstance(data, dict):
            raise SageError(f"{where} sent an unexpected reply {what} (not a JSON object)")
        # A top-level "error" is a failed call; one nested inside a serialized object is
        # only a getter that failed, and is ignored.
        error = data.get("error")
        if error is None and isinstance(data.get("exception"), str):
            error = data["exception"]  # a Java exception with no message has only this
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else error
            first_line = (str(message or "unknown error").splitlines() or ["unknown error"])[0]
            raise SageError(f"{where} reported an error {what}: {first_line}")
        return data

    def media_files(self, fields: Sequence[str], convert: Callable[[dict], Any] | None = None
                    ) -> list[Any]:
        """Every recorded TV and imported video file, with its airing: one request. Each
        record is handed to ``convert`` as soon as it is parsed."""
        records: list[Any] = []
        while True:
            page = self.call("GetMediaFiles", "TV", listing=True, start=len(records),
                             size=SAGEX_PAGE_SIZE, fields=fields, convert=convert).get("Result")
            if not isinstance(page, list):
                raise SageError(f"SageTV at {self.server.address} sent a media file listing "
                                "without a 'Result' list")
            records.extend(page)
            if len(page) < SAGEX_PAGE_SIZE:  # sagex gives no total: a short page is the last
                return records

    def media_file(self, media_file_id: int, fields: Sequence[str] | None = None) -> dict | None:
        """One media file by id (None when SageTV does not know it)."""
        record = self.call("GetMediaFileForID", media_file_id, fields=fields).get("MediaFile")
        return record if isinstance(record, dict) else None

    def segment_times(self, media_file_id: int, count: int) -> list[tuple[int, int]]:
        """Start and end (airing timeline, ms) of each segment of a multi-segment file."""
        ref = f"mediafile:{media_file_id}"
        times = []
        for index in range(count):
            start = self.call("GetStartForSegment", ref, index).get("Result")
            end = self.call("GetEndForSegment", ref, index).get("Result")
            if not isinstance(start, int) or not isinstance(end, int):
                raise SageError(f"SageTV sent no times for segment {index} of media file "
                                f"{media_file_id}")
            times.append((start, end))
        return times

    def set_watched(self, airing_id: int) -> None:
        self.call("SetWatched", f"airing:{airing_id}", write=True)

    def clear_watched(self, airing_id: int) -> None:
        self.call("ClearWatched", f"airing:{airing_id}", write=True)

    def set_watched_times(self, airing_id: int, watched_end_ms: int, real_start_ms: int) -> None:
        self.call("SetWatchedTimes", f"airing:{airing_id}", int(watched_end_ms),
                  int(real_start_ms), write=True)

    def now_ms(self) -> int:
        """The server's clock now, as far as its replies told."""
        return self._counter.local_ms() + (self._counter.offset_ms or 0)

    def measure_clock_again(self) -> None:
        self._counter.measure_again()


###############################################################################
# The Plex client: plexapi for the connection, PlexClient.request for the rest
###############################################################################


@dataclass(frozen=True)
class PlexSection:
    key: int
    title: str
    type: str
    locations: tuple[str, ...] = ()


class PlexClient(_Client):
    """Plex Media Server: plexapi connects (and adds sections, with its folder checks);
    every other request goes through ``request``, which sends plexapi's own headers on
    our sessions and raises PlexError directly. Listings are parsed as they stream in,
    with no per-item objects. The token travels in the X-Plex-Token header only."""

    def __init__(self, server: ServerConfig, local_ms: Callable[[], int] = _local_ms) -> None:
        super().__init__(server, local_ms)
        self._plex: Any = None
        #: The server's root (its MediaContainer's attributes), once connected.
        self._root: dict[str, str] | None = None
        self._headers: Callable[..., dict[str, str]] = dict
        self.where = f"Plex at {server.address}"

    @contextlib.contextmanager
    def _plexapi_errors(self, what: str) -> Iterator[None]:
        """plexapi's and requests' exceptions inside the block, as one-line PlexErrors."""
        from plexapi import exceptions as plex_errors

        try:
            yield
        except plex_errors.Unauthorized:
            raise self._status_error(401, what) from None
        except plex_errors.NotFound:
            raise self._status_error(404, what) from None
        except plex_errors.BadRequest as exc:
            code = re.match(r"\((\d+)\)", str(exc))
            raise self._status_error(int(code.group(1)) if code else 400, what) from None
        except requests.RequestException as exc:
            raise PlexError(_transport_error(self.server, exc, what)) from None
        except ParseError:
            raise PlexError(f"{self.where} sent a reply {what} that is not valid XML") from None

    def _status_error(self, status: int, what: str) -> PlexError:
        if status == 401:
            return PlexError(f"{self.where} refused the token (HTTP 401); "
                             "check plex.token in the config", status)
        hint = "; the token's user may not manage this server" if status == 403 else ""
        return PlexError(f"{self.where} answered HTTP {status} {what}{hint}", status)

    @property
    def plex(self) -> Any:
        """The plexapi PlexServer, connected on first use (one request): for what needs
        plexapi's object model (adding a section, the notification websocket)."""
        if self._plex is None:
            from plexapi.server import PlexServer

            with self._plexapi_errors("when connecting"):
                server = PlexServer(self.server.base_url, self.server.token or None,
                                    session=self._reads, timeout=self.server.timeout_s)
            if server.machineIdentifier is None and server.version is None:
                raise PlexError(f"{self.where} sent an empty reply when connecting; "
                                "is this a Plex Media Server?")
            self._plex, self._headers = server, _plexapi_internals(server)
            self._root = {"machineIdentifier": server.machineIdentifier,
                          "friendlyName": server.friendlyName, "version": server.version}
        return self._plex

    @property
    def root(self) -> dict[str, str]:
        """The server's own attributes (machineIdentifier, friendlyName, version), read on
        connecting: one request, with plexapi's headers but without its object model,
        which listings and writes do not use."""
        if self._root is None:
            self._headers = _plexapi_headers(self.server.token)
            root = self.xml("/", "when connecting")
            attrs = {} if root is None else dict(root.attrib)
            if attrs.get("machineIdentifier") is None and attrs.get("version") is None:
                raise PlexError(f"{self.where} sent an empty reply when connecting; "
                                "is this a Plex Media Server?")
            self._root = attrs
        return self._root

    def request(self, path: str, what: str, *, method: str = "get", write: bool = False,
                headers: dict[str, str] | None = None, stream: bool = False) -> requests.Response:
        """One request to Plex: the choke point. A 2xx reply or a PlexError. A write goes
        through the session that never repeats a request that reached the server."""
        if self._root is None and path != "/":
            self.root  # noqa: B018 - connects
        session = self._writes if write else self._reads
        all_headers = self._headers(**(headers or {}))
        log.debug("%s %s", method.upper(), path)

        def send() -> requests.Response:
            response = self._prepared.send(session, method, path, all_headers,
                                           self.server.timeout_s, stream)
            if response.status_code >= 300:
                response.close()
                raise self._status_error(response.status_code, what)
            return response
        try:
            return send() if write or stream else _read_again_if_cut_off(send)
        except requests.RequestException as exc:
            log.debug("plex %s failed: %r", what, exc)
            raise PlexError(_transport_error(self.server, exc, what)) from None

    def xml(self, path: str, what: str, *, method: str = "get", write: bool = False
            ) -> Element | None:
        """A request's reply parsed (None when it is empty), as plexapi parses even the
        replies to writes."""
        response = self.request(path, what, method=method, write=write)
        text = _reply_decoder(response.headers.get("Content-Type", ""))(response.content, True)
        if not text.strip():
            return None
        try:
            return fromstring(text)
        except ParseError:
            raise PlexError(f"{self.where} sent a reply {what} that is not valid XML") from None

    def sections(self) -> list[PlexSection]:
        root = self.xml("/library/sections", "to the section listing")
        if root is None:
            return []
        return [PlexSection(int(d.get("key", 0)), d.get("title", ""), d.get("type", ""),
                            tuple(loc.get("path", "") for loc in d.iter("Location")))
                for d in root.iter("Directory")]

    def played_threshold(self) -> tuple[float, str]:
        """The server's "video played threshold" (a fraction) and where it came from."""
        try:
            root = self.xml("/:/prefs", "to the server settings")
        except PlexError as exc:
            if exc.status in (401, 403, 404):
                return DEFAULT_PLEX_PLAYED_PERCENT / 100, "Plex's default (settings not readable)"
            raise
        for setting in (root if root is not None else ()):
            if setting.get("id") == "LibraryVideoPlayedThreshold":
                value = setting.get("value") or ""
                if ASCII_ID.match(value) and 0 < int(value) <= 100:
                    return int(value) / 100, "the server's setting"
        return DEFAULT_PLEX_PLAYED_PERCENT / 100, "Plex's default (no setting found)"

    def section_videos(self, section: PlexSection) -> Iterator[VideoRecord]:
        """Every movie or episode of a section, each as soon as it has arrived."""
        path = f"/library/sections/{section.key}/all?type={VIDEO_SECTION_TYPES[section.type]}"
        what = f"to the listing of section {section.key}"
        start = 0
        while True:
            container: dict[str, str] = {}
            count = 0
            for video in self._streamed_videos(path, what, {
                    "X-Plex-Container-Start": str(start),
                    "X-Plex-Container-Size": str(PLEX_PAGE_SIZE)}, container):
                count += 1
                yield video
            start += count
            total = container.get("totalSize")
            if not count or (total is not None and start >= int(total)):
                return
            if total is None:
                # Without totalSize a short page may still not be the last (a server that
                # caps page sizes): ask until a page comes back empty.
                log.warning("Plex listing of section %s has no totalSize; paging on",
                            section.key)

    def _streamed_videos(self, path: str, what: str, headers: dict[str, str],
                         container: dict[str, str]) -> Iterator[VideoRecord]:
        """The Video children of one listing page, parsed while the reply streams in; a
        reply cut off half-way is asked for again, skipping the videos handed on."""
        done = 0
        for attempt in range(READ_RETRIES + 1):
            skip = done
            try:
                for video in self._parse_listing(path, what, headers, container):
                    if skip:
                        skip -= 1
                        continue
                    done += 1
                    yield video
                return
            except requests.exceptions.ChunkedEncodingError as exc:
                if attempt == READ_RETRIES:
                    raise PlexError(_transport_error(self.server, exc, what)) from None
                log.debug("reply cut off (%r); asking again", exc)
                time.sleep(RETRY_BACKOFF_S * 2 ** attempt)

    def _parse_listing(self, path: str, what: str, headers: dict[str, str],
                       container: dict[str, str]) -> Iterator[VideoRecord]:
        with self.request(path, what, headers=headers, stream=True) as response:
            decode = _reply_decoder(response.headers.get("Content-Type", ""))
            parser = _ListingParser(container)
            empty = True  # plexapi reads an empty (or blank) reply as no container at all
            try:
                for chunk in response.iter_content(PLEX_STREAM_CHUNK):
                    text = decode(chunk)
                    if empty and not text.strip():
                        continue
                    empty = False
                    yield from parser.feed(text)
                if not empty:
                    yield from parser.feed(decode(b"", True), final=True)
            except expat.ExpatError:
                raise PlexError(f"{self.where} sent a reply {what} that is not valid "
                                "XML") from None
            except requests.exceptions.ChunkedEncodingError:
                raise
            except requests.RequestException as exc:
                raise PlexError(_transport_error(self.server, exc, what)) from None

    def listing(self, sections: Sequence[PlexSection]) -> PlexListing:
        """Every movie and episode of the sections, in batches as they arrive. On Linux,
        before any other thread runs, a child process reads and converts them: expat and
        the conversion are most of a check's CPU, and SageTV's listing is read meanwhile
        in this process."""
        process = _ListingProcess.start(lambda: self._listing_answer(sections)) \
            if _listing_may_fork() else None
        if process is None:
            return PlexListing(self._listed(sections))
        log.info("Plex's listing is read in process %d", process.pid)
        return PlexListing(self._listed_by(process, sections), process)

    def _listed(self, sections: Sequence[PlexSection]
                ) -> Generator[list[PlexListed], None, None]:
        batch: list[PlexListed] = []
        for section in sections:
            for record in self.section_videos(section):
                batch.append(plex_listed(record))
                if len(batch) == LISTING_BATCH:
                    yield batch
                    batch = []
        yield batch

    def _listing_answer(self, sections: Sequence[PlexSection]) -> Iterator[Any]:
        """In the listing's process: the batches, then what the parent's client would have
        learnt from the replies (how many, and the error's message and status if any)."""
        # The pooled connections are the parent's, which goes on using them.
        self._reads.close()
        before = self._counter.count
        error = None
        try:
            yield from self._listed(sections)
        except PlexError as exc:
            error = (str(exc), exc.status)
        yield error, self._counter.count - before

    def _listed_by(self, process: _ListingProcess, sections: Sequence[PlexSection]
                   ) -> Generator[list[PlexListed], None, None]:
        """The listing's process's batches as they come; when it ends without finishing
        (a bug), the rest read here. One killed by a signal (the user's ^C, the kernel out
        of memory) is an error: doing its work again would only meet the same end."""
        handed = 0
        try:
            for value in process.values():
                if type(value) is list:
                    handed += len(value)
                    yield value
                    continue
                error, count = value
                self._counter.count += count
                if error is not None:
                    raise PlexError(*error)
        except _NoAnswer as ended:
            if ended.signal_number in (signal.SIGINT, signal.SIGTERM):
                raise KeyboardInterrupt from None  # the user's ^C reached the process group
            if ended.signal_number is not None:
                raise PlexError(f"Plex's listing process was killed (signal "
                                f"{ended.signal_number}) while it read the listing") from None
            log.warning("Plex's listing process gave no answer: reading the listing here")
            yield from _skipped(self._listed(sections), handed)

    def metadata(self, rating_keys: Sequence[int]) -> list[Element]:
        """Items by media id, many in one request (movie, episode, season or show); the
        requests of a long list a few at a time (a sync's read-back of thousands of
        written items would otherwise wait for each in turn)."""
        batches = [",".join(str(k) for k in rating_keys[first:first + PLEX_BATCH])
                   for first in range(0, len(rating_keys), PLEX_BATCH)]
        if len(batches) <= 1:
            return [e for keys in batches for e in self._metadata_batch(keys)]
        with ThreadPoolExecutor(min(len(batches), self.server.write_workers),
                                thread_name_prefix="plex-metadata") as pool:
            return [e for found in pool.map(self._metadata_batch, batches) for e in found]

    def _metadata_batch(self, keys: str) -> list[Element]:
        try:
            root = self.xml(f"/library/metadata/{keys}", f"to media id {keys}")
        except PlexError as exc:
            if exc.status == 404:
                return []
            raise
        return [] if root is None else list(root)

    def children(self, rating_key: int, kind: str) -> list[Element]:
        """Every episode of a show or season."""
        leaves = "allLeaves" if kind == "show" else "children"
        root = self.xml(f"/library/metadata/{rating_key}/{leaves}",
                        f"to the episodes of media id {rating_key}")
        return [] if root is None else root.findall("Video")

    def mark_watched(self, rating_key: int) -> None:
        self.xml(f"/:/scrobble?key={rating_key}&identifier={PLEX_LIBRARY}",
                     f"to mark media id {rating_key} watched", write=True)

    def mark_unwatched(self, rating_key: int) -> None:
        self.xml(f"/:/unscrobble?key={rating_key}&identifier={PLEX_LIBRARY}",
                     f"to mark media id {rating_key} not watched", write=True)

    def set_position(self, rating_key: int, position_ms: int, duration_ms: int) -> None:
        # The timeline call, unlike /:/progress, also works for managed (Home) users.
        self.xml(f"/:/timeline?ratingKey={rating_key}&key=/library/metadata/{rating_key}"
                     f"&identifier={PLEX_LIBRARY}&time={int(position_ms)}&state=stopped"
                     f"&duration={int(duration_ms)}",
                     f"to set the position of media id {rating_key}", write=True)

    def add_section(self, name: str, kind: dict, paths: list[str]) -> None:
        """plexapi's library.add: it checks each folder with the browse call, then POSTs."""
        from plexapi import exceptions as plex_errors

        with self._plexapi_errors("to adding a section"):
            try:
                self.plex.library.add(name=name, type=kind["type"], agent=kind["agent"],
                                      scanner=kind["scanner"], location=paths, language="en")
            except plex_errors.BadRequest as exc:
                found = re.search(r"Path: (.*) does not exist", str(exc))
                if found:
                    raise UsageError(f"Plex cannot see the folder {found.group(1)}; give "
                                     "folders as the Plex server sees them") from None
                raise

    def delete_section(self, key: int) -> None:
        self.request(f"/library/sections/{key}", f"to delete section {key}", method="delete",
                     write=True)

    def refresh_section(self, key: int) -> None:
        self.request(f"/library/sections/{key}/refresh", f"to refresh section {key}",
                     write=True)


def _plexapi_headers(token: str | None) -> Callable[..., dict[str, str]]:
    """The request headers plexapi's PlexServer sends (its client identity, and the token,
    with plexapi's own fallback to its config file), without importing its object model."""
    import plexapi

    token = plexapi.logfilter.add_secret(token or plexapi.CONFIG.get("auth.server_token"))

    def headers(**more: str) -> dict[str, str]:
        found = plexapi.BASE_HEADERS.copy()
        if token:
            found["X-Plex-Token"] = token
        found.update(more)
        return found
    return headers


def _plexapi_internals(server: Any) -> Callable[..., dict[str, str]]:
    """The one place that touches plexapi's private attributes: its request headers
    (client identity and token), and show_secrets off, which a plexapi config.ini could
    turn on to put the token into every URL."""
    server._showSecrets = False
    return cast(Callable[..., dict[str, str]], server._headers)


#: A movie or episode of a listing: its element's attributes and its parts' files.
VideoRecord = tuple[dict[str, str], list[str]]


class _ListingParser:
    """A listing's Video elements as records, parsed with expat as the reply streams in:
    no element objects, and no video kept once handed on (a listing never sits in memory
    whole). The container's own attributes go into ``container``."""

    def __init__(self, container: dict[str, str]) -> None:
        self.container = container
        self._videos: list[VideoRecord] = []
        self._files: list[str] = []
        self._parser = expat.ParserCreate()
        self._parser.StartElementHandler = self._start

    def _start(self, tag: str, attrs: dict[str, str]) -> None:
        if tag == "Part":
            file = attrs.get("file")
            if file:
                self._files.append(file)
        elif tag == "Video":
            self._files = []
            self._videos.append((attrs, self._files))
        elif tag == "MediaContainer":
            self.container.update(attrs)

    def feed(self, text: str, final: bool = False) -> list[VideoRecord]:
        """The videos this piece of the reply completes: all but the last one begun, whose
        parts may still be on their way (all of them at the end)."""
        self._parser.Parse(text, final)
        videos = self._videos
        if final:
            self._videos = []
            return videos
        self._videos = videos[-1:]
        return videos[:-1]


def video_record(video: Element) -> VideoRecord:
    """A movie or episode element (from a metadata or children reply) as a record."""
    return video.attrib, [file for part in video.iter("Part") if (file := part.get("file"))]


#: A movie or episode as a listing hands it on: a PlexItem's fields in order (the
#: listing's process sends marshal's plain values), or, for a record that cannot be one,
#: a list of its attributes and why.
PlexListed = tuple | list


def plex_listed(record: VideoRecord) -> PlexListed:
    try:
        return plex_fields(record)
    except PlexError as exc:
        return [record[0], str(exc)]


def _skipped(batches: Iterator[list[PlexListed]], count: int) -> Iterator[list[PlexListed]]:
    """The batches without their first ``count`` items (those handed on already)."""
    for batch in batches:
        if count < len(batch):
            yield batch[count:]
        count = max(0, count - len(batch))


class PlexListing:
    """Plex's listing on its way: iterate for its batches. ``stop()`` (from any thread)
    ends its process, if it has one: a run that stops reading, after a failed SageTV
    read; ``close()`` also lets go of what the listing holds."""

    def __init__(self, batches: Generator[list[PlexListed], None, None],
                 process: _ListingProcess | None = None) -> None:
        self.batches, self.process = batches, process

    def __iter__(self) -> Iterator[list[PlexListed]]:
        return self.batches

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def close(self) -> None:
        self.stop()
        self.batches.close()
        if self.process is not None:
            self.process.close()


#: Plex's listing read in a child process where that is safe (see PlexClient.listing).
LISTING_PROCESS = sys.platform.startswith("linux") and hasattr(os, "fork")


def _listing_may_fork() -> bool:
    """Only while the process has one thread: a child gets a copy of every lock, and one
    held by another thread at the fork would be held in the child for ever."""
    return LISTING_PROCESS and threading.active_count() == 1


class _NoAnswer(Exception):
    """A listing's process ended before it gave all its values: killed by a signal (its
    number), or failed (None)."""

    def __init__(self, signal_number: int | None) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


class _ListingProcess:
    """A forked child that runs one generator and hands its values on as it makes them,
    each with marshal (plain values only: a batch of 2,000 items loads in a millisecond)
    into a file of its own (in memory where it can be), whose descriptor it sends on a
    socket; this process reads the file and closes it, which frees it. Through a pipe
    alone, the child would wait whenever this process cannot read: json.loads of SageTV's
    listing holds the interpreter lock for a second at 100,000 items. It always ends with
    os._exit: it shares the parent's files, buffers and atexit handlers, none of which are
    its to flush or run."""

    def __init__(self, pid: int, told: socket.socket) -> None:
        self.pid, self._told = pid, told
        self._status: int | None = None
        self._lock = threading.Lock()  # reaped once, by whichever thread comes first

    @classmethod
    def start(cls, work: Callable[[], Iterable[Any]]) -> _ListingProcess | None:
        """The child started (None: it could not be, and the caller works in-process)."""
        try:
            told, tell = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            log.info("no socket for Plex's listing process (%s): reading it in this one", exc)
            return None
        try:
            pid = os.fork()
        except OSError as exc:
            log.info("no process for Plex's listing (%s): reading it in this one", exc)
            told.close()
            tell.close()
            return None
        if pid == 0:
            told.close()
            _run_child(work, tell)
        tell.close()
        return cls(pid, told)

    def values(self) -> Iterator[Any]:
        """The child's values as they come; _NoAnswer when it ended without giving them
        all (its exit status says whether it did)."""
        while (message := socket.recv_fds(self._told, 1, 1))[0]:
            if not message[1]:  # its file did not come with it (no descriptor left here)
                log.info("a batch of Plex's listing process came without its file")
                raise _NoAnswer(None)
            with open(message[1][0], "rb") as batch:
                batch.seek(0)  # the child wrote it: the offset they share is at its end
                value = marshal.load(batch)
            yield value
        status = self._reaped()
        if os.WIFSIGNALED(status):
            raise _NoAnswer(os.WTERMSIG(status))
        if os.waitstatus_to_exitcode(status) != 0:
            log.info("Plex's listing process ended with status %d", status)
            raise _NoAnswer(None)

    def _reaped(self) -> int:
        with self._lock:
            if self._status is None:
                _, self._status = os.waitpid(self.pid, 0)
            return self._status

    def stop(self) -> None:
        """The child ended, if it still runs, and reaped (from any thread)."""
        with self._lock:
            if self._status is None:  # not reaped: its pid is still its own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        self._reaped()

    def close(self) -> None:
        self.stop()
        self._told.close()  # with the batches sent and not read


def _anonymous_file() -> IO[bytes]:
    """A file in memory with no name (memfd_create: no folder to find, and no import of
    tempfile, a seventieth of a second); else a temporary one."""
    if hasattr(os, "memfd_create"):
        with contextlib.suppress(OSError):
            return open(os.memfd_create("sageplex-listing"), "w+b")  # noqa: SIM115
    import tempfile

    return tempfile.TemporaryFile()


def _run_child(work: Callable[[], Iterable[Any]], tell: socket.socket) -> NoReturn:
    code = 70
    try:
        # The parent's handlers only set its stop event: the child ends as a process does.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for handler in (*logging.getLogger().handlers, *log.handlers):
            if isinstance(handler, logging.handlers.RotatingFileHandler):
                handler.maxBytes = 0  # the log is the parent's to roll over
        for value in work():
            with _anonymous_file() as batch:
                marshal.dump(value, batch)
                batch.flush()  # in the file before its descriptor goes
                socket.send_fds(tell, [b"+"], [batch.fileno()])
        code = 0
    except BaseException:  # noqa: BLE001 - anything: the parent reads the listing itself
        with contextlib.suppress(BaseException):
            log.debug("Plex's listing process failed", exc_info=True)
    finally:
        os._exit(code)


###############################################################################
# Watch states and bounds: what a position means on both sides of one item ####
###############################################################################


class Kind(Enum):
    NONE = "not watched"
    PROGRESS = "in progress"
    WATCHED = "watched"


@dataclass(frozen=True, slots=True)
class Status:
    """What a side's raw data means: not watched, in progress at a position, or watched."""

    kind: Kind
    position_ms: int = 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Status) or other.kind is not self.kind:
            return False
        return (self.kind is not Kind.PROGRESS
                or abs(self.position_ms - other.position_ms) < POSITION_TOLERANCE_MS)

    def __hash__(self) -> int:
        return hash(self.kind)

    def __str__(self) -> str:
        if self.kind is Kind.PROGRESS:
            return f"at {format_hms(self.position_ms)}"
        return self.kind.value

    def to_text(self) -> str:
        """As the state file and --plan keep it: none, watched, or at:MS."""
        if self.kind is Kind.PROGRESS:
            return f"at:{self.position_ms}"
        return "watched" if self.kind is Kind.WATCHED else "none"

    @staticmethod
    def from_text(text: str) -> Status:
        if text == "watched":
            return WATCHED
        if text == "none":
            return NOT_WATCHED
        kind, _, position = text.partition(":")
        if kind != "at" or not ASCII_ID.match(position):
            raise ValueError(f"not a watch state: {text!r}")
        return Status(Kind.PROGRESS, int(position))


#: The two statuses without a position, shared (most items are one of them).
WATCHED = Status(Kind.WATCHED)
NOT_WATCHED = Status(Kind.NONE)


def format_hms(ms: float) -> str:
    seconds = max(0, int(ms)) // 1000
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass(frozen=True, slots=True)
class Bounds:
    """Where progress starts and where "watched" starts on one item, the same for both
    sides (positions are file offsets on both)."""

    start_ms: int
    done_ms: int
    duration_ms: int
    #: Which limit set done_ms, in words (for --why).
    done_by: str = ""

    def __str__(self) -> str:
        return (f"progress from {format_hms(self.start_ms)}, watched from "
                f"{format_hms(self.done_ms)} ({self.done_by}) of {format_hms(self.duration_ms)}")


#: An item whose length no server tells: no position is "finished".
NO_END_MS = 1 << 62


def classify(watched: bool, position_ms: int, bounds: Bounds, *, is_sage: bool) -> Status:
    """Reduce one side to NONE, PROGRESS(position) or WATCHED."""
    if is_sage and watched:
        return WATCHED  # SageTV leaves its position at the end: it means nothing
    if bounds.start_ms <= position_ms < bounds.done_ms:
        return Status(Kind.PROGRESS, position_ms)  # on Plex, also a rewatch in progress
    if position_ms >= bounds.done_ms:
        return WATCHED  # finished in all but name: one of the servers would call it watched
    return WATCHED if watched else NOT_WATCHED


@dataclass(slots=True)  # not frozen, which would make it twice as slow to build
class Airing:
    """What SageTV knows of a recording's broadcast, for its own idea of "watched"."""

    start_ms: int
    end_ms: int
    show_duration_ms: int
    file_start_ms: int
    is_movie: bool


def sage_done_time(airing: Airing) -> int:
    """The airing-timeline moment at which SageTV calls a viewing that began at the start
    of the recording watched: two thirds covered and within its margin of the end, of the
    airing (or the show's running time, where SageTV uses it)."""
    lengths = [airing.end_ms - airing.start_ms]
    show = airing.show_duration_ms
    if 10_000 < show < lengths[0] and lengths[0] - show < SAGE_RUNNING_TIME_SLACK_MS:
        lengths.append(show)
    margin = SAGE_END_MARGIN_MOVIE_MS if airing.is_movie else SAGE_END_MARGIN_MS
    covered = min(max(length - margin, int(SAGE_COVERED_FRACTION * length) + 1)
                  for length in lengths if length > 0) if lengths[0] > 0 else NO_END_MS
    return max(airing.start_ms, airing.file_start_ms) + covered


def position_from_sage_time(time_ms: int, segments: Sequence[tuple[int, int]]) -> int:
    """A SageTV airing-timeline time as an offset into the given segments played one
    after the other; a time in a gap (or before them) rounds forward."""
    if len(segments) == 1:  # most recordings
        start, end = segments[0]
        return 0 if time_ms < start else min(time_ms, end) - start
    offset = 0
    for start, end in segments:
        if time_ms < start:
            return offset
        if time_ms < end:
            return offset + time_ms - start
        offset += end - start
    return offset


def sage_time_from_position(position_ms: int, segments: Sequence[tuple[int, int]]) -> int:
    """The inverse: an offset into the segments as the time SetWatchedTimes takes."""
    offset = 0
    for start, end in segments:
        if position_ms < offset + end - start:
            return start + position_ms - offset
        offset += end - start
    return segments[-1][1]


def item_bounds(airing: Airing | None, segments: Sequence[tuple[int, int]], duration_ms: int,
                played_fraction: float, ignore_ms: int) -> Bounds:
    """One item's bounds from both servers' rules.

    ``segments`` are the SageTV segments the Plex item plays (airing timeline) and
    ``duration_ms`` Plex's length of the item (SageTV's when Plex gives none). Progress
    starts at -x, and not before SageTV can store a record (5 s past where its records
    start, so never in the start padding). "Watched" starts at the earliest of the seed's
    95 %, Plex's played threshold and where SageTV would call it watched.
    """
    # SageTV stores nothing within 5 s of where a record starts, and Plex nothing at or
    # under a minute: with the default -x a minute means what Plex means by it.
    start_ms = max(ignore_ms, SAGE_MIN_RECORD_MS)
    if ignore_ms >= PLEX_MIN_PROGRESS_MS:
        start_ms = max(start_ms, PLEX_MIN_PROGRESS_MS + 1)
    done_ms, done_by = NO_END_MS, "no length known"
    if duration_ms > 0:
        done_ms, done_by = int(DONE_FRACTION * duration_ms), "95 %"
        if int(played_fraction * duration_ms) < done_ms:
            done_ms, done_by = int(played_fraction * duration_ms), "Plex's played threshold"
    if airing is not None and segments:
        record_start = max(airing.start_ms, airing.file_start_ms) + SAGE_MIN_RECORD_MS
        start_ms = max(start_ms, position_from_sage_time(record_start, segments))
        done_time = sage_done_time(airing)
        if done_time <= segments[-1][1]:
            sage_done = position_from_sage_time(done_time, segments)
            if sage_done < done_ms:
                done_ms, done_by = sage_done, "where SageTV calls it watched"
    return Bounds(start_ms, max(done_ms, 1), duration_ms, done_by)


###############################################################################
# Items and their normalisation: the only code that reads raw server records ##
###############################################################################

#: The sagex fields the converter reads, and only those (asked for with filter=):
#: MediaFileAiring keeps the nested Airing, Show keeps its Show.
SAGE_FIELDS = (
    "MediaFileID", "FileStartTime", "FileDuration", "NumberOfSegments", "SegmentFiles",
    "MediaFileAiring", "AiringID", "AiringStartTime", "AiringEndTime", "IsWatched",
    "IsWatchedCompletely", "WatchedEndTime", "RealWatchedStartTime", "RealWatchedEndTime",
    "Show", "ShowExternalID", "ShowDuration", "IsMovie", "ShowCategory",
)


class SageItem:
    """A SageTV media file and its airing, as the sync needs them (slots: a 100,000-item
    library is a hundred thousand of these)."""

    __slots__ = ("media_file_id", "airing_id", "paths", "segment_count", "file_start_ms",
                 "file_duration_ms", "airing", "watched", "watched_completely",
                 "watched_end_ms", "real_start_ms", "real_end_ms", "show_id", "segments")

    def __init__(self, media_file_id: int, airing_id: int, paths: tuple[str, ...],
                 segment_count: int, file_start_ms: int, file_duration_ms: int, airing: Airing,
                 watched: bool, watched_completely: bool, watched_end_ms: int,
                 real_start_ms: int, real_end_ms: int, show_id: str) -> None:
        self.media_file_id = media_file_id
        self.airing_id = airing_id
        self.paths = paths
        self.segment_count = segment_count
        self.file_start_ms = file_start_ms
        self.file_duration_ms = file_duration_ms
        self.airing = airing
        self.watched = watched
        self.watched_completely = watched_completely
        self.watched_end_ms = watched_end_ms
        self.real_start_ms = real_start_ms
        self.real_end_ms = real_end_ms
        self.show_id = show_id
        #: (start, end) on the airing timeline of each segment; read for a split
        #: recording only when needed (two sagex calls per segment).
        self.segments: tuple[tuple[int, int], ...] | None = (
            ((file_start_ms, file_start_ms + file_duration_ms),) if segment_count <= 1 else None)

    def raw(self) -> dict[str, Any]:
        """What the state file and --why keep of SageTV's side."""
        return {"IsWatched": self.watched, "WatchedEndTime": self.watched_end_ms,
                "RealWatchedEndTime": self.real_end_ms, "FileStartTime": self.file_start_ms,
                "AiringStartTime": self.airing.start_ms, "AiringEndTime": self.airing.end_ms,
                # which recordings share its show flag, and which airing --watch hears of
                "ShowExternalID": self.show_id, "AiringID": self.airing_id}


def _field(record: dict, key: str, kind: type, where: str) -> Any:
    value = record.get(key)
    if value is None:
        return kind()
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SageError(f"{where}: {key} is {json.dumps(value)[:40]}, not a "
                        f"{'number' if kind is int else kind.__name__}")
    return value


_INT = {int}


def _ints(*values: object) -> bool:
    return {*map(type, values)} == _INT  # bool is not int here


def _sage_item_fast(record: object) -> SageItem | None:
    """A listing record as an item when each value is there and of its type (the common
    case, in one go); None: the record needs sage_item_from_json's field-by-field reading."""
    fields = cast(dict, record)  # anything else fails the lookups below
    try:
        airing_json = fields["Airing"]
        show = airing_json["Show"]
        paths = fields["SegmentFiles"]
        values = (fields["MediaFileID"], airing_json["AiringID"], fields["FileStartTime"],
                  fields["FileDuration"], fields["NumberOfSegments"],
                  airing_json["AiringStartTime"], airing_json["AiringEndTime"],
                  show["ShowDuration"],
                  airing_json["WatchedEndTime"], airing_json["RealWatchedStartTime"],
                  airing_json["RealWatchedEndTime"])
        show_id = show["ShowExternalID"]
    except (KeyError, TypeError, IndexError):
        return None
    if not (_ints(*values) and values[1] and type(show_id) is str and type(paths) is list
            and paths and all(type(p) is str for p in paths)):
        return None
    (media_file_id, airing_id, file_start, duration, segments, airing_start, airing_end,
     show_duration, watched_end, real_start, real_end) = values
    return SageItem(media_file_id, airing_id, tuple(paths), max(1, segments), file_start,
                    duration, Airing(airing_start, airing_end, show_duration, file_start,
                                     _is_movie(show, show_id)),
                    airing_json.get("IsWatched") is True,
                    airing_json.get("IsWatchedCompletely") is True, watched_end, real_start,
                    real_end, show_id)


def sage_item_from_json(record: object) -> SageItem:
    """One media file of the listing (SageError naming it when it cannot be read)."""
    return _sage_item_fast(record) or _sage_item_checked(record)


def _is_movie(show: dict, show_id: str) -> bool:
    # IsMovie exists only in newer sagex; an MV external id or the category says the same.
    category = show.get("ShowCategory")
    return bool(show.get("IsMovie")) or show_id.startswith("MV") or (
        isinstance(category, str) and category.split(",")[0].strip().lower() == "movie")


def _sage_item_checked(record: object) -> SageItem:
    """The converter that says what is wrong with a record, field by field."""
    if not isinstance(record, dict):
        raise SageError(f"a media file record is {json.dumps(record)[:40]}, not an object")
    media_file_id = record.get("MediaFileID")
    where = f"media file {media_file_id}"
    if not isinstance(media_file_id, int) or isinstance(media_file_id, bool):
        raise SageError(f"a media file record has no MediaFileID ({json.dumps(media_file_id)})")
    airing_json = record.get("Airing")
    if not isinstance(airing_json, dict) or not _field(airing_json, "AiringID", int, where):
        raise SageError(f"{where} has no airing")
    show = _field(airing_json, "Show", dict, where)
    paths = _field(record, "SegmentFiles", list, where)
    if not paths or not all(isinstance(p, str) for p in paths):
        raise SageError(f"{where} has no file names (SegmentFiles)")
    show_id = _field(show, "ShowExternalID", str, where)
    file_start = _field(record, "FileStartTime", int, where)
    is_movie = _is_movie(show, show_id)
    return SageItem(
        media_file_id=media_file_id,
        airing_id=_field(airing_json, "AiringID", int, where),
        paths=tuple(paths),
        segment_count=max(1, _field(record, "NumberOfSegments", int, where)),
        file_start_ms=file_start,
        file_duration_ms=_field(record, "FileDuration", int, where),
        airing=Airing(_field(airing_json, "AiringStartTime", int, where),
                      _field(airing_json, "AiringEndTime", int, where),
                      _field(show, "ShowDuration", int, where), file_start, is_movie),
        watched=airing_json.get("IsWatched") is True,
        watched_completely=airing_json.get("IsWatchedCompletely") is True,
        watched_end_ms=_field(airing_json, "WatchedEndTime", int, where),
        real_start_ms=_field(airing_json, "RealWatchedStartTime", int, where),
        real_end_ms=_field(airing_json, "RealWatchedEndTime", int, where),
        show_id=show_id,
    )


@dataclass(slots=True)  # not frozen: that makes each of a hundred thousand 3x slower to build
class PlexItem:
    """A Plex movie or episode, as the sync needs it (times are the server's own); never
    changed once made."""

    rating_key: int
    name: str  # the movie's or the episode's own title
    paths: tuple[str, ...]
    view_count: int
    position_ms: int
    duration_ms: int
    last_viewed_ms: int
    show: str = ""
    show_key: int = 0
    season_key: int = 0
    season: int | None = None
    episode: int | None = None
    year: str = ""
    is_episode: bool = False

    @property
    def title(self) -> str:
        """As the report shows it: "Show - s01e02 - Title" or "Title (1995)"."""
        if not self.is_episode:
            return self.name + (f" ({self.year})" if self.year else "")
        numbers = (f" - s{self.season:02d}e{self.episode:02d}"
                   if self.season is not None and self.episode is not None else "")
        return f"{self.show}{numbers} - {self.name}"

    @property
    def watched(self) -> bool:
        return self.view_count > 0

    def raw(self) -> dict[str, Any]:
        return {"viewCount": self.view_count, "viewOffset": self.position_ms,
                "lastViewedAt": self.last_viewed_ms // 1000, "duration": self.duration_ms}


#: The number attributes of a movie or episode element.
_PLEX_NUMBERS = ("viewCount", "viewOffset", "duration", "lastViewedAt", "grandparentRatingKey",
                 "parentIndex", "index", "parentRatingKey")


def plex_item_from_element(video: Element) -> PlexItem:
    """One movie or episode element (PlexError naming it when it cannot be read)."""
    return plex_item_from_record(video_record(video))


def plex_item_from_record(record: VideoRecord) -> PlexItem:
    """One movie or episode of a listing (PlexError naming it when it cannot be read)."""
    return PlexItem(*plex_fields(record))


def plex_fields(record: VideoRecord) -> tuple:
    """A movie's or episode's PlexItem fields, in their order (PlexError naming it when it
    cannot be read)."""
    attrs, files = record
    get = attrs.get
    # Each number once, as sent: most are missing (never viewed, no position) or short.
    key = get("ratingKey") or ""
    view_count, offset, duration, viewed_at, show_key, season, index, season_key = texts = (
        get("viewCount") or "", get("viewOffset") or "", get("duration") or "",
        get("lastViewedAt") or "", get("grandparentRatingKey") or "", get("parentIndex") or "",
        get("index") or "", get("parentRatingKey") or "")
    joined = key + view_count + offset + duration + viewed_at + show_key + season + index \
        + season_key
    if not (key and joined.isdigit() and joined.isascii()):  # one check for all of them
        _bad_plex_numbers(key, attrs, texts)
    episode = get("type") == "episode"
    return (  # by position: a hundred thousand of these
        int(key), get("title", ""), tuple(files), int(view_count or 0), int(offset or 0),
        int(duration or 0), int(viewed_at or 0) * 1000,
        # one string per show, however many episodes share it
        sys.intern(get("grandparentTitle", "")), int(show_key or 0),
        int(season_key or 0) if episode else 0,
        # an empty or missing number is an unnumbered special
        int(season) if episode and season else None,
        int(index) if episode and index else None, sys.intern(get("year", "")), episode)


def _bad_plex_numbers(key: str, attrs: dict[str, str], texts: tuple[str, ...]) -> NoReturn:
    if not (key.isdigit() and key.isascii()):
        raise PlexError(f"a Plex item has no media id (ratingKey {key!r})")
    bad = next(n for n, t in zip(_PLEX_NUMBERS, texts, strict=True)
               if t and not (t.isdigit() and t.isascii()))
    raise PlexError(f"Plex media id {key}: {bad} is {attrs[bad]!r}, not a number")


def file_name(path: str) -> str:
    """A path's last component, whichever separator the server uses (SageTV on Windows
    says F:\\TV\\x.mpg where Plex on Linux says /mnt/tv/x.mpg), in one Unicode form."""
    name = path[max(path.rfind("/"), path.rfind("\\")) + 1:]
    return name if name.isascii() else unicodedata.normalize("NFC", name)


###############################################################################
# Matching: SageTV's files by name, Plex items onto them ######################
###############################################################################


class SageIndex:
    """SageTV's media files by file name (every segment of every file), and the names of
    records that could not be read, with the reason."""

    def __init__(self, records: Iterable[object]) -> None:
        """From the listing's records, converted (convert_media_file) as they were parsed,
        or raw: those the parse could not take for a media file (no object, no
        MediaFileID), which convert_media_file turns into the reason here."""
        self.items: dict[int, SageItem] = {}
        self.by_name: dict[str, list[SageItem]] = collections.defaultdict(list)
        self.unreadable: dict[str, str] = {}
        self.unreadable_count = 0
        self._by_show: dict[str, list[SageItem]] | None = None  # made when first needed
        for record in records:
            item = record if isinstance(record, (SageItem, Unreadable)) \
                else convert_media_file(record)
            if isinstance(item, Unreadable):
                self._unreadable(item)
                continue
            self.items[item.media_file_id] = item
            by_name = self.by_name
            for path in item.paths:
                name = file_name(path)
                names = by_name[name]
                if item not in names:
                    names.append(item)

    def _unreadable(self, record: Unreadable) -> None:
        self.unreadable_count += 1
        log.warning("SageTV record skipped: %s", record.reason)
        for name in record.names:
            self.unreadable[name] = record.reason

    def __len__(self) -> int:
        return len(self.items)

    def match(self, plex_item: PlexItem) -> list[SageItem]:
        """The SageTV files the Plex item's parts name: none, one, or (ambiguous) more."""
        if len(plex_item.paths) == 1:  # most items; a name's list holds each file once
            return list(self.by_name.get(file_name(plex_item.paths[0]), ()))
        found: dict[int, SageItem] = {}
        for name in {file_name(p) for p in plex_item.paths}:
            for item in self.by_name.get(name, ()):
                found[item.media_file_id] = item
        return list(found.values())

    def unreadable_reason(self, plex_item: PlexItem) -> str:
        return next((self.unreadable[file_name(p)] for p in plex_item.paths
                     if file_name(p) in self.unreadable), "")

    def group_shows(self) -> None:
        """Recordings by show, made once before any write starts: the write pool's
        threads then only read it."""
        if self._by_show is None:
            by_show: dict[str, list[SageItem]] = collections.defaultdict(list)
            for other in self.items.values():
                if other.show_id:
                    by_show[other.show_id].append(other)
            self._by_show = by_show  # published whole

    def siblings(self, item: SageItem) -> list[SageItem]:
        """Other recordings of the same show, which share SageTV's show-level watched flag."""
        if not item.show_id:
            return []
        self.group_shows()
        assert self._by_show is not None
        return [o for o in self._by_show.get(item.show_id, ())
                if o.media_file_id != item.media_file_id]

    def replace(self, item: SageItem) -> None:
        """A media file read again after the writes."""
        old = self.items.get(item.media_file_id)
        if old is not None and old.segments is not None and item.segments is None:
            item.segments = old.segments
        self.items[item.media_file_id] = item
        for name in {file_name(p) for p in item.paths}:
            self.by_name[name] = [item if o.media_file_id == item.media_file_id else o
                                  for o in self.by_name[name]]
        if self._by_show is not None and item.show_id:
            self._by_show[item.show_id] = [item if o.media_file_id == item.media_file_id
                                           else o for o in self._by_show[item.show_id]]


def local_time(server_ms: int, offset_ms: int) -> int:
    """A server's stamp on this computer's clock (§3.1); 0 stays "never"."""
    return server_ms - offset_ms if server_ms > 0 else 0


class Unreadable(NamedTuple):
    """A record that could not be read: why, and the file names it gave, if any."""

    reason: str
    names: tuple[str, ...]


def convert_media_file(record: object) -> SageItem | Unreadable:
    """A listing record as an item, or why it cannot be one (the listing goes on)."""
    try:
        return sage_item_from_json(record)
    except SageError as exc:
        paths = record.get("SegmentFiles") if isinstance(record, dict) else None
        names = tuple(file_name(p) for p in (paths if isinstance(paths, list) else ())
                      if isinstance(p, str))
        return Unreadable(str(exc), names)


def covered_segments(item: SageItem, plex_item: PlexItem) -> tuple[tuple[int, int], ...]:
    """The segments a Plex item plays: those whose files it has (all of a stacked item)."""
    assert item.segments is not None, "segment times are read before positions are used"
    if item.segment_count <= 1:
        return item.segments
    wanted = {file_name(p) for p in plex_item.paths}
    chosen = tuple(seg for path, seg in zip(item.paths, item.segments, strict=False)
                   if file_name(path) in wanted)
    return chosen or item.segments


###############################################################################
# The decision: pure functions from the states read (and the base) to a plan ##
###############################################################################


class Verdict(Enum):
    IN_SYNC = "OK"
    PLEX_OUT_OF_SYNC = "PLEX out of sync"
    SAGE_OUT_OF_SYNC = "SageTV out of sync"
    BOTH_OUT_OF_SYNC = "out of sync"
    #: The two sides differ, but neither changed since the last sync: a difference a
    #: server would not take, reported and never retried.
    SETTLED = "differs, left as is"


@dataclass(frozen=True, slots=True)
class Decision:
    """What each side should show (None: leave it as it is), and why."""

    verdict: Verdict
    to_sage: Status | None = None
    to_plex: Status | None = None
    rule: str = ""
    #: An undo puts back a Plex item that was never played: a resume point alone on a
    #: played item would leave its view count (un-scrobble first).
    plex_unplayed: bool = False


_IN_SYNC = Decision(Verdict.IN_SYNC, None, None, "in sync")


def _both(verdict: Verdict, result: Status | None, rule: str) -> Decision:
    if result is None and verdict is Verdict.IN_SYNC:
        return _IN_SYNC  # most items: one shared answer
    return Decision(verdict, result, result, rule)


@dataclass(frozen=True, slots=True)
class Base:
    """Both sides' states at the end of the last sync that wrote, classified from the raw
    values it stored under today's bounds (§6.1), and the decision a failed or unfinished
    write left pending (taken on the states in ``pending_on``)."""

    sage: Status
    plex: Status
    pending: tuple[Status | None, Status | None] | None = None
    pending_on: tuple[Status, Status] | None = None
    #: Each side's last-watched time then, as its server stamped it (0: none): a newer
    #: stamp is a new viewing even when the state is the same (watched again).
    sage_last_ms: int = 0
    plex_last_ms: int = 0
    #: The stamps the pending decision was taken on.
    pending_sage_ms: int = 0
    pending_plex_ms: int = 0
    #: States the tool's own unfinished or restored steps can have left on each side:
    #: the tool's doing, never the user's (§6.3).
    own_sage: tuple[Status, ...] = ()
    own_plex: tuple[Status, ...] = ()
    #: The latest stamps those steps can have left (None: not known).
    own_sage_until_ms: int | None = None
    own_plex_until_ms: int | None = None
    #: False when the item had no base before the run that left the decision pending
    #: (its first sync): then a pending decision that no longer holds goes to the
    #: two-way table.
    known: bool = True


#: A last-watched stamp must move by more than this to count as a new viewing.
RESTAMP_MS = 1_000


def _verdict(sage: Status, plex: Status, result: Status) -> Verdict:
    if sage == result:
        return Verdict.IN_SYNC if plex == result else Verdict.PLEX_OUT_OF_SYNC
    return Verdict.SAGE_OUT_OF_SYNC if plex == result else Verdict.BOTH_OUT_OF_SYNC


def decide_two_way(sage: Status, plex: Status, sage_last_ms: int, plex_last_ms: int
                   ) -> Decision:
    """The table without a base: the newer side wins (a tie goes to SageTV, as in the
    original tool), and "not watched" never wins: it is not newer information."""
    if sage == plex:
        return _both(Verdict.IN_SYNC, None, "in sync")
    if sage.kind is Kind.NONE:  # rows 2 and 4
        row = 2 if plex.kind is Kind.WATCHED else 4
        return _both(Verdict.SAGE_OUT_OF_SYNC, plex, f"row {row}: Plex {plex}, SageTV not")
    if plex.kind is Kind.NONE:  # rows 1 and 3
        row = 1 if sage.kind is Kind.WATCHED else 3
        return _both(Verdict.PLEX_OUT_OF_SYNC, sage, f"row {row}: SageTV {sage}, Plex not")
    row = (7 if sage.kind is plex.kind else 5 if sage.kind is Kind.WATCHED else 6)
    if plex_last_ms > sage_last_ms:
        return _both(Verdict.SAGE_OUT_OF_SYNC, plex, f"row {row}: Plex newer")
    return _both(Verdict.PLEX_OUT_OF_SYNC, sage, f"row {row}: SageTV newer"
                 + (" (same time)" if plex_last_ms == sage_last_ms else ""))


def changed(now: Status, now_stamp_ms: int, then: Status, then_stamp_ms: int,
            own: tuple[Status, ...] = (), own_until_ms: int | None = None) -> bool:
    """§6.1: a side changed when its state differs (positions within 2 s are equal) or it
    was viewed since (a newer stamp, even one that ends in the same state), unless what it
    shows is one of ``own``: the states the tool's own steps can have left (§6.3), stamped
    no later than ``own_until_ms`` where that is known."""
    if now == then and now_stamp_ms <= then_stamp_ms + RESTAMP_MS:
        return False
    return now not in own or (own_until_ms is not None
                              and now_stamp_ms > own_until_ms + RESTAMP_MS)


def _pending_holds(sage: Status, plex: Status, base: Base, sage_stamp_ms: int,
                   plex_stamp_ms: int) -> bool:
    """A pending decision is carried out only if neither side changed since the states it
    was taken on, the tool's own steps excepted (§6.3, §6.4)."""
    return not any(_moved_since_pending(sage, plex, base, sage_stamp_ms, plex_stamp_ms))


def _moved_since_pending(sage: Status, plex: Status, base: Base, sage_stamp_ms: int,
                         plex_stamp_ms: int) -> tuple[bool, bool]:
    """Whether each side changed since the states the pending decision was taken on."""
    assert base.pending_on is not None
    on_sage, on_plex = base.pending_on
    return (changed(sage, sage_stamp_ms, on_sage, base.pending_sage_ms, base.own_sage,
                    base.own_sage_until_ms),
            changed(plex, plex_stamp_ms, on_plex, base.pending_plex_ms, base.own_plex,
                    base.own_plex_until_ms))


def decide(sage: Status, plex: Status, sage_last_ms: int, plex_last_ms: int,
           base: Base | None, *, sage_stamp_ms: int = 0, plex_stamp_ms: int = 0
           ) -> Decision:
    """The three-way merge: with a base, the side that changed since the last sync is
    copied to the other, whatever it is (an un-watch or a move back included); when
    neither changed nothing is written even if they differ; when both changed, or there
    is no base yet, the two-way table decides. A state the tool's own unfinished steps
    left is not a change."""
    if base is None:
        return decide_two_way(sage, plex, sage_last_ms, plex_last_ms)
    if base.pending is not None and base.pending_on is not None and _pending_holds(
            sage, plex, base, sage_stamp_ms, plex_stamp_ms):
        return _pending_decision(sage, plex, base.pending)
    if not base.known:
        return decide_two_way(sage, plex, sage_last_ms, plex_last_ms)
    return _merge(sage, plex, sage_last_ms, plex_last_ms, base, sage_stamp_ms, plex_stamp_ms)


def _pending_decision(sage: Status, plex: Status,
                      pending: tuple[Status | None, Status | None]) -> Decision:
    """A failed or unfinished write carried out again, less what already took."""
    to_sage, to_plex = pending
    if (to_sage is None or to_sage == sage) and (to_plex is None or to_plex == plex):
        verdict = Verdict.IN_SYNC if sage == plex else Verdict.SETTLED
        return Decision(verdict, to_sage, to_plex, "the last sync's write took")
    # The targets stay whole: a twin that already has them is left as it is, the other
    # gets them (each Plex item's writes are worked out from its own state).
    sage_moves = to_sage is not None and to_sage != sage
    plex_moves = to_plex is not None and to_plex != plex
    verdict = (Verdict.BOTH_OUT_OF_SYNC if sage_moves and plex_moves else
               Verdict.SAGE_OUT_OF_SYNC if sage_moves else Verdict.PLEX_OUT_OF_SYNC)
    return Decision(verdict, to_sage, to_plex, "the last sync's unfinished write, again")


def _merge(sage: Status, plex: Status, sage_last_ms: int, plex_last_ms: int, base: Base,
           sage_stamp_ms: int, plex_stamp_ms: int) -> Decision:
    """Three-way against the base (§6): who changed since the last sync wins."""
    # ``*_stamp_ms`` are the servers' own last-watched times, comparable with the base's.
    sage_changed = changed(sage, sage_stamp_ms, base.sage, base.sage_last_ms, base.own_sage,
                           base.own_sage_until_ms)
    plex_changed = changed(plex, plex_stamp_ms, base.plex, base.plex_last_ms, base.own_plex,
                           base.own_plex_until_ms)
    if sage_changed and plex_changed:
        later = _changed_after_pending(sage, plex, base, sage_stamp_ms, plex_stamp_ms)
        if later is not None:
            result = sage if later == "SageTV" else plex
            return _both(_verdict(sage, plex, result), result,
                         f"both changed since the last sync; {later} changed after the "
                         "failed write was decided: newer")
        two_way = decide_two_way(sage, plex, sage_last_ms, plex_last_ms)
        return replace(two_way, rule=f"both changed since the last sync; {two_way.rule}")
    if sage_changed or plex_changed:
        result, who = (sage, "SageTV") if sage_changed else (plex, "Plex")
        return _both(_verdict(sage, plex, result), result, f"{who} changed since the last sync")
    if sage == plex:
        return _both(Verdict.IN_SYNC, None, "in sync")
    return _both(Verdict.SETTLED, None, "neither side changed since the last sync")


def _changed_after_pending(sage: Status, plex: Status, base: Base, sage_stamp_ms: int,
                           plex_stamp_ms: int) -> str | None:
    """A failed write's decision was taken on both sides as they then were: a side that
    changed since those states changed after the other side's change, whatever the
    stamps say (Plex's whole seconds cannot order two changes a second apart; §3.1)."""
    if base.pending is None or base.pending_on is None:
        return None
    sage_moved, plex_moved = _moved_since_pending(sage, plex, base, sage_stamp_ms,
                                                  plex_stamp_ms)
    if sage_moved == plex_moved:
        return None
    return "SageTV" if sage_moved else "Plex"


def decide_position(sage: Status, plex: Status, position_ms: int) -> Decision:
    """--position: that position on both sides, whatever the rules say."""
    target = Status(Kind.PROGRESS, position_ms)
    return _both(_verdict(sage, plex, target), target, "--position")


@dataclass(frozen=True)
class PlexMarkWatched:
    def __str__(self) -> str:
        return "mark watched on Plex"


@dataclass(frozen=True)
class PlexMarkUnwatched:
    def __str__(self) -> str:
        return "mark not watched on Plex"


@dataclass(frozen=True)
class PlexSetPosition:
    position_ms: int

    def __str__(self) -> str:
        return f"set Plex position to {format_hms(self.position_ms)}"


@dataclass(frozen=True)
class SageMarkWatched:
    def __str__(self) -> str:
        return "mark watched on SageTV"


@dataclass(frozen=True)
class SageClearWatched:
    def __str__(self) -> str:
        return "mark not watched on SageTV"


@dataclass(frozen=True)
class SageSetPosition:
    position_ms: int
    #: The same position as SetWatchedTimes takes it (airing timeline).
    time_ms: int
    #: SetWatchedTimes only moves a position forward and ignores a watched airing.
    clear_first: bool
    #: When the viewing was (local clock), 0 when unknown: SageTV's real-time start.
    viewed_at_ms: int = 0

    def __str__(self) -> str:
        clear = "clear watched, then " if self.clear_first else ""
        return f"{clear}set SageTV position to {format_hms(self.position_ms)}"


PlexWrite = PlexMarkWatched | PlexMarkUnwatched | PlexSetPosition
SageWrite = SageMarkWatched | SageClearWatched | SageSetPosition
Write = PlexWrite | SageWrite


def plex_write(current: Status, result: Status) -> tuple[PlexWrite | None, str]:
    """The Plex write that makes ``current`` show ``result``, or why there is none."""
    if current == result:
        return None, ""
    if result.kind is Kind.WATCHED:
        return PlexMarkWatched(), ""
    if result.kind is Kind.NONE:
        return PlexMarkUnwatched(), ""
    if result.position_ms <= PLEX_MIN_PROGRESS_MS:
        return None, (f"Plex ignores positions of a minute or less "
                      f"({format_hms(result.position_ms)})")
    return PlexSetPosition(result.position_ms), ""


def plex_writes(write: PlexWrite | None, view_count: int, position_ms: int, *,
                unplayed_first: bool = False) -> tuple[PlexWrite, ...]:
    """The Plex requests for one write. Marking watched an item never played that holds a
    resume point clears the point first (unscrobble, which costs nothing there): whether a
    scrobble clears it is not documented, and a point left makes it a rewatch. An undo
    that puts back a never-played resume point un-scrobbles first likewise."""
    if write is None:
        return ()
    if isinstance(write, PlexMarkWatched) and position_ms > 0 and view_count == 0:
        return PlexMarkUnwatched(), write
    if isinstance(write, PlexSetPosition) and unplayed_first and view_count > 0:
        return PlexMarkUnwatched(), write
    return (write,)


def sage_write(item: SageItem, segments: Sequence[tuple[int, int]], current: Status,
               result: Status, viewed_at_ms: int) -> SageWrite | None:
    """The SageTV write that makes ``current`` (seen from a Plex item playing
    ``segments``) show ``result``."""
    if current == result:
        return None
    holds_start = item.segments is not None and segments[0] == item.segments[0]
    if result.kind is Kind.NONE and holds_start:
        return SageClearWatched()
    holds_end = item.segments is not None and segments[-1] == item.segments[-1]
    if result.kind is Kind.WATCHED and holds_end:
        return SageMarkWatched()
    # Watched from an item without the last segment: SageTV's position at its end; not
    # watched from one without the first: at its start (part 1 stays as it was, §1.4).
    position = (sum(end - start for start, end in segments) if result.kind is Kind.WATCHED
                else result.position_ms if result.kind is Kind.PROGRESS else 0)
    time_ms = sage_time_from_position(position, segments)
    return SageSetPosition(position, time_ms, item.watched or item.watched_end_ms > time_ms,
                           viewed_at_ms)


def moves_back(current: Status, result: Status) -> bool:
    """An un-watch or a position made earlier: what the guard counts, and what a write that
    failed half way must never leave an item with (its earlier steps are put back)."""
    if current == result:
        return False
    if current.kind is Kind.WATCHED:
        return True
    return current.kind is Kind.PROGRESS and (result.kind is Kind.NONE or (
        result.kind is Kind.PROGRESS and result.position_ms < current.position_ms))


###############################################################################
# The sync state: the base of every matched item, the journal, and the lock ###
###############################################################################

STATE_SCHEMA = 2
_STATE_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS base (
    rating_key INTEGER PRIMARY KEY, media_file_id INTEGER, file_name TEXT,
    sage TEXT, plex TEXT, sage_raw TEXT, plex_raw TEXT,
    pending_sage TEXT, pending_plex TEXT, pending_on TEXT, run_id INTEGER);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY, started_at TEXT, kind TEXT, argv TEXT, writes INTEGER,
    status TEXT DEFAULT 'done', counts TEXT, undone_by INTEGER, undoes INTEGER);
CREATE TABLE IF NOT EXISTS journal (
    run_id INTEGER, rating_key INTEGER, media_file_id INTEGER, title TEXT, rule TEXT,
    writes TEXT, sage_before TEXT, plex_before TEXT, sage_after TEXT, plex_after TEXT,
    outcome TEXT, detail TEXT, to_sage TEXT, to_plex TEXT, sage_raw_before TEXT,
    plex_raw_before TEXT, sage_raw_after TEXT, plex_raw_after TEXT, steps_done INTEGER,
    own_sage TEXT, own_plex TEXT);
CREATE TABLE IF NOT EXISTS listed (kind TEXT, id INTEGER, PRIMARY KEY (kind, id));
CREATE INDEX IF NOT EXISTS journal_item ON journal (run_id, rating_key);
"""
#: Columns a schema-1 file lacks, added in place so that its bases carry over.
_STATE_UPGRADE_1 = (
    "ALTER TABLE runs ADD COLUMN status TEXT DEFAULT 'done'",
    "ALTER TABLE runs ADD COLUMN counts TEXT",
    "ALTER TABLE runs ADD COLUMN undone_by INTEGER",
    "ALTER TABLE runs ADD COLUMN undoes INTEGER",
    *(f"ALTER TABLE journal ADD COLUMN {column} TEXT" for column in (
        "to_sage", "to_plex", "sage_raw_before", "plex_raw_before", "sage_raw_after",
        "plex_raw_after", "own_sage", "own_plex")),
    "ALTER TABLE journal ADD COLUMN steps_done INTEGER",
)
#: Runs kept in the state (their journal with them); the bases are never pruned.
RUNS_KEPT = 500


def default_state_path(config_path: Path) -> Path:
    """Named after the config file (two configs in one folder never share a state), next
    to it when that folder is writable, else in the user's state folder. A state file of
    the old fixed name next to sageplex_cfg.json is still used."""
    name = config_path.stem + STATE_FILE_SUFFIX
    folder = config_path.parent
    if not os.access(folder, os.W_OK):
        folder = user_state_dir()
    legacy = folder / STATE_FILE_NAME
    if config_path.name == CONFIG_FILE_NAME and legacy.exists() \
            and not (folder / name).exists():
        return legacy
    return folder / name


@dataclass(frozen=True)
class Pending:
    """A decision a failed or unfinished write left: its targets, the raw values it was
    taken on, and the states the tool's own steps can have left on each side."""

    to_sage: Status | None
    to_plex: Status | None
    sage_raw: dict
    plex_raw: dict
    own_sage: tuple[Status, ...] = ()
    own_plex: tuple[Status, ...] = ()
    #: False when the item had no base before (its first sync failed).
    known: bool = True
    #: The latest stamp each side's own steps can have left (the failed run's read-back,
    #: 0 if it showed none; None: not known, as after a killed run): a later viewing is
    #: the user's, whatever its state.
    own_sage_until_ms: int | None = None
    own_plex_until_ms: int | None = None

    def to_json(self) -> str:
        return _state_json({"sage": self.sage_raw, "plex": self.plex_raw,
                            "own_sage": [s.to_text() for s in self.own_sage],
                            "own_plex": [s.to_text() for s in self.own_plex],
                            "known": self.known, "own_sage_until_ms": self.own_sage_until_ms,
                            "own_plex_until_ms": self.own_plex_until_ms})


@dataclass(frozen=True)
class BaseRecord:
    """One item's base as stored: raw values (classified again under each run's bounds)
    and the states as classified when stored (for records without raw values)."""

    media_file_id: int
    file_name: str
    sage: Status
    plex: Status
    sage_raw: dict
    plex_raw: dict
    pending: Pending | None = None
    run_id: int = 0
    #: False for an item whose only record is an unfinished first write.
    known: bool = True


@dataclass(frozen=True)
class JournalRow:
    """One item of a run's journal: written before the item's first write (outcome
    "intended"), completed once the item is done."""

    run_id: int
    rating_key: int
    media_file_id: int
    title: str
    rule: str
    writes: str
    sage_before: Status
    plex_before: Status
    sage_after: Status | None
    plex_after: Status | None
    outcome: str
    detail: str
    to_sage: Status | None = None
    to_plex: Status | None = None
    sage_raw_before: dict = field(default_factory=dict)
    plex_raw_before: dict = field(default_factory=dict)
    sage_raw_after: dict = field(default_factory=dict)
    plex_raw_after: dict = field(default_factory=dict)
    steps_done: int = 0
    own_sage: tuple[Status, ...] = ()
    own_plex: tuple[Status, ...] = ()


@dataclass(frozen=True)
class RunRecord:
    run_id: int
    started_at: str
    kind: str
    argv: tuple[str, ...]
    writes: int
    status: str
    counts: dict[str, Any] | None  # None for a run of an older version
    undone_by: int | None
    undoes: int | None


#: The status of a run that began writing and never finished (failed or killed).
RUN_STARTED = "started"
RUN_DONE = "done"
#: A journal row whose item was never finished: its steps may be half done.
INTENDED = "intended"


def _damaged(path: Path, exc: Exception | str) -> StateError:
    return StateError(f"the sync state file {path} is damaged ({exc}); move it away to start "
                      "afresh (the next sync then works as a first sync), or give --state")


def _json_object(text: str | None) -> dict:
    value = json.loads(text) if text else {}
    if not isinstance(value, dict):
        raise ValueError(f"not an object: {text!r}")
    return value


def _statuses(text: str | None) -> tuple[Status, ...]:
    return tuple(Status.from_text(t) for t in json.loads(text)) if text else ()


class StateStore:
    """The SQLite file that makes runs converge. Every change is one transaction (atomic);
    a run that writes holds an exclusive lock on ``<file>.lock`` for as long as it
    writes, and checks first that it can record (§5 step 5)."""

    def __init__(self, path: Path, *, write: bool) -> None:
        self.path = path
        self.write = write
        self._lock_file: Any = None
        self._db_lock = threading.Lock()  # pool threads journal their steps
        self._unfinished_keys: set[int] = set()  # items of runs that never finished
        self._steps_fast = False  # steps marked without waiting for the disk
        self._marks_ready = threading.Condition()
        self._marks: list[tuple[int, int, int]] = []  # (steps, run, item) to commit
        self._marker: threading.Thread | None = None  # commits them
        self._marks_stop = False
        self._marks_error: StateError | None = None
        self.db: sqlite3.Connection | None = None
        if path.exists() and path.is_file() and path.stat().st_size == 0:
            raise _damaged(path, "the file is empty")
        self.schema = STATE_SCHEMA
        if write:
            self._lock()
        if not path.exists():
            if write:
                self._connect()
            return
        self._connect()
        self._check()

    # -- opening ---------------------------------------------------------------------------
    def _lock(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "a+b")
        except OSError as exc:
            raise StateError(f"cannot use the sync state file {self.path} ({exc.strerror}); "
                             "give --state a writable place") from None
        try:
            if sys.platform.startswith("win"):
                import msvcrt
                msvcrt.locking(self._lock_file.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise StateError(f"another sageplex_sync run is in progress (it holds {self.path}); "
                             "wait for it to finish") from None

    def _connect(self) -> None:
        uri = self.path.resolve().as_uri() + ("" if self.write else "?mode=ro")
        try:
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None,
                                      check_same_thread=False)
            if self.write:
                self._create()
        except sqlite3.DatabaseError as exc:
            if self.write and not os.access(self.path, os.W_OK) or "readonly" in str(exc):
                raise StateError(f"cannot write the sync state file {self.path} ({exc}); "
                                 "give --state a writable place") from None
            raise _damaged(self.path, exc) from None

    def _create(self) -> None:
        """The tables (or a schema-1 file's upgrade), in a transaction that also proves
        the file can be written before anything is written to a server."""
        with self.transaction() as db:
            old = db.execute("SELECT name FROM sqlite_master WHERE name = 'meta'").fetchone()
            version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() \
                if old else None
            if version is not None and version[0] == "1":
                for statement in _STATE_UPGRADE_1:
                    db.execute(statement)
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema'",
                           (str(STATE_SCHEMA),))
            for statement in _STATE_TABLES.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(STATE_SCHEMA),))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('opened', ?)",
                       (time.strftime("%Y-%m-%d %H:%M:%S"),))
        self.schema = STATE_SCHEMA

    def _check(self) -> None:
        assert self.db is not None
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            self.db.execute("SELECT count(*) FROM base").fetchone()
        except sqlite3.DatabaseError as exc:
            raise _damaged(self.path, exc) from None
        if row is None or row[0] not in (str(STATE_SCHEMA), "1"):
            raise StateError(f"the sync state file {self.path} is of another version "
                             f"({row[0] if row else 'none'}); use the sageplex_sync that made "
                             "it, or move it away to start afresh")
        self.schema = int(row[0])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        assert self.db is not None
        with self._db_lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        if self.db is not None:
            self._marks_committed()
            self.db.close()
            self.db = None
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file releases the lock
            self._lock_file = None

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- which servers it belongs to (§6.5) --------------------------------------------------
    def check_servers(self, identity: dict[str, str]) -> None:
        """Stop before any write when the state was made with other servers; record the
        identity on the first run that writes."""
        known = dict(self._rows("SELECT key, value FROM meta WHERE key LIKE 'server.%'"))
        for key, value in identity.items():
            stored = known.get(f"server.{key}")
            if stored is not None and value and stored != value:
                raise StateError(
                    f"the sync state file {self.path} belongs to other servers ({key} "
                    f"{stored}, these are {value}); give --state another file for this pair")
        if self.write and self.db is not None and len(known) < len(identity):
            with self.transaction() as db:
                db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                               [(f"server.{k}", v) for k, v in identity.items() if v])

    # -- reading ---------------------------------------------------------------------------
    def _rows(self, query: str, *args: object) -> list[tuple]:
        if self.db is None:
            return []
        try:
            return self.db.execute(query, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise _damaged(self.path, exc) from None

    def bases(self) -> dict[int, BaseRecord]:
        found = {}
        for (rating_key, media_file_id, name, sage, plex, sage_raw, plex_raw, pending_sage,
             pending_plex, pending_on, run_id) in self._rows("SELECT * FROM base"):
            try:
                sage_values, plex_values = _json_object(sage_raw), _json_object(plex_raw)
                pending = _pending_from_columns(pending_sage, pending_plex, pending_on,
                                                sage_values, plex_values)
                found[rating_key] = BaseRecord(media_file_id, name, Status.from_text(sage),
                                               Status.from_text(plex), sage_values,
                                               plex_values, pending, run_id,
                                               pending is None or pending.known)
            except (ValueError, AttributeError, TypeError) as exc:
                raise _damaged(self.path, exc) from None
        return found

    def next_run_id(self) -> int:
        """The number the next recorded run gets (the newest run is never pruned)."""
        rows = self._rows("SELECT coalesce(max(run_id), 0) FROM runs")
        return int(rows[0][0]) + 1 if rows else 1

    def listed(self, kind: str) -> set[int]:
        """The ids of one kind (``plex_only``, ``sage_only``) the last sync counted."""
        if self.schema < 2:
            return set()
        return {int(r[0]) for r in self._rows("SELECT id FROM listed WHERE kind = ?", kind)}

    def set_listed(self, kind: str, ids: Iterable[int]) -> None:
        try:
            with self.transaction() as db:
                db.execute("DELETE FROM listed WHERE kind = ?", (kind,))
                db.executemany("INSERT OR IGNORE INTO listed VALUES (?, ?)",
                               ((kind, i) for i in ids))
        except sqlite3.DatabaseError as exc:
            raise StateError(f"cannot write the sync state file {self.path} ({exc}); check "
                             "the disk") from None

    def runs(self) -> list[RunRecord]:
        # A schema-1 file read without writing has none of the later columns (it is
        # upgraded when first written).
        later = ("status, counts, undone_by, undoes" if self.schema >= 2
                 else "'done', NULL, NULL, NULL")
        records = []
        for row in self._rows(f"SELECT run_id, started_at, kind, argv, writes, {later} "
                              "FROM runs ORDER BY run_id"):
            try:
                records.append(RunRecord(int(row[0]), str(row[1]), str(row[2]),
                                         tuple(json.loads(row[3] or "[]")), int(row[4] or 0),
                                         str(row[5] or RUN_DONE),
                                         _json_object(row[6]) if row[6] else None,
                                         row[7], row[8]))
            except (ValueError, TypeError) as exc:
                raise _damaged(self.path, exc) from None
        return records

    def history(self, limit: int = RUNS_KEPT) -> list[RunRecord]:
        return self.runs()[-limit:]

    def journal(self, run_id: int | None = None) -> list[JournalRow]:
        """One run's journal, or (None) the unfinished items of runs that never finished."""
        if self.schema < 2:
            return []
        query = ("SELECT * FROM journal WHERE run_id = ?" if run_id is not None else
                 "SELECT * FROM journal WHERE outcome = 'intended' AND run_id IN "
                 "(SELECT run_id FROM runs WHERE status = 'started')")
        rows = []
        for row in self._rows(query + " ORDER BY run_id",
                              *([run_id] if run_id is not None else [])):
            try:
                rows.append(_journal_from_row(row))
            except (ValueError, TypeError, IndexError) as exc:
                raise _damaged(self.path, exc) from None
        if run_id is None:
            self._unfinished_keys = {row.rating_key for row in rows}
        return rows

    # -- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[sqlite3.Connection]:
        try:
            with self.transaction() as db:
                yield db
        except sqlite3.DatabaseError as exc:
            raise StateError(f"cannot write the sync state file {self.path} ({exc}); {what}; "
                             "check the disk and run the sync again") from None

    def begin_run(self, kind: str, argv: Sequence[str], intended: Sequence[JournalRow]
                  ) -> int:
        """The write-ahead journal: the run and every write it intends, before the first
        (§6.3). A run killed after this leaves an exact record of what it meant to do."""
        with self._writing("nothing was written to the servers") as db:
            run_id = int(db.execute(
                "INSERT INTO runs (started_at, kind, argv, writes, status) "
                "VALUES (?, ?, ?, ?, ?)", (time.strftime("%Y-%m-%d %H:%M:%S"), kind,
                                           json.dumps(list(argv)), len(intended),
                                           RUN_STARTED)).lastrowid or 0)
            db.executemany(_JOURNAL_INSERT, [_journal_values(j, run_id)
                                             for j in intended])
        return run_id

    def intend_again(self, run_id: int, row: JournalRow) -> None:
        """An item decided again during the run (a write to a recording sharing its show
        flag changed it): its intended writes as they now are, before the first of them."""
        with self._writing("nothing more was written to the servers") as db:
            db.execute("DELETE FROM journal WHERE run_id = ? AND rating_key = ?",
                       (run_id, row.rating_key))
            db.execute(_JOURNAL_INSERT, _journal_values(row, run_id))

    def step_done(self, run_id: int, rating_key: int, steps: int) -> None:
        """One step of an item's writes reached its server. The intent was made durable
        before the first write; the steps are marked without waiting for the disk (only
        a power cut or a kill in the milliseconds before a mark is committed can lose
        it, and the next run takes every state an item's steps can leave as the tool's
        own). A thread of the state's own commits the marks queued meanwhile in one
        transaction: a transaction per mark, each waiting for the last, cost the write
        phase more than its requests, and the writing threads never wait for one."""
        with self._marks_ready:
            if self._marks_error is not None:
                raise self._marks_error
            self._marks.append((steps, run_id, rating_key))
            if self._marker is None:
                self._marker = threading.Thread(target=self._commit_marks,
                                                name="journal-marks", daemon=True)
                self._marker.start()
            self._marks_ready.notify()

    def _commit_marks(self) -> None:
        assert self.db is not None
        with self._db_lock:
            self.db.execute("PRAGMA synchronous = OFF")
        self._steps_fast = True
        while True:
            with self._marks_ready:
                while not self._marks and not self._marks_stop:
                    self._marks_ready.wait()
                marks, self._marks = self._marks, []
                if not marks:
                    return
            try:
                with self._writing("the journal misses a step") as db:
                    db.executemany("UPDATE journal SET steps_done = ? WHERE run_id = ? AND "
                                   "rating_key = ?", marks)
            except StateError as exc:
                with self._marks_ready:  # every later mark fails: the journal is not kept
                    self._marks_error = exc
                return

    def _marks_committed(self) -> None:
        """Every step marked so far committed, and the marking thread ended (a failure to
        commit was raised to the threads that marked a step after it)."""
        with self._marks_ready:
            marker, self._marker = self._marker, None
            self._marks_stop = True
            self._marks_ready.notify()
        if marker is not None:
            marker.join()
        with self._marks_ready:
            self._marks_stop = False
            self._marks_error = None

    def finish_run(self, run_id: int, kind: str, argv: Sequence[str],
                   bases: Iterable[tuple[int, BaseRecord]], journal: Sequence[JournalRow],
                   *, counts: dict | None = None, undoes: int | None = None) -> int:
        """The run's journal completed and the new bases, in one transaction (durable
        again: on disk before the run ends)."""
        self._marks_committed()  # the journal is written whole here, marks or not
        if self._steps_fast and self.db is not None:
            self._steps_fast = False
            with self._db_lock:
                self.db.execute("PRAGMA synchronous = FULL")
        with self._writing("nothing in it changed") as db:
            if not run_id:
                run_id = int(db.execute(
                    "INSERT INTO runs (started_at, kind, argv, writes, status) "
                    "VALUES (?, ?, ?, ?, ?)", (time.strftime("%Y-%m-%d %H:%M:%S"), kind,
                                               json.dumps(list(argv)), len(journal),
                                               RUN_STARTED)).lastrowid or 0)
            recorded: list[int] = []  # the unfinished items this run records

            def rows() -> Iterator[tuple]:
                for key, r in bases:
                    if key in self._unfinished_keys:
                        recorded.append(key)
                    yield (key, r.media_file_id, r.file_name, r.sage.to_text(),
                           r.plex.to_text(), _state_json(r.sage_raw), _state_json(r.plex_raw),
                           *_pending_columns(r.pending), r.run_id or run_id)
            db.executemany("INSERT OR REPLACE INTO base VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows())
            db.execute("DELETE FROM journal WHERE run_id = ?", (run_id,))
            db.executemany(_JOURNAL_INSERT, [_journal_values(j, run_id)
                                             for j in journal])
            # An unfinished item of a killed run is settled once a later run records it.
            db.executemany("UPDATE journal SET outcome = 'superseded' WHERE outcome = ? AND "
                           "run_id != ? AND rating_key = ?",
                           [(INTENDED, run_id, key) for key in recorded])
            db.execute("UPDATE runs SET status = ?, writes = ?, counts = ?, undoes = ? "
                       "WHERE run_id = ?", (RUN_DONE, len(journal), json.dumps(counts or {}),
                                            undoes, run_id))
            if undoes is not None:
                db.execute("UPDATE runs SET undone_by = ? WHERE run_id = ?", (run_id, undoes))
            self._prune(db)
        return run_id

    @staticmethod
    def _prune(db: sqlite3.Connection) -> None:
        """Keep the last RUNS_KEPT runs and their journal: the file never grows without
        end (the bases, one per item, are never pruned)."""
        row = db.execute("SELECT run_id FROM runs ORDER BY run_id DESC LIMIT 1 OFFSET ?",
                         (RUNS_KEPT,)).fetchone()
        if row is not None:
            db.execute("DELETE FROM journal WHERE run_id <= ?", (row[0],))
            db.execute("DELETE FROM runs WHERE run_id <= ?", (row[0],))


#: The state file's JSON: as json.dumps writes it, without its check for cycles (which
#: plain values cannot have), twice as fast on a first sync's hundred thousand records.
_state_json = json.JSONEncoder(check_circular=False).encode

_JOURNAL_INSERT = "INSERT INTO journal VALUES (" + ",".join("?" * 21) + ")"


def _text_or_none(status: Status | None) -> str | None:
    return status.to_text() if status is not None else None


def _journal_values(j: JournalRow, run_id: int) -> tuple:
    return (run_id, j.rating_key, j.media_file_id, j.title, j.rule, j.writes,
            j.sage_before.to_text(), j.plex_before.to_text(), _text_or_none(j.sage_after),
            _text_or_none(j.plex_after), j.outcome, j.detail, _text_or_none(j.to_sage),
            _text_or_none(j.to_plex), _state_json(j.sage_raw_before),
            _state_json(j.plex_raw_before), _state_json(j.sage_raw_after),
            _state_json(j.plex_raw_after), j.steps_done,
            _state_json([s.to_text() for s in j.own_sage]),
            _state_json([s.to_text() for s in j.own_plex]))


def _journal_from_row(row: tuple) -> JournalRow:
    return JournalRow(
        run_id=row[0], rating_key=row[1], media_file_id=row[2], title=row[3], rule=row[4],
        writes=row[5], sage_before=Status.from_text(row[6]),
        plex_before=Status.from_text(row[7]), sage_after=_status_or_none(row[8]),
        plex_after=_status_or_none(row[9]), outcome=row[10], detail=row[11],
        to_sage=_status_or_none(row[12]), to_plex=_status_or_none(row[13]),
        sage_raw_before=_json_object(row[14]), plex_raw_before=_json_object(row[15]),
        sage_raw_after=_json_object(row[16]), plex_raw_after=_json_object(row[17]),
        steps_done=int(row[18] or 0), own_sage=_statuses(row[19]),
        own_plex=_statuses(row[20]))


def _status_or_none(text: str | None) -> Status | None:
    return Status.from_text(text) if text else None


def _pending_columns(pending: Pending | None) -> tuple[str | None, str | None, str | None]:
    if pending is None:
        return None, None, None
    return _text_or_none(pending.to_sage), _text_or_none(pending.to_plex), pending.to_json()


def _pending_from_columns(to_sage: str | None, to_plex: str | None, on: str | None,
                          sage_raw: dict, plex_raw: dict) -> Pending | None:
    """The pending decision of a base row (a schema-1 row kept only the states)."""
    if not on:
        return None
    if not on.startswith("{"):  # schema 1: "sage|plex" states, no raw values
        return Pending(_status_or_none(to_sage), _status_or_none(to_plex), sage_raw, plex_raw)
    data = _json_object(on)
    return Pending(_status_or_none(to_sage), _status_or_none(to_plex),
                   dict(data.get("sage") or {}), dict(data.get("plex") or {}),
                   tuple(Status.from_text(t) for t in data.get("own_sage") or ()),
                   tuple(Status.from_text(t) for t in data.get("own_plex") or ()),
                   bool(data.get("known", True)), _stamp_or_none(data.get("own_sage_until_ms")),
                   _stamp_or_none(data.get("own_plex_until_ms")))


def _stamp_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


###############################################################################
# The run, a pipeline of values: read, check, plan, guard, write, remember ####
###############################################################################


class RunKind(Enum):
    """What a run does, one value (the command line's words, checked)."""

    REPORT = "report"  # read, decide, write nothing
    SYNC = "sync"  # -s
    PLAN = "plan"  # --plan FILE: decide and save, write nothing
    APPLY = "apply"  # --apply FILE
    UNDO = "undo"  # --undo [RUN]
    WHY = "why"  # --why MEDIA-ID
    SAGEDATA = "sagedata"  # --sagedata
    WATCH = "watch"  # --watch: a full sync, then follow both servers
    HISTORY = "history"  # --history [N]: the state alone, no server asked
    CHECK = "check"  # --check: the config and both servers
    LIBRARY = "library"  # -l, --addtv, --addmovie, --delsec, --refresh


#: The kinds that write to the servers (unless simulated) and so record the base.
WRITING_KINDS = (RunKind.SYNC, RunKind.APPLY, RunKind.UNDO, RunKind.WATCH)


@dataclass(frozen=True)
class Options:
    """What one run is asked to do: the command line, checked, as one value. Nothing
    after the argument checks reads argparse's namespace, and no phase rewrites this."""

    kind: RunKind = RunKind.REPORT
    targets: tuple[str, ...] = ()
    media: bool = False
    #: -n: every write printed as it would be done, none done (any writing kind).
    simulate: bool = False
    prompt: bool = False
    yes: bool = False
    ignore_ms: int = DEFAULT_IGNORE_S * 1000
    position_ms: int | None = None
    position_text: str = ""
    undo_run: int | None = None  # None: the last sync not yet undone
    plan_file: Path | None = None
    apply_file: Path | None = None
    state_path: Path | None = None
    argv: tuple[str, ...] = ()
    config_path: str | None = None  # -c, as given (found when it is needed)
    #: A library command (kind LIBRARY): its flag's name and its words.
    library: tuple[str, tuple[str, ...]] = ("", ())
    history_limit: int = 0
    interval_min: int | None = None
    poll_s: float = 0.0
    #: What is printed: every item (--all-items or -v), JSON, less (-q), the log on stderr.
    every_item: bool = False
    as_json: bool = False
    quiet: bool = False
    verbose: bool = False
    no_progress: bool = False

    @property
    def writes(self) -> bool:
        """Whether the run writes to the servers (and so records the base)."""
        return self.kind in WRITING_KINDS and not self.simulate

    @property
    def decides_writes(self) -> bool:
        """Whether the run works out each item's writes (done, simulated or saved)."""
        return self.kind in WRITING_KINDS or self.kind is RunKind.PLAN


class Outcome(Enum):
    UNCHANGED = "unchanged"  # nothing to write (in sync, or report mode)
    UPDATED = "updated"
    SIMULATED = "simulated"
    SKIPPED = "skipped"
    FAILED = "failed"


class Item(NamedTuple):
    """One Plex item as the run read it: the SageTV media file it matched, both sides'
    states seen through the item's bounds, and its base. A value: no phase changes it
    (a later phase that learns more makes a new one)."""

    plex: PlexItem
    #: Its place in what the run read: the report lists items in this order.
    order: int = 0
    sage: SageItem | None = None
    candidates: int = 0
    #: Why it cannot be synced (a record unreadable on either side); '' when it can.
    unreadable: str = ""
    #: What reading found besides: the media files an ambiguous name has, or "gone".
    detail: str = ""
    gone: bool = False
    segments: tuple[tuple[int, int], ...] = ()
    #: (Plex's played fraction, -x) once matched: the item's bounds follow from them.
    bounds_rule: tuple[float, int] | None = None
    #: The bounds, when reading needed them (a position on either side); otherwise worked
    #: out when asked for: most items have no position and need none.
    measured_bounds: Bounds | None = None
    sage_status: Status = NOT_WATCHED
    plex_status: Status = NOT_WATCHED
    sage_last_ms: int = 0  # local clock
    plex_last_ms: int = 0
    base: Base | None = None
    #: The base as stored (raw values), kept for a failed write's pending record.
    base_record: BaseRecord | None = None

    @property
    def matched(self) -> bool:
        return self.sage is not None and self.bounds_rule is not None

    @property
    def bounds(self) -> Bounds | None:
        """Where progress starts and "watched" begins for this item (None: not matched)."""
        if self.measured_bounds is not None or self.sage is None or self.bounds_rule is None:
            return self.measured_bounds
        played_fraction, ignore_ms = self.bounds_rule
        duration = self.plex.duration_ms or sum(end - start for start, end in self.segments)
        return item_bounds(self.sage.airing, self.segments, duration, played_fraction,
                           ignore_ms)


class Planned(NamedTuple):
    """One item of the plan: its decision and the writes that carry it out, or why the
    run leaves it alone."""

    item: Item
    decision: Decision = _IN_SYNC
    writes: tuple[Write, ...] = ()
    #: Why a write the decision asks for cannot be made ('' when none is blocked).
    blocked: str = ""
    #: What SageTV will show once another Plex item's write to the same file is done.
    sage_expected: Status | None = None
    #: SKIPPED when the plan already leaves the item alone (gone, changed since a replay).
    outcome: Outcome = Outcome.UNCHANGED
    detail: str = ""
    notes: tuple[str, ...] = ()
    #: The item's old base stays: the plan does not carry out its decision.
    keep_base: bool = False
    #: The item as the run first read it, when a write of this run to a recording sharing
    #: its show flag made it decide again (None: ``item``): the journal's before-state,
    #: what an undo puts back.
    read_as: Item | None = None

    @property
    def plex(self) -> PlexItem:
        return self.item.plex

    @property
    def sage(self) -> SageItem | None:
        return self.item.sage

    @property
    def verdict(self) -> Verdict:
        return self.decision.verdict


class Result(NamedTuple):
    """What became of a planned item: the outcome of its writes, and both sides as read
    back after them."""

    planned: Planned
    outcome: Outcome = Outcome.UNCHANGED
    detail: str = ""
    notes: tuple[str, ...] = ()
    #: The decision was not carried out and the old base stays (interrupted, declined).
    keep_base: bool = False
    #: How many of its writes reached their server (the journal's record).
    steps_done: int = 0
    #: Both sides as read back after the writes (None: not read back).
    sage_after_item: SageItem | None = None
    plex_after_item: PlexItem | None = None
    sage_after: Status | None = None
    plex_after: Status | None = None

    # What the report reads of the item and its plan, by name.
    @property
    def item(self) -> Item:
        return self.planned.item

    @property
    def plex(self) -> PlexItem:
        return self.planned.item.plex

    @property
    def sage(self) -> SageItem | None:
        return self.planned.item.sage

    @property
    def matched(self) -> bool:
        return self.planned.item.matched

    @property
    def decision(self) -> Decision:
        return self.planned.decision

    @property
    def verdict(self) -> Verdict:
        return self.planned.decision.verdict

    @property
    def writes(self) -> tuple[Write, ...]:
        return self.planned.writes

    @property
    def sage_status(self) -> Status:
        return self.planned.item.sage_status

    @property
    def plex_status(self) -> Status:
        return self.planned.item.plex_status


def result_of(planned: Planned) -> Result:
    """A planned item's result when nothing is written for it."""
    return Result(planned, planned.outcome, planned.detail, planned.notes, planned.keep_base)


def quiet_result(item: Item) -> Result:
    """An item in sync with nothing decided, as the report lists it (--all-items)."""
    return Result(Planned(item))


class Console:
    """The run's streams and terminal, injected: nothing reads sys.stdin behind its back.
    Questions go to stdin when it is a terminal, else to the controlling terminal (so -p
    works with stdin in a pipe), else they are answered no, and said so."""

    def __init__(self, out: TextIO, err: TextIO, stdin: TextIO | None, secrets: Secrets,
                 progress: bool = False,
                 terminal: Callable[[], TextIO | None] = lambda: None) -> None:
        self.out, self.err, self.stdin, self.secrets = out, err, stdin, secrets
        self.progress = progress
        self._open_terminal = terminal
        self._terminal: TextIO | None = None
        self._looked = False
        self._status: _StatusLine | None = None

    def _asking_on(self) -> TextIO | None:
        """A terminal the tool can read in the foreground: a background job reading its
        terminal would be stopped (SIGTTIN), so there the answer is no."""
        if self.stdin is not None and _isatty(self.stdin):
            return self.stdin if _in_foreground(self.stdin) else None
        if not self._looked:
            self._looked = True
            self._terminal = self._open_terminal()
        return self._terminal if _in_foreground(self._terminal) else None

    @property
    def can_ask(self) -> bool:
        return self._asking_on() is not None

    def ask(self, question: str) -> bool:
        """Ask on the terminal; with no terminal the answer is no, and we say so."""
        terminal = self._asking_on()
        if terminal is None:
            self.err.write(f"{question} [y/N] no (no terminal to ask on)\n")
            return False
        prompt = self.err if terminal is self.stdin else terminal
        prompt.write(f"{question} [y/N] ")
        prompt.flush()
        return terminal.readline().strip().lower() in ("y", "yes")

    def close(self) -> None:
        if self._terminal is not None:
            self._terminal.close()
            self._terminal = None

    def bar(self, total: int | None, what: str) -> Any:
        """A progress bar on stderr (a terminal only), or one that shows nothing. Without a
        total, while waiting() shows its line, the count goes into that line."""
        if not self.progress:
            return _NoBar()
        if total is None and self._status is not None:
            return self._status.counter(what)
        from tqdm import tqdm
        bar = tqdm(total=total, desc=what, unit=" items", file=self.err, leave=False,
                   dynamic_ncols=True)
        return _Ticking(bar)

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """A line with a spinner and the time gone by, while a server builds a listing
        that says nothing until it is whole (a minute for 100,000 SageTV items)."""
        if not self.progress:
            yield
            return
        self._status = _StatusLine(self.err, what)
        try:
            yield
        finally:
            self._status.close()
            self._status = None


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _Ticking:
    """A tqdm bar redrawn twice a second, so that its elapsed time and ETA move between
    slow updates (tqdm draws only when updated)."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self._closed = threading.Event()
        threading.Thread(target=self._tick, name="progress", daemon=True).start()

    def _tick(self) -> None:
        while not self._closed.wait(0.5):
            self.bar.refresh()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self._closed.set()
        self.bar.close()


class _StatusLine:
    """One line on the terminal, redrawn four times a second: a spinner, what is waited
    for, the counts of what is read meanwhile, and the time gone by."""

    SPINNER = "|/-\\"

    def __init__(self, stream: TextIO, what: str) -> None:
        self.stream, self.what = stream, what
        self.started = time.monotonic()
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="progress", daemon=True)
        self._thread.start()

    def counter(self, what: str) -> _Counted:
        return _Counted(self, what)

    def add(self, what: str, n: int) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + n

    def text(self, turn: int) -> str:
        elapsed = int(time.monotonic() - self.started)
        with self._lock:
            read = "; ".join(f"{what}: {n:,} items" for what, n in self.counts.items())
        return (f"{self.SPINNER[turn % 4]} {read + '; ' if read else ''}{self.what} "
                f"{elapsed // 60}:{elapsed % 60:02d}")

    def _tick(self) -> None:
        turn = 0
        while not self._closed.wait(0.25 if turn else 0):
            width = _terminal_width(self.stream)
            self.stream.write("\r" + self.text(turn)[:width - 1] + "\x1b[K")
            self.stream.flush()
            turn += 1

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.stream.write("\r\x1b[K")
        self.stream.flush()


class _Counted:
    """A bar without a total, drawn as a count in the status line."""

    def __init__(self, line: _StatusLine, what: str) -> None:
        self.line, self.what = line, what
        line.add(what, 0)

    def update(self, n: int = 1) -> None:
        self.line.add(self.what, n)

    def close(self) -> None:
        pass


def _terminal_width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return 80


def _controlling_terminal() -> TextIO | None:
    """The terminal the user runs the tool from, even with stdin in a pipe (or None)."""
    try:
        fd = os.open("CON" if sys.platform.startswith("win") else "/dev/tty", os.O_RDWR)
    except OSError:
        return None
    # A terminal is read and written but not seekable: one buffer each way.
    pair = io.BufferedRWPair(io.FileIO(fd, "r", closefd=False), io.FileIO(fd, "w"))
    return io.TextIOWrapper(cast(io.BufferedRandom, pair), encoding="utf-8",
                            write_through=True)


def _in_foreground(stream: TextIO | None) -> bool:
    """Whether this process's group owns the terminal (not a shell's background job)."""
    if stream is None:
        return False
    try:
        return os.tcgetpgrp(stream.fileno()) == os.getpgrp()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return True  # no job control here (Windows, a test's stream): it can be read


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


def _sage_item_with(item: SageItem, **changes: Any) -> SageItem:
    """A copy of a media file with some values changed (what a planned write makes)."""
    values = {name: getattr(item, name) for name in SageItem.__slots__ if name != "segments"}
    values.update(changes)
    copy = SageItem(**values)
    copy.segments = item.segments
    return copy


def after_sage_write(item: SageItem, write: SageWrite) -> SageItem:
    """What SageTV will show for the media file once ``write`` is done."""
    if isinstance(write, SageMarkWatched):
        return _sage_item_with(item, watched=True, watched_end_ms=item.airing.end_ms)
    if isinstance(write, SageClearWatched):
        return _sage_item_with(item, watched=False, watched_end_ms=0)
    end = write.time_ms if write.clear_first else max(item.watched_end_ms, write.time_ms)
    return _sage_item_with(item, watched=item.watched and not write.clear_first,
                           watched_end_ms=end)


def sage_status(item: SageItem, segments: Sequence[tuple[int, int]], bounds: Bounds) -> Status:
    """SageTV's state seen from a Plex item that plays ``segments``."""
    position = (position_from_sage_time(item.watched_end_ms, segments)
                if item.watched_end_ms > 0 else 0)
    return classify(item.watched, position, bounds, is_sage=True)


@dataclass(frozen=True)
class Facts:
    """Everything the run read, before any decision. The later phases only read it (the
    SageTV index groups recordings by show once, before the write pool starts)."""

    items: tuple[Item, ...]
    index: SageIndex
    played_fraction: float
    played_from: str
    #: The servers' clock offsets (ms): SageTV's, Plex's.
    offsets: tuple[int, int] = (0, 0)
    #: The stored bases by Plex media id, the items of unfinished runs made pending.
    bases: Mapping[int, BaseRecord] = field(default_factory=dict)


class Assessing(NamedTuple):
    """What assessing a Plex item takes besides the item: SageTV's side, the bases, the
    played rule (Plex's threshold, -x) and the clock offsets."""

    sage: SageIndex
    bases: Mapping[int, BaseRecord]
    rule: tuple[float, int]
    offsets: tuple[int, int]


@dataclass(frozen=True)
class Plan:
    """Every item decided, one decision per SageTV recording (§4). ``decided``: the items
    the run decides or reports, in listing order; ``quiet``: the matched items whose two
    sides agree with nothing pending (most of a library): nothing to decide or write."""

    decided: tuple[Planned, ...]
    quiet: tuple[Item, ...] = ()

    def every(self) -> Iterator[Planned | Item]:
        """Both, in listing order."""
        return heapq.merge(self.decided, self.quiet, key=_listing_order)


def _listing_order(value: Planned | Item) -> int:
    return value.item.order if isinstance(value, Planned) else value.order


@dataclass(frozen=True)
class Replay:
    """A decision given from outside (--undo, --apply) and the item as it expects to
    find it: carried out only if neither side changed since (§6.4)."""

    sage: Status
    plex: Status
    sage_stamp_ms: int
    plex_stamp_ms: int
    decision: Decision
    #: States the replayed run's own unfinished steps can have left (a killed run).
    own_sage: tuple[Status, ...] = ()
    own_plex: tuple[Status, ...] = ()
    #: The raw values behind ``sage`` and ``plex``, classified again under this run's
    #: bounds (§6.1: a changed setting is not a change); empty: the states as stored.
    sage_raw: dict = field(default_factory=dict)
    plex_raw: dict = field(default_factory=dict)
    #: The raw values behind the decision's targets (an undo's before-states), read
    #: under this run's bounds; empty: the targets as stored (a saved plan).
    to_sage_raw: dict = field(default_factory=dict)
    to_plex_raw: dict = field(default_factory=dict)

    def targets(self, item: Item) -> Decision:
        """The decision with its targets as this run's bounds read them (§6.1): a side
        the replayed run left as it was reads the same as today, so it gets no write."""
        decision = self.decision
        to_sage, to_plex = decision.to_sage, decision.to_plex
        to_sage = raw_sage_status(self.to_sage_raw, to_sage, item) if (
            to_sage is not None and self.to_sage_raw) else at_today(to_sage, item)
        to_plex = raw_plex_status(self.to_plex_raw, to_plex, item) if (
            to_plex is not None and self.to_plex_raw) else at_today(to_plex, item)
        return replace(decision, to_sage=to_sage, to_plex=to_plex)

    def holds(self, item: Item) -> bool:
        """Neither side changed since, the tool's own steps excepted: this run's, and
        those of a later run that failed or died half way (its pending record)."""
        assert item.sage is not None
        base = item.base
        own_sage = own_today(self.own_sage, item) + (base.own_sage if base else ())
        own_plex = own_today(self.own_plex, item) + (base.own_plex if base else ())
        then_sage = raw_sage_status(self.sage_raw, self.sage, item)
        then_plex = raw_plex_status(self.plex_raw, self.plex, item)
        sage_moved = changed(item.sage_status, item.sage.real_end_ms, then_sage,
                             self.sage_stamp_ms, own_sage)
        plex_moved = changed(item.plex_status, item.plex.last_viewed_ms, then_plex,
                             self.plex_stamp_ms, own_plex)
        return not sage_moved and not plex_moved


def raw_sage_status(raw: dict, fallback: Status, item: Item) -> Status:
    """SageTV's state from stored raw values, under this run's bounds (§6.1)."""
    if "IsWatched" not in raw:
        return fallback
    if raw["IsWatched"]:
        return WATCHED
    end_ms = int(raw.get("WatchedEndTime") or 0)
    if end_ms <= 0:
        return NOT_WATCHED
    bounds = item.bounds
    assert bounds is not None
    return classify(False, position_from_sage_time(end_ms, item.segments), bounds,
                    is_sage=True)


def raw_plex_status(raw: dict, fallback: Status, item: Item) -> Status:
    """Plex's state from stored raw values, under this run's bounds (§6.1)."""
    if "viewCount" not in raw:
        return fallback
    watched, offset_ms = int(raw["viewCount"] or 0) > 0, int(raw.get("viewOffset") or 0)
    if offset_ms == 0:
        return WATCHED if watched else NOT_WATCHED
    bounds = item.bounds
    assert bounds is not None
    return classify(watched, offset_ms, bounds, is_sage=False)


def at_today(target: Status | None, item: Item) -> Status | None:
    """A target position decided in an earlier run, as this run's bounds read it: with
    another -x or played threshold it may be no resume point any more (§6.1)."""
    if target is None or target.kind is not Kind.PROGRESS:
        return target
    bounds = item.bounds
    assert bounds is not None
    return classify(False, target.position_ms, bounds, is_sage=False)


def own_today(states: tuple[Status, ...], item: Item) -> tuple[Status, ...]:
    """The states an earlier run's own steps can have left, as this run's bounds read them
    (§6.1): a position it wrote may be WATCHED at a lower played threshold."""
    return tuple(cast(Status, at_today(state, item)) for state in states)


def _raw_has_position(raw: dict) -> bool:
    return bool(int(raw.get("viewOffset") or 0)) or (
        not raw.get("IsWatched") and bool(int(raw.get("WatchedEndTime") or 0)))


def base_of(record: BaseRecord, item: Item) -> Base:
    """The item's base as this run sees it: the stored raw values classified with today's
    bounds, so a changed -x or played threshold is never a change by the user."""
    sage = raw_sage_status(record.sage_raw, record.sage, item)
    plex = raw_plex_status(record.plex_raw, record.plex, item)
    base = Base(sage, plex, sage_last_ms=int(record.sage_raw.get("RealWatchedEndTime") or 0),
                plex_last_ms=int(record.plex_raw.get("lastViewedAt") or 0) * 1000,
                known=record.known)
    pending = record.pending
    if pending is None:
        return base
    on_sage = raw_sage_status(pending.sage_raw, sage, item)
    on_plex = raw_plex_status(pending.plex_raw, plex, item)
    return replace(base, pending=(at_today(pending.to_sage, item),
                                  at_today(pending.to_plex, item)),
                   pending_on=(on_sage, on_plex),
                   pending_sage_ms=int(pending.sage_raw.get("RealWatchedEndTime") or 0),
                   pending_plex_ms=int(pending.plex_raw.get("lastViewedAt") or 0) * 1000,
                   own_sage=own_today(pending.own_sage, item),
                   own_plex=own_today(pending.own_plex, item),
                   own_sage_until_ms=pending.own_sage_until_ms,
                   own_plex_until_ms=pending.own_plex_until_ms)


def with_unfinished(bases: dict[int, BaseRecord], unfinished: Sequence[JournalRow]
                    ) -> dict[int, BaseRecord]:
    """The bases with the items of runs that never finished made pending (§6.3): each
    keeps the base it had before that run (none on a first sync), and the steps that
    run took are the tool's own doing."""
    for row in unfinished:
        old = bases.get(row.rating_key)
        known = old is not None and old.media_file_id == row.media_file_id and old.known
        pending = Pending(row.to_sage, row.to_plex, row.sage_raw_before, row.plex_raw_before,
                          row.own_sage, row.own_plex, known)
        if old is not None and known:
            bases[row.rating_key] = replace(old, pending=pending)
        else:
            bases[row.rating_key] = BaseRecord(
                row.media_file_id, "", row.sage_before, row.plex_before, row.sage_raw_before,
                row.plex_raw_before, pending, known=False)
    return bases


# -- 1. read ---------------------------------------------------------------------------------
_T = TypeVar("_T")


def _on_thread(name: str, work: Callable[[], _T]) -> Future[_T]:
    """``work`` done on a daemon thread of its own: a run that fails meanwhile does not
    wait at its exit for a listing it no longer needs."""
    future: Future[_T] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # noqa: BLE001 - the future's reader raises it
            future.set_exception(exc)
    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class Reader:
    """Phase 1: read what the run needs from both servers and the state, into Facts. The
    speed-ups live here (both servers at once, SageTV by id for a media run, segment
    times only where a position is at stake)."""

    def __init__(self, opts: Options, sage: SageClient, plex: PlexClient,
                 state: StateStore | None, console: Console,
                 replays: Mapping[int, Replay] | None = None) -> None:
        self.opts = opts
        self.sage = sage
        self.plex = plex
        self.state = state
        self.console = console
        #: Decisions given from outside (--undo, --apply): the items they name are read.
        self.replays = replays or {}
        #: Media ids an undo or a plan names that Plex no longer has.
        self.gone: list[int] = []

    def read(self) -> Facts:
        """Both servers at once: SageTV's listing is read on a thread while Plex's items
        arrive (from the listing's process, if any), each assessed as soon as SageTV's
        side is in. A read that fails ends the run here, before any write."""
        targeted = self.targeted_files()
        listing = self.plex_listing()  # first: its process is forked before any thread
        with contextlib.closing(listing):
            sage = _on_thread("sage-listing", lambda: SageIndex(
                self.sage.media_files(SAGE_FIELDS, convert_media_file) if targeted is None
                else self.read_sage_files(targeted)))

            def failed_ends_listing(done: Future[SageIndex]) -> None:
                if done.exception() is not None:  # the run ends now, not once Plex's is in
                    listing.stop()
            sage.add_done_callback(failed_ends_listing)
            try:
                with self.console.waiting("waiting for SageTV's listing"):
                    played_fraction, played_from = self.plex.played_threshold()
                    plex_items, unreadable, items, assessing = self.read_plex(
                        listing, sage, (played_fraction, self.opts.ignore_ms))
            except PlexError:
                failed = sage.exception() if sage.done() else None
                if failed is not None:  # the listing's process was ended for it
                    raise failed from None
                raise
        index, bases = assessing.sage, assessing.bases
        plex_items += self.twins_outside(plex_items, index, bases)
        log.info("SageTV lists %d media files; Plex %d items", len(index), len(plex_items))
        items += self.assessed(plex_items, len(items), assessing)
        items += [item._replace(order=len(items) + n) for n, item in enumerate(
            unreadable + [_gone_item(key) for key in self.gone])]
        return Facts(tuple(items), index, played_fraction, played_from, assessing.offsets,
                     bases)

    def read_plex(self, listing: PlexListing, sage: Future[SageIndex], rule: tuple[float, int]
                  ) -> tuple[list[PlexItem], list[Item], list[Item], Assessing]:
        """The Plex items to work on, each once, those that could not be read, and those
        assessed so far: from the moment SageTV's side is in, while the rest arrive."""
        plex_items: list[PlexItem] = []
        keys: set[int] = set()
        unreadable: list[Item] = []
        items: list[Item] = []
        assessing: Assessing | None = None
        bar = self.console.bar(None, "reading Plex")
        for batch in listing:
            for listed in batch:
                if type(listed) is not tuple:
                    unreadable.append(_unreadable_item(listed[0], "unreadable from Plex: "
                                                       + listed[1]))
                elif listed[0] not in keys:  # an item listed twice is one item
                    keys.add(listed[0])
                    plex_items.append(PlexItem(*listed))
            bar.update(len(batch))
            if assessing is None and sage.done():
                assessing = self.assessing(sage.result(), rule)
            if assessing is not None:
                items += self.assessed(plex_items, len(items), assessing)
        bar.close()
        return plex_items, unreadable, items, assessing or self.assessing(sage.result(), rule)

    def assessing(self, index: SageIndex, rule: tuple[float, int]) -> Assessing:
        """What assessing an item takes besides the item, once SageTV's side is in."""
        bases: dict[int, BaseRecord] = {}
        if self.state is not None:
            self.state.check_servers(self.identity())
            bases = with_unfinished(self.state.bases(), self.state.journal(None))
        return Assessing(index, bases, rule, self.clock_offsets())

    def assessed(self, plex_items: list[PlexItem], first: int, assessing: Assessing
                 ) -> list[Item]:
        """The items from ``first`` on, assessed (their order is their place)."""
        index, bases, rule, offsets = assessing
        return [self.assess(plex, order, index, bases, rule, offsets)
                for order, plex in enumerate(plex_items[first:], first)]

    def targeted_files(self) -> list[int] | None:
        """A media sync whose items all have bases (the continuous mode's events) reads
        those SageTV files by id, and the recordings sharing their show flag, instead of
        the whole listing; None: the whole listing (an item never synced, a show id)."""
        if not (self.opts.media and self.opts.kind in (RunKind.SYNC, RunKind.WATCH)
                and self.state is not None and not self.replays):
            return None
        bases = self.state.bases()
        files: set[int] = set()
        shows: set[str] = set()
        for target in self.opts.targets:
            record = bases.get(int(target))
            if record is None or not record.known or "ShowExternalID" not in record.sage_raw:
                return None
            files.add(record.media_file_id)
            shows.add(str(record.sage_raw["ShowExternalID"] or ""))
        shows.discard("")
        files.update(r.media_file_id for r in bases.values()
                     if r.sage_raw.get("ShowExternalID") in shows)
        return sorted(files)

    def read_sage_files(self, media_file_ids: list[int]) -> list[SageItem | Unreadable]:
        """SageTV's media files by id; one that is gone (a new recording of it may have
        another id) means the whole listing after all."""
        records: list[SageItem | Unreadable] = []
        for media_file_id in media_file_ids:
            record = self.sage.media_file(media_file_id, SAGE_FIELDS)
            if record is None:
                log.info("SageTV no longer has media file %d: reading the listing",
                         media_file_id)
                return self.sage.media_files(SAGE_FIELDS, convert_media_file)
            records.append(convert_media_file(record))
        log.debug("SageTV media files read by id: %s", media_file_ids)
        return records

    def identity(self) -> dict[str, str]:
        """Which pair of servers this is (§6.5): Plex's machine id, SageTV's address."""
        return {"plex": str(self.plex.root.get("machineIdentifier") or ""),
                "sagetv": self.sage.server.address}

    def twins_outside(self, items: list[PlexItem], index: SageIndex,
                      bases: Mapping[int, BaseRecord]) -> list[PlexItem]:
        """A -m run, an undo or a plan decides every Plex item holding a named item's file
        (§4), and records its base (§6.2): the twins known from earlier syncs, by media id."""
        if not (self.opts.media or self.replays) or not bases:
            return []
        named = {item.rating_key for item in items}
        files = {m.media_file_id for item in items for m in index.match(item)}
        keys = [key for key, record in bases.items()
                if record.media_file_id in files and key not in named]
        twins = []
        for element in self.plex.metadata(keys) if keys else ():
            with contextlib.suppress(PlexError):
                twins.append(plex_item_from_element(element))
        return twins

    def plex_listing(self) -> PlexListing:
        """The Plex items to work on, in batches: those an undo, a plan or a -m run names
        (read when the first batch is asked for), or the sections' listing."""
        if self.replays:  # --undo, --apply: the items they name, those still there
            return PlexListing(self._named(list(self.replays), gone_ok=True))
        if self.opts.media and self.opts.kind is not RunKind.WHY:
            return PlexListing(self._named([int(t) for t in self.opts.targets]))
        # --why reads what a full sync reads, so that it decides twins as the sync does.
        wanted = ["all"] if self.opts.kind is RunKind.WHY else list(self.opts.targets)
        sections = resolve_sections(wanted, self.plex.sections())
        if not sections:
            self.console.err.write("Plex has no movie or show sections to sync\n")
        for section in sections:
            log.info("section %s (%s)", section.key, section.title)
        return self.plex.listing(sections)

    def _named(self, rating_keys: list[int], gone_ok: bool = False
               ) -> Generator[list[PlexListed], None, None]:
        yield [plex_listed(video_record(video))
               for video in self.media_elements(rating_keys, gone_ok)]

    def media_elements(self, rating_keys: list[int], gone_ok: bool = False) -> list[Element]:
        """Movies and episodes by media id; a show or season gives all its episodes. An
        item no longer on Plex is a usage error, or (``gone_ok``) skipped and reported."""
        wanted = list(dict.fromkeys(rating_keys))
        found = {int(e.get("ratingKey") or 0): e for e in self.plex.metadata(wanted)}
        if len(found) < len(wanted):  # a server that refuses the whole list for one id
            found.update((int(e.get("ratingKey") or 0), e) for key in wanted
                         if key not in found for e in self.plex.metadata([key]))
        videos: list[Element] = []
        for key in wanted:
            element = found.get(key)
            if element is None and gone_ok:
                self.gone.append(key)
                continue
            if element is None:
                raise UsageError(f"Plex has no media id {key}; run with a section name to "
                                 "see the media ids")
            kind = element.get("type") or element.tag
            if element.tag == "Video" and kind in ("movie", "episode"):
                videos.append(element)
            elif kind in ("show", "season"):
                videos += self.plex.children(key, kind)
            else:
                raise UsageError(f"Plex media id {key} is a {kind}, not a movie, episode, "
                                 "season or show")
        return videos

    def assess(self, plex: PlexItem, order: int, index: SageIndex,
               bases: Mapping[int, BaseRecord], rule: tuple[float, int],
               offsets: tuple[int, int]) -> Item:
        """Match one Plex item and read both sides' states through the item's bounds."""
        matches = index.match(plex)
        if len(matches) != 1:
            if matches:
                return Item(plex, order, candidates=len(matches), detail="media files " +
                            ", ".join(str(m.media_file_id) for m in matches))
            return Item(plex, order, unreadable=index.unreadable_reason(plex))
        sage = matches[0]
        record = bases.get(plex.rating_key)
        if sage.segments is None and self._needs_segments(plex, sage, record):
            # Read here, once: each item of a split recording then measures against them.
            sage.segments = tuple(self.sage.segment_times(sage.media_file_id,
                                                          sage.segment_count))
        item = measured_new(plex, order, sage, rule, offsets)
        if record is not None and record.media_file_id == sage.media_file_id and (
                not record.file_name or record.file_name == _item_file_name(item)):
            if item.measured_bounds is None and (_raw_has_position(record.sage_raw)
                                                 or _raw_has_position(record.plex_raw)):
                item = item._replace(measured_bounds=item.bounds)  # worked out once
            item = item._replace(base=base_of(record, item), base_record=record)
        return item

    def _needs_segments(self, plex: PlexItem, sage: SageItem, record: BaseRecord | None
                        ) -> bool:
        """A split recording's times cost two requests a segment: they are read when a
        position is at stake (now or in the base), or when the item holds only some of
        the segments."""
        stacked = {file_name(p) for p in sage.paths} <= {file_name(p) for p in plex.paths}
        positions = (sage.watched_end_ms > 0 and not sage.watched) or plex.position_ms > 0
        differ = sage.watched != plex.watched
        in_base = record is not None and (_raw_has_position(record.sage_raw)
                                          or _raw_has_position(record.plex_raw))
        return not stacked or positions or differ or in_base \
            or self.opts.position_ms is not None or bool(self.replays)

    def clock_offsets(self) -> tuple[int, int]:
        """Both servers' clock offsets; two that differ by no more than the Date header's
        grain are one offset (a tie between the servers' times stays a tie)."""
        sage, plex = self.sage.clock_offset_ms, self.plex.clock_offset_ms
        if abs(sage - plex) <= 1000:
            return sage, sage
        return sage, plex


def measured(item: Item, sage: SageItem, rule: tuple[float, int], offsets: tuple[int, int]
             ) -> Item:
    """The Plex item matched to a SageTV media file: both sides' states through its bounds,
    and their last-watched times on the local clock."""
    plex = item.plex
    segments = (covered_segments(sage, plex) if sage.segments is not None else
                ((sage.file_start_ms, sage.file_start_ms + sage.file_duration_ms),))
    item = item._replace(sage=sage, candidates=1, segments=segments, bounds_rule=rule,
                         measured_bounds=None,
                         sage_last_ms=local_time(sage.real_end_ms, offsets[0]),
                         plex_last_ms=local_time(plex.last_viewed_ms, offsets[1]))
    if plex.position_ms == 0 and (sage.watched or sage.watched_end_ms == 0):
        # No position on either side: whatever the bounds, each side is what its flag says
        return item._replace(sage_status=WATCHED if sage.watched else NOT_WATCHED,
                             plex_status=WATCHED if plex.watched else NOT_WATCHED)
    bounds = item.bounds
    assert bounds is not None
    return item._replace(measured_bounds=bounds, sage_status=sage_status(sage, segments, bounds),
                         plex_status=classify(plex.watched, plex.position_ms, bounds,
                                              is_sage=False))


def measured_new(plex: PlexItem, order: int, sage: SageItem, rule: tuple[float, int],
                 offsets: tuple[int, int]) -> Item:
    """measured() of a Plex item just read: made in one go when neither side has a
    position (most items), where each _replace would copy all of Item's fields again."""
    if plex.position_ms or not (sage.watched or sage.watched_end_ms == 0) or (
            sage.segments is not None and sage.segment_count > 1):
        return measured(Item(plex, order), sage, rule, offsets)
    return Item(plex, order, sage, 1, segments=sage.segments if sage.segments is not None
                else ((sage.file_start_ms, sage.file_start_ms + sage.file_duration_ms),),
                bounds_rule=rule, sage_status=WATCHED if sage.watched else NOT_WATCHED,
                plex_status=WATCHED if plex.view_count > 0 else NOT_WATCHED,
                sage_last_ms=local_time(sage.real_end_ms, offsets[0]),
                plex_last_ms=local_time(plex.last_viewed_ms, offsets[1]))


def _item_file_name(item: Item) -> str:
    return file_name(item.plex.paths[0]) if item.plex.paths else ""


def _gone_item(rating_key: int) -> Item:
    stub = PlexItem(rating_key, "?", (), 0, 0, 0, 0)
    return Item(stub, detail="gone: Plex no longer has it", gone=True)


def _unreadable_item(attrs: dict[str, str], reason: str) -> Item:
    key = attrs.get("ratingKey") or ""
    stub = PlexItem(int(key) if ASCII_ID.match(key) else 0, attrs.get("title") or "?", (),
                    0, 0, 0, 0)
    return Item(stub, unreadable=reason)


# -- 2. check --------------------------------------------------------------------------------
def check_arguments(facts: Facts, opts: Options) -> None:
    """The arguments against what was read: a usage error never follows a write."""
    position = opts.position_ms
    if position is None:
        return
    for item in facts.items:
        lengths = [("Plex", item.plex.duration_ms)]
        if item.sage is not None:
            lengths.append(("SageTV", sum(e - s for s, e in item.segments)))
        for side, length in lengths:
            if 0 < length <= position:
                raise UsageError(
                    f"--position {opts.position_text} is past the end of media id "
                    f"{item.plex.rating_key} on {side} ({format_hms(length)}); give a "
                    "position inside the item")


# -- 3. plan (pure: no I/O) ----------------------------------------------------------------
def plan_run(facts: Facts, opts: Options, replays: Mapping[int, Replay] | None = None
             ) -> Plan:
    """Decide every item: one decision per SageTV recording (§4). Pending retries,
    --position, --undo and --apply (``replays``) are decided here too."""
    replays = replays or {}
    first: dict[int, Item] = {}  # each recording's first Plex item, in listing order
    shared: dict[int, list[Item]] = {}  # those with more than one
    planned: list[Planned] = []
    for item in facts.items:
        if item.matched:
            assert item.sage is not None
            key = item.sage.media_file_id
            if key not in first:
                first[key] = item
            else:
                shared.setdefault(key, [first[key]]).append(item)
        else:
            planned.append(_unmatched(item, replays))
    plain = not replays and opts.position_ms is None
    quiet: list[Item] = []
    for key, item in first.items():
        group = shared.get(key)
        if group is None and plain and _settled(item):
            quiet.append(item)  # most items: nothing to decide
            continue
        planned += plan_recording(group or [item], facts, opts, replays)
    planned.sort(key=_listing_order)
    return Plan(tuple(planned), tuple(quiet))


def _unmatched(item: Item, replays: Mapping[int, Replay]) -> Planned:
    """An item the run cannot decide: reported as it is; one an undo or a plan names is
    skipped (its old base stays)."""
    if item.gone:
        return Planned(item, outcome=Outcome.SKIPPED, detail=item.detail, keep_base=True)
    if item.plex.rating_key in replays:
        return Planned(item, outcome=Outcome.SKIPPED, keep_base=True, detail="gone: " + (
            item.unreadable or "SageTV no longer has its file"))
    return Planned(item, detail=item.detail)


def plan_recording(group: list[Item], facts: Facts, opts: Options,
                   replays: Mapping[int, Replay]) -> list[Planned]:
    """Plex items holding the same segments are decided together; items holding other
    segments of the recording one after the other, each against SageTV's state as the
    previous one's writes will leave it."""
    if len(group) == 1:  # most recordings: one Plex item
        decision, viewed_at, skipped = decide_members(group, opts, replays)
        return _kept_if_idle([plan_item(group[0], decision, viewed_at, skipped=skipped)],
                             replays)
    spans: dict[tuple[tuple[int, int], ...], list[Item]] = {}
    for item in sorted(group, key=lambda i: i.segments[0] if i.segments else (0, 0)):
        spans.setdefault(item.segments, []).append(item)
    sage = group[0].sage
    assert sage is not None
    planned: list[Planned] = []
    for members in spans.values():
        if sage is not group[0].sage:  # as the previous part's writes leave it
            members = [measured(m, sage, m.bounds_rule or (facts.played_fraction,
                                                           opts.ignore_ms), facts.offsets)
                       for m in members]
        planned += _plan_members(members, opts, replays)
        written = next((w for w in planned[-len(members)].writes if _is_sage(w)), None)
        if written is not None:
            sage = after_sage_write(sage, cast(SageWrite, written))
    return _kept_if_idle(planned, replays)


def _kept_if_idle(planned: list[Planned], replays: Mapping[int, Replay]) -> list[Planned]:
    """An undo or apply with nothing to write for a recording (the killed run it undoes
    never reached the servers) leaves its bases as they are: the user's change that run
    was carrying is still seen as the user's by the next sync."""
    if replays and any(p.plex.rating_key in replays for p in planned) and not any(
            p.writes for p in planned):
        return [p._replace(keep_base=True) for p in planned]
    return planned


def _plan_members(members: list[Item], opts: Options, replays: Mapping[int, Replay]
                  ) -> list[Planned]:
    """One decision for the Plex items that hold the same segments (twins): one SageTV
    write for the recording, by the first of them; an undo puts each twin back to its
    own before-state."""
    decision, viewed_at, skipped = decide_members(members, opts, replays)
    planned: list[Planned] = []
    for position, item in enumerate(members):
        own = replays.get(item.plex.rating_key)
        member_decision = decision
        if own is not None and decision.verdict is not Verdict.SETTLED:
            member_decision = own.targets(item)
        elif own is None and replays:  # a twin the replayed run did not write
            member_decision = replace(decision, to_plex=None)
        one = plan_item(item, member_decision, viewed_at, sage_too=position == 0,
                        skipped=skipped)
        if position and any(_is_sage(w) for w in planned[0].writes):
            one = one._replace(sage_expected=decision.to_sage)
        planned.append(one)
    return planned


def decide_members(members: list[Item], opts: Options, replays: Mapping[int, Replay]
                   ) -> tuple[Decision, int, dict[int, str] | None]:
    """One decision for Plex items that hold the same file: Plex's state is the newest
    of theirs, or, with a base, the one that changed. Also the time the viewing was made,
    and (a replay that no longer holds) the items skipped, with why."""
    first = members[0]
    replayed = [(m, replays[m.plex.rating_key]) for m in members
                if m.plex.rating_key in replays]
    if replayed:
        return replay_decision(members, replayed)
    if opts.position_ms is not None:
        return decide_position(first.sage_status, first.plex_status, opts.position_ms), 0, None
    # Twins: one with a write still pending leads (a failed write to the second is
    # retried), else one whose Plex side changed, else the newest.
    pending = [m for m in members if _pending_still_holds(m)]
    moved = [m for m in members if _plex_changed(m)]
    if any(m not in pending for m in moved):
        pending = []  # a twin viewed since beats a write left pending on another (§6.4)
    leader = max(pending or moved or members, key=lambda m: m.plex_last_ms)
    assert leader.sage is not None
    decision = decide(leader.sage_status, leader.plex_status, leader.sage_last_ms,
                      leader.plex_last_ms, leader.base, sage_stamp_ms=leader.sage.real_end_ms,
                      plex_stamp_ms=leader.plex.last_viewed_ms)
    if len(members) > 1 and decision.verdict is Verdict.IN_SYNC and (
            leader.base is None or moved or _sage_changed(leader)):
        # The leader agrees with SageTV after a change: every twin gets that state (§4);
        # twins that differ while nothing changed are left as they are (§6).
        decision = replace(decision, to_plex=leader.plex_status)
    return decision, leader.plex_last_ms, None


def replay_decision(members: list[Item], replayed: list[tuple[Item, Replay]]
                    ) -> tuple[Decision, int, dict[int, str] | None]:
    """--undo and --apply: the decision given, unless the user changed a side since
    (§6.4), or viewed another Plex item holding the recording since its last sync: then
    the recording's items are skipped and left to the next sync."""
    moved = [(m, r) for m, r in replayed if not r.holds(m)]
    named = {m.plex.rating_key for m, _ in replayed}
    viewed = [m for m in members if m.plex.rating_key not in named and _plex_changed(m)]
    if not moved and not viewed:
        return replayed[0][1].targets(members[0]), 0, None
    skipped = dict.fromkeys((m.plex.rating_key for m in members), "")
    for member, replay in moved:  # the user's own change is kept, and left to a sync
        skipped[member.plex.rating_key] = (
            f"changed since (it was SageTV {replay.sage}, Plex {replay.plex}; now SageTV "
            f"{member.sage_status}, Plex {member.plex_status})")
    for member in viewed:
        skipped[member.plex.rating_key] = (f"viewed since the last sync (Plex "
                                           f"{member.plex_status}): left to the next sync")
    return Decision(Verdict.SETTLED, None, None, replayed[0][1].decision.rule), 0, skipped


def plan_item(item: Item, decision: Decision, viewed_at_ms: int, sage_too: bool = True,
              skipped: dict[int, str] | None = None) -> Planned:
    """The writes that bring one item to its decision (§3.1)."""
    assert item.sage is not None
    verdict = _member_verdict(item, decision)
    if verdict is not decision.verdict:
        decision = replace(decision, verdict=verdict)
    if skipped is not None:
        return Planned(item, decision, outcome=Outcome.SKIPPED, keep_base=True,
                       detail=skipped.get(item.plex.rating_key, ""))
    if decision.to_sage is None and decision.to_plex is None:
        return Planned(item, decision)  # nothing to write (most items)
    writes: list[Write] = []
    blocked = ""
    if decision.to_sage is not None and sage_too:
        write = sage_write(item.sage, item.segments, item.sage_status, decision.to_sage,
                           viewed_at_ms)
        writes += [write] if write is not None else []
    if decision.to_plex is not None:
        plex_change, blocked = plex_write(item.plex_status, decision.to_plex)
        writes += plex_writes(plex_change, item.plex.view_count, item.plex.position_ms,
                              unplayed_first=decision.plex_unplayed)
    return Planned(item, decision, tuple(writes), blocked)


def decided_again(planned: Planned, fresh: SageItem, now: Status, facts: Facts,
                  written: Sequence[int]) -> Planned:
    """No decision on a stale read (§4): an item whose SageTV side an earlier write of
    this run changed (a recording sharing its show flag) is decided again on the fresh
    read, taking what SageTV now shows as the server's truth, never as the user's."""
    item = planned.item
    if now == (planned.sage_expected or item.sage_status):
        return planned
    others = ", ".join(str(i) for i in written if i != fresh.media_file_id)
    note = (f"decided again: SageTV's write to media file {others or 'it'} changed it to "
            f"{now} (a shared show flag)")
    base = item.base
    item = item._replace(sage=fresh, sage_status=now,
                         sage_last_ms=local_time(fresh.real_end_ms, facts.offsets[0]),
                         base=None if base is None else replace(
                             base, sage=now, pending=None, pending_on=None,
                             sage_last_ms=fresh.real_end_ms))
    decision = decide(now, item.plex_status, item.sage_last_ms, item.plex_last_ms, item.base,
                      sage_stamp_ms=fresh.real_end_ms, plex_stamp_ms=item.plex.last_viewed_ms)
    again = plan_item(item, decision, item.plex_last_ms)
    return again._replace(notes=planned.notes + (note,),
                          read_as=planned.read_as or planned.item)


def _pending_still_holds(item: Item) -> bool:
    """A twin's failed write is retried for the recording while neither side changed
    since it was decided; once one did, that twin's older base speaks for nothing (its
    twin that was written holds the recording's newer one)."""
    base = item.base
    return (base is not None and base.pending is not None and base.pending_on is not None
            and item.sage is not None and _pending_holds(
                item.sage_status, item.plex_status, base, item.sage.real_end_ms,
                item.plex.last_viewed_ms))


def _plex_changed(item: Item) -> bool:
    """Whether the user changed the item's Plex side since its base (§6.1)."""
    base = item.base
    return base is not None and changed(item.plex_status, item.plex.last_viewed_ms,
                                        base.plex, base.plex_last_ms, base.own_plex,
                                        base.own_plex_until_ms)


def _sage_changed(item: Item) -> bool:
    """Whether the user changed the item's SageTV side since its base (§6.1)."""
    base = item.base
    return base is not None and item.sage is not None and changed(
        item.sage_status, item.sage.real_end_ms, base.sage, base.sage_last_ms, base.own_sage,
        base.own_sage_until_ms)


def _settled(item: Item) -> bool:
    """Both sides show the same and no failed write waits: whatever changed, the merge
    can only find them in sync (the same answer, without asking it)."""
    return item.sage_status == item.plex_status and (
        item.base is None or item.base.pending is None)


def _member_verdict(item: Item, decision: Decision) -> Verdict:
    if decision.verdict is Verdict.SETTLED:
        return Verdict.SETTLED
    to_sage = decision.to_sage is not None and item.sage_status != decision.to_sage
    to_plex = decision.to_plex is not None and item.plex_status != decision.to_plex
    if to_sage and to_plex:
        return Verdict.BOTH_OUT_OF_SYNC
    if to_sage or to_plex:
        return Verdict.SAGE_OUT_OF_SYNC if to_sage else Verdict.PLEX_OUT_OF_SYNC
    return Verdict.IN_SYNC if item.sage_status == item.plex_status else Verdict.SETTLED


def _moves_back(planned: Planned) -> bool:
    decision, item = planned.decision, planned.item
    return bool((decision.to_sage is not None and moves_back(item.sage_status, decision.to_sage))
                or (decision.to_plex is not None
                    and moves_back(item.plex_status, decision.to_plex)))


def _is_sage(write: Write) -> bool:
    return isinstance(write, (SageMarkWatched, SageClearWatched, SageSetPosition))


def _writes_sage(planned: Planned) -> bool:
    return any(_is_sage(w) for w in planned.writes)


def own_states(planned: Planned) -> tuple[tuple[Status, ...], tuple[Status, ...]]:
    """The states the item's writes can leave on each side, step by step: the target,
    what an un-watch first step leaves, and what a restore puts back (§6.3)."""
    decision, item = planned.decision, planned.item
    own_sage: tuple[Status, ...] = ()
    own_plex: tuple[Status, ...] = ()
    for write in planned.writes:
        if isinstance(write, SageSetPosition):
            own_sage += (classify_position(write.position_ms, item),)
            if write.clear_first:
                own_sage += (NOT_WATCHED, item.sage_status)
        elif _is_sage(write) and decision.to_sage is not None:
            own_sage += (decision.to_sage,)
        elif isinstance(write, PlexMarkUnwatched) and len(planned.writes) > 1:
            own_plex += (NOT_WATCHED, item.plex_status)
        elif decision.to_plex is not None:
            own_plex += (decision.to_plex,)
    return own_sage, own_plex


def classify_position(position_ms: int, item: Item) -> Status:
    bounds = item.bounds
    assert bounds is not None
    return classify(False, position_ms, bounds, is_sage=True)


# -- 4. guard --------------------------------------------------------------------------------
def guard(plan: Plan, opts: Options, console: Console, limit: int) -> None:
    """A plan that un-watches or moves back many items asks first (or needs -y)."""
    backward = [p for p in plan.decided if p.writes and _moves_back(p)]
    if not limit or len(backward) <= limit or opts.yes or not opts.writes:
        return
    matched = len(plan.quiet) + sum(1 for p in plan.decided if p.item.matched)
    question = (f"This sync would un-watch or move back {len(backward)} items (of "
                f"{matched}), for example [{backward[0].plex.rating_key}] "
                f"{backward[0].plex.title}. Go ahead?")
    if console.can_ask:
        if console.ask(question):
            return
        raise SyncError("not confirmed: nothing was written")
    raise SyncError(f"this sync would un-watch or move back {len(backward)} items (more "
                    f"than {limit}); nothing was written. Check with -n, then add -y to "
                    "go ahead")


# -- 5. write --------------------------------------------------------------------------------
class Writer:
    """What the write phase's threads share, made before the first write and never
    changed after: the clients, a few slots per server, the stop event, the journal's
    step marks, and the recordings by show (grouped before the pool starts)."""

    def __init__(self, sage: SageClient, plex: PlexClient, stop: threading.Event,
                 index: SageIndex, step_done: Callable[[int, int], None]) -> None:
        self.sage = sage
        self.plex = plex
        self.stop = stop
        self.sage_slots = threading.BoundedSemaphore(sage.server.write_workers)
        self.plex_slots = threading.BoundedSemaphore(plex.server.write_workers)
        index.group_shows()
        self.siblings = index.siblings
        #: (Plex media id, steps done): journalled as each step reaches its server.
        self.step_done = step_done


def not_written(planned: Planned, opts: Options) -> Result | None:
    """The result of an item the run does not write (None: it writes)."""
    if planned.outcome is not Outcome.UNCHANGED or not planned.writes:
        if planned.blocked and planned.outcome is Outcome.UNCHANGED \
                and planned.verdict is not Verdict.IN_SYNC:
            return Result(planned, Outcome.SKIPPED, planned.blocked, planned.notes)
        return result_of(planned)
    if opts.simulate or opts.plan_file is not None:
        return Result(planned, Outcome.SIMULATED, "would " + "; then ".join(
            str(w) for w in planned.writes), planned.notes)
    return None


class WritePhase:
    """Phase 5: carry out the plan. Items that share a SageTV airing or show flag go one
    after the other (a task), independent ones in parallel, a few per server at a time.
    A task is cut into rounds at each SageTV write after its first: between rounds the
    next item is read again and, if an earlier write changed it, decided again (a pure
    step, on this thread): the pool's threads only write."""

    def __init__(self, opts: Options, facts: Facts, state: StateStore | None,
                 console: Console, clients: tuple[SageClient, PlexClient],
                 stop: threading.Event, replaying: bool = False) -> None:
        self.opts = opts
        self.facts = facts
        self.state = state
        self.console = console
        self.clients = clients
        self.stop = stop
        #: The decisions are given (--undo, --apply): checked as a whole before the run.
        self.replaying = replaying
        self.run_id = 0  # the write-ahead journal's run, once begun

    def run(self, plan: Plan) -> list[Result]:
        """The results, in the plan's order."""
        results: list[Result | None] = []
        tasks: dict[object, list[int]] = {}
        for n, planned in enumerate(plan.decided):
            result = not_written(planned, self.opts)
            results.append(result)
            if result is None:
                assert planned.sage is not None
                tasks.setdefault(planned.sage.show_id or planned.sage.media_file_id,
                                 []).append(n)
        if tasks:
            current = list(plan.decided)
            self.journal_intent([current[n] for task in tasks.values() for n in task])
            writer = Writer(*self.clients, self.stop, self.facts.index, self.step_done)
            bar = self.console.bar(sum(len(t) for t in tasks.values()), "writing")
            for n, result in self.rounds(tasks, current, writer, bar):
                results[n] = result
            bar.close()
        assert all(r is not None for r in results)
        return cast("list[Result]", results)

    def rounds(self, tasks: dict[object, list[int]], current: list[Planned], writer: Writer,
               bar: Any) -> Iterator[tuple[int, Result]]:
        queues = {key: collections.deque(_rounds_of(task, current)) for key, task in
                  tasks.items()}
        written: dict[object, list[int]] = {}  # per task: the media files written so far
        while queues:
            chunks = {key: queue.popleft() for key, queue in queues.items()}
            queues = {key: queue for key, queue in queues.items() if queue}
            failed = self.decide_again(chunks, written, current, writer)
            for key, ran in self.run_round(chunks, current, failed, writer, bar).items():
                for n, result, applied in ran:
                    if applied and _writes_sage(result.planned):
                        assert result.sage is not None
                        written.setdefault(key, []).append(result.sage.media_file_id)
                    yield n, result

    def decide_again(self, chunks: dict[object, list[int]], written: dict[object, list[int]],
                     current: list[Planned], writer: Writer) -> dict[int, Result]:
        """Each round's first SageTV write of a task that wrote SageTV before: read again,
        decided again if an earlier write changed it (§4). Returns the items that could
        not be read (failed)."""
        again = [(key, chunks[key][0]) for key in chunks if written.get(key)
                 and _writes_sage(current[chunks[key][0]])]
        if not again:
            return {}
        failed: dict[int, Result] = {}
        with ThreadPoolExecutor(min(len(again), writer.sage.server.write_workers),
                                thread_name_prefix="read-again") as pool:
            reads = list(pool.map(lambda kn: _read_now(writer.sage, current[kn[1]].item),
                                  again))
        for (key, n), fresh in zip(again, reads, strict=True):
            planned = current[n]
            if isinstance(fresh, SyncError):
                failed[n] = Result(planned, Outcome.FAILED,
                                   f"reading it before the write: {fresh}", planned.notes)
                continue
            if self.replaying or self.opts.position_ms is not None:
                continue  # decisions given: checked as a whole before the run (§6.4)
            again_planned = decided_again(planned, *fresh, self.facts, written[key])
            if again_planned is not planned:
                current[n] = again_planned
                self.intend_again(again_planned)
        return failed

    def run_round(self, chunks: dict[object, list[int]], current: list[Planned],
                  failed: dict[int, Result], writer: Writer, bar: Any
                  ) -> dict[object, list[tuple[int, Result, bool]]]:
        def task(chunk: list[int], confirm: bool) -> list[tuple[int, Result, bool]]:
            return [(n, *_write_one(current[n], writer, confirm, self.console, failed.get(n),
                                    bar)) for n in chunk]
        if self.opts.prompt:
            return {key: task(chunk, True) for key, chunk in chunks.items()}
        # A pool per server, for the tasks that begin with its write: a task waiting for
        # one server's slot never holds a thread the other server's tasks could use.
        with ThreadPoolExecutor(writer.sage.server.write_workers,
                                thread_name_prefix="write-sagetv") as sage_pool, \
                ThreadPoolExecutor(writer.plex.server.write_workers,
                                   thread_name_prefix="write-plex") as plex_pool:
            futures = {key: (sage_pool if _starts_on_sage(chunk, current) else plex_pool
                             ).submit(task, chunk, False) for key, chunk in chunks.items()}
            _wait(list(futures.values()), writer.stop, self.console)
            return {key: _settled_task(future, chunks[key], current)
                    for key, future in futures.items()}

    def journal_intent(self, writing: list[Planned]) -> None:
        """The write-ahead journal (§6.3): every intended write, and the side effects
        expected on recordings sharing a show flag, recorded before the first write."""
        if self.state is None:
            return
        keys_by_file: dict[int, list[int]] = collections.defaultdict(list)
        for key, record in self.facts.bases.items():
            keys_by_file[record.media_file_id].append(key)
        rows = {p.plex.rating_key: _journal_row(Result(p), INTENDED) for p in writing}
        for planned in writing:
            if planned.sage is not None and planned.sage.show_id:
                for row in _side_effect_rows(planned, self.facts.index.siblings(planned.sage),
                                             keys_by_file):
                    own = rows.get(row.rating_key)
                    # A sibling with writes of its own: the state the flag can leave it in
                    # is this run's doing too (if the run dies before that item's writes).
                    rows[row.rating_key] = row if own is None else replace(
                        own, own_sage=own.own_sage + row.own_sage)
        self.run_id = self.state.begin_run(self.opts.kind.value, self.opts.argv,
                                           list(rows.values()))

    def intend_again(self, planned: Planned) -> None:
        """An item decided again: its journalled intent follows, with the state an earlier
        write of this run left it in among the run's own (§6.3)."""
        if self.state is not None and self.run_id:
            row = _journal_row(Result(planned), INTENDED)
            row = replace(row, own_sage=row.own_sage + (planned.item.sage_status,))
            self.state.intend_again(self.run_id, row)

    def step_done(self, rating_key: int, steps: int) -> None:
        if self.state is not None and self.run_id:
            self.state.step_done(self.run_id, rating_key, steps)


def _starts_on_sage(chunk: list[int], plan: Sequence[Planned]) -> bool:
    """Whether a round's first write goes to SageTV (an item decided again between
    rounds can have none left)."""
    first = next((plan[n].writes[0] for n in chunk if plan[n].writes), None)
    return first is not None and _is_sage(first)


def _rounds_of(task: list[int], plan: Sequence[Planned]) -> list[list[int]]:
    """A task cut before each SageTV write after its first."""
    rounds: list[list[int]] = [[]]
    wrote = False
    for n in task:
        if _writes_sage(plan[n]):
            if wrote:
                rounds.append([])
            wrote = True
        rounds[-1].append(n)
    return rounds


def _write_one(planned: Planned, writer: Writer, confirm: bool, console: Console,
               failed: Result | None, bar: Any) -> tuple[Result, bool]:
    """One item's writes (on a pool thread): its result, and whether any write was made."""
    try:
        if failed is not None:
            return failed, False
        if writer.stop.is_set():
            return Result(planned, Outcome.SKIPPED, "interrupted before writing", planned.notes,
                          keep_base=True), False
        if not planned.writes:  # decided again on a fresh read: nothing left to do
            return result_of(planned), False
        if confirm and not _confirmed(planned, console, writer.stop):
            return Result(planned, Outcome.SKIPPED, "not confirmed", planned.notes,
                          keep_base=True), False
        result = Applier(writer, planned).apply()
        return result, result.outcome is not Outcome.SKIPPED
    finally:
        bar.update()


def _confirmed(planned: Planned, console: Console, stop: threading.Event) -> bool:
    writes = "; then ".join(str(w) for w in planned.writes)
    try:
        return console.ask(f"[{planned.plex.rating_key}] {planned.plex.title}: {writes}?")
    except (KeyboardInterrupt, EOFError):
        stop.set()
        console.err.write("\n")
        return False


def _wait(futures: list[Future], stop: threading.Event, console: Console) -> None:
    """Wait for the writes; on Ctrl-C (or SIGTERM) say that those started finish. Each
    future counts itself done: polling thousands of futures would take each one's lock
    over and over, and the writes finishing would queue behind it."""
    left = [len(futures)]
    lock = threading.Lock()
    all_done = threading.Event()

    def one_done(_: Future) -> None:
        with lock:
            left[0] -= 1
            if not left[0]:
                all_done.set()
    if not futures:
        return
    for future in futures:
        future.add_done_callback(one_done)
    said = False
    while not all_done.wait(0.2):
        if stop.is_set() and not said:
            said = True
            console.err.write("\nInterrupted: finishing the writes already started "
                              "(nothing new starts)\n")


def _settled_task(future: Future, chunk: list[int], plan: Sequence[Planned]
                  ) -> list[tuple[int, Result, bool]]:
    try:
        return cast("list[tuple[int, Result, bool]]", future.result())
    except Exception as exc:  # a bug must not lose the other items' report
        log.exception("write task")
        return [(n, Result(plan[n], Outcome.FAILED,
                           f"internal error: {exc.__class__.__name__}: {exc}"), True)
                for n in chunk]


def _read_now(sage: SageClient, item: Item) -> tuple[SageItem, Status] | SyncError:
    try:
        return read_sage_now(sage, item)
    except SyncError as exc:
        return exc


def read_sage_now(sage: SageClient, item: Item) -> tuple[SageItem, Status]:
    """The item's SageTV media file read again, and its state seen from the Plex item."""
    assert item.sage is not None
    bounds = item.bounds
    assert bounds is not None
    record = sage.media_file(item.sage.media_file_id, SAGE_FIELDS)
    if record is None:
        raise SageError(f"SageTV no longer has media file {item.sage.media_file_id}")
    fresh = sage_item_from_json(record)
    fresh.segments = item.sage.segments  # read once, before; a fresh read has none
    return fresh, sage_status(fresh, item.segments, bounds)


# -- 6. read back and remember ---------------------------------------------------------------
@dataclass(frozen=True)
class ReadBack:
    """Both servers after the writes: the results with what each side shows now, the
    SageTV media files read again (the written ones and those sharing a written show
    flag), as they were before the writes too, and the Plex items read again."""

    results: list[Result]
    sage_now: Mapping[int, SageItem]
    sage_before: Mapping[int, dict]
    plex_now: Mapping[int, PlexItem]


def read_back(results: list[Result], facts: Facts, sage: SageClient, plex: PlexClient
              ) -> ReadBack:
    """Read back the written items (and the recordings sharing a written show flag); an
    item that cannot be read back has failed."""
    written = [n for n, r in enumerate(results) if r.outcome in (Outcome.UPDATED,
                                                                 Outcome.FAILED)]
    sage_now, reread = _sage_read_back([results[n] for n in written], facts)
    sage_before = {i: facts.index.items[i].raw() for i in reread if i in facts.index.items}
    for media_file_id, item_or_error in read_sage_again(sage, reread).items():
        if isinstance(item_or_error, SyncError):
            _fail_unread(results, written, item_or_error, sage_ids={media_file_id})
            continue
        old = facts.index.items.get(media_file_id)
        if old is not None and item_or_error.segments is None:
            item_or_error.segments = old.segments  # read once, before the writes
        sage_now[media_file_id] = item_or_error
    plex_keys = [results[n].plex.rating_key for n in written
                 if any(not _is_sage(w) for w in results[n].writes)]
    plex_now: dict[int, PlexItem] = {}
    try:
        elements = plex.metadata(plex_keys)
    except SyncError as exc:
        _fail_unread(results, written, exc, sage_ids=None)
        elements = []
    for element in elements:
        with contextlib.suppress(PlexError):
            item = plex_item_from_element(element)
            plex_now[item.rating_key] = item
    results = [read_after(r, sage_now, plex_now) if r.matched else r for r in results]
    return ReadBack(results, sage_now, sage_before, plex_now)


def _sage_read_back(written: list[Result], facts: Facts) -> tuple[dict[int, SageItem], set[int]]:
    """The media files whose read-back after the write is final (nothing else wrote to
    them), and those to read again (siblings of a written show flag; twins written)."""
    final: dict[int, SageItem] = {}
    reread: set[int] = set()
    sage_written = [r for r in written if r.sage is not None and _writes_sage(r.planned)]
    writers = collections.Counter(r.sage.media_file_id for r in sage_written
                                  if r.sage is not None)
    for result in sage_written:
        assert result.sage is not None
        siblings = facts.index.siblings(result.sage)
        reread.update(s.media_file_id for s in siblings)
        if siblings or result.sage_after_item is None or \
                writers[result.sage.media_file_id] > 1:
            reread.add(result.sage.media_file_id)
        else:
            final[result.sage.media_file_id] = result.sage_after_item
    return final, reread


def read_sage_again(sage: SageClient, ids: set[int]) -> dict[int, SageItem | SyncError]:
    """The media files by id, read again (one listing when there are many), or the error
    that kept one from being read."""
    found: dict[int, SageItem | SyncError] = {}
    if len(ids) > SAGE_REREAD_LISTING_ABOVE:
        try:
            records = [r for r in sage.media_files(
                SAGE_FIELDS, lambda r: r if r.get("MediaFileID") in ids else None)
                if r is not None]
        except SyncError as exc:
            return dict.fromkeys(ids, exc)
    else:
        records = []
        for media_file_id in sorted(ids):
            try:
                record = sage.media_file(media_file_id, SAGE_FIELDS)
            except SyncError as exc:
                found[media_file_id] = exc
                continue
            if record is not None:
                records.append(record)
    for record in records:
        try:
            item = sage_item_from_json(record)
        except SageError as exc:
            log.warning("SageTV record skipped on reading back: %s", exc)
            continue
        found[item.media_file_id] = item
    return found


def _fail_unread(results: list[Result], written: list[int], exc: SyncError, *,
                 sage_ids: set[int] | None) -> None:
    """The written items that could not be read back have failed: those with SageTV
    writes to ``sage_ids``, or (None) those with Plex writes."""
    for n in written:
        result = results[n]
        if result.outcome is not Outcome.UPDATED or result.sage is None:
            continue
        plex_failed = sage_ids is None and any(not _is_sage(w) for w in result.writes)
        sage_failed = sage_ids is not None and result.sage.media_file_id in sage_ids \
            and _writes_sage(result.planned)
        if plex_failed or sage_failed:
            results[n] = result._replace(outcome=Outcome.FAILED, detail=result.detail
                                         + f"; reading it back failed: {exc}")


def read_after(result: Result, sage_now: Mapping[int, SageItem],
               plex_now: Mapping[int, PlexItem]) -> Result:
    """Both sides as they are after the writes; a Plex write that did not take has
    failed, one the server took its own way is reported once (the base keeps it)."""
    item = result.item
    assert item.sage is not None
    fresh_sage = sage_now.get(item.sage.media_file_id)
    plex_item = plex_now.get(item.plex.rating_key)
    if fresh_sage is None and plex_item is None:
        return result
    bounds = item.bounds
    assert bounds is not None
    if fresh_sage is not None:
        result = result._replace(sage_after=sage_status(fresh_sage, item.segments, bounds),
                                 sage_after_item=fresh_sage)
    if plex_item is None:
        return result
    plex_after = classify(plex_item.watched, plex_item.position_ms, bounds, is_sage=False)
    result = result._replace(plex_after_item=plex_item, plex_after=plex_after)
    write = next((w for w in reversed(result.writes) if not _is_sage(w)), None)
    if result.outcome is not Outcome.UPDATED or write is None \
            or plex_after == result.decision.to_plex:
        return result
    note = _plex_took_it_its_way(cast(PlexWrite, write), item.plex, plex_item)
    if note:
        return result._replace(notes=result.notes + (note,))
    return result._replace(outcome=Outcome.FAILED, detail=result.detail
                           + f"; Plex accepted the write but the item is {plex_after}")


def _plex_took_it_its_way(write: PlexWrite, before: PlexItem, after: PlexItem) -> str:
    """What the server made of a write that took, where it differs from what was asked
    (the references do not say what a server does there); '' when it did not take."""
    if isinstance(write, PlexMarkWatched) and after.view_count > before.view_count:
        return (f"Plex counts it watched and kept its resume point at "
                f"{format_hms(after.position_ms)} (this server's scrobble keeps it)")
    if isinstance(write, PlexSetPosition) and after.watched and not after.position_ms:
        return "Plex counted the position as played"
    return ""


def remember(state: StateStore, run_id: int, opts: Options, facts: Facts, plan: Plan,
             after: ReadBack, *, counts: dict[str, Any] | None = None,
             undoes: int | None = None) -> int:
    """Record the new base of every item the run read, of the items outside it that its
    writes changed (§6.2), and the journal of its writes, in one transaction."""
    written = [r for r in after.results if r.outcome in (Outcome.UPDATED, Outcome.FAILED)]
    # The bases are made as they are stored: a big library's never sit in memory whole.
    bases = itertools.chain(
        ((r.plex.rating_key, record) for r in after.results
         if r.matched and (record := _base_record(r)) is not None),
        ((item.plex.rating_key, _quiet_base(item, after.sage_now)) for item in plan.quiet),
        side_effect_bases(facts, plan, after))
    return state.finish_run(run_id, opts.kind.value, opts.argv, bases,
                            [_journal_row(r) for r in written], counts=counts,
                            undoes=undoes if opts.kind is RunKind.UNDO else None)


def side_effect_bases(facts: Facts, plan: Plan, after: ReadBack
                      ) -> Iterator[tuple[int, BaseRecord]]:
    """§6.2: the bases of items outside the run's scope that its writes changed (a
    recording sharing a written show flag): their SageTV side as read back, their Plex
    side as it was, so the next sync never takes the change for the user's."""
    in_run = {item.plex.rating_key for item in facts.items}
    for key, record in facts.bases.items():
        before = after.sage_before.get(record.media_file_id)
        if key in in_run or not record.known or before is None:
            continue
        now = after.sage_now.get(record.media_file_id)
        # Only the writes' doing is taken in: a recording the user changed since its base
        # keeps the base, so the user's change is still seen as theirs.
        if now is None or _same_watch(now.raw(), before) \
                or not _same_watch(before, record.sage_raw):
            continue
        sage = WATCHED if now.watched else record.sage if now.watched_end_ms else NOT_WATCHED
        yield key, replace(record, sage=sage, sage_raw=now.raw(), pending=None)


def _same_watch(raw: dict, other: dict) -> bool:
    """Two SageTV records of one file show the same watch record."""
    return all(raw.get(k) == other.get(k) for k in ("IsWatched", "WatchedEndTime",
                                                     "RealWatchedEndTime"))


def _quiet_base(item: Item, sage_now: Mapping[int, SageItem]) -> BaseRecord:
    """The base of an item the run did not write: both sides as read, SageTV's as read
    back where a write to a recording sharing its show flag changed it."""
    assert item.sage is not None
    sage, sage_state = item.sage, item.sage_status
    fresh = sage_now.get(sage.media_file_id)
    if fresh is not None:
        bounds = item.bounds
        assert bounds is not None
        sage, sage_state = fresh, sage_status(fresh, item.segments, bounds)
    return BaseRecord(item.sage.media_file_id, _item_file_name(item), sage_state,
                      item.plex_status, sage.raw(), item.plex.raw())


def _base_record(result: Result) -> BaseRecord | None:
    """The item's new base: what the servers show after the run; a failed item keeps its
    old base with its decision pending (taken on the raw values read), a skipped one its
    old base."""
    item = result.item
    assert item.sage is not None
    name = _item_file_name(item)
    if result.outcome is Outcome.FAILED:
        old = item.base_record
        own_sage, own_plex = own_states(result.planned)
        sage_read, plex_read = result.sage_after_item, result.plex_after_item
        if result.sage_after not in (None, item.sage_status, *own_sage) and (
                sage_read is None or sage_read.real_end_ms <= item.sage.real_end_ms):
            # SageTV changed with no watch record of its own: a shared show flag's side
            # effect of the run's writes, the run's doing (§6.3). A new watch record in a
            # state none of the steps leaves is the user's viewing during the run.
            own_sage += (cast(Status, result.sage_after),)
        # The read-back shows the last stamp the run's steps left: a viewing after it is
        # the user's even in a state those steps can have left.
        pending = Pending(result.decision.to_sage, result.decision.to_plex, item.sage.raw(),
                          item.plex.raw(), own_sage, own_plex,
                          known=old is not None and old.known,
                          own_sage_until_ms=sage_read.real_end_ms if sage_read else None,
                          own_plex_until_ms=plex_read.last_viewed_ms if plex_read else None)
        if old is None or not old.known:
            return BaseRecord(item.sage.media_file_id, name, item.sage_status,
                              item.plex_status, item.sage.raw(), item.plex.raw(), pending,
                              known=False)
        return replace(old, pending=pending)
    if result.keep_base:
        return None
    sage = result.sage_after if result.sage_after is not None else item.sage_status
    plex = result.plex_after if result.plex_after is not None else item.plex_status
    sage_item = result.sage_after_item or item.sage
    plex_item = result.plex_after_item or item.plex
    return BaseRecord(item.sage.media_file_id, name, sage, plex, sage_item.raw(),
                      plex_item.raw())


def _journal_row(result: Result, outcome: str = "") -> JournalRow:
    """The item's journal row: before the writes (outcome "intended") or after them."""
    decision = result.decision
    before = result.planned.read_as or result.item  # as the run found it
    assert before.sage is not None
    own_sage, own_plex = own_states(result.planned)
    after_sage = result.sage_after_item
    after_plex = result.plex_after_item
    return JournalRow(
        0, before.plex.rating_key, before.sage.media_file_id, before.plex.title,
        decision.rule, "; ".join(str(w) for w in result.writes), before.sage_status,
        before.plex_status, result.sage_after, result.plex_after,
        outcome or result.outcome.value, result.detail, decision.to_sage,
        decision.to_plex, before.sage.raw(), before.plex.raw(),
        after_sage.raw() if after_sage is not None else {},
        after_plex.raw() if after_plex is not None else {}, result.steps_done,
        own_sage, own_plex)


def _side_effect_rows(planned: Planned, siblings: list[SageItem],
                      keys_by_file: Mapping[int, list[int]]) -> list[JournalRow]:
    """The changes an item's SetWatched or ClearWatched will make to recordings sharing
    its show flag, journalled with it: if the run dies, they are the tool's doing."""
    write = next((w for w in planned.writes if isinstance(w, (SageMarkWatched, SageClearWatched))
                  or (isinstance(w, SageSetPosition) and w.clear_first)), None)
    if write is None:
        return []
    state = WATCHED if isinstance(write, SageMarkWatched) else NOT_WATCHED
    media_file_id = planned.sage.media_file_id if planned.sage else 0
    rows = []
    for sibling in siblings:
        for key in keys_by_file.get(sibling.media_file_id, ()):
            rows.append(JournalRow(
                0, key, sibling.media_file_id, "", f"side effect of media file "
                f"{media_file_id}'s {write}", "", NOT_WATCHED, NOT_WATCHED, None, None,
                INTENDED, "", None, None, sibling.raw(), {}, own_sage=(state,)))
    return rows


###############################################################################
# The applier: the only code that writes, one item at a time ##################
###############################################################################


class Applier:
    """The only code that writes: one item's writes, on one thread, into its Result.
    Every SageTV write is read back, because sagex answers the same `{}` whether a write
    worked or did nothing."""

    def __init__(self, writer: Writer, planned: Planned) -> None:
        self.writer = writer
        self.planned = planned
        self.item = planned.item
        self.sage = writer.sage
        self.plex = writer.plex
        self.steps_done = 0
        #: The last read-back of a SageTV write: what the write left.
        self.sage_after: SageItem | None = None

    def apply(self) -> Result:
        """Do the item's writes; failures stay with the item."""
        done: list[str] = []
        for write in self.planned.writes:
            slots = self.writer.sage_slots if _is_sage(write) else self.writer.plex_slots
            try:
                with slots:
                    if not done and self.writer.stop.is_set():
                        # Stopped while waiting for a free slot: nothing of it was written.
                        return Result(self.planned, Outcome.SKIPPED, "interrupted before "
                                      "writing", self.planned.notes, keep_base=True)
                    note = self.one_write(write)
            except SyncError as exc:
                restored = self._restore_plex(write, done)
                return self.result(Outcome.FAILED, done + [f"{write}: {exc}"] + restored)
            self.steps_done += 1
            self.writer.step_done(self.item.plex.rating_key, self.steps_done)
            done.append(str(write) + (f" ({note})" if note else ""))
        return self.result(Outcome.UPDATED, done)

    def result(self, outcome: Outcome, details: list[str]) -> Result:
        return Result(self.planned, outcome, "; ".join(details), self.planned.notes,
                      steps_done=self.steps_done, sage_after_item=self.sage_after)

    def _restore_plex(self, failed: Write, done: list[str]) -> list[str]:
        """A Plex write that failed after an un-watch of this item's own: put back the
        resume point the un-watch cleared (§6.3), so the item is never left with less."""
        before = self.item.plex
        if _is_sage(failed) or not done or not any(
                isinstance(w, PlexMarkUnwatched) for w in self.planned.writes) \
                or before.position_ms <= PLEX_MIN_PROGRESS_MS:
            return []
        try:
            with self.writer.plex_slots:
                self.plex.set_position(before.rating_key, before.position_ms,
                                       before.duration_ms or before.position_ms + 1)
        except SyncError as exc:
            return [f"putting back Plex's position {format_hms(before.position_ms)} failed "
                    f"too: {exc}"]
        return [f"Plex's position {format_hms(before.position_ms)} put back"]

    def one_write(self, write: Write) -> str:
        if isinstance(write, (SageMarkWatched, SageClearWatched, SageSetPosition)):
            return self.sage_write(write)
        return self.plex_write(write)

    def plex_write(self, write: PlexWrite) -> str:
        key = self.item.plex.rating_key
        if isinstance(write, PlexMarkWatched):
            self.plex.mark_watched(key)
        elif isinstance(write, PlexMarkUnwatched):
            self.plex.mark_unwatched(key)
        else:
            bounds = self.item.bounds
            assert bounds is not None
            self.plex.set_position(key, write.position_ms,
                                   self.item.plex.duration_ms or bounds.duration_ms)
        return ""

    def sage_write(self, write: SageWrite) -> str:
        sage = self.item.sage
        assert sage is not None
        if isinstance(write, SageMarkWatched):
            error = _attempt(lambda: self.sage.set_watched(sage.airing_id))
            return self._expect(WATCHED, error, "SetWatched")
        if isinstance(write, SageClearWatched):
            error = _attempt(lambda: self.sage.clear_watched(sage.airing_id))
            return self._expect(NOT_WATCHED, error, "ClearWatched", restore=True)
        return self.set_position(write)

    def _now(self) -> tuple[SageItem, Status]:
        fresh, now = read_sage_now(self.sage, self.item)
        self.sage_after = fresh  # the last read-back is what the write left
        return fresh, now

    def _expect(self, intended: Status, error: str, call: str, restore: bool = False) -> str:
        fresh, now = self._now()
        if now == intended:
            return self._siblings_note(fresh, call)
        reason = error or (f"SageTV accepted {call} but the item is still {now}"
                           if now == self.item.sage_status else
                           f"SageTV accepted {call} but the item is {now}, not {intended}")
        if restore and self._less_watched(now):
            reason += f"; {self._restore()}"
        raise SageError(reason)

    def set_position(self, write: SageSetPosition) -> str:
        """ClearWatched (if needed), then SetWatchedTimes, then read back; if the position
        did not take but the clear did, restore what was there: an item is never left
        less watched than it was."""
        sage = self.item.sage
        assert sage is not None
        sage_offset = self.sage.clock_offset_ms
        viewed_at = (write.viewed_at_ms + sage_offset if write.viewed_at_ms > 0
                     else self.sage.now_ms())
        real_start = max(1, viewed_at - write.position_ms)
        error = ""
        if write.clear_first:
            error = _attempt(lambda: self.sage.clear_watched(sage.airing_id))
        if not error:
            error = _attempt(lambda: self.sage.set_watched_times(sage.airing_id, write.time_ms,
                                                                 real_start))
        intended = classify_position(write.position_ms, self.item)
        fresh, now = self._now()
        if now == intended:
            return self._siblings_note(fresh, "ClearWatched") if write.clear_first else ""
        reason = error or f"SageTV accepted the write but the item is {now}, not {intended}"
        if self._less_watched(now):
            reason += f"; {self._restore()}"
        raise SageError(reason)

    def _less_watched(self, now: Status) -> bool:
        return moves_back(self.item.sage_status, now)

    def _restore(self) -> str:
        sage = self.item.sage
        assert sage is not None
        if sage.watched:
            _attempt(lambda: self.sage.set_watched(sage.airing_id))
        elif sage.watched_end_ms > 0:
            real_start = sage.real_start_ms or max(1, self.sage.now_ms())
            _attempt(lambda: self.sage.set_watched_times(sage.airing_id, sage.watched_end_ms,
                                                         real_start))
        try:
            _, again = self._now()
        except SyncError:
            return "could not read it back after restoring what SageTV had"
        if not self._less_watched(again):
            return "restored what SageTV had"
        return f"restoring failed too: it was {self.item.sage_status} before this run"

    def _siblings_note(self, fresh: SageItem, call: str) -> str:
        """SageTV keeps one watched flag per show: say which other recordings the write
        changed too (read back after the writes and taken as the servers' truth)."""
        siblings = self.writer.siblings(fresh)
        if not siblings:
            return ""
        if call == "SetWatched":
            affected = [s for s in siblings if not s.watched]
            verb = "re-watched"
        else:
            affected = [s for s in siblings if s.watched and not s.watched_completely]
            verb = "un-watched"
        if not affected:
            return ""
        ids = ", ".join(str(s.media_file_id) for s in affected[:5])
        return f"SageTV's {call} also {verb} media file {ids} (same show)"


def _attempt(call: Callable[[], None]) -> str:
    """Run a write whose effect is judged by reading back: its error, or ''."""
    try:
        call()
    except SyncError as exc:
        return str(exc)
    return ""


@contextlib.contextmanager
def _collector_paused() -> Iterator[Callable[[], None]]:
    """The cyclic garbage collector paused while a run reads and plans: that builds a
    hundred thousand long-lived objects and no garbage cycles, and each collection would
    scan them all again (a third of a 100,000-item check). The block calls the function
    it is given once the plan is made: the collector runs again for the writes, with
    what was read set aside (frozen) so that it is not scanned either."""
    enabled = gc.isenabled()
    frozen = False

    def planned() -> None:
        nonlocal frozen
        if enabled and not frozen:
            frozen = True
            gc.freeze()
            gc.enable()

    gc.disable()
    try:
        yield planned
    finally:
        if frozen:
            gc.unfreeze()
        if enabled:
            gc.enable()


def resolve_sections(ids: list[str], sections: list[PlexSection], *, video_only: bool = True
                     ) -> list[PlexSection]:
    """Section ids, names (any case) and 'all', in the order given, without repeats."""
    listing = ", ".join(f"{s.key} ({s.title})" for s in sections) or "none"
    chosen: dict[int, PlexSection] = {}
    for wanted in ids:
        if wanted.lower() == "all":
            chosen.update((s.key, s) for s in sections
                          if s.type in VIDEO_SECTION_TYPES or not video_only)
            continue
        match = [s for s in sections if (ASCII_ID.match(wanted) and s.key == int(wanted))
                 or s.title.lower() == wanted.lower()]
        if not match:
            raise UsageError(f"Plex has no library section {wanted!r}; sections are: {listing}")
        if len(match) > 1:
            raise UsageError(f"two Plex sections are named {wanted!r} ("
                             + ", ".join(f"id {s.key}" for s in match)
                             + "); give the section's id instead")
        section = match[0]
        if video_only and section.type not in VIDEO_SECTION_TYPES:
            raise UsageError(f"section {section.key} ({section.title}) is a {section.type} "
                             "library; only movie and show sections can be synced")
        chosen[section.key] = section
    return list(chosen.values())


###############################################################################
# The report: one line per item that matters, a summary, or JSON #############
###############################################################################


def _side_json(status: Status, last_ms: int) -> dict[str, Any]:
    return {"state": status.kind.name.lower(), "position_ms": status.position_ms,
            "last_watched": (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last_ms / 1000))
                             if last_ms > 0 else None)}


def entry_label(entry: Result) -> str:
    """The verdict in the item's line: what happened, else what is out of sync."""
    if not entry.matched:
        return "ambiguous in SageTV" if entry.item.candidates > 1 else (
            "skipped" if entry.item.unreadable else "not in SageTV")
    if entry.outcome is not Outcome.UNCHANGED:
        return entry.outcome.value
    return entry.verdict.value


def entry_reason(entry: Result) -> str:
    """Why, in words: the rule that fired and what it does (or did)."""
    if not entry.matched:
        return entry.item.unreadable or entry.detail
    decision = entry.decision
    if entry.outcome is not Outcome.UNCHANGED:
        return f"{decision.rule}: {entry.detail}" if entry.detail else decision.rule
    if entry.writes:
        return f"{decision.rule}: " + "; then ".join(str(w) for w in entry.writes)
    if entry.planned.blocked:
        return f"{decision.rule}: {entry.planned.blocked}"
    return decision.rule if entry.verdict is not Verdict.IN_SYNC else ""


def season_heading(plex: PlexItem) -> str:
    """Above a season's episodes: the ids that -m takes for the whole show or season."""
    season = f"season {plex.season}" if plex.season is not None else "season"
    return f"== {plex.show}, {season} (-m {plex.show_key} for the show, " \
        f"{plex.season_key} for the season)"


def item_line(entry: Result) -> str:
    head = f"{entry.plex.rating_key:>7}  {entry.plex.title}  [{entry_label(entry)}]"
    if not entry.matched:
        reason = entry_reason(entry)
        return head + (f"  {reason}" if reason else "")
    if entry.verdict is Verdict.IN_SYNC and entry.outcome is Outcome.UNCHANGED:
        return head
    line = f"{head}  SageTV {entry.sage_status}, Plex {entry.plex_status}"
    reason = entry_reason(entry)
    line += f": {reason}" if reason else ""
    return line + "".join(f"; {note}" for note in entry.notes if note)


def entry_json(entry: Result) -> dict[str, Any]:
    plex = entry.plex
    return {
        "media_id": plex.rating_key, "title": plex.title, "show": plex.show or None,
        "show_id": plex.show_key or None, "season": plex.season,
        "season_id": plex.season_key or None, "episode": plex.episode,
        "media_file_id": entry.sage.media_file_id if entry.sage is not None else None,
        "sage": _side_json(entry.sage_status, entry.item.sage_last_ms) if entry.matched else None,
        "plex": _side_json(entry.plex_status, entry.item.plex_last_ms) if entry.matched else None,
        "verdict": entry_label(entry) if not entry.matched else entry.verdict.value,
        "rule": entry.decision.rule if entry.matched else None,
        "action": [str(w) for w in entry.writes],
        "outcome": entry.outcome.value, "detail": entry_reason(entry),
    }


def sage_only_items(index: SageIndex, items: Iterable[Item]) -> list[SageItem]:
    """The SageTV recordings no Plex item of the run holds (a file two Plex items could
    mean, ambiguous, counts as held), by media file id."""
    held: set[int] = set()
    for item in items:
        if item.sage is not None:
            held.add(item.sage.media_file_id)
        elif item.candidates > 1:
            held.update(m.media_file_id for m in index.match(item.plex))
    return [index.items[i] for i in sorted(index.items) if i not in held]


def sage_only_line(item: SageItem) -> str:
    name = file_name(item.paths[0]) if item.paths else f"airing {item.airing_id}"
    return f"{item.media_file_id:>7}  {name}  [not in Plex]"


#: A heading lists every item up to LIST_ALL_UP_TO of them; above, the first LIST_FIRST and
#: a count (--all-items lists all; the log file has a line for every item written).
LIST_ALL_UP_TO = 15
LIST_FIRST = 10


class Heading(NamedTuple):
    key: str
    text: str
    change: bool  # shown by -q: a change made (or to make), or a failure
    recurring: bool = False  # in every run with nothing to do: listed when new
    note: str = ""  # what the items are, after the count


#: The report's headings in order; every item is under exactly one (heading_key).
HEADINGS = (
    Heading("updated_plex", "Updated on Plex", True),
    Heading("updated_sage", "Updated on SageTV", True),
    Heading("updated_both", "Updated on both", True),
    Heading("plex_out", "PLEX out of sync", True),
    Heading("sage_out", "SageTV out of sync", True),
    Heading("both_out", "Out of sync on both", True),
    Heading("skipped", "Skipped", False),
    Heading("failed", "Failed", True),
    Heading("settled", "Different, left as is", False, recurring=True,
            note="neither side changed since the last sync"),
    Heading("not_in_sage", "Not in SageTV", False, recurring=True,
            note="Plex items whose file SageTV does not have"),
    Heading("sage_only", "Not in Plex", False, recurring=True,
            note="SageTV recordings, by media file id, that no Plex item holds"),
    Heading("ambiguous", "Ambiguous in SageTV", False, recurring=True,
            note="the same file name twice"),
    Heading("unreadable", "Unreadable", True),
    Heading("in_sync", "In sync", False),
)
_VERDICT_HEADING = {Verdict.IN_SYNC: "in_sync", Verdict.PLEX_OUT_OF_SYNC: "plex_out",
                    Verdict.SAGE_OUT_OF_SYNC: "sage_out", Verdict.BOTH_OUT_OF_SYNC: "both_out",
                    Verdict.SETTLED: "settled"}
#: The recurring kinds whose ids (Plex media ids; media file ids for sage_only) the state
#: keeps, to tell the new ones.
RECURRING = tuple(h.key for h in HEADINGS if h.recurring)


def heading_key(entry: Result) -> str:
    """The one heading an item is listed under: what happened to it, else what it is."""
    if not entry.matched:
        if entry.item.candidates > 1:
            return "ambiguous"
        return "unreadable" if entry.item.unreadable else "not_in_sage"
    if entry.outcome is Outcome.UPDATED:
        sides = {_is_sage(w) for w in entry.writes}
        return "updated_both" if len(sides) == 2 else \
            "updated_sage" if sides == {True} else "updated_plex"
    if entry.outcome in (Outcome.FAILED, Outcome.SKIPPED):
        return entry.outcome.value
    return _VERDICT_HEADING[entry.verdict]


#: The total's parts: the videos' kinds (they add up to the videos), then what was done.
TOTAL_WORDS = (("in_sync", "in-sync"), ("plex_out_of_sync", "PLEX out-of-sync"),
               ("sage_out_of_sync", "SageTV out-of-sync"),
               ("both_out_of_sync", "out-of-sync on both"), ("settled", "left as is"),
               ("not_in_sage", "not in SageTV"), ("ambiguous", "ambiguous in SageTV"),
               ("unreadable", "unreadable"), ("updated", "updated"),
               ("simulated", "simulated"), ("skipped", "skipped"), ("failed", "failed"))


def counts_words(counts: dict[str, int]) -> str:
    videos = counts.get("videos", 0)
    parts = [f"{videos} video{'s' if videos != 1 else ''}"]
    parts += [f"{counts[key]} {words}" for key, words in TOTAL_WORDS if counts.get(key)]
    return ", ".join(parts)


def sage_only_words(count: int) -> str:
    return f"{count} SageTV recording{'s' if count != 1 else ''} not in Plex"


@dataclass
class Report:
    """The run's counts and the items under headings that say what happened to them,
    made from the run's values: ``results``, the decided items' results, and ``quiet``,
    the items in sync with nothing decided, each in listing order. ``sage_only``: the
    SageTV recordings no Plex item holds (None: not known, in a run of some sections or
    media ids); ``listed_before``: the recurring ids the last sync counted, by kind
    (None: none known, so every one is new)."""

    results: Sequence[Result]
    wrote: bool
    quiet: Sequence[Item] = ()
    unreadable_sage: int = 0
    interrupted: bool = False
    sage_only: list[SageItem] | None = None
    listed_before: dict[str, set[int]] | None = None

    def __post_init__(self) -> None:
        self._notable: list[Result] | None = None
        self._groups: dict[str, list[Result]] | None = None
        self._counts: dict[str, int] | None = None

    def every(self) -> Iterator[Result]:
        """Every item's result, in listing order."""
        return heapq.merge(self.results, map(quiet_result, self.quiet),
                           key=lambda r: r.item.order)

    def notable(self) -> list[Result]:
        """The items the default report lists: all but those in sync and left unchanged."""
        if self._notable is None:
            self._notable = [r for r in self.results if not r.matched
                             or r.planned.decision.verdict is not Verdict.IN_SYNC
                             or r.outcome is not Outcome.UNCHANGED]
        return self._notable

    def groups(self) -> dict[str, list[Result]]:
        """The notable items by heading key, each in one group, in listing order."""
        if self._groups is None:
            self._groups = collections.defaultdict(list)
            for entry in self.notable():
                self._groups[heading_key(entry)].append(entry)
        return self._groups

    def is_new(self, kind: str, key: int) -> bool:
        return self.listed_before is None or key not in self.listed_before.get(kind, set())

    def counts(self) -> dict[str, int]:
        if self._counts is None:
            self._counts = self._counted()
        return self._counts

    def _counted(self) -> dict[str, int]:
        found: collections.Counter[object] = collections.Counter()
        notable = self.notable()
        for entry in notable:
            if not entry.matched:
                found["ambiguous" if entry.item.candidates > 1 else
                      "unreadable" if entry.item.unreadable else "not_in_sage"] += 1
                continue
            found[entry.decision.verdict] += 1
            found[entry.outcome] += 1
        videos = len(self.results) + len(self.quiet)
        named: collections.Counter[str] = collections.Counter(videos=videos)
        quiet = videos - len(notable)  # in sync and unchanged
        named.update(in_sync=quiet, unchanged=quiet)
        for key, count in found.items():
            named[key.name.lower() if isinstance(key, Enum) else str(key)] += count
        named["sage_only"] = len(self.sage_only or ())
        return named

    def total_line(self) -> str:
        """Every kind counted: the videos' parts add up to the videos; what was done to them
        and the SageTV recordings Plex does not hold follow."""
        counts = self.counts()
        line = "Total: " + counts_words(counts)
        if counts["sage_only"]:  # none: not said (and not known for a part of the library)
            line += "; " + sage_only_words(counts["sage_only"])
        return line + "."

    def section(self, heading: Heading, every_item: bool) -> list[str]:
        """One heading and its items ([] when it has none to list); a recurring kind lists
        only the items new since the last sync unless every item is asked for."""
        items: list[Any] = self.items_under(heading.key, every_item)
        count = f"{len(items)}"
        if heading.recurring:
            new = [i for i in items if self.is_new(heading.key, _item_id(i))]
            count += f", {len(new)} new since the last sync" if len(new) < len(items) else ""
            items = items if every_item else new
        if not items:
            return []
        shown = items if every_item or len(items) <= LIST_ALL_UP_TO else items[:LIST_FIRST]
        note = f"; {heading.note}" if heading.note else ""
        lines = ["", f"{heading.text} ({count}{note}):"] + item_lines(shown)
        if len(shown) < len(items):
            lines.append(f"   ... and {len(items) - len(shown)} more (--all-items lists every "
                         "item; the log file has a line for every item written)")
        return lines

    def items_under(self, key: str, every_item: bool) -> list[Any]:
        if key == "sage_only":
            return list(self.sage_only or ())
        if key == "in_sync" and every_item:
            return [r for r in self.every() if heading_key(r) == "in_sync"]
        return self.groups().get(key, [])

    def body(self, every_item: bool, quiet: bool) -> list[str]:
        """The headings with their items, then the notes and the total."""
        lines: list[str] = []
        for heading in HEADINGS:
            if (heading.key != "in_sync" or every_item) and (heading.change or not quiet):
                lines += self.section(heading, every_item)
        if self.unreadable_sage:
            lines += ["", f"{self.unreadable_sage} SageTV record(s) could not be read "
                          "(see the log)."]
        if self.interrupted:
            lines += ["", "Interrupted: the summary covers the items done so far."]
        return lines + ["", self.total_line()]

    def nothing_to_say(self) -> bool:
        """No change made or to make, no failure: what -q prints nothing for."""
        groups = self.groups()
        return self.exit_code() is ExitCode.OK and not any(
            groups.get(h.key) for h in HEADINGS if h.change)

    def error_message(self) -> str:
        """Why the run did not end well, in one line ('' when it did)."""
        counts = self.counts()
        problems = []
        if counts["failed"]:
            failed = self.groups().get("failed", [])
            names = "; ".join(f"[{e.plex.rating_key}] {e.plex.title}: {entry_reason(e)}"
                              for e in failed[:3])
            more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
            problems.append(f"{counts['failed']} item(s) failed ({names}{more})")
        if counts["unreadable"]:
            problems.append(f"{counts['unreadable']} Plex item(s) could not be read")
        if self.unreadable_sage:
            problems.append(f"{self.unreadable_sage} SageTV record(s) could not be read")
        return "; ".join(problems) + ("; see the report above" if problems else "")

    #: Every key of the JSON summary, present (0 when none) so that scripts can rely on it.
    JSON_COUNTS = ("videos", "in_sync", "plex_out_of_sync", "sage_out_of_sync",
                   "both_out_of_sync", "settled", "not_in_sage", "ambiguous", "unreadable",
                   "unchanged", "updated", "simulated", "skipped", "failed", "sage_only")

    def json_summary(self) -> dict[str, Any]:
        counts = self.counts()
        return {"summary": {key: counts[key] for key in self.JSON_COUNTS},
                "error": self.error_message() or None, "exit_code": int(self.exit_code())}

    def exit_code(self) -> ExitCode:
        if self.interrupted:
            return ExitCode.INTERRUPTED
        broken = any(e.outcome is Outcome.FAILED or (e.item.unreadable and not e.matched)
                     for e in self.notable())
        return ExitCode.FAILED if broken or self.unreadable_sage else ExitCode.OK


def _item_id(item: Result | SageItem) -> int:
    """The id a recurring item is known by: its Plex media id, or its media file id."""
    return item.media_file_id if isinstance(item, SageItem) else item.plex.rating_key


def item_lines(items: Sequence[Result | SageItem]) -> list[str]:
    """Item lines, each season's episodes under a line naming the season."""
    lines = []
    heading: tuple[int, int] = (0, 0)
    for item in items:
        if isinstance(item, SageItem):
            lines.append(sage_only_line(item))
            continue
        plex = item.plex
        if plex.is_episode and (plex.show_key, plex.season_key) != heading:
            heading = (plex.show_key, plex.season_key)
            lines.append(season_heading(plex))
        lines.append(item_line(item))
    return lines


def log_written(entries: Iterable[Result]) -> None:
    """One dated log line for every item written (without -v): what, and by which rule."""
    for entry in entries:
        if entry.outcome in (Outcome.UPDATED, Outcome.FAILED):
            failed = entry.outcome is Outcome.FAILED
            more = ([entry.detail] if failed and entry.detail else []) + list(entry.notes)
            log.log(logging.WARNING if failed else logging.INFO,
                    "%s [%d] %s (media file %s): %s (%s)%s", entry.outcome.value,
                    entry.plex.rating_key, entry.plex.title,
                    entry.sage.media_file_id if entry.sage is not None else "-",
                    "; then ".join(str(w) for w in entry.writes) or "nothing",
                    entry.decision.rule, "".join(f"; {m}" for m in more if m))


def run_words(opts: Options) -> str:
    """What a run does, in words, for its dated line: kind, then sections or ids."""
    if opts.kind is RunKind.UNDO:
        return (f"undo of run {opts.undo_run}" if opts.undo_run is not None
                else "undo of the last sync")
    if opts.kind is RunKind.APPLY:
        return f"apply of the plan {opts.apply_file}"
    kind = (f"plan (saved to {opts.plan_file})" if opts.kind is RunKind.PLAN
            else "simulated sync" if opts.simulate else opts.kind.value)
    if opts.media:
        return f"{kind} of media id(s) {', '.join(opts.targets)}"
    if any(t.lower() == "all" for t in opts.targets):
        return f"{kind} of all sections"
    return f"{kind} of section(s) " + ", ".join(repr(t) if not ASCII_ID.match(t) else t
                                                for t in opts.targets)


def run_line(opts: Options, number: int | None, started: float) -> str:
    """The dated line a run's output begins with (report-only runs get no number)."""
    when = time.strftime("%a %Y-%m-%d %H:%M:%S", time.localtime(started))
    name = f"Run {number}" if number is not None else "Report-only run (not numbered)"
    return f"{name}, {when}: {run_words(opts)}"



###############################################################################
# The commands: a sync or report, --check, the library commands, --interval ###
###############################################################################


@dataclass(frozen=True)
class ReplayPlan:
    """What --undo or --apply carries out: per Plex media id, the decision and the item
    as it expects to find it; the run undone, and the servers a saved plan was made for."""

    items: dict[int, Replay]
    undoes: int | None = None
    servers: dict[str, str] = field(default_factory=dict)


def _stamp(raw: dict, key: str, scale: int = 1) -> int:
    return int(raw.get(key) or 0) * scale


def undo_plan(state: StateStore | None, wanted: int | None) -> ReplayPlan:
    """--undo [RUN]: every write of that run (finished or not) put back, each item to its
    own before-state; a bare --undo takes the last sync not yet undone (§6.4)."""
    runs = state.runs() if state is not None else []
    if wanted is None:
        candidates = [r for r in runs if r.writes > 0 and r.kind != RunKind.UNDO.value
                      and r.undone_by is None]
        if not candidates:
            where = state.path if state is not None else "the sync state"
            raise SyncError(f"there is no sync to undo: {where} holds no sync that wrote "
                            "anything and is not undone yet (see --history)")
        wanted = candidates[-1].run_id
    elif not any(r.run_id == wanted for r in runs):
        raise SyncError(f"there is no run {wanted} in the sync state; --history lists them")
    assert state is not None
    items: dict[int, Replay] = {}
    for row in state.journal(wanted):
        # A row still "intended" belongs to a killed run: a step can have reached its
        # server before it was marked, so it is put back too (a no-op if it never did).
        if row.outcome not in (Outcome.UPDATED.value, INTENDED) and not row.steps_done:
            continue
        undo = Decision(Verdict.BOTH_OUT_OF_SYNC,
                        row.sage_before if row.to_sage is not None else None,
                        row.plex_before if row.to_plex is not None else None,
                        f"undo of run {wanted}",
                        plex_unplayed=not int(row.plex_raw_before.get("viewCount") or 0))
        items[row.rating_key] = replace(_expect_after(row, undo),
                                        to_sage_raw=row.sage_raw_before,
                                        to_plex_raw=row.plex_raw_before)
    if not items:
        raise SyncError(f"run {wanted} changed nothing that can be undone; --history lists "
                        "the runs")
    later = [r.run_id for r in runs if r.run_id > wanted]
    return ReplayPlan(_after_later_runs(items, state, later), undoes=wanted)


def _expect_after(row: JournalRow, decision: Decision) -> Replay:
    """The item as a journalled write left it: as read back (a finished write), or any
    state its own steps can have left (one that failed or died half way)."""
    if row.outcome != Outcome.UPDATED.value:
        # Not finished: each side as it was before, or as one of its steps left it.
        return Replay(row.sage_before, row.plex_before,
                      _stamp(row.sage_raw_before, "RealWatchedEndTime"),
                      _stamp(row.plex_raw_before, "lastViewedAt", 1000), decision,
                      row.own_sage, row.own_plex, sage_raw=row.sage_raw_before,
                      plex_raw=row.plex_raw_before)
    sage_raw = row.sage_raw_after or row.sage_raw_before
    plex_raw = row.plex_raw_after or row.plex_raw_before
    return Replay(row.sage_after or row.sage_before, row.plex_after or row.plex_before,
                  _stamp(sage_raw, "RealWatchedEndTime"), _stamp(plex_raw, "lastViewedAt", 1000),
                  decision, sage_raw=sage_raw, plex_raw=plex_raw)


def _after_later_runs(items: dict[int, Replay], state: StateStore, later: list[int]
                      ) -> dict[int, Replay]:
    """What the undone run left, followed through the tool's own later writes to the same
    items, side by side: a later run that found a side just as the undone run (or the
    tool's writes since) left it moves what the undo expects to find there to what that
    run left, its new stamps included (§6.4: the tool's own steps are not a change)."""
    for run_id in later:
        for row in state.journal(run_id):
            expected = items.get(row.rating_key)
            if expected is not None and row.outcome == Outcome.UPDATED.value:
                items[row.rating_key] = _followed(expected, row)
    return items


def _followed(expected: Replay, row: JournalRow) -> Replay:
    """One later journalled write of the tool's, taken into what an undo expects."""
    if row.sage_after is not None and row.sage_raw_after and row.sage_before == expected.sage \
            and abs(_stamp(row.sage_raw_before, "RealWatchedEndTime")
                    - expected.sage_stamp_ms) <= RESTAMP_MS:
        expected = replace(expected, sage=row.sage_after, sage_raw=row.sage_raw_after,
                           sage_stamp_ms=_stamp(row.sage_raw_after, "RealWatchedEndTime"),
                           own_sage=())
    if row.plex_after is not None and row.plex_raw_after and row.plex_before == expected.plex \
            and abs(_stamp(row.plex_raw_before, "lastViewedAt", 1000)
                    - expected.plex_stamp_ms) <= RESTAMP_MS:
        expected = replace(expected, plex=row.plex_after, plex_raw=row.plex_raw_after,
                           plex_stamp_ms=_stamp(row.plex_raw_after, "lastViewedAt", 1000),
                           own_plex=())
    return expected


def read_plan(path: Path) -> ReplayPlan:
    """--apply FILE: the plan --plan saved, with the servers it was made for."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        items = {}
        for item in data["items"]:
            decision = Decision(Verdict.BOTH_OUT_OF_SYNC, _status_or_none(item["to_sage"]),
                                _status_or_none(item["to_plex"]), f"plan: {item['rule']}")
            items[int(item["media_id"])] = Replay(
                Status.from_text(item["sage"]), Status.from_text(item["plex"]),
                int(item.get("sage_stamp_ms") or 0), int(item.get("plex_stamp_ms") or 0),
                decision, sage_raw=dict(item.get("sage_raw") or {}),
                plex_raw=dict(item.get("plex_raw") or {}))
        servers = data.get("servers") or {}
        if not isinstance(servers, dict):
            raise TypeError("servers")
        return ReplayPlan(items, servers={str(k): str(v) for k, v in servers.items()})
    except OSError as exc:
        raise UsageError(f"cannot read the plan {path} ({exc.strerror}); give the file "
                         "--plan wrote") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{path} is not a plan saved by --plan; make one with --plan") from None


def check_plan_servers(plan: ReplayPlan, identity: dict[str, str], path: Path) -> None:
    """A plan is carried out only on the servers it was made for (§6.5)."""
    for key, value in plan.servers.items():
        if identity.get(key) and value and identity[key] != value:
            raise SyncError(f"the plan {path} was made for other servers ({key} {value}, "
                            f"these are {identity[key]}); nothing was written. Make a plan "
                            "for these servers with --plan")


def save_plan(path: Path, plan: Plan, servers: dict[str, str]) -> int:
    """--plan FILE: the items with writes, their decisions and the states they were
    taken on (what --apply checks first), with every other Plex item holding the same
    recording: a newer viewing of any of them since the plan skips the recording (§6.4).
    Returns how many items have writes."""
    written = {p.sage.media_file_id for p in plan.decided if p.sage is not None and p.writes}
    items = [{"media_id": p.plex.rating_key, "title": p.plex.title,
              "sage": p.item.sage_status.to_text(), "plex": p.item.plex_status.to_text(),
              "sage_stamp_ms": p.sage.real_end_ms if p.sage else 0,
              "plex_stamp_ms": p.plex.last_viewed_ms,
              "sage_raw": p.sage.raw() if p.sage else {}, "plex_raw": p.plex.raw(),
              "to_sage": p.decision.to_sage.to_text() if p.decision.to_sage else None,
              "to_plex": p.decision.to_plex.to_text() if p.decision.to_plex else None,
              "rule": p.decision.rule, "writes": [str(w) for w in p.writes]}
             for p in plan.decided if p.item.matched and p.sage is not None
             and p.sage.media_file_id in written]
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(json.dumps({"sageplex_sync_plan": 2, "servers": servers,
                                         "items": items}, indent=1), encoding="utf-8")
        os.replace(temporary, path)  # whole or not at all
    except OSError as exc:
        raise UsageError(f"cannot write the plan {path} ({exc.strerror}); give a writable "
                         "place") from None
    return sum(1 for item in items if item["writes"])


def why_planned(plan: Plan, targets: Sequence[str]) -> list[Planned]:
    """The items --why names: a movie or episode, or every episode of a show or season."""
    wanted = {int(t) for t in targets}
    found = [p if isinstance(p, Planned) else Planned(p) for p in plan.every()
             if wanted & {_plex_of(p).rating_key, _plex_of(p).show_key,
                          _plex_of(p).season_key}]
    if not found:
        raise UsageError(f"Plex has no movie or episode with media id {targets[0]} in its "
                         "movie and show sections; run with a section name to see the ids")
    return found


def _plex_of(value: Planned | Item) -> PlexItem:
    return value.plex


def why_text(planned: Planned, played_from: str) -> str:
    item = planned.item
    plex = item.plex
    lines = [f"media id {plex.rating_key}: {plex.title}",
             f"  Plex raw:    {json.dumps(plex.raw())}"]
    bounds = item.bounds
    if item.sage is None or bounds is None:
        result = result_of(planned)
        lines.append(f"  SageTV:      {entry_label(result)} {entry_reason(result)}".rstrip())
        return "\n".join(lines)
    lines += [
        f"  SageTV raw:  media file {item.sage.media_file_id}, airing {item.sage.airing_id}: "
        f"{json.dumps(item.sage.raw())}",
        f"  bounds:      {bounds} (Plex's played threshold: {played_from})",
        f"  states:      SageTV {item.sage_status}, Plex {item.plex_status}",
        "  base:        " + (f"SageTV {item.base.sage}, Plex {item.base.plex}"
                             if item.base else "none yet (first sync: the newer side wins)"),
        f"  rule:        {planned.decision.rule}",
        "  would do:    " + ("; then ".join(str(w) for w in planned.writes)
                             or planned.blocked or "nothing")]
    return "\n".join(lines)


def _print_sagedata(sage: SageClient, facts: Facts, console: Console) -> None:
    console.err.write("SageTV data for the media ids, by Plex media id:\n")
    data = {}
    for item in facts.items:
        if item.sage is not None:
            data[str(item.plex.rating_key)] = sage.media_file(item.sage.media_file_id)
    console.out.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _say_clocks(sage: SageClient, plex: PlexClient) -> None:
    for client in (sage, plex):
        offset = client.clock_offset_ms
        if offset:
            log.info("%s's clock is %s %s this computer's: its times are corrected",
                     client.server.label, format_hms(abs(offset)),
                     "ahead of" if offset > 0 else "behind")


def replay_plan(opts: Options, state: StateStore | None) -> ReplayPlan | None:
    if opts.kind is RunKind.UNDO:
        return undo_plan(state, opts.undo_run)
    if opts.kind is RunKind.APPLY:
        assert opts.apply_file is not None
        return read_plan(opts.apply_file)
    return None


def explained(opts: Options, facts: Facts, plan: Plan, reader: Reader,
              console: Console) -> bool:
    """--why and --sagedata print what was read and decided, and the run ends there;
    --plan saves the plan (and the run goes on to report it)."""
    if opts.kind is RunKind.WHY:
        threshold = f"{facts.played_fraction:.0%} from {facts.played_from}"
        console.out.write("\n".join(why_text(p, threshold)
                                    for p in why_planned(plan, opts.targets)) + "\n")
        return True
    if opts.kind is RunKind.SAGEDATA:
        _print_sagedata(reader.sage, facts, console)
        return True
    if opts.kind is RunKind.PLAN and opts.plan_file is not None:
        count = save_plan(opts.plan_file, plan, reader.identity())
        console.err.write(f"plan with {count} item(s) saved to {opts.plan_file}\n")
    return False


#: The command's own run (``main()`` reading sys.argv) leaves what a run read to the
#: process's exit instead of freeing it object by object as the run returns (a tenth of
#: a 100,000-item check): a list that holds itself, frozen out of the collector's way at
#: the end. A library call (``main(argv)``, ``run_sync``) frees it as usual.
_left_to_exit: list[object] | None = None


def _leave_to_exit(*objects: object) -> None:
    """The last run's only: --watch and --interval free each run's as the next ends."""
    if _left_to_exit is not None:
        _left_to_exit[1:] = objects


def run_sync(opts: Options, config: Config, console: Console, stop: threading.Event,
             all_items: bool, as_json: bool, quiet: bool = False,
             seen: list[Report] | None = None) -> ExitCode:
    """One run, a pipeline of values: read -> Facts, check, plan -> Plan, guard, write ->
    results, read back, remember; the report is made from these values."""
    state_path = opts.state_path or default_state_path(config.path)
    log.info("sync state: %s", state_path)
    with SageClient(config.sage) as sage, PlexClient(config.plex) as plex, \
            StateStore(state_path, write=opts.writes) as state, \
            _collector_paused() as planned:
        started = run_line(opts, state.next_run_id() if opts.writes else None, time.time())
        log.info("%s", started)
        on_failure = "" if as_json or opts.kind in (RunKind.WHY, RunKind.SAGEDATA) else started
        held = quiet or not on_failure
        replay = replay_plan(opts, state)
        replays = replay.items if replay is not None else {}
        reader = Reader(opts, sage, plex, state, console, replays)
        with _failure_recorded(state, opts, console, on_failure):
            facts = reader.read()
            if replay is not None and opts.apply_file is not None:
                check_plan_servers(replay, reader.identity(), opts.apply_file)
            _say_clocks(sage, plex)
            check_arguments(facts, opts)
        if not held:
            console.out.write(started + "\n")
            console.out.flush()
        plan = plan_run(facts, opts, replays)
        planned()
        if explained(opts, facts, plan, reader, console):
            return ExitCode.OK
        with _failure_recorded(state, opts, console, on_failure if held else ""):
            guard(plan, opts, console, config.guard_items)
        writing = WritePhase(opts, facts, state, console, (sage, plex), stop,
                             replaying=bool(replays))
        results = writing.run(plan) if opts.decides_writes else list(map(result_of,
                                                                          plan.decided))
        after = read_back(results, facts, sage, plex) if opts.writes else None
        full = not opts.media and any(t.lower() == "all" for t in opts.targets)
        report = Report(after.results if after is not None else results, opts.writes,
                        plan.quiet, unreadable_sage=facts.index.unreadable_count,
                        interrupted=stop.is_set(), listed_before=listed_ids(state),
                        sage_only=sage_only_items(facts.index, facts.items) if full else None)
        if seen is not None:  # --watch: what each of its runs did, for its one line
            seen.append(report)
        if after is not None:
            run_id = remember(state, writing.run_id, opts, facts, plan, after,
                              counts=run_counts(report),
                              undoes=replay.undoes if replay is not None else None)
            log.info("run %d recorded in %s", run_id, state_path)
        log_written(report.results)
        if opts.writes and not report.interrupted:
            remember_listed(state, report)
        _print_report(report, console, ReportStyle(all_items, as_json, quiet, started))
        log.info("%s", report.total_line())
        log.info("done: exit %d (%d SageTV and %d Plex requests)", report.exit_code(),
                 sage.request_count, plex.request_count)
        _leave_to_exit(facts, plan, report)
        return report.exit_code()


class ReportStyle(NamedTuple):
    """How the report is printed: every item, JSON, quiet; the run's dated line."""

    all_items: bool
    as_json: bool
    quiet: bool
    run_line: str


def _print_report(report: Report, console: Console, style: ReportStyle) -> None:
    """The report on stdout (each item once), and why the run failed on stderr too."""
    problem = report.error_message()
    if problem:
        console.err.write(f"{PROG}: error: {console.secrets.redact(problem)}\n")
    if style.as_json:
        lines = [json.dumps(entry_json(result), ensure_ascii=False) for result in report.every()]
        lines.append(json.dumps({**report.json_summary(), "run": style.run_line},
                                ensure_ascii=False))
    elif style.quiet and report.nothing_to_say():
        return  # cron mails only when something happened
    else:
        lines = report.body(style.all_items, style.quiet)
        if style.quiet:
            lines = [style.run_line] + lines
    console.out.write(console.secrets.redact("\n".join(lines)) + "\n")


@contextlib.contextmanager
def _failure_recorded(state: StateStore, opts: Options, console: Console, run_line: str
                      ) -> Iterator[None]:
    """A sync that could not finish (a server unreachable, the guard refused) is kept in
    --history too, with its error, and its output is its dated line (``run_line``: '' once
    printed, or held back). A usage error is no run: nothing is printed or kept."""
    try:
        yield
    except UsageError:
        raise
    except SyncError as exc:
        if state.write and state.db is not None:
            with contextlib.suppress(SyncError):
                state.finish_run(0, opts.kind.value, opts.argv, (), (), counts={
                    "error": console.secrets.redact(str(exc)), "exit_code": int(exc.exit_code)})
        if run_line:
            console.out.write(run_line + "\n")
        raise


def run_counts(report: Report) -> dict[str, Any]:
    """What --history keeps of a run: its non-zero counts and its exit code."""
    counts = report.json_summary()["summary"]
    return {**{k: v for k, v in counts.items() if v}, "exit_code": int(report.exit_code())}


def listed_ids(state: StateStore) -> dict[str, set[int]] | None:
    if state.db is None:
        return None
    return {kind: state.listed(kind) for kind in RECURRING}


def remember_listed(state: StateStore, report: Report) -> None:
    """The recurring ids this sync counted, to tell the new ones next time. A run of some
    sections or media ids replaces only what it saw."""
    before = report.listed_before or {}
    seen = {r.plex.rating_key for r in report.results} | {
        i.plex.rating_key for i in report.quiet}
    for kind in RECURRING:
        now = {_item_id(i) for i in report.items_under(kind, every_item=False)}
        if kind == "sage_only":
            if report.sage_only is not None:
                state.set_listed(kind, now)
        else:
            state.set_listed(kind, (before.get(kind, set()) - seen) | now)


def run_check(config: Config, console: Console) -> ExitCode:
    """--check: the config, both servers, and what the tool may do there."""
    out = console.out
    out.write(f"config: {config.path}\n")
    for warning in config.warnings:
        out.write(f"warning: {warning}\n")
    failed = False
    with SageClient(config.sage) as sage, PlexClient(config.plex) as plex:
        try:
            count = len(sage.media_files(("MediaFileID",), lambda record: None))
            out.write(f"SageTV at {config.sage.address}: {count} media files; clock "
                      f"{_offset_words(sage.measured_offset_ms)}\n")
        except SageError as exc:
            failed = True
            out.write(f"SageTV: FAILED: {console.secrets.redact(str(exc))}\n")
        try:
            server = plex.plex
            out.write(f"Plex at {config.plex.address}: {server.friendlyName} "
                      f"(version {server.version}); clock "
                      f"{_offset_words(plex.measured_offset_ms)}\n")
            for section in plex.sections():
                out.write(f"  section {section.key}: {section.title} ({section.type})\n")
            fraction, source = plex.played_threshold()
            owner = "not readable" not in source
            out.write(f"  played threshold {fraction:.0%} ({source}); writes: "
                      + ("allowed (owner token)\n" if owner else
                         "watch state only (a managed user's token)\n"))
            _check_websocket_line(plex, console)
        except PlexError as exc:
            failed = True
            out.write(f"Plex: FAILED: {console.secrets.redact(str(exc))}\n")
    out.write("check failed\n" if failed else "check passed\n")
    return ExitCode.FAILED if failed else ExitCode.OK


def _check_websocket_line(plex: PlexClient, console: Console) -> None:
    try:
        check_websocket(plex)
        console.out.write("  notification websocket: opens (--watch can follow playback)\n")
    except PlexError as exc:
        console.out.write(f"  notification websocket: cannot be opened: "
                          f"{console.secrets.redact(str(exc))}; --watch needs it\n")


def _offset_words(offset_ms: int | None) -> str:
    if offset_ms is None:
        return "not known (no Date header)"
    if abs(offset_ms) <= CLOCK_OFFSET_REPORTED_MS:
        return "in step with this computer's"
    return (f"{format_hms(abs(offset_ms))} {'ahead of' if offset_ms > 0 else 'behind'} this "
            "computer's (corrected)")


def run_admin(opts: Options, config: Config, console: Console) -> ExitCode:
    """-l, --addtv, --addmovie, --delsec and --refresh."""
    out = console.out
    command, words = opts.library
    with PlexClient(config.plex) as plex:
        sections = plex.sections()
        if command == "list":
            for section in sections:
                out.write(f"{section.key:>3}: {section.title} ({section.type})\n")
        elif command in ("addtv", "addmovie"):
            _add_section(list(words), command == "addtv", sections, plex, out)
        elif command == "refresh":
            for section in resolve_sections(list(words), sections, video_only=False):
                plex.refresh_section(section.key)
                out.write(f"Refreshing library [{section.key}]: {section.title}\n")
        else:
            _delete_section(words[0], opts.yes, sections, plex, console)
        return ExitCode.OK


def _add_section(words: list[str], tv: bool, sections: list[PlexSection], plex: PlexClient,
                 out: TextIO) -> None:
    name, *paths = words
    taken = [s for s in sections if s.title.lower() == name.lower()]
    if taken:
        raise UsageError(f"Plex already has a section named {name!r} (id {taken[0].key}); "
                         "choose another name")
    kind = TV_SECTION if tv else MOVIE_SECTION
    plex.add_section(name, kind, paths)
    out.write(f"Plex library '{name}' added ({kind['type']}, {kind['scanner']}, "
              f"{len(paths)} folder(s)).\n")


def _delete_section(wanted: str, yes: bool, sections: list[PlexSection], plex: PlexClient,
                    console: Console) -> None:
    if wanted.lower() == "all":
        raise UsageError("--delsec deletes one section at a time; give its id or name")
    section = resolve_sections([wanted], sections, video_only=False)[0]
    if not yes:
        if not console.can_ask:
            raise UsageError(f"--delsec {section.key} asks before deleting, and there is "
                             "no terminal to ask on; add -y to delete without asking")
        if not console.ask(f"Delete the Plex library [{section.key}] {section.title}? "
                           "This cannot be undone."):
            console.out.write("Not deleted.\n")
            return
    plex.delete_section(section.key)
    console.out.write(f"Library [{section.key}] {section.title} deleted.\n")


def run_rounds(opts: Options, config: Config, console: Console, stop: threading.Event,
               minutes: float, all_items: bool, as_json: bool, quiet: bool = False
               ) -> ExitCode:
    """--interval: sync, sleep, repeat until Ctrl-C or SIGTERM; a failed round is logged
    and the next one runs. Each round's output begins with its own dated line."""
    code = ExitCode.OK
    while not stop.is_set():
        try:
            code = run_sync(opts, config, console, stop, all_items, as_json, quiet)
        except UsageError:
            raise
        except SyncError as exc:
            code = exc.exit_code
            message = console.secrets.redact(str(exc))
            log.error("round failed: %s", message, extra=SAID_ON_STDERR)
            console.err.write(f"{PROG}: round failed: {message}\n")
            if as_json:
                console.out.write(json.dumps(error_summary(message, code)) + "\n")
        console.out.flush()
        if stop.wait(minutes * 60):
            break
    return ExitCode.INTERRUPTED if code is not ExitCode.FAILED else code


def show_history(state_path: Path, console: Console, limit: int, as_json: bool) -> ExitCode:
    """--history: the runs the state keeps, oldest first: the numbers --undo takes."""
    if not state_path.exists():
        console.err.write(f"no runs yet: {state_path} does not exist (a sync with -s makes "
                          "it)\n")
        return ExitCode.OK
    with StateStore(state_path, write=False) as state:
        runs = state.history(limit)
    if as_json:
        for run in runs:
            console.out.write(json.dumps({
                "run": run.run_id, "started_at": run.started_at, "kind": run.kind,
                "writes": run.writes, "counts": run.counts, "undone_by": run.undone_by},
                ensure_ascii=False) + "\n")
        return ExitCode.OK
    lines = [f"Runs kept in {state_path} (the last {RUNS_KEPT} at most; --undo RUN puts "
             "one back):", "  run  date                 kind   what it did"]
    lines += [f"{run.run_id:>5}  {run.started_at:<19}  {run.kind:<5}  {history_words(run)}"
              for run in runs]
    if not runs:
        lines.append("  (none yet)")
    console.out.write(console.secrets.redact("\n".join(lines)) + "\n")
    return ExitCode.OK


def history_words(run: RunRecord) -> str:
    counts = run.counts
    if counts is None:  # kept by a version that did not count
        words = f"{run.writes} item(s) written"
    elif "error" in counts:
        words = f"FAILED: {counts['error']}"
    else:
        words = counts_words(counts)
        words += f"; {sage_only_words(counts['sage_only'])}" if counts.get("sage_only") else ""
    if counts is not None and "exit_code" in counts:
        words += f"; exit {counts['exit_code']}"
    return words + (f"; undone by run {run.undone_by}" if run.undone_by else "")


def error_summary(message: str, code: int) -> dict[str, Any]:
    """--json's one summary object for a run that could not start or finish."""
    return {"summary": None, "error": message, "exit_code": int(code)}


###############################################################################
# Continuous mode (--watch): follow playback on both servers (rules §8) ########
###############################################################################


#: A pause this long means the position will not move: the item is synced.
PAUSE_SETTLE_S = 10.0
#: A stop or a mark is synced this long after its notification: a burst is one sync.
STOP_SETTLE_S = 0.5
#: An item whose sync could not run (a server away, the state locked) is tried again.
RETRY_S = 5.0
WATCH_INTERVAL_MIN = 60.0  # the backstop's full pass, unless --interval says otherwise
POLL_S = 5.0  # SageTV's poll, unless --poll says otherwise
LOOK_BACK_EXTRA_MS = 10_000  # the poll's look-back: the interval and this much more
#: A Date header has whole seconds: offsets measured a poll apart differ by this much
#: without the clock being set.
CLOCK_JITTER_MS = 1_000
BACKOFF_MAX_S = 60.0
WATCH_TICK_S = 0.1
NOTIFICATIONS = "/:/websockets/notifications"
MARK_ACTIVITY = "library.refresh.items"
_PLAYING_STATES = ("playing", "buffering")


def metadata_key(text: object) -> int | None:
    """The rating key of '/library/metadata/N'."""
    match = re.fullmatch(r"/library/metadata/(\d+)", str(text or ""))
    return int(match.group(1)) if match else None


def _int_or_none(value: object) -> int | None:
    text = str(value or "")
    return int(text) if text.isdigit() else None


class DueItems:
    """Items to sync, one due time per rating key (a burst of events is one sync); the
    Plex listener's thread adds, the watcher's takes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.due: dict[int, float] = {}
        self.playing: set[int] = set()  # on Plex, now

    def add(self, key: int, delay_s: float, *, sooner: bool = True) -> None:
        """Due in ``delay_s``; ``sooner``: an earlier due time stays."""
        when = self.clock() + delay_s
        with self.lock:
            current = self.due.get(key)
            self.due[key] = min(current, when) if sooner and current is not None else when

    def take(self) -> list[int]:
        now = self.clock()
        with self.lock:
            ready = sorted((when, key) for key, when in self.due.items() if when <= now)
            for _, key in ready:
                del self.due[key]
        return [key for _, key in ready]

    # -- Plex's notifications (plex-api.md §10) --------------------------------------------
    def on_notification(self, data: dict) -> None:
        kind = data.get("type")
        if kind == "playing":
            for note in data.get("PlaySessionStateNotification") or ():
                self._playing(note)
        elif kind == "activity":
            for note in data.get("ActivityNotification") or ():
                self._activity(note)

    def _playing(self, note: dict) -> None:
        key = _int_or_none(note.get("ratingKey")) or metadata_key(note.get("key"))
        state = note.get("state")
        if key is None:
            return
        with self.lock:
            if state in _PLAYING_STATES:  # never while it plays
                self.playing.add(key)
                self.due.pop(key, None)
                return
            self.playing.discard(key)
        if state == "paused":
            self.add(key, PAUSE_SETTLE_S, sooner=False)
        elif state == "stopped":
            self.add(key, STOP_SETTLE_S, sooner=False)

    def _activity(self, note: dict) -> None:
        activity = note.get("Activity") or {}
        if note.get("event") != "ended" or activity.get("type") != MARK_ACTIVITY:
            return
        key = metadata_key((activity.get("Context") or {}).get("key"))
        with self.lock:
            if key is None or key in self.playing:
                return
        self.add(key, STOP_SETTLE_S)


class SagePoll:
    """SageTV's recently watched airings, polled: an airing has stopped when it left the
    playing set, or when its watch record ended after the last poll (sagex-api.md §10)."""

    def __init__(self, poll_s: float, since_ms: int) -> None:
        self.look_back_ms = int(poll_s * 1000) + LOOK_BACK_EXTRA_MS
        self.last_ms = since_ms  # SageTV's clock when the last poll was sent
        self.playing: set[int] = set()
        #: The watch records found ended while still in the look-back (airing: its end): a
        #: poll's time is known to a Date header's second only, so each poll looks that
        #: much further back, and one end is told once.
        self.told: dict[int, int] = {}

    def stopped(self, sage: SageClient) -> set[int]:
        """The airing ids that stopped since the last poll."""
        offset_before_ms = sage.measured_offset_ms
        sage.measure_clock_again()  # SageTV's clock may have been set since the last poll
        sent_ms = sage.now_ms()
        reply = sage.call("GetRecentlyWatched", self.look_back_ms)
        offset_ms = sage.measured_offset_ms
        if offset_before_ms is not None and offset_ms is not None and abs(
                offset_ms - offset_before_ms) > CLOCK_JITTER_MS:
            # Its clock jumped: the last poll's time, and this one's, on its clock now.
            self.last_ms += offset_ms - offset_before_ms
            sent_ms += offset_ms - offset_before_ms
        airings = reply.get("Result")
        if not isinstance(airings, list):
            raise SageError(f"SageTV at {sage.server.address} sent recently watched airings "
                            "without a 'Result' list")
        cutoff = sage.now_ms() - self.look_back_ms
        playing: set[int] = set()
        told = {a: end for a, end in self.told.items() if end >= cutoff}
        ended: set[int] = set()
        for airing in airings:
            airing_id = _int_or_none(airing.get("AiringID")) if isinstance(airing, dict) \
                else None
            if airing_id is None:
                continue
            real_end = airing.get("RealWatchedEndTime") or 0
            if not isinstance(real_end, int) or real_end < cutoff:
                playing.add(airing_id)  # listed without a recent record: being played
            elif real_end > self.last_ms - CLOCK_JITTER_MS and told.get(airing_id) != real_end:
                told[airing_id] = real_end
                ended.add(airing_id)
        ended |= self.playing - playing
        self.playing, self.last_ms, self.told = playing, sent_ms, told
        return ended - playing


@dataclass
class WatchSettings:
    poll_s: float = POLL_S
    interval_min: float = WATCH_INTERVAL_MIN
    all_items: bool = False
    as_json: bool = False


class Watcher:
    """--watch: a full sync, then each item that stops on either server synced as a run
    of its own, a full pass every interval and after the websocket reconnects, until
    ``stop``. Everything runs on this thread except the Plex listener, which only notes
    what is due."""

    def __init__(self, opts: Options, config: Config, console: Console,
                 stop: threading.Event, settings: WatchSettings) -> None:
        self.opts, self.config, self.console, self.stop = opts, config, console, stop
        self.settings = settings
        self.state_path = opts.state_path or default_state_path(config.path)
        self.due = DueItems()
        #: Each item's states as its last printed line left them: the echo of the tool's
        #: own write (Plex notifies it too) syncs the item again to find nothing new, and
        #: that is logged, not printed.
        self.shown: dict[int, tuple[Status | None, Status | None]] = {}
        self.down: set[str] = set()  # what has been logged as away, until it is back
        self.listener: Any = None
        self.connected = False
        self.missed = False  # the websocket was down: events may have been missed
        self.backoff_s = 1.0
        self.next_listen = 0.0
        self.next_poll = 0.0
        self.next_full = 0.0
        self.sage_poll = SagePoll(settings.poll_s, 0)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> ExitCode:
        with SageClient(self.config.sage) as sage, PlexClient(self.config.plex) as plex:
            self.sage_poll.last_ms = sage.now_ms()
            self.full_pass("first full sync")
            self.console.err.write(f"{PROG}: watching both servers (Ctrl-C to stop)\n")
            try:
                while not self.stop.is_set():
                    self.step(sage, plex)
                    self.stop.wait(WATCH_TICK_S)
            finally:
                if self.listener is not None:
                    with contextlib.suppress(Exception):
                        self.listener.stop()
        log.info("watch mode ended")
        return ExitCode.INTERRUPTED

    def step(self, sage: SageClient, plex: PlexClient) -> None:
        now = time.monotonic()
        self.keep_listening(plex, now)
        if now >= self.next_poll:
            self.next_poll = now + self.settings.poll_s
            self.poll_sage(sage)
        for key in self.due.take():
            if self.stop.is_set():
                return
            self.sync_item(key)
        if time.monotonic() >= self.next_full and not self.stop.is_set():
            self.full_pass("backstop full pass")

    # -- servers away and back -------------------------------------------------------------
    def away(self, what: str, message: str) -> None:
        if what not in self.down:
            self.down.add(what)
            message = self.console.secrets.redact(message)
            log.warning("%s: %s (retrying)", what, message)
            self.console.err.write(f"{PROG}: {what}: {message} (retrying)\n")

    def back(self, what: str) -> None:
        if what in self.down:
            self.down.discard(what)
            log.info("%s: back", what)
            self.console.err.write(f"{PROG}: {what}: back\n")

    # -- Plex's websocket -----------------------------------------------------------------
    def keep_listening(self, plex: PlexClient, now: float) -> None:
        listener = self.listener
        if listener is not None and listener.is_alive():
            if not self.connected and _listener_open(listener):
                self.connected, self.backoff_s = True, 1.0
                self.back("Plex notifications")
                if self.missed:  # events may have been missed while it was down
                    self.missed, self.next_full = False, 0.0
            return
        if listener is not None:  # closed by the server, or never opened
            self.listener, self.connected, self.missed = None, False, True
            self.away("Plex notifications", "the websocket closed")
            self.next_listen = now + self.backoff_s
            self.backoff_s = min(self.backoff_s * 2, BACKOFF_MAX_S)
        if now >= self.next_listen:
            self.listen(plex, now)

    def listen(self, plex: PlexClient, now: float) -> None:
        try:
            self.listener = plex.plex.startAlertListener(self.due.on_notification,
                                                         callbackError=_listener_error)
        except PlexError as exc:
            self.missed = True
            self.away("Plex notifications", str(exc))
            self.next_listen = now + self.backoff_s
            self.backoff_s = min(self.backoff_s * 2, BACKOFF_MAX_S)

    # -- SageTV's poll ----------------------------------------------------------------------
    def poll_sage(self, sage: SageClient) -> None:
        try:
            airings = self.sage_poll.stopped(sage)
        except SageError as exc:
            self.away("SageTV", str(exc))
            return
        self.back("SageTV")
        if not airings:
            return
        by_airing = self.keys_by_airing()
        for airing_id in sorted(airings):
            keys = by_airing.get(airing_id)
            if not keys:
                log.info("SageTV airing %d stopped; never synced: the next full pass "
                         "takes it", airing_id)
            for key in keys or ():
                self.due.add(key, 0)

    def keys_by_airing(self) -> dict[int, list[int]]:
        """The Plex rating keys of each SageTV airing, from the bases."""
        try:
            with StateStore(self.state_path, write=False) as state:
                bases = state.bases()
        except StateError as exc:
            self.away("sync state", str(exc))
            return {}
        found: dict[int, list[int]] = collections.defaultdict(list)
        for key, record in bases.items():
            airing = _int_or_none(record.sage_raw.get("AiringID"))
            if airing is not None:
                found[airing].append(key)
        return found

    # -- runs ------------------------------------------------------------------------------
    def full_pass(self, why: str) -> None:
        """The same run as `all -s` (guard included); a failure is logged and retried."""
        log.info("watch: %s", why)
        self.next_full = time.monotonic() + self.settings.interval_min * 60
        opts = replace(self.opts, kind=RunKind.SYNC)
        try:
            run_sync(opts, self.config, self.console, self.stop, self.settings.all_items,
                     self.settings.as_json)
            self.back("full pass")
        except UsageError:
            raise
        except SyncError as exc:
            self.away("full pass", str(exc))
            self.next_full = time.monotonic() + min(self.settings.interval_min * 60, 30.0)
        self.console.out.flush()

    def sync_item(self, key: int) -> None:
        """One item as a run of its own: read both sides, decide, write, read back,
        journal, record; one dated line of output."""
        opts = replace(self.opts, kind=RunKind.WATCH, media=True, targets=(str(key),),
                       yes=True, prompt=False, simulate=False)
        quiet = Console(io.StringIO(), self.console.err, None, self.console.secrets)
        seen: list[Report] = []
        try:
            run_sync(opts, self.config, quiet, self.stop, False, False, seen=seen)
        except UsageError as exc:  # gone from Plex, or not a movie or episode
            log.info("watch: media id %d not synced: %s", key, exc)
            return
        except SyncError as exc:
            self.away(f"syncing media id {key}", str(exc))
            self.due.add(key, RETRY_S)
            return
        self.back(f"syncing media id {key}")
        for report in seen:
            self.say(key, report)

    def say(self, key: int, report: Report) -> None:
        for entry in report.every():
            if entry.plex.rating_key != key and entry.outcome is Outcome.UNCHANGED:
                continue
            line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {entry.plex.rating_key} " \
                   f"{entry.plex.title}: {_watch_words(entry)}"
            log.info("watch: %s", line)
            states = (entry.sage_after or entry.sage_status, entry.plex_after or
                      entry.plex_status)
            echo = entry.outcome is Outcome.UNCHANGED and self.shown.get(
                entry.plex.rating_key) == states
            self.shown[entry.plex.rating_key] = states
            if not echo:
                self.console.out.write(line + "\n")
        self.console.out.flush()


def _watch_words(entry: Result) -> str:
    """What the item's run wrote, in words."""
    if not entry.matched:
        return entry_label(entry)
    if entry.outcome is Outcome.UNCHANGED:
        return f"nothing written (SageTV {entry.sage_status}, Plex {entry.plex_status})"
    reason = entry_reason(entry)
    return f"{entry.outcome.value}" + (f": {reason}" if reason else "")


def _listener_open(listener: Any) -> bool:
    """Whether plexapi's AlertListener has its websocket open."""
    sock = getattr(getattr(listener, "_ws", None), "sock", None)
    return bool(sock is not None and getattr(sock, "connected", False))


def _listener_error(error: object) -> None:
    log.debug("Plex notifications: %r", error)


def run_watch(opts: Options, config: Config, console: Console, stop: threading.Event,
              settings: WatchSettings) -> ExitCode:
    """--watch (rules §8)."""
    return Watcher(opts, config, console, stop, settings).run()


def check_websocket(plex: PlexClient) -> None:
    """--check: open Plex's notification websocket, then close it (PlexError if not)."""
    try:
        import websocket
    except ImportError:
        raise PlexError("the websocket-client package is missing (pip install "
                        "'plexapi[alert]'): --watch cannot follow Plex") from None
    url = plex.plex.url(NOTIFICATIONS, includeToken=True).replace("http", "ws", 1)
    try:
        connection = websocket.create_connection(url, timeout=plex.server.timeout_s)
    except Exception as exc:  # websocket-client's errors, OSError
        raise PlexError(f"{plex.where} did not open its notification websocket "
                        f"({exc.__class__.__name__}: {exc})") from None
    connection.close()


###############################################################################
# The command line: arguments, set-up and tear-down of a run, exit codes ######
###############################################################################


EPILOG = f"""\
Compare or synchronize watch status and resume position of the specified Plex library
sections with SageTV. Individual Plex media (movie, episode, season or show) can be
given with -m. Without -s nothing is written.

examples:
  {PROG} -l                      list the Plex library sections
  {PROG} all                     report every section, write nothing
  {PROG} all -s                  sync every section
  {PROG} "TV Shows" 2 -s -n      show what a sync of two sections would do
  {PROG} -m 1234 -s              sync one movie, episode, season or show
  {PROG} -m 1234 -s --position 0:42:10
  {PROG} --why 1234              explain the decision for one item
  {PROG} --undo                  put back what the last sync changed
config: sageplex_cfg.json, found through -c, $SAGEPLEX_CFG (a file or folder), the Plex
Media Server data folder, or the current folder. Sync state: --state, else
{STATE_FILE_NAME} next to the config. Log: $SAGEPLEX_LOG, else the user's state folder.
exit codes: 0 all writes done, 1 a write or the run failed (or the guard refused),
2 usage error, 130 interrupted.
"""


def _see_help(message: str) -> str:
    """A usage error ends with a pointer to --help, once."""
    return message if "--help" in message else f"{message} (see --help)"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (main prints it), not a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(_see_help(message))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, usage=f"{PROG} [options] [id [id ...]]",
        description="SageTV and Plex watch status synchronization.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("id", nargs="*", help="Plex library ID/name/all (media ids with -m)")
    actions = parser.add_mutually_exclusive_group()
    actions.add_argument("-l", "--list", action="store_true", help="list Plex library sections")
    actions.add_argument("-s", "--sync", action="store_true",
                         help="sync watch status (without it: report only, write nothing)")
    parser.add_argument("-m", "--media", action="store_true",
                        help="ID is a media-id (movie, episode, season or show), not a section")
    parser.add_argument("--sagedata", action="store_true",
                        help="print SageTV's data for the media ids as JSON (needs -m)")
    parser.add_argument("--position", metavar="POSITION",
                        help="set explicit resume position h:m:s on Plex and SageTV "
                             "(needs -m, and -s or -n)")
    parser.add_argument("-x", dest="ignore", metavar="IGNORE", type=int,
                        default=DEFAULT_IGNORE_S,
                        help=f"ignore positions within the first IGNORE seconds "
                             f"(default {DEFAULT_IGNORE_S})")
    parser.add_argument("-p", dest="prompt", action="store_true",
                        help="confirm each sync update")
    parser.add_argument("-n", dest="simulate", action="store_true",
                        help="do nothing, simulate the sync")
    actions.add_argument("--addtv", nargs="+", metavar=("NAME", "PATH"),
                         help="add a Plex library for SageTV shows")
    actions.add_argument("--addmovie", nargs="+", metavar=("NAME", "PATH"),
                         help="add a Plex library for SageTV movies")
    actions.add_argument("--delsec", metavar="ID", help="delete a Plex library section "
                         "(asks first)")
    actions.add_argument("--refresh", metavar="ID", help="refresh a Plex library section "
                         "(or all)")
    actions.add_argument("--check", action="store_true",
                         help="check the config and reach both servers, then exit")
    actions.add_argument("--why", metavar="MEDIA-ID",
                         help="explain the decision for one Plex media id, write nothing")
    actions.add_argument("--undo", nargs="?", const="", metavar="RUN",
                         help="put back what the last sync (or run RUN) changed")
    actions.add_argument("--apply", metavar="FILE", help="carry out a plan saved with --plan")
    parser.add_argument("--plan", metavar="FILE",
                        help="save what the sync would do as JSON, write nothing")
    parser.add_argument("--state", metavar="PATH",
                        help=f"sync state file (default: {STATE_FILE_NAME} next to the config)")
    parser.add_argument("-y", "--yes", action="store_true",
                        help="answer yes to --delsec's question and to the guard")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per item and a summary object on stdout")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print only the run's line, changes, failures and the total; "
                             "nothing at all when nothing happened (for cron)")
    actions.add_argument("--history", nargs="?", const=RUNS_KEPT, type=int, metavar="N",
                         help=f"list the runs kept in the sync state (the last N, default "
                              f"all: at most {RUNS_KEPT}), with the numbers --undo takes")
    parser.add_argument("--all-items", action="store_true",
                        help="list in-sync items too (the default lists what needs attention)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--interval", metavar="MINUTES", type=float,
                        help="sync, sleep MINUTES, repeat until stopped (needs -s)")
    parser.add_argument("--watch", action="store_true",
                        help="sync all (or the given sections), then follow playback on both "
                             "servers and sync each item as it stops, until stopped")
    parser.add_argument("--poll", metavar="SECONDS", type=float,
                        help=f"--watch: ask SageTV every SECONDS (default {POLL_S:g})")
    parser.add_argument("-c", "--config", metavar="PATH",
                        help="config file or folder (default: $SAGEPLEX_CFG, else the Plex "
                             "Media Server data folder, else the current folder)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show debug detail on stderr, and every item")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_position(text: str) -> int:
    """'h:m:s', 'm:s' or 's' as ms; minutes and seconds under 60 after a larger unit."""
    fields = text.strip().split(":")
    if not 1 <= len(fields) <= 3 or not all(ASCII_ID.match(f) for f in fields):
        raise ValueError(text)
    values = [int(f) for f in fields]
    if any(v >= 60 for v in values[1:]):
        raise ValueError(text)
    seconds = 0
    for value in values:
        seconds = seconds * 60 + value
    return seconds * 1000


#: The library commands' flags (argparse keeps them exclusive).
LIBRARY_FLAGS = ("list", "addtv", "addmovie", "delsec", "refresh")


def _admin(args: argparse.Namespace) -> bool:
    return bool(args.check or _library_command(args)[0])


#: Rules that make no sense together, checked before any server is asked (exit 2).
_CONFLICTS: list[tuple[Callable[[argparse.Namespace], bool], str]] = [
    (lambda a: bool(a.list and a.id), "-l lists the sections and takes no ids; drop the ids"),
    (lambda a: bool(_admin(a) and a.id and not a.list),
     "--addtv/--addmovie/--delsec/--refresh/--check take no other ids"),
    (lambda a: bool(a.addtv and len(a.addtv) < 2), "--addtv needs a NAME and at least one PATH"),
    (lambda a: bool(a.addmovie and len(a.addmovie) < 2),
     "--addmovie needs a NAME and at least one PATH"),
    (lambda a: bool(a.yes and _admin(a) and not a.delsec), "-y only answers --delsec's question "
     "and the guard of a sync"),
    (lambda a: bool(_admin(a) and (a.media or a.sagedata or a.position or a.prompt
                                   or a.simulate)),
     "-m, --sagedata, --position, -p and -n go with a sync or report, not with -l, --check "
     "or the library commands"),
    (lambda a: bool(a.sagedata and not a.media), "--sagedata needs -m and media ids"),
    (lambda a: bool(a.sagedata and (a.sync or a.position or a.simulate)),
     "--sagedata only shows SageTV's data; drop -s / -n / --position"),
    (lambda a: a.position is not None and not (a.media and (a.sync or a.simulate)),
     "--position needs -m (media ids) and -s (or -n to simulate)"),
    (lambda a: bool(a.prompt and not a.sync), "-p confirms sync writes; add -s"),
    (lambda a: bool(a.media and not a.id), "-m needs one or more media ids"),
    (lambda a: bool((a.why or a.undo is not None or a.apply) and (a.id or a.media)),
     "--why, --undo and --apply take no other ids"),
    (lambda a: bool(a.plan and (a.undo is not None or a.apply or a.why)),
     "--plan saves a sync's plan; it does not go with --undo, --apply or --why"),
    (lambda a: bool(a.watch and (a.simulate or a.prompt or a.plan or a.apply or a.why
                                 or a.undo is not None or a.media or a.sagedata
                                 or a.position or _admin(a))),
     "--watch syncs sections and follows them; it does not go with -n, -p, -m, --plan, "
     "--apply, --undo, --why, --position, --sagedata or the library commands"),
    (lambda a: a.poll is not None and not (a.watch and a.poll > 0),
     "--poll needs --watch and a number of seconds above 0"),
    (lambda a: a.interval is not None and not ((a.sync or a.watch) and a.interval > 0),
     "--interval needs -s and a number of minutes above 0"),
    (lambda a: bool(a.json and (_admin(a) or a.why or a.sagedata)),
     "--json goes with a sync or report"),
    (lambda a: a.history is not None and (a.history < 1 or bool(
        a.id or a.media or a.sagedata or a.position or a.prompt or a.simulate or a.plan
        or a.interval is not None or a.quiet or a.all_items)),
     "--history lists the runs kept (the last N, N at least 1); it takes no ids or other "
     "options but --state, -c and --json"),
    (lambda a: bool(a.quiet and (a.verbose or a.all_items or a.json or _admin(a) or a.why
                                 or a.sagedata)),
     "-q goes with a sync or report, and prints less: not with -v, --all-items or --json"),
    (lambda a: not (_admin(a) or a.id or a.why or a.undo is not None or a.apply
                    or a.history is not None or a.watch),
     "nothing to do: give a section (id, name or all), -m media ids, -l, --check, "
     "--undo, --history, --why or a library command"),
]


def validate_args(args: argparse.Namespace) -> Options:
    """The command line, checked, as the run's options (UsageError: exit 2)."""
    for broken, message in _CONFLICTS:
        if broken(args):
            raise UsageError(_see_help(message))
    if args.ignore < 0:
        raise UsageError(f"-x must be 0 or more seconds, not {args.ignore} (see --help)")
    ids = list(args.id)
    if args.watch and not ids:
        ids = ["all"]
    if args.why is not None:
        ids = [args.why]
    if (args.media or args.why is not None) and not all(ASCII_ID.match(i) for i in ids):
        bad = next(i for i in ids if not ASCII_ID.match(i))
        raise UsageError(f"media ids are numbers (see the first column of a report), not {bad!r}")
    if args.undo and not ASCII_ID.match(args.undo):
        raise UsageError(f"--undo takes a run number (as --history lists them), not "
                         f"{args.undo!r}")
    position_ms = None
    if args.position is not None:
        try:
            position_ms = parse_position(args.position)
        except ValueError:
            raise UsageError(f"--position takes h:m:s (like 1:02:30, 42:10 or 90), "
                             f"not {args.position!r}") from None
    return Options(
        kind=_run_kind(args), targets=tuple(ids),
        media=bool(args.media or args.why is not None), simulate=bool(args.simulate),
        prompt=args.prompt, yes=args.yes, ignore_ms=args.ignore * 1000,
        position_ms=position_ms, position_text=args.position or "",
        undo_run=int(args.undo) if args.undo else None,
        plan_file=Path(args.plan) if args.plan else None,
        apply_file=Path(args.apply) if args.apply else None,
        state_path=Path(os.path.expanduser(args.state)) if args.state else None,
        config_path=args.config, library=_library_command(args),
        history_limit=args.history or 0, interval_min=args.interval,
        poll_s=args.poll or POLL_S, every_item=bool(args.all_items or args.verbose),
        as_json=bool(args.json), quiet=bool(args.quiet), verbose=bool(args.verbose),
        no_progress=bool(args.no_progress))


def _library_command(args: argparse.Namespace) -> tuple[str, tuple[str, ...]]:
    for name in LIBRARY_FLAGS:
        value = getattr(args, name)
        if value:
            words = value if isinstance(value, list) else [] if value is True else [value]
            return name, tuple(words)
    return "", ()


def _run_kind(args: argparse.Namespace) -> RunKind:
    """The run's kind, from the flags that name it (argparse keeps them exclusive)."""
    named = [(args.history is not None, RunKind.HISTORY), (args.check, RunKind.CHECK),
             (bool(_library_command(args)[0]), RunKind.LIBRARY),
             (args.watch, RunKind.WATCH), (args.why is not None, RunKind.WHY),
             (args.sagedata, RunKind.SAGEDATA),
             (args.undo is not None, RunKind.UNDO), (bool(args.apply), RunKind.APPLY),
             (bool(args.plan), RunKind.PLAN), (bool(args.sync or args.simulate), RunKind.SYNC)]
    return next((kind for wanted, kind in named if wanted), RunKind.REPORT)


class _PrivateLogHandler(logging.handlers.RotatingFileHandler):
    """A rotating log whose files, the new one after a rotation too, are created 0600."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)  # noqa: SIM115

    def shouldRollover(self, record: logging.LogRecord) -> bool:  # noqa: N802 - logging's
        """Once the file has reached its size: the standard check formats every record
        twice and looks the file up twice a line, half the cost of a sync's 10,000 lines
        (a file may end one line past the size)."""
        if self.stream is None:
            self.stream = self._open()
        return self.maxBytes > 0 and self.stream.tell() >= self.maxBytes


def _log_file(path: Path, err: TextIO) -> list[logging.Handler]:
    """The rotating log file (5 MB, as the original), readable by the user alone."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return [_PrivateLogHandler(path, maxBytes=5 * 1024 * 1024, backupCount=5,
                                   encoding="utf-8")]
    except OSError as exc:
        err.write(f"{PROG}: warning: cannot write the log file {path} ({exc.strerror}); "
                  "set SAGEPLEX_LOG to a writable file\n")
        return []


#: ``extra=`` of a log record whose message the run has written on stderr itself: the
#: stderr handler of -v leaves it out (the file keeps it), so it is said once.
SAID_ON_STDERR = {"said_on_stderr": True}


def _not_said_yet(record: logging.LogRecord) -> bool:
    return not getattr(record, "said_on_stderr", False)


@contextlib.contextmanager
def logging_to(verbose: bool, err: TextIO, secrets: Secrets) -> Iterator[Path | None]:
    """The run's log handlers (a 0600 file in the user's state folder, stderr with -v),
    taken down again when the run ends. Library debug lines only with -v."""
    path = Path(os.environ.get("SAGEPLEX_LOG") or user_state_dir() / LOG_FILE_NAME)
    formatter = _RedactingFormatter(secrets)
    handlers: list[logging.Handler] = _log_file(path, err)
    if verbose:
        to_stderr = logging.StreamHandler(err)
        to_stderr.addFilter(_not_said_yet)
        handlers.append(to_stderr)
    names = ("sageplex_sync", "plexapi", "urllib3") if verbose else ("sageplex_sync",)
    saved = [(logging.getLogger(n), logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in names]
    for handler in handlers:
        handler.setFormatter(formatter)
    for logger, _, _ in saved:
        logger.setLevel(logging.DEBUG if verbose or logger is log else logging.WARNING)
        if logger is log and not verbose:
            logger.setLevel(logging.INFO)
        for handler in handlers:
            logger.addHandler(handler)
        logger.propagate = False
    try:
        yield path if handlers and not isinstance(handlers[0], logging.StreamHandler) else None
    finally:
        for logger, level, propagate in saved:
            for handler in handlers:
                logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        for handler in handlers:
            handler.close()


@contextlib.contextmanager
def stopping_on_signals(stop: threading.Event) -> Iterator[threading.Event]:
    """Ctrl-C and SIGTERM set ``stop``: the writes in flight finish, nothing new starts.
    The handlers only set flags (the run says what happened); they are put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _dispatch(opts: Options, console: Console, stop: threading.Event) -> ExitCode:
    if opts.kind is RunKind.HISTORY:  # the state alone: no server is asked
        state_path = opts.state_path or default_state_path(find_config(opts.config_path))
        return show_history(state_path, console, opts.history_limit, opts.as_json)
    config = load_config(find_config(opts.config_path), console.secrets)
    log.info("config %s: %r %r", config.path, config.sage, config.plex)
    if opts.kind is RunKind.CHECK:  # it prints the config's warnings itself
        return run_check(config, console)
    for warning in config.warnings:
        console.err.write(f"{PROG}: warning: {warning}\n")
    if opts.kind is RunKind.LIBRARY:
        return run_admin(opts, config, console)
    if opts.kind is RunKind.WATCH:
        return run_watch(opts, config, console, stop, WatchSettings(
            opts.poll_s, opts.interval_min or WATCH_INTERVAL_MIN, opts.every_item,
            opts.as_json))
    if opts.interval_min is not None:
        return run_rounds(opts, config, console, stop, opts.interval_min, opts.every_item,
                          opts.as_json, opts.quiet)
    return run_sync(opts, config, console, stop, opts.every_item, opts.as_json, opts.quiet)


def main(argv: list[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None, stdin: TextIO | None = None,
         stop: threading.Event | None = None) -> int:
    """Run the command line; the one place exceptions become messages and exit codes."""
    out = out or sys.stdout
    err = err or sys.stderr
    # The controlling terminal is a question's last resort only for the process's own
    # stdin: a caller that injects stdin decides what can be asked.
    terminal = _controlling_terminal if stdin is None else (lambda: None)
    stdin = stdin if stdin is not None else sys.stdin
    secrets = Secrets()
    words = list(argv if argv is not None else sys.argv[1:])
    if argv is None:
        _exit_keeps_whats_read()
    try:
        args = build_parser().parse_args(words)
        opts = replace(validate_args(args), argv=tuple(words))
    except SystemExit as exc:  # argparse has printed the help or the version
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    except UsageError as exc:
        # --json's summary, unless the error is that --json does not go with the command
        return _failed(str(exc), exc.exit_code, out, err,
                       "--json" in words and "--json" not in str(exc))
    progress = _isatty(err) and not opts.no_progress and not opts.verbose
    console = Console(out, err, stdin, secrets, progress, terminal)
    stop = stop if stop is not None else threading.Event()  # a test's, or the signals'
    with logging_to(opts.verbose, err, secrets), stopping_on_signals(stop):
        log.info("***** sageplex_sync %s %s *****", __version__, list(opts.argv))
        try:
            code = _dispatch(opts, console, stop)
            if stop.is_set() and code is ExitCode.OK:
                code = ExitCode.INTERRUPTED
            return code
        except SyncError as exc:
            message = secrets.redact(str(exc))
            log.error("%s", message, extra=SAID_ON_STDERR)
            return _failed(message, exc.exit_code, out, err, opts.as_json)
        except KeyboardInterrupt:
            err.write(f"{PROG}: interrupted\n")
            return ExitCode.INTERRUPTED
        except BrokenPipeError:
            return ExitCode.FAILED
        except Exception as exc:  # a bug: one line here, the traceback in the log
            log.exception("unexpected error", extra=SAID_ON_STDERR)
            message = secrets.redact(f"{exc.__class__.__name__}: {exc}")
            err.write(f"{PROG}: internal error: {message} (details in the log)\n")
            if opts.as_json:
                out.write(json.dumps(error_summary(f"internal error: {message}",
                                                   ExitCode.FAILED)) + "\n")
            return ExitCode.FAILED
        finally:
            console.close()
            with contextlib.suppress(BrokenPipeError, ValueError):
                out.flush()


def _exit_keeps_whats_read() -> None:
    """The command line's runs leave what they read to the process's exit: the list of it
    holds itself, and what is left when the interpreter finishes is frozen, so that neither
    dropping the module's names nor the last collection frees it object by object."""
    global _left_to_exit
    if _left_to_exit is None:
        _left_to_exit = []
        _left_to_exit.append(_left_to_exit)
        atexit.register(gc.freeze)


def _failed(message: str, code: int, out: TextIO, err: TextIO, as_json: bool) -> int:
    """A run that could not start or finish: the error on stderr, always; with --json also
    the one summary object, with the error and the exit code."""
    err.write(f"{PROG}: error: {message}\n")
    if as_json:
        out.write(json.dumps(error_summary(message, code), ensure_ascii=False) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
