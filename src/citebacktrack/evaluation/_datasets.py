"""Evaluation datasets: QA records with gold sources, loaded from JSON, and their split.

Records are split deterministically for tuning: an id is in ``holdout`` when
``int(sha256(id).hexdigest(), 16) % 3 == 0``, else in ``tune`` (about a third held out).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from citebacktrack.errors import DatasetError
from citebacktrack.types import Source

__all__ = ["SPLITS", "Example", "Split", "load_dataset", "parse_examples", "split_of"]

Split = Literal["tune", "holdout"]
SPLITS: tuple[Split, ...] = ("tune", "holdout")
"""The two parts of a dataset: ``tune`` (about two thirds) and ``holdout`` (a third)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Example:
    """One question with its sources, gold answer and gold (1-based) source numbers."""

    id: str
    question: str
    answer: str
    sources: tuple[Source, ...]
    gold: tuple[int, ...]

    @property
    def split(self) -> Split:
        """``tune`` or ``holdout`` (see :func:`split_of`)."""
        return split_of(self.id)


def split_of(example_id: str) -> Split:
    """``holdout`` when ``int(sha256(id), 16) % 3 == 0``, else ``tune``: deterministic,
    independent of the dataset's order and size, about a third held out."""
    digest = hashlib.sha256(example_id.encode("utf-8")).hexdigest()
    return "holdout" if int(digest, 16) % 3 == 0 else "tune"


def load_dataset(path: str | os.PathLike[str]) -> list[Example]:
    """Read a JSON list of QA records (see :func:`parse_examples` for the two formats).

    Raises:
        DatasetError: the file is missing or unreadable, not JSON, or a record is malformed.
    """
    file = Path(path)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise DatasetError(f"dataset {str(path)!r} {what}; pass the path of a JSON file")
    try:
        raw = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"dataset {str(path)!r} cannot be read as UTF-8 text: {exc}") from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"dataset {str(path)!r} is not JSON ({exc.msg} at line {exc.lineno}, column "
            f"{exc.colno}); pass a JSON list of records"
        ) from exc
    return parse_examples(data, origin=str(path))


def parse_examples(data: object, *, origin: str = "dataset") -> list[Example]:
    """Turn a decoded JSON list into examples; the format is detected per record.

    * citebacktrack's format: ``{"id", "question", "answer", "sources": [{"title", "text"}],
      "gold": [1-based source numbers]}``;
    * HotpotQA's distractor format: ``{"_id", "question", "answer", "supporting_facts":
      [[title, sentence_index], ...], "context": [[title, [sentence, ...]], ...]}``: each
      context paragraph is a source (sentences joined with a space) and gold holds the
      positions of the paragraphs whose titles ``supporting_facts`` names.

    Raises:
        DatasetError: not a list, an empty list, or a record that is malformed (the message
            names the record by position and id).
    """
    if not isinstance(data, list):
        raise DatasetError(
            f"{origin}: expected a JSON list of records, got a JSON {_json_type(data)}"
        )
    if not data:
        raise DatasetError(f"{origin}: the list of records is empty; nothing to evaluate")
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for position, record in enumerate(data, start=1):
        example = _parse_record(record, position, origin)
        if example.id in seen:
            raise DatasetError(
                f"{origin}: records {seen[example.id]} and {position} share the id "
                f"{example.id!r}; ids must be unique"
            )
        seen[example.id] = position
        examples.append(example)
    return examples


