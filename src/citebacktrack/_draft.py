"""The answer in progress, shared by the token-level decoder and the segment loop.

Both loops write an answer into a draft, have each closed ``[N]`` judged by the one
validator, cut the draft back on a rejection, release text once it can no longer be taken
back, and end with a stop reason and ``Done``. :class:`Draft` owns all of that, so each
answer-level rule is written once: the draft's bytes and its accepted markers, release
(text and citations, offsets in characters of the answer, leading whitespace never
counted), the trace (rejections and fallback notes), the fallback when a sentence finds no
citation (the grounded copy, the quote, the abstention) and the stop reasons that name
them, the budget check of a sentence still waiting for its citation, and ``Done``.

What stays in each loop is its mechanism: the decoder masks, samples and rolls back
tokens, the KV cache and the grammar matcher; the segment loop plans engine calls,
continuation grammars and the one-pass revision. Where they differ (trace positions are
token steps in one, engine calls in the other; what may still be taken back) the loop
passes the value in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from citebacktrack._trace_log import TraceLog
from citebacktrack._tracker import ClosedMarker, TextState
from citebacktrack.support import content_stems
from citebacktrack.syntax import leading_space, strip_markers, whole_words
from citebacktrack.types import (
    Citation,
    CitationAccepted,
    CitationMode,
    CitationRejected,
    Done,
    Event,
    Evidence,
    Policy,
    RejectionReason,
    SentenceOrigin,
    StopReason,
    TextDelta,
    Trace,
    TraceEntry,
    Usage,
)
from citebacktrack.validation import CitationValidator, Verdict

__all__ = ["COMPLETE", "Accepted", "Draft"]

COMPLETE = frozenset({StopReason.END, StopReason.FALLBACK})
"""Stop reasons after which the whole draft is the answer (nothing was cut)."""


@dataclass(slots=True)
class Accepted:
    """A marker the validator accepted, with the claim it was judged on."""

    marker: ClosedMarker
    verdict: Verdict
    claim: str
    origin: SentenceOrigin = SentenceOrigin.MODEL
    evidence: Evidence | None = None
    """The engine's own span for this marker, checked against the source text."""


