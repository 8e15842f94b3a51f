"""Memory of the decoder over 10,000+ rollbacks: flat, or growing with every rollback?

Drives the token-level decoder on toy models through many rollbacks (budgets large
enough never to stop it) and measures Python heap (``tracemalloc``: current and peak) and
the process's resident set (RSS, from ``/proc``) at the first rollback, the 1,000th, the
1,000th from the end and the last. Two scenarios:

* ``one-marker``: a scripted model that writes ``Paris is big [1]`` again and again,
  against a validator that rejects every id and never runs out of ids: every rollback is
  at the same marker and the answer never grows, so any growth is what each rollback
  leaves behind.
* ``many-sentences``: a random toy model (its logits a hash of its last 8 tokens, so a
  step costs the same at any length) that keeps opening markers, under ``auto`` with a
  scorer that supports nothing: the rollbacks are spread over thousands of sentences and
  the answer itself grows, so growth per kept token is the figure to compare.

``--uncapped`` lifts the two bounds the decoder keeps on what rollbacks leave behind
(``Trace.MAX_ENTRIES`` and the verdict cache's ``VERDICT_CLAIMS``) to show the growth they
prevent.

    python benchmarks/rollback_memory.py [--rollbacks 10000] [--uncapped] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
import tracemalloc
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from citebacktrack.backends.local import decode
from citebacktrack.decoding import _masking
from citebacktrack.decoding.runtime import Logits, Vocabulary
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.request import Budgets, GenerationRequest
from citebacktrack.support import SupportResult
from citebacktrack.testing import ScriptedRuntime, default_vocabulary, index_for
from citebacktrack.types import (
    ChatMessage,
    CitationMode,
    Done,
    Policy,
    RejectionReason,
    Rollback,
    Source,
    Trace,
)
from citebacktrack.validation import CitationValidator, Verdict

PROMPT = [1, 2, 3]


class RejectingValidator(CitationValidator):
    """Rejects every id, and never runs out of them: bans are not honoured, so the
    model's favourite id is tried (and rejected) at the same marker again and again."""

    def forbidden_ids(
        self, sentence_ids: Collection[int], banned: Collection[int]
    ) -> frozenset[int]:
        return frozenset(sentence_ids)

    def can_open_marker(self, sentence_ids: Collection[int], banned: Collection[int]) -> bool:
        return True

    def check(self, *, source_index: int, sentence_ids: tuple[int, ...], claim: str) -> Verdict:
        return Verdict(is_accepted=False, reason=RejectionReason.UNSUPPORTED, detail="never")


class NothingSupported:
    """A support scorer for which no source supports anything (it keeps no state)."""

    def score(self, claim: str, source_index: int) -> SupportResult:
        return SupportResult(score=0.0, is_supported=False, evidence="", detail="never")


class WindowRuntime:
    """A toy model whose logits are a hash of its last 8 tokens plus a bias: the same
    cost per step at any length (a hash of the whole prefix would cost O(length))."""

    def __init__(self, vocabulary: Vocabulary, bias: Logits, seed: int = 1) -> None:
        self._vocabulary = vocabulary
        self._bias = bias
        self._seed = seed
        self._tokens: list[int] = []

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    @property
    def n_tokens(self) -> int:
        return len(self._tokens)

    def prefill(self, prompt: Sequence[int]) -> Logits:
        self._tokens = list(prompt)
        return self._logits()

    def forward(self, tokens: Sequence[int]) -> Logits:
        self._tokens.extend(tokens)
        return self._logits()

    def truncate(self, n_tokens: int) -> None:
        del self._tokens[n_tokens:]

    def _logits(self) -> Logits:
        window = np.asarray([*self._tokens[-8:], len(self._tokens) % 7], dtype=np.int64)
        digest = hashlib.blake2b(window.tobytes(), digest_size=8).digest()
        rng = np.random.default_rng([self._seed, int.from_bytes(digest, "little")])
        return rng.standard_normal(self._vocabulary.size, dtype=np.float32) * 2.0 + self._bias


def _request(
    mode: CitationMode, validator: CitationValidator | None, budgets: Budgets, n: int = 3
) -> GenerationRequest:
    policy = Policy(mode=mode)
    sources = tuple(Source(text=f"Source number {i}.", id=str(i)) for i in range(1, n + 1))
    return GenerationRequest(
        messages=[ChatMessage("user", "question")],
        sources=sources,
        grammar=citation_grammar(n, policy),
        policy=policy,
        validator=validator,
        budgets=budgets,
    )


def _budgets(rollbacks: int) -> Budgets:
    return Budgets(
        max_new_tokens=10**7,
        retries_per_checkpoint=10**9,
        sentence_retries=10**9,
        max_backtracks=rollbacks,
        max_rolled_back_tokens=10**12,
    )


def one_marker(rollbacks: int) -> tuple[object, GenerationRequest]:
    """Every rollback at the same marker; the answer never grows."""
    req = _request(CitationMode.REQUIRED, None, _budgets(rollbacks))
    validator = RejectingValidator(n_sources=3, policy=req.policy, scorer=None)
    return ScriptedRuntime("Paris is big [1]."), replace(req, validator=validator)


