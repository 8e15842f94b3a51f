"""The backtracking decoder, driven by scripted and prefix-hashed toy models."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import replace
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citebacktrack.backends.local import decode
from citebacktrack.backends.mock import MockBackend
from citebacktrack.decoding._run import Run as _Run
from citebacktrack.decoding.decoder import Decoder
from citebacktrack.decoding.matcher import XGrammarMatcher
from citebacktrack.decoding.operators import Repetition
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.request import Budgets, DecodingOptions, GenerationRequest, SamplingConfig
from citebacktrack.testing import PrefixHashRuntime, ScriptedRuntime, toy_vocabulary
from citebacktrack.types import (
    CitationAccepted,
    CitationMode,
    CitationRejected,
    Event,
    Rollback,
    StopReason,
    TextDelta,
)
from helpers import (
    accepted_ids,
    done,
    reference_sample_set,
    rejected_ids,
    request,
    table_scorer,
    text_of,
)

VOCAB = toy_vocabulary()
INDEX = VocabularyIndex(VOCAB)
MARKER = re.compile(r"\[(\d+)\]")


def run_script(script: str, **kwargs: object) -> list:
    return list(MockBackend([script]).stream(request(**kwargs)))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- contract


def test_script_is_followed_when_it_is_valid() -> None:
    events = run_script("Paris is big [1]. Rome is old [2][3].")
    assert text_of(events) == "Paris is big [1]. Rome is old [2][3]."
    assert accepted_ids(events) == [1, 2, 3]
    assert done(events).trace.stop_reason is StopReason.END
    assert done(events).trace.backtracks == 0


@pytest.mark.parametrize("n_sources", [1, 3, 9, 12])
@pytest.mark.parametrize("bad", ["[0]", "[01]", "[99]", "[13]", "[1, 2]", "[1-2]"])
def test_fabricated_ids_are_token_impossible(n_sources: int, bad: str) -> None:
    events = run_script(f"The answer is here {bad}.", n_sources=n_sources)
    ids = [int(m) for m in MARKER.findall(text_of(events))]
    assert ids, "REQUIRED must still produce a citation"
    assert all(1 <= i <= n_sources for i in ids)
    assert "," not in text_of(events).split("[", 1)[1]


def test_unsupported_citation_is_masked_and_replaced() -> None:
    scorer = table_scorer(lambda claim, i: i == 2)
    events = run_script("Paris is big [1]. Rome is old [1].", scorer=scorer)
    assert text_of(events) == "Paris is big [2]. Rome is old [2]."
    # The validator is asked before the id is sampled: the model's choice is reported as
    # rejected and the supported id written instead, with no rollback.
    assert rejected_ids(events) == [1, 1]
    assert not any(isinstance(e, Rollback) for e in events)
    trace = done(events).trace
    assert trace.rejections == 2
    assert trace.backtracks == 0
    rejections = [e for e in trace.entries if e.kind == "rejection"]
    assert all("masked before sampling" in e.detail for e in rejections)
    # The scripted model reports where the answer left its script: both of its [1]s.
    departures = [(e.reason, e.source_index) for e in trace.entries if e.kind == "departure"]
    assert departures == [("refused_id", 1), ("refused_id", 1)]
    assert trace.forward_passes == 1 + trace.kept_tokens


def test_a_claim_no_source_supports_is_rolled_back_to_say_more() -> None:
    # Only a claim naming Rome is supported: "Paris is big" cannot cite; the marker is
    # taken back and the sentence must go on before it may cite again.
    scorer = table_scorer(lambda claim, i: "Rome" in claim and i == 3)
    events = run_script("Paris is big [1], like Rome [2].", scorer=scorer)
    trace = done(events).trace
    text = text_of(events)
    assert text.startswith("Paris is big")
    assert text.endswith("like Rome [3].")
    assert "[1]" not in text
    assert trace.backtracks >= 1
    assert any(e.kind == "rejection" and "no source supports" in e.detail for e in trace.entries)


def test_rejections_never_repeat_within_a_sentence() -> None:
    scorer = table_scorer(lambda claim, i: i == 3)
    events = run_script("Paris is big [1].", scorer=scorer, n_sources=3)
    assert rejected_ids(events) == [1]  # the model's own choice; 2 was never its pick
    assert text_of(events) == "Paris is big [3]."


def test_duplicate_and_stacked_markers_are_not_offered() -> None:
    events = run_script("Paris is big [1][1][1][1].", n_sources=5)
    text = text_of(events)
    ids = [int(m) for m in MARKER.findall(text)]
    assert len(ids) == len(set(ids)) <= 3
    assert done(events).trace.rejections == 0  # prevented by the mask, not rejected


def test_per_sentence_limit_spans_groups() -> None:
    events = run_script("A is one [1], B is two [2], C is three [3].", max_per_sentence=2)
    sentences = [s for s in re.split(r"(?<=\.)\s", text_of(events)) if s]
    assert all(len(MARKER.findall(s)) <= 2 for s in sentences)


def test_required_gives_up_with_a_reason_when_nothing_supports() -> None:
    scorer = table_scorer(lambda claim, i: claim.rstrip(".") == "Paris is big")
    events = run_script("Paris is big [1]. Rome is old [1].", scorer=scorer)
    trace = done(events).trace
    assert text_of(events) == "Paris is big [1]. "
    # Either the regenerated sentence also failed (the policy's fallback ends the answer
    # after the supported sentence) or the model chose to stop there.
    assert trace.stop_reason in {StopReason.NO_VALID_CITATION, StopReason.END}
    assert rejected_ids(events)
    # The regenerated sentence was made to start differently (retries never repeat).
    assert any(e.reason == "regenerate sentence" for e in trace.entries)


def test_nothing_supported_at_all_is_an_explicit_abstention() -> None:
    scorer = table_scorer(lambda claim, i: False)
    events = run_script("Bananas are blue [1]. They grow on Mars [2].", scorer=scorer)
    trace = done(events).trace
    assert text_of(events) == ""
    assert trace.stop_reason is StopReason.NO_SUPPORTED_ANSWER


def test_auto_drops_a_marker_it_cannot_support() -> None:
    scorer = table_scorer(lambda claim, i: False)
    budgets = Budgets(retries_per_checkpoint=1, sentence_retries=1)
    events = run_script(
        "Paris is big [1]. Rome is old.",
        mode=CitationMode.AUTO,
        scorer=scorer,
        budgets=budgets,
        n_sources=5,
    )
    text = text_of(events)
    assert "[" not in text
    assert text.startswith("Paris is big")
    trace = done(events).trace
    assert trace.stop_reason is StopReason.END
    # No id supports the claim: the marker is taken back and the sentence goes on.
    assert any(e.reason == "no supported id" for e in trace.entries)


def test_stream_never_shows_rolled_back_text() -> None:
    scorer = table_scorer(lambda claim, i: i == 2 or "Paris" in claim)
    events = run_script("Paris is big [1]. Rome is old [1]. Oslo is cold [2].", scorer=scorer)
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert len(deltas) >= 2, "text is released sentence by sentence"
    assert "".join(deltas) == "Paris is big [1]. Rome is old [2]. Oslo is cold [2]."
    first_rejection = next(i for i, e in enumerate(events) if isinstance(e, CitationRejected))
    released_before = "".join(e.text for e in events[:first_rejection] if isinstance(e, TextDelta))
    assert released_before == "Paris is big [1]. "


def test_accepted_citations_carry_spans_in_the_final_text() -> None:
    events = run_script("Año 2020 was odd [1]. Ünïcode too [2].")
    text = text_of(events)
    for event in events:
        if isinstance(event, CitationAccepted):
            c = event.citation
            assert text[c.start : c.end] == f"[{c.source_index}]"
            assert text[c.sentence_start :].startswith(("Año", "Ünïcode"))


# ---------------------------------------------------------------------- budgets


def test_max_new_tokens_cuts_at_a_sentence_boundary() -> None:
    events = run_script(
        "Paris is big [1]. Rome is old and grand [2].", budgets=Budgets(max_new_tokens=25)
    )
    assert done(events).trace.stop_reason is StopReason.MAX_NEW_TOKENS
    assert text_of(events) == "Paris is big [1]. "


def test_backtrack_budget_stops_the_loop() -> None:
    scorer = table_scorer(lambda claim, i: False)
    events = run_script("Paris is big [1].", scorer=scorer, budgets=Budgets(max_backtracks=1))
    assert done(events).trace.stop_reason is StopReason.BACKTRACK_BUDGET
    assert done(events).trace.backtracks == 2


def test_rolled_back_token_budget_stops_the_loop() -> None:
    scorer = table_scorer(lambda claim, i: False)
    budgets = Budgets(max_rolled_back_tokens=2)
    events = run_script("Paris is big [1].", scorer=scorer, budgets=budgets)
    assert done(events).trace.stop_reason is StopReason.ROLLED_BACK_TOKEN_BUDGET


def test_wall_time_budget_stops_the_loop() -> None:
    events = run_script("Paris is big [1].", budgets=Budgets(max_wall_time_s=1e-9))
    assert done(events).trace.stop_reason is StopReason.WALL_TIME
    assert text_of(events) == ""


# ---------------------------------------------------------------------- operators


def test_repetition_operator_rolls_back_and_bans() -> None:
    events = run_script("Zzzzzzzz is a word [1].", operators=[Repetition(max_repetitions=2)])
    text = text_of(events)
    assert "zzz" not in text
    trace = done(events).trace
    assert any(e.kind == "operator" and "Repetition" in e.reason for e in trace.entries)
    assert trace.stop_reason is StopReason.END
    assert MARKER.search(text)


# ---------------------------------------------------------------------- rollback invariants


def _bias(boost: dict[bytes, float]) -> np.ndarray:
    bias = np.zeros(VOCAB.size, dtype=np.float32)
    for i, piece in enumerate(VOCAB.tokens):
        if piece in boost:
            bias[i] = boost[piece]
    return bias


def _decoder(runtime: PrefixHashRuntime, mode: CitationMode = CitationMode.AUTO) -> Decoder:
    req = request(mode=mode, n_sources=12)
    req = dataclasses.replace(req, budgets=Budgets(), decoding=DecodingOptions())
    return Decoder(runtime, INDEX, XGrammarMatcher(INDEX.compile(req.grammar), VOCAB.size), req)


def _snapshot(decoder: Decoder, run: _Run) -> tuple:
    allowed = decoder._allowed(run, len(run.steps))
    assert allowed is not None
    assert run.logits is not None
    return (run.logits.copy(), allowed.copy(), run.state, bytes(run.draft.out), run.rng)


def _same(a: tuple, b: tuple) -> None:
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2:] == b[2:]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), length=st.integers(4, 40), data=st.data())
def test_rollback_then_replay_equals_never_rolling_back(
    seed: int, length: int, data: st.DataObject
) -> None:
    """Logits, mask, citation state and text after rollback(n)+replay match a straight run.

    The toy model's logits hash the whole prefix, so a KV off-by-one or stale logits after
    a rollback would change them.
    """
    runtime = PrefixHashRuntime(
        VOCAB, seed=seed, bias=_bias({b"[": 2.0, b"]": 2.0, b"1": 2.0, b" ": 1.0})
    )
    decoder = _decoder(runtime)
    run = decoder._new_run()
    prompt = [5, 6, 7]
    run.logits = runtime.prefill(prompt)
    snapshots, tokens = [], []
    for _ in range(length):
        snap = _snapshot(decoder, run)
        masked = np.where(snap[1], run.logits, -np.inf).astype(np.float32)
        masked[list(VOCAB.stop_ids)] = -np.inf  # keep going: ending is not under test here
        token = int(np.argmax(masked))
        list(decoder._take(run, token, run.rng, masked, len(prompt)))
        assert len(run.steps) == len(snapshots) + 1
        snapshots.append(snap)
        tokens.append(token)
    target = data.draw(st.integers(0, len(tokens) - 1))
    decoder._truncate_to(run, target, len(prompt))
    assert runtime.n_tokens == len(prompt) + target
    for position in range(target, len(tokens)):
        snap = _snapshot(decoder, run)
        _same(snap, snapshots[position])
        list(
            decoder._take(run, tokens[position], run.rng, np.where(snap[1], run.logits, -np.inf), 3)
        )


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), retries=st.integers(0, 4), sentence_retries=st.integers(0, 2))
def test_adversarial_model_terminates_within_budget(
    seed: int, retries: int, sentence_retries: int
) -> None:
    """A model that always wants unsupported or out-of-range ids ends, with a reason."""
    bias = _bias({b"[": 6.0, b"7": 9.0, b"9": 9.0, b"1": 5.0, b"2": 4.0, b"]": 6.0, b".": 3.0})
    runtime = PrefixHashRuntime(VOCAB, seed=seed, bias=bias)
    budgets = Budgets(
        max_new_tokens=120, retries_per_checkpoint=retries, sentence_retries=sentence_retries
    )
    req = request(n_sources=3, scorer=table_scorer(lambda claim, i: False), budgets=budgets)
    events = list(decode(runtime, INDEX, req, [1, 2, 3]))
    trace = done(events).trace
    assert trace.stop_reason in {
        StopReason.NO_SUPPORTED_ANSWER,
        StopReason.BACKTRACK_BUDGET,
        StopReason.MAX_NEW_TOKENS,
    }
    assert accepted_ids(events) == []
    assert all(1 <= i <= 3 for i in rejected_ids(events))
    assert "[" not in text_of(events)
    assert trace.backtracks <= budgets.max_backtracks + 1
    assert trace.tokens_wasted <= budgets.max_rolled_back_tokens + budgets.max_new_tokens


def test_sampling_is_reproducible_by_seed() -> None:
    def sampled(seed: int) -> tuple[str, tuple[int, ...]]:
        """The answer and every token the decoder kept in the model's cache."""
        runtime = PrefixHashRuntime(VOCAB, seed=1, bias=_bias({b"[": 3.0, b"1": 3.0, b"]": 3.0}))
        req = request(
            mode=CitationMode.AUTO,
            sampling=SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=seed),
            budgets=Budgets(max_new_tokens=30),
        )
        events = list(decode(runtime, INDEX, req, [1, 2]))
        # The random toy model rarely finishes a sentence in 30 tokens, and an unfinished
        # one is cut from the answer: compare the sampled tokens too.
        return text_of(events), tuple(runtime._tokens)

    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in range(5)}) == 5


