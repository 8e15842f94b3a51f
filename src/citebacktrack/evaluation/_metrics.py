"""Text-only metrics of one answer: markers, answer hit, sentences and their scores.

The definitions are in the :mod:`citebacktrack.evaluation` docstring.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "AnswerMetrics",
    "Marker",
    "answer_hit",
    "count_sentences",
    "find_markers",
    "normalize_answer",
    "score_answer",
    "strip_markers",
]

_MARKER = re.compile(r"\[\s*\d+(?:\s*(?:,|;|-|–|—)\s*\d+)*\s*\]")
_VALID = re.compile(r"\[([1-9]\d*)\]")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\w")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True, slots=True)
class Marker:
    """One bracketed number (list) in an answer; ``source_index`` is None when invalid."""

    start: int
    end: int
    text: str
    source_index: int | None


def find_markers(text: str, n_sources: int) -> list[Marker]:
    """Every ``[N]``-like marker in ``text``; valid only as ``[N]`` with 1 <= N <= n_sources.

    ``[1, 2]``, ``[1-3]``, ``[0]``, ``[01]`` and ``[N]`` past the last source are invalid.
    """
    markers: list[Marker] = []
    for match in _MARKER.finditer(text):
        valid = _VALID.fullmatch(match.group())
        number = int(valid.group(1)) if valid else None
        if number is not None and number > n_sources:
            number = None
        markers.append(Marker(match.start(), match.end(), match.group(), number))
    return markers


def strip_markers(text: str) -> str:
    """``text`` with every marker (valid or not) removed."""
    return _MARKER.sub("", text)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and a/an/the, collapse spaces."""
    lowered = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", lowered).split())


def answer_hit(text: str, gold_answer: str) -> bool:
    """Whether the normalised gold answer occurs in the normalised answer (markers removed).

    A yes/no gold answer must occur as a whole word (``yes`` does not hit ``eyes``); others
    as a substring. An answer whose gold normalises to nothing never hits.
    """
    gold = normalize_answer(gold_answer)
    answer = normalize_answer(strip_markers(text))
    if not gold:
        return False
    if gold in ("yes", "no"):
        return re.search(rf"\b{gold}\b", answer) is not None
    return gold in answer


def count_sentences(text: str) -> int:
    """Sentences in ``text``: pieces between ``[.!?]`` + whitespace that hold a word
    character outside markers."""
    pieces = _SENTENCE_BREAK.split(text.strip())
    return sum(1 for piece in pieces if _WORD.search(strip_markers(piece)))


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerMetrics:
    """The text-only metrics of one answer (see the :mod:`citebacktrack.evaluation` docstring)."""

    non_empty: bool
    cited: bool
    markers: int
    valid_markers: int
    validity: float | None
    """Valid markers / markers; None for an answer without markers (nothing to judge)."""
    cited_sources: tuple[int, ...]
    correct_sources: int
    """``|cited ∩ gold|``."""
    gold_sources: int
    precision: float
    recall: float
    hit: bool
    sentences: int
    cites_per_sentence: float


def score_answer(
    text: str, *, n_sources: int, gold: Iterable[int], gold_answer: str
) -> AnswerMetrics:
    """Score one answer text against the gold sources and the gold answer."""
    markers = find_markers(text, n_sources)
    valid = [m.source_index for m in markers if m.source_index is not None]
    cited = set(valid)
    gold_set = set(gold)
    correct = len(cited & gold_set)
    sentences = count_sentences(text)
    return AnswerMetrics(
        non_empty=_WORD.search(strip_markers(text)) is not None,
        cited=bool(cited),
        markers=len(markers),
        valid_markers=len(valid),
        validity=len(valid) / len(markers) if markers else None,
        cited_sources=tuple(sorted(cited)),
        correct_sources=correct,
        gold_sources=len(gold_set),
        precision=correct / len(cited) if cited else 0.0,
        recall=correct / len(gold_set) if cited and gold_set else 0.0,
        hit=answer_hit(text, gold_answer),
        sentences=sentences,
        cites_per_sentence=len(markers) / sentences if sentences else 0.0,
    )
