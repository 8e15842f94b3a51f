"""Support scorers: does source N back the sentence written so far?

The citation validator calls a :class:`SupportScorer` each time a ``[N]`` marker closes,
with the current sentence up to the marker (markers removed) as the *claim* and ``N`` as
the source number. A result below the scorer's threshold makes the decoder roll back and
ban ``N`` at that position.

Two scorers ship here:

* :class:`LexicalSupportScorer` (the default) needs no model. Its score is the
  IDF-weighted share of the claim's content words found in the best window of one or two
  adjacent sentences of the source (the title counts as part of every window), halved for
  each number or capitalised name of the claim that window and the title lack. Only
  windows of the claim's polarity count (both negate, or neither: :func:`is_negated`).
  Several sources combine (``score_set``) only when they are linked: each titled by what
  the claim names, or their passages naming a common entity few sources name.
* :class:`FunctionSupportScorer` wraps any ``(claim, source_text) -> float`` callable,
  such as an embedding similarity or an NLI entailment probability.

Each result also says where in the sources it rests (:attr:`SupportResult.spans`: offsets
into ``Source.text`` and the quoted text), so that a citation can point at its passage.

Thresholds. A claim is supported when ``score >= threshold``. The lexical default, 0.6,
reads "most of what the sentence says, weighted toward rare words, names and numbers, is
found together in one place of the source, nothing it names is missing there, and it
negates where the source does" (ADR 0011). It is strict on purpose: a strong language
model judging citations the way a careful reader does (LongBench-Cite's protocol) refused
three in four of the citations the earlier, looser default (0.4, names anywhere in the
source, the last clause standing for the sentence) accepted on multi-hop retrieval input.
On the ALCE few-shot demos (ASQA, ELI5, QAMPARI; ``tests/test_support.py`` re-measures
this) 21 of 60 gold citations reach it each on its own (ALCE's hand-written answers
paraphrase and list, and many of their citations support only a part), while 196 of 199
uncited passages of the same questions stay below it, as do all 260 passages of other
questions. Paraphrase is what the lexical scorer misses: use
:class:`FunctionSupportScorer` with an NLI model when it matters more than speed; the
validator's other rules apply to any scorer.

Claims with no content words (``"It is."``, ``""``), or fewer than ``min_content_words``,
have nothing to check and are judged supported with score 1.0.
"""

from __future__ import annotations

import math
import re
import unicodedata
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from numbers import Real
from typing import Generic, Protocol, TypeVar, runtime_checkable

from citebacktrack.errors import ConfigurationError, InvalidSourcesError
from citebacktrack.syntax import SENTENCE_END_RE as _SENTENCE_END_RE
from citebacktrack.syntax import sentence_spans as _sentence_spans
from citebacktrack.types import Evidence, Source

__all__ = [
    "FunctionSupportScorer",
    "LexicalSupportScorer",
    "SetSupportScorer",
    "SupportResult",
    "SupportScorer",
    "content_stems",
    "is_negated",
    "name_stems",
]


@dataclass(frozen=True, slots=True)
class SupportResult:
    """How well one source supports one claim."""

    score: float
    """Support in [0, 1]; higher is better supported."""
    is_supported: bool
    """Whether ``score`` reached the scorer's threshold."""
    evidence: str
    """The best-matching passage sentence(s), for traces; may be empty."""
    detail: str
    """A short human-readable reason, e.g. ``"coverage 0.62; missing number 1861"``."""
    spans: tuple[Evidence, ...] = ()
    """The source passages the score rests on, one per source that contributed, in source
    order; each span's ``text`` is ``source.text[start:end]``. Empty when the score rests
    on no passage (nothing to check, nothing matched, or a match in the title only)."""


@runtime_checkable
class SupportScorer(Protocol):
    """Judges whether a numbered source supports a claim."""

    def score(self, claim: str, source_index: int) -> SupportResult:
        """Scores ``claim`` (the sentence so far, markers removed) against source ``source_index``.

        Args:
            claim: Text of the current sentence up to the marker, markers removed.
            source_index: 1-based number of the source, as the model wrote it.

        Raises:
            ConfigurationError: ``source_index`` is not a valid source number.
        """
        ...


