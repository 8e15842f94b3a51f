"""Cancelling an async answer by every idiom a service uses, and loading the model off the
event loop (issue 21).

Each idiom raises its own exception (``TimeoutError``, ``CancelledError``; none for an
anyio scope that moves on), stops the decode within one token step, frees the model for
the next request and leaves no step running on a worker thread. The model here is a
scripted one that takes ``STEP_S`` per forward pass, on a real :class:`LocalBackend` (its
model lock and FIFO gate) and the real decoder; the embedded model is in
``tests/test_backends_real.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio
import pytest

from citebacktrack import BackendClosedError, Budgets, Citeformer, Source
from citebacktrack._cancel import STOP
from citebacktrack.backends.local import LocalBackend
from citebacktrack.backends.segment import SegmentBackend
from citebacktrack.decoding.runtime import Logits, TokenRuntime
from citebacktrack.request import GenerationRequest
from citebacktrack.segments import SegmentCall, SegmentResult
from citebacktrack.testing import ScriptedRuntime, default_vocabulary, index_for

STEP_S = 0.02
SOURCES = [Source(title="Eiffel Tower", text="The Eiffel Tower was completed in 1889.")]
QUESTION = "When was the Eiffel Tower completed?"
LONG = " ".join(["The Eiffel Tower was completed in 1889 [1]."] * 40)
SHORT = "The Eiffel Tower was completed in 1889 [1]."


class SlowRuntime(ScriptedRuntime):
    """A scripted model that takes ``STEP_S`` per forward pass, counting the passes and
    those that began after its caller's stop flag was set."""

    def __init__(self, script: str) -> None:
        super().__init__(script, default_vocabulary())
        self.passes = 0
        self.after_stop = 0

    def forward(self, tokens: Sequence[int]) -> Logits:
        stop = STOP.get()
        if stop is not None and stop.is_set():
            self.after_stop += 1
        time.sleep(STEP_S)
        self.passes += 1
        return super().forward(tokens)


class SlowBackend(LocalBackend):
    """A local backend over :class:`SlowRuntime`: one script per call, in order."""

    def __init__(self, *scripts: str) -> None:
        super().__init__(prefix_cache=False)
        self.scripts = list(scripts)
        self.runtimes: list[SlowRuntime] = []

    def _prepare(
        self, request: GenerationRequest
    ) -> tuple[TokenRuntime, object, list[int], int | None]:  # type: ignore[override]
        runtime = SlowRuntime(self.scripts.pop(0))
        self.runtimes.append(runtime)
        return runtime, index_for(runtime.vocabulary), [0], None


async def warmed(cf: Citeformer) -> None:
    """One whole answer first: the grammar is compiled before the timed call."""
    await cf.agenerate(QUESTION, SOURCES)


def stopped_within_one_step(runtime: SlowRuntime) -> None:
    """At most one forward pass (the step already under way) began after the stop flag was
    set, and the decode ended long before its script (hundreds of tokens) did."""
    assert runtime.after_stop <= 1, f"{runtime.after_stop} passes began after the stop"
    assert runtime.passes < 200, f"{runtime.passes} passes: the decode was not stopped"


async def next_answer_is_served(cf: Citeformer) -> None:
    """The model is free again: the next request is answered in full."""
    with anyio.fail_after(10):
        answer = await cf.agenerate(QUESTION, SOURCES)
    assert answer.text.startswith("The Eiffel Tower was completed in 1889")
    assert answer.citations


# --- every idiom, once on the scripted model and once on the embedded one --------------------

Idiom = Callable[[Citeformer, str, list[Source], float], Awaitable[None]]
"""Cancels an answer to ``question`` over ``sources`` after ``after`` seconds, one way."""


async def _wait_for(cf: Citeformer, question: str, sources: list[Source], after: float) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(cf.agenerate(question, sources), timeout=after)


async def _timeout(cf: Citeformer, question: str, sources: list[Source], after: float) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(after):
            async for _ in cf.astream(question, sources):
                pass

    with pytest.raises(TimeoutError):
        await bounded()


async def _task_cancel(cf: Citeformer, question: str, sources: list[Source], after: float) -> None:
    task = asyncio.create_task(cf.agenerate(question, sources))
    await asyncio.sleep(after)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _anyio_scope(cf: Citeformer, question: str, sources: list[Source], after: float) -> None:
    with anyio.move_on_after(after) as scope:
        await cf.agenerate(question, sources)
    assert scope.cancelled_caught


async def _abandoned(cf: Citeformer, question: str, sources: list[Source], after: float) -> None:
    events = cf.astream(question, sources)
    first = await anext(aiter(events))
    assert first.type == "started"
    second = await anext(aiter(events))
    assert second.type in ("citation_accepted", "text")  # the decode is under way
    await events.aclose()  # what `break` out of `async with aclosing(...)` does


EVERY_IDIOM = pytest.mark.parametrize(
    "idiom",
    [_wait_for, _timeout, _task_cancel, _anyio_scope, _abandoned],
    ids=["wait_for", "asyncio.timeout", "task.cancel", "anyio scope", "abandoned async for"],
)


@EVERY_IDIOM
def test_every_idiom_raises_its_own_exception_and_stops_the_decode(idiom: Idiom) -> None:
    backend = SlowBackend(SHORT, LONG, SHORT)
    cf = Citeformer(backend)

    async def main() -> None:
        await warmed(cf)
        await idiom(cf, QUESTION, SOURCES, 0.3)
        stopped_within_one_step(backend.runtimes[1])
        await next_answer_is_served(cf)

    asyncio.run(main())


