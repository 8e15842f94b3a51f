"""Decode speed of the local backends: unconstrained vs constrained vs validated, plus a peer.

On the embedded SmolLM2-135M-Instruct (Q4_1 GGUF), with a fixed RAG workload (questions
over the bundled sample documents, top-5 BM25 passages each), for llama.cpp
(``LlamaCppBackend``) and transformers (``HFBackend.from_gguf()``), this times:

* ``unconstrained``: a greedy loop on the backend's own runtime (prefill, then
  ``runtime.forward`` one token at a time, argmax, stop at a stop id or the token limit);
* ``constrained``: the citebacktrack decoder with the citation grammar, no support scorer;
* ``constrained (gbnf)``: llama.cpp only: ``constrained`` with llama.cpp's GBNF sampler as
  the grammar engine instead of XGrammar (``grammar_engine="gbnf"``);
* ``constrained (sampled)``: llama.cpp only: ``constrained`` sampling at temperature 0.8,
  top-p 0.95 (seed = question index) instead of greedy; its non-model time is the
  decoder's sampled overhead on a real model's distributions;
* ``validated``: the default decoder (grammar + ``LexicalSupportScorer``, backtracking);
* ``llama-cpp-python``: ``Llama.create_completion`` greedy, no grammar (reference: the
  engine's own loop), and, when its virtualenv exists, the peer citeformer 0.3.1 on the
  same GGUF, prompt and sources under its REQUIRED policy (run in a subprocess).

Prefill is excluded everywhere: the decode clock starts when the prompt has been
evaluated and stops when the call returns; prefill is reported separately. The main figure
is time per *generated* token (rolled-back tokens included); kept-token throughput is
reported too. A separate instrumented pass breaks the constrained llama.cpp path's time
per token into model and decoder work.

    python benchmarks/local_backends.py [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from citebacktrack import Budgets, Citeformer, Source
from citebacktrack.backends.local import LocalBackend
from citebacktrack.models import default_model_path
from citebacktrack.request import DecodingOptions, GenerationRequest, SamplingConfig
from citebacktrack.retrieval import PassageIndex, load_passages, sample_docs_path
from citebacktrack.support import LexicalSupportScorer

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "_peer_citeformer.py"
DEFAULT_PEER_VENV = HERE / ".peer-venv"
PEER_SETUP = f"""\
  python3 -m venv {DEFAULT_PEER_VENV}
  {DEFAULT_PEER_VENV}/bin/pip install citeformer==0.3.1 llama-cpp-python==0.3.36"""

QUESTIONS = (
    "How tall is the Eiffel Tower and when was it built?",
    "How does photosynthesis work and why does it matter for life on Earth?",
)
"""The workload: each question is answered from its top-5 BM25 passages of the sample docs."""
N_SOURCES = 5
N_CTX = 4096

UNCONSTRAINED, NATIVE, CONSTRAINED, CONSTRAINED_GBNF, SAMPLED, VALIDATED, PEER = (
    "unconstrained",
    "llama-cpp-python",
    "constrained",
    "constrained (gbnf)",
    "constrained (sampled)",
    "validated",
    "citeformer 0.3.1",
)
SAMPLING = SamplingConfig(temperature=0.8, top_p=0.95)
"""The ``constrained (sampled)`` mode's sampling (seeded by question index)."""


@dataclass(slots=True)
class Sample:
    """One decode of one question."""

    prompt_tokens: int
    prefill_s: float
    decode_s: float
    generated: int
    """Tokens sampled, rolled-back ones and a sampled stop token included."""
    kept: int
    forward_passes: int
    """Model forward passes after the prefill."""
    model_s: float
    """Time inside the model's forward passes during the decode."""
    rejections: int = 0
    backtracks: int = 0
    stop: str = ""
    text: str = ""


