"""Sources → chat messages: numbered documents, a policy instruction, an optional demo.

Documents are shown ALCE-style (``Document [1](Title: ...): text``). Square brackets
inside a source's text are shown to the model as parentheses, so a source that itself
contains ``[3]`` cannot teach the model a marker it did not earn; the source's own text
(used for support checks) is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from citebacktrack.backends.base import ChatMessage
from citebacktrack.types import CitationMode, Policy, Source

__all__ = ["DEFAULT_DEMO", "Demo", "build_messages", "format_sources", "instruction"]

_BRACKETS = str.maketrans({"[": "(", "]": ")"})


@dataclass(frozen=True, slots=True)
class Demo:
    """A worked example shown before the real question."""

    question: str
    sources: tuple[Source, ...]
    answer: str


DEFAULT_DEMO = Demo(
    question="When was the Eiffel Tower built?",
    sources=(
        Source(
            title="Eiffel Tower",
            text=(
                "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was built from "
                "1887 to 1889 as the entrance arch of the 1889 World's Fair."
            ),
        ),
        Source(title="Louvre", text="The Louvre is the world's most-visited art museum, in Paris."),
    ),
    answer=(
        "The Eiffel Tower was built from 1887 to 1889 [1]. "
        "It served as the entrance arch of the 1889 World's Fair [1]."
    ),
)
"""A short built-in demo (our own text) that shows the marker format to small models."""


def instruction(policy: Policy) -> str:
    """The system instruction for ``policy``."""
    k = policy.max_citations_per_sentence
    common = (
        "Answer the question using only the provided documents (some may be irrelevant). "
        "Cite a document by writing its number in square brackets, like [1]; cite several "
        f"as [1][2], at most {k} per sentence. Use square brackets only for citations."
    )
    match policy.mode:
        case CitationMode.REQUIRED:
            return common + " Every sentence must end with at least one citation."
        case CitationMode.AUTO:
            return common + " Cite a document whenever a sentence relies on it."
        case CitationMode.QUOTES_ONLY:
            return (
                common + ' Put quotations in double quotes followed by a citation, like "..." [2].'
            )


def format_sources(sources: Sequence[Source]) -> str:
    """Number the sources for the prompt (brackets in their text shown as parentheses)."""
    lines = []
    for number, source in enumerate(sources, start=1):
        title = source.title.translate(_BRACKETS).strip() or "untitled"
        text = " ".join(source.text.translate(_BRACKETS).split())
        lines.append(f"Document [{number}](Title: {title}): {text}")
    return "\n".join(lines)


def _user_turn(question: str, sources: Sequence[Source]) -> str:
    return f"{format_sources(sources)}\n\nQuestion: {question.strip()}"


def build_messages(
    question: str, sources: Sequence[Source], policy: Policy, *, demo: Demo | None = DEFAULT_DEMO
) -> list[ChatMessage]:
    """Chat messages for one answer: system instruction, optional demo turn, the question."""
    messages = [ChatMessage("system", instruction(policy))]
    if demo is not None:
        messages.append(ChatMessage("user", _user_turn(demo.question, demo.sources)))
        messages.append(ChatMessage("assistant", demo.answer))
    messages.append(ChatMessage("user", _user_turn(question, sources)))
    return messages
