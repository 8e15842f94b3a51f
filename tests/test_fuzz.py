"""Termination and limits: both decode loops against adversarial models, fuzzed.

Every run of the token-level decoder and of the segment loop must end, within its budgets,
for the reason what happened in that run gives: the stop reason is derived here from what
the model and the decoder were seen to do (the clock and the token count at the last
budget check, the last token the grammar accepted, the counters, the last fallback),
never just checked to be one of the reasons. The accepted citations must be in range and
each one must have passed the validator; a citation the validator rejected and the
decoder banned never comes back in the same sentence. A watchdog (``SIGALRM``) turns a
hang into a failure.

The models: one that always wants ``[``, one that wants ids out of range, one that closes
markers with no id, one that loops on one sentence, whitespace only, stop tokens only,
random tokens, one that cites an unsupported source forever, and one whose grammar stops
allowing anything; scorers accept everything, reject everything, or decide at random
(seeded). The segment loop gets engines whose results are random text, markers and finish
reasons, stop without a marker, empty text forever, token counts of 0, and one-call
engines (``continues_prefix=False``).

``CITEBACKTRACK_FUZZ_SCALE`` multiplies every example count (e.g. ``=20`` for a long run).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from types import FrameType, SimpleNamespace
from typing import Any
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from citebacktrack._tracker import ClosedMarker
from citebacktrack.backends.local import decode
from citebacktrack.decoding._run import kept_tokens as _kept_tokens
from citebacktrack.decoding.decoder import Decoder
from citebacktrack.decoding.matcher import TokenMatcher, XGrammarMatcher
from citebacktrack.decoding.runtime import Logits, TokenRuntime, Vocabulary
from citebacktrack.errors import BackendError
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.request import (
    Budgets,
    DecodingOptions,
    GenerationRequest,
    SamplingConfig,
    SegmentOptions,
)
from citebacktrack.segments import SegmentCall, SegmentLoop, SegmentResult
from citebacktrack.support import SupportResult
from citebacktrack.testing import PrefixHashRuntime, ScriptedRuntime, index_for, toy_vocabulary
from citebacktrack.types import (
    ChatMessage,
    CitationAccepted,
    CitationMode,
    CitationRejected,
    Done,
    Event,
    Policy,
    RejectionReason,
    Rollback,
    SentenceOrigin,
    StopReason,
    TextDelta,
    Trace,
)
from citebacktrack.validation import CitationValidator, Verdict
from helpers import placeholder_sources

SCALE = float(os.environ.get("CITEBACKTRACK_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    """``n`` examples, times ``CITEBACKTRACK_FUZZ_SCALE``."""
    return max(1, round(n * SCALE))


# The default suite (scale 1) replays the same examples every run, so CI is not flaky;
# a scaled run (CITEBACKTRACK_FUZZ_SCALE) explores new ones.
FUZZ = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow],
    "derandomize": "CITEBACKTRACK_FUZZ_SCALE" not in os.environ,
}
VOCAB = toy_vocabulary()
INDEX = index_for(VOCAB)
STOP_IDS = VOCAB.stop_ids
PROMPT = [1, 2, 3]
MARKER = re.compile(r"\[(\d+)\]")
HANG_S = 30
"""Seconds one run may take before the watchdog calls it a hang."""


class Hang(Exception):  # noqa: N818 - what the watchdog found
    """A run did not end in time (or ran past its hard cap of model calls)."""


@contextlib.contextmanager
def watchdog(seconds: float = HANG_S) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread when the block runs longer than ``seconds``."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"the run did not end within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# =============================================================================== scorers


@dataclass
class Scorer:
    """A support scorer deciding by ``rule(claim, id)`` (seeded where random). Supported
    sources quote a sentence as evidence, so the quote fallback can run."""

    rule: Callable[[str, int], bool]

    def score(self, claim: str, source_index: int) -> SupportResult:
        ok = self.rule(claim, source_index)
        return SupportResult(
            score=0.9 if ok else 0.1,
            is_supported=ok,
            evidence="The tower is tall." if ok else "",
            detail=f"rule says {ok}",
        )


def _coin(seed: int, claim: str, source_index: int) -> bool:
    digest = hashlib.blake2b(f"{seed}|{source_index}|{claim}".encode(), digest_size=2).digest()
    return digest[0] < 96  # supported about 3 times in 8


SCORERS: dict[str, Callable[[int], Scorer | None]] = {
    "none": lambda seed: None,  # structural rules only: every grammatical id passes
    "accept-all": lambda seed: Scorer(lambda claim, i: True),
    "reject-all": lambda seed: Scorer(lambda claim, i: False),
    "random": lambda seed: Scorer(lambda claim, i: _coin(seed, claim, i)),
    "only-1": lambda seed: Scorer(lambda claim, i: i == 1),
}


# =============================================================================== models


def _bias(boost: dict[bytes, float]) -> Logits:
    bias = np.zeros(VOCAB.size, dtype=np.float32)
    for i, piece in enumerate(VOCAB.tokens):
        if piece in boost:
            bias[i] = boost[piece]
    return bias


STOP = VOCAB.tokens[next(iter(STOP_IDS))]
MODELS: dict[str, Callable[[int], TokenRuntime]] = {
    # Logits hash the whole prefix (noise of sd 2), plus a bias for what the model wants.
    "always-open": lambda seed: PrefixHashRuntime(
        VOCAB, seed=seed, bias=_bias({b"[": 12.0, b" [": 11.0})
    ),
    "out-of-range": lambda seed: PrefixHashRuntime(
        VOCAB,
        seed=seed,
        bias=_bias({b"[": 8.0, b"9": 11.0, b"0": 10.5, b"7": 10.0, b"]": 8.0, b".": 4.0}),
    ),
    "empty-marker": lambda seed: PrefixHashRuntime(
        VOCAB, seed=seed, bias=_bias({b"[": 10.0, b"]": 12.0, b"].": 11.0, b"] ": 11.0})
    ),
    "whitespace": lambda seed: PrefixHashRuntime(
        VOCAB, seed=seed, bias=_bias({b" ": 12.0, b"\n": 11.5, b"\t": 11.0})
    ),
    "stop-only": lambda seed: PrefixHashRuntime(VOCAB, seed=seed, bias=_bias({STOP: 30.0})),
    "random": lambda seed: PrefixHashRuntime(VOCAB, seed=seed),
    "unsupported-forever": lambda seed: PrefixHashRuntime(
        VOCAB,
        seed=seed,
        bias=_bias({b"[2]": 12.0, b" [": 10.0, b"2": 11.0, b"]": 9.0, b"x": 6.0, b".": 5.0}),
    ),
    "same-sentence": lambda seed: ScriptedRuntime("Paris is big [1]. " * 40, VOCAB),
    "rambler": lambda seed: PrefixHashRuntime(
        VOCAB, seed=seed, bias=_bias({b"a": 9.0, b"b": 9.0, b" ": 8.0, b"e.g.": 0.0})
    ),
}


@dataclass
class Clock:
    """A fake ``perf_counter``: the model's calls advance it, and it keeps every reading
    (the decoder reads it at the start and, with a wall-time budget, before every step)."""

    step_s: float
    now: float = 0.0
    readings: list[float] = field(default_factory=list)

    def perf_counter(self) -> float:
        self.readings.append(self.now)
        return self.now


class ObservedRuntime:
    """A runtime wrapper that advances the clock per model call and stops a runaway."""

    def __init__(self, inner: TokenRuntime, clock: Clock, cap: int) -> None:
        self.inner = inner
        self.clock = clock
        self.cap = cap
        self.calls = 0
        self.prompt_len = 0

    @property
    def vocabulary(self) -> Vocabulary:
        return self.inner.vocabulary

    @property
    def n_tokens(self) -> int:
        return self.inner.n_tokens

    @property
    def generated(self) -> int:
        """Generated tokens in the cache: the decoder's kept steps at a budget check."""
        return self.inner.n_tokens - self.prompt_len

    def _call(self) -> None:
        self.calls += 1
        self.clock.now += self.clock.step_s
        if self.calls > self.cap:
            raise Hang(f"{self.calls} model calls, past the budgets' bound of {self.cap}")

    def prefill(self, prompt: Sequence[int]) -> Logits:
        self._call()
        self.prompt_len = len(prompt)
        return self.inner.prefill(prompt)

    def forward(self, tokens: Sequence[int]) -> Logits:
        self._call()
        return self.inner.forward(tokens)

    def truncate(self, n_tokens: int) -> None:
        self.inner.truncate(n_tokens)


