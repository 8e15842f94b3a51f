"""Sampling: greedy by default, temperature / top-k / top-p with a seed on request.

The random state is one integer (a SplitMix64 counter), so a checkpoint saves it for free
and a rollback restores it by assignment: a retry draws the same random number, and only
the bans make it choose differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from citebacktrack.errors import ConfigurationError
from citebacktrack.request import SamplingConfig

__all__ = [
    "Proposal",
    "in_nucleus",
    "next_random",
    "nucleus_indices",
    "pick",
    "propose",
    "sample",
    "sample_masked",
    "top_k_indices",
]

_MASK64 = (1 << 64) - 1


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

    Temperature, then top-k, then top-p (nucleus: the smallest set of most likely tokens,
    ties by id, whose probability reaches p), then one draw. Nothing sorts or prefix-sums
    the whole vocabulary (on the project machine a sort of 50k floats costs milliseconds
    and a cumulative sum 0.15 ms): top-k selects with a subsample bound, a draw finds its
    block of 1024 weights and prefix-sums only that block, and top-p draws from the whole
    distribution and redraws until the token is in the nucleus, which gives exactly the
    nucleus distribution; after ``_MAX_REDRAWS`` misses (only when p is small and the
    distribution flat) the nucleus is built explicitly.

    Returns:
        The token id and the new random state (unchanged when greedy).

    Raises:
        ConfigurationError: no logit is finite, or one is NaN (sampled decoding).
    """
    return sample_masked(logits, None, config, rng_state)


@dataclass(frozen=True, slots=True)
class Proposal:
    """A token drawn before the mask is known (see :func:`propose`).

    Attributes:
        token: the drawn token id.
        rng_state: the random state after the draw.
        certain: the token is in the top-k and top-p set of *every* masking that allows
            it, so if the mask allows it, it may be taken without building the mask.
        weights: the tempered, unnormalised probabilities it was drawn from (None when
            greedy or when no logit is finite).
    """

    token: int
    rng_state: int
    certain: bool
    weights: npt.NDArray[np.float32] | None = None


def propose(logits: npt.NDArray[np.float32], config: SamplingConfig, rng_state: int) -> Proposal:
    """Draw a token from the *unmasked* logits (tempered, without top-k or top-p).

    The proposal of a rejection sampler: the decoder takes a ``certain`` proposal as soon
    as the mask allows that one token; otherwise it builds the mask and calls
    :func:`sample_masked` with the proposal, which keeps the token if it is in the masked
    sample set and else draws afresh. Either way each token has exactly the probability
    :func:`sample` on the masked logits gives it (up to float32 rounding): a proposal is
    kept only on membership, with probability proportional to its own, and a refused one
    is followed by an independent exact draw.

    Greedy proposes the argmax (certain). Non-finite logits propose nothing certain.
    """
    if config.is_greedy:
        return Proposal(int(np.argmax(logits)), rng_state, True)
    values = np.asarray(logits, dtype=np.float32) / np.float32(config.temperature)
    top = values.max()
    if not np.isfinite(top):
        return Proposal(0, rng_state, False)
    weights = np.exp(values - top)
    draw, rng_state = next_random(rng_state)
    token, total = _pick(weights, draw)
    w = float(weights[token])
    certain = True
    if config.top_k and config.top_k < len(weights):
        # At most k tokens weigh as much: any masked top-k that allows it keeps it.
        certain = int(np.count_nonzero(weights >= w)) <= config.top_k
    if certain and config.top_p < 1.0:
        # The nucleus test of a masked set is ``before < p * total``; a mask can only
        # lower ``before``, and the masked total is at least ``before + w``, so
        # ``before * (1 - p) < p * w`` suffices. ``before`` is at most ``total - w``: try
        # that bound first, it spares an O(V) pass for most draws of a peaked model.
        p = config.top_p
        certain = (total - w) * (1.0 - p) < p * w or _weight_before(weights, token) * (
            1.0 - p
        ) < p * w
    return Proposal(token, rng_state, certain, weights)