class Draft:
    """One answer in progress: its bytes, accepted markers, released part, trace and stop.

    Args:
        policy: the citation policy (the request's).
        validator: the one validator every marker is judged by.
        n_sources: how many sources may be cited (ids are the answer builder's to stamp).
        constrained: False for the raw model (no citation rules: everything is released).
    """

    __slots__ = (
        "accepted",
        "constrained",
        "n_sources",
        "out",
        "policy",
        "rejections",
        "released",
        "released_chars",
        "stop",
        "trace",
        "validator",
    )

    def __init__(
        self,
        *,
        policy: Policy,
        validator: CitationValidator,
        n_sources: int,
        constrained: bool,
    ) -> None:
        self.policy = policy
        self.validator = validator
        self.n_sources = n_sources
        self.constrained = constrained
        self.out = bytearray()
        self.accepted: list[Accepted] = []
        self.released = 0
        """Bytes of ``out`` released (0 until the first release skips leading space)."""
        self.released_chars = 0
        """Characters of the answer released so far."""
        self.trace = TraceLog()
        self.rejections = 0
        self.stop: StopReason | None = None

    # ------------------------------------------------------------------ judging

    @property
    def required(self) -> bool:
        return self.policy.mode is CitationMode.REQUIRED

    def claim(self, start: int, end: int) -> str:
        """The text of ``out[start:end]``, markers removed: what a marker must support."""
        return strip_markers(self.out[start:end].decode("utf-8", "replace")).strip()

    def judge(self, marker: ClosedMarker) -> tuple[str, Verdict]:
        """The claim a closed marker must support, and the validator's verdict on it."""
        claim = self.claim(marker.sentence_start, marker.start)
        verdict = self.validator.check(
            source_index=marker.source_index, sentence_ids=marker.prior_ids, claim=claim
        )
        return claim, verdict

    def supported_ids(
        self, claim: str, prior: tuple[int, ...], banned: set[int]
    ) -> dict[int, float]:
        """The ids the validator accepts for the next marker of a sentence, with their
        scores (0.0 without a scorer, where every free id is accepted)."""
        n_sources = self.n_sources
        if self.validator.scorer is None:
            taken = set(prior) | banned
            return {i: 0.0 for i in range(1, n_sources + 1) if i not in taken}
        scores: dict[int, float] = {}
        for i in range(1, n_sources + 1):
            if i in banned or i in prior:
                continue
            verdict = self.validator.check(source_index=i, sentence_ids=prior, claim=claim)
            if verdict.is_accepted:
                scores[i] = verdict.score or 0.0
        return scores

    def cut(self, length: int) -> None:
        """Drop the bytes from ``length`` on and the markers among them."""
        del self.out[length:]
        self.accepted = [a for a in self.accepted if a.marker.end <= length]

    # ------------------------------------------------------------------ budgets and stops

    def unsupported_at_budget(self, state: TextState, banned: set[int]) -> str | None:
        """The token budget ran out. Under REQUIRED a sentence still waiting for its
        citation is judged as it stands, as if its marker were due now: its claim (on
        whole words, the budget may have cut the last one) when no source would support
        it, so that the answer ends the way a sentence no citation can be found for ends
        and the stop reason names the cause rather than the budget. None (the stop stays
        ``max_new_tokens``) when some source would support it, or there is nothing to
        judge."""
        if (
            not self.constrained
            or not self.required
            or self.validator.scorer is None
            or not (state.dangling or state.in_marker)
        ):
            return None
        end = state.marker_start if state.in_marker else len(self.out)
        claim = whole_words(self.claim(state.sentence_start, end))
        if not content_stems(claim):
            return None  # nothing to judge yet: the budget cut the sentence
        if self.supported_ids(claim, state.sentence_ids, banned):
            return None
        return claim

    def give_up(self, *, copy: Callable[[], bool], quote: Callable[[], bool]) -> StopReason | None:
        """The policy's fallback for a sentence no citation can be found for (under
        REQUIRED or QUOTES_ONLY; the sentence is already cut): without a scorer the answer
        ends after its supported sentences; under REQUIRED with ``fallback="copy"``,
        ``copy`` replaces the sentence by a grounded copy (None: the copy decides the
        stop); else :meth:`end_without_copy`."""
        if self.validator.scorer is None:
            return StopReason.NO_VALID_CITATION
        if self.required and self.policy.fallback == "copy" and copy():
            return None
        return self.end_without_copy(quote)

    def end_without_copy(self, quote: Callable[[], bool]) -> StopReason:
        """The end of an answer whose unsupported sentence was not replaced by a copy:
        the supported sentences before it (``no_valid_citation``), else under REQUIRED the
        quote (``fallback``) unless the policy abstains, else ``no_supported_answer``."""
        if self.accepted:
            return StopReason.NO_VALID_CITATION
        if self.required and self.policy.fallback != "abstain" and quote():
            return StopReason.FALLBACK
        return StopReason.NO_SUPPORTED_ANSWER

    def grounded_stop(self) -> StopReason:
        """After a grounded copy: ``end`` when some sentence is the model's own, else
        ``fallback`` (the answer is only a fallback)."""
        if any(item.origin is SentenceOrigin.MODEL for item in self.accepted):
            return StopReason.END
        return StopReason.FALLBACK

    # ------------------------------------------------------------------ trace

    def char_offset(self, byte_offset: int) -> int:
        """Offset in the answer of ``byte_offset`` in the draft: leading whitespace is not
        part of the answer, so before anything is released it is not counted."""
        start = self.released or leading_space(self.out)
        return self.released_chars + len(self.out[start:byte_offset].decode("utf-8", "replace"))

    def reject(
        self,
        *,
        position: int,
        offset: int,
        source_index: int,
        reason: RejectionReason | None,
        score: float | None,
        detail: str,
    ) -> CitationRejected:
        """Count a rejection at character ``offset`` and trace it (``position``: the
        loop's step or call); the event to yield for it."""
        self.rejections += 1
        why = reason or RejectionReason.UNSUPPORTED
        self.trace.append(
            TraceEntry(
                kind="rejection",
                token_position=position,
                char_offset=offset,
                source_index=source_index or None,
                reason=why.value,
                score=score,
                detail=detail,
            )
        )
        return CitationRejected(
            source_index=source_index, reason=why, score=score, char_offset=offset
        )

    def note(self, *, position: int, offset: int, detail: str, kind: str = "fallback") -> None:
        """Trace a fallback (or an operator's rollback) at character ``offset``."""
        self.trace.append(
            TraceEntry(
                kind="fallback" if kind == "fallback" else "operator",
                token_position=position,
                char_offset=offset,
                reason=detail,
                detail=detail,
            )
        )

    # ------------------------------------------------------------------ release

    def final_offset(self, state: TextState) -> int | None:
        """At the end of the answer: ``len(out)`` when all of the draft is the answer (a
        complete stop, the raw model, or a last sentence that ended with what the policy
        asks of it), else None (the loop cuts back to the last sentence it may keep)."""
        if self.stop in COMPLETE or not self.constrained:
            return len(self.out)
        complete = state.pending_boundary == 2 and not state.in_marker
        if complete and (not self.required or state.sentence_ids):
            return len(self.out)  # the last sentence ended; nothing after it was started
        return None

    def release(self, safe: int) -> list[Event]:
        """Release ``out`` up to byte ``safe``: the citations inside it, then the text."""
        if not self.released:
            # Leading whitespace is not part of the answer: skip it, never emit it.
            lead = leading_space(self.out[:safe])
            if lead == safe:
                return []
            self.released = lead
        if safe <= self.released:
            return []
        start, base = self.released, self.released_chars
        text = self.out[start:safe].decode("utf-8", "replace")
        # The citations first: a client knows each marker's reference number and evidence
        # when the text holding it arrives (the answer builder checks them against it).
        events: list[Event] = [
            CitationAccepted(citation=self._citation(item, start, base))
            for item in self.accepted
            if start <= item.marker.start and item.marker.end <= safe
        ]
        events.append(TextDelta(text=text))
        self.released = safe
        self.released_chars = base + len(text)
        return events

    def _citation(self, item: Accepted, start: int, base: int) -> Citation:
        marker = item.marker

        def at(offset: int) -> int:
            return base + len(self.out[start : max(start, offset)].decode("utf-8", "replace"))

        return Citation(
            start=at(marker.start),
            end=at(marker.end),
            source_index=marker.source_index,
            sentence_start=at(marker.sentence_start),
            claim=item.claim,
            support=item.verdict.score,
            evidence=item.evidence
            or self.validator.citation_evidence(item.verdict, item.claim, marker.source_index),
            origin=item.origin,
        )

    def done(
        self,
        *,
        backtracks: int,
        wasted: int,
        forward_passes: int,
        kept: int,
        prompt_tokens: int,
        generated: int,
    ) -> Done:
        """The ``Done`` event: the trace and the token usage."""
        trace = Trace(
            entries=self.trace.entries(),
            dropped_entries=self.trace.dropped,
            backtracks=backtracks,
            rejections=self.rejections,
            tokens_wasted=wasted,
            forward_passes=forward_passes,
            kept_tokens=kept,
            stop_reason=self.stop or StopReason.END,
        )
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=kept,
            generated_tokens=generated,
            forward_passes=forward_passes,
        )
        return Done(usage=usage, trace=trace)
