"""Sampling: the sort-free paths give what the textbook definitions (full sorts) give."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citebacktrack.decoding.sampling import (
    in_nucleus,
    next_random,
    nucleus_indices,
    pick,
    propose,
    sample,
    sample_masked,
    top_k_indices,
)
from citebacktrack.errors import ConfigurationError
from citebacktrack.request import SamplingConfig
from helpers import reference_nucleus, reference_sample_set


def reference_pick(weights: np.ndarray, draw: float) -> int:
    cumulative = np.cumsum(weights)
    return int(np.searchsorted(cumulative, draw * cumulative[-1], side="right"))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    weights = np.exp(scaled - scaled[np.isfinite(scaled)].max())
    return weights / weights.sum()


@pytest.mark.parametrize("size", [1, 5, 1023, 1024, 1025, 5000, 50_000])
def test_pick_agrees_with_a_full_prefix_sum_and_never_picks_weight_zero(size: int) -> None:
    rng = np.random.default_rng(size)
    weights = rng.exponential(size=size)
    weights[rng.random(size) < 0.3] = 0.0
    weights[-1] = 0.0 if size > 1 else 1.0
    if not weights.any():
        weights[0] = 1.0
    cumulative = np.cumsum(weights)
    for draw in [*rng.random(300), 0.0, 1.0 - 2**-53]:
        index = pick(weights, float(draw))
        assert weights[index] > 0
        target = draw * cumulative[-1]
        # Away from a boundary (where summation order may round differently) they agree.
        if np.min(np.abs(cumulative - target)) > 1e-9 * cumulative[-1]:
            assert index == reference_pick(weights, float(draw))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=40),
    st.floats(min_value=0.05, max_value=0.99),
)
def test_nucleus_membership_matches_sorting_even_with_ties(raw: list[int], top_p: float) -> None:
    weights = np.asarray(raw, dtype=np.float64)
    if not weights.any():
        weights[0] = 1.0
    expected = reference_nucleus(weights, top_p)
    threshold = top_p * weights.sum()
    assert {i for i in range(len(weights)) if in_nucleus(weights, i, threshold)} == expected
    assert set(nucleus_indices(weights, threshold).tolist()) == expected


@pytest.mark.parametrize(("size", "k"), [(10, 3), (10, 10), (500, 40), (50_000, 1), (50_000, 50)])
def test_top_k_indices_are_the_k_largest(size: int, k: int) -> None:
    rng = np.random.default_rng(k)
    values = rng.standard_normal(size)
    values[rng.random(size) < 0.2] = -np.inf
    kept = top_k_indices(values, k)
    assert list(kept) == sorted(kept)
    assert set(kept.tolist()) == set(np.argsort(-values, kind="stable")[:k].tolist())


def test_top_k_bound_from_the_subsample_keeps_values_the_subsample_missed() -> None:
    # The five largest values all sit at positions the every-16th subsample skips.
    values = np.zeros(50_000)
    top = [1, 2, 3, 4, 5]
    values[top] = [9.0, 8.0, 7.0, 6.0, 5.0]
    assert top_k_indices(values, 5).tolist() == top


def test_greedy_is_argmax_and_leaves_the_random_state() -> None:
    logits = np.array([0.0, 3.0, -np.inf, 3.0], dtype=np.float32)
    assert sample(logits, SamplingConfig(), 42) == (1, 42)


def test_sampled_frequencies_follow_the_softmax() -> None:
    logits = np.array([2.0, 1.0, 0.0, -np.inf, 0.5, -1.0], dtype=np.float32)
    config = SamplingConfig(temperature=0.7, seed=3)
    counts, state = np.zeros(len(logits)), config.seed
    n = 20_000
    for _ in range(n):
        token, state = sample(logits, config, state)
        counts[token] += 1
    expected = softmax(logits, 0.7)
    assert counts[3] == 0
    # Each frequency within 4 standard errors of its probability.
    assert np.all(np.abs(counts / n - expected) <= 4 * np.sqrt(expected * (1 - expected) / n))


@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.95])
def test_top_p_samples_exactly_the_renormalised_nucleus(top_p: float) -> None:
    rng = np.random.default_rng(7)
    logits = rng.standard_normal(40).astype(np.float32) * 2
    config = SamplingConfig(temperature=1.0, top_p=top_p, seed=11)
    weights = softmax(logits)
    nucleus = reference_nucleus(weights, top_p)
    counts, state = np.zeros(len(logits)), config.seed
    n = 20_000
    for _ in range(n):
        token, state = sample(logits, config, state)
        counts[token] += 1
    assert set(np.flatnonzero(counts).tolist()) == nucleus
    expected = np.zeros(len(logits))
    expected[list(nucleus)] = weights[list(nucleus)] / weights[list(nucleus)].sum()
    assert np.all(np.abs(counts / n - expected) <= 4 * np.sqrt(expected * (1 - expected) / n))


def test_small_top_p_on_a_flat_distribution_falls_back_to_the_explicit_nucleus() -> None:
    logits = np.zeros(50_000, dtype=np.float32)
    logits[:20] = 0.01  # a near-flat head: p = 0.001 keeps about 50 tokens
    config = SamplingConfig(temperature=1.0, top_p=0.001, seed=5)
    nucleus = reference_nucleus(softmax(logits), 0.001)
    state = config.seed
    for _ in range(50):
        token, state = sample(logits, config, state)
        assert token in nucleus


def test_top_k_then_top_p_never_leaves_the_top_k_or_picks_a_masked_token() -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal(50_000).astype(np.float32)
    logits[::2] = -np.inf
    config = SamplingConfig(temperature=1.3, top_k=20, top_p=0.9, seed=9)
    allowed_top = set(np.argsort(-logits, kind="stable")[:20].tolist())
    state = config.seed
    for _ in range(200):
        token, state = sample(logits, config, state)
        assert token in allowed_top


def test_top_k_larger_than_the_allowed_set_still_picks_an_allowed_token() -> None:
    logits = np.full(100, -np.inf, dtype=np.float32)
    logits[[17, 60]] = [1.0, 2.0]
    config = SamplingConfig(temperature=1.0, top_k=50, seed=1)
    state = config.seed
    seen = set()
    for _ in range(200):
        token, state = sample(logits, config, state)
        seen.add(token)
    assert seen == {17, 60}


def test_same_seed_same_tokens_and_the_state_is_one_integer() -> None:
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    config = SamplingConfig(temperature=1.0, top_p=0.9, seed=123)

    def run(state: int) -> list[int]:
        tokens = []
        for _ in range(30):
            token, state = sample(logits, config, state)
            tokens.append(token)
        return tokens

    assert run(123) == run(123)
    assert run(123) != run(124)
    assert next_random(5) == next_random(5)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}]
)
def test_bad_sampling_settings_are_typed_errors(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        SamplingConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("fill", [-np.inf, np.nan])
def test_nothing_to_sample_is_a_typed_error(fill: float) -> None:
    logits = np.full(10, fill, dtype=np.float32)
    with pytest.raises(ConfigurationError, match="finite logit to pick and no NaN"):
        sample(logits, SamplingConfig(temperature=1.0, top_p=0.9), 1)


def test_a_nan_among_finite_logits_is_a_typed_error_not_a_silent_pick() -> None:
    logits = np.array([1.0, np.nan, 0.5], dtype=np.float32)
    with pytest.raises(ConfigurationError, match="NaN"):
        sample(logits, SamplingConfig(temperature=1.0), 1)


# ---------------------------------------------------------------- proposal, then the mask


CONFIGS = [
    SamplingConfig(temperature=0.8),
    SamplingConfig(temperature=0.8, top_p=0.6),
    SamplingConfig(temperature=1.2, top_k=3),
    SamplingConfig(temperature=1.0, top_k=4, top_p=0.7),
]


@settings(max_examples=1000, deadline=None)
@given(
    # Multiples of 1/8: exact in float32, and distinct values stay distinct weights (the
    # sampler works in float32, the reference in float64).
    st.lists(st.integers(min_value=-32, max_value=32), min_size=2, max_size=12),
    st.lists(st.booleans(), min_size=12, max_size=12),
    st.sampled_from([0.5, 1.0, 1.5]),
    st.sampled_from([0, 1, 2, 3, 5]),
    st.one_of(st.just(1.0), st.floats(min_value=0.2, max_value=0.99)),
    st.integers(min_value=0, max_value=2**32),
)
def test_a_certain_proposal_that_the_mask_allows_is_in_the_masked_sample_set(
    raw: list[int],
    mask: list[bool],
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
) -> None:
    """The claim the decoder's shortcut rests on: ``certain`` holds for every masking."""
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    logits = np.asarray(raw, dtype=np.float32) / 8
    allowed = np.asarray(mask[: len(raw)], dtype=bool)
    if not allowed.any():
        allowed[0] = True
    proposal = propose(logits, config, seed)
    if proposal.certain and allowed[proposal.token]:
        assert proposal.token in reference_sample_set(logits, allowed, config)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"t{c.temperature}k{c.top_k}p{c.top_p}")
