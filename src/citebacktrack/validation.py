"""What counts as a valid citation: the one place that decides it.

The decoder asks two questions of a :class:`CitationValidator`:

* before sampling, :meth:`~CitationValidator.forbidden_ids` and
  :meth:`~CitationValidator.can_open_marker`: which ids may the next marker use at all
  (so the model is never even offered a duplicate or an over-long group); and
* when a marker closes, :meth:`~CitationValidator.check`: is the id in range, not a
  duplicate in its sentence, within the per-sentence limit, and do the sentence's cited
  sources support it, each adding something (via a pluggable
  :class:`~citebacktrack.support.SupportScorer`)? The decoder also asks it before the id
  is sampled, so ids it would refuse are never offered.

Range and count rules are defence in depth: the grammar already makes an out-of-range id
token-impossible and bounds each group.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from citebacktrack.errors import ConfigurationError
from citebacktrack.support import (
    SetSupportScorer,
    SupportResult,
    SupportScorer,
    content_stems,
    name_stems,
    names_title,
)
from citebacktrack.syntax import (
    CLOSERS,
    TERMINATORS,
    quotable_sentence,
    split_sentences,
    strip_markers,
)
from citebacktrack.types import Evidence, Policy, RejectionReason, Source

__all__ = ["CitationValidator", "Verdict", "strip_markers"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The validator's answer for one marker."""

    is_accepted: bool
    reason: RejectionReason | None = None
    score: float | None = None
    detail: str = ""
    is_complete: bool = True
    """Accepted and the sentence's citations now support it; False for a partial marker
    that needs another marker in the same group."""
    evidence: str = ""
    """The passage text the support rests on, when the scorer reports it."""
    spans: tuple[Evidence, ...] = ()
    """Where in the sources an accepted marker's support rests, in source order: the
    support result's spans, plus the marker's own source's span when a union's result
    left it out and the scorer gives one. Empty for rejections and without a scorer."""


ACCEPTED = Verdict(is_accepted=True)