# ---------------------------------------------------------------------- ramble bound


@pytest.mark.parametrize(
    ("script", "overshoot"),
    [
        ("word " * 30 + "[1].", 0),  # plain prose: a marker must open within the bound
        ("Well" + "." * 60 + " [1].", 2),  # the bound falls inside an ellipsis chain
        ("x" * 17 + " e.g. more words and more words [1].", 3),  # ... inside "e.g. "
        ("x" * 18 + " 3.5 metres and more words here [1].", 1),  # ... inside a decimal
        ("See https://example.com/some/long/path/here and more [1].", 40),  # ... in a URL
    ],
)
def test_ramble_bound_forces_a_citation_without_a_dead_end(script: str, overshoot: int) -> None:
    """Past ``max_uncited_chars`` the next token must open a marker; where the grammar
    cannot take ``[`` yet, the construct in progress is finished first (never a dead end)."""
    events = run_script(script, max_uncited_chars=20)
    text = text_of(events)
    trace = done(events).trace
    assert trace.stop_reason is StopReason.END, (text, trace.entries)
    assert MARKER.search(text), text
    assert text.index("[") <= 20 + overshoot, text


# ------------------------------------------------ the shortcut (one-token checks first)


class _NoOp:
    """An operator that never rolls back: its presence makes the decoder build the masked
    logits at every step instead of taking the model's favourite when it is allowed."""

    max_depth = 0

    def check(self, view: object) -> int:
        return 0


