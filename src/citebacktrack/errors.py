"""One exception tree for citebacktrack.

Every error the library raises on purpose derives from :class:`CitebacktrackError`::

    CitebacktrackError
    ├── ConfigurationError            a value passed to us is unusable (and says which)
    │   ├── InvalidSourcesError       no sources, duplicate ids, empty text, too many, bad field
    │   ├── InvalidQuestionError      empty or whitespace-only question
    │   ├── GrammarError              an IR that cannot be emitted in a dialect
    │   └── DatasetError              an evaluation dataset is missing, not JSON or malformed
    ├── MissingDependencyError        an optional extra is not installed (names the pip command)
    ├── BackendError                  an engine failed; the engine's error is chained
    │   ├── ModelLoadError            a model file is missing, unreadable or not a model
    │   ├── ContextOverflowError      the prompt does not fit the model's context window
    │   └── BackendClosedError        a closed backend or runtime was asked to run
    ├── MockExhaustedError            a MockBackend was called more often than it has scripts
    └── ScriptDepartureError          a strict test double's answer left its script (says where)

Foreign exceptions are mapped once, at the boundary that called the foreign code, with
``raise ... from exc`` so the original stays visible. Messages say what failed, with the
offending value, and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "BackendClosedError",
    "BackendError",
    "CitebacktrackError",
    "ConfigurationError",
    "ContextOverflowError",
    "DatasetError",
    "GrammarError",
    "InvalidQuestionError",
    "InvalidSourcesError",
    "MissingDependencyError",
    "MockExhaustedError",
    "ModelLoadError",
    "ScriptDepartureError",
]


class CitebacktrackError(Exception):
    """Base class of every error raised by citebacktrack."""


class ConfigurationError(CitebacktrackError, ValueError):
    """A value given to citebacktrack cannot be used as given."""


class InvalidSourcesError(ConfigurationError):
    """The list of sources is empty, has duplicate ids, empty texts, or is too long, or a
    ``Source`` cannot be built from a field's value (named in the message)."""


class InvalidQuestionError(ConfigurationError):
    """The question is empty or whitespace only."""


class GrammarError(ConfigurationError):
    """A grammar IR cannot be emitted in the requested dialect, or is malformed."""


class DatasetError(ConfigurationError):
    """An evaluation dataset is missing, is not JSON, or has a malformed record (named)."""


class MissingDependencyError(CitebacktrackError, ImportError):
    """An optional dependency is missing; the message names the ``pip install`` to run."""

    def __init__(self, *, feature: str, extra: str | None, module: str) -> None:
        self.feature = feature
        self.extra = extra
        """The extra that installs it, or None for a core dependency."""
        self.module = module
        if extra is None:
            hint = (
                f"it is a core dependency of citebacktrack; reinstall citebacktrack "
                f"or run: pip install {module}"
            )
        else:
            hint = f'install it with: pip install "citebacktrack[{extra}]"'
        super().__init__(
            f"{feature} needs the Python module {module!r}, which is not installed; {hint}"
        )


class BackendError(CitebacktrackError, RuntimeError):
    """A model engine failed while loading or generating."""


class ModelLoadError(BackendError):
    """A model file is missing, unreadable, or not a model the engine can load."""


class ContextOverflowError(BackendError):
    """The prompt (question, sources and instructions) does not fit the context window."""

    def __init__(self, *, prompt_tokens: int, context_window: int, reserve: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.context_window = context_window
        self.reserve = reserve
        super().__init__(
            f"the prompt is {prompt_tokens} tokens but the model's context window is "
            f"{context_window} tokens and {reserve} are reserved for the answer; "
            "pass fewer or shorter sources (or a smaller max_new_tokens)"
        )


class BackendClosedError(BackendError):
    """A backend (or runtime) was used after :meth:`close` freed its model."""


class MockExhaustedError(CitebacktrackError, RuntimeError):
    """A MockBackend was asked for more responses than it was scripted with."""


class ScriptDepartureError(CitebacktrackError, AssertionError):
    """A strict test double (``MockBackend(..., strict=True)`` and its kin) did not write
    its script as given: the message shows the script with a caret where the answer left
    it, what the script has there, what was written instead and what the grammar allowed.

    Attributes:
        script: the script.
        offset: where in ``script`` (a ``str`` offset) the answer left it.
        kind: the departure's kind (a :class:`~citebacktrack.types.DepartureKind` value).
    """

    def __init__(self, message: str, *, script: str, offset: int, kind: str) -> None:
        super().__init__(message)
        self.script = script
        self.offset = offset
        self.kind = kind
