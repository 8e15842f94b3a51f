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
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from typing import Self

import anyio
import anyio.to_thread

from citebacktrack.answer import acollect, collect
from citebacktrack.errors import ConfigurationError
from citebacktrack.request import GenerationRequest
from citebacktrack.types import Answer, ChatMessage, Event

__all__ = ["Backend", "ChatMessage", "GenerationRequest", "iterate_in_thread"]


async def iterate_in_thread(iterator: Iterator[Event]) -> AsyncGenerator[Event, None]:
    """Pull ``iterator`` one item per worker-thread hop, so the event loop never blocks.

    However it ends (exhausted, an error, cancelled, or closed with ``aclose()``) it closes
    ``iterator`` before it returns, so the stream's cleanup has run by then. A step in
    flight when the caller is cancelled finishes first (a thread cannot be interrupted).
    """
    try:
        while True:
            event = await anyio.to_thread.run_sync(next, iterator, None)
            if event is None:
                return
            yield event
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            # Shielded: in a cancelled scope an unshielded await would raise at once and
            # leave the stream open (its cleanup deferred to the garbage collector).
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(close)


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
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
        answers: list[Answer | None] = [None] * len(requests)
        limit = anyio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with limit:
                answers[i] = await self.agenerate(requests[i])

        async with anyio.create_task_group() as group:
            for i in range(len(requests)):
                group.start_soon(one, i)
        return [a for a in answers if a is not None]
