"""Support scorers: tokenisation, guards, short claims, caching, errors, and ALCE accuracy."""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citebacktrack.errors import ConfigurationError, InvalidSourcesError
from citebacktrack.support import (
    FunctionSupportScorer,
    LexicalSupportScorer,
    SupportResult,
    SupportScorer,
)
from citebacktrack.support._text import normalise_number as _normalise_number
from citebacktrack.support._text import stem_of as _stem
from citebacktrack.support._text import tokenize as _tokens
from citebacktrack.syntax import split_sentences
from citebacktrack.types import Evidence, Source

MAWSYNRAM = Source(
    title="Mawsynram",
    text=(
        "Mawsynram is a village in the East Khasi Hills district of Meghalaya state in "
        "north-eastern India. It is reportedly the wettest place on Earth, with an average "
        "annual rainfall of 11,872 mm. Lloró, Colombia reported an average yearly rainfall "
        "of 12,717 mm between 1952 and 1989."
    ),
)
CHERRAPUNJI = Source(
    title="Cherrapunji",
    text=(
        "Cherrapunji is a subdivisional town in the East Khasi Hills district of Meghalaya. "
        "Cherrapunji still holds the all-time record for the most rainfall in a calendar "
        "month for July 1861 and most rain in a year from August 1860 to July 1861."
    ),
)
FIELD_GOAL = Source(
    title="Field goal",
    text=(
        "The longest field goal kick in NFL history is 64 yards, a record set by Matt Prater "
        "on December 8, 2013. The previous record was 63, set by Tom Dempsey."
    ),
)
SOURCES = (MAWSYNRAM, CHERRAPUNJI, FIELD_GOAL)


@pytest.fixture
def scorer() -> LexicalSupportScorer:
    return LexicalSupportScorer(SOURCES)


def stems(text: str) -> list[str]:
    return [token.stem for token in _tokens(text)]


# --- tokenisation and normalisation -----------------------------------------------------------


def test_stopwords_and_punctuation_are_dropped() -> None:
    assert stems("It is, of course, the rain!") == [_stem("course"), "rain"]


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("rains", "rain"),
        ("declared", "declare"),
        ("studies", "study"),
        ("running", "run"),
        ("boxes", "box"),
        ("depression", "depressive"),
        ("emotional", "emotion"),
    ],
)
def test_light_stemming_joins_inflections(left: str, right: str) -> None:
    assert _stem(left) == _stem(right)


def test_stemming_keeps_short_and_ss_words() -> None:
    assert _stem("gas") == "gas"
    assert _stem("glass") == "glass"
    assert _stem("status") == "status"


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("11,872", "11872"),
        ("1,000,000", "1000000"),
        ("12.50", "12.5"),
        ("3.0", "3"),
        ("1861", "1861"),
    ],
)
def test_numbers_lose_separators_and_trailing_zeros(raw: str, normal: str) -> None:
    assert _normalise_number(raw) == normal


def test_number_tokens_and_number_words() -> None:
    tokens = _tokens("It fell 11,872 mm over two years, 85% of it in 2006.")
    assert [t.stem for t in tokens if t.is_number] == ["11872", "2", "85", "2006"]


def test_accents_apostrophes_hyphens_and_contractions_fold() -> None:
    assert stems("Lloró") == stems("Lloro")
    assert stems("Bloomberg\u2019s ban") == ["bloomberg", "ban"]
    assert stems("they don't know") == ["know"]
    assert "bipolar" in stems("bi-polar disorder")
    assert stems("O'Dea") == ["odea"]


def test_names_are_capitalised_words_not_opening_a_sentence() -> None:
    tokens = _tokens("Several towns in India, such as Sohra, use NASA data. Rain falls.")
    names = [t.surface for t in tokens if t.is_name]
    assert names == ["India", "Sohra", "NASA"]


def test_clauses_are_numbered_at_commas_and_semicolons() -> None:
    tokens = _tokens("Marazan, Stephen Morris; Lonely Road")
    assert [t.clause for t in tokens] == [0, 1, 1, 2, 2]