def many_sentences(rollbacks: int) -> tuple[object, GenerationRequest]:
    """Rollbacks spread over thousands of sentences of a growing answer."""
    vocabulary = default_vocabulary()
    boost = {b"[": 4.0, b" [": 3.0, b"1": 3.0, b"2": 3.0, b"]": 3.0, b".": 2.5, b" ": 2.5}
    bias = np.array([boost.get(piece, 0.0) for piece in vocabulary.tokens], dtype=np.float32)
    bias[list(vocabulary.stop_ids)] = -50.0  # never ends by itself
    policy = Policy(mode=CitationMode.AUTO)
    validator = CitationValidator(n_sources=3, policy=policy, scorer=NothingSupported())
    return WindowRuntime(vocabulary, bias), _request(
        CitationMode.AUTO, validator, _budgets(rollbacks)
    )


SCENARIOS = {"one-marker": one_marker, "many-sentences": many_sentences}


def rss_bytes() -> int | None:
    """The resident set size now (Linux ``/proc``), or None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Mark:
    rollback: int
    traced: int
    rss: int | None
    kept_tokens: int
    seconds: float


@dataclass
class Result:
    scenario: str
    capped: bool
    rollbacks: int
    marks: list[Mark]
    peak: int
    stop_reason: str
    trace_entries: int
    dropped_entries: int

    def growth(self, a: int, b: int) -> tuple[int, int | None, int]:
        """(traced bytes, RSS bytes, kept tokens) gained between marks ``a`` and ``b``."""
        first, last = self.marks[a], self.marks[b]
        rss = None if first.rss is None or last.rss is None else last.rss - first.rss
        return last.traced - first.traced, rss, last.kept_tokens - first.kept_tokens


@contextlib.contextmanager
def uncapped() -> Iterator[None]:
    """Lift the trace's and the verdict cache's bounds (to show what they prevent)."""
    entries, claims = Trace.MAX_ENTRIES, _masking.VERDICT_CLAIMS
    Trace.MAX_ENTRIES, _masking.VERDICT_CLAIMS = 10**9, 10**9
    try:
        yield
    finally:
        Trace.MAX_ENTRIES, _masking.VERDICT_CLAIMS = entries, claims


def measure(scenario: str, rollbacks: int, *, capped: bool = True) -> Result:
    """Decode ``scenario`` through ``rollbacks`` rollbacks, measuring at the four marks."""
    runtime, req = SCENARIOS[scenario](rollbacks)
    index = index_for(runtime.vocabulary)  # type: ignore[attr-defined]
    wanted = sorted({1, 1000, rollbacks - 1000, rollbacks})
    marks: list[Mark] = []
    seen, done = 0, None
    with contextlib.nullcontext() if capped else uncapped():
        tracemalloc.start()
        started = time.perf_counter()
        for event in decode(runtime, index, req, PROMPT):  # type: ignore[arg-type]
            if isinstance(event, Rollback):
                seen += 1
                if seen in wanted:
                    held = runtime.n_tokens - len(PROMPT)  # type: ignore[attr-defined]
                    marks.append(
                        Mark(
                            seen,
                            tracemalloc.get_traced_memory()[0],
                            rss_bytes(),
                            held,
                            time.perf_counter() - started,
                        )
                    )
            elif isinstance(event, Done):
                done = event
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert done is not None
    return Result(
        scenario=scenario,
        capped=capped,
        rollbacks=seen,
        marks=marks,
        peak=peak,
        stop_reason=done.trace.stop_reason.value,
        trace_entries=len(done.trace.entries),
        dropped_entries=done.trace.dropped_entries,
    )


def _kib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1024:,.1f}"


def table(results: Sequence[Result]) -> str:
    """The results as a Markdown table (growth: from the 1st to the 1,000th rollback, and
    over the last 1,000)."""
    lines = [
        "| scenario | bounds | rollbacks | heap growth, first 1,000 (KiB) | heap growth, "
        "last 1,000 (KiB) | per rollback, last 1,000 (B) | tokens kept, last 1,000 | "
        "RSS growth, last 1,000 (KiB) | heap peak (KiB) | trace entries kept / dropped | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        first = r.growth(0, 1)
        last = r.growth(len(r.marks) - 2, len(r.marks) - 1)
        lines.append(
            f"| {r.scenario} | {'capped' if r.capped else 'uncapped'} | {r.rollbacks:,} | "
            f"{_kib(first[0])} | {_kib(last[0])} | {last[0] / 1000:,.0f} | {last[2]:,} | "
            f"{_kib(last[1])} | {_kib(r.peak)} | {r.trace_entries:,} / {r.dropped_entries:,} | "
            f"{r.marks[-1].seconds:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollbacks", type=int, default=10_000)
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--uncapped", action="store_true", help="also run with the bounds lifted")
    parser.add_argument("--json", help="write the marks as JSON here")
    args = parser.parse_args()
    if args.rollbacks < 2000:
        parser.error("--rollbacks must be at least 2000 (first and last 1,000 are compared)")
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    results = [measure(name, args.rollbacks) for name in names]
    if args.uncapped:
        results += [measure(name, args.rollbacks, capped=False) for name in names]
    print(table(results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump([r.__dict__ | {"marks": [m.__dict__ for m in r.marks]} for r in results], out)


if __name__ == "__main__":
    main()
