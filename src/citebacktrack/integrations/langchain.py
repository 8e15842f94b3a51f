"""A LangChain ``Runnable`` that answers with checked ``[N]`` citations.

:class:`CitedAnswerRunnable` wraps a :class:`~citebacktrack.Citeformer`. It takes a
question and the documents to cite (``{"question": ..., "documents": [...]}``, as an LCEL
map ``{"question": RunnablePassthrough(), "documents": retriever}`` gives it), or just the
question when it was built with a retriever, and returns a dict::

    {
        "question": "When was the Eiffel Tower built?",
        "documents": [Document(...), ...],  # [N] in the answer cites documents[N - 1]
        "answer": "It was built from 1887 to 1889 [1].",
        "citations": [Citation(...), ...],  # each marker, its claim and evidence
        "references": [Reference(...), ...],  # the cited documents, by first use
        "cited_answer": Answer(...),  # the whole answer: stop reason, usage, trace
    }

``stream``/``astream`` yield that dict in parts, as LangChain's retrieval chains do:
``{"question", "documents"}`` first, then ``{"answer": text}`` for each piece of final
text (a piece is never taken back), then ``{"citations", "references", "cited_answer"}``;
the parts added up (``+``) are the dict ``invoke`` returns. ``astream_events``, ``batch``,
``with_config`` and callbacks come from ``Runnable``; the retriever runs as a child run.

Needs ``pip install "citebacktrack[langchain]"`` (``langchain-core``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Required, cast

from typing_extensions import TypedDict  # pydantic reads a typing.TypedDict only on 3.12+

from citebacktrack.errors import ConfigurationError, InvalidSourcesError, MissingDependencyError
from citebacktrack.orchestrator import Citeformer
from citebacktrack.request import Budgets, SamplingConfig
from citebacktrack.types import Answer, Citation, Done, Policy, Reference, Source, TextDelta

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForChainRun,
        CallbackManagerForChainRun,
    )
    from langchain_core.documents import Document
    from langchain_core.runnables import Runnable, RunnableConfig
    from langchain_core.runnables.utils import AddableDict
except ImportError as exc:  # pragma: no cover - the langchain extra is installed in tests
    raise MissingDependencyError(
        feature="citebacktrack.integrations.langchain", extra="langchain", module="langchain_core"
    ) from exc

__all__ = ["CitedAnswerInput", "CitedAnswerOutput", "CitedAnswerRunnable"]


class CitedAnswerInput(TypedDict, total=False):
    """The input of :class:`CitedAnswerRunnable` as a dict (a bare ``str`` is the question)."""

    question: Required[str]
    """The question."""
    documents: Sequence[Document | tuple[Document, float]]
    """The documents to cite, in order (``(Document, score)`` pairs too); left out, the
    runnable's retriever finds them."""


class CitedAnswerOutput(TypedDict, total=False):
    """The output of :class:`CitedAnswerRunnable` (a stream yields it in parts)."""

    question: str
    """The question answered."""
    documents: list[Any]
    """The documents the answer may cite, as given or retrieved: ``[N]`` is
    ``documents[N - 1]``."""
    answer: str
    """The answer text with its ``[N]`` markers (``Answer.text``)."""
    citations: list[Citation]
    """Each marker in text order, with its claim, evidence and reference number."""
    references: list[Reference]
    """The cited documents, numbered by first use."""
    cited_answer: Answer
    """The whole answer (stop reason, usage, trace, abstention)."""


