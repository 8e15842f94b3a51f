"""The trace entries of one answer, in bounded memory.

The token-level decoder and the segment loop append a :class:`~citebacktrack.types.TraceEntry`
for every rejection, rollback and fallback. Under large budgets a decode can roll back tens
of thousands of times; :class:`TraceLog` keeps the first and the last
``Trace.MAX_ENTRIES // 2`` entries and counts those in between, so memory stays flat
however long the decode runs.
"""

from __future__ import annotations

from collections import deque

from citebacktrack.types import Trace, TraceEntry

__all__ = ["TraceLog"]


class TraceLog:
    """Trace entries in order, at most ``limit`` of them kept (the first and last halves).

    Args:
        limit: most entries kept; by default :attr:`Trace.MAX_ENTRIES` (read when the
            log is made).
    """

    __slots__ = ("_head", "_head_size", "_tail", "dropped")

    def __init__(self, limit: int | None = None) -> None:
        limit = Trace.MAX_ENTRIES if limit is None else limit
        self._head_size = limit // 2
        self._head: list[TraceEntry] = []
        self._tail: deque[TraceEntry] = deque(maxlen=limit - self._head_size)
        self.dropped = 0
        """Entries appended but no longer kept."""

    def append(self, entry: TraceEntry) -> None:
        """Keep ``entry``; past the limit the oldest entry after the first half goes."""
        if len(self._head) < self._head_size:
            self._head.append(entry)
            return
        if len(self._tail) == self._tail.maxlen:
            self.dropped += 1
        self._tail.append(entry)

    def entries(self) -> tuple[TraceEntry, ...]:
        """The kept entries, in order."""
        return (*self._head, *self._tail)

    def __len__(self) -> int:
        return len(self._head) + len(self._tail)
