#!/usr/bin/env python3
"""sageplex_sync: keep watch status and resume positions in step between SageTV and Plex.

Usage:  python sageplex_sync.py all            report what is out of sync, write nothing
        python sageplex_sync.py all -s         sync every movie and show section
        python sageplex_sync.py -l             list the Plex library sections

The module reads top to bottom: constants and errors, configuration, the SageTV
client, the Plex client, the item model and its normalisation, matching, the sync
decision (a pure function), the applier (the only code that writes), the report,
and the command line. ``main(argv) -> int`` is the only place that turns exceptions
into messages and exit codes, so the rest can be used as a library.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import collections
import contextlib
import gc
import json
import logging
import logging.handlers
import os
import re
import signal
import sys
import tempfile
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any, Callable, NoReturn, TextIO, TypeVar, Union
from xml.etree.ElementTree import Element, ParseError, XMLPullParser

import requests
from requests.adapters import HTTPAdapter
from urllib3 import exceptions as urllib3_errors
from urllib3.util.retry import Retry

__version__ = "1.0.0"

###############################################################################
# Constants and errors ########################################################
###############################################################################

#: Resume positions inside the first minute are noise (``-x`` changes it).
DEFAULT_IGNORE_S = 60
#: Positions this close are equal: SageTV's watched times do not round-trip to the ms.
POSITION_TOLERANCE_MS = 2_000
#: A position within this fraction of the end counts as finished ...
END_FRACTION = 0.05
#: ... or within this much of the end, which is when SageTV itself marks an airing
#: watched (its watch_ignore_time properties, sagex-api.md §6.5).
SAGE_END_MARGIN_MS = 5 * 60_000
SAGE_END_MARGIN_MOVIE_MS = 10 * 60_000
#: Plex ignores progress reports at or under one minute (plex-api.md §4.1).
PLEX_MIN_PROGRESS_MS = 60_000
#: Page sizes large enough that a library comes back in one request; sagex pages at 50
#: when no size is given (sagex-api.md §4.1) and plexapi at 100.
SAGEX_PAGE_SIZE = 100_000
PLEX_PAGE_SIZE = 100_000
#: A Plex listing is parsed as it arrives, this many bytes at a time.
PLEX_STREAM_CHUNK = 128 * 1024
#: Control characters XML does not allow; plexapi drops them from a reply (as
#: utils.cleanXMLString does) and so does the streamed listing.
XML_C0_CONTROLS = bytes(c for c in range(32) if c not in (9, 10, 13))
#: Seconds to wait for any one reply; ``sagex.timeout`` / ``plex.timeout`` change it.
DEFAULT_TIMEOUT_S = 30.0
#: Retries of a failed read (connection refused, 5xx, timeout), with backoff.
READ_RETRIES = 3
RETRY_BACKOFF_S = 0.3
#: Writes go through a small pool; SageTV and Plex both serve a few requests at once.
WRITE_WORKERS = 4
#: At most this many items wait, done, for their line behind an unfinished write.
PENDING_ITEMS_MAX = 10_000
#: Report lines are written in batches: this many, or what this many seconds have made.
OUTPUT_BATCH_LINES = 1000
OUTPUT_BATCH_S = 0.2
#: Only these sagex fields are asked for: ~0.5 KB a recording instead of ~6 KB.
#: MediaFileAiring keeps the nested Airing, Show keeps its Show (sagex-api.md §2.6).
SAGE_FIELDS = sorted([
    "MediaFileID", "MediaTitle", "IsTVFile", "IsVideoFile", "FileStartTime", "FileEndTime",
    "FileDuration", "NumberOfSegments", "SegmentFiles", "MediaFileAiring", "AiringID",
    "AiringStartTime", "AiringEndTime", "IsWatched", "WatchedStartTime", "WatchedEndTime",
    "RealWatchedStartTime", "RealWatchedEndTime", "Show", "ShowTitle", "ShowEpisode",
    "ShowExternalID", "ShowSeasonNumber", "ShowEpisodeNumber", "IsMovie",
])
PLEX_LIBRARY = "com.plexapp.plugins.library"
CONFIG_FILE_NAME = "sageplex_cfg.json"
LOG_FILE_NAME = "sageplex_sync.log"
LOG_FORMAT = "%(asctime)s| %(levelname)-8s| %(threadName)s| %(message)s"
#: Sections sageplex_sync can sync: Plex type name -> listing type number.
VIDEO_SECTION_TYPES = {"movie": 1, "show": 4}
#: The original tool's scanners and agents for --addtv / --addmovie.
TV_SECTION = {"type": "show", "scanner": "SageTV Scanner",
              "agent": "com.plexapp.agents.bmtagenttvshows"}
MOVIE_SECTION = {"type": "movie", "scanner": "SageTV Movie Scanner",
                 "agent": "com.plexapp.agents.imdb"}

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
    """The SageTV server failed or refused a request."""


class PlexError(SyncError):
    """The Plex server failed or refused a request."""


class _Secrets:
    """Every password and token the run knows, so that no output ever shows one."""

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

    def clear(self) -> None:
        self._values.clear()


SECRETS = _Secrets()


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return SECRETS.redact(super().format(record))


###############################################################################
# Configuration ###############################################################
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
    """The config file: -c PATH, else $SAGEPLEX_CFG (a file or a folder), else PMS's folder."""
    if explicit:
        return _config_file(Path(os.path.expanduser(os.path.expandvars(explicit))))
    env_value = os.environ.get("SAGEPLEX_CFG")
    if env_value:
        return _config_file(Path(os.path.expanduser(os.path.expandvars(env_value))))
    searched = [d / CONFIG_FILE_NAME for d in plex_data_dirs()]
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


def load_config(path: Path) -> Config:
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
    SECRETS.add(config.sage.password, config.plex.token)
    if config.sage.user or config.sage.password:
        SECRETS.add(base64.b64encode(f"{config.sage.user}:{config.sage.password}".encode())
                    .decode())
    return config


def parse_config(data: object, path: Path) -> Config:
    """Check the original schema: {"sagex": {host, port, user, password}, "plex": {host, port,
    token}}; other sections (the scanner's, the agent's) are ignored."""
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object with 'sagex' and 'plex'")

    def section(name: str) -> dict:
        value = data.get(name)
        if value is None:
            raise ConfigError(f"config file {path}: key '{name}' is missing; "
                              f"copy it from {CONFIG_FILE_NAME}.example")
        if not isinstance(value, dict):
            raise ConfigError(f"config file {path}: '{name}' must be an object "
                              f"like {{\"host\": ..., \"port\": ...}}")
        return value

    def text(sect: dict, name: str, key: str, required: bool = True) -> str:
        value = sect.get(key)
        if value is None:
            if required:
                raise ConfigError(f"config file {path}: key '{name}.{key}' is missing; add it")
            return ""
        if not isinstance(value, str) or (required and not value.strip()):
            raise ConfigError(f"config file {path}: '{name}.{key}' must be a non-empty string")
        return value.strip() if key == "host" else value

    def port(sect: dict, name: str) -> int:
        value = sect.get("port")
        if value is None:
            raise ConfigError(f"config file {path}: key '{name}.port' is missing; add it")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise ConfigError(f"config file {path}: '{name}.port' must be a number from 1 to "
                              f"65535 (without quotes), not {json.dumps(value)}")
        return value

    def timeout(sect: dict, name: str) -> float:
        value = sect.get("timeout", DEFAULT_TIMEOUT_S)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"config file {path}: '{name}.timeout' must be a positive number "
                              f"of seconds, not {json.dumps(value)}")
        return float(value)

    sagex, plex = section("sagex"), section("plex")
    sage_config = ServerConfig(
        "sagex", text(sagex, "sagex", "host"), port(sagex, "sagex"),
        user=text(sagex, "sagex", "user"), password=text(sagex, "sagex", "password"),
        timeout_s=timeout(sagex, "sagex"))
    # The original config had no token: a PMS that trusts its LAN needs none.
    plex_config = ServerConfig(
        "plex", text(plex, "plex", "host"), port(plex, "plex"),
        token=text(plex, "plex", "token", required=False), timeout_s=timeout(plex, "plex"))
    return Config(path, sage_config, plex_config)


###############################################################################
# The SageTV client ###########################################################
###############################################################################


