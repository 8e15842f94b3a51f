"""The LangChain runnable and the LlamaIndex query engine, on the real ``langchain-core``
and ``llama-index-core``: real retrievers over in-memory documents, ``MockBackend`` as the
model, LCEL composition, streaming, ``astream_events``, the ``Response`` LlamaIndex users
read; and every code block of ``docs/integrations.md`` runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever as LangChainRetriever
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from llama_index.core import Settings
from llama_index.core.base.response.schema import Response
from llama_index.core.retrievers import BaseRetriever as LlamaIndexRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from citebacktrack import (
    Answer,
    Citeformer,
    ConfigurationError,
    InvalidSourcesError,
    MockBackend,
    Policy,
    render,
)
from citebacktrack.integrations.langchain import CitedAnswerRunnable
from citebacktrack.integrations.llamaindex import CitedQueryEngine

QUESTION = "When was the Eiffel Tower completed?"
EIFFEL = "The Eiffel Tower was completed in 1889. It is 330 metres tall."
SEINE = "The Eiffel Tower stands beside the Seine river in Paris."
SCRIPT = "The Eiffel Tower was completed in 1889 [1]. It is 330 metres tall [1]."
DOCS_PAGE = Path(__file__).parent.parent / "docs" / "integrations.md"


def words(text: str) -> set[str]:
    return {word.strip("?.,").lower() for word in text.split() if len(word) > 3}


class KeywordRetriever(LangChainRetriever):
    """A real LangChain retriever: the documents sharing a long word with the query."""

    documents: list[Document]
    queries: list[str]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        self.queries.append(query)
        return [d for d in self.documents if words(query) & words(d.page_content)]


def paris() -> list[Document]:
    return [
        Document(page_content="The Louvre is a museum.", metadata={"source": "/d/louvre.pdf"}),
        Document(page_content=EIFFEL, metadata={"source": "/d/paris.pdf", "page": 0}, id="e1"),
    ]


def retriever() -> KeywordRetriever:
    return KeywordRetriever(documents=paris(), queries=[])


def added(parts: list[Any]) -> Any:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


# ------------------------------------------------------------------ LangChain


def test_invoke_with_a_retriever_returns_the_cited_answer_and_its_documents() -> None:
    found = retriever()
    cited = CitedAnswerRunnable(Citeformer(MockBackend([SCRIPT])), retriever=found)
    result = cited.invoke(QUESTION)
    assert found.queries == [QUESTION]
    assert set(result) == {
        "question",
        "documents",
        "answer",
        "citations",
        "references",
        "cited_answer",
    }
    assert result["question"] == QUESTION
    assert result["documents"] == [paris()[1]]  # [1] is documents[0]
    assert result["answer"] == SCRIPT
    answer = result["cited_answer"]
    assert isinstance(answer, Answer)
    assert answer.text == SCRIPT
    assert result["citations"] == list(answer.citations)
    assert [c.source_id for c in result["citations"]] == ["e1", "e1"]  # the document's id
    (reference,) = result["references"]
    assert (reference.title, reference.source_id) == ("paris.pdf, page 1", "e1")
    assert "[1] paris.pdf, page 1 (id e1)" in render(answer, "text")


def test_a_dict_input_carries_its_documents_and_pairs_keep_scores() -> None:
    found = retriever()
    cited = CitedAnswerRunnable(Citeformer(MockBackend([SCRIPT.replace("[1]", "[2]")])))
    pairs = list(zip(paris(), [0.2, 0.9], strict=True))
    result = cited.invoke({"question": QUESTION, "documents": pairs})
    assert found.queries == []
    assert result["documents"] == pairs
    assert result["references"][0].score == 0.9
    # a runnable built with a retriever still uses documents it is given
    with_retriever = CitedAnswerRunnable(Citeformer(MockBackend([SCRIPT])), retriever=found)
    with_retriever.invoke({"question": QUESTION, "documents": [paris()[1]]})
    assert found.queries == []


def test_lcel_composition_streams_parts_that_add_up_to_invoke() -> None:
    found = retriever()
    cf = Citeformer(MockBackend([SCRIPT, SCRIPT]))
    chain = {"question": RunnablePassthrough(), "documents": found} | CitedAnswerRunnable(cf)
    whole = chain.invoke(QUESTION)
    parts = list(chain.stream(QUESTION))
    assert parts[0] == {"question": QUESTION, "documents": [paris()[1]]}
    texts = [part["answer"] for part in parts if "answer" in part]
    assert texts == ["The Eiffel Tower was completed in 1889 [1].", " It is 330 metres tall [1]."]
    assert set(parts[-1]) == {"citations", "references", "cited_answer"}
    assert added(parts) == whole
    # and composed before another step, as any runnable is
    cited = CitedAnswerRunnable(Citeformer(MockBackend([SCRIPT])))
    rendered = (
        {"question": RunnablePassthrough(), "documents": found}
        | cited
        | RunnableLambda(lambda out: render(out["cited_answer"], "text"))
    )
    assert rendered.invoke(QUESTION).startswith(SCRIPT + "\n\nReferences:\n[1] paris.pdf")


def test_async_invoke_stream_and_batch() -> None:
    found = retriever()
    cf = Citeformer(MockBackend([SCRIPT] * 4))
    cited = CitedAnswerRunnable(cf, retriever=found)

    async def main() -> None:
        result = await cited.ainvoke(QUESTION)
        assert result["answer"] == SCRIPT
        parts = [part async for part in cited.astream(QUESTION)]
        assert "".join(p["answer"] for p in parts if "answer" in p) == SCRIPT
        assert added(parts)["cited_answer"] == result["cited_answer"]
        results = await cited.abatch([QUESTION, QUESTION])
        assert [r["answer"] for r in results] == [SCRIPT, SCRIPT]

    anyio.run(main)


def test_astream_events_show_the_retriever_as_a_child_and_each_piece_of_text() -> None:
    found = retriever()
    cited = CitedAnswerRunnable(Citeformer(MockBackend([SCRIPT])), retriever=found)

    async def events() -> list[dict[str, Any]]:
        return [event async for event in cited.astream_events(QUESTION, version="v2")]

    seen = anyio.run(events)
    start = next(e for e in seen if e["event"] == "on_chain_start")
    assert start["name"] == "CitedAnswerRunnable"
    retrieval = next(e for e in seen if e["event"] == "on_retriever_start")
    assert retrieval["name"] == "KeywordRetriever"
    assert start["run_id"] in retrieval["parent_ids"]
    pieces = [
        e["data"]["chunk"]["answer"]
        for e in seen
        if e["event"] == "on_chain_stream" and "answer" in e["data"]["chunk"]
    ]
    assert pieces == ["The Eiffel Tower was completed in 1889 [1].", " It is 330 metres tall [1]."]
    end = seen[-1]
    assert end["event"] == "on_chain_end"
    assert end["data"]["output"]["cited_answer"].text == SCRIPT


def test_stopping_a_stream_early_closes_the_answer() -> None:
    cited = CitedAnswerRunnable(Citeformer(MockBackend([SCRIPT])), retriever=retriever())
    stream = cited.stream(QUESTION)
    assert "documents" in next(stream)
    assert next(stream)["answer"].startswith("The Eiffel Tower")
    stream.close()  # no error, nothing left running


def test_bad_input_gets_typed_errors_naming_the_fix() -> None:
    cited = CitedAnswerRunnable(Citeformer(MockBackend([])))
    with pytest.raises(ConfigurationError, match="has no retriever"):
        cited.invoke(QUESTION)
    with pytest.raises(ConfigurationError, match=r"with keys \['query'\].*RunnablePassthrough"):
        cited.invoke({"query": QUESTION})  # type: ignore[typeddict-unknown-key]
    with pytest.raises(InvalidSourcesError, match="must be a list of LangChain Documents"):
        cited.invoke({"question": QUESTION, "documents": "text"})  # type: ignore[typeddict-item]
    nothing = CitedAnswerRunnable(Citeformer(MockBackend([])), retriever=retriever())
    with pytest.raises(InvalidSourcesError, match="the retriever found none"):
        nothing.invoke("Who painted the Mona Lisa?")
    with pytest.raises(InvalidSourcesError, match=r"item 1 of the list"):
        cited.invoke({"question": QUESTION, "documents": [{"text": "x"}]})  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="takes a Citeformer"):
        CitedAnswerRunnable(MockBackend([]))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="LangChain retriever or runnable"):
        CitedAnswerRunnable(Citeformer(MockBackend([])), retriever=lambda q: [])  # type: ignore[arg-type]


# ------------------------------------------------------------------ LlamaIndex


class NodeRetriever(LlamaIndexRetriever):
    """A real LlamaIndex retriever: nodes scored by the share of query words they hold."""

    def __init__(self, nodes: list[TextNode]) -> None:
        self.nodes = nodes
        super().__init__()

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        asked = words(query_bundle.query_str)
        hits = [
            NodeWithScore(node=n, score=len(asked & words(n.text)) / len(asked)) for n in self.nodes
        ]
        return sorted((h for h in hits if h.score), key=lambda h: -(h.score or 0))


def nodes() -> list[TextNode]:
    return [
        TextNode(text=SEINE, metadata={"file_name": "a.md"}),
        TextNode(text=EIFFEL, metadata={"file_name": "paris.pdf", "page_label": "1"}),
        TextNode(text="The Louvre is a museum.", id_="louvre"),
    ]


def test_query_returns_a_response_citing_its_source_nodes() -> None:
    script = "The Eiffel Tower was completed in 1889 [1]. It is 330 metres tall [1]."
    engine = CitedQueryEngine(Citeformer(MockBackend([script])), NodeRetriever(nodes()))
    response = engine.query(QUESTION)
    assert isinstance(response, Response)
    assert response.response == script
    (cited,) = response.source_nodes
    assert cited.node.metadata == {"file_name": "paris.pdf", "page_label": "1"}
    assert cited.score == 0.75
    metadata = response.metadata or {}
    retrieved = metadata["retrieved_nodes"]
    assert [hit.node.text for hit in retrieved] == [EIFFEL, nodes()[0].text]
    answer = metadata["cited_answer"]
    assert metadata["citations"] == list(answer.citations)
    assert metadata["references"][0].title == "paris.pdf, page 1"
    assert metadata["abstention"] is None
    assert "[1] paris.pdf, page 1\n" in render(answer, "text")
    assert cited.node.node_id not in render(answer)  # a random UUID, never shown


def test_markers_are_renumbered_to_index_the_cited_nodes() -> None:
    question = "Where beside the Seine river is the Eiffel Tower, and when was it completed?"
    script = (
        "The Eiffel Tower was completed in 1889 [2]. It stands beside the Seine river in Paris [1]."
    )
    engine = CitedQueryEngine(Citeformer(MockBackend([script])), NodeRetriever(nodes()))
    response = engine.query(QueryBundle(question))
    retrieved = (response.metadata or {})["retrieved_nodes"]
    assert [hit.node.text for hit in retrieved] == [SEINE, EIFFEL]  # 5 and 3 of 8 words
    assert response.response == (
        "The Eiffel Tower was completed in 1889 [1]. It stands beside the Seine river in Paris [2]."
    )
    assert [hit.node.text for hit in response.source_nodes] == [EIFFEL, SEINE]
    assert [hit.score for hit in response.source_nodes] == [3 / 8, 5 / 8]
    citations = (response.metadata or {})["citations"]
    assert [(c.source_index, c.reference_number) for c in citations] == [(2, 1), (1, 2)]
    assert (response.metadata or {})["cited_answer"].text == script


def test_aquery_and_synthesize_and_settings_untouched() -> None:
    script = "The Eiffel Tower was completed in 1889 [1]."
    cf = Citeformer(MockBackend([script] * 3))
    engine = CitedQueryEngine(cf, NodeRetriever(nodes()))
    response = anyio.run(engine.aquery, QUESTION)
    assert str(response) == script
    hits = [NodeWithScore(node=nodes()[1], score=0.3)]
    only = CitedQueryEngine(cf)
    assert only.synthesize(QueryBundle(QUESTION), hits).source_nodes == hits
    response = anyio.run(only.asynthesize, QueryBundle(QUESTION), hits)
    assert response.source_nodes[0].score == 0.3
    # no LLM or embedding model was resolved (LlamaIndex's default would be OpenAI)
    assert Settings._llm is None
    assert Settings._embed_model is None


def test_llamaindex_errors_name_the_fix() -> None:
    with pytest.raises(ConfigurationError, match="has no retriever"):
        CitedQueryEngine(Citeformer(MockBackend([]))).query(QUESTION)
    engine = CitedQueryEngine(Citeformer(MockBackend([])), NodeRetriever(nodes()))
    with pytest.raises(InvalidSourcesError, match="the retriever found none"):
        engine.query("Who painted the Mona Lisa?")
    with pytest.raises(ConfigurationError, match="BaseRetriever"):
        CitedQueryEngine(Citeformer(MockBackend([])), retriever())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="takes a Citeformer"):
        CitedQueryEngine(MockBackend([]))  # type: ignore[arg-type]


def test_an_abstaining_answer_has_no_text_and_no_source_nodes() -> None:
    engine = CitedQueryEngine(
        Citeformer(MockBackend(["Paris has many bridges [1]."])),
        NodeRetriever(nodes()),
        policy=Policy(fallback="abstain"),  # the per-call override reaches the answer
    )
    response = engine.query(QUESTION)
    assert (response.response, response.source_nodes) == ("", [])
    assert "none of the sources supports" in (response.metadata or {})["abstention"]


# ------------------------------------------------------------------ the page and the imports


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS_PAGE.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("number", range(3))
def test_every_code_block_of_the_integrations_page_runs(number: int) -> None:
    blocks = doc_blocks()
    assert len(blocks) == 3
    where = f"{DOCS_PAGE.name} block {number + 1}"
    exec(compile(blocks[number], where, "exec", dont_inherit=True), {"__name__": "doc_block"})


def test_the_core_package_imports_neither_framework() -> None:
    code = textwrap.dedent(
        """
        import sys
        import citebacktrack, citebacktrack.integrations, citebacktrack.adapters
        from citebacktrack import Citeformer, MockBackend, Source
        Citeformer(MockBackend(["x [1]."])).generate("q", [Source(text="x")])
        print(sorted(m for m in sys.modules if m.startswith(("langchain", "llama_index"))))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [("langchain", "langchain_core", "langchain"), ("llamaindex", "llama_index", "llamaindex")],
)
def test_a_missing_framework_names_its_extra(module: str, blocked: str, extra: str) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules[{blocked!r}] = None
        try:
            import citebacktrack.integrations.{module}
        except ImportError as exc:
            print(type(exc).__name__, exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("MissingDependencyError")
    assert f'pip install "citebacktrack[{extra}]"' in out.stdout
