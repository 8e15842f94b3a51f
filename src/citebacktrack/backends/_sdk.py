"""What the provider modules share: SDK clients, error mapping, API-key redaction, replies.

Every engine over a vendor SDK (:mod:`~citebacktrack.backends._openai_server`,
:mod:`~citebacktrack.backends._openai_grammar_tool`,
:mod:`~citebacktrack.backends._openai_json_schema`, :mod:`~citebacktrack.backends.anthropic`)
handles its clients through :class:`SdkClients`: copies of the clients given, with the
engine's ``timeout`` and ``max_retries`` set (the clients given stay as they were); their API
keys kept for redaction (:func:`redact_key`, :func:`safe_cause`), so that no key appears in a
message, a chained cause or a repr; only clients the engine built (``owned``) closed by it.

Retries are the SDKs' own (429, 408, 409, 5xx, timeouts and connection errors, exponential
backoff with jitter, ``Retry-After`` honoured): an engine sets ``max_retries`` on its copies
and never retries itself. :meth:`OpenAIClients.error` maps the OpenAI SDK's errors to
:class:`~citebacktrack.errors.BackendError`; the Anthropic engine maps its SDK's own.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import reprlib
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import JsonValue

from citebacktrack._arguments import Number, mapping, refused, text
from citebacktrack.errors import (
    BackendClosedError,
    BackendError,
    ConfigurationError,
    MissingDependencyError,
)

if TYPE_CHECKING:
    from types import ModuleType

    from citebacktrack.segments import SegmentCall, SegmentResult

SHORTEST_REDACTED_KEY = 8
"""Shorter strings are not redacted (a placeholder key such as ``"unused"`` or ``"x"``)."""


# --------------------------------------------------------------------------- text


def excerpt(value: object, limit: int = 200) -> str:
    """``value`` as text for an error message, cut after ``limit`` characters."""
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


def load_json(payload: bytes | str, what: str) -> Any:
    """``payload`` parsed as JSON, or a BackendError naming ``what`` it was.

    Besides malformed JSON and bytes that are not UTF-8, Python's reader refuses an integer
    of more than 4300 digits (``ValueError``) and nesting deeper than the interpreter's
    recursion limit (``RecursionError``); a server's body is refused alike for all of them.
    """
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise BackendError(f"{what} that is not JSON: {excerpt(payload)}") from exc


def read_usage(
    usage: object, keys: tuple[str, str] = ("prompt_tokens", "completion_tokens")
) -> tuple[int, int]:
    """The prompt and completion token counts of an OpenAI ``usage`` object, under ``keys``
    (0 where absent)."""
    if usage is None:
        return 0, 0
    if not isinstance(usage, dict):
        raise BackendError(f"usage that is not an object: {excerpt(usage)}")
    counts = []
    for key in keys:
        value = usage.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BackendError(f"usage.{key} that is not a token count: {value!r}")
        counts.append(value)
    return counts[0], counts[1]


def status_message(exc: Any) -> str:
    """The server's own error message from an SDK status error (short)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message is not None:
            return excerpt(message)
    return excerpt(getattr(exc, "message", "") or "no message")


def retries_phrase(max_retries: int) -> str:
    """``"after 1 retry"``, ``"after 2 retries"``: how often the SDK tried again."""
    return f"after {max_retries} retr{'y' if max_retries == 1 else 'ies'}"


# --------------------------------------------------------------------------- secrets


