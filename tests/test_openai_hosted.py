"""The hosted OpenAI engines (``mode="cfg"`` and ``mode="json_schema"``) at the HTTP level.

The real ``openai`` SDK sends every request through an ``httpx2.MockTransport``, so the
bodies asserted here are what the API receives, the answers are the API's JSON as it
returns it (Responses and Chat Completions), and retries, timeouts and cut bodies go
through the SDK's own code.
"""

from __future__ import annotations

import json
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

openai = pytest.importorskip("openai")
httpx2 = pytest.importorskip("httpx2")

from citebacktrack import Citeformer  # noqa: E402
from citebacktrack._tracker import TextState, advance  # noqa: E402
from citebacktrack.backends import OpenAIBackend  # noqa: E402
from citebacktrack.backends._openai_hosted import (  # noqa: E402
    ANSWER_TOOL,
    HOSTED_ENGINES,
    MAX_SCHEMA_SOURCES,
    OpenAIGrammarToolEngine,
    OpenAIJsonSchemaEngine,
    answer_schema,
    render_answer,
)
from citebacktrack.backends.openai import OpenAICompatibleEngine  # noqa: E402
from citebacktrack.errors import (  # noqa: E402
    BackendClosedError,
    BackendError,
    ConfigurationError,
    GrammarError,
)
from citebacktrack.grammar import Dialect, citation_grammar, continuation_grammar, emit  # noqa: E402
from citebacktrack.prompts import build_messages  # noqa: E402
from citebacktrack.segments import SegmentCall, SegmentResult  # noqa: E402
from citebacktrack.types import CitationRejected, Policy, Source, StopReason  # noqa: E402
from grammar_engines import xgrammar_accepts  # noqa: E402

API_KEY = "sk-proj-Planted0123456789abcdefSECRET"
BASE_URL = "https://api.openai.test/v1"
SOURCES = [
    Source(id="louvre", title="Louvre", text="The Louvre is an art museum in Paris."),
    Source(
        id="eiffel",
        title="Eiffel Tower",
        text="The Eiffel Tower was completed in 1889. It is 330 metres tall.",
    ),
    Source(id="wall", title="Great Wall", text="The Great Wall of China is very long."),
]
QUESTION = "When was the Eiffel Tower completed, and how tall is it?"
MESSAGES = tuple(build_messages(QUESTION, SOURCES, Policy()))
GRAMMAR = citation_grammar(3, Policy(), bounded=True)
GOOD = "The Eiffel Tower was completed in 1889 [2]. It is 330 metres tall [2]."
GOOD_JSON = json.dumps(
    {
        "sentences": [
            {"text": "The Eiffel Tower was completed in 1889.", "citations": [2]},
            {"text": "It is 330 metres tall.", "citations": [2]},
        ]
    },
    separators=(",", ":"),
)
MODES = ("cfg", "json_schema")
APIS = ("responses", "chat")
COMBOS = [(mode, api) for mode in MODES for api in APIS]


# --------------------------------------------------------------------------- the fake API


