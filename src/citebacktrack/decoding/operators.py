"""Backtracking operators: rules that may roll back tokens anywhere, not only at citations.

An operator looks at the step just taken (the full distribution the token was drawn
from, not a top-k) and at the statistics of earlier kept steps, and returns how many
tokens to roll back (0: keep going). Operators hold no mutable state: whatever they
remember is read from ``history``, which the decoder truncates on every rollback, so an
operator's state always rolls back with the checkpoint. The rolled-back position's token
is banned there, so the retry cannot repeat it; each position allows
``Budgets.retries_per_checkpoint`` operator retries, after which operators are ignored there.

Names and meanings follow the backtracking-llm family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from citebacktrack._arguments import Number, check_fields

__all__ = [
    "EntropyThreshold",
    "LogitThreshold",
    "NGramOverlap",
    "Operator",
    "ProbabilityDrop",
    "ProbabilityMargin",
    "ProbabilityThreshold",
    "ProbabilityTrend",
    "Repetition",
    "StepStats",
    "StepView",
    "strongest",
    "view_of",
]


@dataclass(frozen=True, slots=True)
class StepStats:
    """What an operator may remember about one kept step."""

    token: int
    probability: float
    entropy: float
    margin: float
    logit: float


@dataclass(frozen=True, slots=True)
class StepView:
    """The step an operator judges.

    Attributes:
        position: generated-token index of this token.
        token: the chosen token.
        logits: the masked logits it was drawn from (disallowed tokens at ``-inf``).
        probabilities: softmax of ``logits`` (the full distribution).
        stats: this step's summary (same fields as the history entries).
        history: stats of the kept steps before this one, oldest first.
    """

    position: int
    token: int
    logits: npt.NDArray[np.float32]
    probabilities: npt.NDArray[np.float64]
    stats: StepStats
    history: Sequence[StepStats]


def view_of(
    position: int, token: int, masked: npt.NDArray[np.float32], history: Sequence[StepStats]
) -> StepView:
    """The step ``token`` drawn from ``masked`` at ``position``, as operators see it."""
    finite = np.isfinite(masked)
    shifted = np.where(finite, masked - masked[finite].max(), -np.inf).astype(np.float64)
    probs = np.exp(shifted)
    probs /= probs.sum()
    nonzero = probs[probs > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum())
    top = np.partition(probs, -2)[-2:] if probs.size > 1 else np.array([0.0, probs[0]])
    stats = StepStats(
        token=token,
        probability=float(probs[token]),
        entropy=entropy,
        margin=float(top[1] - top[0]),
        logit=float(masked[token]),
    )
    return StepView(position, token, masked, probs, stats, history)


def strongest(operators: Sequence[Operator], view: StepView) -> tuple[int, str]:
    """The deepest rollback any of ``operators`` asks for at ``view`` (0: none), and the
    name of the first operator that asked for it."""
    depth, name = 0, ""
    for operator in operators:
        wanted = operator.check(view)
        if wanted > depth:
            depth = wanted
            name = type(operator).__name__
    return depth, name


@runtime_checkable
class Operator(Protocol):
    """A rule that can ask for a rollback after any step."""

    @property
    def max_depth(self) -> int:
        """The most tokens this operator ever rolls back (the stream holds that many back)."""
        ...

    def check(self, view: StepView) -> int:
        """Return how many tokens to roll back, counting this one (0: none)."""
        ...


# Each operator's arguments are checked by the shared rules (``citebacktrack._arguments``):
# a wrong type or value is a ConfigurationError naming ``Operator.field``, what was given
# and what to pass (``ProbabilityThreshold("0.1")`` says to pass the number itself).
_COUNT = Number(1, whole=True, minimum=1)


def _unit(example: float) -> Number:
    """A probability-like argument strictly between 0 and 1."""
    return Number(example, above=0, below=1)


@dataclass(frozen=True, slots=True)
class ProbabilityThreshold:
    """Roll back when the chosen token's probability is below ``threshold``."""

    threshold: float = 0.05
    backtrack_count: int = 1

    def __post_init__(self) -> None:
        check_fields(self, {"threshold": _unit(0.05), "backtrack_count": _COUNT})

    @property
    def max_depth(self) -> int:
        return self.backtrack_count

    def check(self, view: StepView) -> int:
        return self.backtrack_count if view.stats.probability < self.threshold else 0


