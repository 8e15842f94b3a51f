"""SegmentBackend: segment-level backtracking over any :class:`SegmentEngine`.

The engine (a llama.cpp or vLLM server behind the OpenAI protocol, an offline vLLM
engine, a test double) generates up to the next citation close; the shared
:class:`~citebacktrack.segments.SegmentLoop` validates each marker with the same
validator and rule as the token-level decoder and resubmits on rejection.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

from citebacktrack.backends.base import Backend
from citebacktrack.errors import ConfigurationError
from citebacktrack.request import GenerationRequest
from citebacktrack.segments import SegmentEngine, arun_segments, run_segments
from citebacktrack.types import Event

__all__ = ["SegmentBackend"]


class SegmentBackend(Backend):
    """A backend that backtracks per segment over ``engine``.

    It reads the request's task, budgets and ``segments`` options; token-level options
    cannot be honoured here: operators are refused (``ConfigurationError``), and of the
    sampler only temperature, top-p and seed reach the engine (``request.segments``).

    Args:
        engine: generates one segment per call (sync ``complete``, async ``acomplete``).
    """

    def __init__(self, engine: SegmentEngine) -> None:
        self.engine = engine

    def _check(self, request: GenerationRequest) -> None:
        if request.decoding.operators:
            raise ConfigurationError(
                "backtracking operators act on every token and need a token-level backend "
                f"(LlamaCppBackend, HFBackend); {type(self).__name__} backtracks per segment"
            )

    def stream(self, request: GenerationRequest) -> Iterator[Event]:
        """Answer ``request`` segment by segment (blocking engine calls)."""
        self._check(request)
        return run_segments(self.engine, request)

    async def astream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Answer ``request`` with the engine's native async calls."""
        self._check(request)
        # Closed here when the caller stops early, not later by the garbage collector.
        async with contextlib.aclosing(arun_segments(self.engine, request)) as events:
            async for event in events:
                yield event

    def close(self) -> None:
        """Close the engine if it has a ``close()`` (e.g. its HTTP clients)."""
        close = getattr(self.engine, "close", None)
        if callable(close):
            close()
