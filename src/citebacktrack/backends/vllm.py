"""VLLMBackend: segment-level backtracking on an offline vLLM engine (``citebacktrack[vllm]``).

vLLM has no rollback API, so it runs the shared segment loop: each call generates up to
the next citation close (``stop=["]"]``) under the grammar of "the rest of the answer
from here", sent as ``SamplingParams(structured_outputs=StructuredOutputsParams(grammar=
...))`` (vLLM 0.33; the ``guided_*`` names are gone). A rejected marker resubmits the
prompt and the accepted prefix; vLLM's automatic prefix caching makes that re-prefill
cheap, so the backend turns it on when it builds the engine.

:meth:`VLLMBackend.generate_many` drives one loop per request and sends every loop's
pending segment in one ``LLM.generate`` call per round, so vLLM batches them
continuously. ``astream``/``agenerate`` use an ``AsyncLLM`` engine when one is given,
otherwise the blocking ``LLM`` on a worker thread.

vLLM cannot run without a GPU; the tests drive this module through a fake of the small
vLLM surface it calls (``tests/fake_vllm``), checked against vLLM 0.33's signatures.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, Literal, Protocol

import anyio.to_thread

from citebacktrack._arguments import mapping, member, path, refused
from citebacktrack.answer import collect
from citebacktrack.backends.segment import SegmentBackend
from citebacktrack.errors import (
    BackendClosedError,
    BackendError,
    ConfigurationError,
    MissingDependencyError,
    ModelLoadError,
)
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.request import GenerationRequest
from citebacktrack.segments import SegmentCall, SegmentLoop, SegmentResult
from citebacktrack.types import Answer, Event

__all__ = ["AsyncVLLMEngine", "SyncVLLMEngine", "VLLMBackend", "VLLMEngine", "import_vllm"]

_NO_SPECIAL_TOKENS = {"add_special_tokens": False}
"""The chat template already wrote BOS and the like; vLLM would add them again to a text
prompt (its completion default)."""


class SyncVLLMEngine(Protocol):
    """The part of ``vllm.LLM`` this module calls."""

    def generate(
        self,
        prompts: Any,
        sampling_params: Any = None,
        *,
        use_tqdm: bool = True,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[Any]: ...

    def get_tokenizer(self) -> Any: ...


class AsyncVLLMEngine(Protocol):
    """The part of ``vllm.AsyncLLMEngine`` (``vllm.v1.engine.async_llm.AsyncLLM``) this
    module calls."""

    def generate(
        self,
        prompt: Any,
        sampling_params: Any,
        request_id: str,
        *,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> AsyncIterator[Any]: ...

    def get_tokenizer(self) -> Any: ...


def import_vllm() -> ModuleType:
    """Import vLLM on first use (it is heavy and needs a GPU machine)."""
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise MissingDependencyError(feature="VLLMBackend", extra="vllm", module="vllm") from exc


class VLLMEngine:
    """A :class:`~citebacktrack.segments.SegmentEngine` over vLLM's offline engines.

    The prompt of a call is the model's chat template applied to the call's messages
    (with the generation prompt) followed by the accepted prefix; the grammar goes as
    ``structured_outputs`` text in ``dialect``.

    Args:
        llm: a ``vllm.LLM`` (blocking calls and :meth:`complete_many`).
        async_engine: a ``vllm.AsyncLLMEngine`` (native :meth:`acomplete`).
        dialect: the grammar language vLLM's structured-outputs backend reads: XGrammar
            EBNF (``xgrammar``, and ``auto``'s first choice) or Lark (``guidance``).

    Raises:
        ConfigurationError: neither engine was given, a name or path given as one, or a
            ``dialect`` that is no :class:`~citebacktrack.grammar.Dialect` (any case).
    """

    def __init__(
        self,
        llm: SyncVLLMEngine | None = None,
        *,
        async_engine: AsyncVLLMEngine | None = None,
        dialect: Dialect = Dialect.EBNF,
    ) -> None:
        _check_engines(llm, async_engine)
        self.dialect = member("dialect", dialect, Dialect)
        if llm is None and async_engine is None:
            raise ConfigurationError("VLLMEngine needs a vllm.LLM or a vllm.AsyncLLMEngine")
        self.llm = llm
        self.async_engine = async_engine
        self._tokenizer: Any = None
        self._closed = False

    # ------------------------------------------------------------------ calls

    def complete(self, call: SegmentCall) -> SegmentResult:
        """Generate one segment with the blocking ``LLM``."""
        return self.complete_many([call])[0]

    def complete_many(self, calls: Sequence[SegmentCall]) -> list[SegmentResult]:
        """Generate one segment per call, all in one ``LLM.generate`` (vLLM batches them).

        Raises:
            ConfigurationError: this engine has only an async engine.
            BackendError: vLLM failed, refused a grammar, or aborted a request.
        """
        llm = self._sync()
        if not calls:
            return []
        prompts = [self._prompt(call) for call in calls]
        params = [self._params(call) for call in calls]
        try:
            outputs = llm.generate(
                prompts, params, use_tqdm=False, tokenization_kwargs=dict(_NO_SPECIAL_TOKENS)
            )
        except Exception as exc:
            raise BackendError(f"vLLM failed to generate {len(calls)} segment(s): {exc}") from exc
        if len(outputs) != len(calls):
            raise BackendError(f"vLLM returned {len(outputs)} outputs for {len(calls)} prompts")
        return [_result(call, output) for call, output in zip(calls, outputs, strict=True)]

    async def acomplete(self, call: SegmentCall) -> SegmentResult:
        """Generate one segment with the async engine, or the ``LLM`` on a worker thread."""
        engine = self.async_engine
        if engine is None:
            return await anyio.to_thread.run_sync(self.complete, call)
        self._check_open()
        prompt = self._prompt(call)
        params = self._params(call)
        final: Any = None
        try:
            async for output in engine.generate(
                prompt,
                params,
                uuid.uuid4().hex,
                tokenization_kwargs=dict(_NO_SPECIAL_TOKENS),
            ):
                final = output  # cumulative outputs (vLLM's default): the last is whole
        except Exception as exc:
            raise BackendError(f"vLLM's async engine failed to generate: {exc}") from exc
        if final is None:
            raise BackendError("vLLM's async engine returned no output for a request")
        return _result(call, final)

    def close(self) -> None:
        """Drop the engines (and shut the async one down); later calls raise."""
        if self._closed:
            return
        self._closed = True
        engine, self.async_engine, self.llm = self.async_engine, None, None
        shutdown = getattr(engine, "shutdown", None)
        if callable(shutdown):
            shutdown()

    # ------------------------------------------------------------------ helpers

    def _check_open(self) -> None:
        if self._closed:
            raise BackendClosedError("this VLLMBackend was closed; build a new one")

    def _sync(self) -> SyncVLLMEngine:
        self._check_open()
        if self.llm is None:
            raise ConfigurationError(
                "this VLLMBackend has only an async engine; use astream/agenerate, or pass "
                "llm=vllm.LLM(...) for blocking calls and generate_many"
            )
        return self.llm

    def _prompt(self, call: SegmentCall) -> str:
        if self._tokenizer is None:
            engine: SyncVLLMEngine | AsyncVLLMEngine | None = self.llm or self.async_engine
            if engine is None:
                raise BackendClosedError("this VLLMBackend was closed; build a new one")
            self._tokenizer = engine.get_tokenizer()
        messages = [{"role": m.role, "content": m.content} for m in call.messages]
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:
            raise BackendError(f"the model's chat template failed: {exc}") from exc
        if not isinstance(text, str):
            raise BackendError(
                f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not text"
            )
        return text + call.prefix

    def _params(self, call: SegmentCall) -> Any:
        vllm = import_vllm()
        structured = importlib.import_module("vllm.sampling_params").StructuredOutputsParams
        constraint = (
            {}
            if call.grammar is None
            else {"structured_outputs": structured(grammar=emit(call.grammar, self.dialect))}
        )
        try:
            return vllm.SamplingParams(
                temperature=call.temperature,
                top_p=call.top_p,
                seed=call.seed,
                max_tokens=call.max_tokens,
                stop=list(call.stop),
                **constraint,
            )
        except Exception as exc:  # vLLM's own validation error is no ValueError
            raise ConfigurationError(
                f"vLLM refused the sampling parameters (temperature={call.temperature}, "
                f"top_p={call.top_p}, max_tokens={call.max_tokens}): {exc}"
            ) from exc


def _check_engines(llm: object, async_engine: object) -> None:
    """Refuse a model name or path given where an engine object goes."""
    for name, value in (("llm", llm), ("async_engine", async_engine)):
        if isinstance(value, str | bytes | os.PathLike):
            raise refused(
                name,
                value,
                "an engine object (vllm.LLM(...) or vllm.AsyncLLMEngine), or None",
                "to build one from a model name pass model=..., e.g. VLLMBackend(model="
                "'Qwen/Qwen3-0.6B') or VLLMBackend.from_async_model(...)",
            )


def _check_arguments(
    model: object, dialect: object, engine_args: object, *, optional: bool = True
) -> None:
    """The arguments of building an engine from ``model`` (``None``: an engine is given),
    checked before vLLM is imported."""
    path(
        "model",
        model,
        "pass a model name or local folder, e.g. model='Qwen/Qwen3-0.6B'",
        optional=optional,
    )
    member("dialect", dialect, Dialect)
    mapping(
        "engine_args",
        engine_args,
        "pass vllm.LLM's keyword arguments as a dict, e.g. engine_args={'tensor_parallel_size': 2}",
    )


def _result(call: SegmentCall, output: Any) -> SegmentResult:
    """Map one ``RequestOutput`` to a segment result."""
    completion = output.outputs[0]
    reason = completion.finish_reason
    stop = completion.stop_reason
    finish: Literal["stop", "end", "length"]
    if reason == "length":
        finish = "length"
    elif reason == "stop":
        # A matched stop string is reported as itself; EOS as None, a stop token as its id.
        finish = "stop" if isinstance(stop, str) and stop in call.stop else "end"
    elif reason == "repetition":
        finish = "length"  # cut short by vLLM's repetition detector, not ended by the model
    else:
        raise BackendError(
            f"vLLM ended request {output.request_id!r} with finish_reason={reason!r} "
            "(aborted or failed); see the vLLM log"
        )
    return SegmentResult(
        text=completion.text,
        finish=finish,
        prompt_tokens=len(output.prompt_token_ids or ()),
        completion_tokens=len(completion.token_ids),
    )


class VLLMBackend(SegmentBackend):
    """Segment-level backtracking on vLLM (continuous batching, prefix caching).

    Pass an engine you built (``llm=vllm.LLM(...)``, ``async_engine=...``), or a model
    name to build ``vllm.LLM(model, enable_prefix_caching=True, **engine_args)`` (e.g.
    ``engine_args={"tensor_parallel_size": 4}``, or ``{"pipeline_parallel_size": 2,
    "distributed_executor_backend": "ray"}``); :meth:`from_async_model` builds an async one.

    Args:
        llm: a ``vllm.LLM``.
        async_engine: a ``vllm.AsyncLLMEngine`` for native ``astream``/``agenerate``.
        model: a model name or path to build the ``LLM`` from (instead of ``llm``).
        dialect: grammar language of the engine's structured-outputs backend:
            ``Dialect.EBNF`` for ``xgrammar`` (vLLM's default), ``Dialect.LARK`` for
            ``guidance``.
        engine_args: ``vllm.LLM``'s keyword arguments, passed with ``model`` (only with
            ``model``: configure an engine you pass yourself).

    Raises:
        MissingDependencyError: ``citebacktrack[vllm]`` is not installed.
        ConfigurationError: an argument of the wrong type or value (checked before vLLM
            is imported: e.g. ``model=123``, ``engine_args=[...]``, a model name given as
            ``llm``), no engine and no model, both, or engine arguments without a model;
            vLLM refused an engine argument.
        ModelLoadError: vLLM could not build the engine.
    """

    engine: VLLMEngine

    def __init__(
        self,
        llm: SyncVLLMEngine | None = None,
        *,
        async_engine: AsyncVLLMEngine | None = None,
        model: str | None = None,
        dialect: Dialect = Dialect.EBNF,
        engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        _check_engines(llm, async_engine)
        _check_arguments(model, dialect, engine_args)
        if model is not None:
            if llm is not None or async_engine is not None:
                raise ConfigurationError("pass either model= or an engine (llm=, async_engine=)")
            kwargs = {"enable_prefix_caching": True, **(engine_args or {})}
            llm = _build(model, lambda vllm: vllm.LLM(model, **kwargs), kwargs)
        elif engine_args:
            raise ConfigurationError(
                f"engine arguments {sorted(engine_args)} apply only when building from "
                "model=; configure the engine you pass yourself"
            )
        super().__init__(VLLMEngine(llm, async_engine=async_engine, dialect=dialect))

    @classmethod
    def from_async_model(
        cls,
        model: str,
        *,
        dialect: Dialect = Dialect.EBNF,
        engine_args: Mapping[str, Any] | None = None,
    ) -> VLLMBackend:
        """Build ``AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=model,
        enable_prefix_caching=True, **engine_args))`` and wrap it (async calls only)."""
        _check_arguments(model, dialect, engine_args, optional=False)
        kwargs = {"enable_prefix_caching": True, **(engine_args or {})}

        def make(vllm: ModuleType) -> Any:
            return vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(model=model, **kwargs))

        return cls(async_engine=_build(model, make, kwargs), dialect=dialect)

    def generate_many(self, requests: Sequence[GenerationRequest]) -> list[Answer]:
        """Answer many requests together: each round sends every unfinished answer's next
        segment in one ``LLM.generate`` call. Each answer is the one :meth:`generate`
        would give (with greedy decoding, or a seed)."""
        for request in requests:
            self._check(request)
        loops = [SegmentLoop(request) for request in requests]
        events: list[list[Event]] = [[] for _ in requests]
        active = list(range(len(loops)))
        while active:
            pending = [(i, call) for i in active if (call := loops[i].next_call()) is not None]
            if not pending:
                break
            results = self.engine.complete_many([call for _, call in pending])
            for (i, _), result in zip(pending, results, strict=True):
                events[i] += loops[i].feed(result)
            active = [i for i, _ in pending]
        return [
            collect([*events[i], *loop.finish()], request.sources)
            for i, (loop, request) in enumerate(zip(loops, requests, strict=True))
        ]


def _build(model: str, make: Callable[[ModuleType], Any], kwargs: Mapping[str, Any]) -> Any:
    """Build a vLLM engine with ``make(vllm)``, mapping vLLM's errors to ours."""
    vllm = import_vllm()
    try:
        return make(vllm)
    except TypeError as exc:
        raise ConfigurationError(
            f"vLLM refused the engine arguments {dict(kwargs)}: {exc}"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"vLLM could not load model {model!r}: {exc}") from exc
