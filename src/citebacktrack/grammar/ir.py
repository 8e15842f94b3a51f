"""An engine-neutral grammar IR: immutable nodes that every dialect emitter understands.

A :class:`Grammar` is a set of named rules whose bodies are trees of :data:`Node`. Rule
names are dashed lower case (``sentence-body``), the one spelling both XGrammar and GBNF
accept; emitters for dialects with other rules (Lark) translate them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from citebacktrack.errors import GrammarError

__all__ = [
    "CharClass",
    "Choice",
    "Grammar",
    "Literal",
    "Node",
    "Repeat",
    "RuleRef",
    "Sequence",
    "any_char",
    "char_class",
    "choice",
    "lit",
    "ref",
    "repeat",
    "seq",
]

_RULE_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass(frozen=True, slots=True)
class Literal:
    """An exact, non-empty string."""

    text: str

    def __post_init__(self) -> None:
        if not self.text:
            raise GrammarError("a Literal must be non-empty; make the item optional instead")


@dataclass(frozen=True, slots=True)
class CharClass:
    """One character from inclusive ``ranges`` (or, if ``negated``, from outside them).

    A negated class with no ranges matches any character.
    """

    ranges: tuple[tuple[str, str], ...]
    negated: bool = False

    def __post_init__(self) -> None:
        if not self.ranges and not self.negated:
            raise GrammarError("an empty, non-negated CharClass matches nothing")
        for lo, hi in self.ranges:
            if len(lo) != 1 or len(hi) != 1 or lo > hi:
                raise GrammarError(f"bad character range {lo!r}-{hi!r} in CharClass")

    def matches(self, char: str) -> bool:
        """Whether ``char`` (one character) is in this class."""
        inside = any(lo <= char <= hi for lo, hi in self.ranges)
        return inside != self.negated


@dataclass(frozen=True, slots=True)
class Sequence:
    """Items one after another (at least two)."""

    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Choice:
    """Exactly one of the alternatives (at least two)."""

    alternatives: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Repeat:
    """``item`` repeated between ``min`` and ``max`` times (``max=None``: unbounded)."""

    item: Node
    min: int = 0
    max: int | None = None

    def __post_init__(self) -> None:
        if self.min < 0 or (self.max is not None and self.max < max(self.min, 1)):
            raise GrammarError(f"bad repetition bounds {{{self.min},{self.max}}}")


@dataclass(frozen=True, slots=True)
class RuleRef:
    """A reference to a named rule of the same grammar."""

    name: str


Node = Literal | CharClass | Sequence | Choice | Repeat | RuleRef
"""Any IR node."""


@dataclass(frozen=True, slots=True)
class Grammar:
    """Named rules and the name of the start rule.

    Raises:
        GrammarError: a rule name is not dashed lower case, the root is missing, or a
            reference points at no rule.
    """

    rules: tuple[tuple[str, Node], ...]
    root: str = "root"

    def __post_init__(self) -> None:
        names = [name for name, _ in self.rules]
        if len(set(names)) != len(names):
            raise GrammarError(f"duplicate rule names in {names}")
        for name in names:
            if not _RULE_NAME.match(name):
                raise GrammarError(
                    f"rule name {name!r} must be dashed lower case, e.g. 'sentence-body'"
                )
        if self.root not in names:
            raise GrammarError(f"root rule {self.root!r} is not defined")
        defined = set(names)
        for name, body in self.rules:
            for node in walk(body):
                if isinstance(node, RuleRef) and node.name not in defined:
                    raise GrammarError(f"rule {name!r} refers to undefined rule {node.name!r}")

    @property
    def rule_map(self) -> Mapping[str, Node]:
        """Rules by name."""
        return dict(self.rules)


def walk(node: Node) -> Iterator[Node]:
    """Yield ``node`` and every node below it, depth first."""
    yield node
    match node:
        case Sequence(items=children) | Choice(alternatives=children):
            for child in children:
                yield from walk(child)
        case Repeat(item=child):
            yield from walk(child)
        case Literal() | CharClass() | RuleRef():
            pass


# Small constructors that keep grammar-building code readable and normalise trivial cases.


def lit(text: str) -> Literal:
    """A literal string."""
    return Literal(text)


def ref(name: str) -> RuleRef:
    """A rule reference."""
    return RuleRef(name)


def seq(*items: Node) -> Node:
    """A sequence; one item is returned as is."""
    if not items:
        raise GrammarError("an empty sequence matches nothing useful")
    return items[0] if len(items) == 1 else Sequence(tuple(items))


def choice(*alternatives: Node) -> Node:
    """A choice; one alternative is returned as is."""
    if not alternatives:
        raise GrammarError("an empty choice matches nothing")
    return alternatives[0] if len(alternatives) == 1 else Choice(tuple(alternatives))


def repeat(item: Node, min: int = 0, max: int | None = None) -> Repeat:  # noqa: A002
    """``item`` between ``min`` and ``max`` times."""
    return Repeat(item, min, max)


def char_class(
    chars: str = "", *, ranges: tuple[tuple[str, str], ...] = (), negated: bool = False
) -> CharClass:
    """A class of the single characters in ``chars`` plus inclusive ``ranges``."""
    return CharClass(tuple((c, c) for c in dict.fromkeys(chars)) + ranges, negated)


def any_char() -> CharClass:
    """Any one character."""
    return CharClass((), negated=True)
