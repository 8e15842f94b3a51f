"""A :class:`~citebacktrack.decoding.runtime.PrefixCachingRuntime` on transformers (a
``DynamicCache``).

The runtime runs the model on new tokens only, passing the cache back in, and rolls back by
cropping the cache. torch and transformers are imported only when a runtime is built.
``prefill(prompt, fixed_prefix=n)`` keeps a fixed prompt prefix cached between requests
(cropped back to it, never re-evaluated); the prefix is always run as its own forward pass,
so the logits do not depend on whether it was reused.

:meth:`HFRuntime.from_gguf` loads a GGUF file through transformers, which dequantizes it to
float32 (slow: tens of seconds). The converted model is saved once into a cache directory
keyed by the GGUF's path, size and mtime and by the transformers version, so later loads
read plain safetensors instead.

:meth:`HFRuntime.close` (or leaving a ``with`` block) drops the runtime's references to the
model, tokenizer and KV cache at once, so their memory goes as soon as no one else holds
them; the runtime then raises :class:`~citebacktrack.errors.BackendClosedError`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from citebacktrack.backends._hf_vocabulary import read_vocabulary
from citebacktrack.decoding.runtime import Logits, PrefillStats, Vocabulary
from citebacktrack.errors import (
    BackendClosedError,
    BackendError,
    ConfigurationError,
    MissingDependencyError,
    ModelLoadError,
)
from citebacktrack.models import check_model_file, default_cache_dir, default_model_path

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from citebacktrack.backends.base import ChatMessage

__all__ = ["CONVERTED_SUBDIR", "HFRuntime", "converted_model_dir"]

logger = logging.getLogger(__name__)

CONVERTED_SUBDIR = "hf-converted"
"""Folder under the cache root that holds converted GGUF models."""

_MARKER = "citebacktrack-converted.json"
"""Written last into a converted model's folder: its presence means the folder is complete."""

# Stop tokens besides the tokenizer's eos: chat-turn and document ends of common templates.


def _import_torch() -> Any:
    """Import torch, mapping its absence to :class:`MissingDependencyError`."""
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(feature="HFRuntime", extra="hf", module="torch") from exc
    return torch