class ObservedMatcher:
    """The grammar's matcher, recording the tokens it holds; ``dead_after`` tokens in,
    it allows nothing more (a grammar dead end)."""

    def __init__(self, inner: TokenMatcher, dead_after: int | None = None) -> None:
        self.inner = inner
        self.dead_after = dead_after
        self.held: list[int] = []
        self.last_accepted: int | None = None

    def _is_dead(self) -> bool:
        return self.dead_after is not None and len(self.held) >= self.dead_after

    def allowed(self) -> np.ndarray:
        allowed = self.inner.allowed()
        if self._is_dead():
            allowed[:] = False
        return allowed

    def accept_token(self, token: int) -> bool:
        if self._is_dead() or not self.inner.accept_token(token):
            return False
        self.held.append(token)
        self.last_accepted = token
        return True

    def rollback(self, n_tokens: int) -> None:
        self.inner.rollback(n_tokens)
        del self.held[len(self.held) - n_tokens :]
        self.last_accepted = None


@dataclass
class Record:
    """What the decoder did, seen through its own methods, in order: ``("judge", (marker,
    accepted, inside the quote fallback))``, ``("ban", (sentence, id))`` and ``("cut",
    sentence)`` (a truncation that keeps the bans of sentences up to that one)."""

    timeline: list[tuple[str, Any]] = field(default_factory=list)
    quoting: bool = False


@contextlib.contextmanager
def recording(record: Record, clock: Clock) -> Iterator[None]:
    """Patch the decoder's clock and wrap the methods that judge, ban and truncate."""
    judge, reject, truncate, quote = (
        Decoder._judge,
        Decoder._reject,
        Decoder._truncate_to,
        Decoder._quote,
    )

    def judging(self: Decoder, run: Any, marker: ClosedMarker) -> tuple[str, Verdict]:
        claim, verdict = judge(self, run, marker)
        record.timeline.append(("judge", (marker, verdict.is_accepted, record.quoting)))
        return claim, verdict

    def rejecting(self: Decoder, run: Any, marker: ClosedMarker, *args: Any) -> Iterator[Event]:
        record.timeline.append(("ban", (marker.sentence_start, marker.source_index)))
        return reject(self, run, marker, *args)

    def truncating(self: Decoder, run: Any, target: int, prompt_len: int) -> None:
        if target < len(run.steps):
            record.timeline.append(("cut", run.steps[target].state.sentence_start))
            # Streamed text is final: no rollback or fallback may cut into it.
            assert target >= _kept_tokens(run), f"cut to step {target}, into released text"
        truncate(self, run, target, prompt_len)

    def quoting(self: Decoder, *args: Any) -> bool:
        record.quoting = True
        try:
            return quote(self, *args)
        finally:
            record.quoting = False

    with (
        patch.object(Decoder, "_judge", judging),
        patch.object(Decoder, "_reject", rejecting),
        patch.object(Decoder, "_truncate_to", truncating),
        patch.object(Decoder, "_quote", quoting),
        patch(
            "citebacktrack.decoding.decoder.time", SimpleNamespace(perf_counter=clock.perf_counter)
        ),
    ):
        yield


# =============================================================================== the oracle


