"""Print a :class:`~citebacktrack.grammar.ir.Grammar` in an engine's dialect.

One printer walks the IR with an exhaustive ``match``; the differences between dialects
live in the small :class:`_DialectRules` table (see ADR 0001 and ``shared/ENGINES.md``):

========================  =================  ==============  ==========================
construct                 XGrammar EBNF      llama.cpp GBNF  Lark
========================  =================  ==============  ==========================
rule definition           ``a ::= ...``      ``a ::= ...``   ``a: ...`` (``_`` names)
any character             ``[^]``            ``.``           ``/[\\s\\S]/``
bounded repeat            ``x{m,n}``         ``x{m,n}``      ``x ~ m..n``
largest repeat bound      none               2000            none
========================  =================  ==============  ==========================

Every emitted rule fits on one line: GBNF rejects a newline before a top-level ``|``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import assert_never

from citebacktrack._arguments import Choices
from citebacktrack.errors import GrammarError
from citebacktrack.grammar.ir import (
    CharClass,
    Choice,
    Grammar,
    Literal,
    Node,
    Repeat,
    RuleRef,
    Sequence,
    walk,
)

__all__ = ["Dialect", "emit"]


class Dialect(Choices):
    """A grammar language an engine reads; ``Dialect("LARK")`` is ``Dialect.LARK`` (any
    case), and any other name is a :class:`~citebacktrack.errors.ConfigurationError`."""

    EBNF = "ebnf"
    """XGrammar's EBNF (HF, llama.cpp-with-xgrammar, vLLM's xgrammar backend)."""
    GBNF = "gbnf"
    """llama.cpp's GBNF (its built-in grammar sampler and server)."""
    LARK = "lark"
    """Lark (OpenAI custom-tool grammars, vLLM's guidance backend)."""


@dataclass(frozen=True, slots=True)
class _DialectRules:
    define: str
    any_char: str
    max_repeat: int | None
    lark: bool
    # llama.cpp multiplies the rules generated inside a parenthesised group by the group's
    # repetition count and refuses the grammar past 2000 (``(x [^a]{0,300}){0,8}``,
    # ``(x*){0,2000}``, ``(x{0,2000})?``); a group repeated more than once, or holding an
    # ``{m,n}`` repeat, is therefore printed as a rule of its own.
    hoist_repeated_groups: bool = False


_RULES: dict[Dialect, _DialectRules] = {
    Dialect.EBNF: _DialectRules(" ::= ", "[^]", None, lark=False),
    Dialect.GBNF: _DialectRules(" ::= ", ".", 2000, lark=False, hoist_repeated_groups=True),
    Dialect.LARK: _DialectRules(": ", r"/[\s\S]/", None, lark=True),
}

# Characters that must be escaped inside a double-quoted literal or a character class.
# Hex escapes are the one spelling XGrammar, GBNF and Python/Lark all read (except inside
# Lark's regexps: see _LARK_CLASS_ESCAPES).
_LITERAL_SPECIAL = frozenset('"\\')
_CLASS_SPECIAL = frozenset("\\]-^[")


def _escape_char(char: str, special: frozenset[str]) -> str:
    code = ord(char)
    if char in special or code < 0x20 or code == 0x7F:
        if char == "\n":
            return "\\n"
        if char == "\t":
            return "\\t"
        if char == "\r":
            return "\\r"
        if char in '"\\':
            return "\\" + char
        # \u takes exactly four digits everywhere; XGrammar reads \x greedily ("\x5DA").
        return f"\\u{code:04X}"
    if code > 0x7E:
        return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"
    return char


def _literal(text: str) -> str:
    return '"' + "".join(_escape_char(c, _LITERAL_SPECIAL) for c in text) + '"'


def _class_char(char: str) -> str:
    return _escape_char(char, _CLASS_SPECIAL)


