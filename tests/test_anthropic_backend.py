"""AnthropicEngine against HTTP-level fakes: the real ``anthropic`` SDK over a mock transport.

Every request goes through the SDK's own client (``httpx2``, the HTTP library it is built
on), so the bodies asserted here are what the Messages API receives, and retries,
``Retry-After``, timeouts, cut streams and error bodies go through the SDK's own code.
Responses have the shape of Anthropic's documented ones (text blocks with
``char_location`` citations, usage, stop_reason; the SSE events of a streamed message).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

anthropic = pytest.importorskip("anthropic")
httpx2 = pytest.importorskip("httpx2")

from citebacktrack._tracker import TextState, advance  # noqa: E402
from citebacktrack.backends.anthropic import (  # noqa: E402
    DEFAULT_SYSTEM,
    AnthropicBackend,
    AnthropicEngine,
)
from citebacktrack.errors import (  # noqa: E402
    BackendClosedError,
    BackendError,
    ConfigurationError,
)
from citebacktrack.segments import SegmentCall, SegmentEngine, SegmentResult  # noqa: E402
from citebacktrack.types import ChatMessage, Evidence, Source  # noqa: E402

API_KEY = "sk-ant-api03-Planted0123456789abcdefSECRET"
BASE_URL = "https://api.anthropic.test"
MODEL = "claude-sonnet-4-6"

EIFFEL = (
    "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was completed in 1889. "
    "It is 330 metres tall."
)
LOUVRE = "The Louvre is the most visited museum in the world. It is in Paris, near the Seine."
SOURCES = (
    Source(title="Eiffel Tower", text=EIFFEL),
    Source(title="Louvre", text=LOUVRE),
)
QUESTION = "When was the Eiffel Tower completed, and how tall is it?"
MESSAGES = (
    ChatMessage("system", "Cite sources as [N]."),
    ChatMessage("user", "Document [1](Title: Eiffel Tower): ...\n\nQuestion: " + QUESTION),
)


def cite(doc: int, quoted: str, *, kind: str = "char_location") -> dict[str, Any]:
    """A citation of ``quoted`` in document ``doc`` (0-based), as the API returns it."""
    text = SOURCES[doc].text if 0 <= doc < len(SOURCES) else quoted
    start = text.index(quoted) if quoted in text else 0
    return {
        "type": kind,
        "cited_text": quoted,
        "document_index": doc,
        "document_title": SOURCES[doc].title if 0 <= doc < len(SOURCES) else None,
        "start_char_index": start,
        "end_char_index": start + len(quoted),
    }


def text(value: str, *citations: dict[str, Any]) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": value}
    if citations:
        block["citations"] = list(citations)
    return block


# The shape of a documented citations answer: uncited glue text between cited blocks,
# each cited block ending mid-sentence, the terminator in a block of its own.
CONTENT = [
    text("According to the documents, "),
    text("the Eiffel Tower was completed in 1889", cite(0, "It was completed in 1889. ")),
    text(". "),
    text("It is 330 metres tall", cite(0, "It is 330 metres tall.")),
    text(", and the Louvre is nearby", cite(1, "It is in Paris, near the Seine.")),
    text("."),
]
EXPECTED = (
    "According to the documents, the Eiffel Tower was completed in 1889 [1]. "
    "It is 330 metres tall, and the Louvre is nearby [1][2]."
)


def message(
    content: list[dict[str, Any]] | None = None,
    *,
    stop_reason: str = "end_turn",
    usage: dict[str, int] | None = None,
    **more: Any,
) -> dict[str, Any]:
    return {
        "id": "msg_01AbCdEf",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": CONTENT if content is None else content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage or {"input_tokens": 1234, "output_tokens": 56},
        **more,
    }


def sse_events(msg: dict[str, Any], *, chunk: int = 7) -> list[dict[str, Any]]:
    """The stream events of ``msg``: deltas of ``chunk`` characters, citations first."""
    usage = msg["usage"]
    start = {**msg, "content": [], "stop_reason": None}
    start["usage"] = {**usage, "output_tokens": 1}  # input counts come first, output last
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}, {"type": "ping"}]
    for index, block in enumerate(msg["content"]):
        opened: dict[str, Any] = {"type": block["type"], "text": ""}
        if "citations" in block:
            opened["citations"] = []
        events.append({"type": "content_block_start", "index": index, "content_block": opened})
        for citation in block.get("citations") or []:
            delta = {"type": "citations_delta", "citation": citation}
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        body = block.get("text", "")
        for i in range(0, len(body), chunk):
            delta = {"type": "text_delta", "text": body[i : i + chunk]}
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        events.append({"type": "content_block_stop", "index": index})
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        }
    )
    events.append({"type": "message_stop"})
    return events


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


Reply = Callable[[Any], Any]


def respond(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    def reply(request: Any) -> Any:
        return httpx2.Response(status, json=body, headers=headers or {})

    return reply


def respond_raw(content: bytes, *, stream: bool = False, status: int = 200) -> Reply:
    kind = "text/event-stream" if stream else "application/json"

    def reply(request: Any) -> Any:
        return httpx2.Response(status, content=content, headers={"content-type": kind})

    return reply


def respond_sse(msg: dict[str, Any]) -> Reply:
    return respond_raw(sse(sse_events(msg)), stream=True)


def fail(error: Any, text: str) -> Reply:
    def reply(request: Any) -> Any:
        raise error(text, request=request)

    return reply


class Fake:
    """The API's side of the mock transport: scripted replies, recorded requests."""

    def __init__(self, *replies: Reply) -> None:
        self.replies: deque[Reply] = deque(replies)
        self.requests: list[Any] = []

    def __call__(self, request: Any) -> Any:
        self.requests.append(request)
        if not self.replies:
            raise AssertionError(f"unexpected request {len(self.requests)}")
        return self.replies.popleft()(request)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]


