"""Where the answer is, citation-wise: sentence, marker, group. A pure, immutable state.

The decoder advances a :class:`TextState` with each token's bytes and keeps the state of
every step, so restoring it after a rollback is one assignment. It works on bytes: the
marker syntax and sentence terminators are ASCII, and UTF-8 never puts an ASCII byte
inside a multi-byte character, so a token that splits a character cannot confuse it.

Sentence boundaries follow the citation grammar: a ``.``, ``!`` or ``?`` (optionally
followed by closing quotes or parentheses) then whitespace ends a sentence, unless the
period closes a dotted abbreviation (``e.g.``) or a single capital initial (``J. K.
Rowling``), or the next visible character is ``[`` (``632 A.D. [1]``: the citation still
belongs to the sentence). A newline always ends a sentence. The boundary is confirmed at
the first visible character after it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ClosedMarker", "TextState", "advance"]

_TERMINATORS = frozenset(b".!?")
_CLOSERS = frozenset(b")\"'")
_SPACE = frozenset(b" \t\r")
_LOWER = frozenset(b"abcdefghijklmnopqrstuvwxyz")
_DIGITS = frozenset(b"0123456789")
_OPEN = ord("[")
_CLOSE = ord("]")
_NEWLINE = ord("\n")
_UPPER = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


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
    """Bytes of prose since the last citation (or the start): the ramble bound counts these."""
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
    """The pending terminator closes an initial or a dotted abbreviation (no boundary)."""
    prev: int = 0
    prev2: int = 0
    prev3: int = 0

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
    dangling = s.dangling
    prev, prev2, prev3 = s.prev, s.prev2, s.prev3
    closed: list[ClosedMarker] = []
    for byte in piece:
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
            elif byte in _DIGITS:
                partial += chr(byte)
        elif byte == _OPEN:
            if pending == 2:
                # "... A.D. [1]": a citation right after a period belongs to this sentence.
                pending = 0
            if not in_group:
                group_ids = ()
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
                    # "J. K. Rowling" and "e.g.": no boundary after an initial or x.y.
                    period = byte == ord(".")
                    initial = period and (
                        (prev in _UPPER and prev2 in _SPACE)
                        or (prev in _LOWER and prev2 == ord(".") and prev3 in _LOWER)
                    )
            elif byte in _CLOSERS and (pending == 1 or not dangling):
                pass
            else:
                if (
                    pending == 2
                    and not initial
                    and not (s.strict and (dangling or not sentence_ids))
                ):
                    sentence_start, sentence_token = length, token_index
                    sentence_ids, group_ids = (), ()
                pending, initial, dangling = 0, False, True
            run += 1
        prev3, prev2, prev = prev2, prev, byte
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
        prev=prev,
        prev2=prev2,
        prev3=prev3,
    )
    return new, tuple(closed)
