"""Load on ``citebacktrack serve`` over real sockets: many concurrent streaming clients.

Every client is an ``asyncio`` stream (the standard library) speaking HTTP/1.1 to a server
on 127.0.0.1 that this script starts in a subprocess; it sends ``POST /v1/answers`` with
``"stream": true``, reads the chunked body, parses every Server-Sent Events frame and times
three moments from the start of its connect: its **first event** (``started``), its
**first text** event and its **done** event. Any non-200 status, a malformed frame (not
``event:``/``data:``, data that is not JSON or names another type), an ``error`` event, a
stream that does not start with ``started`` or ends without ``done``, text events that do
not add up to the done answer's text, a connection error or a timeout counts as an error.

Parts (``--parts``, comma-separated):

* ``mock``: this script in ``--serve-mock`` mode serves
  ``create_app(Citeformer(MockBackend([...])), limits=Limits(...))`` on uvicorn: the real
  service, decoder, grammar and validator over a scripted model that writes a four-sentence
  answer citing [1]-[4] of four sources (every request sends the sources), with one
  scripted response per request. N clients (``--mock-clients``, default 500) all start at
  once. The limits admit all of them: ``max_queue`` = N (``--mock-max-queue``) and one run
  per ``max_concurrent`` in ``--mock-max-concurrent`` (default ``all,8``: N answers decoded
  at once, then 8 at once and the rest queued). Every done answer must be one of the
  scripted answers with its 4 citations.
* ``mock-disconnect``: the same, but every second client closes its socket after its
  first text event (the answer has three more sentences to go); then ``/health``'s
  ``answering`` must drop to 0 and one more request must be served.
* ``model``: ``citebacktrack serve`` with its defaults (the embedded SmolLM2-135M-Instruct
  on llama.cpp, the bundled sample documents, one answer decoded at a time, 32 waiting);
  requests send no sources (top ``--k`` passages, default 3). One untimed warm-up answer,
  then solo baselines (``--solo-repeats`` each of two questions, one at a time), then
  ``--model-clients`` (default 8) clients ``--stagger`` s apart: per client its ``queued``
  position and its three times.
* ``disconnect`` (on the same server as ``model``): a client asks a long question and
  closes its socket after its first text event, after its first decode event (a citation
  verdict, a rollback or text: the prompt has been evaluated), or ``--leave-at`` s after
  its connect (default: half the question's solo time to done: usually inside the prompt's
  evaluation); (a) alone: the time from the close until ``/health`` says ``answering: 0``;
  (b) a request sent right after the close: its first text and done against the solo
  baseline of the same question. ``--disconnect-repeats`` rounds of the six.

Progress goes to stderr, Markdown tables to stdout; the exit status is 1 on any error.

    python benchmarks/serve_load.py [--parts mock,mock-disconnect,model,disconnect]
        [--mock-clients 500] [--model-clients 8] [--json out.json]

Only the standard library, the library and its ``serve`` extra (FastAPI, uvicorn) are used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"

MOCK_SOURCES = [
    {
        "title": "Eiffel Tower",
        "text": "The Eiffel Tower in Paris was completed in 1889 for the World's Fair. "
        "It is 330 metres tall.",
    },
    {
        "title": "Gustave Eiffel",
        "text": "Gustave Eiffel's company designed and built the tower; the design was by "
        "Maurice Koechlin and Emile Nouguier.",
    },
    {
        "title": "Visitors",
        "text": "The tower receives about seven million visitors a year, making it the most "
        "visited paid monument in the world.",
    },
    {
        "title": "Paint",
        "text": "The tower is repainted every seven years, which takes about 60 tonnes of paint.",
    },
]
MOCK_ANSWERS = [
    "The Eiffel Tower was completed in 1889 for the World's Fair [1]. "
    "It was built by Gustave Eiffel's company [2]. "
    "The tower receives about seven million visitors a year [3]. "
    "The tower is repainted every seven years [4].",
    "The Eiffel Tower in Paris is 330 metres tall [1]. "
    "The design was by Maurice Koechlin and Emile Nouguier [2]. "
    "It is the most visited paid monument in the world [3]. "
    "Repainting the tower takes about 60 tonnes of paint [4].",
    "Gustave Eiffel's company designed and built the tower [2]. "
    "It was completed in 1889 for the World's Fair [1]. "
    "About seven million visitors a year make it the most visited paid monument [3]. "
    "The tower is repainted every seven years [4].",
]
MOCK_QUESTION = "What should I know about the Eiffel Tower?"

MODEL_QUESTIONS = [
    "When was the Eiffel Tower built?",
    "How tall is the Eiffel Tower?",
    "What do honey bees make from nectar?",
    "Where does photosynthesis take place in plants?",
    "How long is the Great Wall of China?",
    "Who described the waggle dance of bees?",
    "Which dynasty built the most famous parts of the Great Wall?",
    "Why do leaves look green?",
]
BASELINE_QUESTION = "When was the Eiffel Tower built?"
LONG_QUESTION = "How does photosynthesis work and why does it matter for life on Earth?"
LONG_QUESTION_2 = "How do honey bees live, make honey and tell each other where food is?"
"""Asked by a client that leaves just before a request: never the same prompt twice in a
row (the local backend reuses the whole KV cache for a repeated prompt, and skips the
prefill that every other request pays)."""
TEXT = frozenset({"text"})
DECODE = frozenset({"citation_accepted", "citation_rejected", "rollback", "text"})
"""Events that only the decode sends (after the prompt is evaluated)."""


def raise_fd_limit() -> int:
    """The soft limit on open files raised to the hard one (every client is a socket)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


