"""Backends that run the backtracking decoder on a token runtime they own.

Prefix reuse: every request of a backend starts with the same chat messages (system
instruction, few-shot demo turns) before its last user turn. :meth:`LocalBackend._reuse_prefix`
renders those messages alone, checks that their tokens start the full prompt, and hands the
decoder a :class:`~citebacktrack.decoding.runtime.FixedPrefixRuntime` over the backend's
runtime, whose ``prefill(prompt)`` is ``runtime.prefill(prompt, fixed_prefix=n)``: the
prefix's KV is computed once and kept, and the decoder needs no change.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from abc import abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from citebacktrack._arguments import flag
from citebacktrack.backends.base import Backend, GenerationRequest, iterate_in_thread
from citebacktrack.decoding.decoder import Decoder
from citebacktrack.decoding.matcher import FreeMatcher, TokenMatcher, XGrammarMatcher
from citebacktrack.decoding.runtime import FixedPrefixRuntime, PrefixCachingRuntime, TokenRuntime
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.errors import BackendClosedError, BackendError, ContextOverflowError
from citebacktrack.types import Event

if TYPE_CHECKING:
    from citebacktrack.backends.base import ChatMessage

__all__ = ["LocalBackend", "decode", "fixed_prefix_length"]


def _close_iterator(iterator: Iterator[Event]) -> None:
    """Close a generator (runs its ``finally`` blocks); other iterators need nothing."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def fixed_prefix_length(
    runtime: PrefixCachingRuntime, messages: Sequence[ChatMessage], prompt: Sequence[int]
) -> int:
    """How many leading tokens of ``prompt`` are the messages before its last one.

    ``messages[:-1]`` is rendered without an opened assistant turn; if its tokens are a
    proper prefix of ``prompt`` (ChatML ends each turn with a special token, so they are),
    that length is returned, else 0 (no reuse).
    """
    if len(messages) < 2:
        return 0
    head = runtime.encode_chat(messages[:-1], add_generation_prompt=False)
    if 0 < len(head) < len(prompt) and [int(t) for t in prompt[: len(head)]] == head:
        return len(head)
    return 0


def decode(
    runtime: TokenRuntime,
    index: VocabularyIndex,
    request: GenerationRequest,
    prompt: Sequence[int],
    *,
    context_window: int | None = None,
    matcher: TokenMatcher | None = None,
) -> Iterator[Event]:
    """Run the backtracking decoder for ``request`` on ``runtime``.

    ``matcher`` is the grammar engine's state for ``request.grammar``; by default XGrammar
    over the grammar compiled with ``index``. A request without a grammar is decoded
    unconstrained, its markers unchecked (the raw-model baseline).

    Raises:
        ContextOverflowError: the prompt plus ``max_new_tokens`` exceeds ``context_window``.
    """
    reserve = request.budgets.max_new_tokens
    if context_window is not None and len(prompt) + reserve > context_window:
        raise ContextOverflowError(
            prompt_tokens=len(prompt), context_window=context_window, reserve=reserve
        )
    if request.grammar is None:
        matcher = FreeMatcher(index.vocabulary.size)
    elif matcher is None:
        matcher = XGrammarMatcher(index.compile(request.grammar), index.vocabulary.size)
    decoder = Decoder(runtime, index, matcher, request)
    yield from decoder.run(prompt)


