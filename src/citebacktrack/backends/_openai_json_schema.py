"""OpenAIJsonSchemaEngine: Structured Outputs, sentences and their ids, rendered as ``[N]`` text.

:class:`OpenAIJsonSchemaEngine` (``OpenAIBackend(mode="json_schema")``) asks for
``{"sentences": [{"text", "citations": [ids]}]}`` under Structured Outputs (the ids an
enum of ``1..n``, so at most :data:`MAX_SCHEMA_SOURCES` sources) and renders it back into
``[N]`` text (:func:`render_answer`). It cannot continue a prefix
(``continues_prefix = False``): the loop makes one call and revises that answer with the
validator.

The schema and the rendering are the JSON-schema dialect of the citation grammar
(:mod:`citebacktrack.grammar._json_schema`); what the request and the reply look like on
each API, and what both hosted engines share, is in
:mod:`citebacktrack.backends._openai_hosted_base`.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from citebacktrack.backends._openai_hosted_base import HostedEngine, HostedReply
from citebacktrack.backends._sdk import excerpt, load_json
from citebacktrack.errors import BackendError, ConfigurationError
from citebacktrack.grammar._json_schema import MAX_SCHEMA_SOURCES, answer_schema, render_answer
from citebacktrack.segments import SegmentCall

__all__ = ["MAX_SCHEMA_SOURCES", "OpenAIJsonSchemaEngine", "answer_schema", "render_answer"]

_SCHEMA_NAME = "cited_answer"


def _read_sentences(data: object) -> list[tuple[str, tuple[int, ...]]]:
    """The ``(text, ids)`` pairs of a parsed answer; BackendError unless it has the shape."""
    items = data.get("sentences") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise BackendError(f"an answer without a sentences list: {excerpt(data)}")
    sentences = []
    for item in items:
        text = item.get("text") if isinstance(item, dict) else None
        ids = item.get("citations") if isinstance(item, dict) else None
        if (
            not isinstance(text, str)
            or not isinstance(ids, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise BackendError(f"a sentence that is not {{text, citations}}: {excerpt(item)}")
        sentences.append((text, tuple(ids)))
    return sentences


def _complete_sentences(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The whole sentence objects at the start of a JSON answer cut off by the token limit."""
    key = text.find('"sentences"')
    start = text.find("[", key) if key >= 0 else -1
    if start < 0:
        return []
    decoder = json.JSONDecoder()
    items: list[object] = []
    position = start + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        try:
            item, position = decoder.raw_decode(text, position)
        except (ValueError, RecursionError):  # see load_json
            break
        items.append(item)
    return _read_sentences({"sentences": items})


def _parse_answer(text: str, *, cut: bool) -> list[tuple[str, tuple[int, ...]]]:
    try:
        data = load_json(text, "an answer")
    except BackendError:
        if cut:
            return _complete_sentences(text)
        raise
    return _read_sentences(data)


class OpenAIJsonSchemaEngine(HostedEngine):
    """Structured Outputs: sentences with their cited ids, rendered back into ``[N]`` text.

    One call per answer (``continues_prefix = False``): the segment loop revises the
    rendered answer with the validator. The schema is :func:`answer_schema` for the call's
    sources; the answer is :func:`render_answer` of what came back (the whole sentences of
    an answer cut short by the token limit, with ``finish="length"``).

    Takes the arguments of :class:`OpenAIGrammarToolEngine`, except that ``temperature``
    and ``top_p`` are sent unless ``send_sampling=False`` (pass it for reasoning models).
    ``model`` must support Structured Outputs.
    """

    continues_prefix: ClassVar[bool] = False
    _feature: ClassVar[str] = "Structured Outputs with json_schema"
    _sends_sampling: ClassVar[bool] = True

    def _constrain(
        self, call: SegmentCall, messages: list[dict[str, str]], kwargs: dict[str, Any]
    ) -> None:
        if call.prefix:
            raise ConfigurationError(
                "OpenAIJsonSchemaEngine writes whole answers and cannot continue a prefix "
                "(its continues_prefix is False); use mode='cfg' for continuations"
            )
        if call.grammar is None:
            return
        if not call.sources:
            raise ConfigurationError(
                "OpenAIJsonSchemaEngine needs the call's sources (SegmentCall.sources) to "
                "enumerate the citation ids"
            )
        schema = answer_schema(len(call.sources))
        description = "The answer, sentence by sentence, with the documents each one cites."
        if self.api == "responses":
            kwargs["text"] = {
                "format": {
                    "type": "json_schema",
                    "name": _SCHEMA_NAME,
                    "description": description,
                    "strict": True,
                    "schema": schema,
                }
            }
        else:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": _SCHEMA_NAME,
                    "description": description,
                    "strict": True,
                    "schema": schema,
                },
            }

    def _answer(self, reply: HostedReply, call: SegmentCall) -> str:
        text = "".join(reply.texts)
        if not text.strip() and reply.finish == "length":
            return ""
        return render_answer(_parse_answer(text, cut=reply.finish == "length"))