# --- the mock server (this script in --serve-mock mode) ---------------------------------


def serve_mock(args: argparse.Namespace) -> None:
    import uvicorn

    from citebacktrack import Citeformer, MockBackend
    from citebacktrack.serve import Limits, create_app

    raise_fd_limit()
    answers = [MOCK_ANSWERS[i % len(MOCK_ANSWERS)] for i in range(args.answers)]
    limits = Limits(max_concurrent=args.max_concurrent, max_queue=args.max_queue)
    app = create_app(Citeformer(MockBackend(answers)), limits=limits, backend_name="mock")
    uvicorn.run(app, host=HOST, port=args.port, log_level="warning", backlog=4096)


# --- the client ------------------------------------------------------------------------


@dataclass
class Stream:
    """One streaming request, as its client saw it (times in s from the start of connect)."""

    question: str
    started_at: float = 0.0
    """perf_counter at the start of connect (for ordering)."""
    status: int = 0
    first_event: float | None = None
    first_text: float | None = None
    done: float | None = None
    closed_at: float | None = None
    """When the client closed the socket on purpose (after its first text)."""
    error: str | None = None
    events: dict[str, int] = field(default_factory=dict)
    timeline: list[tuple[str, float]] = field(default_factory=list)
    """Every event's type and arrival time."""
    queued_ahead: int | None = None
    text: str = ""
    citations: int = 0
    done_before_close: bool = False
    """The client meant to leave mid-stream, but done had already arrived."""


