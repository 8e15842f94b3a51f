"""HFBackend: the backtracking decoder on Hugging Face transformers.

A plain Python decode loop over a ``DynamicCache`` (rollback crops the cache), masked by
XGrammar. Loads an injected model and tokenizer, a ``from_pretrained`` name or folder, or
a GGUF file (dequantized once, then served from a converted-model cache).
"""

from __future__ import annotations

import os
from typing import Any

from citebacktrack._arguments import flag, instance, refused
from citebacktrack._arguments import path as path_rule
from citebacktrack.backends.base import GenerationRequest
from citebacktrack.backends.hf_runtime import HFRuntime
from citebacktrack.backends.local import LocalBackend
from citebacktrack.decoding.runtime import TokenRuntime
from citebacktrack.decoding.vocab_index import VocabularyIndex

__all__ = ["HFBackend"]


class HFBackend(LocalBackend):
    """Runs on a transformers causal LM.

    The backend owns its runtime, built or given: :meth:`close` (or leaving a ``with``
    block) closes it, dropping the model, tokenizer and KV cache (torch frees them once no
    one else holds them). To share one runtime between backends, close it yourself instead.

    Args:
        runtime: the model and tokenizer wrapped as an :class:`HFRuntime`; the backend
            takes it over and closes it.
        prefix_cache: keep the KV of the fixed prompt prefix (the messages before the last
            user turn) between requests, cropping the cache back to it (default); answers
            do not depend on what ran before either way.

    Use :meth:`from_model`, :meth:`from_pretrained` or :meth:`from_gguf` to build one.

    Raises:
        ConfigurationError: an argument of the wrong type (checked before anything is
            loaded), e.g. ``HFBackend("SmolLM2")`` or ``from_gguf(path=123)``.
    """

    def __init__(self, runtime: HFRuntime, *, prefix_cache: bool = True) -> None:
        runtime = instance(
            "runtime",
            runtime,
            HFRuntime,
            "pass HFRuntime(model, tokenizer), or build the backend with HFBackend.from_model"
            "(model, tokenizer), from_pretrained(name_or_path) or from_gguf(path)",
            optional=False,
        )
        super().__init__(prefix_cache=prefix_cache)
        self.runtime = runtime
        self.index = VocabularyIndex(runtime.vocabulary)

    def _release(self) -> None:
        self.runtime.close()

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, prefix_cache: bool = True) -> HFBackend:
        """Wrap an already loaded model and tokenizer."""
        for name, value in (("model", model), ("tokenizer", tokenizer)):
            if value is None or isinstance(value, str | os.PathLike):
                raise refused(
                    name,
                    value,
                    f"a loaded transformers {name}",
                    "to load one by name or folder use HFBackend.from_pretrained(name_or_path)",
                )
        flag("prefix_cache", prefix_cache)
        return cls(HFRuntime(model, tokenizer), prefix_cache=prefix_cache)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        gguf_file: str | None = None,
        prefix_cache: bool = True,
    ) -> HFBackend:
        """Load with ``AutoModelForCausalLM.from_pretrained`` (local files only here)."""
        path_rule(
            "name_or_path",
            name_or_path,
            "pass a local model folder (or a hub id), e.g. from_pretrained('models/SmolLM2')",
            optional=False,
        )
        path_rule("gguf_file", gguf_file, "pass the GGUF file's name inside name_or_path, or None")
        flag("prefix_cache", prefix_cache)
        return cls(
            HFRuntime.from_pretrained(name_or_path, gguf_file=gguf_file), prefix_cache=prefix_cache
        )

    @classmethod
    def from_gguf(
        cls, path: str | os.PathLike[str] | None = None, *, prefix_cache: bool = True
    ) -> HFBackend:
        """Load a GGUF file (``None``: the embedded SmolLM2 model) via the converted-model cache."""
        path_rule("path", path, "pass the path of a .gguf file, or None for the embedded model")
        flag("prefix_cache", prefix_cache)
        return cls(HFRuntime.from_gguf(path), prefix_cache=prefix_cache)

    def _prepare(
        self, request: GenerationRequest
    ) -> tuple[TokenRuntime, VocabularyIndex, list[int], int | None]:
        prompt = self.runtime.encode_chat(request.messages)
        runtime = self._reuse_prefix(self.runtime, request.messages, prompt)
        return runtime, self.index, prompt, self.runtime.context_window
