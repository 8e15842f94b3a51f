"""OpenAICompatibleEngine against an HTTP-level fake: a threaded http.server on 127.0.0.1.

The real ``openai`` SDK (and its httpx2 transport) sends every request, so the bodies
asserted here are what a llama.cpp or vLLM server receives, and retries, timeouts and cut
responses go through the SDK's own code.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import pytest

openai = pytest.importorskip("openai")

from citebacktrack.backends.openai import (  # noqa: E402
    OpenAICompatibleEngine,
    chatml,
    check_grammar_text,
)
from citebacktrack.errors import (  # noqa: E402
    BackendClosedError,
    BackendError,
    ConfigurationError,
    GrammarError,
)
from citebacktrack.grammar import Dialect, citation_grammar, emit  # noqa: E402
from citebacktrack.grammar.ir import Grammar, lit, repeat  # noqa: E402
from citebacktrack.segments import SegmentCall, SegmentResult  # noqa: E402
from citebacktrack.types import ChatMessage  # noqa: E402

API_KEY = "sk-test-Secret0123456789abcdef"
MESSAGES = (
    ChatMessage("system", "Cite sources as [N]."),
    ChatMessage("user", "Sources:\n[1] Paris is in France.\n\nQuestion: Where is Paris?"),
)
GRAMMAR = citation_grammar(3, bounded=True)


@dataclass
class Reply:
    """One scripted answer of the fake server."""

    body: object = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    cut: bool = False  # promise more bytes than are sent, then close


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeServer:
    """Answers POSTs with scripted replies and records what it received."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.seen: list[Seen] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.seen.append(Seen(self.path, headers, json.loads(raw or b"{}")))
                reply = fake.replies.popleft() if fake.replies else Reply({"no": "reply"}, 599)
                body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body)
                data = body.encode() if isinstance(body, str) else body
                time.sleep(reply.delay)
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data) + (50 if reply.cut else 0)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.close()


def engine_for(fake: FakeServer, **options: Any) -> OpenAICompatibleEngine:
    options.setdefault("model", "smollm2")
    return OpenAICompatibleEngine(
        client=openai.OpenAI(base_url=fake.url, api_key=API_KEY),
        async_client=openai.AsyncOpenAI(base_url=fake.url, api_key=API_KEY),
        **options,
    )


