"""OpenAIGrammarToolEngine: the citation grammar, in Lark, as a forced custom tool's input.

:class:`OpenAIGrammarToolEngine` (``OpenAIBackend(mode="cfg")``) constrains the tool's input
with the call's citation grammar in Lark (checked here before it is sent); the answer is the tool
call's input. It continues an accepted prefix (``continues_prefix = True``): a hosted
model cannot be prefilled with a trailing assistant message, so the accepted text goes
into a last *user* turn, and the call's grammar (the continuation grammar, narrowed at an
open marker to the ids the validator accepts) becomes the tool's definition. Custom tools
take no stop strings, so a result may run to the end of the answer, with several markers
(the segment loop cuts it at the first rejected one).

What the request and the reply look like on each API, and what both hosted engines share,
is in :mod:`citebacktrack.backends._openai_hosted_base`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from citebacktrack.backends._openai_hosted_base import ANSWER_TOOL, HostedEngine, HostedReply
from citebacktrack.errors import BackendError
from citebacktrack.grammar._gbnf_check import check_grammar_text
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.segments import SegmentCall
from citebacktrack.syntax import MARKER_CLOSE, MARKER_OPEN

__all__ = ["ANSWER_TOOL", "OpenAIGrammarToolEngine"]

_FIRST_TOOL = (
    "Write your whole answer here: short sentences, each citing the documents that support "
    "it as [N]."
)
_REST_TOOL = "Write the rest of your answer here, continuing exactly where the answer so far stops."
_CONTINUE = (
    "Your answer so far is between <answer-so-far> and </answer-so-far> below. Continue it "
    f"from exactly where it stops: call the {ANSWER_TOOL} tool with only the text that comes "
    "next, without repeating any of it.{note}\n\n<answer-so-far>{prefix}</answer-so-far>"
)
_OPEN_MARKER_NOTE = (
    " It stops inside a citation marker: start with the number of a document that supports "
    f"the sentence, then {MARKER_CLOSE}."
)


class OpenAIGrammarToolEngine(HostedEngine):
    """The citation grammar, in Lark, as the input format of a forced custom tool.

    Every call forces the ``answer`` tool whose input grammar is the call's grammar, so
    the answer is grammatical; a call with a prefix (a continuation after the validator
    rejected a marker, or after a partial group) adds a user turn holding the accepted
    text and sends the continuation grammar. ``temperature`` and ``top_p`` are not sent
    unless ``send_sampling=True`` (GPT-5 reasoning models refuse them).

    Args:
        client: a synchronous ``openai.OpenAI`` (for ``complete``).
        async_client: an ``openai.AsyncOpenAI`` (for ``acomplete``, natively async).
        model: a model that takes custom-tool grammars (the GPT-5 family).
        api: ``"responses"`` or ``"chat"`` (Chat Completions).
        send_sampling: send ``temperature``/``top_p`` (and ``seed`` on chat); default off.
        timeout: seconds for one HTTP attempt.
        max_retries: SDK retries after the first attempt (0: none).
        extra: more body fields (e.g. ``{"reasoning": {"effort": "low"}}``); fields the
            engine sets are refused.

    Raises:
        ConfigurationError: an argument of the wrong type or value (checked first: e.g.
            ``model=None``, ``api="completions"``, ``timeout="60"``; ``api`` in any case),
            a refused ``extra`` field, or no client.
        MissingDependencyError: the ``openai`` package is not installed.
    """

    continues_prefix: ClassVar[bool] = True
    _feature: ClassVar[str] = "custom tools with Lark grammars, e.g. a GPT-5 model"
    _sends_sampling: ClassVar[bool] = False

    def _constrain(
        self, call: SegmentCall, messages: list[dict[str, str]], kwargs: dict[str, Any]
    ) -> None:
        if call.prefix:
            note = _OPEN_MARKER_NOTE if call.prefix.endswith(MARKER_OPEN) else ""
            messages.append(
                {"role": "user", "content": _CONTINUE.format(note=note, prefix=call.prefix)}
            )
        if call.grammar is None:
            return
        definition = emit(call.grammar, Dialect.LARK)
        check_grammar_text(definition, Dialect.LARK)
        description = _REST_TOOL if call.prefix else _FIRST_TOOL
        if self.api == "responses":
            kwargs["tools"] = [
                {
                    "type": "custom",
                    "name": ANSWER_TOOL,
                    "description": description,
                    "format": {"type": "grammar", "syntax": "lark", "definition": definition},
                }
            ]
            kwargs["tool_choice"] = {"type": "custom", "name": ANSWER_TOOL}
        else:
            grammar = {"syntax": "lark", "definition": definition}
            kwargs["tools"] = [
                {
                    "type": "custom",
                    "custom": {
                        "name": ANSWER_TOOL,
                        "description": description,
                        "format": {"type": "grammar", "grammar": grammar},
                    },
                }
            ]
            kwargs["tool_choice"] = {"type": "custom", "custom": {"name": ANSWER_TOOL}}

    def _answer(self, reply: HostedReply, call: SegmentCall) -> str:
        if reply.tool_inputs:
            return reply.tool_inputs[0]
        if reply.finish == "length":
            return ""  # the token limit came before the tool call
        raise BackendError(f"no call of the {ANSWER_TOOL!r} tool, which was forced")
