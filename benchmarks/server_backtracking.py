"""Segment-level backtracking on a llama.cpp server: the cost of one rejected citation.

A server cannot roll back its KV cache, so a rejected ``[N]`` is handled by resubmitting
the prompt and the accepted prefix up to the marker's ``[`` with a grammar that allows only
the ids the validator accepts there (:mod:`citebacktrack.segments`). The alternative a
server leaves is regenerating the whole answer. This script measures both, end to end over
HTTP (prompt processing included), on N multi-hop questions with ten sources each
(``--data``, default ``/work/shared/data/multihop/hotpotqa_dev186.json``, tune split):

* it starts ``python -m llama_cpp.server`` on 127.0.0.1 with the embedded
  SmolLM2-135M-Instruct (``--server-url`` to use a running one);
* per question it drives the segment loop (``SegmentLoop`` over ``OpenAICompatibleEngine``,
  the same code as ``OpenAIBackend``) and times every engine call; a **resubmission** is
  the call made right after a rejection (prefix ending in ``[``, the allowed ids only);
* then it times a **full regeneration**: the same prompt, the full citation grammar, no
  stop string, as many tokens as the answer used — what the rejection would cost if the
  answer were generated again from the start.

llama-cpp-python's server keeps the KV prefix shared with the previous request (its
``Llama.generate`` prefix match), so both figures include only the prompt tokens that
changed; ``--cold`` sends an unrelated prompt before each timed call to show the cost
without that reuse. Progress goes to stderr, a Markdown table to stdout, every call to
``--json``.

    python benchmarks/server_backtracking.py [--n 8] [--cold] [--json out.json]

Only plain Python, the library and its ``server`` extra are used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from citebacktrack import Budgets, CitationRejected, Citeformer, Rollback
from citebacktrack.backends.llamacpp_server import LlamaCppServer
from citebacktrack.backends.openai import OpenAICompatibleEngine
from citebacktrack.evaluation import load_dataset
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.segments import SegmentCall, SegmentLoop, SegmentResult

DEFAULT_DATA = Path("/work/shared/data/multihop/hotpotqa_dev186.json")
N_CTX = 8192


@dataclass
class Timed:
    question: str
    kind: str  # "segment", "resubmission" or "full regeneration"
    seconds: float
    prefix_chars: int
    prompt_tokens: int
    completion_tokens: int


def _timed(engine: OpenAICompatibleEngine, call: SegmentCall) -> tuple[SegmentResult, float]:
    start = time.perf_counter()
    result = engine.complete(call)
    return result, time.perf_counter() - start


def _flush(engine: OpenAICompatibleEngine, call: SegmentCall) -> None:
    """Evict the server's cached prompt prefix with an unrelated prompt."""
    from citebacktrack.types import ChatMessage

    other = SegmentCall(
        messages=[ChatMessage("user", "Say one word.")],
        prefix="",
        grammar=None,
        stop=(),
        max_tokens=1,
    )
    engine.complete(other)


def run(engine: OpenAICompatibleEngine, cf: Citeformer, example: object, cold: bool) -> list[Timed]:
    question, sources = example.question, example.sources  # type: ignore[attr-defined]
    request = cf.build_request(question, sources)
    loop = SegmentLoop(request)
    rows: list[Timed] = []
    resubmit = False
    while (call := loop.next_call()) is not None:
        if cold:
            _flush(engine, call)
        result, seconds = _timed(engine, call)
        kind = "resubmission" if resubmit else "segment"
        rows.append(
            Timed(
                question,
                kind,
                seconds,
                len(call.prefix),
                result.prompt_tokens,
                result.completion_tokens,
            )
        )
        events = loop.feed(result)
        rejected = any(isinstance(e, CitationRejected) for e in events)
        resubmit = rejected and any(
            isinstance(e, Rollback) and e.reason.startswith("rejected") for e in events
        )
    answer_tokens = sum(r.completion_tokens for r in rows)
    full = SegmentCall(
        messages=request.messages,
        prefix="",
        grammar=citation_grammar(request.n_sources, request.policy, bounded=True),
        stop=(),
        max_tokens=max(answer_tokens, 1),
    )
    if cold:
        _flush(engine, full)
    result, seconds = _timed(engine, full)
    rows.append(
        Timed(
            question,
            "full regeneration",
            seconds,
            0,
            result.prompt_tokens,
            result.completion_tokens,
        )
    )
    return rows


