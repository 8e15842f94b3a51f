"""citebacktrack: grammar-enforced, decode-time-validated citations with backtracking."""

from citebacktrack.backends.base import Backend, ChatMessage, Completion, GenerationRequest
from citebacktrack.backends.mock import (
    FunctionBackend,
    MockBackend,
    PrefixHashRuntime,
    ScriptedRuntime,
)
from citebacktrack.decoding.budgets import Budgets
from citebacktrack.decoding.operators import (
    EntropyThreshold,
    LogitThreshold,
    NGramOverlap,
    Operator,
    ProbabilityDrop,
    ProbabilityMargin,
    ProbabilityThreshold,
    ProbabilityTrend,
    Repetition,
)
from citebacktrack.decoding.runtime import ChatRuntime, TokenRuntime, Vocabulary
from citebacktrack.decoding.sampling import SamplingConfig
from citebacktrack.errors import (
    BackendError,
    CitebacktrackError,
    ConfigurationError,
    ContextOverflowError,
    GrammarError,
    InvalidQuestionError,
    InvalidSourcesError,
    MissingDependencyError,
    MockExhaustedError,
    ModelLoadError,
)
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.orchestrator import Citeformer
from citebacktrack.prompts import Demo
from citebacktrack.render import render_markdown
from citebacktrack.support import (
    FunctionSupportScorer,
    LexicalSupportScorer,
    SupportResult,
    SupportScorer,
)
from citebacktrack.types import (
    Answer,
    Citation,
    CitationAccepted,
    CitationMode,
    CitationRejected,
    Done,
    Event,
    MarkerStyle,
    Policy,
    Reference,
    RejectionReason,
    Rollback,
    Source,
    StopReason,
    TextDelta,
    Trace,
    TraceEntry,
    Usage,
)
from citebacktrack.validation import CitationValidator

__version__ = "0.1.0"

__all__ = [
    "Answer",
    "Backend",
    "BackendError",
    "Budgets",
    "ChatMessage",
    "ChatRuntime",
    "Citation",
    "CitationAccepted",
    "CitationMode",
    "CitationRejected",
    "CitationValidator",
    "CitebacktrackError",
    "Citeformer",
    "Completion",
    "ConfigurationError",
    "ContextOverflowError",
    "Demo",
    "Dialect",
    "Done",
    "EntropyThreshold",
    "Event",
    "FunctionBackend",
    "FunctionSupportScorer",
    "GenerationRequest",
    "GrammarError",
    "InvalidQuestionError",
    "InvalidSourcesError",
    "LexicalSupportScorer",
    "LogitThreshold",
    "MarkerStyle",
    "MissingDependencyError",
    "MockBackend",
    "MockExhaustedError",
    "ModelLoadError",
    "NGramOverlap",
    "Operator",
    "Policy",
    "PrefixHashRuntime",
    "ProbabilityDrop",
    "ProbabilityMargin",
    "ProbabilityThreshold",
    "ProbabilityTrend",
    "Reference",
    "RejectionReason",
    "Repetition",
    "Rollback",
    "SamplingConfig",
    "ScriptedRuntime",
    "Source",
    "StopReason",
    "SupportResult",
    "SupportScorer",
    "TextDelta",
    "TokenRuntime",
    "Trace",
    "TraceEntry",
    "Usage",
    "Vocabulary",
    "citation_grammar",
    "emit",
    "render_markdown",
]
