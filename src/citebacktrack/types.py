"""Public value types: sources, policies, citations, answers, stream events and traces.

Every model is frozen and keyword-only. Offsets are Python ``str`` indices into the
answer text; source numbers (``source_index``) are 1-based, as the model writes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, overload

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import ErrorDetails

from citebacktrack._arguments import CASELESS, Choices, MismatchError, Number, shown
from citebacktrack._departures import DepartureKind, ScriptDeparture
from citebacktrack.adapters import adapt, langchain_fields, llamaindex_fields
from citebacktrack.errors import ConfigurationError, InvalidSourcesError

__all__ = [
    "Answer",
    "ChatMessage",
    "Citation",
    "CitationAccepted",
    "CitationMode",
    "CitationRejected",
    "DepartureKind",
    "Done",
    "Event",
    "Evidence",
    "Policy",
    "Reference",
    "RejectionReason",
    "Rollback",
    "ScriptDeparture",
    "SentenceOrigin",
    "Source",
    "Started",
    "StopReason",
    "TextDelta",
    "Trace",
    "TraceEntry",
    "Usage",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class _Input(BaseModel):
    """A value the caller builds (``Source``, ``Policy``): a value it cannot be built from
    raises this library's typed error (``_error``), naming the field, what was wrong, what
    was given and ``_hint``, instead of pydantic's ``ValidationError`` (``raise ... from``
    keeps pydantic's report). Only ``Model(...)`` maps; ``model_validate`` is pydantic's."""

    _error: ClassVar[type[ConfigurationError]] = ConfigurationError
    _hint: ClassVar[str] = ""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = "; ".join(_problem(error) for error in exc.errors()[:3])
            raise self._error(f"invalid {type(self).__name__}: {problems}; {self._hint}") from exc


def _problem(error: ErrorDetails) -> str:
    """One pydantic error as ``field: what is wrong (got type value)``, and what to pass
    when a rule of :mod:`citebacktrack._arguments` refused it."""
    where = ".".join(str(part) for part in error["loc"]) or "value"
    cause = error.get("ctx", {}).get("error")
    got = f"(got {shown(error.get('input'))})"
    if isinstance(cause, MismatchError):
        return f"{where}: input should be {cause.what} {got}; {cause.hint}"
    what = str(cause) if error["type"] == "value_error" and cause else error["msg"]
    return f"{where}: {what[:1].lower()}{what[1:]} {got}"


def _encodable(value: str | None) -> str | None:
    """``value`` unchanged if it is text UTF-8 can carry (every prompt is sent as UTF-8)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"it holds a lone surrogate {value[exc.start]!r} at offset {exc.start}, which "
                "is not Unicode text; decode the original bytes with errors='replace'"
            ) from None
    return value


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat turn of a prompt."""

    role: Literal["system", "user", "assistant"]
    content: str


class Source(_Input):
    """One numbered document the answer may cite.

    Build one directly, or from a retriever's result with :meth:`from_langchain` or
    :meth:`from_llamaindex`. A field it cannot be built from (text that is not a string
    or is not valid Unicode, an empty id, metadata that is not a mapping of JSON values,
    an unknown field) raises :class:`~citebacktrack.errors.InvalidSourcesError` naming
    the field.
    """

    model_config = _FROZEN
    _error = InvalidSourcesError
    _hint = (
        "pass Source(text=str) and optionally id (a non-empty str), title (str), url (str), "
        "metadata (a dict of JSON values: convert dates to ISO strings) and score (a number)"
    )

    text: str = Field(
        description="The passage text the model reads and citations are checked against."
    )
    id: str | None = Field(
        default=None,
        description="Caller's stable id; defaults to the 1-based position as a string.",
    )
    title: str = Field(default="", description="Short title shown in the prompt and references.")
    url: str | None = Field(default=None, description="Where the source lives, if anywhere.")
    metadata: Mapping[str, JsonValue] = Field(
        default_factory=dict,
        description="Free-form metadata (any JSON value), copied to the source's Reference.",
    )
    score: Annotated[float | None, Number(example=0.5, optional=True).field()] = Field(
        default=None,
        description="The retriever's relevance score, if any; copied to the Reference. "
        "Never used to judge support.",
    )

    @field_validator("text", "id", "title", "url")
    @classmethod
    def _check_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.field_name == "id" and value is not None and not value.strip():
            raise ValueError("an id must be a non-empty string, or None for the source's position")
        return _encodable(value)

    @overload  # a list is also an object: the list overload comes first
    @classmethod
    def from_langchain(cls, document: list[Any], *, score: None = None) -> list[Source]: ...  # type: ignore[overload-overlap]
    @overload
    @classmethod
    def from_langchain(cls, document: object, *, score: float | None = None) -> Source: ...
    @classmethod
    def from_langchain(cls, document: object, *, score: float | None = None) -> Any:
        """A source from a LangChain ``Document`` or ``(Document, score)`` pair; from a list
        of them (a retriever's result), a list of sources. Duck-typed: no LangChain import.
        :func:`~citebacktrack.adapters.langchain_fields` maps the fields and says what it
        raises (:class:`~citebacktrack.errors.InvalidSourcesError`)."""
        return adapt(cls, document, langchain_fields, score=score)

    @overload
    @classmethod
    def from_llamaindex(cls, node: list[Any], *, score: None = None) -> list[Source]: ...  # type: ignore[overload-overlap]
    @overload
    @classmethod
    def from_llamaindex(cls, node: object, *, score: float | None = None) -> Source: ...
    @classmethod
    def from_llamaindex(cls, node: object, *, score: float | None = None) -> Any:
        """A source from a LlamaIndex ``NodeWithScore`` or node; from a list of them, a list
        of sources. Duck-typed: no LlamaIndex import. Fields are mapped (and errors raised)
        by :func:`~citebacktrack.adapters.llamaindex_fields`."""
        return adapt(cls, node, llamaindex_fields, score=score)


class CitationMode(Choices):
    """When the answer must cite. Its values are matched ignoring case and surrounding
    whitespace (``CitationMode(" AUTO ")``, ``Policy(mode="Required")``); any other value
    raises :class:`~citebacktrack.errors.ConfigurationError`."""

    REQUIRED = "required"
    """Every sentence carries at least one citation (the default)."""
    AUTO = "auto"
    """Citations are optional; those written are still checked."""
    QUOTES_ONLY = "quotes_only"
    """A double-quoted span must be followed by a citation; other prose may go uncited."""


class Policy(_Input):
    """What counts as a well-cited answer. The grammar and the validator both follow it.

    A value out of range or of the wrong type (a bool or a string for a number) raises
    :class:`~citebacktrack.errors.ConfigurationError` naming the field; ``mode`` and
    ``fallback`` are matched ignoring case and surrounding whitespace.
    """

    model_config = _FROZEN
    _hint = (
        "mode is one of 'required', 'auto', 'quotes_only' (any case); "
        "max_citations_per_sentence an int 1..10; fallback 'copy', 'quote' or 'abstain'; "
        "max_uncited_chars an int 20..2000"
    )

    mode: CitationMode = Field(default=CitationMode.REQUIRED, description="When citations are due.")
    max_citations_per_sentence: Annotated[int, Number(example=3, whole=True).field()] = Field(
        default=3,
        ge=1,
        le=10,
        description=(
            "Most markers in one sentence. The grammar bounds each group of adjacent markers; "
            "the validator counts across the sentence and rejects the marker past the limit."
        ),
    )
    fallback: Annotated[Literal["copy", "quote", "abstain"], CASELESS] = Field(
        default="copy",
        description=(
            "REQUIRED: what to do with a sentence that no source supports after its "
            "retries. 'copy' (grounded recovery) regenerates it constrained to the "
            "sentences of the best-supported sources, the model's likelihood choosing "
            "which, cited to its source, and ends the answer after it; when no copy can "
            "be made and nothing has been accepted yet, it quotes as 'quote' does. "
            "'quote' keeps the supported sentences before it, or, when nothing has been "
            "accepted yet, writes the best-supported source's evidence sentence verbatim "
            "with its citation (checked like any other). 'abstain' keeps the supported "
            "sentences or ends with stop reason no_supported_answer and an empty text."
        ),
    )
    max_uncited_chars: Annotated[int, Number(example=300, whole=True).field()] = Field(
        default=300,
        ge=20,
        le=2000,
        description=(
            "Under REQUIRED, the most characters (Unicode code points, as the grammar counts "
            "them) of prose since the last citation (or the start) "
            "before the next token must open a citation (overshot only by what it takes to "
            "finish an ellipsis, abbreviation, decimal or URL in progress); stops a model "
            "rambling uncited. "
            "Token-level backends enforce it in the decoder; the grammar carries it only "
            "when built with bounded=True (for engines that cannot be filtered per token). "
            "The decoder applies it under REQUIRED only."
        ),
    )


class Evidence(BaseModel):
    """The passage of a source that a citation rests on: what the validator matched.

    ``text`` is always ``sources[source_index - 1].text[start:end]`` (Python ``str``
    offsets into the source's text), so it can be quoted or highlighted as is.
    """

    model_config = _FROZEN

    source_index: int = Field(description="1-based number of the source the span is in.")
    start: int = Field(ge=0, description="Offset of the span's first character in the source.")
    end: int = Field(ge=0, description="Offset just past the span's last character.")
    text: str = Field(description="The quoted source text, ``source.text[start:end]``.")


class SentenceOrigin(Choices):
    """How a cited sentence of the answer was obtained."""

    MODEL = "model"
    """The model's own words, checked against the sources it cites."""
    COPY = "copy"
    """Grounded recovery: the model's own sentence could not be supported, so it was
    regenerated constrained to the sentences of the best-supported sources (the model's
    likelihood chose which); a verbatim copy of the cited source."""
    QUOTE = "quote"
    """The quote fallback: the source sentence the validator picked, written verbatim."""


class Citation(BaseModel):
    """One ``[N]`` marker in the final answer.

    Three numbers name a cited source, and they differ on purpose:

    * ``source_index``: the number written in the answer's ``[N]``, the source's
      1-based position in the request (what the model saw in the prompt);
    * ``source_id``: the caller's own id for that source (``Source.id``);
    * ``reference_number``: its position in the rendered reference list, numbered by
      first use (``render(..., renumber=True)`` rewrites ``[N]`` to it).
    """

    model_config = _FROZEN

    start: int = Field(description="Offset of ``[`` in the answer text.")
    end: int = Field(description="Offset just past ``]``.")
    source_index: int = Field(description="1-based number of the cited source, as written.")
    source_id: str = Field(
        default="",
        description="Id of the cited source (stamped by the answer builder from its Source).",
    )
    sentence_start: int = Field(description="Offset where the cited sentence starts.")
    claim: str = Field(
        default="",
        description="The sentence text the marker was checked against (markers removed).",
    )
    support: float | None = Field(
        default=None, description="Support score the validator gave, if it scored this marker."
    )
    evidence: Evidence | None = Field(
        default=None,
        description="The span of the cited source the support rests on (``None`` when no "
        "scorer checked the marker).",
    )
    reference_number: int = Field(
        default=0,
        description="Number of the cited source in the reference list (order of first "
        "use, 1-based); 0 in a backend's own events, set by the answer builder.",
    )
    origin: SentenceOrigin = Field(
        default=SentenceOrigin.MODEL,
        description="How the cited sentence was obtained: the model's own words, a "
        "grounded copy of a source sentence, or the quote fallback.",
    )


class Reference(BaseModel):
    """A source as it appears in the rendered reference list."""

    model_config = _FROZEN

    number: int = Field(description="Position in the reference list (order of first use, 1-based).")
    source_index: int = Field(description="1-based number of the source in the request.")
    source_id: str = Field(description="Id of the source.")
    title: str = Field(default="", description="Title of the source.")
    url: str | None = Field(default=None, description="URL of the source, if any.")
    metadata: Mapping[str, JsonValue] = Field(
        default_factory=dict, description="The source's metadata, unchanged."
    )
    score: float | None = Field(default=None, description="The source's retrieval score.")


class StopReason(Choices):
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
    FALLBACK = "fallback"
    """Nothing in the model's own words could be supported: the answer is only grounded
    copies of source sentences or a quote (``Citation.origin`` says which)."""


class RejectionReason(Choices):
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

    kind: Literal["rejection", "rollback", "fallback", "operator", "departure"] = Field(
        description="What happened (``departure``: only from a scripted test model)."
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
    """Everything the decoder did besides emitting kept tokens.

    ``entries`` holds at most :attr:`MAX_ENTRIES`: a decode with more (tens of thousands
    of rollbacks under large budgets) keeps the first and the last half of that many and
    counts the others in ``dropped_entries``, so its memory does not grow with every
    rollback; the counts (``backtracks``, ``rejections``, ...) always count everything.
    """

    model_config = _FROZEN

    MAX_ENTRIES: ClassVar[int] = 1000
    """Most entries one trace keeps (the first and the last half of them)."""

    entries: tuple[TraceEntry, ...] = Field(default=(), description="Events in order.")
    dropped_entries: int = Field(
        default=0,
        description="Entries left out between the first and the last "
        "``MAX_ENTRIES // 2`` (0 unless the trace outgrew ``MAX_ENTRIES``).",
    )
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
    def is_fallback(self) -> bool:
        """True when the answer has citations and none of them cites the model's own
        words: every sentence is a grounded copy or a quote of a source."""
        return bool(self.citations) and all(
            citation.origin is not SentenceOrigin.MODEL for citation in self.citations
        )

    @property
    def abstention(self) -> str | None:
        """Why there is no answer, in plain words; ``None`` when there is one."""
        if not self.is_abstained:
            return None
        return _ABSTENTIONS.get(
            self.stop_reason, f"no answer could be produced ({self.stop_reason.value})"
        )


class Started(BaseModel):
    """The first event of a :class:`~citebacktrack.Citeformer` stream, sent before the
    model reads the prompt: the sources the answer's ``[N]`` markers number, in order
    (``[N]`` is ``sources[N - 1]``), so a client can list them, and later open a
    citation's evidence in its passage, before any text arrives. A backend's own stream
    has no ``Started``: the answer builder sends it."""

    model_config = _FROZEN
    type: Literal["started"] = "started"
    sources: tuple[Source, ...] = Field(description="The numbered sources, [1] first.")


class TextDelta(BaseModel):
    """Answer text that is final: it will never be rolled back. Its markers are written
    as the answer's text writes them, ``[N]`` the source's number in the request; the
    :class:`CitationAccepted` of each marker comes just before the text that holds it,
    with the source's reference number (order of first use)."""

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
    """The last event of every stream.

    From :class:`~citebacktrack.Citeformer` (and ``Backend.generate``) it carries the
    finished :class:`Answer`, the same one ``generate`` returns; a backend's own stream
    ends with ``answer=None`` and the answer builder fills it in. With an answer, its
    JSON holds the usage and trace once, inside ``answer`` (``usage`` and ``trace`` are
    the answer's own, and are read back from it).
    """

    model_config = _FROZEN
    type: Literal["done"] = "done"
    usage: Usage = Field(description="Token accounting.")
    trace: Trace = Field(description="What the decoder did.")
    answer: Answer | None = Field(default=None, description="The finished answer.")

    @model_validator(mode="before")
    @classmethod
    def _from_answer(cls, data: Any) -> Any:
        answer = data.get("answer") if isinstance(data, dict) else None
        if isinstance(answer, Answer):
            return {"usage": answer.usage, "trace": answer.trace} | data
        if isinstance(answer, dict):
            return {name: answer[name] for name in ("usage", "trace") if name in answer} | data
        return data

    @model_serializer(mode="wrap")
    def _once(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if self.answer is not None:
            data.pop("usage", None)
            data.pop("trace", None)
        return data


Event = Annotated[
    Started | TextDelta | CitationAccepted | CitationRejected | Rollback | ScriptDeparture | Done,
    Field(discriminator="type"),
]
"""Any stream event; ``match`` on the class to handle them."""


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
