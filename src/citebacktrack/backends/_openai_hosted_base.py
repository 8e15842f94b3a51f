"""The hosted OpenAI APIs as both hosted engines use them: request frame, replies, errors.

:class:`HostedEngine` is the base of the two hosted
:class:`~citebacktrack.segments.SegmentEngine` classes over the OpenAI SDK,
:class:`~citebacktrack.backends._openai_grammar_tool.OpenAIGrammarToolEngine` (``mode="cfg"``)
and :class:`~citebacktrack.backends._openai_json_schema.OpenAIJsonSchemaEngine`
(``mode="json_schema"``), each on the Responses API (``api="responses"``, the default) or
Chat Completions (``api="chat"``); both map a call to one request and its answer to one
:class:`~citebacktrack.segments.SegmentResult`. What each sends, read from the SDK's request types:

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
for a served model (both by ``citebacktrack.backends._sdk``), and API keys never appear in
messages or reprs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self, cast

from pydantic import JsonValue

from citebacktrack._arguments import choice, flag
from citebacktrack.backends._sdk import (
    OpenAIClients,
    OpenAIEngine,
    check_extra,
    check_model,
    check_timing,
    excerpt,
    import_openai,
    load_json,
    read_usage,
    redact_key,
    safe_cause,
)
from citebacktrack.errors import BackendError, ConfigurationError
from citebacktrack.segments import SegmentCall, SegmentResult

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI

__all__ = [
    "ANSWER_TOOL",
    "HostedEngine",
    "HostedReply",
    "read_body",
    "read_chat",
    "read_responses",
]

Api = Literal["responses", "chat"]

ANSWER_TOOL = "answer"
"""The name of the custom tool the ``cfg`` mode forces."""

API_NAMES: dict[str, str] = {"responses": "Responses", "chat": "Chat Completions"}
# Body fields the engines own: an ``extra`` entry may not override them.
OWNED_FIELDS = frozenset(
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


@dataclass(slots=True)
class HostedReply:
    """What one response said, whichever API sent it."""

    finish: Literal["end", "length"]
    texts: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    tool_inputs: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0


def read_body(payload: bytes) -> dict[str, Any]:
    """A response body as its JSON object; BackendError for anything else."""
    data = load_json(payload, "a response")
    if not isinstance(data, dict):
        raise BackendError(f"a JSON {type(data).__name__} instead of a response object")
    return data


def read_responses(data: Mapping[str, Any]) -> HostedReply:
    """Read a Responses API body (``object: "response"``)."""
    status = data.get("status")
    if data.get("error") is not None or status == "failed":
        raise BackendError(f"a failed response: {excerpt(data.get('error'))}")
    if status == "incomplete":
        details = data.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        if reason != "max_output_tokens":
            raise BackendError(f"an incomplete response (reason {reason!r})")
        reply = HostedReply("length")
    elif status == "completed":
        reply = HostedReply("end")
    else:
        raise BackendError(f"a response with status {status!r}, not 'completed'")
    output = data.get("output")
    if not isinstance(output, list):
        raise BackendError(f"a response without an output list: {excerpt(data)}")
    for item in output:
        if not isinstance(item, dict):
            raise BackendError(f"an output item that is not an object: {excerpt(item)}")
        kind = item.get("type")
        if kind == "message":
            parts = item.get("content")
            if not isinstance(parts, list):
                raise BackendError(f"a message without content: {excerpt(item)}")
            for part in parts:
                _read_part(part, reply)
        elif kind == "custom_tool_call" and item.get("name") == ANSWER_TOOL:
            text = item.get("input")
            if not isinstance(text, str):
                raise BackendError(f"a custom tool call without input: {excerpt(item)}")
            reply.tool_inputs.append(text)
        # Reasoning items and anything else carry no answer text.
    reply.prompt_tokens, reply.completion_tokens = read_usage(
        data.get("usage"), ("input_tokens", "output_tokens")
    )
    return reply


def _read_part(part: object, reply: HostedReply) -> None:
    """Take the text or refusal of one message part (other kinds carry neither)."""
    if not isinstance(part, dict):
        raise BackendError(f"a message part that is not an object: {excerpt(part)}")
    kind = part.get("type")
    key = {"output_text": "text", "refusal": "refusal"}.get(kind) if isinstance(kind, str) else None
    if key is None:
        return
    value = part.get(key)
    if not isinstance(value, str):
        raise BackendError(f"a {kind} part without its {key}: {excerpt(part)}")
    (reply.texts if key == "text" else reply.refusals).append(value)


def read_chat(data: Mapping[str, Any]) -> HostedReply:
    """Read a Chat Completions body (``object: "chat.completion"``)."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        error = data.get("error")
        if error is not None:
            raise BackendError(f"an error instead of a completion: {excerpt(error)}")
        raise BackendError(f"a completion without choices: {excerpt(data)}")
    choice: dict[str, Any] = choices[0]
    reason = choice.get("finish_reason")
    if reason in ("stop", "tool_calls"):  # a forced tool may end with either
        reply = HostedReply("end")
    elif reason == "length":
        reply = HostedReply("length")
    else:
        raise BackendError(
            f"finish_reason {reason!r}, which is neither 'stop', 'tool_calls' nor 'length' "
            "(a filtered or aborted generation)"
        )
    message = choice.get("message")
    if not isinstance(message, dict):
        raise BackendError(f"a chat choice without a message: {excerpt(choice)}")
    content, refusal = message.get("content"), message.get("refusal")
    if isinstance(content, str):
        reply.texts.append(content)
    if isinstance(refusal, str):
        reply.refusals.append(refusal)
    tool_calls = message.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise BackendError(f"tool_calls that are not a list: {excerpt(tool_calls)}")
    for tool_call in tool_calls:
        custom = tool_call.get("custom") if isinstance(tool_call, dict) else None
        if not isinstance(custom, dict) or custom.get("name") != ANSWER_TOOL:
            continue
        text = custom.get("input")
        if not isinstance(text, str):
            raise BackendError(f"a custom tool call without input: {excerpt(tool_call)}")
        reply.tool_inputs.append(text)
    reply.prompt_tokens, reply.completion_tokens = read_usage(data.get("usage"))
    return reply