def sync_client(fake: Fake) -> Any:
    return anthropic.Anthropic(
        api_key=API_KEY,
        base_url=BASE_URL,
        http_client=httpx2.Client(transport=httpx2.MockTransport(fake)),
    )


def async_client(fake: Fake) -> Any:
    return anthropic.AsyncAnthropic(
        api_key=API_KEY,
        base_url=BASE_URL,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(fake)),
    )


def engine_for(fake: Fake, **options: Any) -> AnthropicEngine:
    options.setdefault("max_retries", 0)
    return AnthropicEngine(
        client=sync_client(fake), async_client=async_client(fake), model=MODEL, **options
    )


def call(**overrides: Any) -> SegmentCall:
    fields: dict[str, Any] = {
        "messages": MESSAGES,
        "sources": SOURCES,
        "question": QUESTION,
        "prefix": "",
        "grammar": None,
        "max_tokens": 256,
    }
    fields.update(overrides)
    return SegmentCall(**fields)


def run(engine: AnthropicEngine, mode: str, segment: SegmentCall | None = None) -> SegmentResult:
    segment = segment or call()
    if mode == "async":
        return anyio.run(engine.acomplete, segment)
    return engine.complete(segment)


def markers(answer: str, *, strict: bool = False) -> list[tuple[int, str]]:
    """Each marker the decoder's tracker closes in ``answer``: (id, its sentence's words)."""
    data = answer.encode()
    _, closed = advance(TextState(strict=strict), data, 0)
    return [(m.source_index, data[m.sentence_start : m.start].decode().strip()) for m in closed]


# ---------------------------------------------------------------------- mapping


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_citations_become_markers_before_the_terminator_with_their_evidence(mode: str) -> None:
    fake = Fake(respond(message()))
    result = run(engine_for(fake), mode)
    assert result.text == EXPECTED
    assert result.finish == "end"
    assert (result.prompt_tokens, result.completion_tokens) == (1234, 56)
    start = EIFFEL.index("It was completed")
    assert result.evidence == (
        Evidence(source_index=1, start=start, end=start + 26, text="It was completed in 1889. "),
        Evidence(
            source_index=1,
            start=EIFFEL.index("It is 330"),
            end=len(EIFFEL),
            text="It is 330 metres tall.",
        ),
        Evidence(
            source_index=2,
            start=LOUVRE.index("It is in"),
            end=len(LOUVRE),
            text="It is in Paris, near the Seine.",
        ),
    )
    for item in result.evidence:
        assert item is not None
        assert SOURCES[item.source_index - 1].text[item.start : item.end] == item.text


