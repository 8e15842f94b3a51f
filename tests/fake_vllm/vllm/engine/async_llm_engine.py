"""Fake of ``vllm/engine/async_llm_engine.py`` (vLLM 0.33.0, line 6): an alias."""

from __future__ import annotations

from vllm.v1.engine.async_llm import AsyncLLM

AsyncLLMEngine = AsyncLLM
