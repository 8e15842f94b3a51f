"""The state of one token-level decode: its steps, and everything a rollback touches."""

from __future__ import annotations

from dataclasses import dataclass, field

from citebacktrack._draft import Draft
from citebacktrack._tracker import TextState
from citebacktrack.decoding.operators import StepStats
from citebacktrack.decoding.runtime import Logits
from citebacktrack.validation import Verdict

__all__ = ["RECENT_LOGITS", "VERDICT_CLAIMS", "Run", "Step", "kept_tokens"]

RECENT_LOGITS = 2
"""Steps whose logits are kept besides checkpoints (covers rollback of the current token)."""

VERDICT_CLAIMS = 64
"""Claims whose verdicts are cached: enough for every marker a sentence retries, and a
decode that rolls back thousands of times does not keep the verdicts of each claim."""


@dataclass(slots=True)
class Step:
    token: int
    rng: int
    state: TextState
    logits: Logits | None
    stats: StepStats | None = None
    is_checkpoint: bool = False


@dataclass(slots=True)
class Run:
    """Mutable state of one decode; everything a rollback touches lives here (the answer
    in progress in ``draft``, the token-level state beside it)."""

    draft: Draft
    steps: list[Step] = field(default_factory=list)
    state: TextState = field(default_factory=TextState)
    rng: int = 0
    logits: Logits | None = None
    kv_steps: int = 0
    bans: dict[int, set[int]] = field(default_factory=dict)
    token_bans: dict[int, set[int]] = field(default_factory=dict)
    marker_retries: dict[int, int] = field(default_factory=dict)
    sentence_retries: dict[int, int] = field(default_factory=dict)
    no_markers: set[int] = field(default_factory=set)
    open_blocks: dict[int, int] = field(default_factory=dict)
    """Sentence start -> answer length before which no marker may open there: no source
    supported the claim, so the sentence must say more before it cites again."""
    best_refused: tuple[float, int, str] = (0.0, 0, "")
    """The best-supported claim refused so far: (score, source, claim), for the quote."""
    verdicts: dict[tuple[str, tuple[int, ...]], dict[int, Verdict]] = field(default_factory=dict)
    """The validator's verdict on every id for (claim, prior ids): the ids it would
    refuse are masked before the id is sampled. The last ``VERDICT_CLAIMS`` claims used,
    least recently used first (a retry at the same marker finds its claim here)."""
    backtracks: int = 0
    wasted: int = 0
    generated: int = 0
    forward_passes: int = 0


def kept_tokens(run: Run) -> int:
    """Tokens whose bytes made it into the released text."""
    for i, step in enumerate(run.steps):
        if step.state.length >= run.draft.released:
            return i
    return len(run.steps)