@pytest.mark.parametrize("strict", [False, True])
def test_the_tracker_closes_each_marker_in_its_own_sentence(strict: bool) -> None:
    result = run(engine_for(Fake(respond(message()))), "sync")
    first = "According to the documents, the Eiffel Tower was completed in 1889"
    second = "It is 330 metres tall, and the Louvre is nearby"
    assert markers(result.text, strict=strict) == [(1, first), (1, second), (2, second + " [1]")]
    assert len(result.evidence) == len(markers(result.text))


def test_markers_go_to_the_sentence_a_cited_block_ends_in() -> None:
    content = [
        text("The tower, "),
        text("finished in 1889", cite(0, "It was completed in 1889.")),
        text(', is "tall."'),
        text(" Is it in Paris?", cite(1, "It is in Paris, near the Seine.")),
        text("\n- "),
        text("It is 330 metres tall", cite(0, "It is 330 metres tall.")),
        text("\n"),
    ]
    result = run(engine_for(Fake(respond(message(content)))), "sync")
    assert result.text == (
        'The tower, finished in 1889, is "tall [1]." Is it in Paris [2]?\n'
        "- It is 330 metres tall [1]\n"
    )
    assert [i for i, _ in markers(result.text)] == [1, 2, 1]
    assert markers(result.text)[2][1] == "- It is 330 metres tall"


def test_repeated_documents_in_a_sentence_give_one_marker_and_the_first_good_span() -> None:
    bad = {**cite(0, "It is 330 metres tall."), "start_char_index": 0}
    content = [
        text("The tower is 330 metres tall", bad),
        text(" and was completed in 1889", cite(0, "It was completed in 1889.")),
        text("."),
    ]
    result = run(engine_for(Fake(respond(message(content)))), "sync")
    assert result.text == "The tower is 330 metres tall and was completed in 1889 [1]."
    assert result.evidence == (
        Evidence(
            source_index=1,
            start=EIFFEL.index("It was"),
            end=EIFFEL.index("It was") + 25,
            text="It was completed in 1889.",
        ),
    )


def test_a_document_index_out_of_range_never_reaches_the_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    content = [
        text("The tower was completed in 1889", cite(5, "It was completed in 1889.")),
        text(". "),
        text("It is 330 metres tall", cite(-1, "x"), cite(0, "It is 330 metres tall.")),
        text("."),
    ]
    with caplog.at_level(logging.WARNING, logger="citebacktrack.backends.anthropic"):
        result = run(engine_for(Fake(respond(message(content)))), "sync")
    assert result.text == "The tower was completed in 1889. It is 330 metres tall [1]."
    assert [i for i, _ in markers(result.text)] == [1]
    assert len(result.evidence) == 1
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped a citation of document_index 5: only 2 documents were sent" in logged
    assert "document_index -1" in logged
    assert API_KEY not in logged


def test_other_citation_types_are_ignored_with_a_note(caplog: pytest.LogCaptureFixture) -> None:
    page = {
        "type": "page_location",
        "cited_text": "x",
        "document_index": 0,
        "start_page_number": 1,
        "end_page_number": 2,
    }
    content = [text("The tower is 330 metres tall", page), text(".")]
    with caplog.at_level(logging.WARNING, logger="citebacktrack.backends.anthropic"):
        result = run(engine_for(Fake(respond(message(content)))), "sync")
    assert result.text == "The tower is 330 metres tall."
    assert result.evidence == ()
    assert "ignored a page_location citation" in caplog.text


def test_a_span_that_is_not_the_source_text_keeps_the_marker_without_evidence() -> None:
    wrong = {**cite(0, "It was completed in 1889."), "cited_text": "It was finished in 1889."}
    content = [text("The tower was completed in 1889", wrong), text(".")]
    result = run(engine_for(Fake(respond(message(content)))), "sync")
    assert result.text == "The tower was completed in 1889 [1]."
    assert result.evidence == (None,)


