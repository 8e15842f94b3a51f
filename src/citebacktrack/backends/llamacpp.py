"""LlamaCppBackend: the backtracking decoder on llama.cpp (the default, embedded model).

Masking uses XGrammar on the logits by default (fast). ``grammar_engine="gbnf"`` uses
llama.cpp's own GBNF grammar sampler instead (validated before use, rolled back by replay;
~15 ms more for each step that builds the full mask, see
:mod:`citebacktrack.backends.llamacpp_gbnf`).
"""

from __future__ import annotations

import os
from typing import Literal

from citebacktrack._arguments import Number, choice, instance, path
from citebacktrack.backends.base import GenerationRequest
from citebacktrack.backends.llamacpp_gbnf import GbnfMatcher
from citebacktrack.backends.llamacpp_runtime import LlamaCppRuntime
from citebacktrack.backends.local import LocalBackend
from citebacktrack.decoding.matcher import TokenMatcher
from citebacktrack.decoding.runtime import TokenRuntime
from citebacktrack.decoding.vocab_index import VocabularyIndex

__all__ = ["LlamaCppBackend"]


class LlamaCppBackend(LocalBackend):
    """Runs on a GGUF model through llama-cpp-python.

    The backend owns its runtime, whether it loaded it or was given one: :meth:`close`
    (or leaving a ``with`` block) closes the runtime and so frees the model and context.
    To share one runtime between backends, close the runtime yourself instead.

    Args:
        model_path: a GGUF file; ``None`` uses the embedded SmolLM2-135M-Instruct.
        runtime: an already built runtime (takes precedence over ``model_path``); the
            backend takes it over and closes it.
        n_ctx: context window to load the model with (0: the model's training context,
            as llama.cpp reads it).
        n_threads: CPU threads, at least 1 (default: llama.cpp's choice).
        grammar_engine: ``"xgrammar"`` (default) masks with XGrammar; ``"gbnf"`` with
            llama.cpp's GBNF sampler (same grammar, same answers, slower).
        prefix_cache: keep the KV of the fixed prompt prefix (the chat messages before the
            last user turn: system instruction and demo) between requests and evaluate only
            the rest (default). The prefix is evaluated as its own batch either way, so
            answers do not depend on what ran before; off, every prompt is evaluated whole.

    Raises:
        MissingDependencyError: ``citebacktrack[llamacpp]`` is not installed.
        ModelLoadError: the model file is missing, corrupt or not GGUF.
        ConfigurationError: an argument of the wrong type or out of range (checked before
            anything is loaded), e.g. ``n_ctx="2048"``, ``model_path=123`` or a
            ``grammar_engine`` other than the two (any case is accepted).
        GrammarError: (at generation, ``"gbnf"``) llama.cpp cannot parse the grammar.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        runtime: LlamaCppRuntime | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        grammar_engine: Literal["xgrammar", "gbnf"] = "xgrammar",
        prefix_cache: bool = True,
    ) -> None:
        model_path = path(
            "model_path",
            model_path,
            "pass the path of a .gguf file, or None for the embedded model",
        )
        runtime = instance(
            "runtime",
            runtime,
            LlamaCppRuntime,
            "pass LlamaCppRuntime.from_path(...), or None to load model_path",
        )
        n_ctx = Number(4096, whole=True, minimum=0)("n_ctx", n_ctx)
        n_threads = Number(4, whole=True, minimum=1, optional=True)("n_threads", n_threads)
        engine = choice("grammar_engine", grammar_engine, ("xgrammar", "gbnf"))
        super().__init__(prefix_cache=prefix_cache)
        self.grammar_engine: Literal["xgrammar", "gbnf"] = (
            "gbnf" if engine == "gbnf" else "xgrammar"
        )
        self.runtime = runtime or LlamaCppRuntime.from_path(
            model_path, n_ctx=n_ctx, n_threads=n_threads
        )
        try:
            self.index = VocabularyIndex(self.runtime.vocabulary)
        except BaseException:
            self.runtime.close()
            raise

    def _release(self) -> None:
        self.runtime.close()

    def _matcher(self, request: GenerationRequest) -> TokenMatcher | None:
        if self.grammar_engine == "xgrammar" or request.grammar is None:
            return None
        return GbnfMatcher(
            self.runtime.lib, self.runtime.llama, request.grammar, self.runtime.vocabulary.size
        )

    def _prepare(
        self, request: GenerationRequest
    ) -> tuple[TokenRuntime, VocabularyIndex, list[int], int | None]:
        prompt = self.runtime.encode_chat(request.messages)
        runtime = self._reuse_prefix(self.runtime, request.messages, prompt)
        return runtime, self.index, prompt, self.runtime.context_window
