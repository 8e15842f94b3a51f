"""Sentence and marker syntax, defined once for the grammar, the tracker and the splitters.

The citation grammar (:mod:`citebacktrack.grammar.citations`), the decoder's sentence
tracker (:mod:`citebacktrack._tracker`), the vocabulary flags
(:mod:`citebacktrack.decoding.vocab_index`), the support scorer's passage windows and the
retrieval chunker all take their characters and rules from here, so that they agree on
where a sentence ends (``tests/test_syntax.py`` checks that they do).

A sentence ends at a terminator (``.``, ``!`` or ``?``), optionally followed by closing
quotes or parentheses, then whitespace. A period does not end a sentence when it is
*absorbed* (:func:`period_is_absorbed`): it closes

* an ellipsis ``...`` (only one: ``......`` is not grammatical),
* two dotted capitals ``U.S.``, ``A.D.``, ``J.K.``,
* a single capital initial (``J. K. Rowling``) or one of :data:`ABBREVIATIONS` (``e.g.``,
  ``Dr.``) at the start of a sentence or after one of :data:`ABBREVIATION_LEADS`.

Decimal points (``3.5``) and periods inside URLs are never followed by whitespace, so they
never end a sentence either.
"""

from __future__ import annotations

import re

__all__ = [
    "ABBREVIATIONS",
    "ABBREVIATION_LEADS",
    "CLOSERS",
    "ELLIPSIS",
    "MARKER_CLOSE",
    "MARKER_OPEN",
    "MARKER_RE",
    "RESERVED",
    "SENTENCE_END_RE",
    "TERMINATORS",
    "WHITESPACE",
    "cite_sentence",
    "leading_space",
    "period_is_absorbed",
    "quotable_sentence",
    "sentence_spans",
    "split_sentences",
    "strip_markers",
    "whole_words",
]

TERMINATORS = ".!?"
"""Characters that end a sentence (when followed by whitespace, or by a citation group)."""

CLOSERS = ")\"'\u201d\u2019"
"""Closing parentheses and quotes that may follow a terminator (or a marker group)."""

WHITESPACE = " \t\n\r"
"""Whitespace between sentences and blocks."""

MARKER_OPEN = "["
MARKER_CLOSE = "]"
RESERVED = MARKER_OPEN + MARKER_CLOSE
"""Characters that belong to citation markers only; prose cannot contain them."""

MARKER_RE = re.compile(r"\[([0-9]+)\]")
"""One citation marker ``[N]``; group 1 is the id."""

ELLIPSIS = "..."
"""The one run of periods allowed inside a sentence (followed by a non-period)."""

ABBREVIATIONS = ("e.g.", "i.e.", "a.m.", "p.m.", "vs.", "Mr.", "Mrs.", "Ms.", "Dr.", "Prof.")
"""Dotted abbreviations whose final period never ends a sentence.

Only words that cannot end a sentence in ordinary prose: ``etc.``, ``Inc.``, ``Jr.``,
``St.`` or ``No.`` often do, and a small model uses any such way to continue past a
period as an escape from citing. Each must start a sentence or follow one of
:data:`ABBREVIATION_LEADS` (``the cause.g.`` is not ``e.g.``). Two dotted capitals
(``U.S.``) and single capital initials are covered by their own rules, not listed here.
"""

ABBREVIATION_LEADS = " ("
"""What comes before an abbreviation or an initial inside a sentence."""

SENTENCE_END_RE = re.compile(rf"[{re.escape(TERMINATORS)}]+[{re.escape(CLOSERS)}]*\s+")
"""A candidate sentence end: terminators, closers, whitespace (check the period with
:func:`period_is_absorbed`)."""

_STRIP_RE = re.compile(r"\s*\[[0-9]*\]")
_UPPER = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Bytes after which an abbreviation counts as starting a word: the leads, plus what can
# come before a sentence's first word (whitespace, a marker group's "]", nothing at all).
_WORD_START = frozenset((WHITESPACE + ABBREVIATION_LEADS + MARKER_CLOSE).encode())
_ABBREVIATION_BYTES = tuple(a.encode() for a in ABBREVIATIONS)
LONGEST_ABBREVIATION = max(len(a) for a in _ABBREVIATION_BYTES)
"""Bytes of context :func:`period_is_absorbed` needs before the period, plus one."""


def _starts_word(before: bytes, start: int) -> bool:
    return start <= 0 or before[start - 1] in _WORD_START