def expected_stop(
    trace: Trace,
    budgets: Budgets,
    policy: Policy,
    clock: Clock,
    matcher: ObservedMatcher,
    held: int,
    *,
    has_scorer: bool,
    had_accepted: bool,
    had_own_sentence: bool = False,
) -> StopReason:
    """The stop reason what was observed calls for (``held``: the generated tokens in the
    model's cache at the end, which are the decoder's kept steps).

    With a wall-time budget the decoder reads the clock before every step, so the last
    reading says whether time ended the run. Otherwise the last step ended it (its
    events are terminal): the model's stop token (the last token the grammar accepted),
    the repeated-sentence or quote fallbacks, the policy's fallback, a rollback past a
    budget (the counters exceed theirs only then), the token budget, or a dead end before
    the first token.
    """
    readings = clock.readings
    if budgets.max_wall_time_s is not None and readings[-1] - readings[0] > budgets.max_wall_time_s:
        return StopReason.WALL_TIME
    notes = [e.detail for e in trace.entries if e.kind == "fallback"]
    if matcher.last_accepted in STOP_IDS:
        return StopReason.END
    if notes and notes[-1].startswith("repeated sentence"):
        return StopReason.END
    if notes and notes[-1].startswith("quoted the evidence"):
        return StopReason.FALLBACK  # a quote is written only when nothing was accepted
    if notes and notes[-1].startswith("grounded copy"):
        return StopReason.END if had_own_sentence else StopReason.FALLBACK
    if notes and notes[-1] == "the grammar allows no token for this sentence":
        return StopReason.DEAD_END  # a grammar dead end is no citation failure
    if notes and notes[-1] == "no valid citation for this sentence":
        if policy.mode is CitationMode.AUTO:
            return StopReason.DEAD_END
        if had_accepted or not has_scorer:
            return StopReason.NO_VALID_CITATION
        return StopReason.NO_SUPPORTED_ANSWER
    if trace.backtracks > budgets.max_backtracks:
        return StopReason.BACKTRACK_BUDGET
    if trace.tokens_wasted > budgets.max_rolled_back_tokens:
        return StopReason.ROLLED_BACK_TOKEN_BUDGET
    if held >= budgets.max_new_tokens:
        return StopReason.MAX_NEW_TOKENS
    assert held == 0, "only a dead end before the first token ends a run otherwise"
    return StopReason.DEAD_END


# =============================================================================== the decoder


@dataclass
class DecodeCase:
    model: str
    scorer: str
    mode: CitationMode
    n_sources: int
    budgets: Budgets
    sampling: SamplingConfig
    max_per_sentence: int
    max_uncited: int
    step_s: float
    dead_after: int | None
    seed: int


@st.composite
def decode_cases(draw: st.DrawFn, models: Sequence[str] = tuple(MODELS)) -> DecodeCase:
    wall = draw(st.sampled_from([None, None, 0.05, 0.5]))
    budgets = Budgets(
        max_new_tokens=draw(st.integers(1, 120)),
        retries_per_checkpoint=draw(st.integers(0, 3)),
        sentence_retries=draw(st.integers(0, 2)),
        max_backtracks=draw(st.integers(1, 12)),
        max_rolled_back_tokens=draw(st.sampled_from([1, 8, 60, 400])),
        max_wall_time_s=wall,
    )
    seed = draw(st.integers(0, 2**16))
    sampling = draw(
        st.sampled_from(
            [
                SamplingConfig(seed=seed),
                SamplingConfig(temperature=1.0, seed=seed),
                SamplingConfig(temperature=0.8, top_k=5, top_p=0.9, seed=seed),
            ]
        )
    )
    return DecodeCase(
        model=draw(st.sampled_from(models)),
        scorer=draw(st.sampled_from(list(SCORERS))),
        mode=draw(st.sampled_from(list(CitationMode))),
        n_sources=draw(st.sampled_from([1, 3, 12])),
        budgets=budgets,
        sampling=sampling,
        max_per_sentence=draw(st.integers(1, 3)),
        max_uncited=draw(st.sampled_from([20, 60, 300])),
        step_s=draw(st.sampled_from([0.001, 0.01])),
        dead_after=draw(st.sampled_from([None, None, None, 0, 3, 17])),
        seed=seed,
    )


@dataclass
class DecodeRun:
    case: DecodeCase
    request: GenerationRequest
    events: list[Event]
    done: Done
    text: str
    record: Record
    clock: Clock
    matcher: ObservedMatcher
    runtime: ObservedRuntime


def _request(case: DecodeCase) -> GenerationRequest:
    policy = Policy(
        mode=case.mode,
        max_citations_per_sentence=case.max_per_sentence,
        max_uncited_chars=case.max_uncited,
    )
    scorer = SCORERS[case.scorer](case.seed)
    sources = placeholder_sources(case.n_sources)
    return GenerationRequest(
        messages=[ChatMessage("user", "question")],  # the toy models read PROMPT instead
        sources=sources,
        grammar=citation_grammar(case.n_sources, policy),
        policy=policy,
        validator=CitationValidator(n_sources=case.n_sources, policy=policy, scorer=scorer),
        budgets=case.budgets,
        decoding=DecodingOptions(sampling=case.sampling),
    )


def run_decoder(case: DecodeCase) -> DecodeRun:
    """One decode of ``case`` under the watchdog, with everything observed."""
    request = _request(case)
    budgets = case.budgets
    clock = Clock(step_s=case.step_s)
    # A bound no run may pass: each model call keeps a token, recomputes logits after a
    # rollback, or writes a quote; rollbacks throw away at most what the budgets allow.
    cap = 4 + 2 * budgets.max_new_tokens + budgets.max_rolled_back_tokens
    cap += (budgets.max_backtracks + 4) * (2 + budgets.max_new_tokens)
    runtime = ObservedRuntime(MODELS[case.model](case.seed), clock, cap)
    assert request.grammar is not None
    matcher = ObservedMatcher(
        XGrammarMatcher(INDEX.compile(request.grammar), VOCAB.size), case.dead_after
    )
    record = Record()
    with watchdog(), recording(record, clock):
        events = list(decode(runtime, INDEX, request, PROMPT, matcher=matcher))
    done = events[-1]
    assert isinstance(done, Done)
    assert not any(isinstance(e, Done) for e in events[:-1])
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    return DecodeRun(case, request, events, done, text, record, clock, matcher, runtime)


