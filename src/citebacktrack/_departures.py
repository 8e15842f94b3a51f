"""The event a scripted test model sends where the decoder did not write its script.

Only the test doubles (:class:`~citebacktrack.MockBackend`,
:class:`~citebacktrack.FunctionBackend`, :class:`~citebacktrack.MockSegmentBackend`)
send it: a real model has no script to leave. :mod:`citebacktrack.types` re-exports both
names and holds :class:`ScriptDeparture` in its ``Event`` union.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DepartureKind", "ScriptDeparture"]


class DepartureKind(StrEnum):
    """Where and why the answer left a scripted model's script."""

    OUT_OF_RANGE = "out_of_range"
    """The script cites a source that does not exist (``[42]`` of 10): the grammar
    cannot write it. A :class:`~citebacktrack.types.CitationRejected` with reason
    ``out_of_range`` comes with it."""
    REFUSED_ID = "refused_id"
    """The script cites a real source that the decoder refused there (validation, a ban
    after a rejection, a citation the sentence does not need); the decoder's own
    ``CitationRejected`` usually says why."""
    GRAMMAR = "grammar"
    """Script text the citation grammar cannot take (``[5, 6]``, a stray ``]``)."""
    REFUSED_TEXT = "refused_text"
    """Script text the grammar allows but the decoder did not write: a sentence
    regenerated after its citations failed (its first token is banned), a grounded copy
    or quote written in its place, the uncited-characters bound."""
    FORCED_MARKER = "forced_marker"
    """A citation the script does not have, written because the policy requires one."""
    UNWRITTEN = "unwritten"
    """The answer ended before the script did (a fallback, a budget, a repeated
    sentence): the rest of the script was never written."""


class ScriptDeparture(BaseModel):
    """The answer left the test model's script here (test doubles only).

    The same departure is a :class:`~citebacktrack.types.TraceEntry` of kind
    ``"departure"`` (``reason`` is ``kind``, ``detail`` the same words). Each place in
    the script is reported once, however often the decoder retries there.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["script_departure"] = "script_departure"
    kind: DepartureKind = Field(description="What kind of departure.")
    script_offset: int = Field(description="Where in the script (a ``str`` offset).")
    char_offset: int = Field(description="Where in the (draft) answer text it happened.")
    wanted: str = Field(description="What the script has there (a marker: all of it).")
    written: str = Field(default="", description="What the answer has there instead.")
    source_index: int | None = Field(
        default=None, description="The id the script cites, for a citation's departure."
    )
    detail: str = Field(default="", description="Human-readable: why, and what was allowed.")