def test_brackets_in_claudes_text_cannot_become_markers() -> None:
    content = [
        text("The tower [see 2] was completed in 1889", cite(0, "It was completed in 1889.")),
        text(". [3]"),
    ]
    result = run(engine_for(Fake(respond(message(content)))), "sync")
    assert result.text == "The tower (see 2) was completed in 1889 [1]. (3)"
    assert [i for i, _ in markers(result.text)] == [1]


def test_thinking_blocks_and_an_empty_answer() -> None:
    content = [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        text("It is 330 metres tall", cite(0, "It is 330 metres tall.")),
        text("."),
    ]
    result = run(engine_for(Fake(respond(message(content)))), "sync")
    assert result.text == "It is 330 metres tall [1]."
    empty = run(engine_for(Fake(respond(message([])))), "sync")
    assert (empty.text, empty.finish, empty.evidence) == ("", "end", ())


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("end_turn", "end"),
        ("stop_sequence", "end"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
    ],
)
def test_stop_reasons(reason: str, finish: str) -> None:
    result = run(engine_for(Fake(respond(message(stop_reason=reason)))), "sync")
    assert result.finish == finish


@pytest.mark.parametrize(
    ("reason", "says"),
    [
        ("refusal", "refused to answer (category 'cyber')"),
        ("pause_turn", "paused the turn"),
        ("tool_use", "stop_reason 'tool_use'"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_refusal_or_a_paused_turn_is_an_error_not_an_answer(
    reason: str, says: str, stream: bool
) -> None:
    msg = message(stop_reason=reason)
    msg["stop_details"] = {"type": "refusal", "category": "cyber"}
    fake = Fake(respond_sse(msg) if stream else respond(msg))
    if stream:  # the stream carries stop_details in message_delta
        events = sse_events(msg)
        events[-2]["delta"]["stop_details"] = msg["stop_details"]
        fake = Fake(respond_raw(sse(events), stream=True))
    with pytest.raises(BackendError, match=says.replace("(", r"\(").replace(")", r"\)")):
        run(engine_for(fake, stream=stream), "sync")


# ---------------------------------------------------------------------- streaming


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_a_streamed_answer_equals_the_same_answer_in_one_body(mode: str, chunk: int) -> None:
    usage = {"input_tokens": 1500, "output_tokens": 61, "cache_read_input_tokens": 20}
    msg = message(usage=usage)
    whole = run(engine_for(Fake(respond(msg))), mode)
    stream = Fake(respond_raw(sse(sse_events(msg, chunk=chunk)), stream=True))
    streamed = run(engine_for(stream, stream=True), mode)
    assert streamed == whole
    assert whole.text == EXPECTED
    assert (whole.prompt_tokens, whole.completion_tokens) == (1520, 61)
    assert stream.bodies[0]["stream"] is True
    assert stream.bodies[0]["messages"] == engine_for(Fake())._request(call())["messages"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_cut_before_message_stop_is_an_error(mode: str) -> None:
    events = sse_events(message())[:-1]
    fake = Fake(respond_raw(sse(events), stream=True))
    with pytest.raises(BackendError, match="ended before message_stop") as info:
        run(engine_for(fake, stream=True), mode)
    assert isinstance(info.value.__cause__, BackendError)


def test_a_stream_whose_connection_breaks_is_an_error() -> None:
    head = sse(sse_events(message())[:6])

    def chunks() -> Iterator[bytes]:
        yield head
        raise httpx2.ReadError("connection reset by peer")

    def reply(request: Any) -> Any:
        return httpx2.Response(200, content=chunks(), headers={"content-type": "text/event-stream"})

    with pytest.raises(BackendError, match="broke off: ReadError") as info:
        run(engine_for(Fake(reply), stream=True), "sync")
    assert isinstance(info.value.__cause__, httpx2.ReadError)


def test_an_error_event_mid_stream_is_an_error() -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    body = sse(sse_events(message())[:5]) + f"event: error\ndata: {json.dumps(error)}\n\n".encode()
    with pytest.raises(BackendError, match="error event: Overloaded") as info:
        run(engine_for(Fake(respond_raw(body, stream=True)), stream=True), "sync")
    assert isinstance(info.value.__cause__, anthropic.APIStatusError)


def test_a_stream_event_that_is_not_json_is_an_error() -> None:
    body = sse(sse_events(message())[:3]) + b"event: content_block_delta\ndata: {oops\n\n"
    with pytest.raises(BackendError, match="not JSON"):
        run(engine_for(Fake(respond_raw(body, stream=True)), stream=True), "sync")


def test_a_delta_for_a_block_that_never_started_is_an_error() -> None:
    events = sse_events(message())
    del events[2]  # the first content_block_start
    with pytest.raises(BackendError, match="content block 0, which never started"):
        run(engine_for(Fake(respond_raw(sse(events), stream=True)), stream=True), "sync")


# ---------------------------------------------------------------------- the request


def test_the_request_sends_every_source_as_a_cited_document_and_no_prefill() -> None:
    fake = Fake(respond(message()))
    run(engine_for(fake), "sync", call(temperature=0.0, top_p=1.0, stop=("]",)))
    (body,) = fake.bodies
    assert body["model"] == MODEL
    assert body["max_tokens"] == 256
    assert body["system"] == DEFAULT_SYSTEM
    assert body["temperature"] == 0.0
    assert "top_p" not in body
    assert "stop_sequences" not in body  # the "]" stop would cut nothing or the answer
    assert [m["role"] for m in body["messages"]] == ["user"]
    documents, question = body["messages"][0]["content"][:2], body["messages"][0]["content"][2:]
    assert documents == [
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": s.text},
            "title": s.title,
            "citations": {"enabled": True},
        }
        for s in SOURCES
    ]
    assert question == [{"type": "text", "text": QUESTION}]
    assert fake.requests[0].headers["x-api-key"] == API_KEY
    assert fake.requests[0].url == f"{BASE_URL}/v1/messages"


def test_sampling_options_and_extra_fields() -> None:
    fake = Fake(respond(message()), respond(message()))
    run(
        engine_for(fake, extra={"metadata": {"user_id": "u1"}}),
        "sync",
        call(temperature=0.7, top_p=0.9),
    )
    run(engine_for(fake, send_sampling=False, system="Be brief."), "sync", call(top_p=0.9))
    first, second = fake.bodies
    assert (first["temperature"], first["top_p"], first["metadata"]) == (
        0.7,
        0.9,
        {"user_id": "u1"},
    )
    assert "temperature" not in second
    assert "top_p" not in second
    assert second["system"] == "Be brief."


def test_an_untitled_source_is_sent_without_a_title_and_the_question_defaults() -> None:
    fake = Fake(respond(message()))
    sources = (Source(text=EIFFEL), Source(title="Louvre", text=LOUVRE))
    run(engine_for(fake), "sync", call(sources=sources, question=None))
    content = fake.bodies[0]["messages"][0]["content"]
    assert "title" not in content[0]
    assert content[1]["title"] == "Louvre"
    assert content[2] == {"type": "text", "text": MESSAGES[-1].content}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_continuation_quotes_the_accepted_text_in_the_user_turn(mode: str) -> None:
    prefix = "The Eiffel Tower was completed in 1889 [1]."
    content = [text(" It is 330 metres tall", cite(0, "It is 330 metres tall.")), text(".")]
    fake = Fake(respond(message(content)))
    result = run(engine_for(fake), mode, call(prefix=prefix))
    assert result.text == " It is 330 metres tall [1]."
    messages = fake.bodies[0]["messages"]
    assert [m["role"] for m in messages] == ["user"]  # never a trailing assistant turn
    last = messages[0]["content"][-1]
    assert last["type"] == "text"
    assert last["text"].startswith("Continue this answer from exactly where it stops.")
    assert last["text"].endswith("\n\n" + prefix)
    assert messages[0]["content"][-2] == {"type": "text", "text": QUESTION}


# ---------------------------------------------------------------------- errors


def rate_limited(ms: str = "1") -> Reply:
    error = {"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}}
    return respond(error, 429, {"retry-after-ms": ms, "retry-after": "0"})


def test_a_429_with_retry_after_is_retried_by_the_sdk_then_succeeds() -> None:
    fake = Fake(rate_limited(), respond(message()))
    result = run(engine_for(fake, max_retries=2), "sync")
    assert result.text == EXPECTED
    assert len(fake.requests) == 2
    assert fake.requests[1].headers["x-stainless-retry-count"] == "1"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_429_past_the_retries_names_the_rate_limit(mode: str) -> None:
    fake = Fake(rate_limited(), rate_limited())
    with pytest.raises(BackendError, match=r"rate limiting \(HTTP 429\) after 1 retry: Slow down"):
        run(engine_for(fake, max_retries=1), mode)
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    ("status", "kind", "says", "cause"),
    [
        (500, "api_error", "failed with HTTP 500 after 1 retry: Internal", "InternalServerError"),
        (529, "overloaded_error", r"overloaded \(HTTP 529\) after 1 retry", "OverloadedError"),
        (503, "api_error", "failed with HTTP 503", "InternalServerError"),
    ],
)
def test_server_errors_are_retried_then_typed(
    status: int, kind: str, says: str, cause: str
) -> None:
    error = {"type": "error", "error": {"type": kind, "message": "Internal trouble"}}
    fake = Fake(*[respond(error, status, {"retry-after-ms": "1"})] * 2)
    with pytest.raises(BackendError, match=says) as info:
        run(engine_for(fake, max_retries=1), "sync")
    assert type(info.value.__cause__).__name__ == cause
    assert len(fake.requests) == 2


def test_a_400_is_not_retried_and_names_the_model() -> None:
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad doc"}}
    fake = Fake(respond(error, 400))
    with pytest.raises(BackendError, match="refused the request with HTTP 400: bad doc") as info:
        run(engine_for(fake, max_retries=2), "sync")
    assert "claude-sonnet-4-6" in str(info.value)
    assert isinstance(info.value.__cause__, anthropic.BadRequestError)
    assert len(fake.requests) == 1


def test_a_model_without_sampling_parameters_gets_a_hint() -> None:
    error = {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "`temperature` is deprecated for this model.",
        },
    }
    with pytest.raises(BackendError, match="pass send_sampling=False"):
        run(engine_for(Fake(respond(error, 400))), "sync")


def test_a_refused_key_says_so_without_showing_it() -> None:
    error = {
        "type": "error",
        "error": {"type": "authentication_error", "message": f"invalid x-api-key {API_KEY}"},
    }
    with pytest.raises(BackendError, match="refused the credentials with HTTP 401") as info:
        run(engine_for(Fake(respond(error, 401))), "sync")
    assert API_KEY not in str(info.value)
    assert info.value.__cause__ is None  # the SDK's error shows the key: not chained
    assert "***" in str(info.value)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_timeout_is_retried_then_typed(mode: str) -> None:
    fake = Fake(fail(httpx2.ReadTimeout, "timed out"), fail(httpx2.ReadTimeout, "timed out"))
    with pytest.raises(BackendError, match=r"did not answer within 5 s \(after 1 retry\)") as info:
        run(engine_for(fake, max_retries=1, timeout=5), mode)
    assert isinstance(info.value.__cause__, anthropic.APITimeoutError)
    assert len(fake.requests) == 2


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_connection_reset_is_retried_then_succeeds_or_is_typed(mode: str) -> None:
    reset = fail(httpx2.ReadError, "connection reset by peer")
    assert run(engine_for(Fake(reset, respond(message())), max_retries=1), mode).text == EXPECTED
    with pytest.raises(BackendError, match=r"connection to .* failed .*reset by peer") as info:
        run(engine_for(Fake(reset), max_retries=0), mode)
    assert isinstance(info.value.__cause__, anthropic.APIConnectionError)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "a JSON list instead of a message"),
        (b'{"type": "message", "content": "hi"}', "message content that is not a list"),
        (b'{"type": "message", "content": [{"type": "text", "text": 3}]}', "text block without"),
        (
            b'{"type": "message", "content": [], '
            b'"usage": {"input_tokens": -1, "output_tokens": 1}}',
            "usage.input_tokens that is not a token count",
        ),
    ],
)
def test_a_body_that_is_not_a_message_is_typed(content: bytes, says: str) -> None:
    with pytest.raises(BackendError, match=says) as info:
        run(engine_for(Fake(respond_raw(content))), "sync")
    assert "Anthropic API at https://api.anthropic.test" in str(info.value)
    assert isinstance(info.value.__cause__, BackendError)


