"""The :class:`Citeformer` orchestrator: question + sources in, cited :class:`Answer` out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence

from citebacktrack.backends.base import Backend, Completion, GenerationRequest
from citebacktrack.decoding.budgets import Budgets
from citebacktrack.decoding.operators import Operator
from citebacktrack.decoding.sampling import SamplingConfig
from citebacktrack.errors import ConfigurationError, InvalidQuestionError, InvalidSourcesError
from citebacktrack.grammar.citations import MAX_SOURCES, citation_grammar
from citebacktrack.prompts import DEFAULT_DEMO, Demo, build_messages
from citebacktrack.render import build_references
from citebacktrack.support import LexicalSupportScorer, SupportScorer
from citebacktrack.types import Answer, Event, Policy, Source
from citebacktrack.validation import CitationValidator

__all__ = ["Citeformer", "ScorerFactory"]

ScorerFactory = Callable[[Sequence[Source]], SupportScorer]
"""Builds a support scorer for one request's sources."""


def _default_backend() -> Backend:
    from citebacktrack.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend()


class Citeformer:
    """Answers questions over numbered sources with grammar-enforced, validated citations.

    Args:
        backend: the model engine; ``None`` uses the embedded SmolLM2 model on llama.cpp.
        policy: citation policy (default REQUIRED, at most 3 citations per sentence).
        scorer: builds the support scorer per request (default lexical); ``None`` checks
            only ids, duplicates and counts.
        sampling: decoding settings (default greedy).
        budgets: decoding limits.
        operators: extra backtracking rules (see :mod:`citebacktrack.decoding.operators`).
        demo: a worked example shown before the question; ``None`` for none.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        policy: Policy | None = None,
        scorer: ScorerFactory | None = LexicalSupportScorer,
        sampling: SamplingConfig | None = None,
        budgets: Budgets | None = None,
        operators: Sequence[Operator] = (),
        demo: Demo | None = DEFAULT_DEMO,
    ) -> None:
        self._backend = backend
        self.policy = policy or Policy()
        self.scorer = scorer
        self.sampling = sampling or SamplingConfig()
        self.budgets = budgets or Budgets()
        self.operators = tuple(operators)
        self.demo = demo

    @property
    def backend(self) -> Backend:
        """The backend (the embedded default model is loaded on first use)."""
        if self._backend is None:
            self._backend = _default_backend()
        return self._backend

    # ------------------------------------------------------------------ requests

    def build_request(
        self, question: str, sources: Sequence[Source | str]
    ) -> tuple[GenerationRequest, tuple[Source, ...]]:
        """Validate the input and build the backend request.

        Raises:
            InvalidQuestionError: the question is not a string or is only whitespace.
            InvalidSourcesError: no sources, too many, empty text or duplicate ids.
        """
        if not isinstance(question, str) or not question.strip():
            raise InvalidQuestionError(
                f"the question must be a non-empty string, got {question!r}; ask something"
            )
        normalized = _normalize_sources(sources)
        n = len(normalized)
        validator = CitationValidator(
            n_sources=n,
            policy=self.policy,
            scorer=self.scorer(normalized) if self.scorer is not None else None,
        )
        request = GenerationRequest(
            messages=build_messages(question, normalized, self.policy, demo=self.demo),
            grammar=citation_grammar(n, self.policy),
            policy=self.policy,
            n_sources=n,
            validator=validator,
            sampling=self.sampling,
            budgets=self.budgets,
            operators=self.operators,
            source_ids=tuple(s.id or "" for s in normalized),
        )
        return request, normalized

    # ------------------------------------------------------------------ sync

    def generate(self, question: str, sources: Sequence[Source | str]) -> Answer:
        """Answer ``question`` from ``sources`` and return the cited answer."""
        request, normalized = self.build_request(question, sources)
        return _answer(self.backend.generate(request), normalized)

    def stream(self, question: str, sources: Sequence[Source | str]) -> Iterator[Event]:
        """Stream events for the answer; input is validated before this returns.

        Text events carry only final text: the decoder holds back text it may still roll
        back, so a consumer never sees text that later disappears.
        """
        request, _ = self.build_request(question, sources)
        return self.backend.stream(request)

    # ------------------------------------------------------------------ async

    def astream(self, question: str, sources: Sequence[Source | str]) -> AsyncIterator[Event]:
        """Async :meth:`stream` (``async for event in cf.astream(...)``)."""
        request, _ = self.build_request(question, sources)
        return self.backend.astream(request)

    async def agenerate(self, question: str, sources: Sequence[Source | str]) -> Answer:
        """Async :meth:`generate`."""
        request, normalized = self.build_request(question, sources)
        return _answer(await self.backend.agenerate(request), normalized)


def _normalize_sources(sources: Sequence[Source | str]) -> tuple[Source, ...]:
    if isinstance(sources, str | Source):
        raise InvalidSourcesError("sources must be a list of Source (or str), not a single item")
    items = list(sources)
    if not items:
        raise InvalidSourcesError("no sources given; pass at least one Source to cite")
    if len(items) > MAX_SOURCES:
        raise InvalidSourcesError(
            f"{len(items)} sources given but at most {MAX_SOURCES} are supported; "
            "retrieve fewer passages"
        )
    normalized: list[Source] = []
    seen: dict[str, int] = {}
    for number, item in enumerate(items, start=1):
        if isinstance(item, str):
            item = Source(text=item)
        elif not isinstance(item, Source):
            raise ConfigurationError(
                f"source {number} is a {type(item).__name__}; pass Source(text=...) or a str"
            )
        if not item.text.strip():
            raise InvalidSourcesError(
                f"source {number} (id {item.id!r}) has empty text; drop it or fill it"
            )
        source_id = item.id if item.id is not None else str(number)
        if source_id in seen:
            raise InvalidSourcesError(
                f"sources {seen[source_id]} and {number} share the id {source_id!r}; "
                "ids must be unique"
            )
        seen[source_id] = number
        normalized.append(
            item if item.id == source_id else item.model_copy(update={"id": source_id})
        )
    return tuple(normalized)


def _answer(completion: Completion, sources: Sequence[Source]) -> Answer:
    text = completion.text.rstrip()
    lead = len(text) - len(text.lstrip())
    citations = tuple(
        c.model_copy(
            update={
                "start": c.start - lead,
                "end": c.end - lead,
                "sentence_start": max(0, c.sentence_start - lead),
            }
        )
        for c in completion.citations
        if c.end <= len(text)
    )
    trace = completion.trace
    if lead:
        entries = tuple(
            e.model_copy(update={"char_offset": max(0, e.char_offset - lead)})
            for e in trace.entries
        )
        trace = trace.model_copy(update={"entries": entries})
    return Answer(
        text=text[lead:],
        citations=citations,
        references=build_references(citations, sources),
        usage=completion.usage,
        trace=trace,
    )