class _CutStream(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """A body that stops half-way with the error a closed connection gives."""

    def __init__(self, head: bytes) -> None:
        self.head = head

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        raise httpx2.RemoteProtocolError("peer closed connection without sending complete body")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        raise httpx2.RemoteProtocolError("peer closed connection without sending complete body")


@dataclass
class Reply:
    """One scripted answer: a JSON body (or raw bytes), or a transport error."""

    body: object = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    cut: bool = False
    error: Exception | None = None

    def response(self) -> Any:
        if self.error is not None:
            raise self.error
        data = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        headers = {"content-type": "application/json", **self.headers}
        if self.cut:
            return httpx2.Response(self.status, headers=headers, stream=_CutStream(data[:40]))
        return httpx2.Response(self.status, headers=headers, content=data)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


class FakeAPI:
    """Answers with scripted replies and records every request the SDK sent."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.seen: list[Seen] = []

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def handle(self, request: Any) -> Any:
        self.seen.append(
            Seen(
                request.url.path,
                dict(request.headers),
                json.loads(request.content),
                time.monotonic(),
            )
        )
        reply = self.replies.popleft() if self.replies else Reply({"error": "no reply"}, 599)
        return reply.response()

    def clients(self) -> dict[str, Any]:
        transport = httpx2.MockTransport(self.handle)
        return {
            "client": openai.OpenAI(
                api_key=API_KEY, base_url=BASE_URL, http_client=httpx2.Client(transport=transport)
            ),
            "async_client": openai.AsyncOpenAI(
                api_key=API_KEY,
                base_url=BASE_URL,
                http_client=httpx2.AsyncClient(transport=transport),
            ),
        }


@pytest.fixture
def fake() -> FakeAPI:
    return FakeAPI()


def lark_accepts(definition: str, text: str) -> bool:
    """Whether the Lark grammar as sent accepts all of ``text`` (read by XGrammar's Lark
    front end: the Lark package's Earley parser takes minutes on the bounded grammar)."""
    import xgrammar

    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo([]), cache_enabled=False)
    return xgrammar_accepts(compiler.compile_grammar(xgrammar.Grammar.from_lark(definition)), text)


def engine_for(fake: FakeAPI, mode: str, api: str = "responses", **options: Any) -> Any:
    options.setdefault("model", "gpt-5")
    return HOSTED_ENGINES[mode](api=api, **fake.clients(), **options)


def call(prefix: str = "", **options: Any) -> SegmentCall:
    options.setdefault("grammar", GRAMMAR)
    options.setdefault("max_tokens", 256)
    options.setdefault("sources", SOURCES)
    return SegmentCall(messages=MESSAGES, prefix=prefix, question=QUESTION, **options)


# --------------------------------------------------------------------------- recorded shapes


def response(
    *output: dict[str, Any],
    status: str = "completed",
    incomplete: dict[str, Any] | None = None,
    usage: tuple[int, int] = (412, 96),
) -> dict[str, Any]:
    """A Responses API body, with the fields the API returns."""
    return {
        "id": "resp_0a91b2c3d4e5f60718293a4b5c6d7e8f",
        "object": "response",
        "created_at": 1767225600,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": None,
        "max_output_tokens": 256,
        "max_tool_calls": None,
        "model": "gpt-5-2025-08-07",
        "output": list(output),
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "prompt_cache_key": None,
        "reasoning": {"effort": "medium", "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": {
            "input_tokens": usage[0],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage[1],
            "output_tokens_details": {"reasoning_tokens": 64},
            "total_tokens": sum(usage),
        },
        "user": None,
        "metadata": {},
    }


REASONING = {"id": "rs_0a91b2c3", "type": "reasoning", "summary": []}


def tool_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": "ctc_0a91b2c3",
        "type": "custom_tool_call",
        "status": status,
        "call_id": "call_Qm3xVb7Yz1",
        "input": text,
        "name": ANSWER_TOOL,
    }


def message_item(*parts: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "msg_0a91b2c3",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": list(parts),
    }


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def chat(
    finish: str = "stop", usage: tuple[int, int] = (380, 40), **message: Any
) -> dict[str, Any]:
    """A Chat Completions body, with the fields the API returns."""
    return {
        "id": "chatcmpl-CB0a91b2c3d4e5f6",
        "object": "chat.completion",
        "created": 1767225600,
        "model": "gpt-5-2025-08-07",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "annotations": [],
                    **message,
                },
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": sum(usage),
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": None,
    }


def chat_tool_calls(text: str) -> list[dict[str, Any]]:
    return [
        {"id": "call_Qm3xVb7Yz1", "type": "custom", "custom": {"name": "answer", "input": text}}
    ]


def answer(mode: str, api: str, text: str | None = None, finish: str = "stop") -> Reply:
    """The API's reply carrying ``text``: the tool input (cfg) or the JSON (json_schema)."""
    if text is None:
        text = GOOD if mode == "cfg" else GOOD_JSON
    if api == "responses":
        item = tool_item(text) if mode == "cfg" else message_item(output_text(text))
        return Reply(response(REASONING, item))
    if mode == "cfg":
        return Reply(chat(finish, tool_calls=chat_tool_calls(text)))
    return Reply(chat(finish, content=text))


def roles(body: dict[str, Any]) -> list[str]:
    return [m["role"] for m in body.get("input", body.get("messages", []))]


# --------------------------------------------------------------------------- request bodies


def test_json_schema_on_responses_sends_a_strict_schema_with_the_ids_as_an_enum(
    fake: FakeAPI,
) -> None:
    fake.script(answer("json_schema", "responses"))
    engine_for(fake, "json_schema", "responses").complete(
        call(max_tokens=200, temperature=0.2, top_p=0.9, seed=7)
    )
    (seen,) = fake.seen
    assert seen.path == "/v1/responses"
    assert seen.body == {
        "model": "gpt-5",
        "input": [{"role": m.role, "content": m.content} for m in MESSAGES],
        "max_output_tokens": 200,
        "temperature": 0.2,
        "top_p": 0.9,  # no seed: the Responses API has none
        "text": {
            "format": {
                "type": "json_schema",
                "name": "cited_answer",
                "description": (
                    "The answer, sentence by sentence, with the documents each one cites."
                ),
                "strict": True,
                "schema": answer_schema(3),
            }
        },
    }
    schema = seen.body["text"]["format"]["schema"]
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["sentences"]
    sentence = schema["properties"]["sentences"]["items"]
    assert sentence["additionalProperties"] is False
    assert sentence["required"] == ["text", "citations"]
    assert sentence["properties"]["text"]["type"] == "string"
    assert sentence["properties"]["citations"]["items"] == {"type": "integer", "enum": [1, 2, 3]}
    assert seen.headers["authorization"] == f"Bearer {API_KEY}"


