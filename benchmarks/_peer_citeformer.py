"""Time citeformer 0.3.1's llama.cpp backend (the peer); run by ``local_backends.py``.

Runs inside the peer's own virtualenv (see ``benchmarks/README.md``), never imports
citebacktrack. Reads a JSON spec on stdin and writes one JSON object on stdout:

    {"model_path": str, "n_ctx": int, "max_new_tokens": int, "repeats": int,
     "items": [{"prompt": str, "sources": [{"title": str, "text": str}, ...]}, ...]}

Model load and prefill are excluded: the clock starts when llama-cpp-python first samples
(the prompt has been evaluated by then) and stops when ``backend.generate`` returns.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def main() -> None:
    spec = json.load(sys.stdin)
    import citeformer
    import llama_cpp
    from citeformer.backends.llamacpp import LlamaCppBackend
    from citeformer.core import Policy, Source

    backend = LlamaCppBackend(spec["model_path"], n_ctx=spec["n_ctx"], n_gpu_layers=0)
    llm = backend.llm
    evals: list[tuple[int, float, float]] = []
    samples: list[float] = []
    results: list[dict[str, Any]] = []
    original_eval, original_sample = llm.eval, llm.sample
    original_completion = llm.create_completion

    def timed_eval(tokens: Any) -> None:
        start = time.perf_counter()
        original_eval(tokens)
        evals.append((len(tokens), start, time.perf_counter()))

    def timed_sample(*args: Any, **kwargs: Any) -> int:
        samples.append(time.perf_counter())
        return int(original_sample(*args, **kwargs))

    def captured_completion(*args: Any, **kwargs: Any) -> Any:
        result = original_completion(*args, **kwargs)
        results.append(result)
        return result

    # Llama.generate calls self.eval/self.sample and Llama.__call__ calls
    # self.create_completion, so instance attributes intercept them.
    llm.eval, llm.sample, llm.create_completion = timed_eval, timed_sample, captured_completion

    def run_once(item: dict[str, Any]) -> dict[str, Any]:
        sources = [
            Source(
                metadata={"id": f"s{i}", "type": "webpage", "title": s["title"]}, content=s["text"]
            )
            for i, s in enumerate(item["sources"], start=1)
        ]
        evals.clear()
        samples.clear()
        results.clear()
        text = backend.generate(
            item["prompt"],
            sources,
            Policy.REQUIRED,
            max_new_tokens=spec["max_new_tokens"],
            temperature=0.0,
        )
        end = time.perf_counter()
        first_sample = samples[0] if samples else end
        prefill = [e for e in evals if e[2] <= first_sample]
        decode = [e for e in evals if e[1] >= first_sample]
        usage = results[-1]["usage"]
        return {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "prefill_tokens": sum(e[0] for e in prefill),
            "prefill_s": sum(e[2] - e[1] for e in prefill),
            "decode_s": end - first_sample,
            "forward_passes": len(decode),
            "model_s": sum(e[2] - e[1] for e in decode),
            "samples": len(samples),
            "text": text,
        }

    for item in spec["items"]:  # warm-up: first full prefill, page-in, grammar parser
        run_once(item)
    runs = [[run_once(item) for item in spec["items"]] for _ in range(int(spec["repeats"]))]
    json.dump(
        {
            "citeformer": getattr(citeformer, "__version__", "0.3.1"),
            "llama_cpp": llama_cpp.__version__,
            "n_threads": llm.n_threads,
            "n_threads_batch": llm.n_threads_batch,
            "runs": runs,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
