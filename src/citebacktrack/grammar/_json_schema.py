"""The JSON-schema dialect of the citation grammar: an answer as sentences with cited ids.

Where an engine takes a strict JSON schema instead of a grammar (OpenAI's Structured
Outputs, :class:`~citebacktrack.backends._openai_json_schema.OpenAIJsonSchemaEngine`), the
answer is ``{"sentences": [{"text", "citations": [ids]}]}`` with the ids an enum of
``1..n`` (:func:`answer_schema`), and :func:`render_answer` writes it back as ``[N]`` text
for the validator.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydantic import JsonValue

from citebacktrack.errors import ConfigurationError
from citebacktrack.syntax import (
    MARKER_CLOSE,
    MARKER_OPEN,
    cite_sentence,
    split_sentences,
    strip_markers,
)

__all__ = ["MAX_SCHEMA_SOURCES", "answer_schema", "render_answer"]

MAX_SCHEMA_SOURCES = 1000
"""Most sources a ``json_schema`` answer can cite: Structured Outputs allow 1,000 enum
values in one schema, and the ids are one enum."""


def answer_schema(n_sources: int) -> dict[str, JsonValue]:
    """The strict JSON schema of an answer citing sources ``1..n_sources``.

    ``{"sentences": [{"text": str, "citations": [id, ...]}]}``, every object closed
    (``additionalProperties: false``) with every property required, the ids an integer
    enum, as Structured Outputs' strict mode requires.

    Raises:
        ConfigurationError: ``n_sources`` is below 1 or above :data:`MAX_SCHEMA_SOURCES`.
    """
    if not 1 <= n_sources <= MAX_SCHEMA_SOURCES:
        raise ConfigurationError(
            f"a json_schema answer can cite between 1 and {MAX_SCHEMA_SOURCES} sources "
            f"(Structured Outputs allow {MAX_SCHEMA_SOURCES} enum values per schema), got "
            f"{n_sources}; pass fewer sources, or use mode='cfg'"
        )
    ids: list[JsonValue] = list(range(1, n_sources + 1))
    sentence: dict[str, JsonValue] = {
        "type": "object",
        "properties": {
            "text": {
                "type": "string",
                "description": "One sentence of the answer, without citation markers.",
            },
            "citations": {
                "type": "array",
                "description": "The numbers N of the documents [N] that support this sentence.",
                "items": {"type": "integer", "enum": ids},
            },
        },
        "required": ["text", "citations"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "sentences": {
                "type": "array",
                "description": "The answer, one sentence at a time.",
                "items": sentence,
            }
        },
        "required": ["sentences"],
        "additionalProperties": False,
    }


_BRACKETS = str.maketrans({MARKER_OPEN: "(", MARKER_CLOSE: ")"})


def render_answer(sentences: Iterable[tuple[str, Sequence[int]]]) -> str:
    """Write ``(text, ids)`` sentences as one answer with ``[N]`` markers.

    Each text is cleaned (markers it wrote itself removed, other square brackets shown as
    parentheses, whitespace collapsed) and split into sentences with
    :func:`citebacktrack.syntax.split_sentences`; each sentence gets the item's markers
    (repeats dropped) before its final terminator (``completed in 1889 [1][2].``), or
    after it when closing quotes follow it (``he said "no." [1]``) or the period belongs
    to an abbreviation (``in the U.S. [1].``); a sentence without a terminator gets a
    period. Sentences are joined by one space, so the decoder's tracker
    (:func:`citebacktrack._tracker.advance`) reads each marker as one of its
    sentence.
    """
    parts: list[str] = []
    for text, ids in sentences:
        prose = " ".join(strip_markers(text).translate(_BRACKETS).split())
        markers = "".join(f"{MARKER_OPEN}{i}{MARKER_CLOSE}" for i in dict.fromkeys(ids))
        parts.extend(cite_sentence(sentence, markers) for sentence in split_sentences(prose))
    return " ".join(parts)
