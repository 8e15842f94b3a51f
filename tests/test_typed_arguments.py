"""Typed arguments across the public API: a value of the wrong type (or out of range) is a
``ConfigurationError`` naming the argument, showing what was given (its type and value) and
saying what to pass, never a raw ``TypeError``/``AttributeError`` from deep inside; and the
values the API promises to take (names in any case, numpy numbers, ints for floats) work.

Each row of :data:`REFUSED` is (call, argument name, bad value, a hint the message holds).
The engine constructors' rows never load a model or start a process: their arguments are
checked first, and a row that slipped past the checks would meet a model file that does
not exist (``ModelLoadError``) or a missing vLLM, not a model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import numpy as np
import pytest

import citebacktrack.backends as backends
from citebacktrack import (
    Answer,
    Budgets,
    Citation,
    CitationMode,
    Citeformer,
    ConfigurationError,
    FunctionBackend,
    InvalidSourcesError,
    MockBackend,
    Policy,
    Reference,
    RejectionReason,
    SamplingConfig,
    SentenceOrigin,
    Source,
    StopReason,
    Trace,
    render,
)
from citebacktrack.decoding import operators as ops
from citebacktrack.decoding.operators import ProbabilityThreshold
from citebacktrack.grammar import Dialect
from citebacktrack.render import evidence_quotes, renumbered_text
from citebacktrack.request import DecodingOptions, GenerationRequest, SegmentOptions

PARIS = Source(id="paris", title="Paris", text="Paris is the capital of France.")
QUESTION = "What is the capital of France?"
SCRIPT = "Paris is the capital of France [1]."
ANSWER = Answer(
    text=SCRIPT,
    citations=(Citation(start=31, end=34, source_index=1, sentence_start=0, reference_number=1),),
    references=(Reference(number=1, source_index=1, source_id="paris", title="Paris"),),
)


def cf(**kwargs: Any) -> Citeformer:
    return Citeformer(MockBackend([SCRIPT]), **kwargs)


def request() -> GenerationRequest:
    return cf().build_request(QUESTION, [PARIS])


def call(method: str, **kwargs: Any) -> Callable[[Any], object]:
    """``cf.<method>(QUESTION, [PARIS], **kwargs)`` with the bad value as ``kwargs``'s
    ``None`` placeholder (async methods run on an event loop)."""

    def run(bad: Any) -> object:
        given = {name: (bad if value is None else value) for name, value in kwargs.items()}
        citeformer = cf()
        if method in {"generate_many", "agenerate_many"}:
            items = [(QUESTION, [PARIS])]
            if method == "generate_many":
                return citeformer.generate_many(items, **given)
            return anyio.run(lambda: citeformer.agenerate_many(items, **given))
        if method == "agenerate":
            return anyio.run(lambda: citeformer.agenerate(QUESTION, [PARIS], **given))
        result = getattr(citeformer, method)(QUESTION, [PARIS], **given)
        assert citeformer.backend.requests == []  # type: ignore[attr-defined]
        return result

    return run


NO_MODEL = "/nonexistent/never-loaded.gguf"
"""A model path that is never opened: the checks come first, and there is no such file."""
URL = "http://127.0.0.1:9/v1"
CLAUDE = "claude-sonnet-4-6"


def sdk_client(package: str, kind: str) -> Any:
    """A client of the SDK ``package`` (``kind`` names its class); builds no connection."""
    module = pytest.importorskip(package)
    options = (
        {"api_key": "unused"} if package == "anthropic" else {"api_key": "unused", "base_url": URL}
    )
    return getattr(module, kind)(**options)


def serve() -> Any:
    """``citebacktrack.serve`` (the ``serve`` extra)."""
    return pytest.importorskip("citebacktrack.serve")


def rows(label: str, make: Callable[[str, Any], object], cases: list[Any]) -> list[Any]:
    """A row per (argument, bad value, hint) of ``cases``: ``make(argument, bad)``."""
    return [
        pytest.param(lambda v, n=name: make(n, v), name, bad, hint, id=f"{label}-{name}-{bad!r}")
        for name, bad, hint in cases
    ]


PER_CALL = ("generate", "stream", "agenerate", "astream", "build_request", "generate_many")
PER_CALL_ALL = (*PER_CALL, "agenerate_many")

REFUSED: list[Any] = [
    # ---------------------------------------------------------------- Budgets
    *(
        pytest.param(
            lambda v, f=field: Budgets(**{f: v}), field, bad, hint, id=f"Budgets-{field}-{bad!r}"
        )
        for field, bad, hint in [
            ("max_new_tokens", "100", "not a string: max_new_tokens=100"),
            ("max_new_tokens", 1.5, "pass a whole number"),
            ("max_new_tokens", 100.0, "pass an int: max_new_tokens=100"),
            ("max_new_tokens", True, "True and False are not numbers"),
            ("max_new_tokens", None, "max_new_tokens=256"),
            ("max_new_tokens", 0, "max_new_tokens=256"),
            ("retries_per_checkpoint", -1, "retries_per_checkpoint=3"),
            ("retries_per_checkpoint", "3", "not a string"),
            ("sentence_retries", False, "True and False are not numbers"),
            ("max_backtracks", [32], "max_backtracks=32"),
            ("max_rolled_back_tokens", 0.5, "pass a whole number"),
            ("max_wall_time_s", "5", "not a string: max_wall_time_s=5.0"),
            ("max_wall_time_s", True, "True and False are not numbers"),
            ("max_wall_time_s", 0, "max_wall_time_s=30"),
            ("max_wall_time_s", math.nan, "max_wall_time_s=30"),
        ]
    ),
    # ---------------------------------------------------------------- SamplingConfig
    *(
        pytest.param(
            lambda v, f=field: SamplingConfig(**{f: v}),
            field,
            bad,
            hint,
            id=f"Sampling-{field}-{bad!r}",
        )
        for field, bad, hint in [
            ("temperature", "0.7", "not a string: temperature=0.7"),
            ("temperature", True, "True and False are not numbers"),
            ("temperature", -0.1, "temperature=0.7"),
            ("temperature", math.nan, "temperature=0.7"),
            ("top_k", 1.5, "pass a whole number"),
            ("top_k", "40", "not a string: top_k=40"),
            ("top_k", -1, "top_k=40"),
            ("top_p", 0, "top_p=0.9"),
            ("top_p", 1.5, "top_p=0.9"),
            ("top_p", "0.9", "not a string"),
            ("seed", "1", "not a string: seed=1"),
            ("seed", 1.5, "pass a whole number"),
            ("seed", None, "seed=0"),
        ]
    ),
    # ---------------------------------------------------------------- Policy (pydantic)
    *(
        pytest.param(
            lambda v, f=field: Policy(**{f: v}), field, bad, hint, id=f"Policy-{field}-{bad!r}"
        )
        for field, bad, hint in [
            ("mode", "sometimes", "mode is one of 'required', 'auto', 'quotes_only' (any case)"),
            ("mode", 3, "mode is one of"),
            ("mode", None, "mode is one of"),
            ("max_citations_per_sentence", True, "True and False are not numbers"),
            ("max_citations_per_sentence", "3", "not a string: max_citations_per_sentence=3"),
            ("max_citations_per_sentence", 2.5, "pass a whole number"),
            ("max_citations_per_sentence", 0, "max_citations_per_sentence an int 1..10"),
            ("max_uncited_chars", "300", "not a string: max_uncited_chars=300"),
            ("max_uncited_chars", 10, "max_uncited_chars an int 20..2000"),
            ("fallback", "guess", "fallback 'copy', 'quote' or 'abstain'"),
            ("fallback", 1, "fallback 'copy', 'quote' or 'abstain'"),
        ]
    ),
    # ---------------------------------------------------------------- Source (pydantic)
    *(
        pytest.param(
            lambda v, f=field: Source(**{"text": "Paris.", f: v}),
            field,
            bad,
            hint,
            id=f"Source-{field}-{bad!r}",
        )
        for field, bad, hint in [
            ("text", 3, "pass Source(text=str)"),
            ("id", 3, "id (a non-empty str)"),
            ("title", None, "title (str)"),
            ("score", "0.5", "not a string: score=0.5"),
            ("score", True, "True and False are not numbers"),
            ("metadata", [1], "metadata (a dict of JSON values"),
        ]
    ),
    # ---------------------------------------------------------------- the enums
    *(
        pytest.param(enum, enum.__name__, bad, "any case", id=f"{enum.__name__}-{bad!r}")
        for enum in (CitationMode, StopReason, SentenceOrigin, RejectionReason, Dialect)
        for bad in ("sometimes", 3)
    ),
    # ---------------------------------------------------------------- Citeformer(...)
    pytest.param(
        Citeformer, "backend", "llamacpp", "LlamaCppBackend()", id="Citeformer-backend-str"
    ),
    pytest.param(
        Citeformer, "backend", 42, "or None for the embedded model", id="Citeformer-backend-int"
    ),
    pytest.param(
        lambda v: Citeformer(MockBackend, policy=None),
        "backend",
        MockBackend,
        "MockBackend([...])",
        id="Citeformer-backend-class",
    ),
    *(
        pytest.param(
            lambda v, n=name: cf(**{n: v}), name, bad, hint, id=f"Citeformer-{name}-{bad!r}"
        )
        for name, bad, hint in [
            ("policy", "required", "Policy(mode='required')"),
            ("policy", " AUTO ", "Policy(mode='auto')"),
            ("policy", CitationMode.AUTO, "Policy(mode='auto')"),
            ("policy", {"mode": "auto"}, "Policy(**your_dict)"),
            ("budgets", {"max_new_tokens": 100}, "Budgets(**your_dict)"),
            ("budgets", {}, "Budgets(max_new_tokens=128)"),
            ("budgets", 100, "Budgets(max_new_tokens=128)"),
            ("sampling", {"temperature": 0.7}, "SamplingConfig(**your_dict)"),
            ("sampling", 0.7, "SamplingConfig(temperature=0.7)"),
            ("scorer", 0.5, "LexicalSupportScorer"),
            ("scorer", "lexical", "a function from the sources to a SupportScorer"),
            ("operators", 3, "pass a list of operators"),
            ("operators", ProbabilityThreshold(), "pass a list of operators"),
            ("operators", "entropy", "pass a list of operators"),
            ("operators", None, "or () for none"),
            ("demo", "Q: ... A: ...", "Demo(question=..., sources=(...), answer=...)"),
        ]
    ),
    # ---------------------------------------------------------------- per-call keywords
    *(
        pytest.param(call(method, **{name: None}), name, bad, hint, id=f"{method}-{name}-{bad!r}")
        for method in PER_CALL_ALL
        for name, bad, hint in [
            ("policy", "auto", "Policy(mode='auto')"),
            ("policy", Budgets(), "or None for the default"),
            ("budgets", {}, "Budgets(**your_dict)"),
            ("budgets", 64, "Budgets(max_new_tokens=128)"),
            ("sampling", {"seed": 1}, "SamplingConfig(**your_dict)"),
            ("sampling", False, "or None for the default (greedy)"),
        ]
    ),
    *(
        pytest.param(
            lambda v: anyio.run(lambda: cf().agenerate_many([(QUESTION, [PARIS])], concurrency=v)),
            "concurrency",
            bad,
            hint,
            id=f"agenerate_many-concurrency-{bad!r}",
        )
        for bad, hint in [
            ("8", "not a string: concurrency=8"),
            (0, "concurrency=8"),
            (True, "not numbers"),
        ]
    ),
    pytest.param(
        lambda v: cf().generate_many(v), "items", "What?", "(question, [Source", id="many-str"
    ),
    pytest.param(
        lambda v: cf().generate_many([v]),
        "items[0]",
        QUESTION,
        "(question, [Source",
        id="many-item",
    ),
    pytest.param(
        lambda v: cf().generate_many([v]),
        "items[0]",
        (QUESTION,),
        "(question, [Source",
        id="many-1",
    ),
    # ---------------------------------------------------------------- render
    pytest.param(render, "answer", "text", "pass the Answer", id="render-answer-str"),
    pytest.param(render, "answer", {"text": SCRIPT}, "pass the Answer", id="render-answer-dict"),
    pytest.param(
        lambda v: render(ANSWER, v),
        "style",
        "html",
        "'markdown', 'text', 'json'",
        id="render-style",
    ),
    pytest.param(lambda v: render(ANSWER, v), "style", 1, "any case", id="render-style-int"),
    pytest.param(
        lambda v: render(ANSWER, renumber=v),
        "renumber",
        "no",
        "renumber=False",
        id="render-renumber",
    ),
    pytest.param(
        lambda v: render(ANSWER, quotes=v), "quotes", 1, "quotes=True", id="render-quotes"
    ),
    pytest.param(renumbered_text, "answer", "text", "pass the Answer", id="renumbered_text"),
    pytest.param(
        lambda v: evidence_quotes(v, 1), "answer", None, "pass the Answer", id="evidence-answer"
    ),
    pytest.param(
        lambda v: evidence_quotes(ANSWER, v),
        "source_index",
        "1",
        "source_index=1",
        id="evidence-index",
    ),
    # ---------------------------------------------------------------- the scripted backends
    pytest.param(MockBackend, "responses", "one answer", "MockBackend(['", id="Mock-str"),
    pytest.param(MockBackend, "responses", 3, "MockBackend(['", id="Mock-int"),
    pytest.param(
        lambda v: MockBackend(["a [1].", v]), "responses[1]", 2, "MockBackend(['", id="Mock-item"
    ),
    pytest.param(
        lambda v: cf(operators=[ProbabilityThreshold(), v]),
        "operators[1]",
        "entropy",
        "ProbabilityThreshold",
        id="Citeformer-operators-item",
    ),
    pytest.param(FunctionBackend, "fn", "a [1].", "lambda request:", id="Function-fn"),
    pytest.param(
        lambda v: FunctionBackend(lambda r: SCRIPT, vocabulary=v),
        "vocabulary",
        ["a", "b"],
        "toy_vocabulary",
        id="Function-vocabulary",
    ),
    # ---------------------------------------------------------------- hand-built requests
    *(
        pytest.param(
            lambda v, n=name: GenerationRequest(**{**_fields(request()), n: v}),
            name,
            bad,
            hint,
            id=f"GenerationRequest-{name}",
        )
        for name, bad, hint in [
            ("policy", "auto", "pass Policy(...)"),
            ("budgets", {"max_new_tokens": 5}, "Budgets(**your_dict)"),
            ("decoding", None, "pass DecodingOptions(...)"),
            ("segments", SamplingConfig(), "pass SegmentOptions(...)"),
            ("question", 42, "or None"),
        ]
    ),
    pytest.param(
        lambda v: DecodingOptions(sampling=v),
        "sampling",
        {},
        "SamplingConfig(",
        id="Decoding-sampling",
    ),
    pytest.param(
        lambda v: DecodingOptions(operators=v),
        "operators",
        1,
        "list of operators",
        id="Decoding-ops",
    ),
    *(
        pytest.param(
            lambda v, f=field: SegmentOptions(**{f: v}),
            field,
            bad,
            hint,
            id=f"Segment-{field}-{bad!r}",
        )
        for field, bad, hint in [
            ("temperature", "0", "not a string"),
            ("top_p", 2, "top_p=0.9"),
            ("seed", 1.5, "pass a whole number"),
            ("max_segment_tokens", True, "not numbers"),
            ("resample_temperature", -1, "resample_temperature=0.7"),
        ]
    ),
    # ---------------------------------------------------------------- LlamaCppBackend
    *rows(
        "LlamaCpp",
        lambda n, v: backends.LlamaCppBackend(**{"model_path": NO_MODEL, n: v}),
        [
            ("model_path", 123, "pass the path of a .gguf file"),
            ("model_path", b"model.gguf", "or None for the embedded model"),
            ("runtime", "model.gguf", "LlamaCppRuntime.from_path(...)"),
            ("n_ctx", "2048", "not a string: n_ctx=2048"),
            ("n_ctx", 2048.5, "pass a whole number"),
            ("n_ctx", 2048.0, "pass an int: n_ctx=2048"),
            ("n_ctx", True, "True and False are not numbers"),
            ("n_ctx", -1, "n_ctx=4096"),
            ("n_threads", 0, "n_threads=4"),
            ("n_threads", "4", "not a string: n_threads=4"),
            ("grammar_engine", "lark", "one of 'xgrammar', 'gbnf'"),
            ("grammar_engine", None, "any case is accepted"),
            ("prefix_cache", "yes", "prefix_cache=True or prefix_cache=False"),
            ("prefix_cache", 1, "prefix_cache=True"),
        ],
    ),
    # ---------------------------------------------------------------- HFBackend
    *rows(
        "HF",
        lambda n, v: backends.HFBackend(**{n: v}),
        [
            ("runtime", "HuggingFaceTB/SmolLM2-135M", "from_pretrained(name_or_path)"),
            ("runtime", None, "HFRuntime(model, tokenizer)"),
        ],
    ),
    *rows(
        "HF.from_gguf",
        lambda n, v: backends.HFBackend.from_gguf(**{"path": NO_MODEL, n: v}),
        [("path", 123, "pass the path of a .gguf file"), ("prefix_cache", "no", "prefix_cache=")],
    ),
    *rows(
        "HF.from_pretrained",
        lambda n, v: backends.HFBackend.from_pretrained(**{"name_or_path": "/nonexistent", n: v}),
        [
            ("name_or_path", 42, "a local model folder"),
            ("gguf_file", 3, "the GGUF file's name"),
            ("prefix_cache", None, "prefix_cache=True"),
        ],
    ),
    *rows(
        "HF.from_model",
        lambda n, v: backends.HFBackend.from_model(
            **{"model": object(), "tokenizer": object(), n: v}
        ),
        [
            ("model", "HuggingFaceTB/SmolLM2-135M", "HFBackend.from_pretrained(name_or_path)"),
            ("tokenizer", None, "a loaded transformers tokenizer"),
        ],
    ),
    # ---------------------------------------------------------------- OpenAIBackend and engines
    *rows(
        "OpenAI",
        lambda n, v: backends.OpenAIBackend(**{"model": "m", n: v}),
        [
            ("mode", "assistants", "'server', 'json_schema', 'cfg'"),
            ("mode", None, "any case is accepted"),
            ("model", None, "model='smollm2'"),
            ("model", "", "a non-empty str"),
            ("model", 42, "model='smollm2'"),
            ("server", "tgi", "'llama.cpp', 'vllm'"),
            ("endpoint", "responses", "'completions', 'chat'"),
            ("grammar_dialect", "yacc", "'ebnf', 'gbnf', 'lark'"),
            ("assistant_prefill", "yes", "assistant_prefill=True"),
            ("chat_template", "chatml", "(messages, prefix) -> prompt"),
            ("timeout", "60", "not a string: timeout=60.0"),
            ("timeout", 0, "timeout=60"),
            ("timeout", -1.5, "timeout=60"),
            ("timeout", True, "True and False are not numbers"),
            ("timeout", math.nan, "timeout=60"),
            ("max_retries", 2.5, "pass a whole number"),
            ("max_retries", "2", "not a string: max_retries=2"),
            ("max_retries", -1, "max_retries=2"),
            ("extra", [("top_k", 1)], "extra={'top_k': 1}"),
            ("extra", {1: "x"}, "a dict with str keys"),
            ("api", "chat", "hosted engines (mode='cfg' or 'json_schema') only"),
            ("send_sampling", False, "hosted engines"),
            ("engine", 42, "complete()/acomplete()"),
        ],
    ),
    *rows(
        "OpenAI-cfg",
        lambda n, v: backends.OpenAIBackend(**{"mode": "cfg", "model": "g", n: v}),
        [
            ("api", "completions", "'responses', 'chat'"),
            ("send_sampling", "no", "send_sampling=True"),
            ("server", "vllm", "the server engine (mode='server') only"),
            ("grammar_dialect", Dialect.LARK, "the server engine"),
            ("timeout", "60", "not a string"),
        ],
    ),
    *rows(
        "OpenAI.from_base_url",
        lambda n, v: backends.OpenAIBackend.from_base_url(**{"base_url": URL, "model": "m", n: v}),
        [
            ("base_url", 8080, "base_url='http://127.0.0.1:8080/v1'"),
            ("base_url", "localhost:8080/v1", "base_url='http://127.0.0.1:8080/v1'"),
            ("base_url", "", "pass the server's URL"),
            ("model", None, "model="),
            ("api_key", 123, "pass the key as a str"),
            ("server", "TGI", "'llama.cpp', 'vllm'"),
            ("timeout", "60", "not a string: timeout=60.0"),
            ("max_retries", True, "True and False are not numbers"),
            ("extra", "top_k=1", "a dict"),
        ],
    ),
    *rows(
        "OpenAI.from_env",
        lambda n, v: backends.OpenAIBackend.from_env(**{"model": "g", n: v}),
        [
            ("mode", "server", "from_base_url()"),
            ("mode", "responses", "one of 'cfg', 'json_schema'"),
            ("model", 5, "model='gpt-5'"),
            ("api", "assistants", "'responses', 'chat'"),
            ("timeout", "30", "not a string: timeout=30.0"),
            ("send_sampling", 0, "send_sampling=True"),
        ],
    ),
    *(
        pytest.param(
            lambda v, n=name, e=engine: getattr(backends.openai, e)(**{"model": "m", n: v}),
            name,
            bad,
            hint,
            id=f"{engine}-{name}-{bad!r}",
        )
        for engine, name, bad, hint in [
            ("OpenAICompatibleEngine", "server", "tgi", "any case"),
            ("OpenAICompatibleEngine", "timeout", 0, "timeout=60"),
            ("OpenAIGrammarToolEngine", "api", "completions", "'responses', 'chat'"),
            ("OpenAIJsonSchemaEngine", "max_retries", -1, "max_retries=2"),
            ("OpenAIJsonSchemaEngine", "model", None, "model='gpt-5'"),
        ]
    ),
    # ---------------------------------------------------------------- AnthropicBackend
    *rows(
        "Anthropic",
        lambda n, v: (
            pytest.importorskip("anthropic"),
            backends.AnthropicBackend(**{"model": CLAUDE, n: v}),
        ),
        [
            ("model", None, "model='claude-sonnet-4-6'"),
            ("model", "  ", "a non-empty str"),
            ("stream", "no", "stream=True or stream=False"),
            ("system", 3, "pass the system prompt, or None"),
            ("send_sampling", 1, "send_sampling=True"),
            ("timeout", "60", "not a string: timeout=60.0"),
            ("timeout", 0, "timeout=60"),
            ("max_retries", 1.5, "pass a whole number"),
            ("extra", [1], "extra={'top_k': 1}"),
            ("engine", 42, "pass AnthropicEngine(...)"),
        ],
    ),
    *rows(
        "Anthropic.from_env",
        lambda n, v: (
            pytest.importorskip("anthropic"),
            backends.AnthropicBackend.from_env(**{"model": CLAUDE, n: v}),
        ),
        [
            ("base_url", "api.anthropic.com", "base_url='https://api.anthropic.com'"),
            ("base_url", 443, "pass the server's URL as a str"),
            ("max_retries", "2", "not a string"),
        ],
    ),
    # ---------------------------------------------------------------- VLLMBackend (no vllm)
    *rows(
        "VLLM",
        lambda n, v: backends.VLLMBackend(**{"model": "m", n: v}),
        [
            ("model", 123, "model='Qwen/Qwen3-0.6B'"),
            ("dialect", "yacc", "'ebnf', 'gbnf', 'lark'"),
            ("engine_args", [("tensor_parallel_size", 2)], "engine_args={'tensor_parallel_size'"),
        ],
    ),
    *rows(
        "VLLM-engine",
        lambda n, v: backends.VLLMBackend(**{n: v}),
        [
            ("llm", "Qwen/Qwen3-0.6B", "pass model=..."),
            ("async_engine", "Qwen/Qwen3-0.6B", "from_async_model"),
            ("dialect", 3, "any case is accepted"),
        ],
    ),
    *rows(
        "VLLM.from_async_model",
        lambda n, v: backends.VLLMBackend.from_async_model(**{"model": "m", n: v}),
        [("model", None, "model='Qwen/Qwen3-0.6B'"), ("engine_args", "tp=2", "a dict")],
    ),
    # ---------------------------------------------------------------- LlamaCppServer
    *rows(
        "LlamaCppServer",
        lambda n, v: backends.LlamaCppServer(**{"model": NO_MODEL, n: v}),
        [
            ("model", 123, "pass the path of a .gguf file"),
            ("n_ctx", "4096", "not a string: n_ctx=4096"),
            ("n_ctx", -1, "n_ctx=4096"),
            ("n_threads", 0, "n_threads=4"),
            ("port", -1, "port=8080"),
            ("port", 70000, "port=8080"),
            ("port", "8080", "not a string: port=8080"),
            ("startup_timeout", 0, "startup_timeout=180"),
            ("startup_timeout", "60", "not a string"),
            ("extra_args", "--verbose true", "pass a list of command-line arguments"),
        ],
    ),
    pytest.param(
        lambda v: backends.LlamaCppServer(NO_MODEL, extra_args=["--n_gpu_layers", v]),
        "extra_args[1]",
        0,
        "pass a list of command-line arguments",
        id="LlamaCppServer-extra_args-item",
    ),
    # ---------------------------------------------------------------- decoding operators
    *(
        pytest.param(
            lambda v, c=cls, n=name: c(**{n: v}),
            name,
            bad,
            hint,
            id=f"{cls.__name__}-{name}-{bad!r}",
        )
        for cls, name, bad, hint in [
            (ops.ProbabilityThreshold, "threshold", "0.1", "not a string: threshold=0.1"),
            (ops.ProbabilityThreshold, "threshold", 1, "threshold=0.05"),
            (ops.ProbabilityThreshold, "threshold", 0.0, "threshold=0.05"),
            (ops.ProbabilityThreshold, "threshold", True, "True and False are not numbers"),
            (ops.ProbabilityThreshold, "backtrack_count", 0, "backtrack_count=1"),
            (ops.ProbabilityThreshold, "backtrack_count", 1.5, "pass a whole number"),
            (ops.ProbabilityThreshold, "backtrack_count", "2", "not a string: backtrack_count=2"),
            (ops.EntropyThreshold, "threshold", "3", "not a string: threshold=3.0"),
            (ops.EntropyThreshold, "threshold", -1, "threshold=3"),
            (ops.ProbabilityMargin, "margin", None, "margin=0.05"),
            (ops.ProbabilityDrop, "max_drop", 1, "max_drop=0.8"),
            (ops.ProbabilityTrend, "window", 0, "window=8"),
            (ops.ProbabilityTrend, "ratio", "0.25", "not a string: ratio=0.25"),
            (ops.Repetition, "max_repetitions", 2.0, "pass an int: max_repetitions=2"),
            (ops.NGramOverlap, "ngram_size", 1, "ngram_size=4"),
            (ops.NGramOverlap, "ngram_size", "4", "not a string: ngram_size=4"),
            (ops.LogitThreshold, "threshold", math.inf, "threshold=-5"),
            (ops.LogitThreshold, "threshold", "-5", "not a string: threshold=-5.0"),
        ]
    ),
    # ---------------------------------------------------------------- citebacktrack.serve
    *rows(
        "Limits",
        lambda n, v: serve().Limits(**{n: v}),
        [
            ("max_concurrent", "1", "not a string: max_concurrent=1"),
            ("max_concurrent", 0, "max_concurrent=1"),
            ("max_queue", -1, "max_queue=32"),
            ("max_queue", True, "True and False are not numbers"),
            ("max_queue", 1.5, "pass a whole number"),
            ("max_body_bytes", "1MB", "pass a number, e.g. max_body_bytes=1048576"),
            ("max_sources", None, "max_sources=50"),
            ("max_source_chars", 2e4, "pass an int: max_source_chars=20000"),
            ("max_question_chars", 0, "max_question_chars=2000"),
            ("max_new_tokens", False, "True and False are not numbers"),
        ],
    ),
    *rows(
        "create_app",
        lambda n, v: serve().create_app(**{"cf": cf(), n: v}),
        [
            ("cf", MockBackend([SCRIPT]), "pass Citeformer(backend)"),
            ("cf", None, "create_app(Citeformer())"),
            ("documents", 3, "a folder of .txt/.md documents"),
            ("limits", {"max_queue": 1}, "Limits(**your_dict)"),
            ("limits", 8, "Limits(max_queue=8)"),
            ("backend_name", 3, "backend_name='llamacpp'"),
            ("backend_name", "", "a non-empty str"),
        ],
    ),
]


def _fields(built: GenerationRequest) -> dict[str, Any]:
    return {name: getattr(built, name) for name in built.__dataclass_fields__}


def invoke(make: Callable[[Any], object], bad: Any) -> None:
    """``make(bad)``; a stream's error must come before its first event, not at it."""
    result = make(bad)
    if isinstance(result, Iterator):
        next(result)


