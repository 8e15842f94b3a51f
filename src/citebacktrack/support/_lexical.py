"""The lexical support scorer (the default): weighted word overlap in one place of a source."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from citebacktrack.errors import ConfigurationError
from citebacktrack.support._base import (
    LRU,
    SupportResult,
    check_index,
    check_sources,
    check_unit,
    is_count,
    real_number,
)
from citebacktrack.support._text import (
    Terms,
    content_stems,
    is_negated,
    name_stems,
    names_title,
    prefix_matches,
    terms_of,
    tokenize,
)
from citebacktrack.syntax import sentence_spans as _sentence_spans
from citebacktrack.types import Evidence, Source

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

    whole: Terms
    last: Terms | None
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
        self._sources = check_sources(sources)
        self._threshold = check_unit("threshold", threshold)
        self._prefix_credit = check_unit("prefix_credit", prefix_credit)
        self._missing_number_factor = check_unit("missing_number_factor", missing_number_factor)
        self._missing_name_factor = check_unit("missing_name_factor", missing_name_factor)
        if not is_count(min_content_words):
            raise ConfigurationError(
                f"min_content_words must be a non-negative int, got {min_content_words!r}"
            )
        weight = real_number(name_weight)
        if weight is None or weight < 1.0:
            raise ConfigurationError(f"name_weight must be a number >= 1, got {name_weight!r}")
        if not is_count(cache_size):
            raise ConfigurationError(f"cache_size must be a non-negative int, got {cache_size!r}")
        self._min_content_words = min_content_words
        self._clause_fallback = bool(clause_fallback)
        self._clause_credit = check_unit("clause_credit", clause_credit)
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
        self._cache: LRU[tuple[str, int], SupportResult] = LRU(cache_size)
        self._set_cache: LRU[tuple[str, tuple[int, ...]], SupportResult] = LRU(cache_size)
        self._claims: LRU[str, _Claim] = LRU(min(cache_size, 64))

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
            tokens = tokenize(claim)
            whole = terms_of(tokens)
            last: Terms | None = None
            if self._clause_fallback and tokens and tokens[-1].clause > 0:
                final_clause = tokens[-1].clause
                last = terms_of([token for token in tokens if token.clause == final_clause])
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
        check_index(source_index, len(self._sources))
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
            check_index(index, len(self._sources))
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

    def _match(self, terms: Terms, source: _IndexedSource, negated: bool) -> _Match:
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
                matches = prefix_matches(source.sorted_vocabulary, word)
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
        self, terms: Terms, source: _IndexedSource, credit: float, negated: bool
    ) -> SupportResult:
        """Scores claim terms against one indexed source, scaled by ``credit``."""
        return self._result(terms, source, self._match(terms, source, negated), credit)

    def _result(
        self, terms: Terms, source: _IndexedSource, match: _Match, credit: float
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
    terms: Terms,
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
    if all(names_title(source.title_stems, words, idf) for source in sources):
        return True
    entities = [
        frozenset(name for name in match.names - common - words if not name[:1].isdigit())
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
