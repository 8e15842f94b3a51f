"""AnthropicEngine: one whole answer per request, cited through Anthropic's Citations API.

A :class:`~citebacktrack.segments.SegmentEngine` over the ``anthropic`` SDK. The sources go
to Claude as ``document`` blocks with citations enabled (on all of them: the API takes all
or none), the question as a text block after them. Claude answers in text blocks, some
carrying ``char_location`` citations (``document_index`` and the cited span of that
document); this engine writes them as ``[N]`` markers (``N = document_index + 1``) at the
end of the sentence each cited block ends in, before its terminator, so that the shared
segment loop checks them with the request's validator like any other marker. The cited
spans come back as :class:`~citebacktrack.types.Evidence`, one per marker, where they
match the source text exactly.

What the API cannot do shapes the rest:

* no grammar and no assistant prefill (Claude 4.6 models answer 400 to a trailing
  assistant turn): the engine says ``continues_prefix = False`` and the loop asks for the
  whole answer once, then revises it; a continuation, if ever asked for, quotes the
  accepted text in the user turn;
* the SDK (1.x) has no ``temperature``/``top_p`` arguments: they go in the request body,
  and models that take no sampling parameters (Opus 4.7 and later, Claude 5: "`temperature`
  is deprecated for this model") need ``send_sampling=False``;
* brackets in Claude's own text are written as parentheses, so only a citation the API
  returned can become a marker.

Retries are the SDK's own (408, 409, 429, 5xx and 529, connection errors and timeouts,
with exponential backoff and ``Retry-After``/``retry-after-ms`` honoured): the engine sets
``max_retries`` and ``timeout`` on its copies of the clients and never retries itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import JsonValue

from citebacktrack.backends.openai import (
    _cause,
    _excerpt,
    _load_json,
    _redact,
    _status_message,
    _without_userinfo,
)
from citebacktrack.backends.segment import SegmentBackend
from citebacktrack.errors import (
    BackendClosedError,
    BackendError,
    ConfigurationError,
    MissingDependencyError,
)
from citebacktrack.segments import SegmentCall, SegmentResult
from citebacktrack.syntax import CLOSERS, MARKER_CLOSE, MARKER_OPEN, TERMINATORS, sentence_spans
from citebacktrack.types import Evidence, Source

if TYPE_CHECKING:
    from types import ModuleType

    from anthropic import Anthropic, AsyncAnthropic

__all__ = ["DEFAULT_SYSTEM", "AnthropicBackend", "AnthropicEngine"]

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM = (
    "Answer the question in one to three short sentences, using only the provided "
    "documents (some may be irrelevant). Name the people, places and things you write "
    "about. Base every sentence on the documents and cite them. Do not write citation "
    "numbers or square brackets yourself."
)
"""The system prompt the engine sends unless given another (``system=``)."""

_CONTINUE = (
    "Continue this answer from exactly where it stops. Write only the rest, without "
    "repeating any of it:\n\n"
)

# Body fields the engine owns: an ``extra`` entry may not override them.
_OWNED_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "temperature",
        "top_p",
        "stop_sequences",
        "stream",
    }
)
_END = re.compile(rf"[{re.escape(TERMINATORS)}]+[{re.escape(CLOSERS)}]*\Z")
_PARENTHESES = str.maketrans({MARKER_OPEN: "(", MARKER_CLOSE: ")"})


@dataclass(frozen=True, slots=True)
class _Block:
    """One content block of Claude's answer: its type, text and citations."""

    kind: str
    text: str = ""
    citations: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class _Reply:
    """A whole message, from a JSON body or assembled from stream events."""

    blocks: tuple[_Block, ...]
    stop_reason: str | None
    stop_details: object
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class _Answer:
    """Claude's blocks as one answer text with ``[N]`` markers."""

    text: str
    evidence: tuple[Evidence | None, ...]
    notes: tuple[str, ...]
    """What was dropped or changed on the way (out-of-range documents, other citation
    types, spans that do not match the source, brackets in the text)."""