def completion(
    text: str, finish: str | None = "stop", usage: object = None, **choice: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 0,
        "model": "smollm2",
        "choices": [{"index": 0, "text": text, "finish_reason": finish, **choice}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def chat(content: str | None, finish: str = "stop", **choice: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": content}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "smollm2",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, **choice}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45},
    }


def call(prefix: str = "", **options: Any) -> SegmentCall:
    options.setdefault("max_tokens", 32)
    options.setdefault("grammar", GRAMMAR)
    return SegmentCall(messages=MESSAGES, prefix=prefix, **options)


def keys_of(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from keys_of(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from keys_of(inner)


# --- request bodies --------------------------------------------------------------------


def test_llamacpp_completions_body_is_exact(fake: FakeServer) -> None:
    fake.script(Reply(completion("Paris is in France [1", usage={"prompt_tokens": 50})))
    engine = engine_for(fake)
    engine.complete(call("Paris ", max_tokens=24, temperature=0.7, top_p=0.9, seed=7))
    (seen,) = fake.seen
    assert seen.path == "/v1/completions"
    assert seen.body == {
        "model": "smollm2",
        "prompt": chatml(MESSAGES, "Paris "),
        "max_tokens": 24,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["]"],
        "grammar": emit(GRAMMAR, Dialect.GBNF),
    }
    assert seen.headers["authorization"] == f"Bearer {API_KEY}"


def test_seed_is_omitted_when_none(fake: FakeServer) -> None:
    fake.script(Reply(completion("x [1")))
    engine_for(fake).complete(call())
    assert "seed" not in fake.seen[0].body


def test_vllm_completions_body_uses_structured_outputs(fake: FakeServer) -> None:
    fake.script(Reply(completion("Paris is in France [1", stop_reason="]")))
    engine_for(fake, server="vllm").complete(call(seed=3))
    (seen,) = fake.seen
    assert seen.path == "/v1/completions"
    assert seen.body == {
        "model": "smollm2",
        "prompt": chatml(MESSAGES, ""),
        "max_tokens": 32,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 3,
        "stop": ["]"],
        "structured_outputs": {"grammar": emit(GRAMMAR, Dialect.EBNF)},
        "add_special_tokens": False,
    }
    assert not [key for key in keys_of(seen.body) if key.startswith("guided")]


@pytest.mark.parametrize("server", ["llama.cpp", "vllm"])
def test_unconstrained_call_sends_no_grammar(fake: FakeServer, server: str) -> None:
    fake.script(Reply(completion("Paris is in France.", stop_reason=None)))
    result = engine_for(fake, server=server).complete(call(grammar=None, stop=()))
    assert result.finish == "end"
    body = fake.seen[0].body
    assert not {"grammar", "structured_outputs", "stop"} & set(body)


def test_vllm_lark_dialect_for_the_guidance_backend(fake: FakeServer) -> None:
    fake.script(Reply(completion("x [1", stop_reason="]")))
    engine_for(fake, server="vllm", grammar_dialect=Dialect.LARK).complete(call())
    assert fake.seen[0].body["structured_outputs"] == {"grammar": emit(GRAMMAR, Dialect.LARK)}


def test_vllm_chat_continues_the_final_assistant_message(fake: FakeServer) -> None:
    fake.script(Reply(chat("1", stop_reason="]")), Reply(chat("Paris is [", stop_reason="]")))
    engine = engine_for(fake, server="vllm", endpoint="chat")
    result = engine.complete(call("Paris is in France ["))
    assert result == SegmentResult(text="1", finish="stop", prompt_tokens=40, completion_tokens=5)
    seen = fake.seen[0]
    assert seen.path == "/v1/chat/completions"
    assert seen.body == {
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": MESSAGES[0].content},
            {"role": "user", "content": MESSAGES[1].content},
            {"role": "assistant", "content": "Paris is in France ["},
        ],
        "max_completion_tokens": 32,
        "temperature": 0.0,
        "top_p": 1.0,
        "stop": ["]"],
        "structured_outputs": {"grammar": emit(GRAMMAR, Dialect.EBNF)},
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    # The first segment has nothing to continue: a plain generation prompt.
    engine.complete(call(""))
    first = fake.seen[1].body
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    assert "continue_final_message" not in first
    assert "add_generation_prompt" not in first
    assert not [key for s in fake.seen for key in keys_of(s.body) if key.startswith("guided")]


def test_llamacpp_chat_needs_a_server_that_prefills(fake: FakeServer) -> None:
    with pytest.raises(ConfigurationError, match="assistant_prefill=True"):
        engine_for(fake, endpoint="chat")
    fake.script(Reply(chat("Paris is in France [1")))
    engine = engine_for(fake, endpoint="chat", assistant_prefill=True)
    assert engine.complete(call("Paris ")).finish == "stop"
    body = fake.seen[0].body
    assert body["messages"][-1] == {"role": "assistant", "content": "Paris "}
    assert body["grammar"] == emit(GRAMMAR, Dialect.GBNF)
    assert body["max_tokens"] == 32
    assert "continue_final_message" not in body


def test_extra_fields_are_sent_but_may_not_override(fake: FakeServer) -> None:
    fake.script(Reply(completion("x [1")))
    engine_for(fake, extra={"top_k": 1, "min_p": 0.0}).complete(call())
    assert fake.seen[0].body["top_k"] == 1
    assert fake.seen[0].body["min_p"] == 0.0
    with pytest.raises(ConfigurationError, match="guided"):
        engine_for(fake, server="vllm", extra={"guided_grammar": "root ::= x"})
    with pytest.raises(ConfigurationError, match="grammar"):
        engine_for(fake, extra={"grammar": "root ::= x"})


def test_chatml_renders_the_smollm2_template_form() -> None:
    # SmolLM2's GGUF template is plain ChatML when the first message is a system message
    # (it adds a default system turn otherwise); our prompts always start with one.
    assert chatml(MESSAGES, "Paris [") == (
        "<|im_start|>system\nCite sources as [N].<|im_end|>\n"
        f"<|im_start|>user\n{MESSAGES[1].content}<|im_end|>\n"
        "<|im_start|>assistant\nParis ["
    )


def test_custom_chat_template(fake: FakeServer) -> None:
    fake.script(Reply(completion("x [1")))
    engine = engine_for(fake, chat_template=lambda messages, prefix: f"Q{len(messages)}:{prefix}")
    engine.complete(call("A"))
    assert fake.seen[0].body["prompt"] == "Q2:A"


# --- responses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "choice", "expected"),
    [
        # llama.cpp servers report both a stop string and EOS as "stop".
        ("", {"text": "Paris is in France [1", "finish_reason": "stop"}, "stop"),
        ("Paris is in France [", {"text": "12", "finish_reason": "stop"}, "stop"),
        ("Paris is in France [1]", {"text": " It is big [2", "finish_reason": "stop"}, "stop"),
        ("Paris is in France [1]", {"text": ".", "finish_reason": "stop"}, "end"),
        ("Paris is in France [1]", {"text": "", "finish_reason": "stop"}, "end"),
        ("", {"text": "Paris is in France [1", "finish_reason": "length"}, "length"),
        # vLLM names the stop string, or null at EOS (or a stop token id).
        ("", {"text": "Paris [1", "finish_reason": "stop", "stop_reason": "]"}, "stop"),
        ("", {"text": "Done [1].", "finish_reason": "stop", "stop_reason": None}, "end"),
        ("", {"text": "Done [1].", "finish_reason": "stop", "stop_reason": 2}, "end"),
        # llama-server's own stop_type, where a route exposes it.
        ("", {"text": "Paris [1", "finish_reason": "stop", "stop_type": "word"}, "stop"),
        ("", {"text": "Done [1].", "finish_reason": "stop", "stop_type": "eos"}, "end"),
    ],
)
def test_finish_reason_mapping(
    fake: FakeServer, prefix: str, choice: dict[str, Any], expected: str
) -> None:
    fake.script(Reply(completion(**choice)))
    result = engine_for(fake).complete(call(prefix))
    assert result.finish == expected
    assert result.text == choice["text"]


def test_usage_is_reported(fake: FakeServer) -> None:
    usage = {"prompt_tokens": 57, "completion_tokens": 9, "total_tokens": 66}
    fake.script(Reply(completion("Paris [1", usage=usage)), Reply(completion("x [1")))
    engine = engine_for(fake)
    assert engine.complete(call()) == SegmentResult(
        text="Paris [1", finish="stop", prompt_tokens=57, completion_tokens=9
    )
    assert engine.complete(call()).prompt_tokens == 0  # no usage reported: unknown


def test_chat_null_content_is_empty_text(fake: FakeServer) -> None:
    fake.script(Reply(chat(None, stop_reason=None)))
    result = engine_for(fake, server="vllm", endpoint="chat").complete(call("Done [1]."))
    assert (result.text, result.finish) == ("", "end")


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (Reply(b'{"choices": [{"text": "Paris [1", "finish'), "not JSON"),
        (Reply(b"<html>Bad gateway</html>"), "not JSON"),
        (Reply([1, 2]), "JSON list"),
        (Reply({"object": "text_completion", "choices": []}), "without choices"),
        (Reply({"error": {"message": "model crashed"}}), "model crashed"),
        (Reply(completion("x", finish="abort")), "finish_reason 'abort'"),
        (Reply(completion("x", finish=None)), "finish_reason None"),
        (Reply({"choices": [{"index": 0, "finish_reason": "stop"}]}), "without text"),
        (Reply(completion("x [1", usage={"prompt_tokens": "many"})), "usage.prompt_tokens"),
    ],
)
def test_malformed_responses_are_backend_errors(fake: FakeServer, reply: Reply, match: str) -> None:
    fake.script(reply)
    with pytest.raises(BackendError, match=match) as info:
        engine_for(fake).complete(call())
    assert fake.url.removesuffix("/v1") in str(info.value)
    assert len(fake.seen) == 1  # a malformed answer is not retried


def test_cut_response_is_a_backend_error(fake: FakeServer) -> None:
    fake.script(Reply(completion("Paris is in France [1"), cut=True))
    with pytest.raises(BackendError, match="connection"):
        engine_for(fake, max_retries=0).complete(call())


# --- retries, timeouts ------------------------------------------------------------------


def test_rate_limit_with_retry_after_seconds_then_success(fake: FakeServer) -> None:
    busy = {"error": {"message": "slow down", "type": "rate_limit"}}
    fake.script(Reply(busy, 429, {"Retry-After": "0.3"}), Reply(completion("Paris [1")))
    started = time.monotonic()
    result = engine_for(fake, max_retries=1).complete(call())
    assert time.monotonic() - started >= 0.3
    assert result.text == "Paris [1"
    assert len(fake.seen) == 2
    assert fake.seen[1].body == fake.seen[0].body


def test_rate_limit_with_retry_after_http_date(fake: FakeServer) -> None:
    when = email.utils.formatdate(time.time() + 1, usegmt=True)
    fake.script(Reply({"error": {}}, 429, {"Retry-After": when}), Reply(completion("x [1")))
    assert engine_for(fake, max_retries=1).complete(call()).text == "x [1"
    assert len(fake.seen) == 2


def test_server_errors_are_retried_a_bounded_number_of_times(fake: FakeServer) -> None:
    down = Reply({"error": {"message": "overloaded"}}, 503, {"Retry-After-Ms": "10"})
    fake.script(down, down, down, Reply(completion("never [1")))
    with pytest.raises(BackendError, match=r"HTTP 503 after 2 retries: overloaded"):
        engine_for(fake, max_retries=2).complete(call())
    assert len(fake.seen) == 3


def test_client_errors_are_not_retried(fake: FakeServer) -> None:
    fake.script(Reply({"error": {"message": "unknown field"}}, 400), Reply(completion("x [1")))
    with pytest.raises(BackendError, match="HTTP 400: unknown field"):
        engine_for(fake, max_retries=2).complete(call())
    assert len(fake.seen) == 1


def test_timeout_is_a_backend_error(fake: FakeServer) -> None:
    fake.script(Reply(completion("late [1"), delay=1.5))
    started = time.monotonic()
    with pytest.raises(BackendError, match=r"did not answer within 0.2 s \(after 0 retries\)"):
        engine_for(fake, timeout=0.2, max_retries=0).complete(call())
    assert time.monotonic() - started < 1.2


def test_unreachable_server_is_a_backend_error() -> None:
    server = FakeServer()
    url = server.url
    server.close()
    engine = OpenAICompatibleEngine(
        client=openai.OpenAI(base_url=url, api_key=API_KEY), model="m", max_retries=0
    )
    with pytest.raises(BackendError, match=r"connection to the llama\.cpp server"):
        engine.complete(call())


# --- grammars ---------------------------------------------------------------------------


def test_unemittable_grammar_is_refused_before_any_request(fake: FakeServer) -> None:
    too_long = Grammar((("root", repeat(lit("a"), 0, 3000)),))
    with pytest.raises(GrammarError, match="2000"):
        engine_for(fake).complete(call(grammar=too_long))
    assert fake.seen == []


@pytest.mark.parametrize(
    ("server", "text"),
    [("llama.cpp", 'root ::= "a" ('), ("llama.cpp", 'root ::= "a"{5,2}'), ("vllm", "root ::= (")],
)
def test_unparsable_grammar_is_refused_before_any_request(
    fake: FakeServer, monkeypatch: pytest.MonkeyPatch, server: str, text: str
) -> None:
    import citebacktrack.backends._openai_server as module

    monkeypatch.setattr(module, "emit", lambda grammar, dialect: text)
    with pytest.raises(GrammarError):
        engine_for(fake, server=server).complete(call())
    assert fake.seen == []


@pytest.mark.parametrize(
    "text",
    [
        'root ::= "a" (',
        "root ::= foo",
        'item ::= "x"',
        'root ::= "a"\n| "b"',
        "root ::= *",
        'root ::= "a"{3000}',
        'root ::= "a"{5,2}',
        'root ::= "a" )',
        "root ::= <[12]>",
    ],
)
def test_gbnf_check_refuses(text: str) -> None:
    with pytest.raises(GrammarError, match="GBNF"):
        check_grammar_text(text, Dialect.GBNF)


@pytest.mark.parametrize(
    "text",
    ['root ::= "a" |\n  "b"', 'root ::= ("a"\n | "b") # note\n\nx ::= [^\\]]{2,} .\n'],
)
def test_gbnf_check_accepts(text: str) -> None:
    check_grammar_text(text, Dialect.GBNF)


def test_emitted_citation_grammars_pass_every_check() -> None:
    for dialect in (Dialect.GBNF, Dialect.EBNF, Dialect.LARK):
        check_grammar_text(emit(citation_grammar(5, bounded=True), dialect), dialect)
        check_grammar_text(emit(citation_grammar(5), dialect), dialect)


# --- secrets ----------------------------------------------------------------------------


def test_api_key_never_appears_in_errors_or_reprs(fake: FakeServer) -> None:
    echoed = {"error": {"message": f"Incorrect API key provided: {API_KEY}"}}
    fake.script(
        Reply(echoed, 401),
        Reply(echoed, 500),
        Reply({"error": {"message": API_KEY}}),
        Reply(b"not json " + API_KEY.encode()),
        Reply(completion("late"), delay=1.0),
    )
    engine = engine_for(fake, max_retries=0, timeout=0.3)
    errors = []
    for _ in range(5):
        with pytest.raises(BackendError) as info:
            engine.complete(call())
        errors.append(info.value)
    assert "HTTP 401" in str(errors[0])
    assert "***" in str(errors[0])
    for error in errors:
        shown = str(error) + repr(error) + "".join(traceback.format_exception(error))
        assert API_KEY not in shown
    assert API_KEY not in repr(engine)
    assert fake.url in repr(engine)


# --- configuration ----------------------------------------------------------------------


def test_clients_are_required_for_their_mode(fake: FakeServer) -> None:
    with pytest.raises(ConfigurationError, match="needs a client"):
        OpenAICompatibleEngine(model="m")
    sync_only = OpenAICompatibleEngine(
        client=openai.OpenAI(base_url=fake.url, api_key=API_KEY), model="m"
    )
    with pytest.raises(ConfigurationError, match="async client"):
        anyio.run(sync_only.acomplete, call())
    async_only = OpenAICompatibleEngine(
        async_client=openai.AsyncOpenAI(base_url=fake.url, api_key=API_KEY), model="m"
    )
    with pytest.raises(ConfigurationError, match="synchronous client"):
        async_only.complete(call())
    assert fake.seen == []


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"grammar_dialect": Dialect.EBNF}, "gbnf, not ebnf"),
        ({"server": "vllm", "grammar_dialect": Dialect.GBNF}, "ebnf, lark, not gbnf"),
        ({"grammar_dialect": "yacc"}, "grammar_dialect must be one of"),
        ({"server": "tgi"}, "server must be"),
        ({"endpoint": "responses"}, "endpoint must be"),
        ({"server": "vllm", "endpoint": "chat", "chat_template": chatml}, "chat_template"),
        ({"timeout": 0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
    ],
)
def test_bad_configuration(fake: FakeServer, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        engine_for(fake, **options)


def test_max_tokens_below_one_is_refused(fake: FakeServer) -> None:
    with pytest.raises(ConfigurationError, match="max_tokens"):
        engine_for(fake).complete(call(max_tokens=0))
    assert fake.seen == []


def test_given_clients_keep_their_settings(fake: FakeServer) -> None:
    client = openai.OpenAI(base_url=fake.url, api_key=API_KEY, max_retries=5, timeout=30.0)
    OpenAICompatibleEngine(client=client, model="m", max_retries=0, timeout=1.0)
    assert (client.max_retries, client.timeout) == (5, 30.0)


def test_from_base_url_builds_both_clients(fake: FakeServer) -> None:
    fake.script(Reply(completion("x [1")), Reply(completion("y [2")))
    engine = OpenAICompatibleEngine.from_base_url(fake.url, model="m", server="llama.cpp")
    assert engine.complete(call()).text == "x [1"
    assert anyio.run(engine.acomplete, call()).text == "y [2"
    assert fake.seen[0].headers["authorization"] == "Bearer unused"
    anyio.run(engine.aclose)  # it built the clients, so it closes them
    with pytest.raises(BackendClosedError):
        engine.complete(call())
    with pytest.raises(BackendClosedError):
        anyio.run(engine.acomplete, call())


def test_close_leaves_injected_clients_open(fake: FakeServer) -> None:
    fake.script(Reply(completion("x [1")))
    engine = engine_for(fake)
    engine.close()
    assert engine.complete(call()).text == "x [1"


# --- async ------------------------------------------------------------------------------


def test_acomplete_sends_the_same_request(fake: FakeServer) -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 3}
    fake.script(Reply(completion("Paris [1", usage=usage)), Reply(completion("Paris [1")))
    engine = engine_for(fake)
    result = anyio.run(engine.acomplete, call("A ", seed=1))
    assert result == SegmentResult(
        text="Paris [1", finish="stop", prompt_tokens=12, completion_tokens=3
    )
    engine.complete(call("A ", seed=1))
    assert fake.seen[0].body == fake.seen[1].body


