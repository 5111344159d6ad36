"""Contract tests: the fake sagex server answers raw HTTP the way the sagex reference documents.

Everything goes over real HTTP with plain ``requests`` calls, so these tests also pin what a
client sees on the wire: status codes, content types, reply shapes, error bodies, paging and
SageTV's watched semantics (§ numbers refer to the sagex reference (SageTV and sagex sources)).
"""

from __future__ import annotations

import json
import threading
import time
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

import pytest
import requests

from tests.fakes.fake_http import FakeServer
from tests.fakes.fake_sagex import FakeSage, SageMediaFile, add_example_library, serve_sage
from tests.fakes.world import SAGE_PASSWORD, SAGE_USER, World, at, none, watched

MIN = 60_000
DAY = 24 * 60 * MIN
BASE = 1_700_000_000_000  # airing start of the first example item
NOW = BASE + 200 * DAY  # every example schedule has ended by then
SYNC_FILTER = ("MediaFileID|IsTVFile|IsVideoFile|FileStartTime|FileEndTime|FileDuration|"
               "NumberOfSegments|SegmentFiles|MediaFileAiring|AiringID|AiringStartTime|"
               "AiringEndTime|AiringDuration|IsWatched|IsWatchedCompletely|WatchedStartTime|"
               "WatchedEndTime|WatchedDuration|RealWatchedStartTime|RealWatchedEndTime|"
               "LatestWatchedTime|Show|ShowTitle|ShowEpisode")  # the §2.6 example