class _Counter:
    """Counts the replies a client received (the benchmark reports them)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, response: requests.Response, *args: object, **kwargs: object) -> None:
        self.count += 1


def _session(retries: Retry, counter: _Counter,
             pool_size: int = WRITE_WORKERS + 2) -> requests.Session:
    session = requests.Session()
    session.hooks["response"].append(counter)
    session.trust_env = False  # a proxy from the environment has no business with a LAN server
    adapter = HTTPAdapter(max_retries=retries, pool_connections=2, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _read_retries() -> Retry:
    return Retry(total=READ_RETRIES, connect=READ_RETRIES, read=2, status=READ_RETRIES,
                 other=0, backoff_factor=RETRY_BACKOFF_S,
                 status_forcelist=(429, 500, 502, 503, 504), allowed_methods={"GET"},
                 raise_on_status=False)


def _write_retries() -> Retry:
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
    unknown one) that is as lenient as plexapi's query(): bytes that do not decode become
    U+FFFD, as in requests' response.text, and the control characters XML does not allow
    are dropped, as utils.cleanXMLString does."""
    found = re.search(r"charset=([\w.:-]+)", content_type)
    try:
        codec = codecs.lookup(found.group(1) if found else "utf-8")
    except LookupError:
        codec = codecs.lookup("utf-8")
    decode = codec.incrementaldecoder(errors="replace").decode
    if codec.encode("\x01")[0] != b"\x01":
        return decode  # not ASCII-based (UTF-16...): no control bytes to drop
    return lambda data, final=False: decode(data.translate(None, XML_C0_CONTROLS), final)


def _transport_error(server: ServerConfig, exc: requests.RequestException, what: str) -> str:
    label = "SageTV" if server.name == "sagex" else "Plex"
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
        return (f"{label} at {server.address} did not answer within {server.timeout_s:g} s "
                f"({what}); check the server, or raise {server.name}.timeout in the config")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return (f"{label} at {server.address} cut its reply off {what} (connection lost); "
                "check that the server is running, then try again")
    if isinstance(exc, requests.ConnectionError):
        reason = "connection refused" if "refused" in str(exc).lower() else "connection lost"
        return (f"cannot reach {label} at {server.address} ({reason}, {what}); check "
                f"{server.name}.host and {server.name}.port and that the server is running")
    return f"{label} at {server.address} failed {what}: {exc.__class__.__name__}"


_ClientT = TypeVar("_ClientT", bound="_Client")


class _Client:
    """What both clients share: a session for reads (retried) and one for writes (not
    retried once sent), counted, and closed on leaving a ``with`` block."""

    def __init__(self, server: ServerConfig) -> None:
        self.server = server
        self._counter = _Counter()
        self._reads = _session(_read_retries(), self._counter)
        self._writes = _session(_write_retries(), self._counter)

    @property
    def request_count(self) -> int:
        return self._counter.count

    def __enter__(self: _ClientT) -> _ClientT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._reads.close()
        self._writes.close()


class SageClient(_Client):
    """The sagex HTTP API: one bulk listing, lookups by id, and the three watched writes.

    Credentials travel in the Authorization header (never in a URL, which would put
    them in error messages). Reads are retried on transient failures; writes are not.
    """

    def __init__(self, server: ServerConfig) -> None:
        super().__init__(server)
        self.url = f"{server.base_url}/sagex/api"
        for session in (self._reads, self._writes):
            session.auth = (server.user, server.password)

    def call(self, function: str, *args: object, write: bool = False,
             start: int | None = None, size: int | None = None,
             fields: list[str] | None = None) -> dict:
        """Call one sagex function and return the decoded JSON object."""
        params: dict[str, object] = {"c": function, "encoder": "json"}
        for number, arg in enumerate(args, start=1):
            params[str(number)] = arg
        if start is not None:
            params["start"] = start
        if size is not None:
            params["size"] = size
        if fields:
            params["filter"] = "|".join(fields)
        what = f"to {function}"
        log.debug("sagex %s %s", function, args)
        session = self._writes if write else self._reads

        def get() -> requests.Response:
            return session.get(self.url, params=params, timeout=self.server.timeout_s)
        try:
            response = get() if write else _read_again_if_cut_off(get)
        except requests.RequestException as exc:
            log.debug("sagex %s failed: %r", function, exc)
            raise SageError(_transport_error(self.server, exc, what)) from None
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
            data = response.json()
        except ValueError:
            raise SageError(f"{where} sent a reply {what} that is not JSON "
                            f"({len(response.content)} bytes); is this a sagex server?") from None
        if not isinstance(data, dict):
            raise SageError(f"{where} sent an unexpected reply {what} (not a JSON object)")
        # A top-level "error" is a failed call (sagex-api.md §3.1); one nested inside a
        # serialized object is only a getter that failed, and is ignored.
        error = data.get("error")
        if error is None and isinstance(data.get("exception"), str):
            error = data["exception"]  # a Java exception with no message has only this
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else error
            first_line = (str(message or "unknown error").splitlines() or ["unknown error"])[0]
            raise SageError(f"{where} reported an error {what}: {first_line}")
        return data

    def media_files(self) -> list[dict]:
        """Every recorded TV and imported video file, with its airing: one request."""
        records: list[dict] = []
        while True:
            page = self.call("GetMediaFiles", "TV", start=len(records), size=SAGEX_PAGE_SIZE,
                             fields=SAGE_FIELDS).get("Result")
            if not isinstance(page, list):
                raise SageError(f"SageTV at {self.server.address} sent a media file listing "
                                "without a 'Result' list")
            records.extend(page)
            if len(page) < SAGEX_PAGE_SIZE:  # sagex gives no total: a short page is the last
                return records

    def media_file(self, media_file_id: int, full: bool = False) -> dict | None:
        """One media file by id (None when SageTV does not know it)."""
        reply = self.call("GetMediaFileForID", media_file_id,
                          fields=None if full else SAGE_FIELDS)
        record = reply.get("MediaFile")
        return record if isinstance(record, dict) else None

    def segment_times(self, media_file_id: int, count: int) -> list[tuple[int, int]]:
        """Start and end (airing timeline, ms) of each segment of a multi-segment file."""
        ref = f"mediafile:{media_file_id}"
        return [(int(self.call("GetStartForSegment", ref, index).get("Result") or 0),
                 int(self.call("GetEndForSegment", ref, index).get("Result") or 0))
                for index in range(count)]

    def set_watched(self, airing_id: int) -> None:
        self.call("SetWatched", f"airing:{airing_id}", write=True)

    def clear_watched(self, airing_id: int) -> None:
        self.call("ClearWatched", f"airing:{airing_id}", write=True)

    def set_watched_times(self, airing_id: int, watched_end_ms: int, real_start_ms: int) -> None:
        self.call("SetWatchedTimes", f"airing:{airing_id}", int(watched_end_ms),
                  int(real_start_ms), write=True)


###############################################################################
# The Plex client #############################################################
###############################################################################


@dataclass(frozen=True)
class PlexSection:
    key: int
    title: str
    type: str
    locations: tuple[str, ...] = ()