def test_acomplete_maps_errors(fake: FakeServer) -> None:
    down = Reply({"error": {"message": "boom"}}, 500, {"Retry-After-Ms": "10"})
    fake.script(down, down, Reply(completion("x"), delay=1.0), Reply(b"{"))
    engine = engine_for(fake, max_retries=1, timeout=0.3)
    with pytest.raises(BackendError, match="HTTP 500 after 1 retry: boom"):
        anyio.run(engine.acomplete, call())
    with pytest.raises(BackendError, match="did not answer"):
        anyio.run(engine_for(fake, max_retries=0, timeout=0.3).acomplete, call())
    with pytest.raises(BackendError, match="not JSON"):
        anyio.run(engine.acomplete, call())


# --- an answer cut off mid-way ------------------------------------------------------------


def test_a_response_cut_mid_answer_is_an_error_never_a_partial_answer(fake: FakeServer) -> None:
    """The first segment arrives, the second's body is cut: the caller gets a typed
    error with its cause, and no Done (so no answer) is ever yielded."""
    from citebacktrack import Citeformer, Done, Source
    from citebacktrack.backends.openai import OpenAIBackend

    sources = [Source(text="Paris is in France."), Source(text="Rome is in Italy.")]
    fake.script(
        Reply(completion("Paris is in France [1")),
        Reply(completion(". Rome is in Italy [2"), cut=True),
    )
    backend = OpenAIBackend(engine=engine_for(fake, max_retries=0))
    cf = Citeformer(backend, scorer=None)
    seen: list[object] = []

    def consume() -> None:
        seen.extend(cf.stream("Where are Paris and Rome?", sources))

    with pytest.raises(BackendError, match="connection") as info:
        consume()
    assert info.value.__cause__ is not None
    assert not any(isinstance(e, Done) for e in seen)
    assert len(fake.seen) == 2

    fake.script(
        Reply(completion("Paris is in France [1")),
        Reply(completion(". Rome is in Italy [2"), cut=True),
    )
    with pytest.raises(BackendError):
        cf.generate("Where are Paris and Rome?", sources)


def test_vllm_server_shape_through_citeformer(fake: FakeServer) -> None:
    """vLLM's completions: ``stop_reason`` tells the ``]`` stop from the end of text."""
    from citebacktrack import Citeformer, Source
    from citebacktrack.backends.openai import OpenAIBackend

    sources = [Source(text="Paris is in France."), Source(text="Rome is in Italy.")]
    fake.script(
        Reply(completion("Paris is in France [1", stop_reason="]")),
        Reply(completion(".", stop_reason=None)),
    )
    backend = OpenAIBackend(engine=engine_for(fake, server="vllm", max_retries=0))
    answer = Citeformer(backend, scorer=None).generate("Where is Paris?", sources)
    assert answer.text == "Paris is in France [1]."
    assert [c.source_index for c in answer.citations] == [1]
    assert all("structured_outputs" in s.body for s in fake.seen)
    assert not any(k.startswith("guided_") for s in fake.seen for k in s.body)
