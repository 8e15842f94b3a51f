"""llama.cpp's own GBNF grammar sampler as a :class:`~citebacktrack.decoding.matcher.TokenMatcher`.

An alternative to XGrammar on :class:`~citebacktrack.backends.llamacpp.LlamaCppBackend`
(``grammar_engine="gbnf"``): the same citation grammar, emitted as GBNF and enforced by
llama.cpp's sampler, e.g. to cross-check XGrammar or to match a llama.cpp server's
behaviour exactly. It is slower: for a full mask llama.cpp tests every one of the 49,152
candidates against the grammar (~15 ms on 2 cores, against ~0.07 ms for XGrammar's
precompiled mask); steps whose proposed token passes alone ask it about that token only.

Two llama.cpp behaviours are handled here:

* ``llama_sampler_init_grammar`` returns NULL for a grammar it cannot parse (and
  ``LlamaGrammar.from_string`` does not check at all, so a bad grammar would silently
  constrain nothing): the grammar is parsed up front and a NULL is a :class:`GrammarError`.
* Accepting a token the grammar does not allow, or an end-of-generation token, aborts the
  process inside llama.cpp: a token is checked on a one-candidate array before it is
  accepted, and end-of-generation tokens are never passed to ``accept``.

The sampler has no rollback; :meth:`GbnfMatcher.rollback` resets it and replays the kept
tokens (O(answer length) per rollback, microseconds per token).

The sampler is native memory: :meth:`GbnfMatcher.close` frees it, and the backend calls it
when the decode ends (normally, by an error, or by the backend's ``close``), before the
model it points into can be freed. ``__del__`` only backs that up.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from citebacktrack.errors import BackendClosedError, GrammarError
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.grammar.ir import Grammar

__all__ = ["GbnfMatcher"]


class GbnfMatcher:
    """llama.cpp's grammar sampler over a model's vocabulary, one decode long.

    Call :meth:`close` (or use it as a context manager) when the decode ends, and before
    the model is closed; a closed matcher raises
    :class:`~citebacktrack.errors.BackendClosedError`.

    Args:
        lib: the ``llama_cpp`` module.
        llama: the loaded ``llama_cpp.Llama`` whose vocabulary the grammar runs on.
        grammar: the grammar (IR, emitted as GBNF) or GBNF text with a ``root`` rule.
        vocab_size: the logits width (at least the model's vocabulary size).

    Raises:
        GrammarError: llama.cpp's parser rejects the grammar.
    """

    def __init__(self, lib: Any, llama: Any, grammar: Grammar | str, vocab_size: int) -> None:
        text = grammar if isinstance(grammar, str) else emit(grammar, Dialect.GBNF)
        self._lib = lib
        vocab = llama._model.vocab
        self._sampler = lib.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
        if not self._sampler:
            raise GrammarError(
                "llama.cpp could not parse the GBNF grammar (its parser's message is on "
                "stderr); check it with `citebacktrack grammar --dialect gbnf`, or use "
                "grammar_engine='xgrammar'"
            )
        try:
            self._setup(lib, vocab, vocab_size)
        except BaseException:
            self.close()
            raise

    def _setup(self, lib: Any, vocab: Any, vocab_size: int) -> None:
        """Build the candidate arrays the sampler is applied to."""
        n_vocab = int(lib.llama_vocab_n_tokens(vocab))
        self._eog = np.array(
            [bool(lib.llama_vocab_is_eog(vocab, t)) for t in range(n_vocab)], dtype=bool
        )
        self._size = vocab_size
        self._candidates = (lib.llama_token_data * n_vocab)()
        view = np.ctypeslib.as_array(self._candidates)
        view["id"] = np.arange(n_vocab, dtype=np.int32)
        self._logits = view["logit"]
        self._array = lib.llama_token_data_array(self._candidates, n_vocab, -1, False)
        self._one = lib.llama_token_data(0, 0.0, 0.0)
        self._one_array = lib.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)
        self._accepted: list[int] = []

    def close(self) -> None:
        """Free the native sampler; safe to call twice. Later calls raise
        :class:`~citebacktrack.errors.BackendClosedError`."""
        sampler = getattr(self, "_sampler", None)
        self._sampler = None
        if sampler:
            self._lib.llama_sampler_free(sampler)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A safety net only: the backend closes the matcher when its decode ends.
        self.close()

    @property
    def is_closed(self) -> bool:
        """Whether the sampler was freed."""
        return not self._sampler

    def _live(self) -> Any:
        """The native sampler, or :class:`BackendClosedError` once it was freed."""
        if not self._sampler:
            raise BackendClosedError(
                "this GbnfMatcher was closed and its llama.cpp sampler freed; "
                "build a new one for the next decode"
            )
        return self._sampler

    def allowed(self) -> npt.NDArray[np.bool_]:
        sampler = self._live()
        self._logits[:] = 0.0
        self._array.size = len(self._logits)
        self._array.selected = -1
        self._array.sorted = False
        self._lib.llama_sampler_apply(sampler, ctypes.byref(self._array))
        out = np.zeros(self._size, dtype=bool)
        out[: len(self._logits)] = np.isfinite(self._logits)
        return out

    def _allows(self, token: int) -> bool:
        sampler = self._live()
        self._one.id, self._one.logit, self._one.p = token, 0.0, 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        self._lib.llama_sampler_apply(sampler, ctypes.byref(self._one_array))
        return bool(np.isfinite(self._one.logit))

    def accept_token(self, token: int) -> bool:
        if not 0 <= token < len(self._eog) or not self._allows(token):
            return False
        if not self._eog[token]:  # accepting an end-of-generation token aborts llama.cpp
            self._lib.llama_sampler_accept(self._sampler, token)
        self._accepted.append(token)  # counted, like XGrammar, so rollback(n) agrees
        return True

    def rollback(self, n_tokens: int) -> None:
        if not 0 <= n_tokens <= len(self._accepted):
            raise GrammarError(
                f"cannot roll back {n_tokens} tokens: only {len(self._accepted)} were accepted"
            )
        if n_tokens == 0:
            return
        del self._accepted[len(self._accepted) - n_tokens :]
        self._replay(self._accepted)

    def _replay(self, tokens: Sequence[int]) -> None:
        sampler = self._live()
        self._lib.llama_sampler_reset(sampler)
        for token in tokens:
            if not self._eog[token]:
                self._lib.llama_sampler_accept(sampler, token)