class PlexClient(_Client):
    """Plex Media Server through plexapi: raw listings (no per-item objects, no autoreload),
    and the scrobble and timeline writes exactly as plexapi's markPlayed/updateTimeline send
    them. The token travels in the X-Plex-Token header only."""

    def __init__(self, server: ServerConfig) -> None:
        super().__init__(server)
        self._plex: Any = None

    def _guard(self, what: str, call: Callable[[], Any], missing: str | None = None) -> Any:
        """Run a plexapi call, turning its exceptions into one-line PlexErrors."""
        with self._plex_errors(what, missing):
            return call()

    @contextlib.contextmanager
    def _plex_errors(self, what: str, missing: str | None = None) -> Iterator[None]:
        """plexapi's and requests' exceptions inside the block, as one-line PlexErrors."""
        from plexapi import exceptions as plex_errors

        where = f"Plex at {self.server.address}"
        try:
            yield
        except plex_errors.Unauthorized:
            raise PlexError(f"{where} refused the token (HTTP 401); "
                            "check plex.token in the config") from None
        except plex_errors.NotFound:
            raise (UsageError(missing) if missing else
                   PlexError(f"{where} answered HTTP 404 {what}")) from None
        except plex_errors.BadRequest as exc:
            code = re.match(r"\((\d+)\)", str(exc))
            status = f"HTTP {code.group(1)}" if code else "an error"
            hint = ("; the token's user may not manage this server"
                    if code and code.group(1) == "403" else "")
            raise PlexError(f"{where} answered {status} {what}{hint}") from None
        except requests.RequestException as exc:
            log.debug("plex %s failed: %r", what, exc)
            raise PlexError(_transport_error(self.server, exc, what)) from None
        except ParseError:
            raise PlexError(f"{where} sent a reply {what} that is not valid XML") from None
        except AttributeError:  # plexapi on an empty or alien reply
            raise PlexError(f"{where} sent an unexpected reply {what}") from None

    @property
    def plex(self) -> Any:
        """The plexapi PlexServer, connected on first use (one request)."""
        if self._plex is None:
            from plexapi.server import PlexServer

            self._plex = self._guard("when connecting", lambda: PlexServer(
                self.server.base_url, self.server.token or None, session=self._reads,
                timeout=self.server.timeout_s))
            # A plexapi config.ini with show_secrets would put the token into every URL.
            self._plex._showSecrets = False
            if getattr(self._plex, "machineIdentifier", None) is None and \
                    getattr(self._plex, "version", None) is None:
                raise PlexError(f"Plex at {self.server.address} sent an empty reply when "
                                "connecting; is this a Plex Media Server?")
        return self._plex

    def query(self, path: str, what: str, *, write: str = "",
              headers: dict[str, str] | None = None, missing: str | None = None) -> Any:
        """A raw plexapi query: the parsed XML root (None for an empty reply). ``write``
        names the HTTP method of a write, which goes through the session that never
        retries a request that reached the server."""
        plex = self.plex
        method = getattr(self._writes, write) if write else None

        def call() -> Any:
            return plex.query(path, method=method, headers=headers)
        return self._guard(what, call if write else lambda: _read_again_if_cut_off(call),
                           missing=missing)

    def sections(self) -> list[PlexSection]:
        root = self.query("/library/sections", "to the section listing")
        if root is None:
            return []
        return [PlexSection(int(d.get("key", 0)), d.get("title", ""), d.get("type", ""),
                            tuple(loc.get("path", "") for loc in d.iter("Location")))
                for d in root.iter("Directory")]

    def section_videos(self, section: PlexSection) -> Iterator[Element]:
        """Every movie or episode of a section, in as few requests as the server allows,
        each as soon as it has arrived."""
        path = f"/library/sections/{section.key}/all?type={VIDEO_SECTION_TYPES[section.type]}"
        what = f"to the listing of section {section.key}"
        start = 0
        while True:
            container: dict[str, str] = {}
            videos = self._streamed_videos(path, {
                "X-Plex-Container-Start": str(start),
                "X-Plex-Container-Size": str(PLEX_PAGE_SIZE)}, container)
            count = 0
            with self._plex_errors(what):
                for video in videos:
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

    def _streamed_videos(self, path: str, headers: dict[str, str],
                         container: dict[str, str]) -> Iterator[Element]:
        """The Video children of one listing page, parsed while the reply streams in
        (plexapi's raw query path without the object layer, and without holding the reply
        or its tree: a video is dropped once handed on). The page's own attributes go
        into ``container``. Errors are plexapi's and requests' own, as from query(); a
        reply cut off half-way is asked for again, skipping the videos already handed on."""
        done = 0
        for attempt in range(READ_RETRIES + 1):
            skip = done
            try:
                for video in self._parse_listing(path, headers, container):
                    if skip:
                        skip -= 1
                        continue
                    done += 1
                    yield video
                return
            except requests.exceptions.ChunkedEncodingError as exc:
                if attempt == READ_RETRIES:
                    raise
                log.debug("reply cut off (%r); asking again", exc)
                time.sleep(RETRY_BACKOFF_S * 2 ** attempt)

    def _parse_listing(self, path: str, headers: dict[str, str],
                       container: dict[str, str]) -> Iterator[Element]:
        from plexapi import exceptions as plex_errors

        plex = self.plex
        log.debug("GET %s (streamed)", path)
        response = self._reads.get(plex.url(path), headers=plex._headers(**headers),
                                   timeout=self.server.timeout_s, stream=True)
        with response:
            status = response.status_code
            if status not in (200, 201, 204):  # as plexapi's query() raises them
                error = (plex_errors.Unauthorized if status == 401 else
                         plex_errors.NotFound if status == 404 else plex_errors.BadRequest)
                raise error(f"({status}) {response.reason}; {response.url} "
                            f"{response.text[:200]}".replace("\n", " "))
            decode = _reply_decoder(response.headers.get("Content-Type", ""))
            parser = XMLPullParser(events=("start", "end"))
            root: Element | None = None
            depth = 0
            empty = True  # plexapi reads an empty (or blank) reply as no container at all
            chunks = response.iter_content(PLEX_STREAM_CHUNK)
            while True:
                chunk = next(chunks, None)
                if chunk is None:
                    if empty:
                        return
                    parser.feed(decode(b"", True))
                    parser.close()
                else:
                    text = decode(chunk)
                    if empty and not text.strip():
                        continue
                    empty = False
                    parser.feed(text)
                for event, element in parser.read_events():
                    if event == "start":
                        if depth == 0:
                            root = element
                            container.update(root.attrib)
                        depth += 1
                        continue
                    depth -= 1
                    if depth == 1:  # a whole child of the container: hand it on, keep nothing
                        assert root is not None
                        root.remove(element)
                        if element.tag == "Video":
                            yield element
                if chunk is None:
                    return

    def metadata(self, rating_key: int) -> Element:
        """One item's element (movie, episode, season or show)."""
        root = self.query(f"/library/metadata/{rating_key}", f"to media id {rating_key}",
                          missing=f"Plex has no media id {rating_key}; "
                                  "run with a section name to see the media ids")
        children = [] if root is None else list(root)
        if not children:
            raise UsageError(f"Plex has no media id {rating_key}; "
                             "run with a section name to see the media ids")
        return children[0]

    def videos_of(self, rating_key: int) -> list[Element]:
        """The movie or episode itself, or every episode of a show or season."""
        element = self.metadata(rating_key)
        kind = element.get("type")
        if element.tag == "Video" and kind in ("movie", "episode"):
            return [element]
        if kind in ("show", "season"):
            leaves = "allLeaves" if kind == "show" else "children"
            root = self.query(f"/library/metadata/{rating_key}/{leaves}",
                              f"to the episodes of media id {rating_key}")
            return [] if root is None else root.findall("Video")
        raise UsageError(f"Plex media id {rating_key} is a {kind or element.tag}, not a movie, "
                         "episode, season or show")

    def mark_watched(self, rating_key: int) -> None:
        self.query(f"/:/scrobble?key={rating_key}&identifier={PLEX_LIBRARY}",
                   f"to marking media id {rating_key} watched", write="get")

    def set_position(self, rating_key: int, position_ms: int, duration_ms: int) -> None:
        # The timeline call, unlike /:/progress, also works for managed (Home) users.
        self.query(f"/:/timeline?ratingKey={rating_key}&key=/library/metadata/{rating_key}"
                   f"&identifier={PLEX_LIBRARY}&time={int(position_ms)}&state=stopped"
                   f"&duration={int(duration_ms)}",
                   f"to setting the position of media id {rating_key}", write="get")

    def add_section(self, name: str, kind: dict, paths: list[str]) -> None:
        """plexapi's library.add: it checks each folder with the browse call, then POSTs."""
        from plexapi import exceptions as plex_errors

        def add() -> None:
            try:
                self.plex.library.add(name=name, type=kind["type"], agent=kind["agent"],
                                      scanner=kind["scanner"], location=paths, language="en")
            except plex_errors.BadRequest as exc:
                found = re.search(r"Path: (.*) does not exist", str(exc))
                if found:
                    raise UsageError(f"Plex cannot see the folder {found.group(1)}; give "
                                     "folders as the Plex server sees them") from None
                raise

        self._guard("to adding a section", add)

    def delete_section(self, key: int) -> None:
        self.query(f"/library/sections/{key}", f"to deleting section {key}", write="delete")

    def refresh_section(self, key: int) -> None:
        self.query(f"/library/sections/{key}/refresh", f"to refreshing section {key}",
                   write="get")


###############################################################################
# Items and their normalisation ###############################################
###############################################################################


class Kind(Enum):
    NONE = "not watched"
    PROGRESS = "in progress"
    WATCHED = "watched"


@dataclass(frozen=True)
class SideState:
    """One side's raw watch data for an item, in ms (sync-rules.md §1)."""

    watched: bool
    position_ms: int
    duration_ms: int
    last_watched_ms: int
    is_movie: bool = False


@dataclass(frozen=True)
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


#: The two statuses without a position, shared (most items are one of them).
WATCHED = Status(Kind.WATCHED)
NOT_WATCHED = Status(Kind.NONE)


def format_hms(ms: int) -> str:
    seconds = max(0, int(ms)) // 1000
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def end_ms(side: SideState) -> float:
    """Where 'finished' starts: 5% or SageTV's margin before the end, whichever is earlier."""
    if side.duration_ms <= 0:
        return float("inf")  # no duration: no position can be called finished
    margin = SAGE_END_MARGIN_MOVIE_MS if side.is_movie else SAGE_END_MARGIN_MS
    return side.duration_ms - max(side.duration_ms * END_FRACTION, margin)