class AnthropicEngine:
    """Answers on Anthropic's Messages API with native citations of the sources.

    ``complete`` needs ``client``, ``acomplete`` needs ``async_client`` (natively async);
    pass either or both. The engine keeps copies of them with its ``timeout`` and
    ``max_retries`` set, so the clients given stay as they were.

    Args:
        client: a synchronous ``anthropic.Anthropic``.
        async_client: an ``anthropic.AsyncAnthropic``.
        model: the Claude model, e.g. ``"claude-sonnet-4-6"``.
        stream: read the answer as a server-sent event stream (``messages.create(
            stream=True)``) instead of one JSON body; the result is the same.
        system: the system prompt (default :data:`DEFAULT_SYSTEM`).
        send_sampling: send the call's ``temperature`` (and ``top_p`` when below 1);
            ``False`` for models that reject sampling parameters.
        timeout: seconds for one HTTP attempt.
        max_retries: SDK retries after the first attempt (0: none).
        extra: more JSON body fields (e.g. ``{"metadata": {"user_id": "u1"}}``); fields
            the engine sets are refused.

    Raises:
        ConfigurationError: no client, a bad ``timeout``/``max_retries``, or a refused
            ``extra`` field.
        MissingDependencyError: the ``anthropic`` package is not installed.
    """

    continues_prefix = False
    """The API continues no prefix under a grammar: the segment loop asks once and revises."""

    def __init__(
        self,
        *,
        client: Anthropic | None = None,
        async_client: AsyncAnthropic | None = None,
        model: str,
        stream: bool = False,
        system: str | None = None,
        send_sampling: bool = True,
        timeout: float = 60.0,
        max_retries: int = 2,
        extra: Mapping[str, JsonValue] | None = None,
    ) -> None:
        self._sdk = _import_anthropic()
        first = client or async_client
        if first is None:
            raise ConfigurationError(
                "AnthropicEngine needs a client: pass client=anthropic.Anthropic() for "
                "complete() and/or async_client=anthropic.AsyncAnthropic() for acomplete(), "
                "or build both with AnthropicEngine.from_env()"
            )
        if not model:
            raise ConfigurationError("model must name a Claude model, e.g. 'claude-sonnet-4-6'")
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be a positive number of seconds, got {timeout}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigurationError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        self.model = model
        self.stream = bool(stream)
        self.system = DEFAULT_SYSTEM if system is None else system
        self.send_sampling = bool(send_sampling)
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.extra: dict[str, JsonValue] = _check_extra(extra or {})
        self._client = (
            None
            if client is None
            else client.with_options(timeout=timeout, max_retries=max_retries)
        )
        self._async_client = (
            None
            if async_client is None
            else async_client.with_options(timeout=timeout, max_retries=max_retries)
        )
        secrets = set()
        for given in (client, async_client):
            for name in ("api_key", "auth_token"):
                value = getattr(given, name, None)
                if isinstance(value, str) and value:
                    secrets.add(value)
        self._secrets = tuple(secrets)
        self._base_url = _without_userinfo(str(first.base_url))
        self._owns_clients = False  # injected clients stay the caller's to close
        self._closed = False

    @classmethod
    def from_env(
        cls,
        *,
        model: str,
        base_url: str | None = None,
        stream: bool = False,
        system: str | None = None,
        send_sampling: bool = True,
        timeout: float = 60.0,
        max_retries: int = 2,
        extra: Mapping[str, JsonValue] | None = None,
    ) -> AnthropicEngine:
        """Build both clients with the key in ``ANTHROPIC_API_KEY``.

        A key is taken only from the environment (here) or from an injected client,
        never as a string argument that could end up in code or logs. The engine owns the
        clients: :meth:`close` / :meth:`aclose` close them. The key is given to the SDK
        explicitly, so no other credential source (profiles, workload identity) is
        consulted, and it is never logged or shown. ``base_url`` defaults to
        the SDK's (``ANTHROPIC_BASE_URL``, else Anthropic's API). Other arguments are the
        constructor's.

        Raises:
            ConfigurationError: ``ANTHROPIC_API_KEY`` unset or empty.
        """
        sdk = _import_anthropic()
        key = os.environ.get("ANTHROPIC_API_KEY", "")
        if not key:
            raise ConfigurationError(
                "no Anthropic API key: set the ANTHROPIC_API_KEY environment variable, or "
                "pass client=anthropic.Anthropic(...) built with your own credentials"
            )
        engine = cls(
            client=sdk.Anthropic(api_key=key, base_url=base_url),
            async_client=sdk.AsyncAnthropic(api_key=key, base_url=base_url),
            model=model,
            stream=stream,
            system=system,
            send_sampling=send_sampling,
            timeout=timeout,
            max_retries=max_retries,
            extra=extra,
        )
        engine._owns_clients = True
        return engine

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self._base_url!r}, model={self.model!r}, "
            f"stream={self.stream!r})"
        )

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the synchronous client if this engine built it (:meth:`from_env`).

        Injected clients are left open for their owner; an async client needs
        :meth:`aclose`, from its event loop.
        """
        if self._owns_clients:
            self._closed = True
            if self._client is not None:
                self._client.close()

    async def aclose(self) -> None:
        """Close both clients if this engine built them (:meth:`from_env`)."""
        self.close()
        if self._owns_clients and self._async_client is not None:
            await self._async_client.close()

    def _check_open(self) -> None:
        if self._closed:
            raise BackendClosedError(
                "this AnthropicEngine was closed and its HTTP clients with it; build a new engine"
            )

    @contextlib.asynccontextmanager
    async def _async_session(self) -> AsyncIterator[Any]:
        """The async client for one call.

        An async client's connections belong to the event loop that opened them. So an
        engine that built its clients (:meth:`from_env`) opens one per call and
        closes it in the same loop; an injected client is used as given, within its
        owner's loop (the SDK's rule).
        """
        client = self._async_client
        if client is None:  # pragma: no cover - acomplete checks first
            raise ConfigurationError("acomplete() needs an async client")
        if not self._owns_clients:
            yield client
            return
        fresh = self._sdk.AsyncAnthropic(
            api_key=client.api_key, base_url=str(client.base_url)
        ).with_options(timeout=self.timeout, max_retries=self.max_retries)
        try:
            yield fresh
        finally:
            await fresh.close()

    # ------------------------------------------------------------------ calls

    def complete(self, call: SegmentCall) -> SegmentResult:
        """Ask for the whole answer (blocking; the SDK retries transient failures).

        Raises:
            ConfigurationError: no synchronous client, no sources or question in the
                call, or ``max_tokens`` below 1.
            BackendClosedError: :meth:`close` closed the clients this engine built.
            BackendError: the API failed, timed out, was unreachable, refused to answer,
                or sent something that is not a whole message (a stream that ended
                before ``message_stop`` included).
        """
        if self._client is None:
            raise ConfigurationError(
                "complete() needs a synchronous client: pass client=anthropic.Anthropic() "
                "(or call acomplete())"
            )
        self._check_open()
        kwargs = self._request(call)
        with self._mapped_errors():
            if self.stream:
                events = _StreamAssembler()
                with self._client.messages.create(**kwargs, stream=True) as stream:
                    for event in stream:
                        events.feed(_as_dict(event))
                reply = events.reply()
            else:
                raw = self._client.messages.with_raw_response.create(**kwargs)
                reply = _parse_message(raw.read())
        return self._result(reply, call)

    async def acomplete(self, call: SegmentCall) -> SegmentResult:
        """Ask for the whole answer on the async client (see :meth:`complete`)."""
        if self._async_client is None:
            raise ConfigurationError(
                "acomplete() needs an async client: pass "
                "async_client=anthropic.AsyncAnthropic() (or call complete())"
            )
        self._check_open()
        kwargs = self._request(call)
        with self._mapped_errors():
            async with self._async_session() as client:
                if self.stream:
                    events = _StreamAssembler()
                    async with await client.messages.create(**kwargs, stream=True) as stream:
                        async for event in stream:
                            events.feed(_as_dict(event))
                    reply = events.reply()
                else:
                    raw = await client.messages.with_raw_response.create(**kwargs)
                    reply = _parse_message(await raw.read())
        return self._result(reply, call)

    def _request(self, call: SegmentCall) -> dict[str, Any]:
        """The SDK keyword arguments for ``call``: documents, question, sampling.

        The grammar and the stop strings are not sent: the API takes no grammar, and its
        citations are not written as ``[N]`` (a ``"]"`` stop would never fire, or cut
        the answer if Claude wrote a bracket).
        """
        if call.max_tokens < 1:
            raise ConfigurationError(f"max_tokens must be at least 1, got {call.max_tokens}")
        if not call.sources:
            raise ConfigurationError(
                "AnthropicEngine sends the sources as documents, but the SegmentCall has "
                "none; build the request with its sources (Citeformer does)"
            )
        question = _question(call)
        content: list[dict[str, Any]] = [_document(source) for source in call.sources]
        content.append({"type": "text", "text": question})
        if call.prefix:
            # Never a trailing assistant turn: Claude 4.6 models refuse prefill (HTTP 400).
            content.append({"type": "text", "text": _CONTINUE + call.prefix})
        body: dict[str, Any] = dict(self.extra)
        if self.send_sampling:
            body["temperature"] = call.temperature
            if call.top_p < 1.0:
                body["top_p"] = call.top_p
        kwargs: dict[str, Any] = {
            "model": self.model,
            "max_tokens": call.max_tokens,
            "messages": [{"role": "user", "content": content}],
        }
        if self.system:
            kwargs["system"] = self.system
        if body:
            kwargs["extra_body"] = body
        return kwargs

    def _result(self, reply: _Reply, call: SegmentCall) -> SegmentResult:
        finish = self._finish(reply)
        answer = _map_answer(reply.blocks, call.sources)
        for note in answer.notes:
            logger.warning("AnthropicEngine (%s): %s", self.model, note)
        return SegmentResult(
            text=answer.text,
            finish=finish,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            evidence=answer.evidence,
            notes=answer.notes,  # the loop writes each into the trace
        )

    def _finish(self, reply: _Reply) -> Literal["end", "length"]:
        where = f"the Anthropic API at {self._base_url}"
        match reply.stop_reason:
            case "end_turn" | "stop_sequence":
                return "end"
            case "max_tokens" | "model_context_window_exceeded":
                return "length"
            case "refusal":
                category = (
                    reply.stop_details.get("category")
                    if isinstance(reply.stop_details, Mapping)
                    else None
                )
                why = f" (category {category!r})" if category else ""
                raise BackendError(
                    f"{self.model} refused to answer{why} (stop_reason 'refusal'); no answer "
                    "was produced: rephrase the question or check the sources"
                )
            case "pause_turn":
                raise BackendError(
                    f"{where} paused the turn (stop_reason 'pause_turn'), which only "
                    "server tools do; this engine sends no tools, so the answer is incomplete: "
                    "remove any tools from extra= and retry"
                )
            case other:
                raise BackendError(
                    f"{where} ended the answer with stop_reason {other!r}, which is neither "
                    "an end of turn nor max_tokens; the answer was not used"
                )

    # ------------------------------------------------------------------ errors

    @contextlib.contextmanager
    def _mapped_errors(self) -> Iterator[None]:
        """Map what the SDK, the transport or the body raise to ``BackendError``."""
        import httpx2  # the SDK's HTTP client, installed with it

        sdk = self._sdk
        try:
            yield
        except BackendError as exc:  # a body or stream that is not a whole message
            text = f"the Anthropic API at {self._base_url} sent {exc}"
            raise BackendError(_redact(text, self._secrets)) from _cause(exc, self._secrets)
        except sdk.AnthropicError as exc:
            raise self._error(exc) from _cause(exc, self._secrets)
        except (httpx2.HTTPError, json.JSONDecodeError) as exc:
            # Raised while reading a stream's body, past the SDK's retries.
            if isinstance(exc, json.JSONDecodeError):
                text = f"the Anthropic API at {self._base_url} sent a stream event that is not JSON"
            elif "Timeout" in type(exc).__name__:
                text = (
                    f"the stream from the Anthropic API at {self._base_url} stalled for more "
                    f"than {self.timeout:g} s; raise timeout= or retry"
                )
            else:
                text = (
                    f"the stream from the Anthropic API at {self._base_url} broke off: "
                    f"{type(exc).__name__}: {exc}; the partial answer was not used"
                )
            raise BackendError(_redact(text, self._secrets)) from _cause(exc, self._secrets)

    def _error(self, exc: Exception) -> BackendError:
        """Map an SDK error to a BackendError whose message names no secret."""
        sdk = self._sdk
        where = f"the Anthropic API at {self._base_url}"
        tries = f"after {self.max_retries} retr{'y' if self.max_retries == 1 else 'ies'}"
        if isinstance(exc, sdk.APITimeoutError):
            text = (
                f"{where} did not answer within {self.timeout:g} s ({tries}); raise timeout= "
                "or retry later"
            )
        elif isinstance(exc, sdk.APIConnectionError):
            reason = f": {exc.__cause__}" if exc.__cause__ is not None else ""
            text = (
                f"the connection to {where} failed ({tries}){reason}; check the network and "
                "base_url"
            )
        elif isinstance(exc, sdk.APIStatusError) and exc.status_code < 400:
            text = f"{where} ended the stream with an error event: {_status_message(exc)}"
        elif isinstance(exc, sdk.RateLimitError):
            text = (
                f"{where} is rate limiting (HTTP 429) {tries}: {_status_message(exc)}; lower "
                "the request rate or raise max_retries"
            )
        elif isinstance(exc, sdk.OverloadedError):
            text = (
                f"{where} is overloaded (HTTP 529) {tries}: {_status_message(exc)}; retry "
                "later or raise max_retries"
            )
        elif isinstance(exc, sdk.APIStatusError) and exc.status_code >= 500:
            text = f"{where} failed with HTTP {exc.status_code} {tries}: {_status_message(exc)}"
        elif isinstance(exc, sdk.AuthenticationError | sdk.PermissionDeniedError):
            text = (
                f"{where} refused the credentials with HTTP {exc.status_code}: "
                f"{_status_message(exc)}; check the API key (ANTHROPIC_API_KEY)"
            )
        elif isinstance(exc, sdk.APIStatusError):
            message = _status_message(exc)
            hint = f"check model={self.model!r} and the sources"
            if self.send_sampling and ("temperature" in message or "top_p" in message):
                hint = "this model takes no sampling parameters: pass send_sampling=False"
            text = f"{where} refused the request with HTTP {exc.status_code}: {message}; {hint}"
        elif isinstance(exc, sdk.APIResponseValidationError):
            text = f"{where} sent a response the SDK could not read: {exc}"
        else:
            text = f"the request to {where} failed: {type(exc).__name__}: {exc}"
        return BackendError(_redact(text, self._secrets))


class _StreamAssembler:
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
                raise BackendError(f"a message_start without a message: {_excerpt(event)}")
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

    def reply(self) -> _Reply:
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
            _Block(kind, "".join(parts), tuple(citations))
            for _, (kind, parts, citations) in sorted(self._blocks.items())
        )
        return _Reply(
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
            raise BackendError(f"a content_block_delta without a delta: {_excerpt(delta)}")
        _, parts, citations = self._blocks[index]
        if delta.get("type") == "text_delta":
            text = delta.get("text")
            if not isinstance(text, str):
                raise BackendError(f"a text_delta without text: {_excerpt(delta)}")
            parts.append(text)
        elif delta.get("type") == "citations_delta":
            citation = delta.get("citation")
            if not isinstance(citation, Mapping):
                raise BackendError(f"a citations_delta without a citation: {_excerpt(delta)}")
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


def _parse_message(payload: bytes) -> _Reply:
    """Read a non-streamed Messages API body.

    Raises:
        BackendError: the body is not JSON or not a message.
    """
    data = _load_json(payload, "a response")
    if not isinstance(data, dict):
        raise BackendError(f"a JSON {type(data).__name__} instead of a message object")
    if data.get("type") == "error" or "content" not in data:
        raise BackendError(f"an error or another object instead of a message: {_excerpt(data)}")
    blocks = tuple(_block(block) for block in _list(data.get("content"), "message content"))
    prompt, completion = _usage(data.get("usage"), partial=False)
    return _Reply(
        blocks=blocks,
        stop_reason=data.get("stop_reason"),
        stop_details=data.get("stop_details"),
        prompt_tokens=prompt or 0,
        completion_tokens=completion or 0,
    )


def _block(block: object) -> _Block:
    if not isinstance(block, Mapping) or not isinstance(block.get("type"), str):
        raise BackendError(f"a content block that is not an object with a type: {_excerpt(block)}")
    kind = block["type"]
    if kind != "text":
        return _Block(kind)
    text = block.get("text", "")
    if not isinstance(text, str):
        raise BackendError(f"a text block without text: {_excerpt(block)}")
    citations = block.get("citations") or []
    items = _list(citations, "citations")
    for citation in items:
        if not isinstance(citation, Mapping):
            raise BackendError(f"a citation that is not an object: {_excerpt(citation)}")
    return _Block(kind, text, tuple(items))


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise BackendError(f"{what} that is not a list: {_excerpt(value)}")
    return value


def _index(event: Mapping[str, Any]) -> int:
    index = event.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise BackendError(f"a {event.get('type')} event without a block index: {_excerpt(event)}")
    return index


def _usage(usage: object, *, partial: bool) -> tuple[int | None, int | None]:
    """(prompt tokens, completion tokens); prompt tokens include cache reads and writes."""
    if usage is None:
        return None, None
    if not isinstance(usage, Mapping):
        raise BackendError(f"usage that is not an object: {_excerpt(usage)}")
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
        raise BackendError(f"usage without input_tokens and output_tokens: {_excerpt(usage)}")
    prompt = sum(counts[k] for k in keys if k in counts) if "input_tokens" in counts else None
    return prompt, counts.get("output_tokens")


def _map_answer(blocks: Sequence[_Block], sources: Sequence[Source]) -> _Answer:
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
    return _Answer(text="".join(out), evidence=tuple(evidence), notes=tuple(dict.fromkeys(notes)))


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


def _question(call: SegmentCall) -> str:
    if call.question is not None and call.question.strip():
        return call.question.strip()
    for message in reversed(call.messages):
        if message.role == "user" and message.content.strip():
            return message.content.strip()
    raise ConfigurationError("the SegmentCall has no question and no user message to take it from")


def _document(source: Source) -> dict[str, Any]:
    document: dict[str, Any] = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": source.text},
        "citations": {"enabled": True},
    }
    if source.title.strip():
        document["title"] = source.title
    return document


def _as_dict(event: Any) -> Mapping[str, Any]:
    """An SDK stream event as its JSON object (the fields the API sent)."""
    data = event.to_dict(warnings=False)
    if not isinstance(data, dict):  # pragma: no cover - the SDK's models dump to dicts
        raise BackendError(f"a stream event that is not an object: {_excerpt(data)}")
    return data


def _check_extra(extra: Mapping[str, JsonValue]) -> dict[str, JsonValue]:
    for key in extra:
        if key in _OWNED_FIELDS:
            hint = (
                " (use send_sampling; the call's temperature and top_p are sent)"
                if key in ("temperature", "top_p")
                else ""
            )
            raise ConfigurationError(
                f"extra field {key!r} is set by the engine from the SegmentCall{hint}; remove it"
            )
    return dict(extra)


def _import_anthropic() -> ModuleType:
    try:
        import anthropic
    except ImportError as exc:
        raise MissingDependencyError(
            feature="AnthropicEngine", extra="anthropic", module="anthropic"
        ) from exc
    return anthropic


class AnthropicBackend(SegmentBackend):
    """Cited answers from Claude's native citations, checked by the shared validator.

    Takes the :class:`AnthropicEngine` arguments (injected ``client`` and/or
    ``async_client``, ``model``, ``stream``, ...), or a ready ``engine``;
    :meth:`from_env` builds the clients. The segment loop asks once and revises the
    answer with the request's validator (a rejected marker is replaced or dropped, an
    unsupported sentence dropped under the required policy); :meth:`close` closes the
    clients the engine built.
    """

    def __init__(self, engine: AnthropicEngine | None = None, **options: Any) -> None:
        if engine is None:
            engine = AnthropicEngine(**options)
        elif options:
            raise ConfigurationError("pass either a ready engine or the engine's options, not both")
        super().__init__(engine)

    @classmethod
    def from_env(cls, **options: Any) -> AnthropicBackend:
        """A backend with the key in ``ANTHROPIC_API_KEY`` (see
        :meth:`AnthropicEngine.from_env` for the options)."""
        return cls(AnthropicEngine.from_env(**options))

    async def aclose(self) -> None:
        """Close the engine's clients from async code."""
        engine = self.engine
        if isinstance(engine, AnthropicEngine):
            await engine.aclose()