def test_proposal_then_mask_samples_exactly_the_masked_distribution(
    config: SamplingConfig,
) -> None:
    """The decoder's path (a proposal, taken when certain and allowed, else
    ``sample_masked``) has the masked distribution's frequencies, and never leaves its set."""
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(24) * 1.5).astype(np.float32)
    allowed = rng.random(24) < 0.6
    allowed[int(np.argmax(logits))] = False  # the favourite is masked: proposals get refused
    expected = reference_sample_set(logits, allowed, config)
    counts: dict[int, int] = {}
    state = config.seed
    n = 20_000
    outcomes = {"certain": 0, "other": 0}
    for _ in range(n):
        proposal = propose(logits, config, state)
        if proposal.certain and allowed[proposal.token]:
            token, state = proposal.token, proposal.rng_state
            outcomes["certain"] += 1
        else:
            token, state = sample_masked(logits, allowed, config, state, proposal)
            outcomes["other"] += 1
        counts[token] = counts.get(token, 0) + 1
    assert set(counts) <= set(expected)
    assert outcomes["certain"] > 0
    assert outcomes["other"] > 0
    for token, p in expected.items():
        freq = counts.get(token, 0) / n
        assert abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9, (token, freq, p)


def test_sample_masked_without_a_proposal_equals_sample_on_masked_logits() -> None:
    rng = np.random.default_rng(8)
    logits = rng.standard_normal(3000).astype(np.float32)
    allowed = rng.random(3000) < 0.5
    masked = np.where(allowed, logits, np.float32(-np.inf))
    for config in [*CONFIGS, SamplingConfig()]:
        state_a = state_b = 77
        for _ in range(20):
            a, state_a = sample_masked(logits, allowed, config, state_a)
            b, state_b = sample(masked, config, state_b)
            assert (a, state_a) == (b, state_b)


