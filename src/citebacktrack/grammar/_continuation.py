"""Continuations of the citation grammar: the rest of an answer after an accepted prefix,
and whether a text is a prefix of some answer (the segment loop's grammars and checks)."""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator
from typing import assert_never

from citebacktrack.errors import GrammarError
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.grammar.ir import (
    CharClass,
    Choice,
    Grammar,
    Literal,
    Node,
    Repeat,
    RuleRef,
    Sequence,
    choice,
    lit,
    ref,
    repeat,
    seq,
    walk,
)
from citebacktrack.syntax import (
    CLOSERS,
    MARKER_CLOSE,
    MARKER_OPEN,
    TERMINATORS,
    WHITESPACE,
)
from citebacktrack.types import CitationMode, Policy

__all__ = ["continuation_grammar", "is_answer_prefix"]


# --------------------------------------------------------------------------- continuations

# An item is a node of the full grammar and how much of it is already behind us: the
# characters of a Literal already matched, or the iterations of a Repeat already done
# (capped at the Repeat's minimum when it is unbounded, so a run of prose is one state).
# A stack is what is left to match, in order; the parser state after some text is the set
# of stacks that text can leave, one per reading of it.
_Item = tuple[int, int]
_Stack = tuple[_Item, ...]

_CHECKPOINTS = 32  # prefixes whose states are kept, so a growing answer is read once


