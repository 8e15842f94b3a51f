"""One-pass revision, for engines that cannot continue a prefix under a grammar.

A hosted API's native citations or JSON schema answer in one call. The segment loop then
revises that answer in one pass, sentence by sentence, with the same validator and the same
per-sentence rule as everywhere: a rejected marker is replaced by the id the validator
scores best among those it accepts for the sentence (the engine cannot be asked to choose
again), or dropped when none is; a partial source nothing completes is dropped; a sentence
left with no citation is dropped under the required policy and kept uncited otherwise.
Every change is a ``CitationRejected`` event and a trace entry in the loop's draft.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from citebacktrack._draft import Draft
from citebacktrack._tracker import ClosedMarker, TextState, advance
from citebacktrack.syntax import cite_sentence, leading_space, strip_markers
from citebacktrack.types import (
    CitationMode,
    Event,
    Evidence,
    Policy,
    RejectionReason,
    Source,
)
from citebacktrack.validation import CitationValidator, Verdict

__all__ = ["Revision", "checked_span", "prose"]

PASSES = 3
"""Most passes of the one-call revision (the second and third only when the one before
moved a sentence boundary)."""


def checked_span(
    given: Evidence | None, marker: ClosedMarker, sources: Sequence[Source]
) -> Evidence | None:
    """The engine's span for ``marker`` if it is exactly its source's text there."""
    if given is None or given.source_index != marker.source_index:
        return None
    text = sources[marker.source_index - 1].text
    ok = 0 <= given.start <= given.end <= len(text) and text[given.start : given.end] == given.text
    return given if ok and given.text else None


class Revision:
    """Revises a one-call answer into the draft's rules (see the module docstring).

    Args:
        policy: the request's citation policy.
        validator: the one validator.
        sources: the request's sources (the engine's spans are checked against them).
        draft: the loop's draft, which records the rejections and notes.
    """

    def __init__(
        self,
        *,
        policy: Policy,
        validator: CitationValidator,
        sources: Sequence[Source],
        draft: Draft,
    ) -> None:
        self.policy = policy
        self.validator = validator
        self.sources = sources
        self.draft = draft
        self.backtracks = 0
        """Markers the revision refused (the loop counts them as backtracks)."""
        self._position = 0

    def revise(
        self, text: str, evidence: list[Evidence | None], events: list[Event], position: int
    ) -> tuple[str, list[Evidence | None]]:
        """The whole answer revised until it stands (at most :data:`PASSES` passes), and
        the engine's spans for its markers; ``position`` is the loop's call count."""
        self._position = position
        revised, spans = self.revise_once(text, evidence, events)
        for _ in range(PASSES - 1):
            # Taking a marker or a bracket out can move a sentence boundary ("U.S. [1].]"
            # becomes "U.S..)", which ends there): revise the revision until it stands.
            again, again_spans = self.revise_once(revised, spans, events)
            if again == revised:
                break
            revised, spans = again, again_spans
        return revised, spans

    def revise_once(
        self, text: str, evidence: list[Evidence | None], events: list[Event]
    ) -> tuple[str, list[Evidence | None]]:
        """Revise a whole answer from an engine that cannot continue a prefix.

        Returns the revised text, in which every marker is one the validator accepts with
        the sentence's earlier ids, and the engine's spans for its markers.
        """
        if self.draft.out:  # pragma: no cover - such an engine is called once, with no prefix
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
                self._note(offset, "a sentence without citations was dropped")
                return b"", []
            return prose(body), []
        last = group[-1][0]
        head = data[a : last.start]
        # Under REQUIRED the group goes at the end (words after it would leave the sentence
        # open, running it into the next one); elsewhere where the last marker was.
        sentence = prose(body).decode("utf-8", "replace")
        core = sentence.strip()
        if required:
            placed = cite_sentence(core, "[0]")
            claim = strip_markers(placed[: placed.rindex("[0]")]).strip()
        else:
            claim = prose(head).decode("utf-8", "replace").strip()
        kept: list[tuple[int, Verdict, Evidence | None]] = []
        banned: set[int] = set()
        for marker, given in group:
            said = claim  # every kept marker lands in the one group
            prior = tuple(i for i, _, _ in kept)
            if marker.source_index in prior:
                continue
            if not any(c.isalnum() for c in said):
                events.append(
                    self._reject(
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
                kept.append(
                    (marker.source_index, verdict, checked_span(given, marker, self.sources))
                )
                continue
            events.append(
                self._reject(
                    offset, marker.source_index, verdict.reason, verdict.score, verdict.detail
                )
            )
            self.backtracks += 1
            banned.add(marker.source_index)
        if (not kept or not kept[-1][1].is_complete) and any(c.isalnum() for c in claim):
            prior = tuple(i for i, _, _ in kept)  # (a claim with no words gets no marker)
            best = self._best_id(claim, prior, banned)
            if best is not None:
                verdict = self.validator.check(source_index=best, sentence_ids=prior, claim=claim)
                kept.append((best, verdict, None))
                self._note(
                    offset, f"cited [{best}], the best-supported source the validator accepts"
                )
        if kept and not kept[-1][1].is_complete:
            kept = [k for k in kept if k[1].is_complete]
        if not kept:
            if required:
                self._note(offset, "no valid citation for this sentence: dropped")
                return b"", []
            return prose(data[a:b]), []
        marks = "".join(f"[{i}]" for i, _, _ in kept)
        if required:
            lead = sentence[: len(sentence) - len(sentence.lstrip())]
            trail = sentence[len(sentence.rstrip()) :]
            return (lead + cite_sentence(core, marks) + trail).encode(), [e for _, _, e in kept]
        tail = prose(data[last.end : b])
        text = prose(head).rstrip() + b" " + marks.encode() + tail
        return text, [e for _, _, e in kept]

    def _best_id(self, claim: str, prior: tuple[int, ...], banned: set[int]) -> int | None:
        """The accepted id with the best score (the lowest id on a tie), if any."""
        scores = self.draft.supported_ids(claim, prior, banned)
        if not scores:
            return None
        return min(scores, key=lambda i: (-scores[i], i))

    def _reject(
        self,
        offset: int,
        source_index: int,
        reason: RejectionReason | None,
        score: float | None,
        detail: str,
    ) -> Event:
        return self.draft.reject(
            position=self._position,
            offset=offset,
            source_index=source_index,
            reason=reason,
            score=score,
            detail=detail,
        )

    def _note(self, offset: int, detail: str) -> None:
        self.draft.note(position=self._position, offset=offset, detail=detail)


def prose(data: bytes) -> bytes:
    """``data`` without its ``[N]`` markers, any other square bracket written as a
    parenthesis: prose holds no marker characters (the tracker would read ``[99.`` as
    the start of a marker), as in the grammar."""
    return MARKER_BYTES.sub(b"", data).translate(PARENTHESES)


PARENTHESES = bytes.maketrans(b"[]", b"()")


MARKER_BYTES = re.compile(rb"\s*\[[0-9]*\]")
