"""Plumbing shared by the fake SageTV and Plex servers: real HTTP on 127.0.0.1,
a request log, and faults injected on purpose.

A fake is an *app*: an object with ``handle(request) -> Response`` (and optionally
``function_of(request) -> str | None`` naming the API function a request calls, so
faults, latency and the log can refer to it; a ``WRITE_FUNCTIONS`` set naming the
functions that write, for ``write_delay_s``; and ``date_clock_s() -> float``, the server's own
clock in epoch seconds, which every reply's ``Date`` header is taken from; without it
the header shows the real time). ``FakeServer`` serves an app on a free port in a
background thread, records every request in ``log`` and applies the faults registered
with ``add_fault`` before (or instead of) calling the app.

A reply may also take the connection over: a ``Response`` with ``upgrade`` set (status 101
and the handshake headers) is sent, then ``upgrade(WebSocket)`` runs on the handler's thread
until the socket closes; ``WebSocket`` speaks RFC 6455 frames (see ``websocket_accept``).

Only the standard library is used, so the sandbox demo runs wherever the tool runs.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    """One request as the fake saw it (also what the log keeps)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes = b""
    function: str | None = None  # API function (sagex ``c=``, or a Plex endpoint name)

    def param(self, name: str, default: str | None = None) -> str | None:
        """First value of a query (or form) parameter."""
        values = self.query.get(name)
        return values[0] if values else default

    def header(self, name: str, default: str | None = None) -> str | None:
        """A request header, looked up case-insensitively."""
        return self.headers.get(name.lower(), default)


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    # a 101 reply: after it is sent, this runs with the connection as a WebSocket
    upgrade: Callable[[WebSocket], None] | None = None