class _Derivation:
    """The full citation grammar, indexed for reading an answer prefix through it.

    Reading a prefix character by character gives every stack of what may still follow
    (Brzozowski derivatives of the grammar, which has no recursion). Those stacks, printed
    as IR that refers to the full grammar's own rules, are the continuation grammar: it
    shares every definition with the full grammar instead of copying one.
    """

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self.nodes: list[Node] = []
        self._index: dict[Node, int] = {}
        self._children: list[tuple[int, ...]] = []
        rules = {name: self._add(body) for name, body in grammar.rules}
        for i, node in enumerate(self.nodes):
            if isinstance(node, RuleRef):
                self._children[i] = (rules[node.name],)
        self.start: _Stack = ((rules[grammar.root], 0),)
        self._nullable: dict[_Item, bool] = {}
        self._first: dict[_Item, tuple[tuple[_Item, _Stack], ...]] = {}
        self._checkpoints: OrderedDict[str, frozenset[_Stack]] = OrderedDict()
        self._lock = threading.Lock()

    def _add(self, node: Node) -> int:
        """Index ``node`` and everything below it (equal nodes share an index)."""
        if node in self._index:
            return self._index[node]
        index = len(self.nodes)
        self._index[node] = index
        self.nodes.append(node)
        self._children.append(())
        match node:
            case Sequence(items=children) | Choice(alternatives=children):
                self._children[index] = tuple(self._add(child) for child in children)
            case Repeat(item=child):
                self._children[index] = (self._add(child),)
            case Literal() | CharClass() | RuleRef():
                pass
            case _:
                assert_never(node)
        return index

    def index_of(self, node: Node) -> int:
        """The index of a node of the full grammar."""
        return self._index[node]

    def is_nullable(self, item: _Item) -> bool:
        """Whether what ``item`` still has to match may be empty."""
        if item not in self._nullable:
            index, done = item
            children = self._children[index]
            match self.nodes[index]:
                case Literal() | CharClass():
                    result = False
                case RuleRef() | Sequence():
                    result = all(self.is_nullable((child, 0)) for child in children)
                case Choice():
                    result = any(self.is_nullable((child, 0)) for child in children)
                case Repeat(min=low):
                    result = low <= done or self.is_nullable((children[0], 0))
            self._nullable[item] = result
        return self._nullable[item]

    def first(self, item: _Item) -> tuple[tuple[_Item, _Stack], ...]:
        """Each terminal ``item`` may match next, with the items that then follow inside it."""
        if item not in self._first:
            self._first[item] = tuple(dict.fromkeys(self._expand(item)))
        return self._first[item]

    def _expand(self, item: _Item) -> Iterator[tuple[_Item, _Stack]]:
        index, done = item
        children = self._children[index]
        match self.nodes[index]:
            case Literal() | CharClass():
                yield item, ()
            case RuleRef():
                yield from self.first((children[0], 0))
            case Choice():
                for child in children:
                    yield from self.first((child, 0))
            case Sequence():
                for position, child in enumerate(children):
                    after = tuple((later, 0) for later in children[position + 1 :])
                    for terminal, pushed in self.first((child, 0)):
                        yield terminal, pushed + after
                    if not self.is_nullable((child, 0)):
                        break
            case Repeat(min=low, max=high):
                count = done + 1 if high is not None else min(done + 1, low)
                again: _Stack = () if high is not None and count >= high else ((index, count),)
                for terminal, pushed in self.first((children[0], 0)):
                    yield terminal, pushed + again

    def _step(self, stacks: frozenset[_Stack], char: str) -> frozenset[_Stack]:
        """The stacks left after reading one more character."""
        after: set[_Stack] = set()
        for stack in stacks:
            for position, item in enumerate(stack):
                rest = stack[position + 1 :]
                for terminal, pushed in self.first(item):
                    node = self.nodes[terminal[0]]
                    if isinstance(node, Literal):
                        if node.text[terminal[1]] == char:
                            matched = terminal[1] + 1
                            more = ((terminal[0], matched),) if matched < len(node.text) else ()
                            after.add(more + pushed + rest)
                    elif isinstance(node, CharClass) and node.matches(char):
                        after.add(pushed + rest)
                if not self.is_nullable(item):
                    break
        return frozenset(after)

    def read(self, prefix: str) -> frozenset[_Stack]:
        """The stacks after ``prefix``.

        Raises:
            GrammarError: the full grammar refuses ``prefix`` (names where).
        """
        with self._lock:
            done = max((p for p in self._checkpoints if prefix.startswith(p)), key=len, default="")
            stacks = self._checkpoints[done] if done else frozenset({self.start})
        for offset in range(len(done), len(prefix)):
            stacks = self._step(stacks, prefix[offset])
            if not stacks:
                raise GrammarError(
                    "the full citation grammar refuses the prefix at character "
                    f"{offset} ({prefix[max(0, offset - 30) : offset + 1]!r}), so it has no "
                    "continuation; send a prefix the grammar accepted"
                )
        with self._lock:
            self._checkpoints[prefix] = stacks
            self._checkpoints.move_to_end(prefix)
            while len(self._checkpoints) > _CHECKPOINTS:
                self._checkpoints.popitem(last=False)
        return stacks

    def node(self, item: _Item) -> Node:
        """What ``item`` still has to match, as IR."""
        index, done = item
        node = self.nodes[index]
        if done and isinstance(node, Literal):
            return lit(node.text[done:])
        if done and isinstance(node, Repeat):
            high = None if node.max is None else node.max - done
            return repeat(node.item, max(node.min - done, 0), high)
        return node

    def union(self, stacks: Iterable[_Stack]) -> Node | None:
        """One node matching what any of ``stacks`` matches (``None``: only the empty string).

        Common leading and trailing items are written once, so the readings of an ambiguous
        prefix share their tails instead of repeating them.
        """
        ordered = sorted(set(stacks))
        if not any(ordered):
            return None
        if len(ordered) == 1:
            return seq(*(self.node(item) for item in ordered[0]))
        shortest = min(len(stack) for stack in ordered)
        lead = 0
        while lead < shortest and all(s[lead] == ordered[0][lead] for s in ordered):
            lead += 1
        trail = 0
        while trail < shortest - lead and all(
            s[-1 - trail] == ordered[0][-1 - trail] for s in ordered
        ):
            trail += 1
        if lead or trail:
            first = ordered[0]
            middle = self.union(s[lead : len(s) - trail] for s in ordered)
            inner = (
                ()
                if middle is None
                else (middle.items if isinstance(middle, Sequence) else (middle,))
            )
            items = [self.node(item) for item in first[:lead]]
            items += [*inner, *(self.node(item) for item in first[len(first) - trail :])]
            return seq(*items)
        groups: dict[_Item, list[_Stack]] = {}
        for stack in ordered:
            if stack:
                groups.setdefault(stack[0], []).append(stack)
        alternatives = [self.union(group) for group in groups.values()]
        node = choice(*(alt for alt in alternatives if alt is not None))
        return repeat(node, 0, 1) if not ordered[0] else node


