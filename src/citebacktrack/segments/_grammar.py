"""The grammars a segment engine is sent, and the check of what it wrote under them."""

from __future__ import annotations

from citebacktrack.errors import BackendError, GrammarError
from citebacktrack.grammar._continuation import continuation_grammar, is_answer_prefix
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.grammar.ir import Grammar
from citebacktrack.types import Policy

__all__ = ["check_grammatical", "next_grammar"]


def check_grammatical(n_sources: int, policy: Policy, draft: bytes, *, complete: bool) -> None:
    """Raise unless the grammar the engine was sent accepts ``draft`` (as a whole answer
    when the engine ended it): a server that does not enforce the grammar would otherwise
    slip ungrammatical markers (``["[3]``) and prose into the answer.

    Raises:
        BackendError: the grammar refuses the engine's text.
    """
    text = draft.decode("utf-8", "replace")
    if not text.strip():
        return  # nothing written (an empty answer: the model wrote nothing)
    if is_answer_prefix(n_sources, policy, text, bounded=True, complete=complete):
        return
    what = "a whole answer" if complete else "the start of an answer"
    raise BackendError(
        f"the engine wrote an answer the citation grammar it was sent refuses as {what} "
        f"(...{text[-40:]!r}); check that the server enforces grammars (and the stop "
        "string ']')"
    )


def next_grammar(
    n_sources: int, policy: Policy, prefix: str, allowed: frozenset[int] | None
) -> Grammar:
    """The grammar of what may follow ``prefix`` (``allowed``: the ids the open marker may
    take, after a rejection).

    Raises:
        BackendError: the engine wrote text the citation grammar refuses (its server
            does not enforce the grammar it is sent), so no continuation exists.
    """
    if not prefix.strip():
        return citation_grammar(n_sources, policy, bounded=True)
    try:
        return continuation_grammar(n_sources, policy, prefix, allowed_ids=allowed, bounded=True)
    except GrammarError as exc:
        raise BackendError(
            f"the engine wrote an answer the citation grammar it was sent refuses ({exc}); "
            "check that the server enforces grammars (and the stop string ']')"
        ) from exc
