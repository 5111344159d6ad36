"""Contract tests: the REAL plexapi library against tests/fake_plex.py over loopback HTTP.

Each test proves one behaviour the Plex API as plexapi uses it documents for a real PMS, so
tests of sageplex_sync that run against the fake exercise what they would meet in real life.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate, parsedate_to_datetime
from xml.etree.ElementTree import Element, ParseError

# plexapi reads its config file when imported: keep a developer's own config out
os.environ["PLEXAPI_CONFIG_PATH"] = os.path.join(os.path.dirname(__file__), "no-such-plexapi.ini")

import plexapi.base  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402
from plexapi.exceptions import BadRequest, NotFound, Unauthorized  # noqa: E402
from plexapi.server import PlexServer  # noqa: E402

from tests.fakes.fake_http import FakeServer  # noqa: E402
from tests.fakes.fake_plex import IDENTIFIER, FakePlex  # noqa: E402
from tests.fakes.world import DAY, PLEX_TOKEN, Item, World, at, none, watched  # noqa: E402

TOKEN = "contract-token"
NOW = 1_700_000_000
UNICODE_TITLE = "Café — Ünïcødé 日本"
UNICODE_FILE = '/media/movies/Café — Ünïcødé/日本 & <Ampersand> "quoted".mkv'
EPISODES_A = 250  # Show A: 5 seasons x 50 episodes, more than two default pages of 100
HOUR = 3_600_000
HALF_HOUR = 1_800_000


class Clock:
    """An injectable "now", so lastViewedAt values can be asserted exactly."""

    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


class Library:
    """Keys of the items the standard fixture library holds."""

    def __init__(self, app: FakePlex) -> None:
        self.movies = app.add_section("Movies", "movie", ["/media/movies"])
        self.tv = app.add_section("TV Shows", "show", ["/media/tv"])
        self.plain = app.add_movie(self.movies, "Plain Movie", "/media/movies/plain.mkv", 2 * HOUR,
                                   year=1999)
        self.unicode = app.add_movie(self.movies, UNICODE_TITLE, UNICODE_FILE, 2 * HOUR)
        self.stacked = app.add_movie(self.movies, "Stacked", ["/media/movies/s.cd1.avi",
                                                              "/media/movies/s.cd2.avi"], 2 * HOUR)
        self.started = app.add_movie(self.movies, "Started", "/media/movies/started.ts", 2 * HOUR,
                                     view_offset_ms=600_000, last_viewed_at_s=NOW - 500)
        self.episodes: dict[tuple[int, int], int] = {}
        for season in range(1, 6):
            for episode in range(1, 51):
                self.episodes[(season, episode)] = app.add_episode(
                    self.tv, "Show A", season, episode, f"A {season}x{episode}",
                    f"/media/tv/Show A/Season {season}/S{season:02}E{episode:02}.ts", HALF_HOUR)
        self.b1 = app.add_episode(self.tv, "Show B", 1, 1, "B Pilot", "/media/tv/Show B/b1.mkv",
                                  HALF_HOUR, view_count=1, last_viewed_at_s=NOW - 100)
        self.show_a = app.show_key(self.tv, "Show A")
        self.show_b = app.show_key(self.tv, "Show B")


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # requests would send even 127.0.0.1 through a proxy named in the environment
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(clock: Clock) -> FakePlex:
    return FakePlex(TOKEN, clock=clock, extra_tokens={"guest-token": "guest"})


@pytest.fixture
def lib(app: FakePlex) -> Library:
    return Library(app)


@pytest.fixture
def server(app: FakePlex, lib: Library) -> Iterator[FakeServer]:
    with FakeServer(app) as srv:
        yield srv
    assert not srv.errors, srv.errors  # a crash inside the fake must fail the test


@pytest.fixture
def plex(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> PlexServer:
    # one request per item otherwise, for attributes that are None (the Plex reference §3.4)
    monkeypatch.setenv("PLEXAPI_PLEXAPI_AUTORELOAD", "false")
    monkeypatch.setattr(plexapi.base, "X_PLEX_CONTAINER_SIZE", 100)  # the documented default
    plex = PlexServer(server.base_url, TOKEN, timeout=5)
    server.clear_log()
    return plex


def raw(server: FakeServer, path: str, token: str | None = TOKEN, method: str = "GET",
        **params: str) -> requests.Response:
    headers = {"X-Plex-Token": token} if token else {}
    return requests.request(method, server.base_url + path, params=params, headers=headers,
                            timeout=5)


# --------------------------------------------------------------------------------------
# connecting and auth
# --------------------------------------------------------------------------------------
def test_connect_sends_exactly_one_request_to_root(app: FakePlex, server: FakeServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLEXAPI_PLEXAPI_AUTORELOAD", "false")
    plex = PlexServer(server.base_url, TOKEN)
    assert [(r.method, r.path) for r in server.log] == [("GET", "/")]
    assert plex.machineIdentifier == app.machine_identifier
    assert plex.version == app.version
    assert plex.friendlyName == "fake-plex"
    assert plex.myPlex is False and plex.multiuser is True  # strict 0/1 booleans parse


def test_wrong_token_is_unauthorized(server: FakeServer) -> None:
    with pytest.raises(Unauthorized):
        PlexServer(server.base_url, "wrong-token")


def test_missing_token_is_unauthorized_on_every_path(server: FakeServer) -> None:
    with pytest.raises(Unauthorized):
        PlexServer(server.base_url, None)
    for path in ("/", "/library/sections", "/:/scrobble", "/no/such/path"):
        reply = raw(server, path, token=None)
        assert reply.status_code == 401
        assert "<h1>401 Unauthorized</h1>" in reply.text


def test_token_is_accepted_as_query_parameter(server: FakeServer) -> None:
    reply = raw(server, "/library/sections", token=None, **{"X-Plex-Token": TOKEN})
    assert reply.status_code == 200


def test_xml_replies_declare_utf8_and_start_with_prolog(server: FakeServer) -> None:
    reply = raw(server, "/library/sections")
    assert reply.headers["Content-Type"] == "text/xml;charset=utf-8"
    assert reply.content.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')


def test_unknown_path_is_not_found(plex: PlexServer) -> None:
    with pytest.raises(NotFound):
        plex.query("/no/such/endpoint")


# --------------------------------------------------------------------------------------
# sections and listings
# --------------------------------------------------------------------------------------
def test_sections_have_types_and_locations(plex: PlexServer, lib: Library,
                                           server: FakeServer) -> None:
    sections = plex.library.sections()
    assert [(s.key, s.title, s.type) for s in sections] == [
        (lib.movies, "Movies", "movie"), (lib.tv, "TV Shows", "show")]
    assert [s.locations for s in sections] == [["/media/movies"], ["/media/tv"]]
    assert sections[1].agent == "tv.plex.agents.series"
    assert sections[1].refreshing is False
    assert [r.path for r in server.log] == ["/library", "/library/sections"]


def test_movie_section_all_returns_movies(plex: PlexServer, lib: Library) -> None:
    movies = plex.library.sectionByID(lib.movies).all()
    assert {m.type for m in movies} == {"movie"}
    assert sorted(m.ratingKey for m in movies) == sorted(
        [lib.plain, lib.unicode, lib.stacked, lib.started])
    plain = next(m for m in movies if m.ratingKey == lib.plain)
    assert (plain.title, plain.year, plain.duration) == ("Plain Movie", 1999, 2 * HOUR)
    assert plain.librarySectionID == lib.movies


def test_show_section_all_returns_shows_not_episodes(plex: PlexServer, lib: Library) -> None:
    tv = plex.library.sectionByID(lib.tv)
    shows = tv.all()
    assert [(s.type, s.title) for s in shows] == [("show", "Show A"), ("show", "Show B")]
    assert (shows[0].leafCount, shows[0].viewedLeafCount, shows[0].childCount) == (EPISODES_A, 0, 5)
    assert shows[1].isPlayed
    assert tv.totalSize == 2  # the section's default type: shows
    assert tv.totalViewSize(libtype="episode") == EPISODES_A + 1


def test_search_episodes_default_paging_takes_three_requests(plex: PlexServer, lib: Library,
                                                            server: FakeServer) -> None:
    tv = plex.library.sectionByID(lib.tv)
    server.clear_log()
    episodes = tv.searchEpisodes()
    assert len(episodes) == EPISODES_A + 1
    assert len({e.ratingKey for e in episodes}) == EPISODES_A + 1
    pages = server.requests(function="section_all")
    assert [(r.header("X-Plex-Container-Start"), r.header("X-Plex-Container-Size"))
            for r in pages] == [("0", "100"), ("100", "100"), ("200", "100")]
    assert all(r.param("type") == "4" for r in pages)


def test_search_with_large_container_size_takes_one_request(plex: PlexServer, lib: Library,
                                                            server: FakeServer) -> None:
    tv = plex.library.sectionByID(lib.tv)
    server.clear_log()
    episodes = tv.search(libtype="episode", container_size=100_000)
    assert len(episodes) == EPISODES_A + 1
    assert (episodes.totalSize, episodes.offset) == (EPISODES_A + 1, 0)
    assert len(server.requests(function="section_all")) == 1


def test_missing_total_size_truncates_listing_to_first_page(app: FakePlex, plex: PlexServer,
                                                            lib: Library) -> None:
    app.omit_total_size = True  # the documented trap: plexapi takes size as the total
    episodes = plex.library.sectionByID(lib.tv).searchEpisodes()
    assert len(episodes) == 100


def test_listing_pages_from_query_parameters_and_size_zero(server: FakeServer,
                                                           lib: Library) -> None:
    reply = raw(server, f"/library/sections/{lib.tv}/all", type="4",
                **{"X-Plex-Container-Start": "245", "X-Plex-Container-Size": "10"})
    assert reply.status_code == 200
    count = raw(server, f"/library/sections/{lib.tv}/all", type="4",
                **{"X-Plex-Container-Start": "0", "X-Plex-Container-Size": "0"})
    assert 'size="0"' in count.text and f'totalSize="{EPISODES_A + 1}"' in count.text
    assert "<Video" not in count.text
    assert reply.text.count("<Video ") == 6
    assert 'offset="245"' in reply.text


def test_bad_paging_parameter_is_bad_request(plex: PlexServer, lib: Library) -> None:
    with pytest.raises(BadRequest):
        plex.query(f"/library/sections/{lib.tv}/all?type=4",
                   headers={"X-Plex-Container-Start": "x"})


def test_raw_query_returns_all_items_with_episode_attributes(plex: PlexServer, lib: Library,
                                                             app: FakePlex) -> None:
    root = plex.query(f"/library/sections/{lib.tv}/all?type=4",
                      headers={"X-Plex-Container-Start": "0",
                               "X-Plex-Container-Size": "1000000"})
    assert isinstance(root, Element)
    videos = {int(v.attrib["ratingKey"]): v for v in root.iter("Video")}
    assert len(videos) == EPISODES_A + 1
    ep = videos[lib.episodes[(2, 3)]]
    assert ep.attrib["type"] == "episode"
    assert ep.attrib["grandparentTitle"] == "Show A"
    assert (ep.attrib["parentIndex"], ep.attrib["index"]) == ("2", "3")
    assert ep.attrib["duration"] == str(HALF_HOUR)
    assert ep.attrib["grandparentRatingKey"] == str(lib.show_a)
    assert ep.attrib["parentRatingKey"] == str(app.season_key(lib.tv, "Show A", 2))
    for absent in ("viewCount", "viewOffset", "lastViewedAt"):  # omitted when 0/None, as PMS
        assert absent not in ep.attrib
    part = ep.find("Media/Part")
    assert part is not None
    assert part.attrib["file"] == "/media/tv/Show A/Season 2/S02E03.ts"
    assert int(part.attrib["size"]) == app.item(lib.episodes[(2, 3)]).part_sizes[0] > 0
    watched = videos[lib.b1]
    assert (watched.attrib["viewCount"], watched.attrib["lastViewedAt"]) == ("1", str(NOW - 100))


def test_episode_objects_carry_show_season_and_part(plex: PlexServer, lib: Library) -> None:
    episodes = plex.library.sectionByID(lib.tv).searchEpisodes(container_size=1000)
    ep = next(e for e in episodes if e.ratingKey == lib.episodes[(5, 50)])
    assert (ep.grandparentTitle, ep.seasonNumber, ep.episodeNumber) == ("Show A", 5, 50)
    assert ep.seasonEpisode == "s05e50"
    assert ep.media[0].parts[0].file == "/media/tv/Show A/Season 5/S05E50.ts"
    assert ep.locations == ["/media/tv/Show A/Season 5/S05E50.ts"]


def test_multipart_movie_has_several_parts(plex: PlexServer, lib: Library) -> None:
    movie = plex.fetchItem(lib.stacked)
    assert [p.file for p in movie.iterParts()] == ["/media/movies/s.cd1.avi",
                                                   "/media/movies/s.cd2.avi"]
    assert len(movie.media) == 1
    assert sum(p.duration for p in movie.iterParts()) == movie.duration


def test_unicode_title_and_path_round_trip(plex: PlexServer, lib: Library) -> None:
    movies = plex.library.sectionByID(lib.movies).all()
    movie = next(m for m in movies if m.ratingKey == lib.unicode)
    assert movie.title == UNICODE_TITLE
    assert movie.locations == [UNICODE_FILE]


def test_fetch_item_by_int_and_not_found_for_unknown_key(plex: PlexServer, lib: Library) -> None:
    assert plex.fetchItem(lib.plain).title == "Plain Movie"
    assert [m.ratingKey for m in plex.fetchItems([lib.plain, lib.b1])] == [lib.plain, lib.b1]
    with pytest.raises(NotFound):
        plex.fetchItem(999_999)
    with pytest.raises(NotFound):
        plex.fetchItems([lib.plain, 999_999])


def test_reload_returns_the_item_again(plex: PlexServer, lib: Library) -> None:
    movie = plex.fetchItem(lib.started)
    movie.reload()
    assert (movie.viewOffset, movie.viewCount) == (600_000, 0)


def test_show_seasons_and_episodes_in_order(plex: PlexServer, lib: Library) -> None:
    show = plex.fetchItem(lib.show_a)
    seasons = show.seasons()
    assert [s.index for s in seasons] == [1, 2, 3, 4, 5]
    assert seasons[0].title == "Season 1"
    episodes = show.episodes()
    assert [(e.parentIndex, e.index) for e in episodes] == sorted(lib.episodes)
    assert [e.index for e in seasons[2].episodes()] == list(range(1, 51))
    assert show.episode(season=3, episode=7).ratingKey == lib.episodes[(3, 7)]


# --------------------------------------------------------------------------------------
# watch state (the Plex reference §4.1)
# --------------------------------------------------------------------------------------
def test_mark_played_twice_counts_two_and_clears_offset(plex: PlexServer, lib: Library,
                                                        app: FakePlex, clock: Clock) -> None:
    movie = plex.fetchItem(lib.started)
    movie.markPlayed()
    clock.now += 60
    movie.markPlayed()
    state = app.item(lib.started)
    assert (state.view_count, state.view_offset_ms, state.last_viewed_at_s) == (2, 0, NOW + 60)
    again = plex.fetchItem(lib.started)
    assert (again.viewCount, again.viewOffset, again.isPlayed) == (2, 0, True)
    assert int(again.lastViewedAt.timestamp()) == NOW + 60


def test_mark_unplayed_clears_count_offset_and_last_viewed(plex: PlexServer, lib: Library,
                                                           app: FakePlex) -> None:
    plex.fetchItem(lib.b1).markUnplayed()
    plex.fetchItem(lib.started).markUnplayed()
    for key in (lib.b1, lib.started):
        state = app.item(key)
        assert (state.view_count, state.view_offset_ms, state.last_viewed_at_s) == (0, 0, None)
    assert plex.fetchItem(lib.show_b).viewedLeafCount == 0


def test_scrobble_on_show_and_season_applies_to_episodes(plex: PlexServer, lib: Library,
                                                         app: FakePlex) -> None:
    plex.fetchItem(lib.show_b).markPlayed()
    assert app.item(lib.b1).view_count == 2
    season = plex.fetchItem(lib.show_a).season(2)
    season.markPlayed()
    counts = {k: app.item(rk).view_count for k, rk in lib.episodes.items()}
    assert all(counts[k] == (1 if k[0] == 2 else 0) for k in counts)
    assert plex.fetchItem(lib.show_a).viewedLeafCount == 50
    assert app.item(lib.show_a).viewed_leaf_count == 50


def test_progress_under_minimum_is_ignored(plex: PlexServer, lib: Library, app: FakePlex) -> None:
    before = app.item(lib.started)
    plex.fetchItem(lib.started).updateProgress(30_000)
    plex.fetchItem(lib.started).updateTimeline(60_000)  # the minimum itself is not accepted
    assert app.item(lib.started) == before


def test_progress_stores_offset_and_last_viewed(plex: PlexServer, lib: Library, app: FakePlex,
                                                clock: Clock) -> None:
    clock.now += 5
    plex.fetchItem(lib.b1).updateProgress(600_000)
    state = app.item(lib.b1)
    assert (state.view_count, state.view_offset_ms, state.last_viewed_at_s) == (1, 600_000, NOW + 5)
    assert plex.fetchItem(lib.b1).viewOffset == 600_000


def test_timeline_stores_offset_and_replies_empty_container(plex: PlexServer, lib: Library,
                                                            app: FakePlex) -> None:
    episode = lib.episodes[(1, 1)]
    plex.fetchItem(episode).updateTimeline(700_000, state="stopped")
    state = app.item(episode)
    assert (state.view_count, state.view_offset_ms, state.last_viewed_at_s) == (0, 700_000, NOW)
    reply = plex.query(f"/:/timeline?ratingKey={episode}&key=/library/metadata/{episode}"
                       f"&identifier={IDENTIFIER}&time=800000&state=playing&duration={HALF_HOUR}")
    assert reply is not None and reply.tag == "MediaContainer" and reply.attrib["size"] == "0"


@pytest.mark.parametrize("call", ["updateProgress", "updateTimeline"])
@pytest.mark.parametrize("mode, expected", [
    ("played", (1, 0, NOW)),  # like a scrobble
    ("offset", (0, 6_900_000, NOW)),  # stored like any other position
    ("ignore", (0, 600_000, NOW - 500)),  # nothing changes
])
def test_progress_past_threshold_follows_mode(plex: PlexServer, lib: Library, app: FakePlex,
                                              call: str, mode: str,
                                              expected: tuple[int, int, int]) -> None:
    app.progress_past_threshold = mode
    movie = plex.fetchItem(lib.started)  # 2 h long, 600 s in, last viewed NOW - 500
    getattr(movie, call)(6_900_000)  # 95.8 % >= the 90 % threshold
    state = app.item(lib.started)
    assert (state.view_count, state.view_offset_ms, state.last_viewed_at_s) == expected


def test_scrobble_without_identifier_is_bad_request(server: FakeServer, lib: Library,
                                                    app: FakePlex) -> None:
    reply = raw(server, "/:/scrobble", key=str(lib.plain))
    assert reply.status_code == 400
    assert app.item(lib.plain).view_count == 0
    assert raw(server, "/:/scrobble", key="999999", identifier=IDENTIFIER).status_code == 404
    assert raw(server, "/:/progress", key=str(lib.plain), identifier=IDENTIFIER,
               time="abc", state="stopped").status_code == 400


def test_writes_accept_get_put_and_post(server: FakeServer, lib: Library, app: FakePlex) -> None:
    for method in ("GET", "PUT", "POST"):
        reply = raw(server, "/:/scrobble", method=method, key=str(lib.plain),
                    identifier=IDENTIFIER)
        assert (reply.status_code, reply.content) == (200, b"")
    assert app.item(lib.plain).view_count == 3
    assert [r.function for r in server.log] == ["scrobble"] * 3
    assert "scrobble" in FakePlex.WRITE_FUNCTIONS


def test_each_token_has_its_own_watch_state(server: FakeServer, lib: Library,
                                            app: FakePlex, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLEXAPI_PLEXAPI_AUTORELOAD", "false")
    guest = PlexServer(server.base_url, "guest-token")
    guest.fetchItem(lib.plain).markPlayed()
    assert app.item(lib.plain, user="guest").view_count == 1
    assert app.item(lib.plain).view_count == 0
    assert guest.fetchItem(lib.b1).viewCount == 0  # the owner watched it, the guest did not
    assert guest.library.sections()  # via the /library/sections/ fallback for non-owners


def test_concurrent_scrobbles_are_all_counted(server: FakeServer, lib: Library,
                                              app: FakePlex) -> None:
    def scrobble() -> None:
        for _ in range(10):
            raw(server, "/:/scrobble", key=str(lib.plain), identifier=IDENTIFIER)

    threads = [threading.Thread(target=scrobble) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert app.item(lib.plain).view_count == 40


# --------------------------------------------------------------------------------------
# library admin (the Plex reference §5)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, agent, scanner", [
    ("movie", "tv.plex.agents.movie", "Plex Movie"),
    ("show", "tv.plex.agents.series", "Plex TV Series"),
])
def test_library_add_browses_then_creates_section(plex: PlexServer, app: FakePlex,
                                                  server: FakeServer, kind: str, agent: str,
                                                  scanner: str) -> None:
    app.add_browse_dir("/srv/new media/one")
    app.add_browse_dir("/srv/new media/two")
    library = plex.library  # GET /library, once
    server.clear_log()
    library.add(name="New Lib", type=kind, agent=agent, scanner=scanner,
                     location=["/srv/new media/one", "/srv/new media/two"])
    assert [r.function for r in server.log] == ["browse", "browse", "add_section"]
    assert server.log[0].param("includeFiles") == "0"
    section = plex.library.section("New Lib")
    assert (section.type, section.agent, section.scanner) == (kind, agent, scanner)
    assert section.locations == ["/srv/new media/one", "/srv/new media/two"]
    assert app.sections[section.key].title == "New Lib"


def test_library_add_unknown_path_raises_before_any_post(plex: PlexServer, app: FakePlex,
                                                         server: FakeServer) -> None:
    with pytest.raises(BadRequest, match="does not exist"):
        plex.library.add(name="X", type="movie", agent="tv.plex.agents.movie",
                         scanner="Plex Movie", location="/nowhere/at/all")
    with pytest.raises(BadRequest, match="does not exist"):  # a trailing "/" fails too
        plex.library.add(name="X", type="movie", agent="tv.plex.agents.movie",
                         scanner="Plex Movie", location="/media/movies/")
    assert server.requests(function="add_section") == []
    assert len(app.sections) == 2


def test_add_section_without_location_is_bad_request(server: FakeServer, app: FakePlex) -> None:
    reply = raw(server, "/library/sections", method="POST", name="X", type="movie",
                agent="tv.plex.agents.movie", scanner="Plex Movie", language="en-US")
    assert reply.status_code == 400
    assert len(app.sections) == 2


def test_browse_lists_subdirectories(plex: PlexServer) -> None:
    assert [p.path for p in plex.browse("/media", includeFiles=False)] == [
        "/media/movies", "/media/tv"]
    assert plex.isBrowsable("/media/tv/Show A")
    assert [f.title for f in plex.browse("/media/tv/Show B") if f.TAG == "File"] == ["b1.mkv"]


def test_section_update_and_refresh_request_a_scan(plex: PlexServer, lib: Library,
                                                   app: FakePlex, server: FakeServer) -> None:
    tv = plex.library.sectionByID(lib.tv)
    tv.update()
    tv.update(path="/media/tv/Show A")
    tv.refresh()
    assert app.sections[lib.tv].refreshed_count == 3
    assert app.sections[lib.tv].refresh_paths == [None, "/media/tv/Show A", None]
    assert server.requests(function="refresh")[-1].param("force") == "1"
    assert app.sections[lib.movies].refreshed_count == 0
    with pytest.raises(NotFound):
        plex.query("/library/sections/99/refresh")


def test_section_delete_removes_section_and_items(plex: PlexServer, lib: Library,
                                                  app: FakePlex) -> None:
    plex.library.sectionByID(lib.movies).delete()
    assert [s.key for s in plex.library.sections()] == [lib.tv]
    assert app.items(section=lib.movies) == []
    with pytest.raises(NotFound):
        plex.fetchItem(lib.plain)
    with pytest.raises(NotFound):
        plex.query(f"/library/sections/{lib.movies}", method=plex._session.delete)


# --------------------------------------------------------------------------------------
# faults (FakeServer.add_fault) as plexapi sees them
# --------------------------------------------------------------------------------------
def test_fault_status_500_is_bad_request(plex: PlexServer, server: FakeServer) -> None:
    server.add_fault(function="sections", status=500)
    with pytest.raises(BadRequest):
        plex.library.sections()


def test_fault_status_404_is_not_found(plex: PlexServer, server: FakeServer, lib: Library) -> None:
    server.add_fault(function="metadata", status=404)
    with pytest.raises(NotFound):
        plex.fetchItem(lib.plain)


def test_fault_delay_past_timeout_is_read_timeout(server: FakeServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLEXAPI_PLEXAPI_AUTORELOAD", "false")
    plex = PlexServer(server.base_url, TOKEN, timeout=0.2)
    # drop after the delay: the client has gone, writing a reply would only raise EPIPE
    server.add_fault(function="sections", delay_s=0.6, drop=True)
    with pytest.raises(requests.exceptions.ReadTimeout):
        plex.library.sections()


def test_fault_malformed_xml_is_parse_error(plex: PlexServer, server: FakeServer,
                                            lib: Library) -> None:
    server.add_fault(function="section_all", body=b'<MediaContainer size="1"><Video',
                     content_type="text/xml;charset=utf-8")
    with pytest.raises(ParseError):
        plex.library.sectionByID(lib.tv).searchEpisodes()


def test_fault_dropped_connection_is_connection_error(plex: PlexServer, server: FakeServer,
                                                      lib: Library) -> None:
    server.add_fault(function="scrobble", drop=True)
    with pytest.raises(requests.exceptions.ConnectionError):
        plex.fetchItem(lib.plain).markPlayed()


# --------------------------------------------------------------------------------------
# the server's clock: stamps and the Date header
# --------------------------------------------------------------------------------------
def date_s(reply: requests.Response) -> float:
    return parsedate_to_datetime(reply.headers["Date"]).timestamp()


def test_every_reply_has_a_date_header_from_the_server_clock(server: FakeServer, lib: Library,
                                                             clock: Clock) -> None:
    server.add_fault(path="/library/sections", status=500)
    replies = [raw(server, "/"), raw(server, "/", token=None), raw(server, "/nowhere"),
               raw(server, "/library/sections"),
               raw(server, "/:/scrobble", key=str(lib.plain), identifier=IDENTIFIER)]
    assert [r.status_code for r in replies] == [200, 401, 404, 500, 200]
    for reply in replies:  # RFC 7231 IMF-fixdate of the fake's "now", errors included
        assert reply.headers["Date"] == formatdate(NOW, usegmt=True)
    clock.now += 3600.4
    assert date_s(raw(server, "/")) == pytest.approx(NOW + 3600.4, abs=1)


def test_skewed_plex_clock_stamps_writes_and_dates_replies() -> None:
    skew = -7 * 60_000  # the Plex server's clock is 7 minutes slow
    world = World(plex_skew_ms=skew)
    # the world's clock runs (real time): a stamp is checked against the server's clock
    # read just before and just after the moment it was made
    before = world.plex_clock_s()
    movie = world.movie("Heat", plex=none())
    old = world.movie("Ronin", plex=watched(ago=DAY))
    show = world.episode("Castle", 1, 1, "Pilot", plex=at(20 * 60_000, ago=DAY))
    after = world.plex_clock_s()
    world_before = world.clock.ms()
    plex_now = world.plex_clock_s()
    world_after = world.clock.ms()
    assert world_before + skew <= plex_now * 1000 <= world_after + skew
    # declared states were written down by Plex's own clock
    assert int(before - DAY / 1000) <= world.plex_item(old).last_viewed_at_s <= int(
        after - DAY / 1000)
    with world.running() as servers:
        def call(path: str, **params: object) -> requests.Response:
            reply = requests.get(servers.plex.base_url + path, timeout=5,
                                 params={"identifier": IDENTIFIER, **params},
                                 headers={"X-Plex-Token": PLEX_TOKEN})
            assert date_s(reply) == pytest.approx(world.plex_clock_s(), abs=1)
            return reply

        def stamped(path: str, item: Item, **params: object) -> int:
            """Call, and check the item's lastViewedAt is Plex's clock during the call."""
            start = world.plex_clock_s()
            assert call(path, **params).status_code == 200
            stamp = world.plex_item(item).last_viewed_at_s
            assert int(start) <= stamp <= int(world.plex_clock_s())
            return stamp

        scrobbled = stamped("/:/scrobble", movie, key=movie.rating_key)
        assert scrobbled <= int(world.clock.s() + skew / 1000)  # Plex's clock, not the world's
        world.clock.advance(90_000)  # advancing the world moves the server's clock too
        progressed = stamped("/:/progress", show, key=show.rating_key, time=5 * 60_000,
                             state="stopped")
        assert progressed >= scrobbled + 90
        world.clock.advance(30_000)
        timeline = stamped("/:/timeline", show, ratingKey=show.rating_key,
                           key=f"/library/metadata/{show.rating_key}", time=6 * 60_000,
                           state="stopped")
        assert timeline >= progressed + 30
        world.plex_skew_ms = 0  # a skew can change while the servers run
        assert date_s(call("/identity")) == pytest.approx(world.clock.s(), abs=1)
        unauthorized = requests.get(servers.plex.base_url + "/", timeout=5)
        assert unauthorized.status_code == 401
        assert date_s(unauthorized) == pytest.approx(world.clock.s(), abs=1)


# --------------------------------------------------------------------------------------
# server settings, batch metadata, unscrobble, the scrobble offset switch
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold, value", [(0.9, 90), (0.95, 95), (0.7, 70)])
def test_prefs_serve_the_played_threshold(plex: PlexServer, app: FakePlex, threshold: float,
                                          value: int) -> None:
    app.played_threshold = threshold
    settings = plex.settings  # a cached property: one GET /:/prefs
    setting = settings.get("LibraryVideoPlayedThreshold")
    assert (setting.type, setting.value, setting.default) == ("int", value, 90)
    assert setting.label == "Video played threshold"
    assert settings.get("FriendlyName").value == "fake-plex"
    assert {s.id for s in settings.all()} >= {"FriendlyName", "LibraryVideoPlayedThreshold",
                                              "LibraryVideoPlayedAtBehaviour"}


def test_prefs_raw_xml_and_owner_only(server: FakeServer, app: FakePlex) -> None:
    reply = raw(server, "/:/prefs")
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "text/xml;charset=utf-8"
    assert '<Setting id="LibraryVideoPlayedThreshold" label="Video played threshold"' in reply.text
    assert 'type="int" default="90" value="90"' in reply.text
    assert server.log[-1].function == "prefs" and "prefs" not in FakePlex.WRITE_FUNCTIONS
    assert raw(server, "/:/prefs", token="guest-token").status_code == 403  # a managed user
    assert raw(server, "/:/prefs", token="nobody").status_code == 401
    assert raw(server, "/:/prefs", method="DELETE").status_code == 405


def test_batch_metadata_returns_every_item_in_one_container(plex: PlexServer, server: FakeServer,
                                                            lib: Library) -> None:
    keys = [lib.plain, lib.b1, lib.started]  # two sections, in the order asked
    reply = raw(server, "/library/metadata/" + ",".join(map(str, keys)))
    assert reply.status_code == 200
    server.clear_log()
    items = plex.fetchItems(keys)  # plexapi turns a list of ints into one comma-list request
    assert [i.ratingKey for i in items] == keys
    assert [(r.function, r.path) for r in server.log] == [
        ("metadata", "/library/metadata/" + ",".join(map(str, keys)))]
    assert [type(i).__name__ for i in items] == ["Movie", "Episode", "Movie"]
    assert raw(server, f"/library/metadata/{lib.plain},999999").status_code == 404
    assert raw(server, f"/library/metadata/{lib.plain},x").status_code == 400


def test_unscrobble_clears_everything_and_applies_to_a_season(server: FakeServer, lib: Library,
                                                              app: FakePlex) -> None:
    season = app.season_key(lib.tv, "Show A", 1)
    for key in (season, lib.started):
        assert raw(server, "/:/scrobble", key=str(key), identifier=IDENTIFIER).status_code == 200
    episodes = [rk for (s, _), rk in lib.episodes.items() if s == 1]
    assert all(app.item(rk).view_count == 1 for rk in episodes)
    for key in (season, lib.started):
        reply = raw(server, "/:/unscrobble", key=str(key), identifier=IDENTIFIER)
        assert (reply.status_code, reply.content) == (200, b"")
    for rk in [*episodes, lib.started]:
        state = app.item(rk)
        assert (state.view_count, state.view_offset_ms, state.last_viewed_at_s) == (0, 0, None)
    assert raw(server, "/:/unscrobble", key=str(lib.plain)).status_code == 400  # no identifier
    assert raw(server, "/:/unscrobble", key="999999", identifier=IDENTIFIER).status_code == 404
    assert "unscrobble" in FakePlex.WRITE_FUNCTIONS


@pytest.mark.parametrize("clears, offset", [(True, 0), (False, 600_000)])
def test_scrobble_clears_offset_switch(plex: PlexServer, lib: Library, app: FakePlex,
                                       clock: Clock, clears: bool, offset: int) -> None:
    app.scrobble_clears_offset = clears
    clock.now += 10
    plex.fetchItem(lib.started).markPlayed()  # 600 s in, never played
    state = app.item(lib.started)
    assert (state.view_count, state.view_offset_ms, state.last_viewed_at_s) == (1, offset, NOW + 10)
    assert plex.fetchItem(lib.started).viewOffset == offset
    app.progress_past_threshold = "played"  # a completed play still clears it either way
    plex.fetchItem(lib.started).updateProgress(6_900_000)
    assert (app.item(lib.started).view_count, app.item(lib.started).view_offset_ms) == (2, 0)


def test_scrobble_clears_offset_is_a_constructor_option() -> None:
    assert FakePlex().scrobble_clears_offset is True
    assert FakePlex(scrobble_clears_offset=False).scrobble_clears_offset is False


# --------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------
def test_server_read_and_write_delays(server: FakeServer, lib: Library, app: FakePlex) -> None:
    def timed(path: str, **params: str) -> float:
        started = time.perf_counter()
        assert raw(server, path, **params).status_code == 200
        return time.perf_counter() - started

    server.read_delay_s, server.write_delay_s = 0.2, 0.6
    read_s = timed(f"/library/metadata/{lib.plain}")
    write_s = timed("/:/scrobble", key=str(lib.plain), identifier=IDENTIFIER)
    assert 0.2 <= read_s < 0.6 <= write_s  # scrobble is in WRITE_FUNCTIONS
    server.write_delay_s = 0.0  # settable at any time
    assert timed("/:/unscrobble", key=str(lib.plain), identifier=IDENTIFIER) < 0.5
    assert app.item(lib.plain).view_count == 0