@functools.lru_cache(maxsize=16)
def _derivation(n_sources: int, policy: Policy, bounded: bool) -> _Derivation:
    return _Derivation(citation_grammar(n_sources, policy, bounded=bounded))


def is_answer_prefix(
    n_sources: int,
    policy: Policy | None,
    text: str,
    *,
    bounded: bool = False,
    complete: bool = False,
) -> bool:
    """Whether ``citation_grammar(n_sources, policy, bounded=bounded)`` accepts ``text``
    as the start of an answer (``complete``: as a whole answer).

    What a segment engine wrote can be checked with it: a server that enforces the grammar
    it is sent never writes text for which this is False.

    Raises:
        InvalidSourcesError: ``n_sources`` is below 1 or above :data:`MAX_SOURCES`.
    """
    derivation = _derivation(n_sources, policy or Policy(), bounded)
    try:
        stacks = derivation.read(text)
    except GrammarError:
        return False
    if not complete:
        return True
    return any(all(derivation.is_nullable(item) for item in stack) for stack in stacks)


_W, _C, _T = (re.escape(chars) for chars in (WHITESPACE, CLOSERS, TERMINATORS))
# The end of a sentence under REQUIRED, and any whitespace after it: a group ("claim [1]",
# "claim. [1]"), a group then closers and a terminator ("claim [1].", "aside [2])."), or a
# group then closers and whitespace ("aside [2]) ").
_SENTENCE_END = re.compile(rf"\](?:[{_C}]{{0,2}}[{_T}])?[{_W}]*\Z|\][{_C}]{{1,2}}[{_W}]+\Z")


def _check_point(mode: CitationMode, prefix: str) -> None:
    """Raise unless ``prefix`` ends where a continuation may start under ``mode``."""
    if not prefix.strip(WHITESPACE) or prefix.endswith((MARKER_OPEN, MARKER_CLOSE)):
        return
    if prefix.rfind(MARKER_OPEN) > prefix.rfind(MARKER_CLOSE):
        opened = prefix[prefix.rfind(MARKER_OPEN) :]
        raise GrammarError(
            f"the prefix ends inside the marker {opened!r}; continue right after its "
            f"{MARKER_OPEN!r} (the id is then part of the continuation) or after its "
            f"{MARKER_CLOSE!r}"
        )
    if mode is CitationMode.REQUIRED and not _SENTENCE_END.search(prefix):
        raise GrammarError(
            f"under REQUIRED a continuation starts right after {MARKER_OPEN!r} or "
            f"{MARKER_CLOSE!r}, or at the end of a sentence; the prefix ends mid-sentence "
            f"(...{prefix[-30:]!r}); cut it back to one of those points"
        )


def _id_choice(n_sources: int, allowed_ids: Collection[int]) -> Node:
    ids = sorted(set(allowed_ids))
    if not ids:
        raise GrammarError(
            "no id allowed at the open marker (allowed_ids is empty); allow at least one "
            "source, or cut the prefix back before the marker"
        )
    outside = [i for i in ids if not 1 <= i <= n_sources]
    if outside:
        raise GrammarError(
            f"allowed_ids {outside} are outside the source ids 1..{n_sources}; "
            "allow only ids of the sources in the prompt"
        )
    return choice(*(lit(str(i)) for i in ids))


