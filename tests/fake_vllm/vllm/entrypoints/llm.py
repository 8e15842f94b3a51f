"""Fake of ``vllm/entrypoints/llm.py`` (vLLM 0.33.0): the offline ``LLM``.

Mirrors ``LLM.__init__`` (line 177: ``model`` positional, every other argument keyword-only,
the rest of ``EngineArgs`` through ``**kwargs``), ``get_tokenizer`` (line 385) and
``generate`` (line 417: ``prompts``, ``sampling_params`` one for all or one per prompt,
keyword-only ``use_tqdm``, ``lora_request``, ``priority``, ``tokenization_kwargs``,
``mm_processor_kwargs``; returns one ``RequestOutput`` per prompt, in order). The model
is a registered script (``vllm._scripted``); ``structured_outputs_config`` selects the
grammar backend (``"auto"``/``"xgrammar"`` read EBNF or Lark, ``"guidance"`` Lark).

``generate_calls`` (not in vLLM) records each call's prompts, for tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from vllm._scripted import FakeTokenizer, decode, load, validate
from vllm.engine.arg_utils import EngineArgs
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams


def backend_of(config: Any) -> str:
    if config is None:
        return "auto"
    if isinstance(config, dict):
        return str(config.get("backend", "auto"))
    return str(config.backend)


class LLM:
    """An LLM for generating texts from given prompts and sampling parameters."""

    def __init__(
        self,
        model: str,
        *,
        runner: Any = "auto",
        convert: Any = "auto",
        tokenizer: str | None = None,
        tokenizer_mode: str = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        allowed_local_media_path: str = "",
        allowed_media_domains: list[str] | None = None,
        tensor_parallel_size: int = 1,
        dtype: Any = "auto",
        quantization: Any = None,
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        chat_template: Any = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.92,
        cpu_offload_gb: float = 0,
        offload_group_size: int = 0,
        offload_num_in_group: int = 1,
        offload_prefetch_step: int = 1,
        offload_params: set[str] | None = None,
        enforce_eager: bool = False,
        enable_return_routed_experts: bool = False,
        return_sampling_mask: bool = False,
        disable_custom_all_reduce: bool = False,
        hf_token: bool | str | None = None,
        hf_overrides: Any = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        pooler_config: Any = None,
        structured_outputs_config: Any = None,
        profiler_config: Any = None,
        attention_config: Any = None,
        kv_cache_memory_bytes: int | None = None,
        compilation_config: Any = None,
        quantization_config: Any = None,
        logits_processors: list[Any] | None = None,
        spec_method: str | None = None,
        spec_model: str | None = None,
        spec_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("disable_log_stats", True)
        self.engine_args = EngineArgs(
            model=model,
            tokenizer=tokenizer,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            structured_outputs_config=structured_outputs_config or {},
            **kwargs,
        )
        self._script = load(model)
        self._backend = backend_of(structured_outputs_config)
        self._ids = itertools.count()
        self.generate_calls: list[list[str]] = []

    def get_tokenizer(self) -> Any:
        return FakeTokenizer()

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | Callable[..., Any] = True,
        lora_request: Any = None,
        priority: int | Sequence[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generates the completions for the input prompts (text prompts only here)."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in batch):
            raise NotImplementedError("the fake LLM takes text prompts only")
        if sampling_params is None:
            params = [SamplingParams()] * len(batch)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(batch)
        else:
            params = list(sampling_params)
            if len(params) != len(batch):
                raise ValueError("The lengths of prompts and sampling_params must be the same.")
        self.generate_calls.append(batch)
        compiled = [validate(p, self._backend) for p in params]  # all checked before any runs
        return [
            finished(str(next(self._ids)), prompt, decode(self._script, prompt, p, grammar))
            for prompt, p, grammar in zip(batch, params, compiled, strict=True)
        ]


def finished(request_id: str, prompt: str, decoded: Any) -> RequestOutput:
    completion = CompletionOutput(
        index=0,
        text=decoded.text,
        token_ids=decoded.token_ids,
        cumulative_logprob=None,
        logprobs=None,
        finish_reason=decoded.finish_reason,
        stop_reason=decoded.stop_reason,
    )
    return RequestOutput(
        request_id=request_id,
        prompt=prompt,
        prompt_token_ids=decoded.prompt_token_ids,
        prompt_logprobs=None,
        outputs=[completion],
        finished=True,
    )
