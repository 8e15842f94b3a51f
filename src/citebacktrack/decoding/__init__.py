"""Token-level decoding: the backtracking decoder and what it runs on.

The decoder (:class:`Decoder`) drives a :class:`TokenRuntime` under a grammar matcher and
reads everything else from the :class:`~citebacktrack.request.GenerationRequest`: the
validator, :class:`~citebacktrack.request.Budgets`, and its
:class:`~citebacktrack.request.DecodingOptions` (:class:`~citebacktrack.request.SamplingConfig`
and the backtracking operators of :mod:`citebacktrack.decoding.operators`).
"""

from citebacktrack.decoding.decoder import Decoder
from citebacktrack.decoding.runtime import (
    FixedPrefixRuntime,
    Logits,
    PrefillStats,
    PrefixCachingRuntime,
    TokenRuntime,
    Vocabulary,
)

__all__ = [
    "Decoder",
    "FixedPrefixRuntime",
    "Logits",
    "PrefillStats",
    "PrefixCachingRuntime",
    "TokenRuntime",
    "Vocabulary",
]