_filter_cases = given(
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(list(CitationMode)),
    max_uncited=st.sampled_from([20, 40, 300]),
    max_per_sentence=st.integers(1, 3),
    rejected=st.sampled_from([frozenset({1}), frozenset({1, 2, 3})]),
)
"""Decodes that reach every filter: a scorer rejecting [1] or every id (bans, AUTO's
dropped markers, REQUIRED's dead ends), small ramble bounds and per-sentence limits."""


def _filter_run(
    seed: int, mode: CitationMode, max_uncited: int, max_per_sentence: int, rejected: frozenset[int]
) -> tuple[PrefixHashRuntime, GenerationRequest]:
    """A random model (its favourite is often disallowed) and a request for ``_filter_cases``."""
    bias = _bias({b"[": 2.0, b"1": 2.0, b"7": 3.0, b"]": 2.0, b".": 1.0, b" ": 1.0})
    req = request(
        mode=mode,
        scorer=table_scorer(lambda claim, i: i not in rejected),
        budgets=Budgets(max_new_tokens=80),
        max_uncited_chars=max_uncited,
        max_per_sentence=max_per_sentence,
    )
    return PrefixHashRuntime(VOCAB, seed=seed, bias=bias), req


@settings(max_examples=60, deadline=None)
@_filter_cases
def test_greedy_fast_path_equals_argmax_of_the_masked_logits(
    seed: int, mode: CitationMode, max_uncited: int, max_per_sentence: int, rejected: frozenset[int]
) -> None:
    """The greedy shortcuts (take the favourite if one-token checks pass; skip building the
    masked logits) pick what argmax over the full mask picks."""

    def tokens(operators: tuple[_NoOp, ...]) -> tuple[tuple[int, ...], str, str]:
        runtime, req = _filter_run(seed, mode, max_uncited, max_per_sentence, rejected)
        events = list(
            decode(
                runtime,
                INDEX,
                replace(req, decoding=DecodingOptions(operators=operators)),
                [1, 2, 3],
            )
        )
        return tuple(runtime._tokens), text_of(events), done(events).trace.stop_reason.value

    assert tokens(()) == tokens((_NoOp(),))


