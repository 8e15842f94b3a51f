"""Citeformer end to end on the mock backends: input checks, answers, streams, async."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from citebacktrack import (
    Answer,
    CitationAccepted,
    Citeformer,
    ConfigurationError,
    Done,
    Event,
    FunctionBackend,
    InvalidQuestionError,
    InvalidSourcesError,
    MockBackend,
    MockExhaustedError,
    Policy,
    Source,
    TextDelta,
    render,
)
from citebacktrack.answer import collect
from citebacktrack.errors import BackendError, MissingDependencyError
from citebacktrack.grammar.citations import MAX_SOURCES
from citebacktrack.prompts import format_sources
from citebacktrack.render import renumbered_text
from citebacktrack.request import GenerationRequest
from helpers import text_of

SOURCES = [
    Source(
        id="louvre",
        title="Louvre",
        text="The Louvre is the world's most-visited art museum, in Paris.",
    ),
    Source(
        id="eiffel",
        title="Eiffel Tower",
        text="The Eiffel Tower in Paris was built from 1887 to 1889 by Gustave Eiffel's company.",
    ),
    Source(
        id="wall", title="Great Wall", text="The Great Wall of China is 21,196 kilometres long."
    ),
]
QUESTION = "When was the Eiffel Tower built?"


def cf(*responses: str, **kwargs: object) -> Citeformer:
    return Citeformer(MockBackend(list(responses)), **kwargs)  # type: ignore[arg-type]


def test_generate_returns_a_validated_answer_with_references() -> None:
    answer = cf("The Eiffel Tower was built from 1887 to 1889 [2].").generate(QUESTION, SOURCES)
    assert answer.text == "The Eiffel Tower was built from 1887 to 1889 [2]."
    assert [c.source_id for c in answer.citations] == ["eiffel"]
    citation = answer.citations[0]
    assert answer.text[citation.start : citation.end] == "[2]"
    assert citation.support is not None
    assert citation.support > 0.4
    assert [(r.number, r.source_index, r.source_id) for r in answer.references] == [
        (1, 2, "eiffel")
    ]
    assert renumbered_text(answer) == "The Eiffel Tower was built from 1887 to 1889 [1]."
    assert "[1] Eiffel Tower (id eiffel)" in render(answer, "text")


def test_a_distractor_citation_is_replaced_by_the_supporting_source() -> None:
    answer = cf("The Eiffel Tower was built from 1887 to 1889 [1].").generate(QUESTION, SOURCES)
    assert [c.source_index for c in answer.citations] == [2]
    assert answer.trace.rejections == 1
    rejection = next(e for e in answer.trace.entries if e.kind == "rejection")
    assert rejection.source_index == 1
    assert rejection.score is not None
    assert rejection.score < 0.4


def test_references_are_renumbered_in_order_of_first_use() -> None:
    text = "The Great Wall is 21,196 kilometres long [3]. The Eiffel Tower was built from 1887 [2]."
    answer = cf(text).generate(QUESTION, SOURCES)
    assert [(r.number, r.source_id) for r in answer.references] == [(1, "wall"), (2, "eiffel")]
    assert renumbered_text(answer).endswith("from 1887 [2].")
    assert renumbered_text(answer).startswith("The Great Wall is 21,196 kilometres long [1].")


def test_strings_are_accepted_as_sources_and_get_positional_ids() -> None:
    answer = cf("Paris has the Louvre [1].").generate("Museum?", ["The Louvre museum is in Paris."])
    assert answer.citations[0].source_id == "1"


@pytest.mark.parametrize(
    ("question", "sources", "error"),
    [
        ("   ", SOURCES, InvalidQuestionError),
        ("", SOURCES, InvalidQuestionError),
        (QUESTION, [], InvalidSourcesError),
        (QUESTION, [Source(text="  ")], InvalidSourcesError),
        (QUESTION, [Source(id="a", text="x"), Source(id="a", text="y")], InvalidSourcesError),
        (QUESTION, [Source(text="x")] * (MAX_SOURCES + 1), InvalidSourcesError),
        (QUESTION, "a single string", InvalidSourcesError),
        (QUESTION, [42], ConfigurationError),
    ],
)
def test_bad_input_gets_a_typed_error_before_any_generation(question, sources, error) -> None:  # type: ignore[no-untyped-def]
    backend = MockBackend(["unused [1]."])
    with pytest.raises(error) as info:
        Citeformer(backend).stream(question, sources)
    assert str(info.value)
    assert backend.requests == []  # nothing was generated, nothing consumed
    assert backend.responses == ["unused [1]."]


def test_source_text_with_its_own_markers_is_shown_with_parentheses() -> None:
    tricky = Source(title="Paper [draft]", text="As shown in [3], water boils at 100 C [12].")
    shown = format_sources([tricky])
    assert "[3]" not in shown
    assert "(3)" in shown
    assert "Document [1](Title: Paper (draft)):" in shown
    answer = cf("Water boils at 100 C [1].").generate("Boiling point?", [tricky])
    assert [c.source_index for c in answer.citations] == [1]


def test_stream_and_generate_agree() -> None:
    script = "The Eiffel Tower was built from 1887 to 1889 [2]. It is in Paris [2]."
    events = list(cf(script).stream(QUESTION, SOURCES))
    answer = cf(script).generate(QUESTION, SOURCES)
    assert text_of(events) == answer.text
    assert isinstance(events[-1], Done)
    assert [e.citation for e in events if isinstance(e, CitationAccepted)] == list(answer.citations)


def test_async_stream_and_generate_match_sync() -> None:
    script = "The Eiffel Tower was built from 1887 to 1889 [1]."

    async def main() -> tuple[str, Answer]:
        texts = [
            e.text async for e in cf(script).astream(QUESTION, SOURCES) if isinstance(e, TextDelta)
        ]
        return "".join(texts), await cf(script).agenerate(QUESTION, SOURCES)

    streamed, answer = anyio.run(main)
    sync = cf(script).generate(QUESTION, SOURCES)
    assert streamed == answer.text == sync.text
    assert answer.citations == sync.citations


def test_many_concurrent_async_requests_share_one_backend() -> None:
    backend = FunctionBackend(lambda request: "The Eiffel Tower was built from 1887 to 1889 [2].")
    citeformer = Citeformer(backend)

    async def main() -> list[Answer]:
        results: list[Answer] = []

        async def one() -> None:
            results.append(await citeformer.agenerate(QUESTION, SOURCES))

        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(one)
        return results

    answers = anyio.run(main)
    assert len(answers) == 8
    assert {a.text for a in answers} == {"The Eiffel Tower was built from 1887 to 1889 [2]."}


def test_function_backend_with_an_async_function() -> None:
    async def model(request: GenerationRequest) -> str:
        await anyio.sleep(0)
        return f"The tower was built from 1887 to 1889 [{request.n_sources - 1}]."

    backend = FunctionBackend(model)
    answer = anyio.run(Citeformer(backend).agenerate, QUESTION, SOURCES)
    assert answer.text == "The tower was built from 1887 to 1889 [2]."
    with pytest.raises(ConfigurationError, match="agenerate"):
        Citeformer(backend).generate(QUESTION, SOURCES)


def test_function_backend_honours_the_grammar() -> None:
    backend = FunctionBackend(lambda request: "Cite the seventh source [7].")
    answer = Citeformer(backend, scorer=None).generate(QUESTION, SOURCES)
    assert "[7]" not in answer.text
    assert all(1 <= c.source_index <= 3 for c in answer.citations)


def test_mock_backend_runs_out_loudly() -> None:
    citeformer = cf("The tower dates from 1889 [2].")
    citeformer.generate(QUESTION, SOURCES)
    with pytest.raises(MockExhaustedError, match="add more responses"):
        citeformer.generate(QUESTION, SOURCES)
    with pytest.raises(ConfigurationError):
        MockBackend("not a list")  # type: ignore[arg-type]


def test_request_carries_policy_grammar_and_prompt() -> None:
    backend = MockBackend(["The tower dates from 1889 [2]."])
    Citeformer(backend, policy=Policy(max_citations_per_sentence=2)).generate(QUESTION, SOURCES)
    request = backend.requests[0]
    assert request.n_sources == 3
    assert request.policy.max_citations_per_sentence == 2
    assert request.source_ids == ("louvre", "eiffel", "wall")
    prompt = "\n".join(m.content for m in request.messages)
    assert "Document [2](Title: Eiffel Tower)" in prompt
    assert QUESTION in prompt


def test_answer_serialises_to_json(tmp_path: Path) -> None:
    answer = cf("The Eiffel Tower was built from 1887 to 1889 [2].").generate(QUESTION, SOURCES)
    payload = json.loads(answer.model_dump_json())
    assert payload["citations"][0]["source_id"] == "eiffel"
    assert payload["trace"]["stop_reason"] == "end"
    assert Answer.model_validate(payload) == answer


def test_references_carry_the_source_metadata() -> None:
    sources = [s.model_copy(update={"metadata": {"page": str(i)}}) for i, s in enumerate(SOURCES)]
    answer = cf("The Eiffel Tower was built from 1887 to 1889 [2].").generate(QUESTION, sources)
    assert [dict(r.metadata) for r in answer.references] == [{"page": "1"}]


def test_leading_whitespace_is_dropped_and_offsets_follow() -> None:
    text = "  The Eiffel Tower was built from 1887 to 1889 [1]."
    answer = cf(text).generate(QUESTION, SOURCES)
    assert answer.text == text.strip().replace("[1]", "[2]")
    citation = answer.citations[0]
    assert answer.text[citation.start : citation.end] == "[2]"
    rejection = next(e for e in answer.trace.entries if e.kind == "rejection")
    assert answer.text[rejection.char_offset :].startswith("[")


def test_agenerate_uses_the_backends_native_astream() -> None:
    calls: list[str] = []

    class Recording(MockBackend):
        def astream(self, request: GenerationRequest) -> AsyncIterator[Event]:
            calls.append("astream")
            return super().astream(request)

    backend = Recording(["The Eiffel Tower was built from 1887 to 1889 [2]."])
    answer = anyio.run(Citeformer(backend).agenerate, QUESTION, SOURCES)
    assert calls == ["astream"]
    assert [c.source_index for c in answer.citations] == [2]


def test_a_stream_without_done_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match="must yield Done last"):
        collect(iter([TextDelta(text="hi")]), SOURCES)


def test_missing_core_dependency_names_the_module_not_an_extra() -> None:
    error = MissingDependencyError(feature="constrained decoding", extra=None, module="xgrammar")
    assert "pip install xgrammar" in str(error)
    assert "citebacktrack[" not in str(error)
    error = MissingDependencyError(feature="HFBackend", extra="hf", module="torch")
    assert 'pip install "citebacktrack[hf]"' in str(error)
