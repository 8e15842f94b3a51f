"""Fake of ``vllm/engine/arg_utils.py`` (vLLM 0.33.0): a few fields of the engine arguments.

``EngineArgs`` (line 489) is a dataclass of about 290 fields; this fake keeps the ones
the backend and its tests pass, in 0.33's order and with 0.33's defaults resolved
(``ModelConfig.model`` = ``"Qwen/Qwen3-0.6B"``, ``ParallelConfig.*_parallel_size`` = 1,
``ModelConfig.seed`` = 0). Any other name fails with ``TypeError``, as an unknown one
does in vLLM. ``AsyncEngineArgs`` (line 3244) adds ``enable_log_requests``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EngineArgs:
    """Arguments for vLLM engine."""

    model: str = "Qwen/Qwen3-0.6B"
    tokenizer: str | None = None
    seed: int = 0
    distributed_executor_backend: str | None = None
    pipeline_parallel_size: int = 1
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool | None = None
    disable_log_stats: bool = False
    structured_outputs_config: Any = field(default_factory=dict)


@dataclass
class AsyncEngineArgs(EngineArgs):
    """Arguments for asynchronous vLLM engine."""

    enable_log_requests: bool = False