@settings(max_examples=40, deadline=None)
@_filter_cases
def test_sampled_shortcut_takes_only_tokens_of_the_masked_sample_set(
    seed: int, mode: CitationMode, max_uncited: int, max_per_sentence: int, rejected: frozenset[int]
) -> None:
    """Sampling draws from the unmasked logits first and takes a ``certain`` draw after the
    one-token checks: every token it takes must be one sampling over the full mask (top-k,
    top-p) could have given."""
    config = SamplingConfig(temperature=0.9, top_k=8, top_p=0.8, seed=seed)
    original_step, original_take = Decoder._step, Decoder._take
    step_set: dict[int, float] | None = None  # the current step's (None: a dead end)
    taken: list[int] = []

    def checking_step(self: Decoder, run: _Run, prompt_len: int) -> Iterator[Event]:
        nonlocal step_set
        allowed = self._allowed(run, len(run.steps))
        assert run.logits is not None
        step_set = None if allowed is None else reference_sample_set(run.logits, allowed, config)
        yield from original_step(self, run, prompt_len)

    def recording_take(self: Decoder, run: _Run, token: int, *args: object, **kw: bool):  # type: ignore[no-untyped-def]
        taken.append(token)
        assert step_set is not None
        assert token in step_set, (len(taken), token, step_set)
        return original_take(self, run, token, *args, **kw)

    runtime, req = _filter_run(seed, mode, max_uncited, max_per_sentence, rejected)
    with (
        patch.object(Decoder, "_step", checking_step),
        patch.object(Decoder, "_take", recording_take),
    ):
        list(
            decode(
                runtime, INDEX, replace(req, decoding=DecodingOptions(sampling=config)), [1, 2, 3]
            )
        )
    assert taken


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampling_builds_the_full_mask_only_at_some_steps(top_p: float) -> None:
    """With a model that usually wants an allowed token, most sampled steps take the
    proposal after the one-token checks, without the grammar's full mask."""
    config = SamplingConfig(temperature=0.7, top_p=top_p, seed=4)
    runtime = ScriptedRuntime(
        "Paris is the capital of France [1]. It has about 2.1 million people [2].", VOCAB
    )
    req = request(n_sources=3, mode=CitationMode.AUTO, sampling=config)
    original_allowed = Decoder._allowed
    masks = 0

    def counting_allowed(self: Decoder, run: _Run, position: int):  # type: ignore[no-untyped-def]
        nonlocal masks
        masks += 1
        return original_allowed(self, run, position)

    with patch.object(Decoder, "_allowed", counting_allowed):
        events = list(decode(runtime, INDEX, req, [1, 2, 3]))
    generated = done(events).usage.generated_tokens
    assert generated > 20
    assert masks < generated / 2


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(temperature=1.0),
        SamplingConfig(temperature=1.0, top_p=0.8),
        SamplingConfig(temperature=1.5, top_k=4),
    ],
    ids=["temperature", "top-p", "top-k"],
)
def test_the_decoders_first_token_has_the_masked_distribution(config: SamplingConfig) -> None:
    """End to end through the decoder (proposal, one-token checks, full-mask fallback):
    over many seeds the first token's frequencies are the masked distribution's, even
    though the model's favourite (``]``) is never allowed at the start."""
    bias = _bias({b"]": 6.0, b"T": 4.0, b"A": 3.5, b"I": 3.0, b"[": 3.0})
    req = request(mode=CitationMode.AUTO, budgets=Budgets(max_new_tokens=1))
    original_step = Decoder._step
    first: list[tuple[np.ndarray, np.ndarray]] = []

    def recording_step(self: Decoder, run: _Run, prompt_len: int) -> Iterator[Event]:
        assert run.logits is not None
        allowed = self._allowed(run, len(run.steps))
        assert allowed is not None
        first.append((run.logits.copy(), allowed))
        yield from original_step(self, run, prompt_len)

    with patch.object(Decoder, "_step", recording_step):
        list(decode(PrefixHashRuntime(VOCAB, bias=bias), INDEX, req, [1, 2, 3]))
    logits, allowed = first[0]
    assert not allowed[int(np.argmax(logits))]
    expected = reference_sample_set(logits, allowed, config)
    counts: dict[int, int] = {}
    n = 3000
    for seed in range(n):
        runtime = PrefixHashRuntime(VOCAB, bias=bias)
        sampled = replace(req, decoding=DecodingOptions(sampling=replace(config, seed=seed)))
        list(decode(runtime, INDEX, sampled, [1, 2, 3]))
        token = runtime._tokens[3]
        counts[token] = counts.get(token, 0) + 1
    assert set(counts) <= set(expected)
    for token, p in expected.items():
        freq = counts.get(token, 0) / n
        # 4 standard errors, plus 3 counts for the many tokens of tiny probability
        assert abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n) + 3 / n, (token, freq, p)


