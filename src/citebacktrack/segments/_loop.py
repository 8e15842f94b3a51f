"""The segment loop: a state machine over engine calls (see :mod:`citebacktrack.segments`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from citebacktrack._cancel import stop_if_cancelled
from citebacktrack._draft import Accepted, Draft
from citebacktrack._tracker import ClosedMarker, TextState, advance
from citebacktrack.grammar.ir import Grammar, choice, lit
from citebacktrack.segments._grammar import check_grammatical, next_grammar
from citebacktrack.segments._protocol import SegmentCall, SegmentEngine, SegmentResult
from citebacktrack.segments._revision import Revision, checked_span
from citebacktrack.syntax import (
    CLOSERS,
    TERMINATORS,
    split_sentences,
    strip_markers,
)
from citebacktrack.types import (
    CitationMode,
    CitationRejected,
    Done,
    Event,
    Evidence,
    RejectionReason,
    Rollback,
    SentenceOrigin,
    StopReason,
)
from citebacktrack.validation import CitationValidator

if TYPE_CHECKING:
    from citebacktrack.request import GenerationRequest

__all__ = ["SegmentLoop", "arun_segments", "run_segments"]


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
        self.validator = request.validator or CitationValidator(
            n_sources=self.n_sources, policy=self.policy, scorer=None
        )
        self.constrained = request.grammar is not None
        self._clock = clock
        self._started = clock()
        self.draft = Draft(
            policy=self.policy,
            validator=self.validator,
            n_sources=self.n_sources,
            constrained=self.constrained,
        )
        self._revision = Revision(
            policy=self.policy,
            validator=self.validator,
            sources=request.sources,
            draft=self.draft,
        )
        self._state = TextState(
            strict=self.constrained and self.policy.mode is CitationMode.REQUIRED
        )
        self._bans: dict[int, set[int]] = {}
        self._retries: dict[int, int] = {}
        """Sentence regenerations so far, by sentence start."""
        self._resample = 0
        """The next call regenerates a sentence: its retry number (0: not a retry)."""
        self._allowed: frozenset[int] | None = None
        """Ids the open marker may take at the next call (after a rejection)."""
        self._totals = _Totals()
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
        return self.draft.stop

    def next_call(self) -> SegmentCall | None:
        """What to ask the engine next; ``None`` once the answer has ended.

        Raises:
            BackendError: the answer so far has no continuation (the engine ran past the
                ``]`` stop string, or wrote what its grammar refuses).
        """
        if self.draft.stop is not None:
            return None
        limit = self.budgets.max_wall_time_s
        if limit is not None and self._clock() - self._started > limit:
            self.draft.stop = StopReason.WALL_TIME
            return None
        remaining = self.budgets.max_new_tokens - self._totals.spent
        if remaining <= 0:
            self._out_of_tokens()
            return None
        prefix = self.draft.out.decode("utf-8", "replace")
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
            grammar=next_grammar(self.n_sources, self.policy, prefix, self._allowed)
            if self.constrained
            else None,
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
        if self.draft.stop is not None:
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
            self._note(len(self.draft.out), note)
        evidence = list(result.evidence)
        revised: str | None = None
        if self.constrained and not self.continues_prefix:
            revised = strip_markers(result.text).strip()  # the claim a quote must support
            text, evidence = self._revision.revise(result.text, evidence, events, totals.calls)
            totals.backtracks += self._revision.backtracks
            self._revision.backtracks = 0
            result = dataclasses.replace(result, text=text, finish=_final(result.finish))
        piece = result.text.encode("utf-8")
        before = len(self.draft.out)
        state, closed = advance(self._state, piece, totals.calls)
        if result.finish == "stop" and state.in_marker and state.partial_id:
            state, more = advance(state, b"]", totals.calls)  # the stop string itself
            piece += b"]"
            closed = (*closed, *more)
        ends = result.finish == "end" or (result.finish == "stop" and not closed)
        if self.constrained and self.continues_prefix:
            check_grammatical(
                self.n_sources, self.policy, bytes(self.draft.out + piece), complete=ends
            )
        self.draft.out += piece
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
                    self.draft.stop = (
                        StopReason.END if self.draft.accepted else StopReason.NO_SUPPORTED_ANSWER
                    )
                return events
        totals.kept += result.completion_tokens
        totals.spent += max(result.completion_tokens, 1)
        if self._copy:
            self._copied(before, result.text)
            return events + self._release(final=False)
        if ends:
            self.draft.stop = StopReason.END
        elif result.finish == "length":
            self._out_of_tokens()
        if (
            revised is not None
            and not self.draft.accepted
            and self.policy.mode is CitationMode.REQUIRED
        ):
            # Nothing in the one-call answer survived: the policy's fallback, as when the
            # token-level decoder finds no supported sentence.
            quoted = self.policy.fallback != "abstain" and revised and self._quote(revised)
            self.draft.stop = StopReason.FALLBACK if quoted else StopReason.NO_SUPPORTED_ANSWER
        events += self._release(final=False)
        return events

    def finish(self) -> list[Event]:
        """The last events: what is left to release and ``Done``."""
        if self._done:
            raise RuntimeError("finish() was already called")
        self._done = True
        if self.draft.stop is None:
            self.draft.stop = StopReason.END
        events = self._release(final=True)
        return [*events, self._done_event()]

    # ------------------------------------------------------------------ markers

    def _claim(self, start: int, end: int) -> str:
        return self.draft.claim(start, end)

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
            self.draft.accepted.append(
                Accepted(
                    marker,
                    verdict,
                    claim,
                    evidence=checked_span(given, marker, self.request.sources),
                )
            )
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
            for a in self.draft.accepted
            if a.marker.sentence_start == marker.sentence_start and a.marker.end <= marker.start
        ]
        return bool(earlier) and earlier[-1].verdict.is_complete

    def _end_answer(self, marker: ClosedMarker) -> None:
        """Cut ``marker`` off and end the answer there: a supported sentence is closed
        (with a period unless its terminator came before the group, as in
        ``claim. [1]``), an uncited one is dropped."""
        self._truncate(marker.start)
        self._note(marker.start, "a marker that could not be placed: the answer ends here")
        self.draft.stop = StopReason.END
        state = self._state
        if not state.sentence_ids:
            self._truncate(state.sentence_start)
            if not self.draft.accepted:
                self.draft.stop = StopReason.NO_SUPPORTED_ANSWER
            return
        body = strip_markers(self.draft.out[state.sentence_start :].decode("utf-8", "replace"))
        if not body.rstrip().rstrip(CLOSERS).endswith(tuple(TERMINATORS)):
            self.draft.out += b"."
            self._state, _ = advance(self._state, b".", self._totals.calls)

    def _reopen(self, end: int, claim: str, prior: tuple[int, ...]) -> None:
        """Open the next marker of the group ourselves, allowing ids that complete it."""
        sentence = self._state.sentence_start
        allowed = self._supported_ids(claim, prior, self._bans.get(sentence, set()))
        if allowed and len(self.draft.out) == end:
            self.draft.out += b"["
            self._state, _ = advance(self._state, b"[", self._totals.calls)
            self._allowed = allowed

    def _supported_ids(
        self, claim: str, prior: tuple[int, ...], banned: set[int]
    ) -> frozenset[int]:
        """Ids the validator accepts for the next marker of this sentence."""
        return frozenset(self.draft.supported_ids(claim, prior, banned))

    def _out_of_rollbacks(self) -> bool:
        if self._totals.backtracks > self.budgets.max_backtracks:
            self.draft.stop = StopReason.BACKTRACK_BUDGET
        elif self._totals.wasted > self.budgets.max_rolled_back_tokens:
            self.draft.stop = StopReason.ROLLED_BACK_TOKEN_BUDGET
        return self.draft.stop is not None

    def _out_of_tokens(self) -> None:
        """The token budget ran out: ``max_new_tokens``, unless the sentence waiting for
        its citation is one no source would support (:meth:`Draft.unsupported_at_budget`);
        then it ends like a sentence no citation can be found for."""
        self.draft.stop = StopReason.MAX_NEW_TOKENS
        state = self._state
        sentence = state.sentence_start
        claim = self.draft.unsupported_at_budget(state, self._bans.get(sentence, set()))
        if claim is None:
            return
        end = state.marker_start if state.in_marker else len(self.draft.out)
        self._note(end, "the token budget ran out in an unsupported sentence")
        self._give_up_sentence(sentence, end, claim)

    def _give_up_sentence(self, sentence: int, marker_start: int, claim: str) -> None:
        """No source supports the sentence: drop it and apply the policy's fallback
        (:meth:`Draft.give_up`; a planned copy is written by the next call)."""
        self._note(sentence, "no valid citation for this sentence")
        if self.policy.mode is CitationMode.AUTO:
            self._truncate(marker_start)  # drop the marker, keep the prose
            self.draft.stop = None
            return
        self._truncate(sentence)
        self.draft.stop = self.draft.give_up(
            copy=lambda: self._plan_copy(claim), quote=lambda: self._quote(claim)
        )

    def _no_copy(self, claim: str) -> None:
        """The end of an answer whose unsupported sentence was not replaced by a copy."""
        self.draft.stop = self.draft.end_without_copy(lambda: self._quote(claim))

    def _plan_copy(self, claim: str) -> bool:
        """Grounded recovery, as in the token-level decoder (``Decoder._copy``): the next
        call is sent a grammar that allows only one of the sentences the validator offers
        (:meth:`CitationValidator.grounding`), each with its marker, and the engine's
        likelihood picks one. False when there is nothing to copy or the engine cannot
        continue a prefix."""
        if not self.continues_prefix:
            return False
        lead = "" if not self.draft.out or self.draft.out[-1:].isspace() else " "
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
            for item in self.draft.accepted:
                if item.marker.start >= before:
                    item.origin = SentenceOrigin.COPY
            self._note(before, "grounded copy of a source sentence")
            self.draft.stop = self.draft.grounded_stop()
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
        lead = b"" if not self.draft.out or self.draft.out[-1:].isspace() else b" "
        piece = lead + f"{text} [{source}].".encode()
        state, closed = advance(self._state, piece, self._totals.calls + 1)
        start = len(self.draft.out)
        self.draft.out += piece
        self._state = state
        for marker in closed:
            said = self._claim(marker.sentence_start, marker.start)
            verdict = self.validator.check(
                source_index=marker.source_index, sentence_ids=marker.prior_ids, claim=said
            )
            if not verdict.is_accepted:
                self._truncate(start)
                return False
            self.draft.accepted.append(Accepted(marker, verdict, said, origin=SentenceOrigin.QUOTE))
        self._note(start, f"quoted the evidence of source [{source}]")
        return True

    def _truncate(self, length: int) -> None:
        """Cut the draft back to ``length`` bytes (never into released text)."""
        self.draft.cut(max(length, self.draft.released))
        state = TextState(strict=self._state.strict)
        state, _ = advance(state, bytes(self.draft.out), 0)
        self._state = state

    # ------------------------------------------------------------------ events

    def _rejection(
        self,
        byte_offset: int,
        source_index: int,
        reason: RejectionReason | None,
        score: float | None,
        detail: str,
    ) -> CitationRejected:
        return self.draft.reject(
            position=self._totals.calls,
            offset=self.draft.char_offset(byte_offset),
            source_index=source_index,
            reason=reason,
            score=score,
            detail=detail,
        )

    def _note(self, byte_offset: int, detail: str) -> None:
        self.draft.note(
            position=self._totals.calls, offset=self.draft.char_offset(byte_offset), detail=detail
        )

    def _release(self, *, final: bool) -> list[Event]:
        """Release what can no longer be taken back: up to the current sentence's start."""
        safe = self.draft.final_offset(self._state) if final else None
        return self.draft.release(self._state.sentence_start if safe is None else safe)

    def _done_event(self) -> Done:
        totals = self._totals
        return self.draft.done(
            backtracks=totals.backtracks,
            wasted=totals.wasted,
            forward_passes=totals.calls,
            kept=totals.kept,
            prompt_tokens=totals.prompt_tokens,
            generated=totals.generated,
        )


def _final(finish: Literal["stop", "end", "length"]) -> Literal["end", "length"]:
    """A one-call answer is whole: a stop string cannot have cut it."""
    return "length" if finish == "length" else "end"


def _loop_for(engine: SegmentEngine, request: GenerationRequest) -> SegmentLoop:
    return SegmentLoop(request, continues_prefix=getattr(engine, "continues_prefix", True))


def run_segments(engine: SegmentEngine, request: GenerationRequest) -> Iterator[Event]:
    """Drive a :class:`SegmentLoop` over ``engine`` (blocking); ``Done`` last."""
    loop = _loop_for(engine, request)
    while (call := loop.next_call()) is not None:
        stop_if_cancelled()  # an async caller that went away stops it between calls
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
