"""One sentence syntax: the grammar, the tracker and the passage splitter agree on it."""

from __future__ import annotations

import functools
import itertools

import pytest
import xgrammar as xgr
from hypothesis import given, settings
from hypothesis import strategies as st

from citebacktrack._tracker import TextState, advance
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.retrieval import chunk_text
from citebacktrack.syntax import (
    ABBREVIATIONS,
    CLOSERS,
    LONGEST_ABBREVIATION,
    SENTENCE_END_RE,
    period_is_absorbed,
    sentence_spans,
    split_sentences,
    strip_markers,
    whole_words,
)
from citebacktrack.validation import strip_markers as validation_strip_markers
from grammar_engines import xgrammar_accepts, xgrammar_compiled

PASSAGES = [
    'The U.S. Navy sailed. Dr. Who came in 1961. He met J. R. Tolkien. "Done." end',
    "Mawsynram is a village in the East Khasi Hills district of Meghalaya state in "
    "north-eastern India. It is reportedly the wettest place on Earth, with an average annual "
    "rainfall of 11,872 mm. Lloró, Colombia reported an average yearly rainfall of 12,717 mm "
    "between 1952 and 1989.",
    "Wait... there is more! Is it true? Yes (mostly). The shop opens at 9 a.m. daily, e.g. on "
    "Mondays. Prices rose 3.5% in 2020 vs. 2019. See https://example.com/a.b for details.",
    "J. K. Rowling wrote the books. Mr. Smith, i.e. the author, agreed. This happened in 632 "
    "A.D. Then it ended. Ask Prof. Jones (or Mrs. Jones).",
    "It rains. Others (e.g. Smith) do not (or so they say.) Fine!",
]
# Double terminators split passages, but the grammar takes one terminator per sentence.
# "cause.g." is no abbreviation, and no way to write it either.
SPLIT_ONLY = ["It rained!! Really?! Some say so. Others do not.", "The cause.g. is. No."]


@functools.cache
def _required_sentence(n: int) -> xgr.CompiledGrammar:
    """XGrammar on the REQUIRED grammar with ``block`` (one sentence) as the root."""
    return xgrammar_compiled(emit(citation_grammar(n), Dialect.EBNF), root="block")


@functools.cache
def _required(n: int) -> xgr.CompiledGrammar:
    return xgrammar_compiled(emit(citation_grammar(n), Dialect.EBNF))


def tracker_sentences(text: str, *, strict: bool) -> list[str]:
    """The tracker's sentences of ``text`` fed one byte at a time (stripped)."""
    data = text.encode()
    state, starts = TextState(strict=strict), {0}
    for i in range(len(data)):
        state, _ = advance(state, data[i : i + 1], i)
        starts.add(state.sentence_start)
    bounds = [*sorted(starts), len(data)]
    pieces = (data[a:b].decode().strip() for a, b in itertools.pairwise(bounds))
    return [piece for piece in pieces if piece]


@pytest.mark.parametrize("passage", PASSAGES + SPLIT_ONLY, ids=lambda p: p[:20])
def test_splitter_and_tracker_agree_on_passages(passage: str) -> None:
    assert split_sentences(passage) == tracker_sentences(passage, strict=False)


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("passage", PASSAGES, ids=lambda p: p[:20])
def test_the_grammar_accepts_each_split_sentence_cited(passage: str, late: bool) -> None:
    """Each sentence split out, with a marker added, is one sentence of the grammar; and
    the tracker, on the cited answer, finds the same sentences."""
    sentences = split_sentences(passage)
    cited = []
    for i, sentence in enumerate(sentences):
        marker = f"[{i % 3 + 1}]"
        if late or sentence[-1] not in ".!?":
            cited.append(f"{sentence} {marker}")  # "claim. [1]" (or "claim [1]" at the end)
        else:
            cited.append(f"{sentence[:-1]} {marker}{sentence[-1]}")  # "claim [1]."
    for sentence in cited:
        assert xgrammar_accepts(_required_sentence(3), sentence), sentence
    answer = " ".join(cited)
    assert xgrammar_accepts(_required(3), answer)
    assert tracker_sentences(answer, strict=True) == cited


def test_chunker_keeps_abbreviations_inside_sentences() -> None:
    text = " ".join(["Dr. Smith met J. R. Tolkien in the U.S. in 1961."] * 20)
    chunks = chunk_text(text, passage_words=20)
    assert all(chunk.endswith("1961.") for chunk in chunks)
    assert " ".join(chunks) == text