class MalformedError(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise MalformedError(f"bad status line {status_line[:80]!r}")
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            break
        if not line:
            raise MalformedError("connection closed inside the headers")
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _body_chunks(
    reader: asyncio.StreamReader, headers: dict[str, str]
) -> AsyncIterator[bytes]:
    """The response body as it arrives (chunked, by Content-Length, or to EOF)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise MalformedError("connection closed inside the chunked body")
            size = int(size_line.split(b";")[0].strip() or b"x", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            chunk = await reader.readexactly(size)
            await reader.readexactly(2)
            yield chunk
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while chunk := await reader.read(65536):
            yield chunk


def _request(port: int, method: str, path: str, body: bytes = b"") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n"
        + (
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\n"
            if method == "POST"
            else ""
        )
        + "\r\n"
    )
    return head.encode() + body


async def get_json(port: int, path: str, timeout: float = 10.0) -> tuple[int, Any]:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(_request(port, "GET", path))
            await writer.drain()
            status, headers = await _read_head(reader)
            body = b"".join([chunk async for chunk in _body_chunks(reader, headers)])
            return status, json.loads(body)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class _LeaveError(Exception):
    """The client closed its socket on purpose."""


async def stream_answer(
    port: int,
    payload: dict[str, Any],
    *,
    timeout: float,
    leave_on: frozenset[str] = frozenset(),
    leave_at: float | None = None,
    expected: Sequence[str] | None = None,
    expected_citations: int | None = None,
) -> Stream:
    """One streaming answer, every frame checked; never raises (errors are recorded).

    ``leave_on``: close the socket once an event of one of these types is read;
    ``leave_at``: close it this many seconds after the connect, whatever has arrived
    (unless done came first)."""
    result = Stream(question=payload["question"])
    body = json.dumps({**payload, "stream": True}).encode()
    t0 = result.started_at = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    kinds: list[str] = []
    done_answer: dict[str, Any] | None = None

    async def read_events(reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
        nonlocal done_answer
        buffer = b""
        async for chunk in _body_chunks(reader, headers):
            buffer += chunk
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                kind, data = _parse_frame(frame)
                now = time.perf_counter() - t0
                if result.first_event is None:
                    result.first_event = now
                if kinds and kinds[-1] == "done":
                    raise MalformedError(f"{kind} after done")
                kinds.append(kind)
                result.events[kind] = result.events.get(kind, 0) + 1
                result.timeline.append((kind, round(now, 4)))
                if kind == "error":
                    raise MalformedError(f"error event: {json.dumps(data)[:160]}")
                if kind == "queued":
                    result.queued_ahead = int(data["ahead"])
                elif kind == "text":
                    result.text += data["text"]
                    if result.first_text is None:
                        result.first_text = now
                elif kind == "done":
                    result.done = now
                    done_answer = data["answer"]
            if not leave_on.isdisjoint(kinds):
                result.done_before_close = result.done is not None
                raise _LeaveError
        if buffer.strip():
            raise MalformedError(f"an unfinished frame at the end: {buffer[:80]!r}")

    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(_request(port, "POST", "/v1/answers", body))
            await writer.drain()
            result.status, headers = await _read_head(reader)
            if result.status != 200:
                rest = b"".join([chunk async for chunk in _body_chunks(reader, headers)])
                result.error = f"HTTP {result.status}: {rest[:120].decode(errors='replace')}"
                return result
            try:
                if leave_at is None:
                    await read_events(reader, headers)
                else:
                    try:
                        async with asyncio.timeout(max(leave_at - (time.perf_counter() - t0), 0)):
                            await read_events(reader, headers)
                    except TimeoutError:
                        raise _LeaveError from None
            except _LeaveError:
                sock = writer.get_extra_info("socket")
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                result.closed_at = time.perf_counter() - t0
                return result
            if leave_at is not None:
                result.done_before_close = True
            if not kinds or kinds[0] != "started":
                raise MalformedError(f"the first event is {kinds[:1]}, not started")
            if done_answer is None:
                raise MalformedError(f"no done event (events: {result.events})")
            if result.text != done_answer["text"]:
                raise MalformedError("the text events do not add up to the done answer's text")
            result.citations = len(done_answer.get("citations", []))
            if expected is not None and done_answer["text"] not in expected:
                raise MalformedError(f"unexpected answer {done_answer['text'][:80]!r}")
            if expected_citations is not None and result.citations != expected_citations:
                raise MalformedError(f"{result.citations} citations, not {expected_citations}")
    except MalformedError as exc:
        result.error = f"malformed: {exc}"
    except TimeoutError:
        result.error = f"timeout after {timeout:g} s"
    except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {str(exc)[:120]}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return result


def _parse_frame(frame: bytes) -> tuple[str, dict[str, Any]]:
    lines = frame.decode("utf-8").split("\n")
    if len(lines) != 2 or not lines[0].startswith("event: ") or not lines[1].startswith("data: "):
        raise MalformedError(f"not an event/data frame: {frame[:80]!r}")
    kind = lines[0][len("event: ") :]
    data = json.loads(lines[1][len("data: ") :])
    if not isinstance(data, dict) or data.get("type") != kind:
        raise MalformedError(f"event {kind!r} carries {str(data)[:60]}")
    return kind, data


# --- the server subprocess -------------------------------------------------------------


class Server:
    """A server subprocess on a free port of 127.0.0.1, ready once /health says 200."""

    def __init__(self, command: list[str], port: int, ready_timeout: float) -> None:
        self.port = port
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.ready_timeout = ready_timeout
        self.load_s = 0.0

    async def wait_ready(self) -> None:
        started = time.perf_counter()
        deadline = started + self.ready_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.tail()}")
            with contextlib.suppress(OSError, MalformedError, ValueError, TimeoutError):
                status, _ = await get_json(self.port, "/health", timeout=5)
                if status == 200:
                    self.load_s = time.perf_counter() - started
                    return
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the server was not ready in time:\n{self.tail()}")
            await asyncio.sleep(0.2)

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:].decode(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


# --- measurements ----------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Run:
    """One batch of concurrent clients."""

    part: str
    clients: int
    limits: str
    wall_s: float
    streams: list[Stream]
    load_before: float
    load_after: float
    notes: list[str] = field(default_factory=list)

    def errors(self) -> list[str]:
        return [s.error for s in self.streams if s.error is not None]


def _times(streams: Sequence[Stream], name: str) -> list[float]:
    return [getattr(s, name) for s in streams if getattr(s, name) is not None]


def _pct(values: Sequence[float]) -> str:
    if not values:
        return "—"
    return f"{percentile(values, 50):.3f} / {percentile(values, 99):.3f} / {max(values):.3f}"


async def _health_until_idle(port: int, timeout: float = 30.0) -> tuple[float | None, int]:
    """Seconds until /health says answering == 0 (polled every 10 ms), and the polls."""
    started = time.perf_counter()
    polls = 0
    while time.perf_counter() - started < timeout:
        polls += 1
        _, health = await get_json(port, "/health")
        if health["answering"] == 0:
            return time.perf_counter() - started, polls
        await asyncio.sleep(0.01)
    return None, polls


async def _answering(port: int, samples: list[tuple[float, int]]) -> None:
    """/health's answering, polled every 20 ms until cancelled: (perf_counter, count)."""
    while True:
        with contextlib.suppress(OSError, MalformedError, ValueError, TimeoutError):
            _, health = await get_json(port, "/health")
            samples.append((time.perf_counter(), int(health["answering"])))
        await asyncio.sleep(0.02)


def _release(follower: Stream, samples: list[tuple[float, int]]) -> float | None:
    """When the leaving answer let go: the first sample after the follower's started event
    (it is admitted by then) that counts only the follower; 0 if it never waited."""
    if follower.queued_ahead is None:
        return 0.0
    if follower.first_event is None:
        return None
    admitted = follower.started_at + follower.first_event
    for at, count in samples:
        if at >= admitted and count <= 1:
            return at - follower.started_at
    return None


async def mock_part(args: argparse.Namespace, *, disconnect: bool, concurrent: str) -> Run:
    n = args.mock_clients
    max_concurrent = n if concurrent == "all" else int(concurrent)
    max_queue = n if args.mock_max_queue is None else args.mock_max_queue
    port = free_port()
    command = [
        sys.executable,
        __file__,
        "--serve-mock",
        "--port",
        str(port),
        "--answers",
        str(n + 10),
        "--max-concurrent",
        str(max_concurrent),
        "--max-queue",
        str(max_queue),
    ]
    part = "mock-disconnect" if disconnect else "mock"
    print(f"{part}: starting the mock server on {HOST}:{port} ...", file=sys.stderr)
    server = Server(command, port, ready_timeout=120)
    try:
        await server.wait_ready()
        payload = {"question": MOCK_QUESTION, "sources": MOCK_SOURCES}
        check: dict[str, Any] = {"expected": MOCK_ANSWERS, "expected_citations": 4}
        warm = await stream_answer(port, payload, timeout=args.timeout, **check)  # untimed
        if warm.error:
            raise RuntimeError(f"the warm-up answer failed: {warm.error}")
        print(f"{part}: {n} clients at once ...", file=sys.stderr)
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        streams = await asyncio.gather(
            *(
                stream_answer(
                    port,
                    payload,
                    timeout=args.timeout,
                    leave_on=TEXT if disconnect and i % 2 == 1 else frozenset(),
                    **check,
                )
                for i in range(n)
            )
        )
        wall = time.perf_counter() - started
        run = Run(
            part,
            n,
            f"max_concurrent={max_concurrent}, max_queue={max_queue}",
            wall,
            list(streams),
            load_before,
            os.getloadavg()[0],
        )
        idle_s, polls = await _health_until_idle(port)
        run.notes.append(
            f"/health answering 0 after the last client: "
            f"{'never (30 s)' if idle_s is None else f'{idle_s * 1000:.0f} ms'} ({polls} polls)"
        )
        after = await stream_answer(port, payload, timeout=args.timeout, **check)
        run.notes.append(
            "one more request afterwards: "
            + ("served" if after.error is None else f"FAILED ({after.error})")
        )
        if after.error is not None:
            after.question = "(the request afterwards)"
            run.streams.append(after)
        if disconnect:
            left = [s for s in streams if s.closed_at is not None]
            late = [s for s in left if s.done_before_close]
            run.notes.append(
                f"{len(left)} clients closed after their first text "
                f"({len(late)} of them had already received done: the answer was complete)"
            )
        if server.process.poll() is not None:
            run.notes.append(f"the server exited: {server.process.returncode}")
        return run
    finally:
        server.stop()


@dataclass
class Disconnect:
    """A client that left mid-answer, and what came after."""

    leave: str
    """When it left: "first text", or "at N s" after its connect."""
    leaving: Stream
    idle_s: float | None = None
    """Alone: seconds from its close until /health said answering == 0."""
    follower: Stream | None = None
    """Or the request sent right after its close."""
    release_s: float | None = None
    """With a follower: seconds from the follower's connect (right after the close) until
    the leaving answer was released (gone from /health's count while the follower waited);
    0 when it was gone before the follower was admitted."""


@dataclass
class ModelRuns:
    load_s: float
    solo: dict[str, list[Stream]]
    queue: Run
    leave_at: float
    disconnects: list[Disconnect]


async def model_part(args: argparse.Namespace, parts: set[str]) -> ModelRuns:
    port = free_port()
    cli = Path(sys.executable).with_name("citebacktrack")
    command = [str(cli), "serve", "--port", str(port)]
    print(f"model: {' '.join(command[1:])} (loading the embedded model) ...", file=sys.stderr)
    server = Server(command, port, ready_timeout=300)
    try:
        await server.wait_ready()
        _, health = await get_json(port, "/health")
        print(f"model: ready in {server.load_s:.1f} s: {health}", file=sys.stderr)

        async def ask(question: str, **kwargs: Any) -> Stream:
            return await stream_answer(
                port, {"question": question, "k": args.k}, timeout=args.timeout, **kwargs
            )

        warm = await ask(MODEL_QUESTIONS[-1])
        if warm.error:
            raise RuntimeError(f"the warm-up answer failed: {warm.error}")
        solo: dict[str, list[Stream]] = {
            BASELINE_QUESTION: [],
            LONG_QUESTION: [],
            LONG_QUESTION_2: [],
        }
        for _ in range(args.solo_repeats):
            for question in solo:
                stream = await ask(question)
                solo[question].append(stream)
                print(
                    f"model: solo {question!r}: first text {stream.first_text} s, "
                    f"done {stream.done} s, {stream.error or 'ok'}",
                    file=sys.stderr,
                )

        queue = Run("model", 0, "", 0.0, [], 0.0, 0.0)
        if "model" in parts:
            n = args.model_clients
            print(f"model: {n} clients, {args.stagger:g} s apart ...", file=sys.stderr)
            load_before = os.getloadavg()[0]
            started = time.perf_counter()

            async def client(i: int) -> Stream:
                await asyncio.sleep(i * args.stagger)
                return await ask(MODEL_QUESTIONS[i % len(MODEL_QUESTIONS)])

            streams = await asyncio.gather(*(client(i) for i in range(n)))
            queue = Run(
                "model",
                n,
                "defaults: max_concurrent=1, max_queue=32",
                time.perf_counter() - started,
                list(streams),
                load_before,
                os.getloadavg()[0],
            )

        long_done = _times(solo[LONG_QUESTION], "done")
        leave_at = args.leave_at or max(percentile(long_done, 50) / 2, 1.0)
        disconnects: list[Disconnect] = []
        if "disconnect" in parts:
            ways: list[tuple[str, dict[str, Any]]] = [
                ("first text", {"leave_on": TEXT}),
                ("first decode event", {"leave_on": DECODE}),
                (f"at {leave_at:.1f} s", {"leave_at": leave_at}),
            ]
            for _ in range(args.disconnect_repeats):
                for leave, how in ways:
                    leaving = await ask(LONG_QUESTION, **how)
                    idle_s, _ = await _health_until_idle(port)
                    disconnects.append(Disconnect(leave, leaving, idle_s=idle_s))
                    print(
                        f"disconnect ({leave}), alone: closed at {leaving.closed_at} s, "
                        f"answering 0 after {idle_s} s",
                        file=sys.stderr,
                    )
                    leaving = await ask(LONG_QUESTION_2, **how)
                    samples: list[tuple[float, int]] = []
                    watch = asyncio.create_task(_answering(port, samples))
                    follower = await ask(BASELINE_QUESTION)
                    watch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watch
                    disconnects.append(
                        Disconnect(
                            leave,
                            leaving,
                            follower=follower,
                            release_s=_release(follower, samples),
                        )
                    )
                    print(
                        f"disconnect ({leave}), then a request: closed at {leaving.closed_at} s; "
                        f"first text {follower.first_text} s, done {follower.done} s, "
                        f"queued {follower.queued_ahead}, {follower.error or 'ok'}",
                        file=sys.stderr,
                    )
                    await _health_until_idle(port)
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited:\n{server.tail()}")
        return ModelRuns(server.load_s, solo, queue, leave_at, disconnects)
    finally:
        server.stop()


# --- the report ------------------------------------------------------------------------


def summary_row(run: Run) -> str:
    ok = [s for s in run.streams if s.error is None]
    full = [s for s in ok if s.closed_at is None]
    queued = sum(1 for s in run.streams if s.events.get("queued"))
    return (
        f"| {run.part} | {run.clients} | {run.limits} | {len(run.errors())} | "
        f"{run.wall_s:.2f} | {_pct(_times(ok, 'first_event'))} | "
        f"{_pct(_times(ok, 'first_text'))} | {_pct(_times(full, 'done'))} | {queued} | "
        f"{run.load_before:.1f} → {run.load_after:.1f} |"
    )


def print_summary(runs: Sequence[Run]) -> None:
    print(
        "| part | clients | limits | errors | wall s | first event s p50 / p99 / max "
        "| first text s p50 / p99 / max | done s p50 / p99 / max | saw queued | load |"
    )
    print("|---|---:|---|---:|---:|---|---|---|---:|---|")
    for run in runs:
        print(summary_row(run))
    for run in runs:
        for note in run.notes:
            print(f"\n* {run.part}: {note}")
        for error, count in Counter(run.errors()).most_common(10):
            print(f"\n* {run.part}: {count} × {error}")


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def print_model(runs: ModelRuns) -> None:
    print(f"\nModel loaded (``/health`` 200) {runs.load_s:.1f} s after the process started.\n")
    print("Solo baselines (one request at a time, after an untimed warm-up):\n")
    print("| question | run | first event s | first text s | done s | text events | error |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for question, streams in runs.solo.items():
        for i, s in enumerate(streams, 1):
            print(
                f"| {question} | {i} | {_s(s.first_event)} | {_s(s.first_text)} | "
                f"{_s(s.done)} | {s.events.get('text', 0)} | {s.error or ''} |"
            )
    queue = runs.queue
    if queue.streams:
        base = min(s.started_at for s in queue.streams)
        served = sorted(
            (s for s in queue.streams if s.first_text is not None),
            key=lambda s: s.first_text or 0.0,
        )
        rank = {id(s): i for i, s in enumerate(served, 1)}
        print(
            f"\n{queue.clients} clients, {_spacing(queue)}; times from each client's own "
            "connect (the start offset is when it connected):\n"
        )
        print(
            "| client | start s | question | queued ahead | served | first event s "
            "| first text s | done s | text events | citations | error |"
        )
        print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for i, s in enumerate(queue.streams, 1):
            ahead = "—" if s.queued_ahead is None else str(s.queued_ahead)
            print(
                f"| {i} | {s.started_at - base:.2f} | {s.question} | {ahead} | "
                f"{rank.get(id(s), '—')} | {_s(s.first_event)} | {_s(s.first_text)} | "
                f"{_s(s.done)} | {s.events.get('text', 0)} | {s.citations} | {s.error or ''} |"
            )
        by_position = sorted(queue.streams, key=lambda s: s.queued_ahead or 0)
        texts = [s.first_text for s in by_position]
        grows = all(
            a is not None and b is not None and a <= b for a, b in itertools.pairwise(texts)
        )
        print(
            f"\nFirst text grows with the queued position: {'yes' if grows else 'NO'}; "
            f"saw queued: {sum(1 for s in queue.streams if s.events.get('queued'))}"
            f"/{queue.clients}; wall {queue.wall_s:.1f} s; load {queue.load_before:.1f} → "
            f"{queue.load_after:.1f}."
        )
    if runs.disconnects:
        print_disconnects(runs)


def _list(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def print_disconnects(runs: ModelRuns) -> None:
    solo_text = _times(runs.solo[BASELINE_QUESTION], "first_text")
    solo_done = _times(runs.solo[BASELINE_QUESTION], "done")
    long = runs.solo[LONG_QUESTION]
    print(
        "\nDisconnects: a client asks a long question and closes its socket after its first "
        "text event, after its first decode event (a citation verdict, a rollback or text: "
        f"the prompt has been read), or {runs.leave_at:.1f} s after its connect. Alone "
        f"({LONG_QUESTION!r}; solo: first text {_list(_times(long, 'first_text'))} s, "
        f"done {_list(_times(long, 'done'))} s): the time from its "
        "close until /health says answering 0 (polled every 10 ms):\n"
    )
    print("| leaves | closed at s | events read | answering 0 after the close s | error |")
    print("|---|---:|---|---:|---|")
    for d in runs.disconnects:
        if d.follower is not None:
            continue
        s = d.leaving
        closed = "done came first" if s.closed_at is None else _s(s.closed_at)
        read = ", ".join(f"{k} {v}" for k, v in s.events.items())
        freed = "never" if d.idle_s is None else f"{d.idle_s:.3f}"
        print(f"| {d.leave} | {closed} | {read} | {freed} | {s.error or ''} |")
    print(
        f"\nThen the client asks {LONG_QUESTION_2!r} (solo: done "
        f"{_list(_times(runs.solo[LONG_QUESTION_2], 'done'))} s), leaves the same way, and a "
        f"request for {BASELINE_QUESTION!r} is sent right after the close, against the same "
        f"request alone (first text {_list(solo_text)} s; done {_list(solo_done)} s):\n"
    )
    print(
        "| leaves | closed at s | events read | next: queued ahead | model free after s "
        "| next: first text s | × solo first text (median) | next: first text after the "
        "model was free s | next: done s | error |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    median_text = statistics.median(solo_text) if solo_text else math.nan
    for d in runs.disconnects:
        follower = d.follower
        if follower is None:
            continue
        ratio = "—" if follower.first_text is None else f"{follower.first_text / median_text:.2f}"
        ahead = "—" if follower.queued_ahead is None else str(follower.queued_ahead)
        closed = "done came first" if d.leaving.closed_at is None else _s(d.leaving.closed_at)
        read = ", ".join(f"{k} {v}" for k, v in d.leaving.events.items())
        released = "—" if d.release_s is None else f"{d.release_s:.2f}"
        own = (
            "—"
            if follower.first_text is None or d.release_s is None
            else f"{follower.first_text - d.release_s:.2f}"
        )
        print(
            f"| {d.leave} | {closed} | {read} | {ahead} | {released} | "
            f"{_s(follower.first_text)} | {ratio} | {own} | {_s(follower.done)} | "
            f"{d.leaving.error or follower.error or ''} |"
        )


def _spacing(run: Run) -> str:
    starts = sorted(s.started_at for s in run.streams)
    gap = (starts[-1] - starts[0]) / max(len(starts) - 1, 1)
    return f"started {gap:.2f} s apart"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--parts", default="mock,mock-disconnect,model,disconnect", help="comma-separated"
    )
    parser.add_argument("--mock-clients", type=int, default=500)
    parser.add_argument(
        "--mock-max-concurrent",
        default="all,8",
        help="answers decoded at once by the mock server, one run per value (all: the client "
        "count)",
    )
    parser.add_argument("--mock-max-queue", type=int, help="default: the client count")
    parser.add_argument("--model-clients", type=int, default=8)
    parser.add_argument("--stagger", type=float, default=0.1, help="s between model clients")
    parser.add_argument("--k", type=int, default=3, help="passages per model request")
    parser.add_argument("--solo-repeats", type=int, default=2)
    parser.add_argument("--disconnect-repeats", type=int, default=3)
    parser.add_argument(
        "--leave-at",
        type=float,
        help="s after its connect a mid-answer disconnect closes (default: half the long "
        "question's solo time to done)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="s per request")
    parser.add_argument("--json", help="write every stream here")
    parser.add_argument("--serve-mock", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--answers", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--max-concurrent", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--max-queue", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_mock:
        serve_mock(args)
        return 0

    fd_limit = raise_fd_limit()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    print("# `citebacktrack serve` under load (loopback, streaming clients)\n")
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"open-file limit {fd_limit}, load average {os.getloadavg()[0]:.2f} at the start. "
        "Times in seconds from each client's connect; p99 is the nearest rank.\n"
    )
    runs: list[Run] = []
    for part in ("mock", "mock-disconnect"):
        for concurrent in args.mock_max_concurrent.split(","):
            if part in parts:
                disconnect = part == "mock-disconnect"
                run = mock_part(args, disconnect=disconnect, concurrent=concurrent.strip())
                runs.append(asyncio.run(run))
    model: ModelRuns | None = None
    if parts & {"model", "disconnect"}:
        model = asyncio.run(model_part(args, parts))
        if model.queue.streams:
            runs.append(model.queue)
    if runs:
        print_summary(runs)
    if model is not None:
        print_model(model)
    print(f"\nLoad average {os.getloadavg()[0]:.2f} at the end.")
    failures = [e for run in runs for e in run.errors()]
    if model is not None:
        for streams in model.solo.values():
            failures += [s.error for s in streams if s.error]
        for d in model.disconnects:
            failures += [s.error for s in (d.leaving, d.follower) if s and s.error]
            if d.follower is None and d.idle_s is None:
                failures.append("answering never dropped to 0")
    if args.json:
        payload: dict[str, Any] = {"runs": [asdict(run) for run in runs]}
        if model is not None:
            payload["model"] = asdict(model)
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
