"""Sources from LangChain documents and LlamaIndex nodes: one or a whole list, titles from
file names and pages, ids shown only when the caller chose them, and raw documents passed
as sources named with the adapter to call. Run on the real ``langchain-core`` and
``llama-index-core`` objects (the adapters themselves import neither)."""

from __future__ import annotations

import uuid

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_core.documents import Document
from llama_index.core.schema import NodeWithScore, TextNode

from citebacktrack import Citeformer, InvalidSourcesError, MockBackend, Source, render
from citebacktrack.adapters import adapter_hint, is_generated_id
from citebacktrack.request import check_sources

QUESTION = "When did Apollo 11 land?"
APOLLO = "Apollo 11 landed on the Moon in July 1969."


def pdf_pages() -> list[Document]:
    """What LangChain's PyPDFLoader returns for two pages (``page`` counts from 0)."""
    return [
        Document(page_content=APOLLO, metadata={"source": "/data/apollo.pdf", "page": 3}),
        Document(
            page_content="Apollo 13 returned safely in April 1970.",
            metadata={"source": "/data/apollo.pdf", "page": 7},
        ),
    ]


def test_a_list_of_langchain_documents_gives_a_list_of_sources_in_order() -> None:
    sources = Source.from_langchain(pdf_pages())
    assert [s.text for s in sources] == [d.page_content for d in pdf_pages()]
    assert [s.title for s in sources] == ["apollo.pdf, page 4", "apollo.pdf, page 8"]
    assert [s.id for s in sources] == [None, None]
    assert sources[0].metadata == {"source": "/data/apollo.pdf", "page": 3}
    # similarity_search_with_score's (Document, score) pairs keep their scores
    pairs = list(zip(pdf_pages(), [0.9, 0.4], strict=True))
    assert [s.score for s in Source.from_langchain(pairs)] == [0.9, 0.4]
    # one document (or pair) still gives one source
    assert Source.from_langchain(pdf_pages()[0]) == sources[0]
    assert Source.from_langchain((pdf_pages()[0], 0.5)).score == 0.5
    assert Source.from_langchain([]) == []


def test_a_list_of_llamaindex_nodes_keeps_each_score() -> None:
    hits = [
        NodeWithScore(
            node=TextNode(text="The Louvre is in Paris.", metadata={"file_name": "louvre.pdf"}),
            score=0.82,
        ),
        NodeWithScore(node=TextNode(text="The Prado is in Madrid.", id_="prado-1"), score=0.41),
        TextNode(text="The Uffizi is in Florence.", metadata={"title": "Uffizi"}),
    ]
    louvre, prado, uffizi = Source.from_llamaindex(hits)
    assert (louvre.title, louvre.score) == ("louvre.pdf", 0.82)
    assert (prado.id, prado.title, prado.score) == ("prado-1", "", 0.41)
    assert (uffizi.title, uffizi.score) == ("Uffizi", None)
    assert louvre.id == hits[0].node.node_id  # the random UUID stays the id


def test_a_bad_item_of_a_list_is_named_by_its_number() -> None:
    with pytest.raises(InvalidSourcesError, match=r"item 2 of the list: .*page_content"):
        Source.from_langchain([pdf_pages()[0], {"page_content": "a dict"}])
    with pytest.raises(InvalidSourcesError, match=r"item 1 of the list: .*has no text"):
        Source.from_llamaindex([object()])
    with pytest.raises(InvalidSourcesError, match=r"score= is the score of one document"):
        Source.from_langchain(pdf_pages(), score=0.5)  # type: ignore[call-overload]
    # a tuple that is not a (Document, score) pair is not taken for a list
    with pytest.raises(InvalidSourcesError, match="pass a list"):
        Source.from_langchain((pdf_pages()[0], pdf_pages()[1], pdf_pages()[0]))