@settings(max_examples=30, deadline=None)
@_filter_cases
def test_one_token_checks_agree_with_the_full_mask_for_every_token_at_every_step(
    seed: int, mode: CitationMode, max_uncited: int, max_per_sentence: int, rejected: frozenset[int]
) -> None:
    """Exhaustive over the toy vocabulary at each state a random decode reaches: the greedy
    shortcut accepts a token only if the full mask allows it, and refuses one the mask
    allows only where the ramble bound's fallbacks (which need the whole mask) decided."""
    original = Decoder._step
    checked = 0

    def checking_step(self: Decoder, run: _Run, prompt_len: int) -> Iterator[Event]:
        nonlocal checked
        position = len(run.steps)
        allowed = self._allowed(run, position)
        room = max(0, self.policy.max_uncited_chars - run.state.uncited_run)
        for token in range(VOCAB.size):
            fast = self.mask.speculate(run, token, position)
            if fast:
                self.matcher.rollback(1)
            full = allowed is not None and bool(allowed[token])
            assert full or not fast, (position, token)
            if full and not fast:
                opens = INDEX.open_pos[token] >= 0
                reach = INDEX.open_pos[token] if opens else INDEX.lengths[token]
                assert mode is CitationMode.REQUIRED, (position, token)
                assert reach > room, (position, token)
            checked += 1
        yield from original(self, run, prompt_len)

    runtime, req = _filter_run(seed, mode, max_uncited, max_per_sentence, rejected)
    with patch.object(Decoder, "_step", checking_step):
        list(decode(runtime, INDEX, req, [1, 2, 3]))
    assert checked >= VOCAB.size


def test_a_long_claim_in_a_trace_line_is_cut_at_a_word_after_an_ellipsis() -> None:
    from citebacktrack.decoding.decoder import _shown

    claim = "The Eiffel Tower was built in 1889, and it is currently standing at 327.5 metres tall."
    assert _shown("short claim") == "short claim"
    shown = _shown(claim, limit=40)
    assert shown.startswith("…")
    assert claim.endswith(shown[1:])
    assert claim[-len(shown[1:]) - 1] == " "  # begins at a whole word


def test_a_trace_line_shows_a_sentence_whole_and_never_cuts_inside_a_word() -> None:
    from citebacktrack.decoding.decoder import _shown

    sentence = (
        "The bees use their waggle dance to tell the other bees of the hive where the best "
        "flowers of the valley are found"
    )
    assert _shown(sentence) == sentence  # 117 characters: whole ("he bees use..." was shown)
    long_word = "a " + "b" * 50 + " cc"  # the last 40 characters start inside the long word
    assert _shown(long_word, limit=40) == "…cc"
    assert _shown("b" * 50, limit=40) == "b" * 50  # one word longer than the limit: whole
