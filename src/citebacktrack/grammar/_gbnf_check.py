"""Checking a grammar's text before an engine is sent it: the GBNF checker, and XGrammar.

An invalid GBNF grammar crashed llama-cpp-python's server, and a grammar a server cannot
parse is an HTTP error at best, so every grammar an engine sends is parsed first
(:func:`check_grammar_text`): GBNF by llama.cpp's own parser when ``llama_cpp`` is
installed, else by a structural check (rules, names, brackets, repetition bounds:
:func:`check_gbnf_structure`); XGrammar EBNF and Lark by XGrammar, as vLLM's xgrammar
backend parses them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from citebacktrack.errors import BackendError, GrammarError, MissingDependencyError
from citebacktrack.grammar.emit import Dialect

__all__ = ["check_gbnf_structure", "check_grammar_text"]


def check_grammar_text(text: str, dialect: Dialect | str) -> None:
    """Parse grammar ``text`` as ``dialect`` would on the server, without sending it.

    GBNF goes through llama.cpp's own parser when ``llama_cpp`` is installed (it prints
    its reason on stderr), else through a structural check (rules, names, brackets,
    repetition bounds); EBNF and Lark through XGrammar, as vLLM's xgrammar backend parses
    them. Results are cached by text.

    Raises:
        GrammarError: the grammar does not parse.
    """
    _check_cached(text, Dialect(dialect))


@functools.lru_cache(maxsize=128)
def _check_cached(text: str, dialect: Dialect) -> None:
    if dialect is Dialect.GBNF:
        check_gbnf_structure(text)
        _check_gbnf_with_llama_cpp(text)
        return
    import xgrammar

    parse = xgrammar.Grammar.from_ebnf if dialect is Dialect.EBNF else xgrammar.Grammar.from_lark
    try:
        parse(text)
    except Exception as exc:  # XGrammar raises RuntimeError (and others) from C++
        raise GrammarError(
            f"XGrammar cannot parse the {dialect.value} grammar: {exc}; check it with "
            f"`citebacktrack grammar --dialect {dialect.value}`"
        ) from exc


def _check_gbnf_with_llama_cpp(text: str) -> None:
    from citebacktrack.backends.llamacpp_runtime import import_llama_cpp

    try:
        llama_cpp = import_llama_cpp()  # also closes llama_cpp's /dev/null files at exit
    except (MissingDependencyError, BackendError):
        return  # the structural check stands alone
    # No vocabulary is needed to parse (llama.cpp's own grammar tests pass NULL).
    sampler = llama_cpp.llama_sampler_init_grammar(None, text.encode("utf-8"), b"root")
    if not sampler:
        raise GrammarError(
            "llama.cpp could not parse the GBNF grammar (its parser's message is on stderr); "
            "check it with `citebacktrack grammar --dialect gbnf`"
        )
    llama_cpp.llama_sampler_free(sampler)


_GBNF_LEXEME = re.compile(
    r"""(?P<newline>[ \t\r]*(?:\#[^\n]*)?\n)
    | (?P<space>[ \t\r]+|\#[^\n]*)
    | (?P<define>::=)
    | (?P<literal>"(?:[^"\\\n]|\\.)*")
    | (?P<charclass>\[(?:[^\]\\\n]|\\.)*\])
    | (?P<name>[A-Za-z0-9-]+)
    | (?P<repeat>\{[ ]*(?P<lo>[0-9]+)[ ]*(?P<comma>,)?[ ]*(?P<hi>[0-9]*)[ ]*\})
    | (?P<op>[|()*+?.])""",
    re.VERBOSE,
)
_GBNF_MAX_REPEAT = 2000


def check_gbnf_structure(text: str) -> None:
    """Check GBNF without llama.cpp: rules, names, brackets and repetition bounds.

    Stricter than llama.cpp in one way: token references (``<[id]>``) are refused, as the
    IR never writes them.
    """
    tokens: list[re.Match[str]] = []
    pos = 0
    while pos < len(text):
        match = _GBNF_LEXEME.match(text, pos)
        if match is None:
            raise GrammarError(f"GBNF grammar: unexpected {text[pos : pos + 20]!r} at offset {pos}")
        if match.lastgroup != "space":
            tokens.append(match)
        pos = match.end()
    defined: set[str] = set()
    used: list[re.Match[str]] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token.lastgroup == "newline":
            index += 1
        elif _starts_rule(tokens, index):
            if token.group() in defined:
                raise GrammarError(f"GBNF grammar: rule {token.group()!r} is defined twice")
            defined.add(token.group())
            index = _check_gbnf_body(tokens, index + 2, token.group(), used)
        else:
            raise GrammarError(
                f"GBNF grammar: expected 'name ::=' at offset {token.start()}, "
                f"got {token.group()!r}"
            )
    if "root" not in defined:
        raise GrammarError("GBNF grammar: no 'root' rule")
    for name in used:
        if name.group() not in defined:
            raise GrammarError(
                f"GBNF grammar: undefined rule {name.group()!r} at offset {name.start()}"
            )


def _starts_rule(tokens: Sequence[re.Match[str]], index: int) -> bool:
    return (
        tokens[index].lastgroup == "name"
        and index + 1 < len(tokens)
        and tokens[index + 1].lastgroup == "define"
    )


def _check_gbnf_body(
    tokens: Sequence[re.Match[str]], index: int, rule: str, used: list[re.Match[str]]
) -> int:
    """Check the body of ``rule`` starting at ``index``; return the index after it."""
    depth = 0
    after_atom = False  # a postfix operator needs something to repeat
    after_bar = False  # GBNF allows a newline after "|"
    empty = True
    while index < len(tokens) and not _starts_rule(tokens, index):
        token = tokens[index]
        kind, value = token.lastgroup, token.group()
        where = f"in rule {rule!r} at offset {token.start()}"
        if kind == "newline":
            if depth == 0 and not after_bar:
                break  # a newline outside parentheses ends the rule
            index += 1
            continue
        index += 1
        empty = False
        after_bar = value == "|"
        if kind == "define":
            raise GrammarError(f"GBNF grammar: stray '::=' {where}")
        if kind in ("literal", "charclass", "name") or value in (".", ")"):
            if kind == "name":
                used.append(token)
            if value == ")":
                depth -= 1
                if depth < 0:
                    raise GrammarError(f"GBNF grammar: unbalanced ')' {where}")
            after_atom = True
        elif value in ("(", "|"):
            depth += value == "("
            after_atom = False
        else:  # * + ? {m,n}
            if not after_atom:
                raise GrammarError(f"GBNF grammar: {value!r} repeats nothing {where}")
            if kind == "repeat":
                _check_gbnf_bounds(token, where)
            after_atom = False
    if depth:
        raise GrammarError(f"GBNF grammar: unclosed '(' in rule {rule!r}")
    if empty:
        raise GrammarError(f"GBNF grammar: rule {rule!r} has an empty body")
    return index


def _check_gbnf_bounds(token: re.Match[str], where: str) -> None:
    low = int(token.group("lo"))
    high = int(token.group("hi")) if token.group("hi") else low
    if token.group("comma") and token.group("hi") and high < low:
        raise GrammarError(f"GBNF grammar: bad repetition {token.group()} {where}")
    if max(low, high) > _GBNF_MAX_REPEAT:
        raise GrammarError(
            f"GBNF grammar: repetition {token.group()} {where} exceeds llama.cpp's limit of "
            f"{_GBNF_MAX_REPEAT}"
        )