def period_is_absorbed(before: bytes) -> bool:
    """Whether the period that ends ``before`` belongs to the sentence, not ends it.

    ``before`` is the text up to and including the period (only its last
    ``LONGEST_ABBREVIATION + 1`` bytes matter). True for the last period of ``...``, of
    two dotted capitals (``U.S.``), of a capital initial (``J.``) and of a listed
    abbreviation at a word start (see the module docstring).
    """
    n = len(before)
    if n == 0 or before[-1] != 0x2E:  # "."
        return False
    if before.endswith(b"..."):
        return True
    if n >= 2 and before[-2] in _UPPER:
        if n >= 4 and before[-3] == 0x2E and before[-4] in _UPPER:
            return True  # U.S.
        if _starts_word(before, n - 2):
            return True  # J.
    return any(
        before.endswith(abbreviation) and _starts_word(before, n - len(abbreviation))
        for abbreviation in _ABBREVIATION_BYTES
    )


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Where each sentence of passage text lies: ``(start, end)`` offsets into ``text``.

    The one definition of a passage sentence (:func:`split_sentences` returns
    ``text[start:end]`` of each span). A sentence ends at terminators and closers followed
    by whitespace, unless the last terminator is an absorbed period
    (:func:`period_is_absorbed`: ``U.S.``, ``Dr.``, ``J. R. Tolkien``, an ellipsis). A line
    break inside a passage is whitespace (unlike in an answer, where the tracker ends a
    sentence at every newline), but a terminator followed by a line break always ends the
    sentence, as in the tracker. Spans exclude the whitespace around a sentence (as
    ``str.strip`` removes it); whitespace-only stretches give no span.
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for match in SENTENCE_END_RE.finditer(text):
        gap = match.group()
        last = match.start() + len(gap.rstrip().rstrip(CLOSERS)) - 1  # the last terminator
        before = text[max(0, last - LONGEST_ABBREVIATION) : last + 1].encode()
        if "\n" not in gap and period_is_absorbed(before):
            continue
        _add_stripped(spans, text, start, match.end())
        start = match.end()
    _add_stripped(spans, text, start, len(text))
    return spans


def _add_stripped(spans: list[tuple[int, int]], text: str, start: int, end: int) -> None:
    """Appends the span of ``text[start:end].strip()`` to ``spans`` unless it is empty."""
    piece = text[start:end]
    kept = piece.lstrip()
    if kept:
        first = start + len(piece) - len(kept)
        spans.append((first, first + len(kept.rstrip())))


def split_sentences(text: str) -> list[str]:
    """Split passage text into sentences by the same rules as the citation grammar.

    The sentences are ``text[start:end]`` for each span of :func:`sentence_spans`, which
    states the rules; each is stripped of surrounding whitespace and none is empty.
    """
    return [text[start:end] for start, end in sentence_spans(text)]


def cite_sentence(sentence: str, markers: str) -> str:
    """One sentence (no markers, no surrounding whitespace) with ``markers`` placed where
    the citation grammar puts a sentence's group: before its final terminator
    (``completed in 1889 [1].``), after it when closing quotes follow it (``he said
    "no." [1]``) or the period belongs to an abbreviation (``in the U.S. [1].``); a
    sentence without a terminator gets a period."""
    body = sentence.rstrip(CLOSERS)
    ends = body[-1:] in tuple(TERMINATORS) and not period_is_absorbed(body.encode())
    if not ends:
        return f"{sentence} {markers}." if markers else f"{sentence}."
    if not markers:
        return sentence
    if body != sentence:  # closers after the terminator: the group follows them
        return f"{sentence} {markers}"
    stem = body.rstrip(TERMINATORS).rstrip()
    return f"{stem} {markers}{body[-1]}"


def whole_words(text: str) -> str:
    """``text`` without a word the budget may have cut short: when it ends inside a word,
    up to that word's start (a claim cut mid-word, ``... the cap``, is judged on the
    words it surely has)."""
    if not text or not text[-1].isalnum():
        return text
    head = text.rstrip()
    cut = max(head.rfind(" "), head.rfind("\n"))
    return head[: cut + 1].rstrip() if cut >= 0 else text


def strip_markers(text: str) -> str:
    """``text`` without ``[N]`` markers and the whitespace before them (as
    :func:`citebacktrack.validation.strip_markers`)."""
    return _STRIP_RE.sub("", text)


def leading_space(out: bytes | bytearray) -> int:
    """Bytes of whitespace that ``out`` starts with (as ``str.lstrip`` sees it): leading
    whitespace is not part of an answer."""
    text = bytes(out[:64]).decode("utf-8", "ignore")
    stripped = text.lstrip()
    if not stripped and len(out) > 64:
        text = bytes(out).decode("utf-8", "ignore")
        stripped = text.lstrip()
    return len(text[: len(text) - len(stripped)].encode())


_PARENTHESES = str.maketrans({MARKER_OPEN: "(", MARKER_CLOSE: ")"})


def quotable_sentence(evidence: str) -> str:
    """The first sentence of ``evidence`` as prose the citation grammar takes: brackets
    shown as parentheses, whitespace collapsed, the final terminator dropped (the
    citation and a period follow); "" when it has none."""
    sentences = split_sentences(evidence)
    if not sentences:
        return ""
    text = " ".join(sentences[0].translate(_PARENTHESES).split())
    return text.rstrip(TERMINATORS).rstrip()
