"""Sources → chat messages: numbered documents, a policy instruction, an optional demo.

Documents are shown ALCE-style (``Document [1](Title: ...): text``). Square brackets
inside a source's text are shown to the model as parentheses, so a source that itself
contains ``[3]`` cannot teach the model a marker it did not earn; the source's own text
(used for support checks) is unchanged.

Sources and the question are data, never markup: every ``<`` in them is shown as ``‹``
(U+2039). Chat templates are rendered and tokenized with their special tokens parsed
(llama.cpp, transformers and chat servers all do), and those tokens are spelled with
``<`` (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<start_of_turn>``) or ``[``
(``[INST]``), so no source or question can close its turn and open a fake system or
assistant turn. Values are inserted with plain string formatting: ``{}``, ``%s`` or
``{{ x }}`` in a source reach the model as written and are never evaluated (the
template sees them as one variable's value).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from citebacktrack.backends.base import ChatMessage
from citebacktrack.types import CitationMode, Policy, Source

__all__ = ["DEFAULT_DEMO", "Demo", "build_messages", "format_sources", "instruction"]

_MARKUP = {"<": "\u2039"}
"""Characters that spell chat-template control tokens, and how they are shown instead."""
_DATA = str.maketrans(_MARKUP)
_BRACKETS = str.maketrans({"[": "(", "]": ")", **_MARKUP})


@dataclass(frozen=True, slots=True)
class Demo:
    """A worked example shown before the real question."""

    question: str
    sources: tuple[Source, ...]
    answer: str


DEFAULT_DEMO = Demo(
    question="In which city was the author of the novel The Leopard born?",
    sources=(
        Source(
            title="The Leopard",
            text=(
                "The Leopard is a novel by Giuseppe Tomasi di Lampedusa, published in 1958 "
                "after his death. It follows a Sicilian noble family during the unification "
                "of Italy."
            ),
        ),
        Source(
            title="Palermo Botanical Garden",
            text="The Palermo Botanical Garden is a garden in Sicily founded in 1795.",
        ),
        Source(
            title="Giuseppe Tomasi di Lampedusa",
            text=(
                "Giuseppe Tomasi di Lampedusa (1896-1957) was an Italian writer and the last "
                "Prince of Lampedusa. He was born in Palermo, Sicily."
            ),
        ),
    ),
    answer=(
        "The Leopard was written by Giuseppe Tomasi di Lampedusa [1]. "
        "Giuseppe Tomasi di Lampedusa was born in Palermo [3]."
    ),
)
"""The built-in demo (our own text): a two-step question over three documents, one of them
irrelevant, answered in short sentences that each name what they are about and cite the
document they come from. It shares no topic with the bundled sample documents."""


def instruction(policy: Policy) -> str:
    """The system instruction for ``policy``."""
    k = policy.max_citations_per_sentence
    common = (
        "Answer the question in one to three short sentences, using only the provided "
        "documents (some may be irrelevant). Name the people, places and things you write "
        "about. Cite a document by writing its number in square brackets, like [1]; cite "
        f"several as [1][2], at most {k} per sentence. Use square brackets only for citations."
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
    """Number the sources for the prompt (brackets in their text shown as parentheses,
    ``<`` as ``‹``)."""
    lines = []
    for number, source in enumerate(sources, start=1):
        title = source.title.translate(_BRACKETS).strip() or "untitled"
        text = " ".join(source.text.translate(_BRACKETS).split())
        lines.append(f"Document [{number}](Title: {title}): {text}")
    return "\n".join(lines)


def _user_turn(question: str, sources: Sequence[Source]) -> str:
    return f"{format_sources(sources)}\n\nQuestion: {question.strip().translate(_DATA)}"


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
