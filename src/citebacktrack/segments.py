"""Segment-level backtracking, for engines that cannot roll back a KV cache.

A server (llama.cpp's, vLLM's) or an API generates one *segment* at a time: the answer
from an accepted prefix up to the next citation close (``stop=["]"]``), under a grammar
for "the rest of the answer from here". The same validator as the token-level decoder
checks each closed marker; a rejection resubmits the prompt and the accepted prefix up to
the marker's ``[`` with a grammar that allows only the ids the validator accepts there.

:class:`SegmentLoop` is a plain state machine with no I/O: ``next_call()`` says what to ask
the engine, ``feed(result)`` takes its answer and returns the events it releases, and
``finish()`` ends the stream with ``Done``. :func:`run_segments` and :func:`arun_segments`
drive it over a :class:`SegmentEngine` (blocking and natively async). Budgets, stop
reasons, events and the trace are the token-level decoder's; what differs:

* ids come from support as in the decoder: after a rejected marker the resubmission's
  grammar allows only the ids the validator accepts for that sentence, so the engine
  chooses among supported sources;
* when no id supports the sentence it is regenerated once, sampled, and then replaced by
  a grounded copy: the next call's grammar allows only the source sentences the validator
  offers (``CitationValidator.grounding``), each with its marker, and the engine's
  likelihood picks one (``Policy.fallback="copy"``, ADR 0011); without a copy the answer
  ends after the supported sentences (``no_valid_citation``) or, when nothing was
  supported, quotes the best-supported source's evidence or abstains;
* token counts are the engine's (``forward_passes`` counts engine calls; tokens of a
  segment cut back by a rejection count as wasted, whole);
* streaming releases a sentence once the next one starts, as the decoder does.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from citebacktrack.decoding.trace_log import TraceLog
from citebacktrack.decoding.tracker import ClosedMarker, TextState, advance
from citebacktrack.errors import BackendError, GrammarError
from citebacktrack.grammar.citations import (
    citation_grammar,
    continuation_grammar,
    is_answer_prefix,
)
from citebacktrack.grammar.ir import Grammar, choice, lit
from citebacktrack.support import content_stems
from citebacktrack.syntax import (
    CLOSERS,
    TERMINATORS,
    cite_sentence,
    leading_space,
    split_sentences,
    strip_markers,
    whole_words,
)
from citebacktrack.types import (
    ChatMessage,
    Citation,
    CitationAccepted,
    CitationMode,
    CitationRejected,
    Done,
    Event,
    Evidence,
    RejectionReason,
    Rollback,
    SentenceOrigin,
    Source,
    StopReason,
    TextDelta,
    Trace,
    TraceEntry,
    Usage,
)
from citebacktrack.validation import CitationValidator, Verdict

if TYPE_CHECKING:
    from citebacktrack.request import GenerationRequest

__all__ = [
    "SegmentCall",
    "SegmentEngine",
    "SegmentLoop",
    "SegmentResult",
    "arun_segments",
    "run_segments",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentCall:
    """One request to a segment-level engine.

    Attributes:
        messages: the chat prompt (sources included), the same for every call of an answer.
        prefix: accepted answer text the engine must continue (the start of the assistant
            turn; ``""`` for the first call).
        grammar: what may follow ``prefix`` (the citation grammar restarted at that
            point); ``None`` for an unconstrained call (the raw-model baseline).
        stop: strings that end the segment (excluded from the result's text).
        max_tokens: most tokens to generate in this call.
        temperature: sampling temperature (0: greedy).
        top_p: nucleus mass (1.0: off).
        seed: sampling seed, where the engine takes one.
        sources: the request's sources, for engines that send them as their own blocks
            (Anthropic's documents) instead of reading them in ``messages``.
        question: the question alone (``None`` when the request had none: use the last
            user message).
    """

    messages: Sequence[ChatMessage]
    prefix: str
    grammar: Grammar | None
    stop: tuple[str, ...] = ("]",)
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    sources: Sequence[Source] = ()
    question: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentResult:
    """What an engine generated for one :class:`SegmentCall`.

    Attributes:
        text: the generated text after ``prefix``, without the stop string.
        finish: ``"stop"`` a stop string was hit; ``"end"`` the model ended its answer;
            ``"length"`` ``max_tokens`` ran out.
        prompt_tokens: tokens in the prompt as the engine counted them (0 if unknown).
        completion_tokens: tokens generated (0 if unknown).
        evidence: the provider's own cited span for each ``[N]`` marker in ``text``, in
            order (``None`` where it has none); used for an accepted citation when it is
            exactly the source's text at those offsets, else the validator's span is.
    """

    text: str
    finish: Literal["stop", "end", "length"]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    evidence: tuple[Evidence | None, ...] = ()
    notes: tuple[str, ...] = ()
    """What the engine left out of ``text`` and why (e.g. a citation of a document
    index out of range); each becomes a trace entry."""


@runtime_checkable
class SegmentEngine(Protocol):
    """What the segment loop needs of a server or API client: one segment per call.

    An engine may say ``continues_prefix = False`` (a class attribute; absent means True):
    it cannot continue an accepted prefix under a grammar (a hosted API with native
    citations or a JSON schema). The loop then makes one call and revises that answer in
    one pass with the same validator (see :class:`SegmentLoop`).
    """

    def complete(self, call: SegmentCall) -> SegmentResult:
        """Generate one segment (blocking)."""
        ...

    async def acomplete(self, call: SegmentCall) -> SegmentResult:
        """Generate one segment (natively async)."""
        ...


@dataclass(slots=True)
class _Accepted:
    marker: ClosedMarker
    verdict: Verdict
    claim: str
    evidence: Evidence | None = None
    """The engine's own span for this marker, checked against the source text."""
    origin: SentenceOrigin = SentenceOrigin.MODEL


@dataclass(slots=True)
class _Totals:
    calls: int = 0
    prompt_tokens: int = 0
    generated: int = 0
    kept: int = 0
    spent: int = 0
    """Tokens counted against ``max_new_tokens``: each kept segment at least one, so an
    engine that reports no count (0) still runs out of budget."""
    wasted: int = 0
    backtracks: int = 0
    rejections: int = 0
    entries: TraceLog = field(default_factory=TraceLog)


class SegmentLoop:
    """Segment-level backtracking for one request; drive it with :func:`run_segments`.

    With ``continues_prefix=False`` (an engine that cannot continue an accepted prefix
    under a grammar: a hosted API's native citations or JSON schema) the loop makes one
    call and *revises* that answer in one pass, sentence by sentence, with the same
    validator and the same per-sentence rule: a rejected marker is replaced by the id the
    validator scores best among those it accepts for the sentence (the engine cannot be
    asked to choose again), or dropped when none is; a partial source nothing completes is
    dropped; a sentence left with no citation is dropped under the required policy and
    kept uncited otherwise. Every change is a ``CitationRejected`` event and a trace entry.

    Args:
        request: the backend-neutral request (its ``segments`` options are read).
        clock: seconds for the wall-time budget (tests pass a fake).
        continues_prefix: whether the engine can continue an accepted prefix.
    """

    def __init__(
        self,
        request: GenerationRequest,
        *,
        clock: Callable[[], float] = time.perf_counter,
        continues_prefix: bool = True,
    ) -> None:
        self.request = request
        self.continues_prefix = continues_prefix
        self.policy = request.policy
        self.budgets = request.budgets
        self.options = request.segments
        self.n_sources = request.n_sources
        self.source_ids = request.source_ids
        self.validator = request.validator or CitationValidator(
            n_sources=self.n_sources, policy=self.policy, scorer=None
        )
        self.constrained = request.grammar is not None
        self._clock = clock
        self._started = clock()
        self._draft = bytearray()
        self._state = TextState(
            strict=self.constrained and self.policy.mode is CitationMode.REQUIRED
        )
        self._accepted: list[_Accepted] = []
        self._bans: dict[int, set[int]] = {}
        self._retries: dict[int, int] = {}
        """Sentence regenerations so far, by sentence start."""
        self._resample = 0
        """The next call regenerates a sentence: its retry number (0: not a retry)."""
        self._allowed: frozenset[int] | None = None
        """Ids the open marker may take at the next call (after a rejection)."""
        self._released = 0
        self._released_chars = 0
        self._totals = _Totals()
        self._stop: StopReason | None = None
        self._done = False
        self._copy: tuple[str, ...] = ()
        """Grounded recovery: the sentences (with their markers) the next call must write
        one of; empty when the next call is an ordinary one."""
        self._copy_claim = ""
        """The unsupported claim the copy replaces (what a quote falls back on)."""

    # ------------------------------------------------------------------ driving

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the answer ended, once it has."""
        return self._stop

    def next_call(self) -> SegmentCall | None:
        """What to ask the engine next; ``None`` once the answer has ended.

        Raises:
            BackendError: the answer so far has no continuation (the engine ran past the
                ``]`` stop string, or wrote what its grammar refuses).
        """
        if self._stop is not None:
            return None
        limit = self.budgets.max_wall_time_s
        if limit is not None and self._clock() - self._started > limit:
            self._stop = StopReason.WALL_TIME
            return None
        remaining = self.budgets.max_new_tokens - self._totals.spent
        if remaining <= 0:
            self._out_of_tokens()
            return None
        prefix = self._draft.decode("utf-8", "replace")
        if self._copy:
            return SegmentCall(
                messages=self.request.messages,
                sources=self.request.sources,
                question=self.request.question,
                prefix=prefix,
                grammar=Grammar((("root", choice(*(lit(text) for text in self._copy))),)),
                stop=(),
                max_tokens=remaining,
                temperature=0.0,
                top_p=1.0,
                seed=self.options.seed,
            )
        temperature, seed = self.options.temperature, self.options.seed
        if self._resample:
            temperature = max(temperature, self.options.resample_temperature)
            seed = (seed or 0) + self._resample
            self._resample = 0
        return SegmentCall(
            messages=self.request.messages,
            sources=self.request.sources,
            question=self.request.question,
            prefix=prefix,
            grammar=self._grammar(prefix),
            stop=("]",) if self.constrained else (),
            # A one-call engine writes the whole answer in this call.
            max_tokens=min(self.options.max_segment_tokens, remaining)
            if self.continues_prefix
            else remaining,
            temperature=temperature,
            top_p=self.options.top_p,
            seed=seed,
        )

    def feed(self, result: SegmentResult) -> list[Event]:
        """Take the engine's segment; return the events it releases.

        Each kept segment counts as at least one token of ``max_new_tokens`` (an engine
        that reports no count still runs out); negative counts are read as 0.

        Raises:
            BackendError: a continuing engine wrote what the grammar it was sent refuses
                (its server does not enforce grammars or the ``]`` stop string).
        """
        if self._stop is not None:
            raise RuntimeError("the segment loop has ended; call finish()")
        if result.completion_tokens < 0 or result.prompt_tokens < 0:  # counts: 0 if unknown
            result = dataclasses.replace(
                result,
                prompt_tokens=max(result.prompt_tokens, 0),
                completion_tokens=max(result.completion_tokens, 0),
            )
        totals = self._totals
        totals.calls += 1
        totals.prompt_tokens = max(totals.prompt_tokens, result.prompt_tokens)
        totals.generated += result.completion_tokens
        events: list[Event] = []
        for note in result.notes:
            self._note_at(self._char_offset(len(self._draft)), note)
        evidence = list(result.evidence)
        revised: str | None = None
        if self.constrained and not self.continues_prefix:
            revised = strip_markers(result.text).strip()  # the claim a quote must support
            text, evidence = self._revise(result.text, evidence, events)
            for _ in range(_REVISIONS - 1):
                # Taking a marker or a bracket out can move a sentence boundary ("U.S. [1].]"
                # becomes "U.S..)", which ends there): revise the revision until it stands.
                again, again_evidence = self._revise(text, evidence, events)
                if again == text:
                    break
                text, evidence = again, again_evidence
            result = dataclasses.replace(result, text=text, finish=_final(result.finish))
        piece = result.text.encode("utf-8")
        before = len(self._draft)
        state, closed = advance(self._state, piece, totals.calls)
        if result.finish == "stop" and state.in_marker and state.partial_id:
            state, more = advance(state, b"]", totals.calls)  # the stop string itself
            piece += b"]"
            closed = (*closed, *more)
        ends = result.finish == "end" or (result.finish == "stop" and not closed)
        if self.constrained and self.continues_prefix:
            self._check_grammatical(bytes(self._draft + piece), complete=ends)
        self._draft += piece
        self._state = state
        self._allowed = None
        for k, marker in enumerate(closed if self.constrained else ()):
            given = evidence[k] if k < len(evidence) else None
            if (
                self._copy
                and not self.validator.check(
                    source_index=marker.source_index,
                    sentence_ids=marker.prior_ids,
                    claim=self._claim(marker.sentence_start, marker.start),
                ).is_accepted
            ):
                # A copy's markers were accepted when it was offered; should one not be,
                # the answer ends as without a copy rather than retrying it.
                self._copy = ()
                self._truncate(before)
                self._no_copy(self._copy_claim)
                return events
            if not self._check(marker, result, before, events, given):
                if not self.continues_prefix:
                    # The revision's own markers are accepted (tests/test_fuzz.py checks
                    # it); should one not be, a one-call engine is never asked again.
                    self._truncate(marker.sentence_start)
                    self._allowed = None
                    self._note(marker.sentence_start, "a revised marker was rejected")
                    self._stop = (
                        StopReason.END if self._accepted else StopReason.NO_SUPPORTED_ANSWER
                    )
                return events
        totals.kept += result.completion_tokens
        totals.spent += max(result.completion_tokens, 1)
        if self._copy:
            self._copied(before, result.text)
            return events + self._release(final=False)
        if ends:
            self._stop = StopReason.END
        elif result.finish == "length":
            self._out_of_tokens()
        if revised is not None and not self._accepted and self.policy.mode is CitationMode.REQUIRED:
            # Nothing in the one-call answer survived: the policy's fallback, as when the
            # token-level decoder finds no supported sentence.
            quoted = self.policy.fallback != "abstain" and revised and self._quote(revised)
            self._stop = StopReason.FALLBACK if quoted else StopReason.NO_SUPPORTED_ANSWER
        events += self._release(final=False)
        return events

    def finish(self) -> list[Event]:
        """The last events: what is left to release and ``Done``."""
        if self._done:
            raise RuntimeError("finish() was already called")
        self._done = True
        if self._stop is None:
            self._stop = StopReason.END
        events = self._release(final=True)
        return [*events, self._done_event()]

    # ------------------------------------------------------------------ markers

    def _check_grammatical(self, draft: bytes, *, complete: bool) -> None:
        """Raise unless the grammar the engine was sent accepts ``draft`` (as a whole
        answer when the engine ended it): a server that does not enforce the grammar
        would otherwise slip ungrammatical markers (``["[3]``) and prose into the answer.

        Raises:
            BackendError: the grammar refuses the engine's text.
        """
        text = draft.decode("utf-8", "replace")
        if not text.strip():
            return  # nothing written (an empty answer: the model wrote nothing)
        if is_answer_prefix(self.n_sources, self.policy, text, bounded=True, complete=complete):
            return
        what = "a whole answer" if complete else "the start of an answer"
        raise BackendError(
            f"the engine wrote an answer the citation grammar it was sent refuses as {what} "
            f"(...{text[-40:]!r}); check that the server enforces grammars (and the stop "
            "string ']')"
        )

    def _grammar(self, prefix: str) -> Grammar | None:
        """The grammar of what may follow ``prefix``.

        Raises:
            BackendError: the engine wrote text the citation grammar refuses (its server
                does not enforce the grammar it is sent), so no continuation exists.
        """
        if not self.constrained:
            return None
        policy = self.policy
        if not prefix.strip():
            return citation_grammar(self.n_sources, policy, bounded=True)
        try:
            return continuation_grammar(
                self.n_sources, policy, prefix, allowed_ids=self._allowed, bounded=True
            )
        except GrammarError as exc:
            raise BackendError(
                f"the engine wrote an answer the citation grammar it was sent refuses ({exc}); "
                "check that the server enforces grammars (and the stop string ']')"
            ) from exc

    def _claim(self, start: int, end: int) -> str:
        return strip_markers(self._draft[start:end].decode("utf-8", "replace")).strip()

    def _check(
        self,
        marker: ClosedMarker,
        result: SegmentResult,
        before: int,
        events: list[Event],
        given: Evidence | None = None,
    ) -> bool:
        """Validate one closed marker; on rejection cut the draft back and plan the retry."""
        claim = self._claim(marker.sentence_start, marker.start)
        if not any(c.isalnum() for c in claim):
            # A marker with no words before it (the grammar takes "[1]." as a sentence;
            # the token-level decoder filters it, a server cannot be told to).
            events.append(
                self._rejection(
                    marker.start,
                    marker.source_index,
                    RejectionReason.UNSUPPORTED,
                    None,
                    "a marker with no words to cite",
                )
            )
            self._totals.wasted += result.completion_tokens
            self._end_answer(marker)
            return False
        verdict = self.validator.check(
            source_index=marker.source_index, sentence_ids=marker.prior_ids, claim=claim
        )
        if verdict.is_accepted:
            self._accepted.append(_Accepted(marker, verdict, claim, self._checked(given, marker)))
            if not verdict.is_complete:
                # A partial source: the group must go on with one that completes it.
                self._reopen(marker.end, claim, (*marker.prior_ids, marker.source_index))
            return True
        events.append(
            self._rejection(
                marker.start, marker.source_index, verdict.reason, verdict.score, verdict.detail
            )
        )
        sentence = marker.sentence_start
        self._bans.setdefault(sentence, set()).add(marker.source_index)
        self._totals.wasted += result.completion_tokens
        self._totals.backtracks += 1
        if self._out_of_rollbacks():
            self._truncate(sentence)  # the answer keeps the sentences before this one
            return False
        allowed = self._supported_ids(claim, marker.prior_ids, self._bans[sentence])
        if allowed:
            self._truncate(marker.start + 1)  # keep "[": the engine writes the id again
            self._allowed = allowed
            events.append(
                Rollback(depth=result.completion_tokens, reason=f"rejected [{marker.source_index}]")
            )
            return False
        if self._supported_before(marker):
            # The sentence is supported already and no further id adds to it: the extra
            # marker is dropped and the answer ends after this sentence (resubmitted, the
            # grammar would let the model stack the marker again).
            events.append(Rollback(depth=result.completion_tokens, reason="extra marker dropped"))
            self._end_answer(marker)
            return False
        retries = self._retries.get(sentence, 0)
        if retries < self.budgets.sentence_retries:
            # Escalation, as in the decoder: regenerate the sentence. A greedy server
            # would write it again word for word and cannot be told to start differently,
            # so the retry is sampled (SegmentOptions.resample_temperature, seeded).
            self._retries[sentence] = retries + 1
            self._truncate(sentence)
            self._resample = retries + 1
            self._note(sentence, "no supported id: the sentence is regenerated, sampled")
            events.append(Rollback(depth=result.completion_tokens, reason="sentence regenerated"))
            return False
        events.append(Rollback(depth=result.completion_tokens, reason="no supported id"))
        self._give_up_sentence(marker.sentence_start, marker.start, claim)
        return False

    def _supported_before(self, marker: ClosedMarker) -> bool:
        """Whether the sentence of ``marker`` is already supported by its earlier ids."""
        earlier = [
            a
            for a in self._accepted
            if a.marker.sentence_start == marker.sentence_start and a.marker.end <= marker.start
        ]
        return bool(earlier) and earlier[-1].verdict.is_complete

    def _end_answer(self, marker: ClosedMarker) -> None:
        """Cut ``marker`` off and end the answer there: a supported sentence is closed
        (with a period unless its terminator came before the group, as in
        ``claim. [1]``), an uncited one is dropped."""
        self._truncate(marker.start)
        self._note(marker.start, "a marker that could not be placed: the answer ends here")
        self._stop = StopReason.END
        state = self._state
        if not state.sentence_ids:
            self._truncate(state.sentence_start)
            if not self._accepted:
                self._stop = StopReason.NO_SUPPORTED_ANSWER
            return
        body = strip_markers(self._draft[state.sentence_start :].decode("utf-8", "replace"))
        if not body.rstrip().rstrip(CLOSERS).endswith(tuple(TERMINATORS)):
            self._draft += b"."
            self._state, _ = advance(self._state, b".", self._totals.calls)

    def _reopen(self, end: int, claim: str, prior: tuple[int, ...]) -> None:
        """Open the next marker of the group ourselves, allowing ids that complete it."""
        sentence = self._state.sentence_start
        allowed = self._supported_ids(claim, prior, self._bans.get(sentence, set()))
        if allowed and len(self._draft) == end:
            self._draft += b"["
            self._state, _ = advance(self._state, b"[", self._totals.calls)
            self._allowed = allowed

    def _supported_ids(
        self, claim: str, prior: tuple[int, ...], banned: set[int]
    ) -> frozenset[int]:
        """Ids the validator accepts for the next marker of this sentence."""
        return frozenset(self._supported_scores(claim, prior, banned))

    def _supported_scores(
        self, claim: str, prior: tuple[int, ...], banned: set[int]
    ) -> dict[int, float]:
        """The ids the validator accepts for the next marker, with their scores (0.0
        without a scorer, where every free id is accepted)."""
        if self.validator.scorer is None:
            taken = set(prior) | banned
            return {i: 0.0 for i in range(1, self.n_sources + 1) if i not in taken}
        scores: dict[int, float] = {}
        for i in range(1, self.n_sources + 1):
            if i in banned or i in prior:
                continue
            verdict = self.validator.check(source_index=i, sentence_ids=prior, claim=claim)
            if verdict.is_accepted:
                scores[i] = verdict.score or 0.0
        return scores

    def _out_of_rollbacks(self) -> bool:
        if self._totals.backtracks > self.budgets.max_backtracks:
            self._stop = StopReason.BACKTRACK_BUDGET
        elif self._totals.wasted > self.budgets.max_rolled_back_tokens:
            self._stop = StopReason.ROLLED_BACK_TOKEN_BUDGET
        return self._stop is not None

    def _out_of_tokens(self) -> None:
        """The token budget ran out: as in the token-level decoder (``Decoder._out_of_tokens``),
        a sentence still waiting for its citation under REQUIRED is judged as it stands,
        and when no source would support it the answer ends as for a sentence no citation
        can be found for, not with ``max_new_tokens``."""
        self._stop = StopReason.MAX_NEW_TOKENS
        state = self._state
        if (
            not self.constrained
            or self.policy.mode is not CitationMode.REQUIRED
            or self.validator.scorer is None
            or not (state.dangling or state.in_marker)
        ):
            return
        sentence = state.sentence_start
        end = state.marker_start if state.in_marker else len(self._draft)
        claim = whole_words(self._claim(sentence, end))  # the budget may cut a word short
        if not content_stems(claim):
            return  # nothing to judge yet: the budget cut the sentence
        if self._supported_ids(claim, state.sentence_ids, self._bans.get(sentence, set())):
            return
        self._note(end, "the token budget ran out in an unsupported sentence")
        self._give_up_sentence(sentence, end, claim)

    def _give_up_sentence(self, sentence: int, marker_start: int, claim: str) -> None:
        """No source supports the sentence: drop it and apply the policy's fallback."""
        self._note(sentence, "no valid citation for this sentence")
        if self.policy.mode is CitationMode.AUTO:
            self._truncate(marker_start)  # drop the marker, keep the prose
            self._stop = None
            return
        self._truncate(sentence)
        required = self.policy.mode is CitationMode.REQUIRED
        if self.validator.scorer is None:
            self._stop = StopReason.NO_VALID_CITATION
        elif required and self.policy.fallback == "copy" and self._plan_copy(claim):
            self._stop = None  # the next call writes the copy
        else:
            self._no_copy(claim)

    def _no_copy(self, claim: str) -> None:
        """The end of an answer whose unsupported sentence was not replaced by a copy:
        the supported sentences before it, else the quote, else the abstention."""
        if self._accepted:
            self._stop = StopReason.NO_VALID_CITATION
        elif (
            self.policy.mode is CitationMode.REQUIRED
            and self.policy.fallback != "abstain"
            and self._quote(claim)
        ):
            self._stop = StopReason.FALLBACK
        else:
            self._stop = StopReason.NO_SUPPORTED_ANSWER

    def _plan_copy(self, claim: str) -> bool:
        """Grounded recovery, as in the token-level decoder (``Decoder._copy``): the next
        call is sent a grammar that allows only one of the sentences the validator offers
        (:meth:`CitationValidator.grounding`), each with its marker, and the engine's
        likelihood picks one. False when there is nothing to copy or the engine cannot
        continue a prefix."""
        if not self.continues_prefix:
            return False
        lead = "" if not self._draft or self._draft[-1:].isspace() else " "
        self._copy = tuple(
            f"{lead}{text} [{source}]." for source, text in self.validator.grounding(claim)
        )
        self._copy_claim = claim
        return bool(self._copy)

    def _copied(self, before: int, text: str) -> None:
        """Ends the answer after a copy call: its markers marked as copies when the engine
        wrote one of the sentences it was offered, else the answer ends as without one."""
        offered, self._copy = self._copy, ()
        if text in offered:
            for item in self._accepted:
                if item.marker.start >= before:
                    item.origin = SentenceOrigin.COPY
            self._note(before, "grounded copy of a source sentence")
            self._stop = (
                StopReason.END
                if any(a.origin is SentenceOrigin.MODEL for a in self._accepted)
                else StopReason.FALLBACK
            )
            return
        self._truncate(before)
        self._note(before, "the engine did not write a sentence it was offered")
        self._no_copy(self._copy_claim)

    def _quote(self, claim: str) -> bool:
        """Write the evidence sentence the validator picks (relevant to the question)
        with its citation."""
        picked = self.validator.quote(claim)
        if picked is None:
            return False
        source, text = picked
        if len(split_sentences(text + ".")) != 1:
            return False
        lead = b"" if not self._draft or self._draft[-1:].isspace() else b" "
        piece = lead + f"{text} [{source}].".encode()
        state, closed = advance(self._state, piece, self._totals.calls + 1)
        start = len(self._draft)
        self._draft += piece
        self._state = state
        for marker in closed:
            said = self._claim(marker.sentence_start, marker.start)
            verdict = self.validator.check(
                source_index=marker.source_index, sentence_ids=marker.prior_ids, claim=said
            )
            if not verdict.is_accepted:
                self._truncate(start)
                return False
            self._accepted.append(_Accepted(marker, verdict, said, origin=SentenceOrigin.QUOTE))
        self._note(start, f"quoted the evidence of source [{source}]")
        return True

    def _truncate(self, length: int) -> None:
        """Cut the draft back to ``length`` bytes (never into released text)."""
        length = max(length, self._released)
        del self._draft[length:]
        self._accepted = [a for a in self._accepted if a.marker.end <= length]
        state = TextState(strict=self._state.strict)
        state, _ = advance(state, bytes(self._draft), 0)
        self._state = state

    # ------------------------------------------------------------------ one-pass revision

    def _checked(self, given: Evidence | None, marker: ClosedMarker) -> Evidence | None:
        """The engine's span for ``marker`` if it is exactly its source's text there."""
        if given is None or given.source_index != marker.source_index:
            return None
        text = self.request.sources[marker.source_index - 1].text
        ok = (
            0 <= given.start <= given.end <= len(text)
            and text[given.start : given.end] == given.text
        )
        return given if ok and given.text else None

    def _revise(
        self, text: str, evidence: list[Evidence | None], events: list[Event]
    ) -> tuple[str, list[Evidence | None]]:
        """Revise a whole answer from an engine that cannot continue a prefix.

        Returns the revised text, in which every marker is one the validator accepts with
        the sentence's earlier ids, and the engine's spans for its markers.
        """
        if self._draft:  # pragma: no cover - such an engine is called once, with no prefix
            raise RuntimeError("a one-call engine was asked to continue a prefix")
        data = text.encode("utf-8")
        markers: list[tuple[ClosedMarker, Evidence | None]] = []
        starts = [0]
        # Sentences as written, even uncited ones (the strict state of the required
        # policy would run an uncited sentence into the next).
        state = TextState(strict=False)
        for i in range(len(data)):
            state, closed = advance(state, data[i : i + 1], 1)
            markers += [
                (m, evidence[len(markers)] if len(markers) < len(evidence) else None)
                for m in closed
            ]
            if state.sentence_start != starts[-1]:
                starts.append(state.sentence_start)
        out = bytearray()
        kept_evidence: list[Evidence | None] = []
        bounds = [*starts, len(data)]
        for a, b in itertools.pairwise(bounds):
            if a >= b:
                continue
            group = [(m, e) for m, e in markers if a <= m.start < b]
            piece, spans = self._revise_sentence(data, a, b, group, len(out), out, events)
            if out and piece and not out[-1:].isspace() and not piece[:1].isspace():
                # A sentence whose whitespace came before its terminator ("x\n."): once
                # revised, nothing would separate it from the next one.
                out += b" "
            out += piece
            kept_evidence += spans
        return out.decode("utf-8", "replace"), kept_evidence

    def _revise_sentence(
        self,
        data: bytes,
        a: int,
        b: int,
        group: list[tuple[ClosedMarker, Evidence | None]],
        at: int,
        out: bytearray,
        events: list[Event],
    ) -> tuple[bytes, list[Evidence | None]]:
        """One sentence ``data[a:b]`` revised: its kept markers in one group, where its last
        one was or, under REQUIRED, where the grammar ends a sentence with its group
        (:func:`~citebacktrack.syntax.cite_sentence`). Every marker is judged on the claim
        before that group, the claim ``feed`` checks it against in the revised text."""
        required = self.policy.mode is CitationMode.REQUIRED
        body = data[a:b]
        offset = len(out[leading_space(out) :].decode("utf-8", "replace")) if out else 0
        if not group:
            if required and any(c.isalnum() for c in body.decode("utf-8", "replace")):
                self._note_at(offset, "a sentence without citations was dropped")
                return b"", []
            return _prose(body), []
        last = group[-1][0]
        head = data[a : last.start]
        # Under REQUIRED the group goes at the end (words after it would leave the sentence
        # open, running it into the next one); elsewhere where the last marker was.
        sentence = _prose(body).decode("utf-8", "replace")
        core = sentence.strip()
        if required:
            placed = cite_sentence(core, "[0]")
            claim = strip_markers(placed[: placed.rindex("[0]")]).strip()
        else:
            claim = _prose(head).decode("utf-8", "replace").strip()
        kept: list[tuple[int, Verdict, Evidence | None]] = []
        banned: set[int] = set()
        for marker, given in group:
            said = claim  # every kept marker lands in the one group
            prior = tuple(i for i, _, _ in kept)
            if marker.source_index in prior:
                continue
            if not any(c.isalnum() for c in said):
                events.append(
                    self._rejection_at(
                        offset,
                        marker.source_index,
                        RejectionReason.UNSUPPORTED,
                        None,
                        "a marker with no words to cite",
                    )
                )
                continue
            verdict = self.validator.check(
                source_index=marker.source_index, sentence_ids=prior, claim=said
            )
            if verdict.is_accepted:
                kept.append((marker.source_index, verdict, self._checked(given, marker)))
                continue
            events.append(
                self._rejection_at(
                    offset, marker.source_index, verdict.reason, verdict.score, verdict.detail
                )
            )
            self._totals.backtracks += 1
            banned.add(marker.source_index)
        if (not kept or not kept[-1][1].is_complete) and any(c.isalnum() for c in claim):
            prior = tuple(i for i, _, _ in kept)  # (a claim with no words gets no marker)
            best = self._best_id(claim, prior, banned)
            if best is not None:
                verdict = self.validator.check(source_index=best, sentence_ids=prior, claim=claim)
                kept.append((best, verdict, None))
                self._note_at(
                    offset, f"cited [{best}], the best-supported source the validator accepts"
                )
        if kept and not kept[-1][1].is_complete:
            kept = [k for k in kept if k[1].is_complete]
        if not kept:
            if required:
                self._note_at(offset, "no valid citation for this sentence: dropped")
                return b"", []
            return _prose(data[a:b]), []
        marks = "".join(f"[{i}]" for i, _, _ in kept)
        if required:
            lead = sentence[: len(sentence) - len(sentence.lstrip())]
            trail = sentence[len(sentence.rstrip()) :]
            return (lead + cite_sentence(core, marks) + trail).encode(), [e for _, _, e in kept]
        tail = _prose(data[last.end : b])
        text = _prose(head).rstrip() + b" " + marks.encode() + tail
        return text, [e for _, _, e in kept]

    def _best_id(self, claim: str, prior: tuple[int, ...], banned: set[int]) -> int | None:
        """The accepted id with the best score (the lowest id on a tie), if any."""
        scores = self._supported_scores(claim, prior, banned)
        if not scores:
            return None
        return min(scores, key=lambda i: (-scores[i], i))

    def _rejection_at(
        self,
        offset: int,
        source_index: int,
        reason: RejectionReason | None,
        score: float | None,
        detail: str,
    ) -> CitationRejected:
        self._totals.rejections += 1
        why = reason or RejectionReason.UNSUPPORTED
        self._totals.entries.append(
            TraceEntry(
                kind="rejection",
                token_position=self._totals.calls,
                char_offset=offset,
                source_index=source_index,
                reason=why.value,
                score=score,
                detail=detail,
            )
        )
        return CitationRejected(
            source_index=source_index, reason=why, score=score, char_offset=offset
        )

    def _note_at(self, offset: int, detail: str) -> None:
        self._totals.entries.append(
            TraceEntry(
                kind="fallback",
                token_position=self._totals.calls,
                char_offset=offset,
                reason=detail,
                detail=detail,
            )
        )

    # ------------------------------------------------------------------ events

    def _char_offset(self, byte_offset: int) -> int:
        start = self._released or leading_space(self._draft)
        return self._released_chars + len(self._draft[start:byte_offset].decode("utf-8", "replace"))

    def _rejection(
        self,
        byte_offset: int,
        source_index: int,
        reason: RejectionReason | None,
        score: float | None,
        detail: str,
    ) -> CitationRejected:
        return self._rejection_at(
            self._char_offset(byte_offset), source_index, reason, score, detail
        )

    def _note(self, byte_offset: int, detail: str) -> None:
        self._note_at(self._char_offset(byte_offset), detail)

    def _safe_offset(self, *, final: bool) -> int:
        """Bytes that can no longer be taken back: up to the current sentence's start."""
        if final and (self._stop in (StopReason.END, StopReason.FALLBACK) or not self.constrained):
            return len(self._draft)
        state = self._state
        if final:
            complete = state.pending_boundary == 2 and not state.in_marker
            if complete and (self.policy.mode is not CitationMode.REQUIRED or state.sentence_ids):
                return len(self._draft)
        return state.sentence_start

    def _release(self, *, final: bool) -> list[Event]:
        safe = self._safe_offset(final=final)
        if not self._released:
            lead = leading_space(self._draft[:safe])
            if lead == safe:
                return []
            self._released = lead
        if safe <= self._released:
            return []
        start, base = self._released, self._released_chars
        text = self._draft[start:safe].decode("utf-8", "replace")
        events: list[Event] = [TextDelta(text=text)]
        for item in self._accepted:
            marker = item.marker
            if start <= marker.start and marker.end <= safe:
                events.append(CitationAccepted(citation=self._citation(item, start, base)))
        self._released = safe
        self._released_chars = base + len(text)
        return events

    def _citation(self, item: _Accepted, start: int, base: int) -> Citation:
        marker = item.marker

        def at(offset: int) -> int:
            return base + len(self._draft[start : max(start, offset)].decode("utf-8", "replace"))

        return Citation(
            start=at(marker.start),
            end=at(marker.end),
            source_index=marker.source_index,
            source_id=self.source_ids[marker.source_index - 1],
            sentence_start=at(marker.sentence_start),
            claim=item.claim,
            support=item.verdict.score,
            evidence=item.evidence
            or self.validator.citation_evidence(item.verdict, item.claim, marker.source_index),
            origin=item.origin,
        )

    def _done_event(self) -> Done:
        totals = self._totals
        stop = self._stop or StopReason.END
        trace = Trace(
            entries=totals.entries.entries(),
            dropped_entries=totals.entries.dropped,
            backtracks=totals.backtracks,
            rejections=totals.rejections,
            tokens_wasted=totals.wasted,
            forward_passes=totals.calls,
            kept_tokens=totals.kept,
            stop_reason=stop,
        )
        usage = Usage(
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.kept,
            generated_tokens=totals.generated,
            forward_passes=totals.calls,
        )
        return Done(usage=usage, trace=trace)


_REVISIONS = 3
"""Most passes of the one-call revision (the second and third only when the one before
moved a sentence boundary)."""


def _final(finish: Literal["stop", "end", "length"]) -> Literal["end", "length"]:
    """A one-call answer is whole: a stop string cannot have cut it."""
    return "length" if finish == "length" else "end"


def _prose(data: bytes) -> bytes:
    """``data`` without its ``[N]`` markers, any other square bracket written as a
    parenthesis: prose holds no marker characters (the tracker would read ``[99.`` as
    the start of a marker), as in the grammar."""
    return _MARKER_BYTES.sub(b"", data).translate(_PARENTHESES)


_PARENTHESES = bytes.maketrans(b"[]", b"()")


_MARKER_BYTES = re.compile(rb"\s*\[[0-9]*\]")


def _loop_for(engine: SegmentEngine, request: GenerationRequest) -> SegmentLoop:
    return SegmentLoop(request, continues_prefix=getattr(engine, "continues_prefix", True))


def run_segments(engine: SegmentEngine, request: GenerationRequest) -> Iterator[Event]:
    """Drive a :class:`SegmentLoop` over ``engine`` (blocking); ``Done`` last."""
    loop = _loop_for(engine, request)
    while (call := loop.next_call()) is not None:
        yield from loop.feed(engine.complete(call))
    yield from loop.finish()


async def arun_segments(
    engine: SegmentEngine, request: GenerationRequest
) -> AsyncGenerator[Event, None]:
    """Drive a :class:`SegmentLoop` over ``engine`` with its native async client."""
    loop = _loop_for(engine, request)
    while (call := loop.next_call()) is not None:
        for event in loop.feed(await engine.acomplete(call)):
            yield event
    for event in loop.finish():
        yield event