def test_json_schema_on_chat_sends_response_format(fake: FakeAPI) -> None:
    fake.script(answer("json_schema", "chat"))
    engine_for(fake, "json_schema", "chat").complete(call(seed=7))
    (seen,) = fake.seen
    assert seen.path == "/v1/chat/completions"
    assert seen.body == {
        "model": "gpt-5",
        "messages": [{"role": m.role, "content": m.content} for m in MESSAGES],
        "max_completion_tokens": 256,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 7,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "cited_answer",
                "description": (
                    "The answer, sentence by sentence, with the documents each one cites."
                ),
                "strict": True,
                "schema": answer_schema(3),
            },
        },
    }


def test_cfg_on_responses_forces_a_custom_tool_with_the_lark_grammar(fake: FakeAPI) -> None:
    fake.script(answer("cfg", "responses"))
    engine_for(fake, "cfg", "responses").complete(call(temperature=0.7, seed=3))
    (seen,) = fake.seen
    assert seen.path == "/v1/responses"
    definition = emit(GRAMMAR, Dialect.LARK)
    assert seen.body == {
        "model": "gpt-5",  # no temperature/top_p: GPT-5 reasoning models refuse them
        "input": [{"role": m.role, "content": m.content} for m in MESSAGES],
        "max_output_tokens": 256,
        "tools": [
            {
                "type": "custom",
                "name": "answer",
                "description": (
                    "Write your whole answer here: short sentences, each citing the "
                    "documents that support it as [N]."
                ),
                "format": {"type": "grammar", "syntax": "lark", "definition": definition},
            }
        ],
        "tool_choice": {"type": "custom", "name": "answer"},
    }
    assert definition.startswith("start: root\n")
    assert "stop" not in seen.body  # custom tools take no stop strings


def test_cfg_on_chat_nests_the_tool_and_its_grammar(fake: FakeAPI) -> None:
    fake.script(answer("cfg", "chat"))
    engine_for(fake, "cfg", "chat").complete(call())
    (seen,) = fake.seen
    assert seen.path == "/v1/chat/completions"
    assert seen.body["tools"] == [
        {
            "type": "custom",
            "custom": {
                "name": "answer",
                "description": (
                    "Write your whole answer here: short sentences, each citing the "
                    "documents that support it as [N]."
                ),
                "format": {
                    "type": "grammar",
                    "grammar": {"syntax": "lark", "definition": emit(GRAMMAR, Dialect.LARK)},
                },
            },
        }
    ]
    assert seen.body["tool_choice"] == {"type": "custom", "custom": {"name": "answer"}}
    assert seen.body["max_completion_tokens"] == 256
    assert roles(seen.body) == [m.role for m in MESSAGES]
    assert not {"temperature", "top_p", "seed", "stop"} & set(seen.body)


@pytest.mark.parametrize("api", APIS)
def test_a_cfg_continuation_puts_the_accepted_text_in_a_user_turn(fake: FakeAPI, api: str) -> None:
    prefix = "The Eiffel Tower was completed in 1889 ["
    grammar = continuation_grammar(3, Policy(), prefix, allowed_ids={2}, bounded=True)
    fake.script(answer("cfg", api, "2]. It is 330 metres tall [2]."))
    result = engine_for(fake, "cfg", api).complete(call(prefix, grammar=grammar))
    assert result.text == "2]. It is 330 metres tall [2]."
    body = fake.seen[0].body
    turns = body["input" if api == "responses" else "messages"]
    assert [t["role"] for t in turns] == [*(m.role for m in MESSAGES), "user"]
    assert turns[: len(MESSAGES)] == [{"role": m.role, "content": m.content} for m in MESSAGES]
    last = turns[-1]["content"]
    assert last.endswith(f"<answer-so-far>{prefix}</answer-so-far>")
    assert "continue it from exactly where it stops" in last.lower()
    assert "inside a citation marker" in last  # the prefix ends with "["
    # Never a trailing assistant message (hosted models cannot be prefilled).
    assert turns[-1]["role"] != "assistant"
    assert prefix not in [t["content"] for t in turns if t["role"] == "assistant"]
    tool = body["tools"][0] if api == "responses" else body["tools"][0]["custom"]
    fmt = tool["format"]
    definition = fmt["definition"] if api == "responses" else fmt["grammar"]["definition"]
    assert definition == emit(grammar, Dialect.LARK)
    assert 'allowed_id: "2"' in definition
    assert tool["description"].startswith("Write the rest of your answer")


def test_a_continuation_after_a_closed_marker_has_no_marker_note(fake: FakeAPI) -> None:
    prefix = "The Eiffel Tower was completed in 1889 [2]."
    grammar = continuation_grammar(3, Policy(), prefix, bounded=True)
    fake.script(answer("cfg", "responses", " It is 330 metres tall [2]."))
    engine_for(fake, "cfg").complete(call(prefix, grammar=grammar))
    last = fake.seen[0].body["input"][-1]["content"]
    assert "inside a citation marker" not in last
    assert last.endswith(f"<answer-so-far>{prefix}</answer-so-far>")


