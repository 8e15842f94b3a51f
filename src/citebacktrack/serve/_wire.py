"""The service's wire types: limits, request and response bodies, typed errors, and the
body-size middleware."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from citebacktrack._arguments import Number, check_fields
from citebacktrack.errors import (
    BackendError,
    CitebacktrackError,
    ConfigurationError,
    ContextOverflowError,
    InvalidSourcesError,
)
from citebacktrack.types import Answer, CitationMode, Source

if TYPE_CHECKING:
    from starlette.responses import Response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Limits:
    """What one server accepts.

    Attributes:
        max_concurrent: answers decoded at once (a local model decodes one at a time).
        max_queue: answers waiting their turn; past it a request gets 429.
        max_body_bytes: largest request body; a larger one gets 413.
        max_sources: most sources in one request.
        max_source_chars: longest source text.
        max_question_chars: longest question.
        max_new_tokens: the most answer tokens a request may ask for.

    Each is an int >= 1 (``max_queue`` >= 0), checked by the shared argument rules: a bool,
    a string or a float is a :class:`~citebacktrack.errors.ConfigurationError` naming the
    field.
    """

    max_concurrent: int = 1
    max_queue: int = 32
    max_body_bytes: int = 1024 * 1024
    max_sources: int = 50
    max_source_chars: int = 20_000
    max_question_chars: int = 2_000
    max_new_tokens: int = 1024

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "max_concurrent": Number(1, whole=True, minimum=1),
                "max_queue": Number(32, whole=True, minimum=0),
                "max_body_bytes": Number(1024 * 1024, whole=True, minimum=1),
                "max_sources": Number(50, whole=True, minimum=1),
                "max_source_chars": Number(20_000, whole=True, minimum=1),
                "max_question_chars": Number(2_000, whole=True, minimum=1),
                "max_new_tokens": Number(1024, whole=True, minimum=1),
            },
        )


class SourceInput(BaseModel):
    """One source in a request (the fields of :class:`~citebacktrack.Source`)."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, description="The passage the answer may cite.")
    title: str = Field(default="", max_length=500, description="Shown in the references.")
    id: str | None = Field(default=None, max_length=500, description="Your id for it.")
    url: str | None = Field(default=None, max_length=2000, description="Where it lives.")


class AnswerRequest(BaseModel):
    """The body of ``POST /v1/answers``."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, description="The question to answer.")
    sources: list[SourceInput] | None = Field(
        default=None,
        description="The sources to cite, [1] first; omitted: the served documents are searched.",
    )
    k: int = Field(default=5, ge=1, le=20, description="Passages to retrieve without sources.")
    stream: bool = Field(default=False, description="Stream the events as SSE.")
    policy: CitationMode | None = Field(default=None, description="Citation policy.")
    max_new_tokens: int | None = Field(default=None, ge=1, description="Most answer tokens.")
    backend: str | None = Field(
        default=None, description="The backend to use; must be the one this server runs."
    )


class AnswerResponse(BaseModel):
    """The JSON answer: the cited answer and the numbered sources it cites by number."""

    answer: Answer
    sources: list[Source]


class Queued(BaseModel):
    """SSE only: the answer waits for ``ahead`` others before the model takes it."""

    type: Literal["queued"] = "queued"
    ahead: int = Field(description="Answers in progress or waiting before this one.")


class ErrorDetail(BaseModel):
    type: str = Field(description="A stable name: invalid_request, payload_too_large, …")
    message: str = Field(description="What went wrong and what to send instead.")
    fields: list[dict[str, str]] = Field(
        default_factory=list, description="For invalid_request: each bad field and why."
    )


class ErrorBody(BaseModel):
    """Every error response."""

    error: ErrorDetail


class ServiceError(Exception):
    """An error answered with ``status`` and a typed JSON body."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        *,
        fields: list[dict[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=ErrorDetail(type=kind, message=message, fields=fields or []))
        self.headers = dict(headers or {})


def error_json(status: int, body: ErrorBody, headers: Mapping[str, str] | None = None) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


DRAIN_BYTES = 64 * 1024 * 1024
"""Most bytes of a refused body read and dropped after its 413."""
DRAIN_S = 10.0
"""Most seconds spent reading a refused body after its 413."""


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before any of it is
    parsed (by its Content-Length, or counted as it arrives)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def _too_large(self, send: Send) -> None:
        body = ErrorBody(
            error=ErrorDetail(
                type="payload_too_large",
                message=f"the request body is over {self.limit} bytes; send fewer or shorter "
                "sources (or start the server with a larger --max-body-bytes)",
            )
        )
        payload = body.model_dump_json().encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(receive, send, more=int(declared) <= DRAIN_BYTES)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(receive, send, more=message.get("more_body", False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the client's disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, receive: Receive, send: Send, *, more: bool = True) -> None:
        """413, after reading and dropping the rest of the body (up to
        :data:`DRAIN_BYTES` and :data:`DRAIN_S`), so that a client that sends it all reads
        the answer rather than a connection reset (the server answers before reading the
        body when its declared length is over that)."""
        drained = 0
        with anyio.move_on_after(DRAIN_S):
            while more and drained < DRAIN_BYTES:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                drained += len(message.get("body", b""))
                more = message.get("more_body", False)
        await self._too_large(send)


def field_errors(exc: ValidationError | Any) -> list[dict[str, str]]:
    """Each bad field of a validation error (``sources.0.text``) and why."""
    out = []
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        out.append({"field": ".".join(location) or "(body)", "message": str(error.get("msg", ""))})
    return out


def invalid(field: str, message: str) -> ServiceError:
    """A 422 for one bad field."""
    return ServiceError(
        422,
        "invalid_request",
        f"{field}: {message}",
        fields=[{"field": field, "message": message}],
    )


def from_library(exc: CitebacktrackError) -> ServiceError:
    """The HTTP error for a library error: bad input is 4xx, a failed backend 502."""
    if isinstance(exc, InvalidSourcesError):
        return ServiceError(422, "invalid_sources", str(exc))
    if isinstance(exc, ContextOverflowError):
        return ServiceError(413, "context_overflow", str(exc))
    if isinstance(exc, ConfigurationError):
        return ServiceError(422, "invalid_request", str(exc))
    if isinstance(exc, BackendError):
        return ServiceError(502, "backend_error", str(exc))
    return ServiceError(500, "internal_error", str(exc))