# Lark runs every regexp through Python string unescaping before ``re`` sees it, so a hex
# escape such as ``\x5D`` arrives as a bare ``]``; regex metacharacters keep a backslash
# (``\]``), and ``"`` is spelled ``\x22`` because Lark mangles ``\\"`` (a backslash then a
# quote). ``|``, ``&`` and ``~`` are escaped too: doubled in a class, ``re`` warns
# (FutureWarning) that they will become set operations.
_LARK_CLASS_ESCAPES = {
    "\\": "\\\\",
    "]": "\\]",
    "[": "\\[",
    "-": "\\-",
    "^": "\\^",
    "/": "\\/",
    '"': "\\x22",
    "|": "\\|",
    "&": "\\&",
    "~": "\\~",
}


def _lark_class_char(char: str) -> str:
    """A character inside a Lark regexp class: written as itself, except the class's
    metacharacters, line breaks, tab and NUL. XGrammar's Lark reader (vLLM's xgrammar
    backend) takes ``\\u`` and ``\\x`` escapes greedily (``\\u00E9a`` as U+0E9A), and a
    literal character reads the same everywhere."""
    escaped = _LARK_CLASS_ESCAPES.get(char)
    if escaped is not None:
        return escaped
    return _escape_char(char, frozenset()) if char in "\n\r\t\x00" else char


def _class_body(node: CharClass, escape: Callable[[str], str] = _class_char) -> str:
    parts = []
    for lo, hi in node.ranges:
        low = escape(lo)
        parts.append(low if lo == hi else f"{low}-{escape(hi)}")
    return ("^" if node.negated else "") + "".join(parts)


def _lark_class(node: CharClass, suffix: str = "") -> str:
    if not node.ranges:
        return rf"/[\s\S]{suffix}/"
    if not node.negated and node.ranges[0][0] == "^":
        # XGrammar's Lark reader (vLLM's xgrammar backend) takes an escaped ``^`` first in
        # a class for negation (``[\^-a]`` as ``[^-a]``): put ``^`` itself last.
        others = [(lo, hi) for lo, hi in node.ranges if lo != "^"]
        widened = [("_", hi) for lo, hi in node.ranges if lo == "^" and hi > "^"]  # "_" follows "^"
        if not others and not widened:
            return rf"/\^{suffix}/"
        node = CharClass((*others, *widened, ("^", "^")))
    if ("\x00", "\x00") in node.ranges:
        # The one escape left that a character could extend (``\u0000`` then ``a``): last.
        rest = tuple(r for r in node.ranges if r != ("\x00", "\x00"))
        node = CharClass((*rest, ("\x00", "\x00")), node.negated)
    return f"/[{_class_body(node, _lark_class_char)}]{suffix}/"