def test_passage_sentences_split_but_not_at_initials_or_abbreviations() -> None:
    text = 'The U.S. Navy sailed. Dr. Who came in 1961. He met J. R. Tolkien. "Done." end'
    assert split_sentences(text) == [
        "The U.S. Navy sailed.",
        "Dr. Who came in 1961.",
        "He met J. R. Tolkien.",
        '"Done."',
        "end",
    ]


def test_inflected_and_accented_claims_match_their_source(scorer: LexicalSupportScorer) -> None:
    result = scorer.score("Lloro in Colombia reports yearly rainfalls of 12717 mm", 1)
    assert result.is_supported
    assert result.score > 0.8


# --- scoring ------------------------------------------------------------------------------------


def test_paraphrase_of_the_right_source_is_supported(scorer: LexicalSupportScorer) -> None:
    claim = "Mawsynram in India is the wettest place on Earth, with 11,872 mm of rain a year"
    result = scorer.score(claim, 1)
    assert result.is_supported
    assert result.score > 0.7
    assert "11,872 mm" in result.evidence
    assert result.detail.startswith("coverage ")


def test_wrong_sources_are_rejected(scorer: LexicalSupportScorer) -> None:
    claim = "Mawsynram in India is the wettest place on Earth, with 11,872 mm of rain a year"
    assert not scorer.score(claim, 3).is_supported
    assert scorer.score(claim, 3).score < 0.1
    assert not scorer.score(claim, 2).is_supported


def test_rank_orders_sources_best_first(scorer: LexicalSupportScorer) -> None:
    claim = "Matt Prater set the NFL record with a 64 yard field goal"
    ranking = scorer.rank(claim)
    assert ranking[0] == (3, scorer.score(claim, 3).score)
    assert ranking[0][1] > 0.9
    assert sorted(index for index, _ in ranking) == [1, 2, 3]
    scores = [score for _, score in ranking]
    assert scores == sorted(scores, reverse=True)


def test_rank_breaks_ties_by_index() -> None:
    twins = LexicalSupportScorer([Source(text="Dogs bark."), Source(text="Cats purr.")] * 2)
    ranking = twins.rank("Cats purr loudly")
    assert [index for index, _ in ranking] == [2, 4, 1, 3]
    assert ranking[0][1] == ranking[1][1] > ranking[2][1] == ranking[3][1]


def test_title_words_count_as_covered() -> None:
    film = Source(
        title="Planet of the Apes (1968 film)",
        text="The chimpanzees are Zira (Kim Hunter) and surgeon Galen (Wright King).",
    )
    other = Source(title="Planet of the Apes", text="Galen was played by Roddy McDowall on TV.")
    scorer = LexicalSupportScorer([film, other])
    claim = "In the 1968 film Planet of the Apes, Galen was played by Wright King"
    assert scorer.score(claim, 1).is_supported
    assert not scorer.score(claim, 2).is_supported
    no_title = LexicalSupportScorer([film.model_copy(update={"title": ""}), other])
    assert no_title.score(claim, 1).score < scorer.score(claim, 1).score


def test_best_window_spans_two_adjacent_sentences() -> None:
    source = Source(text="Ove Johansson kicked a field goal. It went 69 yards in 1976. Rain fell.")
    scorer = LexicalSupportScorer([source])
    result = scorer.score("Ove Johansson kicked a 69 yard field goal in 1976", 1)
    assert result.score == pytest.approx(1.0)
    assert result.evidence == "Ove Johansson kicked a field goal. It went 69 yards in 1976."


def test_prefix_of_a_longer_source_word_earns_partial_credit() -> None:
    scorer = LexicalSupportScorer([Source(text="Mawsynram has the heaviest rainfall.")])
    exact = scorer.score("Mawsynram has the heaviest rainfall", 1).score
    prefix = scorer.score("Mawsynram has the heaviest rain", 1).score
    assert exact == pytest.approx(1.0)
    assert 0.6 < prefix < 1.0


# --- evidence spans ------------------------------------------------------------------------------


