"""The one owner of the answer: backend events in, the :class:`~citebacktrack.types.Answer` out.

Backends only yield events. :class:`AnswerBuilder` folds them into the answer, and the
same builder serves ``generate`` (which keeps the final answer) and the stream (which
re-emits each event as the builder corrects it), so the joined stream text equals
``Answer.text`` and every offset in the stream is the offset in the answer:

* leading whitespace is not part of the answer, trailing whitespace is held back until
  more text follows it and dropped at the end;
* each citation is checked against the text (``text[start:end] == "[N]"``, ``N`` a real
  source), gets its reference number (order of first use) and its evidence span;
* the last event, :class:`~citebacktrack.types.Done`, carries the finished answer.

A backend that breaks the contract (no ``Done``, a citation that is not in the text) gets
a :class:`~citebacktrack.errors.BackendError`, never a silently wrong answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence

from citebacktrack.errors import BackendError
from citebacktrack.request import source_id
from citebacktrack.types import (
    Answer,
    Citation,
    CitationAccepted,
    CitationRejected,
    Done,
    Event,
    Reference,
    Rollback,
    ScriptDeparture,
    Source,
    Started,
    TextDelta,
)

__all__ = ["AnswerBuilder", "abuild", "acollect", "build", "collect", "references"]


class AnswerBuilder:
    """Turns one backend stream into the answer; feed it every event in order.

    Args:
        sources: the request's sources (for references and evidence checks).
    """

    def __init__(self, sources: Sequence[Source]) -> None:
        self.sources = tuple(sources)
        self._parts: list[str] = []
        self._length = 0
        """Characters of answer text emitted so far."""
        self._received = 0
        """Characters of backend text received so far."""
        self._lead = 0
        """Leading whitespace characters dropped (backend offset - answer offset)."""
        self._held = ""
        """Trailing whitespace received but not yet emitted."""
        self._citations: list[Citation] = []
        self._pending: list[Citation] = []
        """Citations received before the text that holds their marker."""
        self._numbers: dict[int, int] = {}
        self._answer: Answer | None = None

    @property
    def answer(self) -> Answer:
        """The finished answer.

        Raises:
            BackendError: the stream has not ended with ``Done`` yet.
        """
        if self._answer is None:
            raise BackendError(
                "a backend stream ended without a Done event; a Backend.stream "
                "implementation must yield Done last"
            )
        return self._answer

    def feed(self, event: Event) -> list[Event]:
        """Take one backend event; return the events to show for it (maybe none)."""
        if self._answer is not None:
            raise BackendError("a backend stream yielded an event after Done")
        match event:
            case TextDelta(text=text):
                return self._text(text)
            case CitationAccepted(citation=citation):
                if citation.end > self._received:
                    self._pending.append(citation)  # shown just before its text
                    return []
                return [CitationAccepted(citation=self._citation(citation))]
            case Started():
                raise BackendError(
                    "a backend yielded Started; the answer builder starts a stream itself"
                )
            case CitationRejected() | ScriptDeparture():
                offset = self._offset(event.char_offset)
                return [event.model_copy(update={"char_offset": offset})]
            case Rollback():
                return [event]
            case Done():
                return [self._done(event)]
        raise BackendError(f"a backend yielded {type(event).__name__}, which is not an Event")

    # ------------------------------------------------------------------ parts

    def _text(self, text: str) -> list[Event]:
        self._received += len(text)
        if not self._parts and not self._held:
            stripped = text.lstrip()
            self._lead += len(text) - len(stripped)
            text = stripped
        if not text:
            return []
        body = text.rstrip()
        if not body:
            self._held += text
            return []
        out = self._held + body
        self._held = text[len(body) :]
        self._parts.append(out)
        self._length += len(out)
        arrived = [c for c in self._pending if c.end <= self._received]
        self._pending = [c for c in self._pending if c.end > self._received]
        events: list[Event] = [CitationAccepted(citation=self._citation(c)) for c in arrived]
        events.append(TextDelta(text=out))
        return events

    def _offset(self, backend_offset: int) -> int:
        return max(0, backend_offset - self._lead)

    def _citation(self, citation: Citation) -> Citation:
        start, end = citation.start - self._lead, citation.end - self._lead
        index = citation.source_index
        if not 1 <= index <= len(self.sources):
            raise BackendError(
                f"a backend reported a citation of source {index}, but there are "
                f"{len(self.sources)} sources; ids must be checked before they are reported"
            )
        if not 0 <= start < end <= self._length:
            raise BackendError(
                f"a backend reported [{index}] at {start}..{end}, outside the "
                f"{self._length} characters of text sent so far; a citation must be "
                "reported next to the text that holds it"
            )
        written = "".join(self._parts)[start:end]
        if written != f"[{index}]":
            raise BackendError(
                f"a backend reported [{index}] at {start}..{end}, where the text has "
                f"{written!r}; a citation must point at its own marker"
            )
        evidence = citation.evidence
        if evidence is not None:
            source = self.sources[evidence.source_index - 1].text
            if source[evidence.start : evidence.end] != evidence.text:
                raise BackendError(
                    f"the evidence of [{index}] is not the text of source "
                    f"{evidence.source_index} at {evidence.start}..{evidence.end}"
                )
        number = self._numbers.setdefault(index, len(self._numbers) + 1)
        fixed = citation.model_copy(
            update={
                "start": start,
                "end": end,
                "sentence_start": max(0, citation.sentence_start - self._lead),
                "reference_number": number,
                "source_id": source_id(self.sources[index - 1], index),
            }
        )
        self._citations.append(fixed)
        return fixed

    def _done(self, done: Done) -> Done:
        if self._pending:
            first = self._pending[0]
            raise BackendError(
                f"a backend reported [{first.source_index}] at {first.start}..{first.end}, "
                f"but its stream ended after {self._received} characters of text; a "
                "citation must be followed (or preceded) by the text that holds it"
            )
        trace = done.trace
        if self._lead:
            entries = tuple(
                e.model_copy(update={"char_offset": self._offset(e.char_offset)})
                for e in trace.entries
            )
            trace = trace.model_copy(update={"entries": entries})
        answer = Answer(
            text="".join(self._parts),
            citations=tuple(self._citations),
            references=references(self._citations, self.sources),
            usage=done.usage,
            trace=trace,
        )
        self._answer = answer
        return Done(usage=done.usage, trace=trace, answer=answer)


def references(citations: Sequence[Citation], sources: Sequence[Source]) -> tuple[Reference, ...]:
    """One reference per cited source, numbered in order of first use."""
    seen: set[int] = set()
    out: list[Reference] = []
    for citation in citations:
        if citation.source_index in seen:
            continue
        seen.add(citation.source_index)
        source = sources[citation.source_index - 1]
        out.append(
            Reference(
                number=len(out) + 1,
                source_index=citation.source_index,
                source_id=citation.source_id,
                title=source.title,
                url=source.url,
                metadata=source.metadata,
                score=source.score,
            )
        )
    return tuple(out)


def build(events: Iterator[Event], sources: Sequence[Source]) -> Iterator[Event]:
    """Re-emit a backend stream as the answer builder corrects it: :class:`Started` (the
    numbered sources) first, at once; each accepted citation just before the text that
    holds its marker; ``Done`` carrying the answer last. Closing this iterator closes
    ``events``."""
    builder = AnswerBuilder(sources)
    try:
        yield Started(sources=builder.sources)
        for event in events:
            yield from builder.feed(event)
        _ = builder.answer  # raises when the stream ended without Done
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


async def abuild(events: AsyncIterator[Event], sources: Sequence[Source]) -> AsyncIterator[Event]:
    """Async :func:`build`; closing this iterator closes ``events``."""
    builder = AnswerBuilder(sources)
    try:
        yield Started(sources=builder.sources)
        async for event in events:
            for out in builder.feed(event):
                yield out
        _ = builder.answer  # raises when the stream ended without Done
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def collect(events: Iterable[Event], sources: Sequence[Source]) -> Answer:
    """Fold a backend stream into its answer; closes ``events`` however it ends.

    Raises:
        BackendError: the stream ended without ``Done`` or broke the event contract.
    """
    builder = AnswerBuilder(sources)
    try:
        for event in events:
            builder.feed(event)
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    return builder.answer


async def acollect(events: AsyncIterator[Event], sources: Sequence[Source]) -> Answer:
    """Async :func:`collect`; closes ``events`` however it ends."""
    builder = AnswerBuilder(sources)
    try:
        async for event in events:
            builder.feed(event)
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
    return builder.answer
