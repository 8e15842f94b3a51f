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

from citebacktrack._departure_log import (
    Departure,
    DepartureLog,
    DepartureReport,
    WatchedMatcher,
)
from citebacktrack._departures import ScriptDeparture
from citebacktrack._script import ScriptModel
from citebacktrack.decoding.matcher import TokenMatcher
from citebacktrack.decoding.runtime import Logits, Vocabulary
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.errors import ConfigurationError

if TYPE_CHECKING:
    from citebacktrack.segments import SegmentCall, SegmentResult
    from citebacktrack.types import Done

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
    """A token runtime whose model wants to write ``script``, and says where it could not.

    Its logits are a function of the whole generated prefix: the token that continues
    the script where the model is in it scores highest (longer matches first), then the
    script past the unit it is stuck on (the next character, or a whole ``[...]``
    marker), then ``[``, ``]``, ``.``, low ids and a space; the stop token comes first
    once the script is written and last while some is left. When the answer leaves the
    script (the grammar or the decoder refused what it wanted), the model follows its
    script from where the answer rejoins it, and records a departure (``departures``).

    Args:
        script: what the model wants to write.
        vocabulary: its vocabulary (default :func:`default_vocabulary`).
        n_sources: the request's number of sources, so that a cited id out of range is
            told from a refused one (None: unknown).
        strict: raise :class:`~citebacktrack.errors.ScriptDepartureError` at the first
            departure, showing where in the script.
    """

    def __init__(
        self,
        script: str,
        vocabulary: Vocabulary | None = None,
        *,
        n_sources: int | None = None,
        strict: bool = False,
    ) -> None:
        self._vocabulary = vocabulary or _DEFAULT_VOCABULARY
        self.log = DepartureLog(script, n_sources=n_sources, strict=strict)
        self._model = ScriptModel(self.log, self._vocabulary)
        self._tokens: list[int] = []
        self._prompt_len = 0
        self._watch: WatchedMatcher | None = None

    @property
    def script(self) -> bytes:
        """The script, UTF-8; set it (``bytes`` or ``str``) to script the next decode
        afresh (its departures start again)."""
        return self.log.script

    @script.setter
    def script(self, script: bytes | str) -> None:
        text = script.decode() if isinstance(script, bytes) else script
        self.log = DepartureLog(text, n_sources=self.log.n_sources, strict=self.log.strict)
        self._model = ScriptModel(self.log, self._vocabulary)

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    @property
    def n_tokens(self) -> int:
        return len(self._tokens)

    @property
    def context_window(self) -> int:
        return 1 << 20

    @property
    def departures(self) -> list[ScriptDeparture]:
        """Where the output left the script so far, each place once."""
        return [d.event(self.log.script) for d in self.log.departures]

    def watch(self, matcher: TokenMatcher) -> TokenMatcher:
        """``matcher``, wrapped so that this model sees the grammar's mask before each
        token it is given: a departure then says what the grammar allowed, and tells
        text the grammar cannot take from text the decoder's rules refused."""
        self._watch = WatchedMatcher(matcher)
        return self._watch

    def prefill(self, prompt: Sequence[int]) -> Logits:
        self._tokens = list(prompt)
        self._prompt_len = len(prompt)
        self._model.reset()
        return self._model.logits()

    def forward(self, tokens: Sequence[int]) -> Logits:
        watch = self._watch
        grammar = watch.take() if watch is not None and len(tokens) == 1 else None
        for token in tokens:
            self._tokens.append(int(token))
            self._model.feed(int(token), grammar)
        return self._model.logits()

    def truncate(self, n_tokens: int) -> None:
        if not 0 <= n_tokens <= len(self._tokens):
            raise ConfigurationError(f"cannot truncate {len(self._tokens)} tokens to {n_tokens}")
        del self._tokens[n_tokens:]
        self._model.truncate(max(0, n_tokens - self._prompt_len))

    def unwritten(self, n_generated: int | None, why: str) -> Departure | None:
        """The script left after the first ``n_generated`` tokens (None: all of them)."""
        return self._model.unwritten(n_generated, why)

    def report(self) -> DepartureReport:
        """Folds ``departures`` into the stream of the answer this runtime decodes (the
        rest of the script is judged after the answer's kept tokens)."""
        return DepartureReport(
            self.log,
            lambda done, _: self.unwritten(done.trace.kept_tokens, done.trace.stop_reason.value),
        )


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
    The model follows its script as :class:`ScriptedRuntime` does, across calls: where
    the answer left it, ``departures`` says so (each place once).

    ``calls`` records every call, for assertions. ``n_sources`` and ``strict`` are
    :class:`ScriptedRuntime`'s.
    """

    def __init__(
        self,
        script: str,
        *,
        vocabulary: Vocabulary | None = None,
        n_sources: int | None = None,
        strict: bool = False,
    ) -> None:
        self.script = script
        self.vocabulary = vocabulary or _DEFAULT_VOCABULARY
        self.calls: list[SegmentCall] = []
        self.log = DepartureLog(script, n_sources=n_sources, strict=strict)

    @property
    def departures(self) -> list[ScriptDeparture]:
        """Where the answer left the script so far, each place once."""
        return [d.event(self.log.script) for d in self.log.departures]

    def report(self) -> DepartureReport:
        """Folds ``departures`` into the stream of the answer this engine serves."""
        return DepartureReport(self.log, self._unwritten)

    def complete(self, call: SegmentCall) -> SegmentResult:
        from citebacktrack.decoding.matcher import FreeMatcher, XGrammarMatcher
        from citebacktrack.segments import SegmentResult

        self.calls.append(call)
        index = index_for(self.vocabulary)
        model = ScriptModel(self.log, self.vocabulary, position=len(self.calls))
        prefix = index.encode(call.prefix.encode()) if call.prefix else []
        if prefix is None:
            raise ConfigurationError(f"the toy vocabulary cannot write {call.prefix!r}")
        for token in prefix:  # the answer so far: where in the script the model is
            model.feed(token)
        logits = model.logits()
        matcher = (
            XGrammarMatcher(index.compile(call.grammar), self.vocabulary.size)
            if call.grammar is not None
            else FreeMatcher(self.vocabulary.size)
        )
        out = bytearray()
        for _ in range(call.max_tokens):
            grammar = matcher.allowed()
            allowed = grammar & index.unblocked
            if not allowed.any():
                raise ConfigurationError("the grammar allows nothing here")
            token = int(np.argmax(np.where(allowed, logits, -np.inf)))
            matcher.accept_token(token)
            if token in self.vocabulary.stop_ids:
                return self._result(out, "end", len(prefix))
            model.feed(token, grammar)
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
            logits = model.logits()
        return self._result(out, "length", len(prefix))

    async def acomplete(self, call: SegmentCall) -> SegmentResult:
        return self.complete(call)

    def _unwritten(self, done: Done, text: str) -> Departure | None:
        """The script the answer's ``text`` leaves unwritten, found by following the text
        from the start (the loop may have cut a call's output since: an extra marker
        dropped, a sentence given up); a place it leaves that no call did is recorded."""
        if not self.calls:
            return None
        final = DepartureLog(self.script, n_sources=self.log.n_sources)
        model = ScriptModel(final, self.vocabulary, position=len(self.calls))
        lead = self.script[: len(self.script) - len(self.script.lstrip())]
        for token in index_for(self.vocabulary).encode((lead + text).encode()) or ():
            model.feed(token)
        seen = {d.script_offset for d in self.log.departures}
        for departure in final.departures:
            if departure.script_offset not in seen:
                departure.closed = True
                self.log.add(departure)
        return model.unwritten(None, done.trace.stop_reason.value)

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