def check_spans(result: SupportResult, sources: tuple[Source, ...] | list[Source]) -> None:
    """Every span quotes its source exactly, one per source, in source order."""
    indices = [span.source_index for span in result.spans]
    assert indices == sorted(set(indices))
    for span in result.spans:
        assert 1 <= span.source_index <= len(sources)
        assert span.text == sources[span.source_index - 1].text[span.start : span.end]
        assert 0 <= span.start <= span.end


def test_the_span_is_the_sentence_holding_the_matched_words() -> None:
    text = "Rain fell in Paris.\n\n  Mawsynram is the  wettest place on Earth.\tIt is in India."
    scorer = LexicalSupportScorer([Source(text=text), MAWSYNRAM])
    result = scorer.score("Mawsynram is the wettest place on Earth", 1)
    start = text.index("Mawsynram")
    assert result.spans == (
        Evidence(
            source_index=1,
            start=start,
            end=text.index("\tIt"),
            text="Mawsynram is the  wettest place on Earth.",
        ),
    )
    assert result.evidence == result.spans[0].text
    assert scorer.score("Rainfall in Mawsynram", 2).spans[0].source_index == 2


def test_a_two_sentence_window_spans_the_source_text_between_them() -> None:
    text = "Ove Johansson kicked a field goal.\n It went 69 yards in 1976. Rain fell."
    result = LexicalSupportScorer([Source(text=text)]).score(
        "Ove Johansson kicked a 69 yard field goal in 1976", 1
    )
    assert result.evidence == "Ove Johansson kicked a field goal. It went 69 yards in 1976."
    (span,) = result.spans
    assert (span.start, span.end) == (0, text.index(" Rain"))
    assert span.text == "Ove Johansson kicked a field goal.\n It went 69 yards in 1976."


def test_among_windows_equal_by_the_title_the_one_with_the_words_wins() -> None:
    source = Source(title="Mawsynram", text="Rain fell. Mawsynram is a village. Sun shone.")
    result = LexicalSupportScorer([source]).score("Mawsynram", 1)
    assert result.score == pytest.approx(1.0)
    assert [span.text for span in result.spans] == ["Mawsynram is a village."]


def test_no_span_without_a_matched_window() -> None:
    scorer = LexicalSupportScorer(
        [Source(title="Mawsynram", text="Rain fell. Sun shone."), Source(text=""), MAWSYNRAM]
    )
    title_only = scorer.score("Mawsynram", 1)
    assert title_only.is_supported
    assert title_only.spans == ()
    assert scorer.score("Mawsynram", 2).spans == ()  # no text, no window
    assert scorer.score("Purple elephants dance", 3).spans == ()  # nothing matched
    assert scorer.score("It is.", 3).spans == ()  # nothing to check
    assert scorer.score_set("It is.", [1, 3]).spans == ()


def test_a_last_clause_fallback_spans_the_window_of_that_clause() -> None:
    source = Source(text="Stephen Morris is a novel. Rain fell. Lonely Road is another one.")
    result = LexicalSupportScorer([source], clause_fallback=True).score(
        "Purple elephants, Lonely Road", 1
    )
    assert "of the last" in result.detail
    assert [span.text for span in result.spans] == ["Lonely Road is another one."]


def test_a_union_spans_every_source_that_matched_in_index_order(
    scorer: LexicalSupportScorer,
) -> None:
    claim = "Mawsynram gets 11,872 mm while Cherrapunji had the most rain in July 1861"
    union = scorer.score_set(claim, [2, 1])
    assert "together" in union.detail
    assert [span.source_index for span in union.spans] == [1, 2]
    assert union.spans[0] == scorer.score_set(claim, [1]).spans[0]
    assert "11,872 mm" in union.spans[0].text
    assert "1861" in union.spans[1].text
    check_spans(union, SOURCES)
    # Where one source alone scores best, the result is that source's, its span alone.
    alone = scorer.score_set("Cherrapunji had the most rain in July 1861", [1, 2])
    assert alone == scorer.score_set("Cherrapunji had the most rain in July 1861", [2])
    assert [span.source_index for span in alone.spans] == [2]


