"""Reading Anthropic's Messages API: a message body or its stream events, and its citations.

:func:`parse_message` reads a non-streamed body, :class:`StreamAssembler` builds the same
:class:`MessageReply` from server-sent events (and refuses a stream cut short), and
:func:`map_answer` writes Claude's ``char_location`` citations as ``[N]`` markers (``N =
document_index + 1``) at the end of the sentence each cited block ends in, before its
terminator, keeping each cited span as :class:`~citebacktrack.types.Evidence` where it is
exactly the source's text. Brackets in Claude's own text are written as parentheses, so
only a citation the API returned can become a marker. No I/O here:
:class:`~citebacktrack.backends.anthropic.AnthropicEngine` sends the requests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from citebacktrack.backends._sdk import excerpt, load_json
from citebacktrack.errors import BackendError
from citebacktrack.syntax import CLOSERS, MARKER_CLOSE, MARKER_OPEN, TERMINATORS, sentence_spans
from citebacktrack.types import Evidence, Source

__all__ = [
    "CitedAnswer",
    "ContentBlock",
    "MessageReply",
    "StreamAssembler",
    "event_dict",
    "map_answer",
    "parse_message",
]

_END = re.compile(rf"[{re.escape(TERMINATORS)}]+[{re.escape(CLOSERS)}]*\Z")
_PARENTHESES = str.maketrans({MARKER_OPEN: "(", MARKER_CLOSE: ")"})


@dataclass(frozen=True, slots=True)
class ContentBlock:
    """One content block of Claude's answer: its type, text and citations."""

    kind: str
    text: str = ""
    citations: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class MessageReply:
    """A whole message, from a JSON body or assembled from stream events."""

    blocks: tuple[ContentBlock, ...]
    stop_reason: str | None
    stop_details: object
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class CitedAnswer:
    """Claude's blocks as one answer text with ``[N]`` markers."""

    text: str
    evidence: tuple[Evidence | None, ...]
    notes: tuple[str, ...]
    """What was dropped or changed on the way (out-of-range documents, other citation
    types, spans that do not match the source, brackets in the text)."""


class StreamAssembler:
    """Builds one message from the Messages API's stream events (no I/O).

    ``text_delta`` and ``citations_delta`` events add to the block they name, in order;
    :meth:`reply` gives the message only once ``message_stop`` came, so a stream cut
    short never passes for a whole answer.
    """

    def __init__(self) -> None:
        self._blocks: dict[int, list[Any]] = {}  # index -> [kind, text parts, citations]
        self._started = False
        self._stopped = False
        self._stop_reason: str | None = None
        self._stop_details: object = None
        self._prompt_tokens = 0
        self._completion_tokens = 0

    def feed(self, event: Mapping[str, Any]) -> None:
        """Take one event (as a JSON object)."""
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            if not isinstance(message, Mapping):
                raise BackendError(f"a message_start without a message: {excerpt(event)}")
            self._started = True
            self._usage(message.get("usage"))
            for index, block in enumerate(_list(message.get("content"), "message content")):
                self._start(index, block)
            return
        if not self._started and kind != "ping":
            raise BackendError(f"a {kind!r} event before message_start")
        if kind == "content_block_start":
            self._start(_index(event), event.get("content_block"))
        elif kind == "content_block_delta":
            self._delta(_index(event), event.get("delta"))
        elif kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, Mapping):
                self._stop_reason = delta.get("stop_reason", self._stop_reason)
                self._stop_details = delta.get("stop_details", self._stop_details)
            self._usage(event.get("usage"))
        elif kind == "message_stop":
            self._stopped = True
        # content_block_stop and ping change nothing here.

    def reply(self) -> MessageReply:
        """The whole message.

        Raises:
            BackendError: the stream ended before ``message_stop``.
        """
        if not self._stopped:
            raise BackendError(
                f"a stream that ended before message_stop (after {len(self._blocks)} content "
                "blocks): the answer is incomplete and was not used; retry the request"
            )
        blocks = tuple(
            ContentBlock(kind, "".join(parts), tuple(citations))
            for _, (kind, parts, citations) in sorted(self._blocks.items())
        )
        return MessageReply(
            blocks=blocks,
            stop_reason=self._stop_reason,
            stop_details=self._stop_details,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
        )

    def _start(self, index: int, block: object) -> None:
        parsed = _block(block)
        self._blocks[index] = [parsed.kind, [parsed.text], list(parsed.citations)]

    def _delta(self, index: int, delta: object) -> None:
        if index not in self._blocks:
            raise BackendError(f"a delta for content block {index}, which never started")
        if not isinstance(delta, Mapping):
            raise BackendError(f"a content_block_delta without a delta: {excerpt(delta)}")
        _, parts, citations = self._blocks[index]
        if delta.get("type") == "text_delta":
            text = delta.get("text")
            if not isinstance(text, str):
                raise BackendError(f"a text_delta without text: {excerpt(delta)}")
            parts.append(text)
        elif delta.get("type") == "citations_delta":
            citation = delta.get("citation")
            if not isinstance(citation, Mapping):
                raise BackendError(f"a citations_delta without a citation: {excerpt(delta)}")
            citations.append(citation)
        # thinking, signature and tool-input deltas are not answer text.

    def _usage(self, usage: object) -> None:
        """Stream usage counts are cumulative: the last ones seen stand."""
        if usage is None:
            return
        prompt, completion = _usage(usage, partial=True)
        if prompt is not None:
            self._prompt_tokens = prompt
        if completion is not None:
            self._completion_tokens = completion