class _Printer:
    def __init__(self, dialect: Dialect, taken: set[str]) -> None:
        self.dialect = dialect
        self.rules = _RULES[dialect]
        self.taken = taken  # rule names in use, for hoisted groups
        self.rule_name = ""  # the rule being printed
        self.hoisted: list[str] = []  # lines of hoisted group rules not yet written

    def name(self, name: str) -> str:
        if not self.rules.lark:
            return name
        # ``start`` is the entry rule emit() adds; no IR name ends in ``_`` (or ``-``).
        return "start_" if name == "start" else name.replace("-", "_")

    def hoist(self, node: Node) -> str:
        """Print ``node`` as a new rule named after the current one; return that name."""
        index = 1
        while f"{self.rule_name}-g{index}" in self.taken:
            index += 1
        name = f"{self.rule_name}-g{index}"
        self.taken.add(name)
        self.hoisted.append(f"{name}{self.rules.define}{self.node(node)}")
        return name

    def node(self, node: Node, *, atomic: bool = False) -> str:
        match node:
            case Literal(text=text):
                return _literal(text)
            case CharClass():
                if self.rules.lark:
                    return _lark_class(node)
                if not node.ranges:
                    return self.rules.any_char
                return f"[{_class_body(node)}]"
            case RuleRef(name=name):
                return self.name(name)
            case Sequence(items=items):
                text = " ".join(self.node(item, atomic=True) for item in items)
                return f"({text})" if atomic else text
            case Choice(alternatives=alternatives):
                text = " | ".join(self.node(alt) for alt in alternatives)
                return f"({text})" if atomic else text
            case Repeat():
                return self.repeat(node)
            case _:
                assert_never(node)

    def repeat(self, node: Repeat) -> str:
        lo, hi = node.min, node.max
        cap = self.rules.max_repeat
        if cap is not None and max(lo, hi or 0) > cap:
            raise GrammarError(
                f"{self.dialect.value} allows repetition counts up to {cap}, got {{{lo},{hi}}}; "
                "lower the bound (e.g. Policy.max_uncited_chars)"
            )
        if self.rules.lark and isinstance(node.item, CharClass):
            # One regex terminal instead of a rule repeated per character. Lark rejects
            # terminals that can match the empty string, so ``{0,n}`` becomes ``{1,n}`` made
            # optional.
            if lo == 0:
                return _lark_class(node.item, _brace_suffix(1, hi)) + "?"
            return _lark_class(node.item, _brace_suffix(lo, hi))
        # A repeated Repeat is a group too (``(x*){0,2000}``), and a group holding a counted
        # repeat is hoisted even under ``?`` or ``*``: its {m,n} generates n rules.
        group = isinstance(node.item, Sequence | Choice | Repeat)
        if (
            self.rules.hoist_repeated_groups
            and group
            and ((lo if hi is None else hi) > 1 or _has_counted_repeat(node.item))
        ):
            inner = self.hoist(node.item)
        else:
            inner = self.node(node.item, atomic=True)
            if isinstance(node.item, Repeat):
                inner = f"({inner})"  # ``x*?`` is a syntax error in XGrammar and Lark
        if (lo, hi) == (0, None):
            return f"{inner}*"
        if (lo, hi) == (1, None):
            return f"{inner}+"
        if (lo, hi) == (0, 1):
            return f"{inner}?"
        if self.rules.lark:
            if hi is None:
                return f"({inner} ~ {lo} {inner}*)"
            return f"({inner} ~ {lo})" if lo == hi else f"({inner} ~ {lo}..{hi})"
        return f"{inner}{_brace_suffix(lo, hi)}"


def _has_counted_repeat(node: Node) -> bool:
    """Whether ``node`` holds an ``{m,n}`` repeat with ``n > 1`` (not behind a rule name)."""
    return any(isinstance(n, Repeat) and (n.max or 0) > 1 for n in walk(node))


def _brace_suffix(lo: int, hi: int | None) -> str:
    if hi is None:
        return f"{{{lo},}}"
    return f"{{{lo}}}" if lo == hi else f"{{{lo},{hi}}}"


def emit(grammar: Grammar, dialect: Dialect | str) -> str:
    """Return ``grammar`` as text in ``dialect``, one rule per line, root rule first.

    Raises:
        GrammarError: the dialect is unknown, or the grammar uses something the dialect
            cannot say (e.g. a repetition bound over GBNF's 2000).
    """
    try:
        dialect = Dialect(dialect)
    except ValueError as exc:
        known = ", ".join(d.value for d in Dialect)
        raise GrammarError(f"unknown grammar dialect {dialect!r}; use one of: {known}") from exc
    printer = _Printer(dialect, {name for name, _ in grammar.rules})
    ordered = sorted(grammar.rules, key=lambda rule: rule[0] != grammar.root)
    lines = []
    for name, body in ordered:
        printer.rule_name = name
        lines.append(f"{printer.name(name)}{printer.rules.define}{printer.node(body)}")
        lines.extend(printer.hoisted)
        printer.hoisted.clear()
    if printer.rules.lark:
        lines.insert(0, f"start: {printer.name(grammar.root)}")
    return "\n".join(lines) + "\n"
