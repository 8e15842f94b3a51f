"""A scripted test model: where it is in its script, and every place the answer leaves it.

The test doubles decode a script through the real decoder (or segment loop). The grammar
and the decoder decide what is written, so the answer may leave the script: an id out of
range, a refused id, text the grammar cannot take, a citation the policy forces. The
model then follows its script from where the answer can rejoin it, never from a byte
offset that no longer matches, and each departure is recorded once per place in the
script, with what the script had there, what was written and what the grammar allowed.

Its preferences, as logits: the token that continues the script at its cursor (longer
first), then the script past the unit it is stuck on (a whole marker group, or a
character, its repeats and the spaces after them), then ``[``, ``]``, ``.``, low digits, a
space, and the stop token last while script remains (first once it is all written; a
space right after a sentence the decoder ended). Inside a citation the answer opened where
the script has none, or that left the script's marker, it has no wish: ``]`` closes it
soonest. The logits are a function of the output so far (the state of each token is kept
and restored with it on a rollback); what the grammar allowed only shapes the reports.

:mod:`citebacktrack._departure_log` holds the departures and turns them into stream
events (:class:`~citebacktrack.types.ScriptDeparture`, and a ``CitationRejected`` with
reason ``out_of_range`` for an id that does not exist) and trace entries of kind
``departure``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from citebacktrack._departure_log import Departure, DepartureLog
from citebacktrack._departures import DepartureKind
from citebacktrack.decoding.runtime import Logits, Vocabulary

__all__ = ["ScriptModel"]

_LONGEST_MARKER = 32
"""Most bytes from ``[`` to ``]`` that the script's text counts as one marker."""


@dataclass(frozen=True, slots=True)
class _At:
    """Where the model is after some prefix of its output."""

    cursor: int = 0
    """Byte offset in the script the model wants to continue from."""
    resume: int = -1
    """>= 0: the output is in a citation the script does not follow; at its ``]`` the
    model goes on from this offset."""
    marker: int = -1
    """Script offset of the ``[`` the output's open citation follows, or -1."""
    out_len: int = 0
    run: Departure | None = None
    """The departure the output is still in (more of it extends it, not a new one)."""


