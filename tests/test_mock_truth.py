"""Test doubles that tell the truth (issue 22, part 2).

A scripted model (MockBackend, FunctionBackend, MockSegmentBackend) wants to write its
script; the grammar and the decoder decide what is written. Every place the answer leaves
the script is reported (a ScriptDeparture event and a "departure" trace entry; an id that
does not exist also a CitationRejected with reason out_of_range), the model follows its
script from where the answer can rejoin it (not from a byte offset that no longer
matches), strict mode raises at the first departure with the script and a caret, and no
trace says "unsupported" with a score that supports.
"""

from __future__ import annotations

import json

import anyio
import pytest
from pydantic import TypeAdapter

from citebacktrack import (
    Answer,
    CitationAccepted,
    CitationRejected,
    CitebacktrackError,
    Citeformer,
    ConfigurationError,
    Done,
    Event,
    FunctionBackend,
    MockBackend,
    MockExhaustedError,
    MockSegmentBackend,
    Policy,
    RejectionReason,
    ScriptDepartureError,
    SentenceOrigin,
    Source,
    StopReason,
    TextDelta,
)
from citebacktrack.answer import collect
from citebacktrack.backends.local import decode
from citebacktrack.decoding.operators import Repetition
from citebacktrack.sse import sse_frame
from citebacktrack.testing import ScriptedRuntime, index_for, toy_vocabulary
from citebacktrack.types import DepartureKind, ScriptDeparture

FILLER = [
    "Bananas are rich in potassium.",
    "The Nile is a river in Africa.",
    "Chess is a board game for two players.",
    "Copper conducts electricity well.",
    "Tokyo is the capital of Japan.",
    "Owls hunt mostly at night.",
    "Basalt is a volcanic rock.",
]
SOURCES = [
    Source(title="Moon orbit", text="The Moon orbits the Earth every 27 days."),
    Source(title="Apollo 11", text="Apollo 11 landed on the Moon in 1969."),
    Source(title="Armstrong", text="Neil Armstrong walked on the Moon in 1969."),
    *(Source(text=text) for text in FILLER),
]  # ten sources
QUESTION = "What do we know about the Moon?"
ORBIT = "The Moon orbits the Earth every 27 days"

BOTH = pytest.mark.parametrize(
    "backend", [MockBackend, MockSegmentBackend], ids=["token-level", "segment-level"]
)


def run(backend: type[MockBackend], script: str, **options: object) -> tuple[Answer, list[Event]]:
    events = list(Citeformer(backend([script]), **options).stream(QUESTION, SOURCES))
    last = events[-1]
    assert isinstance(last, Done)
    assert last.answer is not None
    return last.answer, events


def departures(events: list[Event]) -> list[ScriptDeparture]:
    return [e for e in events if isinstance(e, ScriptDeparture)]


def traced(answer: Answer) -> list[tuple[str, int | None]]:
    return [(e.reason, e.source_index) for e in answer.trace.entries if e.kind == "departure"]


# --------------------------------------------------------------- an id out of range


@BOTH
def test_a_citation_of_a_missing_source_is_rejected_out_of_range(
    backend: type[MockBackend],
) -> None:
    """Was: ``[42]`` of ten sources came out as another id with no trace of the attempt."""
    answer, events = run(backend, f"{ORBIT} [42].")
    rejected = [(e.source_index, e.reason) for e in events if isinstance(e, CitationRejected)]
    assert (42, RejectionReason.OUT_OF_RANGE) in rejected
    (departure,) = departures(events)
    assert departure.kind is DepartureKind.OUT_OF_RANGE
    assert (departure.source_index, departure.wanted) == (42, "[42]")
    assert departure.script_offset == len(ORBIT) + 1
    assert departure.char_offset == len(ORBIT) + 1
    assert "there are 10 sources" in departure.detail
    entries = answer.trace.entries
    assert any(
        e.kind == "rejection" and e.reason == "out_of_range" and e.source_index == 42
        for e in entries
    )
    assert traced(answer) == [("out_of_range", 42)]
    # The count agrees with the events, and the rest of the script is still written.
    assert answer.trace.rejections == len(rejected)
    assert answer.text == f"{ORBIT} [1]."
    assert answer.stop_reason is StopReason.END


