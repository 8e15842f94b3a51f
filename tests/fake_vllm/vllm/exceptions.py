"""Fake of ``vllm/exceptions.py`` (vLLM 0.33.0): the error a rejected request raises.

Mirrors lines 10-56: ``VLLMError(Exception)`` > ``VLLMClientError`` >
``VLLMValidationError(message, *, parameter=None, value=None)``. Not a ``ValueError``.
"""

from __future__ import annotations

from typing import Any


class VLLMError(Exception):
    """Base class for all vLLM-specific errors."""


class VLLMClientError(VLLMError):
    """Base class for errors caused by the client request (4xx)."""


class VLLMValidationError(VLLMClientError):
    """vLLM-specific validation error for request validation failures."""

    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value