# ---------------------------------------------------------------------- secrets and setup


def test_the_key_appears_in_no_repr_and_no_error() -> None:
    engine = engine_for(Fake(respond({"type": "error", "error": {"message": API_KEY}}, 500)))
    assert API_KEY not in repr(engine)
    assert API_KEY not in str(engine)
    assert repr(engine) == (
        "AnthropicEngine(base_url='https://api.anthropic.test', model='claude-sonnet-4-6', "
        "stream=False)"
    )
    with pytest.raises(BackendError) as info:
        run(engine, "sync")
    assert API_KEY not in str(info.value)
    assert API_KEY not in repr(info.value)
    assert info.value.__cause__ is None
    backend = AnthropicBackend(engine)
    assert API_KEY not in repr(backend)


def test_from_env_reads_the_key_from_the_environment_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    engine = AnthropicEngine.from_env(model=MODEL, base_url=BASE_URL)
    assert engine._client is not None
    assert engine._client.api_key == API_KEY
    assert API_KEY not in repr(engine)
    with pytest.raises(TypeError):
        AnthropicEngine.from_env("sk-ant-other-0123456789", model=MODEL)  # type: ignore[misc]
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(ConfigurationError, match="ANTHROPIC_API_KEY"):
        AnthropicEngine.from_env(model=MODEL)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "")
    with pytest.raises(ConfigurationError, match="no Anthropic API key"):
        AnthropicBackend.from_env(model=MODEL)
    engine.close()
    with pytest.raises(BackendClosedError):
        engine.complete(call())