@BOTH
def test_the_script_goes_on_where_the_answer_rejoins_it(backend: type[MockBackend]) -> None:
    """Was: after ``[42]`` became a shorter marker the model followed its script one byte
    off, and the next sentence came out mangled."""
    answer, events = run(backend, f"Apollo 11 landed on the Moon in 1969 [42]. {ORBIT} [1].")
    assert answer.text == f"Apollo 11 landed on the Moon in 1969 [2]. {ORBIT} [1]."
    assert [d.kind for d in departures(events)] == [DepartureKind.OUT_OF_RANGE]


# ------------------------------------------------------- text the grammar cannot take


@BOTH
def test_a_marker_the_grammar_cannot_take_is_reported_not_mangled(
    backend: type[MockBackend],
) -> None:
    """Was: ``[5, 6]`` came out as ``[5] 6[8]`` with nothing reported."""
    answer, events = run(backend, "Apollo 11 landed on the Moon in 1969 [2, 3].")
    assert answer.text == "Apollo 11 landed on the Moon in 1969 [2]."
    (departure,) = departures(events)
    assert departure.kind is DepartureKind.GRAMMAR
    assert (departure.wanted, departure.written) == ("[2, 3]", "[2]")
    assert "the grammar allowed ']'" in departure.detail
    assert traced(answer) == [("grammar", None)]


# ------------------------------------------------------------- a forced marker


@BOTH
def test_a_citation_the_policy_forced_is_reported(backend: type[MockBackend]) -> None:
    """Was: a script with no marker came out cited, with no word of it."""
    answer, events = run(backend, f"{ORBIT}.")
    assert [c.source_index for c in answer.citations] == [1]
    (departure,) = departures(events)
    assert departure.kind is DepartureKind.FORCED_MARKER
    assert departure.written == "[1]"
    assert departure.script_offset == len(ORBIT) + 1
    assert "not the end of the answer" in departure.detail
    assert not any(isinstance(e, CitationRejected) for e in events)


def test_no_departure_under_auto_where_the_script_cites_nothing() -> None:
    answer, events = run(MockBackend, f"{ORBIT}.", policy=Policy(mode="auto"))
    assert answer.text == f"{ORBIT}."
    assert departures(events) == []


# ---------------------------------------------------------------- a refused id


def test_a_refused_id_is_a_departure_reported_once() -> None:
    """``[2]`` and ``[3]`` add nothing to ``[1]``: each is refused, however often the
    decoder retried there, and reported once."""
    answer, events = run(MockBackend, f"{ORBIT} [1][2][3].")
    assert answer.text == f"{ORBIT} [1]."
    assert traced(answer) == [("refused_id", 2), ("refused_id", 3)]
    assert all(d.written == "" for d in departures(events))


def test_a_segment_loop_that_ends_the_answer_reports_the_markers_it_left_out() -> None:
    answer, _ = run(MockSegmentBackend, f"{ORBIT} [1][2][3].")
    assert answer.text == f"{ORBIT} [1]."
    assert traced(answer) == [("refused_id", 2), ("refused_id", 3)]


# --------------------------------------------------------------- dropped sentences


@BOTH
def test_a_dropped_sentence_ends_with_no_valid_citation(backend: type[MockBackend]) -> None:
    """Was: the scripted model stopped when its sentence was to be regenerated, and the
    answer ended ``end`` as if the model had finished."""
    script = f"{ORBIT} [1]. Cheese is made from milk [2]."
    answer, events = run(backend, script, policy=Policy(fallback="quote"))
    assert answer.text == f"{ORBIT} [1]."
    assert answer.stop_reason is StopReason.NO_VALID_CITATION
    assert any("no valid citation" in e.detail for e in answer.trace.entries)
    unwritten = departures(events)[-1]
    assert unwritten.kind is DepartureKind.UNWRITTEN
    assert unwritten.wanted == "Cheese is made from milk [2]."
    assert unwritten.script_offset == script.index("Cheese")
    assert "no_valid_citation" in unwritten.detail


