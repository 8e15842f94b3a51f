"""Hosted OpenAI engines: the citation grammar as a forced custom tool, or a strict JSON schema.

The two :class:`~citebacktrack.segments.SegmentEngine` classes of hosted OpenAI, gathered by
mode (:data:`HOSTED_ENGINES`), each in its own module:

* ``"cfg"``: :class:`OpenAIGrammarToolEngine` (:mod:`citebacktrack.backends._openai_grammar_tool`),
  the grammar in Lark as the input format of a forced custom tool;
* ``"json_schema"``: :class:`OpenAIJsonSchemaEngine`
  (:mod:`citebacktrack.backends._openai_json_schema`), Structured Outputs with the ids as an
  enum (:func:`answer_schema`), rendered back into ``[N]`` text (:func:`render_answer`, both
  of :mod:`citebacktrack.grammar._json_schema`).

What both send on the Responses API and on Chat Completions, and the base they share, is in
:mod:`citebacktrack.backends._openai_hosted_base`.
"""

from __future__ import annotations

from citebacktrack.backends._openai_grammar_tool import ANSWER_TOOL, OpenAIGrammarToolEngine
from citebacktrack.backends._openai_json_schema import OpenAIJsonSchemaEngine
from citebacktrack.grammar._json_schema import MAX_SCHEMA_SOURCES, answer_schema, render_answer

__all__ = [
    "ANSWER_TOOL",
    "HOSTED_ENGINES",
    "MAX_SCHEMA_SOURCES",
    "OpenAIGrammarToolEngine",
    "OpenAIJsonSchemaEngine",
    "answer_schema",
    "render_answer",
]

HOSTED_ENGINES: dict[str, type[OpenAIGrammarToolEngine | OpenAIJsonSchemaEngine]] = {
    "cfg": OpenAIGrammarToolEngine,
    "json_schema": OpenAIJsonSchemaEngine,
}
"""The engine of each hosted ``OpenAIBackend`` mode."""