def test_function_scorer_spans_the_whole_text_of_each_source_judged() -> None:
    untitled = Source(text="Plain text.")
    scorer = FunctionSupportScorer(
        [MAWSYNRAM, untitled, FIELD_GOAL], RecordingFn(0.7), threshold=0.5
    )
    whole = [
        Evidence(source_index=i, start=0, end=len(source.text), text=source.text)
        for i, source in enumerate((MAWSYNRAM, untitled, FIELD_GOAL), 1)
    ]
    assert scorer.score("claim", 1).spans == (whole[0],)  # the title is not part of it
    assert scorer.score("claim", 2).spans == (whole[1],)
    assert scorer.score_set("claim", [3, 1]).spans == (whole[0], whole[2])
    weak_union = FunctionSupportScorer(
        [MAWSYNRAM, untitled], lambda claim, text: 0.2 if "\n\n" in text else 0.9, threshold=0.5
    )
    assert weak_union.score_set("claim", [1, 2]).spans == (whole[0],)


def test_cached_results_carry_their_spans(scorer: LexicalSupportScorer) -> None:
    claim = "Mawsynram gets 11,872 mm while Cherrapunji had the most rain in July 1861"
    uncached = LexicalSupportScorer(SOURCES, cache_size=0)
    first, union = scorer.score(claim, 1), scorer.score_set(claim, [1, 2])
    assert first.spans
    assert len(union.spans) == 2
    assert scorer.score(claim, 1) is first
    assert scorer.score_set(claim, [2, 1]) is union
    assert uncached.score(claim, 1) == first
    assert uncached.score_set(claim, [1, 2]) == union


# Words (some accented or not Latin) run together with terminators, closers, odd
# whitespace and Unicode punctuation: sentences of every shape, as pieces of text.
_SPAN_WORDS = "Mawsynram rain Paris 1861 11,872 U.S. Dr. J. e.g. film Lloró Ünïcode 日本"
_SPAN_PIECES = [
    *_SPAN_WORDS.split(),
    *'.!?;,)"\u201c\u201d\u2019\u2026\u2014',
    *" \n\t\u00a0\u2003\u2028\x0b",
    "  ",
    "\n\n",
    "\r\n",
]
_SPAN_TEXT = st.lists(st.sampled_from(_SPAN_PIECES), max_size=40).map("".join)
_SPAN_CLAIM = _SPAN_TEXT | st.lists(st.sampled_from(_SPAN_WORDS.split()), max_size=8).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(
    texts=st.lists(_SPAN_TEXT, min_size=1, max_size=4),
    claim=_SPAN_CLAIM,
    data=st.data(),
)
def test_every_span_quotes_its_source_exactly(
    texts: list[str], claim: str, data: st.DataObject
) -> None:
    sources = [Source(text=text, title=text[:10]) for text in texts]
    indices = data.draw(st.lists(st.integers(1, len(sources)), min_size=1, max_size=4))
    lexical = LexicalSupportScorer(sources)
    function = FunctionSupportScorer(sources, lambda claim, text: len(text) % 7 / 6, threshold=0.5)
    for scorer in (lexical, function):
        for index in range(1, len(sources) + 1):
            check_spans(scorer.score(claim, index), sources)
        union = scorer.score_set(claim, indices)
        check_spans(union, sources)
        assert {span.source_index for span in union.spans} <= set(indices)
    for index in range(1, len(sources) + 1):
        spans = lexical.score(claim, index).spans
        assert len(spans) <= 1
        assert all(span.text.strip() == span.text != "" for span in spans)


# --- number and name guard ------------------------------------------------------------------------


def test_a_number_missing_from_the_source_lowers_the_score(scorer: LexicalSupportScorer) -> None:
    right = scorer.score("Cherrapunji holds the record for the most rain in July 1861", 2)
    wrong = scorer.score("Cherrapunji holds the record for the most rain in July 1862", 2)
    assert right.is_supported
    assert right.detail == "coverage 1.00"
    assert not wrong.is_supported
    assert wrong.score < right.score * 0.5
    assert "missing number 1862" in wrong.detail


def test_thousands_separators_do_not_count_as_missing(scorer: LexicalSupportScorer) -> None:
    result = scorer.score("Mawsynram has an average annual rainfall of 11872 mm", 1)
    assert "missing" not in result.detail
    assert result.score == pytest.approx(1.0)


