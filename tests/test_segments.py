"""Segment-level backtracking: the loop over a scripted engine that decodes under each
call's grammar, like a server restarting its grammar at the continuation point."""

from __future__ import annotations

import anyio
import pytest

from citebacktrack import (
    Answer,
    Budgets,
    CitationAccepted,
    CitationRejected,
    Citeformer,
    ConfigurationError,
    Done,
    Event,
    Policy,
    Source,
    StopReason,
    TextDelta,
)
from citebacktrack.backends.segment import SegmentBackend
from citebacktrack.decoding.operators import Repetition
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.testing import ScriptedSegmentEngine
from helpers import table_scorer

SOURCES = [
    Source(id="louvre", title="Louvre", text="The Louvre is an art museum in Paris."),
    Source(
        id="eiffel",
        title="Eiffel Tower",
        text="The Eiffel Tower was completed in 1889. It is 330 metres tall.",
    ),
    Source(id="wall", title="Great Wall", text="The Great Wall of China is very long."),
]
QUESTION = "When was the Eiffel Tower completed, and how tall is it?"
GOOD = "The Eiffel Tower was completed in 1889 [2]. It is 330 metres tall [2]."


def _cf(script: str, **options: object) -> tuple[Citeformer, ScriptedSegmentEngine]:
    engine = ScriptedSegmentEngine(script)
    return Citeformer(SegmentBackend(engine), **options), engine  # type: ignore[arg-type]


def test_a_supported_answer_takes_one_call_per_marker_and_keeps_the_text() -> None:
    cf, engine = _cf(GOOD)
    answer = cf.generate(QUESTION, SOURCES)
    assert answer.text == GOOD
    assert [c.source_index for c in answer.citations] == [2, 2]
    assert answer.stop_reason is StopReason.END
    prefixes = [call.prefix for call in engine.calls]
    assert prefixes == ["", "The Eiffel Tower was completed in 1889 [2]", GOOD[:-1]]
    assert engine.calls[0].grammar == citation_grammar(3, Policy(), bounded=True)
    assert all(call.stop == ("]",) for call in engine.calls)
    assert answer.usage.forward_passes == len(engine.calls)
    evidence = answer.citations[0].evidence
    assert evidence is not None
    assert "1889" in evidence.text


def test_a_rejected_id_is_resubmitted_with_only_supported_ids_allowed() -> None:
    script = "The Eiffel Tower was completed in 1889 [1]. It is 330 metres tall [3]."
    cf, engine = _cf(script)
    events = list(cf.stream(QUESTION, SOURCES))
    answer = events[-1].answer  # type: ignore[union-attr]
    assert isinstance(answer, Answer)
    assert answer.text == GOOD
    rejected = [e.source_index for e in events if isinstance(e, CitationRejected)]
    assert rejected == [1, 3]
    resubmitted = [c.prefix for c in engine.calls if c.prefix.endswith("[")]
    assert resubmitted == [
        "The Eiffel Tower was completed in 1889 [",
        "The Eiffel Tower was completed in 1889 [2]. It is 330 metres tall [",
    ]
    assert answer.trace.rejections == 2
    assert answer.trace.backtracks == 2


def _events(cf: Citeformer) -> list[Event]:
    return list(cf.stream(QUESTION, SOURCES))


@pytest.mark.parametrize(
    "script",
    [GOOD, "  The Eiffel Tower was completed in 1889 [3]. It is 330 metres tall [1].  "],
)
def test_stream_equals_generate_and_async_equals_sync(script: str) -> None:
    sync = _cf(script)[0].generate(QUESTION, SOURCES)
    events = _events(_cf(script)[0])
    assert isinstance(events[-1], Done)
    assert events[-1].answer == sync
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == sync.text
    assert [e.citation for e in events if isinstance(e, CitationAccepted)] == list(sync.citations)

    async def both() -> tuple[list[Event], Answer]:
        cf = _cf(script)[0]
        streamed = [e async for e in cf.astream(QUESTION, SOURCES)]
        return streamed, await _cf(script)[0].agenerate(QUESTION, SOURCES)

    streamed, async_answer = anyio.run(both)
    assert async_answer == sync
    assert streamed[-1] == events[-1]


