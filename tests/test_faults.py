"""Faults on the API and server paths, end to end through ``Citeformer``.

Every backend that talks HTTP (``OpenAIBackend`` on a server, its hosted ``cfg`` and
``json_schema`` modes, ``AnthropicBackend`` with and without ``stream=True``) is built the
way users build it (``from_base_url`` / ``from_env``) and pointed at a loopback server
(:mod:`http_faults`) that answers late, stalls or resets half-way through a body, rate
limits with ``Retry-After``, fails with 5xx, or sends something that is not JSON. Each
time the caller gets a :class:`BackendError` with the cause chained, the attempts the
server saw are ``1 + max_retries`` (retried faults) or 1, it comes promptly, and no
``Done`` is ever yielded, so a partial answer is never presented as a whole one.

The engine-level cases (``complete``/``acomplete`` over mock transports) are in
``test_openai_engine.py``, ``test_openai_hosted.py`` and ``test_anthropic_backend.py``;
these add the socket level and the ``Citeformer`` level. The slow tests kill and
freeze a real ``python -m llama_cpp.server`` (:class:`LlamaCppServer`) while an answer is
in flight.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
httpx2 = pytest.importorskip("httpx2")

from citebacktrack import Budgets, Citeformer, Done, Source, Started, TextDelta  # noqa: E402
from citebacktrack.backends import AnthropicBackend, Backend, OpenAIBackend  # noqa: E402
from citebacktrack.errors import BackendError, MissingDependencyError, ModelLoadError  # noqa: E402
from citebacktrack.segments import SegmentCall, SegmentResult  # noqa: E402
from citebacktrack.types import Event  # noqa: E402
from http_faults import FaultServer, Reply  # noqa: E402
from test_anthropic_backend import SOURCES as ANTHROPIC_SOURCES  # noqa: E402
from test_anthropic_backend import message, sse, sse_events  # noqa: E402
from test_openai_engine import completion  # noqa: E402
from test_openai_hosted import SOURCES as HOSTED_SOURCES  # noqa: E402
from test_openai_hosted import answer as hosted_answer  # noqa: E402

KEY = "sk-test-Faults0123456789abcdefSECRET"
TIMEOUT = 0.2
"""Seconds per attempt for the timeout and stall faults."""
RETRY_AFTER = 0.2
"""Seconds the 429 asks the client to wait."""
PROMPTLY = 6.0
"""No fault here may take longer than this to reach the caller."""
SERVER_SOURCES = [
    Source(title="Paris", text="Paris is in France."),
    Source(title="Rome", text="Rome is in Italy."),
]


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class Kind:
    """A backend as users build it, and the replies of one whole answer from it."""

    name: str
    sources: Sequence[Source]
    answer: tuple[Reply, ...]
    """A whole answer's replies in order; a fault damages the last one."""
    error_body: object
    streams: bool = False
    """The answer comes as server-sent events: a fault after the headers is not retried."""

    @property
    def released(self) -> int:
        """Calls that succeed before the faulty one."""
        return len(self.answer) - 1


