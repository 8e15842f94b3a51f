"""The request a backend answers: one backend-neutral task plus each mechanism's options.

Every backend gets the same task: the chat ``messages`` (sources already stitched in),
the ``sources`` themselves, the citation ``policy``, its ``grammar`` (the IR, compiled to
whatever dialect the engine speaks), the ``validator`` that decides what a valid citation
is, and the ``budgets`` that make every answer end. How the answer is produced is the
backend's business, and each mechanism reads only its own options:

* :class:`DecodingOptions`: token-level decoding (the local backends): the sampler and
  the backtracking operators;
* :class:`SegmentOptions`: segment-level decoding (backends over a server or API that
  cannot roll back a KV cache and resubmit up to the next citation instead).

A backend never receives a knob of another mechanism that it would have to ignore.
:class:`~citebacktrack.Citeformer` builds requests (``Citeformer.build_request``); a
hand-built one can be passed to ``Citeformer.generate`` and gives the same answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from citebacktrack._arguments import Number, check_fields, instance, refused
from citebacktrack.adapters import adapter_hint
from citebacktrack.errors import ConfigurationError, InvalidSourcesError
from citebacktrack.grammar.citations import MAX_SOURCES
from citebacktrack.types import ChatMessage, Policy, Source

if TYPE_CHECKING:
    from citebacktrack.decoding.operators import Operator
    from citebacktrack.grammar.ir import Grammar
    from citebacktrack.validation import CitationValidator

__all__ = [
    "Budgets",
    "DecodingOptions",
    "GenerationRequest",
    "SamplingConfig",
    "SegmentOptions",
    "check_sources",
    "source_id",
]


def _operator_tuple(operators: object) -> tuple[Operator, ...]:
    """``operators`` as a tuple, each checked to be an operator (an object with
    ``max_depth`` and ``check``, :class:`~citebacktrack.decoding.operators.Operator`).

    Raises:
        ConfigurationError: not a list or tuple of operators (a single operator, a string
            and a ``None`` are refused), naming the item.
    """
    name = "operators"
    hint = (
        "pass a list of operators, e.g. [ProbabilityThreshold(0.05)] from "
        "citebacktrack.decoding.operators, or () for none"
    )
    if isinstance(operators, str | bytes | Mapping) or not isinstance(operators, Iterable):
        raise refused(name, operators, "a list or tuple of operators", hint)
    items = tuple(operators)
    for number, item in enumerate(items):
        if not (hasattr(item, "max_depth") and callable(getattr(item, "check", None))):
            raise refused(f"{name}[{number}]", item, "an operator", hint)
    return items


def source_id(source: Source, number: int) -> str:
    """The id of the ``number``-th (1-based) source: its own, else its position."""
    return source.id if source.id is not None else str(number)


def check_sources(sources: Sequence[object]) -> None:
    """The one rule for the sources of a request, however it was built: at least one and
    at most :data:`~citebacktrack.grammar.MAX_SOURCES`, each a :class:`Source` with text
    that is not blank, and no two with the same id (a source without one is named by its
    1-based position, so ``Source(id="2")`` and an id-less second source collide).

    Raises:
        InvalidSourcesError: the first rule broken, with the source's number and what to do
            (for a LangChain document or LlamaIndex node, the adapter that converts it).
    """
    if not sources:
        raise InvalidSourcesError("no sources given; pass at least one Source to cite")
    if len(sources) > MAX_SOURCES:
        raise InvalidSourcesError(
            f"{len(sources)} sources given but at most {MAX_SOURCES} are supported; "
            f"retrieve fewer passages (e.g. the best {MAX_SOURCES} by score)"
        )
    seen: dict[str, int] = {}
    for number, source in enumerate(sources, start=1):
        if not isinstance(source, Source):
            hint = adapter_hint(source) or "pass Source(text=...) (or, to Citeformer, a str)"
            raise InvalidSourcesError(
                f"source {number} is of type {type(source).__name__}, not Source; {hint}"
            )
        if not source.text.strip():
            raise InvalidSourcesError(
                f"source {number} (id {source.id!r}) has empty text; drop it or fill it"
            )
        given = source_id(source, number)
        if given in seen:
            raise InvalidSourcesError(
                f"sources {seen[given]} and {number} share the id {given!r}; ids must be unique"
            )
        seen[given] = number


@dataclass(frozen=True, slots=True, kw_only=True)
class Budgets:
    """Limits on one answer's decoding.

    Attributes:
        max_new_tokens: tokens the answer may keep (stop reason ``max_new_tokens``).
        retries_per_checkpoint: rejected markers allowed in one sentence before the
            decoder escalates to regenerating the whole sentence.
        sentence_retries: whole-sentence regenerations allowed before the policy's
            fallback (drop the marker under AUTO; end the answer, stop reason
            ``no_valid_citation``, under REQUIRED and QUOTES_ONLY).
        max_backtracks: rollbacks in total (stop reason ``backtrack_budget``).
        max_rolled_back_tokens: tokens thrown away in total (``rolled_back_token_budget``).
        max_wall_time_s: seconds for the whole decode, ``None`` for no limit (``wall_time``).

    Raises:
        ConfigurationError: a count that is not an int (a bool, a string or a float is
            refused) or is out of range, or a time that is not a positive number; the
            message names the field, the value given and what to pass.
    """

    max_new_tokens: int = 256
    retries_per_checkpoint: int = 3
    sentence_retries: int = 1
    max_backtracks: int = 32
    max_rolled_back_tokens: int = 1024
    max_wall_time_s: float | None = None

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "max_new_tokens": Number(256, whole=True, minimum=1),
                "retries_per_checkpoint": Number(3, whole=True, minimum=0),
                "sentence_retries": Number(1, whole=True, minimum=0),
                "max_backtracks": Number(32, whole=True, minimum=1),
                "max_rolled_back_tokens": Number(1024, whole=True, minimum=1),
                "max_wall_time_s": Number(30.0, above=0, optional=True),
            },
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingConfig:
    """How to pick the next token.

    Attributes:
        temperature: 0 means greedy (argmax); above 0 samples from the softened distribution.
        top_k: keep only the k most likely tokens (0: all).
        top_p: keep the smallest set of tokens whose probability reaches p (1.0: all).
        seed: seed of the random state; the same seed and inputs give the same answer.

    Raises:
        ConfigurationError: a field of the wrong type (a bool or a string is never a
            number; ``top_k`` and ``seed`` are ints) or out of range, named in the message.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "temperature": Number(0.7, minimum=0),  # 0 is greedy
                "top_k": Number(40, whole=True, minimum=0),  # 0 keeps all tokens
                "top_p": Number(0.9, above=0, maximum=1),
                "seed": Number(0, whole=True),
            },
        )

    @property
    def is_greedy(self) -> bool:
        """True when decoding is deterministic argmax."""
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodingOptions:
    """Options of token-level decoding (the backtracking decoder of the local backends).

    Attributes:
        sampling: how each token is picked (default greedy).
        operators: extra rules that may roll back after any token
            (:mod:`citebacktrack.decoding.operators`).
    """

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    operators: tuple[Operator, ...] = ()

    def __post_init__(self) -> None:
        hint = "pass SamplingConfig(...), or leave it out for greedy decoding"
        instance("DecodingOptions.sampling", self.sampling, SamplingConfig, hint, optional=False)
        object.__setattr__(self, "operators", _operator_tuple(self.operators))


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentOptions:
    """Options of segment-level decoding: a server or API generates up to the next
    citation, the validator checks it, a rejection resubmits the accepted prefix.

    Attributes:
        temperature: sampling temperature sent to the server (0: greedy).
        top_p: nucleus sampling mass sent to the server (1.0: off).
        seed: seed sent to servers that accept one (``None``: none sent).
        max_segment_tokens: most tokens asked for in one call (one segment).
        resample_temperature: the temperature of a sentence regeneration (when no source
            supports a sentence, ``Budgets.sentence_retries`` times): a greedy server would
            write the same sentence again. Its seed is ``seed`` (or 0) plus the retry number.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_segment_tokens: int = 256
    resample_temperature: float = 0.7

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "temperature": Number(0.7, minimum=0),
                "top_p": Number(0.9, above=0, maximum=1),
                "seed": Number(0, whole=True, optional=True),
                "max_segment_tokens": Number(256, whole=True, minimum=1),
                "resample_temperature": Number(0.7, minimum=0),
            },
        )

    @classmethod
    def from_sampling(cls, sampling: SamplingConfig) -> SegmentOptions:
        """The server-side equivalent of ``sampling`` (``top_k`` has no equivalent on
        every server and is not carried over)."""
        return cls(temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """Everything a backend needs to produce one cited answer.

    Backends own only the mechanism (how to constrain, how to roll back), never the
    policy: what counts as a valid citation lives in ``validator``.

    Attributes:
        messages: the chat prompt, sources included.
        sources: the numbered sources; ``[N]`` cites ``sources[N - 1]``.
        policy: when citations are due and how many a sentence may carry.
        grammar: the citation grammar; ``None`` decodes unconstrained with no marker
            checks (the raw-model baseline of ``citebacktrack eval``).
        validator: citation rules and support; ``None`` accepts every grammatical marker.
        budgets: limits every mechanism ends on (tokens, rollbacks, wall time).
        decoding: token-level options (read by the local backends only).
        segments: segment-level options (read by server and API backends only).
        question: the question alone, for engines that take the sources as their own
            blocks (Anthropic's documents) rather than in ``messages``; ``None`` when the
            request was built from messages only.

    Raises:
        ConfigurationError: no messages, or a validator built for another number of
            sources or another policy (the request's policy is the one every part reads).
        InvalidSourcesError: sources that break :func:`check_sources` (the same checks
            ``Citeformer.build_request`` makes).
    """

    messages: Sequence[ChatMessage]
    sources: Sequence[Source]
    policy: Policy
    grammar: Grammar | None
    validator: CitationValidator | None
    budgets: Budgets = field(default_factory=Budgets)
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    segments: SegmentOptions = field(default_factory=SegmentOptions)
    question: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", tuple(self.messages))
        object.__setattr__(self, "sources", tuple(self.sources))
        for name, cls in (
            ("policy", Policy),
            ("budgets", Budgets),
            ("decoding", DecodingOptions),
            ("segments", SegmentOptions),
        ):
            hint = f"pass {cls.__name__}(...) (Citeformer.build_request fills every field)"
            instance(f"GenerationRequest.{name}", getattr(self, name), cls, hint, optional=False)
        if self.question is not None and not isinstance(self.question, str):
            raise refused("GenerationRequest.question", self.question, "a str", "or None")
        if not self.messages:
            raise ConfigurationError("a request needs at least one chat message")
        check_sources(self.sources)
        validator = self.validator
        if validator is not None and validator.n_sources != len(self.sources):
            raise ConfigurationError(
                f"the validator was built for {validator.n_sources} sources but the request "
                f"has {len(self.sources)}; build both from the same sources"
            )
        if validator is not None and validator.policy != self.policy:
            raise ConfigurationError(
                f"the validator was built for {validator.policy!r} but the request has "
                f"{self.policy!r}; build both from the same policy (Citeformer.build_request "
                "does)"
            )

    @property
    def n_sources(self) -> int:
        """Number of sources; valid ids are ``1..n_sources``."""
        return len(self.sources)

    @property
    def source_ids(self) -> tuple[str, ...]:
        """Each source's id, in order (its 1-based position when it has none)."""
        return tuple(source_id(s, i) for i, s in enumerate(self.sources, 1))
