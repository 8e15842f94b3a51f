"""Hosted OpenAI engines: the citation grammar as a forced custom tool, or a strict JSON schema.

Two :class:`~citebacktrack.segments.SegmentEngine` classes over the OpenAI SDK, each on the
Responses API (``api="responses"``, the default) or Chat Completions (``api="chat"``); both
map a call to one request and its answer to one :class:`~citebacktrack.segments.SegmentResult`.
What each sends, read from the SDK's request types:

==================  ==============================================  ==========================
                    Responses                                       Chat Completions
==================  ==============================================  ==========================
``cfg``: the tool   ``tools=[{"type": "custom", "name": "answer",   ``{"type": "custom",
                    "description", "format": {"type": "grammar",    "custom": {"name",
                    "syntax": "lark", "definition"}}]``              "description", "format":
                                                                    {"type": "grammar",
                                                                    "grammar": {"syntax",
                                                                    "definition"}}}}``
``cfg``: forcing    ``tool_choice={"type": "custom",                ``{"type": "custom",
                    "name": "answer"}``                             "custom": {"name"}}``
``cfg``: answer     ``output[]`` item ``custom_tool_call``,         ``message.tool_calls[]`` of
                    its ``input``                                   type ``custom``,
                                                                    ``custom.input``
``json_schema``     ``text={"format": {"type": "json_schema",       ``response_format={"type":
                    "name", "strict": true, "schema"}}``            "json_schema",
                                                                    "json_schema": {"name",
                                                                    "strict": true, "schema"}}``
answer cut short    ``status: "incomplete"``, ``incomplete_details  ``finish_reason: "length"``
                    .reason: "max_output_tokens"``
tokens              ``usage.input_tokens`` / ``output_tokens``      ``usage.prompt_tokens`` /
                                                                    ``completion_tokens``
==================  ==============================================  ==========================

* :class:`OpenAIGrammarToolEngine` (``mode="cfg"``) constrains the tool's input with the
  call's citation grammar in Lark (checked here before it is sent); the answer is the tool
  call's input. It continues an accepted prefix (``continues_prefix = True``): a hosted
  model cannot be prefilled with a trailing assistant message, so the accepted text goes
  into a last *user* turn, and the call's grammar (the continuation grammar, narrowed at an
  open marker to the ids the validator accepts) becomes the tool's definition. Custom tools
  take no stop strings, so a result may run to the end of the answer, with several markers
  (the segment loop cuts it at the first rejected one).
* :class:`OpenAIJsonSchemaEngine` (``mode="json_schema"``) asks for
  ``{"sentences": [{"text", "citations": [ids]}]}`` under Structured Outputs (the ids an
  enum of ``1..n``, so at most :data:`MAX_SCHEMA_SOURCES` sources) and renders it back into
  ``[N]`` text (:func:`render_answer`). It cannot continue a prefix
  (``continues_prefix = False``): the loop makes one call and revises that answer with the
  validator.

A call without a grammar (the raw-model baseline) is a plain text request in both modes.
The request's ``stop`` strings are never sent (neither feature takes them). ``temperature``
and ``top_p`` are sent in ``json_schema`` mode only unless ``send_sampling`` says otherwise:
custom-tool grammars are a GPT-5 feature and GPT-5 reasoning models refuse them. The
Responses API has no ``seed``; Chat Completions gets it with the sampling fields. Reasoning
models spend output tokens on reasoning before the answer: raise
``SegmentOptions.max_segment_tokens`` or pass ``extra={"reasoning": {"effort": "low"}}``.

Requests are not streamed: the segment loop releases text at sentence boundaries anyway.
Retries are the SDK's (429, 408, 409, 5xx, timeouts, connection errors; ``Retry-After``
honoured), on copies of the clients with the engine's ``timeout`` and ``max_retries``; SDK
errors are mapped to :class:`~citebacktrack.errors.BackendError` with the cause chained, as
in :mod:`citebacktrack.backends.openai`, and API keys never appear in messages or reprs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

from pydantic import JsonValue

from citebacktrack.backends.openai import (
    _cause,
    _Clients,
    _excerpt,
    _import_openai,
    _load_json,
    _redact,
    _usage,
    check_grammar_text,
)
from citebacktrack.errors import BackendError, ConfigurationError
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.segments import SegmentCall, SegmentResult
from citebacktrack.syntax import (
    MARKER_CLOSE,
    MARKER_OPEN,
    cite_sentence,
    split_sentences,
    strip_markers,
)

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI

__all__ = [
    "ANSWER_TOOL",
    "HOSTED_ENGINES",
    "MAX_SCHEMA_SOURCES",
    "OpenAIGrammarToolEngine",
    "OpenAIJsonSchemaEngine",
    "answer_schema",
    "render_answer",
]

Api = Literal["responses", "chat"]

MAX_SCHEMA_SOURCES = 1000
"""Most sources a ``json_schema`` answer can cite: Structured Outputs allow 1,000 enum
values in one schema, and the ids are one enum."""

ANSWER_TOOL = "answer"
"""The name of the custom tool the ``cfg`` mode forces."""

_SCHEMA_NAME = "cited_answer"
_API_NAMES: dict[str, str] = {"responses": "Responses", "chat": "Chat Completions"}
# Body fields the engines own: an ``extra`` entry may not override them.
_OWNED_FIELDS = frozenset(
    {
        "model",
        "input",
        "messages",
        "max_output_tokens",
        "max_completion_tokens",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "text",
        "response_format",
        "tools",
        "tool_choice",
    }
)
_FIRST_TOOL = (
    "Write your whole answer here: short sentences, each citing the documents that support "
    "it as [N]."
)
_REST_TOOL = "Write the rest of your answer here, continuing exactly where the answer so far stops."
_CONTINUE = (
    "Your answer so far is between <answer-so-far> and </answer-so-far> below. Continue it "
    f"from exactly where it stops: call the {ANSWER_TOOL} tool with only the text that comes "
    "next, without repeating any of it.{note}\n\n<answer-so-far>{prefix}</answer-so-far>"
)
_OPEN_MARKER_NOTE = (
    " It stops inside a citation marker: start with the number of a document that supports "
    f"the sentence, then {MARKER_CLOSE}."
)


# --------------------------------------------------------------------------- json_schema


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
    (:func:`citebacktrack.decoding.tracker.advance`) reads each marker as one of its
    sentence.
    """
    parts: list[str] = []
    for text, ids in sentences:
        prose = " ".join(strip_markers(text).translate(_BRACKETS).split())
        markers = "".join(f"{MARKER_OPEN}{i}{MARKER_CLOSE}" for i in dict.fromkeys(ids))
        parts.extend(cite_sentence(sentence, markers) for sentence in split_sentences(prose))
    return " ".join(parts)


