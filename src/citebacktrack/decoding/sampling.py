"""Sampling: greedy by default, temperature / top-k / top-p with a seed on request.

The random state is one integer (a SplitMix64 counter), so a checkpoint saves it for free
and a rollback restores it by assignment: a retry draws the same random number, and only
the bans make it choose differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from citebacktrack.errors import ConfigurationError

__all__ = ["SamplingConfig", "next_random", "sample"]

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingConfig:
    """How to pick the next token.

    Attributes:
        temperature: 0 means greedy (argmax); above 0 samples from the softened distribution.
        top_k: keep only the k most likely tokens (0: all).
        top_p: keep the smallest set of tokens whose probability reaches p (1.0: all).
        seed: seed of the random state; the same seed and inputs give the same answer.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ConfigurationError(
                f"temperature must be >= 0 (0 is greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise ConfigurationError(f"top_k must be >= 0 (0 keeps all tokens), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigurationError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        """True when decoding is deterministic argmax."""
        return self.temperature == 0.0


def next_random(state: int) -> tuple[float, int]:
    """One uniform float in [0, 1) and the next state (SplitMix64)."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53), state


def sample(
    logits: npt.NDArray[np.float32], config: SamplingConfig, rng_state: int
) -> tuple[int, int]:
    """Pick a token from ``logits`` (disallowed tokens already at ``-inf``).

    Returns:
        The token id and the new random state (unchanged when greedy).
    """
    if config.is_greedy:
        return int(np.argmax(logits)), rng_state
    scaled = logits.astype(np.float64) / config.temperature
    candidates = np.flatnonzero(np.isfinite(scaled))
    values = scaled[candidates]
    if config.top_k and config.top_k < len(candidates):
        keep = np.argpartition(-values, config.top_k - 1)[: config.top_k]
        candidates, values = candidates[keep], values[keep]
    order = np.argsort(-values, kind="stable")
    candidates, values = candidates[order], values[order]
    probs = np.exp(values - values[0])
    probs /= probs.sum()
    if config.top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(probs), config.top_p)) + 1
        candidates, probs = candidates[:cut], probs[:cut] / probs[:cut].sum()
    draw, rng_state = next_random(rng_state)
    index = min(int(np.searchsorted(np.cumsum(probs), draw, side="right")), len(candidates) - 1)
    return int(candidates[index]), rng_state
