"""What the segment loop asks of an engine, and what it gets back: one segment per call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from citebacktrack.grammar.ir import Grammar
from citebacktrack.types import ChatMessage, Evidence, Source

__all__ = ["SegmentCall", "SegmentEngine", "SegmentResult"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentCall:
    """One request to a segment-level engine.

    Attributes:
        messages: the chat prompt (sources included), the same for every call of an answer.
        prefix: accepted answer text the engine must continue (the start of the assistant
            turn; ``""`` for the first call).
        grammar: what may follow ``prefix`` (the citation grammar restarted at that
            point); ``None`` for an unconstrained call (the raw-model baseline).
        stop: strings that end the segment (excluded from the result's text).
        max_tokens: most tokens to generate in this call.
        temperature: sampling temperature (0: greedy).
        top_p: nucleus mass (1.0: off).
        seed: sampling seed, where the engine takes one.
        sources: the request's sources, for engines that send them as their own blocks
            (Anthropic's documents) instead of reading them in ``messages``.
        question: the question alone (``None`` when the request had none: use the last
            user message).
    """

    messages: Sequence[ChatMessage]
    prefix: str
    grammar: Grammar | None
    stop: tuple[str, ...] = ("]",)
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    sources: Sequence[Source] = ()
    question: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentResult:
    """What an engine generated for one :class:`SegmentCall`.

    Attributes:
        text: the generated text after ``prefix``, without the stop string.
        finish: ``"stop"`` a stop string was hit; ``"end"`` the model ended its answer;
            ``"length"`` ``max_tokens`` ran out.
        prompt_tokens: tokens in the prompt as the engine counted them (0 if unknown).
        completion_tokens: tokens generated (0 if unknown).
        evidence: the provider's own cited span for each ``[N]`` marker in ``text``, in
            order (``None`` where it has none); used for an accepted citation when it is
            exactly the source's text at those offsets, else the validator's span is.
    """

    text: str
    finish: Literal["stop", "end", "length"]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    evidence: tuple[Evidence | None, ...] = ()
    notes: tuple[str, ...] = ()
    """What the engine left out of ``text`` and why (e.g. a citation of a document
    index out of range); each becomes a trace entry."""


@runtime_checkable
class SegmentEngine(Protocol):
    """What the segment loop needs of a server or API client: one segment per call.

    An engine may say ``continues_prefix = False`` (a class attribute; absent means True):
    it cannot continue an accepted prefix under a grammar (a hosted API with native
    citations or a JSON schema). The loop then makes one call and revises that answer in
    one pass with the same validator (see :class:`SegmentLoop`).
    """

    def complete(self, call: SegmentCall) -> SegmentResult:
        """Generate one segment (blocking)."""
        ...

    async def acomplete(self, call: SegmentCall) -> SegmentResult:
        """Generate one segment (natively async)."""
        ...