@pytest.mark.parametrize(("mode", "api"), COMBOS)
def test_an_unconstrained_call_is_a_plain_text_request(fake: FakeAPI, mode: str, api: str) -> None:
    text = "The Eiffel Tower was completed in 1889."
    reply = Reply(response(message_item(output_text(text)))) if api == "responses" else None
    fake.script(reply or Reply(chat(content=text)))
    result = engine_for(fake, mode, api).complete(call(grammar=None, stop=()))
    assert (result.text, result.finish) == (text, "end")
    assert not {"tools", "tool_choice", "text", "response_format"} & set(fake.seen[0].body)


def test_send_sampling_overrides_the_mode_default(fake: FakeAPI) -> None:
    fake.script(answer("cfg", "chat"), answer("json_schema", "chat"))
    engine_for(fake, "cfg", "chat", send_sampling=True).complete(call(seed=1))
    engine_for(fake, "json_schema", "chat", send_sampling=False).complete(call(seed=1))
    assert {"temperature", "top_p", "seed"} <= set(fake.seen[0].body)
    assert not {"temperature", "top_p", "seed"} & set(fake.seen[1].body)


def test_extra_fields_are_sent_but_may_not_override(fake: FakeAPI) -> None:
    fake.script(answer("cfg", "responses"))
    extra = {"reasoning": {"effort": "low"}, "store": False}
    engine_for(fake, "cfg", extra=extra).complete(call())
    assert fake.seen[0].body["reasoning"] == {"effort": "low"}
    assert fake.seen[0].body["store"] is False
    for owned in ("tools", "tool_choice", "text", "input", "max_output_tokens"):
        with pytest.raises(ConfigurationError, match=owned):
            engine_for(fake, "cfg", extra={owned: 1})


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(("mode", "api"), COMBOS)
def test_each_mode_and_api_reads_the_answer_and_usage(fake: FakeAPI, mode: str, api: str) -> None:
    fake.script(answer(mode, api))
    result = engine_for(fake, mode, api).complete(call())
    tokens = (412, 96) if api == "responses" else (380, 40)
    assert result == SegmentResult(
        text=GOOD, finish="end", prompt_tokens=tokens[0], completion_tokens=tokens[1]
    )
    assert result.evidence == ()  # OpenAI quotes no spans


@pytest.mark.parametrize("finish", ["stop", "tool_calls"])
def test_a_forced_chat_tool_may_end_with_stop_or_tool_calls(fake: FakeAPI, finish: str) -> None:
    fake.script(answer("cfg", "chat", finish=finish))
    assert engine_for(fake, "cfg", "chat").complete(call()).finish == "end"


def test_the_answer_tool_call_is_picked_among_other_output(fake: FakeAPI) -> None:
    other = {**tool_item("ignored"), "name": "search"}
    chatter = message_item(output_text("Calling the tool."))
    fake.script(Reply(response(REASONING, chatter, other, tool_item(GOOD))))
    assert engine_for(fake, "cfg").complete(call()).text == GOOD


@pytest.mark.parametrize(
    ("reply", "mode", "api", "text"),
    [
        (
            Reply(
                response(
                    REASONING,
                    tool_item("The Eiffel Tower was completed in 18", status="incomplete"),
                    status="incomplete",
                    incomplete={"reason": "max_output_tokens"},
                )
            ),
            "cfg",
            "responses",
            "The Eiffel Tower was completed in 18",
        ),
        (
            Reply(
                response(REASONING, status="incomplete", incomplete={"reason": "max_output_tokens"})
            ),
            "cfg",
            "responses",
            "",
        ),
        (
            Reply(chat("length", tool_calls=chat_tool_calls("The Eiffel Tower was"))),
            "cfg",
            "chat",
            "The Eiffel Tower was",
        ),
        (
            Reply(chat("length", content=GOOD_JSON[: GOOD_JSON.index("It is") + 4])),
            "json_schema",
            "chat",
            "The Eiffel Tower was completed in 1889 [2].",
        ),
        (
            Reply(
                response(
                    message_item(output_text('{"sentences":[{"text":"The Eif')),
                    status="incomplete",
                    incomplete={"reason": "max_output_tokens"},
                )
            ),
            "json_schema",
            "responses",
            "",
        ),
    ],
)
def test_an_answer_cut_by_the_token_limit_is_length(
    fake: FakeAPI, reply: Reply, mode: str, api: str, text: str
) -> None:
    fake.script(reply)
    result = engine_for(fake, mode, api).complete(call())
    assert (result.text, result.finish) == (text, "length")


