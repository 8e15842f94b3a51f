"""The token-runtime protocol: what a model engine must offer the decoder.

A runtime owns the model and its KV cache for one sequence. The decoder drives it:
``prefill`` once with the prompt, then ``forward`` with each kept token, and ``truncate``
when it rolls back. Logits are float32 arrays of width :attr:`Vocabulary.size`; a runtime
returns an array it will not mutate afterwards (copy engine buffers), because the decoder
keeps logits at checkpoints so that a retry needs no extra forward pass.

Prefix reuse: a runtime that also satisfies :class:`PrefixCachingRuntime` accepts
``prefill(prompt, fixed_prefix=n)``: it always evaluates ``prompt[:n]`` as its own batch and
``prompt[n:]`` after it, and when its cache already holds exactly those ``n`` tokens
(evaluated the same way) it keeps them and evaluates only the rest. The batch boundaries
never depend on what ran before, so neither do the logits. The decoder itself only calls
``prefill(prompt)``: a backend that knows ``n`` hands the decoder a
:class:`FixedPrefixRuntime` adapter that adds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from citebacktrack.types import ChatMessage

__all__ = [
    "FixedPrefixRuntime",
    "Logits",
    "PrefillStats",
    "PrefixCachingRuntime",
    "TokenRuntime",
    "Vocabulary",
]

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


@dataclass(frozen=True, slots=True)
class PrefillStats:
    """What the last :meth:`PrefixCachingRuntime.prefill` did.

    Attributes:
        prompt_tokens: length of the prompt.
        fixed_prefix: the ``fixed_prefix`` asked for (0: no reuse).
        reused_tokens: prompt tokens kept from the cache (0 or ``fixed_prefix``).
        evaluated_tokens: prompt tokens evaluated (``prompt_tokens - reused_tokens``).
    """

    prompt_tokens: int
    fixed_prefix: int
    reused_tokens: int
    evaluated_tokens: int


@runtime_checkable
class PrefixCachingRuntime(TokenRuntime, Protocol):
    """A token runtime for a chat model (it turns messages into prompt tokens) that can keep
    a fixed prompt prefix's KV cache between prefills: what the local backends run on."""

    @property
    def context_window(self) -> int:
        """Most tokens (prompt plus answer) the model can hold."""
        ...

    @property
    def last_prefill(self) -> PrefillStats | None:
        """What the last prefill evaluated and reused (``None`` before the first)."""
        ...

    def prefill(self, prompt: Sequence[int], *, fixed_prefix: int = 0) -> Logits:
        """Evaluate ``prompt`` and return the logits after its last token.

        ``fixed_prefix=0`` (the default) clears the cache and evaluates the whole prompt.
        ``fixed_prefix=n`` (``0 < n <= len(prompt)``) always evaluates ``prompt[:n]`` as its
        own batch and ``prompt[n:]`` after it; if the cache already holds exactly
        ``prompt[:n]`` from such a prefill, those ``n`` tokens are kept and only the rest is
        evaluated. The result never depends on what the cache held before.
        """
        ...

    def encode_chat(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Apply the chat template (assistant turn opened unless told not to) and tokenize."""
        ...


class FixedPrefixRuntime:
    """A :class:`TokenRuntime` whose ``prefill(prompt)`` is ``inner.prefill(prompt,
    fixed_prefix=n)``; everything else goes straight to ``inner``.

    Backends hand this adapter to the decoder (which only ever calls ``prefill(prompt)``),
    so prefix reuse needs no decoder change and the shared runtime holds no per-request
    setting.
    """

    __slots__ = ("fixed_prefix", "inner")

    def __init__(self, inner: PrefixCachingRuntime, fixed_prefix: int) -> None:
        self.inner = inner
        self.fixed_prefix = fixed_prefix

    @property
    def vocabulary(self) -> Vocabulary:
        return self.inner.vocabulary

    @property
    def n_tokens(self) -> int:
        return self.inner.n_tokens

    def prefill(self, prompt: Sequence[int]) -> Logits:
        return self.inner.prefill(prompt, fixed_prefix=self.fixed_prefix)

    def forward(self, tokens: Sequence[int]) -> Logits:
        return self.inner.forward(tokens)

    def truncate(self, n_tokens: int) -> None:
        self.inner.truncate(n_tokens)