def redact_key(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret of at least :data:`SHORTEST_REDACTED_KEY` characters
    written as ``***``."""
    for secret in secrets:
        if len(secret) >= SHORTEST_REDACTED_KEY:
            text = text.replace(secret, "***")
    return text


def safe_cause(exc: BaseException, secrets: Sequence[str]) -> BaseException | None:
    """The SDK error to chain, or None when its text, or that of an error it was raised
    from (a transport error quoting a URL or header), would show an API key."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        rendered = f"{link!s} {link!r} {getattr(link, 'body', '')}"
        if any(len(s) >= SHORTEST_REDACTED_KEY and s in rendered for s in secrets):
            return None
        link = link.__cause__ or link.__context__
    return exc


def without_userinfo(url: str) -> str:
    """``url`` without any ``user:password@`` part (for reprs and messages)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_extra(
    extra: Mapping[str, JsonValue] | None,
    owned: frozenset[str],
    *,
    hints: Mapping[str, str] | None = None,
    refuse: Callable[[str], None] | None = None,
) -> dict[str, JsonValue]:
    """A copy of ``extra`` (more body fields; ``None``: none), none of them one the engine
    sets.

    ``refuse(key)`` may raise for a key first; ``hints`` adds a hint to the message of an
    ``owned`` key.

    Raises:
        ConfigurationError: ``extra`` is not a dict with str keys, a key in ``owned``, or
            one ``refuse`` refused.
    """
    extra = mapping("extra", extra, "pass more JSON body fields as a dict, e.g. extra={'top_k': 1}")
    if extra is None:
        return {}
    for key in extra:
        if refuse is not None:
            refuse(key)
        if key in owned:
            hint = (hints or {}).get(key, "")
            raise ConfigurationError(
                f"extra field {key!r} is set by the engine from the SegmentCall{hint}; remove it"
            )
    return dict(extra)


# --------------------------------------------------------------------------- arguments

TIMEOUT = Number(60.0, above=0)
"""The rule of every engine's ``timeout``: seconds, > 0 (an int or a float)."""
MAX_RETRIES = Number(2, whole=True, minimum=0)
"""The rule of every engine's ``max_retries``: an int >= 0."""


def check_timing(timeout: object, max_retries: object) -> tuple[float, int]:
    """``timeout`` and ``max_retries`` checked by their rules (as ``float`` and ``int``)."""
    return TIMEOUT("timeout", timeout), MAX_RETRIES("max_retries", max_retries)


def check_model(model: object, example: str) -> str:
    """``model`` if it names a model (a non-empty str), else the error saying to pass e.g.
    ``model=<example>``."""
    name: str = text("model", model, f"pass the model's name, e.g. model={example!r}")
    return name


def check_base_url(value: object, example: str, *, optional: bool = False) -> str | None:
    """``value`` if it is an ``http://`` or ``https://`` URL (``None`` when ``optional``);
    the error shows it without any ``user:password@`` part."""
    hint = f"pass the server's URL as a str, e.g. base_url={example!r}"
    url: str | None = text("base_url", value, hint, optional=optional)
    if url is not None and urllib.parse.urlsplit(url.strip()).scheme.lower() not in (
        "http",
        "https",
    ):
        raise refused("base_url", without_userinfo(url), "an http:// or https:// URL", hint)
    return url


def check_api_key(value: object) -> str:
    """``value`` if it is a str; the error never shows it."""
    if isinstance(value, str):
        return value
    hint = "pass the key as a str (a local server takes any, e.g. the default 'unused')"
    raise refused("api_key", value, "a str", hint, secret=True)


def check_client(name: str, value: object, *, asynchronous: bool, example: str) -> None:
    """Refuse a ``client``/``async_client`` argument that is not an SDK client of its kind
    (read by its duck type: ``with_options()``, and ``close()`` async or not), so that a
    key, a URL or a client of the other kind is caught here; a string is not shown (it
    may be a key)."""
    if value is None:
        return
    close = getattr(value, "close", None)
    if (
        callable(getattr(value, "with_options", None))
        and callable(close)
        and inspect.iscoroutinefunction(close) is asynchronous
    ):
        return
    kind = "an async" if asynchronous else "a synchronous"
    hint = f"pass {name}={example}, or None"
    if isinstance(value, str):
        hint += " (an API key goes in the environment or into the client, a URL in base_url=)"
    elif callable(getattr(value, "with_options", None)):
        other = "client" if asynchronous else "async_client"
        hint += f" (this is {'a synchronous' if asynchronous else 'an async'} client: pass it "
        hint += f"as {other}=)"
    raise refused(name, value, f"{kind} SDK client", hint, secret=True)


# --------------------------------------------------------------------------- clients


def import_openai() -> ModuleType:
    """The ``openai`` package, or MissingDependencyError naming the ``openai`` extra."""
    try:
        import openai
    except ImportError as exc:
        raise MissingDependencyError(
            feature="OpenAICompatibleEngine", extra="openai", module="openai"
        ) from exc
    return openai


def import_anthropic() -> ModuleType:
    """The ``anthropic`` package, or MissingDependencyError naming the ``anthropic`` extra."""
    try:
        import anthropic
    except ImportError as exc:
        raise MissingDependencyError(
            feature="AnthropicEngine", extra="anthropic", module="anthropic"
        ) from exc
    return anthropic


def require_client(client: object, async_client: object, missing: str) -> None:
    """Raise ConfigurationError(``missing``) unless at least one client was given."""
    if client is None and async_client is None:
        raise ConfigurationError(missing)


class SdkClients:
    """An engine's copies of its SDK clients, and what it does with them.

    Subclasses name the SDK's client classes (``sync_example``, ``async_example``), the
    client attributes that hold secrets (``secret_attrs``), and how an async client is
    opened again from the one given (:meth:`reopen`).

    Args:
        sdk: the SDK module (``openai``, ``anthropic``).
        engine: the engine's name, for messages.
        client: a synchronous client (for ``complete()``).
        async_client: an async client (for ``acomplete()``).
        timeout: seconds for one HTTP attempt.
        max_retries: SDK retries after the first attempt (0: none).
        missing: the message when neither client was given.

    Raises:
        ConfigurationError: a client of the wrong kind (checked first), a bad
            ``timeout``/``max_retries``, or neither client.
    """

    sync_example = "client(...)"
    async_example = "async_client(...)"
    secret_attrs: tuple[str, ...] = ("api_key",)

    def __init__(
        self,
        sdk: ModuleType,
        engine: str,
        client: Any,
        async_client: Any,
        *,
        timeout: float,
        max_retries: int,
        missing: str,
    ) -> None:
        self.sdk = sdk
        check_client("client", client, asynchronous=False, example=self.sync_example)
        check_client("async_client", async_client, asynchronous=True, example=self.async_example)
        timeout, max_retries = check_timing(timeout, max_retries)
        require_client(client, async_client, missing)
        self.engine = engine
        self.timeout = timeout
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
            for name in self.secret_attrs
        }
        self.secrets: tuple[str, ...] = tuple(k for k in keys if isinstance(k, str) and k)
        self.base_url = without_userinfo(str((client or async_client).base_url))
        self.owned = False
        """Whether the engine built the clients (and so closes them); injected ones stay
        the caller's to close."""
        self.closed = False

    def reopen(self, client: Any) -> Any:
        """A new async client like ``client`` (its key and URL), without its options."""
        raise NotImplementedError  # pragma: no cover - each SDK's subclass defines it

    def sync(self) -> Any:
        """The synchronous client for ``complete()``.

        Raises:
            ConfigurationError: none was given.
            BackendClosedError: the engine closed the clients it built.
        """
        if self.client is None:
            raise ConfigurationError(
                f"complete() needs a synchronous client: pass client={self.sync_example} "
                "(or call acomplete())"
            )
        self._check_open()
        return self.client

    def check_async(self) -> None:
        """Raise unless ``acomplete()`` can run (as :meth:`sync` for the async client)."""
        if self.async_client is None:
            raise ConfigurationError(
                f"acomplete() needs an async client: pass async_client={self.async_example} "
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

        An async client's connections belong to the event loop that opened them, and a
        pooled connection outliving its loop is closed by nobody. So an engine that built
        its clients opens a client per call and closes it in the same loop (one new
        connection per call); an injected client is used as given, within its owner's
        loop (the SDK's rule).
        """
        client = self.async_client
        if client is None:  # pragma: no cover - check_async comes first
            raise ConfigurationError("acomplete() needs an async client")
        if not self.owned:
            yield client
            return
        fresh = self.reopen(client).with_options(timeout=self.timeout, max_retries=self.max_retries)
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


class OpenAIClients(SdkClients):
    """The clients of an engine over the OpenAI SDK (a served model or hosted OpenAI).

    Raises:
        ConfigurationError: neither client, or a bad ``timeout``/``max_retries``.
        MissingDependencyError: the ``openai`` package is not installed.
    """

    sync_example = "openai.OpenAI(...)"
    async_example = "openai.AsyncOpenAI(...)"
    secret_attrs = ("api_key", "admin_api_key")

    def __init__(
        self,
        engine: str,
        client: Any,
        async_client: Any,
        *,
        timeout: float,
        max_retries: int,
        example: str = "",
    ) -> None:
        super().__init__(
            import_openai(),
            engine,
            client,
            async_client,
            timeout=timeout,
            max_retries=max_retries,
            missing=(
                f"{engine} needs a client: pass client=openai.OpenAI({example}) for complete() "
                f"and/or async_client=openai.AsyncOpenAI({example}) for acomplete()"
            ),
        )

    def reopen(self, client: Any) -> Any:
        return self.sdk.AsyncOpenAI(
            base_url=str(client.base_url),
            api_key=client.api_key,
            organization=client.organization,
            project=client.project,
        )

    def error(
        self, exc: Exception, *, where: str, refused_hint: str, unreachable_hint: str
    ) -> BackendError:
        """Map an SDK error to a BackendError whose message names no secret.

        ``where`` names the server or API; ``refused_hint`` says what to check after a
        4xx, ``unreachable_hint`` after a connection failure. Chain the SDK error with
        ``raise ... from safe_cause(exc, self.secrets)``.
        """
        sdk = self.sdk
        tries = retries_phrase(self.max_retries)
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
                f"{where} is rate limiting (HTTP 429) {tries}: {status_message(exc)}; lower "
                "the request rate or raise max_retries"
            )
        elif isinstance(exc, sdk.APIStatusError) and exc.status_code >= 500:
            text = f"{where} failed with HTTP {exc.status_code} {tries}: {status_message(exc)}"
        elif isinstance(exc, sdk.APIStatusError):
            text = (
                f"{where} refused the request with HTTP {exc.status_code}: "
                f"{status_message(exc)}; {refused_hint}"
            )
        else:
            text = f"the request to {where} failed: {type(exc).__name__}: {exc}"
        return BackendError(redact_key(text, self.secrets))


class OpenAIEngine:
    """What every engine over the OpenAI SDK does with one call: one request, one reply.

    A subclass holds its :class:`OpenAIClients` in ``_clients`` and says how a call becomes
    the SDK's keyword arguments (``_request``), which resource takes them (``_resource``,
    e.g. ``client.responses``), how the raw body becomes a result (``_result``), and how an
    SDK error is told (``_error``).
    """

    _clients: OpenAIClients

    def close(self) -> None:
        """Close the synchronous client if this engine built it (``from_base_url``,
        ``from_env``).

        Injected clients are left open for their owner. An async client needs
        :meth:`aclose`, from its event loop.
        """
        self._clients.close()

    async def aclose(self) -> None:
        """Close both clients if this engine built them."""
        await self._clients.aclose()

    def complete(self, call: SegmentCall) -> SegmentResult:
        """Answer ``call`` with one request (blocking; the SDK retries transient failures).

        Raises:
            GrammarError: the grammar cannot be emitted or does not parse (no request sent).
            ConfigurationError: no synchronous client, ``max_tokens`` below 1, or a call
                this engine cannot take (no request sent).
            BackendClosedError: :meth:`close` closed the clients this engine built.
            BackendError: the server or API failed, timed out, was unreachable, refused to
                answer, or sent something that is not an answer.
        """
        client = self._clients.sync()
        kwargs = self._request(call)
        try:
            raw = self._resource(client).with_raw_response.create(**kwargs)
        except self._clients.sdk.OpenAIError as exc:
            raise self._error(exc) from safe_cause(exc, self._clients.secrets)
        return self._result(raw.content, call)

    async def acomplete(self, call: SegmentCall) -> SegmentResult:
        """Answer ``call`` on the async client (see :meth:`complete`)."""
        self._clients.check_async()
        kwargs = self._request(call)
        try:
            async with self._clients.session() as client:
                raw = await self._resource(client).with_raw_response.create(**kwargs)
        except self._clients.sdk.OpenAIError as exc:
            raise self._error(exc) from safe_cause(exc, self._clients.secrets)
        return self._result(raw.content, call)

    def _request(self, call: SegmentCall) -> dict[str, Any]:
        raise NotImplementedError  # pragma: no cover - each engine defines it

    def _resource(self, client: Any) -> Any:
        raise NotImplementedError  # pragma: no cover - each engine defines it

    def _result(self, payload: bytes, call: SegmentCall) -> SegmentResult:
        raise NotImplementedError  # pragma: no cover - each engine defines it

    def _error(self, exc: Exception) -> BackendError:
        raise NotImplementedError  # pragma: no cover - each engine defines it


class AnthropicClients(SdkClients):
    """The clients of an ``AnthropicEngine``.

    Raises:
        ConfigurationError: neither client, or a bad ``timeout``/``max_retries``.
        MissingDependencyError: the ``anthropic`` package is not installed.
    """

    sync_example = "anthropic.Anthropic()"
    async_example = "anthropic.AsyncAnthropic()"
    secret_attrs = ("api_key", "auth_token")
    missing = (
        "AnthropicEngine needs a client: pass client=anthropic.Anthropic() for "
        "complete() and/or async_client=anthropic.AsyncAnthropic() for acomplete(), "
        "or build both with AnthropicEngine.from_env()"
    )

    def __init__(self, client: Any, async_client: Any, *, timeout: float, max_retries: int) -> None:
        super().__init__(
            import_anthropic(),
            "AnthropicEngine",
            client,
            async_client,
            timeout=timeout,
            max_retries=max_retries,
            missing=self.missing,
        )

    def reopen(self, client: Any) -> Any:
        return self.sdk.AsyncAnthropic(api_key=client.api_key, base_url=str(client.base_url))
