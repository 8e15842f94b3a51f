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
The clients are handled, and the SDK's errors redacted, as for every provider
(``citebacktrack.backends._sdk``); the reply, a JSON body or the stream's events, is read
and its citations written as markers by :mod:`citebacktrack.backends._anthropic_messages`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import JsonValue

from citebacktrack._arguments import flag, text
from citebacktrack.backends._anthropic_messages import (
    MessageReply,
    StreamAssembler,
    event_dict,
    map_answer,
    parse_message,
)
from citebacktrack.backends._sdk import (
    AnthropicClients,
    check_base_url,
    check_extra,
    check_model,
    check_timing,
    import_anthropic,
    redact_key,
    retries_phrase,
    safe_cause,
    status_message,
)
from citebacktrack.backends.segment import SegmentBackend
from citebacktrack.errors import BackendError, ConfigurationError
from citebacktrack.segments import SegmentCall, SegmentResult
from citebacktrack.types import Source

if TYPE_CHECKING:
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
_SAMPLING_HINT = " (use send_sampling; the call's temperature and top_p are sent)"


def _check_arguments(
    model: object,
    stream: object,
    system: object,
    send_sampling: object,
    timeout: object,
    max_retries: object,
) -> None:
    """The engine's arguments, each checked by its rule."""
    check_model(model, "claude-sonnet-4-6")
    flag("stream", stream)
    text(
        "system", system, "pass the system prompt, or None: the default", optional=True, blank=True
    )
    flag("send_sampling", send_sampling)
    check_timing(timeout, max_retries)


def _check_extra(extra: Mapping[str, JsonValue] | None) -> dict[str, JsonValue]:
    """A copy of ``extra``, checked (a dict with str keys, none a field the engine sets)."""
    hints = {"temperature": _SAMPLING_HINT, "top_p": _SAMPLING_HINT}
    return check_extra(extra, _OWNED_FIELDS, hints=hints)


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
        ConfigurationError: an argument of the wrong type or value (e.g. ``model=None``,
            ``timeout="60"``, ``stream="no"``, a client of the wrong kind; checked first),
            no client, or a refused ``extra`` field.
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
        # The SDK, each argument by its rule, then the clients (of their kind, at least one).
        import_anthropic()
        _check_arguments(model, stream, system, send_sampling, timeout, max_retries)
        fields = _check_extra(extra)
        self._clients = AnthropicClients(
            client, async_client, timeout=timeout, max_retries=max_retries
        )
        self.model = model
        self.stream = stream
        self.system = DEFAULT_SYSTEM if system is None else system
        self.send_sampling = send_sampling
        self.timeout = self._clients.timeout
        self.max_retries = self._clients.max_retries
        self.extra: dict[str, JsonValue] = fields

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
            ConfigurationError: an argument of the wrong type or value (checked first), or
                ``ANTHROPIC_API_KEY`` unset or empty.
        """
        sdk = import_anthropic()
        check_base_url(base_url, "https://api.anthropic.com", optional=True)
        _check_arguments(model, stream, system, send_sampling, timeout, max_retries)
        _check_extra(extra)
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
        engine._clients.owned = True
        return engine

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self._clients.base_url!r}, model={self.model!r}, "
            f"stream={self.stream!r})"
        )

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the synchronous client if this engine built it (:meth:`from_env`).

        Injected clients are left open for their owner; an async client needs
        :meth:`aclose`, from its event loop.
        """
        self._clients.close()

    async def aclose(self) -> None:
        """Close both clients if this engine built them (:meth:`from_env`)."""
        await self._clients.aclose()

    @property
    def _client(self) -> Anthropic | None:
        """The engine's copy of the synchronous client (``None`` without one)."""
        client: Anthropic | None = self._clients.client
        return client

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
        client = self._clients.sync()
        kwargs = self._request(call)
        with self._mapped_errors():
            if self.stream:
                events = StreamAssembler()
                with client.messages.create(**kwargs, stream=True) as stream:
                    for event in stream:
                        events.feed(event_dict(event))
                reply = events.reply()
            else:
                raw = client.messages.with_raw_response.create(**kwargs)
                reply = parse_message(raw.read())
        return self._result(reply, call)

    async def acomplete(self, call: SegmentCall) -> SegmentResult:
        """Ask for the whole answer on the async client (see :meth:`complete`)."""
        self._clients.check_async()
        kwargs = self._request(call)
        with self._mapped_errors():
            async with self._clients.session() as client:
                if self.stream:
                    events = StreamAssembler()
                    async with await client.messages.create(**kwargs, stream=True) as stream:
                        async for event in stream:
                            events.feed(event_dict(event))
                    reply = events.reply()
                else:
                    raw = await client.messages.with_raw_response.create(**kwargs)
                    reply = parse_message(await raw.read())
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

    def _result(self, reply: MessageReply, call: SegmentCall) -> SegmentResult:
        finish = self._finish(reply)
        answer = map_answer(reply.blocks, call.sources)
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

    def _finish(self, reply: MessageReply) -> Literal["end", "length"]:
        where = f"the Anthropic API at {self._clients.base_url}"
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

        sdk, secrets, url = self._clients.sdk, self._clients.secrets, self._clients.base_url
        try:
            yield
        except BackendError as exc:  # a body or stream that is not a whole message
            text = f"the Anthropic API at {url} sent {exc}"
            raise BackendError(redact_key(text, secrets)) from safe_cause(exc, secrets)
        except sdk.AnthropicError as exc:
            raise self._error(exc) from safe_cause(exc, secrets)
        except (httpx2.HTTPError, json.JSONDecodeError) as exc:
            # Raised while reading a stream's body, past the SDK's retries.
            if isinstance(exc, json.JSONDecodeError):
                text = f"the Anthropic API at {url} sent a stream event that is not JSON"
            elif "Timeout" in type(exc).__name__:
                text = (
                    f"the stream from the Anthropic API at {url} stalled for more "
                    f"than {self.timeout:g} s; raise timeout= or retry"
                )
            else:
                text = (
                    f"the stream from the Anthropic API at {url} broke off: "
                    f"{type(exc).__name__}: {exc}; the partial answer was not used"
                )
            raise BackendError(redact_key(text, secrets)) from safe_cause(exc, secrets)

    def _error(self, exc: Exception) -> BackendError:
        """Map an SDK error to a BackendError whose message names no secret."""
        sdk = self._clients.sdk
        where = f"the Anthropic API at {self._clients.base_url}"
        tries = retries_phrase(self.max_retries)
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
            text = f"{where} ended the stream with an error event: {status_message(exc)}"
        elif isinstance(exc, sdk.RateLimitError):
            text = (
                f"{where} is rate limiting (HTTP 429) {tries}: {status_message(exc)}; lower "
                "the request rate or raise max_retries"
            )
        elif isinstance(exc, sdk.OverloadedError):
            text = (
                f"{where} is overloaded (HTTP 529) {tries}: {status_message(exc)}; retry "
                "later or raise max_retries"
            )
        elif isinstance(exc, sdk.APIStatusError) and exc.status_code >= 500:
            text = f"{where} failed with HTTP {exc.status_code} {tries}: {status_message(exc)}"
        elif isinstance(exc, sdk.AuthenticationError | sdk.PermissionDeniedError):
            text = (
                f"{where} refused the credentials with HTTP {exc.status_code}: "
                f"{status_message(exc)}; check the API key (ANTHROPIC_API_KEY)"
            )
        elif isinstance(exc, sdk.APIStatusError):
            message = status_message(exc)
            hint = f"check model={self.model!r} and the sources"
            if self.send_sampling and ("temperature" in message or "top_p" in message):
                hint = "this model takes no sampling parameters: pass send_sampling=False"
            text = f"{where} refused the request with HTTP {exc.status_code}: {message}; {hint}"
        elif isinstance(exc, sdk.APIResponseValidationError):
            text = f"{where} sent a response the SDK could not read: {exc}"
        else:
            text = f"the request to {where} failed: {type(exc).__name__}: {exc}"
        return BackendError(redact_key(text, self._clients.secrets))


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


