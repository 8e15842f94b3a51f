"""citebacktrack: grammar-enforced, decode-time-validated citations with backtracking.

The top level holds what a RAG application needs::

    from citebacktrack import Citeformer, Source

    with Citeformer() as cf:  # no backend: loads the embedded SmolLM2 model
        answer = cf.generate("Who wrote The Leopard?", [Source(text="...")])

Everything else lives in its own module: engines in :mod:`citebacktrack.backends`
(``LlamaCppBackend``, ``HFBackend``), requests in :mod:`citebacktrack.request`, support
scorers in :mod:`citebacktrack.support`, the validator in :mod:`citebacktrack.validation`,
the decoder, runtimes and sampling in :mod:`citebacktrack.decoding` (operators in
:mod:`citebacktrack.decoding.operators`), grammars in :mod:`citebacktrack.grammar`, toy
runtimes for tests in :mod:`citebacktrack.testing`, evaluation in
:mod:`citebacktrack.evaluation`.
"""

from citebacktrack.backends.base import Backend
from citebacktrack.backends.mock import FunctionBackend, MockBackend, MockSegmentBackend
from citebacktrack.errors import (
    BackendClosedError,
    BackendError,
    CitebacktrackError,
    ConfigurationError,
    ContextOverflowError,
    DatasetError,
    GrammarError,
    InvalidQuestionError,
    InvalidSourcesError,
    MissingDependencyError,
    MockExhaustedError,
    ModelLoadError,
    ScriptDepartureError,
)
from citebacktrack.orchestrator import Citeformer
from citebacktrack.render import render
from citebacktrack.request import Budgets, SamplingConfig
from citebacktrack.types import (
    Answer,
    Citation,
    CitationAccepted,
    CitationMode,
    CitationRejected,
    Done,
    Event,
    Evidence,
    Policy,
    Reference,
    RejectionReason,
    Rollback,
    SentenceOrigin,
    Source,
    Started,
    StopReason,
    TextDelta,
    Trace,
    TraceEntry,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "Answer",
    "Backend",
    "BackendClosedError",
    "BackendError",
    "Budgets",
    "Citation",
    "CitationAccepted",
    "CitationMode",
    "CitationRejected",
    "CitebacktrackError",
    "Citeformer",
    "ConfigurationError",
    "ContextOverflowError",
    "DatasetError",
    "Done",
    "Event",
    "Evidence",
    "FunctionBackend",
    "GrammarError",
    "InvalidQuestionError",
    "InvalidSourcesError",
    "MissingDependencyError",
    "MockBackend",
    "MockExhaustedError",
    "MockSegmentBackend",
    "ModelLoadError",
    "Policy",
    "Reference",
    "RejectionReason",
    "Rollback",
    "SamplingConfig",
    "ScriptDepartureError",
    "SentenceOrigin",
    "Source",
    "Started",
    "StopReason",
    "TextDelta",
    "Trace",
    "TraceEntry",
    "Usage",
    "render",
]
