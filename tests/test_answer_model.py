"""One answer for stream and generate, evidence on citations, requests, overrides, sources."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence

import anyio
import pytest

from citebacktrack import (
    Answer,
    Backend,
    BackendClosedError,
    BackendError,
    Budgets,
    CitationAccepted,
    CitationMode,
    CitationRejected,
    Citeformer,
    ConfigurationError,
    Done,
    Event,
    Evidence,
    InvalidSourcesError,
    MockBackend,
    Policy,
    SamplingConfig,
    Source,
    Started,
    StopReason,
    TextDelta,
    Trace,
    TraceEntry,
    Usage,
    render,
)
from citebacktrack.answer import AnswerBuilder, collect
from citebacktrack.request import DecodingOptions, GenerationRequest, SegmentOptions
from citebacktrack.types import Citation
from helpers import TableScorer, table_scorer

SOURCES = [
    Source(id="louvre", title="Louvre", text="The Louvre is an art museum in Paris."),
    Source(
        id="eiffel",
        title="Eiffel Tower",
        url="https://example.org/eiffel",
        text="Gustave Eiffel's company built it. The Eiffel Tower was completed in 1889.\n"
        "It is 330 metres tall.",
    ),
    Source(id="wall", title="Great Wall", text="The Great Wall of China is very long."),
]
QUESTION = "When was the Eiffel Tower completed, and how tall is it?"


def _table(rule: TableScorer) -> object:
    return lambda sources: rule


# Each case: the script the model wants to write, Citeformer options, the stop reason.
CASES: dict[str, tuple[str, dict[str, object], StopReason]] = {
    "whitespace around the answer": (
        "  The Eiffel Tower was completed in 1889 [1]. It is 330 metres tall [1].  ",
        {"scorer": None},
        StopReason.END,
    ),
    "newlines before and after": (
        "\n\nThe Eiffel Tower was completed in 1889 [2].\n\n",
        {},
        StopReason.END,
    ),
    "a rejection rolled back": (
        " The Eiffel Tower was completed in 1889 [1]. It is 330 metres tall [3].",
        {},
        StopReason.END,
    ),
    "token budget": (
        "The Eiffel Tower was completed in 1889 [2]. It is 330 metres tall [2].",
        {"budgets": Budgets(max_new_tokens=52)},
        StopReason.MAX_NEW_TOKENS,
    ),
    "rollback budget": (
        "  Bananas are blue [1].",
        {"scorer": _table(table_scorer(lambda c, i: False)), "budgets": Budgets(max_backtracks=1)},
        StopReason.BACKTRACK_BUDGET,
    ),
    "rolled-back-token budget": (
        "Bananas are blue [1].",
        {
            "scorer": _table(table_scorer(lambda c, i: False)),
            "budgets": Budgets(max_rolled_back_tokens=2),
        },
        StopReason.ROLLED_BACK_TOKEN_BUDGET,
    ),
    "wall time": (
        "The Eiffel Tower was completed in 1889 [2].",
        {"budgets": Budgets(max_wall_time_s=1e-9)},
        StopReason.WALL_TIME,
    ),
    "no valid citation after a supported sentence": (
        " Paris is big [1]. Rome is old [1].",
        {
            "scorer": _table(table_scorer(lambda c, i: c.rstrip(".") == "Paris is big")),
            "budgets": Budgets(sentence_retries=0),
        },
        StopReason.NO_VALID_CITATION,
    ),
    "only a grounded copy": (
        "Bananas are blue and grow on Mars [1].",
        {},
        StopReason.FALLBACK,
    ),
    "abstention": (
        "Bananas are blue [1].",
        {
            "scorer": _table(table_scorer(lambda c, i: False)),
            "policy": Policy(fallback="abstain"),
        },
        StopReason.NO_SUPPORTED_ANSWER,
    ),
}


def _citeformer(script: str, options: dict[str, object]) -> Citeformer:
    return Citeformer(MockBackend([script]), **options)  # type: ignore[arg-type]


def _stream(script: str, options: dict[str, object]) -> list[Event]:
    return list(_citeformer(script, options).stream(QUESTION, SOURCES))


def _check_stream_is_the_answer(events: Sequence[Event], answer: Answer) -> None:
    assert isinstance(events[0], Started)
    assert not any(isinstance(e, Started) for e in events[1:])
    assert isinstance(events[-1], Done)
    assert not any(isinstance(e, Done) for e in events[:-1])
    assert events[-1].answer == answer
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == answer.text
    streamed = [e.citation for e in events if isinstance(e, CitationAccepted)]
    assert streamed == list(answer.citations)
    for citation in answer.citations:
        assert answer.text[citation.start : citation.end] == f"[{citation.source_index}]"
    rejections = [e.char_offset for e in events if isinstance(e, CitationRejected)]
    traced = [e.char_offset for e in answer.trace.entries if e.kind == "rejection"]
    assert rejections == traced


@pytest.mark.parametrize("case", CASES)
def test_stream_generate_and_async_give_one_answer(case: str) -> None:
    script, options, stop = CASES[case]
    events = _stream(script, options)
    answer = _citeformer(script, options).generate(QUESTION, SOURCES)
    assert answer.stop_reason is stop
    _check_stream_is_the_answer(events, answer)

    async def both() -> tuple[list[Event], Answer]:
        streamed = [e async for e in _citeformer(script, options).astream(QUESTION, SOURCES)]
        return streamed, await _citeformer(script, options).agenerate(QUESTION, SOURCES)

    async_events, async_answer = anyio.run(both)
    assert async_answer == answer
    _check_stream_is_the_answer(async_events, answer)


def test_the_cases_cover_every_stop_reason_but_a_dead_end() -> None:
    covered = {stop for _, _, stop in CASES.values()}
    assert covered | {StopReason.DEAD_END} == set(StopReason)


def test_the_issue_example_has_the_same_offsets_in_stream_and_answer() -> None:
    script, options, _ = CASES["whitespace around the answer"]
    answer = _citeformer(script, options).generate(QUESTION, SOURCES)
    assert answer.text == script.strip()
    assert [(c.start, c.end) for c in answer.citations] == [(39, 42), (66, 69)]
    assert [c.reference_number for c in answer.citations] == [1, 1]


def test_rejection_offsets_point_at_the_marker_in_the_answer() -> None:
    script, options, _ = CASES["a rejection rolled back"]
    answer = _citeformer(script, options).generate(QUESTION, SOURCES)
    rejected = [e for e in answer.trace.entries if e.kind == "rejection"]
    assert rejected
    for entry in rejected:
        assert answer.text[entry.char_offset] == "["


# ------------------------------------------------------------------ the builder alone


class EventBackend(Backend):
    """A backend that yields exactly the events it is given (any engine's output)."""

    def __init__(self, events: Sequence[Event]) -> None:
        self.events = list(events)

    def stream(self, request: GenerationRequest) -> Iterator[Event]:
        yield from self.events


def _done(stop: StopReason = StopReason.END, entries: tuple[TraceEntry, ...] = ()) -> Done:
    return Done(usage=Usage(), trace=Trace(stop_reason=stop, entries=entries))


def _cite(start: int, index: int = 2, **extra: object) -> CitationAccepted:
    citation = Citation(
        start=start,
        end=start + 3,
        source_index=index,
        source_id=str(index),
        sentence_start=0,
        **extra,  # type: ignore[arg-type]
    )
    return CitationAccepted(citation=citation)


def test_a_dead_end_from_any_backend_is_built_like_every_other_stop() -> None:
    entry = TraceEntry(kind="fallback", token_position=3, char_offset=9, reason="dead end")
    events = [
        TextDelta(text="\n "),
        TextDelta(text=" It is tall [2]."),
        _cite(14),
        TextDelta(text="  "),
        _done(StopReason.DEAD_END, (entry,)),
    ]
    cf = Citeformer(EventBackend(events))
    answer = cf.generate(QUESTION, SOURCES)
    assert answer.text == "It is tall [2]."
    assert answer.stop_reason is StopReason.DEAD_END
    assert answer.citations[0].start == 11
    assert answer.trace.entries[0].char_offset == 6
    _check_stream_is_the_answer(list(cf.stream(QUESTION, SOURCES)), answer)


def test_a_citation_may_come_just_before_the_text_that_holds_it() -> None:
    # What the decoder sends: the citation first, so a client knows its reference number
    # when the marker's text arrives; the builder checks it against that text.
    builder = AnswerBuilder(SOURCES)
    shown = [builder.feed(_cite(11)), builder.feed(TextDelta(text="It is tall [2]."))]
    assert shown[0] == []
    assert [type(e).__name__ for e in shown[1]] == ["CitationAccepted", "TextDelta"]
    assert shown[1][0].citation.reference_number == 1
    builder.feed(_done())
    assert builder.answer.citations[0].start == 11


def test_held_whitespace_is_released_when_more_text_follows() -> None:
    builder = AnswerBuilder(SOURCES)
    shown = []
    for event in [TextDelta(text="A [1]. "), TextDelta(text="\n"), TextDelta(text="B [1].")]:
        shown += [e.text for e in builder.feed(event) if isinstance(e, TextDelta)]
    assert shown == ["A [1].", " \nB [1]."]


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([TextDelta(text="hi")], "without a Done"),
        ([TextDelta(text="It is tall [7]."), _cite(11, 7)], "there are 3 sources"),
        ([TextDelta(text="It is tall [2]."), _cite(3)], "where the text has"),
        ([TextDelta(text="It is"), _cite(6)], "ended after 5 characters"),
        ([_done(), TextDelta(text="late")], "after Done"),
        (
            [
                TextDelta(text="It is tall [2]."),
                _cite(11, evidence=Evidence(source_index=2, start=0, end=5, text="wrong")),
            ],
            "evidence",
        ),
    ],
)
def test_a_backend_breaking_the_event_contract_gets_a_backend_error(
    events: list[Event], message: str
) -> None:
    with pytest.raises(BackendError, match=message):
        collect(iter([*events, _done()]) if message != "without a Done" else iter(events), SOURCES)