@pytest.mark.parametrize(("make", "name", "bad", "hint"), REFUSED)
def test_a_wrong_argument_is_a_configuration_error_naming_it(
    make: Callable[[Any], object], name: str, bad: Any, hint: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        invoke(make, bad)
    message = str(info.value)
    assert name in message
    assert hint in message
    assert type(bad).__name__ in message or bad is None  # what was given: its type ...
    assert repr(bad)[:20] in message  # ... and its value
    assert not isinstance(info.value, TypeError | AttributeError)


def test_the_cases_of_issue_22_are_each_refused_up_front() -> None:
    """The reproductions of the issue, one by one."""
    backend = MockBackend([SCRIPT])
    for make, error in [
        (lambda: Budgets(max_new_tokens="100"), ConfigurationError),  # was TypeError
        (lambda: Budgets(max_new_tokens=1.5), ConfigurationError),  # was accepted
        (lambda: Citeformer(backend, budgets={"max_new_tokens": 5}), ConfigurationError),
        (lambda: Citeformer("llamacpp"), ConfigurationError),  # was AttributeError on .stream
        (lambda: Citeformer(backend, policy="required"), ConfigurationError),  # at generate
        (lambda: Citeformer(backend, scorer=0.5), ConfigurationError),  # was "not callable"
        (lambda: render("text"), ConfigurationError),  # was AttributeError
        (lambda: Budgets(max_new_tokens=True), ConfigurationError),  # a bool is not an int
        (lambda: Source(text="Paris.", score="high"), InvalidSourcesError),
    ]:
        with pytest.raises(error):
            make()
    assert backend.requests == []


# ------------------------------------------------------------------ what is still taken


@pytest.mark.parametrize(
    ("given", "mode"),
    [
        ("AUTO", CitationMode.AUTO),
        (" required ", CitationMode.REQUIRED),
        ("Quotes_Only", CitationMode.QUOTES_ONLY),
        ("\tauto\n", CitationMode.AUTO),
        (CitationMode.AUTO, CitationMode.AUTO),
    ],
)
def test_a_mode_is_matched_ignoring_case_and_surrounding_space(
    given: Any, mode: CitationMode
) -> None:
    assert Policy(mode=given).mode is mode
    assert CitationMode(given) is mode


def test_every_public_enum_and_choice_ignores_case() -> None:
    assert StopReason("END") is StopReason.END
    assert StopReason(" Max_New_Tokens ") is StopReason.MAX_NEW_TOKENS
    assert SentenceOrigin("Copy") is SentenceOrigin.COPY
    assert RejectionReason("UNSUPPORTED") is RejectionReason.UNSUPPORTED
    assert Policy(fallback=" QUOTE ").fallback == "quote"
    assert render(ANSWER, "MARKDOWN") == render(ANSWER, "markdown")
    assert render(ANSWER, " Json ") == render(ANSWER, "json")
    # Names are not guessed beyond case and surrounding space.
    with pytest.raises(ConfigurationError, match="quotes_only"):
        CitationMode("quotes-only")


def test_numbers_of_other_numeric_types_are_taken_and_stored_as_python_numbers() -> None:
    budgets = Budgets(max_new_tokens=np.int64(64), max_wall_time_s=5)
    assert budgets.max_new_tokens == 64
    assert type(budgets.max_new_tokens) is int
    assert budgets.max_wall_time_s == 5.0
    assert type(budgets.max_wall_time_s) is float
    sampling = SamplingConfig(temperature=1, top_p=np.float32(0.5), top_k=np.int32(5))
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (1.0, 0.5, 5)
    assert type(sampling.temperature) is float
    assert type(sampling.top_k) is int
    assert Policy(max_citations_per_sentence=np.int64(2)).max_citations_per_sentence == 2
    assert Source(text="Paris.", score=np.float32(0.25)).score == 0.25  # FAISS gives float32
    assert Source(text="Paris.", score=1).score == 1.0
    assert Budgets(max_wall_time_s=None).max_wall_time_s is None


def test_good_arguments_still_work_everywhere() -> None:
    backend = MockBackend([SCRIPT] * 4)
    citeformer = Citeformer(
        backend,
        policy=Policy(mode="Auto"),
        budgets=Budgets(max_new_tokens=64),
        sampling=SamplingConfig(seed=1),
        operators=(op for op in [ProbabilityThreshold(0.01)]),  # any iterable of operators
        demo=None,
        scorer=None,
    )
    assert citeformer.operators == (ProbabilityThreshold(0.01),)
    assert citeformer.generate(QUESTION, [PARIS]).text == SCRIPT
    # None keeps the Citeformer's own; an override applies to that call only.
    answer = citeformer.generate(
        QUESTION, [PARIS], policy=None, budgets=Budgets(max_new_tokens=32), sampling=None
    )
    assert answer.text == SCRIPT
    assert backend.requests[1].budgets.max_new_tokens == 32
    assert backend.requests[1].policy.mode is CitationMode.AUTO
    many = anyio.run(
        lambda: citeformer.agenerate_many([(QUESTION, [PARIS])], concurrency=np.int64(2))
    )
    assert [a.text for a in many] == [SCRIPT]
    assert citeformer.generate_many([[QUESTION, [PARIS]]])[0].text == SCRIPT  # a list pair too
    assert render(answer, "text", renumber=False, quotes=False).startswith(SCRIPT)


def test_an_answer_read_back_from_json_keeps_its_enums() -> None:
    """The case-insensitive enums change nothing for values written by the library."""
    answer = ANSWER.model_copy(update={"trace": Trace(stop_reason=StopReason.MAX_NEW_TOKENS)})
    again = Answer.model_validate_json(json.dumps(answer.model_dump(mode="json")))
    assert again == answer
    assert again.stop_reason is StopReason.MAX_NEW_TOKENS


# ------------------------------------------------------------------ the engine constructors


@pytest.mark.parametrize(
    ("make", "name", "given", "hint"),
    [
        ("openai", "client", "AsyncOpenAI", "pass it as async_client="),
        ("openai", "async_client", "OpenAI", "pass it as client="),
        ("anthropic", "client", "AsyncAnthropic", "pass it as async_client="),
        ("anthropic", "async_client", "Anthropic", "pass it as client="),
    ],
)
def test_a_client_of_the_other_kind_is_refused_by_name(
    make: str, name: str, given: str, hint: str
) -> None:
    client = sdk_client(make, given)
    backend = backends.OpenAIBackend if make == "openai" else backends.AnthropicBackend
    with pytest.raises(ConfigurationError) as info:
        backend(model="m", **{name: client})
    assert f"{name} must be" in str(info.value)
    assert given in str(info.value)
    assert hint in str(info.value)


KEY = "sk-ant-api03-0123456789abcdef"


@pytest.mark.parametrize(
    "make",
    [
        lambda: backends.AnthropicBackend(KEY),  # the key passed as the engine
        lambda: backends.AnthropicBackend(client=KEY, model=CLAUDE),
        lambda: backends.OpenAIBackend(KEY),
        lambda: backends.OpenAIBackend(async_client=KEY, model="m"),
        lambda: backends.OpenAIBackend.from_base_url(URL, model="m", api_key=KEY.encode()),
    ],
)
def test_a_string_where_a_client_or_key_goes_is_refused_without_showing_it(
    make: Callable[[], object],
) -> None:
    pytest.importorskip("anthropic")
    with pytest.raises(ConfigurationError, match="not shown: it may be a key") as info:
        make()
    assert KEY not in str(info.value)
    assert "0123456789" not in str(info.value)


def test_a_url_is_shown_without_its_credentials() -> None:
    with pytest.raises(ConfigurationError, match="http:// or https://") as info:
        backends.OpenAIBackend.from_base_url("ftp://user:hunter2@host/v1", model="m")
    assert "hunter2" not in str(info.value)


def test_engine_arguments_that_are_still_taken() -> None:
    """Names in any case, numpy numbers, ints for floats: what worked keeps working."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=URL, api_key="unused")
    engine = backends.openai.OpenAICompatibleEngine(
        client=client,
        model="m",
        server=" VLLM ",
        endpoint="Chat",
        grammar_dialect="LARK",
        timeout=np.int64(5),
        max_retries=np.int64(1),
    )
    assert (engine.server, engine.endpoint, engine.grammar_dialect) == ("vllm", "chat", "lark")
    assert engine.grammar_dialect is Dialect.LARK
    assert (engine.timeout, engine.max_retries) == (5.0, 1)
    assert type(engine.max_retries) is int
    assert isinstance(
        backends.OpenAIBackend(mode="CFG", client=client, model="g").engine,
        backends.openai.OpenAIGrammarToolEngine,
    )
    hosted = backends.OpenAIBackend(mode=" Json_Schema ", client=client, model="g", api="CHAT")
    assert hosted.engine.api == "chat"  # type: ignore[attr-defined]
    assert backends.OpenAIBackend(engine.__class__(client=client, model="m"), mode="Server")
    vllm = backends.VLLMBackend(llm=object(), dialect="Lark")  # type: ignore[arg-type]
    assert vllm.engine.dialect is Dialect.LARK
    assert Dialect(" GBNF ") is Dialect.GBNF
    anthropic = pytest.importorskip("anthropic")
    claude = backends.AnthropicBackend(
        client=anthropic.Anthropic(api_key="unused"), model=CLAUDE, timeout=5, system=""
    )
    assert claude.engine.timeout == 5.0  # type: ignore[attr-defined]


def test_operators_and_limits_take_numpy_numbers_and_store_python_ones() -> None:
    threshold = ops.ProbabilityThreshold(np.float32(0.5), backtrack_count=np.int64(2))
    assert (threshold.threshold, threshold.backtrack_count) == (0.5, 2)
    assert type(threshold.threshold) is float
    assert type(threshold.backtrack_count) is int
    assert ops.EntropyThreshold(3) == ops.EntropyThreshold(3.0)
    assert ops.LogitThreshold(-2).threshold == -2.0
    assert type(ops.Repetition(np.int32(4)).max_repetitions) is int
    limits = serve().Limits(max_queue=np.int64(0), max_concurrent=2)
    assert limits.max_queue == 0
    assert type(limits.max_queue) is int