class Clock:
    """The server's "now", moved by the tests."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class Api:
    """Raw sagex calls: ``get("SetWatched", "airing:1")`` sends c=SetWatched&1=airing:1."""

    def __init__(self, base_url: str) -> None:
        self.url = base_url + "/sagex/api"
        self.session = requests.Session()
        self.session.auth = ("sage", "frey")

    def get(self, c: str | None, *args: Any, **params: Any) -> requests.Response:
        query: dict[str, Any] = {"encoder": "json"}
        if c is not None:
            query["c"] = c
        query.update({str(i): arg for i, arg in enumerate(args, 1)})
        query.update(params)  # encoder=None drops the encoder
        return self.session.get(self.url, params=query, timeout=10)

    def json(self, c: str | None, *args: Any, **params: Any) -> dict[str, Any]:
        reply = self.get(c, *args, **params)
        assert reply.status_code == 200
        assert reply.headers["Content-Type"] == "application/json;charset=UTF-8"
        return reply.json()

    def error(self, c: str | None, *args: Any, **params: Any) -> str:
        body = self.json(c, *args, **params)
        assert set(body) == {"sagexVersion", "error", "exception"}, body
        assert body["sagexVersion"] == "9.2.8.1"
        assert body["exception"].startswith("java.")
        return body["error"]

    def mf(self, mf: SageMediaFile, **params: Any) -> dict[str, Any]:
        return self.json("GetMediaFileForID", mf.media_file_id, **params)["MediaFile"]

    def airing(self, mf: SageMediaFile) -> dict[str, Any]:
        return self.mf(mf)["Airing"]

    def listing(self, mask: str = "TV", **params: Any) -> list[dict[str, Any]]:
        return self.json("GetMediaFiles", mask, **params)["Result"]


@pytest.fixture(scope="module")
def server() -> Any:
    srv = FakeServer(FakeSage()).start()
    yield srv
    srv.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def install(server: FakeServer, clock: Clock) -> Any:
    """Put a fresh FakeSage(**options) behind the shared server."""

    def make(**options: Any) -> FakeSage:
        app = FakeSage(clock_ms=clock, **options)
        server.app = app
        server.clear_log()
        server.clear_faults()
        return app

    yield make
    assert not server.errors, server.errors
    server.errors.clear()


@pytest.fixture
def sage(install: Any) -> FakeSage:
    return install()


@pytest.fixture
def lib(sage: FakeSage) -> dict[str, SageMediaFile]:
    return add_example_library(sage, base_ms=BASE)  # 8 named items + 55 fillers


@pytest.fixture
def api(server: FakeServer) -> Api:
    return Api(server.base_url)


def all_states(api: Api) -> list[dict[str, Any]]:
    return api.listing(size=1000, filter=SYNC_FILTER)


# --- transport and authentication (§1, §8.1) ------------------------------------------------------
def test_wrong_password_is_401_with_basic_realm_challenge(api: Api, lib: dict) -> None:
    reply = requests.get(api.url, params={"c": "GetMediaFiles", "encoder": "json"},
                         auth=("sage", "wrong"), timeout=10)
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"] == 'basic realm="SageTVRealm"'
    assert reply.headers["Content-Type"].startswith("text/html")
    assert "401" in reply.text


def test_missing_credentials_are_401_too(api: Api, lib: dict) -> None:
    reply = requests.get(api.url, params={"c": "GetMediaFiles", "encoder": "json"}, timeout=10)
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"] == 'basic realm="SageTVRealm"'


def test_form_post_is_answered_like_get(api: Api, lib: dict) -> None:
    mf = lib["on_time"]
    reply = api.session.post(api.url, data={"c": "GetMediaFileForID", "1": mf.media_file_id,
                                            "encoder": "json"}, timeout=10)
    assert reply.json() == api.json("GetMediaFileForID", mf.media_file_id)


def test_other_sagex_handlers_and_other_paths_are_404_html(api: Api, server: FakeServer,
                                                           lib: dict) -> None:
    for path in ("/sagex/foo", "/sagex/media/fanart", "/other"):
        reply = api.session.get(server.base_url + path, params={"c": "GetMediaFiles"}, timeout=10)
        assert reply.status_code == 404
        assert reply.headers["Content-Type"].startswith("text/html")
    assert "Invalid Handler: foo" in api.session.get(server.base_url + "/sagex/foo").text


def test_sagex_root_falls_back_to_the_api_handler(api: Api, server: FakeServer,
                                                  lib: dict) -> None:
    reply = api.session.get(server.base_url + "/sagex/", timeout=10,
                            params={"c": "GetMediaFileForID", "1": lib["on_time"].media_file_id,
                                    "encoder": "json"})
    assert reply.json()["MediaFile"]["MediaFileID"] == lib["on_time"].media_file_id


def test_request_without_parameters_gets_the_html_help_page(api: Api, lib: dict) -> None:
    reply = api.session.get(api.url, timeout=10)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/html")
    assert "Sage API - 9.2.8.1" in reply.text


def test_absent_encoder_is_answered_in_xml_so_a_json_client_fails_loudly(api: Api,
                                                                         lib: dict) -> None:
    reply = api.get("GetMediaFiles", "TV", encoder=None)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/xml")
    assert reply.text.startswith('<error sagex-version="9.2.8.1">')
    with pytest.raises(ValueError):
        reply.json()


def test_real_errors_keep_their_message_in_the_xml_reply(api: Api, lib: dict) -> None:
    reply = api.get("GetFoo", encoder=None)
    assert "<![CDATA[Unknown Sage Command: GetFoo]]>" in reply.text


def test_unknown_encoder_gets_an_xml_error_with_the_sagex_typo(api: Api, lib: dict) -> None:
    reply = api.get("GetMediaFiles", "TV", encoder="JSON")  # encoder names are case-sensitive
    assert reply.status_code == 200
    assert "Inavalid Reply Encoder: JSON" in reply.text
    with pytest.raises(ValueError):
        reply.json()


def test_jsoncallback_wraps_the_reply_and_forces_json(api: Api, lib: dict) -> None:
    reply = api.get("IsWatched", f"airing:{lib['on_time'].airing_id}", encoder=None,
                    jsoncallback="cb")
    assert reply.text == 'cb({"Result":false})'


def test_replies_are_compact_json_with_the_json_content_type(api: Api, lib: dict) -> None:
    reply = api.get("GetMediaFiles", "TV", size=3)
    assert reply.headers["Content-Type"] == "application/json;charset=UTF-8"
    assert reply.text == json.dumps(reply.json(), separators=(",", ":"), ensure_ascii=False)


# --- errors (§3) ---------------------------------------------------------------------------
def test_unknown_function_is_an_error_body_with_http_200(api: Api, lib: dict) -> None:
    assert api.error("GetFoo") == "Unknown Sage Command: GetFoo"


def test_missing_command_is_an_error(api: Api, lib: dict) -> None:
    assert api.error(None) == ("Missing Command Argument; Use 'command' or 'c' to specify "
                               "the command.")
    assert api.error("  ").startswith("Missing Command Argument")


def test_command_parameter_is_read_before_c(api: Api, lib: dict) -> None:
    assert api.error("GetMediaFiles", command="GetBar") == "Unknown Sage Command: GetBar"


@pytest.mark.parametrize(("args", "message"), [
    ((), "Too few args; Your Arg Count: 0; Required Arg Count: 3"),
    (("airing:1", "2"), "Too few args; Your Arg Count: 2; Required Arg Count: 3"),
    (("airing:1", "2", "3", "4"), "Too many args; Your Arg Count: 4; Required Arg Count: 3"),
])
def test_wrong_argument_count_is_an_error(api: Api, lib: dict, args: tuple,
                                          message: str) -> None:
    assert api.error("SetWatchedTimes", *args) == message


def test_arguments_stop_at_the_first_missing_number(api: Api, lib: dict) -> None:
    reply = api.json("SetWatchedTimes", **{"1": f"airing:{lib['on_time'].airing_id}",
                                           "3": str(NOW)})
    assert reply["error"] == "Too few args; Your Arg Count: 1; Required Arg Count: 3"


def test_get_media_files_with_two_arguments_is_an_invalid_factory_command(api: Api,
                                                                          lib: dict) -> None:
    assert api.error("GetMediaFiles", "T", "V") == "Invalid MediaFileAPIFactory Command: " \
                                                   "GetMediaFiles"


@pytest.mark.parametrize(("c", "args", "bad"), [
    ("GetMediaFileForID", ("abc",), "abc"),
    ("GetMediaFileForID", ("12.5",), "12.5"),
    ("GetMediaFileForID", ("99999999999",), "99999999999"),  # beyond a Java int
    ("GetMediaFileForID", ("mediafile:1",), "mediafile:1"),  # the param is a bare int
    ("SetWatchedTimes", ("airing:1", "soon", "0"), "soon"),
    ("GetStartForSegment", ("mediafile:1", " 1"), " 1"),
])
def test_non_numeric_integer_argument_is_a_number_format_error(api: Api, lib: dict, c: str,
                                                               args: tuple, bad: str) -> None:
    assert api.error(c, *args) == f'For input string: "{bad}"'


@pytest.mark.parametrize("ref", ["airing:abc", "mediafile:x1", "airing:"])
def test_non_numeric_object_id_is_a_number_format_error(api: Api, lib: dict, ref: str) -> None:
    bad = ref.partition(":")[2]
    assert api.error("SetWatched", ref) == f'For input string: "{bad}"'


def test_unknown_object_id_is_a_silent_noop(api: Api, lib: dict) -> None:
    before = all_states(api)
    for c, args in (("SetWatched", ()), ("ClearWatched", ()),
                    ("SetWatchedTimes", (str(BASE + 10 * MIN), "0"))):
        assert api.json(c, "airing:999999999", *args) == {}
        assert api.json(c, "mediafile:999999999", *args) == {}
    assert all_states(api) == before
    assert api.json("IsWatched", "airing:999999999") == {"Result": False}
    assert api.json("GetWatchedEndTime", "airing:999999999") == {"Result": 0}
    assert api.json("GetMediaFileForID", 999999999) == {}
    assert api.json("GetAiringForID", 999999999) == {}


@pytest.mark.parametrize("ref", ["{id}", "Airing:{id}", "AIRING:{id}", "foo:{id}", "show:{ext}"])
def test_object_reference_without_a_known_prefix_is_a_silent_noop(api: Api, lib: dict,
                                                                  ref: str) -> None:
    mf = lib["on_time"]
    ref = ref.format(id=mf.airing_id, ext=mf.show_external_id)
    assert api.json("SetWatched", ref) == {}
    assert api.json("IsWatched", ref) == {"Result": False}
    assert api.airing(mf)["IsWatched"] is False


def test_null_object_argument_is_an_error_without_a_message(api: Api, lib: dict) -> None:
    body = api.json("SetWatched", "null")  # NullPointerException: no "error" key (§3.1)
    assert set(body) == {"sagexVersion", "exception"}
    assert body["exception"].startswith("java.lang.NullPointerException")


def test_api_dot_function_form(api: Api, lib: dict) -> None:
    mf = lib["on_time"]
    assert api.json("MediaFileAPI.GetMediaFileForID", mf.media_file_id)["MediaFile"]
    assert api.json("AiringAPI.SetWatched", f"airing:{mf.airing_id}") == {}
    assert api.airing(mf)["IsWatched"] is True
    assert api.error("AiringAPI.Nope", "x") == "Invalid AiringAPIFactory Command: Nope"
    assert api.error("AiringAPI.GetMediaFiles") == ("Invalid AiringAPIFactory Command: "
                                                    "GetMediaFiles")
    assert api.error("Foo.Bar") == "Unknown Sage Command: Bar for Api: Foo"


def test_js_service_of_the_old_tool_is_not_installed(api: Api, lib: dict) -> None:
    message = api.error("plex:GetMediaFileForName", "Castle-HabeasCorpse-1-0.mpg")
    assert message.startswith("java.lang.RuntimeException: Invalid Service Package: plex; "
                              "Missing Service File: ")
    assert message.endswith("/sagex/services/plex.js")


# --- bulk listing and paging (§4) -------------------------------------------------------------
def test_listing_without_size_returns_only_the_first_50(api: Api, lib: dict) -> None:
    assert len(lib) == 63
    assert len(api.listing()) == 50
    assert len(api.listing(size=100)) == 63


def test_paging_with_start_and_size_walks_every_item_in_id_order(api: Api, lib: dict) -> None:
    pages = [api.listing(start=start, size=20, filter="MediaFileID")
             for start in (0, 20, 40, 60)]
    assert [len(page) for page in pages] == [20, 20, 20, 3]
    ids = [item["MediaFileID"] for page in pages for item in page]
    assert ids == sorted(mf.media_file_id for mf in lib.values())


def test_start_equal_to_the_length_is_an_empty_list(api: Api, lib: dict) -> None:
    assert api.json("GetMediaFiles", "TV", start=63) == {"Result": []}


def test_start_beyond_the_length_is_an_error(api: Api, lib: dict) -> None:
    assert api.error("GetMediaFiles", "TV", start=64) == "64 > 63"
    body = api.json("GetMediaFiles", "TV", start=-1)
    assert "error" not in body and body["exception"].startswith(
        "java.lang.ArrayIndexOutOfBoundsException")


def test_non_integer_start_and_size_fall_back_to_the_defaults(api: Api, lib: dict) -> None:
    assert len(api.listing(start="x", size="lots")) == 50
    assert api.listing(start="", size=2) == api.listing(size=2)


def test_an_empty_listing_is_not_paged(api: Api, lib: dict) -> None:
    assert api.json("GetMediaFiles", "M", start=5) == {"Result": []}


@pytest.mark.parametrize(("mask", "names"), [
    ("T", "all but imported"), ("V", "all"), ("TV", "all"), ("tv", "all"), ("M", "none"),
    ("P", "none"), ("VL", "imported"), ("vl", "all"), ("L", "none"), ("", "none"),
])
def test_media_mask_letters(api: Api, lib: dict, mask: str, names: str) -> None:
    expected = {
        "all": set(lib), "none": set(), "imported": {"imported"},
        "all but imported": set(lib) - {"imported"}}[names]
    ids = {item["MediaFileID"] for item in api.listing(mask, size=100, filter="MediaFileID")}
    assert ids == {lib[name].media_file_id for name in expected}


def test_no_mask_lists_every_media_file_and_a_null_mask_lists_nothing(api: Api,
                                                                      lib: dict) -> None:
    assert len(api.json("GetMediaFiles", size=100)["Result"]) == 63
    assert api.json("GetMediaFiles", "null") == {}


# --- reply shapes and filters (§2) ------------------------------------------------------------
def test_single_media_file_is_wrapped_but_list_items_are_bare(api: Api, lib: dict) -> None:
    single = api.json("GetMediaFileForID", lib["on_time"].media_file_id)
    assert list(single) == ["MediaFile"]
    assert single["MediaFile"]["MediaFileID"] == lib["on_time"].media_file_id
    first = api.listing(size=1)[0]
    assert first == single["MediaFile"]


def test_single_item_reply_is_shaped_like_the_2015_capture(api: Api, sage: FakeSage,
                                                           lib: dict) -> None:
    mf = lib["on_time"]  # the §2.5 Castle recording: a 59 min airing, file 5 ms late
    sage.set_watch_record(mf.airing_id, BASE + 5, BASE + 185_101, NOW - 7600, NOW)
    item = api.mf(mf)
    for key, kind in (("MediaFileID", int), ("MediaTitle", str), ("IsTVFile", bool),
                      ("IsVideoFile", bool), ("IsLibraryFile", bool),
                      ("IsCompleteRecording", bool), ("IsFileCurrentlyRecording", bool),
                      ("FileStartTime", int), ("FileEndTime", int), ("FileDuration", int),
                      ("NumberOfSegments", int), ("SegmentFiles", list), ("Airing", dict)):
        assert type(item[key]) is kind, key
    assert (item["FileStartTime"], item["FileEndTime"], item["FileDuration"]) == (
        BASE + 5, BASE + 59 * MIN, 59 * MIN - 5)
    airing = item["Airing"]
    assert airing["AiringID"] == mf.airing_id
    assert (airing["AiringStartTime"], airing["AiringEndTime"], airing["AiringDuration"]) == (
        BASE, BASE + 59 * MIN, 59 * MIN)
    assert (airing["ScheduleStartTime"], airing["ScheduleEndTime"]) == (BASE, BASE + 59 * MIN)
    assert airing["IsWatched"] is False and airing["IsWatchedCompletely"] is False
    assert (airing["WatchedStartTime"], airing["WatchedEndTime"],
            airing["WatchedDuration"]) == (BASE + 5, BASE + 185_101, 185_096)
    assert (airing["RealWatchedStartTime"], airing["RealWatchedEndTime"]) == (NOW - 7600, NOW)
    assert airing["LatestWatchedTime"] == BASE + 185_101  # no +3 s at SageTV HEAD (§2.5)
    assert airing["IsDontLike"] is False
    show = airing["Show"]
    assert (show["ShowTitle"], show["ShowEpisode"], show["ShowSeasonNumber"],
            show["ShowEpisodeNumber"], show["ShowDuration"]) == (
        "Castle", "Habeas Corpse", 7, 19, 60 * MIN)
    assert show["ShowExternalID"].startswith("EP") and show["IsMovie"] is False
    # keys a client must ignore
    assert "MediaFileMetadataProperties" in item and "Channel" in airing


def test_direct_inspection_matches_what_is_served(api: Api, sage: FakeSage, lib: dict) -> None:
    mf = lib["padded"]
    sage.set_watched_times(mf.airing_id, mf.file_start_ms + 10 * MIN, NOW - 3_600_000)
    assert api.mf(mf) == sage.media_file_json(mf.media_file_id)
    assert api.json("GetAiringForID", mf.airing_id)["Airing"] == sage.airing_json(mf.airing_id)


def test_airing_and_show_replies_have_their_own_wrapper(api: Api, lib: dict) -> None:
    mf = lib["on_time"]
    airing = api.json("GetAiringForID", mf.airing_id)
    assert list(airing) == ["Airing"]
    assert airing == api.json("GetMediaFileAiring", f"mediafile:{mf.media_file_id}")
    assert airing["Airing"] == api.airing(mf)
    show = api.json("GetShow", f"airing:{mf.airing_id}")
    assert show == {"Show": airing["Airing"]["Show"]}
    assert api.json("GetShowTitle", f"show:{mf.show_external_id}") == {"Result": "Castle"}
    assert api.json("GetMediaFileForAiring", f"airing:{mf.airing_id}") == api.json(
        "GetMediaFileForID", mf.media_file_id)


def test_scalar_getters_reply_with_result(api: Api, lib: dict) -> None:
    ref = f"airing:{lib['on_time'].airing_id}"
    assert api.json("IsWatched", ref) == {"Result": False}
    assert api.json("GetWatchedEndTime", ref) == {"Result": 0}
    assert api.json("GetAiringDuration", ref) == {"Result": 59 * MIN}
    assert api.json("GetFileStartTime", ref) == {"Result": BASE + 5}  # airing -> its file
    assert api.json("IsMediaFileObject", ref) == {"Result": False}  # no conversion here


def test_imported_video_has_no_channel_and_file_based_airing(api: Api, lib: dict) -> None:
    item = api.mf(lib["imported"])
    assert item["IsTVFile"] is False and item["IsVideoFile"] is True
    assert item["IsLibraryFile"] is True
    assert item["MediaFileRelativePath"] == "Holiday Video.mkv"
    airing = item["Airing"]
    assert airing["AiringStartTime"] == item["FileStartTime"]
    assert airing["AiringDuration"] == item["FileDuration"]
    assert "Channel" not in airing  # null fields are omitted, never null (§2.3)


def test_filter_without_media_file_airing_drops_the_airing(api: Api, lib: dict) -> None:
    item = api.mf(lib["on_time"], filter="MediaFileID|AiringID|IsWatched|Airing")
    assert item == {"MediaFileID": lib["on_time"].media_file_id}


def test_filter_applies_at_every_level(api: Api, lib: dict) -> None:
    mf = lib["on_time"]
    assert api.mf(mf, filter="MediaFileID|MediaFileAiring|AiringID|ShowTitle") == {
        "MediaFileID": mf.media_file_id, "Airing": {"AiringID": mf.airing_id}}
    item = api.mf(mf, filter=SYNC_FILTER)
    assert set(item) == {"MediaFileID", "IsTVFile", "IsVideoFile", "FileStartTime",
                         "FileEndTime", "FileDuration", "NumberOfSegments", "SegmentFiles",
                         "Airing"}
    assert set(item["Airing"]) == {
        "AiringID", "AiringStartTime", "AiringEndTime", "AiringDuration", "IsWatched",
        "IsWatchedCompletely", "WatchedStartTime", "WatchedEndTime", "WatchedDuration",
        "RealWatchedStartTime", "RealWatchedEndTime", "LatestWatchedTime", "Show"}
    assert item["Airing"]["Show"] == {"ShowTitle": "Castle", "ShowEpisode": "Habeas Corpse"}


def test_empty_filter_keeps_nothing(api: Api, lib: dict) -> None:
    assert api.mf(lib["on_time"], filter="") == {}


def test_field_set_2015_has_no_is_movie(install: Any, api: Api) -> None:
    sage = install(field_set="2015")
    lib = add_example_library(sage, base_ms=BASE, fillers=0)
    assert "IsMovie" not in api.airing(lib["movie"])["Show"]
    assert api.error("IsMovie", f"airing:{lib['movie'].airing_id}") == (
        "Unknown Sage Command: IsMovie")


def test_field_set_head_has_is_movie(api: Api, lib: dict) -> None:
    assert api.airing(lib["movie"])["Show"]["IsMovie"] is True
    assert api.json("IsMovie", f"airing:{lib['movie'].airing_id}") == {"Result": True}


# --- watched semantics: SetWatched and ClearWatched (§6.4) -----------------------------------
def test_set_watched_marks_the_whole_airing_with_zero_real_times(api: Api, lib: dict) -> None:
    mf = lib["on_time"]
    assert api.json("SetWatched", f"airing:{mf.airing_id}") == {}
    airing = api.airing(mf)
    assert airing["IsWatched"] is True and airing["IsWatchedCompletely"] is True
    assert (airing["WatchedStartTime"], airing["WatchedEndTime"]) == (
        mf.airing_start_ms, mf.airing_end_ms)
    assert airing["WatchedDuration"] == mf.airing_duration_ms
    assert (airing["RealWatchedStartTime"], airing["RealWatchedEndTime"]) == (0, 0)
    assert airing["LatestWatchedTime"] == mf.airing_start_ms  # at the end: start over


def test_set_watched_with_end_padding_resumes_at_the_airing_end(api: Api, lib: dict) -> None:
    mf = lib["padded"]  # the file runs 3 min past the airing end
    api.json("SetWatched", f"airing:{mf.airing_id}")
    assert api.airing(mf)["LatestWatchedTime"] == mf.airing_end_ms


def test_mediafile_reference_is_accepted_by_airing_functions(api: Api, lib: dict) -> None:
    mf = lib["on_time"]
    assert api.json("SetWatched", f"mediafile:{mf.media_file_id}") == {}
    assert api.airing(mf)["IsWatched"] is True


def test_clear_watched_deletes_the_record_and_unwatches_the_same_show(api: Api,
                                                                      lib: dict) -> None:
    a, b = lib["rerun_a"], lib["rerun_b"]
    assert a.show_external_id == b.show_external_id
    api.json("SetWatched", f"airing:{a.airing_id}")
    other = api.airing(b)  # watched through the shared show flag, without a record of its own
    assert other["IsWatched"] is True and other["IsWatchedCompletely"] is False
    assert other["WatchedEndTime"] == 0
    assert api.json("ClearWatched", f"airing:{a.airing_id}") == {}
    for mf in (a, b):
        airing = api.airing(mf)
        assert airing["IsWatched"] is False
        assert (airing["WatchedStartTime"], airing["WatchedEndTime"], airing["WatchedDuration"],
                airing["RealWatchedStartTime"], airing["RealWatchedEndTime"]) == (0, 0, 0, 0, 0)
        assert airing["LatestWatchedTime"] == mf.airing_start_ms


def test_clear_watched_leaves_a_sibling_with_its_own_complete_record_watched(
        api: Api, lib: dict) -> None:
    a, b = lib["rerun_a"], lib["rerun_b"]
    api.json("SetWatched", f"airing:{a.airing_id}")
    api.json("SetWatched", f"airing:{b.airing_id}")
    api.json("ClearWatched", f"airing:{a.airing_id}")
    assert api.airing(a)["IsWatched"] is False
    assert api.airing(b)["IsWatched"] is True  # IsWatchedCompletely still holds for b


def test_unique_false_airings_do_not_share_the_watched_flag(sage: FakeSage, api: Api) -> None:
    twins = [sage.add_media_file(title="News", show_external_id="SH000000000001", unique=False,
                                 segments=[(f"/tv/News-{i}.mpg", BASE + i * DAY,
                                            BASE + i * DAY + 30 * MIN)],
                                 airing_start_ms=BASE + i * DAY,
                                 airing_end_ms=BASE + i * DAY + 30 * MIN) for i in (0, 1)]
    api.json("SetWatched", f"airing:{twins[0].airing_id}")
    assert api.airing(twins[0])["IsWatched"] is True
    assert api.airing(twins[1])["IsWatched"] is False
    assert api.airing(twins[1])["Show"]["IsShowEPGDataUnique"] is False


# --- watched semantics: SetWatchedTimes (§6.5, §7) ------------------------------------------------
def write_position(api: Api, mf: SageMediaFile, offset_ms: int, real_start: int = 0) -> dict:
    """SetWatchedTimes at file offset ``offset_ms``; returns the airing read back."""
    target = mf.file_start_ms + offset_ms
    assert api.json("SetWatchedTimes", f"airing:{mf.airing_id}", target, real_start) == {}
    return api.airing(mf)


def test_set_watched_times_stores_a_file_relative_position(api: Api, lib: dict) -> None:
    mf = lib["on_time"]
    airing = write_position(api, mf, 10 * MIN, real_start=NOW - 3_600_000)
    assert airing["WatchedEndTime"] - mf.file_start_ms == 10 * MIN
    assert airing["WatchedStartTime"] == mf.file_start_ms  # max(AiringStartTime, FileStartTime)
    assert airing["IsWatched"] is False and airing["IsWatchedCompletely"] is False
    assert airing["RealWatchedStartTime"] == NOW - 3_600_000
    assert airing["RealWatchedEndTime"] == NOW  # the server's clock, not the viewing's
    assert airing["LatestWatchedTime"] == airing["WatchedEndTime"]


def test_padded_recording_position_starts_at_the_airing_start(api: Api, lib: dict) -> None:
    mf = lib["padded"]  # the file starts 2 min before the airing
    airing = write_position(api, mf, 10 * MIN)
    assert airing["WatchedStartTime"] == mf.airing_start_ms
    assert airing["WatchedEndTime"] - mf.file_start_ms == 10 * MIN
    assert airing["WatchedDuration"] == 8 * MIN  # short by the padding (§6.6)


def test_positions_in_the_start_padding_are_not_stored(api: Api, lib: dict) -> None:
    mf = lib["padded"]
    assert write_position(api, mf, 2 * MIN + 5000)["WatchedEndTime"] == 0


def test_late_start_recording_ignores_the_first_5_seconds_of_the_file(api: Api,
                                                                      lib: dict) -> None:
    mf = lib["late"]  # the file starts 90 s into the airing
    assert write_position(api, mf, 5000)["WatchedEndTime"] == 0
    airing = write_position(api, mf, 5001)
    assert airing["WatchedStartTime"] == mf.file_start_ms
    assert airing["WatchedEndTime"] == mf.file_start_ms + 5001


def test_set_watched_times_within_5_seconds_is_a_silent_noop(api: Api, lib: dict) -> None:
    mf = lib["on_time"]
    assert write_position(api, mf, 5000)["WatchedEndTime"] == 0
    assert write_position(api, mf, -MIN)["WatchedEndTime"] == 0
    assert write_position(api, mf, 5001)["WatchedEndTime"] == mf.file_start_ms + 5001


def test_set_watched_times_clamps_to_the_airing_end(api: Api, lib: dict) -> None:
    mf = lib["padded"]
    airing = write_position(api, mf, 2 * MIN + 59 * MIN + 2 * MIN)  # inside the end padding
    assert airing["WatchedEndTime"] == mf.airing_end_ms
    assert airing["IsWatched"] is True


def test_set_watched_times_cannot_move_backwards_without_clear_watched(api: Api,
                                                                       lib: dict) -> None:
    mf = lib["on_time"]
    write_position(api, mf, 20 * MIN)
    assert write_position(api, mf, 10 * MIN)["WatchedEndTime"] == mf.file_start_ms + 20 * MIN
    api.json("ClearWatched", f"airing:{mf.airing_id}")
    assert write_position(api, mf, 10 * MIN)["WatchedEndTime"] == mf.file_start_ms + 10 * MIN


def test_set_watched_times_on_a_watched_item_leaves_it_watched(api: Api, lib: dict) -> None:
    mf = lib["on_time"]
    api.json("SetWatched", f"airing:{mf.airing_id}")
    airing = write_position(api, mf, 10 * MIN, real_start=NOW - 600_000)
    assert airing["IsWatched"] is True
    assert airing["WatchedEndTime"] == mf.airing_end_ms
    assert airing["RealWatchedStartTime"] == 0  # min(0, realStart): SetWatched stored 0
    assert airing["RealWatchedEndTime"] == NOW


def test_position_within_5_minutes_of_the_end_marks_watched(api: Api, lib: dict) -> None:
    near, far = lib["filler_0"], lib["filler_1"]
    airing = write_position(api, near, near.airing_end_ms - 299_000 - near.file_start_ms)
    assert airing["IsWatched"] is True and airing["IsWatchedCompletely"] is True
    assert airing["LatestWatchedTime"] == airing["WatchedEndTime"]  # 299 s left: resumes
    airing = write_position(api, far, far.airing_end_ms - 301_000 - far.file_start_ms)
    assert airing["IsWatched"] is False


def test_movies_are_watched_within_10_minutes_of_the_end(api: Api, lib: dict) -> None:
    movie = lib["movie"]
    assert write_position(api, movie, 109 * MIN)["IsWatched"] is False  # 11 min left
    assert write_position(api, movie, 111 * MIN)["IsWatched"] is True  # 9 min left


def test_completion_counts_the_earlier_record_too(api: Api, sage: FakeSage, lib: dict) -> None:
    mf, sibling = lib["rerun_a"], lib["rerun_b"]  # the last 19 minutes were watched on the TV
    sage.set_watch_record(mf.airing_id, mf.airing_start_ms + 40 * MIN, mf.airing_end_ms)
    assert api.airing(sibling)["IsWatched"] is False
    airing = write_position(api, mf, 20 * MIN)  # ...and the first 20 elsewhere
    assert (airing["WatchedStartTime"], airing["WatchedEndTime"]) == (
        mf.file_start_ms, mf.airing_end_ms)
    assert api.airing(sibling)["IsWatched"] is True  # the write completed the show


def test_real_watched_start_is_the_minimum_and_end_the_latest_write(api: Api, clock: Clock,
                                                                    lib: dict) -> None:
    mf = lib["on_time"]
    write_position(api, mf, 10 * MIN, real_start=NOW - 2 * 3_600_000)
    clock.now += MIN
    airing = write_position(api, mf, 20 * MIN, real_start=NOW - 3 * 3_600_000)
    assert (airing["RealWatchedStartTime"], airing["RealWatchedEndTime"]) == (
        NOW - 3 * 3_600_000, NOW + MIN)
    clock.now += MIN
    airing = write_position(api, mf, 30 * MIN, real_start=NOW)
    assert airing["RealWatchedStartTime"] == NOW - 3 * 3_600_000
    airing = write_position(api, mf, 40 * MIN, real_start=0)
    assert (airing["RealWatchedStartTime"], airing["RealWatchedEndTime"]) == (
        NOW - 3 * 3_600_000, NOW + 2 * MIN)


def test_show_duration_decides_completion_when_close_to_the_airing(sage: FakeSage,
                                                                   api: Api) -> None:
    def item(show_minutes: int, day: int) -> SageMediaFile:
        start = BASE + day * DAY
        return sage.add_media_file(title="Commercial Free", show_duration_ms=show_minutes * MIN,
                                   segments=[(f"/tv/cf-{day}.mpg", start, start + 60 * MIN)],
                                   airing_start_ms=start, airing_end_ms=start + 60 * MIN)

    fifty, thirty = item(50, 0), item(30, 1)
    airing = write_position(api, fifty, 46 * MIN)  # 4 of 50 running minutes left
    assert airing["IsWatched"] is True
    assert airing["IsWatchedCompletely"] is False  # that one is by AiringDuration
    # a show 30 min shorter than its airing: the running time is not trusted (>= 20 min)
    assert write_position(api, thirty, 46 * MIN)["IsWatched"] is False


def test_dont_use_running_time_for_watched_switch(install: Any, api: Api) -> None:
    sage = install(dont_use_running_time_for_watched=True)
    mf = sage.add_media_file(title="Commercial Free", show_duration_ms=50 * MIN,
                             segments=[("/tv/cf.mpg", BASE, BASE + 60 * MIN)],
                             airing_start_ms=BASE, airing_end_ms=BASE + 60 * MIN)
    assert write_position(api, mf, 46 * MIN)["IsWatched"] is False


def test_unique_false_show_needs_a_full_record_to_count_as_watched(sage: FakeSage,
                                                                   api: Api) -> None:
    mf = sage.add_media_file(title="Talk", show_external_id="SH000000000002", unique=False,
                             show_duration_ms=50 * MIN,
                             segments=[("/tv/talk.mpg", BASE, BASE + 60 * MIN)],
                             airing_start_ms=BASE, airing_end_ms=BASE + 60 * MIN)
    airing = write_position(api, mf, 46 * MIN)  # complete by running time: show flag set
    assert airing["IsWatched"] is False  # ...but a non-unique show's flag does not count
    assert sage.show_last_watched("SH000000000002") == BASE


def test_imported_video_starts_over_after_the_end(api: Api, lib: dict) -> None:
    mf = lib["imported"]
    airing = write_position(api, mf, mf.file_duration_ms - 10_000)
    assert airing["IsWatched"] is True
    assert airing["LatestWatchedTime"] == mf.airing_start_ms  # < 15 s left, not TV: start over


def test_recording_in_progress_resumes_at_the_end_until_its_schedule_ends(
        sage: FakeSage, api: Api, clock: Clock) -> None:
    start, end = NOW - 30 * MIN, NOW + 30 * MIN
    mf = sage.add_media_file(title="Live", currently_recording=True,
                             segments=[("/tv/live.mpg", start, NOW)],
                             airing_start_ms=start, airing_end_ms=end)
    api.json("SetWatched", f"airing:{mf.airing_id}")
    item = api.listing(filter=SYNC_FILTER)[0]
    assert item["Airing"]["LatestWatchedTime"] == end  # still on: watching the end of it
    assert api.mf(mf)["IsFileCurrentlyRecording"] is True
    clock.now = end + 1
    assert api.listing(filter=SYNC_FILTER)[0]["Airing"]["LatestWatchedTime"] == start


def test_latest_watched_time_plus_3s_switch(install: Any, api: Api) -> None:
    sage = install(latest_watched_plus_3s=True)
    lib = add_example_library(sage, base_ms=BASE, fillers=0)
    airing = write_position(api, lib["on_time"], 10 * MIN)
    assert airing["LatestWatchedTime"] == airing["WatchedEndTime"] + 3000
    api.json("SetWatched", f"airing:{lib['late'].airing_id}")
    assert api.airing(lib["late"])["LatestWatchedTime"] == lib["late"].airing_start_ms


def test_watch_ignore_time_is_configurable(install: Any, api: Api) -> None:
    sage = install(watch_ignore_ms=60_000)
    lib = add_example_library(sage, base_ms=BASE, fillers=0)
    assert write_position(api, lib["on_time"], 57 * MIN)["IsWatched"] is False


# --- multi-segment recordings (§7.2) ---------------------------------------------------------
def test_two_segment_file_and_its_segment_calls(api: Api, lib: dict) -> None:
    mf = lib["two_segment"]
    (p0, s0, e0), (p1, s1, e1) = mf.segments
    item = api.mf(mf)
    assert (item["FileStartTime"], item["FileEndTime"]) == (s0, e1)
    assert item["FileDuration"] == (e0 - s0) + (e1 - s1)  # the 2 min gap is not counted
    assert item["NumberOfSegments"] == 2 and item["SegmentFiles"] == [p0, p1]
    ref = f"mediafile:{mf.media_file_id}"
    for number, (start, end) in enumerate(((s0, e0), (s1, e1))):
        assert api.json("GetStartForSegment", ref, number) == {"Result": start}
        assert api.json("GetEndForSegment", ref, number) == {"Result": end}
        assert api.json("GetDurationForSegment", ref, number) == {"Result": end - start}
    assert api.json("GetStartForSegment", f"airing:{mf.airing_id}", 1) == {"Result": s1}
    for number in (2, -1):
        assert api.json("GetStartForSegment", ref, number) == {"Result": 0}
    assert api.json("GetSegmentFiles", ref) == {"Result": [p0, p1]}
    assert api.error("GetStartTimesForSegments", ref).startswith("[J cannot be cast")


def test_position_in_the_second_segment_is_on_the_recording_clock(api: Api, lib: dict) -> None:
    mf = lib["two_segment"]
    _, (_, s1, _) = mf.segments
    target = s1 + 5 * MIN  # 5 min into the second file
    api.json("SetWatchedTimes", f"airing:{mf.airing_id}", target, 0)
    assert api.airing(mf)["WatchedEndTime"] == target  # stacked offset (e0 - s0) + 5 min


# --- the cache, the request log, faults and concurrency -----------------------------------------
def test_listings_reflect_writes_between_listings(api: Api, sage: FakeSage, lib: dict) -> None:
    name_of = {mf.media_file_id: name for name, mf in lib.items()}

    def watched() -> set[str]:
        return {name_of[item["MediaFileID"]] for item in all_states(api)
                if item["Airing"]["IsWatched"]}

    assert watched() == set()
    api.json("SetWatched", f"airing:{lib['rerun_a'].airing_id}")
    assert watched() == {"rerun_a", "rerun_b"}  # a show-level change reaches the sibling
    sage.set_show_watched(lib["movie"].show_external_id, BASE)
    assert watched() == {"rerun_a", "rerun_b", "movie"}
    api.json("ClearWatched", f"airing:{lib['rerun_b'].airing_id}")
    assert watched() == {"rerun_a", "movie"}


def test_request_log_names_functions_and_faults_can_swallow_writes(
        api: Api, server: FakeServer, lib: dict) -> None:
    mf = lib["on_time"]
    api.json("AiringAPI.SetWatched", f"airing:{mf.airing_id}")
    assert [r.function for r in server.requests(function="SetWatched")] == ["SetWatched"]
    assert server.requests(function="SetWatched")[0].function in FakeSage.WRITE_FUNCTIONS
    api.json("ClearWatched", f"airing:{mf.airing_id}")
    server.add_fault(function="SetWatched", body=b"{}",  # a write that silently did nothing
                     content_type="application/json;charset=UTF-8")
    assert api.json("SetWatched", f"airing:{mf.airing_id}") == {}
    assert api.airing(mf)["IsWatched"] is False


def test_concurrent_reads_and_writes(api: Api, server: FakeServer, lib: dict) -> None:
    fillers = [lib[f"filler_{i}"] for i in range(8)]

    def worker(mf: SageMediaFile) -> None:
        client = Api(server.base_url)
        for minute in range(1, 6):
            client.json("SetWatchedTimes", f"airing:{mf.airing_id}",
                        mf.file_start_ms + minute * MIN, 0)
            client.listing(size=100, filter=SYNC_FILTER)

    threads = [threading.Thread(target=worker, args=(mf,)) for mf in fillers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for mf in fillers:
        assert api.airing(mf)["WatchedEndTime"] == mf.file_start_ms + 5 * MIN


def test_serve_sage_starts_a_server_for_new_state() -> None:
    server = serve_sage(user="u", password="p")
    try:
        reply = requests.get(server.base_url + "/sagex/api", auth=("u", "p"), timeout=10,
                             params={"c": "GetMediaFiles", "encoder": "json"})
        assert reply.json() == {"Result": []}
    finally:
        server.stop()


def test_a_stopped_server_also_drops_kept_alive_connections() -> None:
    server = serve_sage()
    session = requests.Session()
    session.auth = ("sage", "frey")
    url = server.base_url + "/sagex/api"
    assert session.get(url, params={"c": "GetMediaFiles", "encoder": "json"}, timeout=10).ok
    server.stop()  # a pooled connection must not keep reaching the stopped server
    with pytest.raises(requests.ConnectionError):
        session.get(url, params={"c": "GetMediaFiles", "encoder": "json"}, timeout=10)


def test_add_media_file_rejects_inconsistent_items(sage: FakeSage) -> None:
    with pytest.raises(ValueError):  # an imported video's airing is its file
        sage.add_media_file(title="x", is_tv=False, segments=[("/v/x.mkv", BASE, BASE + MIN)],
                            airing_start_ms=BASE - 1, airing_end_ms=BASE + MIN)
    mf = sage.add_media_file(title="x", segments=[("/v/x.ts", BASE, BASE + MIN)],
                             airing_start_ms=BASE, airing_end_ms=BASE + MIN, is_movie=True,
                             show_external_id="MV1")
    with pytest.raises(ValueError):  # the same show must agree on is_movie
        sage.add_media_file(title="x", segments=[("/v/y.ts", BASE, BASE + MIN)],
                            airing_start_ms=BASE, airing_end_ms=BASE + MIN,
                            show_external_id="MV1")
    with pytest.raises(ValueError):  # ids are unique across media files and airings
        sage.add_media_file(title="x", segments=[("/v/z.ts", BASE, BASE + MIN)],
                            airing_start_ms=BASE, airing_end_ms=BASE + MIN,
                            media_file_id=mf.airing_id)
    assert sage.media_files() == [mf]


# --- the server's clock: stamps and the Date header -------------------------------------------
def date_ms(reply: requests.Response) -> float:
    return parsedate_to_datetime(reply.headers["Date"]).timestamp() * 1000


def test_every_reply_has_a_date_header_from_the_server_clock(api: Api, server: FakeServer,
                                                             lib: dict, clock: Clock) -> None:
    unauthorized = requests.get(api.url, params={"c": "GetMediaFiles", "encoder": "json"},
                                timeout=10)
    server.add_fault(function="GetAiringForID", status=503)
    replies = [api.get("GetMediaFiles", "T", size=1), api.get("NoSuchFunction"), unauthorized,
               api.session.get(server.base_url + "/elsewhere", timeout=10),
               api.get("GetAiringForID", 1)]
    assert [r.status_code for r in replies] == [200, 200, 401, 404, 503]
    for reply in replies:  # RFC 7231 IMF-fixdate of the fake's "now", errors included
        assert reply.headers["Date"] == formatdate(NOW / 1000, usegmt=True)
    clock.now += 3_600_400
    assert date_ms(api.get("GetMediaFiles", "T", size=1)) == pytest.approx(NOW + 3_600_400,
                                                                          abs=1000)


def test_skewed_sage_clock_stamps_writes_and_dates_replies() -> None:
    skew = 5 * MIN  # the SageTV server's clock is 5 minutes fast
    world = World(sage_skew_ms=skew)
    # the world's clock runs (real time): a stamp is checked against the server's clock
    # read just before and just after the moment it was made
    before = world.sage_clock_ms()
    item = world.episode("Castle", 1, 1, "Pilot", sage=none())
    old = world.episode("Castle", 1, 2, "Nanny", sage=at(10 * MIN, ago=DAY))
    seen = world.movie("Heat", sage=watched(ago=DAY))
    after = world.sage_clock_ms()
    world_before = world.clock.ms()
    sage_now = world.sage_clock_ms()
    world_after = world.clock.ms()
    assert world_before + skew <= sage_now <= world_after + skew
    # declared states were written down by SageTV's own clock
    for declared in (old, seen):
        stamp = world.sage.airing_json(declared.airing_id)["RealWatchedEndTime"]
        assert before - DAY <= stamp <= after - DAY
    with world.running() as servers:
        session = requests.Session()
        session.auth = (SAGE_USER, SAGE_PASSWORD)
        url = servers.sage.base_url + "/sagex/api"

        def call(c: str, *args: object) -> requests.Response:
            params = {"c": c, "encoder": "json", **{str(i): a for i, a in enumerate(args, 1)}}
            reply = session.get(url, params=params, timeout=10)
            assert date_ms(reply) == pytest.approx(world.sage_clock_ms(), abs=1000)
            return reply

        world.clock.advance(90_000)  # advancing the world moves the server's clock too
        target = item.file_start_ms + 12 * MIN
        written_from = world.sage_clock_ms()
        assert written_from >= sage_now + 90_000
        assert call("SetWatchedTimes", f"airing:{item.airing_id}", target,
                    sage_now - 20 * MIN).json() == {}
        written_by = world.sage_clock_ms()
        airing = call("GetAiringForID", item.airing_id).json()["Airing"]
        assert written_from <= airing["RealWatchedEndTime"] <= written_by
        assert airing["RealWatchedEndTime"] > world.clock.ms()  # SageTV's clock, not the world's
        assert airing["WatchedEndTime"] == target
        world.sage_skew_ms = 0  # a skew can change while the servers run
        assert date_ms(call("GetMediaFiles", "T")) == pytest.approx(world.clock.ms(), abs=1000)
        unauthorized = requests.get(url, timeout=10)
        assert unauthorized.status_code == 401
        assert date_ms(unauthorized) == pytest.approx(world.clock.ms(), abs=1000)


# --- latency: slow listings and per-server delays --------------------------------------------
def timed(call: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def test_list_delay_slows_each_listing_and_counts_concurrent_ones(install: Any,
                                                                  server: FakeServer) -> None:
    sage = install(list_delay_s=0.2)
    add_example_library(sage, base_ms=BASE, fillers=0)
    assert (sage.listing_calls, sage.listings_in_flight_max) == (0, 0)
    barrier = threading.Barrier(3)
    elapsed: list[float] = []

    def listing() -> None:
        api = Api(server.base_url)
        barrier.wait()
        seconds, reply = timed(lambda: api.json("MediaFileAPI.GetMediaFiles", "T"))
        assert len(reply["Result"]) == 7
        elapsed.append(seconds)

    threads = [threading.Thread(target=listing) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(elapsed) == 3 and min(elapsed) >= 0.2
    assert (sage.listing_calls, sage.listings_in_flight, sage.listings_in_flight_max) == (3, 0, 3)
    api = Api(server.base_url)
    seconds, _ = timed(lambda: api.json("GetMediaFiles", "T", size=1))
    assert seconds >= 0.2
    assert (sage.listing_calls, sage.listings_in_flight_max) == (4, 3)  # one at a time now
    sage.list_delay_s = 5.0  # only GetMediaFiles waits: other calls answer at once
    seconds, _ = timed(lambda: api.json("GetAiringForID", 1))
    assert seconds < 2.5 and sage.listing_calls == 4


def test_server_read_and_write_delays(install: Any, server: FakeServer) -> None:
    sage = install()
    mf = add_example_library(sage, base_ms=BASE, fillers=0)["on_time"]
    api = Api(server.base_url)
    server.read_delay_s, server.write_delay_s = 0.2, 0.6
    try:
        read_s, _ = timed(lambda: api.json("GetAiringForID", mf.airing_id))
        write_s, _ = timed(lambda: api.json("SetWatched", f"airing:{mf.airing_id}"))
        assert 0.2 <= read_s < 0.6 <= write_s
        assert "SetWatched" in sage.WRITE_FUNCTIONS
    finally:
        server.read_delay_s = server.write_delay_s = 0.0
    with FakeServer(FakeSage(), write_delay_s=0.3) as slow:
        assert (slow.read_delay_s, slow.write_delay_s) == (0.0, 0.3)
