"""Where the answer is, citation-wise: sentence, marker, group. A pure, immutable state.

The decoder advances a :class:`TextState` with each token's bytes and keeps the state of
every step, so restoring it after a rollback is one assignment. It works on bytes: the
marker syntax and sentence terminators are ASCII, and UTF-8 never puts an ASCII byte
inside a multi-byte character, so a token that splits a character cannot confuse it.

Sentence boundaries follow the citation grammar, with the characters and rules of
:mod:`citebacktrack.syntax`: a ``.``, ``!`` or ``?`` (optionally followed by closing quotes
or parentheses) then whitespace ends a sentence, unless the period is absorbed
(:func:`~citebacktrack.syntax.period_is_absorbed`: an ellipsis, ``U.S.``, an initial as in
``J. K. Rowling``, a listed abbreviation such as ``e.g.``). A citation group right after a
sentence's terminator (``claim. [1]``, ``claim.[1]``) still belongs to that sentence, which
then ends at the whitespace after the group; after an absorbed period (``632 A.D. [1]``) the
sentence goes on. A newline always ends a sentence. The boundary is confirmed at the first
visible character after it. Only the ASCII closers are recognised byte by byte: a curly
``”`` or ``’`` after a terminator or a group, which the grammar allows, counts as a word.
"""

from __future__ import annotations

from dataclasses import dataclass

from citebacktrack.syntax import (
    CLOSERS,
    LONGEST_ABBREVIATION,
    MARKER_CLOSE,
    MARKER_OPEN,
    TERMINATORS,
    WHITESPACE,
    period_is_absorbed,
)

__all__ = ["ClosedMarker", "TextState", "advance"]

_TERMINATORS = frozenset(TERMINATORS.encode())
_CLOSERS = frozenset(CLOSERS.encode("ascii", "ignore"))  # see the module docstring
_SPACE = frozenset(WHITESPACE.replace("\n", "").encode())
_DIGITS = frozenset(b"0123456789")
_OPEN = ord(MARKER_OPEN)
_CLOSE = ord(MARKER_CLOSE)
_NEWLINE = ord("\n")
_PERIOD = ord(".")


@dataclass(frozen=True, slots=True)
class ClosedMarker:
    """A ``[N]`` marker that closed inside the bytes just advanced over."""

    source_index: int
    start: int
    """Byte offset of ``[``."""
    end: int
    """Byte offset just past ``]``."""
    token_index: int
    """Generated-token index of the token holding the ``[``."""
    sentence_start: int
    """Byte offset where the marker's sentence starts."""
    prior_ids: tuple[int, ...]
    """Ids cited earlier in the same sentence."""


@dataclass(frozen=True, slots=True)
class TextState:
    """The citation-relevant state after some prefix of the answer (all offsets in bytes)."""

    length: int = 0
    sentence_start: int = 0
    """Offset of the current sentence's first byte."""
    sentence_token: int = 0
    """Index of the token holding that byte: where a sentence-level rollback returns to."""
    sentence_ids: tuple[int, ...] = ()
    """Ids cited so far in the current sentence, in order."""
    group_ids: tuple[int, ...] = ()
    """Ids in the current marker group (``[1][2]``); empty once prose follows a group."""
    in_group: bool = False
    """The last byte was a ``]``: a following ``[`` extends the group."""
    marker_start: int = -1
    """Offset of the open marker's ``[``, or -1 outside a marker."""
    marker_token: int = -1
    """Index of the token holding the open marker's ``[``."""
    partial_id: str = ""
    """Digits typed so far inside the open marker."""
    uncited_run: int = 0
    """Characters (code points) of prose since the last citation (or the start): what the
    ramble bound counts. UTF-8 continuation bytes are not counted, so ``日本`` is 2, as
    the bounded grammar counts it, not 6."""
    strict: bool = False
    """REQUIRED: a sentence only ends after a marker group with no words after it (as in the
    grammar), so an uncited run of prose never counts as a finished sentence."""
    dangling: bool = False
    """Words were written in this sentence after its last marker group (or it has none):
    under REQUIRED the sentence cannot end until another marker closes."""
    pending_boundary: int = 0
    """0: none; 1: a terminator (and closers) was seen; 2: then whitespace: a boundary
    that the next visible byte confirms or cancels."""
    initial_period: bool = False
    """The pending terminator is an absorbed period (an initial, ``e.g.``: no boundary)."""
    group_after_end: bool = False
    """The current marker group follows the sentence's terminator (``claim. [1]``): the
    sentence ends at the whitespace after the group."""
    tail: bytes = b""
    """The last bytes written (enough to recognise an abbreviation)."""

    @property
    def in_marker(self) -> bool:
        """Inside ``[...``, before its ``]``."""
        return self.marker_start >= 0


