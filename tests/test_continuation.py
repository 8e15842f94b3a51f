"""``continuation_grammar``: the rest of an answer from an accepted prefix, in every dialect.

The oracle is the full grammar itself, run by XGrammar: for a prefix ``p`` at a supported
point, ``s`` must be accepted by the continuation exactly when ``p + s`` is accepted by the
full grammar (with the open marker's id from ``allowed_ids``). Answers and suffixes come
from random walks of XGrammar's matcher over a small vocabulary of answer pieces (every
string a walk ends is in the walked grammar's language), drawn by Hypothesis so that a
failure shrinks; mutated suffixes probe the other side of the boundary. A hand corpus is
checked in all three engines (XGrammar, llama.cpp's GBNF sampler, Lark).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import pytest
import xgrammar as xgr
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from citebacktrack.errors import GrammarError, InvalidSourcesError
from citebacktrack.grammar import continuation_grammar as exported
from citebacktrack.grammar._continuation import _derivation, continuation_grammar
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.grammar.ir import Grammar
from citebacktrack.types import CitationMode, Policy
from grammar_engines import (
    GbnfVocab,
    compile_all,
    lark_accepts,
    lark_parser,
    xgrammar_accepts,
    xgrammar_compiled,
)

REQUIRED, AUTO, QUOTES = CitationMode.REQUIRED, CitationMode.AUTO, CitationMode.QUOTES_ONLY
MODES = list(CitationMode)
LIMIT = 20  # Policy.max_uncited_chars: small, so that short walks reach the bound

# Pieces of answers: prose, every kind of break, terminators, closers, quotes, markers (ids
# up to 12 from digits), headings and bullets.
VOCAB = [
    "<eos>",
    *("a", "Bo", " ", "  ", ",", "\n", "\t", "é", "(", ":", "-", "•", "1. ", "3.5", "J"),
    *("U", "e.g.", "Dr.", "://x", "...", ".", "!", "?", ")", '"', "“", "”", "’", "'"),
    *("[", "]", " [", "].", "1", "2", "3", "0", "[1]", "[2]", "[12]"),
]
EOS = 0
# What a walk that ran long takes to finish: close a marker or a quotation, cite, write.
FINISH = ["]", "1", '"', "”", "[1]", "a", "[", "\n"]


def policy(mode: CitationMode, k: int) -> Policy:
    return Policy(mode=mode, max_citations_per_sentence=k, max_uncited_chars=LIMIT)


@functools.cache
def _tokenizer() -> xgr.TokenizerInfo:
    return xgr.TokenizerInfo(VOCAB, xgr.VocabType.RAW, stop_token_ids=[EOS])


@functools.cache
def _token_compiler() -> xgr.GrammarCompiler:
    return xgr.GrammarCompiler(_tokenizer(), cache_enabled=False)


def token_compiled(grammar: Grammar) -> xgr.CompiledGrammar:
    return _token_compiler().compile_grammar(emit(grammar, Dialect.EBNF))


@functools.cache
def full_tokens(n: int, p: Policy, bounded: bool) -> xgr.CompiledGrammar:
    return token_compiled(citation_grammar(n, p, bounded=bounded))


@functools.cache
def full_chars(n: int, p: Policy, bounded: bool) -> xgr.CompiledGrammar:
    return xgrammar_compiled(emit(citation_grammar(n, p, bounded=bounded), Dialect.EBNF))


def allowed_tokens(matcher: xgr.GrammarMatcher) -> list[int]:
    bitmask = xgr.allocate_token_bitmask(1, len(VOCAB))
    matcher.fill_next_token_bitmask(bitmask)
    words = bitmask[0].tolist()
    return [i for i in range(len(VOCAB)) if words[i // 32] >> (i % 32) & 1]


def walk(
    draw: Callable[[st.SearchStrategy[Any]], Any],
    compiled: xgr.CompiledGrammar,
    prefix: str = "",
    steps: int = 30,
) -> str | None:
    """A string the grammar accepts after ``prefix``, token by token (None: gave up)."""
    matcher = xgr.GrammarMatcher(compiled)
    if prefix and not matcher.accept_string(prefix):
        raise AssertionError(f"the walked grammar refuses its own prefix {prefix!r}")
    out: list[str] = []
    for step in range(steps + len(FINISH) * 2):
        options = allowed_tokens(matcher)
        if EOS in options and (step >= steps or draw(st.integers(0, 7)) == 0):
            return "".join(out)
        tokens = [t for t in options if t != EOS]
        if not tokens:
            return None
        if step < steps:
            token = tokens[draw(st.integers(0, len(tokens) - 1))]
        else:  # running long: steer towards an end
            preferred = [VOCAB.index(piece) for piece in FINISH]
            token = next((t for t in preferred if t in tokens), tokens[0])
        assert matcher.accept_token(token)
        out.append(VOCAB[token])
    return None


def mutate(draw: Callable[[st.SearchStrategy[Any]], Any], text: str) -> str:
    """``text`` with one vocabulary piece inserted, or one character deleted or replaced."""
    where = draw(st.integers(0, len(text)))
    piece = draw(st.sampled_from(VOCAB[1:]))
    match draw(st.sampled_from(["insert", "delete", "replace"])) if text else "insert":
        case "insert":
            return text[:where] + piece + text[where:]
        case "delete":
            where = min(where, len(text) - 1)
            return text[:where] + text[where + 1 :]
        case _:
            where = min(where, len(text) - 1)
            return text[:where] + piece + text[where + 1 :]


# The supported continuation points, written out independently of the implementation.
_CLOSE = "\\)\"'\u201d\u2019"
_REQUIRED_END = re.compile(rf"\](?:[{_CLOSE}]{{0,2}}[.!?])?\s*\Z|\][{_CLOSE}]{{1,2}}\s+\Z")


def inside_marker(head: str) -> bool:
    return head.rfind("[") > head.rfind("]") and not head.endswith("[")


def is_point(mode: CitationMode, head: str) -> bool:
    if not head.strip() or head.endswith(("[", "]")):
        return True
    if inside_marker(head):
        return False
    return mode is not REQUIRED or bool(_REQUIRED_END.search(head))


def marker_id(suffix: str) -> int | None:
    """The id a suffix after ``[`` writes, if it closes the marker."""
    match = re.match(r"([0-9]+)\]", suffix)
    return int(match.group(1)) if match else None


def expected(
    n: int, p: Policy, bounded: bool, head: str, suffix: str, allowed: set[int] | None
) -> bool:
    """The full grammar's verdict on ``head + suffix`` (the open marker's id in ``allowed``)."""
    verdict = xgrammar_accepts(full_chars(n, p, bounded), head + suffix)
    if allowed is not None and verdict:
        return marker_id(suffix) in allowed
    return verdict


SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
configs = pytest.mark.parametrize(
    ("mode", "bounded"), [(m, b) for m in MODES for b in (False, True)], ids=str
)
sizes = st.tuples(st.sampled_from([1, 2, 3, 5, 9, 10, 12]), st.integers(1, 3))


# --------------------------------------------------------------------------- (a) true suffixes


@configs
@SETTINGS
@given(data=st.data(), size=sizes)
def test_true_suffix_at_every_supported_point(
    data: Any, size: tuple[int, int], mode: CitationMode, bounded: bool
) -> None:
    n, k = size
    p = policy(mode, k)
    answer = walk(data.draw, full_tokens(n, p, bounded))
    assume(answer is not None)
    assert answer is not None
    points = [i for i in range(len(answer) + 1) if is_point(mode, answer[:i])]
    if mode is not REQUIRED and len(points) > 8:  # every outside-marker point: sample
        points = [points[0], *data.draw(st.lists(st.sampled_from(points), max_size=7))]
    for cut in points:
        head, rest = answer[:cut], answer[cut:]
        grammar = continuation_grammar(n, p, head, bounded=bounded)
        assert xgrammar_accepts(xgrammar_compiled(emit(grammar, Dialect.EBNF)), rest), (
            f"the continuation after {head!r} refuses the true suffix {rest!r}:\n"
            + emit(grammar, Dialect.EBNF)
        )
        true_id = marker_id(rest) if head.endswith("[") else None
        if true_id is not None:
            others = sorted(set(range(1, n + 1)) - {true_id})
            with_it = {true_id} | (data.draw(st.sets(st.sampled_from(others))) if others else set())
            banned = continuation_grammar(n, p, head, allowed_ids=with_it, bounded=bounded)
            assert xgrammar_accepts(xgrammar_compiled(emit(banned, Dialect.EBNF)), rest)
            if others:
                without = data.draw(st.sets(st.sampled_from(others), min_size=1))
                banned = continuation_grammar(n, p, head, allowed_ids=without, bounded=bounded)
                assert not xgrammar_accepts(xgrammar_compiled(emit(banned, Dialect.EBNF)), rest)


@SETTINGS
@given(data=st.data(), size=sizes, bounded=st.booleans())
def test_other_required_points_raise(data: Any, size: tuple[int, int], bounded: bool) -> None:
    n, k = size
    p = policy(REQUIRED, k)
    answer = walk(data.draw, full_tokens(n, p, bounded))
    assume(answer is not None)
    assert answer is not None
    for cut in range(len(answer) + 1):
        if not is_point(REQUIRED, answer[:cut]):
            with pytest.raises(GrammarError, match=r"inside the marker|mid-sentence"):
                continuation_grammar(n, p, answer[:cut], bounded=bounded)


# --------------------------------------------------------------------------- (b) both ways


@configs
@SETTINGS
@given(data=st.data(), size=sizes)
def test_continuation_is_exactly_the_rest(
    data: Any, size: tuple[int, int], mode: CitationMode, bounded: bool
) -> None:
    n, k = size
    p = policy(mode, k)
    answer = walk(data.draw, full_tokens(n, p, bounded), steps=20)
    assume(answer is not None)
    assert answer is not None
    points = [i for i in range(len(answer) + 1) if is_point(mode, answer[:i])]
    head = answer[: data.draw(st.sampled_from(points))]
    allowed: set[int] | None = None
    if head.endswith("[") and data.draw(st.booleans()):
        allowed = data.draw(st.sets(st.integers(1, n), min_size=1))
    grammar = continuation_grammar(n, p, head, allowed_ids=allowed, bounded=bounded)
    continuation = token_compiled(grammar)
    chars = xgrammar_compiled(emit(grammar, Dialect.EBNF))
    # What the continuation generates, the full grammar takes after the prefix ...
    own = walk(data.draw, continuation)
    if own is not None:
        assert expected(n, p, bounded, head, own, allowed), (head, own)
    # ... and what the full grammar generates after the prefix, the continuation takes
    # (unless its id is banned).
    theirs = walk(data.draw, full_tokens(n, p, bounded), prefix=head)
    if theirs is not None:
        verdict = xgrammar_accepts(chars, theirs)
        assert verdict is (allowed is None or marker_id(theirs) in allowed), (head, theirs)
    # Near misses on either side of the boundary get the full grammar's verdict.
    for suffix in (own, theirs):
        if suffix is not None:
            near = mutate(data.draw, suffix)
            assert xgrammar_accepts(chars, near) is expected(n, p, bounded, head, near, allowed), (
                f"{head!r} + {near!r}:\n" + emit(grammar, Dialect.EBNF)
            )


# --------------------------------------------------------------------------- (c) dialects

CORPUS = {
    REQUIRED: [
        "Water boils at 100 C [1]. Pi is about 3.14 [2][3]!",
        "J. K. Rowling wrote, e.g. in the U.S. [1], many books [2].",
        "See https://example.com/a?b=c for more. [3] Wait... there is more [1]",
        "Key points:\n- Apples are red [1].\n1. Bananas, he said \u201cyes\u201d [2].\n\nEnd [3]",
        '(An aside, really [2]). He said "no." [1]\n  Dr. Smith agreed [3][1]  ',
        "It is in the U.S. [1] And more. [2]",
    ],
    AUTO: [
        "Water boils [1][2] at 100 C. More prose, uncited.\n\nEnd [3]",
        "  [2] first, then text ",
    ],
    QUOTES: [
        'He said "hello" [1] and \u201cbye\u201d[2]. Free prose [3].',
        'Plain prose, "quoted." [2]\n"two" [1][3]',
    ],
}


def corpus_points() -> list[object]:
    params: list[object] = []
    for mode, answers in CORPUS.items():
        for index, answer in enumerate(answers):
            cuts = [i for i in range(len(answer) + 1) if is_point(mode, answer[:i])]
            params.append(pytest.param(mode, answer, cuts, id=f"{mode.value}-{index}"))
    return params


def in_every_engine(grammar: Grammar, gbnf_vocab: GbnfVocab, lark: bool) -> Callable[[str], bool]:
    """The engines' common verdict on a string (XGrammar, llama.cpp, and Lark if ``lark``)."""
    if lark:
        return compile_all(grammar, gbnf_vocab).agreed  # loads EBNF, GBNF and Lark
    gbnf = emit(grammar, Dialect.GBNF)
    assert gbnf_vocab.is_valid(gbnf), f"llama.cpp rejected the GBNF:\n{gbnf}"
    compiled = xgrammar_compiled(emit(grammar, Dialect.EBNF))

    def agreed(text: str) -> bool:
        verdicts = {xgrammar_accepts(compiled, text), gbnf_vocab.accepts(gbnf, text)}
        assert len(verdicts) == 1, f"engines disagree on {text!r}:\n{gbnf}"
        return verdicts.pop()

    return agreed


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize(("mode", "answer", "cuts"), corpus_points())
def test_corpus_in_every_engine(
    gbnf_vocab: GbnfVocab, mode: CitationMode, answer: str, cuts: list[int], bounded: bool
) -> None:
    p = Policy(mode=mode, max_uncited_chars=80)
    n = 3
    assert xgrammar_accepts(full_chars(n, p, bounded), answer)
    if mode is not REQUIRED:  # every point outside a marker: the ends of words will do
        cuts = [c for c in cuts if c == len(answer) or not answer[c].isalnum()]
    # Lark takes tens of seconds to load the bounded REQUIRED grammar, the full one as much
    # as its continuations (test_bounded_required_loads_in_lark loads one).
    lark = not (bounded and mode is REQUIRED)
    for cut in cuts:
        head, rest = answer[:cut], answer[cut:]
        allowed = {marker_id(rest) or 1, 3} if head.endswith("[") else None
        grammar = continuation_grammar(n, p, head, allowed_ids=allowed, bounded=bounded)
        verdict = in_every_engine(grammar, gbnf_vocab, lark)
        assert verdict(rest), f"{head!r} + {rest!r}"
        for near in dict.fromkeys([rest[1:], rest[:-1], "]" + rest, "[" + rest, "2]" + rest]):
            assert verdict(near) is expected(n, p, bounded, head, near, allowed), (head, near)


