"""SegmentBackend: segment-level backtracking over any :class:`SegmentEngine`.

The engine (a llama.cpp or vLLM server behind the OpenAI protocol, an offline vLLM
engine, a test double) generates up to the next citation close; the shared
:class:`~citebacktrack.segments.SegmentLoop` validates each marker with the same
validator and rule as the token-level decoder and resubmits on rejection.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

from citebacktrack._arguments import refused
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

    Raises:
        ConfigurationError: ``engine`` has neither ``complete()`` nor ``acomplete()`` (a
            name, a URL or an SDK client is not an engine; a string is not shown in the
            message, as it may be a key).
    """

    _engine_hint = (
        "pass an engine object with complete()/acomplete(), e.g. OpenAICompatibleEngine"
        "(...), not a name, URL or SDK client (a server by URL: "
        "OpenAIBackend.from_base_url(url, model=...))"
    )

    def __init__(self, engine: SegmentEngine) -> None:
        self.engine = self._checked_engine(engine)

    @classmethod
    def _checked_engine(cls, engine: SegmentEngine) -> SegmentEngine:
        """``engine`` if it has ``complete()`` or ``acomplete()``, else the error (which
        does not show a string: it may be a key)."""
        if not any(callable(getattr(engine, name, None)) for name in ("complete", "acomplete")):
            raise refused("engine", engine, "a segment engine", cls._engine_hint, secret=True)
        return engine

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