@pytest.mark.parametrize(
    ("metadata", "title"),
    [
        ({"source": "/data/apollo.pdf", "page": 0}, "apollo.pdf, page 1"),
        ({"source": "/data/apollo.pdf", "page": 3, "page_label": "iv"}, "apollo.pdf, page iv"),
        ({"source": "C:\\docs\\apollo.pdf", "page_number": 2}, "apollo.pdf, page 2"),
        ({"source": "/data/apollo.pdf", "page": True}, "apollo.pdf"),  # a bool is no page
        ({"source": "notes.txt"}, "notes.txt"),
        ({"title": "Apollo 11", "source": "/data/apollo.pdf", "page": 3}, "Apollo 11"),
        ({"source": "https://nasa.gov/apollo", "page": 3}, ""),  # a URL is the url
        ({"file_path": "/data/apollo.pdf", "source": "4"}, "apollo.pdf"),  # PyMuPDFReader
        ({}, ""),
    ],
)
def test_langchain_titles_fall_back_to_the_file_name_and_page(
    metadata: dict[str, object], title: str
) -> None:
    assert Source.from_langchain(Document(page_content="t", metadata=metadata)).title == title


def test_llamaindex_titles_use_the_page_label_and_not_a_bare_page_index() -> None:
    node = TextNode(text="t", metadata={"file_name": "apollo.pdf", "page_label": "3"})
    assert Source.from_llamaindex(node).title == "apollo.pdf, page 3"
    # LangChain's 0-based "page" is LangChain's convention: not read from a node
    node = TextNode(text="t", metadata={"file_path": "/data/apollo.pdf", "page": 3})
    assert Source.from_llamaindex(node).title == "apollo.pdf"


def test_pdf_pages_render_by_file_and_page_without_a_made_up_id() -> None:
    cf = Citeformer(MockBackend([f"{APOLLO[:-1]} [1]."]))
    answer = cf.generate(QUESTION, Source.from_langchain(pdf_pages()))
    text = render(answer, "text")
    assert "[1] apollo.pdf, page 4\n" in text
    assert "(id" not in text
    assert "source 1" not in text
    assert "**apollo.pdf, page 4**" in render(answer, "markdown")


def test_a_random_node_uuid_is_never_rendered_but_a_chosen_id_is() -> None:
    nodes = [
        NodeWithScore(node=TextNode(text=APOLLO), score=0.9),
        NodeWithScore(node=TextNode(text="Apollo 13 returned in 1970.", id_="a13"), score=0.5),
    ]
    script = f"{APOLLO[:-1]} [1]. Apollo 13 returned in 1970 [2]."
    answer = Citeformer(MockBackend([script])).generate(QUESTION, Source.from_llamaindex(nodes))
    random_id = nodes[0].node.node_id
    assert answer.citations[0].source_id == random_id  # kept for the caller's lookups
    for style in ("text", "markdown"):
        shown = render(answer, style)  # type: ignore[arg-type]
        assert random_id not in shown
        assert "source 1" in shown
        assert "(id a13)" in shown


def test_generated_ids_are_positions_and_random_uuids() -> None:
    assert is_generated_id("3", 3)
    assert is_generated_id(str(uuid.uuid4()), 1)
    assert is_generated_id(uuid.uuid4().hex, 1)
    assert not is_generated_id("3", 2)
    assert not is_generated_id("doc-7", 1)
    assert not is_generated_id(str(uuid.uuid5(uuid.NAMESPACE_URL, "x")), 1)  # chosen


def test_raw_documents_as_sources_name_the_adapter() -> None:
    cf = Citeformer(MockBackend([]))
    doc = pdf_pages()[0]
    node = NodeWithScore(node=TextNode(text=APOLLO), score=0.9)
    cases = [
        ([doc], r"source 1 is of type Document, not Source; .*Source\.from_langchain\(docs\)"),
        ([(doc, 0.9)], r"source 1 is of type tuple.*Source\.from_langchain\(docs\)"),
        ([node], r"NodeWithScore, not Source; .*Source\.from_llamaindex\(nodes\)"),
        ([node.node], r"TextNode, not Source; .*Source\.from_llamaindex\(nodes\)"),
        (doc, r"not a single item; .*Source\.from_langchain\(docs\)"),
        (node, r"not a single item; .*Source\.from_llamaindex\(nodes\)"),
    ]
    for sources, message in cases:
        with pytest.raises(InvalidSourcesError, match=message):
            cf.generate(QUESTION, sources)  # type: ignore[arg-type]
    # the one check every request goes through says the same
    with pytest.raises(InvalidSourcesError, match=r"Source\.from_langchain\(docs\)"):
        check_sources([Source(text=APOLLO), doc])
    # anything else keeps the plain advice
    with pytest.raises(InvalidSourcesError, match=r"pass Source\(text=\.\.\.\)"):
        check_sources([{"page_content": APOLLO}])
    assert adapter_hint(object()) is None
