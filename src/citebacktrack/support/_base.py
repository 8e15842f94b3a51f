"""What every support scorer returns and promises, and the checks and cache they share."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Generic, Protocol, TypeVar, runtime_checkable

from citebacktrack.errors import ConfigurationError, InvalidSourcesError
from citebacktrack.types import Evidence, Source


@dataclass(frozen=True, slots=True)
class SupportResult:
    """How well one source supports one claim."""

    score: float
    """Support in [0, 1]; higher is better supported."""
    is_supported: bool
    """Whether ``score`` reached the scorer's threshold."""
    evidence: str
    """The best-matching passage sentence(s), for traces; may be empty."""
    detail: str
    """A short human-readable reason, e.g. ``"coverage 0.62; missing number 1861"``."""
    spans: tuple[Evidence, ...] = ()
    """The source passages the score rests on, one per source that contributed, in source
    order; each span's ``text`` is ``source.text[start:end]``. Empty when the score rests
    on no passage (nothing to check, nothing matched, or a match in the title only)."""


@runtime_checkable
class SupportScorer(Protocol):
    """Judges whether a numbered source supports a claim."""

    def score(self, claim: str, source_index: int) -> SupportResult:
        """Scores ``claim`` (the sentence so far, markers removed) against source ``source_index``.

        Args:
            claim: Text of the current sentence up to the marker, markers removed.
            source_index: 1-based number of the source, as the model wrote it.

        Raises:
            ConfigurationError: ``source_index`` is not a valid source number.
        """
        ...


@runtime_checkable
class SetSupportScorer(SupportScorer, Protocol):
    """A scorer that can also judge several sources together (a claim that needs two).

    The validator uses :meth:`score_set` for the per-sentence rule (ALCE's citation
    recall: the union of a sentence's cited sources must support it). Scorers without it
    are judged by their best single source.
    """

    def score_set(self, claim: str, source_indices: Sequence[int]) -> SupportResult:
        """Scores ``claim`` against the union of the sources ``source_indices`` (1-based).

        Never lower than the best single source's score.

        Raises:
            ConfigurationError: an index is not a valid source number.
        """
        ...


# --- caching ---------------------------------------------------------------------------------

_K = TypeVar("_K")
_V = TypeVar("_V")


class LRU(Generic[_K, _V]):
    """A small least-recently-used map; ``maxsize`` 0 stores nothing."""

    __slots__ = ("_data", "_maxsize")

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._data: OrderedDict[_K, _V] = OrderedDict()

    def get(self, key: _K) -> _V | None:
        """Returns the cached value (marking it recently used), or None."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: _K, value: _V) -> None:
        """Stores ``value``, evicting the least recently used entry when full."""
        if self._maxsize <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._maxsize:
            self._data.popitem(last=False)


def check_sources(sources: Sequence[Source]) -> tuple[Source, ...]:
    """Returns ``sources`` as a tuple, refusing an empty list."""
    if not sources:
        raise InvalidSourcesError(
            "a support scorer needs at least one source, got an empty list; "
            "pass the same sources the answer is generated from"
        )
    return tuple(sources)


def check_index(source_index: int, count: int) -> None:
    """Raises ConfigurationError unless ``source_index`` is in 1..count."""
    if isinstance(source_index, bool) or not isinstance(source_index, int):
        raise ConfigurationError(f"source_index must be an int in 1..{count}, got {source_index!r}")
    if not 1 <= source_index <= count:
        raise ConfigurationError(
            f"source_index {source_index} is out of range: valid source numbers are 1..{count}"
        )


def is_count(value: object) -> bool:
    """Whether ``value`` is a non-negative int (bools excluded)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def real_number(value: object) -> float | None:
    """Returns ``value`` as a finite float if it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def check_unit(name: str, value: object) -> float:
    """Returns ``value`` as a float, raising ConfigurationError unless it is in [0, 1]."""
    number = real_number(value)
    if number is None or not 0.0 <= number <= 1.0:
        raise ConfigurationError(f"{name} must be a number in [0, 1], got {value!r}")
    return number
