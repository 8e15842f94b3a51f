"""Test doubles that run through the real decode loop: MockBackend and FunctionBackend.

Both turn a scripted answer into a token-level model (:class:`ScriptedRuntime`) and decode
it with the same grammar mask, validator and backtracking as the real local backends. The
script is what the model *wants* to write; the grammar decides what it *can* write. A
script that cites ``[7]`` with 3 sources never produces it: the mask removes ``7`` and the
model falls back to its next preference (low ids first), which the validator then checks.

Use them in your own tests::

    backend = MockBackend(["Paris is the capital of France [1]."])
    answer = Citeformer(backend=backend).generate("Capital?", sources)
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import cast

from citebacktrack._arguments import instance, refused
from citebacktrack.backends.base import Backend, GenerationRequest, iterate_in_thread
from citebacktrack.backends.local import decode
from citebacktrack.decoding.runtime import Vocabulary
from citebacktrack.errors import ConfigurationError, MockExhaustedError
from citebacktrack.testing import ScriptedRuntime, default_vocabulary, index_for
from citebacktrack.types import Event

__all__ = ["FunctionBackend", "MockBackend"]

ScriptFunction = Callable[[GenerationRequest], str] | Callable[[GenerationRequest], Awaitable[str]]


class FunctionBackend(Backend):
    """A backend whose model wants to write whatever ``fn(request)`` returns.

    ``fn`` may be sync or async. The text is decoded through the real decoder (grammar,
    validation, backtracking), so the result obeys the same contract as a real model.
    An async ``fn`` works with ``astream``/``agenerate`` only.

    Args:
        fn: returns the text the scripted model tries to write.
        vocabulary: the toy vocabulary (default :func:`toy_vocabulary`).

    Raises:
        ConfigurationError: ``fn`` is not callable, or ``vocabulary`` is not a Vocabulary.
    """

    def __init__(self, fn: ScriptFunction, *, vocabulary: Vocabulary | None = None) -> None:
        if not callable(fn):
            hint = "pass a function taking the GenerationRequest, e.g. lambda request: '... [1].'"
            raise refused("fn", fn, "a callable that returns the script (a str)", hint)
        hint = "pass citebacktrack.testing.toy_vocabulary(...), or None for the default"
        self._vocabulary = instance("vocabulary", vocabulary, Vocabulary, hint) or (
            default_vocabulary()
        )
        self._fn = fn
        self._is_async = inspect.iscoroutinefunction(fn)
        self.requests: list[GenerationRequest] = []
        """Every request received, for assertions in tests."""

    def _decode(self, request: GenerationRequest, script: str) -> Iterator[Event]:
        if not isinstance(script, str):
            raise ConfigurationError(
                f"a scripted backend function must return str, got {type(script).__name__}"
            )
        runtime = ScriptedRuntime(script, self._vocabulary)
        index = index_for(self._vocabulary)
        prompt = [0]  # the scripted model ignores the prompt's content
        yield from decode(runtime, index, request, prompt)

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

    def __init__(self, responses: Sequence[str], *, vocabulary: Vocabulary | None = None) -> None:
        hint = "pass a list of scripted answers, e.g. MockBackend(['Paris is in France [1].'])"
        if isinstance(responses, str | bytes) or not isinstance(responses, Iterable):
            raise refused("responses", responses, "a list of str", hint)
        self.responses = list(responses)
        for number, response in enumerate(self.responses):
            if not isinstance(response, str):
                raise refused(f"responses[{number}]", response, "a str", hint)
        self._lock = threading.Lock()
        self._next = 0
        super().__init__(self._respond, vocabulary=vocabulary)

    def _respond(self, request: GenerationRequest) -> str:
        with self._lock:
            if self._next >= len(self.responses):
                raise MockExhaustedError(
                    f"MockBackend was called {self._next + 1} times but has "
                    f"{len(self.responses)} scripted responses; add more responses"
                )
            response = self.responses[self._next]
            self._next += 1
            return response