# ------------------------------------------------------------------ evidence


def test_every_accepted_citation_carries_its_evidence_and_claim() -> None:
    script = "The Eiffel Tower was completed in 1889 [2]. It is 330 metres tall [2]."
    answer = Citeformer(MockBackend([script])).generate(QUESTION, SOURCES)
    assert answer.text == script
    first, second = answer.citations
    for citation in answer.citations:
        evidence = citation.evidence
        assert evidence is not None
        assert evidence.source_index == 2
        assert SOURCES[1].text[evidence.start : evidence.end] == evidence.text
    assert first.evidence is not None
    assert "completed in 1889" in first.evidence.text
    assert second.evidence is not None
    assert "330 metres" in second.evidence.text
    assert first.claim == "The Eiffel Tower was completed in 1889"
    assert second.claim == "It is 330 metres tall"
    assert answer.text[second.sentence_start :].startswith(second.claim)


def test_no_scorer_means_no_evidence() -> None:
    script = "The Eiffel Tower was completed in 1889 [2]."
    answer = Citeformer(MockBackend([script]), scorer=None).generate(QUESTION, SOURCES)
    assert answer.citations[0].evidence is None


def test_render_markdown_footnotes_text_and_json() -> None:
    script = "The Great Wall of China is very long [3]. The Eiffel Tower was completed in 1889 [2]."
    answer = Citeformer(MockBackend([script])).generate(QUESTION, SOURCES)
    markdown = render(answer)
    body, notes = markdown.split("\n\n", 1)
    assert body == "The Great Wall of China is very long [^1]. " + (
        "The Eiffel Tower was completed in 1889 [^2]."
    )
    assert notes.splitlines()[0] == (
        '[^1]: **Great Wall** (id wall) "The Great Wall of China is very long."'
    )
    assert notes.splitlines()[1].startswith(
        "[^2]: **Eiffel Tower** (id eiffel) <https://example.org/eiffel> "
    )
    assert "The Eiffel Tower was completed in 1889." in notes
    by_position = render(answer, renumber=False)
    assert "[^3]. The Eiffel" in by_position
    assert by_position.index("\n[^2]: ") < by_position.index("\n[^3]: ")
    text = render(answer, "text", quotes=False)
    assert text.splitlines()[-2:] == [
        "[1] Great Wall (id wall)",
        "[2] Eiffel Tower (id eiffel) <https://example.org/eiffel>",
    ]
    assert text.startswith("The Great Wall of China is very long [1].")
    payload = json.loads(render(answer, "json"))
    assert Answer.model_validate(payload) == answer
    with pytest.raises(ConfigurationError, match="style must be"):
        render(answer, "html")  # type: ignore[arg-type]


