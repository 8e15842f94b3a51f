"""The :class:`Citeformer` orchestrator: question + sources in, cited :class:`Answer` out."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Self, cast

import anyio
import anyio.to_thread

from citebacktrack._arguments import Number, instance, refused
from citebacktrack.adapters import adapter_hint
from citebacktrack.answer import abuild, acollect, build, collect
from citebacktrack.backends.base import Backend
from citebacktrack.decoding.operators import Operator
from citebacktrack.errors import (
    BackendClosedError,
    ConfigurationError,
    InvalidQuestionError,
    InvalidSourcesError,
)
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.prompts import DEFAULT_DEMO, Demo, build_messages
from citebacktrack.request import (
    Budgets,
    DecodingOptions,
    GenerationRequest,
    SamplingConfig,
    SegmentOptions,
    check_sources,
)
from citebacktrack.support import LexicalSupportScorer, SupportScorer
from citebacktrack.types import Answer, CitationMode, Event, Policy, Source
from citebacktrack.validation import CitationValidator

__all__ = ["Citeformer", "ScorerFactory"]

ScorerFactory = Callable[[Sequence[Source]], SupportScorer]
"""Builds a support scorer for one request's sources."""


def _default_backend() -> Backend:
    from citebacktrack.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend()


class Citeformer:
    """Answers questions over numbered sources with grammar-enforced, validated citations.

    .. warning::
        ``Citeformer()`` with no ``backend`` **loads the embedded SmolLM2-135M-Instruct
        model on llama.cpp** (about 100 MB of weights, a few seconds) on first use. It is
        small and runs anywhere, but it is a 135M-parameter model: pass a backend for a
        real one. The embedded backend is owned by this object and freed by
        :meth:`close` (or ``with Citeformer() as cf:``); a backend you pass in is yours
        to close.

    Args:
        backend: the model engine (see :mod:`citebacktrack.backends`); ``None`` uses the
            embedded model, as above.
        policy: citation policy (default REQUIRED, at most 3 citations per sentence).
        scorer: builds the support scorer per request (default lexical); ``None`` checks
            only ids, duplicates and counts.
        sampling: decoding settings (default greedy); segment-level backends get its
            temperature, top-p and seed.
        budgets: limits every answer ends on.
        operators: extra token-level backtracking rules
            (see :mod:`citebacktrack.decoding.operators`).
        demo: a worked example shown before the question; ``None`` for none.

    Every argument is checked here, and every per-call override where it is given: a
    value of the wrong type (``"llamacpp"`` for a backend, a dict for ``budgets``, a
    string for ``policy``, a number for ``scorer``) raises
    :class:`~citebacktrack.errors.ConfigurationError` naming the argument, what was given
    and what to pass, before anything is loaded or generated.

    ``generate``, ``stream``, ``agenerate`` and ``astream`` take a question, its sources
    and the same per-call ``policy``, ``budgets`` and ``sampling`` overrides; :meth:`run`
    answers a prepared :class:`~citebacktrack.request.GenerationRequest`
    (:meth:`build_request`). All give the same answer: the stream's text joined is
    ``Answer.text`` and its last event, :class:`~citebacktrack.types.Done`, carries the
    answer itself.
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
        self._backend: Backend | None = instance("backend", backend, Backend, _BACKEND_HINT)
        self._owns_backend = backend is None
        self._closed = False
        self._loading = threading.Lock()
        self.policy, self.budgets, self.sampling = _settings(
            policy, budgets, sampling, (Policy(), Budgets(), SamplingConfig())
        )
        if scorer is not None and not callable(scorer):
            raise refused(
                "scorer",
                scorer,
                "a callable that builds a SupportScorer from the sources",
                _SCORER_HINT,
            )
        self.scorer = scorer
        self.operators = DecodingOptions(operators=cast(tuple[Operator, ...], operators)).operators
        self.demo: Demo | None = instance("demo", demo, Demo, _DEMO_HINT)

    @property
    def backend(self) -> Backend:
        """The backend (the embedded default model is loaded on first use).

        Raises:
            BackendClosedError: :meth:`close` was called.
        """
        self._check_open()
        if self._backend is None:
            self.load()
        return cast(Backend, self._backend)

    def _check_open(self) -> None:
        if self._closed:
            raise BackendClosedError(
                "this Citeformer was closed; create a new Citeformer to answer again"
            )

    def load(self) -> Self:
        """Load the model now rather than on the first question (the embedded default
        loads on first use; a backend passed in is already loaded). Returns ``self``, so
        ``cf = Citeformer().load()``. Safe to call from several threads: one loads.

        Raises:
            BackendClosedError: :meth:`close` was called.
            ModelLoadError: the embedded model file is missing or corrupt.
        """
        with self._loading:
            self._check_open()
            if self._backend is None:
                self._backend = _default_backend()
        return self

    async def aload(self) -> Self:
        """:meth:`load` on a worker thread: the event loop keeps serving while the model
        loads. ``astream``/``agenerate`` call it before their first answer, so a service
        never blocks its loop on a lazy load; call it at startup to load ahead of the
        first request."""
        if self._backend is None:
            await anyio.to_thread.run_sync(self.load)
        return self

    async def _abackend(self) -> Backend:
        """The backend, loaded off the event loop when it is not loaded yet."""
        await self.aload()
        return self.backend

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Free the embedded backend if this object loaded it (a backend passed in is
        left open: its owner closes it); this object answers nothing afterwards. Safe to
        call twice."""
        self._closed = True
        with self._loading:  # a load in flight finishes first, and is freed here
            backend, owned = self._backend, self._owns_backend
            if owned and backend is not None:
                self._backend = None
                backend.close()

    def __enter__(self) -> Citeformer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def build_request(
        self,
        question: str,
        sources: Sequence[Source | str],
        *,
        policy: Policy | None = None,
        budgets: Budgets | None = None,
        sampling: SamplingConfig | None = None,
    ) -> GenerationRequest:
        """Validate the input and build the backend request (overrides for this call only).

        Raises:
            InvalidQuestionError: the question is not a string, is only whitespace, or is
                not valid Unicode (a lone surrogate).
            InvalidSourcesError: no sources, too many, empty text, duplicate ids, or an
                item that is neither a Source nor a str.
        """
        if not isinstance(question, str) or not question.strip():
            raise InvalidQuestionError(
                f"the question must be a non-empty string, got {question!r}; ask something"
            )
        try:
            question.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidQuestionError(
                f"the question holds a lone surrogate {question[exc.start]!r} at offset "
                f"{exc.start}, which is not Unicode text; decode the original bytes with "
                "errors='replace'"
            ) from exc
        policy, budgets, sampling = _settings(
            policy, budgets, sampling, (self.policy, self.budgets, self.sampling)
        )
        normalized = _normalize_sources(sources)
        n = len(normalized)
        validator = CitationValidator(
            n_sources=n,
            policy=policy,
            scorer=self.scorer(normalized) if self.scorer is not None else None,
            question=question,
            sources=normalized,
        )
        return GenerationRequest(
            messages=build_messages(question, normalized, policy, demo=self.demo),
            question=question,
            sources=normalized,
            policy=policy,
            grammar=citation_grammar(n, policy),
            validator=validator,
            budgets=budgets,
            decoding=DecodingOptions(sampling=sampling, operators=self.operators),
            segments=SegmentOptions.from_sampling(sampling),
        )

    def _request(
        self,
        question: str,
        sources: Sequence[Source | str],
        policy: Policy | None,
        budgets: Budgets | None,
        sampling: SamplingConfig | None,
    ) -> GenerationRequest:
        if isinstance(question, GenerationRequest):
            raise ConfigurationError(
                "a GenerationRequest already holds its sources and options; pass it to "
                "Citeformer.run(request), or pass a question and sources here"
            )
        return self.build_request(
            question, sources, policy=policy, budgets=budgets, sampling=sampling
        )

    # ------------------------------------------------------------------ sync

    def generate(
        self,
        question: str,
        sources: Sequence[Source | str],
        *,
        policy: Policy | None = None,
        budgets: Budgets | None = None,
        sampling: SamplingConfig | None = None,
    ) -> Answer:
        """Answer ``question`` from ``sources`` and return the cited answer."""
        request = self._request(question, sources, policy, budgets, sampling)
        return collect(self.backend.stream(request), request.sources)

    def run(self, request: GenerationRequest) -> Answer:
        """Answer a prepared request (:meth:`build_request`, perhaps changed with
        ``dataclasses.replace``) and return the cited answer, as :meth:`generate` does."""
        if not isinstance(request, GenerationRequest):
            raise ConfigurationError(
                f"run takes a GenerationRequest, got {type(request).__name__}; for a "
                "question and sources call generate(question, sources)"
            )
        return collect(self.backend.stream(request), request.sources)

    def stream(
        self,
        question: str,
        sources: Sequence[Source | str],
        *,
        policy: Policy | None = None,
        budgets: Budgets | None = None,
        sampling: SamplingConfig | None = None,
    ) -> Iterator[Event]:
        """Stream events for the answer; input is validated before this returns.

        Text events carry only final text: the decoder holds back text it may still roll
        back, so a consumer never sees text that later disappears. The last event is
        ``Done(answer=...)``, the answer :meth:`generate` would return.
        """
        request = self._request(question, sources, policy, budgets, sampling)
        return build(self.backend.stream(request), request.sources)

    def generate_many(
        self,
        items: Sequence[tuple[str, Sequence[Source | str]] | GenerationRequest],
        *,
        policy: Policy | None = None,
        budgets: Budgets | None = None,
        sampling: SamplingConfig | None = None,
    ) -> list[Answer]:
        """Answer many ``(question, sources)`` pairs (or requests), in order.

        Every input is checked before anything is generated. Backends that batch (vLLM's
        continuous batching) answer them together; the others one by one. Each answer is
        the one :meth:`generate` would give.
        """
        requests = self._requests(items, policy, budgets, sampling)
        return self.backend.generate_many(requests)

    async def agenerate_many(
        self,
        items: Sequence[tuple[str, Sequence[Source | str]] | GenerationRequest],
        *,
        concurrency: int = 8,
        policy: Policy | None = None,
        budgets: Budgets | None = None,
        sampling: SamplingConfig | None = None,
    ) -> list[Answer]:
        """Async :meth:`generate_many`, at most ``concurrency`` answers in flight."""
        concurrency = Number(8, whole=True, minimum=1)("concurrency", concurrency)
        requests = self._requests(items, policy, budgets, sampling)
        backend = await self._abackend()
        return await backend.agenerate_many(requests, concurrency=concurrency)

    def _requests(
        self,
        items: Sequence[tuple[str, Sequence[Source | str]] | GenerationRequest],
        policy: Policy | None,
        budgets: Budgets | None,
        sampling: SamplingConfig | None,
    ) -> list[GenerationRequest]:
        if isinstance(items, str | bytes | GenerationRequest) or not isinstance(items, Iterable):
            raise refused("items", items, "a list", _ITEMS_HINT)
        _settings(policy, budgets, sampling, (self.policy, self.budgets, self.sampling))
        requests = []
        for number, item in enumerate(items):
            if isinstance(item, GenerationRequest):
                if policy is not None or budgets is not None or sampling is not None:
                    raise ConfigurationError(
                        "a GenerationRequest already holds its sources and options; pass "
                        "it without the overrides, or pass (question, sources) pairs"
                    )
                requests.append(item)
            elif isinstance(item, tuple | list) and len(item) == 2:
                question, sources = item
                requests.append(self._request(question, sources, policy, budgets, sampling))
            else:
                what = "a (question, sources) pair or a GenerationRequest"
                raise refused(f"items[{number}]", item, what, _ITEMS_HINT)
        return requests

    # ------------------------------------------------------------------ async

    def astream(
        self,
        question: str,
        sources: Sequence[Source | str],
        *,
        policy: Policy | None = None,
        budgets: Budgets | None = None,
        sampling: SamplingConfig | None = None,
    ) -> AsyncIterator[Event]:
        """Async :meth:`stream` (``async for event in cf.astream(...)``); input is
        validated before this returns. A model not loaded yet loads on a worker thread
        (:meth:`aload`): the event loop is never blocked."""
        request = self._request(question, sources, policy, budgets, sampling)
        self._check_open()
        return abuild(self._astream(request), request.sources)

    async def agenerate(
        self,
        question: str,
        sources: Sequence[Source | str],
        *,
        policy: Policy | None = None,
        budgets: Budgets | None = None,
        sampling: SamplingConfig | None = None,
    ) -> Answer:
        """Async :meth:`generate` (the model, if not loaded yet, loads off the loop)."""
        request = self._request(question, sources, policy, budgets, sampling)
        self._check_open()
        return await acollect(self._astream(request), request.sources)

    async def _astream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """The backend's stream of ``request``, the backend loaded off the loop first."""
        backend = await self._abackend()
        events = backend.astream(request)
        try:
            async for event in events:
                yield event
        finally:
            # Closed here when the caller stops early, not later by the garbage collector.
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()