# -- WebSocket (RFC 6455) -------------------------------------------------------------------
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def websocket_accept(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1((key.strip() + WS_GUID).encode("ascii")).digest()  # noqa: S324
    return base64.b64encode(digest).decode("ascii")


def websocket_handshake_error(request: Request) -> str | None:
    """Why a request is not a valid WebSocket opening handshake (RFC 6455 §4.2.1), or None."""
    if request.method != "GET":
        return "the opening handshake must be a GET"
    if "websocket" not in (request.header("upgrade") or "").lower():
        return "Upgrade: websocket is missing"
    tokens = [t.strip().lower() for t in (request.header("connection") or "").split(",")]
    if "upgrade" not in tokens:
        return "Connection: Upgrade is missing"
    if request.header("sec-websocket-version") != "13":
        return "Sec-WebSocket-Version must be 13"
    key = request.header("sec-websocket-key") or ""
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return "Sec-WebSocket-Key must be 16 bytes in base64"
    except ValueError:
        return "Sec-WebSocket-Key is not base64"
    return None


def websocket_upgrade(request: Request, serve: Callable[[WebSocket], None]) -> Response:
    """The 101 reply accepting ``request`` (already checked) and serving it with ``serve``."""
    return Response(101, b"", "", {
        "Upgrade": "websocket", "Connection": "Upgrade",
        "Sec-WebSocket-Accept": websocket_accept(request.header("sec-websocket-key") or "")},
        upgrade=serve)


class WebSocketClosed(Exception):
    """The peer closed (close frame or end of stream) or the socket was dropped."""


class WebSocket:
    """The server end of one WebSocket connection: ``send_text`` from any thread (frames go
    out whole, unmasked, as a server's must); ``receive`` reads the client's frames (which
    must be masked), answering pings with pongs and a close frame with a close frame.

    ``close(code)`` is the server's clean close (close frame, then the TCP close once the
    client answered or after a second); ``abort()`` resets the connection (TCP RST, no
    close frame), as a server that crashed or a network that failed."""

    def __init__(self, sock: socket.socket, rfile: Any, wfile: Any, request: Request) -> None:
        self.sock = sock
        self.rfile = rfile
        self.wfile = wfile
        self.request = request
        self.received: list[tuple[int, bytes]] = []  # data frames from the client
        self.close_code: int | None = None  # the client's close code, once it sent one
        self.closed = threading.Event()
        self._send_lock = threading.Lock()
        self._aborted = False
        self._close_sent = False

    # -- sending ------------------------------------------------------------------------
    def _send_frame(self, opcode: int, payload: bytes = b"") -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])  # FIN, no extensions, server frames are not masked
        if n < 126:
            head += bytes([n])
        elif n < 1 << 16:
            head += bytes([126]) + struct.pack("!H", n)
        else:
            head += bytes([127]) + struct.pack("!Q", n)
        with self._send_lock:
            if self._aborted or (self._close_sent and opcode != OP_CLOSE):
                raise WebSocketClosed("closed")
            if opcode == OP_CLOSE:
                self._close_sent = True
            try:
                self.sock.sendall(head + payload)
            except OSError as exc:
                raise WebSocketClosed(str(exc)) from exc

    def send_text(self, text: str) -> None:
        self._send_frame(OP_TEXT, text.encode("utf-8"))

    def ping(self, payload: bytes = b"") -> None:
        self._send_frame(OP_PING, payload)

    def close(self, code: int = 1001, reason: str = "") -> None:
        """The server's closing handshake (RFC 6455 §7.1.2); 1001 = going away."""
        try:
            self._send_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8"))
        except WebSocketClosed:
            return
        if not self.closed.wait(1.0):  # the client should answer with its own close
            self._shutdown()

    def abort(self) -> None:
        """Drop the connection at once with a TCP reset (SO_LINGER 0, then close)."""
        with self._send_lock:
            self._aborted = True
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # wake the reading thread without sending a FIN; it closes the socket (the RST)
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def _shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- receiving ----------------------------------------------------------------------
    def _read(self, n: int) -> bytes:
        data = self.rfile.read(n) if n else b""
        if len(data) < n:
            raise WebSocketClosed("end of stream")
        return data

    def _read_frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read(2)
        if b0 & 0x70:
            raise _ProtocolError(1002, "reserved bits set without an extension")
        if not b1 & 0x80:
            raise _ProtocolError(1002, "client frames must be masked (RFC 6455 §5.1)")
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        mask = self._read(4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(self._read(n)))
        opcode = b0 & 0x0F
        if opcode >= 0x8 and (n > 125 or not b0 & 0x80):
            raise _ProtocolError(1002, "control frames are short and not fragmented")
        return bool(b0 & 0x80), opcode, data

    def receive(self) -> tuple[int, bytes] | None:
        """The next data message (opcode, payload), or None once the connection closed.
        Pings are answered, pongs ignored, a close frame echoed (RFC 6455 §5.5)."""
        message: list[bytes] = []
        message_op = None
        while True:
            try:
                fin, opcode, data = self._read_frame()
            except _ProtocolError as exc:
                self._fail(exc.code, str(exc))
                return None
            except (WebSocketClosed, OSError, ValueError):
                self._finish()
                return None
            if opcode == OP_PING:
                self._try(OP_PONG, data)
            elif opcode == OP_PONG:
                continue
            elif opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
                self._try(OP_CLOSE, data[:2])  # echo the code, as RFC 6455 §5.5.1 asks
                self._finish()
                return None
            elif opcode in (OP_TEXT, OP_BINARY) and message_op is None:
                message_op, message = opcode, [data]
            elif opcode == OP_CONTINUATION and message_op is not None:
                message.append(data)
            else:
                self._fail(1002, f"unexpected opcode {opcode}")
                return None
            if fin and message_op is not None and opcode in (OP_TEXT, OP_BINARY,
                                                              OP_CONTINUATION):
                done = (message_op, b"".join(message))
                self.received.append(done)
                return done

    def _try(self, opcode: int, payload: bytes) -> None:
        try:
            self._send_frame(opcode, payload)
        except WebSocketClosed:
            pass

    def _fail(self, code: int, reason: str) -> None:
        self._try(OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:120])
        self._finish()

    def _finish(self) -> None:
        if self._aborted:
            # close the descriptor for real now (the handler's files still hold the socket
            # object, so socket.close() would wait for them): with SO_LINGER 0 it is a reset
            try:
                os.close(self.sock.detach())
            except OSError:
                pass
        else:
            self._shutdown()
        self.closed.set()

    def serve_until_closed(self) -> None:
        """Read (and answer control frames) until the connection closes."""
        while self.receive() is not None:
            pass