@runtime_checkable
class SetSupportScorer(SupportScorer, Protocol):
    """A scorer that can also judge several sources together (a claim that needs two).

    The validator uses :meth:`score_set` for the per-sentence rule (ALCE's citation
    recall: the union of a sentence's cited sources must support it). Scorers without it
    are judged by their best single source.
    """

    def score_set(self, claim: str, source_indices: Sequence[int]) -> SupportResult:
        """Scores ``claim`` against the union of the sources ``source_indices`` (1-based).

        Never lower than the best single source's score.

        Raises:
            ConfigurationError: an index is not a valid source number.
        """
        ...


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


def _fold(text: str) -> str:
    """Returns ``text`` without accents and with typographic apostrophes made plain."""
    text = text.translate(_APOSTROPHES)
    if text.isascii():
        return text
    return _COMBINING_RE.sub("", unicodedata.normalize("NFKD", text))


def _normalise_number(raw: str) -> str:
    """Strips thousands separators and trailing decimal zeros: ``11,872`` -> ``11872``."""
    number = raw.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


_DERIVATIONAL_SUFFIXES = ("ation", "ness", "ment", "ional", "ion", "ive", "al", "ly")
"""Checked in order after inflections; one is stripped when at least 4 letters remain."""


@lru_cache(maxsize=16384)
def _stem(word: str) -> str:
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
class _Terms:
    """Content terms of a text: distinct stems in order, plus the guarded subsets."""

    words: tuple[str, ...]
    """Distinct content stems (numbers included) in order of first appearance."""
    numbers: tuple[tuple[str, str], ...]
    """(normalised, surface form) of numbers, in order of first appearance."""
    entities: tuple[tuple[str, str], ...]
    """(stem, surface form) of names: capitalised words not opening a sentence."""


@dataclass(frozen=True, slots=True)
class _Token:
    """One content token of a claim, with the clause it belongs to."""

    stem: str
    surface: str
    is_number: bool
    is_name: bool
    clause: int


def _tokens(text: str) -> list[_Token]:
    """Tokenises ``text`` into content tokens, numbering clauses split at ``, ; :``."""
    tokens: list[_Token] = []
    sentence_start = True
    clause = 0
    folded = _fold(_MARKER_RE.sub(" ", text))
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
            number = _normalise_number(raw_number)
            tokens.append(_Token(number, raw_number, True, False, clause))
            sentence_start = False
            continue
        surface = match.group("word")
        first = sentence_start
        sentence_start = False
        lower = _strip_contraction(surface.lower())
        if lower in _NUMBER_WORDS:
            tokens.append(_Token(_NUMBER_WORDS[lower], surface, True, False, clause))
            continue
        # Names: capitalised mid-sentence, or an acronym / CamelCase word anywhere.
        is_name = surface[0].isupper() and (not first or any(ch.isupper() for ch in surface[1:]))
        for part in _hyphen_parts(lower):
            if len(part) >= 2 and part not in _STOPWORDS:
                tokens.append(_Token(_stem(part), surface, False, is_name, clause))
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


def _terms(tokens: Sequence[_Token]) -> _Terms:
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
    return _Terms(tuple(words), tuple(numbers.items()), tuple(names.items()))


def content_stems(text: str) -> frozenset[str]:
    """The content stems of ``text`` (numbers included, stop-words dropped, lightly
    stemmed): the words support is judged on. The validator compares a claim's with its
    question's to find what the claim adds."""
    return frozenset(token.stem for token in _tokens(text))


_NEGATION_RE = re.compile(
    r"\b(?:not|no|never|neither|nor|none|nothing|nobody|cannot|without)\b|n't\b", re.IGNORECASE
)
"""Words that turn a statement into its negation. They are stop-words for coverage (they
say nothing about what a passage is about) but decide polarity: a claim and a passage
must agree on whether they negate."""


def is_negated(text: str) -> bool:
    """Whether ``text`` contains a negation (``not``, ``no``, ``never``, ``n't``, ...)."""
    return _NEGATION_RE.search(_fold(text)) is not None


# --- caching ---------------------------------------------------------------------------------

_K = TypeVar("_K")
_V = TypeVar("_V")