def _read_sentences(data: object) -> list[tuple[str, tuple[int, ...]]]:
    """The ``(text, ids)`` pairs of a parsed answer; BackendError unless it has the shape."""
    items = data.get("sentences") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise BackendError(f"an answer without a sentences list: {_excerpt(data)}")
    sentences = []
    for item in items:
        text = item.get("text") if isinstance(item, dict) else None
        ids = item.get("citations") if isinstance(item, dict) else None
        if (
            not isinstance(text, str)
            or not isinstance(ids, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise BackendError(f"a sentence that is not {{text, citations}}: {_excerpt(item)}")
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
        except (ValueError, RecursionError):  # see _load_json
            break
        items.append(item)
    return _read_sentences({"sentences": items})


def _parse_answer(text: str, *, cut: bool) -> list[tuple[str, tuple[int, ...]]]:
    try:
        data = _load_json(text, "an answer")
    except BackendError:
        if cut:
            return _complete_sentences(text)
        raise
    return _read_sentences(data)


# --------------------------------------------------------------------------- responses


@dataclass(slots=True)
class _Reply:
    """What one response said, whichever API sent it."""

    finish: Literal["end", "length"]
    texts: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    tool_inputs: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _body(payload: bytes) -> dict[str, Any]:
    data = _load_json(payload, "a response")
    if not isinstance(data, dict):
        raise BackendError(f"a JSON {type(data).__name__} instead of a response object")
    return data


def _read_responses(data: Mapping[str, Any]) -> _Reply:
    """Read a Responses API body (``object: "response"``)."""
    status = data.get("status")
    if data.get("error") is not None or status == "failed":
        raise BackendError(f"a failed response: {_excerpt(data.get('error'))}")
    if status == "incomplete":
        details = data.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        if reason != "max_output_tokens":
            raise BackendError(f"an incomplete response (reason {reason!r})")
        reply = _Reply("length")
    elif status == "completed":
        reply = _Reply("end")
    else:
        raise BackendError(f"a response with status {status!r}, not 'completed'")
    output = data.get("output")
    if not isinstance(output, list):
        raise BackendError(f"a response without an output list: {_excerpt(data)}")
    for item in output:
        if not isinstance(item, dict):
            raise BackendError(f"an output item that is not an object: {_excerpt(item)}")
        kind = item.get("type")
        if kind == "message":
            parts = item.get("content")
            if not isinstance(parts, list):
                raise BackendError(f"a message without content: {_excerpt(item)}")
            for part in parts:
                _read_part(part, reply)
        elif kind == "custom_tool_call" and item.get("name") == ANSWER_TOOL:
            text = item.get("input")
            if not isinstance(text, str):
                raise BackendError(f"a custom tool call without input: {_excerpt(item)}")
            reply.tool_inputs.append(text)
        # Reasoning items and anything else carry no answer text.
    reply.prompt_tokens, reply.completion_tokens = _usage(
        data.get("usage"), ("input_tokens", "output_tokens")
    )
    return reply


def _read_part(part: object, reply: _Reply) -> None:
    """Take the text or refusal of one message part (other kinds carry neither)."""
    if not isinstance(part, dict):
        raise BackendError(f"a message part that is not an object: {_excerpt(part)}")
    kind = part.get("type")
    key = {"output_text": "text", "refusal": "refusal"}.get(kind) if isinstance(kind, str) else None
    if key is None:
        return
    value = part.get(key)
    if not isinstance(value, str):
        raise BackendError(f"a {kind} part without its {key}: {_excerpt(part)}")
    (reply.texts if key == "text" else reply.refusals).append(value)


def _read_chat(data: Mapping[str, Any]) -> _Reply:
    """Read a Chat Completions body (``object: "chat.completion"``)."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        error = data.get("error")
        if error is not None:
            raise BackendError(f"an error instead of a completion: {_excerpt(error)}")
        raise BackendError(f"a completion without choices: {_excerpt(data)}")
    choice: dict[str, Any] = choices[0]
    reason = choice.get("finish_reason")
    if reason in ("stop", "tool_calls"):  # a forced tool may end with either
        reply = _Reply("end")
    elif reason == "length":
        reply = _Reply("length")
    else:
        raise BackendError(
            f"finish_reason {reason!r}, which is neither 'stop', 'tool_calls' nor 'length' "
            "(a filtered or aborted generation)"
        )
    message = choice.get("message")
    if not isinstance(message, dict):
        raise BackendError(f"a chat choice without a message: {_excerpt(choice)}")
    content, refusal = message.get("content"), message.get("refusal")
    if isinstance(content, str):
        reply.texts.append(content)
    if isinstance(refusal, str):
        reply.refusals.append(refusal)
    tool_calls = message.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise BackendError(f"tool_calls that are not a list: {_excerpt(tool_calls)}")
    for tool_call in tool_calls:
        custom = tool_call.get("custom") if isinstance(tool_call, dict) else None
        if not isinstance(custom, dict) or custom.get("name") != ANSWER_TOOL:
            continue
        text = custom.get("input")
        if not isinstance(text, str):
            raise BackendError(f"a custom tool call without input: {_excerpt(tool_call)}")
        reply.tool_inputs.append(text)
    reply.prompt_tokens, reply.completion_tokens = _usage(data.get("usage"))
    return reply


# --------------------------------------------------------------------------- engines


class _HostedEngine:
    """What both hosted engines share: clients, the request frame, reading the answer."""

    continues_prefix: ClassVar[bool]
    """Whether the engine continues an accepted prefix (read by the segment loop)."""
    _feature: ClassVar[str]
    _sends_sampling: ClassVar[bool]

    def __init__(
        self,
        *,
        client: OpenAI | None = None,
        async_client: AsyncOpenAI | None = None,
        model: str,
        api: Api = "responses",
        send_sampling: bool | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
        extra: Mapping[str, JsonValue] | None = None,
    ) -> None:
        if api not in _API_NAMES:
            raise ConfigurationError(f"api must be 'responses' or 'chat', got {api!r}")
        for key in extra or {}:
            if key in _OWNED_FIELDS:
                raise ConfigurationError(
                    f"extra field {key!r} is set by the engine from the SegmentCall; remove it"
                )
        self._clients = _Clients(
            type(self).__name__, client, async_client, timeout=timeout, max_retries=max_retries
        )
        self.model = model
        self.api: Api = api
        self.send_sampling = self._sends_sampling if send_sampling is None else send_sampling
        self.timeout = self._clients.timeout
        self.max_retries = max_retries
        self.extra: dict[str, JsonValue] = dict(extra or {})

    @classmethod
    def from_env(
        cls,
        *,
        model: str,
        api: Api = "responses",
        send_sampling: bool | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
        extra: Mapping[str, JsonValue] | None = None,
    ) -> Self:
        """Build both clients with the API key in ``OPENAI_API_KEY``.

        The SDK reads the rest of its environment (``OPENAI_BASE_URL``,
        ``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID``). The engine owns the clients:
        :meth:`close` / :meth:`aclose` close them. Other arguments are the constructor's.

        Raises:
            ConfigurationError: ``OPENAI_API_KEY`` is unset or empty.
        """
        key = os.environ.get("OPENAI_API_KEY", "").strip()
        if not key:
            raise ConfigurationError(
                f"{cls.__name__}.from_env() needs the OPENAI_API_KEY environment variable; "
                "set it, or pass client=openai.OpenAI(api_key=...)"
            )
        sdk = _import_openai()
        engine = cls(
            client=sdk.OpenAI(api_key=key),
            async_client=sdk.AsyncOpenAI(api_key=key),
            model=model,
            api=api,
            send_sampling=send_sampling,
            timeout=timeout,
            max_retries=max_retries,
            extra=extra,
        )
        engine._clients.owned = True
        return engine

    def close(self) -> None:
        """Close the synchronous client if this engine built it (:meth:`from_env`)."""
        self._clients.close()

    async def aclose(self) -> None:
        """Close both clients if this engine built them (:meth:`from_env`)."""
        await self._clients.aclose()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self._clients.base_url!r}, model={self.model!r}, "
            f"api={self.api!r})"
        )

    def complete(self, call: SegmentCall) -> SegmentResult:
        """Answer ``call`` with one request (blocking; the SDK retries transient failures).

        Raises:
            GrammarError: the grammar cannot be emitted or does not parse (no request sent).
            ConfigurationError: no synchronous client, ``max_tokens`` below 1, or a call
                this mode cannot take (no request sent).
            BackendClosedError: :meth:`close` closed the clients this engine built.
            BackendError: the API failed, timed out, was unreachable, refused to answer,
                or sent something that is not an answer.
        """
        client = self._clients.sync()
        kwargs = self._request(call)
        try:
            if self.api == "responses":
                raw = client.responses.with_raw_response.create(**kwargs)
            else:
                raw = client.chat.completions.with_raw_response.create(**kwargs)
        except self._clients.sdk.OpenAIError as exc:
            raise self._error(exc) from _cause(exc, self._clients.secrets)
        return self._result(raw.content, call)

    async def acomplete(self, call: SegmentCall) -> SegmentResult:
        """Answer ``call`` on the async client (see :meth:`complete`)."""
        self._clients.check_async()
        kwargs = self._request(call)
        try:
            async with self._clients.session() as client:
                if self.api == "responses":
                    raw = await client.responses.with_raw_response.create(**kwargs)
                else:
                    raw = await client.chat.completions.with_raw_response.create(**kwargs)
        except self._clients.sdk.OpenAIError as exc:
            raise self._error(exc) from _cause(exc, self._clients.secrets)
        return self._result(raw.content, call)

    # ------------------------------------------------------------------ requests

    def _request(self, call: SegmentCall) -> dict[str, Any]:
        """The SDK keyword arguments for ``call``."""
        if call.max_tokens < 1:
            raise ConfigurationError(f"max_tokens must be at least 1, got {call.max_tokens}")
        messages: list[dict[str, str]] = [
            {"role": m.role, "content": m.content} for m in call.messages
        ]
        kwargs: dict[str, Any] = {"model": self.model}
        if self.send_sampling:
            kwargs["temperature"] = call.temperature
            kwargs["top_p"] = call.top_p
            if call.seed is not None and self.api == "chat":  # Responses has no seed
                kwargs["seed"] = call.seed
        if self.api == "responses":
            kwargs["max_output_tokens"] = call.max_tokens
        else:
            kwargs["max_completion_tokens"] = call.max_tokens
        self._constrain(call, messages, kwargs)
        kwargs["input" if self.api == "responses" else "messages"] = messages
        if self.extra:
            kwargs["extra_body"] = dict(self.extra)
        return kwargs

    def _constrain(
        self, call: SegmentCall, messages: list[dict[str, str]], kwargs: dict[str, Any]
    ) -> None:
        """Add this mode's constraint (and any turn it needs) to the request."""
        raise NotImplementedError  # pragma: no cover - each engine defines it

    def _answer(self, reply: _Reply, call: SegmentCall) -> str:
        """The answer text in ``reply`` (``[N]`` markers in prose)."""
        raise NotImplementedError  # pragma: no cover - each engine defines it

    # ------------------------------------------------------------------ answers

    @property
    def _where(self) -> str:
        return f"the OpenAI {_API_NAMES[self.api]} API at {self._clients.base_url}"

    def _result(self, payload: bytes, call: SegmentCall) -> SegmentResult:
        try:
            data = _body(payload)
            reply = _read_responses(data) if self.api == "responses" else _read_chat(data)
            if reply.refusals:
                refusal = _excerpt(" ".join(reply.refusals), 1000)
                raise BackendError(f"a refusal to answer: {refusal}")
            text = "".join(reply.texts) if call.grammar is None else self._answer(reply, call)
        except BackendError as exc:
            secrets = self._clients.secrets
            raise BackendError(_redact(f"{self._where} sent {exc}", secrets)) from _cause(
                exc, secrets
            )
        return SegmentResult(
            text=text,
            finish=reply.finish,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
        )

    def _error(self, exc: Exception) -> BackendError:
        hint = f"check model={self.model!r} (it must support {self._feature}) and the API key"
        if self.send_sampling:
            hint += "; a model that refuses temperature or top_p needs send_sampling=False"
        return self._clients.error(
            exc,
            where=self._where,
            refused_hint=hint,
            unreachable_hint="check the network, any proxy, and the client's base_url",
        )


class OpenAIGrammarToolEngine(_HostedEngine):
    """The citation grammar, in Lark, as the input format of a forced custom tool.

    Every call forces the ``answer`` tool whose input grammar is the call's grammar, so
    the answer is grammatical; a call with a prefix (a continuation after the validator
    rejected a marker, or after a partial group) adds a user turn holding the accepted
    text and sends the continuation grammar. ``temperature`` and ``top_p`` are not sent
    unless ``send_sampling=True`` (GPT-5 reasoning models refuse them).

    Args:
        client: a synchronous ``openai.OpenAI`` (for ``complete``).
        async_client: an ``openai.AsyncOpenAI`` (for ``acomplete``, natively async).
        model: a model that takes custom-tool grammars (the GPT-5 family).
        api: ``"responses"`` or ``"chat"`` (Chat Completions).
        send_sampling: send ``temperature``/``top_p`` (and ``seed`` on chat); default off.
        timeout: seconds for one HTTP attempt.
        max_retries: SDK retries after the first attempt (0: none).
        extra: more body fields (e.g. ``{"reasoning": {"effort": "low"}}``); fields the
            engine sets are refused.

    Raises:
        ConfigurationError: no client, an unknown ``api``, a bad ``timeout``/``max_retries``
            or a refused ``extra`` field.
        MissingDependencyError: the ``openai`` package is not installed.
    """

    continues_prefix: ClassVar[bool] = True
    _feature: ClassVar[str] = "custom tools with Lark grammars, e.g. a GPT-5 model"
    _sends_sampling: ClassVar[bool] = False

    def _constrain(
        self, call: SegmentCall, messages: list[dict[str, str]], kwargs: dict[str, Any]
    ) -> None:
        if call.prefix:
            note = _OPEN_MARKER_NOTE if call.prefix.endswith(MARKER_OPEN) else ""
            messages.append(
                {"role": "user", "content": _CONTINUE.format(note=note, prefix=call.prefix)}
            )
        if call.grammar is None:
            return
        definition = emit(call.grammar, Dialect.LARK)
        check_grammar_text(definition, Dialect.LARK)
        description = _REST_TOOL if call.prefix else _FIRST_TOOL
        if self.api == "responses":
            kwargs["tools"] = [
                {
                    "type": "custom",
                    "name": ANSWER_TOOL,
                    "description": description,
                    "format": {"type": "grammar", "syntax": "lark", "definition": definition},
                }
            ]
            kwargs["tool_choice"] = {"type": "custom", "name": ANSWER_TOOL}
        else:
            grammar = {"syntax": "lark", "definition": definition}
            kwargs["tools"] = [
                {
                    "type": "custom",
                    "custom": {
                        "name": ANSWER_TOOL,
                        "description": description,
                        "format": {"type": "grammar", "grammar": grammar},
                    },
                }
            ]
            kwargs["tool_choice"] = {"type": "custom", "custom": {"name": ANSWER_TOOL}}

    def _answer(self, reply: _Reply, call: SegmentCall) -> str:
        if reply.tool_inputs:
            return reply.tool_inputs[0]
        if reply.finish == "length":
            return ""  # the token limit came before the tool call
        raise BackendError(f"no call of the {ANSWER_TOOL!r} tool, which was forced")


class OpenAIJsonSchemaEngine(_HostedEngine):
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

    def _answer(self, reply: _Reply, call: SegmentCall) -> str:
        text = "".join(reply.texts)
        if not text.strip() and reply.finish == "length":
            return ""
        return render_answer(_parse_answer(text, cut=reply.finish == "length"))


HOSTED_ENGINES: dict[str, type[OpenAIGrammarToolEngine | OpenAIJsonSchemaEngine]] = {
    "cfg": OpenAIGrammarToolEngine,
    "json_schema": OpenAIJsonSchemaEngine,
}
"""The engine of each hosted ``OpenAIBackend`` mode."""