def check_decode(run: DecodeRun) -> None:
    """Every invariant of one decode (see the module docstring)."""
    case, trace, budgets = run.case, run.done.trace, run.case.budgets
    accepted = [e.citation for e in run.events if isinstance(e, CitationAccepted)]
    # Budgets.
    assert trace.backtracks <= budgets.max_backtracks + 1
    assert trace.tokens_wasted <= budgets.max_rolled_back_tokens + budgets.max_new_tokens
    assert run.runtime.generated <= budgets.max_new_tokens
    assert trace.kept_tokens <= budgets.max_new_tokens
    assert run.done.usage.completion_tokens <= budgets.max_new_tokens
    if budgets.max_wall_time_s is not None:
        # The clock is read before every step, and one step is at most a few model calls.
        elapsed = run.clock.readings[-1] - run.clock.readings[0]
        assert elapsed <= budgets.max_wall_time_s + 2 * case.step_s * (budgets.max_new_tokens + 2)
    # The stop reason follows from what happened.
    had_accepted = bool(accepted)  # what the fallback leaves: the sentences before
    expected = expected_stop(
        trace,
        budgets,
        run.request.policy,
        run.clock,
        run.matcher,
        run.runtime.generated,
        has_scorer=run.request.validator is not None and run.request.validator.scorer is not None,
        had_accepted=had_accepted,
        had_own_sentence=any(c.origin is SentenceOrigin.MODEL for c in accepted),
    )
    assert trace.stop_reason is expected, (trace.stop_reason, expected, trace.entries[-3:])
    # Citations: in range, where the text says, and each one passed the validator.
    validator = run.request.validator
    assert validator is not None
    written = [(m.start(), int(m.group(1))) for m in MARKER.finditer(run.text)]
    assert written == [(c.start, c.source_index) for c in accepted], (run.text, accepted)
    for citation in accepted:
        assert 1 <= citation.source_index <= case.n_sources
        assert run.text[citation.start : citation.end] == f"[{citation.source_index}]"
        prior = tuple(
            c.source_index
            for c in accepted
            if c.sentence_start == citation.sentence_start and c.start < citation.start
        )
        verdict = validator.check(
            source_index=citation.source_index, sentence_ids=prior, claim=citation.claim
        )
        assert verdict.is_accepted, (citation, verdict)
    assert "[" not in re.sub(MARKER, "", run.text), run.text  # no marker left half-written
    # A banned id never comes back in its sentence while the ban stands.
    check_bans(run.record)
    # Rejections are reported for ids in range; the events agree with the trace.
    rejected = [e for e in run.events if isinstance(e, CitationRejected)]
    assert all(1 <= e.source_index <= case.n_sources for e in rejected)
    assert trace.rejections == len(rejected)
    assert trace.backtracks == sum(isinstance(e, Rollback) for e in run.events)


def check_bans(record: Record) -> None:
    """After ``_reject`` bans id ``i`` in the sentence at byte ``s``, no marker of that
    sentence is written with ``i`` until a rollback reaches back before ``s`` (which, as
    the decoder's ``_truncate_to`` does, lifts the bans of later sentences). The quote
    fallback writes the source's own sentence, a new claim, and is not held to them."""
    bans: set[tuple[int, int]] = set()
    for kind, value in record.timeline:
        if kind == "ban":
            bans.add(value)
        elif kind == "cut":
            bans = {(s, i) for s, i in bans if s <= value}
        else:
            marker, _, quoted = value
            key = (marker.sentence_start, marker.source_index)
            assert quoted or key not in bans, f"banned [{marker.source_index}] written again"


@settings(max_examples=examples(400), **FUZZ)
@given(case=decode_cases())
def test_the_decoder_ends_within_its_budgets_for_the_right_reason(case: DecodeCase) -> None:
    run = run_decoder(case)
    check_decode(run)
    check_family(run)


def check_family(run: DecodeRun) -> None:
    """What each adversary must lead to, beyond the invariants of every run."""
    case, trace = run.case, run.done.trace
    accepted = [e for e in run.events if isinstance(e, CitationAccepted)]
    if case.dead_after == 0:  # the grammar allows nothing at all
        assert trace.stop_reason is StopReason.DEAD_END
        assert run.text == ""
    if case.scorer == "none":
        # Nothing to reject: out-of-range ids, duplicates and empty markers are masked.
        assert trace.rejections == 0
    if case.scorer == "accept-all":
        # Only what is not citable (a claim with no word beyond the question, or a
        # question) is refused, whatever the scorer says, and with score 0 (ADR 0011).
        for entry in trace.entries:
            if entry.kind == "rejection":
                assert entry.score == 0.0, entry
    if case.scorer == "reject-all":
        assert not accepted
        if case.mode is CitationMode.REQUIRED:
            assert run.text == ""  # every sentence needs a citation and none can have one
    quiet = case.dead_after is None and case.budgets.max_wall_time_s is None
    # The grammar wants one visible character (or a marker) first, then the model may stop.
    stops = case.model == "stop-only" and case.mode is CitationMode.AUTO
    if stops and quiet and case.budgets.max_new_tokens >= 16:
        assert trace.stop_reason is StopReason.END
        assert run.done.usage.generated_tokens <= 16
    event(f"stop {run.done.trace.stop_reason.value}")
    event(f"{case.model} {run.done.trace.stop_reason.value}")


# =============================================================================== the segment loop

SEGMENT_PIECES = [
    *("Paris", " is", " big", " ", "\n", ",", ".", "!", "...", "e.g.", "U.S.", ")", '"'),
    *("[", "]", "[1", "[2", "[3]", "[0", "[99", "[12", "[]", "[1][2", " [1].", ". [2]", "é"),
]


def _random_text(rng: random.Random, pieces: int) -> str:
    return "".join(rng.choice(SEGMENT_PIECES) for _ in range(rng.randint(0, pieces)))


Family = Callable[[SegmentCall, random.Random, int], SegmentResult]
"""What an adversarial engine answers to its ``n``-th call."""

FINISHES: list[Any] = ["stop", "end", "length"]


def _claim_then_open(call: SegmentCall) -> str:
    """A grammatical way on: the id of an open marker, else a new claim and its ``[``."""
    prefix = call.prefix
    if prefix.endswith("["):
        return ""
    if not prefix.strip():
        return "Paris is big ["
    if prefix.rstrip().endswith("]"):
        return ". Rome is old ["
    return ("" if prefix[-1:].isspace() else " ") + "Rome is old ["