def classify(side: SideState, *, is_sage: bool, ignore_ms: int) -> Status:
    """Reduce one side to NONE, PROGRESS(position) or WATCHED (sync-rules.md §1)."""
    if is_sage and side.watched:
        return WATCHED  # SageTV leaves its position at the end: it means nothing
    position = side.position_ms
    if position <= 0:
        return WATCHED if side.watched else NOT_WATCHED
    end = end_ms(side)
    if max(ignore_ms, 1) <= position < end:
        return Status(Kind.PROGRESS, position)  # on Plex, also a rewatch in progress
    if position >= end:
        return WATCHED
    return WATCHED if side.watched else NOT_WATCHED


@dataclass
class SageItem:
    """A SageTV media file and its airing, as the sync needs them."""

    media_file_id: int
    airing_id: int
    title: str
    paths: tuple[str, ...]
    segment_count: int
    file_start_ms: int
    file_duration_ms: int
    watched: bool
    watched_end_ms: int
    real_start_ms: int
    real_end_ms: int
    show_id: str
    is_movie: bool
    #: (start, end) on the airing timeline of each segment; filled in for multi-segment
    #: files only when needed (two sagex calls per segment).
    segments: tuple[tuple[int, int], ...] | None = None


def sage_item_from_json(record: dict) -> SageItem:
    """The only code that reads raw sagex keys."""
    airing = record.get("Airing") or {}
    show = airing.get("Show") or {}
    show_id = str(show.get("ShowExternalID") or "")
    file_start = int(record.get("FileStartTime") or 0)
    duration = int(record.get("FileDuration") or 0)
    count = int(record.get("NumberOfSegments") or 1)
    title = str(show.get("ShowTitle") or record.get("MediaTitle") or "")
    if show.get("ShowEpisode") and show.get("ShowEpisode") != title:
        title = f"{title} - {show['ShowEpisode']}"
    return SageItem(
        media_file_id=int(record.get("MediaFileID") or 0),
        airing_id=int(airing.get("AiringID") or 0),
        title=title,
        paths=tuple(str(p) for p in record.get("SegmentFiles") or ()),
        segment_count=count,
        file_start_ms=file_start,
        file_duration_ms=duration,
        watched=bool(airing.get("IsWatched")),
        watched_end_ms=int(airing.get("WatchedEndTime") or 0),
        real_start_ms=int(airing.get("RealWatchedStartTime") or 0),
        real_end_ms=int(airing.get("RealWatchedEndTime") or 0),
        show_id=show_id,
        # IsMovie exists only in newer sagex; an MV external id says the same.
        is_movie=bool(show.get("IsMovie")) or show_id.startswith("MV"),
        segments=((file_start, file_start + duration),) if count <= 1 else None,
    )


def covered_segments(item: SageItem, plex_names: Iterable[str]) -> tuple[tuple[int, int], ...]:
    """The segments a Plex item plays: all of them when it has every segment file as a
    part (stacked), else those whose file names it has."""
    assert item.segments is not None, "segment times are read before positions are used"
    if item.segment_count <= 1:
        return item.segments
    wanted = set(plex_names)
    chosen = tuple(seg for path, seg in zip(item.paths, item.segments)
                   if file_name(path) in wanted)
    return chosen or item.segments


def position_from_sage_time(time_ms: int, segments: tuple[tuple[int, int], ...]) -> int:
    """A SageTV watched-end time (airing timeline) as an offset into the stacked segments;
    a time in a gap between segments rounds forward (sagex-api.md §7.2)."""
    offset = 0
    for start, end in segments:
        if time_ms < start:
            return offset
        if time_ms < end:
            return offset + time_ms - start
        offset += end - start
    return offset


def sage_time_from_position(position_ms: int, segments: tuple[tuple[int, int], ...]) -> int:
    """The inverse: a file offset as the airing-timeline time SetWatchedTimes takes."""
    offset = 0
    for start, end in segments:
        if position_ms < offset + end - start:
            return start + position_ms - offset
        offset += end - start
    return segments[-1][1]


def sage_state(item: SageItem, segments: tuple[tuple[int, int], ...]) -> SideState:
    duration = sum(end - start for start, end in segments)
    position = (position_from_sage_time(item.watched_end_ms, segments)
                if item.watched_end_ms > 0 else 0)
    return SideState(item.watched, max(0, min(position, duration)), duration, item.real_end_ms,
                     item.is_movie)


@dataclass
class PlexItem:
    """A Plex movie or episode, as the sync needs it."""

    rating_key: int
    title: str
    paths: tuple[str, ...]
    state: SideState


def plex_item_from_element(video: Element) -> PlexItem:
    """The only code that reads raw Plex attributes."""
    attrs = video.attrib
    if attrs.get("type") == "episode":
        title = attrs.get("grandparentTitle") or ""
        season, episode = attrs.get("parentIndex"), attrs.get("index")
        if season is not None and episode is not None:
            title += f" - s{int(season):02d}e{int(episode):02d}"
        title += f" - {attrs.get('title', '')}"
    else:
        title = attrs.get("title", "")
        if attrs.get("year"):
            title += f" ({attrs['year']})"
    paths = tuple(part.get("file", "") for part in video.iter("Part") if part.get("file"))
    return PlexItem(
        rating_key=int(attrs.get("ratingKey", 0)),
        title=title,
        paths=paths,
        state=SideState(
            watched=int(attrs.get("viewCount") or 0) > 0,
            position_ms=int(attrs.get("viewOffset") or 0),
            duration_ms=int(attrs.get("duration") or 0),
            last_watched_ms=int(attrs.get("lastViewedAt") or 0) * 1000,
            is_movie=attrs.get("type") == "movie",
        ),
    )


def file_name(path: str) -> str:
    """A path's last component, whichever separator the server uses (SageTV on Windows
    says F:\\TV\\x.mpg where Plex on Linux says /mnt/tv/x.mpg), in one Unicode form."""
    name = path[max(path.rfind("/"), path.rfind("\\")) + 1:]
    return name if name.isascii() else unicodedata.normalize("NFC", name)


###############################################################################
# Matching ####################################################################
###############################################################################


class SageIndex:
    """SageTV's media files by file name (every segment of every file)."""

    def __init__(self, items: Iterable[SageItem]) -> None:
        self.items: list[SageItem] = []
        self.by_name: dict[str, list[SageItem]] = collections.defaultdict(list)
        self._by_show: dict[str, list[SageItem]] | None = None  # made when first needed
        for item in items:
            self.items.append(item)
            paths = item.paths
            names = (file_name(paths[0]),) if len(paths) == 1 else {file_name(p) for p in paths}
            for name in names:
                self.by_name[name].append(item)

    def __len__(self) -> int:
        return len(self.items)

    def match(self, plex_item: PlexItem) -> list[SageItem]:
        """The SageTV files the Plex item's parts name: none, one, or (ambiguous) more."""
        paths = plex_item.paths
        if len(paths) == 1:  # most items: one part, and a name lists each file once
            return list(self.by_name.get(file_name(paths[0]), ()))
        found: dict[int, SageItem] = {}
        for name in {file_name(p) for p in paths}:
            for item in self.by_name.get(name, ()):
                found[id(item)] = item
        return list(found.values())

    @property
    def by_show(self) -> dict[str, list[SageItem]]:
        """The media files of each show (ShowExternalID)."""
        if self._by_show is None:
            self._by_show = collections.defaultdict(list)
            for item in self.items:
                if item.show_id:
                    self._by_show[item.show_id].append(item)
        return self._by_show

    def watched_siblings(self, item: SageItem) -> list[SageItem]:
        """Other watched recordings of the same show, which a ClearWatched un-watches too."""
        return [other for other in self.by_show.get(item.show_id, ())
                if other is not item and other.watched]


###############################################################################
# The sync decision ###########################################################
###############################################################################


class Verdict(Enum):
    IN_SYNC = "OK"
    PLEX_OUT_OF_SYNC = "PLEX out of sync"
    SAGE_OUT_OF_SYNC = "SageTV out of sync"


@dataclass(frozen=True)
class PlexMarkWatched:
    def __str__(self) -> str:
        return "mark watched on Plex"


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
class SageSetPosition:
    position_ms: int
    #: SetWatchedTimes only moves a position forward and ignores a watched airing.
    clear_first: bool
    #: When the viewing began (wall clock): Plex's last view minus the position.
    real_start_ms: int

    def __str__(self) -> str:
        clear = "clear watched, then " if self.clear_first else ""
        return f"{clear}set SageTV position to {format_hms(self.position_ms)}"


Write = Union[PlexMarkWatched, PlexSetPosition, SageMarkWatched, SageSetPosition]


@dataclass(frozen=True)
class Options:
    ignore_ms: int = DEFAULT_IGNORE_S * 1000