@BOTH
def test_a_dropped_sentence_is_replaced_by_a_grounded_copy_that_says_so(
    backend: type[MockBackend],
) -> None:
    answer, events = run(backend, f"{ORBIT} [1]. Cheese is made from milk [2].")
    assert answer.text.startswith(f"{ORBIT} [1]. ")
    assert [c.origin for c in answer.citations] == [SentenceOrigin.MODEL, SentenceOrigin.COPY]
    assert any("grounded copy" in e.detail for e in answer.trace.entries)
    assert departures(events)[-1].kind is DepartureKind.UNWRITTEN


def test_a_repeated_sentence_leaves_the_rest_of_the_script_unwritten() -> None:
    answer, events = run(MockBackend, f"{ORBIT} [1]. {ORBIT} [1].")
    assert answer.text == f"{ORBIT} [1]."
    assert any("repeated sentence" in e.detail for e in answer.trace.entries)
    assert [d.kind for d in departures(events)] == [DepartureKind.UNWRITTEN]


def test_an_operator_ban_skips_what_the_model_may_not_repeat() -> None:
    script = "Zzzzzzzz is a word [1]."
    answer, events = run(MockBackend, script, operators=[Repetition(2)], scorer=None)
    assert "zzz" not in answer.text
    assert answer.stop_reason is StopReason.END
    (departure,) = departures(events)
    assert (departure.kind, departure.wanted) == (DepartureKind.REFUSED_TEXT, "zzzzzzz ")


# ------------------------------------------------ trace details agree with their verdict


@BOTH
def test_no_rejection_says_unsupported_with_a_supporting_score(
    backend: type[MockBackend],
) -> None:
    """Was: an extra marker after a supported sentence was rejected as "unsupported" with
    score 1.0 ("[1] is already cited in this sentence"), the score of an id the sentence
    had cited already."""
    answer, events = run(backend, f"{ORBIT} [1][2][3].")
    rejections = [e for e in answer.trace.entries if e.kind == "rejection"]
    assert rejections
    for entry in rejections:
        if entry.reason == RejectionReason.UNSUPPORTED.value:
            assert entry.score is None or entry.score < 0.6, entry
        assert "is already cited" not in entry.detail, entry
    assert {e.reason for e in events if isinstance(e, CitationRejected)} == {
        RejectionReason.REDUNDANT
    }


# ----------------------------------------------------------------------- strict mode


@BOTH
def test_strict_mode_shows_where_the_script_breaks_the_grammar(
    backend: type[MockBackend],
) -> None:
    script = "Apollo 11 landed on the Moon in 1969 [2, 3]."
    cf = Citeformer(backend([script], strict=True))
    with pytest.raises(ScriptDepartureError) as caught:
        cf.generate(QUESTION, SOURCES)
    error = caught.value
    assert isinstance(error, CitebacktrackError)
    assert (error.offset, error.kind, error.script) == (script.index(","), "grammar", script)
    lines = str(error).splitlines()
    assert lines[0] == f"the answer left the script at offset {error.offset} (grammar):"
    assert lines[1] == f"  {script}"
    assert lines[2] == "  " + " " * error.offset + "^"
    assert "the script has '[2, 3]'" in lines[3]
    assert "the grammar allowed ']'" in lines[3]


@BOTH
def test_strict_mode_raises_for_a_missing_source_and_passes_a_script_kept(
    backend: type[MockBackend],
) -> None:
    strict = Citeformer(backend([f"{ORBIT} [42].", f"{ORBIT} [1]."], strict=True))
    with pytest.raises(ScriptDepartureError, match=r"cites \[42\], but there are 10 sources"):
        strict.generate(QUESTION, SOURCES)
    assert strict.generate(QUESTION, SOURCES).text == f"{ORBIT} [1]."