@pytest.mark.parametrize("abbreviation", ABBREVIATIONS)
def test_listed_abbreviations_are_absorbed_only_at_a_word_start(abbreviation: str) -> None:
    for before in ("", " ", "(", "x ", "[1]"):
        assert period_is_absorbed((before + abbreviation).encode())
    assert not period_is_absorbed(("x" + abbreviation).encode())


def test_what_is_and_is_not_absorbed() -> None:
    for text in ("Wait...", "the U.S.", "U.S.A.", "by J.", "(J.", "J."):
        assert period_is_absorbed(text.encode()), text
    for text in ("Affairs.s.", "cause.g.", "NASA.", "etc.", "It ended.", "3.", "Wait?", ""):
        assert not period_is_absorbed(text.encode()), text


def test_strip_markers_matches_the_validator() -> None:
    for text in ("Paris [1][2] is big [3].", "He won. [1] She lost.[2]", "x []"):
        assert strip_markers(text) == validation_strip_markers(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='ab AU.!?)"[]12e.g', min_size=1, max_size=40))
def test_tracker_sentences_are_grammar_sentences(text: str) -> None:
    """Where the grammar accepts an answer, every sentence the tracker finds in it is a
    sentence of the grammar on its own: the tracker never ends a sentence where the
    grammar cannot."""
    if not xgrammar_accepts(_required(2), text):
        return
    for sentence in tracker_sentences(text, strict=True):
        assert xgrammar_accepts(_required_sentence(2), sentence), (text, sentence)


# --- sentence spans -------------------------------------------------------------------------------


def reference_split(text: str) -> list[str]:
    """``split_sentences`` as it was before spans: stripped slices between sentence ends."""
    sentences: list[str] = []
    start = 0
    for match in SENTENCE_END_RE.finditer(text):
        gap = match.group()
        last = match.start() + len(gap.rstrip().rstrip(CLOSERS)) - 1
        before = text[max(0, last - LONGEST_ABBREVIATION) : last + 1].encode()
        if "\n" not in gap and period_is_absorbed(before):
            continue
        sentence = text[start : match.end()].strip()
        if sentence:
            sentences.append(sentence)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


# Prose with the characters that decide sentence ends, odd whitespace (Unicode spaces that
# str.strip removes but the sentence-end pattern's ``\s`` also matches) and non-ASCII letters.
PROSE = st.text(
    alphabet="ab AUJ.!?)\"'[]1e.g\n\t\r"
    "\u00a0\u2003\u3000\u2028\x0b\u00e9\u00df\u00dc\u65e5\u201d\u2026",
    max_size=80,
)


def test_sentence_spans_locate_the_split_sentences() -> None:
    text = '  The U.S. Navy sailed.\n\nDr. Who came in 1961.\t He met J. R. Tolkien. "Done."  end '
    spans = sentence_spans(text)
    assert [text[a:b] for a, b in spans] == split_sentences(text)
    assert spans[0] == (2, 2 + len("The U.S. Navy sailed."))
    assert spans[-1] == (len(text) - 4, len(text) - 1)
    assert sentence_spans("") == sentence_spans(" \n\t") == []


@settings(max_examples=400, deadline=None)
@given(PROSE)
def test_sentence_spans_are_exactly_the_split_sentences(text: str) -> None:
    """The spans' slices are the sentences (as split before spans existed), in order,
    stripped, and what lies between them is whitespace only."""
    spans = sentence_spans(text)
    assert [text[a:b] for a, b in spans] == split_sentences(text) == reference_split(text)
    bounds = [0, *itertools.chain.from_iterable(spans), len(text)]
    for start, end in itertools.pairwise(bounds):
        assert start <= end
    for start, end in spans:
        assert start < end
        assert text[start:end] == text[start:end].strip()
    gaps = zip(bounds[::2], bounds[1::2], strict=True)  # before, between and after spans
    assert all(text[a:b].strip() == "" for a, b in gaps)


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("Paris is the cap", "Paris is the"),
        ("Paris is the capital,", "Paris is the capital,"),
        ("Paris", "Paris"),
        ("", ""),
    ],
)
def test_whole_words_drops_a_word_the_budget_may_have_cut(text: str, kept: str) -> None:
    assert whole_words(text) == kept
