"""Load on loopback: concurrent ``Citeformer.agenerate`` calls held for a while.

Two targets, each a closed loop of C concurrent callers that ask one question after
another until D seconds have passed (``--duration``) or N answers were asked for
(``--requests``); then the answers still in flight finish and count:

* ``server``: ``Citeformer(OpenAIBackend)`` over ``python -m llama_cpp.server`` on
  127.0.0.1 with the embedded SmolLM2-135M-Instruct, started here (``LlamaCppServer``;
  ``--server-url`` to use a running one). llama-cpp-python's server runs one completion
  at a time, so its throughput is one model's, and latency grows with C;
* ``mock``: ``Citeformer(FunctionBackend)``, the real decoder, grammar, validator and
  answer builder over a scripted model, no model time: the library's own overhead per
  answer alone and at 1,000 concurrent callers (``--mock-concurrency``).

Every question is different (a tower with a name no other question has) and comes with
its own two sources, so each answer is checked to be its own: it cites only its own
sources and names no other question's tower ("own" counts those that give their own
tower's name and year).
Progress goes to stderr, a Markdown table to stdout; the exit status is 1 if any call
failed.

    python benchmarks/load.py [--duration 20] [--concurrency 8] [--max-new-tokens 20]
        [--mock-concurrency 1,1000] [--targets server,mock] [--json out.json]

Only plain Python, the library and its ``server`` extra are used.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import anyio

from citebacktrack import Answer, Budgets, Citeformer, FunctionBackend, Source
from citebacktrack.backends.base import Backend, GenerationRequest

CITIES = (
    *("Amsterdam", "Berlin", "Cairo", "Dublin", "Edinburgh", "Florence", "Geneva"),
    *("Helsinki", "Istanbul", "Jakarta", "Kyoto", "Lisbon", "Madrid", "Nairobi"),
    *("Oslo", "Prague", "Quito", "Rome", "Seoul", "Tokyo"),
)
SYLLABLES = (
    *("ba", "be", "bo", "da", "de", "do", "fa", "fe", "ga", "go", "ka", "ke", "ko", "la"),
    *("le", "lo", "ma", "me", "mo", "na", "ne", "no", "pa", "po", "ra", "re", "ro", "sa"),
    *("ta", "te", "to", "va"),
)


def name(i: int) -> str:
    """A name no other question has (three syllables; 32,768 of them)."""
    n = len(SYLLABLES)
    return (SYLLABLES[i % n] + SYLLABLES[i // n % n] + SYLLABLES[i // n // n % n]).capitalize()


NAMES = {name(i): i for i in range(len(SYLLABLES) ** 3)}
WARM_UP = 3
"""Answers before the clock starts (questions the load never asks)."""


def ask(i: int) -> tuple[str, list[Source], int]:
    """Question ``i``: its text, its two sources and its year."""
    city, tower = CITIES[i % len(CITIES)], name(i)
    year = 1500 + i * 37 % 500
    return (
        f"When was the {tower} tower in {city} built?",
        [
            Source(
                id=f"q{i}-tower",
                title=f"{tower} tower",
                text=f"The {tower} tower in {city} was built in {year}.",
            ),
            Source(id=f"q{i}-rain", title="Weather", text=f"It often rains in {city} in spring."),
        ],
        year,
    )


def scripted(request: GenerationRequest) -> str:
    """What the mock model writes: the answer its sources give."""
    tower = (request.question or "").split("the ", 1)[1].split()[0]
    _, _, year = ask(NAMES[tower])
    return f"The {tower} tower was built in {year} [1]."


@dataclass
class Result:
    target: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    own: int = 0
    """Answers that give their own tower's name and year."""
    foreign: int = 0
    """Answers that cite another question's source or name another question's tower."""
    calls: int = 0
    elapsed: float = 0.0


def check(i: int, answer: Answer, result: Result) -> None:
    """Count the answer as its own (its name and year), or as showing another's content."""
    _, _, year = ask(i)
    words = set(answer.text.replace(".", " ").replace(",", " ").split())
    others = any(NAMES.get(w, i) != i for w in words)
    wrong_source = any(not c.source_id.startswith(f"q{i}-") for c in answer.citations)
    if others or wrong_source:
        result.foreign += 1
    elif name(i) in words and str(year) in words:
        result.own += 1
    result.calls += answer.usage.forward_passes


async def hold(
    target: str,
    cf: Citeformer,
    *,
    concurrency: int,
    duration: float | None,
    requests: int | None,
    first: int,
) -> Result:
    """C callers asking in a loop until the deadline or the count; every answer checked."""
    result = Result(target, concurrency)
    counter = itertools.count(first)
    started = time.perf_counter()
    deadline = None if duration is None else started + duration
    limit = None if requests is None else first + requests

    async def caller() -> None:
        while True:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            i = next(counter)
            if limit is not None and i >= limit:
                return
            question, sources, _ = ask(i)
            t0 = time.perf_counter()
            try:
                answer = await cf.agenerate(question, sources)
            except Exception as exc:  # counted, never hidden
                result.errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
                continue
            result.latencies.append(time.perf_counter() - t0)
            check(i, answer, result)

    async with anyio.create_task_group() as group:
        for _ in range(concurrency):
            group.start_soon(caller)
    result.elapsed = time.perf_counter() - started
    return result


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def row(result: Result) -> str:
    n = len(result.latencies)
    errors = sum(result.errors.values())
    return (
        f"| {result.target} | {result.concurrency} | {n} | {errors} | {result.elapsed:.1f} | "
        f"{n / result.elapsed:.2f} | {percentile(result.latencies, 50) * 1000:.0f} | "
        f"{percentile(result.latencies, 99) * 1000:.0f} | {result.calls / max(n, 1):.2f} | "
        f"{result.own}/{n} | {result.foreign} |"
    )