# ------------------------------------------------------------------ requests and overrides


def test_a_hand_built_request_gives_the_same_answer_as_generate() -> None:
    script = " The Eiffel Tower was completed in 1889 [1]. It is 330 metres tall [2]."
    cf = Citeformer(MockBackend([script, script, script]))
    request = cf.build_request(QUESTION, SOURCES)
    by_hand = GenerationRequest(
        messages=request.messages,
        sources=request.sources,
        policy=request.policy,
        grammar=request.grammar,
        validator=request.validator,
        budgets=request.budgets,
        decoding=request.decoding,
        segments=request.segments,
    )
    assert cf.run(by_hand) == cf.generate(QUESTION, SOURCES) == cf.run(request)
    with pytest.raises(ConfigurationError, match=r"pass it to Citeformer\.run\(request\)"):
        cf.generate(request, SOURCES)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="run takes a GenerationRequest, got str"):
        cf.run(QUESTION)  # type: ignore[arg-type]


def test_the_request_separates_the_task_from_each_mechanisms_options() -> None:
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, top_k=5, seed=3)
    cf = Citeformer(MockBackend([]), sampling=sampling)
    request = cf.build_request(QUESTION, SOURCES)
    assert request.decoding == DecodingOptions(sampling=sampling)
    assert request.segments == SegmentOptions(temperature=0.7, top_p=0.9, seed=3)
    assert request.source_ids == ("louvre", "eiffel", "wall")
    assert request.n_sources == 3
    fields = {f.name for f in dataclasses.fields(GenerationRequest)}
    assert fields == {
        "messages",
        "sources",
        "policy",
        "grammar",
        "validator",
        "budgets",
        "decoding",
        "segments",
        "question",
    }
    assert request.question == QUESTION
    with pytest.raises(ConfigurationError, match="built for 3 sources"):
        dataclasses.replace(request, sources=SOURCES[:2])
    with pytest.raises(ConfigurationError, match="top_p"):
        SegmentOptions(top_p=0.0)


