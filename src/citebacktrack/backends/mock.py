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

import hashlib
import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import cast

import numpy as np

from citebacktrack.backends.base import Backend, GenerationRequest, iterate_in_thread
from citebacktrack.backends.local import decode
from citebacktrack.decoding.runtime import Logits, Vocabulary
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.errors import ConfigurationError, MockExhaustedError
from citebacktrack.types import Event

__all__ = [
    "FunctionBackend",
    "MockBackend",
    "PrefixHashRuntime",
    "ScriptedRuntime",
    "toy_vocabulary",
]

STOP = b"<eos>"
_MULTI = (b" [", b"].", b"],", b"] ", b"[1]", b"[2]", b"[3]", b"the", b" the", b"ing", b"tion")


def toy_vocabulary(extra: Sequence[bytes] = ()) -> Vocabulary:
    """A small byte-level vocabulary: every byte value, a few multi-byte tokens, and a stop.

    Single bytes make any UTF-8 text writable; the multi-byte tokens (``" ["``, ``"]."``,
    ``"[1]"``) exercise markers that share tokens with their neighbours, as real
    tokenizers do. Id 0 is the stop token.
    """
    tokens: list[bytes] = [STOP]
    tokens += [bytes([b]) for b in range(256)]
    for piece in (*_MULTI, *extra):
        if piece not in tokens:
            tokens.append(piece)
    return Vocabulary(tokens=tokens, stop_ids=frozenset({0}))


_DEFAULT_VOCABULARY = toy_vocabulary()
_INDEX_CACHE: dict[int, VocabularyIndex] = {}
_INDEX_LOCK = threading.Lock()


def _index_for(vocabulary: Vocabulary) -> VocabularyIndex:
    with _INDEX_LOCK:
        index = _INDEX_CACHE.get(id(vocabulary))
        if index is None or index.vocabulary is not vocabulary:
            index = VocabularyIndex(vocabulary)
            _INDEX_CACHE[id(vocabulary)] = index
        return index


class ScriptedRuntime:
    """A token runtime whose model wants to write ``script``.

    Its logits are a function of the whole generated prefix: the token that continues the
    script at the current byte offset scores highest (longer matches first); off the
    script, it prefers ``[``, then ``]``, then ending the answer, then low ids and ``.``,
    so a constrained decode always finishes.
    """

    def __init__(self, script: str, vocabulary: Vocabulary | None = None) -> None:
        self.script = script.encode()
        self._vocabulary = vocabulary or _DEFAULT_VOCABULARY
        self._tokens: list[int] = []
        self._prompt_len = 0
        size = self._vocabulary.size
        base = np.zeros(size, dtype=np.float32)
        by_piece = {piece: i for i, piece in enumerate(self._vocabulary.tokens)}
        for piece, score in ((b"[", 3.0), (b"]", 2.5), (b".", 2.0), (b" ", 0.5)):
            if piece in by_piece:
                base[by_piece[piece]] = score
        for stop in self._vocabulary.stop_ids:
            base[stop] = 2.2  # off the script, end as soon as the grammar allows
        for digit in range(10):
            piece = str(digit).encode()
            if piece in by_piece:
                base[by_piece[piece]] = 2.0 - 0.1 * digit
        self._base = base
        self._by_first: dict[int, list[tuple[int, bytes]]] = {}
        for i, piece in enumerate(self._vocabulary.tokens):
            if piece and i not in self._vocabulary.stop_ids:
                self._by_first.setdefault(piece[0], []).append((i, piece))

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    @property
    def n_tokens(self) -> int:
        return len(self._tokens)

    @property
    def context_window(self) -> int:
        return 1 << 20

    def prefill(self, prompt: Sequence[int]) -> Logits:
        self._tokens = list(prompt)
        self._prompt_len = len(prompt)
        return self._logits()

    def forward(self, tokens: Sequence[int]) -> Logits:
        self._tokens.extend(tokens)
        return self._logits()

    def truncate(self, n_tokens: int) -> None:
        if not 0 <= n_tokens <= len(self._tokens):
            raise ConfigurationError(f"cannot truncate {len(self._tokens)} tokens to {n_tokens}")
        del self._tokens[n_tokens:]

    def _logits(self) -> Logits:
        pieces = self._vocabulary.tokens
        written = b"".join(pieces[t] for t in self._tokens[self._prompt_len :])
        logits = self._base.copy()
        position = len(written)
        if position >= len(self.script):
            for stop in self._vocabulary.stop_ids:
                logits[stop] = 5.0
            return logits
        rest = self.script[position:]
        for token, piece in self._by_first.get(rest[0], ()):
            if rest.startswith(piece):
                logits[token] = 10.0 + 0.1 * len(piece)
        return logits


