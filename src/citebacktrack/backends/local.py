"""Backends that run the backtracking decoder on a token runtime they own."""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Iterator, Sequence

from citebacktrack.backends.base import Backend, GenerationRequest
from citebacktrack.decoding.decoder import Decoder
from citebacktrack.decoding.runtime import TokenRuntime
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.errors import ContextOverflowError
from citebacktrack.types import Event

__all__ = ["LocalBackend", "decode"]


def decode(
    runtime: TokenRuntime,
    index: VocabularyIndex,
    request: GenerationRequest,
    prompt: Sequence[int],
    *,
    context_window: int | None = None,
) -> Iterator[Event]:
    """Run the backtracking decoder for ``request`` on ``runtime``.

    Raises:
        ContextOverflowError: the prompt plus ``max_new_tokens`` exceeds ``context_window``.
    """
    reserve = request.budgets.max_new_tokens
    if context_window is not None and len(prompt) + reserve > context_window:
        raise ContextOverflowError(
            prompt_tokens=len(prompt), context_window=context_window, reserve=reserve
        )
    decoder = Decoder(
        runtime,
        index,
        index.compile(request.grammar),
        policy=request.policy,
        validator=request.validator,
        sampling=request.sampling,
        budgets=request.budgets,
        operators=request.operators,
        source_ids=request.source_ids,
    )
    yield from decoder.run(prompt)


class LocalBackend(Backend):
    """A backend with one in-process model, used by one decode at a time.

    Concurrent ``stream``/``astream`` calls from many threads or tasks are serialized on
    a lock: the model has one KV cache, and a 2-core machine gains nothing from batching
    small models. Each call holds the lock from its first event to its last.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @abstractmethod
    def _prepare(
        self, request: GenerationRequest
    ) -> tuple[TokenRuntime, VocabularyIndex, list[int], int | None]:
        """Return the runtime, its vocabulary index, the prompt tokens and the context window."""

    def stream(self, request: GenerationRequest) -> Iterator[Event]:
        """Decode ``request`` with grammar, validation and backtracking."""
        with self._lock:
            runtime, index, prompt, window = self._prepare(request)
            yield from decode(runtime, index, request, prompt, context_window=window)