def _import_transformers() -> Any:
    """Import transformers, mapping its absence to :class:`MissingDependencyError`."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            feature="HFRuntime", extra="hf", module="transformers"
        ) from exc
    return transformers


class HFRuntime:
    """One transformers sequence driven token by token, with rollback by cache cropping.

    The decoder calls :meth:`prefill` once, :meth:`forward` per kept token and
    :meth:`truncate` to roll back. Returned logits are float32 numpy copies on the CPU.

    :meth:`close` (idempotent; also run on leaving a ``with`` block) drops the model,
    tokenizer and cache. torch frees a model only when its last reference goes: one that
    the caller (or another runtime) still holds stays loaded.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        context_window: int | None = None,
    ) -> None:
        """Wrap a loaded causal LM and its tokenizer; the model is put in eval mode.

        Args:
            model: a transformers causal language model.
            tokenizer: its tokenizer (it must carry a chat template for :meth:`encode_chat`).
            context_window: overrides ``model.config.max_position_embeddings``.
        """
        self._torch = _import_torch()
        self._loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = (model, tokenizer)
        model.eval()  # type: ignore[no-untyped-call]
        width = int(model.config.get_text_config().vocab_size)
        self._vocabulary = read_vocabulary(tokenizer, model, width)
        if context_window is None:
            context_window = int(
                getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 0
            )
            if context_window <= 0:
                raise ConfigurationError(
                    "the model config has no max_position_embeddings; pass context_window="
                )
        self._context_window = context_window
        # logits_to_keep=1 skips the vocabulary projection for all but the last prompt row;
        # custom (remote-code) models may not accept it.
        parameters = inspect.signature(model.forward).parameters
        self._extra_forward_args: dict[str, Any] = (
            {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        )
        # transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns,
        # and goes in 5.40); older releases and custom models only know the old name.
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self._cache: Any = None
        self._n_tokens = 0
        # The fixed prefix run as its own forward pass by the last prefix prefill and still
        # in the cache, and the logits after it.
        self._prefix: tuple[int, ...] = ()
        self._prefix_logits: Logits | None = None
        self._last_prefill: PrefillStats | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        gguf_file: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        dtype: str | torch.dtype = "float32",
    ) -> HFRuntime:
        """Load a model and tokenizer with ``from_pretrained`` (a GGUF file is dequantized).

        Args:
            name_or_path: a local folder (or a hub id, where a hub is reachable).
            gguf_file: a GGUF file name inside ``name_or_path`` to load instead.
            cache_dir: transformers' download cache (not citebacktrack's converted cache).
            dtype: the weights' dtype.

        Raises:
            MissingDependencyError: torch, transformers (or gguf, for a GGUF) is missing.
            ModelLoadError: transformers cannot load the model.
        """
        model, tokenizer = _load_pretrained(
            Path(name_or_path) if isinstance(name_or_path, os.PathLike) else name_or_path,
            gguf_file=gguf_file,
            cache_dir=cache_dir,
            dtype=dtype,
        )
        return cls(model, tokenizer)

    @classmethod
    def from_gguf(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> HFRuntime:
        """Load a GGUF file (``None``: the embedded SmolLM2) as a float32 transformers model.

        The first load dequantizes the file and saves the result under
        ``<cache root>/hf-converted/``; later loads of the same unchanged file read that
        instead. A cache that cannot be written is skipped with a logged warning.

        Args:
            path: the GGUF file; ``None`` for the embedded default model.
            cache_dir: the cache root; defaults to :func:`~citebacktrack.models.default_cache_dir`
                (``$CITEBACKTRACK_CACHE_DIR``, else ``$XDG_CACHE_HOME/citebacktrack``).

        Raises:
            MissingDependencyError: torch, transformers or gguf is missing.
            ModelLoadError: the file is missing, not GGUF, or transformers cannot load it.
        """
        gguf_path = check_model_file(default_model_path() if path is None else path)
        target = converted_model_dir(gguf_path, cache_dir=cache_dir)
        if (target / _MARKER).is_file():
            try:
                model, tokenizer = _load_pretrained(target, local_files_only=True)
            except ModelLoadError as exc:
                logger.warning("replacing unreadable converted model in %s: %s", target, exc)
                shutil.rmtree(target, ignore_errors=True)
            else:
                return cls(model, tokenizer)
        model, tokenizer = _convert_gguf(gguf_path)
        _store_converted(model, tokenizer, gguf_path, target)
        return cls(model, tokenizer)

    @property
    def is_closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._loaded is None

    def close(self) -> None:
        """Drop the model, tokenizer, KV cache and kept logits now; safe to call twice.

        Any later use of the runtime raises :class:`~citebacktrack.errors.BackendClosedError`.
        """
        loaded, self._loaded = self._loaded, None
        self._cache = None
        self._n_tokens = 0
        self.forget_prefix()
        if loaded is None:
            return
        device = getattr(loaded[0], "device", None)
        del loaded
        if getattr(device, "type", None) == "cuda":
            self._torch.cuda.empty_cache()  # hand the freed blocks back to the driver

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The model and tokenizer, or :class:`BackendClosedError` after :meth:`close`."""
        if self._loaded is None:
            raise BackendClosedError(
                "this HFRuntime was closed and its model dropped; load a new one "
                "(HFRuntime.from_gguf / from_pretrained or a new HFBackend) to run again"
            )
        return self._loaded

    @property
    def _model(self) -> PreTrainedModel:
        return self._open()[0]

    @property
    def _tokenizer(self) -> PreTrainedTokenizerBase:
        return self._open()[1]

    @property
    def model(self) -> PreTrainedModel:
        """The wrapped model.

        Raises:
            BackendClosedError: the runtime was closed.
        """
        return self._model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The wrapped tokenizer.

        Raises:
            BackendClosedError: the runtime was closed.
        """
        return self._tokenizer

    @property
    def vocabulary(self) -> Vocabulary:
        """Each token's exact bytes, padded with control ids to the model's logits width."""
        return self._vocabulary

    @property
    def n_tokens(self) -> int:
        """Tokens in the cache."""
        return self._n_tokens

    @property
    def context_window(self) -> int:
        """The model's maximum positions (``max_position_embeddings`` unless overridden)."""
        return self._context_window

    @property
    def last_prefill(self) -> PrefillStats | None:
        """What the last :meth:`prefill` evaluated and reused (``None`` before the first)."""
        return self._last_prefill

    def prefill(self, prompt: Sequence[int], *, fixed_prefix: int = 0) -> Logits:
        """Evaluate ``prompt`` and return the logits after its last token.

        ``fixed_prefix=0`` starts a fresh cache and runs the prompt in one forward pass.
        ``fixed_prefix=n`` runs ``prompt[:n]`` in one pass and the rest in another; when the
        cache already holds exactly those ``n`` token ids from such a prefill, it is cropped
        back to them and only the rest is run.

        Raises:
            ConfigurationError: the prompt is empty, holds an id outside the vocabulary, or
                ``fixed_prefix`` is not in ``[0, len(prompt)]``.
            BackendError: the prompt does not fit the context, or the model failed.
            BackendClosedError: the runtime was closed.
        """
        self._open()
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
        if n and self._holds_prefix(head):
            self._drop_after(n)
            reused = n
            if n == len(tokens) and self._prefix_logits is not None:
                logits = self._prefix_logits.copy()
        else:
            transformers = _import_transformers()
            self.forget_prefix()
            self._cache = transformers.DynamicCache(config=self._model.config)
            self._n_tokens = 0
            reused = 0
            if n:
                logits = self._run(head)
                self._prefix, self._prefix_logits = head, logits.copy()
        if n < len(tokens):
            logits = self._run(tokens[n:])
        if logits is None:  # pragma: no cover - n == len(tokens) always sets it above
            raise BackendError("prefill produced no logits")
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

    def _holds_prefix(self, head: tuple[int, ...]) -> bool:
        """Whether the cache holds ``head`` as run by a prefix prefill of this runtime."""
        return (
            bool(head)
            and head == self._prefix
            and self._prefix_logits is not None
            and self._cache is not None
            and self._n_tokens >= len(head)
        )

    def forward(self, tokens: Sequence[int]) -> Logits:
        """Append ``tokens`` to the cache and return the logits after the last one.

        Raises:
            ConfigurationError: nothing was prefilled, ``tokens`` is empty, or it holds an id
                outside the vocabulary.
            BackendError: the tokens do not fit the context, or the model failed.
            BackendClosedError: the runtime was closed.
        """
        self._open()
        if self._cache is None:
            raise ConfigurationError("forward was called before prefill")
        if not tokens:
            raise ConfigurationError("forward needs at least one token, got none")
        return self._run(tokens)

    def truncate(self, n_tokens: int) -> None:
        """Keep the first ``n_tokens`` cached positions and drop the rest.

        The next :meth:`forward` evaluates its tokens at position ``n_tokens``.

        Raises:
            ConfigurationError: ``n_tokens`` is negative or more than are cached.
            BackendClosedError: the runtime was closed.
        """
        self._open()
        if not 0 <= n_tokens <= self._n_tokens:
            raise ConfigurationError(
                f"cannot truncate to {n_tokens} tokens: the cache holds {self._n_tokens}"
            )
        self._drop_after(n_tokens)

    def _drop_after(self, n_tokens: int) -> None:
        """:meth:`truncate` without the range check."""
        if n_tokens < len(self._prefix):
            self.forget_prefix()
        drop = self._n_tokens - n_tokens
        if drop == 0:
            return
        # transformers 5: crop(-k) removes the last k positions; a positive argument raises.
        with self._torch.inference_mode():
            self._cache.crop(-drop)
        self._n_tokens = n_tokens

    def encode_chat(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Apply the tokenizer's chat template with the assistant turn opened, as token ids.

        ``add_generation_prompt=False`` leaves the assistant turn unopened.

        Raises:
            BackendError: the tokenizer has no chat template or it fails to render.
            BackendClosedError: the runtime was closed.
        """
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            # transformers 5 returns a BatchEncoding unless return_dict=False.
            ids = self._tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
            )
        except (ValueError, TypeError) as exc:
            raise BackendError(f"the tokenizer's chat template failed: {exc}") from exc
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise BackendError(
                f"apply_chat_template returned {type(ids).__name__}, not a list of token ids"
            )
        return [token for token in ids if isinstance(token, int)]

    def _run(self, tokens: Sequence[int]) -> Logits:
        """Run the model on ``tokens`` after the cache; return the last row of logits."""
        torch = self._torch
        batch = [int(token) for token in tokens]
        if self._n_tokens + len(batch) > self._context_window:
            raise BackendError(
                f"{self._n_tokens} cached + {len(batch)} new tokens exceed the context window "
                f"of {self._context_window}; use a shorter prompt"
            )
        width = self._vocabulary.size
        bad = [token for token in batch if not 0 <= token < width]
        if bad:
            raise ConfigurationError(
                f"token ids {bad[:5]} are outside the vocabulary of {width} tokens"
            )
        input_ids = torch.tensor([batch], dtype=torch.long, device=self._model.device)
        try:
            with torch.inference_mode():
                output = self._model(
                    input_ids=input_ids,
                    use_cache=True,
                    **{self._cache_kwarg: self._cache},
                    **self._extra_forward_args,
                )
        except (RuntimeError, ValueError, IndexError) as exc:
            # Some layers may already hold the new positions: the cache is unusable.
            self._cache = None
            self._n_tokens = 0
            self.forget_prefix()
            raise BackendError(
                f"the model failed on {len(batch)} tokens: {exc}; call prefill again"
            ) from exc
        self._n_tokens += len(batch)
        row = output.logits[0, -1].detach().to(device="cpu", dtype=torch.float32)
        return np.array(row.numpy(), dtype=np.float32, copy=True)


def converted_model_dir(
    gguf_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Return the folder where the conversion of ``gguf_path`` is (or will be) cached.

    The folder name hashes the file's resolved path, size and mtime and the transformers
    version, so an edited file or an upgraded transformers gets a fresh conversion.
    """
    transformers = _import_transformers()
    source = Path(gguf_path).resolve()
    stat = source.stat()
    key = f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}\0{transformers.__version__}"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / CONVERTED_SUBDIR / f"{source.stem}-{digest}"


def _load_pretrained(
    name_or_path: str | Path,
    *,
    gguf_file: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: Any = "float32",
    local_files_only: bool = False,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, mapping load failures to :class:`ModelLoadError`."""
    _import_torch()
    transformers = _import_transformers()
    model_kwargs: dict[str, Any] = {"dtype": dtype}
    common: dict[str, Any] = {"local_files_only": local_files_only}
    if cache_dir is not None:
        common["cache_dir"] = str(cache_dir)
    if gguf_file is not None:
        _require_gguf()
        common["gguf_file"] = gguf_file
        gguf_config = getattr(transformers, "GgufConfig", None)
        if gguf_config is not None:
            # Unpack every weight now: a model whose linears stay packed (GgufLinear, used
            # when the `kernels` package is installed) cannot be saved to the cache.
            model_kwargs["quantization_config"] = gguf_config(dequantize=True)
    where = repr(str(Path(name_or_path) / gguf_file) if gguf_file else str(name_or_path))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, **common)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            name_or_path, **common, **model_kwargs
        )
    except ImportError as exc:
        raise MissingDependencyError(
            feature="HFRuntime", extra="hf", module=getattr(exc, "name", None) or "accelerate"
        ) from exc
    except Exception as exc:
        # Foreign boundary: a corrupt GGUF surfaces as struct.error, IndexError, KeyError...
        raise ModelLoadError(
            f"transformers could not load {where}: {type(exc).__name__}: {exc}; check that "
            "it is a complete model of an architecture transformers supports"
        ) from exc
    return model, tokenizer


def _require_gguf() -> None:
    """Raise :class:`MissingDependencyError` unless the ``gguf`` reader is installed."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as exc:
        raise MissingDependencyError(
            feature="loading GGUF files with transformers", extra="hf", module="gguf"
        ) from exc


def _convert_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """Dequantize a GGUF file into a float32 model and tokenizer (the slow path)."""
    logger.info("converting %s to a transformers model (one-time, slow)", gguf_path)
    return _load_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")


def _store_converted(model: Any, tokenizer: Any, source: Path, target: Path) -> None:
    """Save a converted model into ``target`` atomically; log (never raise) on failure.

    Everything is written into a temporary sibling folder, the marker file last, and the
    folder is then renamed: a reader sees either no folder or a complete one.
    """
    if (target / _MARKER).is_file():
        return
    if target.exists():
        # A folder without the marker is debris (a manual copy, a foreign tool): replace it.
        shutil.rmtree(target, ignore_errors=True)
    temporary: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        stat = source.stat()
        marker = {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        (temporary / _MARKER).write_text(json.dumps(marker), encoding="utf-8")
        temporary.rename(target)
        temporary = None
    except OSError as exc:
        # Another process may have won the rename race; any other failure only costs speed.
        if not (target / _MARKER).is_file():
            logger.warning("could not cache the converted model in %s: %s", target, exc)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
