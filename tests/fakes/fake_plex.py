"""A fake Plex Media Server that the unmodified ``plexapi`` library cannot tell from a
real one for the calls sageplex_sync makes (see the Plex API as plexapi uses it, §8).

``FakePlex`` is an *app* for ``tests.fakes.fake_http.FakeServer``: it answers real HTTP on
127.0.0.1 with the XML a PMS sends, keeps watch state per user (token), and applies the
watch-state semantics of the Plex reference §4.1 to ``/:/scrobble``, ``/:/unscrobble``,
``/:/progress`` and ``/:/timeline``, and serves the server's preferences (``/:/prefs``,
with the played threshold those writes use). The library admin calls of §5 (``library.add``,
``section.update``, ``section.delete``) work too, including the ``/services/browse``
look-ups ``library.add`` makes before it POSTs.

Notifications: ``/:/websockets/notifications`` (token in the query string, as plexapi's
``AlertListener`` opens it) is a real RFC 6455 websocket on the same port. It carries the
message shapes of the Plex reference §10: ``playing`` for each ``/:/timeline`` report a
player makes (state playing/paused/stopped/buffering, one ``sessionKey`` per player and
item), ``activity`` (``library.refresh.items`` with the item's key) for each manual mark or
unmark, and ``timeline`` entries on request. Tests drop the sockets (``drop_websockets``),
refuse new ones for a while (``refuse_websockets``) and read what was sent
(``notifications``).

Speed matters (benchmarks run 50 000-item libraries), so each item's XML fragment is
rendered once and cached per user until that item changes, and each section keeps its
ordered item list; a listing is then a join of cached bytes.

Places where the real server's behaviour is not documented are marked ``GUESS:``.
"""

from __future__ import annotations

import base64
import binascii
import json
import ntpath
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote

from tests.fakes.fake_http import (
    Request,
    Response,
    WebSocket,
    websocket_handshake_error,
    websocket_upgrade,
)

IDENTIFIER = "com.plexapp.plugins.library"
OWNER = "owner"  # user name of the main token (the server owner)
XML_TYPE = "text/xml;charset=utf-8"  # with charset, or requests mojibakes non-ASCII (§1.3)
PROLOG = b'<?xml version="1.0" encoding="UTF-8"?>\n'

# plexapi's utils.SEARCHTYPES for the types this fake serves
TYPE_NUMBERS = {"movie": 1, "show": 2, "season": 3, "episode": 4}
_TYPE_BY_NUMBER = {v: k for k, v in TYPE_NUMBERS.items()}
_DEFAULTS = {  # section type -> (agent, scanner, the type an untyped /all lists)
    "movie": ("tv.plex.agents.movie", "Plex Movie", "movie"),
    "show": ("tv.plex.agents.series", "Plex TV Series", "show"),
}
_PLAYABLE = ("movie", "episode")
_NOTIFICATION_KEYS = {"playing": "PlaySessionStateNotification",
                      "activity": "ActivityNotification", "timeline": "TimelineEntry",
                      "status": "StatusNotification", "progress": "ProgressNotification"}
_STATES = ("playing", "paused", "stopped", "buffering")

WRITE_FUNCTIONS = frozenset(
    {"scrobble", "unscrobble", "progress", "timeline", "add_section", "delete_section", "refresh"}
)

# one-pass escaping for double-quoted attributes; newlines and tabs as character
# references, or the XML parser would normalise them to spaces
_ATTR_TABLE = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                             "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"})


def _esc(value: object) -> str:
    """Escape a value for a double-quoted XML attribute."""
    if type(value) is int:  # most attributes: nothing to escape
        return str(value)
    return str(value).translate(_ATTR_TABLE)


def _attrs(pairs: Iterable[tuple[str, object]]) -> str:
    """`` k="v"`` for each pair whose value is not None (PMS omits unknown attributes)."""
    return "".join(f' {k}="{_esc(v)}"' for k, v in pairs if v is not None)


_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed"}


def _html_error(status: int, detail: str = "") -> Response:
    """Real PMS error bodies are small HTML pages (python-plexapi #1467); the fake adds
    a line saying why, which plexapi puts in its exception message."""
    reason = _REASONS.get(status, "Error")
    extra = f"<p>{_esc(detail)}</p>" if detail else ""
    body = (f"<html><head><title>{reason}</title></head><body><h1>{status} {reason}</h1>"
            f"{extra}</body></html>").encode()
    return Response(status, body, "text/html")


class _HttpError(Exception):
    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(f"{status} {detail}")
        self.status = status
        self.detail = detail


def _bad(detail: str) -> _HttpError:
    return _HttpError(400, detail)


def _not_found() -> _HttpError:
    return _HttpError(404)


# --------------------------------------------------------------------------------------
# public state snapshots (what tests assert on)
# --------------------------------------------------------------------------------------
@dataclass
class PlexSection:
    key: int
    title: str
    type: str
    agent: str
    scanner: str
    language: str
    uuid: str
    locations: list[str]
    created_at_s: int
    updated_at_s: int
    scanned_at_s: int
    refreshed_count: int = 0  # incremented by each /refresh (a scan request)
    refresh_paths: list[str | None] = field(default_factory=list)  # ``path=`` of each refresh


@dataclass
class PlexItem:
    """A copy of one item with one user's watch state (changing it changes nothing)."""

    rating_key: int
    type: str  # movie, episode, show, season
    title: str
    section: int
    files: list[str]
    duration_ms: int
    view_count: int = 0
    view_offset_ms: int = 0
    last_viewed_at_s: int | None = None
    year: int | None = None
    show_title: str | None = None  # episodes, seasons and shows
    season: int | None = None  # episodes and seasons
    episode: int | None = None  # episodes
    parent_key: int | None = None  # ratingKey of the season (episode) or show (season)
    grandparent_key: int | None = None  # ratingKey of the show (episode)
    guid: str = ""
    added_at_s: int = 0
    updated_at_s: int = 0
    part_sizes: list[int] = field(default_factory=list)
    leaf_count: int = 0  # shows and seasons: episodes below
    viewed_leaf_count: int = 0  # shows and seasons: of those, with viewCount > 0


# --------------------------------------------------------------------------------------
# internal records
# --------------------------------------------------------------------------------------
class _Meta:
    """Metadata of one item, shared by all users (watch state lives in _Watch)."""

    __slots__ = ("rk", "type", "title", "section", "files", "sizes", "part_ids", "duration",
                 "year", "show", "season", "episode", "parent", "grandparent", "guid",
                 "added_at", "updated_at", "children", "children_sorted")

    def __init__(self, rk: int, type_: str, title: str, section: int) -> None:
        self.rk = rk
        self.type = type_
        self.title = title
        self.section = section
        self.files: list[str] = []
        self.sizes: list[int] = []
        self.part_ids: list[int] = []
        self.duration = 0
        self.year: int | None = None
        self.show: str | None = None
        self.season: int | None = None
        self.episode: int | None = None
        self.parent: int | None = None
        self.grandparent: int | None = None
        self.guid = ""
        self.added_at = 0
        self.updated_at = 0
        self.children: list[int] = []  # show -> seasons, season -> episodes
        self.children_sorted = True


