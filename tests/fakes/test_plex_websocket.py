"""Contract tests of the fake Plex's notification websocket (the Plex reference §10): the
RFC 6455 handshake and framing, and the messages plexapi's real ``AlertListener`` receives
when a player plays, pauses and stops, and when an item is marked played or unplayed; and
what a listener sees when the server drops it or refuses it."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import websocket
from plexapi.alert import AlertListener
from plexapi.server import PlexServer

from tests.fakes.fake_http import websocket_accept
from tests.fakes.world import MIN, PLEX_TOKEN, Item, Servers, World, at, none
from tests.user import PLAYER, User

KEY = "/:/websockets/notifications"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@dataclass
class Listening:
    """A started world with plexapi's AlertListener connected to the fake Plex."""

    world: World
    servers: Servers
    user: User
    episode: Item
    movie: Item
    messages: list[dict] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    listener: AlertListener | None = None
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def on_message(self, data: dict) -> None:
        with self.arrived:
            self.messages.append(data)
            self.arrived.notify_all()

    def on_error(self, error: BaseException) -> None:
        with self.arrived:
            self.errors.append(error)
            self.arrived.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
        with self.arrived:
            return self.arrived.wait_for(predicate, timeout_s)

    def of(self, kind: str, key: str) -> list[dict]:
        with self.arrived:
            return [e for m in self.messages if m["type"] == kind for e in m[key]]

    def listen(self) -> AlertListener:
        plex = PlexServer(self.servers.plex.base_url, PLEX_TOKEN)
        connected = self.world.plex.websocket_connections  # before: it connects at once
        listener = plex.startAlertListener(self.on_message, self.on_error)
        deadline = time.monotonic() + 5
        while self.world.plex.websocket_connections == connected:
            assert time.monotonic() < deadline, "the AlertListener did not connect"
            time.sleep(0.01)
        return listener


@pytest.fixture
def live() -> Iterator[Listening]:
    world = World()
    episode = world.episode("Castle", 1, 1, "Flowers for Your Grave", plex=none())
    movie = world.movie("Heat", plex=at(20 * MIN))
    with world.running() as servers:
        state = Listening(world, servers, User(world, servers.plex), episode, movie)
        state.listener = state.listen()
        yield state
        state.listener.stop()
        assert not servers.plex.errors, servers.plex.errors


# -- the handshake and the frames (RFC 6455) -------------------------------------------------

def _raw_handshake(port: int, path: str, key: str = "dGhlIHNhbXBsZSBub25jZQ==",
                   extra: str = "") -> tuple[socket.socket, str]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return sock, head.decode("latin-1")


def _recv_frame(sock: socket.socket) -> tuple[int, bool, bytes]:
    """(opcode, masked, payload) of one frame from the server."""
    def read(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the server closed the connection mid-frame"
            data += chunk
        return data
    b0, b1 = read(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", read(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", read(8))[0]
    return b0 & 0x0F, bool(b1 & 0x80), read(n)


def test_accept_key_is_rfc_6455s_example() -> None:
    assert websocket_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_handshake_answers_101_with_the_accept_key_and_token_in_the_query() -> None:
    world = World()
    with world.running() as servers:
        key = base64.b64encode(os.urandom(16)).decode()
        sock, head = _raw_handshake(servers.plex.port, f"{KEY}?X-Plex-Token={PLEX_TOKEN}", key)
        with sock:
            assert head.startswith("HTTP/1.1 101 ")
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in head.split("\r\n")[1:] if line)}
            assert headers["upgrade"].lower() == "websocket"
            assert headers["connection"].lower() == "upgrade"
            assert headers["sec-websocket-accept"] == websocket_accept(key)
            assert world.plex.wait_for_websockets(1)
            world.plex.notify({"type": "status", "size": 1, "StatusNotification": []})
            opcode, masked, payload = _recv_frame(sock)
        assert (opcode, masked) == (0x1, False)  # a text frame, unmasked (server to client)
        assert json.loads(payload) == {"NotificationContainer": {
            "type": "status", "size": 1, "StatusNotification": []}}