@dataclass(slots=True)
class Row:
    """One (backend, mode): its samples, one list per repetition (one sample per question)."""

    backend: str
    mode: str
    reps: list[list[Sample]] = field(default_factory=list)

    def totals(self) -> list[dict[str, float]]:
        """Per repetition: the workload's sums."""
        out = []
        for rep in self.reps:
            keys = ("prefill_s", "decode_s", "generated", "kept", "forward_passes", "model_s")
            sums = {k: float(sum(getattr(s, k) for s in rep)) for k in keys}
            sums["rejections"] = sum(s.rejections for s in rep)
            sums["backtracks"] = sum(s.backtracks for s in rep)
            out.append(sums)
        return out

    def summary(self) -> dict[str, float]:
        """Medians over repetitions of the workload figures."""
        per_rep = [
            {
                "generated": t["generated"],
                "kept": t["kept"],
                "forward_passes": t["forward_passes"],
                "rejections": t["rejections"],
                "backtracks": t["backtracks"],
                "decode_s": t["decode_s"],
                "prefill_s": t["prefill_s"],
                "ms_per_token": 1e3 * t["decode_s"] / max(t["generated"], 1),
                "kept_tok_s": t["kept"] / t["decode_s"] if t["decode_s"] else 0.0,
                "model_ms_per_forward": 1e3 * t["model_s"] / max(t["forward_passes"], 1),
                "overhead_ms_per_token": 1e3
                * (t["decode_s"] - t["model_s"])
                / max(t["generated"], 1),
                "forward_per_kept": t["forward_passes"] / max(t["kept"], 1),
            }
            for t in self.totals()
        ]
        summary = {k: statistics.median(r[k] for r in per_rep) for k in per_rep[0]}
        summary["gen_tok_s"] = 1e3 / summary["ms_per_token"] if summary["ms_per_token"] else 0.0
        spread = [r["ms_per_token"] for r in per_rep]
        summary["ms_per_token_min"], summary["ms_per_token_max"] = min(spread), max(spread)
        return summary


# ---------------------------------------------------------------------------- timing hooks


class ForwardClock:
    """Times a runtime's ``prefill`` and ``forward`` by shadowing them on the instance."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.prefill_s = 0.0
        self.prefill_end = 0.0
        self.model_s = 0.0
        self.forwards = 0

    def __enter__(self) -> ForwardClock:
        prefill, forward = self.runtime.prefill, self.runtime.forward

        def timed_prefill(prompt: Sequence[int], **kwargs: Any) -> Any:
            start = time.perf_counter()
            logits = prefill(prompt, **kwargs)  # fixed_prefix=, from a backend's adapter
            self.prefill_end = time.perf_counter()
            self.prefill_s += self.prefill_end - start
            return logits

        def timed_forward(tokens: Sequence[int]) -> Any:
            start = time.perf_counter()
            logits = forward(tokens)
            self.model_s += time.perf_counter() - start
            self.forwards += 1
            return logits

        self.runtime.prefill, self.runtime.forward = timed_prefill, timed_forward
        return self

    def __exit__(self, *exc: object) -> None:
        del self.runtime.prefill, self.runtime.forward


# ---------------------------------------------------------------------------- the modes


def run_unconstrained(runtime: Any, prompt: Sequence[int], max_new: int) -> Sample:
    """The backend's own plain greedy loop on its runtime."""
    stop_ids = runtime.vocabulary.stop_ids
    tokens: list[int] = []
    sampled = 0
    with ForwardClock(runtime) as clock:
        logits = runtime.prefill(prompt)
        while len(tokens) < max_new:
            token = int(np.argmax(logits))
            sampled += 1
            if token in stop_ids:
                break
            tokens.append(token)
            logits = runtime.forward([token])
        end = time.perf_counter()
    pieces = runtime.vocabulary.tokens
    return Sample(
        prompt_tokens=len(prompt),
        prefill_s=clock.prefill_s,
        decode_s=end - clock.prefill_end,
        generated=sampled,
        kept=len(tokens),
        forward_passes=clock.forwards,
        model_s=clock.model_s,
        stop="end" if len(tokens) < max_new else "max_new_tokens",
        text=b"".join(pieces[t] for t in tokens).decode("utf-8", "replace"),
    )


