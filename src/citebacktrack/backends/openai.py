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

import contextlib
import functools
import json
import re
import reprlib
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import JsonValue

from citebacktrack.backends.segment import SegmentBackend
from citebacktrack.errors import (
    BackendClosedError,
    BackendError,
    ConfigurationError,
    GrammarError,
    MissingDependencyError,
)
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.segments import SegmentCall, SegmentEngine, SegmentResult
from citebacktrack.types import ChatMessage

if TYPE_CHECKING:
    from types import ModuleType

    from openai import AsyncOpenAI, OpenAI

__all__ = [
    "ChatTemplate",
    "OpenAIBackend",
    "OpenAICompatibleEngine",
    "chatml",
    "check_grammar_text",
]

ChatTemplate = Callable[[Sequence[ChatMessage], str], str]
"""Renders chat messages and the accepted answer prefix as one completion prompt."""

Server = Literal["llama.cpp", "vllm"]
Endpoint = Literal["completions", "chat"]
HostedMode = Literal["json_schema", "cfg"]
Mode = Literal["server", "json_schema", "cfg"]

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
_SHORTEST_REDACTED_KEY = 8


def chatml(messages: Sequence[ChatMessage], prefix: str) -> str:
    """Render ``messages`` in ChatML with the assistant turn opened and ``prefix`` written.

    The form SmolLM2's GGUF template renders (and :class:`LlamaCppBackend` tokenizes)::

        <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n
        <|im_start|>assistant\\n{prefix}
    """
    turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return f"{turns}<|im_start|>assistant\n{prefix}"


