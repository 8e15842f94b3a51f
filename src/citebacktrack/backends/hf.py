"""HFBackend: the backtracking decoder on Hugging Face transformers.

A plain Python decode loop over a ``DynamicCache`` (rollback crops the cache), masked by
XGrammar. Loads an injected model and tokenizer, a ``from_pretrained`` name or folder, or
a GGUF file (dequantized once, then served from a converted-model cache).
"""

from __future__ import annotations

import os
from typing import Any

from citebacktrack.backends.base import GenerationRequest
from citebacktrack.backends.hf_runtime import HFRuntime
from citebacktrack.backends.local import LocalBackend
from citebacktrack.decoding.runtime import TokenRuntime
from citebacktrack.decoding.vocab_index import VocabularyIndex

__all__ = ["HFBackend"]


class HFBackend(LocalBackend):
    """Runs on a transformers causal LM.

    Args:
        runtime: the model and tokenizer wrapped as an :class:`HFRuntime`.

    Use :meth:`from_model`, :meth:`from_pretrained` or :meth:`from_gguf` to build one.
    """

    def __init__(self, runtime: HFRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.index = VocabularyIndex(runtime.vocabulary)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any) -> HFBackend:
        """Wrap an already loaded model and tokenizer."""
        return cls(HFRuntime(model, tokenizer))

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike[str], *, gguf_file: str | None = None
    ) -> HFBackend:
        """Load with ``AutoModelForCausalLM.from_pretrained`` (local files only here)."""
        return cls(HFRuntime.from_pretrained(name_or_path, gguf_file=gguf_file))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str] | None = None) -> HFBackend:
        """Load a GGUF file (``None``: the embedded SmolLM2 model) via the converted-model cache."""
        return cls(HFRuntime.from_gguf(path))

    def _prepare(
        self, request: GenerationRequest
    ) -> tuple[TokenRuntime, VocabularyIndex, list[int], int | None]:
        prompt = self.runtime.encode_chat(request.messages)
        return self.runtime, self.index, prompt, self.runtime.context_window