def run_decoder(backend: LocalBackend, runtime: Any, request: GenerationRequest) -> Sample:
    """The citebacktrack decoder through the backend's public ``generate``."""
    with ForwardClock(runtime) as clock:
        completion = backend.generate(request)
        end = time.perf_counter()
    usage, trace = completion.usage, completion.trace
    if clock.forwards != usage.forward_passes - 1:
        raise RuntimeError(f"counted {clock.forwards} forwards, usage says {usage}")
    return Sample(
        prompt_tokens=usage.prompt_tokens,
        prefill_s=clock.prefill_s,
        decode_s=end - clock.prefill_end,
        generated=usage.generated_tokens,
        kept=usage.completion_tokens,
        forward_passes=clock.forwards,
        model_s=clock.model_s,
        rejections=trace.rejections,
        backtracks=trace.backtracks,
        stop=trace.stop_reason.value,
        text=completion.text,
    )


def run_native(llama: Any, prompt: Sequence[int], max_new: int) -> Sample:
    """llama-cpp-python's own completion loop (greedy, no grammar) on the same ``Llama``."""
    evals: list[tuple[float, float]] = []
    samples: list[float] = []
    eval_, sample_ = llama.eval, llama.sample

    def timed_eval(tokens: Sequence[int]) -> None:
        start = time.perf_counter()
        eval_(tokens)
        evals.append((start, time.perf_counter()))

    def timed_sample(*args: Any, **kwargs: Any) -> int:
        samples.append(time.perf_counter())
        return int(sample_(*args, **kwargs))

    llama.eval, llama.sample = timed_eval, timed_sample
    try:
        result = llama.create_completion(list(prompt), max_tokens=max_new, temperature=0.0)
        end = time.perf_counter()
    finally:
        del llama.eval, llama.sample
    first = samples[0]
    decode = [e for e in evals if e[0] >= first]
    usage = result["usage"]
    return Sample(
        prompt_tokens=usage["prompt_tokens"],
        prefill_s=sum(b - a for a, b in evals if b <= first),
        decode_s=end - first,
        generated=len(samples),
        kept=usage["completion_tokens"],
        forward_passes=len(decode),
        model_s=sum(b - a for a, b in decode),
        stop=str(result["choices"][0]["finish_reason"]),
        text=str(result["choices"][0]["text"]),
    )


# ---------------------------------------------------------------------------- workload


@dataclass(frozen=True, slots=True)
class Item:
    question: str
    sources: tuple[Source, ...]


def workload(quick: bool) -> list[Item]:
    index = PassageIndex(load_passages(sample_docs_path()))
    questions = QUESTIONS[:1] if quick else QUESTIONS
    return [Item(q, tuple(index.search(q, k=N_SOURCES))) for q in questions]


def requests(
    backend: LocalBackend, items: Sequence[Item], max_new: int, *, validate: bool
) -> list[GenerationRequest]:
    cf = Citeformer(
        backend,
        scorer=LexicalSupportScorer if validate else None,
        budgets=Budgets(max_new_tokens=max_new),
    )
    return [cf.build_request(item.question, item.sources) for item in items]