@pytest.mark.parametrize(
    ("reply", "api", "match"),
    [
        (
            Reply(response(status="incomplete", incomplete={"reason": "content_filter"})),
            "responses",
            "incomplete response \\(reason 'content_filter'\\)",
        ),
        (Reply(chat("content_filter", content="")), "chat", "finish_reason 'content_filter'"),
        (
            Reply({**response(), "status": "failed", "error": {"code": "server_error"}}),
            "responses",
            "failed response",
        ),
        (Reply(response(REASONING)), "responses", "no call of the 'answer' tool"),
        (Reply(chat(content="I will answer in prose.")), "chat", "no call of the 'answer' tool"),
    ],
)
def test_filtered_failed_or_toolless_answers_are_backend_errors(
    fake: FakeAPI, reply: Reply, api: str, match: str
) -> None:
    fake.script(reply)
    with pytest.raises(BackendError, match=match):
        engine_for(fake, "cfg", api).complete(call())


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("mode", MODES)
def test_a_refusal_is_a_backend_error_with_the_refusal_text(
    fake: FakeAPI, mode: str, api: str
) -> None:
    refusal = "I'm sorry, but I can't help with that request."
    if api == "responses":
        fake.script(Reply(response(message_item({"type": "refusal", "refusal": refusal}))))
    else:
        fake.script(Reply(chat(refusal=refusal)))
    with pytest.raises(BackendError, match="refusal") as info:
        engine_for(fake, mode, api).complete(call())
    assert refusal in str(info.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"sentences": [{"text": "x", "cit', "not JSON"),
        ('{"answer": "Paris"}', "without a sentences list"),
        ('{"sentences": [{"text": "x", "citations": ["2"]}]}', "not {text, citations}"),
        ('{"sentences": [{"text": "x", "citations": [true]}]}', "not {text, citations}"),
        ('{"sentences": ["x"]}', "not {text, citations}"),
    ],
)
def test_json_that_is_not_the_schema_is_a_backend_error(
    fake: FakeAPI, text: str, match: str
) -> None:
    fake.script(answer("json_schema", "responses", text))
    with pytest.raises(BackendError, match=match) as info:
        engine_for(fake, "json_schema").complete(call())
    assert "OpenAI Responses API at https://api.openai.test/v1" in str(info.value)
    assert len(fake.seen) == 1  # not retried


def test_more_than_1000_sources_are_refused_before_any_request(fake: FakeAPI) -> None:
    many = [Source(text=f"Fact number {i}.") for i in range(MAX_SCHEMA_SOURCES + 1)]
    engine = engine_for(fake, "json_schema")
    with pytest.raises(ConfigurationError, match="1000") as info:
        engine.complete(call(sources=many))
    assert "enum" in str(info.value)
    with pytest.raises(ConfigurationError, match="1000"):
        anyio.run(engine.acomplete, call(sources=many))
    assert fake.seen == []
    ids = answer_schema(MAX_SCHEMA_SOURCES)["properties"]["sentences"]["items"]  # type: ignore[index]
    assert ids["properties"]["citations"]["items"]["enum"] == list(range(1, 1001))


def test_json_schema_needs_sources_and_refuses_a_prefix(fake: FakeAPI) -> None:
    engine = engine_for(fake, "json_schema")
    with pytest.raises(ConfigurationError, match=r"SegmentCall\.sources"):
        engine.complete(call(sources=()))
    with pytest.raises(ConfigurationError, match="cannot continue a prefix"):
        engine.complete(call("The Eiffel Tower [", grammar=GRAMMAR))
    assert fake.seen == []


def test_engines_say_whether_they_continue_a_prefix() -> None:
    assert OpenAIGrammarToolEngine.continues_prefix is True
    assert OpenAIJsonSchemaEngine.continues_prefix is False


# --------------------------------------------------------------------------- grammars


def test_an_unparsable_grammar_is_refused_before_any_request(
    fake: FakeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    import citebacktrack.backends._openai_grammar_tool as module

    monkeypatch.setattr(module, "emit", lambda grammar, dialect: "start: (\n")
    with pytest.raises(GrammarError, match="lark"):
        engine_for(fake, "cfg").complete(call())
    assert fake.seen == []


def test_the_lark_grammar_sent_accepts_the_recorded_answers() -> None:
    definition = emit(GRAMMAR, Dialect.LARK)
    assert lark_accepts(definition, GOOD)
    assert lark_accepts(definition, render_answer([("Paris is in France.", [1])]))
    assert not lark_accepts(definition, "The Eiffel Tower was completed in 1889.")
    prefix = "The Eiffel Tower was completed in 1889 ["
    rest = continuation_grammar(3, Policy(), prefix, allowed_ids={2}, bounded=True)
    assert lark_accepts(emit(rest, Dialect.LARK), "2]. It is 330 metres tall [2].")
    assert not lark_accepts(emit(rest, Dialect.LARK), "1]. It is 330 metres tall [2].")


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    ("sentences", "text"),
    [
        ([("The tower was completed in 1889.", [1, 2])], "The tower was completed in 1889 [1][2]."),
        ([("The tower was completed in 1889  ", [1])], "The tower was completed in 1889 [1]."),
        ([("Is it tall?", [2]), ("Yes!", [2])], "Is it tall [2]? Yes [2]!"),
        ([('He said "it is tall."', [3])], 'He said "it is tall." [3]'),
        ([("It stands in the U.S.", [1])], "It stands in the U.S. [1]."),
        ([("And so on...", [1])], "And so on... [1]."),
        ([("Dr. Smith built it.", [1, 1, 2])], "Dr. Smith built it [1][2]."),
        ([("It [3] is tall [see 2].", [2])], "It is tall (see 2) [2]."),
        ([("It is\ntall.", [2])], "It is tall [2]."),
        ([("It is tall. It is old.", [2])], "It is tall [2]. It is old [2]."),
        ([("No citation here.", []), ("   ", [1])], "No citation here."),
    ],
)
def test_render_answer_places_markers_before_the_final_terminator(
    sentences: list[tuple[str, list[int]]], text: str
) -> None:
    assert render_answer(sentences) == text


def test_rendered_markers_are_each_a_closed_marker_of_their_sentence() -> None:
    items = [
        ("The Eiffel Tower was completed in 1889.", [2, 1]),
        ('Gustave Eiffel said "it is tall."', [2]),
        ("It stands in the U.S.", [3]),
        ("Dr. Smith measured it at 330 metres", [2]),
        ("Really?!", [1]),
    ]
    parts = [render_answer([item]) for item in items]
    text = render_answer(items)
    assert text == " ".join(parts)
    starts = [len(" ".join(parts[:k]).encode()) + (1 if k else 0) for k in range(len(parts))]
    for strict in (True, False):
        _, closed = advance(TextState(strict=strict), text.encode(), 0)
        assert [m.source_index for m in closed] == [2, 1, 2, 3, 2, 1]
        assert [m.sentence_start for m in closed] == [starts[0], *starts]
        assert [m.prior_ids for m in closed] == [(), (2,), (), (), (), ()]
    assert lark_accepts(emit(GRAMMAR, Dialect.LARK), text)


# --------------------------------------------------------------------------- errors


def test_rate_limit_with_retry_after_is_retried_by_the_sdk(fake: FakeAPI) -> None:
    busy = {"error": {"message": "Rate limit reached", "type": "requests", "code": None}}
    fake.script(Reply(busy, 429, {"retry-after": "0.3"}), answer("cfg", "responses"))
    result = engine_for(fake, "cfg", max_retries=1).complete(call())
    assert result.text == GOOD
    first, second = fake.seen
    assert second.at - first.at >= 0.3
    assert second.body == first.body
    assert second.headers["x-stainless-retry-count"] == "1"


@pytest.mark.parametrize(
    ("replies", "options", "match", "cause", "tries"),
    [
        (
            [Reply({"error": {"message": "boom"}}, 500, {"retry-after-ms": "10"})] * 2,
            {"max_retries": 1},
            r"HTTP 500 after 1 retry: boom",
            "InternalServerError",
            2,
        ),
        (
            [Reply({"error": {"message": "slow down"}}, 429, {"retry-after-ms": "10"})],
            {"max_retries": 0},
            r"rate limiting \(HTTP 429\) after 0 retries: slow down",
            "RateLimitError",
            1,
        ),
        (
            [
                Reply(
                    {"error": {"message": "Invalid grammar", "type": "invalid_request_error"}}, 400
                )
            ],
            {"max_retries": 2},
            r"HTTP 400: Invalid grammar; check model='gpt-5' \(it must support custom tools",
            "BadRequestError",
            1,
        ),
        (
            [Reply(error=httpx2.ReadTimeout("timed out"))],
            {"max_retries": 0, "timeout": 5.0},
            r"did not answer within 5 s \(after 0 retries\)",
            "APITimeoutError",
            1,
        ),
        (
            [Reply(error=httpx2.ReadError("[Errno 104] Connection reset by peer"))] * 2,
            {"max_retries": 1},
            r"connection to the OpenAI Responses API at .* failed \(after 1 retry\): "
            r"\[Errno 104\] Connection reset by peer",
            "APIConnectionError",
            2,
        ),
        (
            [Reply(response(tool_item(GOOD)), cut=True)],
            {"max_retries": 0},
            r"connection to the OpenAI Responses API .* complete body",
            "APIConnectionError",
            1,
        ),
        (
            [Reply(b'{"id": "resp_1", "object": "response", "output": [{"type": "cus')],
            {"max_retries": 2},
            r"sent a response that is not JSON",
            "BackendError",
            1,
        ),
    ],
)
def test_failures_are_backend_errors_with_the_cause_chained(
    fake: FakeAPI,
    replies: list[Reply],
    options: dict[str, Any],
    match: str,
    cause: str,
    tries: int,
) -> None:
    fake.script(*replies)
    with pytest.raises(BackendError, match=match) as info:
        engine_for(fake, "cfg", **options).complete(call())
    assert type(info.value.__cause__).__name__ == cause
    assert len(fake.seen) == tries


def test_a_refused_sampling_field_points_at_send_sampling(fake: FakeAPI) -> None:
    refused = {"error": {"message": "Unsupported parameter: 'temperature' is not supported."}}
    fake.script(Reply(refused, 400))
    with pytest.raises(BackendError, match="send_sampling=False"):
        engine_for(fake, "json_schema").complete(call())


def test_a_planted_key_never_appears_in_errors_or_reprs(fake: FakeAPI) -> None:
    echoed = {"error": {"message": f"Incorrect API key provided: {API_KEY}."}}
    fake.script(
        Reply(echoed, 401),
        Reply(echoed, 500),
        Reply(b"<html>" + API_KEY.encode() + b"</html>"),
        Reply({**response(), "status": "failed", "error": {"message": API_KEY}}),
        Reply(response(message_item({"type": "refusal", "refusal": f"no {API_KEY}"}))),
        answer("json_schema", "responses", f'{{"sentences": "{API_KEY}"}}'),
        Reply(error=httpx2.ReadError(f"reset {API_KEY}")),
    )
    engine = engine_for(fake, "json_schema", max_retries=0)
    errors = []
    for _ in range(7):
        with pytest.raises(BackendError) as info:
            engine.complete(call())
        errors.append(info.value)
    assert "HTTP 401" in str(errors[0])
    assert "***" in str(errors[0])
    for error in errors:
        shown = str(error) + repr(error) + "".join(traceback.format_exception(error))
        assert API_KEY not in shown
    assert API_KEY not in repr(engine)
    assert BASE_URL in repr(engine)
    assert API_KEY not in repr(OpenAIBackend(engine))


# --------------------------------------------------------------------------- async


@pytest.mark.parametrize(("mode", "api"), COMBOS)
def test_async_sends_the_same_request_and_reads_the_same_answer(
    fake: FakeAPI, mode: str, api: str
) -> None:
    fake.script(answer(mode, api), answer(mode, api))
    engine = engine_for(fake, mode, api)
    sync = engine.complete(call(seed=5))
    asynchronous = anyio.run(engine.acomplete, call(seed=5))
    assert asynchronous == sync
    assert fake.seen[0].body == fake.seen[1].body
    assert fake.seen[0].path == fake.seen[1].path


def test_async_maps_errors(fake: FakeAPI) -> None:
    down = Reply({"error": {"message": "boom"}}, 500, {"retry-after-ms": "10"})
    fake.script(down, down, Reply(b"{"), Reply(error=httpx2.ReadTimeout("timed out")))
    engine = engine_for(fake, "cfg", "chat", max_retries=1, timeout=2.0)
    with pytest.raises(BackendError, match="HTTP 500 after 1 retry: boom"):
        anyio.run(engine.acomplete, call())
    with pytest.raises(BackendError, match="not JSON"):
        anyio.run(engine.acomplete, call())
    quick = engine_for(fake, "cfg", "chat", max_retries=0, timeout=2.0)
    with pytest.raises(BackendError, match="did not answer within 2 s") as info:
        anyio.run(quick.acomplete, call())
    assert isinstance(info.value.__cause__, openai.APITimeoutError)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"api": "completions"}, "api must be"),
        ({"timeout": 0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
    ],
)
def test_bad_configuration(fake: FakeAPI, options: dict[str, Any], match: str) -> None:
    for mode in MODES:
        with pytest.raises(ConfigurationError, match=match):
            engine_for(fake, mode, **options)