class OpenAICompatibleEngine:
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
        ConfigurationError: no client, a dialect the server cannot read, chat on llama.cpp
            without ``assistant_prefill``, a ``chat_template`` with the chat endpoint, a
            bad ``timeout``/``max_retries``, or a refused ``extra`` field.
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
        if server not in _SERVER_NAMES:
            raise ConfigurationError(f"server must be 'llama.cpp' or 'vllm', got {server!r}")
        if endpoint not in ("completions", "chat"):
            raise ConfigurationError(f"endpoint must be 'completions' or 'chat', got {endpoint!r}")
        try:
            dialect = _DIALECTS[server][0] if grammar_dialect is None else Dialect(grammar_dialect)
        except ValueError as exc:
            raise ConfigurationError(
                f"unknown grammar_dialect {grammar_dialect!r}; use a citebacktrack Dialect"
            ) from exc
        if dialect not in _DIALECTS[server]:
            allowed = ", ".join(d.value for d in _DIALECTS[server])
            raise ConfigurationError(
                f"a {_SERVER_NAMES[server]} reads grammars in {allowed}, not {dialect.value}"
            )
        if endpoint == "chat" and chat_template is not None:
            raise ConfigurationError(
                "chat_template renders prompts for endpoint='completions'; with endpoint='chat' "
                "the server applies the model's own template"
            )
        if endpoint == "chat" and server == "llama.cpp" and not assistant_prefill:
            raise ConfigurationError(
                "a llama.cpp server's chat endpoint can continue the accepted text only if it "
                "prefills a trailing assistant message (the C++ llama-server does by default: "
                "pass assistant_prefill=True); llama-cpp-python's server cannot, so use "
                "endpoint='completions' (with chat_template) there"
            )
        clients = _Clients(
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
        self.max_retries = max_retries
        self.extra: dict[str, JsonValue] = _check_extra(extra or {})
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
        constructor's.
        """
        sdk = _import_openai()
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

    def close(self) -> None:
        """Close the synchronous client if this engine built it (:meth:`from_base_url`).

        Injected clients are left open for their owner. An async client needs
        :meth:`aclose`, from its event loop.
        """
        self._clients.close()

    async def aclose(self) -> None:
        """Close both clients if this engine built them (:meth:`from_base_url`)."""
        await self._clients.aclose()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self._clients.base_url!r}, model={self.model!r}, "
            f"server={self.server!r}, endpoint={self.endpoint!r})"
        )

    def complete(self, call: SegmentCall) -> SegmentResult:
        """Generate one segment (blocking; the SDK retries transient failures).

        Raises:
            GrammarError: the grammar cannot be emitted or does not parse (no request sent).
            ConfigurationError: no synchronous client, or ``max_tokens`` below 1.
            BackendClosedError: :meth:`close` closed the clients this engine built.
            BackendError: the server failed, timed out, was unreachable, or answered with
                something that is not a completion.
        """
        client = self._clients.sync()
        kwargs = self._request(call)
        try:
            if self.endpoint == "chat":
                raw = client.chat.completions.with_raw_response.create(**kwargs)
            else:
                raw = client.completions.with_raw_response.create(**kwargs)
        except self._clients.sdk.OpenAIError as exc:
            raise self._error(exc) from _cause(exc, self._clients.secrets)
        return self._result(raw.content, call)

    async def acomplete(self, call: SegmentCall) -> SegmentResult:
        """Generate one segment on the async client (see :meth:`complete`)."""
        self._clients.check_async()
        kwargs = self._request(call)
        try:
            async with self._clients.session() as client:
                if self.endpoint == "chat":
                    raw = await client.chat.completions.with_raw_response.create(**kwargs)
                else:
                    raw = await client.completions.with_raw_response.create(**kwargs)
        except self._clients.sdk.OpenAIError as exc:
            raise self._error(exc) from _cause(exc, self._clients.secrets)
        return self._result(raw.content, call)

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
            return _parse_response(payload, endpoint=self.endpoint, call=call)
        except BackendError as exc:
            text = f"the {_SERVER_NAMES[self.server]} at {self._clients.base_url} sent {exc}"
            secrets = self._clients.secrets
            raise BackendError(_redact(text, secrets)) from _cause(exc, secrets)

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


def _parse_response(payload: bytes, *, endpoint: Endpoint, call: SegmentCall) -> SegmentResult:
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
    data = _load_json(payload, "a response")
    if not isinstance(data, dict):
        raise BackendError(f"a JSON {type(data).__name__} instead of a completion object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        error = data.get("error")
        if error is not None:
            raise BackendError(f"an error instead of a completion: {_excerpt(error)}")
        raise BackendError(f"a completion without choices: {_excerpt(data)}")
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
    prompt_tokens, completion_tokens = _usage(data.get("usage"))
    return SegmentResult(
        text=text,
        finish=finish,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


def _load_json(payload: bytes | str, what: str) -> Any:
    """``payload`` parsed as JSON, or a BackendError naming ``what`` it was.

    Besides malformed JSON and bytes that are not UTF-8, Python's reader refuses an integer
    of more than 4300 digits (``ValueError``) and nesting deeper than the interpreter's
    recursion limit (``RecursionError``); a server's body is refused alike for all of them.
    """
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise BackendError(f"{what} that is not JSON: {_excerpt(payload)}") from exc


def _choice_text(choice: Mapping[str, Any], endpoint: Endpoint) -> str:
    if endpoint == "completions":
        text = choice.get("text")
    else:
        message = choice.get("message")
        if not isinstance(message, dict):
            raise BackendError(f"a chat choice without a message: {_excerpt(choice)}")
        text = message.get("content")
        if text is None:  # an empty answer (e.g. EOS at once) comes back as null
            text = ""
    if not isinstance(text, str):
        raise BackendError(f"a choice without text: {_excerpt(choice)}")
    return text


def _hit_stop(choice: Mapping[str, Any], generated: str) -> bool:
    """Whether a ``"stop"`` finish was a stop string (True) or the model's end (False)."""
    if "stop_reason" in choice:  # vLLM: the stop string, a stop token id, or null at EOS
        return isinstance(choice["stop_reason"], str)
    stop_type = choice.get("stop_type")  # llama-server's own (non-OpenAI) field
    if stop_type in ("word", "eos"):
        return bool(stop_type == "word")
    return _OPEN_MARKER.search(generated) is not None


def _usage(
    usage: object, keys: tuple[str, str] = ("prompt_tokens", "completion_tokens")
) -> tuple[int, int]:
    """The prompt and completion token counts of a ``usage`` object, under ``keys``
    (0 where absent)."""
    if usage is None:
        return 0, 0
    if not isinstance(usage, dict):
        raise BackendError(f"usage that is not an object: {_excerpt(usage)}")
    counts = []
    for key in keys:
        value = usage.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BackendError(f"usage.{key} that is not a token count: {value!r}")
        counts.append(value)
    return counts[0], counts[1]


def check_grammar_text(text: str, dialect: Dialect | str) -> None:
    """Parse grammar ``text`` as ``dialect`` would on the server, without sending it.

    GBNF goes through llama.cpp's own parser when ``llama_cpp`` is installed (it prints
    its reason on stderr), else through a structural check (rules, names, brackets,
    repetition bounds); EBNF and Lark through XGrammar, as vLLM's xgrammar backend parses
    them. Results are cached by text.

    Raises:
        GrammarError: the grammar does not parse.
    """
    _check_cached(text, Dialect(dialect))


@functools.lru_cache(maxsize=128)
def _check_cached(text: str, dialect: Dialect) -> None:
    if dialect is Dialect.GBNF:
        _check_gbnf_structure(text)
        _check_gbnf_with_llama_cpp(text)
        return
    import xgrammar

    parse = xgrammar.Grammar.from_ebnf if dialect is Dialect.EBNF else xgrammar.Grammar.from_lark
    try:
        parse(text)
    except Exception as exc:  # XGrammar raises RuntimeError (and others) from C++
        raise GrammarError(
            f"XGrammar cannot parse the {dialect.value} grammar: {exc}; check it with "
            f"`citebacktrack grammar --dialect {dialect.value}`"
        ) from exc


def _check_gbnf_with_llama_cpp(text: str) -> None:
    from citebacktrack.backends.llamacpp_runtime import _import_llama_cpp

    try:
        llama_cpp = _import_llama_cpp()  # also closes llama_cpp's /dev/null files at exit
    except (MissingDependencyError, BackendError):
        return  # the structural check stands alone
    # No vocabulary is needed to parse (llama.cpp's own grammar tests pass NULL).
    sampler = llama_cpp.llama_sampler_init_grammar(None, text.encode("utf-8"), b"root")
    if not sampler:
        raise GrammarError(
            "llama.cpp could not parse the GBNF grammar (its parser's message is on stderr); "
            "check it with `citebacktrack grammar --dialect gbnf`"
        )
    llama_cpp.llama_sampler_free(sampler)


_GBNF_LEXEME = re.compile(
    r"""(?P<newline>[ \t\r]*(?:\#[^\n]*)?\n)
    | (?P<space>[ \t\r]+|\#[^\n]*)
    | (?P<define>::=)
    | (?P<literal>"(?:[^"\\\n]|\\.)*")
    | (?P<charclass>\[(?:[^\]\\\n]|\\.)*\])
    | (?P<name>[A-Za-z0-9-]+)
    | (?P<repeat>\{[ ]*(?P<lo>[0-9]+)[ ]*(?P<comma>,)?[ ]*(?P<hi>[0-9]*)[ ]*\})
    | (?P<op>[|()*+?.])""",
    re.VERBOSE,
)
_GBNF_MAX_REPEAT = 2000


def _check_gbnf_structure(text: str) -> None:
    """Check GBNF without llama.cpp: rules, names, brackets and repetition bounds.

    Stricter than llama.cpp in one way: token references (``<[id]>``) are refused, as the
    IR never writes them.
    """
    tokens: list[re.Match[str]] = []
    pos = 0
    while pos < len(text):
        match = _GBNF_LEXEME.match(text, pos)
        if match is None:
            raise GrammarError(f"GBNF grammar: unexpected {text[pos : pos + 20]!r} at offset {pos}")
        if match.lastgroup != "space":
            tokens.append(match)
        pos = match.end()
    defined: set[str] = set()
    used: list[re.Match[str]] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token.lastgroup == "newline":
            index += 1
        elif _starts_rule(tokens, index):
            if token.group() in defined:
                raise GrammarError(f"GBNF grammar: rule {token.group()!r} is defined twice")
            defined.add(token.group())
            index = _check_gbnf_body(tokens, index + 2, token.group(), used)
        else:
            raise GrammarError(
                f"GBNF grammar: expected 'name ::=' at offset {token.start()}, "
                f"got {token.group()!r}"
            )
    if "root" not in defined:
        raise GrammarError("GBNF grammar: no 'root' rule")
    for name in used:
        if name.group() not in defined:
            raise GrammarError(
                f"GBNF grammar: undefined rule {name.group()!r} at offset {name.start()}"
            )


def _starts_rule(tokens: Sequence[re.Match[str]], index: int) -> bool:
    return (
        tokens[index].lastgroup == "name"
        and index + 1 < len(tokens)
        and tokens[index + 1].lastgroup == "define"
    )


def _check_gbnf_body(
    tokens: Sequence[re.Match[str]], index: int, rule: str, used: list[re.Match[str]]
) -> int:
    """Check the body of ``rule`` starting at ``index``; return the index after it."""
    depth = 0
    after_atom = False  # a postfix operator needs something to repeat
    after_bar = False  # GBNF allows a newline after "|"
    empty = True
    while index < len(tokens) and not _starts_rule(tokens, index):
        token = tokens[index]
        kind, value = token.lastgroup, token.group()
        where = f"in rule {rule!r} at offset {token.start()}"
        if kind == "newline":
            if depth == 0 and not after_bar:
                break  # a newline outside parentheses ends the rule
            index += 1
            continue
        index += 1
        empty = False
        after_bar = value == "|"
        if kind == "define":
            raise GrammarError(f"GBNF grammar: stray '::=' {where}")
        if kind in ("literal", "charclass", "name") or value in (".", ")"):
            if kind == "name":
                used.append(token)
            if value == ")":
                depth -= 1
                if depth < 0:
                    raise GrammarError(f"GBNF grammar: unbalanced ')' {where}")
            after_atom = True
        elif value in ("(", "|"):
            depth += value == "("
            after_atom = False
        else:  # * + ? {m,n}
            if not after_atom:
                raise GrammarError(f"GBNF grammar: {value!r} repeats nothing {where}")
            if kind == "repeat":
                _check_gbnf_bounds(token, where)
            after_atom = False
    if depth:
        raise GrammarError(f"GBNF grammar: unclosed '(' in rule {rule!r}")
    if empty:
        raise GrammarError(f"GBNF grammar: rule {rule!r} has an empty body")
    return index


def _check_gbnf_bounds(token: re.Match[str], where: str) -> None:
    low = int(token.group("lo"))
    high = int(token.group("hi")) if token.group("hi") else low
    if token.group("comma") and token.group("hi") and high < low:
        raise GrammarError(f"GBNF grammar: bad repetition {token.group()} {where}")
    if max(low, high) > _GBNF_MAX_REPEAT:
        raise GrammarError(
            f"GBNF grammar: repetition {token.group()} {where} exceeds llama.cpp's limit of "
            f"{_GBNF_MAX_REPEAT}"
        )


def _check_extra(extra: Mapping[str, JsonValue]) -> dict[str, JsonValue]:
    for key in extra:
        if key.startswith("guided_"):
            raise ConfigurationError(
                f"extra field {key!r}: vLLM removed the guided_* fields and ignores them "
                "(unconstrained output); the engine sends the grammar as "
                "structured_outputs.grammar itself"
            )
        if key in _OWNED_FIELDS:
            raise ConfigurationError(
                f"extra field {key!r} is set by the engine from the SegmentCall; remove it"
            )
    return dict(extra)


def _status_message(exc: Any) -> str:
    """The server's own error message from an SDK status error (short)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message is not None:
            return _excerpt(message)
    return _excerpt(getattr(exc, "message", "") or "no message")


def _excerpt(value: object, limit: int = 200) -> str:
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    elif isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, default=str)
        except (ValueError, RecursionError):  # nested too deep to print (json.loads took it)
            text = reprlib.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if len(secret) >= _SHORTEST_REDACTED_KEY:
            text = text.replace(secret, "***")
    return text


def _cause(exc: BaseException, secrets: Sequence[str]) -> BaseException | None:
    """The SDK error to chain, or None when its text, or that of an error it was raised
    from (a transport error quoting a URL or header), would show an API key."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        rendered = f"{link!s} {link!r} {getattr(link, 'body', '')}"
        if any(len(s) >= _SHORTEST_REDACTED_KEY and s in rendered for s in secrets):
            return None
        link = link.__cause__ or link.__context__
    return exc


def _without_userinfo(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _import_openai() -> ModuleType:
    try:
        import openai
    except ImportError as exc:
        raise MissingDependencyError(
            feature="OpenAICompatibleEngine", extra="openai", module="openai"
        ) from exc
    return openai


class _Clients:
    """An engine's copies of its OpenAI SDK clients, and what it does with them.

    Shared by every engine over the SDK (:class:`OpenAICompatibleEngine` and the hosted
    engines of :mod:`citebacktrack.backends.openai_hosted`): the copies carry the engine's
    ``timeout`` and ``max_retries`` (the clients given stay as they were), their API keys
    are kept for redaction, SDK errors are mapped to :class:`BackendError` here, and only
    clients the engine built (``owned``) are closed by it.

    Raises:
        ConfigurationError: neither client, or a bad ``timeout``/``max_retries``.
        MissingDependencyError: the ``openai`` package is not installed.
    """

    def __init__(
        self,
        engine: str,
        client: OpenAI | None,
        async_client: AsyncOpenAI | None,
        *,
        timeout: float,
        max_retries: int,
        example: str = "",
    ) -> None:
        self.sdk = _import_openai()
        first = client or async_client
        if first is None:
            raise ConfigurationError(
                f"{engine} needs a client: pass client=openai.OpenAI({example}) for complete() "
                f"and/or async_client=openai.AsyncOpenAI({example}) for acomplete()"
            )
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be a positive number of seconds, got {timeout}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigurationError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        self.engine = engine
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.client = (
            None
            if client is None
            else client.with_options(timeout=timeout, max_retries=max_retries)
        )
        self.async_client = (
            None
            if async_client is None
            else async_client.with_options(timeout=timeout, max_retries=max_retries)
        )
        keys = {
            getattr(c, name, None)
            for c in (client, async_client)
            if c is not None
            for name in ("api_key", "admin_api_key")
        }
        self.secrets: tuple[str, ...] = tuple(k for k in keys if isinstance(k, str) and k)
        self.base_url = _without_userinfo(str(first.base_url))
        self.owned = False
        """Whether the engine built the clients (and so closes them); injected ones stay
        the caller's to close."""
        self.closed = False

    def sync(self) -> OpenAI:
        """The synchronous client for ``complete()``.

        Raises:
            ConfigurationError: none was given.
            BackendClosedError: the engine closed the clients it built.
        """
        if self.client is None:
            raise ConfigurationError(
                "complete() needs a synchronous client: pass client=openai.OpenAI(...) "
                "(or call acomplete())"
            )
        self._check_open()
        return self.client

    def check_async(self) -> None:
        """Raise unless ``acomplete()`` can run (as :meth:`sync` for the async client)."""
        if self.async_client is None:
            raise ConfigurationError(
                "acomplete() needs an async client: pass async_client=openai.AsyncOpenAI(...) "
                "(or call complete())"
            )
        self._check_open()

    def _check_open(self) -> None:
        if self.closed:
            raise BackendClosedError(
                f"this {self.engine} was closed and its HTTP clients with it; build a new engine"
            )

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Any]:
        """The async client for one call.

        An ``AsyncOpenAI`` client's connections belong to the event loop that opened
        them, and a pooled connection outliving its loop is closed by nobody. So an engine
        that built its clients opens a client per call and closes it in the same loop (one
        new connection per call); an injected client is used as given, within its owner's
        loop (the SDK's rule).
        """
        client = self.async_client
        if client is None:  # pragma: no cover - check_async comes first
            raise ConfigurationError("acomplete() needs an async client")
        if not self.owned:
            yield client
            return
        fresh = self.sdk.AsyncOpenAI(
            base_url=str(client.base_url),
            api_key=client.api_key,
            organization=client.organization,
            project=client.project,
        ).with_options(timeout=self.timeout, max_retries=self.max_retries)
        try:
            yield fresh
        finally:
            await fresh.close()

    def close(self) -> None:
        """Close the synchronous client if the engine built it."""
        if self.owned:
            self.closed = True
            if self.client is not None:
                self.client.close()

    async def aclose(self) -> None:
        """Close both clients if the engine built them."""
        self.close()
        if self.owned and self.async_client is not None:
            await self.async_client.close()

    def error(
        self, exc: Exception, *, where: str, refused_hint: str, unreachable_hint: str
    ) -> BackendError:
        """Map an SDK error to a BackendError whose message names no secret.

        ``where`` names the server or API; ``refused_hint`` says what to check after a
        4xx, ``unreachable_hint`` after a connection failure. Chain the SDK error with
        ``raise ... from _cause(exc, self.secrets)``.
        """
        sdk = self.sdk
        retries = self.max_retries
        tries = f"after {retries} retr{'y' if retries == 1 else 'ies'}"
        if isinstance(exc, sdk.APITimeoutError):
            text = (
                f"{where} did not answer within {self.timeout:g} s ({tries}); raise timeout= "
                "or check that the server is not overloaded"
            )
        elif isinstance(exc, sdk.APIConnectionError):
            reason = f": {exc.__cause__}" if exc.__cause__ is not None else ""
            text = f"the connection to {where} failed ({tries}){reason}; {unreachable_hint}"
        elif isinstance(exc, sdk.RateLimitError):
            text = (
                f"{where} is rate limiting (HTTP 429) {tries}: {_status_message(exc)}; lower "
                "the request rate or raise max_retries"
            )
        elif isinstance(exc, sdk.APIStatusError) and exc.status_code >= 500:
            text = f"{where} failed with HTTP {exc.status_code} {tries}: {_status_message(exc)}"
        elif isinstance(exc, sdk.APIStatusError):
            text = (
                f"{where} refused the request with HTTP {exc.status_code}: "
                f"{_status_message(exc)}; {refused_hint}"
            )
        else:
            text = f"the request to {where} failed: {type(exc).__name__}: {exc}"
        return BackendError(_redact(text, self.secrets))


class OpenAIBackend(SegmentBackend):
    """Segment-level backtracking over the OpenAI SDK: a served model or hosted OpenAI.

    ``mode`` picks how the citation grammar reaches the model, and so the engine:

    * ``"server"`` (default): an OpenAI-compatible server (llama.cpp, vLLM) that takes the
      grammar itself and continues the accepted text (:class:`OpenAICompatibleEngine`);
    * ``"cfg"``: hosted OpenAI, the grammar in Lark as the input format of a forced custom
      tool, the accepted text of a continuation in a user turn
      (:class:`~citebacktrack.backends.openai_hosted.OpenAIGrammarToolEngine`);
    * ``"json_schema"``: hosted OpenAI, Structured Outputs with the ids as an enum, one
      call per answer revised by the validator
      (:class:`~citebacktrack.backends.openai_hosted.OpenAIJsonSchemaEngine`).

    The other keyword arguments are that engine's (injected ``client`` and/or
    ``async_client``, ``model``, ...); or pass a ready ``engine``. :meth:`from_base_url`
    builds the clients for a server URL, :meth:`from_env` those of hosted OpenAI from
    ``OPENAI_API_KEY``. Every marker is checked by the shared segment loop
    (:mod:`citebacktrack.segments`) with the request's validator; :meth:`close` closes the
    clients the engine built.

    Raises:
        ConfigurationError: an unknown ``mode``, both an engine and options, or what the
            engine refuses.
    """

    def __init__(
        self, engine: SegmentEngine | None = None, *, mode: Mode = "server", **options: Any
    ) -> None:
        if engine is None:
            engine = _engine_for(mode, options)
        elif options or mode != "server":
            raise ConfigurationError(
                "pass either a ready engine or a mode and the engine's options, not both"
            )
        super().__init__(engine)

    @classmethod
    def from_base_url(cls, base_url: str, **options: Any) -> OpenAIBackend:
        """A backend for the server at ``base_url`` (see
        :meth:`OpenAICompatibleEngine.from_base_url` for the options)."""
        return cls(OpenAICompatibleEngine.from_base_url(base_url, **options))

    @classmethod
    def from_env(
        cls, *, model: str, mode: HostedMode = "json_schema", **options: Any
    ) -> OpenAIBackend:
        """A backend for hosted OpenAI with the key in ``OPENAI_API_KEY`` (see
        :meth:`~citebacktrack.backends.openai_hosted.OpenAIJsonSchemaEngine.from_env` for
        the options).

        Raises:
            ConfigurationError: ``OPENAI_API_KEY`` is unset, or ``mode`` is not hosted.
        """
        from citebacktrack.backends.openai_hosted import HOSTED_ENGINES

        engine_class = HOSTED_ENGINES.get(mode)
        if engine_class is None:
            raise ConfigurationError(
                f"from_env() builds hosted OpenAI backends: mode must be 'json_schema' or "
                f"'cfg', got {mode!r} (a server is reached with from_base_url())"
            )
        return cls(engine_class.from_env(model=model, **options))

    async def aclose(self) -> None:
        """Close the engine's clients from async code."""
        close = getattr(self.engine, "aclose", None)
        if callable(close):
            await close()


def _engine_for(mode: str, options: dict[str, Any]) -> SegmentEngine:
    if mode == "server":
        return OpenAICompatibleEngine(**options)
    from citebacktrack.backends.openai_hosted import HOSTED_ENGINES

    engine_class = HOSTED_ENGINES.get(mode)
    if engine_class is None:
        raise ConfigurationError(f"mode must be 'server', 'json_schema' or 'cfg', got {mode!r}")
    return engine_class(**options)
