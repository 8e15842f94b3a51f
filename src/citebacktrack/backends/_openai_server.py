"""OpenAICompatibleEngine: one grammar-constrained segment per request to an OpenAI-protocol server.

A :class:`~citebacktrack.segments.SegmentEngine` over the OpenAI SDK, for a llama.cpp
server (``python -m llama_cpp.server`` or the C++ ``llama-server``) or a vLLM server.
What each server needs, read from their sources:

========================  =================================  ===================================
                          llama.cpp servers                  vLLM 0.33
========================  =================================  ===================================
grammar field             ``grammar`` (GBNF text)            ``structured_outputs.grammar``
grammar dialect           GBNF                               XGrammar EBNF (``::=``, the default
                                                             xgrammar backend) or Lark (the
                                                             guidance backend)
continue a prefix (chat)  C++ ``llama-server`` continues a   ``continue_final_message=true``,
                          trailing assistant message;        ``add_generation_prompt=false``
                          llama-cpp-python's server cannot
"]" stop vs end of text   not reported: both ``"stop"``      ``stop_reason``: the stop string,
                          (told apart by the open marker)    or null at EOS
========================  =================================  ===================================

vLLM ignores the removed ``guided_*`` fields with HTTP 200 (unconstrained output), so none
is ever sent and ``extra`` refuses them. Every grammar is parsed here before it is sent
(an invalid GBNF grammar crashed llama-cpp-python's server): by llama.cpp's own parser when
``llama_cpp`` is installed, else by a structural check, and by XGrammar for vLLM.

Retries are the SDK's own (429, 408, 409, 5xx, timeouts and connection errors; exponential
backoff from 0.5 s to 8 s with jitter, ``Retry-After``/``Retry-After-Ms`` in seconds or as
an HTTP date honoured up to 120 s): the engine sets ``max_retries`` and ``timeout`` on its
copy of each client and never retries itself. Requests are not streamed: the segment loop
releases text at sentence boundaries anyway.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import JsonValue

from citebacktrack._arguments import choice, flag, function, member
from citebacktrack.backends._sdk import (
    OpenAIClients,
    OpenAIEngine,
    check_api_key,
    check_base_url,
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
from citebacktrack.grammar._gbnf_check import check_grammar_text
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.segments import SegmentCall, SegmentResult
from citebacktrack.types import ChatMessage

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI

__all__ = ["ChatTemplate", "OpenAICompatibleEngine", "chatml", "parse_response"]

ChatTemplate = Callable[[Sequence[ChatMessage], str], str]
"""Renders chat messages and the accepted answer prefix as one completion prompt."""

Server = Literal["llama.cpp", "vllm"]
Endpoint = Literal["completions", "chat"]

_SERVER_NAMES: dict[str, str] = {"llama.cpp": "llama.cpp server", "vllm": "vLLM server"}
_DIALECTS: dict[str, tuple[Dialect, ...]] = {
    "llama.cpp": (Dialect.GBNF,),
    "vllm": (Dialect.EBNF, Dialect.LARK),
}
# Body fields the engine owns: an ``extra`` entry may not override them.
_OWNED_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "grammar",
        "structured_outputs",
        "continue_final_message",
        "add_generation_prompt",
    }
)
# An open citation marker at the end of the text: only the "]" stop can end a segment there.
_OPEN_MARKER = re.compile(r"\[[0-9]+\Z")


def chatml(messages: Sequence[ChatMessage], prefix: str) -> str:
    """Render ``messages`` in ChatML with the assistant turn opened and ``prefix`` written.

    The form SmolLM2's GGUF template renders (and :class:`LlamaCppBackend` tokenizes)::

        <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n
        <|im_start|>assistant\\n{prefix}
    """
    turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return f"{turns}<|im_start|>assistant\n{prefix}"


class OpenAICompatibleEngine(OpenAIEngine):
    """Generates one segment per call on a llama.cpp or vLLM server through the OpenAI SDK.

    ``complete`` needs ``client``, ``acomplete`` needs ``async_client`` (natively async, no
    thread); pass either or both. The engine keeps copies of them with its ``timeout`` and
    ``max_retries`` set, so the clients given stay as they were.

    Args:
        client: a synchronous ``openai.OpenAI`` whose ``base_url`` is the server's ``/v1``.
        async_client: an ``openai.AsyncOpenAI`` for the same server.
        model: the model name the server serves.
        server: ``"llama.cpp"`` sends ``grammar`` (GBNF); ``"vllm"`` sends
            ``structured_outputs.grammar``.
        endpoint: ``"completions"`` renders the prompt here with ``chat_template`` and
            appends the accepted prefix; ``"chat"`` uses the server's chat template and sends
            the prefix as a trailing assistant message to continue.
        chat_template: for ``endpoint="completions"``; default :func:`chatml`.
        grammar_dialect: what vLLM gets: ``Dialect.EBNF`` (default, for its xgrammar
            backend) or ``Dialect.LARK`` (for ``--structured-outputs-config.backend
            guidance``). llama.cpp takes GBNF only.
        assistant_prefill: llama.cpp with ``endpoint="chat"`` only: the server continues a
            trailing assistant message. The C++ ``llama-server`` does (unless started with
            ``--no-prefill-assistant``); llama-cpp-python's server does not, so chat on it is
            refused: use ``endpoint="completions"``.
        timeout: seconds for one HTTP attempt.
        max_retries: SDK retries after the first attempt (0: none).
        extra: more JSON body fields for the server (e.g. ``{"top_k": 1}``); fields the
            engine sets, and vLLM's removed ``guided_*`` fields, are refused.

    Raises:
        ConfigurationError: an argument of the wrong type or value (checked first: e.g.
            ``model=None``, ``timeout="60"``, ``server="tgi"``; names in any case), a
            dialect the server cannot read, chat on llama.cpp without
            ``assistant_prefill``, a ``chat_template`` with the chat endpoint, a refused
            ``extra`` field, or no client.
        MissingDependencyError: the ``openai`` package is not installed.
    """

    def __init__(
        self,
        *,
        client: OpenAI | None = None,
        async_client: AsyncOpenAI | None = None,
        model: str,
        server: Server = "llama.cpp",
        endpoint: Endpoint = "completions",
        chat_template: ChatTemplate | None = None,
        grammar_dialect: Dialect | None = None,
        assistant_prefill: bool = False,
        timeout: float = 60.0,
        max_retries: int = 2,
        extra: Mapping[str, JsonValue] | None = None,
    ) -> None:
        server, endpoint, dialect = _check_arguments(
            model=model,
            server=server,
            endpoint=endpoint,
            chat_template=chat_template,
            grammar_dialect=grammar_dialect,
            assistant_prefill=assistant_prefill,
            timeout=timeout,
            max_retries=max_retries,
        )
        extra_fields = check_extra(extra, _OWNED_FIELDS, refuse=_refuse_guided)
        clients = OpenAIClients(
            type(self).__name__,
            client,
            async_client,
            timeout=timeout,
            max_retries=max_retries,
            example="base_url=...",
        )
        self.model = model
        self.server: Server = server
        self.endpoint: Endpoint = endpoint
        self.chat_template: ChatTemplate = chat_template or chatml
        self.grammar_dialect = dialect
        self.timeout = clients.timeout
        self.max_retries = clients.max_retries
        self.extra: dict[str, JsonValue] = extra_fields
        self._clients = clients

    @classmethod
    def from_base_url(
        cls,
        base_url: str,
        *,
        model: str,
        api_key: str = "unused",
        server: Server = "llama.cpp",
        endpoint: Endpoint = "completions",
        chat_template: ChatTemplate | None = None,
        grammar_dialect: Dialect | None = None,
        assistant_prefill: bool = False,
        timeout: float = 60.0,
        max_retries: int = 2,
        extra: Mapping[str, JsonValue] | None = None,
    ) -> OpenAICompatibleEngine:
        """Build both clients for the server at ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``).

        The engine owns them: :meth:`close` / :meth:`aclose` close them. ``api_key``
        defaults to a placeholder (local servers take any), never to ``OPENAI_API_KEY``:
        that key is not sent to a server it was not meant for. Other arguments are the
        constructor's, all checked before the clients are built.
        """
        check_base_url(base_url, "http://127.0.0.1:8080/v1")
        check_api_key(api_key)
        _check_arguments(
            model=model,
            server=server,
            endpoint=endpoint,
            chat_template=chat_template,
            grammar_dialect=grammar_dialect,
            assistant_prefill=assistant_prefill,
            timeout=timeout,
            max_retries=max_retries,
        )
        check_extra(extra, _OWNED_FIELDS, refuse=_refuse_guided)
        sdk = import_openai()
        engine = cls(
            client=sdk.OpenAI(base_url=base_url, api_key=api_key),
            async_client=sdk.AsyncOpenAI(base_url=base_url, api_key=api_key),
            model=model,
            server=server,
            endpoint=endpoint,
            chat_template=chat_template,
            grammar_dialect=grammar_dialect,
            assistant_prefill=assistant_prefill,
            timeout=timeout,
            max_retries=max_retries,
            extra=extra,
        )
        engine._clients.owned = True
        return engine

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self._clients.base_url!r}, model={self.model!r}, "
            f"server={self.server!r}, endpoint={self.endpoint!r})"
        )

    def _resource(self, client: Any) -> Any:
        """The SDK resource a request goes to: chat completions or completions."""
        return client.chat.completions if self.endpoint == "chat" else client.completions

    def _request(self, call: SegmentCall) -> dict[str, Any]:
        """The SDK keyword arguments for ``call``, its grammar emitted and checked."""
        if call.max_tokens < 1:
            raise ConfigurationError(f"max_tokens must be at least 1, got {call.max_tokens}")
        body: dict[str, Any] = dict(self.extra)
        kwargs: dict[str, Any] = {
            "model": self.model,
            "temperature": call.temperature,
            "top_p": call.top_p,
        }
        if call.stop:
            kwargs["stop"] = list(call.stop)
        if call.seed is not None:
            kwargs["seed"] = call.seed
        if call.grammar is not None:  # None: an unconstrained call (the raw-model baseline)
            grammar = emit(call.grammar, self.grammar_dialect)
            check_grammar_text(grammar, self.grammar_dialect)
            if self.server == "vllm":
                body["structured_outputs"] = {"grammar": grammar}
            else:
                body["grammar"] = grammar
        if self.endpoint == "completions":
            kwargs["prompt"] = self.chat_template(call.messages, call.prefix)
            kwargs["max_tokens"] = call.max_tokens
            if self.server == "vllm":
                # The template writes any BOS itself, as vLLM's chat endpoint assumes.
                body["add_special_tokens"] = False
        else:
            messages = [{"role": m.role, "content": m.content} for m in call.messages]
            if call.prefix:
                messages.append({"role": "assistant", "content": call.prefix})
                if self.server == "vllm":
                    body["continue_final_message"] = True
                    body["add_generation_prompt"] = False
            kwargs["messages"] = messages
            # llama-cpp-python reads only max_tokens; vLLM deprecated it for chat.
            key = "max_completion_tokens" if self.server == "vllm" else "max_tokens"
            kwargs[key] = call.max_tokens
        kwargs["extra_body"] = body
        return kwargs

    def _result(self, payload: bytes, call: SegmentCall) -> SegmentResult:
        try:
            return parse_response(payload, endpoint=self.endpoint, call=call)
        except BackendError as exc:
            text = f"the {_SERVER_NAMES[self.server]} at {self._clients.base_url} sent {exc}"
            secrets = self._clients.secrets
            raise BackendError(redact_key(text, secrets)) from safe_cause(exc, secrets)

    def _error(self, exc: Exception) -> BackendError:
        """Map an SDK error to a BackendError whose message names no secret."""
        return self._clients.error(
            exc,
            where=f"the {_SERVER_NAMES[self.server]} at {self._clients.base_url}",
            refused_hint=(
                f"check model={self.model!r}, the server kind ({self.server!r}) and the API key"
            ),
            unreachable_hint="check that the server is running and answers whole responses",
        )


def _check_arguments(
    *,
    model: object,
    server: object,
    endpoint: object,
    chat_template: object,
    grammar_dialect: object,
    assistant_prefill: object,
    timeout: object,
    max_retries: object,
) -> tuple[Server, Endpoint, Dialect]:
    """The engine's arguments checked (each by its rule, then together): the server, the
    endpoint and the grammar dialect, as names matched ignoring case."""
    check_model(model, "smollm2")
    server_name = cast(Server, choice("server", server, _SERVER_NAMES))
    endpoint_name = cast(Endpoint, choice("endpoint", endpoint, ("completions", "chat")))
    dialect = (
        _DIALECTS[server_name][0]
        if grammar_dialect is None
        else member("grammar_dialect", grammar_dialect, Dialect)
    )
    function(
        "chat_template",
        chat_template,
        "pass a function (messages, prefix) -> prompt such as chatml, or None",
    )
    prefill = flag("assistant_prefill", assistant_prefill)
    check_timing(timeout, max_retries)
    if dialect not in _DIALECTS[server_name]:
        allowed = ", ".join(d.value for d in _DIALECTS[server_name])
        raise ConfigurationError(
            f"a {_SERVER_NAMES[server_name]} reads grammars in {allowed}, not {dialect.value}"
        )
    if endpoint_name == "chat" and chat_template is not None:
        raise ConfigurationError(
            "chat_template renders prompts for endpoint='completions'; with endpoint='chat' "
            "the server applies the model's own template"
        )
    if endpoint_name == "chat" and server_name == "llama.cpp" and not prefill:
        raise ConfigurationError(
            "a llama.cpp server's chat endpoint can continue the accepted text only if it "
            "prefills a trailing assistant message (the C++ llama-server does by default: "
            "pass assistant_prefill=True); llama-cpp-python's server cannot, so use "
            "endpoint='completions' (with chat_template) there"
        )
    return server_name, endpoint_name, dialect


def parse_response(payload: bytes, *, endpoint: Endpoint, call: SegmentCall) -> SegmentResult:
    """Read a non-streamed (chat) completion body as a :class:`SegmentResult`.

    ``"stop"`` covers both a stop string and the end of the text on OpenAI-protocol
    servers. vLLM says which in ``stop_reason`` (the stop string, or null at EOS); the C++
    llama-server in ``stop_type`` only outside the OpenAI routes, and llama-cpp-python not
    at all. Without them a segment that ends inside an open marker (``... [2``, counting
    the accepted prefix) was cut by the ``]`` stop, since the grammar cannot end there;
    anything else ended with the model.

    Raises:
        BackendError: the body is not JSON, carries an error, or lacks choices, text or a
            known finish reason.
    """
    data = load_json(payload, "a response")
    if not isinstance(data, dict):
        raise BackendError(f"a JSON {type(data).__name__} instead of a completion object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        error = data.get("error")
        if error is not None:
            raise BackendError(f"an error instead of a completion: {excerpt(error)}")
        raise BackendError(f"a completion without choices: {excerpt(data)}")
    choice: dict[str, Any] = choices[0]
    text = _choice_text(choice, endpoint)
    reason = choice.get("finish_reason")
    finish: Literal["stop", "end", "length"]
    if reason == "length":
        finish = "length"
    elif reason == "stop":
        finish = "stop" if _hit_stop(choice, call.prefix + text) else "end"
    else:
        raise BackendError(
            f"finish_reason {reason!r}, which is neither 'stop' nor 'length' (an aborted or "
            "filtered generation)"
        )
    prompt_tokens, completion_tokens = read_usage(data.get("usage"))
    return SegmentResult(
        text=text,
        finish=finish,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


def _choice_text(choice: Mapping[str, Any], endpoint: Endpoint) -> str:
    if endpoint == "completions":
        text = choice.get("text")
    else:
        message = choice.get("message")
        if not isinstance(message, dict):
            raise BackendError(f"a chat choice without a message: {excerpt(choice)}")
        text = message.get("content")
        if text is None:  # an empty answer (e.g. EOS at once) comes back as null
            text = ""
    if not isinstance(text, str):
        raise BackendError(f"a choice without text: {excerpt(choice)}")
    return text


def _hit_stop(choice: Mapping[str, Any], generated: str) -> bool:
    """Whether a ``"stop"`` finish was a stop string (True) or the model's end (False)."""
    if "stop_reason" in choice:  # vLLM: the stop string, a stop token id, or null at EOS
        return isinstance(choice["stop_reason"], str)
    stop_type = choice.get("stop_type")  # llama-server's own (non-OpenAI) field
    if stop_type in ("word", "eos"):
        return bool(stop_type == "word")
    return _OPEN_MARKER.search(generated) is not None


def _refuse_guided(key: str) -> None:
    if key.startswith("guided_"):
        raise ConfigurationError(
            f"extra field {key!r}: vLLM removed the guided_* fields and ignores them "
            "(unconstrained output); the engine sends the grammar as "
            "structured_outputs.grammar itself"
        )
