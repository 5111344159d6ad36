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

Only the standard library is used, so the sandbox demo runs wherever the tool runs.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
    With only ``delay_s`` the app runs normally after the delay.
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
        if fault is not None and fault.truncate:
            self._send(response, truncate=True)
            return
        self._send(response)

    def _send(self, response: Response, truncate: bool = False) -> None:
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