def _anthropic_error(kind: str, text: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": text}}


KINDS = {
    # Two sentences come back whole before the third call fails: the first is released
    # to a stream, and the answer is still not presented as complete.
    "server": Kind(
        "server",
        SERVER_SOURCES,
        (
            Reply(completion("Paris is in France [1")),
            Reply(completion(". Rome is in Italy [2")),
            Reply(completion(".")),
        ),
        {"error": {"message": "trouble"}},
    ),
    "cfg": Kind(
        "cfg",
        HOSTED_SOURCES,
        (Reply(hosted_answer("cfg", "responses").body),),
        {"error": {"message": "trouble"}},
    ),
    "json_schema": Kind(
        "json_schema",
        HOSTED_SOURCES,
        (Reply(hosted_answer("json_schema", "responses").body),),
        {"error": {"message": "trouble"}},
    ),
    "anthropic": Kind(
        "anthropic",
        ANTHROPIC_SOURCES,
        (Reply(message()),),
        _anthropic_error("api_error", "trouble"),
    ),
    "anthropic stream": Kind(
        "anthropic stream",
        ANTHROPIC_SOURCES,
        (Reply(sse(sse_events(message())), content_type="text/event-stream"),),
        _anthropic_error("api_error", "trouble"),
        streams=True,
    ),
}
QUESTION = "When was the Eiffel Tower completed, and how tall is it?"


@pytest.fixture(scope="module")
def shared_server() -> Iterator[FaultServer]:
    with FaultServer() as fake:
        yield fake


@pytest.fixture
def server(shared_server: FaultServer) -> FaultServer:
    shared_server.reset()
    return shared_server


def make_backend(
    kind: str, server: FaultServer, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> Backend:
    """A backend of ``kind`` on ``server``, built as users build it (so it owns its
    clients and opens an async client per call), with the engine's ``options``."""
    if kind == "server":
        return OpenAIBackend.from_base_url(server.url, model="smollm2", **options)
    if kind in ("cfg", "json_schema"):
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        return OpenAIBackend.from_env(model="gpt-5", mode=kind, **options)  # type: ignore[arg-type]
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    return AnthropicBackend.from_env(
        model="claude-sonnet-4-6",
        base_url=server.root,
        stream=kind == "anthropic stream",
        **options,
    )


@pytest.fixture
def build(server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Backend]:
    """Builds a backend of a kind on ``server`` with the engine's options."""

    def make(kind: str, **options: Any) -> Backend:
        return make_backend(kind, server, monkeypatch, **options)

    return make


def consume(backend: Backend, sources: Sequence[Source], mode: str) -> tuple[list[Event], Any]:
    """Ask through ``Citeformer`` in ``mode``; the events seen and the answer or the error."""
    cf = Citeformer(backend, scorer=None)
    seen: list[Event] = []
    try:
        if mode == "generate":
            return seen, cf.generate(QUESTION, sources)
        if mode == "stream":
            for event in cf.stream(QUESTION, sources):
                seen.append(event)
            return seen, seen[-1]

        async def main() -> Any:
            if mode == "agenerate":
                return await cf.agenerate(QUESTION, sources)
            async for event in cf.astream(QUESTION, sources):
                seen.append(event)
            return seen[-1]

        return seen, anyio.run(main)
    except Exception as exc:  # handed to the test
        return seen, exc


# --------------------------------------------------------------------------- faults


def _stall(good: Reply) -> Reply:
    return dataclasses.replace(good, partial=len(good.data()) // 2, then="stall", stall=3.0)


def _reset(good: Reply) -> Reply:
    return dataclasses.replace(good, partial=len(good.data()) // 2, then="reset")


def _malformed(kind: Kind, good: Reply) -> Reply:
    if kind.streams:
        head = sse(sse_events(message())[:3])
        return dataclasses.replace(good, body=head + b"event: content_block_delta\ndata: {oops\n\n")
    return dataclasses.replace(good, body=good.data()[: len(good.data()) // 2])


@dataclass(frozen=True)
class Fault:
    name: str
    reply: Callable[[Kind, Reply], Reply]
    retried: Literal["always", "unless streamed", "never"]
    """Whether the SDK retries it: a fault before the headers always; one in the body
    unless the body is a stream under way; a body that is not JSON never."""
    says: str
    cause: Callable[[Kind], tuple[type[BaseException], ...]]


def _sdk(kind: Kind) -> Any:
    return anthropic if kind.name.startswith("anthropic") else openai


FAULTS = {
    "timeout": Fault(
        "timeout",
        lambda kind, good: dataclasses.replace(good, delay=3.0),
        "always",
        rf"did not answer within {TIMEOUT:g} s \(after 1 retry\)",
        lambda kind: (_sdk(kind).APITimeoutError,),
    ),
    "stall mid-body": Fault(
        "stall mid-body",
        lambda kind, good: _stall(good),
        "unless streamed",
        rf"did not answer within {TIMEOUT:g} s \(after 1 retry\)|stalled for more than",
        lambda kind: (httpx2.ReadTimeout,) if kind.streams else (_sdk(kind).APITimeoutError,),
    ),
    "reset mid-body": Fault(
        "reset mid-body",
        lambda kind, good: _reset(good),
        "unless streamed",
        r"connection to .* failed \(after 1 retry\)|broke off",
        lambda kind: (httpx2.TransportError,) if kind.streams else (_sdk(kind).APIConnectionError,),
    ),
    "429 retry-after": Fault(
        "429 retry-after",
        lambda kind, good: Reply(
            _anthropic_error("rate_limit_error", "slow down")
            if kind.name.startswith("anthropic")
            else {"error": {"message": "slow down"}},
            429,
            {"retry-after": f"{RETRY_AFTER:g}"},
        ),
        "always",
        r"rate limiting \(HTTP 429\) after 1 retry: slow down",
        lambda kind: (_sdk(kind).RateLimitError,),
    ),
    "503": Fault(
        "503",
        lambda kind, good: Reply(kind.error_body, 503, {"retry-after-ms": "10"}),
        "always",
        r"HTTP 503 after 1 retry: trouble",
        lambda kind: (_sdk(kind).InternalServerError,),
    ),
    "malformed JSON": Fault(
        "malformed JSON",
        _malformed,
        "never",
        r"not JSON",
        lambda kind: (BackendError, ValueError),
    ),
}
# The faults that wait out a timeout or a backoff run sync with a retry and async without
# (the quick ones retry async too); agenerate is astream collected, so it is left out.
SLOW_FAULTS = ("timeout", "stall mid-body", "reset mid-body")
CASES = [
    pytest.param(kind, fault, mode, id=f"{kind}-{fault}-{mode}")
    for kind in KINDS
    for fault in FAULTS
    for mode in (
        ("generate", "astream") if fault in SLOW_FAULTS else ("generate", "stream", "astream")
    )
]


@pytest.mark.parametrize(("kind_name", "fault_name", "mode"), CASES)
def test_a_fault_is_a_typed_error_with_its_cause_bounded_retries_and_no_answer(
    server: FaultServer, build: Callable[..., Backend], kind_name: str, fault_name: str, mode: str
) -> None:
    kind, fault = KINDS[kind_name], FAULTS[fault_name]
    bad = fault.reply(kind, kind.answer[-1])
    retries = 0 if fault_name in SLOW_FAULTS and mode == "astream" else 1
    retried = fault.retried == "always" or (fault.retried == "unless streamed" and not kind.streams)
    attempts = 1 + retries if retried else 1
    server.script(*kind.answer[:-1], *[bad] * attempts)
    with build(kind_name, timeout=TIMEOUT, max_retries=retries) as backend:
        started = time.monotonic()
        seen, outcome = consume(backend, kind.sources, mode)
        elapsed = time.monotonic() - started

    assert isinstance(outcome, BackendError), outcome
    assert type(outcome) is BackendError  # not a closed backend, not a configuration error
    says = fault.says.replace("after 1 retry", f"after {retries} retr(y|ies)")
    assert re.search(says, str(outcome)), str(outcome)
    assert isinstance(outcome.__cause__, fault.cause(kind)), repr(outcome.__cause__)
    assert KEY not in str(outcome)
    # Bounded: one attempt and max_retries retries where the SDK retries, else one.
    assert len(server.seen) == kind.released + attempts
    assert elapsed < PROMPTLY
    if fault_name == "429 retry-after":
        assert elapsed >= RETRY_AFTER  # the Retry-After was honoured
    # Never presented as complete: no Done; a stream showed at most the released sentences.
    assert not any(isinstance(e, Done) for e in seen)
    if mode in ("stream", "astream") and kind.released >= 2:
        text = "".join(e.text for e in seen if isinstance(e, TextDelta))
        assert text == "Paris is in France [1]."  # the sentence before the fault, alone


@pytest.mark.parametrize("kind_name", KINDS)
@pytest.mark.parametrize("max_retries", [0, 3])
def test_retries_are_bounded_by_max_retries(
    server: FaultServer, build: Callable[..., Backend], kind_name: str, max_retries: int
) -> None:
    kind = KINDS[kind_name]
    down = Reply(kind.error_body, 503, {"retry-after-ms": "5"})
    server.script(*kind.answer[:-1], *[down] * 10)
    with build(kind_name, max_retries=max_retries) as backend:
        _, outcome = consume(backend, kind.sources, "generate")
    assert isinstance(outcome, BackendError)
    assert f"after {max_retries} retr" in str(outcome)
    assert len(server.seen) == kind.released + 1 + max_retries


@pytest.mark.parametrize("kind_name", KINDS)
@pytest.mark.parametrize("mode", ["generate", "astream"])
def test_a_429_with_retry_after_then_success_gives_the_whole_answer(
    server: FaultServer, build: Callable[..., Backend], kind_name: str, mode: str
) -> None:
    kind = KINDS[kind_name]
    busy = FAULTS["429 retry-after"].reply(kind, kind.answer[0])
    server.script(busy, *kind.answer)
    with build(kind_name, max_retries=1) as backend:
        started = time.monotonic()
        _, outcome = consume(backend, kind.sources, mode)
        elapsed = time.monotonic() - started
    if isinstance(outcome, Done):
        outcome = outcome.answer
    assert not isinstance(outcome, Exception), outcome
    assert outcome.text
    assert outcome.citations
    assert len(server.seen) == 1 + len(kind.answer)
    assert server.seen[1].body == server.seen[0].body  # the same request, retried
    assert RETRY_AFTER <= elapsed < PROMPTLY


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(-1, id="no message_stop"),
        pytest.param(-2, id="no message_delta"),
        pytest.param(6, id="cut inside a content block"),
    ],
)
@pytest.mark.parametrize("mode", ["generate", "stream", "astream"])
def test_an_anthropic_stream_that_ends_without_its_final_event_is_never_an_answer(
    server: FaultServer, build: Callable[..., Backend], cut: int, mode: str
) -> None:
    events = sse_events(message())[:cut]
    server.script(Reply(sse(events), content_type="text/event-stream"))
    with build("anthropic stream", max_retries=2) as backend:
        seen, outcome = consume(backend, ANTHROPIC_SOURCES, mode)
    assert type(outcome) is BackendError, outcome
    assert "ended before message_stop" in str(outcome)
    assert isinstance(outcome.__cause__, BackendError)  # the assembler's own error, chained
    # Nothing of the half answer was shown, let alone a Done (only the numbered sources).
    assert [e for e in seen if not isinstance(e, Started)] == []
    assert len(server.seen) == 1  # a whole response came: nothing to retry


# --------------------------------------------------------------------------- a real server


def _start_server(**options: Any) -> Any:
    from citebacktrack.backends import LlamaCppServer

    try:
        return LlamaCppServer(n_ctx=4096, **options)
    except (MissingDependencyError, ModelLoadError) as exc:  # no server extra or no model
        pytest.skip(str(exc))


class Signalling:
    """A segment engine that says when its first call starts, then delegates."""

    continues_prefix = True

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.called = threading.Event()

    def complete(self, call: SegmentCall) -> SegmentResult:
        self.called.set()
        result: SegmentResult = self.engine.complete(call)
        return result

    async def acomplete(self, call: SegmentCall) -> SegmentResult:
        self.called.set()
        result: SegmentResult = await self.engine.acomplete(call)
        return result

    def close(self) -> None:
        self.engine.close()


LONG = Budgets(max_new_tokens=400)
"""Long enough that the answer is still being written when the server dies."""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["generate", "astream"])
def test_killing_the_server_mid_answer_is_a_prompt_typed_error(mode: str) -> None:
    server = _start_server()
    engine = Signalling(server.backend(timeout=120.0).engine)  # the default max_retries=2
    cf = Citeformer(OpenAIBackend(engine), budgets=LONG)
    question = "When was the Eiffel Tower completed, and how tall is it?"
    sources = [
        Source(title="Eiffel Tower", text="The Eiffel Tower was completed in 1889."),
        Source(title="Height", text="The Eiffel Tower is 330 metres tall."),
    ]
    seen: list[Event] = []
    outcome: list[object] = []

    def ask() -> None:
        try:
            if mode == "generate":
                outcome.append(cf.generate(question, sources))
                return

            async def main() -> None:
                async for event in cf.astream(question, sources):
                    seen.append(event)

            anyio.run(main)
            outcome.append(seen[-1])
        except Exception as exc:  # handed to the test thread
            outcome.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        assert engine.called.wait(60)
        time.sleep(0.3)  # the request is at the server, which is writing the answer
        pid = server.process.pid
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        asker.join(timeout=60)
        assert not asker.is_alive(), "the caller hung after the server died"
        waited = time.monotonic() - killed
    finally:
        server.process.kill()
        asker.join(timeout=60)

    (error,) = outcome
    assert type(error) is BackendError, error
    assert "connection to the llama.cpp server" in str(error)
    assert isinstance(error.__cause__, openai.APIConnectionError)
    assert waited < 15.0  # two retries' backoff, no timeout waited out
    assert not any(isinstance(e, Done) for e in seen)
    # The server object knows its process died, and closes without fuss, twice.
    assert not server.running
    assert server.process.returncode == -signal.SIGKILL
    assert "stopped" in repr(server)
    assert isinstance(server.log_tail(), str)
    started = time.monotonic()
    server.close()
    server.close()
    assert time.monotonic() - started < 5.0
    cf.backend.close()


@pytest.mark.slow
def test_a_frozen_server_times_out_with_bounded_retries_then_recovers() -> None:
    server = _start_server()
    question = "When was the Eiffel Tower completed?"
    sources = [Source(title="Eiffel Tower", text="The Eiffel Tower was completed in 1889.")]
    budgets = Budgets(max_new_tokens=16)
    try:
        with (
            server.backend(timeout=120.0, max_retries=0) as patient,
            server.backend(timeout=1.0, max_retries=1) as hasty,
        ):
            assert Citeformer(patient, budgets=budgets).generate(question, sources).usage
            os.kill(server.process.pid, signal.SIGSTOP)  # accepts connections, answers none
            try:
                started = time.monotonic()
                with pytest.raises(
                    BackendError, match=r"did not answer within 1 s \(after 1 retry\)"
                ) as info:
                    Citeformer(hasty, budgets=budgets).generate(question, sources)
                waited = time.monotonic() - started
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert isinstance(info.value.__cause__, openai.APITimeoutError)
            assert 2.0 <= waited < 8.0  # two attempts of 1 s and one backoff, no more
            assert server.running
            answer = Citeformer(patient, budgets=budgets).generate(question, sources)
            assert answer.usage.prompt_tokens > 0  # the thawed server answers again
    finally:
        server.close()
    assert not server.running