def test_clients_are_required_for_their_mode(fake: FakeAPI) -> None:
    with pytest.raises(ConfigurationError, match="needs a client"):
        OpenAIGrammarToolEngine(model="gpt-5")
    clients = fake.clients()
    sync_only = OpenAIJsonSchemaEngine(client=clients["client"], model="gpt-5")
    with pytest.raises(ConfigurationError, match="async client"):
        anyio.run(sync_only.acomplete, call())
    async_only = OpenAIJsonSchemaEngine(async_client=clients["async_client"], model="gpt-5")
    with pytest.raises(ConfigurationError, match="synchronous client"):
        async_only.complete(call())
    with pytest.raises(ConfigurationError, match="max_tokens"):
        sync_only.complete(call(max_tokens=0))
    assert fake.seen == []


def test_given_clients_keep_their_settings(fake: FakeAPI) -> None:
    clients = fake.clients()
    before = (clients["client"].max_retries, clients["client"].timeout)
    OpenAIGrammarToolEngine(**clients, model="gpt-5", max_retries=0, timeout=1.0)
    assert (clients["client"].max_retries, clients["client"].timeout) == before


def test_openai_backend_picks_the_engine_by_mode(fake: FakeAPI) -> None:
    assert isinstance(OpenAIBackend(mode="cfg", **fake.clients(), model="g").engine,
                      OpenAIGrammarToolEngine)  # fmt: skip
    backend = OpenAIBackend(mode="json_schema", **fake.clients(), model="g", api="chat")
    assert isinstance(backend.engine, OpenAIJsonSchemaEngine)
    assert backend.engine.api == "chat"
    served = OpenAIBackend(client=openai.OpenAI(base_url="http://127.0.0.1:1/v1", api_key="x"),
                           model="m")  # fmt: skip
    assert isinstance(served.engine, OpenAICompatibleEngine)
    with pytest.raises(ConfigurationError, match="mode must be"):
        OpenAIBackend(mode="assistants", **fake.clients(), model="g")
    with pytest.raises(ConfigurationError, match="not both"):
        OpenAIBackend(backend.engine, mode="cfg")
    with pytest.raises(ConfigurationError, match="hosted"):
        OpenAIBackend.from_env(model="g", mode="server")  # type: ignore[arg-type]