def test_bounded_required_loads_in_lark() -> None:
    p = Policy(max_citations_per_sentence=2, max_uncited_chars=LIMIT)
    grammar = continuation_grammar(3, p, "A [1], b [", allowed_ids={2}, bounded=True)
    parser = lark_parser(emit(grammar, Dialect.LARK))
    assert lark_accepts(parser, "2].")
    assert not lark_accepts(parser, "1].")


# --------------------------------------------------------------------------- (d) states


def accepts(grammar: Grammar, text: str) -> bool:
    return xgrammar_accepts(xgrammar_compiled(emit(grammar, Dialect.EBNF)), text)


def test_exported_from_the_grammar_package() -> None:
    assert exported is continuation_grammar


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prefix", ["", " ", "\n\t "])
def test_empty_prefix_is_the_full_grammar(mode: CitationMode, prefix: str) -> None:
    grammar = continuation_grammar(5, Policy(mode=mode), prefix)
    if not prefix:
        assert emit(grammar, Dialect.EBNF) == emit(citation_grammar(5, Policy(mode=mode)), "ebnf")
    for text in ["Fact [1].", "Fact.", "", " ", "[1]", 'He said "hi" [2]', "x [6]."]:
        assert accepts(grammar, text) is xgrammar_accepts(
            full_chars(5, Policy(mode=mode), False), prefix + text
        ), text


