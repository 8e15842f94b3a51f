"""OpenAIBackend: segment-level backtracking over the OpenAI SDK, a served model or hosted OpenAI.

The backend picks one of three engines by ``mode``, each in its own module:

* ``"server"``: :class:`~citebacktrack.backends._openai_server.OpenAICompatibleEngine`, a
  llama.cpp or vLLM server behind the OpenAI protocol
  (:mod:`citebacktrack.backends._openai_server`);
* ``"cfg"``: :class:`~citebacktrack.backends._openai_grammar_tool.OpenAIGrammarToolEngine`,
  hosted OpenAI with the grammar as a forced custom tool
  (:mod:`citebacktrack.backends._openai_grammar_tool`);
* ``"json_schema"``: :class:`~citebacktrack.backends._openai_json_schema.OpenAIJsonSchemaEngine`,
  hosted OpenAI with Structured Outputs (:mod:`citebacktrack.backends._openai_json_schema`).

This is the public face of all three: the engines, ``chatml``, ``ChatTemplate``,
``check_grammar_text`` (GBNF, EBNF and Lark checked before any request is sent) and
``MAX_SCHEMA_SOURCES`` are imported from here; the modules that hold them are private.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import JsonValue

from citebacktrack._arguments import choice, refused
from citebacktrack.backends._openai_grammar_tool import OpenAIGrammarToolEngine
from citebacktrack.backends._openai_hosted import HOSTED_ENGINES
from citebacktrack.backends._openai_json_schema import OpenAIJsonSchemaEngine
from citebacktrack.backends._openai_server import (
    ChatTemplate,
    Endpoint,
    OpenAICompatibleEngine,
    Server,
    chatml,
)
from citebacktrack.backends.segment import SegmentBackend
from citebacktrack.errors import ConfigurationError
from citebacktrack.grammar._gbnf_check import check_grammar_text
from citebacktrack.grammar._json_schema import MAX_SCHEMA_SOURCES
from citebacktrack.grammar.emit import Dialect
from citebacktrack.segments import SegmentEngine

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI

    from citebacktrack.backends._openai_hosted_base import Api

__all__ = [
    "MAX_SCHEMA_SOURCES",
    "ChatTemplate",
    "OpenAIBackend",
    "OpenAICompatibleEngine",
    "OpenAIGrammarToolEngine",
    "OpenAIJsonSchemaEngine",
    "chatml",
    "check_grammar_text",
]

HostedMode = Literal["json_schema", "cfg"]
Mode = Literal["server", "json_schema", "cfg"]

_MODES = ("server", "json_schema", "cfg")
# The engine arguments that only one kind of engine takes.
_SERVER_ONLY = ("server", "endpoint", "chat_template", "grammar_dialect", "assistant_prefill")
_HOSTED_ONLY = ("api", "send_sampling")


class OpenAIBackend(SegmentBackend):
    """Segment-level backtracking over the OpenAI SDK: a served model or hosted OpenAI.

    ``mode`` picks how the citation grammar reaches the model, and so the engine:

    * ``"server"`` (default): an OpenAI-compatible server (llama.cpp, vLLM) that takes the
      grammar itself and continues the accepted text (:class:`OpenAICompatibleEngine`);
    * ``"cfg"``: hosted OpenAI, the grammar in Lark as the input format of a forced custom
      tool, the accepted text of a continuation in a user turn
      (:class:`~citebacktrack.backends._openai_grammar_tool.OpenAIGrammarToolEngine`);
    * ``"json_schema"``: hosted OpenAI, Structured Outputs with the ids as an enum, one
      call per answer revised by the validator
      (:class:`~citebacktrack.backends._openai_json_schema.OpenAIJsonSchemaEngine`).

    Pass a ready ``engine``, or the engine's arguments below (``None``, or left out: the
    engine's default). :meth:`from_base_url` builds the clients for a server URL,
    :meth:`from_env` those of hosted OpenAI from ``OPENAI_API_KEY``. Every marker is checked
    by the shared segment loop (:mod:`citebacktrack.segments`) with the request's
    validator; :meth:`close` closes the clients the engine built.

    Args:
        engine: a ready engine (then no ``mode`` and no other argument).
        mode: ``"server"``, ``"cfg"`` or ``"json_schema"`` (any case).
        client: a synchronous ``openai.OpenAI`` (for blocking calls).
        async_client: an ``openai.AsyncOpenAI`` (for async calls, natively).
        model: the model name (required unless ``engine`` is given).
        server: ``mode="server"`` only: ``"llama.cpp"`` (default) or ``"vllm"``.
        endpoint: ``mode="server"`` only: ``"completions"`` (default) or ``"chat"``.
        chat_template: ``mode="server"`` with the completions endpoint only: renders the
            prompt (default :func:`chatml`).
        grammar_dialect: ``mode="server"`` only: the dialect the server reads.
        assistant_prefill: ``mode="server"`` only: the llama.cpp server continues a
            trailing assistant message (``endpoint="chat"``).
        api: hosted modes only: ``"responses"`` (default) or ``"chat"``.
        send_sampling: hosted modes only: send ``temperature``/``top_p`` (default: off for
            ``cfg``, on for ``json_schema``).
        timeout: seconds for one HTTP attempt (default 60).
        max_retries: SDK retries after the first attempt (default 2).
        extra: more JSON body fields; fields the engine sets are refused.

    Raises:
        ConfigurationError: an unknown ``mode``, both an engine and engine arguments, an
            argument of another mode's engine, no ``model``, or what the engine refuses
            (each argument's type and value, checked before any client is used).
    """

    def __init__(
        self,
        engine: SegmentEngine | None = None,
        *,
        mode: Mode = "server",
        client: OpenAI | None = None,
        async_client: AsyncOpenAI | None = None,
        model: str | None = None,
        server: Server | None = None,
        endpoint: Endpoint | None = None,
        chat_template: ChatTemplate | None = None,
        grammar_dialect: Dialect | None = None,
        assistant_prefill: bool | None = None,
        api: Api | None = None,
        send_sampling: bool | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        extra: Mapping[str, JsonValue] | None = None,
    ) -> None:
        given = {
            "client": client,
            "async_client": async_client,
            "model": model,
            "server": server,
            "endpoint": endpoint,
            "chat_template": chat_template,
            "grammar_dialect": grammar_dialect,
            "assistant_prefill": assistant_prefill,
            "api": api,
            "send_sampling": send_sampling,
            "timeout": timeout,
            "max_retries": max_retries,
            "extra": extra,
        }
        options = {name: value for name, value in given.items() if value is not None}
        chosen = choice("mode", mode, _MODES)
        if engine is not None:
            self._checked_engine(engine)
        if engine is None:
            engine = _engine_for(chosen, options)
        elif options or chosen != "server":
            raise ConfigurationError(
                "pass either a ready engine or a mode and the engine's options, not both"
            )
        super().__init__(engine)

    @classmethod
    def from_base_url(
        cls,
        base_url: str,
        *,
        model: str,
        api_key: str = "unused",
        server: Server = "llama.cpp",
        endpoint: Endpoint = "completions",
        chat_template: ChatTemplate | None = None,
        grammar_dialect: Dialect | None = None,
        assistant_prefill: bool = False,
        timeout: float = 60.0,
        max_retries: int = 2,
        extra: Mapping[str, JsonValue] | None = None,
    ) -> OpenAIBackend:
        """A backend for the server at ``base_url`` (the arguments are those of
        :meth:`OpenAICompatibleEngine.from_base_url`)."""
        return cls(
            OpenAICompatibleEngine.from_base_url(
                base_url,
                model=model,
                api_key=api_key,
                server=server,
                endpoint=endpoint,
                chat_template=chat_template,
                grammar_dialect=grammar_dialect,
                assistant_prefill=assistant_prefill,
                timeout=timeout,
                max_retries=max_retries,
                extra=extra,
            )
        )

    @classmethod
    def from_env(
        cls,
        *,
        model: str,
        mode: HostedMode = "json_schema",
        api: Api = "responses",
        send_sampling: bool | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
        extra: Mapping[str, JsonValue] | None = None,
    ) -> OpenAIBackend:
        """A backend for hosted OpenAI with the key in ``OPENAI_API_KEY`` (the other
        arguments are those of
        :meth:`~citebacktrack.backends._openai_hosted_base.HostedEngine.from_env`).

        Raises:
            ConfigurationError: an argument of the wrong type or value, ``mode`` not
                hosted, or ``OPENAI_API_KEY`` unset.
        """
        if isinstance(mode, str) and mode.strip().casefold() == "server":
            raise refused(
                "mode",
                mode,
                "'json_schema' or 'cfg'",
                "from_env() builds hosted OpenAI backends; a server is reached with "
                "from_base_url()",
            )
        engine_class = HOSTED_ENGINES[choice("mode", mode, HOSTED_ENGINES)]
        return cls(
            engine_class.from_env(
                model=model,
                api=api,
                send_sampling=send_sampling,
                timeout=timeout,
                max_retries=max_retries,
                extra=extra,
            )
        )

    async def aclose(self) -> None:
        """Close the engine's clients from async code."""
        close = getattr(self.engine, "aclose", None)
        if callable(close):
            await close()


def _engine_for(mode: str, options: dict[str, Any]) -> SegmentEngine:
    """The engine of ``mode`` (a name of :data:`_MODES`) built from ``options``; an option
    of another mode's engine, or no model, is refused by name."""
    other = _HOSTED_ONLY if mode == "server" else _SERVER_ONLY
    for name in other:
        if name in options:
            owner = (
                "the hosted engines (mode='cfg' or 'json_schema')"
                if mode == "server"
                else "the server engine (mode='server')"
            )
            raise refused(
                name,
                options[name],
                f"left out with mode={mode!r}",
                f"{name} is an argument of {owner} only",
            )
    options.setdefault("model", None)  # refused by the engine, by name
    if mode == "server":
        return OpenAICompatibleEngine(**options)
    return HOSTED_ENGINES[mode](**options)
