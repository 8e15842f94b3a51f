"""The citation grammar: prose with ``[N]`` markers for ``n`` sources under a :class:`Policy`.

Shape under REQUIRED (ADR 0002 records why: each run of prose is one negated character
class under one unbounded repeat, and prose never resumes one or two characters before the
end of a rule; XGrammar's masks then cost ~45 µs/token on SmolLM2's 49k vocabulary, where a
state such as "after ``J.`` of a leading initial, before its space" cost 60-200 ms)::

    root      ::= ws* block (ws+ block)* ws*
    block     ::= heading* bullet? sentence
    heading   ::= bullet? body ":" [ \\t]* "\\n" ws*       # a list intro needs no citation
    bullet    ::= ([-*•] | [0-9]{1,3} ".") " "
    sentence  ::= (body group){0,k-1} body ending
    ending    ::= group closer{0,2} [.!?]?                 # "claim [1]."
                | [.!?] closer{0,2} " "? group             # "claim. [1]", "claim.[1]"
    closer    ::= [)"'”’]
    body      ::= abbrev? seg (break seg | "..." seg1)*
    seg       ::= [^[]\\n\\r.!?]*        seg1 ::= [^[]\\n\\r.!?]+
    break     ::= [0-9] "." [0-9] | "://" [^ \\t\\n\\r[]]* | [A-Z] "." [A-Z] "." | [ (] abbrev
    abbrev    ::= [A-Z] "." | "e.g." | "i.e." | "a.m." | "p.m." | "vs." | "Mr." | "Mrs."
                | "Ms." | "Dr." | "Prof."
    group     ::= cite{1,k}
    cite      ::= "[" source-id "]"
    source-id ::= "1" | "2" | ... | "n"

(``ending`` is written inline in ``sentence``.) The characters and the abbreviation list
come from :mod:`citebacktrack.syntax`, which the decoder's sentence tracker and the
passage splitter share, so all three agree on where a sentence ends.

What the prose may contain:

* ``[`` and ``]`` are reserved for markers; prose cannot contain them (the prompt asks for
  parentheses instead, and square brackets inside source texts are shown to the model as
  parentheses). ``[0]``, ``[01]``, ``[n+1]``, ``[1, 2]`` and ``[1-3]`` cannot be written;
  several sources are ``[1][2]``.
* Under REQUIRED a sentence ends at ``.``, ``!`` or ``?`` followed by whitespace, or at the
  end of a line, and must carry a citation: either before its terminator
  (``... in 1889 [1].``) or right after it, with at most one space (``... in 1889. [1]``,
  ``... in 1889.[1]``, ``... he said." [2]``), the way small models and Wikipedia write it.
  These do not end a sentence: a decimal point between digits (``3.5``, ``12.34.56``; not
  two points one digit apart, as in ``1.2.3``, because each point takes the digits on both
  sides of it), a URL with a scheme (``https://example.com/a?b=c``, which runs from ``://``
  to the next whitespace), two dotted capitals (``U.S.``, ``A.D.``, ``J.K.``), a single
  capital initial (``J. K. Rowling``) or a listed abbreviation (``e.g.``, ``Dr.``) at the
  start of a sentence or after a space or ``(``, and one ellipsis ``...`` with prose after
  it. Any other period and space ends the sentence, so ``etc. and`` or ``No. 5`` need a
  citation before the period. Small models use every escape hatch to avoid citing: a
  generic lower-case ``x.y.`` break gave ``Affairs.s. The``, so the abbreviations are a
  short literal list and must start a word (``cause.g.`` is refused); ellipsis chains
  (``City.........``) are refused; ``energy.chlorophyll`` and bare domains like
  ``example.com`` are not allowed.
* A line ending in ``:`` introduces a list and needs no citation.
* The ramble bound (``policy.max_uncited_chars``) is enforced by the decoder's token filter
  on token-level backends. ``bounded=True`` also writes it into the grammar, for engines we
  cannot filter (a llama.cpp server, hosted APIs): each run of prose between breaks is then
  at most that many characters and a sentence has at most :data:`MAX_SENTENCE_BREAKS` breaks.
* Under QUOTES_ONLY a ``"..."`` or ``“...”`` quotation must be followed (after at most one
  space) by a citation group; other prose may go uncited.

A server restarts the grammar when it continues an accepted prefix (llama.cpp, vLLM), so
:func:`continuation_grammar` gives "the rest of the answer from here": it runs this grammar
over the prefix and prints what may still follow as IR over the same rules (the group's
remaining markers, the sentence's remaining ``body group`` pairs, every reading of an
ambiguous prefix), with the open marker's ids narrowed on request.
"""

from __future__ import annotations

from citebacktrack.errors import InvalidSourcesError
from citebacktrack.grammar.ir import (
    Grammar,
    Node,
    char_class,
    choice,
    lit,
    ref,
    repeat,
    seq,
)
from citebacktrack.syntax import (
    ABBREVIATION_LEADS,
    ABBREVIATIONS,
    CLOSERS,
    ELLIPSIS,
    RESERVED,
    TERMINATORS,
    WHITESPACE,
)
from citebacktrack.types import CitationMode, Policy

__all__ = ["MAX_SENTENCE_BREAKS", "MAX_SOURCES", "citation_grammar"]

MAX_SOURCES = 500
"""Most sources one grammar (and one prompt) supports."""

MAX_SENTENCE_BREAKS = 8
"""Most sentence-internal breaks in one sentence when the bound is in the grammar."""


def _id_rule(n_sources: int) -> Node:
    return choice(*(lit(str(i)) for i in range(1, n_sources + 1)))


