"""A protocol-faithful fake of the SageTV sagex HTTP API (``/sagex/api``), served over real
HTTP by ``fake_http.FakeServer``.

Every behaviour follows the sagex reference (cited as §n below), which was
written from the sagex and SageTV sources; where this file had to guess, the comment says so.
What it models:

* transport: Basic auth on every request (§1.4), ``/sagex/api`` dispatch, the HTML help page,
  404 for other handlers, GET and form POST alike (§1.1);
* the request grammar: ``c``/``command``, ``1``..``n`` read until the first gap, ``null``,
  ``encoder``, ``jsoncallback``, ``start``/``size`` (default size 50!), ``filter`` (§1.2, §2.6, §4);
* typed arguments: exact arity, strict Java integer parsing, ``type:id`` object references
  that silently become null (§1.3, §3);
* reply shapes: ``{}``, ``{"Result":v}``, bare objects inside lists, ``{"MediaFile":..}``,
  ``{"Airing":..}``, omitted null fields, error bodies with HTTP 200 (§2, §3);
* SageTV's watched semantics: one Watched record per airing, the show-level ``lastWatched``
  shared by every airing of the same show, ``SetWatched``, ``ClearWatched`` and
  ``SetWatchedTimes`` with their clamps, 5 s no-op, max-merge and automatic completion (§6, §8.4);
* multi-segment recordings and the per-segment calls (§7);
* following playback (§10): ``play``/``stop`` model a SageTV client playing a file (the watch
  record is written when playback stops, as ``VideoFrame.logFileWatch`` does, or by the
  player's completion check once the viewing counts as complete, §6.3), and
  ``GetRecentlyWatched`` lists the airings being played plus those whose watch record
  ended within the look-back.

Performance: each media file's serialized JSON is cached per filter and dropped when its
watch state (or its show's ``lastWatched``) changes, so a 50,000-item listing is a join of
cached fragments.

"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.fake_http import FakeServer, Request, Response

# --- SageTV constants (§6.2, §6.5; CORE java/sage/BigBrother.java) -----------------------------
MIN_WATCH_MS = 5000  # SetWatchedTimes writes nothing when the clamped duration is <= this
COMPLETE_WATCH_FRACTION = 0.66
MAX_SHOW_DURATION_DIFF_MS = 20 * 60_000  # ShowDuration is used only this close to the airing's
START_OVER_MS = 15_000  # LatestWatchedTime restarts at the airing start this close to the end

_JSON_TYPE = "application/json;charset=UTF-8"
_XML_TYPE = "text/xml;charset=UTF-8"
_HTML_TYPE = "text/html;charset=UTF-8"
_JETTY_HTML_TYPE = "text/html;charset=ISO-8859-1"
_SERVICE_DIR = "/opt/sagetv/server/sagex/services"  # where a real server looks for plex.js

# MediaMask bits (CORE DBObject.getMediaMaskFromChar); a recording carries TV and VIDEO (§4.1).
_MASK_TV, _MASK_VIDEO, _MASK_MUSIC, _MASK_DVD, _MASK_PICTURE, _MASK_BLURAY = 1, 2, 4, 8, 16, 32
_MASK_LETTERS = {"T": _MASK_TV, "V": _MASK_VIDEO, "M": _MASK_MUSIC, "D": _MASK_DVD,
                 "P": _MASK_PICTURE, "B": _MASK_BLURAY}

# sagex's own request parsing (SX ApiHandler.java): the service form is tried first, then Api.Func.
_SERVICE_RE = re.compile(r"([^:]+):(.*)")
_API_RE = re.compile(r"([^.]+)\.(.*)")
_JAVA_INT_RE = re.compile(r"[+-]?[0-9]+")

# Every API class sagex knows (SX SageRPCRequestFactory.createRequest); the fake implements
# functions of three of them, the others answer like a factory without that function.
_KNOWN_APIS = frozenset({
    "AiringAPI", "AlbumAPI", "CaptureDeviceAPI", "CaptureDeviceInputAPI", "ChannelAPI",
    "Configuration", "Database", "FavoriteAPI", "Global", "MediaFileAPI", "MediaNodeAPI",
    "MediaPlayerAPI", "PersonAPI", "PlaylistAPI", "PluginAPI", "Security", "SeriesInfoAPI",
    "ShowAPI", "SystemMessageAPI", "TranscodeAPI", "TVEditorialAPI", "UserRecordAPI",
    "Utility", "WidgetAPI"})


# --- Java-style errors ---------------------------------------------------------------------------
_FRAMES_HANDLER = (
    "sagex.remote.api.ApiHandler.handleRequest(ApiHandler.java:128)",
    "sagex.remote.SagexServlet.doPost(SagexServlet.java:88)",
    "sagex.remote.SagexServlet.doGet(SagexServlet.java:41)",
    "javax.servlet.http.HttpServlet.service(HttpServlet.java:687)",
    "javax.servlet.http.HttpServlet.service(HttpServlet.java:790)",
    "org.eclipse.jetty.servlet.ServletHolder.handle(ServletHolder.java:865)",
    "org.eclipse.jetty.security.SecurityHandler.handle(SecurityHandler.java:548)",
    "org.eclipse.jetty.server.Server.handle(Server.java:502)",
)
_FRAMES_CALL = ("sagex.remote.api.ApiHandler.callSageAPI(ApiHandler.java:205)",)
_FRAMES_FACTORY = ("sagex.remote.factory.request.SageRPCRequestFactory.createRequest"
                   "(SageRPCRequestFactory.java:1745)",) + _FRAMES_CALL
_FRAMES_HELPER = ("sagex.remote.xmlrpc.RequestHelper.createParameters(RequestHelper.java:17)",
                  "sagex.remote.xmlrpc.RequestHelper.createRequest(RequestHelper.java:9)")
_FRAMES_NFE = ("java.lang.NumberFormatException.forInputString(NumberFormatException.java:65)",
               "java.lang.Integer.parseInt(Integer.java:580)",
               "sagex.remote.xmlrpc.RequestHelper.makeTypedArg(RequestHelper.java:38)",
               ) + _FRAMES_HELPER
_FRAMES_REF = ("sagex.util.TypesUtil.toSageRefParts(TypesUtil.java:148)",
               "sagex.util.TypesUtil.toSageObject(TypesUtil.java:163)",
               "sagex.remote.xmlrpc.RequestHelper.makeSageObject(RequestHelper.java:63)",
               "sagex.remote.xmlrpc.RequestHelper.makeTypedArg(RequestHelper.java:53)",
               ) + _FRAMES_HELPER
_FRAMES_PAGING = ("java.util.Arrays.copyOfRange(Arrays.java:3520)",)
_FRAMES_ENCODE = ("sagex.remote.builder.SageAPIBuilder.build(SageAPIBuilder.java:37)",
                  "sagex.remote.builder.SageAPIBuilder.buildArray(SageAPIBuilder.java:231)",
                  "sagex.remote.api.JsonReplyEncoder.encodeReply(JsonReplyEncoder.java:34)")


class SagexError(Exception):
    """A Java exception as sagex reports it: ``error`` = getMessage(), ``exception`` = the trace.

    ``message`` None models an exception without a message (a bare NullPointerException): the
    JSON error body then has no ``error`` key at all, because sagex's JSONObject drops nulls (§3.1).
    """

    def __init__(self, java_class: str, message: str | None, frames: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.java_class = java_class
        self.message = message
        self.frames = frames + _FRAMES_HANDLER

    def trace(self) -> str:
        head = self.java_class if self.message is None else f"{self.java_class}: {self.message}"
        return head + "\n" + "".join(f"\tat {frame}\n" for frame in self.frames)


def _runtime(message: str, frames: tuple[str, ...] = _FRAMES_FACTORY) -> SagexError:
    return SagexError("java.lang.RuntimeException", message, frames)


def _parse_java_int(text: str | None, bits: int, frames: tuple[str, ...] = _FRAMES_NFE) -> int:
    """Integer.parseInt / Long.parseLong: ASCII digits with an optional sign, in range (§1.3)."""
    if text is None:
        raise SagexError("java.lang.NumberFormatException", "null", frames)  # Java 8 wording
    if _JAVA_INT_RE.fullmatch(text):
        value = int(text)
        if -(1 << (bits - 1)) <= value < (1 << (bits - 1)):
            return value
    raise SagexError("java.lang.NumberFormatException", f'For input string: "{text}"', frames)


def _param_int(request: Request, name: str, default: int) -> int:
    """ApiHandler.getInt: blank or non-integer values fall back to the default (§1.2)."""
    value = request.param(name)
    if value is None or not value.strip():
        return default
    try:
        return _parse_java_int(value, 32)
    except SagexError:
        return default


def _java_split_pipe(text: str) -> list[str]:
    """String.split("\\|"): trailing empty strings are removed, but "" stays [""]."""
    if text == "":
        return [""]
    parts = text.split("|")
    while parts and parts[-1] == "":
        parts.pop()
    return parts


def _i32(value: int) -> int:
    """Java int overflow (start + size in ApiHandler's paging)."""
    return (value + (1 << 31)) % (1 << 32) - (1 << 31)


# --- the data model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SageMediaFile:
    """One MediaFile and its (content) Airing as added with ``FakeSage.add_media_file``.

    Static description only; watch state lives in the FakeSage (read it with
    ``airing_json``/``media_file_json``).
    """

    media_file_id: int
    airing_id: int
    title: str
    segments: tuple[tuple[str, int, int], ...]  # (absolute path, start ms, end ms), in order
    airing_start_ms: int
    airing_end_ms: int
    schedule_start_ms: int
    schedule_end_ms: int
    is_tv: bool
    is_library: bool
    currently_recording: bool
    show_external_id: str
    episode_title: str
    season: int
    episode: int
    is_movie: bool
    show_duration_ms: int
    unique: bool
    # derived (§2.4): FileStartTime = first segment start, FileEndTime = last segment end,
    # FileDuration = the sum of the segment durations (gaps excluded)
    file_start_ms: int = field(init=False)
    file_end_ms: int = field(init=False)
    file_duration_ms: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "file_start_ms", self.segments[0][1])
        object.__setattr__(self, "file_end_ms", self.segments[-1][2])
        object.__setattr__(self, "file_duration_ms", sum(e - s for _, s, e in self.segments))

    @property
    def segment_files(self) -> list[str]:
        return [path for path, _, _ in self.segments]

    @property
    def airing_duration_ms(self) -> int:
        return self.airing_end_ms - self.airing_start_ms