def continuation_grammar(
    n_sources: int,
    policy: Policy | None,
    prefix: str,
    *,
    allowed_ids: Collection[int] | None = None,
    bounded: bool = False,
) -> Grammar:
    """What may follow ``prefix`` in an answer of ``citation_grammar(n_sources, policy)``.

    Engines that cannot start a grammar mid-stream (a llama.cpp or vLLM server) restart it
    when they continue an accepted prefix; this is the grammar to send then. ``prefix + s``
    is accepted by the full grammar (``bounded`` alike) exactly when ``s`` is accepted by
    the result, with the id of the marker ``prefix`` opens drawn from ``allowed_ids``.
    The state is read from the whole prefix by running the full grammar over it, so every
    reading of an ambiguous prefix (``claim [1]``: a group inside the sentence, or the one
    that ends it) is kept, and so are the counts the grammar bounds: markers in the group,
    groups in the sentence, and with ``bounded`` the prose since a break.

    Supported continuation points (what the segment loop resubmits at):

    * an empty or whitespace-only prefix (the result accepts what the full grammar does);
    * right after a marker's ``[``: the continuation starts with an id from
      ``allowed_ids`` (default: every source), then ``]``; later markers take any id;
    * right after a marker's ``]``;
    * under REQUIRED, the end of a sentence (``claim [1].``, ``claim. [1]``, ``claim [1]``),
      possibly followed by whitespace;
    * under AUTO and QUOTES_ONLY, any point outside a marker.

    Args:
        n_sources: how many sources the answer may cite (as for :func:`citation_grammar`).
        policy: the citation policy (default: REQUIRED, at most 3 per sentence).
        prefix: the accepted answer text the engine continues.
        allowed_ids: the ids the open marker may take; only when ``prefix`` ends with ``[``.
        bounded: continue the bounded grammar (``citation_grammar(..., bounded=True)``).

    Raises:
        InvalidSourcesError: ``n_sources`` is below 1 or above :data:`MAX_SOURCES`.
        GrammarError: ``prefix`` ends at no supported point (inside a marker, mid-sentence
            under REQUIRED), the full grammar refuses it, or ``allowed_ids`` is empty, has an
            id outside ``1..n_sources`` or is given where no marker is open.
    """
    policy = policy or Policy()
    derivation = _derivation(n_sources, policy, bounded)  # checks n_sources
    _check_point(policy.mode, prefix)
    at_marker = prefix.endswith(MARKER_OPEN)
    if allowed_ids is not None and not at_marker:
        raise GrammarError(
            f"allowed_ids applies to an open marker, but the prefix does not end with "
            f"{MARKER_OPEN!r} (...{prefix[-30:]!r}); pass allowed_ids=None here"
        )
    stacks = derivation.read(prefix)
    rules: list[tuple[str, Node]] = []
    if allowed_ids is None:
        union = derivation.union(stacks)
        if union is None:
            raise GrammarError("the prefix is a complete answer; nothing may follow it")
        root = union
    else:
        # Every reading is inside a cite, right before its source-id: replace that one.
        ids = _id_choice(n_sources, allowed_ids)
        source_id = derivation.index_of(ref("source-id"))
        if any(not stack or stack[0] != (source_id, 0) for stack in stacks):
            raise GrammarError(f"no marker id can follow the prefix (...{prefix[-30:]!r})")
        name = "allowed-id"  # no rule of the full grammar has this name
        rest = derivation.union(stack[1:] for stack in stacks)
        tail = () if rest is None else (rest.items if isinstance(rest, Sequence) else (rest,))
        root = seq(ref(name), *tail)
        rules.append((name, ids))
    rules.insert(0, ("root", root))
    return Grammar(tuple(rules) + _used_rules(derivation.grammar, rules))


def _used_rules(grammar: Grammar, rules: list[tuple[str, Node]]) -> tuple[tuple[str, Node], ...]:
    """The rules of ``grammar`` that ``rules`` refer to, directly or not (in its order)."""
    bodies = grammar.rule_map
    used: set[str] = set()
    pending = [body for _, body in rules]
    while pending:
        for node in walk(pending.pop()):
            if isinstance(node, RuleRef) and node.name in bodies and node.name not in used:
                used.add(node.name)
                pending.append(bodies[node.name])
    own = {name for name, _ in rules}
    return tuple((n, b) for n, b in grammar.rules if n in used and n not in own)
