"""References and output formats for a finished :class:`~citebacktrack.types.Answer`."""

from __future__ import annotations

import re
from collections.abc import Sequence

from citebacktrack.types import Answer, Citation, Reference, Source

__all__ = ["build_references", "render_markdown", "renumbered_text"]

_MARKER = re.compile(r"\[(\d+)\]")


def build_references(
    citations: Sequence[Citation], sources: Sequence[Source]
) -> tuple[Reference, ...]:
    """One reference per cited source, numbered in order of first use."""
    numbers: dict[int, int] = {}
    references = []
    for citation in citations:
        if citation.source_index in numbers:
            continue
        numbers[citation.source_index] = len(numbers) + 1
        source = sources[citation.source_index - 1]
        references.append(
            Reference(
                number=numbers[citation.source_index],
                source_index=citation.source_index,
                source_id=citation.source_id,
                title=source.title,
                url=source.url,
                metadata=source.metadata,
            )
        )
    return tuple(references)


def renumbered_text(answer: Answer) -> str:
    """The answer text with each ``[N]`` rewritten to its reference number."""
    numbers = {ref.source_index: ref.number for ref in answer.references}
    return _MARKER.sub(lambda m: f"[{numbers.get(int(m.group(1)), int(m.group(1)))}]", answer.text)


def render_markdown(answer: Answer, *, renumber: bool = True) -> str:
    """The answer followed by its reference list, as Markdown."""
    body = renumbered_text(answer) if renumber else answer.text
    if not answer.references:
        return body
    lines = [body, "", "References:"]
    for ref in answer.references:
        number = ref.number if renumber else ref.source_index
        title = ref.title or f"source {ref.source_id}"
        link = f" <{ref.url}>" if ref.url else ""
        lines.append(f"[{number}] {title} (id {ref.source_id}){link}")
    return "\n".join(lines)