def test_from_env_needs_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        OpenAIJsonSchemaEngine.from_env(model="gpt-5")
    monkeypatch.setenv("OPENAI_API_KEY", "  ")
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        OpenAIBackend.from_env(model="gpt-5", mode="cfg")


def test_from_env_builds_and_closes_its_own_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_openai_engine import FakeServer
    from test_openai_engine import Reply as ServerReply

    server = FakeServer()
    try:
        monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        server.script(
            ServerReply(response(tool_item(GOOD))), ServerReply(response(tool_item("x [1].")))
        )
        backend = OpenAIBackend.from_env(model="gpt-5", mode="cfg", max_retries=0)
        engine = backend.engine
        assert isinstance(engine, OpenAIGrammarToolEngine)
        assert engine.complete(call()).text == GOOD
        assert anyio.run(engine.acomplete, call()).text == "x [1]."
        assert [s.path for s in server.seen] == ["/v1/responses"] * 2
        assert server.seen[0].headers["authorization"] == f"Bearer {API_KEY}"
        assert API_KEY not in repr(engine)
        anyio.run(backend.aclose)  # it built the clients, so it closes them
        with pytest.raises(BackendClosedError):
            engine.complete(call())
        with pytest.raises(BackendClosedError):
            anyio.run(engine.acomplete, call())
    finally:
        server.close()


