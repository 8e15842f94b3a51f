"""A support scorer over any ``(claim, source_text) -> float`` callable."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from citebacktrack.errors import ConfigurationError
from citebacktrack.support._base import (
    LRU,
    SupportResult,
    check_index,
    check_sources,
    check_unit,
    real_number,
)
from citebacktrack.types import Evidence, Source

# --- function scorer ---------------------------------------------------------------------------


class FunctionSupportScorer:
    """Adapts a ``(claim, source_text) -> float`` callable into a :class:`SupportScorer`.

    Use it for embedding similarity or NLI entailment. ``source_text`` is the source's
    title and text joined by a newline (just the text when there is no title): titles name
    the entity a passage is about, which the passage itself often omits. Scores are
    clamped into [0, 1]; a claim is supported when ``score >= threshold``. Results are
    cached per (claim, source), so ``fn`` runs once per pair even across rollbacks.
    Exceptions raised by ``fn`` propagate unchanged.

    ``fn`` judges whole texts, so a result's ``spans`` are the whole text
    ``(0, len(source.text))`` of each source judged (never the title prepended to it).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        fn: Callable[[str, str], float],
        *,
        threshold: float,
    ) -> None:
        """Wraps ``fn`` for ``sources``.

        Raises:
            InvalidSourcesError: ``sources`` is empty.
            ConfigurationError: ``threshold`` is not in [0, 1] or ``fn`` is not callable.
        """
        self._sources = check_sources(sources)
        if not callable(fn):
            raise ConfigurationError(f"fn must be callable as fn(claim, source_text), got {fn!r}")
        self._fn = fn
        self._threshold = check_unit("threshold", threshold)
        self._texts = tuple(
            f"{source.title}\n{source.text}" if source.title else source.text
            for source in self._sources
        )
        self._spans = tuple(
            Evidence(source_index=number, start=0, end=len(source.text), text=source.text)
            for number, source in enumerate(self._sources, 1)
        )
        self._cache: LRU[tuple[str, int], SupportResult] = LRU(512)
        self._set_cache: LRU[tuple[str, tuple[int, ...]], SupportResult] = LRU(512)

    @property
    def threshold(self) -> float:
        """Score at or above which a claim counts as supported."""
        return self._threshold

    def score(self, claim: str, source_index: int) -> SupportResult:
        """Calls ``fn(claim, source_text)`` for source ``source_index`` (1-based).

        Raises:
            ConfigurationError: ``source_index`` is out of range, or ``fn`` returned
                something that is not a finite number.
        """
        check_index(source_index, len(self._sources))
        key = (claim, source_index)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        result = self._call(
            claim,
            self._texts[source_index - 1],
            f"source {source_index}",
            (self._spans[source_index - 1],),
        )
        self._cache.put(key, result)
        return result

    def score_set(self, claim: str, source_indices: Sequence[int]) -> SupportResult:
        """Calls ``fn(claim, texts)`` with the sources' texts joined by blank lines (the
        way ALCE judges a sentence's citations together); never below the best single one.
        The joined judgement's ``spans`` are the whole text of every source; when the best
        single source scores higher, its result is returned as is.

        Raises:
            ConfigurationError: an index is out of range, or ``fn`` returned something
                that is not a finite number.
        """
        indices = tuple(sorted(set(source_indices)))
        for index in indices:
            check_index(index, len(self._sources))
        if not indices:
            return SupportResult(score=0.0, is_supported=False, evidence="", detail="no source")
        if len(indices) == 1:
            return self.score(claim, indices[0])
        key = (claim, indices)
        cached = self._set_cache.get(key)
        if cached is not None:
            return cached
        best = max((self.score(claim, i) for i in indices), key=lambda r: r.score)
        joined = "\n\n".join(self._texts[i - 1] for i in indices)
        result = self._call(
            claim,
            joined,
            f"sources {', '.join(map(str, indices))}",
            tuple(self._spans[i - 1] for i in indices),
        )
        if result.score < best.score:
            result = best
        self._set_cache.put(key, result)
        return result

    def _call(self, claim: str, text: str, what: str, spans: tuple[Evidence, ...]) -> SupportResult:
        """Calls ``fn`` on ``text`` (the sources ``what`` names, whose spans are ``spans``)."""
        raw = self._fn(claim, text)
        value = real_number(raw)
        if value is None:
            raise ConfigurationError(
                f"the support function must return a finite number, got {raw!r} for {what}"
            )
        score = min(1.0, max(0.0, value))
        return SupportResult(
            score=score,
            is_supported=score >= self._threshold,
            evidence="",
            detail=f"function score {value:.3f}, threshold {self._threshold:.2f}",
            spans=spans,
        )