def test_a_name_missing_from_the_source_lowers_the_score(scorer: LexicalSupportScorer) -> None:
    right = scorer.score("The record was set by Matt Prater in the NFL", 3)
    wrong = scorer.score("The record was set by Justin Tucker in the NFL", 3)
    assert right.is_supported
    assert not wrong.is_supported
    assert "missing name Justin, Tucker" in wrong.detail


def test_a_capital_opening_the_claim_is_not_treated_as_a_name(scorer: LexicalSupportScorer) -> None:
    result = scorer.score("Several villages in Meghalaya hold rainfall records", 2)
    assert "missing name" not in result.detail


# --- short claims -------------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["", "It is.", "   ", "[1]", "And so it was, as it is."])
def test_claims_without_content_words_are_supported(
    scorer: LexicalSupportScorer, claim: str
) -> None:
    result = scorer.score(claim, 3)
    assert result == SupportResult(
        score=1.0,
        is_supported=True,
        evidence="",
        detail="nothing to check: 0 content word(s), fewer than min_content_words=1",
    )


def test_min_content_words_is_tunable() -> None:
    scorer = LexicalSupportScorer(SOURCES, min_content_words=3)
    assert scorer.score("Purple elephants", 1).score == 1.0
    assert scorer.score("Purple elephants dance", 1).score < 0.4
    strict = LexicalSupportScorer(SOURCES, min_content_words=0)
    assert strict.score("", 1).score == 0.0
    assert not strict.score("", 1).is_supported


def test_a_single_checkable_word_is_checked_by_default(scorer: LexicalSupportScorer) -> None:
    assert scorer.score("Mawsynram", 1).is_supported
    assert not scorer.score("Mawsynram", 3).is_supported


# --- clause fallback ------------------------------------------------------------------------------


BOOKS = (
    Source(title="Nevil Shute", text='His first novel, "Stephen Morris", appeared in 1961.'),
    Source(title="Nevil Shute", text='Themes include class ("Lonely Road") and race.'),
)


def test_last_clause_can_stand_for_a_list_sentence() -> None:
    scorer = LexicalSupportScorer(BOOKS, clause_fallback=True)
    result = scorer.score("Stephen Morris, Lonely Road", 2)
    assert result.is_supported
    assert result.score == pytest.approx(0.9)
    assert "of the last 2 content word(s)" in result.detail
    strict = LexicalSupportScorer(BOOKS, clause_fallback=False)
    assert not strict.score("Stephen Morris, Lonely Road", 2).is_supported


def test_the_whole_sentence_is_judged_by_default() -> None:
    # A sentence-final marker vouches for the whole sentence: a reader refuses a citation
    # that supports only its last clause (issue 19).
    assert not LexicalSupportScorer(BOOKS).score("Stephen Morris, Lonely Road", 2).is_supported


def test_an_unsupported_last_clause_is_not_rescued() -> None:
    scorer = LexicalSupportScorer(BOOKS, clause_fallback=True)
    assert not scorer.score("Lonely Road, Stephen Morris", 2).is_supported
    assert scorer.score("Lonely Road, Stephen Morris", 1).is_supported


# --- caching ------------------------------------------------------------------------------------


def test_repeated_scores_come_from_the_cache(scorer: LexicalSupportScorer) -> None:
    claim = "Mawsynram is the wettest place on Earth"
    first = scorer.score(claim, 1)
    assert scorer.score(claim, 1) is first
    assert scorer.score(claim, 2) is not first
    assert scorer.score(claim + " today", 1) is not first


def test_cache_is_bounded_least_recently_used_first() -> None:
    scorer = LexicalSupportScorer(SOURCES, cache_size=2)
    a = scorer.score("Mawsynram is wet", 1)
    b = scorer.score("Cherrapunji is wet", 1)
    assert scorer.score("Mawsynram is wet", 1) is a  # a is now the most recent
    scorer.score("Matt Prater kicked", 1)  # evicts b
    assert scorer.score("Mawsynram is wet", 1) is a
    again = scorer.score("Cherrapunji is wet", 1)
    assert again is not b
    assert again == b