def test_per_call_overrides_apply_to_that_call_only() -> None:
    script = "The Eiffel Tower was completed in 1889 [2]. It is 330 metres tall [2]."
    backend = MockBackend([script, script, script])
    cf = Citeformer(backend)
    short = cf.generate(QUESTION, SOURCES, budgets=Budgets(max_new_tokens=52))
    assert short.stop_reason is StopReason.MAX_NEW_TOKENS
    auto = cf.generate(
        QUESTION, SOURCES, policy=Policy(mode=CitationMode.AUTO), sampling=SamplingConfig(seed=9)
    )
    assert auto.stop_reason is StopReason.END
    assert backend.requests[1].policy.mode is CitationMode.AUTO
    assert backend.requests[1].decoding.sampling.seed == 9
    plain = cf.generate(QUESTION, SOURCES)
    assert plain.text == script
    assert backend.requests[2].policy == Policy()
    assert backend.requests[2].budgets == Budgets()
    with pytest.raises(ConfigurationError, match="policy must be a Policy"):
        cf.build_request(QUESTION, SOURCES, policy="strict")  # type: ignore[arg-type]


def test_close_frees_only_the_backend_it_loaded() -> None:
    closed: list[str] = []

    class Closing(MockBackend):
        def close(self) -> None:
            closed.append("closed")

    with Citeformer(Closing([])) as cf:
        assert cf.backend is not None
    assert closed == []  # a backend passed in belongs to the caller
    owned = Citeformer()
    owned._backend = Closing([])  # as if the embedded model had been loaded
    owned.close()
    owned.close()
    assert closed == ["closed"]
    with pytest.raises(BackendClosedError, match="create a new Citeformer"):
        owned.generate(QUESTION, SOURCES)