ENGINES: dict[str, Family] = {
    # Anything at all (the grammar and the stop string ignored).
    "random": lambda call, rng, n: SegmentResult(
        text=_random_text(rng, 8), finish=rng.choice(FINISHES), completion_tokens=rng.randint(0, 12)
    ),
    "ids": lambda call, rng, n: SegmentResult(
        text=_claim_then_open(call) + rng.choice(["1", "2", "3", "0", "99", "12", ""]),
        finish="stop",
        completion_tokens=rng.randint(0, 5),
    ),
    "empty-stop": lambda call, rng, n: SegmentResult(text="", finish="stop"),
    "empty-end": lambda call, rng, n: SegmentResult(text="", finish="end"),
    "empty-length": lambda call, rng, n: SegmentResult(text="", finish="length"),
    "stop-without-marker": lambda call, rng, n: SegmentResult(
        text=" Paris is big", finish="stop", completion_tokens=3
    ),
    # Cites forever and reports no token count (0: unknown): only the loop's own count
    # of one token per kept segment ends it.
    "cites-forever-uncounted": lambda call, rng, n: SegmentResult(
        text=_claim_then_open(call) + "1", finish="stop"
    ),
    "unsupported-forever": lambda call, rng, n: SegmentResult(
        text=_claim_then_open(call) + str(min(2, len(call.sources))),
        finish="stop",
        completion_tokens=4,
    ),
    "negative-counts": lambda call, rng, n: SegmentResult(
        text=_claim_then_open(call) + "1", finish="stop", prompt_tokens=-3, completion_tokens=-7
    ),
    "marker-without-words": lambda call, rng, n: SegmentResult(
        text=rng.choice(["[1", "[]", " [2", "\n[3"]), finish="stop", completion_tokens=1
    ),
}


def may_be_refused(case: SegmentCase) -> bool:
    """Whether the engine may write what the citation grammar refuses (as a server that
    does not enforce it would): the loop then ends with a BackendError saying so."""
    if case.engine in ("random", "marker-without-words", "ids"):
        return True  # anything; markers with no words; "[" then nothing
    # An uncited claim, which the required policy refuses as a whole answer.
    return case.engine == "stop-without-marker" and case.mode is CitationMode.REQUIRED


ONE_CALL_ENGINES: dict[str, Family] = {
    "random-answer": lambda call, rng, n: SegmentResult(
        text=_random_text(rng, 14),
        finish=rng.choice(FINISHES),
        completion_tokens=rng.randint(0, 40),
    ),
    "cited-answer": lambda call, rng, n: SegmentResult(
        text="The tower is tall [1]. Paris is big [2][9]. Rome [0] is old. Bananas [3][3].",
        finish=rng.choice(FINISHES),
        completion_tokens=20,
    ),
    "empty-answer": lambda call, rng, n: SegmentResult(text="", finish=rng.choice(FINISHES)),
}


class AdversarialEngine:
    """A segment engine whose every answer comes from ``family`` (grammar ignored)."""

    def __init__(self, family: Family, seed: int, *, continues_prefix: bool) -> None:
        self.family = family
        self.rng = random.Random(seed)
        self.continues_prefix = continues_prefix
        self.calls: list[SegmentCall] = []

    def complete(self, call: SegmentCall) -> SegmentResult:
        self.calls.append(call)
        return self.family(call, self.rng, len(self.calls))

    async def acomplete(self, call: SegmentCall) -> SegmentResult:
        return self.complete(call)


@dataclass
class SegmentCase:
    engine: str
    scorer: str
    mode: CitationMode
    n_sources: int
    budgets: Budgets
    max_segment_tokens: int
    step_s: float
    seed: int

    @property
    def continues_prefix(self) -> bool:
        return self.engine not in ONE_CALL_ENGINES


@st.composite
def segment_cases(draw: st.DrawFn) -> SegmentCase:
    budgets = Budgets(
        max_new_tokens=draw(st.integers(1, 80)),
        retries_per_checkpoint=draw(st.integers(0, 3)),
        sentence_retries=draw(st.integers(0, 2)),
        max_backtracks=draw(st.integers(1, 12)),
        max_rolled_back_tokens=draw(st.sampled_from([1, 8, 60, 400])),
        max_wall_time_s=draw(st.sampled_from([None, None, 0.05, 1.0])),
    )
    return SegmentCase(
        engine=draw(st.sampled_from([*ENGINES, *ONE_CALL_ENGINES])),
        scorer=draw(st.sampled_from(list(SCORERS))),
        mode=draw(st.sampled_from(list(CitationMode))),
        n_sources=draw(st.sampled_from([1, 3, 12])),
        budgets=budgets,
        max_segment_tokens=draw(st.sampled_from([1, 4, 256])),
        step_s=draw(st.sampled_from([0.001, 0.01])),
        seed=draw(st.integers(0, 2**16)),
    )


@dataclass
class SegmentRun:
    case: SegmentCase
    request: GenerationRequest
    events: list[Event]
    done: Done | None
    refused: BackendError | None
    """The loop's error when the engine wrote what the grammar refuses (else None)."""
    text: str
    calls: int
    ended_in_next_call: bool
    last: SegmentResult | None
    new_notes: list[str]
    """Fallback notes written while the loop handled the run's last result (or, when it
    ended in ``next_call``, there)."""
    last_rejected: bool
    kept_any: bool
    """The draft held accepted markers when the loop ended (what its fallbacks read)."""
    readings: list[float]


