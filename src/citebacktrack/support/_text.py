"""Text analysis for lexical support: folding, tokens, stems, content words, names, negation."""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache

from citebacktrack.syntax import SENTENCE_END_RE as _SENTENCE_END_RE

# --- text normalisation --------------------------------------------------------------------

_STOPWORD_TEXT = (
    "a about above after again against all also although am an and any are aren around as at "
    "be been before being below between both but by can cannot could couldn did didn do does "
    "doesn doing don down during each either else ever few for from further had hadn has "
    "hasn have haven having he her here hers herself him himself his how however i if in "
    "into is isn it its itself just let me more most much must my myself neither no nor not "
    "now of off on once one only or other ought our ours ourselves out over own same shall "
    "she should shouldn so some such than that the their theirs them themselves then there "
    "these they this those though through thus to too under until up upon us very via was "
    "wasn we were weren what when where whether which while who whom whose why will with "
    "within without won would wouldn yet yes you your yours yourself yourselves "
    "st nd rd th ll ve re "
    "also known called many several may might like well often later still even"
)
_STOPWORDS: frozenset[str] = frozenset(_STOPWORD_TEXT.split())
"""Compact English function-word list; these words carry no evidence of support."""

_NUMBER_WORDS: dict[str, str] = {
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
}
"""Spelled-out numbers normalised to digits ("one" is left out: it is mostly a pronoun)."""

_CONTRACTION_TAILS = frozenset({"s", "re", "ve", "ll", "d", "m"})
_MARKER_RE = re.compile(r"\[\s*\d+\s*\]")
_TOKEN_RE = re.compile(
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
    r"|(?P<word>[^\W\d_]+(?:['-][^\W\d_]+)*)"
)
_APOSTROPHES = str.maketrans(
    {"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'", "\u2010": "-", "\u2011": "-"}
)
_COMBINING_RE = re.compile(r"[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")
_CLAUSE_BREAK_RE = re.compile(r"[,;:()\u2013\u2014]|\s-\s")


def fold(text: str) -> str:
    """Returns ``text`` without accents and with typographic apostrophes made plain."""
    text = text.translate(_APOSTROPHES)
    if text.isascii():
        return text
    return _COMBINING_RE.sub("", unicodedata.normalize("NFKD", text))


def normalise_number(raw: str) -> str:
    """Strips thousands separators and trailing decimal zeros: ``11,872`` -> ``11872``."""
    number = raw.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


_DERIVATIONAL_SUFFIXES = ("ation", "ness", "ment", "ional", "ion", "ive", "al", "ly")
"""Checked in order after inflections; one is stripped when at least 4 letters remain."""