def test_cached_results_equal_fresh_ones_across_evictions() -> None:
    claims = [
        "Mawsynram is the wettest place on Earth",
        "Cherrapunji got the most rain in July 1861",
        "Matt Prater kicked 64 yards",
        "It is.",
        "Lloró reported 12,717 mm",
    ]
    tiny = LexicalSupportScorer(SOURCES, cache_size=2)
    uncached = LexicalSupportScorer(SOURCES, cache_size=0)
    for _ in range(3):
        for claim in claims:
            for index in (1, 2, 3):
                assert tiny.score(claim, index) == uncached.score(claim, index)


def test_uncached_scorer_recomputes_equal_results() -> None:
    uncached = LexicalSupportScorer(SOURCES, cache_size=0)
    first = uncached.score("Mawsynram is very wet", 1)
    second = uncached.score("Mawsynram is very wet", 1)
    assert first == second
    assert first is not second


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, -1, 4, 100])
def test_out_of_range_source_index_names_the_valid_range(
    scorer: LexicalSupportScorer, index: int
) -> None:
    with pytest.raises(ConfigurationError, match=r"valid source numbers are 1\.\.3"):
        scorer.score("Mawsynram is wet", index)


def test_non_int_source_index_is_refused(scorer: LexicalSupportScorer) -> None:
    with pytest.raises(ConfigurationError, match=r"1\.\.3"):
        scorer.score("Mawsynram is wet", True)
    with pytest.raises(ConfigurationError):
        scorer.score("Mawsynram is wet", 1.0)  # type: ignore[arg-type]


def test_empty_sources_are_refused() -> None:
    with pytest.raises(InvalidSourcesError, match="at least one source"):
        LexicalSupportScorer([])
    with pytest.raises(InvalidSourcesError):
        FunctionSupportScorer([], lambda claim, text: 1.0, threshold=0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 1.5},
        {"threshold": -0.1},
        {"threshold": math.nan},
        {"min_content_words": -1},
        {"min_content_words": True},
        {"name_weight": 0.5},
        {"prefix_credit": 2.0},
        {"missing_number_factor": -1.0},
        {"missing_name_factor": 1.1},
        {"clause_credit": 1.5},
        {"cache_size": -1},
    ],
)
def test_bad_tunables_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        LexicalSupportScorer(SOURCES, **kwargs)  # type: ignore[arg-type]


def test_sources_with_empty_text_score_zero_but_do_not_crash() -> None:
    scorer = LexicalSupportScorer([Source(text=""), Source(text="Rain falls in Mawsynram.")])
    assert scorer.score("Rain falls in Mawsynram", 1).score == 0.0
    assert scorer.score("Rain falls in Mawsynram", 2).is_supported


# --- FunctionSupportScorer ------------------------------------------------------------------------


@dataclass
class RecordingFn:
    value: object = 0.7
    calls: int = 0

    def __call__(self, claim: str, source_text: str) -> float:
        self.calls += 1
        self.last = (claim, source_text)
        return self.value  # type: ignore[return-value]


def test_function_scorer_passes_title_and_text_and_applies_threshold() -> None:
    fn = RecordingFn(0.7)
    scorer = FunctionSupportScorer([MAWSYNRAM, Source(text="untitled")], fn, threshold=0.6)
    result = scorer.score("Mawsynram is wet", 1)
    assert result.is_supported
    assert result.score == pytest.approx(0.7)
    assert fn.last == ("Mawsynram is wet", f"Mawsynram\n{MAWSYNRAM.text}")
    scorer.score("x", 2)
    assert fn.last == ("x", "untitled")
    assert not FunctionSupportScorer([MAWSYNRAM], fn, threshold=0.8).score("a", 1).is_supported


def test_function_scorer_caches_calls() -> None:
    fn = RecordingFn(0.5)
    scorer = FunctionSupportScorer(SOURCES, fn, threshold=0.5)
    first = scorer.score("claim", 2)
    assert scorer.score("claim", 2) is first
    assert fn.calls == 1
    assert first.is_supported