def measure_backend(
    name: str,
    backend: LocalBackend,
    runtime: Any,
    items: Sequence[Item],
    *,
    max_new: int,
    repeats: int,
    native: bool,
    peer: PeerRunner | None = None,
) -> list[Row]:
    """Every mode on one backend, round-robin per repetition so drift hits all alike.

    The order rotates by one mode each repetition, so no mode always runs first or
    right after the same neighbour; the peer (own process, own warm-up) is one more mode.
    """
    constrained = requests(backend, items, max_new, validate=False)
    validated = requests(backend, items, max_new, validate=True)
    prompts = [runtime.encode_chat(r.messages) for r in constrained]
    modes: dict[str, Callable[[int], Sample]] = {
        UNCONSTRAINED: lambda i: run_unconstrained(runtime, prompts[i], max_new),
        CONSTRAINED: lambda i: run_decoder(backend, runtime, constrained[i]),
        VALIDATED: lambda i: run_decoder(backend, runtime, validated[i]),
    }
    if native:
        from citebacktrack.backends.llamacpp import LlamaCppBackend

        gbnf = LlamaCppBackend(runtime=runtime, grammar_engine="gbnf")
        modes[CONSTRAINED_GBNF] = lambda i: run_decoder(gbnf, runtime, constrained[i])
        sampled = [
            replace(r, decoding=DecodingOptions(sampling=replace(SAMPLING, seed=i)))
            for i, r in enumerate(constrained)
        ]
        modes[SAMPLED] = lambda i: run_decoder(backend, runtime, sampled[i])
        modes[NATIVE] = lambda i: run_native(runtime.llama, prompts[i], max_new)
    reps: dict[str, Callable[[], list[Sample] | None]] = {
        mode: (lambda run=run: [run(i) for i in range(len(items))]) for mode, run in modes.items()
    }
    if peer is not None:
        reps[PEER] = peer.run
    rows = {mode: Row(name, mode) for mode in reps}
    log(f"{name}: warm-up")
    for warm_up in modes.values():
        warm_up(0)
    order = list(reps)
    for rep in range(repeats):
        for mode in order[rep % len(order) :] + order[: rep % len(order)]:
            samples = reps[mode]()
            if samples is None:  # the peer failed (logged): leave it out from now on
                order.remove(mode)
                del rows[mode]
                continue
            rows[mode].reps.append(samples)
            s = rows[mode].summary()
            log(
                f"{name} rep {rep + 1}/{repeats} {mode:>17}: {s['ms_per_token']:6.2f} ms/token "
                f"({s['generated']:.0f} generated, {s['kept']:.0f} kept) load {load():.2f}"
            )
    return list(rows.values())


# ---------------------------------------------------------------------------- the peer