class _ProtocolError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass
class Fault:
    """A failure served on purpose to the requests it matches.

    Matching: ``path`` (prefix of the URL path), ``function`` (API function name),
    ``method``, and ``when`` (any predicate over the Request); all given ones must hold.
    ``skip`` lets that many matching requests through first; ``times`` limits how many
    are hit (None: all of them).

    Effect, in this order: ``delay_s`` sleeps first (past a client's timeout it is a
    slow server); ``drop`` closes the connection with no reply; ``status`` answers that
    status with ``body`` (or a short text); ``body`` alone answers 200 with that body
    *without running the app* (so ``body=b"{}"`` is a write that did nothing);
    ``truncate`` runs the app and sends only the first half of its reply, then closes.
    ``headers`` are added to whatever reply is sent (a cookie, a redirect's Location).
    With only ``delay_s`` or ``headers`` the app runs normally.
    """

    path: str | None = None
    function: str | None = None
    method: str | None = None
    when: Callable[[Request], bool] | None = None
    status: int | None = None
    body: bytes | None = None
    content_type: str = "text/plain; charset=utf-8"
    delay_s: float = 0.0
    drop: bool = False
    truncate: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    skip: int = 0
    times: int | None = None
    hits: int = 0
    seen: int = 0

    def matches(self, request: Request) -> bool:
        if self.path is not None and not request.path.startswith(self.path):
            return False
        if self.function is not None and request.function != self.function:
            return False
        if self.method is not None and request.method != self.method.upper():
            return False
        return self.when is None or bool(self.when(request))