class _LRU(Generic[_K, _V]):
    """A small least-recently-used map; ``maxsize`` 0 stores nothing."""

    __slots__ = ("_data", "_maxsize")

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._data: OrderedDict[_K, _V] = OrderedDict()

    def get(self, key: _K) -> _V | None:
        """Returns the cached value (marking it recently used), or None."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: _K, value: _V) -> None:
        """Stores ``value``, evicting the least recently used entry when full."""
        if self._maxsize <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._maxsize:
            self._data.popitem(last=False)


def _check_sources(sources: Sequence[Source]) -> tuple[Source, ...]:
    """Returns ``sources`` as a tuple, refusing an empty list."""
    if not sources:
        raise InvalidSourcesError(
            "a support scorer needs at least one source, got an empty list; "
            "pass the same sources the answer is generated from"
        )
    return tuple(sources)


def _check_index(source_index: int, count: int) -> None:
    """Raises ConfigurationError unless ``source_index`` is in 1..count."""
    if isinstance(source_index, bool) or not isinstance(source_index, int):
        raise ConfigurationError(f"source_index must be an int in 1..{count}, got {source_index!r}")
    if not 1 <= source_index <= count:
        raise ConfigurationError(
            f"source_index {source_index} is out of range: valid source numbers are 1..{count}"
        )


def _is_count(value: object) -> bool:
    """Whether ``value`` is a non-negative int (bools excluded)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _real(value: object) -> float | None:
    """Returns ``value`` as a finite float if it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _check_unit(name: str, value: object) -> float:
    """Returns ``value`` as a float, raising ConfigurationError unless it is in [0, 1]."""
    number = _real(value)
    if number is None or not 0.0 <= number <= 1.0:
        raise ConfigurationError(f"{name} must be a number in [0, 1], got {value!r}")
    return number


# --- lexical scorer ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Window:
    """One or two adjacent passage sentences, pre-tokenised."""

    text: str
    stems: frozenset[str]
    start: int
    """Offset in the source text of the first sentence's first character."""
    end: int
    """Offset in the source text just past the last sentence."""
    negated: bool = False
    """Whether the window negates something (see :func:`is_negated`)."""
    names: frozenset[str] = frozenset()
    """Stems of its capitalised words and numbers: the entities it is about, which link
    it to another source's passage (see ``_linked``)."""


@dataclass(frozen=True, slots=True)
class _Claim:
    """An analysed claim: all its terms, and those of its last clause."""

    whole: _Terms
    last: _Terms | None
    """Terms after the claim's last clause break (``, ; : ( ) -``); None if it has none."""
    negated: bool = False
    """Whether the claim negates (polarity must match the passage it rests on)."""


@dataclass(frozen=True, slots=True)
class _IndexedSource:
    """A source tokenised once: its windows, title stems, whole vocabulary sorted."""

    source_index: int
    """1-based number of the source."""
    text: str
    """The source's text, which window offsets index."""
    windows: tuple[_Window, ...]
    title_stems: frozenset[str]
    vocabulary: frozenset[str]
    sorted_vocabulary: tuple[str, ...]