def _citation_rules(n_sources: int, policy: Policy) -> list[tuple[str, Node]]:
    return [
        ("group", repeat(ref("cite"), 1, policy.max_citations_per_sentence)),
        ("cite", seq(lit("["), ref("source-id"), lit("]"))),
        ("source-id", _id_rule(n_sources)),
    ]


def _prose(policy: Policy, bounded: bool, exclude: str, *, min_chars: int = 0) -> Node:
    """A run of prose: one negated char class under one repeat (bounded on request)."""
    limit = policy.max_uncited_chars if bounded else None
    return repeat(char_class(exclude, negated=True), min_chars, limit)


def _required(policy: Policy, bounded: bool) -> list[tuple[str, Node]]:
    k = policy.max_citations_per_sentence
    ws = char_class(WHITESPACE)
    seg = _prose(policy, bounded, RESERVED + "\n\r" + TERMINATORS)
    # After an ellipsis at least one character of prose: "......" is not an ellipsis.
    after_ellipsis = _prose(policy, bounded, RESERVED + "\n\r" + TERMINATORS, min_chars=1)
    upper = char_class(ranges=(("A", "Z"),))
    digit = char_class(ranges=(("0", "9"),))
    url = repeat(char_class(WHITESPACE + RESERVED, negated=True))
    closers = repeat(char_class(CLOSERS), 0, 2)
    terminator = char_class(TERMINATORS)
    # The end of a sentence: its last group then closers and a terminator ("claim [1]."),
    # or a terminator and closers then the group ("claim. [1]", "claim.[1]", 'a." [2]').
    ending = choice(
        seq(ref("group"), closers, repeat(terminator, 0, 1)),
        seq(terminator, closers, repeat(lit(" "), 0, 1), ref("group")),
    )
    pairs = [repeat(seq(ref("body"), ref("group")), 0, k - 1)] if k > 1 else []
    return [
        (
            "root",
            seq(repeat(ws), ref("block"), repeat(seq(repeat(ws, 1), ref("block"))), repeat(ws)),
        ),
        ("block", seq(repeat(ref("heading")), repeat(ref("bullet"), 0, 1), ref("sentence"))),
        (
            "heading",
            seq(
                repeat(ref("bullet"), 0, 1),
                ref("body"),
                lit(":"),
                repeat(char_class(" \t")),
                lit("\n"),
                repeat(ws),
            ),
        ),
        (
            "bullet",
            seq(choice(char_class("-*\u2022"), seq(repeat(digit, 1, 3), lit("."))), lit(" ")),
        ),
        ("sentence", seq(*pairs, ref("body"), ending)),
        (
            "body",
            seq(
                repeat(ref("abbrev"), 0, 1),
                seg,
                repeat(
                    choice(seq(ref("break"), seg), seq(lit(ELLIPSIS), after_ellipsis)),
                    0,
                    MAX_SENTENCE_BREAKS if bounded else None,
                ),
            ),
        ),
        (
            "break",
            choice(
                seq(digit, lit("."), digit),
                seq(lit("://"), url),
                seq(upper, lit("."), upper, lit(".")),
                seq(char_class(ABBREVIATION_LEADS), ref("abbrev")),
            ),
        ),
        ("abbrev", choice(seq(upper, lit(".")), *(lit(a) for a in ABBREVIATIONS))),
    ]


def _auto() -> list[tuple[str, Node]]:
    text = repeat(char_class(RESERVED, negated=True))
    return [
        (
            "root",
            seq(
                repeat(char_class(WHITESPACE)),
                choice(char_class(RESERVED + WHITESPACE, negated=True), ref("group")),
                ref("text"),
                repeat(seq(ref("group"), ref("text"))),
            ),
        ),
        ("text", text),
    ]


def _quotes_only(policy: Policy, bounded: bool) -> list[tuple[str, Node]]:
    quoted = ref("quoted")
    straight = seq(lit('"'), _prose(policy, bounded, RESERVED + '"\n', min_chars=1), lit('"'))
    curly = seq(lit("“"), _prose(policy, bounded, RESERVED + "”\n", min_chars=1), lit("”"))
    return [
        (
            "root",
            seq(
                repeat(char_class(WHITESPACE)),
                choice(
                    char_class(RESERVED + WHITESPACE + '"“”', negated=True), quoted, ref("group")
                ),
                ref("text"),
                repeat(seq(choice(quoted, ref("group")), ref("text"))),
            ),
        ),
        ("text", repeat(char_class(RESERVED + '"“”', negated=True))),
        ("quoted", seq(choice(straight, curly), repeat(lit(" "), 0, 1), ref("group"))),
    ]


def citation_grammar(
    n_sources: int, policy: Policy | None = None, *, bounded: bool = False
) -> Grammar:
    """Build the citation grammar for ``n_sources`` numbered sources under ``policy``.

    Args:
        n_sources: how many sources the answer may cite; ids are ``1..n_sources``.
        policy: the citation policy (default: REQUIRED, at most 3 per sentence).
        bounded: also bound uncited prose in the grammar itself (for engines whose
            decoding we do not control); costs mask speed on XGrammar.

    Raises:
        InvalidSourcesError: ``n_sources`` is below 1 or above :data:`MAX_SOURCES`.
    """
    policy = policy or Policy()
    if not 1 <= n_sources <= MAX_SOURCES:
        raise InvalidSourcesError(
            f"a citation grammar needs between 1 and {MAX_SOURCES} sources, got {n_sources}; "
            "retrieve fewer passages (or pass at least one source)"
        )
    match policy.mode:
        case CitationMode.REQUIRED:
            rules = _required(policy, bounded)
        case CitationMode.AUTO:
            rules = _auto()
        case CitationMode.QUOTES_ONLY:
            rules = _quotes_only(policy, bounded)
    return Grammar(tuple(rules + _citation_rules(n_sources, policy)))