class ScriptModel:
    """A model that wants to write a script, following it through the answer.

    Args:
        log: the departures of this answer (shared by the calls of a segment engine).
        vocabulary: the model's vocabulary.
        position: the trace position of every departure (a segment engine's call
            number); None: the generated token's index.
    """

    def __init__(
        self, log: DepartureLog, vocabulary: Vocabulary, *, position: int | None = None
    ) -> None:
        self.log = log
        self._position = position
        self.data = log.script
        self.vocabulary = vocabulary
        self.pieces = vocabulary.tokens
        self._spans = _marker_spans(self.data)
        self._states = [_At()]
        self._left = -1
        self.out = bytearray()
        base = np.zeros(vocabulary.size, dtype=np.float32)
        by_piece = {piece: i for i, piece in enumerate(self.pieces)}
        for piece, score in ((b"[", 3.0), (b"]", 2.5), (b".", 2.0), (b" ", 0.5)):
            if piece in by_piece:
                base[by_piece[piece]] = score
        for digit in range(10):
            piece = str(digit).encode()
            if piece in by_piece:
                base[by_piece[piece]] = 2.0 - 0.1 * digit
        for stop in vocabulary.stop_ids:
            base[stop] = 0.2  # while script remains, any other way on comes first
        self._base = base
        self._space = by_piece.get(b" ")
        self._by_first: dict[int, list[tuple[int, bytes]]] = {}
        for i, piece in enumerate(self.pieces):
            if piece and i not in vocabulary.stop_ids:
                self._by_first.setdefault(piece[0], []).append((i, piece))

    # ------------------------------------------------------------------ the runtime's side

    def reset(self) -> None:
        """A new decode (``prefill``): back to the start of the script."""
        self._close_run()
        self._states = [_At()]
        self.out.clear()

    def truncate(self, n_generated: int) -> None:
        """Forget all but the first ``n_generated`` tokens of the output."""
        self._close_run()  # the departure the output was in, and the one it is back in
        del self._states[n_generated + 1 :]
        self._close_run()
        self._states[-1] = dataclasses.replace(self._states[-1], run=None)
        del self.out[self._states[-1].out_len :]

    def feed(self, token: int, grammar: npt.NDArray[np.bool_] | None = None) -> None:
        """The output goes on with ``token``; ``grammar``: what the grammar allowed there."""
        at = self._states[-1]
        position = len(self._states) - 1 if self._position is None else self._position
        piece = self.pieces[token]
        self.out += piece
        new = self._advance(at, piece, position, len(self.out) - len(piece), grammar)
        self._states.append(dataclasses.replace(new, out_len=len(self.out)))

    def logits(self) -> Logits:
        at = self._states[-1]
        logits = self._base.copy()
        if self._space is not None and bytes(self.out[-1:]) in (b".", b"!", b"?"):
            logits[self._space] = 2.1  # a sentence the decoder ended: go on after a space
        if at.resume >= 0:
            return logits  # in a citation the script does not follow: "]" soonest
        cursor, data = at.cursor, self.data
        if cursor >= len(data):
            for stop in self.vocabulary.stop_ids:
                logits[stop] = 5.0
            return logits
        self._boost(logits, cursor, 10.0)
        skip = self._skip(cursor)
        if skip >= len(data):
            for stop in self.vocabulary.stop_ids:
                logits[stop] = 6.0
        else:
            self._boost(logits, skip, 6.0)
        return logits

    def unwritten(self, n_generated: int | None, why: str) -> Departure | None:
        """The script after the first ``n_generated`` tokens (all: None), if any is left."""
        states = self._states
        kept = len(states) - 1 if n_generated is None else min(n_generated, len(states) - 1)
        at = states[kept]
        cursor = at.resume if at.resume >= 0 else at.cursor
        rest = self.data[cursor:]
        if not rest.strip():
            return None
        return Departure(
            kind=DepartureKind.UNWRITTEN,
            script_offset=cursor,
            wanted=rest,
            position=kept if self._position is None else self._position,
            out_offset=at.out_len,
            char_offset=self._chars(at.out_len),
            why=f"the answer ended ({why}) before the rest of the script was written",
            closed=True,
        )

    # ------------------------------------------------------------------ following

    def _advance(
        self,
        at: _At,
        piece: bytes,
        position: int,
        out_at: int,
        grammar: npt.NDArray[np.bool_] | None,
    ) -> _At:
        data = self.data
        if at.resume >= 0:
            close = piece.find(b"]")
            if close < 0:
                self._extend(at.run)
                return at
            self._extend(at.run, upto=out_at + close + 1)
            self._close_run(at.run)
            rest = piece[close + 1 :]
            at = _At(cursor=at.resume)
            if not rest:
                return at
            piece, out_at = rest, out_at + close + 1
        cursor = at.cursor
        if data.startswith(piece, cursor):
            self._close_run()
            return self._follow(cursor, piece, at.marker)
        close = piece.find(b"]") + 1
        if at.marker >= 0 and 0 < close < len(piece) and data.startswith(piece[:close], cursor):
            # "]." where the script's group goes on ("[1][2]."): the marker itself closed
            # as written; what follows it is judged on its own.
            at = self._follow(cursor, piece[:close], at.marker)
            return self._advance(at, piece[close:], position, out_at + close, grammar)
        self._left = cursor
        running = at.run is not None and not at.run.closed
        skip = self._skip(cursor)
        if at.marker < 0 and not running and data.startswith(piece, skip):
            # The model's second choice: on past the unit it is stuck on. (Once the answer
            # is off the script, text the decoder chose, such as a copy or a quote,
            # rejoins it only where it matches at the cursor.)
            self._close_run()
            self._left_out(cursor, skip, position, out_at, grammar)
            return self._follow(skip, piece, -1)
        opens = piece.find(b"[")
        marker = self._marker_at(cursor)
        if at.marker >= 0 or (opens >= 0 and marker is not None):
            # The output's citation stands where the script's marker is, and differs.
            start = at.marker if at.marker >= 0 else marker
            assert start is not None  # checked just above
            end = self._spans.get(start, start + 1)
            begun = out_at + opens if at.marker < 0 else self._out_marker(at)
            record = self._marker_departure(start, end, position, begun, grammar, at)
            return self._in_citation(record, piece, out_at, opens, end, at, position)
        if opens >= 0:
            if at.run is not None and running:
                record = at.run
            else:
                why = "the script cites nothing here, and the policy required a citation"
                wish = self._wish(cursor)
                kind = DepartureKind.FORCED_MARKER
                record = self._depart(kind, cursor, wish, position, out_at + opens, why, grammar)
            return self._in_citation(record, piece, out_at, opens, cursor, at, position)
        if marker is not None:
            # The script's citation could not open: the model still wants what follows it.
            end = self._spans.get(marker, marker + 1)
            record = self._marker_departure(marker, end, position, out_at, grammar, at)
            return self._rejoin(record, piece, end, out_at)
        if at.run is not None and running:
            return self._rejoin(at.run, piece, cursor, out_at)
        kind, why = self._prose_refusal(cursor, grammar)
        record = self._depart(kind, cursor, self._wish(cursor), position, out_at, why, grammar)
        return self._rejoin(record, piece, cursor, out_at)

    def _prose_refusal(
        self, cursor: int, grammar: npt.NDArray[np.bool_] | None
    ) -> tuple[DepartureKind, str]:
        """Whether the grammar refused the script's text at ``cursor`` (its end: the stop
        token), or the grammar allowed it and the decoder's rules did not; and why."""
        ends = cursor >= len(self.data)
        wished = self.vocabulary.stop_ids if ends else {t for t, _ in self._wished(cursor)}
        if grammar is not None and not any(grammar[t] for t in wished):
            if ends:
                return DepartureKind.GRAMMAR, "the grammar does not let the answer end here"
            return DepartureKind.GRAMMAR, "the grammar cannot take this text here"
        if ends:
            return DepartureKind.REFUSED_TEXT, "the decoder did not end the answer here"
        return DepartureKind.REFUSED_TEXT, (
            "the grammar allows this text, the decoder's rules did not (a regenerated "
            "sentence may not start as before; an operator's ban; a copy or quote instead)"
        )

    def _left_out(
        self,
        cursor: int,
        skip: int,
        position: int,
        out_at: int,
        grammar: npt.NDArray[np.bool_] | None,
    ) -> None:
        """Record the script's unit ``cursor:skip`` as left out of the answer: a group of
        markers (each of them), or text."""
        marker = self._marker_at(cursor)
        if marker is None:
            kind, why = self._prose_refusal(cursor, grammar)
            record = self._depart(
                kind, cursor, self.data[cursor:skip], position, out_at, why, grammar
            )
            record.written, record.closed = b"", True
            return
        while marker is not None and marker < skip:
            end = self._spans.get(marker, marker + 1)
            record = self._marker_departure(marker, end, position, out_at, grammar, _At())
            record.written, record.closed = b"", True
            marker = end if end in self._spans else None

    def _follow(self, cursor: int, piece: bytes, marker: int) -> _At:
        """On the script: the cursor moves past ``piece`` (noting an open citation)."""
        for k, byte in enumerate(piece):
            if byte == 0x5B:  # "["
                marker = cursor + k
            elif byte == 0x5D:  # "]"
                marker = -1
        return _At(cursor=cursor + len(piece), marker=marker)

    def _in_citation(
        self,
        record: Departure,
        piece: bytes,
        out_at: int,
        opens: int,
        resume: int,
        at: _At,
        position: int,
    ) -> _At:
        """The output is in a citation the script does not follow: it rejoins the script
        at ``resume`` when that citation closes."""
        close = piece.find(b"]", max(opens, 0))
        if close < 0:
            self._extend(record)
            return _At(cursor=at.cursor, resume=resume, run=record)
        self._extend(record, upto=out_at + close + 1)
        self._close_run(record)
        rest = piece[close + 1 :]
        if not rest:
            return _At(cursor=resume)
        return self._advance(_At(cursor=resume), rest, position, out_at + close + 1, None)

    def _rejoin(self, record: Departure, piece: bytes, cursor: int, out_at: int) -> _At:
        """After ``record``: ``piece`` rejoins the script at ``cursor``, or is written in
        place of it (the model still wants the script at ``cursor``)."""
        if piece and self.data.startswith(piece, cursor):
            self._extend(record, upto=out_at)
            self._close_run(record)
            return self._follow(cursor, piece, -1)
        self._extend(record)
        return _At(cursor=cursor, run=record)

    def _marker_departure(
        self,
        start: int,
        end: int,
        position: int,
        out_at: int,
        grammar: npt.NDArray[np.bool_] | None,
        at: _At,
    ) -> Departure:
        if at.run is not None and not at.run.closed and at.run.script_offset == start:
            return at.run
        content = self.data[start + 1 : end - 1] if self.data[end - 1 : end] == b"]" else None
        marker = self.data[start:end]
        if content is not None and content.isdigit() and content.isascii():
            index = int(content)
            n = self.log.n_sources
            if n is not None and not 1 <= index <= n:
                why = f"the script cites [{index}], but there are {n} sources"
                kind = DepartureKind.OUT_OF_RANGE
            else:
                why = f"the decoder did not write [{index}] here"
                kind = DepartureKind.REFUSED_ID
            record = self._depart(kind, start, marker, position, out_at, why, grammar)
            record.source_index = index
            return record
        why = (
            "a '[' that opens no citation [N]"
            if content is None
            else "the citation grammar writes one source per marker, as [N]"
        )
        return self._depart(DepartureKind.GRAMMAR, start, marker, position, out_at, why, grammar)

    def _depart(
        self,
        kind: DepartureKind,
        offset: int,
        wanted: bytes,
        position: int,
        out_at: int,
        why: str,
        grammar: npt.NDArray[np.bool_] | None,
    ) -> Departure:
        self._close_run()
        record = Departure(
            kind=kind,
            script_offset=offset,
            wanted=wanted,
            position=position,
            out_offset=out_at,
            char_offset=self._chars(out_at),
            why=why,
            written=bytes(self.out[out_at:]),
            allowed=_describe(grammar, self.pieces, self.vocabulary.stop_ids),
            left_at=self._left,
        )
        return self.log.add(record)

    # ------------------------------------------------------------------ helpers

    def _extend(self, record: Departure | None, upto: int | None = None) -> None:
        if record is not None and not record.closed:
            record.written = bytes(self.out[record.out_offset : upto])

    def _close_run(self, record: Departure | None = None) -> None:
        run = record or self._states[-1].run
        if run is not None:
            run.closed = True

    def _out_marker(self, at: _At) -> int:
        """Output offset of the ``[`` the output's open citation started with."""
        return max(0, self.out.rfind(b"[", 0, at.out_len or len(self.out)))

    def _marker_at(self, cursor: int) -> int | None:
        """The script's marker starting at ``cursor`` (after spaces), as its ``[``."""
        data, start = self.data, cursor
        while start < len(data) and data[start] in b" \t":
            start += 1
        return start if start in self._spans else None

    def _group_end(self, end: int) -> int:
        """Past the markers that follow one ending at ``end`` directly (``[2][3]``)."""
        while end in self._spans:
            end = self._spans[end]
        return end

    def _skip(self, cursor: int) -> int:
        """Past the unit the model is stuck on: the marker group there, or a character
        and its repeats (``zzzz`` that an operator will not let repeat, ``....``) and the
        spaces after them: on to a word, never to a space alone, which the grammar takes
        where it wants a citation or the sentence ended, and which leads nowhere."""
        start = self._marker_at(cursor)
        if start is not None:
            return self._group_end(self._spans[start])
        data = self.data
        step = 1
        while cursor + step < len(data) and data[cursor + step] & 0xC0 == 0x80:
            step += 1
        char, end = data[cursor : cursor + step], cursor + step
        while data.startswith(char, end):
            end += step
        while end < len(data) and data[end] in b" \t":
            end += 1
        return end

    def _script_tokens(self, cursor: int) -> list[tuple[int, bytes]]:
        data = self.data
        if cursor >= len(data):
            return []
        candidates = self._by_first.get(data[cursor], ())
        return [(t, p) for t, p in candidates if data.startswith(p, cursor)]

    def _wished(self, cursor: int) -> list[tuple[int, bytes]]:
        """The tokens that continue the script at ``cursor``; before a marker, those
        that reach its ``[`` (a space alone would strand the model before a citation
        the decoder refuses: ``nice .``)."""
        tokens = self._script_tokens(cursor)
        start = self._marker_at(cursor)
        if start is not None and start > cursor:
            into = [(t, p) for t, p in tokens if cursor + len(p) > start]
            return into or tokens
        return tokens

    def _wish(self, cursor: int) -> bytes:
        """What the script has at ``cursor``: the longest token there, or at least one
        whole character."""
        tokens = self._wished(cursor)
        longest = max((len(p) for _, p in tokens), default=0)
        return self.data[cursor : max(cursor + longest, self._skip(cursor))]

    def _boost(self, logits: Logits, cursor: int, level: float) -> None:
        for token, piece in self._wished(cursor):
            logits[token] = max(logits[token], level + 0.1 * len(piece))

    def _chars(self, out_at: int) -> int:
        out = bytes(self.out[:out_at])
        lead = len(out) - len(out.lstrip())
        return len(out[lead:].decode("utf-8", "replace"))