@pytest.mark.parametrize(("raw", "clamped"), [(-0.3, 0.0), (1.7, 1.0), (0, 0.0), (1, 1.0)])
def test_function_scorer_clamps_into_unit_interval(raw: float, clamped: float) -> None:
    scorer = FunctionSupportScorer(SOURCES, RecordingFn(raw), threshold=0.5)
    assert scorer.score("claim", 1).score == clamped


def test_function_scorer_accepts_numpy_scalars() -> None:
    np = pytest.importorskip("numpy")
    scorer = FunctionSupportScorer(SOURCES, RecordingFn(np.float32(0.25)), threshold=0.2)
    assert scorer.score("claim", 1).score == pytest.approx(0.25)


@pytest.mark.parametrize("raw", [math.nan, math.inf, "0.9", None, True])
def test_function_scorer_refuses_non_numbers(raw: object) -> None:
    scorer = FunctionSupportScorer(SOURCES, RecordingFn(raw), threshold=0.5)
    with pytest.raises(ConfigurationError, match="finite number"):
        scorer.score("claim", 1)


def test_function_scorer_validates_index_threshold_and_fn() -> None:
    with pytest.raises(ConfigurationError, match="threshold"):
        FunctionSupportScorer(SOURCES, RecordingFn(), threshold=2.0)
    with pytest.raises(ConfigurationError, match="callable"):
        FunctionSupportScorer(SOURCES, 0.5, threshold=0.5)  # type: ignore[arg-type]
    scorer = FunctionSupportScorer(SOURCES, RecordingFn(), threshold=0.5)
    with pytest.raises(ConfigurationError, match=r"1\.\.3"):
        scorer.score("claim", 4)


def test_function_scorer_lets_fn_errors_propagate() -> None:
    def broken(claim: str, text: str) -> float:
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        FunctionSupportScorer(SOURCES, broken, threshold=0.5).score("claim", 1)


def test_both_scorers_satisfy_the_protocol() -> None:
    assert isinstance(LexicalSupportScorer(SOURCES), SupportScorer)
    assert isinstance(FunctionSupportScorer(SOURCES, RecordingFn(), threshold=0.5), SupportScorer)


# --- properties ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    claim=st.text(max_size=200),
    texts=st.lists(st.text(max_size=300), min_size=1, max_size=4),
    data=st.data(),
)
def test_scores_are_bounded_and_deterministic(
    claim: str, texts: list[str], data: st.DataObject
) -> None:
    sources = [Source(text=text, title=text[:20]) for text in texts]
    index = data.draw(st.integers(min_value=1, max_value=len(sources)))
    first = LexicalSupportScorer(sources).score(claim, index)
    second = LexicalSupportScorer(sources, cache_size=0).score(claim, index)
    assert 0.0 <= first.score <= 1.0
    assert first == second
    assert first.is_supported == (first.score >= LexicalSupportScorer(sources).threshold)


@settings(max_examples=100, deadline=None)
@given(words=st.lists(st.sampled_from([*MAWSYNRAM.text.split(), "Zebra", "1999"]), max_size=40))
def test_scores_are_bounded_for_source_like_claims(words: list[str]) -> None:
    scorer = LexicalSupportScorer(SOURCES)
    for index in (1, 2, 3):
        assert 0.0 <= scorer.score(" ".join(words), index).score <= 1.0


# --- latency ------------------------------------------------------------------------------------


def test_scoring_is_cheap() -> None:
    words = (MAWSYNRAM.text + " " + CHERRAPUNJI.text + " " + FIELD_GOAL.text).split()
    source = Source(title="Long", text=" ".join((words * 3)[:200]))
    scorer = LexicalSupportScorer([source, MAWSYNRAM, FIELD_GOAL], cache_size=0)
    claims = [" ".join(words[i : i + 50]) for i in range(0, 60, 2)]
    start = time.perf_counter()
    for claim in claims:
        scorer.score(claim, 1)
    per_call = (time.perf_counter() - start) / len(claims)
    # ~0.15 ms on a laptop-class CPU; the bound leaves room for slow CI machines.
    assert per_call < 0.005