@dataclass(frozen=True)
class Action:
    verdict: Verdict
    sage: Status
    plex: Status
    writes: tuple[Write, ...] = ()
    row: int = 0
    #: A write the rules call for that cannot be done, and why (reported as skipped).
    blocked: str = ""


#: Both sides watched, or neither: most items, one shared answer each.
_IN_SYNC = {status.kind: Action(Verdict.IN_SYNC, status, status)
            for status in (WATCHED, NOT_WATCHED)}


def _plex_position(position_ms: int) -> tuple[tuple[Write, ...], str]:
    """The Plex position write, or why it cannot be written."""
    write = PlexSetPosition(position_ms)
    if position_ms <= PLEX_MIN_PROGRESS_MS:
        return (), f"{write}: Plex ignores positions of a minute or less"
    return (write,), ""


def _sage_position(sage: SideState, plex: SideState, position_ms: int) -> SageSetPosition:
    viewed_at = plex.last_watched_ms if plex.last_watched_ms > 0 else 0
    return SageSetPosition(position_ms, clear_first=sage.watched or sage.position_ms > position_ms,
                           real_start_ms=max(0, viewed_at - position_ms))


def decide(sage: SideState, plex: SideState, opts: Options) -> Action:
    """What to write where, from the two sides' states alone (sync-rules.md §§1-3).

    The newer side has the larger last_watched_ms (a tie goes to SageTV, as in the
    original); NONE never wins, so a sync never throws away a watched mark or a position.
    """
    s = classify(sage, is_sage=True, ignore_ms=opts.ignore_ms)
    p = classify(plex, is_sage=False, ignore_ms=opts.ignore_ms)
    if s is p:  # the same shared status: both watched, or both not
        return _IN_SYNC[s.kind]
    if s == p:
        return Action(Verdict.IN_SYNC, s, p)
    plex_newer = plex.last_watched_ms > sage.last_watched_ms

    def to_plex(row: int, writes: tuple[Write, ...], blocked: str = "") -> Action:
        return Action(Verdict.PLEX_OUT_OF_SYNC, s, p, writes, row, blocked)

    def to_sage(row: int, write: Write) -> Action:
        return Action(Verdict.SAGE_OUT_OF_SYNC, s, p, (write,), row)

    if s.kind is Kind.WATCHED and p.kind is Kind.NONE:  # row 1
        return to_plex(1, (PlexMarkWatched(),))
    if s.kind is Kind.NONE and p.kind is Kind.WATCHED:  # row 2
        return to_sage(2, SageMarkWatched())
    if s.kind is Kind.PROGRESS and p.kind is Kind.NONE:  # row 3
        return to_plex(3, *_plex_position(s.position_ms))
    if s.kind is Kind.NONE and p.kind is Kind.PROGRESS:  # row 4
        return to_sage(4, _sage_position(sage, plex, p.position_ms))
    if s.kind is Kind.WATCHED and p.kind is Kind.PROGRESS:  # row 5: a rewatch on one side
        if plex_newer:
            return to_sage(5, _sage_position(sage, plex, p.position_ms))
        return to_plex(5, (PlexMarkWatched(),))
    if s.kind is Kind.PROGRESS and p.kind is Kind.WATCHED:  # row 6
        if plex_newer:
            return to_sage(6, SageMarkWatched())
        return to_plex(6, *_plex_position(s.position_ms))
    # row 7: both in progress at different positions
    if plex_newer:
        return to_sage(7, _sage_position(sage, plex, p.position_ms))
    return to_plex(7, *_plex_position(s.position_ms))


def decide_position(sage: SideState, plex: SideState, position_ms: int, opts: Options) -> Action:
    """--position: that position on both sides, whatever the rules say."""
    s = classify(sage, is_sage=True, ignore_ms=opts.ignore_ms)
    p = classify(plex, is_sage=False, ignore_ms=opts.ignore_ms)
    target = Status(Kind.PROGRESS, position_ms)
    writes: tuple[Write, ...] = ()
    blocked = ""
    plex_needs = not (p == target and abs(plex.position_ms - position_ms) < POSITION_TOLERANCE_MS)
    if plex_needs:
        writes, blocked = _plex_position(position_ms)
    sage_needs = sage.watched or abs(sage.position_ms - position_ms) >= POSITION_TOLERANCE_MS
    if sage_needs:
        # The position is the user's, not a viewing: SageTV's real-time start is "now".
        writes += (_sage_position(sage, replace(plex, last_watched_ms=0), position_ms),)
    verdict = (Verdict.PLEX_OUT_OF_SYNC if plex_needs else
               Verdict.SAGE_OUT_OF_SYNC if sage_needs else Verdict.IN_SYNC)
    return Action(verdict, s, p, writes, 0, blocked)


###############################################################################
# The applier #################################################################
###############################################################################


class Outcome(Enum):
    UNCHANGED = "unchanged"  # nothing to write (in sync, or report mode)
    UPDATED = "updated"
    SIMULATED = "simulated"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass
class Pair:
    """One Plex item, what it matched in SageTV, and what to do about it."""

    plex: PlexItem
    sage: SageItem | None = None
    candidates: int = 0
    segments: tuple[tuple[int, int], ...] = ()
    action: Action | None = None
    outcome: Outcome = Outcome.UNCHANGED
    detail: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def sage_side(self) -> SideState:
        assert self.sage is not None
        return sage_state(self.sage, self.segments)