_BACKEND_HINT = (
    "pass an engine object from citebacktrack.backends (e.g. LlamaCppBackend(), "
    "HFBackend(...), OpenAIBackend(...)) or MockBackend([...]), not its name; or None for "
    "the embedded model"
)
_SCORER_HINT = (
    "pass a factory: a scorer class such as LexicalSupportScorer (the default) or a function "
    "from the sources to a SupportScorer (not a scorer already built); or None to check "
    "only ids, duplicates and counts"
)
_DEMO_HINT = (
    "pass citebacktrack.prompts.Demo(question=..., sources=(...), answer=...), or None "
    "for no worked example"
)
_ITEMS_HINT = "pass a list such as [(question, [Source(text=...)]), request]"


def _settings(
    policy: object,
    budgets: object,
    sampling: object,
    defaults: tuple[Policy, Budgets, SamplingConfig],
) -> tuple[Policy, Budgets, SamplingConfig]:
    """The policy, budgets and sampling to use: each one given, checked to be of its class
    (``None`` takes its default), else the error naming it and what to pass."""
    mode = policy.strip().casefold() if isinstance(policy, str) else None
    modes = [member.value for member in CitationMode]
    example = f"Policy(mode={mode!r})" if mode in modes else "Policy(mode='auto')"
    hints = {
        "policy": f"pass a Policy, e.g. {example}, or None for the default",
        "budgets": "pass Budgets(...), e.g. Budgets(max_new_tokens=128), or None for the default",
        "sampling": "pass SamplingConfig(...), e.g. SamplingConfig(temperature=0.7), or None "
        "for the default (greedy)",
    }
    given = {"policy": policy, "budgets": budgets, "sampling": sampling}
    chosen = [
        instance(name, value, type(default), hints[name]) or default
        for (name, value), default in zip(given.items(), defaults, strict=True)
    ]
    return cast(tuple[Policy, Budgets, SamplingConfig], tuple(chosen))


def _normalize_sources(sources: Sequence[Source | str]) -> tuple[Source, ...]:
    """The sources as ``Source``s with their ids filled in, checked by :func:`check_sources`."""
    if sources is None:
        raise InvalidSourcesError("no sources given; pass the sources to cite")
    hint = None if isinstance(sources, tuple) else adapter_hint(sources)  # one Document
    if isinstance(sources, str | Source) or hint:
        raise InvalidSourcesError(
            "sources must be a list of Source (or str), not a single item"
            + (f"; {hint}" if hint else "")
        )
    items: list[object] = list(sources)
    for number, item in enumerate(items, start=1):
        if isinstance(item, str):
            try:
                items[number - 1] = Source(text=item)
            except InvalidSourcesError as exc:
                raise InvalidSourcesError(f"source {number}: {exc}") from exc
    check_sources(items)
    return tuple(
        item if item.id is not None else item.model_copy(update={"id": str(number)})
        for number, item in enumerate(cast(list[Source], items), start=1)
    )
