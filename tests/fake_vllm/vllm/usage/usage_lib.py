"""Fake of ``vllm/usage/usage_lib.py`` (vLLM 0.33.0, lines 111-117): ``UsageContext``."""

from __future__ import annotations

from enum import Enum


class UsageContext(str, Enum):  # noqa: UP042 - as vLLM declares it
    UNKNOWN_CONTEXT = "UNKNOWN_CONTEXT"
    LLM_CLASS = "LLM_CLASS"
    API_SERVER = "API_SERVER"
    OPENAI_API_SERVER = "OPENAI_API_SERVER"
    OPENAI_BATCH_RUNNER = "OPENAI_BATCH_RUNNER"
    ENGINE_CONTEXT = "ENGINE_CONTEXT"
