"""Output formats for a finished :class:`~citebacktrack.types.Answer`.

:func:`render` writes an answer as Markdown (footnotes quoting the evidence), plain text
(a reference list) or JSON (every field, offsets included). Numbering, once for all
formats: the answer's ``[N]`` is the source's position in the request
(``Citation.source_index``); with ``renumber=True`` (the default) each marker is rewritten
to its reference number (``Citation.reference_number``: order of first use), so a reader
sees ``[1]``, ``[2]``, … whatever the retriever's order; ``source_id`` is the caller's own id,
shown in each reference when the caller chose it (not a position, nor a random UUID:
:func:`~citebacktrack.adapters.is_generated_id`). A source without a title is shown as
``source N``, ``N`` its position in the request.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Literal, cast

from citebacktrack._arguments import Number, choice, flag, instance
from citebacktrack.adapters import is_generated_id
from citebacktrack.types import Answer, Reference

__all__ = ["Style", "evidence_quotes", "render", "renumbered_text"]

Style = Literal["markdown", "text", "json"]
"""The output styles of :func:`render`."""


def renumbered_text(answer: Answer) -> str:
    """The answer text with each ``[N]`` rewritten to its reference number.

    Raises:
        ConfigurationError: ``answer`` is not an :class:`Answer`.
    """
    return _rewrite(_answer(answer), lambda number: f"[{number}]")


def render(
    answer: Answer, style: Style = "markdown", *, renumber: bool = True, quotes: bool = True
) -> str:
    """The answer in ``style``.

    * ``"markdown"``: markers become footnote references (``[^1]``) and each cited source
      a footnote with its title, id (one the caller chose), URL and (``quotes``) the
      passages quoted as evidence;
    * ``"text"``: the answer, then ``References:`` with one line per source and its
      quotes indented below it;
    * ``"json"``: ``Answer.model_dump`` as JSON (text and offsets as generated; each
      citation has its ``reference_number``), whatever ``renumber`` says.

    Args:
        answer: a finished answer.
        style: one of the three above.
        renumber: number sources by first use (else by their position in the request).
        quotes: include the evidence quotes (Markdown and text).

    Raises:
        ConfigurationError: ``answer`` is not an :class:`Answer` (an answer's text is
            rendered from the answer itself), an unknown style (styles are matched ignoring
            case), or ``renumber``/``quotes`` not a bool; the message names the argument.
    """
    answer = _answer(answer)
    style = cast(Style, choice("style", style, ("markdown", "text", "json")))
    renumber = flag("renumber", renumber)
    quotes = flag("quotes", quotes)
    if style == "json":
        return json.dumps(answer.model_dump(mode="json"), indent=2, ensure_ascii=False)

    def label(ref: Reference) -> int:
        return ref.number if renumber else ref.source_index

    numbers = {ref.source_index: label(ref) for ref in answer.references}
    if style == "markdown":
        body = _rewrite(answer, lambda n: f"[^{n}]", by_source=None if renumber else numbers)
    else:
        body = renumbered_text(answer) if renumber else answer.text
    if not answer.references:
        return body
    lines = [body, ""] if style == "markdown" else [body, "", "References:"]
    for ref in sorted(answer.references, key=label):
        title = ref.title or f"source {ref.source_index}"
        given = not is_generated_id(ref.source_id, ref.source_index)
        shown = f" (id {ref.source_id})" if given else ""
        link = f" <{ref.url}>" if ref.url else ""
        said = evidence_quotes(answer, ref.source_index) if quotes else []
        if style == "markdown":
            quoted = "".join(f' "{q}"' for q in said)
            lines.append(f"[^{label(ref)}]: **{title}**{shown}{link}{quoted}")
        else:
            lines.append(f"[{label(ref)}] {title}{shown}{link}")
            lines.extend(f'    "{q}"' for q in said)
    return "\n".join(lines)


def evidence_quotes(answer: Answer, source_index: int) -> list[str]:
    """The distinct evidence passages quoted for one source, in answer order.

    Raises:
        ConfigurationError: ``answer`` is not an :class:`Answer`, or ``source_index`` is not
            an int >= 1.
    """
    answer = _answer(answer)
    source_index = Number(1, whole=True, minimum=1)("source_index", source_index)
    seen: list[str] = []
    for citation in answer.citations:
        evidence = citation.evidence
        if citation.source_index == source_index and evidence is not None:
            text = " ".join(evidence.text.split())
            if text and text not in seen:
                seen.append(text)
    return seen


def _answer(answer: object) -> Answer:
    """``answer`` if it is an :class:`Answer`, else the error saying what to pass."""
    hint = "pass the Answer that Citeformer.generate returns (or Done.answer of a stream)"
    checked: Answer = instance("answer", answer, Answer, hint, optional=False)
    return checked


def _rewrite(
    answer: Answer,
    marker: Callable[[int], str],
    *,
    by_source: dict[int, int] | None = None,
) -> str:
    """The text with each citation's ``[N]`` replaced by ``marker(number)``; ``number`` is
    the reference number, or ``by_source[N]`` when given."""
    numbers = {ref.source_index: ref.number for ref in answer.references}
    parts: list[str] = []
    at = 0
    for citation in sorted(answer.citations, key=lambda c: c.start):
        index = citation.source_index
        number = (by_source or numbers).get(index, index)
        parts.append(answer.text[at : citation.start])
        parts.append(marker(number))
        at = citation.end
    parts.append(answer.text[at:])
    return "".join(parts)
