"""Backends. Heavy engines live in their own modules and import their engine lazily:

``citebacktrack.backends.llamacpp.LlamaCppBackend`` (extra ``llamacpp``) and
``citebacktrack.backends.hf.HFBackend`` (extra ``hf``).
"""

from citebacktrack.backends.base import Backend, ChatMessage, Completion, GenerationRequest, collect
from citebacktrack.backends.mock import FunctionBackend, MockBackend

__all__ = [
    "Backend",
    "ChatMessage",
    "Completion",
    "FunctionBackend",
    "GenerationRequest",
    "MockBackend",
    "collect",
]
