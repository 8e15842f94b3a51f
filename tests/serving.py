"""A real uvicorn server on 127.0.0.1 in a thread, and a small HTTP client for its JSON and
Server-Sent Events (the standard library's ``http.client``: what a test sends is exactly
what goes over the socket)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn


class RunningServer:
    """``app`` served by uvicorn on a free port of 127.0.0.1 until :meth:`stop`."""

    def __init__(self, app: Any) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until ``/health`` answers 200 (the model loaded)."""
        deadline = time.monotonic() + timeout
        while self.get("/health").status != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the service never became ready")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path: str) -> Reply:
        conn = self.connection()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return Reply(
                response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
            )
        finally:
            conn.close()

    def post(
        self, path: str, body: bytes | str | Any, headers: dict[str, str] | None = None
    ) -> Reply:
        data = (
            body
            if isinstance(body, bytes)
            else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
        )
        conn = self.connection()
        try:
            conn.request(
                "POST",
                path,
                body=data,
                headers={"Content-Type": "application/json", **(headers or {})},
            )
            response = conn.getresponse()
            return Reply(
                response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
            )
        finally:
            conn.close()

    def open_stream(self, body: Any) -> EventStream:
        """A streaming ``POST /v1/answers``, read event by event."""
        conn = self.connection()
        conn.request(
            "POST",
            "/v1/answers",
            body=json.dumps({**body, "stream": True}).encode(),
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        return EventStream(conn, conn.getresponse())


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class EventStream:
    """SSE events (``(type, data)``) of one response, read as they arrive."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse):
        self.conn = conn
        self.response = response
        self.status = response.status

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        kind, data = "", ""
        while True:
            line = self.response.readline()
            if not line:
                return
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                kind = text[len("event: ") :]
            elif text.startswith("data: "):
                data = text[len("data: ") :]
            elif text == "" and kind:
                yield kind, json.loads(data)
                kind, data = "", ""

    def close(self) -> None:
        """Go away mid-stream: the socket is shut, as a browser tab closing does."""
        sock = self.conn.sock
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