class _Session:
    """One player playing one item (the Plex reference §10: a ``sessionKey``)."""

    __slots__ = ("key", "play_queue_item_id", "client", "rk", "user", "state", "offset",
                 "below_threshold", "played")

    def __init__(self, key: int, play_queue_item_id: int, client: str, rk: int,
                 user: str) -> None:
        self.key = key
        self.play_queue_item_id = play_queue_item_id
        self.client = client
        self.rk = rk
        self.user = user
        self.state = "playing"
        self.offset = 0
        self.below_threshold = False  # a report of this session was under the threshold
        self.played = False  # this session crossed the threshold: the item was marked played


class _Watch:
    __slots__ = ("count", "offset", "last")

    def __init__(self, count: int = 0, offset: int = 0, last: int | None = None) -> None:
        self.count = count
        self.offset = offset
        self.last = last


# --------------------------------------------------------------------------------------
# paths for /services/browse
# --------------------------------------------------------------------------------------
def _is_windows_path(path: str) -> bool:
    return "\\" in path or (len(path) >= 2 and path[1] == ":")


def _norm_dir(path: str) -> str:
    """A directory without its trailing separator (roots keep theirs)."""
    if _is_windows_path(path):
        stripped = path.rstrip("\\/")
        return stripped + "\\" if len(stripped) == 2 and stripped[1] == ":" else stripped
    return path.rstrip("/") or "/"


def _parent_dir(path: str) -> str | None:
    mod = ntpath if _is_windows_path(path) else posixpath
    parent = mod.dirname(path)
    return parent if parent and parent != path else None


def _basename(path: str) -> str:
    mod = ntpath if _is_windows_path(path) else posixpath
    return mod.basename(path) or path


def _extension(path: str) -> str:
    """A file's extension, lower case, as PMS reports the container ("" if none);
    only the safe characters, as it goes into attributes unescaped."""
    name = path.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    ext = name.rsplit(".", 1)[1].lower() if "." in name.lstrip(".") else ""
    return ext if ext.isalnum() else ""


def _browse_key(path: str) -> str:
    return "/services/browse/" + base64.b64encode(path.encode("utf-8")).decode("ascii")


