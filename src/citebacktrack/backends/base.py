"""The :class:`Backend` ABC: one required streaming method, everything else derived.

``stream`` is the one method a backend must write: it yields events, never an answer.
``generate`` folds them into the :class:`~citebacktrack.types.Answer` with the one
answer builder (:mod:`citebacktrack.answer`), the same that serves ``Citeformer``'s
stream. ``astream`` runs it on a worker thread (one ``next()`` per hop, so the event loop is never
blocked) and ``agenerate`` collects ``astream``. Backends with a native async client
override ``astream`` only; sync and async then still share the same state machine.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from typing import Self

import anyio
import anyio.to_thread

from citebacktrack._arguments import Number
from citebacktrack._cancel import STOP, Stopped
from citebacktrack.answer import acollect, collect
from citebacktrack.request import GenerationRequest
from citebacktrack.types import Answer, ChatMessage, Event

__all__ = ["Backend", "ChatMessage", "GenerationRequest", "iterate_in_thread"]


async def iterate_in_thread(iterator: Iterator[Event]) -> AsyncGenerator[Event, None]:
    """Pull ``iterator`` one item per worker-thread hop, so the event loop never blocks.

    However it ends (exhausted, an error, cancelled by any idiom: ``asyncio.wait_for``,
    ``asyncio.timeout``, ``task.cancel()``, an anyio cancel scope, or closed with
    ``aclose()`` by an abandoned ``async for``) it closes ``iterator`` before it returns,
    so the stream's cleanup has run and no thread still works on it. Cancelled, it sets
    the step's stop flag (:mod:`citebacktrack._cancel`): a decode in flight stops at its
    next token step, the cancellation waits for that, and only then goes on as the
    caller's own exception (``TimeoutError``, ``CancelledError``). A step that never checks
    the flag (a scripted function that sleeps) finishes first: a thread cannot be
    interrupted.
    """
    stop = threading.Event()
    settled = threading.Event()  # no step of this stream runs on a thread
    settled.set()
    guard = threading.Lock()
    state = "idle"  # "queued" (handed to a thread), "running", "idle", "abandoned"

    def step() -> Event | None:
        nonlocal state
        with guard:
            if state == "abandoned":  # its caller left before a thread took it
                return None
            state = "running"
        token = STOP.set(stop)
        try:
            return next(iterator, None)
        except Stopped:
            return None
        finally:
            STOP.reset(token)
            with guard:
                state = "idle"
            settled.set()

    try:
        while True:
            with guard:
                state = "queued"
                settled.clear()
            # Abandoned on cancel: the cancellation reaches the caller's scope at once,
            # while ``finally`` below waits for the step it left on the thread.
            event = await anyio.to_thread.run_sync(step, abandon_on_cancel=True)
            if event is None:
                return
            yield event
    finally:
        stop.set()
        with guard:
            if state == "queued":  # cancelled before a thread started it: it never will
                state = "abandoned"
                settled.set()
        await _settle(settled)
        close = getattr(iterator, "close", None)
        if close is not None:
            await _through_cancel(close)


async def _through_cancel(fn: Callable[[], object]) -> None:
    """Run ``fn`` on a worker thread to its end, through any cancellation (raised after)."""
    done = threading.Event()

    def call() -> None:
        try:
            fn()
        finally:
            done.set()

    pending: BaseException | None = None
    with anyio.CancelScope(shield=True):
        try:
            await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class() as exc:
            pending = exc
    await _settle(done)
    if pending is not None:
        raise pending


async def _settle(flag: threading.Event) -> None:
    """Wait until ``flag`` is set without blocking the loop, through any cancellation.

    anyio's shield holds off its own cancel scopes, not asyncio's native ``cancel()``
    (``wait_for``, ``asyncio.timeout``): one of those is caught here and raised again once
    the flag is set, so a stream is never closed while its step still runs on a thread
    (``ValueError: generator already executing``).
    """
    pending: BaseException | None = None
    delay = 0.001
    with anyio.CancelScope(shield=True):
        while not flag.is_set():
            try:
                await anyio.sleep(delay)
            except anyio.get_cancelled_exc_class() as exc:
                pending = exc
            delay = min(2 * delay, 0.02)
    if pending is not None:
        raise pending


class Backend(ABC):
    """A model engine that turns a :class:`GenerationRequest` into stream events.

    A backend that holds a model, a context or a client frees it in :meth:`close`
    (idempotent; afterwards it refuses requests with
    :class:`~citebacktrack.errors.BackendClosedError`); every backend is a context
    manager::

        with LlamaCppBackend() as backend:
            ...
    """

    def close(self) -> None:  # noqa: B027 - a no-op unless the backend holds something
        """Free what this backend holds (model, context, client); safe to call twice.

        The base implementation holds nothing; backends that do override it.
        """

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @abstractmethod
    def stream(self, request: GenerationRequest) -> Iterator[Event]:
        """Yield events for ``request``: final text only, and ``Done`` last."""

    def generate(self, request: GenerationRequest) -> Answer:
        """Run ``request`` to the end and build its answer."""
        return collect(self.stream(request), request.sources)

    async def astream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Async :meth:`stream`: drives the sync stream on a worker thread, event by event."""
        async with contextlib.aclosing(iterate_in_thread(self.stream(request))) as events:
            async for event in events:
                yield event

    async def agenerate(self, request: GenerationRequest) -> Answer:
        """Async :meth:`generate`."""
        return await acollect(self.astream(request), request.sources)

    def generate_many(self, requests: Sequence[GenerationRequest]) -> list[Answer]:
        """Answer many requests, in order. The base class answers them one by one;
        engines that batch (vLLM) override it."""
        return [self.generate(request) for request in requests]

    async def agenerate_many(
        self, requests: Sequence[GenerationRequest], *, concurrency: int = 8
    ) -> list[Answer]:
        """Async :meth:`generate_many`: at most ``concurrency`` requests in flight."""
        concurrency = Number(8, whole=True, minimum=1)("concurrency", concurrency)
        answers: list[Answer | None] = [None] * len(requests)
        limit = anyio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with limit:
                answers[i] = await self.agenerate(requests[i])

        async with anyio.create_task_group() as group:
            for i in range(len(requests)):
                group.start_soon(one, i)
        return [a for a in answers if a is not None]