def run_segment_loop(case: SegmentCase) -> SegmentRun:
    """Drive one :class:`SegmentLoop` over the case's engine, as ``run_segments`` does."""
    decode_case = DecodeCase(
        model="random",
        scorer=case.scorer,
        mode=case.mode,
        n_sources=case.n_sources,
        budgets=case.budgets,
        sampling=SamplingConfig(),
        max_per_sentence=3,
        max_uncited=300,
        step_s=case.step_s,
        dead_after=None,
        seed=case.seed,
    )
    request = replace(
        _request(decode_case), segments=SegmentOptions(max_segment_tokens=case.max_segment_tokens)
    )
    family = {**ENGINES, **ONE_CALL_ENGINES}[case.engine]
    engine = AdversarialEngine(family, case.seed, continues_prefix=case.continues_prefix)
    clock = Clock(step_s=case.step_s)
    loop = SegmentLoop(request, clock=clock.perf_counter, continues_prefix=engine.continues_prefix)
    budgets = case.budgets
    # Every call either keeps a segment (one token of the budget at least) or rolls back.
    cap = budgets.max_new_tokens + budgets.max_backtracks + 2
    events: list[Event] = []
    last: SegmentResult | None = None
    calls, stopped_in_feed, rejected = 0, False, False
    marks = (0, 0)  # trace entries before and after the last feed
    refused: BackendError | None = None
    kept_any = False
    with watchdog():
        try:
            while (call := loop.next_call()) is not None:
                calls += 1
                if calls > cap:
                    raise Hang(f"{calls} engine calls, past the budgets' bound of {cap}")
                clock.now += case.step_s
                last = engine.complete(call)
                before = len(loop.draft.trace)
                fed = loop.feed(last)
                marks = (before, len(loop.draft.trace))
                stopped_in_feed = loop.stop_reason is not None
                rejected = any(isinstance(e, CitationRejected) for e in fed)
                events += fed
        except BackendError as exc:
            refused = exc
        else:
            kept_any = bool(loop.draft.accepted)  # accepted markers in the draft as it ended
            events += loop.finish()
    done = events[-1] if events and isinstance(events[-1], Done) else None
    entries = done.trace.entries if done is not None else ()
    new = entries[marks[0] : marks[1]] if stopped_in_feed else entries[marks[1] :]
    return SegmentRun(
        case=case,
        request=request,
        events=events,
        done=done,
        refused=refused,
        text="".join(e.text for e in events if isinstance(e, TextDelta)),
        calls=calls,
        ended_in_next_call=not stopped_in_feed,
        last=last,
        new_notes=[e.detail for e in new if e.kind == "fallback"],
        last_rejected=rejected,
        kept_any=kept_any,
        readings=clock.readings,
    )


def expected_segment_stop(run: SegmentRun, trace: Trace, *, had_accepted: bool) -> StopReason:
    """The stop reason the engine's answers call for (see the loop's ``feed``)."""
    case, budgets = run.case, run.case.budgets
    has_scorer = case.scorer != "none"
    required = case.mode is CitationMode.REQUIRED

    def gave_up(notes: list[str]) -> StopReason | None:
        """The policy's fallback for a sentence no citation was found for."""
        if notes and notes[-1].startswith("quoted the evidence"):
            return StopReason.FALLBACK  # only a quote: nothing of the model's was kept
        if "no valid citation for this sentence" in notes and case.mode is not CitationMode.AUTO:
            if had_accepted or not has_scorer:
                return StopReason.NO_VALID_CITATION
            return StopReason.NO_SUPPORTED_ANSWER
        return None

    if run.ended_in_next_call:  # the budget checks before a call
        limit = budgets.max_wall_time_s
        if limit is not None and run.readings[-1] - run.readings[0] > limit:
            return StopReason.WALL_TIME
        return gave_up(run.new_notes) or StopReason.MAX_NEW_TOKENS
    if "a marker that could not be placed: the answer ends here" in run.new_notes:
        return StopReason.END if had_accepted else StopReason.NO_SUPPORTED_ANSWER
    if run.last_rejected and case.continues_prefix:
        if trace.backtracks > budgets.max_backtracks:
            return StopReason.BACKTRACK_BUDGET
        if trace.tokens_wasted > budgets.max_rolled_back_tokens:
            return StopReason.ROLLED_BACK_TOKEN_BUDGET
    fallback = gave_up(run.new_notes)
    if fallback is not None:
        return fallback
    if not case.continues_prefix and required and not had_accepted:
        return StopReason.NO_SUPPORTED_ANSWER  # nothing survived the revision, no quote
    assert run.last is not None
    if run.last.finish == "length":
        return StopReason.MAX_NEW_TOKENS
    return StopReason.END  # the model's end, or a stop string with no marker to close


def check_segments(run: SegmentRun) -> None:
    """Every invariant of one run of the segment loop."""
    case, budgets = run.case, run.case.budgets
    if case.continues_prefix:
        assert run.calls <= budgets.max_new_tokens + budgets.max_backtracks + 1
    else:
        assert run.calls == 1  # one call, revised in one pass
    if run.refused is not None:
        assert may_be_refused(case), run.refused
        assert "grammar it was sent refuses" in str(run.refused)
        return
    assert run.done is not None
    trace = run.done.trace
    accepted = [e.citation for e in run.events if isinstance(e, CitationAccepted)]
    if case.continues_prefix:
        assert trace.backtracks <= budgets.max_backtracks + 1
    assert trace.forward_passes == run.calls
    expected = expected_segment_stop(run, trace, had_accepted=run.kept_any)
    assert trace.stop_reason is expected, (trace.stop_reason, expected, trace.entries[-3:])
    validator = run.request.validator
    assert validator is not None
    written = [(m.start(), int(m.group(1))) for m in MARKER.finditer(run.text)]
    assert written == [(c.start, c.source_index) for c in accepted], (run.text, accepted)
    for citation in accepted:
        assert 1 <= citation.source_index <= case.n_sources
        prior = tuple(
            c.source_index
            for c in accepted
            if c.sentence_start == citation.sentence_start and c.start < citation.start
        )
        verdict = validator.check(
            source_index=citation.source_index, sentence_ids=prior, claim=citation.claim
        )
        assert verdict.is_accepted, (citation, verdict)
    if not case.continues_prefix:
        # A one-call answer is revised into markers the loop then accepts, every one.
        refused = ("a revised marker was rejected", "a marker that could not be placed")
        assert not any(e.detail.startswith(refused) for e in trace.entries), trace.entries
    if case.scorer == "reject-all":
        assert not accepted
    if case.engine.startswith("empty"):
        assert run.text == ""
        assert run.calls == 1