def test_cites_left_in_the_group_and_groups_left_in_the_sentence() -> None:
    two = Policy(max_citations_per_sentence=2)
    grammar = continuation_grammar(5, two, "A [1], b [")
    assert accepts(grammar, "2].")
    assert accepts(grammar, "2][3].")  # the group takes k markers
    assert not accepts(grammar, "2][3][4].")
    assert not accepts(grammar, "2], c [3].")  # k groups in the sentence already
    assert accepts(grammar, "2]. C [3].")
    grammar = continuation_grammar(5, two, "A [1][")
    # k groups of k in a row, as the full grammar takes them (KNOWN_DISCREPANCIES), no more.
    assert accepts(grammar, "2][3][4].")
    assert not accepts(grammar, "2][3][4][5].")
    one = Policy(max_citations_per_sentence=1)
    with pytest.raises(GrammarError, match="refuses the prefix"):
        continuation_grammar(5, one, "Fact [1][")
    assert not accepts(continuation_grammar(5, one, "Fact [1]"), ", more [2].")


def test_a_group_after_the_terminator_ends_the_sentence() -> None:
    grammar = continuation_grammar(5, Policy(), "He won. [1]")
    assert accepts(grammar, "")
    assert accepts(grammar, "[2] She lost [3].")
    assert accepts(grammar, " and more [2].")  # a new sentence
    assert not accepts(grammar, ".")  # no "claim. [1]."
    assert not accepts(grammar, "[2][3][4]")  # the group had room for two more
    assert not accepts(grammar, "[2]and more [3].")  # words after it need whitespace first