class CitedAnswerRunnable(Runnable[str | CitedAnswerInput, CitedAnswerOutput]):
    """A cited answer as a LangChain ``Runnable`` (see the module for input and output).

    Args:
        citeformer: answers the question; its backend is the model.
        retriever: finds the documents for a question given without them: a LangChain
            retriever, or any runnable from a string to a list of documents. Without one,
            every input must carry ``documents``.
        policy, budgets, sampling: per-call overrides passed to the citeformer.

    Raises (when run):
        ConfigurationError: an input that is neither a question nor a dict with one, or no
            documents and no retriever.
        InvalidSourcesError: no documents (the retriever found none), too many, or one
            that is not a LangChain ``Document``; the message says which.
        InvalidQuestionError: an empty question.
    """

    def __init__(
        self,
        citeformer: Citeformer,
        *,
        retriever: Runnable[str, Sequence[Any]] | None = None,
        policy: Policy | None = None,
        budgets: Budgets | None = None,
        sampling: SamplingConfig | None = None,
    ) -> None:
        if not isinstance(citeformer, Citeformer):
            raise ConfigurationError(
                f"CitedAnswerRunnable takes a Citeformer, got {type(citeformer).__name__}; "
                "pass Citeformer(backend)"
            )
        if retriever is not None and not isinstance(retriever, Runnable):
            raise ConfigurationError(
                f"retriever must be a LangChain retriever or runnable, got "
                f"{type(retriever).__name__}"
            )
        self.citeformer = citeformer
        self.retriever = retriever
        self.policy = policy
        self.budgets = budgets
        self.sampling = sampling

    # ------------------------------------------------------------------ Runnable

    def invoke(
        self,
        input: str | CitedAnswerInput,  # noqa: A002 - Runnable's name for it
        config: RunnableConfig | None = None,
        **kwargs: Any,
    ) -> CitedAnswerOutput:
        """The cited answer to one input (``{"question", "documents"}`` or a question)."""
        return self._call_with_config(self._answer, input, config)

    async def ainvoke(
        self,
        input: str | CitedAnswerInput,  # noqa: A002
        config: RunnableConfig | None = None,
        **kwargs: Any,
    ) -> CitedAnswerOutput:
        """Async :meth:`invoke`: the retriever's ``ainvoke`` and ``Citeformer.agenerate``."""
        return await self._acall_with_config(self._aanswer, input, config)

    def transform(
        self,
        input: Iterator[str | CitedAnswerInput],  # noqa: A002
        config: RunnableConfig | None = None,
        **kwargs: Any,
    ) -> Iterator[CitedAnswerOutput]:
        """The answer in parts, from an input that may itself arrive in parts (an LCEL
        map's keys one by one): the parts are added up first."""
        yield from self._transform_stream_with_config(input, self._parts, config)

    def stream(
        self,
        input: str | CitedAnswerInput,  # noqa: A002
        config: RunnableConfig | None = None,
        **kwargs: Any,
    ) -> Iterator[CitedAnswerOutput]:
        """The answer in parts: question and documents, text pieces, citations (module)."""
        return self.transform(iter([input]), config)

    async def atransform(
        self,
        input: AsyncIterator[str | CitedAnswerInput],  # noqa: A002
        config: RunnableConfig | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[CitedAnswerOutput]:
        """Async :meth:`transform`."""
        async for part in self._atransform_stream_with_config(input, self._aparts, config):
            yield part

    async def astream(
        self,
        input: str | CitedAnswerInput,  # noqa: A002
        config: RunnableConfig | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[CitedAnswerOutput]:
        """Async :meth:`stream` (``Citeformer.astream``: the event loop is never blocked)."""

        async def one() -> AsyncIterator[str | CitedAnswerInput]:
            yield input

        async for part in self.atransform(one(), config):
            yield part

    # ------------------------------------------------------------------ the work

    def _answer(
        self,
        value: str | CitedAnswerInput,
        run_manager: CallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> CitedAnswerOutput:
        question, documents = self._read(value)
        if documents is None:
            documents = self._retriever().invoke(question, config)
        answer = self.citeformer.generate(question, _sources(documents), **self._overrides())
        return _part(question=question, documents=list(documents), **_finished(answer, True))

    async def _aanswer(
        self,
        value: str | CitedAnswerInput,
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> CitedAnswerOutput:
        question, documents = self._read(value)
        if documents is None:
            documents = await self._retriever().ainvoke(question, config)
        answer = await self.citeformer.agenerate(question, _sources(documents), **self._overrides())
        return _part(question=question, documents=list(documents), **_finished(answer, True))

    def _parts(
        self,
        inputs: Iterator[str | CitedAnswerInput],
        run_manager: CallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> Iterator[CitedAnswerOutput]:
        question, documents = self._read(_gathered(list(inputs)))
        if documents is None:
            documents = self._retriever().invoke(question, config)
        events = self.citeformer.stream(question, _sources(documents), **self._overrides())
        yield _part(question=question, documents=list(documents))
        streamed = False
        try:
            for event in events:
                if isinstance(event, TextDelta) and event.text:
                    streamed = True
                    yield _part(answer=event.text)
                elif isinstance(event, Done) and event.answer is not None:
                    yield _part(**_finished(event.answer, not streamed))
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()

    async def _aparts(
        self,
        inputs: AsyncIterator[str | CitedAnswerInput],
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> AsyncIterator[CitedAnswerOutput]:
        question, documents = self._read(_gathered([value async for value in inputs]))
        if documents is None:
            documents = await self._retriever().ainvoke(question, config)
        events = self.citeformer.astream(question, _sources(documents), **self._overrides())
        yield _part(question=question, documents=list(documents))
        streamed = False
        try:
            async for event in events:
                if isinstance(event, TextDelta) and event.text:
                    streamed = True
                    yield _part(answer=event.text)
                elif isinstance(event, Done) and event.answer is not None:
                    yield _part(**_finished(event.answer, not streamed))
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    def _read(self, value: object) -> tuple[str, Sequence[Any] | None]:
        """The question and the documents (``None``: retrieve them) of one input."""
        if isinstance(value, str):
            return value, None
        if not isinstance(value, Mapping) or "question" not in value:
            raise ConfigurationError(
                "CitedAnswerRunnable takes a question (a str) or a dict "
                "{'question': ..., 'documents': [...]}, got "
                f"{type(value).__name__}{_keys(value)}; in LCEL: "
                "{'question': RunnablePassthrough(), 'documents': retriever} | cited"
            )
        documents = value.get("documents")
        if documents is not None and (
            isinstance(documents, str | bytes) or not isinstance(documents, Sequence)
        ):
            raise InvalidSourcesError(
                f"'documents' must be a list of LangChain Documents, got {type(documents).__name__}"
            )
        return value["question"], documents

    def _retriever(self) -> Runnable[str, Sequence[Any]]:
        if self.retriever is None:
            raise ConfigurationError(
                "this input has no 'documents' and the runnable has no retriever; pass "
                "{'question': ..., 'documents': [...]} or build "
                "CitedAnswerRunnable(citeformer, retriever=retriever)"
            )
        return self.retriever

    def _overrides(self) -> dict[str, Any]:
        return {"policy": self.policy, "budgets": self.budgets, "sampling": self.sampling}


def _sources(documents: Sequence[Any]) -> list[Source]:
    """The documents as sources (``Source.from_langchain``; a ``Source`` stays one)."""
    if not documents:
        raise InvalidSourcesError(
            "no documents to cite (the retriever found none for this question); an answer "
            "needs at least one"
        )
    if all(isinstance(item, Source) for item in documents):
        return [cast(Source, item) for item in documents]
    sources: list[Source] = Source.from_langchain(list(documents))
    return sources


def _finished(answer: Answer, with_text: bool) -> dict[str, Any]:
    """The answer's part of the output (with its text unless it was streamed already)."""
    done: dict[str, Any] = {
        "citations": list(answer.citations),
        "references": list(answer.references),
        "cited_answer": answer,
    }
    return {"answer": answer.text, **done} if with_text else done


def _part(**values: Any) -> CitedAnswerOutput:
    """One part of the output: parts add up (``+``) to the whole, as LangChain's do."""
    return cast(CitedAnswerOutput, AddableDict(values))


def _gathered(values: list[Any]) -> object:
    """An input that arrived in parts, added up (the last part wins where they do not add)."""
    if not values:
        raise ConfigurationError("CitedAnswerRunnable got no input")
    total = values[0]
    for value in values[1:]:
        try:
            total = total + value
        except TypeError:
            total = value
    return total


def _keys(value: object) -> str:
    return f" with keys {sorted(map(str, value))}" if isinstance(value, Mapping) else ""