# ------------------------------------------------------------------ sources


class LangChainDocument:
    """The shape of ``langchain_core.documents.Document``."""

    def __init__(
        self, page_content: str, metadata: dict[str, object], doc_id: str | None = None
    ) -> None:
        self.page_content, self.metadata, self.id = page_content, metadata, doc_id


class TextNode:
    """The shape of ``llama_index.core.schema.TextNode``."""

    def __init__(self, text: str, metadata: dict[str, object], node_id: str) -> None:
        self.text, self.metadata, self.node_id = text, metadata, node_id


class NodeWithScore:
    def __init__(self, node: TextNode, score: float | None) -> None:
        self.node, self.score = node, score


def test_sources_from_langchain_documents_keep_any_json_metadata() -> None:
    doc = LangChainDocument(
        "The Eiffel Tower was completed in 1889.",
        {
            "source": "https://example.org/eiffel",
            "title": "Eiffel Tower",
            "page": 3,
            "relevance_score": 0.82,
            "tags": ["paris", "tower"],
            "draft": False,
            "extra": None,
        },
        doc_id="doc-7",
    )
    source = Source.from_langchain(doc)
    assert source.text == doc.page_content
    assert (source.id, source.title, source.url, source.score) == (
        "doc-7",
        "Eiffel Tower",
        "https://example.org/eiffel",
        0.82,
    )
    assert source.metadata == doc.metadata
    paired = Source.from_langchain((LangChainDocument("Text.", {"source": "a.pdf"}), 0.5))
    assert (paired.id, paired.url, paired.score) == (None, None, 0.5)
    answer = Citeformer(MockBackend(["The Eiffel Tower was completed in 1889 [1]."])).generate(
        QUESTION, [source]
    )
    reference = answer.references[0]
    assert (reference.score, reference.metadata["page"]) == (0.82, 3)


def test_sources_from_llamaindex_nodes() -> None:
    node = TextNode("It is 330 metres tall.", {"file_name": "eiffel.txt", "url": "u"}, "n-1")
    source = Source.from_llamaindex(NodeWithScore(node, 0.4))
    assert (source.text, source.id, source.title, source.url, source.score) == (
        "It is 330 metres tall.",
        "n-1",
        "eiffel.txt",
        "u",
        0.4,
    )
    assert Source.from_llamaindex(node).score is None


def test_sources_from_retrievers_with_bad_input_get_typed_errors() -> None:
    import datetime

    with pytest.raises(InvalidSourcesError, match=r"'when'.*ISO string"):
        Source.from_langchain(LangChainDocument("Text.", {"when": datetime.date(2020, 1, 1)}))
    with pytest.raises(InvalidSourcesError, match="page_content"):
        Source.from_langchain(object())
    with pytest.raises(InvalidSourcesError, match="has no text"):
        Source.from_llamaindex(object())


def test_generate_many_answers_each_like_generate_in_order() -> None:
    first = "The Eiffel Tower was completed in 1889 [2]."
    second = "It is 330 metres tall [2]."
    one_by_one = [
        Citeformer(MockBackend([script])).generate(QUESTION, SOURCES) for script in (first, second)
    ]
    cf = Citeformer(MockBackend([first, second]))
    assert cf.generate_many([(QUESTION, SOURCES), (QUESTION, SOURCES)]) == one_by_one
    request = cf.build_request(QUESTION, SOURCES)
    many = Citeformer(MockBackend([first, second]))
    answers = anyio.run(lambda: many.agenerate_many([request, request], concurrency=1))
    assert answers == one_by_one
    with pytest.raises(ConfigurationError, match="concurrency"):
        anyio.run(lambda: many.agenerate_many([request], concurrency=0))
    with pytest.raises(InvalidSourcesError):
        cf.generate_many([(QUESTION, SOURCES), (QUESTION, [])])