@pytest.mark.parametrize("path, extra, status", [
    (f"{KEY}?X-Plex-Token=wrong", "", 401),
    (KEY, "", 401),  # no token at all
    (f"{KEY}?X-Plex-Token={PLEX_TOKEN}", "", 101),
])
def test_handshake_checks_the_token(path: str, extra: str, status: int) -> None:
    world = World()
    with world.running() as servers:
        sock, head = _raw_handshake(servers.plex.port, path, extra=extra)
        sock.close()
    assert head.split(" ")[1] == str(status)


def test_a_plain_get_or_a_bad_key_is_no_handshake() -> None:
    world = World()
    with world.running() as servers:
        import requests
        plain = requests.get(servers.plex.base_url + KEY, params={"X-Plex-Token": PLEX_TOKEN},
                             timeout=5)
        sock, head = _raw_handshake(servers.plex.port, f"{KEY}?X-Plex-Token={PLEX_TOKEN}",
                                    key="not-base64!")
        sock.close()
    assert plain.status_code == 400
    assert head.split(" ")[1] == "400"
    assert world.plex.websocket_connections == 0


def test_ping_is_answered_with_pong_and_close_is_echoed() -> None:
    world = World()
    with world.running() as servers:
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{servers.plex.port}{KEY}?X-Plex-Token={PLEX_TOKEN}", timeout=5)
        assert world.plex.wait_for_websockets(1)
        ws.ping("are you there")  # websocket-client masks every frame it sends
        frame = ws.recv_frame()
        assert (frame.opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"are you there")
        ws.send("ignored by the server")  # clients may talk; PMS ignores it
        ws.send_close(websocket.STATUS_NORMAL)
        frame = ws.recv_frame()
        assert frame.opcode == websocket.ABNF.OPCODE_CLOSE
        assert struct.unpack("!H", frame.data[:2])[0] == websocket.STATUS_NORMAL
        ws.shutdown()
        assert world.plex.wait_for_websockets(0)


def test_an_unmasked_client_frame_fails_the_connection_with_1002() -> None:
    world = World()
    with world.running() as servers:
        sock, head = _raw_handshake(servers.plex.port, f"{KEY}?X-Plex-Token={PLEX_TOKEN}")
        with sock:
            assert head.startswith("HTTP/1.1 101 ")
            sock.sendall(bytes([0x81, 2]) + b"hi")  # FIN + text, mask bit clear
            opcode, _, payload = _recv_frame(sock)
            assert opcode == 0x8
            assert struct.unpack("!H", payload[:2])[0] == 1002
            assert sock.recv(10) == b""  # and then the TCP close
        assert world.plex.wait_for_websockets(0)


# -- what plexapi's AlertListener receives -----------------------------------------------------

def test_listener_gets_playing_paused_stopped_of_one_session(live: Listening) -> None:
    item = live.episode
    live.user.plex_play(item, 2 * MIN)
    live.user.plex_play(item, 3 * MIN)
    live.user.plex_pause(item, 4 * MIN)
    live.user.plex_stop(item, 5 * MIN)

    assert live.wait(lambda: len(live.messages) >= 4)
    assert [m["type"] for m in live.messages] == ["playing"] * 4
    assert all(m["size"] == 1 for m in live.messages)
    entries = live.of("playing", "PlaySessionStateNotification")
    assert [e["state"] for e in entries] == ["playing", "playing", "paused", "stopped"]
    assert [e["viewOffset"] for e in entries] == [2 * MIN, 3 * MIN, 4 * MIN, 5 * MIN]
    first = entries[0]
    assert set(first) == {"sessionKey", "clientIdentifier", "guid", "ratingKey", "url", "key",
                          "viewOffset", "playQueueItemID", "state"}
    assert first["ratingKey"] == str(item.rating_key)  # a string, as PMS sends it
    assert first["key"] == f"/library/metadata/{item.rating_key}"
    assert first["clientIdentifier"] == PLAYER
    assert (first["guid"], first["url"]) == ("", "")
    assert isinstance(first["viewOffset"], int) and isinstance(first["playQueueItemID"], int)
    assert {e["sessionKey"] for e in entries} == {first["sessionKey"]}  # one session
    assert {e["playQueueItemID"] for e in entries} == {first["playQueueItemID"]}
    # and the server kept what the player reported
    assert live.world.plex_item(item).view_offset_ms == 5 * MIN
    assert live.errors == []


