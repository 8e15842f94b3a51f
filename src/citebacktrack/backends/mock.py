"""Test doubles that run through the real decode loop: MockBackend, FunctionBackend, and
MockSegmentBackend for the segment loop of the server backends.

Each turns a scripted answer into a model that wants to write it (:class:`ScriptedRuntime`,
or :class:`ScriptedSegmentEngine` for the segment loop) and decodes it with the same
grammar, validator and backtracking as the real backends. The script is what the model
*wants* to write; the grammar and the decoder decide what it *can* write. A script that
cites ``[7]`` with 3 sources never produces it: the grammar cannot write ``7``. Every such
place is reported: a :class:`~citebacktrack.types.ScriptDeparture` event and a
``departure`` trace entry (``[7]`` also a ``CitationRejected`` with reason
``out_of_range``), or, with ``strict=True``, a
:class:`~citebacktrack.errors.ScriptDepartureError` showing where in the script.

Use them in your own tests::

    backend = MockBackend(["Paris is the capital of France [1]."])
    answer = Citeformer(backend=backend).generate("Capital?", sources)
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from typing import cast

from citebacktrack._arguments import flag, instance, refused
from citebacktrack.backends.base import Backend, GenerationRequest, iterate_in_thread
from citebacktrack.backends.local import decode
from citebacktrack.decoding.matcher import TokenMatcher, XGrammarMatcher
from citebacktrack.decoding.runtime import Vocabulary
from citebacktrack.errors import ConfigurationError, MockExhaustedError
from citebacktrack.testing import (
    ScriptedRuntime,
    ScriptedSegmentEngine,
    default_vocabulary,
    index_for,
)
from citebacktrack.types import Event

__all__ = ["FunctionBackend", "MockBackend", "MockSegmentBackend"]

ScriptFunction = Callable[[GenerationRequest], str] | Callable[[GenerationRequest], Awaitable[str]]


class FunctionBackend(Backend):
    """A backend whose model wants to write whatever ``fn(request)`` returns.

    ``fn`` may be sync or async. The text is decoded through the real decoder (grammar,
    validation, backtracking), so the result obeys the same contract as a real model.
    An async ``fn`` works with ``astream``/``agenerate`` only.

    Args:
        fn: returns the text the scripted model tries to write.
        vocabulary: the toy vocabulary (default :func:`toy_vocabulary`).
        strict: raise :class:`~citebacktrack.errors.ScriptDepartureError` where the
            answer first leaves the script, instead of reporting it and going on.

    Raises:
        ConfigurationError: ``fn`` is not callable, ``vocabulary`` is not a Vocabulary, or
            ``strict`` is not a bool.
    """

    def __init__(
        self, fn: ScriptFunction, *, vocabulary: Vocabulary | None = None, strict: bool = False
    ) -> None:
        if not callable(fn):
            hint = "pass a function taking the GenerationRequest, e.g. lambda request: '... [1].'"
            raise refused("fn", fn, "a callable that returns the script (a str)", hint)
        hint = "pass citebacktrack.testing.toy_vocabulary(...), or None for the default"
        self._vocabulary = instance("vocabulary", vocabulary, Vocabulary, hint) or (
            default_vocabulary()
        )
        self._fn = fn
        self.strict = flag("strict", strict)
        self._is_async = inspect.iscoroutinefunction(fn)
        self.requests: list[GenerationRequest] = []
        """Every request received, for assertions in tests."""

    def _decode(self, request: GenerationRequest, script: str) -> Iterator[Event]:
        if not isinstance(script, str):
            raise ConfigurationError(
                f"a scripted backend function must return str, got {type(script).__name__}"
            )
        runtime = ScriptedRuntime(
            script, self._vocabulary, n_sources=request.n_sources, strict=self.strict
        )
        index = index_for(self._vocabulary)
        matcher: TokenMatcher | None = None
        if request.grammar is not None:  # the model sees the grammar's mask, to report it
            compiled = index.compile(request.grammar)
            matcher = runtime.watch(XGrammarMatcher(compiled, self._vocabulary.size))
        prompt = [0]  # the scripted model ignores the prompt's content
        report = runtime.report()
        for event in decode(runtime, index, request, prompt, matcher=matcher):
            yield from report.feed(event)

    def stream(self, request: GenerationRequest) -> Iterator[Event]:
        if self._is_async:
            raise ConfigurationError(
                "this FunctionBackend wraps an async function; use astream() or agenerate()"
            )
        self.requests.append(request)
        script = cast(Callable[[GenerationRequest], str], self._fn)(request)
        yield from self._decode(request, script)

    async def astream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if self._is_async:
            self.requests.append(request)
            script = await cast(Callable[[GenerationRequest], Awaitable[str]], self._fn)(request)
            decoded = self._decode(request, script)
        else:
            decoded = self.stream(request)
        # Closed here when the caller stops early, not later by the garbage collector.
        async with contextlib.aclosing(iterate_in_thread(decoded)) as events:
            async for event in events:
                yield event


class MockBackend(FunctionBackend):
    """A backend that answers with scripted responses, one per call, in order.

    Raises:
        ConfigurationError: ``responses`` is not a list of str (a single str is refused).
        MockExhaustedError: called more often than there are responses.
    """

    def __init__(
        self,
        responses: Sequence[str],
        *,
        vocabulary: Vocabulary | None = None,
        strict: bool = False,
    ) -> None:
        hint = "pass a list of scripted answers, e.g. MockBackend(['Paris is in France [1].'])"
        if isinstance(responses, str | bytes) or not isinstance(responses, Iterable):
            raise refused("responses", responses, "a list of str", hint)
        self.responses = list(responses)
        for number, response in enumerate(self.responses):
            if not isinstance(response, str):
                raise refused(f"responses[{number}]", response, "a str", hint)
        self._lock = threading.Lock()
        self._next = 0
        super().__init__(self._respond, vocabulary=vocabulary, strict=strict)

    def _respond(self, request: GenerationRequest) -> str:
        with self._lock:
            if self._next >= len(self.responses):
                count = len(self.responses)
                raise MockExhaustedError(
                    f"{type(self).__name__} was called {self._next + 1} times but has "
                    f"{count} scripted response{'' if count == 1 else 's'}; add more responses"
                )
            response = self.responses[self._next]
            self._next += 1
            return response


class MockSegmentBackend(MockBackend):
    """A backend that answers with scripted responses, one per call, in order, through
    the segment loop the server backends run (:class:`SegmentBackend` over a
    :class:`~citebacktrack.testing.ScriptedSegmentEngine`): generate to the next ``]``,
    validate, resubmit the accepted prefix on a rejection. Use it to test an application
    built on ``OpenAIBackend``, ``VLLMBackend`` or ``AnthropicBackend`` without a server.

    Departures from the script are reported as by :class:`MockBackend`; ``engines`` holds
    the engine of each answer (its ``calls`` are the segment calls made).

    Raises:
        ConfigurationError: ``responses`` is not a list of str, or the request has
            operators (they need a token-level backend).
        MockExhaustedError: called more often than there are responses.
    """

    def __init__(
        self,
        responses: Sequence[str],
        *,
        vocabulary: Vocabulary | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(responses, vocabulary=vocabulary, strict=strict)
        self.engines: list[ScriptedSegmentEngine] = []
        """The engine of each answer, in order."""

    def _engine(self, request: GenerationRequest) -> ScriptedSegmentEngine:
        self.requests.append(request)
        engine = ScriptedSegmentEngine(
            self._respond(request),
            vocabulary=self._vocabulary,
            n_sources=request.n_sources,
            strict=self.strict,
        )
        self.engines.append(engine)
        return engine

    def stream(self, request: GenerationRequest) -> Iterator[Event]:
        from citebacktrack.backends.segment import SegmentBackend

        engine = self._engine(request)
        report = engine.report()
        for event in SegmentBackend(engine).stream(request):
            yield from report.feed(event)

    async def astream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        from citebacktrack.backends.segment import SegmentBackend

        engine = self._engine(request)
        report = engine.report()
        # Closed here when the caller stops early, not later by the garbage collector.
        segments = cast(AsyncGenerator[Event, None], SegmentBackend(engine).astream(request))
        async with contextlib.aclosing(segments) as events:
            async for event in events:
                for item in report.feed(event):
                    yield item