def test_an_owned_async_client_is_opened_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(respond(message()))
    original = anthropic.AsyncAnthropic

    def with_fake(**kwargs: Any) -> Any:
        kwargs.setdefault("http_client", httpx2.AsyncClient(transport=httpx2.MockTransport(fake)))
        return original(**kwargs)

    monkeypatch.setattr(anthropic, "AsyncAnthropic", with_fake)
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    engine = AnthropicEngine.from_env(model=MODEL, base_url=BASE_URL)

    async def go() -> SegmentResult:
        try:
            return await engine.acomplete(call())
        finally:
            await engine.aclose()

    assert anyio.run(go).text == EXPECTED
    assert len(fake.requests) == 1


def test_configuration_errors() -> None:
    fake = Fake()
    with pytest.raises(ConfigurationError, match="needs a client"):
        AnthropicEngine(model=MODEL)
    with pytest.raises(ConfigurationError, match="timeout"):
        AnthropicEngine(client=sync_client(fake), model=MODEL, timeout=0)
    with pytest.raises(ConfigurationError, match="max_retries"):
        AnthropicEngine(client=sync_client(fake), model=MODEL, max_retries=-1)
    with pytest.raises(ConfigurationError, match="'temperature' is set by the engine"):
        AnthropicEngine(client=sync_client(fake), model=MODEL, extra={"temperature": 1})
    with pytest.raises(ConfigurationError, match="model"):
        AnthropicEngine(client=sync_client(fake), model="")
    engine = engine_for(fake)
    with pytest.raises(ConfigurationError, match="none"):
        engine.complete(call(sources=()))
    with pytest.raises(ConfigurationError, match="max_tokens"):
        engine.complete(call(max_tokens=0))
    with pytest.raises(ConfigurationError, match="no question"):
        engine.complete(call(question=None, messages=(ChatMessage("system", "x"),)))
    only_async = AnthropicEngine(async_client=async_client(fake), model=MODEL)
    with pytest.raises(ConfigurationError, match="synchronous client"):
        only_async.complete(call())
    only_sync = AnthropicEngine(client=sync_client(fake), model=MODEL)
    with pytest.raises(ConfigurationError, match="async client"):
        anyio.run(only_sync.acomplete, call())
    with pytest.raises(ConfigurationError, match="not both"):
        AnthropicBackend(only_sync, model=MODEL)
    assert fake.requests == []