class LexicalSupportScorer:
    """Scores support by weighted word overlap between the claim and a source passage.

    Text is folded to plain lower-case ASCII letters where possible, stop-words are
    dropped, words are lightly stemmed (plurals, -ing, -ed and a few derivational
    endings), hyphenated words also count joined (``bi-polar`` ~ ``bipolar``), and
    numbers lose thousands separators (``11,872`` ~ ``11872``).

    The score is the IDF-weighted fraction of the claim's content words that occur in
    the source's best *window* (one sentence or two adjacent sentences) or in its title.
    Numbers and names (capitalised words not opening a sentence) weigh ``name_weight``
    times an ordinary word. A claim word of four or more letters that the source lacks
    matches a longer source word it begins (``rain`` ~ ``rainfall``) at ``prefix_credit``.
    Each number in the claim found nowhere in the source multiplies the score by
    ``missing_number_factor``, each missing name by ``missing_name_factor``: a year or a
    name the source never mentions is strong evidence of a wrong citation.

    Because the claim is the whole sentence so far, its earlier clauses may belong to
    earlier markers (``"Marazan [1], Stephen Morris [1], Lonely Road [2]"``). With
    ``clause_fallback`` the score is the better of the whole claim's and
    ``clause_credit`` times its last clause's (the text after the last ``, ; : ( )`` or
    dash): a marker must vouch at least for the clause right before it.

    The default ``threshold`` of 0.4 and how to tune it are explained in the module
    docstring. Claims with fewer than ``min_content_words`` content words are supported
    with score 1.0 (nothing to check).

    Sources are tokenised once, here; results are cached per (claim, source), since the
    same claim is re-scored after every rollback.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        threshold: float = 0.6,
        min_content_words: int = 1,
        name_weight: float = 1.5,
        prefix_credit: float = 0.5,
        missing_number_factor: float = 0.5,
        missing_name_factor: float = 0.5,
        clause_fallback: bool = False,
        clause_credit: float = 0.9,
        cache_size: int = 512,
    ) -> None:
        """Indexes ``sources`` for scoring.

        Args:
            sources: The numbered sources (index 1 is ``sources[0]``).
            threshold: Score at or above which a claim counts as supported.
            min_content_words: Claims with fewer content words are supported unchecked;
                0 checks every claim (an empty claim then scores 0).
            name_weight: Weight (>= 1) of numbers and names relative to other words.
            prefix_credit: Credit (0..1) for a claim word matched only as a prefix.
            missing_number_factor: Score multiplier per claim number absent from the source.
            missing_name_factor: Score multiplier per claim name absent from the source.
            clause_fallback: Also score the claim's last clause alone (see above).
            clause_credit: Multiplier (0..1) applied to a last-clause-only score.
            cache_size: Most (claim, source) results kept; 0 disables the cache.

        Raises:
            InvalidSourcesError: ``sources`` is empty.
            ConfigurationError: A tunable is out of its range.
        """
        self._sources = _check_sources(sources)
        self._threshold = _check_unit("threshold", threshold)
        self._prefix_credit = _check_unit("prefix_credit", prefix_credit)
        self._missing_number_factor = _check_unit("missing_number_factor", missing_number_factor)
        self._missing_name_factor = _check_unit("missing_name_factor", missing_name_factor)
        if not _is_count(min_content_words):
            raise ConfigurationError(
                f"min_content_words must be a non-negative int, got {min_content_words!r}"
            )
        weight = _real(name_weight)
        if weight is None or weight < 1.0:
            raise ConfigurationError(f"name_weight must be a number >= 1, got {name_weight!r}")
        if not _is_count(cache_size):
            raise ConfigurationError(f"cache_size must be a non-negative int, got {cache_size!r}")
        self._min_content_words = min_content_words
        self._clause_fallback = bool(clause_fallback)
        self._clause_credit = _check_unit("clause_credit", clause_credit)
        self._name_weight = weight
        self._indexed = tuple(
            self._index(number, source) for number, source in enumerate(self._sources, 1)
        )
        document_frequency: dict[str, int] = {}
        for indexed in self._indexed:
            for stem in indexed.vocabulary:
                document_frequency[stem] = document_frequency.get(stem, 0) + 1
        # Smoothed IDF, 1 + ln((n + 1) / (df + 1)): 1.0 for a word in every source, highest
        # for a claim word no source has (which then weighs most against support).
        count = len(self._sources)
        self._idf_table = {
            stem: 1.0 + math.log((count + 1) / (df + 1)) for stem, df in document_frequency.items()
        }
        self._idf_unseen = 1.0 + math.log(count + 1)
        # Words more than two sources have: too common to link two passages in a union.
        self._common = frozenset(stem for stem, df in document_frequency.items() if df > 2)
        self._cache: _LRU[tuple[str, int], SupportResult] = _LRU(cache_size)
        self._set_cache: _LRU[tuple[str, tuple[int, ...]], SupportResult] = _LRU(cache_size)
        self._claims: _LRU[str, _Claim] = _LRU(min(cache_size, 64))

    @property
    def threshold(self) -> float:
        """Score at or above which a claim counts as supported."""
        return self._threshold

    @staticmethod
    def _index(source_index: int, source: Source) -> _IndexedSource:
        """Tokenises one source into windows of one and two adjacent sentences."""
        spans = _sentence_spans(source.text)
        sentences = [source.text[start:end] for start, end in spans]
        stems = [content_stems(sentence) for sentence in sentences]
        negated = [is_negated(sentence) for sentence in sentences]
        names = [name_stems(sentence) for sentence in sentences]
        windows = [
            _Window(text, words, start, end, negation, named)
            for text, words, (start, end), negation, named in zip(
                sentences, stems, spans, negated, names, strict=True
            )
        ]
        # A pair's evidence joins its sentences by one space; its span covers the source's
        # own text between them, whatever whitespace that is.
        windows.extend(
            _Window(
                f"{sentences[i]} {sentences[i + 1]}",
                stems[i] | stems[i + 1],
                spans[i][0],
                spans[i + 1][1],
                negated[i] or negated[i + 1],
                names[i] | names[i + 1],
            )
            for i in range(len(sentences) - 1)
        )
        title_stems = content_stems(source.title)
        vocabulary = title_stems.union(*stems)
        return _IndexedSource(
            source_index,
            source.text,
            tuple(windows),
            title_stems,
            vocabulary,
            tuple(sorted(vocabulary)),
        )

    def _idf(self, stem: str) -> float:
        """Smoothed inverse document frequency of ``stem`` across this scorer's sources."""
        return self._idf_table.get(stem, self._idf_unseen)

    def _claim(self, claim: str) -> _Claim:
        """Returns the analysed claim, cached (``rank`` and rollbacks reuse it)."""
        analysed = self._claims.get(claim)
        if analysed is None:
            tokens = _tokens(claim)
            whole = _terms(tokens)
            last: _Terms | None = None
            if self._clause_fallback and tokens and tokens[-1].clause > 0:
                final_clause = tokens[-1].clause
                last = _terms([token for token in tokens if token.clause == final_clause])
                if len(last.words) == len(whole.words):
                    last = None
            analysed = _Claim(whole, last, is_negated(claim))
            self._claims.put(claim, analysed)
        return analysed

    def score(self, claim: str, source_index: int) -> SupportResult:
        """Scores ``claim`` against source ``source_index`` (1-based).

        Stray ``[N]`` markers in ``claim`` are ignored. ``spans`` holds the best window
        (of the last clause, when the score falls back on it) if any claim word matched
        in it; a claim matched only by the title, or not at all, gets no span, and so does
        one with nothing to check.

        Raises:
            ConfigurationError: ``source_index`` is not in 1..len(sources).
        """
        _check_index(source_index, len(self._sources))
        key = (claim, source_index)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        result = self._score(self._claim(claim), self._indexed[source_index - 1])
        self._cache.put(key, result)
        return result

    def score_set(self, claim: str, source_indices: Sequence[int]) -> SupportResult:
        """Scores ``claim`` against several sources together (1-based indices).

        The whole claim is judged (never only its last clause, which :meth:`score` may
        fall back on): each claim word counts with the best credit any of the sources
        gives it (in that source's best window or title), and a number or name is missing
        only if none of them mentions it. Adding a source never lowers the score. When
        the union scores higher than the best single source, ``spans`` holds the best
        window of every source in which a claim word matched, in index order; otherwise
        the result is the best single source's, spans included.

        Raises:
            ConfigurationError: an index is not in 1..len(sources).
        """
        indices = tuple(sorted(set(source_indices)))
        for index in indices:
            _check_index(index, len(self._sources))
        if not indices:
            return SupportResult(score=0.0, is_supported=False, evidence="", detail="no source")
        key = (claim, indices)
        cached = self._set_cache.get(key)
        if cached is not None:
            return cached
        analysed = self._claim(claim)
        if len(analysed.whole.words) < self._min_content_words:
            return self.score(claim, indices[0])
        sources = [self._indexed[i - 1] for i in indices]
        matches = [self._match(analysed.whole, source, analysed.negated) for source in sources]
        singles = [
            self._result(analysed.whole, source, match, 1.0)
            for source, match in zip(sources, matches, strict=True)
        ]
        best = max(singles, key=lambda result: result.score)
        if len(indices) == 1:
            self._set_cache.put(key, best)
            return best
        weights = matches[0].weights
        total = sum(weights.values())
        covered = sum(
            weight * max(match.credits.get(word, 0.0) for match in matches)
            for word, weight in weights.items()
        )
        coverage = covered / total if total > 0 else 0.0
        missing_numbers = set.intersection(*(set(m.missing_numbers) for m in matches))
        missing_names = set.intersection(*(set(m.missing_names) for m in matches))
        score = (
            coverage
            * self._missing_number_factor ** len(missing_numbers)
            * self._missing_name_factor ** len(missing_names)
        )
        score = min(1.0, max(0.0, score))
        if score <= best.score:
            result = best
        elif not _linked(analysed.whole, sources, matches, self._common, self._idf):
            # A sentence stitched from passages about different things is supported by
            # none of them: the union counts no more than its best source.
            result = replace(best, detail=f"{best.detail}; sources {list(indices)} not linked")
        else:
            ids = ", ".join(str(i) for i in indices)
            detail = f"coverage {coverage:.2f} by sources {ids} together"
            if missing_numbers:
                detail += f"; missing number {', '.join(sorted(missing_numbers)[:3])}"
            if missing_names:
                detail += f"; missing name {', '.join(sorted(missing_names)[:3])}"
            result = SupportResult(
                score=score,
                is_supported=score >= self._threshold,
                evidence=" … ".join(m.evidence for m in matches if m.evidence),
                detail=detail,
                spans=tuple(
                    span
                    for source, match in zip(sources, matches, strict=True)
                    for span in _spans(source, match)
                ),
            )
        self._set_cache.put(key, result)
        return result

    def rank(self, claim: str) -> list[tuple[int, float]]:
        """Returns every ``(source_index, score)`` for ``claim``, best first (ties by index)."""
        scored = [
            (index, self.score(claim, index).score) for index in range(1, len(self._sources) + 1)
        ]
        return sorted(scored, key=lambda pair: (-pair[1], pair[0]))

    def _score(self, claim: _Claim, source: _IndexedSource) -> SupportResult:
        """Scores an analysed claim: the whole claim, or (discounted) its last clause."""
        words = len(claim.whole.words)
        if words < self._min_content_words:
            return SupportResult(
                score=1.0,
                is_supported=True,
                evidence="",
                detail=(
                    f"nothing to check: {words} content word(s), "
                    f"fewer than min_content_words={self._min_content_words}"
                ),
            )
        whole = self._score_terms(claim.whole, source, 1.0, claim.negated)
        if claim.last is None or whole.score >= self._clause_credit:
            return whole
        # Earlier clauses may be backed by earlier markers of the same sentence; the marker
        # must at least vouch for the clause right before it.
        last = self._score_terms(claim.last, source, self._clause_credit, claim.negated)
        return last if last.score > whole.score else whole

    def _match(self, terms: _Terms, source: _IndexedSource, negated: bool) -> _Match:
        """Matches claim terms against one indexed source's best window and title.

        Only windows of the claim's polarity count (``negated``: both negate, or neither
        does). The best window covers the most claim weight, title included; among equals,
        the one whose own words cover the most, then the first (single sentences come
        before pairs, so the shortest passage wins). A number or name of the claim is
        missing unless that window or the title has it: what a claim asserts must be
        found together in one place.
        """
        names = {stem for stem, _ in terms.entities}
        names.update(number for number, _ in terms.numbers)
        weights = {
            word: self._idf(word) * (self._name_weight if word in names else 1.0)
            for word in terms.words
        }
        # Claim words missing from the whole source may still match a longer source word.
        prefixed: dict[str, frozenset[str]] = {}
        for word in terms.words:
            if word not in source.vocabulary and len(word) >= 4 and not word[0].isdigit():
                matches = _prefix_matches(source.sorted_vocabulary, word)
                if matches:
                    prefixed[word] = matches
        best = (-1.0, -1.0)
        best_window = ""
        best_span: tuple[int, int] | None = None
        best_credits: dict[str, float] = {}
        best_names: frozenset[str] = frozenset()
        opposed = False
        for window in source.windows or (_Window("", frozenset(), 0, 0),):
            if window.negated is not negated:
                opposed = opposed or not window.stems.isdisjoint(weights)
                continue
            covered = own = 0.0  # all credit, and the credit of the window's own words
            credit_of: dict[str, float] = {}
            for word, weight in weights.items():
                if word in window.stems:
                    credit_of[word] = 1.0
                    own += weight
                elif word in source.title_stems:
                    credit_of[word] = 1.0
                elif word in prefixed and not prefixed[word].isdisjoint(window.stems):
                    credit_of[word] = self._prefix_credit
                    own += weight * self._prefix_credit
                else:
                    continue
                covered += weight * credit_of[word]
            if (covered, own) > best:
                best, best_window, best_credits = (covered, own), window.text, credit_of
                best_span = (window.start, window.end) if own > 0 else None
                best_names = window.names
        found = best_credits.keys()
        missing_numbers = tuple(surface for number, surface in terms.numbers if number not in found)
        missing_names = tuple(surface for stem, surface in terms.entities if stem not in found)
        return _Match(
            weights,
            best_credits,
            best_window,
            best_span,
            missing_numbers,
            missing_names,
            best_names | source.title_stems,
            polarity_only=opposed and not best_credits,
        )

    def _score_terms(
        self, terms: _Terms, source: _IndexedSource, credit: float, negated: bool
    ) -> SupportResult:
        """Scores claim terms against one indexed source, scaled by ``credit``."""
        return self._result(terms, source, self._match(terms, source, negated), credit)

    def _result(
        self, terms: _Terms, source: _IndexedSource, match: _Match, credit: float
    ) -> SupportResult:
        """The result of ``match`` (of ``terms`` in ``source``), scaled by ``credit``."""
        total = sum(match.weights.values())
        covered = sum(match.weights[word] * c for word, c in match.credits.items())
        coverage = covered / total if total > 0 else 0.0
        missing_numbers, missing_names = match.missing_numbers, match.missing_names
        score = (
            credit
            * coverage
            * self._missing_number_factor ** len(missing_numbers)
            * self._missing_name_factor ** len(missing_names)
        )
        score = min(1.0, max(0.0, score))
        detail = f"coverage {coverage:.2f}"
        if credit < 1.0:
            detail += f" of the last {len(terms.words)} content word(s)"
        if missing_numbers:
            detail += f"; missing number {', '.join(missing_numbers[:3])}"
        if missing_names:
            detail += f"; missing name {', '.join(missing_names[:3])}"
        if match.polarity_only:
            detail += "; polarity differs: only passages of the opposite polarity share its words"
        return SupportResult(
            score=score,
            is_supported=score >= self._threshold,
            evidence=match.evidence,
            detail=detail,
            spans=_spans(source, match),
        )


