"""``citebacktrack serve`` (issue 21): a real uvicorn server on 127.0.0.1, spoken to over
real sockets. The model is scripted here (MockBackend, or the slow scripted model of
``test_cancellation``); the embedded model behind the CLI command is the slow test at the
end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from citebacktrack import Citeformer, MockBackend
from citebacktrack.retrieval import sample_docs_path
from citebacktrack.serve import Limits, create_app
from serving import RunningServer
from test_cancellation import LONG, SHORT, SlowBackend

SOURCES = [
    {"title": "Eiffel Tower", "text": "The Eiffel Tower was completed in 1889."},
    {"title": "Photosynthesis", "text": "Plants store the energy of light in sugars."},
]
QUESTION = "When was the Eiffel Tower completed?"
SCRIPT = "The Eiffel Tower was completed in 1889 [1]."


def serve(cf: Citeformer, **kwargs: object) -> RunningServer:
    server = RunningServer(create_app(cf, **kwargs))  # type: ignore[arg-type]
    server.wait_ready()
    return server


@pytest.fixture
def mock_server() -> Iterator[RunningServer]:
    server = serve(Citeformer(MockBackend([SCRIPT] * 20)), documents=sample_docs_path())
    yield server
    server.stop()


def test_json_answer_over_the_sources_sent(mock_server: RunningServer) -> None:
    reply = mock_server.post("/v1/answers", {"question": QUESTION, "sources": SOURCES})
    assert reply.status == 200, reply.body
    payload = reply.json()
    assert payload["answer"]["text"] == SCRIPT
    [citation] = payload["answer"]["citations"]
    assert citation["source_index"] == 1
    assert citation["evidence"]["text"] == "The Eiffel Tower was completed in 1889."
    assert [s["title"] for s in payload["sources"]] == ["Eiffel Tower", "Photosynthesis"]


def test_without_sources_the_served_documents_are_searched(mock_server: RunningServer) -> None:
    reply = mock_server.post("/v1/answers", {"question": "How tall is the Eiffel Tower?", "k": 3})
    assert reply.status == 200, reply.body
    sources = reply.json()["sources"]
    assert len(sources) == 3
    assert "Eiffel" in sources[0]["title"] + sources[0]["text"]


def test_stream_is_server_sent_events_started_first_done_last(
    mock_server: RunningServer,
) -> None:
    stream = mock_server.open_stream({"question": QUESTION, "sources": SOURCES})
    assert stream.status == 200
    assert stream.response.getheader("Content-Type", "").startswith("text/event-stream")
    events = list(stream)
    stream.close()
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "started"
    assert kinds[-1] == "done"
    assert [s["title"] for s in events[0][1]["sources"]] == ["Eiffel Tower", "Photosynthesis"]
    text = "".join(data["text"] for kind, data in events if kind == "text")
    assert text == events[-1][1]["answer"]["text"] == SCRIPT
    # The citation is announced before the text that holds its marker.
    assert kinds.index("citation_accepted") < max(i for i, k in enumerate(kinds) if k == "text")


def test_health_and_openapi(mock_server: RunningServer) -> None:
    health = mock_server.get("/health")
    assert health.status == 200
    assert health.json()["status"] == "ok"
    assert health.json()["passages"] > 0
    schema = mock_server.get("/openapi.json").json()
    post = schema["paths"]["/v1/answers"]["post"]
    assert "AnswerRequest" in json.dumps(post["requestBody"])
    assert "AnswerRequest" in schema["components"]["schemas"]
    assert mock_server.get("/").body.startswith(b"<!doctype html>")


BAD_INPUT = [
    ("malformed JSON", b'{"question": "When', 400, "malformed_json"),
    ("wrong type", {"question": 5, "sources": SOURCES}, 422, "invalid_request"),
    ("source of the wrong shape", {"question": QUESTION, "sources": [7]}, 422, "invalid_request"),
    ("unknown field", {"question": QUESTION, "source": SOURCES}, 422, "invalid_request"),
    ("empty question", {"question": "", "sources": SOURCES}, 422, "invalid_request"),
    ("no sources", {"question": QUESTION, "sources": []}, 422, "invalid_request"),
    (
        "thousands of sources",
        {"question": QUESTION, "sources": [{"text": f"fact {i}"} for i in range(5000)]},
        422,
        "invalid_request",
    ),
    (
        "duplicate source ids",
        {"question": QUESTION, "sources": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]},
        422,
        "invalid_sources",
    ),
    (
        "a 50 MB body",
        b'{"question": "' + b"x" * (50 * 1024 * 1024) + b'"}',
        413,
        "payload_too_large",
    ),
    (
        "unknown backend",
        {"question": QUESTION, "sources": SOURCES, "backend": "gpt9"},
        400,
        "unknown_backend",
    ),
    (
        "too many tokens",
        {"question": QUESTION, "sources": SOURCES, "max_new_tokens": 10**6},
        422,
        "invalid_request",
    ),
    (
        "unknown policy",
        {"question": QUESTION, "sources": SOURCES, "policy": "sometimes"},
        422,
        "invalid_request",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
def test_bad_input_gets_a_typed_4xx_and_the_server_keeps_serving(
    mock_server: RunningServer, body: object, status: int, kind: str
) -> None:
    reply = mock_server.post("/v1/answers", body)
    assert reply.status == status, reply.body[:300]
    error = reply.json()["error"]
    assert error["type"] == kind
    assert error["message"]
    assert "Traceback" not in error["message"]
    good = mock_server.post("/v1/answers", {"question": QUESTION, "sources": SOURCES})
    assert good.status == 200


def test_a_wrong_type_names_the_field(mock_server: RunningServer) -> None:
    error = mock_server.post("/v1/answers", {"question": QUESTION, "sources": [{"txt": "x"}]})
    fields = {f["field"] for f in error.json()["error"]["fields"]}
    assert "sources.0.text" in fields


def test_unknown_paths_and_methods_are_typed_json(mock_server: RunningServer) -> None:
    missing = mock_server.get("/v2/answers")
    assert missing.status == 404
    assert missing.json()["error"]["type"] == "not_found"
    wrong = mock_server.get("/v1/answers")
    assert wrong.status == 405
    assert wrong.json()["error"]["type"] == "method_not_allowed"


def test_past_capacity_a_request_gets_429_with_retry_after() -> None:
    backend = SlowBackend(LONG, SHORT)
    server = serve(Citeformer(backend), limits=Limits(max_concurrent=1, max_queue=0))
    try:
        busy = server.open_stream({"question": QUESTION, "sources": SOURCES})
        events = iter(busy)
        assert next(events)[0] == "started"
        refused = server.post("/v1/answers", {"question": QUESTION, "sources": SOURCES})
        assert refused.status == 429
        assert refused.headers.get("retry-after") == "1"
        assert refused.json()["error"]["type"] == "overloaded"
        busy.close()
        _until(lambda: server.get("/health").json()["answering"] == 0)
        served = server.post("/v1/answers", {"question": QUESTION, "sources": SOURCES})
        assert served.status == 200, served.body
    finally:
        server.stop()


def test_waiting_streams_are_told_how_many_are_ahead_in_serving_order() -> None:
    backend = SlowBackend(LONG, SHORT, SHORT)
    server = serve(Citeformer(backend), limits=Limits(max_concurrent=1, max_queue=2))
    try:
        first = server.open_stream({"question": QUESTION, "sources": SOURCES})
        first_events = iter(first)
        assert next(first_events)[0] == "started"
        assert next(first_events)[0] in ("citation_accepted", "text")  # it holds the model
        waiting = [server.open_stream({"question": QUESTION, "sources": SOURCES}) for _ in "ab"]
        told = []
        for stream in waiting:
            events = iter(stream)
            assert next(events)[0] == "started"
            kind, data = next(events)
            told.append((kind, data["ahead"]))
        assert told == [("queued", 1), ("queued", 2)]
        first.close()  # the waiting ones then get the model, in order
        for stream in waiting:
            rest = list(stream)
            assert rest[-1][0] == "done"
            assert rest[-1][1]["answer"]["text"] == SHORT
            stream.close()
    finally:
        server.stop()


@pytest.mark.parametrize("streaming", [True, False], ids=["SSE", "JSON"])
def test_a_client_that_goes_away_stops_the_decode(streaming: bool) -> None:
    """Starlette's client disconnect: the decode stops within a step, the model is free."""
    backend = SlowBackend(LONG, SHORT)
    server = serve(Citeformer(backend))
    try:
        if streaming:
            stream = server.open_stream({"question": QUESTION, "sources": SOURCES})
            events = iter(stream)
            next(events)
            next(events)
            stream.close()
        else:
            conn = server.connection()
            conn.request(
                "POST",
                "/v1/answers",
                body=json.dumps({"question": QUESTION, "sources": SOURCES}),
                headers={"Content-Type": "application/json"},
            )
            _until(lambda: bool(backend.runtimes) and backend.runtimes[0].passes > 3)
            conn.sock.shutdown(2)  # type: ignore[union-attr]
            conn.close()
        _until(lambda: server.get("/health").json()["answering"] == 0)
        runtime = backend.runtimes[0]
        passes = runtime.passes
        time.sleep(0.3)
        assert runtime.passes == passes, "the abandoned decode kept running"
        assert passes < 200
        started = time.monotonic()
        served = server.post("/v1/answers", {"question": QUESTION, "sources": SOURCES})
        assert served.status == 200
        assert served.json()["answer"]["text"] == SHORT
        assert time.monotonic() - started < 5
        assert not [t for t in threading.enumerate() if t.name.startswith("citebacktrack")]
    finally:
        server.stop()