def test_the_engine_is_a_segment_engine_that_does_not_continue_a_prefix() -> None:
    engine = engine_for(Fake())
    assert isinstance(engine, SegmentEngine)
    assert AnthropicEngine.continues_prefix is False
    backend = AnthropicBackend(client=sync_client(Fake()), model=MODEL)
    assert isinstance(backend.engine, AnthropicEngine)
    assert backend.engine.max_retries == 2


# ---------------------------------------------------------------------- end to end

# Claude cites the Eiffel document for a sentence about the Louvre: the lexical validator
# rejects it; the Louvre document supports the sentence.
MISCITED = [
    text("The Eiffel Tower was completed in 1889", cite(0, "It was completed in 1889.")),
    text(". "),
    text("The Louvre is the most visited museum in the world", cite(0, "It is 330 metres tall.")),
    text("."),
]


def answer_of(content: list[dict[str, Any]], *, stream: bool = False, mode: str = "sync") -> Any:
    from citebacktrack import Citeformer

    msg = message(content)
    fake = Fake(respond_sse(msg) if stream else respond(msg))
    backend = AnthropicBackend(
        client=sync_client(fake),
        async_client=async_client(fake),
        model=MODEL,
        stream=stream,
        max_retries=0,
    )
    citeformer = Citeformer(backend)
    if mode == "async":
        result = anyio.run(citeformer.agenerate, QUESTION, list(SOURCES))
    else:
        result = citeformer.generate(QUESTION, list(SOURCES))
    assert len(fake.requests) == 1  # one call: the answer is revised, not regenerated
    assert [m["role"] for m in fake.bodies[0]["messages"]] == ["user"]
    return result


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_unsupported_citation_never_reaches_the_answer(mode: str, stream: bool) -> None:
    answer = answer_of(MISCITED, stream=stream, mode=mode)
    assert answer.text == (
        "The Eiffel Tower was completed in 1889 [1]. "
        "The Louvre is the most visited museum in the world [2]."
    )
    assert "world [1]" not in answer.text
    rejections = [e for e in answer.trace.entries if e.kind == "rejection"]
    assert [(e.source_index, e.reason) for e in rejections] == [(1, "unsupported")]
    assert answer.trace.rejections == 1
    first, second = answer.citations
    # The accepted marker keeps Claude's own span; the replacement gets the validator's.
    start = EIFFEL.index("It was")
    assert first.evidence == Evidence(
        source_index=1, start=start, end=start + 25, text="It was completed in 1889."
    )
    assert second.source_index == 2
    assert second.evidence is not None
    assert second.evidence.text in LOUVRE


def test_a_sentence_no_source_supports_is_dropped() -> None:
    content = [
        text("The Eiffel Tower was completed in 1889", cite(0, "It was completed in 1889.")),
        text(". "),
        text("Gustave Eiffel painted it green every spring", cite(0, "It is 330 metres tall.")),
        text("."),
    ]
    answer = answer_of(content)
    assert answer.text == "The Eiffel Tower was completed in 1889 [1]."
    assert "green" not in answer.text
    assert [e.source_index for e in answer.trace.entries if e.kind == "rejection"] == [1]


def test_an_out_of_range_citation_is_absent_end_to_end() -> None:
    content = [
        text(
            "The Eiffel Tower was completed in 1889",
            cite(7, "It was completed in 1889."),
            cite(0, "It was completed in 1889."),
        ),
        text("."),
    ]
    answer = answer_of(content)
    assert answer.text == "The Eiffel Tower was completed in 1889 [1]."
    assert [c.source_index for c in answer.citations] == [1]
    # The dropped citation is in the trace, not only in the log.
    details = [e.detail for e in answer.trace.entries if e.kind == "fallback"]
    assert any("document_index" in d or "out of range" in d for d in details), details
