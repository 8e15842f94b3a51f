"""The service: admission, retrieval, the answer as JSON or SSE, the page."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from importlib import resources
from pathlib import Path
from typing import Any

import anyio

from citebacktrack._arguments import instance, path, text
from citebacktrack.errors import CitebacktrackError, MissingDependencyError
from citebacktrack.orchestrator import Citeformer
from citebacktrack.serve._wire import (
    AnswerRequest,
    AnswerResponse,
    BodyLimit,
    ErrorBody,
    ErrorDetail,
    Limits,
    Queued,
    Receive,
    Scope,
    Send,
    ServiceError,
    error_json,
    field_errors,
    from_library,
    invalid,
)
from citebacktrack.sse import MEDIA_TYPE, sse_frame
from citebacktrack.types import Answer, Done, Event, Source

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
except ImportError as exc:  # pragma: no cover - the serve extra is installed in tests
    raise MissingDependencyError(
        feature="citebacktrack serve", extra="serve", module="fastapi"
    ) from exc


class _Service:
    """The state of one app: the Citeformer, its documents, the admission counters."""

    def __init__(
        self, cf: Citeformer, documents: Path | None, limits: Limits, backend_name: str
    ) -> None:
        self.cf = cf
        self.documents = documents
        self.limits = limits
        self.backend_name = backend_name
        self.index: Any = None
        self.passages = 0
        self.ready = False
        self.failure: str | None = None
        self.slots = anyio.Semaphore(limits.max_concurrent)
        self._tickets = itertools.count()
        self._live: set[int] = set()  # the tickets of the answers admitted and not released

    async def start(self) -> None:
        try:
            if self.documents is not None:
                self.index = await anyio.to_thread.run_sync(self._index)
            await self.cf.aload()
        except (CitebacktrackError, OSError) as exc:
            self.failure = str(exc)
            raise
        self.ready = True

    def _index(self) -> Any:
        from citebacktrack.retrieval import PassageIndex, load_passages

        assert self.documents is not None
        passages = load_passages(self.documents)
        self.passages = len(passages)
        return PassageIndex(passages)

    def check_ready(self) -> None:
        if self.failure is not None:
            raise ServiceError(503, "unavailable", f"the model did not load: {self.failure}")
        if not self.ready:
            raise ServiceError(
                503,
                "loading",
                "the model is still loading; retry in a few seconds",
                headers={"Retry-After": "2"},
            )

    def sources_for(self, body: AnswerRequest) -> list[Source]:
        limits = self.limits
        if len(body.question) > limits.max_question_chars:
            raise invalid("question", f"at most {limits.max_question_chars} characters")
        if body.backend is not None and body.backend.strip().lower() != self.backend_name:
            raise ServiceError(
                400,
                "unknown_backend",
                f"unknown backend {body.backend!r}: this server runs {self.backend_name!r}; "
                "leave 'backend' out or start another server with --backend",
            )
        if body.max_new_tokens is not None and body.max_new_tokens > limits.max_new_tokens:
            raise invalid("max_new_tokens", f"at most {limits.max_new_tokens}")
        if body.sources is None:
            if self.index is None:
                raise invalid("sources", "this server has no documents (--docs); send the sources")
            return list(self.index.search(body.question, body.k))
        if not body.sources:
            raise invalid("sources", "empty; send at least one source or leave it out")
        if len(body.sources) > limits.max_sources:
            raise invalid(
                "sources", f"{len(body.sources)} sources; send at most {limits.max_sources}"
            )
        for number, source in enumerate(body.sources):
            if len(source.text) > limits.max_source_chars:
                raise invalid(
                    f"sources.{number}.text",
                    f"{len(source.text)} characters; at most {limits.max_source_chars} "
                    "(split long documents into passages)",
                )
        try:
            return [Source(**source.model_dump(exclude_none=True)) for source in body.sources]
        except CitebacktrackError as exc:
            raise from_library(exc) from exc

    @property
    def admitted(self) -> int:
        """Answers in progress or waiting."""
        return len(self._live)

    def admit(self) -> tuple[int, Callable[[], None]]:
        """Count one more answer in progress or waiting, or refuse it (429) past capacity;
        returns its ticket (admission order) and the release, which may be called more
        than once."""
        capacity = self.limits.max_concurrent + self.limits.max_queue
        if self.admitted >= capacity:
            raise ServiceError(
                429,
                "overloaded",
                f"this server is at its limit of {capacity} answers in progress or "
                "waiting; retry in a few seconds",
                headers={"Retry-After": "1"},
            )
        ticket = next(self._tickets)
        self._live.add(ticket)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._live.discard(ticket)

        return ticket, release

    def events(self, body: AnswerRequest, sources: list[Source]) -> AsyncIterator[Event]:
        overrides: dict[str, Any] = {}
        if body.policy is not None:
            overrides["policy"] = self.cf.policy.model_copy(update={"mode": body.policy})
        if body.max_new_tokens is not None:
            overrides["budgets"] = dataclasses.replace(
                self.cf.budgets, max_new_tokens=body.max_new_tokens
            )
        try:
            return self.cf.astream(body.question, sources, **overrides)
        except CitebacktrackError as exc:
            raise from_library(exc) from exc

    async def answer_events(
        self, events: AsyncIterator[Event], ticket: int
    ) -> AsyncIterator[Event | Queued]:
        """The answer's events, ``Started`` first, then ``Queued`` if it must wait, then the
        decode once a slot is free."""
        try:
            async for event in events:
                yield event
                if event.type == "started":
                    break
            # Only the answers admitted before this one and still there: those that came
            # after it (requests arriving together) are not ahead of it.
            ahead = sum(1 for other in self._live if other < ticket)
            if self.slots.value == 0 and ahead > 0:
                yield Queued(ahead=ahead)
            async with self.slots:
                async for event in events:
                    yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]


def page_html() -> str:
    """The evidence page (one self-contained HTML file, no external resources)."""
    return (
        resources.files("citebacktrack")
        .joinpath("data", "page", "index.html")
        .read_text(encoding="utf-8")
    )


def create_app(
    cf: Citeformer,
    *,
    documents: str | Path | None = None,
    limits: Limits | None = None,
    backend_name: str = "llamacpp",
) -> FastAPI:
    """The HTTP service over ``cf`` (see the module docs).

    Args:
        cf: answers every request; loaded at startup (``/health`` says 503 until then) and
            closed at shutdown.
        documents: a folder of .txt/.md documents searched (BM25) for requests without
            sources; ``None``: requests must send their sources.
        limits: what one request and the server accept (default :class:`Limits`).
        backend_name: the backend's name, as requests may give it.

    Raises:
        ConfigurationError: an argument of the wrong type (``cf`` not a Citeformer,
            ``documents`` not a path, ``limits`` not a :class:`Limits`, ``backend_name`` not
            a non-empty str).
        MissingDependencyError: FastAPI is not installed (the ``serve`` extra).
    """
    instance(
        "cf",
        cf,
        Citeformer,
        "pass Citeformer(backend), e.g. create_app(Citeformer())",
        optional=False,
    )
    path("documents", documents, "pass a folder of .txt/.md documents, or None")
    instance(
        "limits",
        limits,
        Limits,
        "pass Limits(...), e.g. Limits(max_queue=8), or None for the defaults",
    )
    text("backend_name", backend_name, "pass the backend's name, e.g. backend_name='llamacpp'")
    service = _Service(
        cf, Path(documents) if documents is not None else None, limits or Limits(), backend_name
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        del app
        async with anyio.create_task_group() as tg:
            tg.start_soon(_start_quietly, service)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
        await anyio.to_thread.run_sync(cf.close)

    app = FastAPI(
        docs_url=None,  # FastAPI's doc pages load scripts from a CDN: off, to work offline
        redoc_url=None,
        title="citebacktrack",
        summary="Answers whose [N] citations were checked against their sources while decoding.",
        lifespan=lifespan,
        responses={
            "4XX": {"model": ErrorBody, "description": "Bad input; the message says what to send."},
            "5XX": {"model": ErrorBody, "description": "The model is loading or failed."},
        },
    )
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return error_json(exc.status, exc.body, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        fields = field_errors(exc)
        if any(error.get("type") == "json_invalid" for error in exc.errors()):
            return error_json(
                400,
                ErrorBody(
                    error=ErrorDetail(
                        type="malformed_json",
                        message="the body is not valid JSON; send "
                        '{"question": "...", "sources": [{"text": "..."}]}',
                        fields=fields,
                    )
                ),
            )
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
        return error_json(
            422,
            ErrorBody(
                error=ErrorDetail(
                    type="invalid_request",
                    message=f"{summary}; see /openapi.json for the request schema",
                    fields=fields,
                )
            ),
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_json(
            exc.status_code,
            ErrorBody(
                error=ErrorDetail(
                    type=kind, message=f"{exc.detail}: {request.method} {request.url.path}"
                )
            ),
            exc.headers,
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        return error_json(
            500,
            ErrorBody(
                error=ErrorDetail(
                    type="internal_error",
                    message=f"{type(exc).__name__}: {exc} (the server keeps serving)",
                )
            ),
        )

    @app.get("/health", summary="200 once the model is loaded, 503 while it loads")
    async def health() -> Response:
        state = "ok" if service.ready else "failed" if service.failure else "loading"
        payload = {
            "status": state,
            "backend": service.backend_name,
            "documents": service.documents is not None,
            "passages": service.passages,
            "answering": service.admitted,
            "capacity": service.limits.max_concurrent + service.limits.max_queue,
        }
        return JSONResponse(payload, status_code=200 if service.ready else 503)

    @app.post(
        "/v1/answers",
        response_model=AnswerResponse,
        summary="A cited answer (JSON), or its events as Server-Sent Events",
        responses={200: {"content": {MEDIA_TYPE: {}}}},
    )
    async def answers(body: AnswerRequest, request: Request) -> Response:
        service.check_ready()
        sources = await anyio.to_thread.run_sync(service.sources_for, body)
        events = service.events(body, sources)  # input checked here: 4xx before admission
        try:
            ticket, release = service.admit()
        except ServiceError:
            await events.aclose()  # type: ignore[attr-defined]
            raise
        answer_events = service.answer_events(events, ticket)
        if body.stream or MEDIA_TYPE in request.headers.get("accept", ""):
            return _ClosingStream(
                _frames(answer_events),
                on_close=release,
                media_type=MEDIA_TYPE,
                headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )
        try:
            answer = await _until_disconnect(request, _final_answer(answer_events))
        finally:
            release()
        payload = AnswerResponse(answer=answer, sources=sources)
        return JSONResponse(payload.model_dump(mode="json"))

    page = page_html()  # read once: the page is package data

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page_route() -> Response:
        return HTMLResponse(page)

    app.add_middleware(BodyLimit, limit=service.limits.max_body_bytes)
    return app


async def _start_quietly(service: _Service) -> None:
    with suppress(CitebacktrackError, OSError):
        await service.start()  # on failure /health and every request report it


async def _final_answer(events: AsyncIterator[Event | Queued]) -> Answer:
    answer: Answer | None = None
    try:
        async for event in events:
            if isinstance(event, Done):
                answer = event.answer
    except CitebacktrackError as exc:
        raise from_library(exc) from exc
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    if answer is None:  # pragma: no cover - a stream always ends on Done
        raise ServiceError(500, "internal_error", "the answer stream ended without Done")
    return answer


async def _until_disconnect(request: Request, work: Awaitable[Answer]) -> Answer:
    """``work``'s result; a client that goes away first cancels it (which stops the
    decode) rather than leaving the model busy for nobody."""
    result: list[Answer] = []
    failure: list[Exception] = []

    async with anyio.create_task_group() as tg:

        async def run() -> None:
            try:
                result.append(await work)
            except Exception as exc:  # raised below, outside the task group's ExceptionGroup
                failure.append(exc)
            tg.cancel_scope.cancel()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        tg.start_soon(watch)
    if failure:
        raise failure[0]
    if not result:
        raise ServiceError(499, "client_closed", "the client went away before the answer")
    return result[0]


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that closes its events however it ends (Starlette leaves the
    body iterator suspended when the client goes away during a send)."""

    def __init__(
        self, content: AsyncIterator[str], *, on_close: Callable[[], None], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    await self.body_iterator.aclose()  # type: ignore[attr-defined]
            finally:
                self._on_close()


async def _frames(events: AsyncIterator[Event | Queued]) -> AsyncIterator[str]:
    """SSE frames of the events; a library error mid-stream becomes an ``error`` event."""
    try:
        async for event in events:
            yield sse_frame(event)  # type: ignore[arg-type]
    except CitebacktrackError as exc:
        error = from_library(exc)
        yield f"event: error\ndata: {json.dumps(error.body.model_dump(mode='json'))}\n\n"
    finally:
        await events.aclose()  # type: ignore[attr-defined]
