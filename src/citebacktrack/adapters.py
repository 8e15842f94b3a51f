"""Sources from retrievers' results: LangChain documents and LlamaIndex nodes.

Duck-typed (neither library is imported). Each adapter returns the fields of a
:class:`~citebacktrack.types.Source`; :meth:`Source.from_langchain
<citebacktrack.types.Source.from_langchain>` and :meth:`Source.from_llamaindex
<citebacktrack.types.Source.from_llamaindex>` build the source from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypedDict

from pydantic import JsonValue, TypeAdapter, ValidationError

from citebacktrack.errors import InvalidSourcesError

__all__ = ["SourceFields", "langchain_fields", "llamaindex_fields"]


class SourceFields(TypedDict):
    """The keyword arguments of a :class:`~citebacktrack.types.Source`."""

    text: str
    id: str | None
    title: str
    url: str | None
    metadata: dict[str, JsonValue]
    score: float | None


def langchain_fields(document: object, *, score: float | None = None) -> SourceFields:
    """The source fields of a LangChain ``Document`` (or a ``(Document, score)`` pair).

    ``page_content`` becomes the text, ``id`` the id when set, ``metadata`` is copied
    whole; ``title`` and ``url`` are taken from the metadata keys ``title`` and ``url``
    (or ``source`` when it is an http(s) URL); ``score`` from the argument, the pair, or
    a numeric ``score`` / ``relevance_score`` metadata key.

    Raises:
        InvalidSourcesError: no string ``page_content``, or metadata that is not JSON.
    """
    if isinstance(document, tuple) and len(document) == 2:
        document, pair_score = document
        score = score if score is not None else _number(pair_score)
    text = getattr(document, "page_content", None)
    if not isinstance(text, str):
        raise InvalidSourcesError(
            f"{type(document).__name__} has no string page_content; pass a LangChain "
            "Document (or build Source(text=...) yourself)"
        )
    metadata = _metadata(getattr(document, "metadata", None), type(document).__name__)
    doc_id = getattr(document, "id", None)
    return _fields(
        text=text,
        id=doc_id if isinstance(doc_id, str) and doc_id else None,
        metadata=metadata,
        score=score,
    )


def llamaindex_fields(node: object, *, score: float | None = None) -> SourceFields:
    """The source fields of a LlamaIndex ``NodeWithScore`` or node (``TextNode``, ``Document``).

    The node's text (``get_content()``, without metadata) becomes the text, ``node_id``
    the id, ``metadata`` is copied whole; ``title`` and ``url`` come from the metadata
    keys ``title`` (or ``file_name``) and ``url``; ``score`` from the argument or
    ``NodeWithScore.score``.

    Raises:
        InvalidSourcesError: the node has no text, or metadata that is not JSON.
    """
    inner = getattr(node, "node", None)
    if inner is not None:
        score = score if score is not None else _number(getattr(node, "score", None))
        node = inner
    text = getattr(node, "text", None)
    if not isinstance(text, str):
        get_content = getattr(node, "get_content", None)
        text = get_content() if callable(get_content) else None
    if not isinstance(text, str):
        raise InvalidSourcesError(
            f"{type(node).__name__} has no text; pass a LlamaIndex node or NodeWithScore "
            "(or build Source(text=...) yourself)"
        )
    metadata = _metadata(getattr(node, "metadata", None), type(node).__name__)
    node_id = getattr(node, "node_id", None) or getattr(node, "id_", None)
    return _fields(
        text=text,
        id=node_id if isinstance(node_id, str) and node_id else None,
        metadata=metadata,
        score=score,
        title_keys=("title", "file_name"),
    )


def _fields(
    *,
    text: str,
    id: str | None,  # noqa: A002 - the field is called id
    metadata: dict[str, JsonValue],
    score: float | None,
    title_keys: tuple[str, ...] = ("title",),
) -> SourceFields:
    title = next((t for k in title_keys if isinstance(t := metadata.get(k), str)), None)
    url = metadata.get("url")
    if not isinstance(url, str):
        where = metadata.get("source")
        url = (
            where if isinstance(where, str) and where.startswith(("http://", "https://")) else None
        )
    if score is None:
        score = _number(metadata.get("score", metadata.get("relevance_score")))
    return SourceFields(
        text=text,
        id=id,
        title=title if isinstance(title, str) else "",
        url=url,
        metadata=metadata,
        score=score,
    )


def _number(value: object) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _metadata(value: object, what: str) -> dict[str, JsonValue]:
    """A retriever's metadata as JSON values, or a typed error naming the bad key."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidSourcesError(
            f"the metadata of this {what} is a {type(value).__name__}, not a mapping"
        )
    try:
        checked = _JSON_METADATA.validate_python(dict(value))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"][:-1] or error["loc"])
        raise InvalidSourcesError(
            f"metadata key {where!r} of this {what} is not a JSON value ({error['msg']}); "
            "convert it (e.g. a date to an ISO string) before building the Source"
        ) from exc
    return checked


_JSON_METADATA: TypeAdapter[dict[str, JsonValue]] = TypeAdapter(dict[str, JsonValue])