class PeerRunner:
    """citeformer 0.3.1 in its own virtualenv on the same rendered prompts: each ``run``
    is one repetition over every item, in a fresh process (load and warm-up untimed)."""

    def __init__(
        self,
        python: Path,
        llama: Any,
        items: Sequence[Item],
        prompts: Sequence[Sequence[int]],
        max_new: int,
    ) -> None:
        self.python = python
        self.info: dict[str, Any] = {}
        self.spec = {
            "model_path": str(default_model_path()),
            "n_ctx": N_CTX,
            "max_new_tokens": max_new,
            "repeats": 1,
            "items": [
                {
                    # The exact text citebacktrack prefilled (chat template applied):
                    # citeformer's llama.cpp path applies no template itself.
                    "prompt": llama.detokenize(list(p), special=True).decode("utf-8"),
                    "sources": [{"title": s.title, "text": s.text} for s in item.sources],
                }
                for item, p in zip(items, prompts, strict=True)
            ],
        }

    def run(self) -> list[Sample] | None:
        """One repetition; None (logged, and recorded in ``info``) if the peer fails."""
        done = subprocess.run(
            [str(self.python), str(PEER_SCRIPT)],
            input=json.dumps(self.spec),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            log(f"peer failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
            self.info = {"failed": done.stderr[-2000:]}
            return None
        out = json.loads(done.stdout)
        (rep,) = out.pop("runs")
        self.info = out
        return [
            Sample(
                prompt_tokens=r["prompt_tokens"],
                prefill_s=r["prefill_s"],
                decode_s=r["decode_s"],
                generated=r["samples"],
                kept=r["completion_tokens"],
                forward_passes=r["forward_passes"],
                model_s=r["model_s"],
                text=r["text"],
            )
            for r in rep
        ]


# ---------------------------------------------------------------------------- profile


class Stopwatch:
    """Inclusive time per label, for patched functions (nested labels are not subtracted)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.active: set[str] = set()

    def wrap(self, label: str, fn: Callable[..., Any], skip_inside: str = "") -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if skip_inside and skip_inside in self.active:
                return fn(*args, **kwargs)
            self.active.add(label)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1
                self.active.discard(label)

        return timed


@contextlib.contextmanager
def patched(target: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``target.name`` for the block; restore it (or drop an instance attribute) after."""
    had_own = name in vars(target)
    original = vars(target).get(name)
    setattr(target, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(target, name, original)
        else:
            delattr(target, name)


PROFILE_PARTS = (
    ("runtime.forward", "model forward (runtime.forward: llama.cpp eval + logits copy)"),
    ("  llama.eval", "  of which llama.cpp eval"),
    ("_allowed", "mask: Decoder._allowed"),
    ("  fill_next_token_bitmask", "  xgrammar fill_next_token_bitmask"),
    ("  _filter_markers", "  _filter_markers (validator id rules)"),
    ("  _filter_ramble", "  _filter_ramble (max_uncited_chars)"),
    ("  _filter_dangling", "  _filter_dangling"),
    ("sampling", "sampling: propose (greedy: argmax) + sample_masked (when refused)"),
    ("accept_token", "xgrammar accept_token"),
    ("advance", "tracker advance (per kept token)"),
    ("_judge", "validation (_judge, scorer included)"),
    ("rollback", "rollback (matcher.rollback + runtime.truncate)"),
)


def profile_decoder(
    backend: LocalBackend, runtime: Any, request_list: Sequence[GenerationRequest]
) -> dict[str, Any]:
    """One instrumented pass over the workload: where a constrained token's time goes."""
    import xgrammar as xgr

    from citebacktrack.decoding import _masking
    from citebacktrack.decoding import decoder as decoder_module

    watch = Stopwatch()
    dec = decoder_module.Decoder
    mask = _masking.MarkerMask
    matcher = xgr.GrammarMatcher
    llama = runtime.llama if hasattr(runtime, "llama") else None
    with contextlib.ExitStack() as stack:
        for target, name, label, skip in (
            (dec, "_allowed", "_allowed", ""),
            (mask, "_filter_markers", "  _filter_markers", ""),
            (mask, "_filter_ramble", "  _filter_ramble", ""),
            (mask, "_filter_dangling", "  _filter_dangling", ""),
            (dec, "_judge", "_judge", ""),
            (decoder_module, "propose", "sampling", ""),
            (decoder_module, "sample_masked", "sampling", ""),
            (decoder_module, "advance", "advance", "  _filter_markers"),
            (_masking, "advance", "advance", "  _filter_markers"),
            (matcher, "fill_next_token_bitmask", "  fill_next_token_bitmask", ""),
            (matcher, "accept_token", "accept_token", ""),
            (matcher, "rollback", "rollback", ""),
        ):
            stack.enter_context(
                patched(target, name, watch.wrap(label, getattr(target, name), skip))
            )
        stack.enter_context(patched(runtime, "truncate", watch.wrap("rollback", runtime.truncate)))
        if llama is not None:
            stack.enter_context(patched(llama, "eval", watch.wrap("  llama.eval", llama.eval)))
        samples = []
        for request in request_list:
            with ForwardClock(runtime) as clock:
                completion = backend.generate(request)
                end = time.perf_counter()
            samples.append((clock, end, completion))
    generated = sum(c.usage.generated_tokens for _, _, c in samples)
    decode_s = sum(end - clock.prefill_end for clock, end, _ in samples)
    model_s = sum(clock.model_s for clock, _, _ in samples)
    seconds = dict(watch.seconds)
    seconds["runtime.forward"] = model_s
    if llama is not None:
        # llama.eval also ran the prefills; count only the decode part.
        prefill_eval = sum(clock.prefill_s for clock, _, _ in samples)
        seconds["  llama.eval"] = max(0.0, seconds.get("  llama.eval", 0.0) - prefill_eval)
    per_token = {label: 1e3 * seconds.get(label, 0.0) / generated for label, _ in PROFILE_PARTS}
    accounted = sum(v for k, v in per_token.items() if not k.startswith("  "))
    total = 1e3 * decode_s / generated
    return {
        "generated_tokens": generated,
        "decode_s": decode_s,
        "total_ms_per_token": total,
        "ms_per_token": per_token,
        "other_ms_per_token": total - accounted,
        "decoder_overhead_ms_per_token": total - per_token["runtime.forward"],
        "calls": dict(watch.calls),
    }


# ---------------------------------------------------------------------------- report


def load() -> float:
    return os.getloadavg()[0]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(rows: Sequence[Row]) -> str:
    head = (
        "| backend | mode | generated | kept | fwd/kept | rej | backtr | ms/gen tok (min–max) "
        "| gen tok/s | kept tok/s | model ms/fwd | non-model ms/tok | × uncon. tok/s "
        "| × uncon. kept tok/s | prefill s |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    base = {r.backend: r.summary() for r in rows if r.mode == UNCONSTRAINED}
    for row in rows:
        s, b = row.summary(), base.get(row.backend)
        lines.append(
            f"| {row.backend} | {row.mode} | {s['generated']:.0f} | {s['kept']:.0f} "
            f"| {s['forward_per_kept']:.2f} | {s['rejections']:.0f} | {s['backtracks']:.0f} "
            f"| {s['ms_per_token']:.2f} ({s['ms_per_token_min']:.2f}–{s['ms_per_token_max']:.2f}) "
            f"| {s['gen_tok_s']:.1f} | {s['kept_tok_s']:.1f} | {s['model_ms_per_forward']:.2f} "
            f"| {s['overhead_ms_per_token']:.2f} "
            f"| {ratio(s['gen_tok_s'], b['gen_tok_s']) if b else float('nan'):.2f} "
            f"| {ratio(s['kept_tok_s'], b['kept_tok_s']) if b else float('nan'):.2f} "
            f"| {s['prefill_s']:.2f} |"
        )
    return "\n".join(lines)


def targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    by = {(r.backend, r.mode): r.summary() for r in rows}
    checks = []

    def check(name: str, mine: tuple[str, str], other: tuple[str, str], need: float) -> None:
        if mine not in by or other not in by:
            return
        for figure in ("gen_tok_s", "kept_tok_s"):
            got = ratio(by[mine][figure], by[other][figure])
            checks.append(
                {"target": name, "figure": figure, "need": need, "got": got, "met": got >= need}
            )

    for mode in (CONSTRAINED, VALIDATED):
        check(
            f"llama.cpp {mode} / unconstrained",
            ("llama.cpp", mode),
            ("llama.cpp", UNCONSTRAINED),
            0.9,
        )
        check(f"llama.cpp {mode} / citeformer", ("llama.cpp", mode), ("llama.cpp", PEER), 1.3)
        check(f"hf {mode} / unconstrained", ("hf", mode), ("hf", UNCONSTRAINED), 0.9)
    return checks


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("llama-cpp-python", "torch", "transformers", "xgrammar", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write every sample and summary here")
    parser.add_argument("--quick", action="store_true", help="one question, one repetition")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (default 5)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--backends", default="llamacpp,hf", help="comma list: llamacpp,hf")
    parser.add_argument(
        "--peer-venv",
        type=Path,
        default=Path(os.environ.get("CITEBACKTRACK_PEER_VENV", DEFAULT_PEER_VENV)),
        help="virtualenv with citeformer==0.3.1 (default: $CITEBACKTRACK_PEER_VENV or "
        "benchmarks/.peer-venv)",
    )
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    wanted = {b.strip() for b in args.backends.split(",") if b.strip()}
    items = workload(args.quick)
    load_start = load()
    log(f"workload: {len(items)} question(s), load average {load_start:.2f}")
    rows: list[Row] = []
    extra: dict[str, Any] = {}
    kw = {"max_new": args.max_new_tokens, "repeats": repeats}

    if "llamacpp" in wanted:
        from citebacktrack.backends.llamacpp import LlamaCppBackend

        started = time.perf_counter()
        llama_backend = LlamaCppBackend(n_ctx=N_CTX)
        runtime = llama_backend.runtime
        extra["llamacpp_load_s"] = time.perf_counter() - started
        extra["llamacpp_threads"] = [runtime.llama.n_threads, runtime.llama.n_threads_batch]
        prompts = [
            runtime.encode_chat(r.messages)
            for r in requests(llama_backend, items, args.max_new_tokens, validate=False)
        ]
        peer = None
        python = args.peer_venv / "bin" / "python"
        if args.no_peer:
            extra["peer"] = {"skipped": "--no-peer"}
        elif not python.is_file():
            log(f"peer skipped: no {python}. Create the peer virtualenv with:\n{PEER_SETUP}")
            extra["peer"] = {"skipped": f"no {python}"}
        else:
            peer = PeerRunner(python, runtime.llama, items, prompts, args.max_new_tokens)
        rows += measure_backend(
            "llama.cpp", llama_backend, runtime, items, native=True, peer=peer, **kw
        )
        if peer is not None:
            extra["peer"] = peer.info
        if not args.no_profile:
            log("llama.cpp: instrumented pass (profile)")
            for validate in (False, True):
                reqs = requests(llama_backend, items, args.max_new_tokens, validate=validate)
                key = "profile_" + (VALIDATED if validate else CONSTRAINED)
                extra[key] = profile_decoder(llama_backend, runtime, reqs)
        del llama_backend, runtime

    if "hf" in wanted:
        from citebacktrack.backends.hf import HFBackend

        started = time.perf_counter()
        hf_backend = HFBackend.from_gguf()
        extra["hf_load_s"] = time.perf_counter() - started
        import torch

        extra["torch_threads"] = torch.get_num_threads()
        rows += measure_backend("hf", hf_backend, hf_backend.runtime, items, native=False, **kw)

    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": load(),
        **versions(),
    }
    threads = extra.get("llamacpp_threads")
    print(f"\n## Figures (median of {repeats} repetition(s); decode only, prefill excluded)\n")
    print(
        f"{machine['platform']}, {machine['cpus']} CPUs, load average {load_start:.2f} at "
        f"start, {machine['load_average_end']:.2f} at end; "
        + (f"llama.cpp threads (decode, batch) {threads}; " if threads else "")
        + (f"torch threads {extra['torch_threads']}; " if "torch_threads" in extra else "")
        + ", ".join(f"{k} {v}" for k, v in versions().items())
        + "\n"
    )
    print(table(rows))
    print("\n## Targets\n")
    for c in targets(rows):
        verdict = "met" if c["met"] else "NOT met"
        print(f"- {c['target']} ({c['figure']}): {c['got']:.3f}× (need ≥ {c['need']}×) {verdict}")
    for key in ("profile_" + CONSTRAINED, "profile_" + VALIDATED):
        if key not in extra:
            continue
        prof = extra[key]
        print(f"\n## Where a generated token's time goes: llama.cpp, {key[8:]} (ms/token)\n")
        for label, text in PROFILE_PARTS:
            print(f"- {text}: {prof['ms_per_token'][label]:.3f}")
        other = prof["other_ms_per_token"]
        print(f"- other (one-token checks, masked logits if needed, events): {other:.3f}")
        print(
            f"- total {prof['total_ms_per_token']:.3f} ms/token, of which decoder (non-model) "
            f"{prof['decoder_overhead_ms_per_token']:.3f}"
        )
    if args.json:
        payload = {
            "machine": machine,
            "settings": {"questions": [i.question for i in items], **kw},
            "summary": [{"backend": r.backend, "mode": r.mode, **r.summary()} for r in rows],
            "targets": targets(rows),
            "samples": [
                {
                    "backend": r.backend,
                    "mode": r.mode,
                    "reps": [[asdict(s) for s in rep] for rep in r.reps],
                }
                for r in rows
            ],
            **extra,
        }
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
