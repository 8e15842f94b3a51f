"""The token-runtime protocol: what a model engine must offer the decoder.

A runtime owns the model and its KV cache for one sequence. The decoder drives it:
``prefill`` once with the prompt, then ``forward`` with each kept token, and ``truncate``
when it rolls back. Logits are float32 arrays of width :attr:`Vocabulary.size`; a runtime
returns an array it will not mutate afterwards (copy engine buffers), because the decoder
keeps logits at checkpoints so that a retry needs no extra forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from citebacktrack.backends.base import ChatMessage

__all__ = ["ChatRuntime", "Logits", "TokenRuntime", "Vocabulary"]

Logits = npt.NDArray[np.float32]
"""One row of next-token logits."""


@dataclass(frozen=True, slots=True, eq=False)
class Vocabulary:
    """What the decoder must know about a tokenizer.

    Attributes:
        tokens: each token's UTF-8 bytes as it appears in decoded text (``b" the"``);
            control tokens may be any placeholder bytes.
        stop_ids: tokens that end generation (e.g. ``<|im_end|>``).
        control_ids: tokens that must never be sampled (other special tokens).
        size: the model's logits width; may exceed ``len(tokens)`` (padding rows, masked).
    """

    tokens: Sequence[bytes]
    stop_ids: frozenset[int]
    control_ids: frozenset[int] = field(default_factory=frozenset)
    size: int = 0

    def __post_init__(self) -> None:
        if self.size == 0:
            object.__setattr__(self, "size", len(self.tokens))

    @property
    def width(self) -> int:
        """The logits width (alias of :attr:`size`)."""
        return self.size


@runtime_checkable
class TokenRuntime(Protocol):
    """A model with a KV cache for one sequence, driven token by token."""

    @property
    def vocabulary(self) -> Vocabulary:
        """The tokenizer facts the decoder needs."""
        ...

    @property
    def n_tokens(self) -> int:
        """Tokens in the cache (prompt plus kept generated tokens)."""
        ...

    def prefill(self, prompt: Sequence[int]) -> Logits:
        """Reset the cache, evaluate ``prompt`` and return the logits after its last token."""
        ...

    def forward(self, tokens: Sequence[int]) -> Logits:
        """Append ``tokens`` to the cache and return the logits after the last one."""
        ...

    def truncate(self, n_tokens: int) -> None:
        """Drop everything after the first ``n_tokens`` tokens from the cache."""
        ...


@runtime_checkable
class ChatRuntime(TokenRuntime, Protocol):
    """A token runtime for a chat model: it can also turn messages into prompt tokens."""

    @property
    def context_window(self) -> int:
        """Most tokens (prompt plus answer) the model can hold."""
        ...

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Apply the model's chat template (with the assistant turn opened) and tokenize."""
        ...