def test_requests_while_the_model_loads_get_503(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def loader() -> MockBackend:
        release.wait(10)
        return MockBackend([SCRIPT])

    monkeypatch.setattr("citebacktrack.orchestrator._default_backend", loader)
    server = RunningServer(create_app(Citeformer()))
    try:
        assert server.get("/health").status == 503
        assert server.get("/health").json()["status"] == "loading"
        early = server.post("/v1/answers", {"question": QUESTION, "sources": SOURCES})
        assert early.status == 503
        assert early.json()["error"]["type"] == "loading"
        assert early.headers.get("retry-after")
        release.set()
        server.wait_ready()
        assert server.post("/v1/answers", {"question": QUESTION, "sources": SOURCES}).status == 200
    finally:
        release.set()
        server.stop()


def test_an_error_mid_stream_is_an_error_event() -> None:
    server = serve(Citeformer(MockBackend([])))  # no scripted answer: the backend fails
    try:
        stream = server.open_stream({"question": QUESTION, "sources": SOURCES})
        events = list(stream)
        stream.close()
        assert events[0][0] == "started"
        kind, data = events[-1]
        assert kind == "error"
        assert "scripted responses" in data["error"]["message"]
        json_reply = server.post("/v1/answers", {"question": QUESTION, "sources": SOURCES})
        assert json_reply.status >= 400
        assert json_reply.json()["error"]["message"]
    finally:
        server.stop()


def test_sources_required_when_no_documents_are_served() -> None:
    server = serve(Citeformer(MockBackend([SCRIPT])))
    try:
        reply = server.post("/v1/answers", {"question": QUESTION})
        assert reply.status == 422
        assert "send the sources" in reply.json()["error"]["message"]
    finally:
        server.stop()


def _until(condition: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _serve_cli_and_ask(args: list[str], question: str) -> dict[str, object]:
    """``citebacktrack serve ARGS`` in a process, until /health is 200; then one JSON
    answer to ``question`` over the served documents."""
    import http.client

    port = _free_port()
    cli = Path(sys.executable).with_name("citebacktrack")
    process = subprocess.Popen(
        [str(cli), "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            probe = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                probe.request("GET", "/health")
                if probe.getresponse().status == 200:
                    break
            except OSError:
                pass
            finally:
                probe.close()
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.5)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            conn.request(
                "POST",
                "/v1/answers",
                body=json.dumps({"question": question, "k": 3}),
                headers={"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            payload: dict[str, object] = json.loads(response.read())
        finally:
            conn.close()
        assert response.status == 200, payload
        return payload
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.slow
def test_the_readme_command_serves_the_embedded_model() -> None:
    """``citebacktrack serve`` as the README starts it: the embedded model, the sample docs."""
    payload = _serve_cli_and_ask([], "When was the Eiffel Tower built?")
    answer, sources = payload["answer"], payload["sources"]
    assert answer["citations"], answer  # type: ignore[index]
    assert "Eiffel" in sources[0]["text"] + sources[0]["title"]  # type: ignore[index]


@pytest.mark.slow
def test_serve_over_an_openai_compatible_server() -> None:
    """``serve --server-url``: a real llama.cpp server answers, the segment backend checks."""
    from citebacktrack.backends.llamacpp_server import LlamaCppServer

    with LlamaCppServer(n_ctx=4096) as server:
        payload = _serve_cli_and_ask(
            ["--server-url", server.base_url, "--server-model", server.model.stem],
            "When was the Eiffel Tower built?",
        )
    answer, sources = payload["answer"], payload["sources"]
    assert answer["citations"], answer  # type: ignore[index]
    for citation in answer["citations"]:  # type: ignore[index]
        evidence = citation["evidence"]
        cited = sources[citation["source_index"] - 1]  # type: ignore[index]
        assert cited["text"][evidence["start"] : evidence["end"]] == evidence["text"]


@pytest.mark.slow
def test_a_client_leaving_frees_the_embedded_model() -> None:
    """Starlette's client disconnect on the real model: the answer stops, the next one is
    the answer computed alone."""
    from citebacktrack import Budgets
    from citebacktrack.backends.llamacpp import LlamaCppBackend
    from test_cancellation import REAL_QUESTION, REAL_SOURCES

    body = {
        "question": REAL_QUESTION,
        "sources": [{"title": s.title, "text": s.text} for s in REAL_SOURCES],
    }
    with LlamaCppBackend(n_ctx=2048) as backend:
        cf = Citeformer(backend, budgets=Budgets(max_new_tokens=60))
        alone = cf.generate(REAL_QUESTION, REAL_SOURCES).text
        server = serve(cf)
        try:
            for leave_after in (0.2, 1.5):  # in the prompt's evaluation, then in the decode
                stream = server.open_stream(body)
                events = iter(stream)
                assert next(events)[0] == "started"
                time.sleep(leave_after)
                stream.close()
                _until(lambda: server.get("/health").json()["answering"] == 0, timeout=30)
                reply = server.post("/v1/answers", body)
                assert reply.status == 200
                assert reply.json()["answer"]["text"] == alone
        finally:
            server.stop()


def test_no_page_needs_the_network(mock_server: RunningServer) -> None:
    """FastAPI's /docs and /redoc load their scripts from a CDN: they are off (the page at
    / is self-contained, see test_page.py)."""
    assert mock_server.get("/docs").status == 404
    assert mock_server.get("/redoc").status == 404