# --------------------------------------------------------------------------- engines


def _check_arguments(
    model: object, api: object, send_sampling: object, timeout: object, max_retries: object
) -> Api:
    """The hosted engines' arguments checked by their rules; the API name (any case)."""
    check_model(model, "gpt-5")
    name = cast(Api, choice("api", api, API_NAMES))
    if send_sampling is not None:
        flag("send_sampling", send_sampling)
    check_timing(timeout, max_retries)
    return name


class HostedEngine(OpenAIEngine):
    """What both hosted engines share: clients, the request frame, reading the answer.

    A subclass says whether it ``continues_prefix``, what model feature it needs
    (``_feature``, for hints), whether it sends sampling fields by default
    (``_sends_sampling``), how a call is constrained (``_constrain``) and where the answer
    is in a reply (``_answer``).
    """

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
        api = _check_arguments(model, api, send_sampling, timeout, max_retries)
        fields = check_extra(extra, OWNED_FIELDS)
        self._clients = OpenAIClients(
            type(self).__name__, client, async_client, timeout=timeout, max_retries=max_retries
        )
        self.model = model
        self.api: Api = api
        self.send_sampling = self._sends_sampling if send_sampling is None else send_sampling
        self.timeout = self._clients.timeout
        self.max_retries = self._clients.max_retries
        self.extra: dict[str, JsonValue] = fields

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
            ConfigurationError: an argument of the wrong type or value (checked first), or
                ``OPENAI_API_KEY`` is unset or empty.
        """
        _check_arguments(model, api, send_sampling, timeout, max_retries)
        check_extra(extra, OWNED_FIELDS)
        key = os.environ.get("OPENAI_API_KEY", "").strip()
        if not key:
            raise ConfigurationError(
                f"{cls.__name__}.from_env() needs the OPENAI_API_KEY environment variable; "
                "set it, or pass client=openai.OpenAI(api_key=...)"
            )
        sdk = import_openai()
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

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self._clients.base_url!r}, model={self.model!r}, "
            f"api={self.api!r})"
        )

    def _resource(self, client: Any) -> Any:
        """The SDK resource a request goes to: responses or chat completions."""
        return client.responses if self.api == "responses" else client.chat.completions

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

    def _answer(self, reply: HostedReply, call: SegmentCall) -> str:
        """The answer text in ``reply`` (``[N]`` markers in prose)."""
        raise NotImplementedError  # pragma: no cover - each engine defines it

    # ------------------------------------------------------------------ answers

    @property
    def _where(self) -> str:
        return f"the OpenAI {API_NAMES[self.api]} API at {self._clients.base_url}"

    def _result(self, payload: bytes, call: SegmentCall) -> SegmentResult:
        try:
            data = read_body(payload)
            reply = read_responses(data) if self.api == "responses" else read_chat(data)
            if reply.refusals:
                refusal = excerpt(" ".join(reply.refusals), 1000)
                raise BackendError(f"a refusal to answer: {refusal}")
            text = "".join(reply.texts) if call.grammar is None else self._answer(reply, call)
        except BackendError as exc:
            secrets = self._clients.secrets
            raise BackendError(redact_key(f"{self._where} sent {exc}", secrets)) from safe_cause(
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
