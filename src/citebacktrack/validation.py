"""What counts as a valid citation: the one place that decides it.

The decoder asks two questions of a :class:`CitationValidator`:

* before sampling, :meth:`~CitationValidator.forbidden_ids` and
  :meth:`~CitationValidator.can_open_marker`: which ids may the next marker use at all
  (so the model is never even offered a duplicate or an over-long group); and
* when a marker closes, :meth:`~CitationValidator.check`: is the id in range, not a
  duplicate in its sentence, within the per-sentence limit, and does the source support
  the sentence so far (via a pluggable :class:`~citebacktrack.support.SupportScorer`)?

Range and count rules are defence in depth: the grammar already makes an out-of-range id
token-impossible and bounds each group.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from citebacktrack.support import SupportScorer
from citebacktrack.types import Policy, RejectionReason

__all__ = ["CitationValidator", "Verdict", "strip_markers"]

_MARKER = re.compile(r"\s*\[\d*\]")


def strip_markers(text: str) -> str:
    """``text`` without ``[N]`` markers (and the spaces before them)."""
    return _MARKER.sub("", text)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The validator's answer for one marker."""

    is_accepted: bool
    reason: RejectionReason | None = None
    score: float | None = None
    detail: str = ""


ACCEPTED = Verdict(is_accepted=True)


class CitationValidator:
    """Checks citations against the policy and, if a scorer is given, against the sources.

    Args:
        n_sources: number of sources; valid ids are ``1..n_sources``.
        policy: the citation policy (per-sentence limit).
        scorer: support scorer; ``None`` checks only the structural rules.
    """

    def __init__(self, *, n_sources: int, policy: Policy, scorer: SupportScorer | None) -> None:
        self.n_sources = n_sources
        self.policy = policy
        self.scorer = scorer

    def forbidden_ids(
        self, sentence_ids: Collection[int], banned: Collection[int]
    ) -> frozenset[int]:
        """Ids the next marker in this sentence must not use: duplicates and bans."""
        return frozenset(sentence_ids) | frozenset(banned)

    def can_open_marker(self, sentence_ids: Collection[int], banned: Collection[int]) -> bool:
        """Whether one more marker fits this sentence and some id is still available."""
        if len(sentence_ids) >= self.policy.max_citations_per_sentence:
            return False
        return len(self.forbidden_ids(sentence_ids, banned)) < self.n_sources

    def check(self, *, source_index: int, sentence_ids: tuple[int, ...], claim: str) -> Verdict:
        """Judge one closed marker.

        Args:
            source_index: the id just written.
            sentence_ids: ids cited earlier in the same sentence (excluding this one).
            claim: the sentence so far, markers removed.

        Returns:
            A verdict; never raises for a bad id (an out-of-range id is a rejection).
        """
        if not 1 <= source_index <= self.n_sources:
            return Verdict(
                is_accepted=False,
                reason=RejectionReason.OUT_OF_RANGE,
                detail=f"id {source_index} is not in 1..{self.n_sources}",
            )
        if source_index in sentence_ids:
            return Verdict(
                is_accepted=False,
                reason=RejectionReason.DUPLICATE,
                detail=f"[{source_index}] is already cited in this sentence",
            )
        if len(sentence_ids) >= self.policy.max_citations_per_sentence:
            return Verdict(
                is_accepted=False,
                reason=RejectionReason.TOO_MANY,
                detail=f"over {self.policy.max_citations_per_sentence} citations in one sentence",
            )
        if self.scorer is None:
            return ACCEPTED
        result = self.scorer.score(claim, source_index)
        if result.is_supported:
            return Verdict(is_accepted=True, score=result.score, detail=result.detail)
        return Verdict(
            is_accepted=False,
            reason=RejectionReason.UNSUPPORTED,
            score=result.score,
            detail=result.detail,
        )
