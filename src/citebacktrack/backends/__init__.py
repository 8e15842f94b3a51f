"""Backends: the engines that answer a :class:`~citebacktrack.request.GenerationRequest`.

``from citebacktrack.backends import LlamaCppBackend, HFBackend``: the engines are
imported on first use, so this package imports without them; each needs its extra
(``citebacktrack[llamacpp]``, ``citebacktrack[hf]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from citebacktrack.backends.base import Backend, iterate_in_thread
from citebacktrack.backends.mock import FunctionBackend, MockBackend, MockSegmentBackend
from citebacktrack.request import DecodingOptions, GenerationRequest, SegmentOptions
from citebacktrack.types import ChatMessage

if TYPE_CHECKING:
    from citebacktrack.backends.anthropic import AnthropicBackend
    from citebacktrack.backends.hf import HFBackend
    from citebacktrack.backends.llamacpp import LlamaCppBackend
    from citebacktrack.backends.llamacpp_server import LlamaCppServer
    from citebacktrack.backends.openai import OpenAIBackend
    from citebacktrack.backends.segment import SegmentBackend
    from citebacktrack.backends.vllm import VLLMBackend

__all__ = [
    "AnthropicBackend",
    "Backend",
    "ChatMessage",
    "DecodingOptions",
    "FunctionBackend",
    "GenerationRequest",
    "HFBackend",
    "LlamaCppBackend",
    "LlamaCppServer",
    "MockBackend",
    "MockSegmentBackend",
    "OpenAIBackend",
    "SegmentBackend",
    "SegmentOptions",
    "VLLMBackend",
    "iterate_in_thread",
]

_LAZY = {
    "AnthropicBackend": "citebacktrack.backends.anthropic",
    "HFBackend": "citebacktrack.backends.hf",
    "LlamaCppBackend": "citebacktrack.backends.llamacpp",
    "LlamaCppServer": "citebacktrack.backends.llamacpp_server",
    "OpenAIBackend": "citebacktrack.backends.openai",
    "SegmentBackend": "citebacktrack.backends.segment",
    "VLLMBackend": "citebacktrack.backends.vllm",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