class Applier:
    """The only code that writes. Every SageTV write is read back, because sagex answers
    the same `{}` whether a write worked or did nothing (sagex-api.md §3)."""

    def __init__(self, sage: SageClient, plex: PlexClient, opts: Options,
                 clock_ms: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        self.sage = sage
        self.plex = plex
        self.opts = opts
        self.clock_ms = clock_ms

    def apply(self, pair: Pair) -> None:
        """Do the pair's writes and set its outcome; failures stay with the item."""
        assert pair.action is not None
        done: list[str] = []
        for write in pair.action.writes:
            try:
                note = self._write(pair, write)
            except SyncError as exc:
                pair.outcome, pair.detail = Outcome.FAILED, f"{write}: {exc}"
                return
            done.append(str(write) + (f" ({note})" if note else ""))
        pair.outcome, pair.detail = Outcome.UPDATED, "; ".join(done)

    def _write(self, pair: Pair, write: Write) -> str:
        if isinstance(write, PlexMarkWatched):
            self.plex.mark_watched(pair.plex.rating_key)
            return self._check_plex(pair, WATCHED)
        if isinstance(write, PlexSetPosition):
            self.plex.set_position(pair.plex.rating_key, write.position_ms,
                                   pair.plex.state.duration_ms)
            return self._check_plex(pair, Status(Kind.PROGRESS, write.position_ms))
        if isinstance(write, SageMarkWatched):
            assert pair.sage is not None
            error = self._attempt(lambda: self.sage.set_watched(pair.sage.airing_id))
            after = self._reread_sage(pair)
            if classify(after, is_sage=True, ignore_ms=self.opts.ignore_ms).kind is Kind.WATCHED:
                return ""
            raise SageError(error or "SageTV accepted SetWatched but the item is still "
                                     "not watched")
        return self._sage_set_position(pair, write)

    def _check_plex(self, pair: Pair, intended: Status) -> str:
        element = self.plex.metadata(pair.plex.rating_key)
        state = plex_item_from_element(element).state
        now = classify(state, is_sage=False, ignore_ms=self.opts.ignore_ms)
        if now == intended:
            return ""
        if intended.kind is Kind.PROGRESS and now.kind is Kind.WATCHED:
            # Past the server's "video played threshold" Plex counts the position as a play.
            return "Plex counted the position as played"
        raise PlexError(f"Plex accepted the write but the item is {now}, not {intended}")

    @staticmethod
    def _attempt(call: Callable[[], None]) -> str:
        """Run a write whose effect is judged by reading back: its error, or ''."""
        try:
            call()
        except SyncError as exc:
            return str(exc)
        return ""

    def _reread_sage(self, pair: Pair) -> SideState:
        assert pair.sage is not None
        record = self.sage.media_file(pair.sage.media_file_id)
        if record is None:
            raise SageError(f"SageTV no longer has media file {pair.sage.media_file_id}")
        return sage_state(sage_item_from_json(record), pair.segments)

    def _sage_set_position(self, pair: Pair, write: SageSetPosition) -> str:
        """ClearWatched (if needed), then SetWatchedTimes, then read back; if the position
        did not take but the clear did, restore what was there: an item is never left
        less watched than it was."""
        item = pair.sage
        assert item is not None
        before = pair.sage_side
        target = sage_time_from_position(write.position_ms, pair.segments)
        real_start = write.real_start_ms or max(1, self.clock_ms() - write.position_ms)
        error = ""
        if write.clear_first:
            error = self._attempt(lambda: self.sage.clear_watched(item.airing_id))
        if not error:
            error = self._attempt(
                lambda: self.sage.set_watched_times(item.airing_id, target, real_start))
        after = self._reread_sage(pair)
        intended = classify(replace(before, watched=False, position_ms=write.position_ms),
                            is_sage=True, ignore_ms=self.opts.ignore_ms)
        now = classify(after, is_sage=True, ignore_ms=self.opts.ignore_ms)
        if now == intended:
            return ""
        if (now.kind is Kind.WATCHED and intended.kind is Kind.PROGRESS
                and abs(after.position_ms - write.position_ms) < POSITION_TOLERANCE_MS):
            # The position took, and SageTV's own rule (near the end of the airing, which
            # its padding can put before the file's end) made it a full watch.
            return "SageTV counts this position as watched"
        reason = error or f"SageTV accepted the write but the item is {now}, not {intended}"
        if self._less_watched(after, before):
            restored = self._restore(pair, before)
            raise SageError(f"{reason}; {restored}")
        raise SageError(reason)

    @staticmethod
    def _less_watched(after: SideState, before: SideState) -> bool:
        lost_position = after.position_ms + POSITION_TOLERANCE_MS < before.position_ms
        return (before.watched and not after.watched) or lost_position

    def _restore(self, pair: Pair, before: SideState) -> str:
        item = pair.sage
        assert item is not None
        if before.watched:
            self._attempt(lambda: self.sage.set_watched(item.airing_id))
        elif item.watched_end_ms > 0:
            real_start = item.real_start_ms or max(1, self.clock_ms() - before.position_ms)
            self._attempt(lambda: self.sage.set_watched_times(
                item.airing_id, item.watched_end_ms, real_start))
        try:
            again = self._reread_sage(pair)
        except SyncError:
            return "could not read it back after restoring what SageTV had"
        if not self._less_watched(again, before):
            return "restored what SageTV had"
        was = classify(before, is_sage=True, ignore_ms=self.opts.ignore_ms)
        return f"restoring failed too: it was {was} before this run"


###############################################################################
# The report ##################################################################
###############################################################################


@dataclass
class Report:
    """Counts and the out-of-sync lists, in the original tool's words."""

    videos: int = 0
    in_sync: int = 0
    updated: int = 0
    simulated: int = 0
    skipped: int = 0
    failed_writes: int = 0
    plex_out: list[str] = field(default_factory=list)
    sage_out: list[str] = field(default_factory=list)
    not_in_sage: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    interrupted: bool = False
    #: The run stopped half-way on an error (printed on stderr after the summary).
    stopped: bool = False

    def add(self, pair: Pair) -> None:
        self.videos += 1
        label = f"[{pair.plex.rating_key}] {pair.plex.title}"
        action = pair.action
        if pair.sage is None:
            target = self.ambiguous if pair.candidates > 1 else self.not_in_sage
            target.append(f"{label} ({pair.detail})" if pair.detail else label)
            return
        assert action is not None
        if action.verdict is Verdict.IN_SYNC:
            self.in_sync += 1
        else:
            entry = f"{label} (SageTV {action.sage} vs Plex {action.plex})"
            (self.plex_out if action.verdict is Verdict.PLEX_OUT_OF_SYNC
             else self.sage_out).append(entry)
        if pair.outcome is Outcome.UPDATED:
            self.updated += 1
        elif pair.outcome is Outcome.SIMULATED:
            self.simulated += 1
        elif pair.outcome is Outcome.SKIPPED:
            self.skipped += 1
        elif pair.outcome is Outcome.FAILED:
            self.failed_writes += 1
            self.failed.append(f"{label}: {pair.detail}")

    def total_line(self) -> str:
        parts = [f"{self.videos} videos"]
        for count, words in ((self.in_sync, "in-sync"),
                             (len(self.plex_out), "PLEX out-of-sync"),
                             (len(self.sage_out), "SageTV out-of-sync"),
                             (len(self.not_in_sage), "not in SageTV"),
                             (len(self.ambiguous), "ambiguous in SageTV"),
                             (self.updated, "updated"), (self.simulated, "simulated"),
                             (self.skipped, "skipped"), (self.failed_writes, "failed")):
            if count:
                parts.append(f"{count} {words}")
        return "Total: " + ", ".join(parts) + "."

    def summary(self) -> str:
        lines: list[str] = []
        for heading, entries in (("PLEX out of sync:", self.plex_out),
                                 ("SageTV out of sync:", self.sage_out),
                                 ("Not in SageTV:", self.not_in_sage),
                                 ("Ambiguous in SageTV (same file name twice):", self.ambiguous),
                                 ("Failed:", self.failed)):
            if entries:
                lines += ["", heading] + [f"\t{e}" for e in entries]
        if self.interrupted:
            lines += ["", "Interrupted: the summary covers the items done so far."]
        if self.stopped:
            lines += ["", "Stopped by the error below: the summary covers the items done "
                          "so far."]
        lines += ["", self.total_line()]
        return "\n".join(lines)

    def exit_code(self) -> ExitCode:
        if self.interrupted:
            return ExitCode.INTERRUPTED
        return ExitCode.FAILED if self.failed_writes else ExitCode.OK


def item_line(pair: Pair) -> str:
    """One line per item: media id, title, verdict, and what was (or would be) done."""
    head = f"{pair.plex.rating_key:>7}  {pair.plex.title}"
    if pair.sage is None:
        verdict = "ambiguous in SageTV" if pair.candidates > 1 else "not in SageTV"
        return f"{head}  [{verdict}]" + (f"  {pair.detail}" if pair.detail else "")
    action = pair.action
    assert action is not None
    if action.verdict is Verdict.IN_SYNC and not action.writes:
        return f"{head}  [OK]"
    states = f"SageTV {action.sage}, Plex {action.plex}"
    if pair.outcome is Outcome.UNCHANGED:
        return f"{head}  [{action.verdict.value}]  {states}"
    line = f"{head}  [{pair.outcome.value}]  {states}: {pair.detail}"
    return line + "".join(f"; {note}" for note in pair.notes if note)


###############################################################################
# The command line ############################################################
###############################################################################

EPILOG = """\
Compare or synchronize watch status and resume position of the specified Plex library
sections with SageTV. Individual Plex media (movie, episode, season or show) can be
given with -m. Without -s nothing is written.

examples:
  sageplex_sync.py -l                 list the Plex library sections
  sageplex_sync.py all                report every section, write nothing
  sageplex_sync.py all -s             sync every section
  sageplex_sync.py "TV Shows" 2 -s -n show what a sync of two sections would do
  sageplex_sync.py -m 1234 -s         sync one movie, episode, season or show
  sageplex_sync.py -m 1234 -s --position 0:42:10
config: sageplex_cfg.json, found through -c, $SAGEPLEX_CFG (a file or folder) or the
Plex Media Server data folder. Log: $SAGEPLEX_LOG, else sageplex_sync.log in the temp folder.
exit codes: 0 all writes done, 1 a write or the run failed, 2 usage error, 130 interrupted.
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on the run's own stderr (main prints it),
    not a usage block on sys.stderr."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message if "--help" in message else f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sageplex_sync.py", usage="sageplex_sync.py [options] [id [id ...]]",
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
                        help="dump SageTV data for media-id (needs -m)")
    parser.add_argument("--position", metavar="POSITION",
                        help="set explicit resume position h:m:s on Plex and SageTV "
                             "(needs -m and -s)")
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
    actions.add_argument("--refresh", metavar="ID", help="refresh a Plex library section")
    parser.add_argument("-y", "--yes", action="store_true",
                        help="answer yes to --delsec's question (for scripts)")
    parser.add_argument("-c", "--config", metavar="PATH",
                        help="config file or folder (default: $SAGEPLEX_CFG, else the Plex "
                             "Media Server data folder)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show debug detail on stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_position(text: str) -> int:
    """'h:m:s', 'm:s' or 's' as ms; minutes and seconds under 60 after a larger unit."""
    fields = text.strip().split(":")
    if not 1 <= len(fields) <= 3 or not all(f.isdigit() for f in fields):
        raise ValueError(text)
    values = [int(f) for f in fields]
    if any(v >= 60 for v in values[1:]):
        raise ValueError(text)
    seconds = 0
    for value in values:
        seconds = seconds * 60 + value
    return seconds * 1000


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flags that make no sense together, before any server is asked (exit 2)."""
    admin = args.addtv or args.addmovie or args.delsec or args.refresh
    if args.list and args.id:
        parser.error("-l lists the sections and takes no ids; drop the ids or the -l")
    if admin and args.id:
        parser.error("--addtv/--addmovie/--delsec/--refresh take no other ids")
    for flag, value in (("--addtv", args.addtv), ("--addmovie", args.addmovie)):
        if value and len(value) < 2:
            parser.error(f"{flag} needs a NAME and at least one PATH")
    if args.yes and not args.delsec:
        parser.error("-y only answers --delsec's question")
    if (args.list or admin) and (args.media or args.sagedata or args.position or args.prompt
                                 or args.simulate):
        parser.error("-m, --sagedata, --position, -p and -n go with a sync or report, "
                     "not with -l or the library commands")
    if args.ignore < 0:
        parser.error(f"-x must be 0 or more seconds, not {args.ignore}")
    if args.sagedata and not args.media:
        parser.error("--sagedata needs -m and media ids")
    if args.sagedata and (args.sync or args.position):
        parser.error("--sagedata only shows SageTV's data; drop -s / --position")
    if args.position is not None:
        if not (args.media and args.sync):
            parser.error("--position needs -m (media ids) and -s")
        try:
            args.position_ms = parse_position(args.position)
        except ValueError:
            parser.error(f"--position takes h:m:s (like 1:02:30, 42:10 or 90), "
                         f"not {args.position!r}")
    if args.prompt and not args.sync:
        parser.error("-p confirms sync writes; add -s")
    if args.media:
        if not args.id:
            parser.error("-m needs one or more media ids")
        bad = [i for i in args.id if not i.isdigit()]
        if bad:
            parser.error(f"media ids are numbers (see the first column of a report), "
                         f"not {bad[0]!r}")
    if not (args.list or admin or args.id):
        parser.error("nothing to do: give a section (id, name or all), -m media ids, "
                     "-l, or a library command; see --help")
    if args.simulate and not args.sync:
        args.sync = True  # -n alone means: show what a sync would do


def _ask(question: str, err: TextIO) -> bool:
    """Ask on the terminal; with no terminal the answer is no, and we say so."""
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():
        err.write(f"{question} [y/N] no (no terminal to ask on)\n")
        return False
    err.write(f"{question} [y/N] ")
    err.flush()
    answer = stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def resolve_sections(ids: list[str], sections: list[PlexSection]) -> list[PlexSection]:
    """Section ids, names (any case) and 'all', in the order given, without repeats."""
    listing = ", ".join(f"{s.key} ({s.title})" for s in sections) or "none"
    chosen: dict[int, PlexSection] = {}
    for wanted in ids:
        if wanted.lower() == "all":
            chosen.update((s.key, s) for s in sections if s.type in VIDEO_SECTION_TYPES)
            continue
        match = [s for s in sections if (wanted.isdigit() and s.key == int(wanted))
                 or s.title.lower() == wanted.lower()]
        if not match:
            raise UsageError(f"Plex has no library section {wanted!r}; sections are: {listing}")
        section = match[-1]
        if section.type not in VIDEO_SECTION_TYPES:
            raise UsageError(f"section {section.key} ({section.title}) is a {section.type} "
                             "library; only movie and show sections can be synced")
        chosen[section.key] = section
    return list(chosen.values())


class Run:
    """One sync or report run: resolve targets, read SageTV, then per Plex item match,
    decide, apply and report."""

    def __init__(self, args: argparse.Namespace, sage: SageClient, plex: PlexClient, *,
                 out: TextIO, err: TextIO, stop: threading.Event) -> None:
        self.args = args
        self.sage = sage
        self.plex = plex
        self.out = out
        self.err = err
        self.stop = stop
        self.opts = Options(ignore_ms=args.ignore * 1000)
        self.applier = Applier(sage, plex, self.opts)
        self.report = Report()
        self.pending: collections.deque[tuple[Pair, Future | None]] = collections.deque()
        self.writing = 0  # pending items whose writes were handed to the pool
        self.lines: list[str] = []  # output not yet written (see flush)
        self.flush_due = time.monotonic() + OUTPUT_BATCH_S

    def plex_items(self) -> Iterable[PlexItem]:
        """What to work on. Sections are resolved and media ids looked up before anything
        is read from SageTV, so a bad id fails before any write."""
        if self.args.media:
            items = [plex_item_from_element(video)
                     for media_id in dict.fromkeys(int(i) for i in self.args.id)
                     for video in self.plex.videos_of(media_id)]
            if self.args.position is not None:
                for item in items:
                    if 0 < item.state.duration_ms <= self.args.position_ms:
                        raise UsageError(
                            f"--position {self.args.position} is past the end of media id "
                            f"{item.rating_key} ({format_hms(item.state.duration_ms)}); "
                            "give a position inside the item")
            return items
        sections = resolve_sections(self.args.id, self.plex.sections())
        if not sections:
            self.err.write("Plex has no movie or show sections to sync\n")

        def stream() -> Iterator[PlexItem]:
            for section in sections:
                log.info("section %s (%s)", section.key, section.title)
                for video in self.plex.section_videos(section):
                    yield plex_item_from_element(video)
        return stream()

    def prepare(self, plex_item: PlexItem, index: SageIndex) -> Pair:
        """Match and decide one item (reads segment times of a multi-segment file that
        has a position)."""
        pair = Pair(plex_item)
        matches = index.match(plex_item)
        pair.candidates = len(matches)
        if len(matches) != 1:
            if matches:
                pair.detail = "media files " + ", ".join(str(m.media_file_id) for m in matches)
            return pair
        item = pair.sage = matches[0]
        # A split recording's segment times cost two requests a segment: they are read to
        # place a position (SageTV's, or --position) and before writing to SageTV
        # (dispatch). Without a position its state needs no times: it is not watched, or
        # watched, whatever its length.
        if item.segments is not None or self.args.position is not None or (
                item.watched_end_ms > 0 and not item.watched):
            self.read_segments(pair)
        sage = pair.sage_side
        if self.args.position is not None:
            if sage.duration_ms and self.args.position_ms >= sage.duration_ms:
                raise UsageError(f"--position {self.args.position} is past the end of the "
                                 f"SageTV recording of media id {plex_item.rating_key} "
                                 f"({format_hms(sage.duration_ms)})")
            pair.action = decide_position(sage, plex_item.state, self.args.position_ms,
                                          self.opts)
        else:
            pair.action = decide(sage, plex_item.state, self.opts)
        if any(isinstance(w, SageSetPosition) and w.clear_first for w in pair.action.writes):
            siblings = index.watched_siblings(item)
            if siblings:
                pair.notes.append(f"SageTV's ClearWatched also un-watches {len(siblings)} other "
                                  f"recording(s) of this show (media file "
                                  f"{', '.join(str(s.media_file_id) for s in siblings[:5])})")
        if pair.action.blocked and pair.action.writes:
            pair.notes.append(f"skipped: {pair.action.blocked}")
        return pair

    def read_segments(self, pair: Pair) -> None:
        """The segments of its SageTV file that the Plex item plays; a split recording's
        times are read (two requests a segment) the first time they are needed."""
        item = pair.sage
        assert item is not None
        if item.segments is None:
            item.segments = tuple(self.sage.segment_times(item.media_file_id, item.segment_count))
        pair.segments = covered_segments(item, (file_name(p) for p in pair.plex.paths))

    def execute(self) -> ExitCode:
        items = self.plex_items()
        with _no_cyclic_gc():
            index = SageIndex(sage_item_from_json(r) for r in self.sage.media_files())
        log.info("SageTV lists %d media files", len(index))
        gc.freeze()  # the index lives as long as the run: the collector need not scan it
        pool = ThreadPoolExecutor(max_workers=WRITE_WORKERS, thread_name_prefix="write")
        try:
            for plex_item in items:
                if self.stop.is_set():
                    break
                pair = self.prepare(plex_item, index)
                future = self.dispatch(pair, pool)
                self.pending.append((pair, future))
                self.writing += future is not None
                self.drain(keep=WRITE_WORKERS * 4)
        except SyncError:
            # A read failed half-way (a listing, a segment lookup): what was done so far,
            # then main() prints the error.
            self.report.stopped = self.report.videos > 0 or bool(self.pending)
            raise
        finally:
            self.drain(keep=0)  # never leave a write behind half-reported
            pool.shutdown(wait=True)
            gc.unfreeze()
            if self.report.stopped:
                self.lines.append(self.report.summary())
                self.flush()
        # After the drain: a Ctrl-C while the last writes were in flight counts too.
        self.report.interrupted = self.stop.is_set()
        self.lines.append(self.report.summary())
        self.flush()
        return self.report.exit_code()

    def dispatch(self, pair: Pair, pool: ThreadPoolExecutor) -> Future | None:
        """Start the pair's writes in the pool, or settle it at once (report mode,
        simulation, nothing to write, a write that cannot be done, a declined prompt)."""
        action = pair.action
        if self.args.sagedata:
            self.show_sagedata(pair)
        if action is None or not self.args.sync or action.verdict is Verdict.IN_SYNC:
            return None
        if not action.writes:
            pair.outcome, pair.detail = Outcome.SKIPPED, action.blocked
            return None
        if self.args.simulate:
            pair.outcome = Outcome.SIMULATED
            pair.detail = "would " + "; then ".join(str(w) for w in action.writes)
            return None
        if self.args.prompt:
            self.drain(keep=0)  # the previous item's line first, then the question
            if not self.confirm(pair):
                pair.outcome, pair.detail = Outcome.SKIPPED, "not confirmed"
                return None
        if pair.sage is not None and any(isinstance(w, (SageMarkWatched, SageSetPosition))
                                         for w in action.writes):
            self.read_segments(pair)  # a SageTV write and its read-back place positions
        return pool.submit(self.apply_unless_stopped, pair)

    def apply_unless_stopped(self, pair: Pair) -> None:
        """In the pool: an item whose writes have not started when Ctrl-C comes is left
        as it is (reported as skipped); one that has started is finished."""
        if self.stop.is_set():
            pair.outcome, pair.detail = Outcome.SKIPPED, "interrupted before writing"
            return
        self.applier.apply(pair)

    def confirm(self, pair: Pair) -> bool:
        assert pair.action is not None
        writes = "; then ".join(str(w) for w in pair.action.writes)
        previous = signal.getsignal(signal.SIGINT) if _main_thread() else None
        try:
            if previous is not None:  # Ctrl-C at the prompt: answer no and stop
                signal.signal(signal.SIGINT, signal.default_int_handler)
            return _ask(f"[{pair.plex.rating_key}] {pair.plex.title}: {writes}?", self.err)
        except (KeyboardInterrupt, EOFError):
            self.stop.set()
            self.err.write("\n")
            return False
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def drain(self, keep: int) -> None:
        """Report finished items in the order they came, keeping at most `keep` items'
        writes in flight; the items behind an unfinished write wait (up to
        PENDING_ITEMS_MAX), so that a few writes among many items in sync still keep the
        pool busy. With `keep=0` everything is reported and written out at once."""
        pending = self.pending
        while pending and (self.writing > keep or len(pending) > PENDING_ITEMS_MAX
                           or pending[0][1] is None or pending[0][1].done()):
            pair, future = pending.popleft()
            if future is not None:
                self.writing -= 1
                try:
                    future.result()
                except Exception as exc:  # a bug must not lose the other items' report
                    log.exception("write of media id %s", pair.plex.rating_key)
                    pair.outcome = Outcome.FAILED
                    pair.detail = f"internal error: {exc.__class__.__name__}: {exc}"
            self.report.add(pair)
            line = item_line(pair)
            if pair.outcome is not Outcome.UNCHANGED or pair.sage is None:
                log.info("%s", SECRETS.redact(line))
            self.lines.append(line)
        if keep == 0 or len(self.lines) >= OUTPUT_BATCH_LINES or \
                time.monotonic() >= self.flush_due:
            self.flush()

    def flush(self) -> None:
        """Write the lines made so far in one piece, secrets hidden: one write per line
        would cost more than deciding the item."""
        if self.lines:
            self.lines.append("")
            self.out.write(SECRETS.redact("\n".join(self.lines)))
            self.lines.clear()
        self.flush_due = time.monotonic() + OUTPUT_BATCH_S

    def show_sagedata(self, pair: Pair) -> None:
        if pair.sage is None:
            return
        record = self.sage.media_file(pair.sage.media_file_id, full=True)
        self.lines.append(f"SageTV data for media id {pair.plex.rating_key} (media file "
                          f"{pair.sage.media_file_id}):")
        self.lines.append(json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False))


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused in a block that makes many long-lived
    objects and no garbage cycles: reading a 50,000-item listing makes a million, which
    it would otherwise scan over and over while they are made."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def run_admin(args: argparse.Namespace, plex: PlexClient, out: TextIO, err: TextIO) -> ExitCode:
    """-l, --addtv, --addmovie, --delsec and --refresh."""
    if args.list:
        for section in plex.sections():
            out.write(f"{section.key:>3}: {section.title} ({section.type})\n")
        return ExitCode.OK
    if args.addtv or args.addmovie:
        name, *paths = args.addtv or args.addmovie
        kind = TV_SECTION if args.addtv else MOVIE_SECTION
        plex.add_section(name, kind, paths)
        out.write(f"Plex library '{name}' added ({kind['type']}, {kind['scanner']}, "
                  f"{len(paths)} folder(s)).\n")
        return ExitCode.OK
    section = resolve_sections([args.delsec or args.refresh], plex.sections())[0]
    if args.refresh:
        plex.refresh_section(section.key)
        out.write(f"Refreshing library [{section.key}]: {section.title}\n")
        return ExitCode.OK
    if not args.yes:
        if sys.stdin is None or not sys.stdin.isatty():
            raise UsageError(f"--delsec {section.key} asks before deleting, and there is no "
                             "terminal to ask on; add -y to delete without asking")
        if not _ask(f"Delete the Plex library [{section.key}] {section.title}? "
                    "This cannot be undone.", err):
            out.write("Not deleted.\n")
            return ExitCode.OK
    plex.delete_section(section.key)
    out.write(f"Library [{section.key}] {section.title} deleted.\n")
    return ExitCode.OK