@lru_cache(maxsize=16384)
def stem_of(word: str) -> str:
    """Light, deterministic suffix stripping: plurals, -ing, -ed, one derivational ending, -e.

    Both claims and sources go through the same function, so an imperfect stem still
    matches its own inflections: ``rains``/``rain``, ``declared``/``declare``,
    ``studies``/``study``, ``running``/``run``, ``depression``/``depressive``.
    """
    if len(word) <= 3:
        return word
    if word.endswith(("ies", "ied")) and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("sses"):
        word = word[:-2]
    elif word.endswith("ing") and len(word) > 5:
        word = _undouble(word[:-3])
    elif word.endswith("ed") and len(word) > 4:
        word = _undouble(word[:-2])
    elif word.endswith(("ches", "shes", "xes", "zes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in _DERIVATIONAL_SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            word = word[: -len(suffix)]
            break
    if word.endswith("e") and len(word) > 3:
        word = word[:-1]
    return word


def _undouble(stem: str) -> str:
    """Drops a doubled final consonant left by -ing/-ed (``runn`` -> ``run``), keeping ll/ss/zz."""
    if len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] not in "aeioulsz":
        return stem[:-1]
    return stem


@dataclass(frozen=True, slots=True)
class Terms:
    """Content terms of a text: distinct stems in order, plus the guarded subsets."""

    words: tuple[str, ...]
    """Distinct content stems (numbers included) in order of first appearance."""
    numbers: tuple[tuple[str, str], ...]
    """(normalised, surface form) of numbers, in order of first appearance."""
    entities: tuple[tuple[str, str], ...]
    """(stem, surface form) of names: capitalised words not opening a sentence."""


@dataclass(frozen=True, slots=True)
class Token:
    """One content token of a claim, with the clause it belongs to."""

    stem: str
    surface: str
    is_number: bool
    is_name: bool
    clause: int


def tokenize(text: str) -> list[Token]:
    """Tokenises ``text`` into content tokens, numbering clauses split at ``, ; :``."""
    tokens: list[Token] = []
    sentence_start = True
    clause = 0
    folded = fold(_MARKER_RE.sub(" ", text))
    position = 0
    for match in _TOKEN_RE.finditer(folded):
        gap = folded[position : match.start()]
        position = match.end()
        if gap != " ":
            # A sentence boundary resets "first word": an opening capital says nothing.
            if _SENTENCE_END_RE.search(gap):
                sentence_start = True
            if _CLAUSE_BREAK_RE.search(gap):
                clause += 1
        raw_number = match.group("num")
        if raw_number is not None:
            number = normalise_number(raw_number)
            tokens.append(Token(number, raw_number, True, False, clause))
            sentence_start = False
            continue
        surface = match.group("word")
        first = sentence_start
        sentence_start = False
        lower = _strip_contraction(surface.lower())
        if lower in _NUMBER_WORDS:
            tokens.append(Token(_NUMBER_WORDS[lower], surface, True, False, clause))
            continue
        # Names: capitalised mid-sentence, or an acronym / CamelCase word anywhere.
        is_name = surface[0].isupper() and (not first or any(ch.isupper() for ch in surface[1:]))
        for part in _hyphen_parts(lower):
            if len(part) >= 2 and part not in _STOPWORDS:
                tokens.append(Token(stem_of(part), surface, False, is_name, clause))
    return tokens


def _strip_contraction(word: str) -> str:
    """Drops a possessive or contraction ending (``Bloomberg's`` -> ``bloomberg``).

    Negated auxiliaries (``don't``) become ``""`` so they are dropped like stop-words;
    other apostrophes are removed (``O'Dea`` -> ``odea``).
    """
    head, apostrophe, tail = word.rpartition("'")
    if not apostrophe:
        return word
    if tail == "t" and head.endswith("n"):
        return ""
    if tail in _CONTRACTION_TAILS:
        return head.replace("'", "")
    return word.replace("'", "")


def _hyphen_parts(word: str) -> list[str]:
    """Splits a hyphenated word into its parts plus the joined form (``bi-polar``)."""
    if "-" not in word:
        return [word]
    parts = [part for part in word.split("-") if part]
    return [*parts, "".join(parts)]


def terms_of(tokens: Sequence[Token]) -> Terms:
    """Collects distinct stems, numbers and names from ``tokens``."""
    words: dict[str, None] = {}
    numbers: dict[str, str] = {}
    names: dict[str, str] = {}
    for token in tokens:
        words.setdefault(token.stem, None)
        if token.is_number:
            numbers.setdefault(token.stem, token.surface)
        elif token.is_name:
            names.setdefault(token.stem, token.surface)
    return Terms(tuple(words), tuple(numbers.items()), tuple(names.items()))


def content_stems(text: str) -> frozenset[str]:
    """The content stems of ``text`` (numbers included, stop-words dropped, lightly
    stemmed): the words support is judged on. The validator compares a claim's with its
    question's to find what the claim adds."""
    return frozenset(token.stem for token in tokenize(text))


_NEGATION_RE = re.compile(
    r"\b(?:not|no|never|neither|nor|none|nothing|nobody|cannot|without)\b|n't\b", re.IGNORECASE
)
"""Words that turn a statement into its negation. They are stop-words for coverage (they
say nothing about what a passage is about) but decide polarity: a claim and a passage
must agree on whether they negate."""


def is_negated(text: str) -> bool:
    """Whether ``text`` contains a negation (``not``, ``no``, ``never``, ``n't``, ...)."""
    return _NEGATION_RE.search(fold(text)) is not None


def name_stems(text: str) -> frozenset[str]:
    """Stems of the capitalised words (first words of sentences included) and numbers of
    ``text``: what a passage or a question names."""
    return frozenset(
        token.stem for token in tokenize(text) if token.is_number or token.surface[:1].isupper()
    )


def names_title(
    title_stems: Collection[str], words: Collection[str], idf: Callable[[str], float]
) -> bool:
    """Whether text whose content stems are ``words`` names the subject of a passage
    titled ``title_stems``: the title's words it has, weighted by rarity (``idf``), are
    at least half of the title's ("Gross" names "Paul Gross"; "University" alone does
    not name "University of Nairobi", nor "the song" any song). False for an empty title.
    """
    total = sum(idf(stem) for stem in title_stems)
    named = sum(idf(stem) for stem in title_stems if stem in words)
    return total > 0 and 2 * named >= total


def prefix_matches(sorted_vocabulary: tuple[str, ...], prefix: str) -> frozenset[str]:
    """Returns the words of ``sorted_vocabulary`` that start with ``prefix``."""
    matches: list[str] = []
    position = bisect_left(sorted_vocabulary, prefix)
    while position < len(sorted_vocabulary) and sorted_vocabulary[position].startswith(prefix):
        matches.append(sorted_vocabulary[position])
        position += 1
    return frozenset(matches)