class PrefixHashRuntime:
    """A toy model whose logits are a pseudo-random function of the *whole* prefix.

    Any stale logits or KV off-by-one error after a rollback changes what it says, so a
    test comparing a rolled-back decode with a fresh one catches it. ``bias`` is added to
    every row (e.g. to make some tokens likely).
    """

    def __init__(
        self, vocabulary: Vocabulary, *, seed: int = 0, bias: Logits | None = None
    ) -> None:
        self._vocabulary = vocabulary
        self._seed = seed
        self._bias = bias
        self._tokens: list[int] = []
        self.forward_calls = 0

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    @property
    def n_tokens(self) -> int:
        return len(self._tokens)

    def prefill(self, prompt: Sequence[int]) -> Logits:
        self._tokens = list(prompt)
        return self._logits()

    def forward(self, tokens: Sequence[int]) -> Logits:
        self.forward_calls += 1
        self._tokens.extend(tokens)
        return self._logits()

    def truncate(self, n_tokens: int) -> None:
        if not 0 <= n_tokens <= len(self._tokens):
            raise ConfigurationError(f"cannot truncate {len(self._tokens)} tokens to {n_tokens}")
        del self._tokens[n_tokens:]

    def _logits(self) -> Logits:
        digest = hashlib.blake2b(np.asarray(self._tokens, dtype=np.int64).tobytes(), digest_size=8)
        generator = np.random.default_rng([self._seed, int.from_bytes(digest.digest(), "little")])
        logits = generator.standard_normal(self._vocabulary.size, dtype=np.float32) * 2.0
        if self._bias is not None:
            logits += self._bias
        return logits


ScriptFunction = Callable[[GenerationRequest], str] | Callable[[GenerationRequest], Awaitable[str]]


class FunctionBackend(Backend):
    """A backend whose model wants to write whatever ``fn(request)`` returns.

    ``fn`` may be sync or async. The text is decoded through the real decoder (grammar,
    validation, backtracking), so the result obeys the same contract as a real model.
    An async ``fn`` works with ``astream``/``agenerate`` only.

    Args:
        fn: returns the text the scripted model tries to write.
        vocabulary: the toy vocabulary (default :func:`toy_vocabulary`).
    """

    def __init__(self, fn: ScriptFunction, *, vocabulary: Vocabulary | None = None) -> None:
        self._fn = fn
        self._vocabulary = vocabulary or _DEFAULT_VOCABULARY
        self._is_async = inspect.iscoroutinefunction(fn)
        self.requests: list[GenerationRequest] = []
        """Every request received, for assertions in tests."""

    def _decode(self, request: GenerationRequest, script: str) -> Iterator[Event]:
        if not isinstance(script, str):
            raise ConfigurationError(
                f"a scripted backend function must return str, got {type(script).__name__}"
            )
        runtime = ScriptedRuntime(script, self._vocabulary)
        index = _index_for(self._vocabulary)
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
        if not self._is_async:
            async for event in super().astream(request):
                yield event
            return
        self.requests.append(request)
        script = await cast(Callable[[GenerationRequest], Awaitable[str]], self._fn)(request)
        async for event in iterate_in_thread(self._decode(request, script)):
            yield event


class MockBackend(FunctionBackend):
    """A backend that answers with scripted responses, one per call, in order.

    Raises:
        MockExhaustedError: called more often than there are responses.
    """

    def __init__(self, responses: Sequence[str], *, vocabulary: Vocabulary | None = None) -> None:
        if isinstance(responses, str):
            raise ConfigurationError(
                "MockBackend takes a list of responses, e.g. MockBackend(['...'])"
            )
        self.responses = list(responses)
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
