"""Server-Sent Events from a stream of answer events: one frame per event.

Each frame is ``event: <type>`` and ``data: <the event's JSON>`` (the event's
``model_dump_json()``, one line), then a blank line, the wire format of the HTML
``EventSource`` and of ``sse-starlette``::

    from starlette.responses import StreamingResponse
    from citebacktrack.sse import sse_stream

    async def answers(request):
        events = cf.astream(question, sources)
        return StreamingResponse(sse_stream(events), media_type="text/event-stream")

A browser reads it with ``new EventSource(url)`` and
``source.addEventListener("text", ...)`` (and ``"started"``, ``"citation_accepted"``,
``"citation_rejected"``, ``"rollback"``, ``"done"``); the types and their JSON are in
``docs/api.md`` ("Stream events").
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

from pydantic import BaseModel

from citebacktrack.types import Event

__all__ = ["MEDIA_TYPE", "sse_frame", "sse_frames", "sse_stream"]

MEDIA_TYPE = "text/event-stream"
"""The content type of an SSE response."""


def sse_frame(event: Event) -> str:
    """One SSE frame for ``event``: ``event: <type>\\ndata: <json>\\n\\n``."""
    if not isinstance(event, BaseModel):
        raise TypeError(f"sse_frame takes a stream event, got {type(event).__name__}")
    # model_dump_json writes one line (JSON escapes every newline in strings).
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"


def sse_frames(events: Iterable[Event]) -> Iterator[str]:
    """The SSE frames of a sync stream (``cf.stream(...)``), one per event."""
    for event in events:
        yield sse_frame(event)


async def sse_stream(events: AsyncIterable[Event]) -> AsyncIterator[str]:
    """The SSE frames of an async stream (``cf.astream(...)``), one per event; closing it
    (a client that went away) closes ``events``, which stops the decode."""
    try:
        async for event in events:
            yield sse_frame(event)
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
