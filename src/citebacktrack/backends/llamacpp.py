"""LlamaCppBackend: the backtracking decoder on llama.cpp (the default, embedded model).

Masking uses XGrammar on the logits (fast); llama.cpp's own GBNF sampler is not used in
the decode loop, because it cannot roll back with the KV cache. The GBNF dialect is for a
llama.cpp *server* (see ``citebacktrack grammar --dialect gbnf``).
"""

from __future__ import annotations

import os

from citebacktrack.backends.base import GenerationRequest
from citebacktrack.backends.llamacpp_runtime import LlamaCppRuntime
from citebacktrack.backends.local import LocalBackend
from citebacktrack.decoding.runtime import TokenRuntime
from citebacktrack.decoding.vocab_index import VocabularyIndex

__all__ = ["LlamaCppBackend"]


class LlamaCppBackend(LocalBackend):
    """Runs on a GGUF model through llama-cpp-python.

    Args:
        model_path: a GGUF file; ``None`` uses the embedded SmolLM2-135M-Instruct.
        runtime: an already built runtime (takes precedence over ``model_path``).
        n_ctx: context window to load the model with.
        n_threads: CPU threads (default: llama.cpp's choice).

    Raises:
        MissingDependencyError: ``citebacktrack[llamacpp]`` is not installed.
        ModelLoadError: the model file is missing, corrupt or not GGUF.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        runtime: LlamaCppRuntime | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
    ) -> None:
        super().__init__()
        self.runtime = runtime or LlamaCppRuntime.from_path(
            model_path, n_ctx=n_ctx, n_threads=n_threads
        )
        self.index = VocabularyIndex(self.runtime.vocabulary)

    def _prepare(
        self, request: GenerationRequest
    ) -> tuple[TokenRuntime, VocabularyIndex, list[int], int | None]:
        prompt = self.runtime.encode_chat(request.messages)
        return self.runtime, self.index, prompt, self.runtime.context_window