def test_no_step_is_left_running_on_a_thread() -> None:
    backend = SlowBackend(SHORT, LONG, SHORT)
    cf = Citeformer(backend)

    async def main() -> None:
        await warmed(cf)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(cf.agenerate(QUESTION, SOURCES), timeout=0.2)
        runtime = backend.runtimes[1]
        seen = runtime.passes
        await asyncio.sleep(10 * STEP_S)
        assert runtime.passes == seen, "a forward pass ran after the call returned"
        assert backend._lock.acquire(blocking=False), "the model is still held"
        backend._lock.release()

    asyncio.run(main())


class SlowSegmentEngine:
    """A segment engine whose every call takes a while (an HTTP call to a busy server); it
    counts the calls begun and those cancelled mid-call."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0

    def complete(self, call: SegmentCall) -> SegmentResult:  # pragma: no cover - async only
        raise AssertionError("the async path must not block")

    async def acomplete(self, call: SegmentCall) -> SegmentResult:
        self.calls += 1
        try:
            await anyio.sleep(1.0)
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        return SegmentResult(text=" The Eiffel Tower was completed in 1889 [1", finish="stop")


def test_a_segment_backend_stops_within_one_call() -> None:
    engine = SlowSegmentEngine()
    cf = Citeformer(SegmentBackend(engine))

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(cf.agenerate(QUESTION, SOURCES), timeout=0.5)
        calls = engine.calls
        assert engine.cancelled == 1  # the call in flight was cancelled, not awaited
        await asyncio.sleep(0.3)
        assert engine.calls == calls  # and no call was begun after it

    asyncio.run(main())


# --- loading off the event loop ---------------------------------------------------------


class SlowLoad:
    """Stands in for the embedded model's load: blocks its thread for ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.loads = 0

    def __call__(self) -> SlowBackend:
        time.sleep(self.seconds)
        self.loads += 1
        return SlowBackend(SHORT, SHORT, SHORT)


async def ticks_during(awaitable: Awaitable[object]) -> int:
    """How many 10 ms ticks the event loop ran while ``awaitable`` was awaited."""
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await awaitable
    finally:
        done = True
        await task
    return ticks


def test_a_lazy_first_load_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    loader = SlowLoad(0.6)
    monkeypatch.setattr("citebacktrack.orchestrator._default_backend", loader)
    cf = Citeformer()  # the embedded model, loaded on first use

    async def main() -> None:
        ticks = await ticks_during(cf.agenerate(QUESTION, SOURCES))
        # A blocked loop ticks not at all while the 0.6 s load runs; a free one ~60 times.
        assert ticks >= 20, f"the loop ticked {ticks} times during a 0.6 s load"

    asyncio.run(main())
    assert loader.loads == 1


def test_aload_warms_up_once_for_concurrent_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    loader = SlowLoad(0.3)
    monkeypatch.setattr("citebacktrack.orchestrator._default_backend", loader)
    cf = Citeformer()

    async def main() -> None:
        ticks = await ticks_during(asyncio.gather(cf.aload(), cf.aload(), cf.aload()))
        assert ticks >= 10
        assert loader.loads == 1
        assert (await cf.agenerate(QUESTION, SOURCES)).citations  # no load at this call
        assert loader.loads == 1

    asyncio.run(main())


def test_load_is_explicit_and_chainable(monkeypatch: pytest.MonkeyPatch) -> None:
    loader = SlowLoad(0.0)
    monkeypatch.setattr("citebacktrack.orchestrator._default_backend", loader)
    cf = Citeformer().load()
    assert loader.loads == 1
    assert cf.generate(QUESTION, SOURCES).citations
    cf.close()
    with pytest.raises(BackendClosedError, match="closed"):
        cf.load()
    with pytest.raises(BackendClosedError, match="closed"):
        cf.astream(QUESTION, SOURCES)


# --- the embedded model (llama.cpp) -------------------------------------------------------

REAL_SOURCES = [
    Source(
        title="Eiffel Tower",
        text="The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was "
        "built from 1887 to 1889 by the company of the engineer Gustave Eiffel. The tower "
        "is 330 metres tall.",
    ),
    Source(title="Louvre", text="The Louvre is the world's most-visited museum, in Paris."),
]
REAL_QUESTION = "Who built the Eiffel Tower, when, and how tall is it?"


@pytest.fixture(scope="module")
def real_cf():  # type: ignore[no-untyped-def]
    from citebacktrack.backends.llamacpp import LlamaCppBackend

    with LlamaCppBackend(n_ctx=2048) as backend:
        yield Citeformer(backend, budgets=Budgets(max_new_tokens=60))


@pytest.fixture(scope="module")
def real_alone(real_cf: Citeformer) -> str:
    """The answer computed alone, before any cancellation."""
    return real_cf.generate(REAL_QUESTION, REAL_SOURCES).text


@pytest.mark.slow
@EVERY_IDIOM
def test_the_embedded_model_is_cancelled_by_every_idiom(
    real_cf: Citeformer, real_alone: str, idiom: Idiom
) -> None:
    async def main() -> str:
        await idiom(real_cf, REAL_QUESTION, REAL_SOURCES, 0.5)
        with anyio.fail_after(120):  # the model is free: the next answer is the same
            return (await real_cf.agenerate(REAL_QUESTION, REAL_SOURCES)).text

    assert asyncio.run(main()) == real_alone


@pytest.mark.slow
def test_the_embedded_model_loads_off_the_event_loop() -> None:
    cf = Citeformer()  # loads the embedded model on first use

    async def main() -> int:
        try:
            return await ticks_during(cf.aload())
        finally:
            cf.close()

    # Loading the GGUF and indexing its vocabulary takes about a second; a blocked loop
    # would not tick at all.
    assert asyncio.run(main()) >= 10
