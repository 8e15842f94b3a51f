"""Test helpers: toy token runtimes and vocabularies that run through the real decoder.

:class:`ScriptedRuntime` is a model that wants to write a given text (what
:class:`~citebacktrack.MockBackend` and :class:`~citebacktrack.FunctionBackend` decode);
:class:`PrefixHashRuntime` is a model whose logits are a pseudo-random function of the
whole prefix, which catches any stale-cache bug after a rollback. Use them to test your
own runtimes, operators or backends against the decoder.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from citebacktrack.decoding.runtime import Logits, Vocabulary
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.errors import ConfigurationError

if TYPE_CHECKING:
    from citebacktrack.segments import SegmentCall, SegmentResult

__all__ = [
    "STOP",
    "PrefixHashRuntime",
    "ScriptedRuntime",
    "ScriptedSegmentEngine",
    "default_vocabulary",
    "index_for",
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


def default_vocabulary() -> Vocabulary:
    """The shared :func:`toy_vocabulary` the test doubles use when given none."""
    return _DEFAULT_VOCABULARY


_INDEX_CACHE: dict[int, VocabularyIndex] = {}
_INDEX_LOCK = threading.Lock()


def index_for(vocabulary: Vocabulary) -> VocabularyIndex:
    """The vocabulary index of ``vocabulary``, built once and shared (thread-safe)."""
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


class ScriptedSegmentEngine:
    """A :class:`~citebacktrack.segments.SegmentEngine` whose model wants to write
    ``script``: each call decodes greedily under the call's grammar (XGrammar over the
    toy vocabulary), from the call's prefix, and stops after a stop string, at the end of
    the script (the model's stop token) or after ``max_tokens``, like a server would.

    ``calls`` records every call, for assertions.
    """

    def __init__(self, script: str, *, vocabulary: Vocabulary | None = None) -> None:
        self.script = script
        self.vocabulary = vocabulary or _DEFAULT_VOCABULARY
        self.calls: list[SegmentCall] = []

    def complete(self, call: SegmentCall) -> SegmentResult:
        from citebacktrack.decoding.matcher import FreeMatcher, XGrammarMatcher
        from citebacktrack.segments import SegmentResult

        self.calls.append(call)
        index = index_for(self.vocabulary)
        runtime = ScriptedRuntime(self.script, self.vocabulary)
        logits = runtime.prefill([0])
        prefix = index.encode(call.prefix.encode()) if call.prefix else []
        if prefix is None:
            raise ConfigurationError(f"the toy vocabulary cannot write {call.prefix!r}")
        if prefix:
            logits = runtime.forward(prefix)
        matcher = (
            XGrammarMatcher(index.compile(call.grammar), self.vocabulary.size)
            if call.grammar is not None
            else FreeMatcher(self.vocabulary.size)
        )
        out = bytearray()
        for _ in range(call.max_tokens):
            allowed = matcher.allowed() & index.unblocked
            if not allowed.any():
                raise ConfigurationError("the grammar allows nothing here")
            token = int(np.argmax(np.where(allowed, logits, -np.inf)))
            matcher.accept_token(token)
            if token in self.vocabulary.stop_ids:
                return self._result(out, "end", len(prefix))
            out += self.vocabulary.tokens[token]
            text = out.decode("utf-8", "ignore")
            for stop in call.stop:
                if stop in text:
                    cut = text[: text.index(stop)]
                    return SegmentResult(
                        text=cut,
                        finish="stop",
                        prompt_tokens=1 + len(prefix),
                        completion_tokens=len(index.encode(cut.encode()) or ()) + 1,
                    )
            logits = runtime.forward([token])
        return self._result(out, "length", len(prefix))

    async def acomplete(self, call: SegmentCall) -> SegmentResult:
        return self.complete(call)

    def _result(self, out: bytearray, finish: str, prefix: int) -> SegmentResult:
        from citebacktrack.segments import SegmentResult

        text = out.decode("utf-8", "replace")
        tokens = len(self.vocabulary.tokens) and len(
            index_for(self.vocabulary).encode(bytes(out)) or ()
        )
        return SegmentResult(
            text=text,
            finish=finish,  # type: ignore[arg-type]
            prompt_tokens=1 + prefix,
            completion_tokens=tokens + (finish == "end"),
        )