def test_close_leaves_injected_clients_open(fake: FakeAPI) -> None:
    fake.script(answer("cfg", "responses"))
    engine = engine_for(fake, "cfg")
    engine.close()
    anyio.run(engine.aclose)
    assert engine.complete(call()).text == GOOD


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("api", APIS)
def test_json_schema_end_to_end_replaces_an_unsupported_citation(fake: FakeAPI, api: str) -> None:
    recorded = json.dumps(
        {
            "sentences": [
                {"text": "The Eiffel Tower was completed in 1889.", "citations": [1]},
                {"text": "It is 330 metres tall.", "citations": [2]},
            ]
        }
    )
    fake.script(answer("json_schema", api, recorded), answer("json_schema", api, recorded))
    cf = Citeformer(OpenAIBackend(mode="json_schema", api=api, **fake.clients(), model="gpt-5"))
    events = list(cf.stream(QUESTION, SOURCES))
    final = events[-1].answer  # type: ignore[union-attr]
    assert final.text == GOOD
    assert [c.source_index for c in final.citations] == [2, 2]
    assert [e.source_index for e in events if isinstance(e, CitationRejected)] == [1]
    assert final.trace.rejections == 1
    assert any(e.kind == "rejection" and e.source_index == 1 for e in final.trace.entries)
    assert len(fake.seen) == 1  # one call, revised by the validator
    assert final.stop_reason is StopReason.END

    async def main() -> Any:
        return await cf.agenerate(QUESTION, SOURCES)

    assert anyio.run(main) == final


@pytest.mark.parametrize("api", APIS)
def test_cfg_end_to_end_resubmits_with_only_supported_ids(fake: FakeAPI, api: str) -> None:
    fake.script(
        answer(
            "cfg", api, "The Eiffel Tower was completed in 1889 [1]. It is 330 metres tall [2]."
        ),
        answer("cfg", api, "2]. It is 330 metres tall [2]."),
    )
    cf = Citeformer(OpenAIBackend(mode="cfg", api=api, **fake.clients(), model="gpt-5"))
    events = list(cf.stream(QUESTION, SOURCES))
    final = events[-1].answer  # type: ignore[union-attr]
    assert final.text == GOOD
    assert [c.source_index for c in final.citations] == [2, 2]
    assert [e.source_index for e in events if isinstance(e, CitationRejected)] == [1]
    assert len(fake.seen) == 2
    first, second = (s.body for s in fake.seen)
    assert roles(first) == [m.role for m in MESSAGES]
    prefix = "The Eiffel Tower was completed in 1889 ["
    turns = second["input" if api == "responses" else "messages"]
    assert [t["role"] for t in turns] == [*(m.role for m in MESSAGES), "user"]
    assert turns[-1]["content"].endswith(f"<answer-so-far>{prefix}</answer-so-far>")
    tool = second["tools"][0] if api == "responses" else second["tools"][0]["custom"]
    fmt = tool["format"]
    definition = fmt["definition"] if api == "responses" else fmt["grammar"]["definition"]
    allowed = continuation_grammar(3, Policy(), prefix, allowed_ids={2}, bounded=True)
    assert definition == emit(allowed, Dialect.LARK)
    assert final.trace.backtracks == 1
    assert final.usage.forward_passes == 2
