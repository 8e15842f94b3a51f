"""Stream events a client can use as they come (issue 21): the numbered sources first, each
citation just before the text that holds its marker, the answer once in ``Done``, and SSE
frames that parse back into the same events."""

from __future__ import annotations

import asyncio
import json
import re

from pydantic import TypeAdapter

from citebacktrack import (
    CitationAccepted,
    Citeformer,
    Done,
    Event,
    FunctionBackend,
    MockBackend,
    Source,
    Started,
    TextDelta,
)
from citebacktrack.render import renumbered_text
from citebacktrack.request import GenerationRequest
from citebacktrack.sse import MEDIA_TYPE, sse_frame, sse_frames, sse_stream

SOURCES = [
    Source(title="Louvre", text="The Louvre is the world's most-visited museum, in Paris."),
    Source(
        title="Eiffel Tower",
        text="The Eiffel Tower was completed in 1889. It is 330 metres tall.",
        url="https://example.org/eiffel",
    ),
    Source(id="seine", title="Seine", text="The Seine flows through Paris."),
]
QUESTION = "What is in Paris?"
SCRIPT = (
    "The Eiffel Tower was completed in 1889 [2]. It is 330 metres tall [2]. "
    "The Louvre is the world's most-visited museum, in Paris [1]. "
    "The Seine flows through Paris [3]."
)


def test_the_numbered_sources_come_first_before_the_model_runs() -> None:
    calls: list[GenerationRequest] = []

    def model(request: GenerationRequest) -> str:
        calls.append(request)
        return SCRIPT

    events = Citeformer(FunctionBackend(model)).stream(QUESTION, SOURCES)
    first = next(events)
    assert isinstance(first, Started)
    assert calls == []  # sent before the backend was asked for anything
    assert [s.title for s in first.sources] == ["Louvre", "Eiffel Tower", "Seine"]
    assert [s.id for s in first.sources] == ["1", "2", "seine"]
    assert first.sources[1].url == "https://example.org/eiffel"
    rest = list(events)
    assert calls
    assert isinstance(rest[-1], Done)
    assert not any(isinstance(e, Started) for e in rest)


def test_a_client_renders_reference_numbers_as_the_text_arrives() -> None:
    events = list(Citeformer(MockBackend([SCRIPT])).stream(QUESTION, SOURCES))
    numbers: dict[int, int] = {}
    text = ""
    shown = ""
    for event in events:
        match event:
            case CitationAccepted(citation=citation):
                # Its marker is in text that has not arrived yet.
                assert citation.end > len(text)
                numbers[citation.source_index] = citation.reference_number
            case TextDelta(text=delta):
                text += delta
                # Every marker arrives after its citation: the client knows its number.
                assert {int(n) for n in re.findall(r"\[(\d+)\]", delta)} <= set(numbers)
                shown += _renumber(delta, numbers)
    answer = events[-1].answer
    assert answer is not None
    assert answer.text == text
    assert shown == renumbered_text(answer)
    assert [r.source_index for r in answer.references] == [2, 1, 3]
    assert shown.count("[1]") == 2
    assert "[3]" in shown


def _renumber(text: str, numbers: dict[int, int]) -> str:
    for index, number in numbers.items():
        text = text.replace(f"[{index}]", f"[#{number}]")
    return text.replace("[#", "[")


def test_done_carries_the_answer_once_and_reads_back() -> None:
    done = list(Citeformer(MockBackend([SCRIPT])).stream(QUESTION, SOURCES))[-1]
    assert isinstance(done, Done)
    assert done.answer is not None
    data = json.loads(done.model_dump_json())
    assert set(data) == {"type", "answer"}  # usage and trace only inside the answer
    assert data["answer"]["usage"] == done.usage.model_dump(mode="json")
    again = Done.model_validate_json(done.model_dump_json())
    assert again == done
    assert again.trace == done.answer.trace
    bare = Done(usage=done.usage, trace=done.trace)  # a backend's own Done keeps both
    assert set(json.loads(bare.model_dump_json())) == {"type", "usage", "trace", "answer"}


def test_sse_frames_parse_back_into_the_same_events() -> None:
    events = list(Citeformer(MockBackend([SCRIPT])).stream(QUESTION, SOURCES))
    frames = list(sse_frames(events))
    assert all(f.endswith("\n\n") and f.count("\n") == 3 for f in frames)
    adapter: TypeAdapter[Event] = TypeAdapter(Event)
    parsed = []
    for frame in frames:
        kind_line, data_line, _, _ = frame.split("\n")
        kind = kind_line.removeprefix("event: ")
        event = adapter.validate_json(data_line.removeprefix("data: "))
        assert event.type == kind
        parsed.append(event)
    assert parsed == events
    assert [type(e).__name__ for e in parsed][:2] == ["Started", "CitationAccepted"]
    assert MEDIA_TYPE == "text/event-stream"
    assert sse_frame(events[0]).startswith("event: started\ndata: {")


def test_sse_stream_closes_the_answer_stream_when_the_client_leaves() -> None:
    cf = Citeformer(MockBackend([SCRIPT]))

    async def main() -> list[str]:
        closed: list[bool] = []
        inner = cf.astream(QUESTION, SOURCES)

        async def watched():  # type: ignore[no-untyped-def]
            try:
                async for event in inner:
                    yield event
            finally:
                closed.append(True)

        frames = sse_stream(watched())
        got = [await anext(frames), await anext(frames)]
        await frames.aclose()  # the client went away
        assert closed == [True]
        return got

    got = asyncio.run(main())
    assert got[0].startswith("event: started")
