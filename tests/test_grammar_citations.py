"""The citation grammar against XGrammar, llama.cpp's GBNF sampler and Lark.

Expected verdicts follow the rules in the module docstring of
:mod:`citebacktrack.grammar.citations`; every engine must reach the expected verdict.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import xgrammar as xgr

from citebacktrack.errors import InvalidSourcesError
from citebacktrack.grammar.citations import MAX_SENTENCE_BREAKS, MAX_SOURCES, citation_grammar
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.grammar.ir import CharClass, Repeat, walk
from citebacktrack.types import CitationMode, Policy
from grammar_engines import (
    CompiledGrammar,
    GbnfVocab,
    compile_all,
    lark_parser,
    xgrammar_accepts,
    xgrammar_compiled,
)

REQUIRED, AUTO, QUOTES = CitationMode.REQUIRED, CitationMode.AUTO, CitationMode.QUOTES_ONLY
MODES = list(CitationMode)
N_SOURCES = 5


@functools.cache
def _compiled(n: int, policy: Policy, bounded: bool, vocab: GbnfVocab) -> CompiledGrammar:
    return compile_all(citation_grammar(n, policy, bounded=bounded), vocab)


GetGrammar = Callable[..., CompiledGrammar]


@pytest.fixture(scope="module")
def grammars(gbnf_vocab: GbnfVocab) -> Iterator[GetGrammar]:
    """``grammars(mode, n=5, bounded=False, **policy)``: a grammar loaded in every engine."""

    def get(
        mode: CitationMode, n: int = N_SOURCES, bounded: bool = False, **policy: int
    ) -> CompiledGrammar:
        return _compiled(n, Policy(mode=mode, **policy), bounded, gbnf_vocab)

    yield get
    _compiled.cache_clear()


def assert_verdict(
    compiled: CompiledGrammar, text: str, expected: bool, *, lark: bool = True
) -> None:
    """Every engine (Lark left out with ``lark=False``) reaches the ``expected`` verdict."""
    if lark:
        verdicts = compiled.verdicts(text)
    else:
        assert compiled.gbnf_vocab is not None
        verdicts = {
            "xgrammar": xgrammar_accepts(compiled.xgrammar, text),
            "llama.cpp": compiled.gbnf_vocab.accepts(compiled.gbnf, text),
        }
    assert set(verdicts.values()) == {expected}, (
        f"expected {'accept' if expected else 'reject'} of {text!r}, got {verdicts}"
    )


# --------------------------------------------------------------------------- (a) compile


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_compiles_for_1_to_100_sources(
    gbnf_vocab: GbnfVocab, mode: CitationMode, bounded: bool
) -> None:
    policy = Policy(mode=mode)
    for n in range(1, 101):
        grammar = citation_grammar(n, policy, bounded=bounded)
        xgr.Grammar.from_ebnf(emit(grammar, Dialect.EBNF))
        gbnf = emit(grammar, Dialect.GBNF)
        assert gbnf_vocab.is_valid(gbnf), f"llama.cpp rejected n={n}:\n{gbnf}"


@pytest.mark.parametrize("mode", MODES)
def test_source_ids_for_1_to_100_sources(mode: CitationMode) -> None:
    # XGrammar alone over every n (cheap); all three engines on a sample below.
    for n in range(1, 101):
        compiled = xgrammar_compiled(emit(citation_grammar(n, Policy(mode=mode)), Dialect.EBNF))
        assert xgrammar_accepts(compiled, f"Fact [{n}].")
        assert xgrammar_accepts(compiled, "Fact [1].")
        for bad in (0, n + 1, 10 * n, f"0{n}"):
            assert not xgrammar_accepts(compiled, f"Fact [{bad}]."), (n, bad)


@pytest.mark.parametrize("n", [1, 2, 9, 10, 11, 99, 100])
@pytest.mark.parametrize("mode", MODES)
def test_source_ids_in_all_engines(grammars: GetGrammar, mode: CitationMode, n: int) -> None:
    compiled = grammars(mode, n)
    for good in sorted({1, n, max(1, n - 1), (n + 1) // 2}):
        assert_verdict(compiled, f"Fact [{good}].", True)
    for bad in ("0", str(n + 1), f"0{n}", f"{n}0", f"1{n}" if n > 1 else "11", "-1", "1.0"):
        assert_verdict(compiled, f"Fact [{bad}].", False)


@pytest.mark.parametrize("mode", MODES)
def test_largest_source_count(grammars: GetGrammar, mode: CitationMode) -> None:
    compiled = grammars(mode, MAX_SOURCES)
    assert_verdict(compiled, f"Fact [{MAX_SOURCES}][37].", True)
    assert_verdict(compiled, f"Fact [{MAX_SOURCES + 1}].", False)
    grammar = citation_grammar(MAX_SOURCES, Policy(mode=mode), bounded=True)
    xgrammar_compiled(emit(grammar, Dialect.EBNF))
    lark_parser(emit(grammar, Dialect.LARK))


@pytest.mark.parametrize("n", [0, -1, MAX_SOURCES + 1])
def test_source_count_out_of_range(n: int) -> None:
    with pytest.raises(InvalidSourcesError, match="between 1 and"):
        citation_grammar(n)


def test_default_policy_is_required() -> None:
    assert citation_grammar(3) == citation_grammar(3, Policy(mode=REQUIRED))


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 7, 100])
def test_compiles_against_a_token_vocabulary(mode: CitationMode, n: int, bounded: bool) -> None:
    vocab = ["<eos>", "Fact", " ", "[", "]", "1", "7", "100", ".", " [", "].", "[1]", "x", "\n"]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, stop_token_ids=[0])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    compiled = compiler.compile_grammar(
        emit(citation_grammar(n, Policy(mode=mode), bounded=bounded), Dialect.EBNF)
    )
    ids = {token: index for index, token in enumerate(vocab)}

    def run(tokens: list[str]) -> bool:
        matcher = xgr.GrammarMatcher(compiled)
        return all(matcher.accept_token(ids[token]) for token in tokens) and matcher.is_terminated()

    assert run(["Fact", " [", "1", "].", "<eos>"])
    assert run(["Fact", " ", "[1]", ".", "<eos>"])
    assert run(["Fact", " [", str(n), "].", "<eos>"]) is (str(n) in ids)
    assert not run(["Fact", " [", "1", "]", "]", "<eos>"])
    assert not run(["<eos>"])
    assert run(["x", "<eos>"]) is (mode is not REQUIRED)
    # The mask is computable and forbids a ']' right after prose.
    matcher = xgr.GrammarMatcher(compiled)
    assert matcher.accept_token(ids["Fact"])
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    allowed = {vocab[i] for i in range(len(vocab)) if bitmask[0, i // 32] >> (i % 32) & 1}
    assert "]" not in allowed
    assert {" [", "[1]"} <= allowed


def _prose_bounds(mode: CitationMode, bounded: bool) -> set[tuple[int, int | None]]:
    """(min, max) of every run of prose: a repeated negated class that admits spaces."""
    policy = Policy(mode=mode, max_uncited_chars=123)
    return {
        (node.min, node.max)
        for _, body in citation_grammar(4, policy, bounded=bounded).rules
        for node in walk(body)
        if isinstance(node, Repeat)
        and isinstance(node.item, CharClass)
        and node.item.negated
        and node.item.matches(" ")
    }


def test_bounded_grammar_bounds_prose() -> None:
    # (1, ...): the prose after an ellipsis is not empty ("......" is no ellipsis).
    assert _prose_bounds(REQUIRED, True) == {(0, 123), (1, 123)}
    assert _prose_bounds(REQUIRED, False) == {(0, None), (1, None)}
    # Under QUOTES_ONLY the quotations are bounded; the free prose around them is not.
    assert _prose_bounds(QUOTES, True) == {(1, 123), (0, None)}
    assert _prose_bounds(QUOTES, False) == {(1, None), (0, None)}
    assert _prose_bounds(AUTO, True) == _prose_bounds(AUTO, False) == {(0, None)}


# --------------------------------------------------------------------------- (b) corpus


@dataclass(frozen=True)
class Case:
    """An answer and the verdict the documented rules give it under each mode."""

    text: str
    required: bool
    auto: bool
    quotes_only: bool
    why: str

    def expected(self, mode: CitationMode) -> bool:
        return {REQUIRED: self.required, AUTO: self.auto, QUOTES: self.quotes_only}[mode]


def valid(text: str, why: str) -> Case:
    """A well-cited answer: valid under every mode."""
    return Case(text, True, True, True, why)


def uncited(text: str, why: str) -> Case:
    """Fine prose with a sentence (but no quotation) left uncited."""
    return Case(text, False, True, True, why)


def malformed(text: str, why: str) -> Case:
    """A broken marker or an empty answer: rejected under every mode."""
    return Case(text, False, False, False, why)


CORPUS = [
    # What ordinary prose needs.
    valid("Water boils at 100 C at sea level [1].", "plain sentence"),
    valid("Pi is about 3.14 and e is about 2.7 [2].", "decimals"),
    valid("It costs $3.50 today [1]!", "decimal, exclamation"),
    valid("Some fruits, e.g. apples, are sweet [2].", "e.g."),
    valid("Cats, i.e. felines, purr [3].", "i.e."),
    valid("The shop opens at 9 a.m. daily [1].", "a.m."),
    valid("See https://example.com/a?b=c&d=1 for details [1].", "URL with ? and ="),
    valid("He was 5.5 ft tall in the 1990s [1].", "decimal between digits"),
    valid("Wait... there is more [1].", "ellipsis"),
    valid("J. K. Rowling wrote the books [1].", "leading initials"),
    valid("The author J. K. Rowling wrote them [1].", "initials mid-sentence"),
    valid("J.K. Rowling wrote the books [1].", "dotted initials"),
    valid("The U.S. Army fought there [4].", "U.S."),
    valid("This happened in 632 A.D. [1][2].", "A.D. before a citation"),
    valid("Lloró, Colombia, is among the rainiest places [3].", "non-ASCII letters"),
    valid("Great 🎉 results, naïve café [1].", "emoji and accents"),
    valid("Water boils at 100 C [1][2].", "two markers"),
    valid("Water boils at 100 C [1][2][3].", "k markers"),
    valid(
        "The record is 11,872 mm [3], although Sohra holds the monthly record [1].",
        "mid-sentence citation",
    ),
    valid("A [1], b [2], c [3].", "k groups in one sentence"),
    valid("Fact one [1]. Fact two [2]! Fact three [3]?", "three sentences"),
    valid("First fact [1].\nSecond fact [2].", "newline between sentences"),
    valid("First fact [1].\n\nSecond fact [2].\n", "paragraphs, trailing newline"),
    valid("  Leading and trailing space [1].  \n", "surrounding whitespace"),
    valid("No final period [1]", "terminator optional"),
    valid("(An aside, really [2]).", "closing bracket after the marker"),
    Case('The sign read "Stop here [1]".', True, True, False, "marker inside a quotation"),
    valid('He said "hello"[1].', "quotation cited without a space"),
    valid('He said "hello" [1].', "quotation cited after one space"),
    valid("He said “hello” [2].", "curly quotation cited"),
    valid("Key points:\n- Apples are red [1].\n- Bananas are yellow [2].", "heading, - list"),
    valid("Steps:\n1. Mix [1].\n2. Bake [2].\n10. Serve [3].", "heading, numbered list"),
    valid("Summary:\nThe sky is blue [1].", "Heading: line"),
    valid("Note: \n• Item one [1].\n* Item two [2].", "heading with trailing space, bullets"),
    valid("Tabs\tare fine [1].", "tab in prose"),
    # The citation after the sentence's terminator (the Wikipedia style small models use).
    valid("He won. [1]", "marker after the period"),
    valid("He won.[1]", "marker right after the period"),
    valid("He won.[1][2] She lost. [3]", "group after the period, two sentences"),
    valid("Fact one. [1] Fact two [2]. Fact three! [3]", "both styles mixed"),
    valid("A [1], and b. [2]", "a mid-sentence group, then one after the period"),
    valid('He said "no." [3]', "terminator inside the quotation, then the marker"),
    valid("(An aside, really.) [2]", "terminator inside the parenthesis"),
    valid("Is it true? [1] Yes. [2]", "question mark, then the marker"),
    valid("He paid $3.50. [1]", "a decimal, then the period and the marker"),
    valid("See https://example.com/a. [1]", "URL, then the period and the marker"),
    valid("It is in the U.S. [1] And more. [2]", "an abbreviation before a late marker"),
    # Listed abbreviations and initials (syntax.ABBREVIATIONS).
    valid("Ask Dr. Smith [1].", "Dr. is a listed abbreviation"),
    valid("Mr. Smith went to Washington [1].", "a listed abbreviation opens the sentence"),
    valid("Some fruits (e.g. apples) are sweet [2].", "e.g. after a parenthesis"),
    valid("Some fruits, e.g., apples, are sweet [2].", "e.g. then a comma"),
    valid("Cats vs. dogs is old news [1].", "vs."),
    valid("A. B. C. D. Smith wrote it [1].", "four leading initials"),
    valid("U.S.A. is big [1].", "three-letter dotted abbreviation"),
    valid("Fact [1][1].", "a repeated id is the validator's business, not the grammar's"),
    # Sentences without a citation.
    uncited("No citation here.", "uncited answer"),
    uncited("Fact one [1]. Fact two.", "second sentence uncited"),
    uncited("Is it true? Yes, it is [1].", "uncited question"),
    uncited("Cats are mammals [1] and dogs too.", "uncited tail after the marker"),
    uncited("Ask Prof Smith. He knows [1].", "an unlisted word before a period"),
    uncited("Numbers etc. and more [1].", "etc. and ends a sentence"),
    uncited("Earth.Plants grow there [1].", "a period before a capital is not a break"),
    uncited("Plants use energy.chlorophyll to grow [1].", "glued words are not a break"),
    uncited("See example.com for details [1].", "bare domain"),
    uncited("He won. [1].", "no second terminator after a late group"),
    uncited("He won.  [1]", "at most one space between the period and the marker"),
    uncited("He won. Then [1].", "a period and a word: the sentence ended uncited"),
    # Escapes a small model used to continue past a period without citing.
    uncited("Constitutional Affairs.s. The role is big [1].", "fake dotted abbreviation"),
    uncited("The main cause.g. heat is big [1].", "a listed abbreviation needs a word start"),
    uncited("New York City...... is big [1].", "ellipsis chain of six"),
    uncited("New York City......... is big [1].", "ellipsis chain of nine"),
    uncited("Wait.. there is more [1].", "two periods are no ellipsis"),
    uncited("[1] Fact.", "citation before the prose"),
    uncited("It's fine.", "apostrophe, uncited"),
    uncited("Summary:\n", "a heading alone"),
    uncited("No. 5 is big [1].", "any other period and space ends the sentence"),
    uncited("Really?! Yes [1].", "?! ends the sentence"),
    # Markers.
    malformed("Fact [0].", "[0]"),
    malformed(f"Fact [{N_SOURCES + 1}].", "[n+1]"),
    malformed("Fact [01].", "leading zero"),
    malformed("Fact [1, 2].", "list inside one marker"),
    malformed("Fact [1-2].", "range"),
    malformed("Fact [1,2].", "list without space"),
    malformed("Fact [].", "empty marker"),
    malformed("Fact [ 1].", "space inside the marker"),
    malformed("Fact [a].", "letter id"),
    malformed("Fact [1", "unterminated marker"),
    malformed("Fact [", "lone ["),
    malformed("Fact [1]].", "stray ] after a marker"),
    malformed("Fact ] here [1].", "stray ] in prose"),
    malformed("Arrays like x[0] are common [1].", "square brackets in prose"),
    malformed("", "empty answer"),
    malformed("   ", "spaces only"),
    malformed(" \n\t\r\n", "whitespace only"),
    # Quotations (QUOTES_ONLY).
    Case('He said "hello" to me.', False, True, False, "uncited quotation"),
    Case('He said "hello" [1] to me.', False, True, True, "quotation cited, tail uncited"),
    Case("She said “hi” there.", False, True, False, "uncited curly quotation"),
    Case("He said “hello”  [1].", True, True, False, "two spaces before the marker"),
    Case('He said "hello [1].', True, True, False, "unterminated quotation"),
    Case('"" [1]', True, True, False, "empty quotation"),
    Case('"two\nlines" [1]', False, True, False, "quotation across a newline"),
    Case('A “mixed" [1]', True, True, False, "mismatched quotation marks"),
    Case('"hello" [1] and more', False, True, True, "quotation first"),
    Case('He said "a [1]" then [2].', True, True, False, "marker inside a quotation, then"),
    Case("Plain prose, no quotation.", False, True, True, "no quotation at all"),
]

# Where the grammar departs from the documented rules. Strict xfails: a fix makes them pass
# and fail the run, so that they move into CORPUS.
KNOWN_DISCREPANCIES = {
    # Policy.max_citations_per_sentence is "most markers in one sentence (and one group)",
    # but adjacent groups are not kept apart: under REQUIRED a sentence takes k groups of k
    # markers (k*k in a row), under AUTO and QUOTES_ONLY any number.
    Case("Water boils [1][2][3][4].", False, False, False, "k+1 markers in one run"): MODES,
    # Documented as not ending a sentence, but each break takes the digit on both sides of
    # its point, so the second point has no digit left before it.
    valid("Version 1.2.3 is out [1].", "dotted version number"): [REQUIRED],
}


def _corpus_params() -> list[object]:
    params: list[object] = []
    for case in CORPUS:
        for mode in MODES:
            params.append(pytest.param(case, mode, id=f"{mode.value}-{case.why}"))
    for case, modes in KNOWN_DISCREPANCIES.items():
        for mode in modes:
            mark = pytest.mark.xfail(
                strict=True, reason=f"grammar departs from the docs: {case.why}"
            )
            params.append(pytest.param(case, mode, id=f"{mode.value}-{case.why}", marks=mark))
    return params


@pytest.mark.parametrize(("case", "mode"), _corpus_params())
def test_corpus(grammars: GetGrammar, case: Case, mode: CitationMode) -> None:
    assert_verdict(grammars(mode), case.text, case.expected(mode))


def test_corpus_has_no_duplicates() -> None:
    texts = [case.text for case in CORPUS]
    assert len(texts) == len(set(texts))


def test_markers_per_sentence(grammars: GetGrammar) -> None:
    # What the REQUIRED grammar does enforce of max_citations_per_sentence (k).
    one = grammars(REQUIRED, max_citations_per_sentence=1)
    assert_verdict(one, "Fact [1].", True)
    assert_verdict(one, "Fact [1][2].", False)
    assert_verdict(one, "Fact [1], more [2].", False)
    assert_verdict(one, "Fact [1]. More [2].", True)
    three = grammars(REQUIRED)
    assert_verdict(three, "A [1], b [2], c [3], d [4].", False)
    assert_verdict(three, "Fact " + "[1][2][3]" * 3 + "[4].", False)
    ten = grammars(REQUIRED, max_citations_per_sentence=10)
    assert_verdict(ten, "A [1], b [2], c [3], d [4].", True)
    assert_verdict(ten, "Fact " + "".join(f"[{i}]" for i in range(1, 6)) * 2 + ".", True)


# Answers of the ALCE prompt demonstrations (github.com/princeton-nlp/ALCE, prompts/*.json;
# Copyright (c) 2023 Princeton Natural Language Processing, MIT License).
ALCE_ASQA = [
    "Several places on Earth claim to be the most rainy, such as Lloró, Colombia, which "
    "reported an average annual rainfall of 12,717 mm between 1952 and 1989, and López de "
    "Micay, Colombia, which reported an annual 12,892 mm between 1960 and 2012 [3]. However, "
    "the official record is held by Mawsynram, India with an average annual rainfall of 11,872 "
    "mm [3], although nearby town Sohra, India, also known as Cherrapunji, holds the record for "
    "most rain in a calendar month for July 1861 and most rain in a year from August 1860 to "
    "July 1861 [1].",
    "The United States took the first step towards gaining independence from Great Britain "
    "when it declared independence from Great Britain on July 2, 1776 (although the event is "
    "now commemorated on July 4, 1776, the date when the Declaration of Independence was "
    "officially adopted by Congress) [2]. The Treaty of Paris was later signed on September 3, "
    "1783, formally separating the United States from the British Empire [3].",
    "The record for the longest field goal in an NFL game was set by Matt Prater at 64 yards "
    "[1], but the record for the longest field goal at any level was 69 yards, kicked by "
    "collegiate kicker Ove Johansson in a 1976 Abilene Christian University football game "
    "against East Texas State University [2].",
    "In the 1968 film Planet of the Apes, Galen was played by Wright King [2]. And in the tv "
    "series Planet of the Apes, Galen was played by Roddy McDowall [1].",
]
ALCE_ELI5 = [
    "New York City, under Mayor Michael Bloomberg's administration, banned citizens from "
    "donating food directly to homeless shelters because the city could not assess the salt, "
    "fat, and fiber content [1][2][3]. Bloomberg's administration was heavily criticized for "
    "losing their common sense by becoming too focused on what people eat [2].",
    "The main difference between Shia and Sunni Muslim is related to ideological heritage and "
    "issues of leadership [1]. This difference is first formed after the death of the Prophet "
    "Muhammad in 632 A.D. [1][2]. The ideological practice of the Sunni branch strictly follows "
    "Prophet Muhammad and his teachings, while the Shia branch follows Prophet Muhammad's "
    "son-in-law Ali [2]. Nowadays, Sunni and Shia are the major branches of Islam [3].",
    "Bipolar disorder is an emotional disorder that causes extreme mood swings between "
    "excitement and depression [1][3]. The spectrum of mood swing may span from days to months "
    "[1][2]. We are still not certain of the exact factors that cause such disorder, but "
    "genetics is considered a major factor [2][3].",
    "When applying for a mortgage, student loans can affect the debt to income ratio, which is "
    "a key factor in determining the amount that an individual can afford to pay for the "
    "mortgage [1]. While student loan repayments do not appear in an individual's credit "
    "history and do not affect credit scores, lenders do consider the amount of an "
    "individual's student loan repayments when assessing their mortgage application [1][2][3]. "
    "Some 83% of non-homeowners say student loan debt is preventing them from buying a home, "
    "according to the National Association of Realtors [2]. It is important to note that "
    "student loans do not prevent an individual from getting a mortgage [1].",
]
# QAMPARI answers are one list-sentence with a group per item (6 to 11 groups).
ALCE_QAMPARI = [
    "Marazan [1], Stephen Morris [1], Beyond the Black Stump [2], Lonely Road [2], The Chequer "
    "Board [2], In the Wet [2], Trustee from the Toolroom [2], Round the Bend [2], No Highway "
    "[3], Ruined City [3], On the Beach [3].",
    "The Story of Qiu Ju [1], Farewell My Concubine [2], Flirting Scholar [2], The Monkey King "
    "2 [3], Mulan [3], Saturday Fiction [3], Coming Home [3].",
    "2006 [1], 1977 [2], 2004 [3], 2005 [3], 2000 [3], 2006 [3].",
    "So Ends Our Night [1], Heaven with a Barbed Wire Fence [1], Happy Birthday to Me [2], The "
    "Greatest Gift [2], The Gift [2], The Brotherhood of the Bell [3].",
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("answer", ALCE_ASQA + ALCE_ELI5, ids=lambda a: a[:24])
def test_alce_prose_demos(grammars: GetGrammar, answer: str, mode: CitationMode) -> None:
    assert_verdict(grammars(mode), answer, True)


@pytest.mark.parametrize("answer", ALCE_QAMPARI, ids=lambda a: a[:24])
def test_alce_list_demos(grammars: GetGrammar, answer: str) -> None:
    groups = answer.count("[")
    assert_verdict(grammars(AUTO), answer, True)
    assert_verdict(grammars(QUOTES), answer, True)
    # Under REQUIRED one sentence holds at most k groups: the default k=3 rejects them all.
    assert_verdict(grammars(REQUIRED), answer, False)
    assert_verdict(grammars(REQUIRED, max_citations_per_sentence=10), answer, groups <= 10)


# Verdicts the documentation does not settle either way: the engines must agree, and the
# current verdict is pinned so that a change is noticed (and the docs updated).
UNSETTLED = [
    ("[1]", REQUIRED, True),  # a marker-only answer is a "cited sentence"
    ("Fact [1]. [2]", REQUIRED, True),  # ... and so is a marker-only second sentence
    ("It is in the U.S. [1]", REQUIRED, True),  # a break just before the marker
    ("Dr Smith said so [1].", REQUIRED, True),
    ("Wait...[1]", REQUIRED, False),  # an ellipsis needs prose after it, even before a marker
    ("Really?! [1]", REQUIRED, False),  # one terminator before a late marker
    ("Fact [1]. . [2]", REQUIRED, True),  # a late marker after an empty body, like "[1]"
    # A period followed by a comma is not "followed by whitespace", yet no break covers it.
    ("Apples, pears, etc., are fruit [1].", REQUIRED, False),
]


@pytest.mark.parametrize(("text", "mode", "verdict"), UNSETTLED)
def test_unsettled_cases(
    grammars: GetGrammar, text: str, mode: CitationMode, verdict: bool
) -> None:
    assert_verdict(grammars(mode), text, verdict)


# --------------------------------------------------------------------------- (c) bounded

LIMIT = 40  # a small Policy.max_uncited_chars keeps Lark's Earley parser quick


@pytest.mark.parametrize("bounded", [True, False])
def test_uncited_run_bound_required(grammars: GetGrammar, bounded: bool) -> None:
    compiled = grammars(REQUIRED, bounded=bounded, max_uncited_chars=LIMIT)
    run = "w" * (LIMIT - 1) + " "  # the run includes the space before the marker
    assert_verdict(compiled, run + "[1].", True)
    assert_verdict(compiled, "w" + run + "[1].", not bounded)
    # Each run between breaks ("..." is one) is bounded separately, and every sentence has
    # its own budget. (Lark left out: its Earley parser takes seconds on these.)
    assert_verdict(compiled, "a" * LIMIT + "..." + run + "[2].", True, lark=False)
    assert_verdict(compiled, "a" * (LIMIT + 1) + "..." + run + "[2].", not bounded, lark=False)
    assert_verdict(compiled, "a" * LIMIT + "...w" + run + "[2].", not bounded, lark=False)
    assert_verdict(compiled, f"{run}[1]. {run}[2].", True, lark=False)
    assert_verdict(compiled, f"{run}[1]. w{run}[2].", not bounded, lark=False)


@pytest.mark.parametrize("bounded", [True, False])
def test_sentence_break_bound(grammars: GetGrammar, bounded: bool) -> None:
    compiled = grammars(REQUIRED, bounded=bounded, max_uncited_chars=LIMIT)
    assert_verdict(compiled, "v" + "...w" * MAX_SENTENCE_BREAKS + " [1].", True)
    assert_verdict(compiled, "v" + "...w" * (MAX_SENTENCE_BREAKS + 1) + " [1].", not bounded)


@pytest.mark.parametrize("bounded", [True, False])
def test_quotation_bound(grammars: GetGrammar, bounded: bool) -> None:
    compiled = grammars(QUOTES, bounded=bounded, max_uncited_chars=LIMIT)
    assert_verdict(compiled, '"' + "q" * LIMIT + '" [1]', True)
    assert_verdict(compiled, "“" + "q" * LIMIT + "” [1]", True)
    assert_verdict(compiled, '"' + "q" * (LIMIT + 1) + '" [1]', not bounded)
    assert_verdict(compiled, "“" + "q" * (LIMIT + 1) + "” [1]", not bounded)
    # Unquoted prose stays free under QUOTES_ONLY.
    assert_verdict(compiled, "p" * (3 * LIMIT) + " [1]", True)


def test_auto_is_not_bounded(grammars: GetGrammar) -> None:
    compiled = grammars(AUTO, bounded=True, max_uncited_chars=LIMIT)
    assert_verdict(compiled, "p" * (3 * LIMIT) + " [1] " + "p" * (3 * LIMIT), True)


def test_default_bound_in_xgrammar_and_llama_cpp(grammars: GetGrammar) -> None:
    # The default 300-character bound, at full size (Lark left out: it is slow on long runs).
    compiled = grammars(REQUIRED, bounded=True)
    limit = Policy().max_uncited_chars
    runs = ["a" * limit] * MAX_SENTENCE_BREAKS
    assert_verdict(compiled, "w" * (limit - 1) + " [1].", True, lark=False)
    assert_verdict(compiled, "w" * limit + " [1].", False, lark=False)
    assert_verdict(compiled, "...".join([*runs, "b" * (limit - 1) + " "]) + "[1]", True, lark=False)
    assert_verdict(compiled, "...".join([*runs, "a" * limit, "b"]) + " [1]", False, lark=False)


def test_largest_bound_compiles(gbnf_vocab: GbnfVocab) -> None:
    policy = Policy(max_uncited_chars=2000)
    for mode in MODES:
        grammar = citation_grammar(10, policy.model_copy(update={"mode": mode}), bounded=True)
        assert gbnf_vocab.is_valid(emit(grammar, Dialect.GBNF))
        xgrammar_compiled(emit(grammar, Dialect.EBNF))