@dataclass(frozen=True, slots=True)
class _Match:
    """How one source's best window covers a claim's terms."""

    weights: dict[str, float]
    """Weight of each claim word (IDF, names and numbers up-weighted)."""
    credits: dict[str, float]
    """Credit (0..1) of each covered claim word in the best window or the title."""
    evidence: str
    span: tuple[int, int] | None
    """The best window's offsets in the source text; None if none of its words matched."""
    missing_numbers: tuple[str, ...]
    """Numbers of the claim neither the best window nor the title has."""
    missing_names: tuple[str, ...]
    """Names of the claim neither the best window nor the title has."""
    names: frozenset[str] = frozenset()
    """The entities of the best window and the title: what links sources in a union."""
    polarity_only: bool = False
    """No window of the claim's polarity shares a word with it, though one of the
    opposite polarity may: the claim is negated where the source is not, or the reverse."""


def _linked(
    terms: _Terms,
    sources: Sequence[_IndexedSource],
    matches: Sequence[_Match],
    common: frozenset[str],
    idf: Callable[[str], float],
) -> bool:
    """Whether sources may combine to support a claim: each is titled by what the claim
    names (its title's words, weighted by rarity, are at least half the claim's: a
    comparison of two entities, each passage about its own; "University" alone does not
    make "University of Nairobi" the claim's subject), or their best passages form one
    connected group, two linked when they name a common entity that few sources name and
    the claim itself does not. That is a bridge: the film's passage names its director,
    whose own passage says where she lives, though the claim may never name her. A name
    the claim states is no bridge (two passages that both mention CBS are not about the
    same station), nor is a number (a year is shared by unrelated events), nor a word
    many sources name (in ``common``: "English" or "American" link nothing)."""
    words = set(terms.words)

    def titled(source: _IndexedSource) -> bool:
        total = sum(idf(stem) for stem in source.title_stems)
        named = sum(idf(stem) for stem in source.title_stems & words)
        return total > 0 and 2 * named >= total

    if all(titled(source) for source in sources):
        return True
    entities = [
        frozenset(
            name for name in match.names - common - words if not name[:1].isdigit()
        )
        for match in matches
    ]
    reached = {0}
    frontier = [0]
    while frontier:
        here = entities[frontier.pop()]
        for other, names in enumerate(entities):
            if other not in reached and not here.isdisjoint(names):
                reached.add(other)
                frontier.append(other)
    return len(reached) == len(matches)