@dataclass(frozen=True, slots=True)
class EntropyThreshold:
    """Roll back when the distribution's entropy (nats) exceeds ``threshold``."""

    threshold: float = 3.0
    backtrack_count: int = 1

    def __post_init__(self) -> None:
        check_fields(self, {"threshold": Number(3.0, above=0), "backtrack_count": _COUNT})

    @property
    def max_depth(self) -> int:
        return self.backtrack_count

    def check(self, view: StepView) -> int:
        return self.backtrack_count if view.stats.entropy > self.threshold else 0


@dataclass(frozen=True, slots=True)
class ProbabilityMargin:
    """Roll back when the top two probabilities are closer than ``margin`` (indecision)."""

    margin: float = 0.05
    backtrack_count: int = 1

    def __post_init__(self) -> None:
        check_fields(self, {"margin": _unit(0.05), "backtrack_count": _COUNT})

    @property
    def max_depth(self) -> int:
        return self.backtrack_count

    def check(self, view: StepView) -> int:
        return self.backtrack_count if view.stats.margin < self.margin else 0


@dataclass(frozen=True, slots=True)
class ProbabilityDrop:
    """Roll back when the chosen probability falls below ``(1 - max_drop)`` of the last one."""

    max_drop: float = 0.8
    backtrack_count: int = 1

    def __post_init__(self) -> None:
        check_fields(self, {"max_drop": _unit(0.8), "backtrack_count": _COUNT})

    @property
    def max_depth(self) -> int:
        return self.backtrack_count

    def check(self, view: StepView) -> int:
        if not view.history:
            return 0
        previous = view.history[-1].probability
        return (
            self.backtrack_count if view.stats.probability < previous * (1 - self.max_drop) else 0
        )


@dataclass(frozen=True, slots=True)
class ProbabilityTrend:
    """Roll back when the chosen probability is below ``ratio`` x the recent mean.

    The mean is over the last ``window`` kept steps.
    """

    window: int = 8
    ratio: float = 0.25
    backtrack_count: int = 1

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "window": Number(8, whole=True, minimum=1),
                "ratio": _unit(0.25),
                "backtrack_count": _COUNT,
            },
        )

    @property
    def max_depth(self) -> int:
        return self.backtrack_count

    def check(self, view: StepView) -> int:
        if len(view.history) < self.window:
            return 0
        recent = view.history[-self.window :]
        mean = sum(step.probability for step in recent) / self.window
        return self.backtrack_count if view.stats.probability < self.ratio * mean else 0


@dataclass(frozen=True, slots=True)
class Repetition:
    """Roll back the run when the same token repeats more than ``max_repetitions`` times."""

    max_repetitions: int = 3

    def __post_init__(self) -> None:
        check_fields(self, {"max_repetitions": Number(3, whole=True, minimum=1)})

    @property
    def max_depth(self) -> int:
        return self.max_repetitions + 1

    def check(self, view: StepView) -> int:
        run = 1
        for step in reversed(view.history):
            if step.token != view.token:
                break
            run += 1
            if run > self.max_repetitions:
                return run
        return 0


@dataclass(frozen=True, slots=True)
class NGramOverlap:
    """Roll back an n-gram of tokens that already occurred earlier in the answer."""

    ngram_size: int = 4

    def __post_init__(self) -> None:
        check_fields(self, {"ngram_size": Number(4, whole=True, minimum=2)})

    @property
    def max_depth(self) -> int:
        return self.ngram_size

    def check(self, view: StepView) -> int:
        n = self.ngram_size
        if len(view.history) < n:
            return 0
        tokens = [step.token for step in view.history] + [view.token]
        last = tokens[-n:]
        for start in range(len(tokens) - n):
            if tokens[start : start + n] == last:
                return n
        return 0


@dataclass(frozen=True, slots=True)
class LogitThreshold:
    """Roll back when the chosen token's raw (masked) logit is below ``threshold``."""

    threshold: float = -5.0
    backtrack_count: int = 1

    def __post_init__(self) -> None:
        check_fields(self, {"threshold": Number(-5.0, finite=True), "backtrack_count": _COUNT})

    @property
    def max_depth(self) -> int:
        return self.backtrack_count

    def check(self, view: StepView) -> int:
        return self.backtrack_count if view.stats.logit < self.threshold else 0
