"""``citebacktrack serve``: cited answers over HTTP, as JSON or as Server-Sent Events, and
a page that shows the evidence.

::

    from citebacktrack import Citeformer
    from citebacktrack.serve import create_app

    app = create_app(Citeformer(), documents="docs/")   # any ASGI server runs it
    # uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints (the OpenAPI schema is at ``/openapi.json``; FastAPI's ``/docs`` pages are off,
as they load their scripts from a CDN and the machine may be offline):

- ``POST /v1/answers`` takes ``{"question": ..., "sources": [...]}`` (or no sources: the
  served documents are searched with BM25) and returns ``{"answer", "sources"}``; with
  ``"stream": true`` or ``Accept: text/event-stream`` it streams the answer's events as SSE.
- ``GET /health``: 200 once the model is loaded, 503 while it loads.
- ``GET /``: the evidence page.

Every error is JSON, ``{"error": {"type", "message", "fields"}}``, with a 4xx status for bad
input and never a traceback. Past ``max_concurrent`` answers at once, up to ``max_queue``
more wait their turn; beyond that a request gets 429 with ``Retry-After``. A client that
goes away stops its answer within one decode step. Needs the ``serve`` extra
(``pip install "citebacktrack[serve]"``).
"""

from citebacktrack.serve._app import create_app, page_html
from citebacktrack.serve._wire import (
    AnswerRequest,
    AnswerResponse,
    ErrorBody,
    ErrorDetail,
    Limits,
    Queued,
    SourceInput,
)

__all__ = [
    "AnswerRequest",
    "AnswerResponse",
    "ErrorBody",
    "ErrorDetail",
    "Limits",
    "Queued",
    "SourceInput",
    "create_app",
    "page_html",
]