def name_stems(text: str) -> frozenset[str]:
    """Stems of the capitalised words (first words of sentences included) and numbers of
    ``text``: what a passage or a question names."""
    return frozenset(
        token.stem for token in _tokens(text) if token.is_number or token.surface[:1].isupper()
    )


def _spans(source: _IndexedSource, match: _Match) -> tuple[Evidence, ...]:
    """The evidence span of ``match`` in ``source``: one, or none without a matched window."""
    if match.span is None:
        return ()
    start, end = match.span
    return (
        Evidence(
            source_index=source.source_index, start=start, end=end, text=source.text[start:end]
        ),
    )


def _prefix_matches(sorted_vocabulary: tuple[str, ...], prefix: str) -> frozenset[str]:
    """Returns the words of ``sorted_vocabulary`` that start with ``prefix``."""
    matches: list[str] = []
    position = bisect_left(sorted_vocabulary, prefix)
    while position < len(sorted_vocabulary) and sorted_vocabulary[position].startswith(prefix):
        matches.append(sorted_vocabulary[position])
        position += 1
    return frozenset(matches)


# --- function scorer ---------------------------------------------------------------------------


class FunctionSupportScorer:
    """Adapts a ``(claim, source_text) -> float`` callable into a :class:`SupportScorer`.

    Use it for embedding similarity or NLI entailment. ``source_text`` is the source's
    title and text joined by a newline (just the text when there is no title): titles name
    the entity a passage is about, which the passage itself often omits. Scores are
    clamped into [0, 1]; a claim is supported when ``score >= threshold``. Results are
    cached per (claim, source), so ``fn`` runs once per pair even across rollbacks.
    Exceptions raised by ``fn`` propagate unchanged.

    ``fn`` judges whole texts, so a result's ``spans`` are the whole text
    ``(0, len(source.text))`` of each source judged (never the title prepended to it).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        fn: Callable[[str, str], float],
        *,
        threshold: float,
    ) -> None:
        """Wraps ``fn`` for ``sources``.

        Raises:
            InvalidSourcesError: ``sources`` is empty.
            ConfigurationError: ``threshold`` is not in [0, 1] or ``fn`` is not callable.
        """
        self._sources = _check_sources(sources)
        if not callable(fn):
            raise ConfigurationError(f"fn must be callable as fn(claim, source_text), got {fn!r}")
        self._fn = fn
        self._threshold = _check_unit("threshold", threshold)
        self._texts = tuple(
            f"{source.title}\n{source.text}" if source.title else source.text
            for source in self._sources
        )
        self._spans = tuple(
            Evidence(source_index=number, start=0, end=len(source.text), text=source.text)
            for number, source in enumerate(self._sources, 1)
        )
        self._cache: _LRU[tuple[str, int], SupportResult] = _LRU(512)
        self._set_cache: _LRU[tuple[str, tuple[int, ...]], SupportResult] = _LRU(512)

    @property
    def threshold(self) -> float:
        """Score at or above which a claim counts as supported."""
        return self._threshold

    def score(self, claim: str, source_index: int) -> SupportResult:
        """Calls ``fn(claim, source_text)`` for source ``source_index`` (1-based).

        Raises:
            ConfigurationError: ``source_index`` is out of range, or ``fn`` returned
                something that is not a finite number.
        """
        _check_index(source_index, len(self._sources))
        key = (claim, source_index)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        result = self._call(
            claim,
            self._texts[source_index - 1],
            f"source {source_index}",
            (self._spans[source_index - 1],),
        )
        self._cache.put(key, result)
        return result

    def score_set(self, claim: str, source_indices: Sequence[int]) -> SupportResult:
        """Calls ``fn(claim, texts)`` with the sources' texts joined by blank lines (the
        way ALCE judges a sentence's citations together); never below the best single one.
        The joined judgement's ``spans`` are the whole text of every source; when the best
        single source scores higher, its result is returned as is.

        Raises:
            ConfigurationError: an index is out of range, or ``fn`` returned something
                that is not a finite number.
        """
        indices = tuple(sorted(set(source_indices)))
        for index in indices:
            _check_index(index, len(self._sources))
        if not indices:
            return SupportResult(score=0.0, is_supported=False, evidence="", detail="no source")
        if len(indices) == 1:
            return self.score(claim, indices[0])
        key = (claim, indices)
        cached = self._set_cache.get(key)
        if cached is not None:
            return cached
        best = max((self.score(claim, i) for i in indices), key=lambda r: r.score)
        joined = "\n\n".join(self._texts[i - 1] for i in indices)
        result = self._call(
            claim,
            joined,
            f"sources {', '.join(map(str, indices))}",
            tuple(self._spans[i - 1] for i in indices),
        )
        if result.score < best.score:
            result = best
        self._set_cache.put(key, result)
        return result

    def _call(self, claim: str, text: str, what: str, spans: tuple[Evidence, ...]) -> SupportResult:
        """Calls ``fn`` on ``text`` (the sources ``what`` names, whose spans are ``spans``)."""
        raw = self._fn(claim, text)
        value = _real(raw)
        if value is None:
            raise ConfigurationError(
                f"the support function must return a finite number, got {raw!r} for {what}"
            )
        score = min(1.0, max(0.0, value))
        return SupportResult(
            score=score,
            is_supported=score >= self._threshold,
            evidence="",
            detail=f"function score {value:.3f}, threshold {self._threshold:.2f}",
            spans=spans,
        )