@dataclass
class _Show:
    """A SageTV Show: shared by every airing with the same ShowExternalID (§6.1)."""

    external_id: str
    title: str
    episode_title: str
    season: int
    episode: int
    is_movie: bool
    unique: bool
    duration_ms: int
    last_watched: int = 0  # Show.lastWatched; the show counts as watched while > 0
    media_file_ids: list[int] = field(default_factory=list)


@dataclass
class _Playback:
    """A SageTV client playing one airing (CORE Seeker's clientWatchFileMap)."""

    client: str
    position_ms: int  # airing timeline: the media time the player is at
    real_start_ms: int  # SageTV's clock when this playback began


class _View:
    """One media file with its watch state derived for serving (§6.2, §8.4)."""

    __slots__ = ("mf", "show", "w", "full", "watched", "latest")

    def __init__(self, mf: SageMediaFile, show: _Show, w: tuple[int, int, int, int] | None,
                 full: bool, watched: bool, latest: int) -> None:
        self.mf, self.show, self.w = mf, show, w
        self.full, self.watched, self.latest = full, watched, latest


def _parent_dir(path: str) -> str | None:
    """java.io.File.getParent for both Windows and POSIX server paths."""
    i = max(path.rfind("/"), path.rfind("\\"))
    if i < 0:
        return None
    parent = path[:i] if i > 0 else path[0]
    if re.fullmatch(r"[A-Za-z]:", parent):
        parent += "\\"
    return parent


def _basename(path: str) -> str:
    return path[max(path.rfind("/"), path.rfind("\\")) + 1:]


def _w(v: _View, i: int) -> int:
    return v.w[i] if v.w is not None else 0


def _station_id(mf: SageMediaFile) -> int:
    return 10_000 + mf.airing_id % 90_000


# Field tables: (key, getter, value for a null object, head-only).  The key is the JSON key and
# also the name ``filter=`` matches (§2.6); the getter names follow from it (``Is*`` as is, else
# ``Get`` + key).  Values are those of the §2.5 capture where it has them; the key set is the
# 2015 capture's, plus IsMovie at sagex HEAD (§9.1).
_Field = tuple[str, Callable[[Any], Any], Any, bool]

_SHOW_FIELDS: list[_Field] = [
    ("ShowTitle", lambda s: s.title, None, False),
    ("ShowEpisode", lambda s: s.episode_title, None, False),
    ("ShowExternalID", lambda s: s.external_id, None, False),
    ("ShowDuration", lambda s: s.duration_ms, 0, False),
    ("ShowSeasonNumber", lambda s: s.season, 0, False),
    ("ShowEpisodeNumber", lambda s: s.episode, 0, False),
    ("IsMovie", lambda s: s.is_movie, False, True),
    ("OriginalAiringDate", lambda s: 0, 0, False),
    ("ShowDescription", lambda s: f"{s.title}: {s.episode_title}".rstrip(": "), None, False),
    ("ShowCategory", lambda s: "Movie" if s.is_movie else "Drama", None, False),
    ("ShowSubCategory", lambda s: "", None, False),
    ("ShowCategoriesString", lambda s: "Movie" if s.is_movie else "Drama", None, False),
    ("ShowCategoriesList", lambda s: ["Movie" if s.is_movie else "Drama"], None, False),
    ("ShowYear", lambda s: "", None, False),
    ("ShowRated", lambda s: "", None, False),
    ("ShowParentalRating", lambda s: "", None, False),
    ("ShowExpandedRatings", lambda s: "", None, False),
    ("ShowMisc", lambda s: "", None, False),
    ("ShowLanguage", lambda s: "English", None, False),
    ("PeopleInShow", lambda s: "Jane Doe", None, False),
    ("PeopleListInShow", lambda s: ["Jane Doe"], None, False),
    ("PeopleAndCharacterListInShow", lambda s: ["Jane Doe as Herself"], None, False),
    ("RolesInShow", lambda s: ["Actor"], None, False),
    ("IsShowEPGDataUnique", lambda s: s.unique, False, False),
    ("IsShowObject", lambda s: True, False, False),
]

_CHANNEL_FIELDS: list[_Field] = [
    ("ChannelName", lambda m: "KFAKEDT", None, False),
    ("ChannelNumber", lambda m: "7-1", None, False),
    ("ChannelNetwork", lambda m: "FAKE Affiliate", None, False),
    ("ChannelDescription", lambda m: "KFAKEDT (KFAKE-DT) Testville", None, False),
    ("StationID", lambda m: _station_id(m), 0, False),
    ("ChannelLogoCount", lambda m: 1, 0, False),
    ("IsChannelObject", lambda m: True, False, False),
    ("IsChannelViewable", lambda m: True, False, False),
]

_AIRING_FIELDS: list[_Field] = [
    ("AiringID", lambda v: v.mf.airing_id, 0, False),
    ("AiringTitle", lambda v: v.show.title, None, False),
    ("AiringStartTime", lambda v: v.mf.airing_start_ms, 0, False),
    ("AiringEndTime", lambda v: v.mf.airing_end_ms, 0, False),
    ("AiringDuration", lambda v: v.mf.airing_duration_ms, 0, False),
    ("ScheduleStartTime", lambda v: v.mf.schedule_start_ms, 0, False),
    ("ScheduleEndTime", lambda v: v.mf.schedule_end_ms, 0, False),
    ("ScheduleDuration", lambda v: v.mf.schedule_end_ms - v.mf.schedule_start_ms, 0, False),
    ("IsWatched", lambda v: v.watched, False, False),
    ("IsWatchedCompletely", lambda v: v.full, False, False),
    ("WatchedStartTime", lambda v: _w(v, 0), 0, False),
    ("WatchedEndTime", lambda v: _w(v, 1), 0, False),
    ("WatchedDuration", lambda v: _w(v, 1) - _w(v, 0), 0, False),
    ("RealWatchedStartTime", lambda v: _w(v, 2), 0, False),
    ("RealWatchedEndTime", lambda v: _w(v, 3), 0, False),
    ("LatestWatchedTime", lambda v: v.latest, 0, False),
    ("IsDontLike", lambda v: False, False, False),
    ("IsFavorite", lambda v: v.mf.is_tv, False, False),
    ("IsManualRecord", lambda v: False, False, False),
    ("IsNotManualOrFavorite", lambda v: not v.mf.is_tv, False, False),
    ("AiringChannelName", lambda v: "KFAKEDT" if v.mf.is_tv else "", None, False),
    ("AiringChannelNumber", lambda v: "7-1" if v.mf.is_tv else "", None, False),
    ("AiringAttributeList", lambda v: [], None, False),
    ("AiringRatings", lambda v: ["TVPG"] if v.mf.is_tv else [], None, False),
    ("ParentalRating", lambda v: "TVPG" if v.mf.is_tv else "", None, False),
    ("AiringPartNumber", lambda v: 1 if v.mf.is_tv else 0, 0, False),
    ("AiringTotalParts", lambda v: 1 if v.mf.is_tv else 0, 0, False),
    ("AiringPremiereFinaleInfo", lambda v: "", None, False),
    ("ExtraAiringDetails", lambda v: "", None, False),
    ("IsAiringHDTV", lambda v: False, False, False),
    ("IsAiringObject", lambda v: True, False, False),
    ("RecordingName", lambda v: "", None, False),
    ("RecordingQuality", lambda v: "", None, False),
    ("ScheduleRecordingRecurrence", lambda v: "", None, False),
    ("TrackNumber", lambda v: 0, 0, False),
    ("IsShowFirstRun", lambda v: v.mf.is_tv, False, False),
    ("IsShowReRun", lambda v: False, False, False),
    ("Channel", None, None, False),  # nested (GetChannel): the Channel object, null when none
    ("Show", None, None, False),  # nested (GetShow)
]

