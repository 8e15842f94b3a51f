"""Fake of ``vllm/v1/engine/async_llm.py`` (vLLM 0.33.0): ``AsyncLLM``
(``vllm.AsyncLLMEngine`` is an alias of it, ``vllm/engine/async_llm_engine.py`` line 6).

Mirrors ``from_engine_args`` (classmethod, line 279), ``shutdown`` (line 305),
``generate`` (line 726: an async generator of ``RequestOutput``; with the default
``output_kind=CUMULATIVE`` each output holds the whole text so far, and the last one has
``finished=True`` and the finish reason) and ``get_tokenizer`` (line 1119, not async).
The model is a registered script (``vllm._scripted``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Any

import anyio

from vllm._scripted import FakeTokenizer, decode, load, validate
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.llm import backend_of, finished
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams
from vllm.usage.usage_lib import UsageContext


class AsyncLLM:
    """An asynchronous wrapper for the vLLM engine."""

    def __init__(self, engine_args: AsyncEngineArgs) -> None:
        self.engine_args = engine_args
        self._script = load(engine_args.model)
        self._backend = backend_of(engine_args.structured_outputs_config)
        self.requests: list[str] = []
        self.is_shut_down = False

    @classmethod
    def from_engine_args(
        cls,
        engine_args: AsyncEngineArgs,
        start_engine_loop: bool = True,
        usage_context: UsageContext = UsageContext.ENGINE_CONTEXT,
        stat_loggers: list[Any] | None = None,
    ) -> AsyncLLM:
        """Create an AsyncLLM from the EngineArgs."""
        return cls(engine_args)

    def shutdown(self, timeout: float | None = None) -> None:
        self.is_shut_down = True

    async def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        prompt_text: str | None = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        trace_headers: Mapping[str, str] | None = None,
        priority: int = 0,
        data_parallel_rank: int | None = None,
        session_id: str | None = None,
        kv_hints: Any = None,
        reasoning_ended: bool | None = None,
        reasoning_parser_kwargs: dict[str, Any] | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Generate outputs for a request (text prompts only here)."""
        if self.is_shut_down:
            raise RuntimeError("the engine was shut down")
        if not isinstance(prompt, str):
            raise NotImplementedError("the fake AsyncLLM takes text prompts only")
        self.requests.append(request_id)
        decoded = decode(
            self._script, prompt, sampling_params, validate(sampling_params, self._backend)
        )
        for text, ids in decoded.steps:
            await anyio.sleep(0)
            completion = CompletionOutput(0, text, ids, None, None)
            yield RequestOutput(
                request_id, prompt, decoded.prompt_token_ids, None, [completion], False
            )
        await anyio.sleep(0)
        yield finished(request_id, prompt, decoded)

    def get_tokenizer(self) -> Any:
        return FakeTokenizer()