class AnthropicBackend(SegmentBackend):
    """Cited answers from Claude's native citations, checked by the shared validator.

    Takes a ready ``engine``, or the :class:`AnthropicEngine` arguments below (``None``, or
    left out: the engine's default); :meth:`from_env` builds the clients. The segment loop
    asks once and revises the answer with the request's validator (a rejected marker is
    replaced or dropped, an unsupported sentence dropped under the required policy);
    :meth:`close` closes the clients the engine built.

    Args:
        engine: a ready engine (then no other argument).
        client: a synchronous ``anthropic.Anthropic``.
        async_client: an ``anthropic.AsyncAnthropic``.
        model: the Claude model (required unless ``engine`` is given).
        stream: read the answer as a server-sent event stream (default off).
        system: the system prompt (default :data:`DEFAULT_SYSTEM`).
        send_sampling: send the call's ``temperature``/``top_p`` (default on).
        timeout: seconds for one HTTP attempt (default 60).
        max_retries: SDK retries after the first attempt (default 2).
        extra: more JSON body fields; fields the engine sets are refused.

    Raises:
        ConfigurationError: an ``engine`` that is no engine, both an engine and engine
            arguments, no ``model`` (and no engine), or what the engine refuses.
    """

    _engine_hint = (
        "pass AnthropicEngine(...), or leave engine out and pass the engine's arguments "
        "(client=anthropic.Anthropic(), model=...); from_env(model=...) reads the key from "
        "ANTHROPIC_API_KEY"
    )

    def __init__(
        self,
        engine: AnthropicEngine | None = None,
        *,
        client: Anthropic | None = None,
        async_client: AsyncAnthropic | None = None,
        model: str | None = None,
        stream: bool | None = None,
        system: str | None = None,
        send_sampling: bool | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        extra: Mapping[str, JsonValue] | None = None,
    ) -> None:
        given = {
            "client": client,
            "async_client": async_client,
            "model": model,
            "stream": stream,
            "system": system,
            "send_sampling": send_sampling,
            "timeout": timeout,
            "max_retries": max_retries,
            "extra": extra,
        }
        options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if engine is not None:
            self._checked_engine(engine)
        if engine is None:
            options.setdefault("model", None)  # refused by the engine, by name
            engine = AnthropicEngine(**options)
        elif options:
            raise ConfigurationError("pass either a ready engine or the engine's options, not both")
        super().__init__(engine)

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
    ) -> AnthropicBackend:
        """A backend with the key in ``ANTHROPIC_API_KEY`` (the arguments are those of
        :meth:`AnthropicEngine.from_env`)."""
        return cls(
            AnthropicEngine.from_env(
                model=model,
                base_url=base_url,
                stream=stream,
                system=system,
                send_sampling=send_sampling,
                timeout=timeout,
                max_retries=max_retries,
                extra=extra,
            )
        )

    async def aclose(self) -> None:
        """Close the engine's clients from async code."""
        engine = self.engine
        if isinstance(engine, AnthropicEngine):
            await engine.aclose()


# Read by tests/test_fuzz_inputs.py under the names they had when they lived here.