def parse_message(payload: bytes) -> MessageReply:
    """Read a non-streamed Messages API body.

    Raises:
        BackendError: the body is not JSON or not a message.
    """
    data = load_json(payload, "a response")
    if not isinstance(data, dict):
        raise BackendError(f"a JSON {type(data).__name__} instead of a message object")
    if data.get("type") == "error" or "content" not in data:
        raise BackendError(f"an error or another object instead of a message: {excerpt(data)}")
    blocks = tuple(_block(block) for block in _list(data.get("content"), "message content"))
    prompt, completion = _usage(data.get("usage"), partial=False)
    return MessageReply(
        blocks=blocks,
        stop_reason=data.get("stop_reason"),
        stop_details=data.get("stop_details"),
        prompt_tokens=prompt or 0,
        completion_tokens=completion or 0,
    )


def _block(block: object) -> ContentBlock:
    if not isinstance(block, Mapping) or not isinstance(block.get("type"), str):
        raise BackendError(f"a content block that is not an object with a type: {excerpt(block)}")
    kind = block["type"]
    if kind != "text":
        return ContentBlock(kind)
    text = block.get("text", "")
    if not isinstance(text, str):
        raise BackendError(f"a text block without text: {excerpt(block)}")
    citations = block.get("citations") or []
    items = _list(citations, "citations")
    for citation in items:
        if not isinstance(citation, Mapping):
            raise BackendError(f"a citation that is not an object: {excerpt(citation)}")
    return ContentBlock(kind, text, tuple(items))


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise BackendError(f"{what} that is not a list: {excerpt(value)}")
    return value


def _index(event: Mapping[str, Any]) -> int:
    index = event.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise BackendError(f"a {event.get('type')} event without a block index: {excerpt(event)}")
    return index


def _usage(usage: object, *, partial: bool) -> tuple[int | None, int | None]:
    """(prompt tokens, completion tokens); prompt tokens include cache reads and writes."""
    if usage is None:
        return None, None
    if not isinstance(usage, Mapping):
        raise BackendError(f"usage that is not an object: {excerpt(usage)}")
    counts: dict[str, int] = {}
    keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    for key in (*keys, "output_tokens"):
        value = usage.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BackendError(f"usage.{key} that is not a token count: {value!r}")
        counts[key] = value
    if not partial and ("input_tokens" not in counts or "output_tokens" not in counts):
        raise BackendError(f"usage without input_tokens and output_tokens: {excerpt(usage)}")
    prompt = sum(counts[k] for k in keys if k in counts) if "input_tokens" in counts else None
    return prompt, counts.get("output_tokens")