_PLAIN_FIELDS = ("id", "question", "answer", "sources", "gold")
_HOTPOT_FIELDS = ("_id", "question", "answer", "supporting_facts", "context")


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _parse_record(record: object, position: int, origin: str) -> Example:
    if not isinstance(record, dict):
        raise DatasetError(
            f"{origin}: record {position} is a JSON {_json_type(record)}, not an object"
        )
    hotpot = "_id" in record or "context" in record or "supporting_facts" in record
    key = "_id" if hotpot else "id"
    name = f"record {position}" + (
        f" (id {record[key]!r})" if isinstance(record.get(key), str) else ""
    )

    def fail(problem: str, fix: str) -> DatasetError:
        return DatasetError(f"{origin}: {name} {problem}; {fix}")

    required = _HOTPOT_FIELDS if hotpot else _PLAIN_FIELDS
    missing = [k for k in required if k not in record]
    if missing:
        layout = "HotpotQA distractor" if hotpot else "citebacktrack"
        raise fail(
            f"lacks {', '.join(repr(k) for k in missing)}",
            f"a record in the {layout} format needs {', '.join(required)}",
        )
    for k in (key, "question"):
        if not isinstance(record[k], str) or not record[k].strip():
            raise fail(f"has {k!r} = {record[k]!r}", "it must be a non-empty string")
    if not isinstance(record["answer"], str):
        raise fail(f"has answer = {record['answer']!r}", "the gold answer must be a string")
    if hotpot:
        sources, gold = _hotpot_sources(record, fail)
    else:
        sources, gold = _plain_sources(record, fail)
    if not gold:
        raise fail("has no gold source", "list at least one supporting source")
    for number in gold:
        if not 1 <= number <= len(sources):
            raise fail(
                f"has gold source {number} but {len(sources)} source(s)",
                "gold numbers are 1-based positions in its sources",
            )
    return Example(
        id=record[key],
        question=record["question"],
        answer=record["answer"],
        sources=sources,
        gold=gold,
    )


def _plain_sources(
    record: dict[str, Any], fail: Callable[[str, str], DatasetError]
) -> tuple[tuple[Source, ...], tuple[int, ...]]:
    raw_sources, raw_gold = record["sources"], record["gold"]
    if not isinstance(raw_sources, list) or not raw_sources:
        raise fail("has no sources", "'sources' must be a non-empty list of {title, text}")
    sources: list[Source] = []
    for number, item in enumerate(raw_sources, start=1):
        if not isinstance(item, dict):
            raise fail(f"has source {number} = {item!r}", "each source is {title, text}")
        text, title = item.get("text"), item.get("title", "")
        if not isinstance(text, str) or not text.strip():
            raise fail(f"has source {number} without text", "give each source a 'text' string")
        if not isinstance(title, str):
            raise fail(f"has source {number} with title {title!r}", "a title is a string")
        sources.append(Source(title=title, text=text))
    if not isinstance(raw_gold, list) or not all(
        isinstance(g, int) and not isinstance(g, bool) for g in raw_gold
    ):
        raise fail(f"has gold = {raw_gold!r}", "'gold' must be a list of 1-based integers")
    return tuple(sources), tuple(dict.fromkeys(raw_gold))


def _hotpot_sources(
    record: dict[str, Any], fail: Callable[[str, str], DatasetError]
) -> tuple[tuple[Source, ...], tuple[int, ...]]:
    context, facts = record["context"], record["supporting_facts"]
    if not isinstance(context, list) or not context:
        raise fail("has no context", "'context' must be a list of [title, [sentences]]")
    sources: list[Source] = []
    positions: dict[str, int] = {}
    for number, item in enumerate(context, start=1):
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], list)
            or not all(isinstance(s, str) for s in item[1])
        ):
            raise fail(
                f"has context paragraph {number} = {str(item)[:80]!r}",
                "each paragraph is [title, [sentence, ...]]",
            )
        title, sentences = item
        text = " ".join(s.strip() for s in sentences if s.strip())
        if not text:
            raise fail(f"has context paragraph {number} ({title!r}) without text", "drop it")
        positions.setdefault(title, number)
        sources.append(Source(title=title, text=text))
    if not isinstance(facts, list):
        raise fail("has supporting_facts that is not a list", "use [[title, sentence], ...]")
    gold: list[int] = []
    for fact in facts:
        if not isinstance(fact, list | tuple) or not fact or not isinstance(fact[0], str):
            raise fail(f"has supporting fact {fact!r}", "each fact is [title, sentence_index]")
        if fact[0] not in positions:
            raise fail(
                f"names the supporting title {fact[0]!r}, which is not in its context",
                "every supporting_facts title must be a context paragraph title",
            )
        gold.append(positions[fact[0]])
    return tuple(sources), tuple(sorted(set(gold)))
