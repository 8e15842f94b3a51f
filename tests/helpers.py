"""Builders shared by the decoder, backend and orchestrator tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from citebacktrack.decoding.operators import Operator
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.request import Budgets, DecodingOptions, GenerationRequest, SamplingConfig
from citebacktrack.support import SupportResult
from citebacktrack.types import (
    ChatMessage,
    CitationAccepted,
    CitationMode,
    CitationRejected,
    Done,
    Event,
    Policy,
    Source,
    TextDelta,
)
from citebacktrack.validation import CitationValidator


@dataclass
class TableScorer:
    """A support scorer that accepts exactly the ids ``is_supported(claim, id)`` says."""

    rule: Callable[[str, int], bool]
    calls: list[tuple[str, int]]

    def score(self, claim: str, source_index: int) -> SupportResult:
        self.calls.append((claim, source_index))
        ok = self.rule(claim, source_index)
        return SupportResult(
            score=0.9 if ok else 0.1, is_supported=ok, evidence="", detail=f"table says {ok}"
        )


def table_scorer(rule: Callable[[str, int], bool]) -> TableScorer:
    return TableScorer(rule, [])


def request(
    n_sources: int = 3,
    *,
    mode: CitationMode = CitationMode.REQUIRED,
    scorer: TableScorer | None = None,
    sampling: SamplingConfig | None = None,
    budgets: Budgets | None = None,
    operators: Sequence[Operator] = (),
    max_per_sentence: int = 3,
    max_uncited_chars: int = 300,
) -> GenerationRequest:
    policy = Policy(
        mode=mode,
        max_citations_per_sentence=max_per_sentence,
        max_uncited_chars=max_uncited_chars,
    )
    return GenerationRequest(
        messages=[ChatMessage("user", "question")],
        sources=placeholder_sources(n_sources),
        grammar=citation_grammar(n_sources, policy),
        policy=policy,
        validator=CitationValidator(n_sources=n_sources, policy=policy, scorer=scorer),
        budgets=budgets or Budgets(),
        decoding=DecodingOptions(sampling=sampling or SamplingConfig(), operators=tuple(operators)),
    )


def placeholder_sources(n: int) -> tuple[Source, ...]:
    """``n`` sources with ids ``"1".."n"`` (for requests whose scorer ignores the text)."""
    return tuple(Source(text=f"Placeholder source number {i}.", id=str(i)) for i in range(1, n + 1))


def text_of(events: Iterable[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def accepted_ids(events: Iterable[Event]) -> list[int]:
    return [e.citation.source_index for e in events if isinstance(e, CitationAccepted)]


def rejected_ids(events: Iterable[Event]) -> list[int]:
    return [e.source_index for e in events if isinstance(e, CitationRejected)]


def done(events: Sequence[Event]) -> Done:
    last = events[-1]
    assert isinstance(last, Done)
    return last


def reference_nucleus(weights: npt.NDArray[np.floating], top_p: float) -> set[int]:
    """Sort everything (most likely first, ties by id) and cut where the mass reaches p."""
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    total, kept, mass = weights.sum(), [], 0.0
    for i in order:
        kept.append(i)
        mass += weights[i]
        if mass >= top_p * total:
            break
    return set(kept)


def reference_sample_set(
    logits: npt.NDArray[np.float32], allowed: npt.NDArray[np.bool_], config: SamplingConfig
) -> dict[int, float]:
    """The masked distribution by the textbook: mask, temper, top-k (by value, ties by id),
    top-p (ties by id), renormalise."""
    scaled = np.where(allowed, logits.astype(np.float64) / config.temperature, -np.inf)
    order = sorted(np.flatnonzero(allowed).tolist(), key=lambda i: (-scaled[i], i))
    if config.top_k:
        order = order[: config.top_k]
    weights = np.exp(scaled[order] - scaled[order[0]])
    kept = sorted(reference_nucleus(weights, config.top_p)) if config.top_p < 1 else None
    ids = [order[i] for i in kept] if kept is not None else order
    mass = np.exp(scaled[ids] - scaled[order[0]])
    return dict(zip(ids, mass / mass.sum(), strict=True))