def setup_logging(verbose: bool, err: TextIO) -> Path | None:
    """Debug detail to the log file (rotated at 5 MB, as the original did), secrets hidden."""
    path = Path(os.environ.get("SAGEPLEX_LOG") or Path(tempfile.gettempdir()) / LOG_FILE_NAME)
    formatter = _RedactingFormatter(LOG_FORMAT)
    handlers: list[logging.Handler] = []
    try:
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=5 * 1024 * 1024, backupCount=5, encoding="utf-8")
        handlers.append(handler)
    except OSError as exc:
        err.write(f"sageplex_sync: warning: cannot write the log file {path} ({exc.strerror}); "
                  "set SAGEPLEX_LOG to a writable file\n")
        path = None  # type: ignore[assignment]
    if verbose:
        handlers.append(logging.StreamHandler(err))
    if not handlers:
        handlers.append(logging.NullHandler())  # else logging's last resort prints to stderr
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._sageplex = True  # type: ignore[attr-defined]  (ours, to replace next run)
    for name in ("sageplex_sync", "plexapi", "urllib3"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, "_sageplex", False)]:
            logger.removeHandler(old)
            old.close()
        logger.setLevel(logging.DEBUG)
        for handler in handlers:
            logger.addHandler(handler)
        logger.propagate = False
    return path