def test_a_new_playback_is_a_new_session_and_two_players_are_two(live: Listening) -> None:
    item = live.episode
    live.user.plex_play(item, 2 * MIN)
    live.user.plex_stop(item, 3 * MIN)
    live.user.plex_play(item, 3 * MIN)
    live.user.plex_play(live.movie, 21 * MIN, client="living-room")
    assert live.wait(lambda: len(live.messages) >= 4)
    keys = [e["sessionKey"] for e in live.of("playing", "PlaySessionStateNotification")]
    assert [(x["sessionKey"], x["client"], x["ratingKey"], x["state"])
            for x in live.world.plex.sessions()] == [
        (keys[2], PLAYER, item.rating_key, "playing"),
        (keys[3], "living-room", live.movie.rating_key, "playing")]
    assert keys[0] == keys[1]
    assert len({keys[1], keys[2], keys[3]}) == 3
    living_room = live.of("playing", "PlaySessionStateNotification")[3]
    assert living_room["clientIdentifier"] == "living-room"
    assert living_room["ratingKey"] == str(live.movie.rating_key)


def test_a_session_crossing_the_threshold_marks_played_once(live: Listening) -> None:
    item = live.episode  # 30 minutes: the threshold is at 27
    live.user.plex_play(item, 20 * MIN)
    live.user.plex_play(item, 28 * MIN)
    live.user.plex_play(item, 29 * MIN)
    live.user.plex_stop(item, 29 * MIN + 30_000)
    after = live.world.plex_item(item)
    assert after.view_count == 1
    assert after.view_offset_ms == 0
    assert live.wait(lambda: len(live.messages) >= 4)
    states = [e["state"] for e in live.of("playing", "PlaySessionStateNotification")]
    assert states == ["playing", "playing", "playing", "stopped"]


def test_listener_gets_the_activity_of_a_mark_and_an_unmark(live: Listening) -> None:
    plex = PlexServer(live.servers.plex.base_url, PLEX_TOKEN)
    video = plex.fetchItem(live.episode.rating_key)
    video.markPlayed()
    assert live.world.plex_item(live.episode).view_count == 1
    assert live.wait(lambda: any(e["event"] == "ended" for e in
                                 live.of("activity", "ActivityNotification")))
    video.markUnplayed()
    assert live.world.plex_item(live.episode).view_count == 0
    assert live.wait(lambda: sum(e["event"] == "ended" for e in
                                 live.of("activity", "ActivityNotification")) == 2)

    entries = live.of("activity", "ActivityNotification")
    key = f"/library/metadata/{live.episode.rating_key}"
    for mark in (entries[:5], entries[5:]):  # each: started, updated x3, ended, one uuid
        assert [e["event"] for e in mark] == ["started", "updated", "updated", "updated",
                                              "ended"]
        assert len({e["uuid"] for e in mark}) == 1
        assert all(e["Activity"]["uuid"] == e["uuid"] for e in mark)
        assert all(e["Activity"]["type"] == "library.refresh.items" for e in mark)
        assert "Context" not in mark[0]["Activity"]
        assert all(e["Activity"]["Context"]["key"] == key for e in mark[1:])
        assert mark[-1]["Activity"]["progress"] == 100
    assert entries[0]["uuid"] != entries[5]["uuid"]
    assert all(m["type"] == "activity" and m["size"] == 1 for m in live.messages)
    assert live.of("playing", "PlaySessionStateNotification") == []  # a mark is no playback


def test_timeline_entries_on_request_and_with_marks_when_switched_on(live: Listening) -> None:
    live.world.plex.notify_timeline(live.movie.rating_key, 9)
    live.world.plex.mark_sends_timeline = True
    live.world.plex.mark_notifies = False
    User(live.world, live.servers.plex).plex_finish(live.episode)
    assert live.wait(lambda: len(live.messages) >= 2)
    assert [m["type"] for m in live.messages] == ["timeline", "timeline"]
    deleted, marked = live.of("timeline", "TimelineEntry")
    assert deleted["identifier"] == "com.plexapp.plugins.library"
    assert (deleted["itemID"], deleted["state"], deleted["type"]) == (
        str(live.movie.rating_key), 9, 1)
    assert deleted["sectionID"] == str(live.world.movie_section)
    assert deleted["title"] == "Heat" and isinstance(deleted["updatedAt"], int)
    assert (marked["itemID"], marked["state"], marked["type"]) == (
        str(live.episode.rating_key), 5, 4)