def map_answer(blocks: Sequence[ContentBlock], sources: Sequence[Source]) -> CitedAnswer:
    """Claude's text blocks as one answer with ``[N]`` markers and their evidence.

    Each cited block's documents become markers (deduplicated, in order) at the end of
    the sentence the block ends in, before its terminator: ``... in 1889 [1].``.
    Sentences are :func:`citebacktrack.syntax.sentence_spans` of each line (a line break
    ends a sentence in an answer, as the decoder's tracker has it). A citation of a
    document index out of range, or of another type than ``char_location``, is dropped
    with a note; a cited span that is not exactly the source's text gives ``None``
    evidence.
    """
    notes: list[str] = []
    parts: list[str] = []
    cited: list[tuple[int, list[tuple[int, Evidence | None]]]] = []  # (end, [(id, span)])
    length = 0
    skipped: set[str] = set()
    for block in blocks:
        if block.kind != "text":
            if block.kind not in ("thinking", "redacted_thinking"):
                skipped.add(block.kind)
            continue
        text = block.text.translate(_PARENTHESES)
        if text != block.text:
            notes.append("square brackets in the answer text were written as parentheses")
        parts.append(text)
        length += len(text)
        ids = [c for c in (_citation(c, sources, notes) for c in block.citations) if c is not None]
        if ids:
            end = length - (len(text) - len(text.rstrip()))
            cited.append((end, ids))
    if skipped:
        notes.append(f"ignored content blocks of type {', '.join(sorted(skipped))}")
    text = "".join(parts)
    spans = _answer_sentences(text)
    marks: dict[int, dict[int, Evidence | None]] = {}  # sentence -> id -> first good span
    for end, ids in cited:
        sentence = _sentence_of(spans, end)
        if sentence is None:
            notes.append(f"dropped {len(ids)} citation(s) of an answer with no text to cite")
            continue
        group = marks.setdefault(sentence, {})
        for source_index, span in ids:
            if group.get(source_index) is None:
                group[source_index] = span
    out: list[str] = []
    evidence: list[Evidence | None] = []
    done = 0
    for sentence in sorted(marks):
        start, end = spans[sentence]
        body = text[start:end]
        terminator = _END.search(body)
        at = start + (terminator.start() if terminator else len(body))
        out.append(text[done:at])
        lead = "" if at == 0 or text[at - 1].isspace() else " "
        out.append(lead + "".join(f"[{i}]" for i in marks[sentence]))
        evidence.extend(marks[sentence].values())
        done = at
    out.append(text[done:])
    return CitedAnswer(
        text="".join(out), evidence=tuple(evidence), notes=tuple(dict.fromkeys(notes))
    )


def _citation(
    citation: Mapping[str, Any], sources: Sequence[Source], notes: list[str]
) -> tuple[int, Evidence | None] | None:
    """A ``char_location`` citation as (1-based source index, its checked span), or None."""
    kind = citation.get("type")
    if kind != "char_location":
        notes.append(f"ignored a {kind} citation (text documents are cited by char_location)")
        return None
    index = citation.get("document_index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(sources):
        notes.append(
            f"dropped a citation of document_index {index!r}: only {len(sources)} documents "
            "were sent"
        )
        return None
    source_index = index + 1
    start, end = citation.get("start_char_index"), citation.get("end_char_index")
    quoted = citation.get("cited_text")
    text = sources[index].text
    if (
        isinstance(start, int)
        and isinstance(end, int)
        and not isinstance(start, bool)
        and not isinstance(end, bool)
        and 0 <= start < end <= len(text)
        and isinstance(quoted, str)
        and text[start:end] == quoted
    ):
        return source_index, Evidence(source_index=source_index, start=start, end=end, text=quoted)
    notes.append(
        f"the cited span of [{source_index}] ({start!r}:{end!r}) is not the source's text "
        "there: no evidence kept for it"
    )
    return source_index, None


def _answer_sentences(text: str) -> list[tuple[int, int]]:
    """Sentence spans of an answer: those of each line (a line break ends a sentence)."""
    spans: list[tuple[int, int]] = []
    offset = 0
    for line in text.split("\n"):
        spans += [(offset + a, offset + b) for a, b in sentence_spans(line)]
        offset += len(line) + 1
    return spans


def _sentence_of(spans: Sequence[tuple[int, int]], end: int) -> int | None:
    """The sentence holding the character before ``end`` (else the last one before it)."""
    found = None
    for i, (start, _) in enumerate(spans):
        if start < end:
            found = i
        else:
            break
    if found is None and spans:
        return 0
    return found


def event_dict(event: Any) -> Mapping[str, Any]:
    """An SDK stream event as its JSON object (the fields the API sent)."""
    data = event.to_dict(warnings=False)
    if not isinstance(data, dict):  # pragma: no cover - the SDK's models dump to dicts
        raise BackendError(f"a stream event that is not an object: {excerpt(data)}")
    return data