@settings(max_examples=examples(400), **FUZZ)
@given(case=segment_cases())
def test_the_segment_loop_ends_within_its_budgets_for_the_right_reason(case: SegmentCase) -> None:
    run = run_segment_loop(case)
    check_segments(run)
    event(f"stop {run.done.trace.stop_reason.value}" if run.done else "refused by the grammar")
    event(f"{case.engine} calls {min(run.calls, 3)}")


# =============================================================================== memory


class _RejectingValidator(CitationValidator):
    """Rejects every id and never runs out of ids (bans are not honoured): the model's
    favourite is rejected at the same marker, rollback after rollback."""

    def forbidden_ids(self, sentence_ids: Any, banned: Any) -> frozenset[int]:
        return frozenset(sentence_ids)

    def can_open_marker(self, sentence_ids: Any, banned: Any) -> bool:
        return True

    def check(self, *, source_index: int, sentence_ids: tuple[int, ...], claim: str) -> Verdict:
        return Verdict(is_accepted=False, reason=RejectionReason.UNSUPPORTED, detail="never")


def test_memory_stays_flat_over_10000_rollbacks() -> None:
    """10,000 rollbacks at one marker (the answer never grows): the heap grows while the
    trace fills up to ``Trace.MAX_ENTRIES``, then not at all (``benchmarks/
    rollback_memory.py`` measures more). Uncapped, each rollback kept ~2.2 KB of trace."""
    rollbacks = 10_000
    budgets = Budgets(
        max_new_tokens=10**6,
        retries_per_checkpoint=10**9,
        max_backtracks=rollbacks,
        max_rolled_back_tokens=10**9,
    )
    case = DecodeCase(
        model="same-sentence",
        scorer="none",
        mode=CitationMode.REQUIRED,
        n_sources=3,
        budgets=budgets,
        sampling=SamplingConfig(),
        max_per_sentence=3,
        max_uncited=300,
        step_s=0.0,
        dead_after=None,
        seed=0,
    )
    request = _request(case)
    request = replace(
        request, validator=_RejectingValidator(n_sources=3, policy=request.policy, scorer=None)
    )
    heap: dict[int, int] = {}
    seen = 0
    tracemalloc.start()
    try:
        with watchdog(120):
            for item in decode(ScriptedRuntime("Paris is big [1]."), INDEX, request, PROMPT):
                if isinstance(item, Rollback):
                    seen += 1
                    if seen in (1000, 2000, rollbacks - 1000, rollbacks):
                        heap[seen] = tracemalloc.get_traced_memory()[0]
                elif isinstance(item, Done):
                    done = item
    finally:
        tracemalloc.stop()
    trace = done.trace
    assert trace.stop_reason is StopReason.BACKTRACK_BUDGET
    assert trace.backtracks == seen == rollbacks + 1
    first = heap[2000] - heap[1000]
    last = heap[rollbacks] - heap[rollbacks - 1000]
    assert last < 64 * 1024, f"{last} bytes over the last 1,000 rollbacks"
    assert last < max(first, 64 * 1024) / 4
    # The trace keeps the first and the last half of its limit, and counts the rest.
    assert len(trace.entries) == Trace.MAX_ENTRIES
    assert trace.dropped_entries == 2 * trace.backtracks - Trace.MAX_ENTRIES
    assert trace.entries[0].kind == "rejection"
    assert trace.entries[-1].kind == "rollback"
    assert trace.rejections == trace.backtracks  # the counts still count everything


def test_the_trace_log_keeps_the_first_and_last_halves() -> None:
    from citebacktrack._trace_log import TraceLog
    from citebacktrack.types import TraceEntry

    log = TraceLog(limit=5)
    entries = [TraceEntry(kind="rollback", token_position=i, char_offset=0) for i in range(12)]
    for entry in entries:
        log.append(entry)
    assert [e.token_position for e in log.entries()] == [0, 1, 9, 10, 11]
    assert log.dropped == 7
    assert len(log) == 5


# =============================================================================== regressions


def test_a_grammar_dead_end_ends_with_dead_end_not_a_citation_failure() -> None:
    """The grammar stops allowing anything after 5 tokens: once regenerating the sentence
    does not help, the stop reason says so (it said ``no_supported_answer`` before)."""
    case = DecodeCase(
        model="random",
        scorer="reject-all",
        mode=CitationMode.REQUIRED,
        n_sources=3,
        budgets=Budgets(max_new_tokens=60, sentence_retries=1, max_backtracks=20),
        sampling=SamplingConfig(),
        max_per_sentence=3,
        max_uncited=300,
        step_s=0.001,
        dead_after=5,
        seed=3,
    )
    run = run_decoder(case)
    check_decode(run)
    trace = run.done.trace
    assert trace.stop_reason is StopReason.DEAD_END
    assert any(e.detail == "the grammar allows no token here" for e in trace.entries)
    assert any(e.reason == "regenerate sentence" for e in trace.entries)
    assert run.text == ""


def _drive(engine: AdversarialEngine, request: GenerationRequest) -> tuple[list[Event], int]:
    loop = SegmentLoop(request, continues_prefix=engine.continues_prefix)
    events: list[Event] = []
    with watchdog(20):
        while (call := loop.next_call()) is not None:
            if len(engine.calls) > 1000:
                raise Hang("more than 1000 engine calls")
            events += loop.feed(engine.complete(call))
    return [*events, *loop.finish()], len(engine.calls)


def _segment_request(mode: CitationMode, scorer: str = "none", **budgets: Any) -> GenerationRequest:
    case = DecodeCase(
        model="random",
        scorer=scorer,
        mode=mode,
        n_sources=3,
        budgets=Budgets(**budgets),
        sampling=SamplingConfig(),
        max_per_sentence=3,
        max_uncited=300,
        step_s=0.0,
        dead_after=None,
        seed=0,
    )
    return _request(case)