def run_target(
    target: str,
    make: Callable[[], tuple[Backend, Callable[[], None]]],
    args: argparse.Namespace,
    concurrency: int,
) -> Result:
    backend, close = make()
    count = args.mock_requests if target == "mock" else args.requests
    tokens = args.mock_max_new_tokens if target == "mock" else args.max_new_tokens
    cf = Citeformer(backend, budgets=Budgets(max_new_tokens=tokens))
    try:
        # A few answers first: model load, llama.cpp's first prompt batches (several times
        # slower than later ones) and SDK imports are not measured.
        for i in range(WARM_UP):
            question, sources, _ = ask(len(NAMES) - 1 - i)
            anyio.run(cf.agenerate, question, sources)
        span = f"{count} answers" if count is not None else f"{args.duration:g} s"
        print(f"{target}: {concurrency} callers for {span} ...", file=sys.stderr)
        load = functools.partial(
            hold,
            target,
            cf,
            concurrency=concurrency,
            duration=args.duration if count is None else None,
            requests=count,
            first=1,
        )
        result = anyio.run(load)
    finally:
        close()
    print(
        f"{target}: {len(result.latencies)} answers, {sum(result.errors.values())} errors "
        f"in {result.elapsed:.1f} s",
        file=sys.stderr,
    )
    return result


def _span(args: argparse.Namespace, count: int | None) -> str:
    return f"{count} answers" if count is not None else f"{args.duration:g} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds to hold the load")
    parser.add_argument("--requests", type=int, help="a fixed number of answers instead")
    parser.add_argument("--concurrency", default="8", help="callers on the server (a,b,...)")
    parser.add_argument(
        "--mock-concurrency",
        default="1,1000",
        help="callers on the mock (a,b,...): 1 gives the overhead per answer alone",
    )
    parser.add_argument("--mock-requests", type=int, help="a fixed count for the mock")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument(
        "--mock-max-new-tokens",
        type=int,
        default=64,
        help="the mock's toy vocabulary is byte-level: one token per character",
    )
    parser.add_argument("--targets", default="server,mock", help="comma-separated")
    parser.add_argument("--server-url", help="a running llama.cpp server's /v1 URL")
    parser.add_argument(
        "--n-threads",
        type=int,
        help="server threads (default llama.cpp's: half the cores; all of them on a busy "
        "machine make llama.cpp's spinning threads wait for each other)",
    )
    parser.add_argument("--json", help="write the latencies and errors here")
    args = parser.parse_args()

    def server() -> tuple[Backend, Callable[[], None]]:
        from citebacktrack.backends import LlamaCppServer, OpenAIBackend

        if args.server_url is not None:
            backend = OpenAIBackend.from_base_url(
                args.server_url, model="default", timeout=600.0, max_retries=0
            )
            return backend, backend.close
        print("starting llama_cpp.server on 127.0.0.1 ...", file=sys.stderr)
        process = LlamaCppServer(n_ctx=4096, n_threads=args.n_threads)
        backend = process.backend(timeout=600.0, max_retries=0)

        def close() -> None:
            backend.close()
            process.close()

        return backend, close

    def mock() -> tuple[Backend, Callable[[], None]]:
        return FunctionBackend(scripted), lambda: None

    makers = {"server": server, "mock": mock}
    results = [
        run_target(target, makers[target], args, concurrency)
        for target in args.targets.split(",")
        if target
        for concurrency in (
            [int(c) for c in args.mock_concurrency.split(",")]
            if target == "mock"
            else [int(c) for c in args.concurrency.split(",")]
        )
    ]

    print("# Load on loopback: concurrent Citeformer.agenerate\n")
    print(
        f"Closed loop of C callers for {_span(args, args.requests)} (the mock: "
        f"{_span(args, args.mock_requests)}), each question different with two sources of "
        f"its own, max_new_tokens={args.max_new_tokens} (the mock's byte-level toy vocabulary: "
        f"{args.mock_max_new_tokens}), greedy, default policy and scorer; "
        f"server: llama-cpp-python's server, SmolLM2-135M-Instruct Q4_1, "
        f"{args.n_threads or 'default'} threads; {platform.machine()}, "
        f"{os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f} at the end.\n"
    )
    print(
        "| target | C | answers | errors | s | answers/s | p50 ms | p99 ms | calls/answer "
        "| own | another's |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        print(row(result))
    failed = [r for r in results if r.errors or r.foreign]
    for result in failed:
        for error, count in result.errors.most_common():
            print(f"\n{result.target}: {count} x {error}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as out:
            json.dump([{**asdict(r), "errors": dict(r.errors)} for r in results], out, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