def test_ambiguous_prefix_keeps_every_reading() -> None:
    grammar = continuation_grammar(5, Policy(), "claim [1]")
    assert accepts(grammar, ".")  # the group ended the sentence
    assert accepts(grammar, " and more [2].")  # ... or only a part of it
    assert accepts(grammar, "\nNext [2].")


def test_allowed_ids_bind_this_marker_only() -> None:
    p = Policy(max_citations_per_sentence=2)
    grammar = continuation_grammar(12, p, "A [", allowed_ids={2, 11})
    assert accepts(grammar, "2], b [1].")
    assert accepts(grammar, "11][1].")
    assert not accepts(grammar, "1], b [2].")
    assert not accepts(grammar, "12].")
    assert not accepts(grammar, "].")


def test_bounded_continuation_counts_the_prose() -> None:
    p = Policy(max_uncited_chars=LIMIT)
    grammar = continuation_grammar(5, p, "Fact [1]. ", bounded=True)
    assert accepts(grammar, "w" * (LIMIT - 1) + " [2].")
    assert not accepts(grammar, "w" * LIMIT + " [2].")
    assert accepts(continuation_grammar(5, p, "Fact [1]. ", bounded=False), "w" * 99 + " [2].")
    quotes = Policy(mode=QUOTES, max_uncited_chars=LIMIT)
    grammar = continuation_grammar(5, quotes, '"' + "q" * (LIMIT - 2), bounded=True)
    assert accepts(grammar, 'qq" [1]')
    assert not accepts(grammar, 'qqq" [1]')


