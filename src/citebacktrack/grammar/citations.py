"""The citation grammar: prose with ``[N]`` markers for ``n`` sources under a :class:`Policy`.

Shape under REQUIRED (ADR 0002 records why: each run of prose is one negated character
class under one unbounded repeat, which keeps XGrammar's masks at ~16 µs/token on a 49k
vocabulary; a bounded class repeat made every token context-dependent, ~7 ms/token)::

    root      ::= ws* block (ws+ block)* ws*
    block     ::= heading* bullet? sentence
    heading   ::= bullet? body ":" [ \\t]* "\\n" ws*       # a list intro needs no citation
    bullet    ::= ([-*•] | [0-9]{1,3} ".") " "
    sentence  ::= (body group){1,k} [)"'”’]{0,2} [.!?]?
    body      ::= ([A-Z] ". "){0,3} seg (break seg)*         # leading initials: "J. K. Rowling"
    seg       ::= [^[]\\n\\r.!?]*
    break     ::= [0-9] "." [0-9] | "://" [^ \\t\\n\\r[]]*
                | [a-z] "." [a-z] ". " | [A-Z] "." [A-Z] "." | " " [A-Z] "." | "..."
    group     ::= cite{1,k}
    cite      ::= "[" source-id "]"
    source-id ::= "1" | "2" | ... | "n"

What the prose may contain:

* ``[`` and ``]`` are reserved for markers; prose cannot contain them (the prompt asks for
  parentheses instead, and square brackets inside source texts are shown to the model as
  parentheses). ``[0]``, ``[01]``, ``[n+1]``, ``[1, 2]`` and ``[1-3]`` cannot be written;
  several sources are ``[1][2]``.
* Under REQUIRED a sentence ends at ``.``, ``!`` or ``?`` followed by whitespace, or at the
  end of a line, and must carry a citation before it ends; its period comes after the
  citation (``... in 1889 [1].``). These do not end a sentence: a decimal point between
  digits (``3.5``, ``12.34.56``; not two points one digit apart, as in ``1.2.3``, because
  each point takes the digits on both sides of it), a URL with a scheme
  (``https://example.com/a?b=c``, which runs from ``://`` to the next whitespace), a
  two-letter dotted abbreviation (``e.g.``, ``i.e.``, ``a.m.``, ``U.S.``, ``A.D.``), a
  single capital initial after a space or at the start (``J. K. Rowling``), and an
  ellipsis. Any other period and space ends the sentence,
  so ``Dr. Smith`` or ``etc. and`` need a citation before the period. (A small model given
  a lower-case escape hatch used it to avoid citing, run-on after run-on; for the same
  reason ``energy.chlorophyll`` and bare domains like ``example.com`` are not allowed, and a
  literal alternative such as ``"www."`` made masks 15x slower.)
* A line ending in ``:`` introduces a list and needs no citation.
* The ramble bound (``policy.max_uncited_chars``) is enforced by the decoder's token filter
  on token-level backends. ``bounded=True`` also writes it into the grammar, for engines we
  cannot filter (a llama.cpp server, hosted APIs): each run of prose between breaks is then
  at most that many characters and a sentence has at most :data:`MAX_SENTENCE_BREAKS` breaks.
* Under QUOTES_ONLY a ``"..."`` or ``“...”`` quotation must be followed (after at most one
  space) by a citation group; other prose may go uncited.
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
from citebacktrack.types import CitationMode, Policy

__all__ = ["MAX_SENTENCE_BREAKS", "MAX_SOURCES", "citation_grammar"]

MAX_SOURCES = 500
"""Most sources one grammar (and one prompt) supports."""

MAX_SENTENCE_BREAKS = 8
"""Most sentence-internal breaks in one sentence when the bound is in the grammar."""

_WS = " \t\n\r"
_TERMINATORS = ".!?"
_BRACKETS = "[]"


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
    ws = char_class(_WS)
    seg = _prose(policy, bounded, _BRACKETS + "\n\r" + _TERMINATORS)
    lower = char_class(ranges=(("a", "z"),))
    upper = char_class(ranges=(("A", "Z"),))
    digit = char_class(ranges=(("0", "9"),))
    url = repeat(char_class(_WS + _BRACKETS, negated=True))
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
            seq(
                choice(
                    char_class("-*•"), seq(repeat(char_class(ranges=(("0", "9"),)), 1, 3), lit("."))
                ),
                lit(" "),
            ),
        ),
        (
            "sentence",
            seq(
                repeat(seq(ref("body"), ref("group")), 1, k),
                repeat(char_class(")\"'”’"), 0, 2),
                repeat(char_class(_TERMINATORS), 0, 1),
            ),
        ),
        (
            "body",
            seq(
                repeat(seq(char_class(ranges=(("A", "Z"),)), lit(". ")), 0, 3),
                seg,
                repeat(seq(ref("break"), seg), 0, MAX_SENTENCE_BREAKS if bounded else None),
            ),
        ),
        (
            "break",
            choice(
                seq(digit, lit("."), digit),
                seq(lit("://"), url),
                seq(lower, lit("."), lower, lit(". ")),
                seq(upper, lit("."), upper, lit(".")),
                seq(lit(" "), char_class(ranges=(("A", "Z"),)), lit(".")),
                lit("..."),
            ),
        ),
    ]


def _auto() -> list[tuple[str, Node]]:
    text = repeat(char_class(_BRACKETS, negated=True))
    return [
        (
            "root",
            seq(
                repeat(char_class(_WS)),
                choice(char_class(_BRACKETS + _WS, negated=True), ref("group")),
                ref("text"),
                repeat(seq(ref("group"), ref("text"))),
            ),
        ),
        ("text", text),
    ]


def _quotes_only(policy: Policy, bounded: bool) -> list[tuple[str, Node]]:
    quoted = ref("quoted")
    straight = seq(lit('"'), _prose(policy, bounded, _BRACKETS + '"\n', min_chars=1), lit('"'))
    curly = seq(lit("“"), _prose(policy, bounded, _BRACKETS + "”\n", min_chars=1), lit("”"))
    return [
        (
            "root",
            seq(
                repeat(char_class(_WS)),
                choice(char_class(_BRACKETS + _WS + '"“”', negated=True), quoted, ref("group")),
                ref("text"),
                repeat(seq(choice(quoted, ref("group")), ref("text"))),
            ),
        ),
        ("text", repeat(char_class(_BRACKETS + '"“”', negated=True))),
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