_MF_FIELDS: list[_Field] = [
    ("MediaFileID", lambda v: v.mf.media_file_id, None, False),
    ("MediaTitle", lambda v: v.mf.title, "", False),
    ("MediaFileRelativePath",
     lambda v: "" if v.mf.is_tv else _basename(v.mf.segments[0][0]), "", False),
    ("IsTVFile", lambda v: v.mf.is_tv, False, False),
    ("IsVideoFile", lambda v: True, False, False),  # recordings are video too (§4.1)
    ("IsLibraryFile", lambda v: v.mf.is_library, False, False),
    ("IsCompleteRecording", lambda v: not v.mf.currently_recording, False, False),
    ("IsFileCurrentlyRecording", lambda v: v.mf.currently_recording, False, False),
    ("IsLocalFile", lambda v: True, False, False),
    ("IsMediaFileObject", lambda v: True, False, False),
    ("IsDVD", lambda v: False, False, False),
    ("IsBluRay", lambda v: False, False, False),
    ("IsDVDDrive", lambda v: False, False, False),
    ("IsMusicFile", lambda v: False, False, False),
    ("IsPictureFile", lambda v: False, False, False),
    ("IsThumbnailLoaded", lambda v: False, False, False),
    ("IsShowFirstRun", lambda v: v.mf.is_tv, False, False),
    ("IsShowReRun", lambda v: False, False, False),
    ("FileStartTime", lambda v: v.mf.file_start_ms, 0, False),
    ("FileEndTime", lambda v: v.mf.file_end_ms, 0, False),
    ("FileDuration", lambda v: v.mf.file_duration_ms, 0, False),
    ("NumberOfSegments", lambda v: len(v.mf.segments), 0, False),
    ("SegmentFiles", lambda v: v.mf.segment_files, None, False),
    ("ParentDirectory", lambda v: _parent_dir(v.mf.segments[0][0]), None, False),
    ("Size", lambda v: v.mf.file_duration_ms * 1000, 0, False),  # 8 Mbit/s
    ("MediaFileEncoding",
     lambda v: "Silicondust HDHomeRun Tuner 101A7CC9-1 KFAKEDT" if v.mf.is_tv else "", "", False),
    ("MediaFileFormatDescription", lambda v: "MPEG2-PS[MPEG2-Video 16:9 720p@60fps]", "", False),
    ("MediaFileMetadataProperties", lambda v: {
        "Title": v.show.title, "EpisodeName": v.show.episode_title,
        "SeasonNumber": str(v.show.season), "EpisodeNumber": str(v.show.episode),
        "ExternalID": v.show.external_id,
        "MediaType": "Movie" if v.show.is_movie else ("TV" if v.mf.is_tv else "Video")},
     None, False),
    ("Airing", None, None, False),  # nested (GetMediaFileAiring)
]

# The filter name of a nested object differs from its JSON key only here: the getter is
# GetMediaFileAiring, so ``filter=`` must list MediaFileAiring to keep the ``Airing`` key (§2.6).
_MF_FILTER_NAMES = {"Airing": "MediaFileAiring"}