def test_a_lone_stop_notifies_unless_switched_off(live: Listening) -> None:
    live.user.plex_stop(live.movie, 25 * MIN)
    assert live.wait(lambda: len(live.messages) == 1)
    live.world.plex.lone_stop_notifies = False
    live.user.plex_stop(live.movie, 26 * MIN)
    assert len(live.world.plex.notifications) == 1  # sent before the report is answered
    time.sleep(0.3)
    assert [e["viewOffset"] for e in live.of("playing", "PlaySessionStateNotification")] == [
        25 * MIN]
    assert live.world.plex_item(live.movie).view_offset_ms == 26 * MIN  # still applied


# -- dropped and refused ---------------------------------------------------------------------

def test_an_abrupt_drop_reaches_the_listeners_error_callback(live: Listening) -> None:
    assert live.world.plex.drop_websockets(abrupt=True) == 1
    assert live.wait(lambda: bool(live.errors))
    assert isinstance(live.errors[0], (ConnectionError, websocket.WebSocketException))
    assert live.listener is not None
    live.listener.join(5)
    assert not live.listener.is_alive()
    assert live.world.plex.wait_for_websockets(0)


def test_a_clean_drop_closes_with_going_away() -> None:
    world = World()
    with world.running() as servers:
        closed: list[tuple[int | None, str | None]] = []
        app = websocket.WebSocketApp(
            f"ws://127.0.0.1:{servers.plex.port}{KEY}?X-Plex-Token={PLEX_TOKEN}",
            on_close=lambda _ws, code, reason: closed.append((code, reason)))
        thread = threading.Thread(target=app.run_forever, daemon=True)
        thread.start()
        assert world.plex.wait_for_websockets(1)
        # plexapi's own listener too: its thread ends when the server closes
        listener = PlexServer(servers.plex.base_url, PLEX_TOKEN).startAlertListener()
        assert world.plex.wait_for_websockets(2)
        assert world.plex.drop_websockets() == 2
        thread.join(5)
        listener.join(5)
        assert not thread.is_alive() and not listener.is_alive()
        assert closed == [(1001, "server going away")]
        assert world.plex.wait_for_websockets(0)


def test_refused_handshakes_fail_the_listener_until_accepted_again(live: Listening) -> None:
    plex = live.world.plex
    plex.refuse_websockets()
    plex.drop_websockets(abrupt=True)
    assert live.wait(lambda: len(live.errors) == 1)
    refused = PlexServer(live.servers.plex.base_url, PLEX_TOKEN).startAlertListener(
        live.on_message, live.on_error)
    assert live.wait(lambda: len(live.errors) == 2)
    assert isinstance(live.errors[1], websocket.WebSocketBadStatusException)
    assert live.errors[1].status_code == 503
    refused.join(5)
    assert plex.websockets == 0
    plex.accept_websockets()
    live.listener = live.listen()
    live.user.plex_play(live.episode, 2 * MIN)
    assert live.wait(lambda: len(live.messages) == 1)


def test_refusal_for_a_while_ends_by_itself() -> None:
    world = World()
    with world.running() as servers:
        world.plex.refuse_websockets(0.3)
        url = f"ws://127.0.0.1:{servers.plex.port}{KEY}?X-Plex-Token={PLEX_TOKEN}"
        with pytest.raises(websocket.WebSocketBadStatusException):
            websocket.create_connection(url, timeout=5)
        time.sleep(0.4)
        ws = websocket.create_connection(url, timeout=5)
        assert world.plex.wait_for_websockets(1)
        ws.close()
    assert world.plex.websocket_connections == 1


def test_stopping_the_server_closes_its_websockets(live: Listening) -> None:
    live.servers.plex.stop()
    assert live.listener is not None
    live.listener.join(5)
    assert not live.listener.is_alive()
    assert live.world.plex.wait_for_websockets(0)
