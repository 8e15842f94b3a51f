"""Grammar matchers: what the decoder asks a grammar engine at each token.

The decoder needs three things from a grammar engine: which tokens may come next, whether
a token is accepted (advancing the state), and rolling the last ``n`` accepted tokens
back. :class:`XGrammarMatcher` is the default on every token-level backend (a bitmask
over the vocabulary in ~0.1 ms on a 49k vocabulary; rollback is O(n) in
XGrammar's own history). Other engines plug in through the same protocol, e.g.
llama.cpp's GBNF sampler (``citebacktrack.backends.llamacpp_gbnf``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from citebacktrack.decoding.vocab_index import import_xgrammar

if TYPE_CHECKING:
    import xgrammar as xgr

__all__ = ["FreeMatcher", "TokenMatcher", "XGrammarMatcher"]


class TokenMatcher(Protocol):
    """A grammar's state during one decode."""

    def allowed(self) -> npt.NDArray[np.bool_]:
        """A fresh boolean array over the logits width: True where the grammar allows the
        token next (a stop token only where the grammar may end)."""
        ...

    def accept_token(self, token: int) -> bool:
        """Advance by ``token``; False (state unchanged) if the grammar does not allow it."""
        ...

    def rollback(self, n_tokens: int) -> None:
        """Undo the last ``n_tokens`` accepted tokens."""
        ...


class XGrammarMatcher:
    """:class:`TokenMatcher` on an XGrammar ``GrammarMatcher``.

    Args:
        compiled: the grammar compiled for the model's vocabulary.
        vocab_size: the logits width.
    """

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        xgr = import_xgrammar()
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._bitmask_bytes = self._bitmask.numpy().view(np.uint8)
        self._size = vocab_size

    def allowed(self) -> npt.NDArray[np.bool_]:
        self._matcher.fill_next_token_bitmask(self._bitmask)
        bits = np.unpackbits(self._bitmask_bytes, bitorder="little", count=self._size)
        return bits.view(np.bool_)

    def accept_token(self, token: int) -> bool:
        return bool(self._matcher.accept_token(token))

    def rollback(self, n_tokens: int) -> None:
        self._matcher.rollback(n_tokens)


class FreeMatcher:
    """:class:`TokenMatcher` of no grammar: every token is allowed (unconstrained decoding).

    Used for a request whose ``grammar`` is ``None``, such as the raw-model baseline of
    ``citebacktrack eval``.
    """

    def __init__(self, vocab_size: int) -> None:
        self._size = vocab_size

    def allowed(self) -> npt.NDArray[np.bool_]:
        return np.ones(self._size, dtype=bool)

    def accept_token(self, token: int) -> bool:
        return True

    def rollback(self, n_tokens: int) -> None:
        return None
