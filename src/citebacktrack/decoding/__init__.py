"""Token-level decoding: the backtracking decoder and what it runs on.

The decoder (:class:`Decoder`) drives a :class:`TokenRuntime` under a grammar matcher,
a validator and :class:`Budgets`; its options per request are
:class:`~citebacktrack.request.DecodingOptions` (:class:`SamplingConfig` and the
backtracking operators of :mod:`citebacktrack.decoding.operators`).
"""

from citebacktrack.decoding.budgets import Budgets
from citebacktrack.decoding.decoder import Decoder
from citebacktrack.decoding.runtime import (
    ChatRuntime,
    FixedPrefixRuntime,
    Logits,
    PrefillStats,
    PrefixCachingRuntime,
    TokenRuntime,
    Vocabulary,
)
from citebacktrack.decoding.sampling import SamplingConfig

__all__ = [
    "Budgets",
    "ChatRuntime",
    "Decoder",
    "FixedPrefixRuntime",
    "Logits",
    "PrefillStats",
    "PrefixCachingRuntime",
    "SamplingConfig",
    "TokenRuntime",
    "Vocabulary",
]