def _build(table: list[tuple[str, Callable[[Any], Any]]], obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, get in table:
        value = get(obj)
        if value is not None:  # null fields are omitted, never null (§2.3)
            out[key] = value
    return out


class _Plan:
    """The field tables compiled for one ``filter=`` value (None: everything)."""

    def __init__(self, names: frozenset[str] | None, field_set: str) -> None:
        def keep(name: str, head_only: bool) -> bool:
            return (names is None or name in names) and (field_set == "head" or not head_only)

        self.show = [(k, g) for k, g, _, h in _SHOW_FIELDS if keep(k, h)]
        self.channel = [(k, g) for k, g, _, h in _CHANNEL_FIELDS if keep(k, h)]
        show_t, channel_t = self.show, self.channel
        self.airing: list[tuple[str, Callable[[Any], Any]]] = []
        for key, get, _, head_only in _AIRING_FIELDS:
            if not keep(key, head_only):
                continue
            if key == "Show":
                get = lambda v, t=show_t: _build(t, v.show)  # noqa: E731
            elif key == "Channel":
                get = lambda v, t=channel_t: _build(t, v.mf) if v.mf.is_tv else None  # noqa: E731
            self.airing.append((key, get))
        airing_t = self.airing
        self.mf: list[tuple[str, Callable[[Any], Any]]] = []
        for key, get, _, head_only in _MF_FIELDS:
            if not keep(_MF_FILTER_NAMES.get(key, key), head_only):
                continue
            if key == "Airing":
                get = lambda v, t=airing_t: _build(t, v)  # noqa: E731
            self.mf.append((key, get))


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # compact, like sagex


def _dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


# A reply before encoding: (kind, value).  Kinds: "scalar", "list", "mflist", "mf", "airing",
# "show", "channel", "map", "long2d", "airinglist"; None is a null result (serialized as {}).
_Reply = tuple[str, Any]


@dataclass(frozen=True)
class _Function:
    api: str
    args: tuple[str, ...]  # "obj", "int", "long", "str", "file"
    impl: Callable[[list[Any]], Any]


class FakeSage:
    """The fake sagex app: SageTV's media files, airings, shows and watch state.

    Serve it with ``FakeServer(app)`` (or ``serve_sage``).  All state is guarded by one lock;
    the HTTP API and the direct methods below perform exactly the same operations.
    """

    WRITE_FUNCTIONS = frozenset({"SetWatched", "ClearWatched", "SetWatchedTimes"})

    def __init__(self, user: str = "sage", password: str = "frey", *,
                 clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
                 watch_ignore_ms: int = 300_000, watch_ignore_movie_ms: int = 600_000,
                 dont_use_running_time_for_watched: bool = False,
                 field_set: str = "head",
                 latest_watched_plus_3s: bool = False,
                 sagex_version: str = "9.2.8.1",
                 plex_js_service: bool = False,
                 list_delay_s: float = 0.0,
                 reset_watched_when_played: bool = True,
                 complete_check_while_playing: bool = True) -> None:
        if field_set not in ("head", "2015"):
            raise ValueError(f"field_set must be 'head' or '2015', not {field_set!r}")
        self.user = user
        self.password = password
        self.clock_ms = clock_ms
        self.watch_ignore_ms = watch_ignore_ms  # property wizard/watch_ignore_time (§9.8)
        self.watch_ignore_movie_ms = watch_ignore_movie_ms  # wizard/watch_ignore_time_movie
        self.dont_use_running_time_for_watched = dont_use_running_time_for_watched
        self.field_set = field_set
        self.latest_watched_plus_3s = latest_watched_plus_3s  # old SageTV's +3 s (§9.12)
        self.sagex_version = sagex_version
        # the original tool's plex.js installed (§5): plex:GetMediaFileForName answers
        self.plex_js_service = plex_js_service
        # a real SageTV takes a while to build a big GetMediaFiles reply: each listing sleeps
        # this long first, outside the lock, so concurrent listings overlap as they would
        self.list_delay_s = list_delay_s
        # the stock UI's property (§6.3): playing a watched item clears watched first
        self.reset_watched_when_played = reset_watched_when_played
        # the player's periodic "watch complete check" (§6.3) writes the record during
        # playback as soon as the viewing counts as complete; False: only at stop
        self.complete_check_while_playing = complete_check_while_playing
        self._playing: dict[int, _Playback] = {}  # airing id -> playback, in start order
        self.listing_calls = 0  # GetMediaFiles calls answered or being answered
        self.listings_in_flight = 0  # of those, being answered now
        self.listings_in_flight_max = 0  # the most seen at once
        self._listing_lock = threading.Lock()
        self._lock = threading.RLock()
        self._by_mf: dict[int, SageMediaFile] = {}
        self._by_airing: dict[int, SageMediaFile] = {}
        self._order: list[int] = []  # media file ids; sorted lazily (ascending, §9.11)
        self._order_sorted = True
        self._shows: dict[str, _Show] = {}
        self._watch: dict[int, tuple[int, int, int, int]] = {}  # airing id -> (ws, we, rs, re)
        self._used_ids: set[int] = set()
        self._next_id = 100_001
        self._plans: dict[frozenset[str] | None, _Plan] = {}
        # serialized MediaFile per (filter, schedule-end-passed flag): LatestWatchedTime of a
        # TV airing depends on whether its schedule end is past "now" (§6.2)
        self._frags: dict[tuple[frozenset[str] | None, bool], dict[int, bytes]] = {}
        self._functions = self._function_table()

    # --- setting up state ----------------------------------------------------------------------
    def add_media_file(self, *, title: str, segments: list[tuple[str, int, int]],
                       airing_start_ms: int, airing_end_ms: int,
                       schedule_start_ms: int | None = None, schedule_end_ms: int | None = None,
                       is_tv: bool = True, is_library: bool = False,
                       currently_recording: bool = False,
                       show_external_id: str | None = None,
                       episode_title: str = "", season: int = 0, episode: int = 0,
                       is_movie: bool = False, show_duration_ms: int | None = None,
                       unique: bool = True,
                       media_file_id: int | None = None,
                       airing_id: int | None = None) -> SageMediaFile:
        """Add a media file with its airing (and its show, unless the show id is shared).

        Airings sharing ``show_external_id`` share one Show: its is_movie, unique and duration
        must agree, and its title/episode come from the first one added.  Imported videos
        (``is_tv=False``) have an airing made from the file: it must start at the file start and
        last the file duration (CORE MediaFile.java, §7.1).
        """
        segs = tuple((str(p), int(s), int(e)) for p, s, e in segments)
        if not segs:
            raise ValueError("a media file needs at least one segment")
        previous_end = None
        for path, start, end in segs:
            if not path or end <= start:
                raise ValueError(f"bad segment {(path, start, end)!r}: needs a path, end > start")
            if previous_end is not None and start < previous_end:
                raise ValueError("segments must be in order and must not overlap")
            previous_end = end
        if not 0 < airing_start_ms < airing_end_ms:
            raise ValueError("airing times must be positive ms epoch values with start < end")
        file_start = segs[0][1]
        file_duration = sum(e - s for _, s, e in segs)
        if not is_tv and (airing_start_ms, airing_end_ms) != (file_start,
                                                              file_start + file_duration):
            raise ValueError("an imported video's airing is made from its file: pass "
                             "airing_start_ms=first segment start and "
                             "airing_end_ms=start + sum of segment durations")
        with self._lock:
            mf_id = self._take_id(media_file_id)
            try:
                air_id = self._take_id(airing_id)
            except ValueError:
                self._used_ids.discard(mf_id)
                raise
            ext_id = show_external_id or (
                f"{'MV' if is_movie else ('EP' if is_tv else 'MF')}{air_id:012d}")
            show = self._shows.get(ext_id)
            if show is None:
                show = _Show(ext_id, title, episode_title, season, episode, is_movie, unique,
                             show_duration_ms if show_duration_ms is not None
                             else airing_end_ms - airing_start_ms)
            elif (show.is_movie, show.unique) != (is_movie, unique) or (
                    show_duration_ms is not None and show_duration_ms != show.duration_ms):
                self._used_ids.difference_update((mf_id, air_id))
                raise ValueError(f"show {ext_id} already exists with is_movie={show.is_movie}, "
                                 f"unique={show.unique}, duration={show.duration_ms}")
            self._shows[ext_id] = show
            mf = SageMediaFile(
                media_file_id=mf_id, airing_id=air_id, title=title, segments=segs,
                airing_start_ms=airing_start_ms, airing_end_ms=airing_end_ms,
                schedule_start_ms=airing_start_ms if schedule_start_ms is None
                else schedule_start_ms,
                schedule_end_ms=airing_end_ms if schedule_end_ms is None else schedule_end_ms,
                is_tv=is_tv, is_library=is_library, currently_recording=currently_recording,
                show_external_id=ext_id, episode_title=show.episode_title, season=show.season,
                episode=show.episode, is_movie=show.is_movie, show_duration_ms=show.duration_ms,
                unique=show.unique)
            show.media_file_ids.append(mf_id)
            self._by_mf[mf_id] = mf
            self._by_airing[air_id] = mf
            if self._order and mf_id < self._order[-1]:
                self._order_sorted = False
            self._order.append(mf_id)
            return mf

    def set_watch_record(self, airing_id: int, watch_start_ms: int, watch_end_ms: int,
                         real_start_ms: int = 0, real_end_ms: int = 0) -> None:
        """Store a Watched record as is (no clamps, no merge): e.g. a viewing on the TV."""
        with self._lock:
            mf = self._by_airing[airing_id]
            self._watch[airing_id] = (watch_start_ms, watch_end_ms, real_start_ms, real_end_ms)
            self._invalidate((mf.media_file_id,))

    def set_show_watched(self, show_external_id: str, last_watched_ms: int) -> None:
        """Set a show's lastWatched (> 0: every unique airing of it counts as watched)."""
        with self._lock:
            self._set_last_watched(self._shows[show_external_id], last_watched_ms)

    # --- the write operations (the same as the HTTP API's) ------------------------------------
    def set_watched(self, airing_id: int) -> None:
        """AiringAPI.SetWatched (§6.4)."""
        with self._lock:
            self._set_watched(self._by_airing[airing_id])

    def clear_watched(self, airing_id: int) -> None:
        """AiringAPI.ClearWatched (§6.4), as the user does it in SageTV's menus."""
        with self._lock:
            self._clear_watched(self._by_airing[airing_id])

    def watch_record(self, airing_id: int) -> tuple[int, int, int, int] | None:
        """The raw Watched record (ws, we, rs, re), or None."""
        with self._lock:
            if airing_id not in self._by_airing:
                raise KeyError(airing_id)
            return self._watch.get(airing_id)

    def set_watched_times(self, airing_id: int, watched_end_ms: int, real_start_ms: int) -> None:
        """AiringAPI.SetWatchedTimes (§6.5); RealWatchedEndTime becomes ``clock_ms()``."""
        with self._lock:
            self._set_watched_times(self._by_airing[airing_id], watched_end_ms, real_start_ms,
                                    self.clock_ms())

    # --- a SageTV client playing a file (§6.3, §10) ------------------------------------------
    def play(self, airing_id: int, position_ms: int, *, client: str = "sagetv-client") -> None:
        """A client plays the airing and is now at ``position_ms`` (airing timeline). The
        first call starts the playback: SageTV's clock then is its real start, and a watched
        item is cleared first when ``reset_watched_when_played``. Nothing is written while
        it plays, except by the completion check (``complete_check_while_playing``)."""
        with self._lock:
            mf = self._by_airing[airing_id]
            now = self.clock_ms()
            playback = self._playing.get(airing_id)
            if playback is None:
                if self.reset_watched_when_played and self._view(mf, now).watched:
                    self._clear_watched(mf)
                playback = self._playing[airing_id] = _Playback(client, position_ms, now)
            playback.position_ms = position_ms
            if self.complete_check_while_playing and self._watch_math(mf, position_ms)[1]:
                self._set_watched_times(mf, position_ms, playback.real_start_ms, now)

    def stop(self, airing_id: int, position_ms: int | None = None) -> None:
        """The client stops (at ``position_ms``, or where it last was): the watch record is
        written now (VideoFrame.logFileWatch: the SetWatchedTimes math with the playback's
        real start and SageTV's "now")."""
        with self._lock:
            mf = self._by_airing[airing_id]
            playback = self._playing.pop(airing_id, None)
            if playback is None:
                raise ValueError(f"airing {airing_id} is not being played")
            end = playback.position_ms if position_ms is None else position_ms
            self._set_watched_times(mf, end, playback.real_start_ms, self.clock_ms())

    def playing(self) -> dict[int, int]:
        """Airings being played now: airing id -> position (airing timeline)."""
        with self._lock:
            return {a: p.position_ms for a, p in self._playing.items()}

    # --- inspecting state ---------------------------------------------------------------------
    def media_file_json(self, media_file_id: int) -> dict[str, Any]:
        """The MediaFile object exactly as served without a filter."""
        with self._lock:
            view = self._view(self._by_mf[media_file_id], self.clock_ms())
            return _build(self._plan(None).mf, view)

    def airing_json(self, airing_id: int) -> dict[str, Any]:
        """The Airing object exactly as served without a filter."""
        with self._lock:
            view = self._view(self._by_airing[airing_id], self.clock_ms())
            return _build(self._plan(None).airing, view)

    def media_files(self) -> list[SageMediaFile]:
        with self._lock:
            return [self._by_mf[i] for i in self._ordered_ids()]

    def show_last_watched(self, show_external_id: str) -> int:
        with self._lock:
            return self._shows[show_external_id].last_watched

    # --- watched semantics (§6, §8.4) ---------------------------------------------------------
    def _ignore_ms(self, mf: SageMediaFile) -> int:
        return self.watch_ignore_movie_ms if mf.is_movie else self.watch_ignore_ms

    def _is_full(self, mf: SageMediaFile, w: tuple[int, int, int, int] | None) -> bool:
        """BigBrother.isFullWatch: the record itself covers the airing (AiringDuration based)."""
        if w is None:
            return False
        air_dur, watched = mf.airing_duration_ms, w[1] - w[0]
        return air_dur - watched < self._ignore_ms(mf) and watched / air_dur > (
            COMPLETE_WATCH_FRACTION)

    def _view(self, mf: SageMediaFile, now: int) -> _View:
        show = self._shows[mf.show_external_id]
        w = self._watch.get(mf.airing_id)
        full = self._is_full(mf, w)
        # IsWatched: a unique show's flag counts for every airing of it (§6.2)
        watched = (show.unique and show.last_watched > 0) or full
        latest = mf.airing_start_ms  # BigBrother.getLatestWatch
        if w is not None:
            m = max(mf.airing_start_ms, w[1])
            end = mf.schedule_end_ms
            if not mf.currently_recording:
                end = min(mf.file_end_ms, end)
            if end - m < START_OVER_MS and (mf.schedule_end_ms < now or not mf.is_tv):
                latest = mf.airing_start_ms  # watched to the end: start over
            else:
                latest = m + (3000 if self.latest_watched_plus_3s else 0)
        return _View(mf, show, w, full, watched, latest)

    def _set_last_watched(self, show: _Show, value: int) -> None:
        if value != show.last_watched:
            show.last_watched = value
            self._invalidate(show.media_file_ids)  # IsWatched of every airing of the show

    def _merge(self, mf: SageMediaFile, start: int, end: int, real_start: int,
               real_end: int) -> None:
        """Wizard.addWatched: one record per airing; start only shrinks, end only grows."""
        old = self._watch.get(mf.airing_id)
        if old is None:
            new = (start, end, real_start, real_end)
        else:
            ws, we, rs, re_ = old
            new = (min(ws, start), max(we, end),
                   rs if real_start == 0 else min(rs, real_start), max(re_, real_end))
        self._watch[mf.airing_id] = new
        self._invalidate((mf.media_file_id,))

    def _set_watched(self, mf: SageMediaFile) -> None:
        # BigBrother.setWatched(a), the "manual" path: every fake airing is TV or video, so
        # the TV/video/DVD/BluRay check always passes
        show = self._shows[mf.show_external_id]
        self._set_last_watched(show, max(show.last_watched, mf.airing_start_ms))
        self._merge(mf, mf.airing_start_ms, mf.airing_end_ms, 0, 0)

    def _clear_watched(self, mf: SageMediaFile) -> None:
        # BigBrother.clearWatched: the show flag (shared by all its airings) and this record
        self._set_last_watched(self._shows[mf.show_external_id], 0)
        if self._watch.pop(mf.airing_id, None) is not None:
            self._invalidate((mf.media_file_id,))

    def _watch_math(self, mf: SageMediaFile, watched_end: int) -> tuple[bool, bool]:
        """(writes anything, complete) of BigBrother.setWatched for a viewing from the file
        start to ``watched_end`` (§6.5 steps 1-5)."""
        # AiringAPI.SetWatchedTimes -> BigBrother.setWatched(air, FileStartTime, end, realStart,
        # now): the start is the file start clamped to the airing start; the end is clamped
        # to the airing end (§6.5 steps 1-3)
        start = max(mf.airing_start_ms, mf.file_start_ms)
        end = min(mf.airing_end_ms, watched_end)
        duration = end - start
        if duration <= MIN_WATCH_MS:
            return False, False  # silently nothing (§6.5 step 4)
        air_dur = mf.airing_duration_ms
        show = self._shows[mf.show_external_id]
        valid = air_dur
        if (not self.dont_use_running_time_for_watched and 10_000 < show.duration_ms < air_dur
                and air_dur - show.duration_ms < MAX_SHOW_DURATION_DIFF_MS):
            valid = show.duration_ms
        old = self._watch.get(mf.airing_id)
        if old is not None:
            duration = max(end, old[1]) - min(start, old[0])
        return True, (valid - duration < self._ignore_ms(mf)
                      and duration / valid > COMPLETE_WATCH_FRACTION)

    def _set_watched_times(self, mf: SageMediaFile, watched_end: int, real_start: int,
                           now: int) -> None:
        writes, complete = self._watch_math(mf, watched_end)
        if not writes:
            return
        start = max(mf.airing_start_ms, mf.file_start_ms)
        self._merge(mf, start, min(mf.airing_end_ms, watched_end), real_start, now)
        if complete:
            show = self._shows[mf.show_external_id]
            self._set_last_watched(show, max(show.last_watched, mf.airing_start_ms))

    def _recently_watched(self, look_back_ms: int) -> list[SageMediaFile]:
        """Global.GetRecentlyWatched (§10): the airings being played, then those whose
        watch record ended (RealWatchedEndTime) within the look-back. GUESS: the watches
        in the order the watch index keeps them (oldest end first), an airing listed once,
        and a record without a real end time (a manual SetWatched) never listed."""
        cutoff = self.clock_ms() - look_back_ms
        playing = [self._by_airing[a] for a in self._playing]
        listed = set(self._playing)
        recent = sorted((w[3], airing) for airing, w in self._watch.items()
                        if w[3] > 0 and w[3] >= cutoff and airing not in listed)
        return playing + [self._by_airing[airing] for _, airing in recent]

    # --- serialization and its cache ----------------------------------------------------------
    def _plan(self, names: frozenset[str] | None) -> _Plan:
        plan = self._plans.get(names)
        if plan is None:
            plan = self._plans[names] = _Plan(names, self.field_set)
        return plan

    def _invalidate(self, media_file_ids: Any) -> None:
        for cache in self._frags.values():
            for mf_id in media_file_ids:
                cache.pop(mf_id, None)

    def _fragments(self, mfs: list[SageMediaFile], names: frozenset[str] | None,
                   now: int) -> list[bytes]:
        plan = self._plan(names)
        cache_past = self._frags.setdefault((names, True), {})
        cache_live = self._frags.setdefault((names, False), {})
        out = []
        for mf in mfs:
            cache = cache_past if (not mf.is_tv or mf.schedule_end_ms < now) else cache_live
            frag = cache.get(mf.media_file_id)
            if frag is None:
                frag = cache[mf.media_file_id] = _dumps(_build(plan.mf, self._view(mf, now)))
            out.append(frag)
        return out

    def _ordered_ids(self) -> list[int]:
        if not self._order_sorted:
            self._order.sort()
            self._order_sorted = True
        return self._order

    # --- HTTP -----------------------------------------------------------------------------------
    def date_clock_s(self) -> float:
        """The server's clock (epoch seconds) for the Date header of every reply."""
        return self.clock_ms() / 1000

    @staticmethod
    def _is_api_path(path: str) -> bool:
        # /sagex/ (and /sagex) fall back to the api handler (§1.1)
        return path in ("/sagex", "/sagex/", "/sagex/api") or path.startswith("/sagex/api/")

    def function_of(self, request: Request) -> str | None:
        """The sagex function a request calls (``Api.`` stripped; ``pkg:Func`` kept whole)."""
        if not self._is_api_path(request.path):
            return None
        command = self._command(request)
        if command is None:
            return None
        if _SERVICE_RE.search(command):
            return command
        m = _API_RE.search(command)
        return m.group(2) if m else command

    @staticmethod
    def _command(request: Request) -> str | None:
        # ApiHandler reads "command" first and only then "c"
        command = request.param("command")
        if command is None:
            command = request.param("c")
        return command if command is not None and command.strip() else None

    def handle(self, request: Request) -> Response:
        if not self._authorized(request):
            # Jetty's BASIC authenticator for realm SageTVRealm (§1.4)
            return Response(401, _jetty_page(401, "Unauthorized", request.path), _JETTY_HTML_TYPE,
                            {"WWW-Authenticate": 'basic realm="SageTVRealm"',
                             "Cache-Control": "must-revalidate,no-cache,no-store"})
        if not request.path.startswith("/sagex/") and request.path != "/sagex":
            return Response(404, _jetty_page(404, "Not Found", request.path), _JETTY_HTML_TYPE)
        if not self._is_api_path(request.path):
            handler = request.path.split("/")[2]
            reason = (f"Invalid Handler: {handler}.  Valid handlers are media, api, .The parameter "
                      "'&_debug=true' will enable extra debug information in the logs")
            return Response(404, _jetty_page(404, reason, request.path), _JETTY_HTML_TYPE)
        if request.method == "OPTIONS":
            return Response(200, b"", "text/plain;charset=UTF-8",
                            {"Allow": "GET, HEAD, POST, OPTIONS", "X-SagexCors": "false"})
        if request.method not in ("GET", "HEAD", "POST"):
            reason = f"HTTP method {request.method} is not supported by this URL"
            return Response(405, _jetty_page(405, reason, request.path), _JETTY_HTML_TYPE)
        if self.function_of(request) != "GetMediaFiles":
            with self._lock:
                return self._api(request)
        with self._listing_lock:
            self.listing_calls += 1
            self.listings_in_flight += 1
            self.listings_in_flight_max = max(self.listings_in_flight_max,
                                              self.listings_in_flight)
        try:
            if self.list_delay_s > 0:
                time.sleep(self.list_delay_s)
            with self._lock:
                return self._api(request)
        finally:
            with self._listing_lock:
                self.listings_in_flight -= 1

    def _authorized(self, request: Request) -> bool:
        scheme, _, credentials = (request.header("authorization") or "").strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("iso-8859-1")
        except ValueError:
            return False
        user, colon, password = decoded.partition(":")
        return bool(colon) and user == self.user and password == self.password

    def _api(self, request: Request) -> Response:
        # the order of checks is ApiHandler.handleRequest's (SX)
        raw_encoder = request.param("encoder")
        encoder: str | None = raw_encoder
        if encoder is None or not encoder.strip():
            encoder = "xml"  # the real default: a client that forgets encoder=json gets XML
        elif encoder not in ("xml", "json", "nielm", "image", "raw"):
            encoder = None
        if request.param("jsoncallback") is not None:
            encoder = "json"
        if encoder is None:
            return self._xml_error(SagexError(
                "java.io.IOException", f"Inavalid Reply Encoder: {raw_encoder}"))  # sic (§3.2)
        if request.param("q") is not None or not request.query:
            return Response(200, self._help_page(), _HTML_TYPE)
        try:
            reply = self._call(request)
            reply = self._page(reply, request)
            if encoder != "json":
                raise SagexError("sagex.fake.NotImplemented",
                                 f"this fake sagex only implements encoder=json; a real server "
                                 f"would have answered this request with encoder={encoder}")
            body = self._encode(reply, request)
        except SagexError as exc:
            if encoder != "json":
                return self._xml_error(exc)
            body = _dumps({"sagexVersion": self.sagex_version, "exception": exc.trace(),
                           **({} if exc.message is None else {"error": exc.message})})
            return Response(200, body, _JSON_TYPE)
        callback = request.param("jsoncallback")
        if callback is not None and callback.strip():
            body = callback.encode("utf-8") + b"(" + body + b")"
        return Response(200, body, _JSON_TYPE)

    def _xml_error(self, exc: SagexError) -> Response:
        body = (f'<error sagex-version="{self.sagex_version}"><message><![CDATA[{exc.message}]]>'
                f"</message><exception><![CDATA[{exc.trace()}]]></exception></error>")
        return Response(200, body.encode("utf-8"), _XML_TYPE)

    def _help_page(self) -> bytes:
        version = self.sagex_version
        return (f"<head><title>Sage API - {version}</title></head>\n"
                f"<h1>Sage API - {version}</h1>\n<table>\n<tr><td>Url Format:</td><td>"
                "/sagex/api?command=SAGE_COMMAND&amp;1=arg1&amp;2=arg2...&amp;start=#&amp;size=#"
                "&amp;encoder=xml|json|nielm|image|raw&amp;filter=Field1|Field2</td></tr>\n"
                "</table>\n").encode()

    # --- calling a function -------------------------------------------------------------------
    def _call(self, request: Request) -> _Reply | None:
        command = self._command(request)
        if command is None:
            raise SagexError("java.io.IOException", "Missing Command Argument; Use 'command' or "
                             "'c' to specify the command.", ())
        args: list[str | None] = []
        for i in range(1, 99):  # 1..98, up to the first missing number (§1.2)
            value = request.param(str(i))
            if value is None:
                break
            args.append(None if value.lower() == "null" else value)
        service = _SERVICE_RE.search(command)
        if service and self.plex_js_service and command == "plex:GetMediaFileForName":
            if len(args) != 1 or args[0] is None:
                raise SagexError("java.lang.RuntimeException", "plex.js: GetMediaFileForName "
                                 "takes one file name", ())
            return self._get_media_file_for_name(args[0])
        if service:
            # JS services (plex.js of the original tool) are not installed on this server
            package = service.group(1)
            raise SagexError("java.lang.RuntimeException",
                             f"java.lang.RuntimeException: Invalid Service Package: {package}; "
                             f"Missing Service File: {_SERVICE_DIR}/{package}.js",
                             ("sagex.remote.api.ApiHandler.callService(ApiHandler.java:189)",))
        api_match = _API_RE.search(command)
        api, name = (api_match.group(1), api_match.group(2)) if api_match else (None, command)
        function = self._functions.get(name)
        if api is None:
            if function is None:
                raise _runtime(f"Unknown Sage Command: {name}")
        elif api not in _KNOWN_APIS:
            raise _runtime(f"Unknown Sage Command: {name} for Api: {api}")
        elif function is None or function.api != api:
            raise _runtime(f"Invalid {api}Factory Command: {name}")
        assert function is not None
        if name == "GetMediaFiles":
            # overloaded by argument count: () or (String) (SX MediaFileAPIFactory)
            if len(args) > 1:
                raise _runtime(f"Invalid MediaFileAPIFactory Command: {name}")
            return self._get_media_files(args)
        required = len(function.args)
        if len(args) != required:
            word = "few" if len(args) < required else "many"
            raise _runtime(f"Too {word} args; Your Arg Count: {len(args)}; "
                           f"Required Arg Count: {required}", _FRAMES_HELPER + _FRAMES_FACTORY)
        typed = [self._typed(arg, kind) for arg, kind in zip(args, function.args, strict=False)]
        return function.impl(typed)

    def _typed(self, text: str | None, kind: str) -> Any:
        """RequestHelper.makeTypedArg (§1.3)."""
        if kind == "int":
            return _parse_java_int(text, 32)
        if kind == "long":
            return _parse_java_int(text, 64)
        if kind == "file" and text is None:
            raise SagexError("java.lang.NullPointerException", None, _FRAMES_HELPER)
        if kind in ("str", "file"):
            return text
        return self._resolve(text)

    def _resolve(self, ref: str | None) -> tuple[str, Any] | None:
        """TypesUtil.toSageObject: ``type:id`` -> ("airing"|"mf", SageMediaFile) | ("show", _Show).

        No colon, an unknown (or differently cased) type, or an unknown id: None, silently.
        """
        if ref is None:
            # toSageRefParts(null) dereferences it: a NullPointerException without a message
            raise SagexError("java.lang.NullPointerException", None, _FRAMES_REF)
        kind, colon, ident = ref.partition(":")
        if not colon:
            return None
        if kind in ("airing", "mediafile", "channel", "favorite", "person", "systemmessage"):
            number = _parse_java_int(ident, 32, ("java.lang.Integer.parseInt(Integer.java:615)",
                                                 "sagex.util.TypesUtil.toSageObject"
                                                 "(TypesUtil.java:178)") + _FRAMES_REF[2:])
            if kind == "airing" and number in self._by_airing:
                return ("airing", self._by_airing[number])
            if kind == "mediafile" and number in self._by_mf:
                return ("mf", self._by_mf[number])
            return None
        if kind == "show":
            show = self._shows.get(ident)
            return ("show", show) if show is not None else None
        if kind == "userrecord" and ":" not in ident:
            raise SagexError("java.lang.ArrayIndexOutOfBoundsException", "1", _FRAMES_REF[1:])
        return None

    @staticmethod
    def _media_file_of(ref: tuple[str, Any] | None) -> SageMediaFile | None:
        """AiringAPI and MediaFileAPI convert between a MediaFile and its Airing (§6.1)."""
        return ref[1] if ref is not None and ref[0] in ("airing", "mf") else None

    def _show_of(self, ref: tuple[str, Any] | None) -> _Show | None:
        if ref is None:
            return None
        return ref[1] if ref[0] == "show" else self._shows[ref[1].show_external_id]

    def _page(self, reply: _Reply | None, request: Request) -> _Reply | None:
        """ApiHandler's range check: arrays are cut to [start, start+size), default size 50."""
        if reply is None or reply[0] not in ("list", "mflist", "airinglist", "long2d") or \
                not reply[1]:
            return reply  # an empty array is not paged at all
        items = reply[1]
        start = _param_int(request, "start", 0)
        size = min(_param_int(request, "size", 50), len(items))
        end = min(_i32(start + size), len(items))
        if start > end:
            raise SagexError("java.lang.IllegalArgumentException", f"{start} > {end}",
                             _FRAMES_PAGING)
        if start < 0:
            # System.arraycopy's exception has no message on Java 8
            raise SagexError("java.lang.ArrayIndexOutOfBoundsException", None,
                             ("java.lang.System.arraycopy(Native Method)",) + _FRAMES_PAGING)
        return (reply[0], items[start:end])

    def _filter_names(self, request: Request) -> frozenset[str] | None:
        text = request.param("filter")
        if text is None:
            return None
        names = _java_split_pipe(text)
        return frozenset(names) if names else None  # "|" splits to nothing: no filter

    def _encode(self, reply: _Reply | None, request: Request) -> bytes:
        """SageAPIBuilder.build("Result", value) with the JSON builder (§2.2)."""
        if reply is None:
            return b"{}"
        kind, value = reply
        names = self._filter_names(request)
        now = self.clock_ms()
        if kind == "scalar":
            return b"{}" if value is None else _dumps({"Result": value})
        if kind in ("list", "map"):
            return _dumps({"Result": value})
        if kind == "mflist":
            return b'{"Result":[' + b",".join(self._fragments(value, names, now)) + b"]}"
        if kind == "mf":
            return b'{"MediaFile":' + self._fragments([value], names, now)[0] + b"}"
        plan = self._plan(names)
        if kind == "airinglist":
            return _dumps({"Result": [_build(plan.airing, self._view(mf, now)) for mf in value]})
        if kind == "airing":
            return _dumps({"Airing": _build(plan.airing, self._view(value, now))})
        if kind == "show":
            return _dumps({"Show": _build(plan.show, value)})
        if kind == "channel":
            return _dumps({"Channel": _build(plan.channel, value)})
        # long2d: a long[][] is an Object[] whose elements are not (SageAPIBuilder.buildArray)
        raise SagexError("java.lang.ClassCastException",
                         "[J cannot be cast to [Ljava.lang.Object;", _FRAMES_ENCODE)

    # --- the functions --------------------------------------------------------------------------
    def _function_table(self) -> dict[str, _Function]:
        mf_of, show_of = self._media_file_of, self._show_of
        table: dict[str, _Function] = {
            "GetMediaFiles": _Function("MediaFileAPI", ("str",), self._get_media_files),
            "GetMediaFileForID": _Function("MediaFileAPI", ("int",), lambda a: (
                ("mf", self._by_mf[a[0]]) if a[0] in self._by_mf else None)),
            "GetMediaFileForFilePath": _Function("MediaFileAPI", ("file",),
                                                 self._get_media_file_for_path),
            "GetMediaFileAiring": _Function("MediaFileAPI", ("obj",), lambda a: (
                ("airing", mf_of(a[0])) if mf_of(a[0]) else None)),
            "GetStartForSegment": _Function("MediaFileAPI", ("obj", "int"),
                                            lambda a: self._segment(a, lambda s: s[1])),
            "GetEndForSegment": _Function("MediaFileAPI", ("obj", "int"),
                                          lambda a: self._segment(a, lambda s: s[2])),
            "GetDurationForSegment": _Function("MediaFileAPI", ("obj", "int"),
                                               lambda a: self._segment(a, lambda s: s[2] - s[1])),
            "GetFileForSegment": _Function("MediaFileAPI", ("obj", "int"),
                                           lambda a: self._segment(a, lambda s: s[0], None)),
            "GetStartTimesForSegments": _Function("MediaFileAPI", ("obj",), lambda a: (
                ("long2d", [[s, e] for _, s, e in mf_of(a[0]).segments])
                if mf_of(a[0]) else None)),
            "GetAiringForID": _Function("AiringAPI", ("int",), lambda a: (
                ("airing", self._by_airing[a[0]]) if a[0] in self._by_airing else None)),
            "GetMediaFileForAiring": _Function("AiringAPI", ("obj",), lambda a: (
                ("mf", mf_of(a[0])) if mf_of(a[0]) else None)),
            "GetShow": _Function("AiringAPI", ("obj",), lambda a: (
                ("show", show_of(a[0])) if mf_of(a[0]) else None)),
            "GetChannel": _Function("AiringAPI", ("obj",), lambda a: (
                ("channel", mf_of(a[0])) if mf_of(a[0]) and mf_of(a[0]).is_tv else None)),
            "SetWatched": _Function("AiringAPI", ("obj",), lambda a: self._write(
                a, self._set_watched)),
            "ClearWatched": _Function("AiringAPI", ("obj",), lambda a: self._write(
                a, self._clear_watched)),
            "SetWatchedTimes": _Function("AiringAPI", ("obj", "long", "long"), lambda a: (
                self._write(a, lambda mf: self._set_watched_times(mf, a[1], a[2],
                                                                  self.clock_ms())))),
            "GetRecentlyWatched": _Function("Global", ("long",), lambda a: (
                "airinglist", self._recently_watched(a[0]))),
            "GetShowForExternalID": _Function("ShowAPI", ("str",), lambda a: (
                ("show", self._shows[a[0]]) if a[0] in self._shows else None)),
        }
        # every serialized field is also a one-argument getter (§2.4 works the other way round)
        for api, fields, level in (("MediaFileAPI", _MF_FIELDS, "mf"),
                                   ("AiringAPI", _AIRING_FIELDS, "airing"),
                                   ("ShowAPI", _SHOW_FIELDS, "show")):
            for key, get, default, head_only in fields:
                if get is None or key in ("IsShowFirstRun", "IsShowReRun") or (
                        head_only and self.field_set != "head"):
                    continue
                name = key if key.startswith("Is") else "Get" + key
                table[name] = _Function(api, ("obj",), self._getter(level, key, get, default))
        return table

    def _getter(self, level: str, key: str, get: Callable[[Any], Any],
                default: Any) -> Callable[[list[Any]], _Reply | None]:
        def call(args: list[Any]) -> _Reply | None:
            ref = args[0]
            if key.endswith("Object"):
                # Is*Object: no type conversion (CORE IsMediaFileObject and friends)
                wanted = {"mf": "mf", "airing": "airing", "show": "show"}[level]
                return ("scalar", ref is not None and ref[0] == wanted)
            if level == "show":
                target = self._show_of(ref)
                value = default if target is None else get(target)
            else:
                mf = self._media_file_of(ref)
                value = default if mf is None else get(self._view(mf, self.clock_ms()))
            if isinstance(value, list):
                return ("list", value)
            if isinstance(value, dict):
                return ("map", value)
            return None if value is None else ("scalar", value)
        return call

    def _get_media_files(self, args: list[str | None]) -> _Reply | None:
        mfs = [self._by_mf[i] for i in self._ordered_ids()]
        if not args:
            return ("mflist", mfs)
        mask_text = args[0]
        if mask_text is None:
            return None  # SageTV fails on a null mask; SageAPI.call swallows it: {} (§3.2)
        mask = 0
        for letter in mask_text:
            mask |= _MASK_LETTERS.get(letter.upper(), 0)
        library_only = "L" in mask_text  # CORE tests indexOf("L"): upper case only
        return ("mflist", [mf for mf in mfs
                           if mask & (_MASK_TV | _MASK_VIDEO if mf.is_tv else _MASK_VIDEO)
                           and (mf.is_library or not library_only)])

    def _get_media_file_for_path(self, args: list[Any]) -> _Reply | None:
        path = args[0].rstrip("/\\") if len(args[0]) > 1 else args[0]
        for mf_id in self._ordered_ids():
            mf = self._by_mf[mf_id]
            if path in mf.segment_files:
                return ("mf", mf)
        return None

    def _get_media_file_for_name(self, name: str) -> _Reply:
        """The original tool's plex.js (§5): a linear scan of every media file (any type),
        the first whose MediaFileRelativePath equals ``name`` or one of whose segment files
        contains it; ``{"Result":false}`` when none does. O(#media files) per call."""
        for mf_id in self._ordered_ids():  # MediaFileAPI.GetMediaFiles(): all of them
            mf = self._by_mf[mf_id]
            # GetMediaFileRelativePath as _MF_FIELDS serves it, without building a view
            relative = "" if mf.is_tv else _basename(mf.segments[0][0])
            if relative == name or any(name in path for path, _, _ in mf.segments):
                return ("mf", mf)
        return ("scalar", False)

    def _segment(self, args: list[Any], pick: Callable[[tuple[str, int, int]], Any],
                 missing: Any = 0) -> _Reply | None:
        mf, number = self._media_file_of(args[0]), args[1]
        value = pick(mf.segments[number]) if mf and 0 <= number < len(mf.segments) else missing
        return None if value is None else ("scalar", value)

    def _write(self, args: list[Any], action: Callable[[SageMediaFile], None]) -> None:
        mf = self._media_file_of(args[0])
        if mf is not None:  # a null airing: the call does nothing and answers {} (§3.2)
            action(mf)
        return None

    def _take_id(self, wanted: int | None) -> int:
        if wanted is not None:
            if wanted in self._used_ids or wanted <= 0:
                raise ValueError(f"id {wanted} is already used (or not positive)")
            self._used_ids.add(wanted)
            return wanted
        while self._next_id in self._used_ids:
            self._next_id += 1
        self._used_ids.add(self._next_id)
        self._next_id += 1
        return self._next_id - 1


def _jetty_page(status: int, reason: str, path: str) -> bytes:
    """The small HTML error page Jetty 9 writes for sendError (401, 404, 405)."""
    title = {401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed"}.get(status, "")
    return (f'<html>\n<head>\n<meta http-equiv="Content-Type" content="text/html;'
            f'charset=ISO-8859-1"/>\n<title>Error {status} {title}</title>\n</head>\n<body>'
            f"<h2>HTTP ERROR {status}</h2>\n<p>Problem accessing {path}. Reason:\n<pre>    "
            f"{reason}</pre></p><hr><a href=\"http://eclipse.org/jetty\">Powered by Jetty:// "
            f"9.4.18.v20190429</a><hr/>\n</body>\n</html>\n").encode("iso-8859-1", "replace")


def serve_sage(app: FakeSage | None = None, **kwargs: Any) -> FakeServer:
    """Start a FakeServer for ``app`` (or for ``FakeSage(**kwargs)``) on a free port."""
    if app is not None and kwargs:
        raise TypeError("pass either an app or FakeSage keyword arguments, not both")
    return FakeServer(app or FakeSage(**kwargs)).start()


# --- example data (§8.5) ------------------------------------------------------------------------
MINUTE_MS = 60_000


def add_example_library(sage: FakeSage, *, base_ms: int, fillers: int = 55,
                        root: str = "/var/media/tv") -> dict[str, SageMediaFile]:
    """The §8.5 fixture set, one airing a day from ``base_ms``, plus ``fillers`` plain recordings.

    Names: on_time (the file starts 5 ms into a 59 min airing), padded (file 2 min early,
    3 min late), late (the file starts 90 s into the airing), two_segment (20 min + 37 min
    with a 2 min gap), imported (a library video), movie (2 h, IsMovie), rerun_a / rerun_b
    (one ShowExternalID); fillers are filler_0, filler_1, ...
    """
    day = 24 * 60 * MINUTE_MS
    a0 = [base_ms + i * day for i in range(8)]
    hour = 59 * MINUTE_MS
    add = sage.add_media_file
    items = {
        "on_time": add(title="Castle", episode_title="Habeas Corpse", season=7, episode=19,
                       segments=[(f"{root}/Castle-HabeasCorpse-1-0.mpg", a0[0] + 5, a0[0] + hour)],
                       airing_start_ms=a0[0], airing_end_ms=a0[0] + hour,
                       show_duration_ms=60 * MINUTE_MS),
        "padded": add(title="Padded Show", episode_title="Early", season=1, episode=1,
                      segments=[(f"{root}/PaddedShow-Early-2-0.mpg", a0[1] - 2 * MINUTE_MS,
                                 a0[1] + hour + 3 * MINUTE_MS)],
                      airing_start_ms=a0[1], airing_end_ms=a0[1] + hour,
                      schedule_start_ms=a0[1] - 2 * MINUTE_MS,
                      schedule_end_ms=a0[1] + hour + 3 * MINUTE_MS),
        "late": add(title="Late Show", episode_title="Tuner Busy", season=1, episode=2,
                    segments=[(f"{root}/LateShow-TunerBusy-3-0.mpg", a0[2] + 90_000,
                               a0[2] + hour)],
                    airing_start_ms=a0[2], airing_end_ms=a0[2] + hour),
        "two_segment": add(title="Split Show", episode_title="Restarted", season=2, episode=5,
                           segments=[(f"{root}/SplitShow-Restarted-4-0.mpg", a0[3] + 5,
                                      a0[3] + 20 * MINUTE_MS),
                                     (f"{root}/SplitShow-Restarted-4-1.mpg",
                                      a0[3] + 22 * MINUTE_MS, a0[3] + hour)],
                           airing_start_ms=a0[3], airing_end_ms=a0[3] + hour),
        "imported": add(title="Holiday Video", is_tv=False, is_library=True,
                        segments=[("/var/media/videos/Holiday Video.mkv", a0[4],
                                   a0[4] + 42 * MINUTE_MS)],
                        airing_start_ms=a0[4], airing_end_ms=a0[4] + 42 * MINUTE_MS),
        "movie": add(title="The Long Film", is_movie=True,
                     segments=[(f"{root}/TheLongFilm-5-0.mpg", a0[5] + 5, a0[5] + 120 * MINUTE_MS)],
                     airing_start_ms=a0[5], airing_end_ms=a0[5] + 120 * MINUTE_MS),
        "rerun_a": add(title="Rerun", episode_title="Twice", season=3, episode=4,
                       show_external_id="EP000000000034",
                       segments=[(f"{root}/Rerun-Twice-6-0.mpg", a0[6] + 5, a0[6] + hour)],
                       airing_start_ms=a0[6], airing_end_ms=a0[6] + hour),
        "rerun_b": add(title="Rerun", episode_title="Twice", season=3, episode=4,
                       show_external_id="EP000000000034",
                       segments=[(f"{root}/Rerun-Twice-7-0.mpg", a0[7] + 5, a0[7] + hour)],
                       airing_start_ms=a0[7], airing_end_ms=a0[7] + hour),
    }
    for i in range(fillers):
        start = base_ms + (8 + i) * day
        items[f"filler_{i}"] = add(
            title="Filler", episode_title=f"Episode {i + 1}", season=1, episode=i + 1,
            segments=[(f"{root}/Filler-Episode{i + 1}-{100 + i}-0.mpg", start + 5, start + hour)],
            airing_start_ms=start, airing_end_ms=start + hour)
    return items
