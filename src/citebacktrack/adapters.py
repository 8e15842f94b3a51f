"""Sources from retrievers' results: LangChain documents and LlamaIndex nodes.

Duck-typed (neither library is imported). Each adapter returns the fields of a
:class:`~citebacktrack.types.Source`; :meth:`Source.from_langchain
<citebacktrack.types.Source.from_langchain>` and :meth:`Source.from_llamaindex
<citebacktrack.types.Source.from_llamaindex>` build the source from them, or a list of
sources from a list (a retriever's result). :func:`adapter_hint` names the adapter for a
document or node passed where a ``Source`` was due.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from typing import TypedDict, TypeVar

from pydantic import JsonValue, TypeAdapter, ValidationError

from citebacktrack.errors import InvalidSourcesError

__all__ = [
    "Adapter",
    "SourceFields",
    "adapt",
    "adapter_hint",
    "is_generated_id",
    "langchain_fields",
    "llamaindex_fields",
]


class SourceFields(TypedDict):
    """The keyword arguments of a :class:`~citebacktrack.types.Source`."""

    text: str
    id: str | None
    title: str
    url: str | None
    metadata: dict[str, JsonValue]
    score: float | None


Adapter = Callable[..., SourceFields]
"""An adapter: :func:`langchain_fields` or :func:`llamaindex_fields`."""

T = TypeVar("T")


def adapt(
    factory: Callable[..., T], value: object, adapter: Adapter, *, score: float | None = None
) -> T | list[T]:
    """``factory(**adapter(value))`` (``factory`` is ``Source``), or for a ``list`` (a
    retriever's result) one per item, in order; an item of a LangChain list may be a
    ``(Document, score)`` pair, of a LlamaIndex list a ``NodeWithScore``.

    Raises:
        InvalidSourcesError: a value the adapter or ``factory`` refuses (for a list, the
            message gives the item's 1-based number), or ``score`` given with a list
            (each item has its own).
    """
    if not isinstance(value, list):
        return factory(**adapter(value, score=score))
    if score is not None:
        raise InvalidSourcesError(
            "score= is the score of one document; the items of a list carry their own "
            "(a (Document, score) pair, NodeWithScore.score or a score metadata key)"
        )
    out: list[T] = []
    for number, item in enumerate(value, start=1):
        try:
            out.append(factory(**adapter(item)))
        except InvalidSourcesError as exc:
            raise InvalidSourcesError(f"item {number} of the list: {exc}") from exc
    return out


def adapter_hint(value: object) -> str | None:
    """What to do with a retriever's result passed where a ``Source`` is due: convert it
    with the adapter for a LangChain ``Document`` (or ``(Document, score)`` pair) or a
    LlamaIndex node or ``NodeWithScore``; ``None`` for anything else. Duck-typed."""
    if isinstance(value, tuple) and len(value) == 2:
        value = value[0]
    if isinstance(getattr(value, "page_content", None), str):
        return "convert LangChain documents with Source.from_langchain(docs) (the whole list)"
    node = getattr(value, "node", value)
    if hasattr(node, "node_id") and callable(getattr(node, "get_content", None)):
        return "convert LlamaIndex nodes with Source.from_llamaindex(nodes) (the whole list)"
    return None


def langchain_fields(document: object, *, score: float | None = None) -> SourceFields:
    """The source fields of a LangChain ``Document`` (or a ``(Document, score)`` pair).

    ``page_content`` becomes the text, ``id`` the id when set, ``metadata`` is copied
    whole; ``url`` is the metadata key ``url`` (or ``source`` when it is an http(s) URL);
    ``title`` the metadata key ``title``, else the file name in ``source``,
    ``file_path`` or ``file_name`` with ``", page N"`` when the metadata gives a page:
    ``page_label`` as written, else ``page_number`` (1-based), else ``page`` (the
    0-based page index of LangChain's PDF loaders, shown plus one: ``page: 3`` is
    ``page 4``). ``score`` comes from the argument, the pair, or a numeric ``score`` /
    ``relevance_score`` metadata key.

    Raises:
        InvalidSourcesError: no string ``page_content``, or metadata that is not JSON.
    """
    if isinstance(document, tuple) and len(document) == 2:
        document, pair_score = document
        score = score if score is not None else _number(pair_score)
    text = getattr(document, "page_content", None)
    if not isinstance(text, str):
        many = " (for many documents pass a list)" if isinstance(document, tuple) else ""
        raise InvalidSourcesError(
            f"{type(document).__name__} has no string page_content; pass a LangChain "
            f"Document{many} (or build Source(text=...) yourself)"
        )
    metadata = _metadata(getattr(document, "metadata", None), type(document).__name__)
    doc_id = getattr(document, "id", None)
    return _fields(
        text=text,
        id=doc_id if isinstance(doc_id, str) and doc_id else None,
        metadata=metadata,
        score=score,
        page_keys=("page_label", "page_number", "page"),
    )


def llamaindex_fields(node: object, *, score: float | None = None) -> SourceFields:
    """The source fields of a LlamaIndex ``NodeWithScore`` or node (``TextNode``, ``Document``).

    The node's text (``get_content()``, without metadata) becomes the text, ``node_id``
    the id, ``metadata`` is copied whole; ``url`` is the metadata key ``url`` (or an
    http(s) ``source``); ``title`` the metadata key ``title``, else the file name in
    ``source``, ``file_path`` or ``file_name`` with ``", page N"`` for a ``page_label``
    (as LlamaIndex's PDF reader writes it) or ``page_number``; ``score`` from the
    argument or ``NodeWithScore.score``. LlamaIndex gives a node built without an id a
    random UUID: it is kept as the id (it still names the node in its store) and
    :func:`is_generated_id` keeps it out of rendered references.

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
        page_keys=("page_label", "page_number"),
    )


def is_generated_id(source_id: str, number: int) -> bool:
    """True when ``source_id`` was not chosen by the caller: the source's 1-based
    position ``number`` (the id of a source given without one), or a random
    (version 4) UUID such as LlamaIndex gives a node built without an id, or a vector
    store a document added without one. Rendered references show no such id."""
    if source_id == str(number):
        return True
    try:
        parsed = uuid.UUID(source_id)
    except ValueError:
        return False
    return parsed.version == 4 and source_id.lower() in (str(parsed), parsed.hex)


def _fields(
    *,
    text: str,
    id: str | None,  # noqa: A002 - the field is called id
    metadata: dict[str, JsonValue],
    score: float | None,
    page_keys: tuple[str, ...],
) -> SourceFields:
    url = metadata.get("url")
    if not isinstance(url, str):
        where = metadata.get("source")
        url = where if isinstance(where, str) and _is_url(where) else None
    if score is None:
        score = _number(metadata.get("score", metadata.get("relevance_score")))
    return SourceFields(
        text=text,
        id=id,
        title=_title(metadata, page_keys),
        url=url,
        metadata=metadata,
        score=score,
    )


def _title(metadata: Mapping[str, JsonValue], page_keys: tuple[str, ...]) -> str:
    """The ``title`` key, else the file name in the metadata and its page, else ``""``."""
    title = metadata.get("title")
    if isinstance(title, str) and title.strip():
        return title
    name = next(filter(None, (_file_name(metadata.get(k)) for k in _FILE_KEYS)), None)
    if name is None:
        return ""
    for key in page_keys:
        page = metadata.get(key)
        if isinstance(page, int) and not isinstance(page, bool) and page >= 0:
            # LangChain's PDF loaders count ``page`` from 0; the other keys count from 1.
            return f"{name}, page {page + 1 if key == 'page' else page}"
        if isinstance(page, str) and page.strip():
            return f"{name}, page {page.strip()}"
    return name


_FILE_KEYS = ("source", "file_path", "file_name")


def _file_name(value: JsonValue | None) -> str | None:
    """The last part of a file path (``/data/apollo.pdf`` is ``apollo.pdf``); ``None``
    for a URL, a bare number (LlamaIndex's PyMuPDF reader writes the page as ``source``)
    or anything but a string."""
    if not isinstance(value, str) or _is_url(value):
        return None
    name = re.split(r"[\\/]", value.strip().rstrip("\\/"))[-1].strip()
    return name if name and not name.isdigit() else None


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


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
