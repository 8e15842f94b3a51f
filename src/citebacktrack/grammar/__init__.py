"""The citation grammar: a backend-agnostic IR (:mod:`~citebacktrack.grammar.ir`), built
for a policy by :func:`citation_grammar` (and, for an engine that continues an accepted
prefix, :func:`continuation_grammar`) and written in each engine's dialect by
:func:`emit` (XGrammar EBNF, llama.cpp GBNF, Lark)."""

from citebacktrack.grammar._continuation import continuation_grammar
from citebacktrack.grammar.citations import MAX_SOURCES, citation_grammar
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.grammar.ir import Grammar

__all__ = [
    "MAX_SOURCES",
    "Dialect",
    "Grammar",
    "citation_grammar",
    "continuation_grammar",
    "emit",
]
