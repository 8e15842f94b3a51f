"""A LlamaIndex query engine that answers with checked ``[N]`` citations.

:class:`CitedQueryEngine` retrieves nodes with any LlamaIndex retriever and answers from
them with a :class:`~citebacktrack.Citeformer` (no LlamaIndex LLM, embedding model or
``Settings`` is used). ``query``/``aquery`` return a LlamaIndex ``Response``:

* ``response.response``: the answer text, its markers numbered by first use, so ``[k]``
  cites ``response.source_nodes[k - 1]``;
* ``response.source_nodes``: the cited nodes (``NodeWithScore``, the retriever's score
  kept), in that order; nodes retrieved but not cited are left out;
* ``response.metadata``: ``"citations"`` (each marker with its claim, evidence and
  reference number ``k``), ``"references"``, ``"retrieved_nodes"`` (every node, in
  retrieval order), ``"cited_answer"`` (the whole :class:`~citebacktrack.Answer`, whose own
  text numbers markers by retrieval order: ``[N]`` is ``retrieved_nodes[N - 1]``, and
  whose offsets index that text) and ``"abstention"`` (why there is no answer, else
  ``None``; the response text is then empty).

``synthesize(query_bundle, nodes)`` answers from nodes you already have.

Needs ``pip install "citebacktrack[llamaindex]"`` (``llama-index-core``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from citebacktrack.errors import ConfigurationError, InvalidSourcesError, MissingDependencyError
from citebacktrack.orchestrator import Citeformer
from citebacktrack.render import renumbered_text
from citebacktrack.request import Budgets, SamplingConfig
from citebacktrack.types import Answer, Policy, Source

try:
    from llama_index.core.base.base_query_engine import BaseQueryEngine
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.base.response.schema import Response
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.prompts.mixin import PromptMixinType
    from llama_index.core.schema import NodeWithScore, QueryBundle
except ImportError as exc:  # pragma: no cover - the llamaindex extra is installed in tests
    raise MissingDependencyError(
        feature="citebacktrack.integrations.llamaindex",
        extra="llamaindex",
        module="llama_index.core",
    ) from exc

__all__ = ["CitedQueryEngine"]


class CitedQueryEngine(BaseQueryEngine):
    """A LlamaIndex query engine whose answers carry checked ``[N]`` citations (see the
    module for the ``Response`` it returns).

    Args:
        citeformer: answers the question; its backend is the model.
        retriever: finds the nodes for a query (any LlamaIndex ``BaseRetriever``, e.g.
            ``index.as_retriever()``); ``None`` when you only call :meth:`synthesize`.
        policy, budgets, sampling: per-call overrides passed to the citeformer.
        callback_manager: LlamaIndex callbacks (default none).

    Raises (when queried):
        ConfigurationError: a query on an engine built without a retriever.
        InvalidSourcesError: the retriever found no nodes, or too many.
        InvalidQuestionError: an empty query.
    """

    def __init__(
        self,
        citeformer: Citeformer,
        retriever: BaseRetriever | None = None,
        *,
        policy: Policy | None = None,
        budgets: Budgets | None = None,
        sampling: SamplingConfig | None = None,
        callback_manager: CallbackManager | None = None,
    ) -> None:
        if not isinstance(citeformer, Citeformer):
            raise ConfigurationError(
                f"CitedQueryEngine takes a Citeformer, got {type(citeformer).__name__}; "
                "pass Citeformer(backend)"
            )
        if retriever is not None and not isinstance(retriever, BaseRetriever):
            raise ConfigurationError(
                f"retriever must be a LlamaIndex BaseRetriever (e.g. index.as_retriever()), "
                f"got {type(retriever).__name__}"
            )
        super().__init__(callback_manager=callback_manager)
        self.citeformer = citeformer
        self.retriever = retriever
        self.overrides: dict[str, Any] = {
            "policy": policy,
            "budgets": budgets,
            "sampling": sampling,
        }

    def _get_prompt_modules(self) -> PromptMixinType:
        return {}

    def retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        """The retriever's nodes for ``query_bundle``."""
        return self._retriever().retrieve(query_bundle)

    def synthesize(
        self,
        query_bundle: QueryBundle,
        nodes: list[NodeWithScore],
        additional_source_nodes: Sequence[NodeWithScore] | None = None,
    ) -> Response:
        """The cited answer to ``query_bundle`` from ``nodes`` (``additional_source_nodes``
        are not cited from, and are ignored)."""
        sources = _sources(nodes)
        answer = self.citeformer.generate(query_bundle.query_str, sources, **self.overrides)
        return _response(answer, nodes)

    async def asynthesize(
        self,
        query_bundle: QueryBundle,
        nodes: list[NodeWithScore],
        additional_source_nodes: Sequence[NodeWithScore] | None = None,
    ) -> Response:
        """Async :meth:`synthesize` (``Citeformer.agenerate``)."""
        sources = _sources(nodes)
        answer = await self.citeformer.agenerate(query_bundle.query_str, sources, **self.overrides)
        return _response(answer, nodes)

    def _query(self, query_bundle: QueryBundle) -> Response:
        nodes = self._retriever().retrieve(query_bundle)
        return self.synthesize(query_bundle, nodes)

    async def _aquery(self, query_bundle: QueryBundle) -> Response:
        nodes = await self._retriever().aretrieve(query_bundle)
        return await self.asynthesize(query_bundle, nodes)

    def _retriever(self) -> BaseRetriever:
        if self.retriever is None:
            raise ConfigurationError(
                "this CitedQueryEngine has no retriever; build it with "
                "CitedQueryEngine(citeformer, retriever) or call synthesize(query, nodes)"
            )
        return self.retriever


def _sources(nodes: Sequence[NodeWithScore]) -> list[Source]:
    if not nodes:
        raise InvalidSourcesError(
            "no nodes to cite (the retriever found none for this query); an answer needs "
            "at least one"
        )
    sources: list[Source] = Source.from_llamaindex(list(nodes))
    return sources


def _response(answer: Answer, nodes: Sequence[NodeWithScore]) -> Response:
    """The LlamaIndex response: text renumbered by first use, the cited nodes in order."""
    cited = [_with_score(nodes[ref.source_index - 1]) for ref in answer.references]
    return Response(
        response=renumbered_text(answer),
        source_nodes=cited,
        metadata={
            "citations": list(answer.citations),
            "references": list(answer.references),
            "retrieved_nodes": list(nodes),
            "cited_answer": answer,
            "abstention": answer.abstention,
        },
    )


def _with_score(node: Any) -> NodeWithScore:
    """A retrieved node as a ``NodeWithScore`` (a bare node passed in gets no score)."""
    return node if isinstance(node, NodeWithScore) else NodeWithScore(node=node, score=None)
