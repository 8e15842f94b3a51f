"""Public value types: sources, policies, citations, answers, stream events and traces.

Every model is frozen and keyword-only. Offsets are Python ``str`` indices into the
answer text; source numbers (``source_index``) are 1-based, as the model writes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Answer",
    "Citation",
    "CitationAccepted",
    "CitationMode",
    "CitationRejected",
    "Done",
    "Event",
    "MarkerStyle",
    "Policy",
    "Reference",
    "RejectionReason",
    "Rollback",
    "Source",
    "StopReason",
    "TextDelta",
    "Trace",
    "TraceEntry",
    "Usage",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class Source(BaseModel):
    """One numbered document the answer may cite."""

    model_config = _FROZEN

    text: str = Field(
        description="The passage text the model reads and citations are checked against."
    )
    id: str | None = Field(
        default=None,
        description="Caller's stable id; defaults to the 1-based position as a string.",
    )
    title: str = Field(default="", description="Short title shown in the prompt and references.")
    url: str | None = Field(default=None, description="Where the source lives, if anywhere.")
    metadata: Mapping[str, str] = Field(
        default_factory=dict,
        description="Free-form string metadata, copied to the source's Reference.",
    )


class CitationMode(StrEnum):
    """When the answer must cite."""

    REQUIRED = "required"
    """Every sentence carries at least one citation (the default)."""
    AUTO = "auto"
    """Citations are optional; those written are still checked."""
    QUOTES_ONLY = "quotes_only"
    """A double-quoted span must be followed by a citation; other prose may go uncited."""


class MarkerStyle(StrEnum):
    """How a citation marker is written."""

    BRACKET = "bracket"
    """``[N]``; several sources are written ``[1][2]``, never ``[1, 2]`` or ranges."""


class Policy(BaseModel):
    """What counts as a well-cited answer. The grammar and the validator both follow it."""

    model_config = _FROZEN

    mode: CitationMode = Field(default=CitationMode.REQUIRED, description="When citations are due.")
    max_citations_per_sentence: int = Field(
        default=3,
        ge=1,
        le=10,
        description=(
            "Most markers in one sentence. The grammar bounds each group of adjacent markers; "
            "the validator counts across the sentence and rejects the marker past the limit."
        ),
    )
    marker_style: MarkerStyle = Field(default=MarkerStyle.BRACKET, description="Marker syntax.")
    fallback: Literal["quote", "abstain"] = Field(
        default="quote",
        description=(
            "REQUIRED: what to do when no sentence the model writes can be supported and "
            "nothing has been accepted yet: 'quote' writes the best-supported source's "
            "evidence sentence verbatim with its citation (checked like any other); "
            "'abstain' ends with stop reason no_supported_answer and an empty text."
        ),
    )
    max_uncited_chars: int = Field(
        default=300,
        ge=20,
        le=2000,
        description=(
            "Under REQUIRED, the most UTF-8 bytes of prose since the last citation (or the start) "
            "before the next token must open a citation (overshot only by what it takes to "
            "finish an ellipsis, abbreviation, decimal or URL in progress); stops a model "
            "rambling uncited. "
            "Token-level backends enforce it in the decoder; the grammar carries it only "
            "when built with bounded=True (for engines that cannot be filtered per token). "
            "The decoder applies it under REQUIRED only."
        ),
    )


class Citation(BaseModel):
    """One ``[N]`` marker in the final answer."""

    model_config = _FROZEN

    start: int = Field(description="Offset of ``[`` in the answer text.")
    end: int = Field(description="Offset just past ``]``.")
    source_index: int = Field(description="1-based number of the cited source, as written.")
    source_id: str = Field(description="Id of the cited source.")
    sentence_start: int = Field(description="Offset where the cited sentence starts.")
    support: float | None = Field(
        default=None, description="Support score the validator gave, if it scored this marker."
    )


class Reference(BaseModel):
    """A source as it appears in the rendered reference list."""

    model_config = _FROZEN

    number: int = Field(description="Position in the reference list (order of first use, 1-based).")
    source_index: int = Field(description="1-based number of the source in the request.")
    source_id: str = Field(description="Id of the source.")
    title: str = Field(default="", description="Title of the source.")
    url: str | None = Field(default=None, description="URL of the source, if any.")
    metadata: Mapping[str, str] = Field(
        default_factory=dict, description="The source's metadata, unchanged."
    )


class StopReason(StrEnum):
    """Why generation ended."""

    END = "end"
    """The model finished a complete answer."""
    MAX_NEW_TOKENS = "max_new_tokens"
    """The token budget ran out; the text is cut at the last complete sentence."""
    BACKTRACK_BUDGET = "backtrack_budget"
    """Too many rollbacks in total."""
    ROLLED_BACK_TOKEN_BUDGET = "rolled_back_token_budget"
    """Too many tokens thrown away by rollbacks."""
    WALL_TIME = "wall_time"
    """The wall-clock budget ran out."""
    NO_VALID_CITATION = "no_valid_citation"
    """A sentence (REQUIRED) or a quote (QUOTES_ONLY) that needs a citation could not be
    given one that passes validation; the answer keeps the supported sentences before it."""
    NO_SUPPORTED_ANSWER = "no_supported_answer"
    """Nothing the model wrote could be supported by any source, not even its first
    sentence: the answer abstains (empty text, ``Answer.abstention`` says why)."""
    DEAD_END = "dead_end"
    """No token was allowed by the grammar and the bans together (a bug or a tiny vocabulary)."""


class RejectionReason(StrEnum):
    """Why the validator rejected a citation."""

    OUT_OF_RANGE = "out_of_range"
    DUPLICATE = "duplicate"
    TOO_MANY = "too_many"
    UNSUPPORTED = "unsupported"
    """The source (with the sentence's other citations) does not support the claim."""
    REDUNDANT = "redundant"
    """The sentence is supported without this source, and it does not support it alone:
    it adds nothing (ALCE's citation precision; stacking ``[1][2][3]`` does not pay)."""


class Usage(BaseModel):
    """Token and compute accounting for one answer."""

    model_config = _FROZEN

    prompt_tokens: int = Field(default=0, description="Tokens in the prompt.")
    completion_tokens: int = Field(default=0, description="Tokens kept in the answer.")
    generated_tokens: int = Field(
        default=0, description="Tokens sampled, including those later rolled back."
    )
    forward_passes: int = Field(
        default=0, description="Model forward passes (prefill counts as one)."
    )


class TraceEntry(BaseModel):
    """One thing the decoder did that a person may want to audit."""

    model_config = _FROZEN

    kind: Literal["rejection", "rollback", "fallback", "operator"] = Field(
        description="What happened."
    )
    token_position: int = Field(description="Generated-token index where it happened.")
    char_offset: int = Field(
        description="Offset in the answer text where it happened (clamped to 0 when it fell "
        "in leading whitespace that the answer drops)."
    )
    source_index: int | None = Field(default=None, description="Citation involved, if any.")
    reason: str = Field(default="", description="Rejection reason, operator name or fallback.")
    score: float | None = Field(default=None, description="Evidence, e.g. the support score.")
    depth: int = Field(default=0, description="Tokens rolled back, for rollbacks.")
    detail: str = Field(default="", description="Human-readable evidence.")


class Trace(BaseModel):
    """Everything the decoder did besides emitting kept tokens."""

    model_config = _FROZEN

    entries: tuple[TraceEntry, ...] = Field(default=(), description="Events in order.")
    backtracks: int = Field(default=0, description="Rollbacks performed.")
    rejections: int = Field(default=0, description="Citations rejected by the validator.")
    tokens_wasted: int = Field(default=0, description="Generated tokens discarded by rollbacks.")
    forward_passes: int = Field(default=0, description="Model forward passes.")
    kept_tokens: int = Field(default=0, description="Tokens in the final answer.")
    stop_reason: StopReason = Field(default=StopReason.END, description="Why decoding ended.")

    @property
    def forward_passes_per_kept_token(self) -> float:
        """Forward passes divided by kept tokens (1.0 means no wasted work)."""
        return self.forward_passes / self.kept_tokens if self.kept_tokens else 0.0


class TextDelta(BaseModel):
    """Answer text that is final: it will never be rolled back."""

    model_config = _FROZEN
    type: Literal["text"] = "text"
    text: str = Field(description="The new text.")


class CitationAccepted(BaseModel):
    """A marker passed validation and its text has been released."""

    model_config = _FROZEN
    type: Literal["citation_accepted"] = "citation_accepted"
    citation: Citation = Field(description="The accepted marker.")


class CitationRejected(BaseModel):
    """A marker failed validation; the decoder rolled back and banned it."""

    model_config = _FROZEN
    type: Literal["citation_rejected"] = "citation_rejected"
    source_index: int = Field(description="The rejected 1-based source number.")
    reason: RejectionReason = Field(description="Why it was rejected.")
    score: float | None = Field(default=None, description="Support score, when scored.")
    char_offset: int = Field(description="Where the marker started in the (draft) text.")


class Rollback(BaseModel):
    """The decoder threw away tokens (never text a consumer has seen)."""

    model_config = _FROZEN
    type: Literal["rollback"] = "rollback"
    depth: int = Field(description="Tokens rolled back.")
    reason: str = Field(description="What caused it.")


class Done(BaseModel):
    """The last event of every stream."""

    model_config = _FROZEN
    type: Literal["done"] = "done"
    usage: Usage = Field(description="Token accounting.")
    trace: Trace = Field(description="What the decoder did.")


Event = Annotated[
    TextDelta | CitationAccepted | CitationRejected | Rollback | Done,
    Field(discriminator="type"),
]
"""Any stream event; ``match`` on the class to handle them."""


class Answer(BaseModel):
    """A cited answer."""

    model_config = _FROZEN

    text: str = Field(description="The answer with inline ``[N]`` markers.")
    citations: tuple[Citation, ...] = Field(default=(), description="Markers in text order.")
    references: tuple[Reference, ...] = Field(
        default=(), description="Cited sources, numbered in order of first use."
    )
    usage: Usage = Field(default_factory=Usage, description="Token accounting.")
    trace: Trace = Field(default_factory=Trace, description="What the decoder did.")

    @property
    def stop_reason(self) -> StopReason:
        """Why generation ended."""
        return self.trace.stop_reason

    @property
    def is_abstained(self) -> bool:
        """True when no answer text could be produced under the policy."""
        return not self.text.strip()

    @property
    def abstention(self) -> str | None:
        """Why there is no answer, in plain words; ``None`` when there is one."""
        if not self.is_abstained:
            return None
        return _ABSTENTIONS.get(
            self.stop_reason, f"no answer could be produced ({self.stop_reason.value})"
        )


_ABSTENTIONS = {
    StopReason.NO_SUPPORTED_ANSWER: (
        "none of the sources supports an answer to this question that the model could "
        "write; nothing was made up instead"
    ),
    StopReason.NO_VALID_CITATION: "the first sentence could not be given a valid citation",
    StopReason.END: "the model wrote nothing",
    StopReason.MAX_NEW_TOKENS: "the token budget ran out before a sentence was complete",
    StopReason.BACKTRACK_BUDGET: "the rollback budget ran out before a sentence was complete",
    StopReason.ROLLED_BACK_TOKEN_BUDGET: (
        "the rolled-back-token budget ran out before a sentence was complete"
    ),
    StopReason.WALL_TIME: "the time budget ran out before a sentence was complete",
    StopReason.DEAD_END: "the grammar and the bans left no token to write",
}