def _median(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f}" if values else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n", type=int, default=8, help="questions (tune split)")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--server-url", help="a running llama.cpp server's /v1 URL")
    parser.add_argument("--cold", action="store_true", help="evict the prompt cache first")
    parser.add_argument("--json", type=Path, help="write every timed call here")
    args = parser.parse_args()

    examples = [e for e in load_dataset(args.data) if e.split == "tune"][: args.n]
    server = None
    if args.server_url is None:
        print("starting llama_cpp.server on 127.0.0.1 ...", file=sys.stderr)
        server = LlamaCppServer(n_ctx=N_CTX, n_threads=os.cpu_count())
        url = server.base_url
    else:
        url = args.server_url
    engine = OpenAICompatibleEngine.from_base_url(
        url, model="default", server="llama.cpp", timeout=600.0, max_retries=0
    )
    # The backend is only used to build requests; the loop is driven here to time calls.
    from citebacktrack.backends.segment import SegmentBackend

    cf = Citeformer(SegmentBackend(engine), budgets=Budgets(max_new_tokens=args.max_new_tokens))
    rows: list[Timed] = []
    try:
        for i, example in enumerate(examples, 1):
            got = run(engine, cf, example, args.cold)
            rows += got
            kinds = [r.kind for r in got]
            print(
                f"[{i}/{len(examples)}] {example.id}: {kinds.count('segment')} segment(s), "
                f"{kinds.count('resubmission')} resubmission(s)",
                file=sys.stderr,
            )
    finally:
        engine.close()
        if server is not None:
            server.close()

    resub = [r.seconds for r in rows if r.kind == "resubmission"]
    full = [r.seconds for r in rows if r.kind == "full regeneration"]
    segs = [r.seconds for r in rows if r.kind == "segment"]
    full_tokens = [r.completion_tokens for r in rows if r.kind == "full regeneration"]
    print("# Rejected citation on a llama.cpp server: resubmission vs full regeneration\n")
    print(
        f"{len(examples)} questions (tune split of {args.data.name}), ten sources each, "
        f"SmolLM2-135M-Instruct Q4_1, llama-cpp-python server, greedy, "
        f"prompt cache {'evicted before each call' if args.cold else 'on (default)'}; "
        f"{platform.machine()}, {os.cpu_count()} cores. Whole HTTP calls, prompt "
        "processing included.\n"
    )
    print("| call | n | median ms | p90 ms | median tokens generated |")
    print("|---|---:|---:|---:|---:|")
    for name, values, tokens in (
        (
            "resubmission after a rejection",
            resub,
            [r.completion_tokens for r in rows if r.kind == "resubmission"],
        ),
        ("full regeneration of the answer", full, full_tokens),
        ("any other segment", segs, [r.completion_tokens for r in rows if r.kind == "segment"]),
    ):
        # Nearest rank: the smallest value with at least 90% of the values at or below it.
        rank = max(1, math.ceil(0.9 * len(values)))
        p90 = f"{sorted(values)[rank - 1] * 1000:.0f}" if values else "–"
        tok = f"{statistics.median(tokens):.0f}" if tokens else "–"
        print(f"| {name} | {len(values)} | {_median(values)} | {p90} | {tok} |")
    if resub and full:
        ratio = statistics.median(full) / statistics.median(resub)
        print(
            f"\nA rejection costs {ratio:.1f}x less by resubmission than by regeneration (medians)."
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
