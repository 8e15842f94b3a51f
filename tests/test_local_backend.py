"""LocalBackend: one model, one decode at a time, from threads, tasks and event loops."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import anyio
import pytest

from citebacktrack.backends.base import GenerationRequest
from citebacktrack.backends.local import LocalBackend
from citebacktrack.backends.mock import ScriptedRuntime, _index_for, toy_vocabulary
from citebacktrack.decoding.runtime import Logits, TokenRuntime
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.types import Event
from helpers import request

SCRIPT = "Paris is the capital of France [1]. It has about two million people [2]."


class ExclusiveRuntime(ScriptedRuntime):
    """A scripted runtime (one KV cache) that counts its prefills."""

    def __init__(self, script: str) -> None:
        super().__init__(script, toy_vocabulary())
        self.prefills = 0

    def prefill(self, prompt: Sequence[int]) -> Logits:
        self.prefills += 1
        return super().prefill(prompt)


class SharedModelBackend(LocalBackend):
    """A LocalBackend whose every request runs on the same runtime (one KV cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.runtime = ExclusiveRuntime(SCRIPT)
        self.active = 0
        self.max_active = 0
        self._count_lock = threading.Lock()

    def _prepare(
        self, request: GenerationRequest
    ) -> tuple[TokenRuntime, VocabularyIndex, list[int], int | None]:
        return self.runtime, _index_for(self.runtime.vocabulary), [0], None

    def _decode(self, request: GenerationRequest) -> Iterator[Event]:
        with self._count_lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            yield from super()._decode(request)
        finally:
            with self._count_lock:
                self.active -= 1


def _expected_text() -> str:
    return SharedModelBackend().generate(request(3)).text


def test_many_more_concurrent_async_calls_than_worker_threads() -> None:
    """More concurrent ``agenerate`` calls than anyio's 40 worker threads all finish."""
    backend = SharedModelBackend()
    n_calls = 60
    expected = _expected_text()

    async def main() -> list[str]:
        texts: list[str] = []

        async def one() -> None:
            texts.append((await backend.agenerate(request(3))).text)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                for _ in range(n_calls):
                    group.start_soon(one)
        return texts

    texts = anyio.run(main)
    assert texts == [expected] * n_calls
    assert backend.max_active == 1
    assert backend.runtime.prefills == n_calls


def test_async_sync_and_second_event_loop_share_the_model() -> None:
    """Sync callers on threads and async callers on two loops never interleave decodes."""
    backend = SharedModelBackend()
    expected = _expected_text()
    results: list[str] = []
    results_lock = threading.Lock()

    def add(text: str) -> None:
        with results_lock:
            results.append(text)

    def sync_caller() -> None:
        for _ in range(5):
            add(backend.generate(request(3)).text)

    def loop_caller() -> None:
        async def main() -> None:
            async def one() -> None:
                add((await backend.agenerate(request(3))).text)

            with anyio.fail_after(120):
                async with anyio.create_task_group() as group:
                    for _ in range(10):
                        group.start_soon(one)

        anyio.run(main)

    threads = [threading.Thread(target=f) for f in (sync_caller, loop_caller, loop_caller)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in threads)
    assert results == [expected] * 25
    assert backend.max_active == 1


def test_cancelled_async_call_releases_the_model() -> None:
    """A task cancelled mid-stream gives the model back to the next caller."""
    backend = SharedModelBackend()

    async def main() -> str:
        with anyio.move_on_after(10):
            async for _ in backend.astream(request(3)):
                break  # abandon after the first event; the generator is closed below
        stream = backend.astream(request(3))
        with anyio.CancelScope() as scope:
            async for _ in stream:
                scope.cancel()
        await stream.aclose()
        with anyio.fail_after(30):
            return (await backend.agenerate(request(3))).text

    assert anyio.run(main) == _expected_text()
    assert backend.active == 0
    assert not backend._lock.locked()


@pytest.mark.parametrize("n_calls", [1, 3])
def test_astream_events_match_stream(n_calls: int) -> None:
    backend = SharedModelBackend()
    sync_events = [list(backend.stream(request(3))) for _ in range(n_calls)]

    async def main() -> list[list[object]]:
        return [[e async for e in backend.astream(request(3))] for _ in range(n_calls)]

    async_events = anyio.run(main)
    strip = [[type(e).__name__ for e in events] for events in sync_events]
    assert [[type(e).__name__ for e in events] for events in async_events] == strip