@pytest.mark.parametrize("engine", ["cites-forever-uncounted", "negative-counts"])
def test_an_engine_without_token_counts_still_runs_out_of_budget(engine: str) -> None:
    """An engine that reports 0 tokens (unknown) or negative counts and cites forever: each
    kept segment counts as one token, so the loop ends (it never did)."""
    request = _segment_request(CitationMode.REQUIRED, max_new_tokens=25)
    events, calls = _drive(AdversarialEngine(ENGINES[engine], 0, continues_prefix=True), request)
    done = events[-1]
    assert isinstance(done, Done)
    assert done.trace.stop_reason is StopReason.MAX_NEW_TOKENS
    assert calls == 25
    assert done.usage.completion_tokens == 0
    assert done.usage.prompt_tokens == 0


@pytest.mark.parametrize(
    ("mode", "written", "revised"),
    [
        # Words after the group left the sentence open under REQUIRED: it ran into the
        # next one, whose [1] was then a duplicate, and was cut to "Paris is big .".
        (
            CitationMode.REQUIRED,
            "The tower [1] is tall. Paris is big [1].",
            "The tower is tall [1]. Paris is big [1].",
        ),
        # Brackets left in prose: "[99. is old [1]" reads as one marker (id 991), and the
        # bracket of "[2." stayed in the text; read again after the revision, the
        # leftover was a marker and the one-call engine was asked to continue.
        # The whitespace of "\n." came before the terminator: revised, "Rome [1]." ran
        # into "Paris", and its [1] was a duplicate in one sentence.
        (CitationMode.REQUIRED, "Rome [1]\n.Paris [1]", "Rome [1]. Paris [1]."),
        (
            CitationMode.REQUIRED,
            "Rome [99. is old [1]. Paris [2.",
            # "Rome (99." and "Paris (2." are sentences of their own (as the grammar
            # reads "99. "), uncited: dropped.
            "is old [1]. ",
        ),
    ],
)
def test_a_one_call_answer_is_revised_into_markers_the_loop_accepts(
    mode: CitationMode, written: str, revised: str
) -> None:
    family: Family = lambda call, rng, n: SegmentResult(text=written, finish="end")  # noqa: E731
    events, calls = _drive(
        AdversarialEngine(family, 0, continues_prefix=False), _segment_request(mode)
    )
    done = events[-1]
    assert isinstance(done, Done)
    assert calls == 1
    assert done.trace.stop_reason is StopReason.END
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == revised


def test_an_engine_that_breaks_its_grammar_is_refused_with_a_backend_error() -> None:
    """A server that does not enforce the grammar wrote ``["[3``: the loop read it as the
    marker [3] and released a citation whose span was ``["[3]``; now it says so."""
    family: Family = lambda call, rng, n: SegmentResult(text='Paris ["[3', finish="stop")  # noqa: E731
    engine = AdversarialEngine(family, 0, continues_prefix=True)
    with pytest.raises(BackendError, match="grammar it was sent refuses"):
        _drive(engine, _segment_request(CitationMode.REQUIRED))
    assert len(engine.calls) == 1


def test_a_one_call_answer_judges_each_marker_on_the_claim_it_ends_up_after() -> None:
    """AUTO moves a sentence's markers into one group where its last one was: [1] was
    judged on "Rome" but lands after "Rome is old", where the loop rejected it and asked
    the one-call engine to continue (a RuntimeError)."""
    request = _segment_request(CitationMode.AUTO)
    supports = {("Rome", 1), ("Rome is old", 2)}
    scorer = Scorer(lambda claim, i: (claim, i) in supports)
    validator = CitationValidator(n_sources=3, policy=request.policy, scorer=scorer)
    family: Family = lambda call, rng, n: SegmentResult(  # noqa: E731
        text="Rome [1] is old [2].", finish="end"
    )
    engine = AdversarialEngine(family, 0, continues_prefix=False)
    events, calls = _drive(engine, replace(request, validator=validator))
    done = events[-1]
    assert isinstance(done, Done)
    assert calls == 1
    assert done.trace.stop_reason is StopReason.END
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Rome is old [2]."
    assert [e.source_index for e in events if isinstance(e, CitationRejected)] == [1]


def test_a_group_after_a_released_sentence_never_rolls_the_sentence_back() -> None:
    """ "Paris is big [1]. " is streamed once the next sentence starts; rolled back to just
    before it, a marker there belongs to the released sentence (``claim. [2]``), and its
    dead end regenerated that sentence: a rollback of 17 tokens into streamed text, which
    then ended with ``no_supported_answer`` while the stream showed a cited sentence."""
    case = DecodeCase(
        model="same-sentence",
        scorer="only-1",
        mode=CitationMode.QUOTES_ONLY,
        n_sources=3,
        budgets=Budgets(max_new_tokens=18, retries_per_checkpoint=0, max_backtracks=2),
        sampling=SamplingConfig(),
        max_per_sentence=2,
        max_uncited=20,
        step_s=0.001,
        dead_after=17,
        seed=0,
    )
    run = run_decoder(case)
    check_decode(run)
    assert run.text == "Paris is big [1]. "
    assert run.done.trace.stop_reason is StopReason.DEAD_END
    assert [e.depth for e in run.events if isinstance(e, Rollback)] == [1]


@pytest.mark.parametrize(
    ("scorer", "mode", "seed"),
    [
        # "U.S. [1].] is. [2]é[] big": the revision's "U.S..) is.é [1]" ends a sentence
        # after "U.S..)", so [1] was judged on another claim than the loop's ("is.é").
        ("random", CitationMode.AUTO, 1643),
        # "...\n[. [2]!": revised twice, a sentence with no words was given the best id,
        # a marker the loop then rejected ("a marker with no words to cite").
        ("none", CitationMode.REQUIRED, 2144),
    ],
)
def test_a_one_call_revision_stands_when_read_again(
    scorer: str, mode: CitationMode, seed: int
) -> None:
    """Found by the segment fuzz at scale 20: the loop rejected a marker of the revised
    answer (and ended with ``backtrack_budget``, or would have asked again)."""
    case = SegmentCase(
        engine="random-answer",
        scorer=scorer,
        mode=mode,
        n_sources=1,
        budgets=Budgets(
            max_new_tokens=1,
            retries_per_checkpoint=0,
            sentence_retries=0,
            max_backtracks=1,
            max_rolled_back_tokens=1,
        ),
        max_segment_tokens=1,
        step_s=0.001,
        seed=seed,
    )
    check_segments(run_segment_loop(case))