# --------------------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------------------
class FakePlex:
    """A fake PMS. Build a library with ``add_section``/``add_movie``/``add_episode``,
    serve it with ``FakeServer(app)``, inspect it with ``item``/
    ``items``/``sections``. All state is guarded by one lock: ThreadingHTTPServer serves
    requests concurrently and tests read state from their own thread."""

    WRITE_FUNCTIONS = WRITE_FUNCTIONS
    version = "1.41.3.9314-fake"  # the shape of a PMS version string

    def __init__(self, token: str = "fake-plex-token", *, clock: Callable[[], float] = time.time,
                 min_progress_ms: int = 60_000, played_threshold: float = 0.9,
                 progress_past_threshold: str = "played", scrobble_clears_offset: bool = True,
                 omit_total_size: bool = False,
                 extra_tokens: dict[str, str] | None = None,
                 machine_identifier: str | None = None,
                 friendly_name: str = "fake-plex",
                 lone_stop_notifies: bool = True, mark_notifies: bool = True,
                 mark_sends_timeline: bool = False) -> None:
        if progress_past_threshold not in ("played", "offset", "ignore"):
            raise ValueError(f"progress_past_threshold: {progress_past_threshold!r}")
        self.token = token
        self.clock = clock
        self.min_progress_ms = min_progress_ms
        self.played_threshold = played_threshold
        self.progress_past_threshold = progress_past_threshold
        # the Plex reference §9.3: whether a scrobble removes the resume offset is only believed
        self.scrobble_clears_offset = scrobble_clears_offset
        self.omit_total_size = omit_total_size
        self.tokens: dict[str, str] = {token: OWNER, **(extra_tokens or {})}
        self.machine_identifier = machine_identifier or (uuid.uuid4().hex + uuid.uuid4().hex[:8])
        self.friendly_name = friendly_name
        self.started_at = int(clock())
        # GUESS (the Plex reference §10 leaves them open): whether a ``stopped`` report with no
        # session before it (what a tool's updateTimeline sends) still notifies ``playing``
        # with state stopped; whether a manual mark/unmark reaches the websocket at all
        # (believed: library.refresh.items activities); whether it also sends a timeline entry
        self.lone_stop_notifies = lone_stop_notifies
        self.mark_notifies = mark_notifies
        self.mark_sends_timeline = mark_sends_timeline
        self.lock = threading.RLock()
        # websockets: open connections, every message sent (as dicts, in order), refusals
        self._sockets: set[WebSocket] = set()
        self._sockets_lock = threading.Lock()
        self._sockets_changed = threading.Condition(self._sockets_lock)
        self.notifications: list[dict] = []
        self.websocket_connections = 0  # accepted since the start
        self._refuse_until: float | None = None  # time.monotonic() deadline; inf = until told
        self._refuse_status = 503
        self._sessions: dict[tuple[str, str, int], _Session] = {}  # (user, client, rk)
        self._next_session = 1
        self._next_play_queue_item = 1001
        self._sections: dict[int, PlexSection] = {}
        self._meta: dict[int, _Meta] = {}
        self._watch: dict[str, dict[int, _Watch]] = {user: {} for user in self.tokens.values()}
        self._shows: dict[tuple[int, str], int] = {}  # (section, show title) -> show rk
        self._seasons: dict[tuple[int, int], int] = {}  # (show rk, season) -> season rk
        self._next_section = 1
        self._next_rk = 1000
        self._next_id = 1  # Part and Location ids
        # caches: per-user rendered fragments, per (section, type) ordered rating keys
        self._frags: dict[str, dict[int, bytes]] = {user: {} for user in self._watch}
        self._order: dict[tuple[int, str], list[int]] = {}
        # watch-independent pieces of Video elements: per item, and per season for episodes
        self._static: dict[int, tuple[str, str]] = {}
        self._episode_ctx: dict[int, str] = {}
        # the server's file system as /services/browse shows it: dir -> subdirs / files
        self._subdirs: dict[str, set[str]] = {}
        self._files: dict[str, set[str]] = {}

    # ----------------------------------------------------------------------------------
    # building the library
    # ----------------------------------------------------------------------------------
    def add_section(self, title: str, type: str, locations: Iterable[str] = (), *,  # noqa: A002
                    key: int | None = None, agent: str | None = None,
                    scanner: str | None = None, language: str = "en-US") -> int:
        """Create a library section ("movie" or "show"); returns its key."""
        if type not in _DEFAULTS:
            raise ValueError(f"section type must be 'movie' or 'show', not {type!r}")
        with self.lock:
            if key is None:
                key = self._next_section
            elif key in self._sections:
                raise ValueError(f"section {key} exists")
            self._next_section = max(self._next_section, key + 1)
            now = int(self.clock())
            default_agent, default_scanner, _ = _DEFAULTS[type]
            locations = [_norm_dir(loc) for loc in locations]
            self._sections[key] = PlexSection(
                key=key, title=title, type=type, agent=agent or default_agent,
                scanner=scanner or default_scanner, language=language, uuid=str(uuid.uuid4()),
                locations=locations, created_at_s=now, updated_at_s=now, scanned_at_s=now)
            for loc in locations:
                self._add_dir(loc)
            return key

    def add_movie(self, section: int, title: str, files: str | list[str], duration_ms: int, *,
                  year: int | None = None, view_count: int = 0, view_offset_ms: int = 0,
                  last_viewed_at_s: int | None = None, rating_key: int | None = None,
                  sizes: list[int] | None = None) -> int:
        """Add a movie (several files = one stacked item with several Parts); returns its
        ratingKey. The watch state given is the owner's."""
        with self.lock:
            self._section_of_type(section, "movie")
            meta = self._new_meta(rating_key, "movie", title, section)
            meta.year = year
            self._set_media(meta, files, duration_ms, sizes)
            self._store(meta, view_count, view_offset_ms, last_viewed_at_s)
            return meta.rk

    def add_episode(self, section: int, show_title: str, season: int, episode: int, title: str,
                    files: str | list[str], duration_ms: int, *, view_count: int = 0,
                    view_offset_ms: int = 0, last_viewed_at_s: int | None = None,
                    rating_key: int | None = None, sizes: list[int] | None = None) -> int:
        """Add an episode, creating its show and season directories on first use;
        returns its ratingKey. The watch state given is the owner's."""
        with self.lock:
            self._section_of_type(section, "show")
            show = self._show(section, show_title)
            season_meta = self._season(show, season)
            meta = self._new_meta(rating_key, "episode", title, section)
            meta.show, meta.season, meta.episode = show_title, season, episode
            meta.parent, meta.grandparent = season_meta.rk, show.rk
            self._set_media(meta, files, duration_ms, sizes)
            season_meta.children.append(meta.rk)
            season_meta.children_sorted = False
            self._store(meta, view_count, view_offset_ms, last_viewed_at_s)
            self._drop_frags(season_meta.rk, show.rk)  # leafCount changed
            return meta.rk

    def add_browse_dir(self, path: str) -> None:
        """Make a directory (and its ancestors) visible through /services/browse."""
        with self.lock:
            self._add_dir(_norm_dir(path))

    # ----------------------------------------------------------------------------------
    # inspecting state
    # ----------------------------------------------------------------------------------
    @property
    def sections(self) -> dict[int, PlexSection]:
        with self.lock:
            return dict(self._sections)

    def item(self, rating_key: int, *, user: str = OWNER) -> PlexItem:
        """A snapshot of one item with ``user``'s watch state (KeyError if unknown)."""
        with self.lock:
            return self._snapshot(self._meta[rating_key], user)

    def items(self, section: int | None = None, type: str | None = None,  # noqa: A002
              *, user: str = OWNER) -> list[PlexItem]:
        """Snapshots of all items (optionally of one section / type), by ratingKey."""
        with self.lock:
            return [self._snapshot(m, user) for rk, m in sorted(self._meta.items())
                    if (section is None or m.section == section)
                    and (type is None or m.type == type)]

    def show_key(self, section: int, show_title: str) -> int:
        with self.lock:
            return self._shows[(section, show_title)]

    def season_key(self, section: int, show_title: str, season: int) -> int:
        with self.lock:
            return self._seasons[(self._shows[(section, show_title)], season)]

    # ----------------------------------------------------------------------------------
    # the app protocol
    # ----------------------------------------------------------------------------------
    def date_clock_s(self) -> float:
        """The server's clock (epoch seconds) for the Date header of every reply."""
        return float(self.clock())

    def function_of(self, request: Request) -> str | None:
        """Short endpoint name of a request, for the log and fault matching."""
        name = self._route(request.method, request.path)[0]
        return None if name == "_method" else name

    def handle(self, request: Request) -> Response:
        name, args = self._route(request.method, request.path)
        if name == "identity":  # PMS answers /identity without a token
            return self._xml(f'<MediaContainer size="0" claimed="0"'
                             f' machineIdentifier="{self.machine_identifier}"'
                             f' version="{self.version}"/>')
        # The token is checked before anything else, on every path (unknown ones too)
        token = request.header("X-Plex-Token") or request.param("X-Plex-Token")
        user = self.tokens.get(token or "")
        if user is None:
            return _html_error(401)
        if name is None:
            return _html_error(404)
        if name == "_method":
            return _html_error(405)
        if name == "notifications":
            return self._open_websocket(request)
        try:
            with self.lock:
                return getattr(self, "_do_" + name)(request, user, *args)
        except _HttpError as exc:
            return _html_error(exc.status, exc.detail)

    # ----------------------------------------------------------------------------------
    # routing
    # ----------------------------------------------------------------------------------
    _READ = ("GET", "HEAD")
    _WRITE = ("GET", "HEAD", "PUT", "POST")  # PMS takes GET for the /:/ writes too (§4)

    def _route(self, method: str, path: str) -> tuple[str | None, tuple]:
        """(function name, arguments); name None = unknown path, "_method" = wrong method."""
        def allow(name: str, methods: tuple[str, ...], *args: object) -> tuple:
            return (name if method in methods else "_method"), args

        parts = [p for p in path.split("/") if p]
        if not parts:
            return allow("root", self._READ)
        if parts[0] == ":" and len(parts) == 2 and parts[1] in (
                "scrobble", "unscrobble", "progress", "timeline"):
            return allow(parts[1], self._WRITE)
        if parts == [":", "websockets", "notifications"]:
            return allow("notifications", ("GET",))
        if parts == [":", "prefs"]:
            return allow("prefs", self._READ)  # GUESS: setting prefs (PUT) is not modelled
        if parts == ["identity"]:
            return allow("identity", self._READ)
        if parts[:2] == ["services", "browse"]:
            # base64 of the path may itself contain "/" (it is the standard alphabet)
            encoded = path.split("/services/browse", 1)[1].strip("/")
            return allow("browse", self._READ, encoded or None)
        if parts[0] != "library":
            return None, ()
        if len(parts) == 1:
            return allow("library", self._READ)
        if parts[1] == "sections":
            if len(parts) == 2:
                if method == "POST":
                    return "add_section", ()
                return allow("sections", self._READ)
            if parts[2] == "all" and parts[3:] == ["refresh"]:
                if method == "DELETE":
                    return "cancel_refresh", (None,)
                return allow("refresh", self._WRITE, None)
            if not parts[2].isdecimal():
                return None, ()
            sid = int(parts[2])
            if len(parts) == 3:
                if method == "DELETE":
                    return "delete_section", (sid,)
                return allow("section", self._READ, sid)
            if parts[3:] == ["all"]:
                return allow("section_all", self._READ, sid)
            if parts[3:] == ["refresh"]:
                if method == "DELETE":
                    return "cancel_refresh", (sid,)
                return allow("refresh", self._WRITE, sid)
            return None, ()
        if parts[1] == "metadata" and len(parts) in (3, 4):
            if len(parts) == 3:
                return allow("metadata", self._READ, parts[2])
            if parts[3] in ("children", "allLeaves"):
                return allow(parts[3], self._READ, parts[2])
        return None, ()

    # ----------------------------------------------------------------------------------
    # read endpoints
    # ----------------------------------------------------------------------------------
    def _do_root(self, request: Request, user: str) -> Response:
        attrs = _attrs([
            ("size", 1), ("allowCameraUpload", 0), ("allowChannelAccess", 1),
            ("allowMediaDeletion", 1), ("allowSharing", 1), ("allowSync", 1), ("allowTuners", 0),
            ("backgroundProcessing", 1), ("certificate", 0), ("companionProxy", 1),
            ("countryCode", "usa"), ("diagnostics", "logs,databases,streaminglogs"),
            ("eventStream", 1), ("friendlyName", self.friendly_name), ("hubSearch", 1),
            ("itemClusters", 1), ("livetv", 0), ("machineIdentifier", self.machine_identifier),
            ("mediaProviders", 1), ("multiuser", 1), ("myPlex", 0),
            ("myPlexMappingState", "unknown"), ("myPlexSigninState", "none"),
            ("myPlexSubscription", 0), ("offlineTranscode", 1), ("photoAutoTag", 0),
            ("platform", "Linux"), ("platformVersion", "6.1.0"), ("pluginHost", 0),
            ("pushNotifications", 0), ("readOnlyLibraries", 0), ("requestParametersInCookie", 1),
            ("streamingBrainABRVersion", 3), ("streamingBrainVersion", 2), ("sync", 0),
            ("transcoderActiveVideoSessions", 0), ("transcoderAudio", 1),
            ("transcoderLyrics", 1), ("transcoderPhoto", 1), ("transcoderSubtitles", 1),
            ("transcoderVideo", 1), ("updatedAt", self.started_at), ("updater", 0),
            ("version", self.version), ("voiceSearch", 1),
        ])
        return self._xml(f'<MediaContainer{attrs}>'
                         f'<Directory count="1" key="library" title="library"/>'
                         f'</MediaContainer>')

    def _do_library(self, request: Request, user: str) -> Response:
        # GUESS: only the owner may read /library (plexapi's fallback to /library/sections/
        # exists for exactly this case: "Only the owner has access to /library")
        if user != OWNER:
            raise _HttpError(403, "owner only")
        return self._xml(
            f'<MediaContainer size="3" allowSync="0" art="/:/resources/library-art.png"'
            f' content="" identifier="{IDENTIFIER}" mediaTagPrefix="/system/bundle/media/flags/"'
            f' mediaTagVersion="{self.started_at}" title1="Plex Library" title2="">'
            f'<Directory key="sections" title="Library Sections"/>'
            f'<Directory key="recentlyAdded" title="Recently Added Content"/>'
            f'<Directory key="onDeck" title="On Deck Content"/>'
            f'</MediaContainer>')

    def _do_prefs(self, request: Request, user: str) -> Response:
        """The server's settings (the Plex reference §4.1): the played threshold the watch-state
        writes apply, and a few others of the real list."""
        self._owner_only(user)  # GUESS: server settings are the owner's, like other admin
        threshold = round(self.played_threshold * 100)
        settings = [
            [("id", "FriendlyName"), ("label", "Friendly name"),
             ("summary", "This name will be used to identify this media server to other "
                         "computers on your network."),
             ("type", "text"), ("default", ""), ("value", self.friendly_name), ("hidden", 0),
             ("advanced", 0), ("group", "general")],
            [("id", "LibraryVideoPlayedThreshold"), ("label", "Video played threshold"),
             ("summary", "Set the percentage at which a video is considered played."),
             ("type", "int"), ("default", 90), ("value", threshold), ("hidden", 0),
             ("advanced", 1), ("group", "library"),
             ("enumValues", "50:50%|60:60%|70:70%|80:80%|90:90%|95:95%|99:99%")],
            # GUESS at the enum labels; the values and default are support.plex.tv's
            [("id", "LibraryVideoPlayedAtBehaviour"), ("label", "Video play completion behaviour"),
             ("summary", "Decide whether to use end credits markers to determine the 'watched' "
                         "state of video items."),
             ("type", "int"), ("default", 3), ("value", 3), ("hidden", 0), ("advanced", 1),
             ("group", "library"),
             ("enumValues", "0:at selected threshold percentage|1:at final credits marker "
                            "position|2:at first credits marker position|3:earliest between "
                            "threshold percent and first credits marker")],
        ]
        body = "".join(f"<Setting{_attrs(pairs)}/>" for pairs in settings)
        return self._xml(f'<MediaContainer size="{len(settings)}">{body}</MediaContainer>')

    def _do_sections(self, request: Request, user: str) -> Response:
        dirs = "".join(self._section_xml(s) for s in self._sections.values())
        return self._xml(f'<MediaContainer size="{len(self._sections)}" allowSync="0"'
                         f' title1="Plex Library">{dirs}</MediaContainer>')

    def _do_section(self, request: Request, user: str, sid: int) -> Response:
        # GUESS: a section's own key lists its browse directories; only "all" is modelled
        section = self._section(sid)
        return self._xml(
            f'<MediaContainer size="1" allowSync="0" content="secondary"'
            f' identifier="{IDENTIFIER}" librarySectionID="{section.key}"'
            f' title1="{_esc(section.title)}" viewGroup="secondary">'
            f'<Directory key="all" title="All"/></MediaContainer>')

    def _do_section_all(self, request: Request, user: str, sid: int) -> Response:
        section = self._section(sid)
        type_param = request.param("type")
        if type_param is None:
            wanted = _DEFAULTS[section.type][2]
        else:
            try:
                wanted = _TYPE_BY_NUMBER.get(int(type_param), "")
            except ValueError:
                raise _bad("type must be a number") from None
        # a type the section does not hold (e.g. type=1 in a show section) lists nothing
        order = self._ordered(sid, wanted)
        return self._listing(request, user, order, section,
                             extra=[("title1", section.title), ("viewGroup", wanted or None)])

    def _do_metadata(self, request: Request, user: str, keys: str) -> Response:
        rks = []
        for part in keys.split(","):
            if not part.isdecimal():
                raise _bad("ratingKey must be a number")
            if int(part) not in self._meta:
                raise _not_found()
            rks.append(int(part))
        sections = {self._meta[rk].section for rk in rks}
        section = self._sections.get(sections.pop()) if len(sections) == 1 else None
        return self._listing(request, user, rks, section)

    def _do_children(self, request: Request, user: str, key: str) -> Response:
        meta = self._meta_of(key)
        # GUESS: children of a movie/episode is an empty container, not an error
        order = self._sorted_children(meta) if meta.type in ("show", "season") else []
        extra = [("key", meta.rk), ("parentRatingKey", meta.rk), ("parentTitle", meta.title)]
        if meta.type == "season":
            extra += [("parentIndex", meta.season), ("grandparentTitle", meta.show),
                      ("grandparentRatingKey", meta.parent), ("title2", meta.title)]
        return self._listing(request, user, order, self._sections.get(meta.section), extra=extra)

    def _do_allLeaves(self, request: Request, user: str, key: str) -> Response:  # noqa: N802
        meta = self._meta_of(key)
        if meta.type == "show":
            order = [ep for season in self._sorted_children(meta)
                     for ep in self._sorted_children(self._meta[season])]
        elif meta.type == "season":
            order = self._sorted_children(meta)
        else:
            order = []  # GUESS: as for children
        extra = [("key", meta.rk), ("parentRatingKey", meta.rk), ("parentTitle", meta.title),
                 ("title2", "All episodes")]
        return self._listing(request, user, order, self._sections.get(meta.section), extra=extra)

    def _do_browse(self, request: Request, user: str, encoded: str | None) -> Response:
        if encoded is None:
            path = ""
        else:
            text = unquote(encoded)
            text += "=" * (-len(text) % 4)  # be lenient about missing padding
            try:
                raw = (base64.urlsafe_b64decode(text) if "-" in text or "_" in text
                       else base64.b64decode(text, validate=True))
                path = raw.decode("utf-8")
            except (binascii.Error, ValueError):
                raise _bad("path is not base64") from None
        if path:
            path = _norm_dir(path)
            subdirs = self._subdirs.get(path, set())
        else:  # the top: "/" on a POSIX server, drive roots on Windows
            subdirs = self._subdirs.get("/", set()) | {
                d for d in self._subdirs if _parent_dir(d) is None and d != "/"}
        # GUESS: an unknown directory lists nothing (200) rather than failing, so plexapi's
        # Library.add raises its own BadRequest('Path: ... does not exist.')

        def entry(tag: str, p: str) -> str:
            attrs = _attrs([("key", _browse_key(p)), ("path", p), ("title", _basename(p))])
            return f"<{tag}{attrs}/>"
        children = [entry("Path", d) for d in sorted(subdirs)]
        if request.param("includeFiles", "1") not in ("0", "false"):
            children += [entry("File", f) for f in sorted(self._files.get(path, set()))]
        head = _attrs([("size", len(children)), ("path", path or None)])
        return self._xml(f'<MediaContainer{head}>{"".join(children)}</MediaContainer>')

    # ----------------------------------------------------------------------------------
    # watch-state writes (§4.1)
    # ----------------------------------------------------------------------------------
    def _write_target(self, request: Request, key_param: str) -> _Meta:
        if request.param("identifier") != IDENTIFIER:
            raise _bad("identifier is missing or not " + IDENTIFIER)
        key = request.param(key_param)
        if key is None or not key.strip().isdecimal():
            raise _bad(f"{key_param} is missing or not a number")
        meta = self._meta.get(int(key))
        if meta is None:
            raise _not_found()
        return meta

    def _leaves(self, meta: _Meta) -> list[_Meta]:
        """The playable items a write on ``meta`` applies to (a show/season: its episodes)."""
        if meta.type in _PLAYABLE:
            return [meta]
        seasons = [meta] if meta.type == "season" else [self._meta[s] for s in meta.children]
        return [self._meta[ep] for s in seasons for ep in s.children]

    def _do_scrobble(self, request: Request, user: str) -> Response:
        meta = self._write_target(request, "key")
        now = int(self.clock())
        for leaf in self._leaves(meta):
            self._played(user, leaf, now, clear_offset=self.scrobble_clears_offset)
        self._notify_mark(user, meta)
        return self._empty()

    def _do_unscrobble(self, request: Request, user: str) -> Response:
        meta = self._write_target(request, "key")
        for leaf in self._leaves(meta):
            self._set_watch(user, leaf, _Watch())
        self._notify_mark(user, meta)
        return self._empty()

    def _do_progress(self, request: Request, user: str) -> Response:
        meta = self._write_target(request, "key")
        self._apply_progress(request, user, meta)
        return self._empty()

    def _do_timeline(self, request: Request, user: str) -> Response:
        """A player's report (playing, paused, buffering, stopped): the watch state as
        §4.1 says, and a ``playing`` notification (§10) for the player's session."""
        meta = self._write_target(request, "ratingKey")
        client = (request.header("X-Plex-Client-Identifier")
                  or request.param("X-Plex-Client-Identifier") or "")
        session = self._sessions.get((user, client, meta.rk))
        self._apply_progress(request, user, meta, session)
        state = request.param("state", "stopped") or "stopped"
        position = int(float(request.param("time") or 0))
        if state == "stopped":
            if session is not None:
                del self._sessions[(user, client, meta.rk)]
            elif self.lone_stop_notifies:
                session = self._new_session(user, client, meta.rk)
        elif session is None:
            session = self._sessions[(user, client, meta.rk)] = self._new_session(
                user, client, meta.rk)
        if session is not None:
            session.state, session.offset = state, position
            if position < self.played_threshold * meta.duration:
                session.below_threshold = True
            self._notify_playing(session)
        return self._xml('<MediaContainer size="0"/>')

    def _apply_progress(self, request: Request, user: str, meta: _Meta,
                        session: _Session | None = None) -> None:
        if meta.type not in _PLAYABLE:
            raise _bad("not a playable item")  # GUESS: 400 for a show/season
        try:
            position = int(float(request.param("time") or ""))
        except (ValueError, OverflowError):  # also "nan" and "inf"
            raise _bad("time is missing or not a number") from None
        state = request.param("state", "stopped")
        if position < 0 or state not in _STATES:
            raise _bad("bad time or state")
        if position <= self.min_progress_ms:
            return  # under the minimum progress time PMS ignores the report (§4.1)
        now = int(self.clock())
        # GUESS: the threshold is taken from the item's own duration (the server knows it),
        # not from timeline's duration= parameter; an item without duration never crosses it
        past = meta.duration > 0 and position >= self.played_threshold * meta.duration
        if past and session is not None and (session.below_threshold or session.played):
            # a live session crossing the threshold: PMS marks the item played itself, once
            # (the Plex reference §4.1, last row); later reports of that session change nothing
            if not session.played:
                session.played = True
                self._played(user, meta, now)
            return
        if past and self.progress_past_threshold == "played":
            self._played(user, meta, now)
        elif past and self.progress_past_threshold == "ignore":
            return
        else:
            old = self._watch[user].get(meta.rk) or _Watch()
            self._set_watch(user, meta, _Watch(old.count, position, now))

    def _played(self, user: str, meta: _Meta, now: int, clear_offset: bool = True) -> None:
        """viewCount + 1, lastViewedAt now; the offset goes (believed, §4.1) unless
        ``clear_offset`` is False (the scrobble_clears_offset switch; a progress report
        past the threshold is a completed play and always clears it)."""
        old = self._watch[user].get(meta.rk) or _Watch()
        self._set_watch(user, meta, _Watch(old.count + 1, 0 if clear_offset else old.offset, now))

    # ----------------------------------------------------------------------------------
    # notifications: the websocket (§10)
    # ----------------------------------------------------------------------------------
    def _open_websocket(self, request: Request) -> Response:
        """The opening handshake; the token was checked like any request's (401)."""
        with self._sockets_lock:
            until = self._refuse_until
            if until is not None and time.monotonic() >= until:
                self._refuse_until = until = None
        if until is not None:
            return _html_error(self._refuse_status, "not accepting notifications now")
        problem = websocket_handshake_error(request)
        if problem is not None:
            return _html_error(400, problem)
        return websocket_upgrade(request, self._serve_websocket)

    def _serve_websocket(self, ws: WebSocket) -> None:
        with self._sockets_changed:
            self._sockets.add(ws)
            self.websocket_connections += 1
            self._sockets_changed.notify_all()
        try:
            ws.serve_until_closed()  # PMS ignores what clients send; pings are answered
        finally:
            with self._sockets_changed:
                self._sockets.discard(ws)
                self._sockets_changed.notify_all()

    @property
    def websockets(self) -> int:
        """How many notification websockets are open now."""
        with self._sockets_lock:
            return len(self._sockets)

    def wait_for_websockets(self, count: int, timeout_s: float = 5.0) -> bool:
        """Wait until exactly ``count`` websockets are open (a listener connects in the
        background); False on timeout."""
        with self._sockets_changed:
            return self._sockets_changed.wait_for(lambda: len(self._sockets) == count,
                                                  timeout_s)

    def drop_websockets(self, *, abrupt: bool = False) -> int:
        """Close every open notification websocket: a clean close frame (1001, going
        away) or, ``abrupt``, a TCP reset with no close frame. Returns how many."""
        with self._sockets_lock:
            sockets = list(self._sockets)
        for ws in sockets:
            if abrupt:
                ws.abort()
            else:
                ws.close(1001, "server going away")
        return len(sockets)

    def refuse_websockets(self, seconds: float | None = None, *, status: int = 503) -> None:
        """Answer new websocket handshakes with ``status`` for ``seconds`` of real time
        (None: until ``accept_websockets``). Open sockets are not touched."""
        with self._sockets_lock:
            self._refuse_until = (float("inf") if seconds is None
                                  else time.monotonic() + seconds)
            self._refuse_status = status

    def accept_websockets(self) -> None:
        with self._sockets_lock:
            self._refuse_until = None

    def notify(self, container: dict) -> None:
        """Send one ``{"NotificationContainer": container}`` text frame to every open
        websocket (and keep it in ``notifications``)."""
        text = json.dumps({"NotificationContainer": container}, separators=(",", ":"))
        with self._sockets_lock:
            self.notifications.append(container)
            sockets = list(self._sockets)
        for ws in sockets:
            try:
                ws.send_text(text)
            except Exception:  # noqa: BLE001 (a socket going away: its thread removes it)
                pass

    def notifications_of(self, kind: str) -> list[dict]:
        """The entries sent so far under one kind ("playing", "activity", "timeline"):
        the dicts inside PlaySessionStateNotification / ActivityNotification / TimelineEntry."""
        key = _NOTIFICATION_KEYS[kind]
        with self._sockets_lock:
            return [entry for c in self.notifications if c.get("type") == kind
                    for entry in c.get(key, [])]

    def sessions(self) -> list[dict]:
        """The live playback sessions (started by a report, not yet stopped), in start
        order: sessionKey, user, client, ratingKey, state, viewOffset."""
        with self.lock:
            return [{"sessionKey": str(x.key), "user": x.user, "client": x.client,
                     "ratingKey": x.rk, "state": x.state, "viewOffset": x.offset}
                    for x in sorted(self._sessions.values(), key=lambda x: x.key)]

    def _new_session(self, user: str, client: str, rk: int) -> _Session:
        session = _Session(self._next_session, self._next_play_queue_item, client, rk, user)
        self._next_session += 1
        self._next_play_queue_item += 1
        return session

    def _notify_playing(self, session: _Session) -> None:
        # GUESS: sessions of every user reach every socket (believed for the owner's, §10)
        self.notify({"type": "playing", "size": 1, "PlaySessionStateNotification": [{
            "sessionKey": str(session.key), "clientIdentifier": session.client, "guid": "",
            "ratingKey": str(session.rk), "url": "", "key": f"/library/metadata/{session.rk}",
            "viewOffset": session.offset, "playQueueItemID": session.play_queue_item_id,
            "state": session.state}]})

    def _user_id(self, user: str) -> int:
        return 1 + list(self._watch).index(user) if user in self._watch else 1

    def _notify_mark(self, user: str, meta: _Meta) -> None:
        """What a manual mark/unmark sends (§10): a library.refresh.items activity whose
        Context names the item, as captured from a real server (PlexTraktSync's
        tests/mock_data/events-played.json): started, three updates, ended."""
        if self.mark_notifies:
            activity_id = str(uuid.uuid4())
            key = f"/library/metadata/{meta.rk}"
            steps = [("started", "", 0, None),
                     ("updated", "Checking files", 0, {"key": key}),
                     ("updated", "Refreshing local metadata", 33,
                      {"accessible": True, "exists": True, "key": key}),
                     ("updated", "Refreshing media analysis", 66,
                      {"accessible": True, "exists": True, "key": key, "refreshed": False}),
                     ("ended", "Refreshing media analysis", 100,
                      {"accessible": True, "analyzed": False, "exists": True, "key": key,
                       "refreshed": False})]
            for event, subtitle, progress, context in steps:
                activity = {"uuid": activity_id, "type": "library.refresh.items",
                            "cancellable": False, "userID": self._user_id(user),
                            "title": "Refreshing", "subtitle": subtitle, "progress": progress}
                if context is not None:
                    activity["Context"] = context
                self.notify({"type": "activity", "size": 1, "ActivityNotification": [
                    {"event": event, "uuid": activity_id, "Activity": activity}]})
        if self.mark_sends_timeline:
            self.notify_timeline(meta.rk, 5)

    def notify_timeline(self, rating_key: int, state: int = 5) -> None:
        """A ``timeline`` entry for one item (§10: state 0 created ... 5 processed, 9
        deleted). GUESS: ids as strings, as PMS sends most JSON ids."""
        with self.lock:
            meta = self._meta[rating_key]
            self.notify({"type": "timeline", "size": 1, "TimelineEntry": [{
                "identifier": IDENTIFIER, "sectionID": str(meta.section),
                "itemID": str(meta.rk), "type": TYPE_NUMBERS[meta.type], "title": meta.title,
                "state": state, "updatedAt": int(self.clock())}]})

    # ----------------------------------------------------------------------------------
    # library admin (§5)
    # ----------------------------------------------------------------------------------
    def _owner_only(self, user: str) -> None:
        if user != OWNER:  # GUESS: shared users may not manage libraries
            raise _HttpError(403, "owner only")

    def _do_add_section(self, request: Request, user: str) -> Response:
        self._owner_only(user)
        name = request.param("name")
        type_ = request.param("type")
        locations = [loc for loc in request.query.get("location", []) if loc]
        if not name or not locations:  # PMS answers 400 without a location (plexapi CI)
            raise _bad("name and location are required")
        if type_ not in _DEFAULTS:  # GUESS: only the two types this fake models
            raise _bad("type must be movie or show")
        key = self.add_section(name, type_, locations, agent=request.param("agent") or None,
                               scanner=request.param("scanner") or None,
                               language=request.param("language") or "en-US")
        # GUESS: the reply is the new section's Directory (the spec's MediaContainer)
        return self._xml(f'<MediaContainer size="1">{self._section_xml(self._sections[key])}'
                         f'</MediaContainer>')

    def _do_delete_section(self, request: Request, user: str, sid: int) -> Response:
        self._owner_only(user)
        self._section(sid)
        del self._sections[sid]
        for rk in [rk for rk, m in self._meta.items() if m.section == sid]:
            del self._meta[rk]
            for per_user in self._watch.values():
                per_user.pop(rk, None)
            self._static.pop(rk, None)
            self._episode_ctx.pop(rk, None)
            for frags in self._frags.values():
                frags.pop(rk, None)
        self._shows = {k: v for k, v in self._shows.items() if k[0] != sid}
        self._seasons = {k: v for k, v in self._seasons.items() if v in self._meta}
        self._order = {k: v for k, v in self._order.items() if k[0] != sid}
        return self._empty()

    def _do_refresh(self, request: Request, user: str, sid: int | None) -> Response:
        self._owner_only(user)
        targets = list(self._sections.values()) if sid is None else [self._section(sid)]
        now = int(self.clock())
        for section in targets:
            # a real scan is asynchronous and finds nothing new here: just count it
            section.refreshed_count += 1
            section.refresh_paths.append(request.param("path"))
            section.scanned_at_s = now
        return self._empty()

    def _do_cancel_refresh(self, request: Request, user: str, sid: int | None) -> Response:
        self._owner_only(user)
        if sid is not None:
            self._section(sid)
        return self._empty()

    # ----------------------------------------------------------------------------------
    # rendering
    # ----------------------------------------------------------------------------------
    @staticmethod
    def _xml(text: str) -> Response:
        return Response(200, PROLOG + text.encode("utf-8"), XML_TYPE)

    @staticmethod
    def _empty() -> Response:
        return Response(200, b"", XML_TYPE)

    def _section_xml(self, s: PlexSection) -> str:
        attrs = _attrs([
            ("allowSync", 1), ("art", f"/:/resources/{s.type}-fanart.jpg"),
            ("composite", f"/library/sections/{s.key}/composite/{s.updated_at_s}"),
            ("filters", 1), ("refreshing", 0), ("thumb", f"/:/resources/{s.type}.png"),
            ("key", s.key), ("type", s.type), ("title", s.title), ("agent", s.agent),
            ("scanner", s.scanner), ("language", s.language), ("uuid", s.uuid),
            ("updatedAt", s.updated_at_s), ("createdAt", s.created_at_s),
            ("scannedAt", s.scanned_at_s), ("content", 1), ("directory", 1),
            ("contentChangedAt", s.updated_at_s), ("hidden", 0),
        ])
        locs = "".join(f'<Location id="{i + 1}" path="{_esc(p)}"/>'
                       for i, p in enumerate(s.locations))
        return f"<Directory{attrs}>{locs}</Directory>"

    def _listing(self, request: Request, user: str, order: list[int],
                 section: PlexSection | None, extra: Iterable[tuple[str, object]] = ()
                 ) -> Response:
        """A paged MediaContainer of the items in ``order`` (§2.3)."""
        start, size = self._paging(request)
        total = len(order)
        page = order[start:] if size is None else order[start:start + size]
        frags = self._frags[user]
        get = frags.get
        body = [get(rk) or self._render(user, rk) for rk in page]
        head = [("size", len(page)),
                ("totalSize", None if self.omit_total_size else total),
                ("offset", start), ("allowSync", 1), ("identifier", IDENTIFIER)]
        if section is not None:
            head += [("librarySectionID", section.key), ("librarySectionTitle", section.title),
                     ("librarySectionUUID", section.uuid)]
        head += [("mediaTagPrefix", "/system/bundle/media/flags/"),
                 ("mediaTagVersion", self.started_at), *extra]
        data = b"".join([PROLOG, f"<MediaContainer{_attrs(head)}>".encode(), *body,
                         b"</MediaContainer>"])
        headers = {"X-Plex-Container-Start": str(start)}
        if not self.omit_total_size:
            headers["X-Plex-Container-Total-Size"] = str(total)
        return Response(200, data, XML_TYPE, headers)

    @staticmethod
    def _paging(request: Request) -> tuple[int, int | None]:
        """Start and size from the query string or (as fetchItems sends them) headers.
        GUESS: the query string wins when both are given; no size = everything."""
        def value(name: str) -> int | None:
            raw = request.param(name)
            if raw is None:
                raw = request.header(name)
            if raw is None or raw == "":
                return None
            try:
                number = int(raw)
            except ValueError:
                raise _bad(f"{name} is not a number") from None
            if number < 0:
                raise _bad(f"{name} is negative")
            return number
        return value("X-Plex-Container-Start") or 0, value("X-Plex-Container-Size")

    def _render(self, user: str, rk: int) -> bytes:
        meta = self._meta[rk]
        if meta.type in _PLAYABLE:
            text = self._video_xml(meta, self._watch[user].get(rk))
        else:
            text = self._directory_xml(user, meta)
        data = text.encode("utf-8")
        self._frags[user][rk] = data
        return data

    def _video_xml(self, m: _Meta, w: _Watch | None) -> str:
        static = self._static.get(m.rk)
        if static is None:
            static = self._static[m.rk] = self._video_static(m)
        head, tail = static
        if w is None:
            return head + tail
        # PMS omits watch attributes for never-watched / never-started items
        watch = ((f' viewCount="{w.count}"' if w.count else "")
                 + (f' viewOffset="{w.offset}"' if w.offset else "")
                 + (f' lastViewedAt="{w.last}"' if w.last is not None else ""))
        return head + watch + tail

    def _video_static(self, m: _Meta) -> tuple[str, str]:
        """The parts of a Video element that do not depend on watch state: the opening
        tag's attributes up to the watch ones, and the rest (cached: renders are hot)."""
        rk = m.rk
        head = (f'<Video ratingKey="{rk}" key="/library/metadata/{rk}" guid="{_esc(m.guid)}"'
                f' type="{m.type}" title="{_esc(m.title)}"')
        if m.type == "episode":
            ctx = self._episode_ctx.get(m.parent)  # type: ignore[arg-type]
            if ctx is None:
                ctx = self._episode_ctx[m.parent] = self._season_ctx(m)  # type: ignore[index]
            head += f' index="{m.episode}"{ctx}'
        else:
            head += _attrs([("librarySectionTitle", self._sections[m.section].title),
                            ("librarySectionID", m.section),
                            ("librarySectionKey", f"/library/sections/{m.section}"),
                            ("year", m.year)])
        n = len(m.files)
        parts = []
        for i, (path, size, pid) in enumerate(zip(m.files, m.sizes, m.part_ids, strict=True)):
            ext = _extension(path)
            # GUESS: a stacked item's duration is split evenly over its parts
            pdur = m.duration // n + (m.duration % n if i == n - 1 else 0)
            dot_ext = "." + ext if ext else ""
            container = f' container="{ext}"' if ext else ""
            parts.append(f'<Part id="{pid}" key="/library/parts/{pid}/{m.added_at}/file{dot_ext}"'
                         f' duration="{pdur}" file="{_esc(path)}" size="{size}"{container}/>')
        ext0 = _extension(m.files[0])
        media = _attrs([("id", rk), ("duration", m.duration), ("container", ext0 or None)])
        tail = (f' duration="{m.duration}" addedAt="{m.added_at}" updatedAt="{m.updated_at}">'
                f'<Media{media}>{"".join(parts)}</Media></Video>')
        return head, tail

    def _season_ctx(self, m: _Meta) -> str:
        """Attributes every episode of one season shares (show, season, section)."""
        show, season = self._meta[m.grandparent], self._meta[m.parent]  # type: ignore[index]
        section = self._sections[m.section]
        return _attrs([("parentIndex", season.season), ("parentRatingKey", season.rk),
                       ("grandparentRatingKey", show.rk), ("parentGuid", season.guid),
                       ("grandparentGuid", show.guid),
                       ("grandparentKey", f"/library/metadata/{show.rk}"),
                       ("parentKey", f"/library/metadata/{season.rk}"),
                       ("librarySectionTitle", section.title), ("librarySectionID", section.key),
                       ("librarySectionKey", f"/library/sections/{section.key}"),
                       ("grandparentTitle", show.title), ("parentTitle", season.title)])

    def _directory_xml(self, user: str, m: _Meta) -> str:
        section = self._sections[m.section]
        watch = self._watch[user]
        leaves = self._leaves(m)
        viewed = [watch[e.rk] for e in leaves if e.rk in watch and watch[e.rk].count > 0]
        lasts = [watch[e.rk].last for e in leaves if e.rk in watch and watch[e.rk].last]
        pairs: list[tuple[str, object]] = [("ratingKey", m.rk),
                                           ("key", f"/library/metadata/{m.rk}/children")]
        if m.type == "season":
            show = self._meta[m.parent]  # type: ignore[index]
            pairs += [("parentRatingKey", show.rk), ("guid", m.guid), ("parentGuid", show.guid),
                      ("type", "season"), ("title", m.title),
                      ("parentKey", f"/library/metadata/{show.rk}"),
                      ("librarySectionTitle", section.title), ("librarySectionID", section.key),
                      ("librarySectionKey", f"/library/sections/{section.key}"),
                      ("parentTitle", show.title), ("index", m.season), ("parentIndex", 1)]
        else:
            pairs += [("guid", m.guid), ("type", "show"), ("title", m.title),
                      ("librarySectionTitle", section.title), ("librarySectionID", section.key),
                      ("librarySectionKey", f"/library/sections/{section.key}"), ("index", 1),
                      ("duration", leaves[0].duration if leaves else None),
                      ("childCount", len(m.children))]
        # GUESS: a directory's lastViewedAt is the latest of its episodes'; no viewCount
        pairs += [("leafCount", len(leaves)), ("viewedLeafCount", len(viewed)),
                  ("lastViewedAt", max(lasts) if lasts else None),
                  ("addedAt", m.added_at), ("updatedAt", m.updated_at)]
        return f"<Directory{_attrs(pairs)}></Directory>"

    # ----------------------------------------------------------------------------------
    # state helpers (callers hold the lock)
    # ----------------------------------------------------------------------------------
    def _section(self, sid: int) -> PlexSection:
        section = self._sections.get(sid)
        if section is None:
            raise _not_found()
        return section

    def _section_of_type(self, sid: int, type_: str) -> PlexSection:
        section = self._sections.get(sid)
        if section is None or section.type != type_:
            raise ValueError(f"no {type_} section {sid}")
        return section

    def _meta_of(self, key: str) -> _Meta:
        if not key.isdecimal():
            raise _bad("ratingKey must be a number")
        meta = self._meta.get(int(key))
        if meta is None:
            raise _not_found()
        return meta

    def _new_meta(self, rating_key: int | None, type_: str, title: str, section: int) -> _Meta:
        if rating_key is None:
            rating_key = self._next_rk
        elif rating_key in self._meta:
            raise ValueError(f"ratingKey {rating_key} exists")
        self._next_rk = max(self._next_rk, rating_key + 1)
        meta = _Meta(rating_key, type_, title, section)
        # GUESS at the shape only: new-agent guids are plex://<type>/<24 hex>
        agent = self._sections[section].agent
        meta.guid = (f"local://{rating_key}" if agent.endswith(".none")
                     else f"plex://{type_}/{rating_key:024x}")
        meta.added_at = meta.updated_at = int(self.clock())
        self._meta[rating_key] = meta
        self._order = {k: v for k, v in self._order.items() if k[0] != section}
        return meta

    def _show(self, section: int, title: str) -> _Meta:
        rk = self._shows.get((section, title))
        if rk is not None:
            return self._meta[rk]
        meta = self._new_meta(None, "show", title, section)
        meta.show = title
        self._shows[(section, title)] = meta.rk
        return meta

    def _season(self, show: _Meta, number: int) -> _Meta:
        rk = self._seasons.get((show.rk, number))
        if rk is not None:
            return self._meta[rk]
        title = "Specials" if number == 0 else f"Season {number}"
        meta = self._new_meta(None, "season", title, show.section)
        meta.show, meta.season, meta.parent = show.title, number, show.rk
        self._seasons[(show.rk, number)] = meta.rk
        show.children.append(meta.rk)
        show.children_sorted = False
        self._drop_frags(show.rk)
        return meta

    def _set_media(self, meta: _Meta, files: str | list[str], duration_ms: int,
                   sizes: list[int] | None) -> None:
        meta.files = [files] if isinstance(files, str) else list(files)
        if not meta.files:
            raise ValueError("an item needs at least one file")
        meta.duration = int(duration_ms)
        if sizes is None:
            # GUESS: sizes are made up, ~2 Mbit/s of the part's share of the duration
            sizes = [max(1, meta.duration // len(meta.files)) * 250 for _ in meta.files]
        if len(sizes) != len(meta.files):
            raise ValueError("one size per file")
        meta.sizes = list(sizes)
        meta.part_ids = []
        for path in meta.files:
            meta.part_ids.append(self._next_id)
            self._next_id += 1
            parent = _parent_dir(path)  # the file exists on the server's disk
            if parent is not None:
                self._add_dir(parent)
                self._files.setdefault(parent, set()).add(path)

    def _store(self, meta: _Meta, count: int, offset: int, last: int | None) -> None:
        if count or offset or last is not None:
            self._watch[OWNER][meta.rk] = _Watch(count, offset, last)

    def _set_watch(self, user: str, meta: _Meta, watch: _Watch) -> None:
        if user not in self._watch:
            raise KeyError(f"unknown user {user!r}")
        if watch.count or watch.offset or watch.last is not None:
            self._watch[user][meta.rk] = watch
        else:
            self._watch[user].pop(meta.rk, None)
        # the item's fragment and its season's/show's viewedLeafCount change
        frags = self._frags[user]
        for rk in (meta.rk, meta.parent, meta.grandparent):
            if rk is not None:
                frags.pop(rk, None)

    def _drop_frags(self, *rks: int) -> None:
        for frags in self._frags.values():
            for rk in rks:
                frags.pop(rk, None)

    def _add_dir(self, path: str) -> None:
        while True:
            parent = _parent_dir(path)
            self._subdirs.setdefault(path, set())
            if parent is None:
                return
            children = self._subdirs.setdefault(parent, set())
            if path in children:
                return
            children.add(path)
            path = parent

    def _sorted_children(self, meta: _Meta) -> list[int]:
        if not meta.children_sorted:
            if meta.type == "show":
                meta.children.sort(key=lambda rk: self._meta[rk].season or 0)
            else:
                meta.children.sort(key=lambda rk: (self._meta[rk].episode or 0, rk))
            meta.children_sorted = True
        return meta.children

    def _ordered(self, sid: int, type_: str) -> list[int]:
        """Rating keys of one type in a section, in PMS's default order (cached).
        GUESS: by title for movies and shows (PMS sorts by titleSort, which drops
        leading articles; not modelled), show/season/episode order for the rest."""
        order = self._order.get((sid, type_))
        if order is not None:
            return order
        metas = [m for m in self._meta.values() if m.section == sid and m.type == type_]
        shows = {m.rk: m.title.casefold() for m in self._meta.values()
                 if m.section == sid and m.type == "show"}
        if type_ in ("movie", "show"):
            metas.sort(key=lambda m: (m.title.casefold(), m.rk))
        elif type_ == "season":
            metas.sort(key=lambda m: (shows[m.parent], m.parent, m.season, m.rk))  # type: ignore[index]
        else:
            metas.sort(key=lambda m: (shows[m.grandparent], m.grandparent, m.season,  # type: ignore[index]
                                      m.episode, m.rk))
        order = self._order[(sid, type_)] = [m.rk for m in metas]
        return order

    def _snapshot(self, m: _Meta, user: str) -> PlexItem:
        w = self._watch[user].get(m.rk) or _Watch()
        leaves = self._leaves(m) if m.type in ("show", "season") else []
        watch = self._watch[user]
        return PlexItem(
            rating_key=m.rk, type=m.type, title=m.title, section=m.section,
            files=list(m.files), duration_ms=m.duration, view_count=w.count,
            view_offset_ms=w.offset, last_viewed_at_s=w.last, year=m.year, show_title=m.show,
            season=m.season, episode=m.episode, parent_key=m.parent,
            grandparent_key=m.grandparent, guid=m.guid, added_at_s=m.added_at,
            updated_at_s=m.updated_at, part_sizes=list(m.sizes), leaf_count=len(leaves),
            viewed_leaf_count=sum(1 for e in leaves if e.rk in watch and watch[e.rk].count > 0))
