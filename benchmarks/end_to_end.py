"""End-to-end seconds per answer, prefill included, on multi-hop questions with 10 sources.

On N questions of the HotpotQA sample (``--data``, default
``/work/shared/data/multihop/hotpotqa_dev186.json``; ten retrieved paragraphs each,
~1,300 prompt tokens with the default prompt), on the embedded SmolLM2-135M-Instruct
through llama.cpp (and, with ``--backends llamacpp,hf``, transformers), this times whole
answers, greedy, with and without reuse of the fixed prompt prefix (system instruction and
demo turns, the chat messages before the last user turn):

* ``citeformer``: ``Citeformer(backend).generate`` (grammar + lexical support validation);
* ``citeformer scorer=None``: grammar and id checks only;
* ``raw (decoder)``: the same decoder with ``grammar=None, validator=None`` (unconstrained),
  when this checkout's decoder supports it (else the row says why it is missing);
* ``raw (runtime loop)``: a plain greedy loop over the backend's runtime on the same prompt
  (``prefill`` then argmax/``forward``), with the same fixed prefix as the backend uses;
* ``llama-cpp-python``: its own ``Llama.create_chat_completion(messages, temperature=0)``
  on the same messages, on a second ``Llama`` loaded from the same GGUF. "Prefix reuse on"
  is its default (``Llama.generate`` keeps the KV prefix shared with the previous prompt);
  "off" clears its cache before each call.

Every answer's wall time is split into prefill (inside ``runtime.prefill``; for
llama-cpp-python the ``eval`` calls before its first ``sample``) and the rest ("decode":
decoding, validation, bookkeeping). Tokens/s end to end = answer tokens / wall time.
Progress goes to stderr, a Markdown table to stdout, every sample to ``--json``.

    python benchmarks/end_to_end.py [--n 5] [--max-new-tokens 128] [--json out.json]

Only plain Python and the library (plus llama-cpp-python, its engine) are used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from citebacktrack import Budgets, Citeformer, Source
from citebacktrack.backends.local import LocalBackend, fixed_prefix_length
from citebacktrack.request import GenerationRequest

DEFAULT_DATA = Path("/work/shared/data/multihop/hotpotqa_dev186.json")
N_CTX = 4096

CITEFORMER, NO_SCORER, RAW_DECODER, RAW_LOOP, NATIVE = (
    "citeformer",
    "citeformer scorer=None",
    "raw (decoder, grammar=None)",
    "raw (runtime loop)",
    "llama-cpp-python",
)


@dataclass(slots=True)
class Sample:
    """One answer."""

    system: str
    backend: str
    prefix_reuse: bool
    question: int
    total_s: float
    prefill_s: float
    prompt_tokens: int
    reused_tokens: int
    """Prompt tokens not evaluated (kept from the cache)."""
    answer_tokens: int
    text: str

    @property
    def decode_s(self) -> float:
        return self.total_s - self.prefill_s


# ---------------------------------------------------------------------------- timing


@contextmanager
def prefill_clock(runtime: Any) -> Iterator[dict[str, float]]:
    """Time ``runtime.prefill`` (shadowed on the instance) and note what it reused."""
    seen: dict[str, float] = {"prefill_s": 0.0, "reused": 0.0, "prompt": 0.0}
    prefill = runtime.prefill

    def timed(prompt: Sequence[int], **kwargs: Any) -> Any:
        start = time.perf_counter()
        logits = prefill(prompt, **kwargs)
        seen["prefill_s"] += time.perf_counter() - start
        stats = getattr(runtime, "last_prefill", None)
        seen["reused"] = float(stats.reused_tokens) if stats is not None else 0.0
        seen["prompt"] = float(len(prompt))
        return logits

    runtime.prefill = timed
    try:
        yield seen
    finally:
        del runtime.prefill


def run_citeformer(
    system: str, name: str, backend: LocalBackend, cf: Citeformer, q: int, item: dict[str, Any]
) -> Sample:
    runtime = backend.runtime  # type: ignore[attr-defined]
    with prefill_clock(runtime) as seen:
        start = time.perf_counter()
        answer = cf.generate(item["question"], item["sources"])
        total = time.perf_counter() - start
    return Sample(
        system=system,
        backend=name,
        prefix_reuse=backend.prefix_cache,
        question=q,
        total_s=total,
        prefill_s=seen["prefill_s"],
        prompt_tokens=answer.usage.prompt_tokens,
        reused_tokens=int(seen["reused"]),
        answer_tokens=answer.usage.completion_tokens,
        text=answer.text,
    )


def run_raw_decoder(name: str, backend: LocalBackend, request: GenerationRequest, q: int) -> Sample:
    runtime = backend.runtime  # type: ignore[attr-defined]
    raw = replace(request, grammar=None, validator=None)
    with prefill_clock(runtime) as seen:
        start = time.perf_counter()
        completion = backend.generate(raw)
        total = time.perf_counter() - start
    return Sample(
        system=RAW_DECODER,
        backend=name,
        prefix_reuse=backend.prefix_cache,
        question=q,
        total_s=total,
        prefill_s=seen["prefill_s"],
        prompt_tokens=completion.usage.prompt_tokens,
        reused_tokens=int(seen["reused"]),
        answer_tokens=completion.usage.completion_tokens,
        text=completion.text,
    )


def run_raw_loop(
    name: str, backend: LocalBackend, request: GenerationRequest, q: int, max_new: int
) -> Sample:
    """Greedy argmax over the runtime, prefix reused exactly as the backend would."""
    runtime = backend.runtime  # type: ignore[attr-defined]
    start = time.perf_counter()
    prompt = runtime.encode_chat(request.messages)
    n = fixed_prefix_length(runtime, request.messages, prompt) if backend.prefix_cache else 0
    t0 = time.perf_counter()
    logits = runtime.prefill(prompt, fixed_prefix=n)
    prefill_s = time.perf_counter() - t0
    stats = runtime.last_prefill
    stop_ids = runtime.vocabulary.stop_ids
    tokens: list[int] = []
    while len(tokens) < max_new:
        token = int(np.argmax(logits))
        if token in stop_ids:
            break
        tokens.append(token)
        logits = runtime.forward([token])
    pieces = runtime.vocabulary.tokens
    text = b"".join(pieces[t] for t in tokens).decode("utf-8", "replace")
    return Sample(
        system=RAW_LOOP,
        backend=name,
        prefix_reuse=backend.prefix_cache,
        question=q,
        total_s=time.perf_counter() - start,
        prefill_s=prefill_s,
        prompt_tokens=len(prompt),
        reused_tokens=stats.reused_tokens if stats is not None else 0,
        answer_tokens=len(tokens),
        text=text,
    )


def run_native(
    llama: Any, request: GenerationRequest, q: int, max_new: int, *, reuse: bool
) -> Sample:
    """``create_chat_completion`` on the same messages; prefill = evals before 1st sample."""
    if not reuse:
        llama.reset()
        llama._ctx.kv_cache_clear()
    evals: list[tuple[float, float]] = []
    samples: list[float] = []
    eval_, sample_ = llama.eval, llama.sample

    def timed_eval(tokens: Sequence[int]) -> None:
        t = time.perf_counter()
        eval_(tokens)
        evals.append((t, time.perf_counter()))

    def timed_sample(*args: Any, **kwargs: Any) -> int:
        samples.append(time.perf_counter())
        return int(sample_(*args, **kwargs))

    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    llama.eval, llama.sample = timed_eval, timed_sample
    try:
        start = time.perf_counter()
        result = llama.create_chat_completion(messages, max_tokens=max_new, temperature=0.0)
        total = time.perf_counter() - start
    finally:
        del llama.eval, llama.sample
    first = samples[0] if samples else float("inf")
    prefill_s = sum(b - a for a, b in evals if b <= first)
    usage = result["usage"]
    return Sample(
        system=NATIVE,
        backend="llama.cpp",
        prefix_reuse=reuse,
        question=q,
        total_s=total,
        prefill_s=prefill_s,
        prompt_tokens=int(usage["prompt_tokens"]),
        reused_tokens=-1,  # Llama.generate does not report it
        answer_tokens=int(usage["completion_tokens"]),
        text=str(result["choices"][0]["message"]["content"]),
    )


# ---------------------------------------------------------------------------- workload


def load_items(path: Path, n: int) -> list[dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [
        {
            "question": item["question"],
            "sources": [Source(title=s["title"], text=s["text"]) for s in item["sources"]],
        }
        for item in data[:n]
    ]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(
    name: str,
    make_backend: Callable[[bool], LocalBackend],
    items: Sequence[dict[str, Any]],
    *,
    max_new: int,
    repeats: int,
    native_llama: Any = None,
    skipped: dict[str, str],
) -> list[Sample]:
    """Every system on one backend kind, prefix reuse on and off, rotated per question."""
    budgets = Budgets(max_new_tokens=max_new)
    backends = {reuse: make_backend(reuse) for reuse in (True, False)}
    runs: dict[tuple[str, bool], Callable[[int], Sample]] = {}
    for reuse, backend in backends.items():
        cf = Citeformer(backend, budgets=budgets)
        cf_plain = Citeformer(backend, scorer=None, budgets=budgets)
        reqs = [cf.build_request(it["question"], it["sources"]) for it in items]

        def citeformer(q: int, b: LocalBackend = backend, c: Citeformer = cf) -> Sample:
            return run_citeformer(CITEFORMER, name, b, c, q, items[q])

        def plain(q: int, b: LocalBackend = backend, c: Citeformer = cf_plain) -> Sample:
            return run_citeformer(NO_SCORER, name, b, c, q, items[q])

        def raw_loop(
            q: int, b: LocalBackend = backend, r: list[GenerationRequest] = reqs
        ) -> Sample:
            return run_raw_loop(name, b, r[q], q, max_new)

        runs[(CITEFORMER, reuse)] = citeformer
        runs[(NO_SCORER, reuse)] = plain
        runs[(RAW_LOOP, reuse)] = raw_loop
        try:
            run_raw_decoder(name, backend, replace(reqs[0], budgets=Budgets(max_new_tokens=2)), 0)
        except Exception as exc:  # the decoder may not support grammar=None yet
            skipped[RAW_DECODER] = f"{type(exc).__name__}: {exc}"[:200]
        else:

            def raw_decoder(
                q: int, b: LocalBackend = backend, r: list[GenerationRequest] = reqs
            ) -> Sample:
                return run_raw_decoder(name, b, r[q], q)

            runs[(RAW_DECODER, reuse)] = raw_decoder
        if native_llama is not None:

            def native(q: int, r: list[GenerationRequest] = reqs, on: bool = reuse) -> Sample:
                return run_native(native_llama, r[q], q, max_new, reuse=on)

            runs[(NATIVE, reuse)] = native
    # Warm-up (untimed): one answer per engine state (grammar compile, first allocations).
    warm = [key for key in runs if key[0] in (CITEFORMER, NATIVE)]
    log(f"{name}: warm-up ({len(warm)} runs)")
    for key in warm:
        runs[key](0)
    samples: list[Sample] = []
    order = list(runs)
    k = 0
    for rep in range(repeats):
        for q in range(len(items)):
            shift = k % len(order)
            k += 1
            for key in order[shift:] + order[:shift]:
                s = runs[key](q)
                samples.append(s)
                log(
                    f"{name} rep {rep + 1} q{q} {key[0]:>28} reuse={'on ' if key[1] else 'off'}: "
                    f"{s.total_s:6.2f} s (prefill {s.prefill_s:5.2f}, {s.prompt_tokens} prompt, "
                    f"{s.reused_tokens} reused, {s.answer_tokens} answer tokens) "
                    f"load {os.getloadavg()[0]:.2f}"
                )
    return samples


# ---------------------------------------------------------------------------- report


SYSTEM_ORDER = (CITEFORMER, NO_SCORER, RAW_DECODER, RAW_LOOP, NATIVE)


def summarize(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, bool], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.backend, s.system, s.prefix_reuse), []).append(s)
    rows = []
    for (backend, system, reuse), group in sorted(
        groups.items(), key=lambda kv: (kv[0][0], SYSTEM_ORDER.index(kv[0][1]), not kv[0][2])
    ):
        total = sum(s.total_s for s in group)
        tokens = sum(s.answer_tokens for s in group)
        rows.append(
            {
                "backend": backend,
                "system": system,
                "prefix_reuse": reuse,
                "answers": len(group),
                "s_per_answer": total / len(group),
                "prefill_s_per_answer": sum(s.prefill_s for s in group) / len(group),
                "decode_s_per_answer": sum(s.decode_s for s in group) / len(group),
                "median_s": statistics.median(s.total_s for s in group),
                "prompt_tokens": sum(s.prompt_tokens for s in group) / len(group),
                "reused_tokens": sum(s.reused_tokens for s in group) / len(group),
                "answer_tokens": tokens / len(group),
                "tok_s_end_to_end": tokens / total if total else 0.0,
                "tok_s_decode": tokens / sum(s.decode_s for s in group)
                if sum(s.decode_s for s in group)
                else 0.0,
            }
        )
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        "| backend | system | prefix reuse | s/answer | prefill s | decode s | prompt tok "
        "| reused tok | answer tok | tok/s end to end | tok/s decode |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        reused = "—" if r["reused_tokens"] < 0 else f"{r['reused_tokens']:.0f}"
        lines.append(
            f"| {r['backend']} | {r['system']} | {'on' if r['prefix_reuse'] else 'off'} "
            f"| {r['s_per_answer']:.2f} | {r['prefill_s_per_answer']:.2f} "
            f"| {r['decode_s_per_answer']:.2f} | {r['prompt_tokens']:.0f} | {reused} "
            f"| {r['answer_tokens']:.1f} | {r['tok_s_end_to_end']:.1f} | {r['tok_s_decode']:.1f} |"
        )
    return "\n".join(lines)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("llama-cpp-python", "torch", "transformers", "xgrammar", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n", type=int, default=5, help="questions (default 5)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--backends", default="llamacpp", help="comma list: llamacpp,hf")
    parser.add_argument("--json", type=Path, help="write every sample and the summary here")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="llama.cpp threads for decode and prefill (default: llama.cpp's choice; 1 is "
        "steadier on a busy 2-core host)",
    )
    args = parser.parse_args(argv)
    items = load_items(args.data, args.n)
    wanted = {b.strip() for b in args.backends.split(",") if b.strip()}
    load_start = os.getloadavg()[0]
    log(f"{len(items)} questions from {args.data}, load average {load_start:.2f}")
    samples: list[Sample] = []
    skipped: dict[str, str] = {}
    extra: dict[str, Any] = {}
    kw = {"max_new": args.max_new_tokens, "repeats": args.repeats, "skipped": skipped}
    if "llamacpp" in wanted:
        import llama_cpp

        from citebacktrack.backends.llamacpp import LlamaCppBackend
        from citebacktrack.backends.llamacpp_runtime import LlamaCppRuntime
        from citebacktrack.models import default_model_path

        threads: dict[str, Any] = {"verbose": False, "n_ctx": N_CTX}
        if args.threads is not None:
            threads.update(n_threads=args.threads, n_threads_batch=args.threads)

        def new_llama() -> Any:
            return llama_cpp.Llama(model_path=str(default_model_path()), **threads)

        native = new_llama()
        extra["llamacpp_threads"] = [native.n_threads, native.n_threads_batch]
        samples += measure(
            "llama.cpp",
            # One Llama per system under test: each keeps its own KV cache.
            lambda reuse: LlamaCppBackend(runtime=LlamaCppRuntime(new_llama()), prefix_cache=reuse),
            items,
            native_llama=native,
            **kw,
        )
    if "hf" in wanted:
        from citebacktrack.backends.hf import HFBackend
        from citebacktrack.backends.hf_runtime import HFRuntime

        shared = HFRuntime.from_gguf()
        samples += measure(
            "hf",
            # Two runtimes over one model: each has its own cache.
            lambda reuse: HFBackend(HFRuntime(shared.model, shared.tokenizer), prefix_cache=reuse),
            items,
            **kw,
        )
    rows = summarize(samples)
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **versions(),
    }
    print(
        f"\n## End to end, prefill included ({len(items)} questions x {args.repeats}, "
        f"greedy, max {args.max_new_tokens} new tokens)\n"
    )
    print(
        f"{machine['date']}, {machine['platform']}, {machine['cpus']} CPUs, load average "
        f"{load_start:.2f} → {machine['load_average_end']:.2f}; "
        + ", ".join(f"{k} {v}" for k, v in versions().items())
        + "\n"
    )
    print(table(rows))
    for system, why in skipped.items():
        print(f"\n- {system}: not measured ({why})")
    if args.json:
        payload = {
            "machine": machine,
            "settings": {
                "data": str(args.data),
                "questions": [it["question"] for it in items],
                "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats,
            },
            "skipped": skipped,
            "summary": rows,
            "samples": [asdict(s) for s in samples],
            **extra,
        }
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
