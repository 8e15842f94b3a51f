"""The :class:`Backend` ABC: one required streaming method, everything else derived.

``stream`` is the one method a backend must write. ``generate`` collects it,
``astream`` runs it on a worker thread (one ``next()`` per hop, so the event loop is never
blocked) and ``agenerate`` collects ``astream``. Backends with a native async client
override ``astream`` only; sync and async then still share the same state machine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import anyio.to_thread

from citebacktrack.errors import BackendError
from citebacktrack.types import (
    Citation,
    CitationAccepted,
    CitationRejected,
    Done,
    Event,
    Policy,
    Rollback,
    TextDelta,
    Trace,
    Usage,
)

if TYPE_CHECKING:
    from citebacktrack.decoding.budgets import Budgets
    from citebacktrack.decoding.operators import Operator
    from citebacktrack.decoding.sampling import SamplingConfig
    from citebacktrack.grammar.ir import Grammar
    from citebacktrack.validation import CitationValidator

__all__ = [
    "Backend",
    "ChatMessage",
    "Completion",
    "GenerationRequest",
    "collect",
    "iterate_in_thread",
]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat turn."""

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """Everything a backend needs to produce one cited answer.

    The orchestrator builds it; backends own only the mechanism (how to constrain, how to
    roll back), never the policy (what counts as a valid citation lives in ``validator``).
    """

    messages: Sequence[ChatMessage]
    grammar: Grammar | None
    """The citation grammar; ``None`` decodes unconstrained with no marker checks (the
    raw-model baseline of ``citebacktrack eval``)."""
    policy: Policy
    n_sources: int
    validator: CitationValidator | None
    sampling: SamplingConfig
    budgets: Budgets
    operators: Sequence[Operator] = field(default_factory=tuple)
    source_ids: Sequence[str] = ()
    """Id of each source in order; defaults to ``"1".."n"``."""

    def __post_init__(self) -> None:
        if not self.source_ids:
            object.__setattr__(
                self, "source_ids", tuple(str(i) for i in range(1, self.n_sources + 1))
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion:
    """A collected stream: the final text and what the decoder reported."""

    text: str
    citations: tuple[Citation, ...]
    rejections: tuple[CitationRejected, ...]
    usage: Usage
    trace: Trace


def collect(events: Iterator[Event]) -> Completion:
    """Fold a stream into a :class:`Completion`.

    Raises:
        BackendError: the stream ended without ``Done``.
    """
    parts: list[str] = []
    citations: list[Citation] = []
    rejections: list[CitationRejected] = []
    for event in events:
        match event:
            case TextDelta(text=text):
                parts.append(text)
            case CitationAccepted(citation=citation):
                citations.append(citation)
            case CitationRejected():
                rejections.append(event)
            case Rollback():
                pass
            case Done(usage=usage, trace=trace):
                return Completion(
                    text="".join(parts),
                    citations=tuple(citations),
                    rejections=tuple(rejections),
                    usage=usage,
                    trace=trace,
                )
    raise BackendError(
        "a backend stream ended without a Done event; a Backend.stream implementation "
        "must yield Done last"
    )


async def iterate_in_thread(iterator: Iterator[Event]) -> AsyncIterator[Event]:
    """Pull ``iterator`` one item per worker-thread hop, so the event loop never blocks."""
    try:
        while True:
            event = await anyio.to_thread.run_sync(next, iterator, None)
            if event is None:
                return
            yield event
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            await anyio.to_thread.run_sync(close)


class Backend(ABC):
    """A model engine that turns a :class:`GenerationRequest` into stream events."""

    @abstractmethod
    def stream(self, request: GenerationRequest) -> Iterator[Event]:
        """Yield events for ``request``: final text only, and ``Done`` last."""

    def generate(self, request: GenerationRequest) -> Completion:
        """Run ``request`` to the end and collect the result."""
        return collect(self.stream(request))

    async def astream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Async :meth:`stream`: drives the sync stream on a worker thread, event by event."""
        async for event in iterate_in_thread(self.stream(request)):
            yield event

    async def agenerate(self, request: GenerationRequest) -> Completion:
        """Async :meth:`generate`."""
        parts: list[Event] = [event async for event in self.astream(request)]
        return collect(iter(parts))
