"""Decoder overhead per token on a toy model with a 50k-token vocabulary.

Measures what the backtracking decoder itself costs — grammar mask, sampling, matcher,
citation tracking and validation, checkpoint bookkeeping — by timing whole decodes and
subtracting the time spent inside the toy model (``prefill``/``forward``/``truncate``).
Also times each citation rollback (reject, restore matcher/KV/logits/state), again
excluding model work.

The toy model wants to write a realistic cited answer (ALCE-style, four sentences, five
markers) over a synthetic byte-level vocabulary of 50,000 tokens: all 256 bytes, the
marker pieces real tokenizers have (`` [``, ``].``, ``],``), digits and punctuation runs,
and word pieces with and without a leading space. A scorer that rejects every first
choice forces one rollback per marker.

    python benchmarks/decoder_overhead.py [--runs 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import string
import time
from collections.abc import Sequence

import numpy as np

from citebacktrack.backends.local import decode
from citebacktrack.decoding import decoder as decoder_module
from citebacktrack.decoding._masking import MarkerMask
from citebacktrack.decoding.runtime import Logits, Vocabulary
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.request import Budgets, DecodingOptions, GenerationRequest, SamplingConfig
from citebacktrack.support import SupportResult
from citebacktrack.testing import ScriptedRuntime
from citebacktrack.types import ChatMessage, Done, Policy, Source
from citebacktrack.validation import CitationValidator

ANSWER = (
    "Several places on Earth claim to be the most rainy, such as Lloró, Colombia, which "
    "reported an average annual rainfall of 12,717 mm between 1952 and 1989 [3]. However, "
    "the official record is held by Mawsynram, India with an average annual rainfall of "
    "11,872 mm [3], although nearby town Sohra, India, also known as Cherrapunji, holds the "
    "record for most rain in a calendar month for July 1861 [1][2]. The town receives about "
    "11.7 m of rain a year, e.g. during the monsoon [4]."
)
VOCAB_SIZE = 50_000


def synthetic_vocabulary(size: int = VOCAB_SIZE, seed: int = 0) -> Vocabulary:
    """A byte-level vocabulary shaped like a real BPE one (stop token at id 0)."""
    rng = random.Random(seed)
    pieces: list[bytes] = [b"<eos>", *(bytes([b]) for b in range(256))]
    seen = set(pieces)

    def add(piece: bytes) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)

    for piece in (b" [", b"[", b"].", b"],", b"] ", b"]", b" (", b").", b"),", b"\n\n", b".\n"):
        add(piece)
    for word in ANSWER.replace("[", " ").replace("]", " ").split():
        add(word.encode())
        add(b" " + word.encode())
    for n in range(1000):
        add(str(n).encode())
    punctuation = ".,;:!?()'\"-"
    while len(pieces) < size // 10:
        add("".join(rng.choice(punctuation) for _ in range(rng.randint(2, 4))).encode())
    letters = string.ascii_lowercase
    while len(pieces) < size:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
        word = word.capitalize() if rng.random() < 0.15 else word
        add((" " + word if rng.random() < 0.6 else word).encode())
    return Vocabulary(tokens=pieces, stop_ids=frozenset({0}))


class TimedRuntime:
    """Wraps a runtime and adds up the time spent in model work."""

    def __init__(self, inner: ScriptedRuntime) -> None:
        self.inner = inner
        self.model_seconds = 0.0

    @property
    def vocabulary(self) -> Vocabulary:
        return self.inner.vocabulary

    @property
    def n_tokens(self) -> int:
        return self.inner.n_tokens

    def prefill(self, prompt: Sequence[int]) -> Logits:
        start = time.perf_counter()
        try:
            return self.inner.prefill(prompt)
        finally:
            self.model_seconds += time.perf_counter() - start

    def forward(self, tokens: Sequence[int]) -> Logits:
        start = time.perf_counter()
        try:
            return self.inner.forward(tokens)
        finally:
            self.model_seconds += time.perf_counter() - start

    def truncate(self, n_tokens: int) -> None:
        start = time.perf_counter()
        try:
            self.inner.truncate(n_tokens)
        finally:
            self.model_seconds += time.perf_counter() - start


class FirstChoiceRejected:
    """Rejects the first id tried at each marker position, accepts the next."""

    def __init__(self) -> None:
        self.tried: set[tuple[str, int]] = set()

    def score(self, claim: str, source_index: int) -> SupportResult:
        first = not any(c == claim for c, _ in self.tried)
        self.tried.add((claim, source_index))
        return SupportResult(
            score=0.0 if first else 1.0, is_supported=not first, evidence="", detail=""
        )


def make_request(
    n_sources: int, scorer: FirstChoiceRejected | None, sampling: SamplingConfig | None = None
) -> GenerationRequest:
    policy = Policy()
    return GenerationRequest(
        messages=[ChatMessage("user", "q")],
        sources=[Source(text=f"Source {i}.") for i in range(1, n_sources + 1)],
        grammar=citation_grammar(n_sources, policy),
        policy=policy,
        validator=CitationValidator(n_sources=n_sources, policy=policy, scorer=scorer),
        budgets=Budgets(max_new_tokens=512),
        decoding=DecodingOptions(sampling=sampling or SamplingConfig()),
    )


def run_once(
    index: VocabularyIndex,
    *,
    reject_first: bool,
    sampling: SamplingConfig | None = None,
    full_mask: bool = False,
) -> dict[str, float]:
    runtime = TimedRuntime(ScriptedRuntime(ANSWER, index.vocabulary))
    scorer = FirstChoiceRejected() if reject_first else None
    request = make_request(5, scorer, sampling)
    rollback_times: list[float] = []
    original = decoder_module.Decoder._reject

    def timed_reject(self, run, marker, verdict, prompt_len):  # type: ignore[no-untyped-def]
        before_model = runtime.model_seconds
        start = time.perf_counter()
        events = list(original(self, run, marker, verdict, prompt_len))
        rollback_times.append(time.perf_counter() - start - (runtime.model_seconds - before_model))
        yield from events

    decoder_module.Decoder._reject = timed_reject  # type: ignore[method-assign]
    speculate = MarkerMask.speculate
    if full_mask:  # measure the path that builds the whole mask at every step (no shortcut)
        MarkerMask.speculate = lambda *args: False  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        events = list(decode(runtime, index, request, [1, 2, 3]))
        wall = time.perf_counter() - start
    finally:
        decoder_module.Decoder._reject = original  # type: ignore[method-assign]
        MarkerMask.speculate = speculate  # type: ignore[method-assign]
    done = events[-1]
    assert isinstance(done, Done)
    generated = done.usage.generated_tokens
    return {
        "generated_tokens": generated,
        "kept_tokens": done.usage.completion_tokens,
        "rollbacks": done.trace.backtracks,
        "wall_ms": wall * 1e3,
        "model_ms": runtime.model_seconds * 1e3,
        "overhead_ms_per_token": (wall - runtime.model_seconds) * 1e3 / generated,
        "rollback_ms_mean": statistics.fmean(rollback_times) * 1e3 if rollback_times else 0.0,
        "rollback_ms_max": max(rollback_times) * 1e3 if rollback_times else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    start = time.perf_counter()
    vocabulary = synthetic_vocabulary()
    index = VocabularyIndex(vocabulary)
    index.compile(make_request(5, None).grammar)  # compile once, as a backend would
    setup = time.perf_counter() - start
    print(f"vocabulary {vocabulary.size} tokens; index + grammar compile {setup:.2f} s", flush=True)

    results: dict[str, dict[str, float]] = {}
    sampled = SamplingConfig(temperature=0.8, top_p=0.95, seed=1)
    for label, reject_first, sampling, full_mask in (
        ("no rejections", False, None, False),
        ("reject first choice at every marker", True, None, False),
        ("no rejections, shortcut off (full mask every step)", False, None, True),
        ("sampled (temperature 0.8, top-p 0.95), no rejections", False, sampled, False),
        ("sampled, shortcut off (full mask every step)", False, sampled, True),
    ):
        once = functools.partial(
            run_once, index, reject_first=reject_first, sampling=sampling, full_mask=full_mask
        )
        once()  # warm-up
        runs = [once() for _ in range(args.runs)]
        summary = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        summary["overhead_ms_per_token_mean"] = statistics.fmean(
            r["overhead_ms_per_token"] for r in runs
        )
        results[label] = summary
        print(
            f"{label}: {summary['generated_tokens']:.0f} tokens generated, "
            f"{summary['kept_tokens']:.0f} kept, {summary['rollbacks']:.0f} rollbacks; "
            f"decoder overhead {summary['overhead_ms_per_token_mean']:.3f} ms/token (mean of "
            f"{args.runs} runs; median {summary['overhead_ms_per_token']:.3f}), "
            f"citation rollback {summary['rollback_ms_mean']:.3f} ms mean / "
            f"{summary['rollback_ms_max']:.3f} ms max (excluding model work)"
        )
    print(f"numpy {np.__version__}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