def test_resumed_reading_matches_a_fresh_one() -> None:
    p = Policy()
    long = "Water boils at 3.5 C, e.g. in J. K. Rowling's U.S. house [1]. " * 20
    _derivation.cache_clear()
    fresh = continuation_grammar(12, p, long + "More [1]", bounded=True)
    continuation_grammar(12, p, long, bounded=True)
    continuation_grammar(12, p, long + "More [", bounded=True)
    assert continuation_grammar(12, p, long + "More [1]", bounded=True) == fresh
    _derivation.cache_clear()
    assert continuation_grammar(12, p, long + "More [1]", bounded=True) == fresh


# --------------------------------------------------------------------------- (e) refusals


@pytest.mark.parametrize(
    ("mode", "prefix", "message"),
    [
        (REQUIRED, "Fact ab", "mid-sentence"),
        (REQUIRED, "Fact [1] and", "mid-sentence"),
        (REQUIRED, "Fact [1]. Then", "mid-sentence"),
        (REQUIRED, "Key points:", "mid-sentence"),
        (REQUIRED, "Fact [1", "inside the marker"),
        (AUTO, "Fact [12", "inside the marker"),
        (QUOTES, '"a" [', None),
        (REQUIRED, "Fact [6]", "refuses the prefix at character 6"),
        (REQUIRED, "Fact [1]]", "refuses the prefix"),
        (REQUIRED, "x[0] [", "refuses the prefix"),
        (REQUIRED, "He won. [1].", "refuses the prefix"),
        (AUTO, "Fact ] here", "refuses the prefix"),
        (QUOTES, '"a" b [', "refuses the prefix"),
        (QUOTES, '"a" b', "refuses the prefix"),
    ],
)
def test_unsupported_or_refused_prefixes_raise(
    mode: CitationMode, prefix: str, message: str | None
) -> None:
    if message is None:  # a supported point, for contrast
        continuation_grammar(5, Policy(mode=mode), prefix)
        return
    with pytest.raises(GrammarError, match=re.escape(message)):
        continuation_grammar(5, Policy(mode=mode), prefix)


def test_allowed_ids_misuse_raises() -> None:
    with pytest.raises(GrammarError, match="no id allowed"):
        continuation_grammar(5, None, "Fact [", allowed_ids=set())
    with pytest.raises(GrammarError, match=r"\[0, 6\] are outside the source ids 1..5"):
        continuation_grammar(5, None, "Fact [", allowed_ids={0, 1, 6})
    with pytest.raises(GrammarError, match="allowed_ids applies to an open marker"):
        continuation_grammar(5, None, "Fact [1]", allowed_ids={1})
    with pytest.raises(InvalidSourcesError, match="between 1 and"):
        continuation_grammar(0, None, "Fact [")
