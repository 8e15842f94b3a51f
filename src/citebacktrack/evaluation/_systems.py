"""Systems under evaluation: what answers one example, and the systems over a Citeformer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from citebacktrack.backends.base import Backend, ChatMessage
from citebacktrack.evaluation._datasets import Example
from citebacktrack.orchestrator import Citeformer
from citebacktrack.types import Answer, Trace

__all__ = [
    "System",
    "SystemOutput",
    "citeformer_system",
    "raw_system",
    "render_prompt",
    "sentence_origins",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemOutput:
    """What a system returned for one example.

    ``seconds`` overrides the wall clock that :func:`evaluate` measures around the call
    (for a system that times itself, such as a peer in another process).
    """

    text: str
    trace: Trace | None = None
    seconds: float | None = None
    origins: tuple[str, ...] = ()
    """How each cited sentence was obtained (``SentenceOrigin`` values), in order."""


System = Callable[[Example], SystemOutput]
"""Answers one example."""


def citeformer_system(cf: Citeformer) -> System:
    """A system answering with ``cf.generate`` (its trace is kept)."""

    def run(example: Example) -> SystemOutput:
        answer = cf.generate(example.question, example.sources)
        return SystemOutput(text=answer.text, trace=answer.trace, origins=sentence_origins(answer))

    return run


def sentence_origins(answer: Answer) -> tuple[str, ...]:
    """The origin of each cited sentence of ``answer`` (one per sentence, in order)."""
    seen: dict[int, str] = {}
    for citation in answer.citations:
        seen.setdefault(citation.sentence_start, citation.origin.value)
    return tuple(seen.values())


def raw_system(cf: Citeformer) -> System:
    """The model unconstrained on ``cf``'s prompt: no grammar, no marker checks."""

    def run(example: Example) -> SystemOutput:
        request = cf.build_request(example.question, example.sources)
        free = dataclasses.replace(request, grammar=None, validator=None)
        answer = cf.run(free)
        return SystemOutput(text=answer.text, trace=answer.trace)

    return run


def render_prompt(backend: Backend, messages: Sequence[ChatMessage]) -> str:
    """The prompt text ``backend`` prefills for ``messages``, for an engine that takes text.

    On llama.cpp it is the exact text (chat template applied, special tokens written out);
    on other backends a plain ``role: content`` rendering.
    """
    runtime = getattr(backend, "runtime", None)
    llama = getattr(runtime, "llama", None)
    if runtime is not None and llama is not None:
        tokens = runtime.encode_chat(messages)
        return bytes(llama.detokenize(tokens, special=True)).decode("utf-8", errors="replace")
    turns = [f"{m.role}: {m.content}" for m in messages]
    return "\n\n".join([*turns, "assistant: "])