def _marker_spans(data: bytes) -> dict[int, int]:
    """Each ``[`` of the script and the end of its marker: just past the ``]`` that closes
    it (before any other ``[`` or a newline), else just past the ``[``."""
    spans: dict[int, int] = {}
    for start, byte in enumerate(data):
        if byte != 0x5B:
            continue
        end = start + 1
        for k in range(start + 1, min(len(data), start + _LONGEST_MARKER)):
            if data[k] == 0x5D:
                end = k + 1
                break
            if data[k] in b"[\n":
                break
        spans[start] = end
    return spans


def _describe(
    allowed: npt.NDArray[np.bool_] | None, pieces: Sequence[bytes], stops: frozenset[int]
) -> str:
    """What a grammar mask allowed, in words ('' when unknown)."""
    if allowed is None:
        return ""
    ids = [int(t) for t in np.flatnonzero(allowed)]
    if not ids:
        return "nothing"
    ends = any(t in stops for t in ids)
    if len(ids) > 12:  # prose: say what matters to a citation, not which words
        opens = any(pieces[t].startswith(b"[") for t in ids if t not in stops)
        return (
            f"{len(ids)} tokens"
            + ("" if opens else ", no '['")
            + (", the end of the answer" if ends else ", not the end of the answer")
        )
    names = [repr(pieces[t].decode("utf-8", "replace")) for t in ids if t not in stops]
    if ends:
        names.append("the end of the answer")
    elif len(names) > 1:
        names.append("not the end of the answer")
    return ("only " if len(ids) == 1 else "") + ", ".join(names)