@dataclass
class ServerStats:
    """What a fake spent serving, for the benchmark: requests answered, seconds inside
    the app's ``handle`` (the fake's own work), seconds from a request's first line read
    to its last byte written (HTTP parsing too, and waiting for a slow reader), bytes
    sent."""

    requests: int = 0
    app_s: float = 0.0
    serve_s: float = 0.0
    bytes_sent: int = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse sockets, as with real servers
    # headers and body go out in separate writes; with Nagle on, the body waits for the
    # client's delayed ACK (~40 ms per reply on a kept-alive socket)
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # the request log replaces stderr chatter

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header send_response adds to every reply (errors and faults too):
        RFC 7231 IMF-fixdate from the app's own clock, which may be skewed on purpose."""
        if timestamp is None:
            clock = getattr(self.server.fake.app, "date_clock_s", None)
            timestamp = clock() if clock is not None else time.time()
        return formatdate(timestamp, usegmt=True)

    def parse_request(self) -> bool:
        self._started = time.perf_counter()  # the request line is in: serving starts
        return super().parse_request()

    def _serve(self) -> None:
        started = getattr(self, "_started", None) or time.perf_counter()
        try:
            self._serve_request()
        finally:
            self.server.fake._account(serve_s=time.perf_counter() - started)

    def _serve_request(self) -> None:
        fake = self.server.fake
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        query = parse_qs(split.query, keep_blank_values=True)
        content_type = self.headers.get("Content-Type") or ""
        if body and content_type.startswith("application/x-www-form-urlencoded"):
            for key, values in parse_qs(body.decode("utf-8"), keep_blank_values=True).items():
                query.setdefault(key, []).extend(values)
        request = Request(
            method=self.command,
            path=split.path,
            query=query,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        self._request = request
        function_of = getattr(fake.app, "function_of", None)
        if function_of is not None:
            request.function = function_of(request)
        with fake.lock:
            fake.log.append(request)
        latency = fake.latency_s(request)
        if latency > 0:
            time.sleep(latency)
        fault = fake._take_fault(request)
        if fault is not None and fault.delay_s:
            time.sleep(fault.delay_s)
        if fault is not None and fault.drop:
            self._drop()
            return
        if fault is not None and fault.status is not None:
            response = Response(fault.status, fault.body or f"{fault.status} fault".encode(),
                                fault.content_type)
        elif fault is not None and fault.body is not None:
            response = Response(200, fault.body, fault.content_type)
        else:
            app_started = time.perf_counter()
            try:
                response = fake.app.handle(request)
            except Exception as exc:  # a bug in a fake must be loud, not a hung client
                fake.errors.append(exc)
                response = Response(500, f"fake server error: {exc!r}".encode())
            fake._account(app_s=time.perf_counter() - app_started)
        if fault is not None and fault.headers:
            response = replace(response, headers={**response.headers, **fault.headers})
        if fault is not None and fault.truncate:
            self._send(response, truncate=True)
            return
        self._send(response)

    def _send(self, response: Response, truncate: bool = False) -> None:
        if response.upgrade is not None and response.status == 101:
            self._switch(response)
            return
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            body = response.body[: len(response.body) // 2] if truncate else response.body
            self.wfile.write(body)
            self.server.fake._account(sent=len(body))
        if truncate:
            self.wfile.flush()
            self._drop()

    def _switch(self, response: Response) -> None:
        """101 Switching Protocols, then the connection is the app's WebSocket."""
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        socket_ = WebSocket(self.connection, self.rfile, self.wfile, self._request)
        assert response.upgrade is not None
        response.upgrade(socket_)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    fake: FakeServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # open (keep-alive) connections, so stop() can close them: shutdown() only stops
        # accepting, and a handler thread would go on serving a client's pooled connection
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the connection was closed under the handler (stop(), a dropped client)
        super().handle_error(request, client_address)


class FakeServer:
    """Serves one fake app on 127.0.0.1 (a free port unless one is given).

    Use as a context manager, or call ``start()``/``stop()``. ``log`` lists every
    request received; ``errors`` collects exceptions raised inside the app.

    ``read_delay_s`` and ``write_delay_s`` are the server's latency: every request sleeps
    that long before it is answered (before any fault applies), ``write_delay_s`` for those
    whose function is in the app's ``WRITE_FUNCTIONS`` (a real server commits a write to its
    database), ``read_delay_s`` for all others. Plain attributes: set them at any time.
    """

    def __init__(self, app: object, port: int = 0, *, read_delay_s: float = 0.0,
                 write_delay_s: float = 0.0) -> None:
        self.app = app
        self.read_delay_s = read_delay_s
        self.write_delay_s = write_delay_s
        self.log: list[Request] = []
        self.errors: list[BaseException] = []
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self._stats = ServerStats()
        self._stats_lock = threading.Lock()
        self._port = port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> FakeServer:
        self._httpd = _Server(("127.0.0.1", self._port), _Handler)
        self._httpd.fake = self
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"fake-{type(self.app).__name__}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; connections still open are closed (a server that goes away)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.close_connections()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    # -- latency ---------------------------------------------------------------------
    def latency_s(self, request: Request) -> float:
        """How long ``request`` waits before it is answered (``read_delay_s`` or
        ``write_delay_s``)."""
        writes = getattr(self.app, "WRITE_FUNCTIONS", ())
        if request.function is not None and request.function in writes:
            return self.write_delay_s
        return self.read_delay_s

    # -- faults ----------------------------------------------------------------------
    def add_fault(self, fault: Fault | None = None, **kwargs: object) -> Fault:
        """Register a fault (a Fault, or its fields as keyword arguments)."""
        fault = fault or Fault(**kwargs)  # type: ignore[arg-type]
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def _take_fault(self, request: Request) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if not fault.matches(request):
                    continue
                fault.seen += 1
                if fault.seen <= fault.skip:
                    continue
                if fault.times is not None and fault.hits >= fault.times:
                    continue
                fault.hits += 1
                return fault
        return None

    # -- what serving cost (the benchmark) --------------------------------------------
    def stats(self) -> ServerStats:
        """A copy of the counters since the start (or the last ``reset_stats``)."""
        with self._stats_lock:
            return ServerStats(**vars(self._stats))

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._stats = ServerStats()

    def _account(self, *, app_s: float = 0.0, serve_s: float = 0.0, sent: int = 0) -> None:
        with self._stats_lock:
            stats = self._stats
            stats.app_s += app_s
            stats.bytes_sent += sent
            if serve_s:
                stats.requests += 1
                stats.serve_s += serve_s

    # -- the log ---------------------------------------------------------------------
    def requests(self, function: str | None = None, path: str | None = None) -> list[Request]:
        """Logged requests, optionally only those of one function or path prefix."""
        with self.lock:
            return [r for r in self.log
                    if (function is None or r.function == function)
                    and (path is None or r.path.startswith(path))]

    def clear_log(self) -> None:
        with self.lock:
            self.log.clear()