class LocalBackend(Backend):
    """A backend with one in-process model, used by one decode at a time.

    Concurrent ``stream``/``astream`` calls from many threads, tasks or event loops are
    serialized on one lock: the model has one KV cache, and a 2-core machine gains nothing
    from batching small models. Each call holds the lock from its first event to its last,
    so a sync ``stream`` iterator that is abandoned without ``close()`` keeps the model
    busy until it is garbage-collected.

    Async callers wait in the event loop (first come, first served within a loop), not
    on a worker thread, so any number of concurrent ``astream``/``agenerate`` calls is
    safe: only the running decode occupies a worker thread.

    :meth:`close` frees the model at once and never waits for a stream to finish (a
    stream suspended in the caller's own thread would never finish): it waits only for
    the decode step running at that moment (one forward pass), ends the stream in flight,
    and frees the model. That stream, and every later or waiting request, raises
    :class:`~citebacktrack.errors.BackendClosedError`.
    """

    _POLL_MIN_S = 0.001
    _POLL_MAX_S = 0.02

    def __init__(self, *, prefix_cache: bool = True) -> None:
        """Args:
        prefix_cache: keep the KV of the messages before the last user turn between
            requests (see :meth:`_reuse_prefix`); only backends that call it use it.
        """
        self.prefix_cache = flag("prefix_cache", prefix_cache)
        self._prefix_memo: tuple[tuple[tuple[str, str], ...], tuple[int, ...]] | None = None
        self._lock = threading.Lock()
        self._gates: weakref.WeakKeyDictionary[object, anyio.Lock] = weakref.WeakKeyDictionary()
        self._gates_guard = threading.Lock()
        # Held for each step of the decode in flight (one ``next`` of it), and by close():
        # the model is never freed in the middle of a step. Re-entrant so that a stream
        # finalized by the garbage collector inside close() cannot deadlock on it.
        self._step_lock = threading.RLock()
        self._step_thread: int | None = None
        self._active: Iterator[Event] | None = None
        self._closed = False
        """Set first by close(): the stream in flight stops at its next step."""
        self._released = False
        """Set by close() once the model is freed (under the step lock)."""

    @property
    def is_closed(self) -> bool:
        """Whether :meth:`close` has run; a closed backend refuses every request."""
        return self._closed

    def close(self) -> None:
        """End the stream in flight, if any, and free the model; safe to call twice.

        Waits for the decode step running at this moment (one forward pass), never for a
        whole stream. The stream in flight and every later request raise
        :class:`~citebacktrack.errors.BackendClosedError`.

        Raises:
            BackendError: called from inside a decode step of this backend (an operator
                or validator callback), where freeing the model would pull it from under
                the running step.
        """
        if self._step_thread == threading.get_ident():
            raise BackendError(
                "a backend cannot be closed from inside one of its own decode steps; "
                "close it after the stream has returned or raised"
            )
        self._closed = True
        with self._step_lock:
            if self._released:
                return
            self._released = True
            active, self._active = self._active, None
            try:
                if active is not None:
                    # Suspended between steps: closing it runs its cleanup (e.g. frees a
                    # GBNF sampler) while the model it points into is still alive.
                    _close_iterator(active)
            finally:
                self._release()

    def _release(self) -> None:
        """Free the model and whatever else the backend holds; called once, by :meth:`close`,
        with no decode step running. The default holds nothing."""

    def _closed_error(self) -> BackendClosedError:
        return BackendClosedError(
            f"this {type(self).__name__} was closed and its model freed; "
            "create a new backend to generate again"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    @abstractmethod
    def _prepare(
        self, request: GenerationRequest
    ) -> tuple[TokenRuntime, VocabularyIndex, list[int], int | None]:
        """Return the runtime, its vocabulary index, the prompt tokens and the context window."""

    def _reuse_prefix(
        self,
        runtime: PrefixCachingRuntime,
        messages: Sequence[ChatMessage],
        prompt: Sequence[int],
    ) -> TokenRuntime:
        """The runtime to decode ``prompt`` on: ``runtime`` itself when prefix reuse is off
        or impossible, else a :class:`FixedPrefixRuntime` that prefills with
        ``fixed_prefix`` = the length of ``messages[:-1]``'s tokens.

        Either way the answer is a function of the request alone: the runtime evaluates
        the prefix as its own batch every time, reused or not. The length is remembered
        for the last prefix seen (rendering it again costs a template pass).
        """
        if not self.prefix_cache:
            return runtime
        key = tuple((m.role, m.content) for m in messages[:-1])
        memo = self._prefix_memo
        if memo is not None and memo[0] == key:
            head = memo[1]
            # The prefix's tokens are still checked against this prompt's.
            same = len(head) < len(prompt) and tuple(int(t) for t in prompt[: len(head)]) == head
            n = len(head) if same else 0
        else:
            n = fixed_prefix_length(runtime, messages, prompt)
            self._prefix_memo = (key, tuple(int(t) for t in prompt[:n]))
        return FixedPrefixRuntime(runtime, n) if n else runtime

    def _matcher(self, request: GenerationRequest) -> TokenMatcher | None:
        """The grammar engine for ``request``; ``None`` for the default (XGrammar)."""
        return None

    def _decode(self, request: GenerationRequest) -> Iterator[Event]:
        runtime, index, prompt, window = self._prepare(request)
        matcher = self._matcher(request) if request.grammar is not None else None
        try:
            yield from decode(
                runtime, index, request, prompt, context_window=window, matcher=matcher
            )
        finally:
            # A matcher that holds native state (llama.cpp's GBNF sampler) frees it now.
            close = getattr(matcher, "close", None)
            if close is not None:
                close()

    def _steps(self, request: GenerationRequest) -> Iterator[Event]:
        """:meth:`_decode`, one step per ``next`` under the step lock, ended by :meth:`close`.

        Runs with the model lock held, so it is the only decode in flight.
        """
        events = self._decode(request)
        self._active = events
        try:
            while True:
                with self._step_lock:
                    if self._closed:
                        raise self._closed_error()
                    self._step_thread = threading.get_ident()
                    try:
                        event = next(events, None)
                    finally:
                        self._step_thread = None
                if event is None:
                    return
                yield event
        finally:
            with self._step_lock:
                if self._active is events:
                    self._active = None
                    _close_iterator(events)

    def stream(self, request: GenerationRequest) -> Iterator[Event]:
        """Decode ``request`` with grammar, validation and backtracking.

        Raises:
            BackendClosedError: the backend was closed (before the call, while waiting for
                the model, or while this stream was in flight).
        """
        self._check_open()
        return self._locked_stream(request)

    def _locked_stream(self, request: GenerationRequest) -> Iterator[Event]:
        # Polls while another decode holds the model, so that close() also frees waiters.
        while not self._lock.acquire(timeout=self._POLL_MAX_S * 5):
            self._check_open()
        try:
            yield from self._steps(request)
        finally:
            self._lock.release()

    async def astream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Async :meth:`stream`; waits for the model in the event loop, not on a thread.

        Cancelled or closed early (``aclose()``, a client that went away), it waits for
        the decode step in flight, closes the decode, and only then frees the model for
        the next request.
        """
        self._check_open()
        async with self._gate():
            await self._acquire_model()
            try:
                # Closed here, not by the garbage collector: the decode's cleanup runs
                # before the next request can take the model.
                async with contextlib.aclosing(iterate_in_thread(self._steps(request))) as events:
                    async for event in events:
                        yield event
            finally:
                self._lock.release()

    def _gate(self) -> anyio.Lock:
        """The FIFO queue of this event loop's callers (one lock per running loop)."""
        token = anyio.lowlevel.current_token()
        with self._gates_guard:
            try:
                gate = self._gates.get(token)
            except TypeError:  # an event-loop token that cannot be weakly referenced
                return anyio.Lock()
            if gate is None:
                gate = self._gates[token] = anyio.Lock()
            return gate

    async def _acquire_model(self) -> None:
        """Take the model lock without blocking the loop or a worker thread.

        Within one loop only the head of the gate's queue polls; the lock is shared with
        sync callers and other loops, so a short back-off poll is the only wait that
        never ties up a thread.
        """
        delay = self._POLL_MIN_S
        while not self._lock.acquire(blocking=False):
            self._check_open()
            await anyio.sleep(delay)
            delay = min(delay * 2, self._POLL_MAX_S)
