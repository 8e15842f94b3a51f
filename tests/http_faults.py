"""A loopback HTTP server whose replies are scripted, faults included.

Real sockets on 127.0.0.1 and HTTP/1.1 keep-alive, so the SDKs' own transports, retries,
timeouts and connection pools meet what a failing server does: answer late (a timeout),
stall half-way through a body, reset the connection (an RST, not a clean close) half-way
through a body, send a status with ``Retry-After``, or send bytes that are not what was
promised. It records every request, every client that hung up while it waited, and how
many connections are open, so a test can count the attempts an SDK made and see that a
cancelled client let go of its connection.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal


@dataclass
class Reply:
    """One scripted answer.

    ``body`` is sent as JSON unless it is bytes. ``delay`` waits before the status line
    (a read timeout when it is longer than the client's). ``partial`` sends only that many
    body bytes (with the whole body's ``Content-Length``), then ``then``: ``"reset"`` an
    RST, ``"stall"`` waits ``stall`` seconds and closes, ``"close"`` a clean close.
    """

    body: object = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    delay: float = 0.0
    partial: int | None = None
    then: Literal["reset", "stall", "close"] = "reset"
    stall: float = 0.0

    def data(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()


@dataclass
class Seen:
    """One request as the server read it."""

    path: str
    headers: dict[str, str]
    body: Any
    at: float


Responder = Callable[[Seen], Reply]


class FaultServer:
    """Answers POSTs on 127.0.0.1 with scripted replies, then with ``default``.

    Args:
        default: the reply once the script is used up (a function of the request, or
            one reply for all); ``None`` answers 599 (a test that asks too often fails).
    """

    def __init__(self, default: Reply | Responder | None = None) -> None:
        self.replies: deque[Reply] = deque()
        self.default = default
        self.seen: list[Seen] = []
        self.hangups: list[float] = []
        """When a client closed its connection while the server was waiting to answer."""
        self.opened = 0
        self.closed = 0
        self._lock = threading.Condition()
        self.httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.fake = self
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        """The server's ``/v1`` base URL (the OpenAI SDK's form)."""
        return f"{self.root}/v1"

    @property
    def root(self) -> str:
        """The server's base URL without a path (the Anthropic SDK's form)."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def reset(self) -> None:
        """Forget the script and what was seen (one server for many tests)."""
        with self._lock:
            self.replies.clear()
            self.seen.clear()
            self.hangups.clear()

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self.replies.extend(replies)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self.opened - self.closed

    def wait_until_idle(self, timeout: float) -> bool:
        """Wait until no connection is open; whether that happened within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.opened != self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def wait_for_requests(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` requests have arrived."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.seen) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FaultServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ handler side

    def _record(self, seen: Seen) -> Reply:
        with self._lock:
            self.seen.append(seen)
            self._lock.notify_all()
            if self.replies:
                return self.replies.popleft()
        if callable(self.default):
            return self.default(seen)
        return self.default or Reply({"error": {"message": "no reply scripted"}}, 599)

    def _count(self, opened: int, closed: int) -> None:
        with self._lock:
            self.opened += opened
            self.closed += closed
            self._lock.notify_all()

    def _hung_up(self) -> None:
        with self._lock:
            self.hangups.append(time.monotonic())
            self._lock.notify_all()


class _HTTPServer(ThreadingHTTPServer):
    fake: FaultServer
    request_queue_size = 1024  # the load tests open hundreds of connections at once


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client that keeps its connection shows
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.fake._count(1, 0)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.fake._count(0, 1)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = self.server.fake._record(Seen(self.path, headers, body, time.monotonic()))
        try:
            self._answer(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away

    def _answer(self, reply: Reply) -> None:
        if reply.delay and not self._wait(reply.delay):
            self.close_connection = True
            return
        data = reply.data()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if reply.partial is None:
            self.wfile.write(data)
            return
        self.wfile.write(data[: reply.partial])
        self.close_connection = True
        if reply.then == "stall":
            self._wait(reply.stall)
        elif reply.then == "reset":
            time.sleep(0.05)  # let the client read the partial body first
            self._reset()

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the client hangs up first (then record it, False)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.connection], [], [], left)
            if not readable:
                continue
            try:
                peek = self.connection.recv(1, socket.MSG_PEEK)
            except OSError:
                peek = b""
            if not peek:
                self.server.fake._hung_up()
                return False
            time.sleep(0.01)  # more bytes from the client (never expected): keep waiting
        return True

    def _reset(self) -> None:
        """Close with an RST: linger on with a zero timeout, and no FIN first."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # the file holds a reference that would defer the real close
        self.connection.close()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass
