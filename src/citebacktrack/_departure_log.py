"""What a scripted test model reports: its departures from its script, and the stream
events and trace entries they become.

:class:`Departure` is one place where the answer left the script; :class:`DepartureLog`
holds those of one answer, each place once (or raises at the first, in strict mode);
:class:`DepartureReport` folds them into the backend's event stream and its trace;
:class:`WatchedMatcher` lets the model see the grammar's mask, so that a departure can
say what the grammar allowed. :mod:`citebacktrack._script` is the model that finds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from citebacktrack._departures import DepartureKind, ScriptDeparture
from citebacktrack.decoding.matcher import TokenMatcher
from citebacktrack.errors import ScriptDepartureError
from citebacktrack.types import (
    CitationRejected,
    Done,
    Event,
    RejectionReason,
    TextDelta,
    Trace,
    TraceEntry,
)

__all__ = ["Departure", "DepartureLog", "DepartureReport", "WatchedMatcher"]


@dataclass(slots=True)
class Departure:
    """One place where the answer left the script (byte offsets; see ``event``)."""

    kind: DepartureKind
    script_offset: int
    """Byte offset in the script of the unit left (a marker's ``[``)."""
    wanted: bytes
    position: int
    """Generated-token index (a segment engine: its call number)."""
    out_offset: int
    """Byte offset in the model's output where it happened."""
    char_offset: int
    """The same in characters of the answer (leading whitespace not counted)."""
    why: str
    written: bytes = b""
    source_index: int | None = None
    allowed: str = ""
    closed: bool = False
    left_at: int = -1
    """Byte offset in the script where the answer left it (the caret of the error);
    -1: ``script_offset``."""

    def detail(self, script: bytes) -> str:
        """One line: where, what, why, and what the grammar allowed."""
        at = len(script[: self.script_offset].decode("utf-8", "ignore"))
        wanted = self.wanted.decode("utf-8", "replace")
        text = f"script offset {at}: {self.why}"
        if self.kind is not DepartureKind.UNWRITTEN:
            written = self.written.decode("utf-8", "replace")
            text += f"; the script has {wanted!r}, the answer {written!r}"
        if self.allowed:
            text += f"; the grammar allowed {self.allowed}"
        return text

    def event(self, script: bytes) -> ScriptDeparture:
        return ScriptDeparture(
            kind=self.kind,
            script_offset=len(script[: self.script_offset].decode("utf-8", "ignore")),
            char_offset=self.char_offset,
            wanted=self.wanted.decode("utf-8", "replace"),
            written=self.written.decode("utf-8", "replace"),
            source_index=self.source_index,
            detail=self.detail(script),
        )

    def error(self, script: bytes, context: str = "") -> ScriptDepartureError:
        """The strict mode's error: the script with a caret under the place left
        (``context``: what happened before, e.g. the last rejection)."""
        text = script.decode("utf-8", "replace")
        left = self.left_at if self.left_at >= 0 else self.script_offset
        at = len(script[:left].decode("utf-8", "ignore"))
        start = text.rfind("\n", 0, at) + 1
        end = text.find("\n", at)
        line = text[start : end if end >= 0 else len(text)]
        column = at - start
        if column > 60:  # keep the caret on screen: show the line from a little before it
            line, column = "…" + line[column - 50 :], 51
        message = (
            f"the answer left the script at offset {at} ({self.kind.value}):\n"
            f"  {line}\n  {' ' * column}^\n{self.detail(script)}{context}"
        )
        return ScriptDepartureError(message, script=text, offset=at, kind=self.kind.value)


class DepartureLog:
    """The departures of one answer, each place of the script once.

    Args:
        script: what the model wants to write.
        n_sources: the request's number of sources (to tell an id out of range), or None.
        strict: raise :class:`ScriptDepartureError` at the first departure instead.
    """

    def __init__(self, script: str, *, n_sources: int | None = None, strict: bool = False) -> None:
        self.script = script.encode()
        self.n_sources = n_sources
        self.strict = strict
        self.departures: list[Departure] = []
        self.last_rejection = ""
        """The last ``CitationRejected`` of the answer so far, in words (for the error)."""
        self._places: set[tuple[DepartureKind, int]] = set()

    def add(self, departure: Departure) -> Departure:
        """Record ``departure`` unless its place was recorded before (strict: raise)."""
        if self.strict:
            context = f"\n(after {self.last_rejection})" if self.last_rejection else ""
            raise departure.error(self.script, context)
        place = (departure.kind, departure.script_offset)
        if place not in self._places:
            self._places.add(place)
            self.departures.append(departure)
        return departure

    def close_all(self) -> None:
        for departure in self.departures:
            departure.closed = True


class WatchedMatcher:
    """A :class:`TokenMatcher` that shows a scripted model the grammar's mask before each
    token it accepts (``used``: the mask of the last accepted token, when one was built)."""

    def __init__(self, inner: TokenMatcher) -> None:
        self.inner = inner
        self._last: npt.NDArray[np.bool_] | None = None
        self.used: npt.NDArray[np.bool_] | None = None

    def allowed(self) -> npt.NDArray[np.bool_]:
        self._last = self.inner.allowed()
        return self._last

    def accept_token(self, token: int) -> bool:
        accepted = self.inner.accept_token(token)
        if accepted:
            self.used, self._last = self._last, None
        return accepted

    def rollback(self, n_tokens: int) -> None:
        self.inner.rollback(n_tokens)
        self._last = self.used = None

    def take(self) -> npt.NDArray[np.bool_] | None:
        """The mask the last accepted token was chosen under, once."""
        used, self.used = self.used, None
        return used


class DepartureReport:
    """Folds a scripted model's departures into its backend's stream: feed it every
    event in order; it returns the events to pass on.

    Each departure becomes a :class:`ScriptDeparture` event and a ``departure`` trace
    entry (an id out of range also a ``CitationRejected`` and a ``rejection`` entry,
    counted in ``Trace.rejections``), placed after the rejections seen before it.

    Args:
        log: the departures of this answer.
        unwritten: at ``Done``, given it and the text released, the rest of the script
            never written, if any.
    """

    def __init__(
        self, log: DepartureLog, unwritten: Callable[[Done, str], Departure | None]
    ) -> None:
        self.log = log
        self._unwritten = unwritten
        self._text: list[str] = []
        self._sent = 0
        self._rejections = 0
        self._rejected: set[int] = set()
        self._extra = 0
        self._entries: list[tuple[float, TraceEntry]] = []

    def feed(self, event: Event) -> list[Event]:
        if not isinstance(event, Done):
            events = self._flush()
            if isinstance(event, TextDelta):
                self._text.append(event.text)
            elif isinstance(event, CitationRejected):
                self._rejections += 1
                self._rejected.add(event.source_index)
                self.log.last_rejection = (
                    f"[{event.source_index}] was rejected: {event.reason.value}"
                )
            events.append(event)
            return events
        self.log.close_all()
        events = self._flush()
        last = self._unwritten(event, "".join(self._text))
        if last is not None:
            self.log.add(last)
        events += self._flush(last=True)
        events.append(self._done(event))
        return events

    def _flush(self, *, last: bool = False) -> list[Event]:
        events: list[Event] = []
        departures, script = self.log.departures, self.log.script
        while self._sent < len(departures) and departures[self._sent].closed:
            departure = departures[self._sent]
            self._sent += 1
            anchor = float("inf") if last else self._rejections
            detail = departure.detail(script)
            index = departure.source_index
            if departure.kind is DepartureKind.OUT_OF_RANGE and index not in self._rejected:
                self._rejected.add(index or 0)
                self._extra += 1
                reason = RejectionReason.OUT_OF_RANGE
                events.append(
                    CitationRejected(
                        source_index=index or 0, reason=reason, char_offset=departure.char_offset
                    )
                )
                self._entries.append((anchor, _entry(departure, "rejection", reason, detail)))
            events.append(departure.event(script))
            self._entries.append((anchor, _entry(departure, "departure", departure.kind, detail)))
        return events

    def _done(self, done: Done) -> Done:
        if not self._entries:
            return done
        trace, pending = done.trace, list(self._entries)
        merged: list[TraceEntry] = []
        seen = 0
        for entry in trace.entries if not trace.dropped_entries else ():
            if entry.kind != "rollback":
                while pending and pending[0][0] <= seen:
                    merged.append(pending.pop(0)[1])
            merged.append(entry)
            seen += entry.kind == "rejection"
        if trace.dropped_entries:
            merged = list(trace.entries)
        merged += [entry for _, entry in pending]
        dropped = trace.dropped_entries
        half = Trace.MAX_ENTRIES // 2
        if len(merged) > Trace.MAX_ENTRIES:
            dropped += len(merged) - Trace.MAX_ENTRIES
            merged = merged[:half] + merged[-(Trace.MAX_ENTRIES - half) :]
        update = {
            "entries": tuple(merged),
            "dropped_entries": dropped,
            "rejections": trace.rejections + self._extra,
        }
        return done.model_copy(update={"trace": trace.model_copy(update=update)})


def _entry(departure: Departure, kind: str, reason: str, detail: str) -> TraceEntry:
    return TraceEntry(
        kind=kind,
        token_position=departure.position,
        char_offset=departure.char_offset,
        source_index=departure.source_index,
        reason=str(reason),
        detail=detail,
    )