class CitationValidator:
    """Checks citations against the policy and, if a scorer is given, against the sources.

    Support is judged per sentence, the way ALCE defines citation quality:

    * **recall**: the union of a sentence's cited sources must support its claim
      (:meth:`~citebacktrack.support.SetSupportScorer.score_set`; a scorer without it is
      judged by its best single source);
    * **precision**: each cited source must add support the others don't. Once the
      sentence is supported, another marker is kept only if its source supports the
      claim on its own (otherwise :attr:`RejectionReason.REDUNDANT`); before that, a
      marker must raise the union's score by at least ``min_gain``.

    A marker whose source supports only part of the claim (its own score at least
    ``partial_support``) is kept as *partial* when one more marker could complete the
    sentence; the decoder then requires that marker before the sentence goes on.

    Args:
        n_sources: number of sources; valid ids are ``1..n_sources``.
        policy: the citation policy (per-sentence limit).
        scorer: support scorer; ``None`` checks only the structural rules.
        min_gain: least rise of the union's score a marker must bring (0..1).
        partial_support: least share of a sentence's support a partial source must bring
            beyond the source that completes it (0..1).
        question: the question the answer is for: a claim must assert more than it.
        sources: the sources, for grounded recovery (:meth:`grounding`) and the titles
            of the passages a claim rests on.
        min_novel: least share (0..1) of the content words a claim adds to the question
            that the passages it rests on must hold.
    """

    def __init__(
        self,
        *,
        n_sources: int,
        policy: Policy,
        scorer: SupportScorer | None,
        min_gain: float = 0.1,
        partial_support: float = 0.25,
        question: str | None = None,
        sources: Sequence[Source] | None = None,
        min_novel: float = 1.0,
    ) -> None:
        for name, value in (
            ("min_gain", min_gain),
            ("partial_support", partial_support),
            ("min_novel", min_novel),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigurationError(f"{name} must be in [0, 1], got {value!r}")
        self.n_sources = n_sources
        self.policy = policy
        self.scorer = scorer
        self.min_gain = min_gain
        self.partial_support = partial_support
        self.min_novel = min_novel
        """Least share of what a claim adds to its question that the passages it rests on
        must hold (every such word, by default)."""
        self.question = question
        """The question the answer is for: what a quote must be relevant to, and what a
        claim must say more than to be citable."""
        self._question_stems = content_stems(question) if question else frozenset()
        self.sources = tuple(sources) if sources is not None else None
        """The sources, when given: what grounded recovery copies sentences from."""

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
            sentence_ids: ids cited earlier in the same sentence (excluding this one),
                all of them accepted.
            claim: the sentence so far, markers removed.

        Returns:
            A verdict; never raises for a bad id (an out-of-range id is a rejection).
            ``Verdict.is_complete`` says whether the sentence is now supported.
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
        if claim.rstrip(CLOSERS).endswith("?"):
            return Verdict(
                is_accepted=False,
                reason=RejectionReason.UNSUPPORTED,
                score=0.0,
                detail="a question asserts nothing: not citable",
            )
        novel = self.novel_stems(claim)
        if not novel:
            return Verdict(
                is_accepted=False,
                reason=RejectionReason.UNSUPPORTED,
                score=0.0,
                detail="asserts nothing beyond the question: not citable",
            )
        if not sentence_ids:
            # The first citation of a sentence answers for all of it.
            single = self._union(claim, (source_index,))
            if single.is_supported:
                return self._grounded(single, novel)
            if self._completable(claim, (source_index,), single.score):
                alone = self._alone(claim, (source_index,))
                if alone:
                    return _reject(
                        RejectionReason.REDUNDANT,
                        single,
                        f"partial, and [{alone}] alone supports the sentence",
                    )
                return _accept(single, complete=False, note="partial support")
            return _reject(RejectionReason.UNSUPPORTED, single)
        single = self.scorer.score(claim, source_index)
        before = self._union(claim, sentence_ids)
        if before.is_supported:
            if single.is_supported:
                return self._grounded(single, novel)
            return _reject(
                RejectionReason.REDUNDANT,
                single,
                "the sentence is supported without it and it does not support it alone",
            )
        after = self._union(claim, (*sentence_ids, source_index))
        gain = after.score - before.score
        if gain < self.min_gain:
            return _reject(
                RejectionReason.REDUNDANT,
                single,
                f"adds {gain:.2f} to the support of the sentence's other sources",
            )
        ids = (*sentence_ids, source_index)
        if after.is_supported:
            grounded = self._grounded(after, novel, also=single)
            if not grounded.is_accepted:
                return grounded
            return _accept(after, note=f"together with {list(sentence_ids)}", own=single)
        if self._completable(claim, ids, single.score):
            return _accept(after, complete=False, note="partial support", own=single)
        return _reject(RejectionReason.UNSUPPORTED, after)

    def novel_stems(self, claim: str) -> frozenset[str]:
        """The content words of ``claim`` its question does not have: what the claim
        asserts beyond restating the question. Empty means it is not citable."""
        return content_stems(claim) - self._question_stems

    def _grounded(
        self, result: SupportResult, novel: frozenset[str], also: SupportResult | None = None
    ) -> Verdict:
        """Accepts ``result`` only if the passages it rests on (with their sources'
        titles) hold at least ``min_novel`` of what the claim adds to the question
        (``novel``): a sentence supported only in the words it shares with the question
        restates it, and one whose own additions are not in the passage asserts what the
        source does not say."""
        spans = (*result.spans, *(also.spans if also is not None else ()))
        if not spans:
            return _accept(result)
        found: set[str] = set()
        for span in spans:
            found.update(novel & content_stems(span.text))
            if self.sources is not None:
                found.update(novel & content_stems(self.sources[span.source_index - 1].title))
        if len(found) >= self.min_novel * len(novel):
            return _accept(result)
        missing = ", ".join(sorted(novel - found)[:4])
        return _reject(
            RejectionReason.UNSUPPORTED,
            result,
            f"what it adds to the question ({missing}) is not in the passage",
            score=0.0,
        )

    def _alone(self, claim: str, ids: tuple[int, ...]) -> int | None:
        """A source not in ``ids`` that supports ``claim`` by itself, if any: a partial
        marker beside it would be redundant (ALCE precision)."""
        scorer = self.scorer
        if scorer is None:  # pragma: no cover - callers check
            return None
        for other in range(1, self.n_sources + 1):
            if other not in ids and scorer.score(claim, other).is_supported:
                return other
        return None

    def best_sources(self, claim: str, count: int = 1) -> list[tuple[int, float]]:
        """The ``count`` sources that support ``claim`` best, as ``(id, score)``."""
        if self.scorer is None:
            return []
        scored = [(i, self.scorer.score(claim, i).score) for i in range(1, self.n_sources + 1)]
        scored.sort(key=lambda pair: (-pair[1], pair[0]))
        return scored[:count]

    def quote(self, claim: str) -> tuple[int, str] | None:
        """What to quote when no sentence of the answer could be supported (the quote
        fallback of every backend): ``(source, sentence)``, or None to abstain.

        With the question known, the quote is the sentence of the source that covers the
        question best, and only if that source supports the question as it would a claim
        (the scorer's own threshold): a source unrelated to the question is never quoted.
        Without it, the sentence of the source that best supports ``claim``.
        """
        if self.scorer is None:
            return None
        query = self.question if self.question is not None else claim
        best = self.best_sources(query)
        if not best or best[0][1] <= 0.0:
            return None
        source = best[0][0]
        result = self.scorer.score(query, source)
        if self.question is not None and not result.is_supported:
            return None
        text = quotable_sentence(result.evidence)
        return (source, text) if text else None

    def grounding(self, claim: str, *, limit: int = 4) -> list[tuple[int, str]]:
        """Sentences the model may copy in place of an unsupported ``claim`` (grounded
        recovery), as ``(source, sentence)``, most relevant first.

        Every sentence of every source is a candidate if it is a whole sentence (its
        first letter or digit a capital letter, at least four words: not a piece left
        by an abbreviation) that this validator accepts cited alone to its own source,
        so a copy is supported and says more than the question. Relevance is the
        inverse-document-frequency weight of the words it shares with the question
        (doubled) and the claim. A sentence must share a word with the question that at
        most half of the sources have (any word of the question some source has, when
        none is that rare); when no source has a word of the question, or none names
        anything the question names (``Sydney Opera House``), nothing is. A copy must
        also say whom it is about, since a reader sees it without the passage around
        it: the sentence or the question names its passage's title (:func:`names_title`:
        "Gross acted as producer" from *Paul Gross*; not "The song was performed live"
        nor, asked about the Eiffel Tower, "The energy is stored in sugars" from
        *Photosynthesis*). An untitled source's subject is unknown and this rule does
        not apply to it. The ``limit`` most relevant are kept: the model's likelihood
        chooses among them. Empty without a scorer or sources to copy from.
        """
        if self.scorer is None or self.sources is None:
            return []
        texts = [source.text for source in self.sources]
        documents = [content_stems(f"{s.title} {s.text}") for s in self.sources]
        count = len(documents)

        def idf(stem: str) -> float:
            frequency = sum(stem in document for document in documents)
            return math.log((count + 1) / (frequency + 1)) + 1.0

        question = self._question_stems
        frequency = {stem: sum(stem in d for d in documents) for stem in question}
        present = {stem for stem, df in frequency.items() if df}
        if question and not present:
            return []  # no source says a word of the question: nothing is relevant
        named = name_stems(self.question or "") & question
        if named and not any(stem in d for stem in named for d in documents):
            return []  # no source names what the question is about
        telling = {stem for stem in present if 2 * frequency[stem] <= count} or present
        claimed = content_stems(claim) - question
        ranked: list[tuple[float, int, str]] = []
        seen: set[str] = set()
        for source, passage in enumerate(texts, 1):
            title = content_stems(self.sources[source - 1].title)
            subject_named = not title or names_title(title, question, idf)
            for sentence in split_sentences(passage):
                text = quotable_sentence(sentence)
                if text in seen or not _whole_sentence(text):
                    continue
                seen.add(text)
                if len(text) > self.policy.max_uncited_chars - 8:
                    continue  # the grammar's ramble bound would cut it before its marker
                stems = content_stems(text)
                if question and stems.isdisjoint(telling):
                    continue
                if not subject_named and not names_title(title, stems, idf):
                    continue  # "The song was ...": about whom, read on its own?
                relevance = sum(2 * idf(w) for w in stems & question) + sum(
                    idf(w) for w in stems & claimed
                )
                if relevance <= 0.0:
                    continue
                verdict = self.check(source_index=source, sentence_ids=(), claim=text)
                if verdict.is_accepted and verdict.is_complete:
                    ranked.append((relevance, source, text))
        ranked.sort(key=lambda item: -item[0])  # stable: ties keep source order
        return [(source, text) for _, source, text in ranked[:limit]]

    def citation_evidence(self, verdict: Verdict, claim: str, source_index: int) -> Evidence | None:
        """The span of ``source_index`` an accepted marker rests on: the verdict's own
        span in that source, else the scorer's best one (``None`` without a scorer).
        Every backend puts this on its citations."""
        for span in verdict.spans:
            if span.source_index == source_index:
                return span
        return self.evidence_span(claim, source_index)

    def evidence_span(self, claim: str, source_index: int) -> Evidence | None:
        """Where in source ``source_index`` the scorer finds ``claim`` best supported.

        None without a scorer, or when the scorer gives no span in that source (nothing
        matched, nothing to check, or a scorer that reports no spans).
        """
        if self.scorer is None:
            return None
        spans = self.scorer.score(claim, source_index).spans
        return next((span for span in spans if span.source_index == source_index), None)

    def _union(self, claim: str, ids: tuple[int, ...]) -> SupportResult:
        scorer = self.scorer
        if scorer is None:  # pragma: no cover - callers check
            raise ConfigurationError("no scorer")
        if isinstance(scorer, SetSupportScorer):
            return scorer.score_set(claim, ids)
        return max((scorer.score(claim, i) for i in ids), key=lambda r: r.score)

    def _completable(self, claim: str, ids: tuple[int, ...], own: float) -> bool:
        """Whether a partial marker may stand: one more source, still allowed in this
        sentence, would complete the support, and the marker's source (with the others
        of ``ids``) contributes at least ``partial_support`` of it beyond what that one
        gives alone. ``own`` (the marker's own score) must be above 0: it matched."""
        if own <= 0.0 or len(ids) >= self.policy.max_citations_per_sentence:
            return False
        scorer = self.scorer
        if scorer is None:  # pragma: no cover - callers check
            return False
        for other in range(1, self.n_sources + 1):
            if other in ids:
                continue
            together = self._union(claim, (*ids, other))
            if (
                together.is_supported
                and together.score - scorer.score(claim, other).score >= self.partial_support
            ):
                return True
        return False


def _whole_sentence(text: str) -> bool:
    """Whether ``text`` reads as one whole sentence to any reader: its first letter or
    digit is a capital letter, it has at least four words (a split after ``c.`` leaves
    ``1243) was ...``), and no terminator inside it is followed by a space (``(c. 1435``,
    ``Southampton F.C. season``: the citation grammar knows these abbreviations, but a
    simpler sentence splitter, a reader's or an evaluator's, would cut the copy in two
    and leave its first half uncited)."""
    first = next((c for c in text if c.isalnum()), "")
    return first.isupper() and len(text.split()) >= 4 and _INNER_END.search(text) is None


_INNER_END = re.compile(rf"[{re.escape(TERMINATORS)}][{re.escape(CLOSERS)}]*\s")
"""A terminator (and closers) followed by whitespace: where simple splitters cut."""


def _accept(
    result: SupportResult,
    *,
    complete: bool = True,
    note: str = "",
    own: SupportResult | None = None,
) -> Verdict:
    """Accepts a marker on ``result``; ``own`` (the marker's source alone) adds its span
    when a union's result, resting on the other sources, left that source out."""
    spans = result.spans
    if own is not None:
        present = {span.source_index for span in spans}
        extra = tuple(span for span in own.spans if span.source_index not in present)
        if extra:
            spans = tuple(sorted((*spans, *extra), key=lambda span: span.source_index))
    return Verdict(
        is_accepted=True,
        score=result.score,
        detail=f"{result.detail}; {note}" if note else result.detail,
        is_complete=complete,
        evidence=result.evidence,
        spans=spans,
    )


def _reject(
    reason: RejectionReason, result: SupportResult, note: str = "", *, score: float | None = None
) -> Verdict:
    """Rejects on ``result``; ``score`` overrides its score where the rejection rests on
    something the score does not measure (a trace never says unsupported with 1.0)."""
    detail = "; ".join(part for part in (result.detail, note) if part)
    return Verdict(
        is_accepted=False,
        reason=reason,
        score=result.score if score is None else score,
        detail=detail,
    )