def test_greedy_proposal_is_the_argmax_and_falls_back_to_the_masked_argmax() -> None:
    logits = np.array([0.0, 5.0, 3.0, 3.0], dtype=np.float32)
    proposal = propose(logits, SamplingConfig(), 9)
    assert (proposal.token, proposal.rng_state, proposal.certain) == (1, 9, True)
    allowed = np.array([True, False, True, True])
    assert sample_masked(logits, allowed, SamplingConfig(), 9, proposal) == (2, 9)


def test_a_proposal_on_nan_logits_is_never_certain_and_sampling_then_raises() -> None:
    logits = np.array([1.0, np.nan, 0.5], dtype=np.float32)
    config = SamplingConfig(temperature=1.0)
    proposal = propose(logits, config, 1)
    assert not proposal.certain
    with pytest.raises(ConfigurationError, match="finite logit"):
        sample_masked(logits, np.ones(3, dtype=bool), config, 1, proposal)


@pytest.mark.parametrize(("top_p", "in_nucleus_set"), [(0.70, False), (0.76, True)])
def test_certain_is_decided_right_at_the_nucleus_boundary(
    top_p: float, in_nucleus_set: bool
) -> None:
    """Weights e : 1: the second token is in the nucleus exactly when p > e / (e + 1) ~ 0.731.
    Unmasked, its proposal is certain exactly then; masking the first token cannot push it
    out, and the draw is only certain if no masking could."""
    logits = np.array([1.0, 0.0], dtype=np.float32)
    config = SamplingConfig(temperature=1.0, top_p=top_p)
    seed = next(s for s in range(100) if propose(logits, config, s).token == 1)
    assert propose(logits, config, seed).certain is in_nucleus_set
    assert (1 in reference_sample_set(logits, np.ones(2, dtype=bool), config)) is in_nucleus_set