def sample_masked(
    logits: npt.NDArray[np.float32],
    allowed: npt.NDArray[np.bool_] | None,
    config: SamplingConfig,
    rng_state: int,
    proposal: Proposal | None = None,
) -> tuple[int, int]:
    """:func:`sample` over the tokens ``allowed`` (None: all), without building masked
    logits where it can.

    ``proposal`` (from :func:`propose` on the same logits and ``rng_state``) is kept if
    it is in the sample set, else a fresh draw follows it.

    Raises:
        ConfigurationError: sampled decoding and no allowed logit is finite, or one is NaN.
    """
    if proposal is not None:
        rng_state = proposal.rng_state
        if proposal.certain and (allowed is None or allowed[proposal.token]):
            return proposal.token, rng_state  # greedy: the argmax is allowed
    if config.is_greedy:
        if allowed is None:
            return int(np.argmax(logits)), rng_state
        return int(np.argmax(np.where(allowed, logits, np.float32(-np.inf)))), rng_state
    ids: npt.NDArray[np.intp] | None = None
    weights: npt.NDArray[np.float32] | None = None
    if proposal is not None and proposal.weights is not None and not config.top_k:
        # Reuse the proposal's weights: a mask only zeroes some (ratios are unchanged).
        weights = proposal.weights
        if allowed is not None:
            weights = np.where(allowed, weights, np.float32(0.0))
        if not weights.any():  # every allowed weight underflowed next to a masked one
            weights = None
    if weights is None:
        # float32 throughout: exp of float64 -inf takes a slow path (0.4 ms over 50k here).
        values = np.asarray(logits, dtype=np.float32) / np.float32(config.temperature)
        if allowed is not None:
            values = np.where(allowed, values, np.float32(-np.inf))
        if config.top_k and config.top_k < len(values):
            ids = top_k_indices(values, config.top_k)
            values = values[ids]
        top = values.max()
        if not np.isfinite(top):
            raise ConfigurationError(
                "sampling needs a finite logit to pick and no NaN: every token is masked, or "
                "the model returned NaN"
            )
        weights = np.exp(values - top)  # disallowed tokens weigh exactly 0
    threshold = config.top_p * float(weights.sum()) if config.top_p < 1.0 else 0.0
    if proposal is not None:
        index = proposal.token
        if ids is not None:
            found = np.flatnonzero(ids == index)
            index = int(found[0]) if len(found) else -1
        if (
            index >= 0
            and weights[index] > 0.0
            and (config.top_p >= 1.0 or in_nucleus(weights, index, threshold))
        ):
            return proposal.token, rng_state
    for _ in range(_MAX_REDRAWS if config.top_p < 1.0 else 1):
        draw, rng_state = next_random(rng_state)
        index = pick(weights, draw)
        if config.top_p >= 1.0 or in_nucleus(weights, index, threshold):
            return int(ids[index] if ids is not None else index), rng_state
    nucleus = nucleus_indices(weights, threshold)
    draw, rng_state = next_random(rng_state)
    index = int(nucleus[pick(weights[nucleus], draw)])
    return int(ids[index] if ids is not None else index), rng_state


_BLOCK = 1024


def pick(weights: npt.NDArray[np.floating[Any]], draw: float) -> int:
    """The index where ``draw`` (in [0, 1)) lands in the weights laid end to end: ``i``
    with ``cumsum[i-1] <= draw * total < cumsum[i]``. Never an index of weight 0."""
    return _pick(weights, draw)[0]


def _pick(weights: npt.NDArray[np.floating[Any]], draw: float) -> tuple[int, float]:
    """:func:`pick`, and the total weight it summed on the way."""
    full = len(weights) - len(weights) % _BLOCK
    sums = weights[:full].reshape(-1, _BLOCK).sum(axis=1)
    if full < len(weights):
        sums = np.append(sums, weights[full:].sum())
    ends = np.cumsum(sums, dtype=np.float64)
    target = draw * ends[-1]
    block = int(np.searchsorted(ends, target, side="right"))
    if block >= len(ends):  # rounding put the target past the end: the last weighted block
        block = int(np.flatnonzero(sums)[-1])
        target = ends[block]
    start = block * _BLOCK
    part = weights[start : start + _BLOCK]
    inside = np.cumsum(part)
    offset = target - (ends[block - 1] if block else 0.0)
    index = int(np.searchsorted(inside, offset, side="right"))
    if index >= len(part) or part[index] == 0.0:  # rounding again: last weighted entry
        index = int(np.flatnonzero(part[: min(index + 1, len(part))])[-1])
    return start + index, float(ends[-1])


_MAX_REDRAWS = 8
"""Draws tried before building the nucleus explicitly (each lands in it with probability
at least p, so with p = 0.9 all eight miss once in 10^8 steps)."""


def top_k_indices(values: npt.NDArray[np.floating[Any]], k: int) -> npt.NDArray[np.intp]:
    """Indices of the ``k`` largest ``values``, ascending (which of equal values at the
    boundary is kept is unspecified)."""
    size = len(values)
    if k >= size:
        return np.arange(size)
    if size > 64 * k:
        # The k-th largest of every 16th value bounds the k-th largest of all from below,
        # so filtering by it keeps every top-k value and leaves a small set to select from.
        stride = values[::16]
        bound = np.partition(stride, len(stride) - k)[len(stride) - k]
        pool = np.flatnonzero(values >= bound)
    else:
        pool = np.arange(size)
    if len(pool) > k:
        pool = pool[np.argpartition(-values[pool], k - 1)[:k]]
    return np.sort(pool)


def in_nucleus(weights: npt.NDArray[np.floating[Any]], index: int, threshold: float) -> bool:
    """Whether ``index`` is in the nucleus of weight ``threshold`` (top-p times the total):
    the weight ranked before it (larger weights, then equal ones at lower indices) is still
    under ``threshold``."""
    return _weight_before(weights, index) < threshold


def _weight_before(weights: npt.NDArray[np.floating[Any]], index: int) -> float:
    """The weight ranked before ``index``: larger weights, then equal ones at lower indices."""
    w = weights[index]
    larger = np.dot(weights, (weights > w).astype(weights.dtype))  # 8x a boolean-index sum
    return float(larger) + float(w) * int(np.count_nonzero(weights[:index] == w))


def nucleus_indices(
    weights: npt.NDArray[np.floating[Any]], threshold: float
) -> npt.NDArray[np.intp]:
    """The nucleus of weight ``threshold``, most likely first (ties by index), by sorting."""
    order = np.lexsort((np.arange(len(weights)), -weights))
    cut = int(np.searchsorted(np.cumsum(weights[order]), threshold)) + 1
    return order[:cut]