def advance(
    state: TextState, piece: bytes, token_index: int
) -> tuple[TextState, tuple[ClosedMarker, ...]]:
    """Return the state after ``piece`` (one token's bytes) and the markers it closed."""
    s = state
    length = s.length
    sentence_start, sentence_token = s.sentence_start, s.sentence_token
    sentence_ids, group_ids, in_group = s.sentence_ids, s.group_ids, s.in_group
    marker_start, marker_token, partial = s.marker_start, s.marker_token, s.partial_id
    run, pending, initial = s.uncited_run, s.pending_boundary, s.initial_period
    dangling, after_end = s.dangling, s.group_after_end
    closed: list[ClosedMarker] = []
    for i, byte in enumerate(piece):
        if marker_start >= 0:
            if byte == _CLOSE:
                source_index = int(partial) if partial else 0
                closed.append(
                    ClosedMarker(
                        source_index,
                        marker_start,
                        length + 1,
                        marker_token,
                        sentence_start,
                        sentence_ids,
                    )
                )
                sentence_ids = (*sentence_ids, source_index)
                group_ids = (*group_ids, source_index)
                marker_start, marker_token, partial = -1, -1, ""
                in_group, run, dangling = True, 0, False
                if after_end:  # "claim. [1]": the group closes the sentence
                    pending, initial = 1, False
            elif byte in _DIGITS:
                partial += chr(byte)
        elif byte == _OPEN:
            # A citation right after a terminator belongs to the sentence before it.
            if not in_group:
                group_ids = ()
                after_end = pending != 0 and not initial
            pending = 0
            marker_start, marker_token, partial = length, token_index, ""
        else:
            in_group = False
            if byte == _NEWLINE:
                pending = 2
                initial = False
            elif byte in _SPACE:
                if pending == 1:
                    pending = 2
            elif byte in _TERMINATORS:
                if pending != 2:
                    pending = 1
                    # "J. K. Rowling", "e.g.", "U.S.", "...": no boundary after them.
                    initial = byte == _PERIOD and period_is_absorbed(s.tail + piece[: i + 1])
            elif byte in _CLOSERS and (pending == 1 or (pending == 0 and not dangling)):
                pass  # closes the sentence; after whitespace a quote opens the next one
            else:
                if (
                    pending == 2
                    and not initial
                    and not (s.strict and (dangling or not sentence_ids))
                ):
                    sentence_start, sentence_token = length, token_index
                    sentence_ids, group_ids = (), ()
                pending, initial, dangling = 0, False, True
            if byte & 0xC0 != 0x80:  # a character's first byte
                run += 1
        length += 1
    new = TextState(  # not dataclasses.replace: that introspects the fields on every call
        length=length,
        sentence_start=sentence_start,
        sentence_token=sentence_token,
        sentence_ids=sentence_ids,
        group_ids=group_ids,
        in_group=in_group,
        marker_start=marker_start,
        marker_token=marker_token,
        partial_id=partial,
        uncited_run=run,
        strict=s.strict,
        dangling=dangling,
        pending_boundary=pending,
        initial_period=initial,
        group_after_end=after_end,
        tail=(s.tail + piece)[-LONGEST_ABBREVIATION:],
    )
    return new, tuple(closed)