def main(argv: list[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run the command line; the one place exceptions become messages and exit codes."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        validate_args(parser, args)
    except SystemExit as exc:  # argparse has printed the help or the version
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    except UsageError as exc:
        err.write(f"sageplex_sync: error: {SECRETS.redact(str(exc))}\n")
        return exc.exit_code
    setup_logging(args.verbose, err)
    log.info("***** sageplex_sync %s %s *****", __version__, argv if argv is not None
             else sys.argv[1:])
    stop = threading.Event()  # set by Ctrl-C: finish the writes started, then stop
    previous = None
    if _main_thread():
        def on_sigint(signum: int, frame: object) -> None:
            if stop.is_set():
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            stop.set()
            err.write("\nInterrupted: finishing the writes already started "
                      "(Ctrl-C again to abort)\n")
        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        config = load_config(find_config(args.config))
        log.info("config %s: %r %r", config.path, config.sage, config.plex)
        with SageClient(config.sage) as sage, PlexClient(config.plex) as plex:
            if args.list or args.addtv or args.addmovie or args.delsec or args.refresh:
                return run_admin(args, plex, out, err)
            code = Run(args, sage, plex, out=out, err=err, stop=stop).execute()
            log.info("done: exit %d (%d SageTV and %d Plex requests)", code,
                     sage.request_count, plex.request_count)
            return code
    except SyncError as exc:
        message = SECRETS.redact(str(exc))
        log.error("%s", message)
        err.write(f"sageplex_sync: error: {message}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        err.write("sageplex_sync: interrupted\n")
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        return ExitCode.FAILED
    except Exception as exc:  # a bug: one line here, the traceback in the log
        log.exception("unexpected error")
        message = SECRETS.redact(f"{exc.__class__.__name__}: {exc}")
        err.write(f"sageplex_sync: internal error: {message} (details in the log)\n")
        return ExitCode.FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        try:
            out.flush()
        except (BrokenPipeError, ValueError):
            pass


if __name__ == "__main__":
    sys.exit(main())