def test_strict_mode_names_the_rejection_that_made_the_answer_leave() -> None:
    cf = Citeformer(MockBackend([f"{ORBIT} [1]. Cheese is made from milk [2]."], strict=True))
    with pytest.raises(ScriptDepartureError, match=r"after \[\d+\] was rejected: unsupported"):
        cf.generate(QUESTION, SOURCES)


def test_strict_mode_raises_at_the_end_for_a_script_left_unwritten() -> None:
    cf = Citeformer(MockBackend([f"{ORBIT} [1]. {ORBIT} [1]."], strict=True))
    with pytest.raises(ScriptDepartureError, match="unwritten"):
        cf.generate(QUESTION, SOURCES)


def test_a_function_backend_is_strict_too() -> None:
    backend = FunctionBackend(lambda request: f"{ORBIT} [{request.n_sources + 1}].", strict=True)
    with pytest.raises(ScriptDepartureError, match="out_of_range"):
        Citeformer(backend).generate(QUESTION, SOURCES)


# ------------------------------------------------------------- events and the wire


def test_departures_stream_in_order_and_serialize() -> None:
    answer, events = run(MockBackend, f"Apollo 11 landed on the Moon in 1969 [42]. {ORBIT} [1].")
    kinds = [type(e).__name__ for e in events]
    # The departure is reported before the text holding its place is released.
    assert kinds.index("ScriptDeparture") < kinds.index("TextDelta")
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == answer.text
    (departure,) = departures(events)
    adapter: TypeAdapter[Event] = TypeAdapter(Event)
    assert adapter.validate_json(departure.model_dump_json()) == departure
    frame = sse_frame(departure)
    assert frame.startswith("event: script_departure\ndata: ")
    assert json.loads(frame.split("data: ", 1)[1])["kind"] == "out_of_range"
    done = events[-1]
    assert isinstance(done, Done)
    assert adapter.validate_json(done.model_dump_json()) == done


def test_a_backend_stream_carries_departures_before_done() -> None:
    backend = MockBackend([f"{ORBIT} [42]."] * 2)
    request = Citeformer(backend).build_request(QUESTION, SOURCES)
    events = list(backend.stream(request))
    assert isinstance(events[-1], Done)
    assert events[-1].answer is None
    assert [type(e) for e in events if isinstance(e, ScriptDeparture | CitationAccepted)] == [
        ScriptDeparture,
        CitationAccepted,
    ]
    assert backend.generate(request).trace.rejections == events[-1].trace.rejections


def test_a_scripted_runtime_lists_its_departures() -> None:
    vocabulary = toy_vocabulary()
    runtime = ScriptedRuntime(f"{ORBIT} [42].", vocabulary, n_sources=10)
    request = Citeformer(MockBackend([])).build_request(QUESTION, SOURCES)
    answer = collect(decode(runtime, index_for(vocabulary), request, [0]), request.sources)
    assert answer.text == f"{ORBIT} [1]."
    assert [(d.kind, d.source_index) for d in runtime.departures] == [
        (DepartureKind.OUT_OF_RANGE, 42)
    ]


# ---------------------------------------------------------------- MockSegmentBackend


def test_mock_segment_backend_answers_through_the_segment_loop() -> None:
    backend = MockSegmentBackend([f"{ORBIT} [1].", "Apollo 11 landed on the Moon in 1969 [2]."])
    cf = Citeformer(backend)
    assert cf.generate(QUESTION, SOURCES).text == f"{ORBIT} [1]."

    async def second() -> Answer:
        return await cf.agenerate(QUESTION, SOURCES)

    assert anyio.run(second).text == "Apollo 11 landed on the Moon in 1969 [2]."
    assert len(backend.engines) == len(backend.requests) == 2
    assert backend.engines[0].calls[0].prefix == ""
    with pytest.raises(MockExhaustedError, match="MockSegmentBackend was called 3 times"):
        cf.generate(QUESTION, SOURCES)


def test_mock_segment_backend_refuses_operators() -> None:
    cf = Citeformer(MockSegmentBackend([f"{ORBIT} [1]."]), operators=[Repetition(2)])
    with pytest.raises(ConfigurationError, match="token-level backend"):
        cf.generate(QUESTION, SOURCES)