def test_text_is_released_a_sentence_at_a_time() -> None:
    events = _events(_cf(GOOD)[0])
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert deltas == ["The Eiffel Tower was completed in 1889 [2].", " It is 330 metres tall [2]."]


def test_nothing_supported_quotes_the_best_source_or_abstains() -> None:
    script = "Gustave built it in 1889 [1]."
    never = table_scorer(lambda claim, i: False)
    quoted = _cf(script, scorer=lambda sources: never)[0].generate(QUESTION, SOURCES)
    assert quoted.stop_reason is StopReason.NO_SUPPORTED_ANSWER  # the table scores 0.1 all
    strict = _cf(script, policy=Policy(fallback="abstain"))[0].generate(QUESTION, SOURCES)
    assert strict.text == ""
    assert strict.stop_reason is StopReason.NO_SUPPORTED_ANSWER
    answer = _cf(script)[0].generate(QUESTION, SOURCES)
    assert answer.stop_reason is StopReason.END
    assert answer.text == "The Eiffel Tower was completed in 1889 [2]."
    assert any("quoted the evidence" in e.detail for e in answer.trace.entries)


def test_an_unsupported_second_sentence_ends_the_answer_after_the_first() -> None:
    script = "The Eiffel Tower was completed in 1889 [2]. Bananas are blue [1]."
    answer = _cf(script)[0].generate(QUESTION, SOURCES)
    assert answer.text == "The Eiffel Tower was completed in 1889 [2]."
    assert answer.stop_reason is StopReason.NO_VALID_CITATION


@pytest.mark.parametrize(
    ("budgets", "stop"),
    [
        (Budgets(max_new_tokens=30), StopReason.MAX_NEW_TOKENS),
        (Budgets(max_backtracks=1), StopReason.BACKTRACK_BUDGET),
        (Budgets(max_rolled_back_tokens=2), StopReason.ROLLED_BACK_TOKEN_BUDGET),
        (Budgets(max_wall_time_s=1e-9), StopReason.WALL_TIME),
    ],
)
def test_every_budget_ends_the_loop_with_its_stop_reason(
    budgets: Budgets, stop: StopReason
) -> None:
    script = "The Eiffel Tower was completed in 1889 [1]. It is 330 metres tall [3]."
    answer = _cf(script, budgets=budgets)[0].generate(QUESTION, SOURCES)
    assert answer.stop_reason is stop
    for citation in answer.citations:
        assert answer.text[citation.start : citation.end] == f"[{citation.source_index}]"


def test_ids_are_always_in_range_and_supported() -> None:
    script = "The Eiffel Tower was completed in 1889 [9]. It is 330 metres tall [7]."
    answer = _cf(script)[0].generate(QUESTION, SOURCES)
    assert all(1 <= c.source_index <= 3 for c in answer.citations)
    assert [c.source_index for c in answer.citations] == [2, 2]


def test_token_level_operators_are_refused() -> None:
    engine = ScriptedSegmentEngine(GOOD)
    cf = Citeformer(SegmentBackend(engine), operators=[Repetition(max_repetitions=3)])
    with pytest.raises(ConfigurationError, match="token-level backend"):
        cf.generate(QUESTION, SOURCES)
    assert engine.calls == []


def test_an_extra_marker_after_a_supported_sentence_is_dropped_and_the_answer_ends() -> None:
    script = "The Eiffel Tower was completed in 1889 [2][1] and it is 330 metres tall [2]."
    answer = _cf(script)[0].generate(QUESTION, SOURCES)
    assert answer.text.startswith("The Eiffel Tower was completed in 1889 [2].")
    assert [c.source_index for c in answer.citations][:1] == [2]
    assert any("could not be placed" in e.detail for e in answer.trace.entries)
    assert answer.text == "The Eiffel Tower was completed in 1889 [2]."
    assert answer.stop_reason is StopReason.END