# --- ALCE evaluation ----------------------------------------------------------------------------

_MARKER = re.compile(r"\[(\d+)\]")
_GROUP = re.compile(r"(?:\[\d+\])+")


def _alce_dir() -> Path | None:
    candidates = [
        os.environ.get("CITEBACKTRACK_ALCE_DIR", ""),
        str(Path(__file__).parent / "data" / "alce"),
        "/work/shared/data/alce",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "asqa_default.json").is_file():
            return Path(candidate)
    return None


@dataclass(frozen=True)
class Case:
    claim: str
    """The sentence up to the marker group, markers removed: what the validator passes."""
    cited: tuple[int, ...]
    sources: tuple[Source, ...]


def alce_cases(directory: Path) -> Iterator[Case]:
    """One case per marker group of every ALCE demo answer (ASQA, ELI5, QAMPARI)."""
    for name in ("asqa", "eli5", "qampari"):
        demos = json.loads((directory / f"{name}_default.json").read_text("utf-8"))["demos"]
        for demo in demos:
            sources = tuple(Source(title=d["title"], text=d["text"]) for d in demo["docs"])
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", demo["answer"]):
                for group in _GROUP.finditer(sentence):
                    claim = re.sub(r"\s*\[\d+\]", "", sentence[: group.start()]).strip()
                    cited = tuple(int(n) for n in _MARKER.findall(group.group()))
                    yield Case(claim, cited, sources)


@pytest.fixture(scope="module")
def alce() -> list[Case]:
    directory = _alce_dir()
    if directory is None:
        pytest.skip("ALCE demos not found (set CITEBACKTRACK_ALCE_DIR)")
    return list(alce_cases(directory))


def test_alce_gold_citations_are_supported_and_uncited_passages_rejected(alce: list[Case]) -> None:
    gold = gold_supported = uncited = uncited_rejected = below_gold = 0
    scorers: dict[int, LexicalSupportScorer] = {}
    for case in alce:
        if id(case.sources) not in scorers:
            scorers[id(case.sources)] = LexicalSupportScorer(case.sources)
        scorer = scorers[id(case.sources)]
        results = {i: scorer.score(case.claim, i) for i in range(1, len(case.sources) + 1)}
        weakest_gold = min(results[i].score for i in case.cited)
        for i in case.cited:
            gold += 1
            gold_supported += results[i].is_supported
        cited_texts = {case.sources[i - 1].text for i in case.cited}
        for i, result in results.items():
            # Uncited duplicates of a cited passage are not negatives.
            if i in case.cited or case.sources[i - 1].text in cited_texts:
                continue
            uncited += 1
            uncited_rejected += not result.is_supported
            below_gold += result.score < weakest_gold
    # Measured at the defaults: 21/60 gold citations supported each on its own,
    # 196/199 uncited rejected, 171/199 uncited scored below every gold citation of their
    # claim. The strict judgment (issue 19: the whole sentence, its names and numbers in
    # one passage of the cited source, polarity) refuses most single citations of ALCE's
    # hand-written list and synthesis sentences: with the last-clause fallback on, 45/60.
    # Before it (threshold 0.4, names anywhere in the source, clause fallback): 53/60
    # and 187/199, the judge refusing three in four of what that accepted on HotpotQA.
    assert (gold, uncited) == (60, 199)
    assert gold_supported >= 20
    assert uncited_rejected >= 194
    assert below_gold >= 165


def test_alce_passages_of_other_questions_are_rejected(alce: list[Case]) -> None:
    by_question: list[tuple[Source, ...]] = []
    for case in alce:
        if case.sources not in by_question:
            by_question.append(case.sources)
    checked = rejected = 0
    for case in alce:
        k = by_question.index(case.sources)
        other = by_question[(k + 5) % len(by_question)]
        scorer = LexicalSupportScorer(case.sources + other)
        for i in range(len(case.sources) + 1, len(case.sources) + len(other) + 1):
            checked += 1
            rejected += not scorer.score(case.claim, i).is_supported
    # Measured: 260/260 rejected, the highest scoring 0.24.
    assert checked == 260
    assert rejected >= 257
