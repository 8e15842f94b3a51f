"""VLLMBackend over a fake of vLLM 0.33's offline API (``tests/fake_vllm``).

vLLM needs a GPU and is not installable here, so these tests put the fake package on
``sys.path``. The fake decodes under the request's grammar and stop strings with XGrammar
over a toy vocabulary, and its signatures are checked against strings copied from vLLM
0.33.0's sources (the ``vllm-0.33.0`` wheel, commit g4ba787ec9).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

from citebacktrack import (
    Answer,
    BackendError,
    CitationRejected,
    Citeformer,
    ConfigurationError,
    Done,
    MissingDependencyError,
    Source,
    TextDelta,
)
from citebacktrack.backends.vllm import VLLMBackend, VLLMEngine
from citebacktrack.grammar.emit import Dialect
from citebacktrack.segments import SegmentCall, SegmentEngine

FAKE = Path(__file__).parent / "fake_vllm"
MODEL = "fake/scripted"

SOURCES = [
    Source(id="louvre", title="Louvre", text="The Louvre is an art museum in Paris."),
    Source(
        id="eiffel",
        title="Eiffel Tower",
        text="The Eiffel Tower was completed in 1889. It is 330 metres tall.",
    ),
    Source(id="wall", title="Great Wall", text="The Great Wall of China is very long."),
]
QUESTION = "When was the Eiffel Tower completed, and how tall is it?"
GOOD = "The Eiffel Tower was completed in 1889 [2]. It is 330 metres tall [2]."
WRONG_IDS = "The Eiffel Tower was completed in 1889 [1]. It is 330 metres tall [3]."
OUT_OF_RANGE = "The Eiffel Tower was completed in 1889 [9]. It is 330 metres tall [7]."

# Copied from vLLM 0.33.0's sources (path:line of each definition); annotations dropped.
VLLM_033_SIGNATURES: dict[str, str] = {
    # vllm/entrypoints/llm.py:177
    "vllm.LLM.__init__": (
        "(self, model, *, runner='auto', convert='auto', tokenizer=None, "
        "tokenizer_mode='auto', skip_tokenizer_init=False, trust_remote_code=False, "
        "allowed_local_media_path='', allowed_media_domains=None, tensor_parallel_size=1, "
        "dtype='auto', quantization=None, revision=None, tokenizer_revision=None, "
        "chat_template=None, seed=0, gpu_memory_utilization=0.92, cpu_offload_gb=0, "
        "offload_group_size=0, offload_num_in_group=1, offload_prefetch_step=1, "
        "offload_params=None, enforce_eager=False, enable_return_routed_experts=False, "
        "return_sampling_mask=False, disable_custom_all_reduce=False, hf_token=None, "
        "hf_overrides=None, mm_processor_kwargs=None, pooler_config=None, "
        "structured_outputs_config=None, profiler_config=None, attention_config=None, "
        "kv_cache_memory_bytes=None, compilation_config=None, quantization_config=None, "
        "logits_processors=None, spec_method=None, spec_model=None, spec_tokens=None, "
        "**kwargs)"
    ),
    # vllm/entrypoints/llm.py:417
    "vllm.LLM.generate": (
        "(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, "
        "priority=None, tokenization_kwargs=None, mm_processor_kwargs=None)"
    ),
    # vllm/entrypoints/llm.py:385
    "vllm.LLM.get_tokenizer": "(self)",
    # vllm/sampling_params.py:271
    "vllm.SamplingParams": (
        "(n=1, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, "
        "temperature=1.0, watermarking=None, top_p=1.0, top_k=0, min_p=0.0, seed=None, "
        "stop=None, stop_token_ids=None, ignore_eos=False, max_tokens=16, min_tokens=0, "
        "logprobs=None, prompt_logprobs=None, prompt_logprob_token_ids=None, "
        "prompt_logprob_start=None, logprob_token_ids=None, flat_logprobs=False, "
        "detokenize=True, skip_special_tokens=True, spaces_between_special_tokens=True, "
        "include_stop_str_in_output=False, output_kind=RequestOutputKind.CUMULATIVE, "
        "stream_interval=None, skip_clone=False, output_text_buffer_length=0, "
        "_eos_token_id=None, _all_stop_token_ids=<factory>, _watermarking_skipped=False, "
        "structured_outputs=None, logit_bias=None, allowed_token_ids=None, extra_args=None, "
        "bad_words=None, _bad_words_token_ids=None, skip_reading_prefix_cache=None, "
        "thinking_token_budget=None, repetition_detection=None, "
        "routed_experts_prompt_start=0, trace_decode_token_ids=None)"
    ),
    # vllm/sampling_params.py:102
    "vllm.sampling_params.StructuredOutputsParams": (
        "(json=None, regex=None, choice=None, grammar=None, json_object=None, "
        "disable_any_whitespace=False, disable_additional_properties=False, "
        "whitespace_pattern=None, structural_tag=None)"
    ),
    # vllm/outputs.py:59
    "vllm.CompletionOutput": (
        "(index, text, token_ids, cumulative_logprob, logprobs, routed_experts=None, "
        "finish_reason=None, stop_reason=None, lora_request=None, sampling_mask=None, "
        "spec_decode_metrics=None, weight_versions=None)"
    ),
    # vllm/outputs.py:169
    "vllm.RequestOutput": (
        "(request_id, prompt, prompt_token_ids, prompt_logprobs, outputs, finished, "
        "metrics=None, lora_request=None, encoder_prompt=None, encoder_prompt_token_ids=None,"
        " num_cached_tokens=None, num_cache_creation_tokens=None, *, "
        "prompt_token_id_logprobs=None, kv_transfer_params=None, ec_transfer_params=None, "
        "**kwargs)"
    ),
    # vllm/v1/engine/async_llm.py:279
    "vllm.AsyncLLMEngine.from_engine_args": (
        "(engine_args, start_engine_loop=True, usage_context=UsageContext.ENGINE_CONTEXT, "
        "stat_loggers=None)"
    ),
    # vllm/v1/engine/async_llm.py:726
    "vllm.AsyncLLMEngine.generate": (
        "(self, prompt, sampling_params, request_id, *, prompt_text=None, lora_request=None, "
        "tokenization_kwargs=None, trace_headers=None, priority=0, data_parallel_rank=None, "
        "session_id=None, kv_hints=None, reasoning_ended=None, reasoning_parser_kwargs=None)"
    ),
    # vllm/v1/engine/async_llm.py:1119
    "vllm.AsyncLLMEngine.get_tokenizer": "(self)",
    # vllm/v1/engine/async_llm.py:305
    "vllm.AsyncLLMEngine.shutdown": "(self, timeout=None)",
    # vllm/tokenizers/protocol.py:100
    "vllm._scripted.FakeTokenizer.apply_chat_template": ("(self, messages, tools=None, **kwargs)"),
    # vllm/exceptions.py:38
    "vllm.exceptions.VLLMValidationError": "(message, *, parameter=None, value=None)",
}

# vllm/engine/arg_utils.py:489 (EngineArgs, a dataclass of ~290 fields): the fields the
# fake keeps, in 0.33's order, with the defaults resolved (ModelConfig.model,
# ModelConfig.tokenizer, ModelConfig.seed, ParallelConfig.*); then AsyncEngineArgs (line
# 3244) adds enable_log_requests.
ENGINE_ARGS_SUBSET = (
    "(model='Qwen/Qwen3-0.6B', tokenizer=None, seed=0, distributed_executor_backend=None, "
    "pipeline_parallel_size=1, tensor_parallel_size=1, enable_prefix_caching=None, "
    "disable_log_stats=False, structured_outputs_config=<factory>, enable_log_requests=False)"
)


def _vllm_modules() -> list[str]:
    return [name for name in sys.modules if name == "vllm" or name.startswith("vllm.")]


@pytest.fixture
def vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The fake ``vllm`` package, freshly imported; ``MODEL`` writes ``GOOD``."""
    for name in _vllm_modules():
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(FAKE))
    import vllm
    import vllm._scripted

    assert Path(vllm.__file__).is_relative_to(FAKE)
    vllm._scripted.register(MODEL, lambda prompt: GOOD)
    yield vllm
    for name in _vllm_modules():
        del sys.modules[name]


def _script(vllm: ModuleType, script: str | Callable[[str], str]) -> Any:
    chosen = script if callable(script) else (lambda prompt: script)
    vllm._scripted.register(MODEL, chosen)
    return vllm.LLM(MODEL)


def _cf(llm: Any, **options: Any) -> Citeformer:
    return Citeformer(VLLMBackend(llm=llm), **options)


def _prompts(llm: Any) -> list[str]:
    return [prompt for call in llm.generate_calls for prompt in call]


def _prefix(prompt: str) -> str:
    return prompt.rpartition("<|im_start|>assistant\n")[2]


# ---------------------------------------------------------------------- answers


def test_an_answer_cites_supported_ids_one_segment_per_marker(vllm: ModuleType) -> None:
    llm = _script(vllm, GOOD)
    engine = VLLMEngine(llm)
    assert isinstance(engine, SegmentEngine)
    answer = _cf(llm).generate(QUESTION, SOURCES)
    assert answer.text == GOOD
    assert [c.source_index for c in answer.citations] == [2, 2]
    prompts = _prompts(llm)
    assert [_prefix(p) for p in prompts] == ["", GOOD[:42], GOOD[:-1]]  # each up to a "]"
    assert prompts[0].startswith("<|im_start|>system\n")  # the chat template was applied
    assert answer.usage.forward_passes == len(prompts)
    assert answer.usage.completion_tokens > 0
    assert answer.usage.prompt_tokens > 0


def test_the_grammar_keeps_ids_in_range(vllm: ModuleType) -> None:
    answer = _cf(_script(vllm, OUT_OF_RANGE)).generate(QUESTION, SOURCES)
    assert all(1 <= c.source_index <= len(SOURCES) for c in answer.citations)
    assert [c.source_index for c in answer.citations] == [2, 2]


def test_a_rejected_citation_is_resubmitted_from_its_bracket(vllm: ModuleType) -> None:
    llm = _script(vllm, WRONG_IDS)
    events = list(_cf(llm).stream(QUESTION, SOURCES))
    assert isinstance(events[-1], Done)
    answer = events[-1].answer
    assert answer is not None
    assert answer.text == GOOD
    assert [e.source_index for e in events if isinstance(e, CitationRejected)] == [1, 3]
    resubmitted = [_prefix(p) for p in _prompts(llm) if p.endswith("[")]
    assert resubmitted == [
        "The Eiffel Tower was completed in 1889 [",
        "The Eiffel Tower was completed in 1889 [2]. It is 330 metres tall [",
    ]
    assert answer.trace.backtracks == 2


@pytest.mark.parametrize("script", [GOOD, WRONG_IDS])
def test_stream_equals_generate(vllm: ModuleType, script: str) -> None:
    answer = _cf(_script(vllm, script)).generate(QUESTION, SOURCES)
    events = list(_cf(_script(vllm, script)).stream(QUESTION, SOURCES))
    assert isinstance(events[-1], Done)
    assert events[-1].answer == answer
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == answer.text


@pytest.mark.parametrize("script", [GOOD, WRONG_IDS])
def test_async_engine_answers_as_the_sync_one(vllm: ModuleType, script: str) -> None:
    sync = _cf(_script(vllm, script)).generate(QUESTION, SOURCES)
    engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(model=MODEL))
    backend = VLLMBackend(async_engine=engine)
    native = Citeformer(backend)
    threaded = _cf(_script(vllm, script))

    async def both() -> tuple[Answer, list[Any]]:
        events = [e async for e in native.astream(QUESTION, SOURCES)]
        return await threaded.agenerate(QUESTION, SOURCES), events

    answer, events = anyio.run(both)
    assert answer == sync
    assert events[-1].answer == sync
    assert len(engine.requests) == sync.usage.forward_passes  # every call went natively
    backend.close()  # the backend owns the engine it was given
    assert engine.is_shut_down


def test_an_async_only_backend_refuses_blocking_calls(vllm: ModuleType) -> None:
    engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(model=MODEL))
    with pytest.raises(ConfigurationError, match="only an async engine"):
        Citeformer(VLLMBackend(async_engine=engine)).generate(QUESTION, SOURCES)


# ---------------------------------------------------------------------- batching


QUESTIONS = {
    QUESTION: WRONG_IDS,
    "Where is the Louvre?": "The Louvre is an art museum in Paris [3].",
    "What is long?": "The Great Wall of China is very long [3]. It is in China [3].",
}


def _by_question(prompt: str) -> str:
    for question, script in QUESTIONS.items():
        if question in prompt:
            return script
    raise AssertionError("unknown question")


def test_generate_many_batches_rounds_and_answers_as_generate(vllm: ModuleType) -> None:
    one_by_one = [_cf(_script(vllm, _by_question)).generate(q, SOURCES) for q in QUESTIONS]
    llm = _script(vllm, _by_question)
    answers = _cf(llm).generate_many([(q, SOURCES) for q in QUESTIONS])
    assert answers == one_by_one
    segments = sum(a.usage.forward_passes for a in answers)
    assert len(llm.generate_calls) < segments
    assert len(llm.generate_calls) == max(a.usage.forward_passes for a in answers)
    assert len(llm.generate_calls[0]) == len(QUESTIONS)


def test_generate_many_of_nothing_calls_nothing(vllm: ModuleType) -> None:
    llm = _script(vllm, GOOD)
    assert VLLMBackend(llm=llm).generate_many([]) == []
    assert llm.generate_calls == []


# ---------------------------------------------------------------------- engines


def test_a_model_name_builds_an_llm_with_prefix_caching(vllm: ModuleType) -> None:
    backend = VLLMBackend(
        model=MODEL,
        engine_args={
            "tensor_parallel_size": 2,
            "pipeline_parallel_size": 2,
            "distributed_executor_backend": "ray",
        },
    )
    llm = backend.engine.llm
    assert isinstance(llm, vllm.LLM)
    args = llm.engine_args
    assert args.enable_prefix_caching is True
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (2, 2)
    assert args.distributed_executor_backend == "ray"
    assert Citeformer(backend).generate(QUESTION, SOURCES).text == GOOD


def test_from_async_model_builds_an_async_engine(vllm: ModuleType) -> None:
    backend = VLLMBackend.from_async_model(MODEL, engine_args={"tensor_parallel_size": 2})
    engine = backend.engine.async_engine
    assert engine.engine_args.enable_prefix_caching is True  # type: ignore[union-attr]
    answer = anyio.run(Citeformer(backend).agenerate, QUESTION, SOURCES)
    assert answer.text == GOOD


def test_engine_errors_are_ours(vllm: ModuleType) -> None:
    with pytest.raises(ConfigurationError, match="refused the engine arguments"):
        VLLMBackend(model=MODEL, engine_args={"no_such_argument": 1})
    with pytest.raises(ConfigurationError, match="only when building"):
        VLLMBackend(llm=_script(vllm, GOOD), engine_args={"tensor_parallel_size": 2})
    with pytest.raises(ConfigurationError, match="either model"):
        VLLMBackend(llm=_script(vllm, GOOD), model=MODEL)
    with pytest.raises(ConfigurationError, match=r"needs a vllm\.LLM"):
        VLLMBackend()
    with pytest.raises(Exception, match="could not load model"):
        VLLMBackend(model="not/registered")


def test_a_lark_engine_takes_the_lark_dialect(vllm: ModuleType) -> None:
    vllm._scripted.register(MODEL, lambda prompt: WRONG_IDS)
    guidance = vllm.LLM(MODEL, structured_outputs_config={"backend": "guidance"})
    answer = Citeformer(VLLMBackend(llm=guidance, dialect=Dialect.LARK)).generate(QUESTION, SOURCES)
    assert answer.text == GOOD
    with pytest.raises(BackendError, match="Invalid grammar specification"):
        _cf(guidance).generate(QUESTION, SOURCES)  # EBNF sent to a Lark-only backend


def _call(max_tokens: int = 64) -> SegmentCall:
    request = Citeformer(VLLMBackend(llm=object())).build_request(  # type: ignore[arg-type]
        QUESTION, SOURCES
    )
    assert request.grammar is not None
    return SegmentCall(
        messages=request.messages, prefix="", grammar=request.grammar, max_tokens=max_tokens
    )


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason", "finish"),
    [
        ("stop", "]", "stop"),  # a stop string: reported as itself
        ("stop", None, "end"),  # EOS
        ("stop", 7, "end"),  # a stop token id
        ("length", None, "length"),
        ("repetition", "repetition_detected", "length"),
    ],
)
def test_finish_reasons_map_to_segment_finishes(
    vllm: ModuleType, finish_reason: str, stop_reason: object, finish: str
) -> None:
    llm = _script(vllm, GOOD)
    real = llm.generate

    def generate(*args: Any, **kwargs: Any) -> list[Any]:
        outputs: list[Any] = real(*args, **kwargs)
        outputs[0].outputs[0].finish_reason = finish_reason
        outputs[0].outputs[0].stop_reason = stop_reason
        return outputs

    llm.generate = generate
    result = VLLMEngine(llm).complete(_call())
    assert result.finish == finish
    assert result.completion_tokens > 0


def test_length_and_eos_come_from_the_engine(vllm: ModuleType) -> None:
    engine = VLLMEngine(_script(vllm, GOOD))
    assert engine.complete(_call(max_tokens=3)).finish == "length"
    first = engine.complete(_call())
    assert (first.text, first.finish) == ("The Eiffel Tower was completed in 1889 [2", "stop")


@pytest.mark.parametrize("reason", ["abort", "error"])
def test_an_aborted_request_is_a_backend_error(vllm: ModuleType, reason: str) -> None:
    llm = _script(vllm, GOOD)
    real = llm.generate

    def generate(*args: Any, **kwargs: Any) -> list[Any]:
        outputs: list[Any] = real(*args, **kwargs)
        outputs[0].outputs[0].finish_reason = reason
        return outputs

    llm.generate = generate
    with pytest.raises(BackendError, match=reason):
        VLLMEngine(llm).complete(_call())


def test_a_closed_backend_refuses(vllm: ModuleType) -> None:
    backend = VLLMBackend(llm=_script(vllm, GOOD))
    backend.close()
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        Citeformer(backend).generate(QUESTION, SOURCES)


def test_missing_vllm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _vllm_modules():
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(MissingDependencyError, match=r"citebacktrack\[vllm\]") as info:
        VLLMBackend(model=MODEL)
    assert info.value.extra == "vllm"


# ---------------------------------------------------------------------- the fake


def test_the_fake_refuses_what_vllm_033_refuses(vllm: ModuleType) -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import StructuredOutputsParams

    with pytest.raises(TypeError, match="guided_decoding"):
        vllm.SamplingParams(guided_decoding={"grammar": 'root ::= "a"'})
    with pytest.raises(VLLMValidationError, match="none are specified"):
        StructuredOutputsParams()
    with pytest.raises(VLLMValidationError, match="multiple are specified"):
        StructuredOutputsParams(grammar='root ::= "a"', regex="a")
    assert vllm.SamplingParams(stop="]").stop == ["]"]


def _default(value: object) -> str:
    if isinstance(value, Enum):
        return f"{type(value).__name__}.{value.name}"
    return repr(value)


def _shape(target: Any) -> str:
    """``inspect.signature`` without annotations, defaults as vLLM's source spells them."""
    parts: list[str] = []
    star = False
    for p in inspect.signature(target).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star = True
            continue
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={_default(p.default)}")
    return "(" + ", ".join(parts) + ")"


def _resolve(vllm: ModuleType, dotted: str) -> Any:
    import importlib

    names = dotted.split(".")
    for cut in range(len(names), 0, -1):
        try:
            target: Any = importlib.import_module(".".join(names[:cut]))
        except ImportError:
            continue
        for name in names[cut:]:
            target = getattr(target, name)
        return target
    raise AssertionError(dotted)


@pytest.mark.parametrize("dotted", sorted(VLLM_033_SIGNATURES))
def test_the_fake_has_vllm_033_signatures(vllm: ModuleType, dotted: str) -> None:
    assert _shape(_resolve(vllm, dotted)) == VLLM_033_SIGNATURES[dotted]


def test_the_fake_engine_args_are_a_subset_of_vllm_033(vllm: ModuleType) -> None:
    fields = [f.name for f in dataclasses.fields(vllm.AsyncEngineArgs)]
    assert _shape(vllm.AsyncEngineArgs) == ENGINE_ARGS_SUBSET
    assert fields[-1] == "enable_log_requests"


def test_sampling_parameters_vllm_refuses_are_a_configuration_error(vllm: ModuleType) -> None:
    call = dataclasses.replace(_call(), temperature=2.5)  # vLLM 0.33 allows [0, 2]
    with pytest.raises(ConfigurationError, match=r"temperature=2\.5"):
        VLLMEngine(_script(vllm, GOOD)).complete(call)


def test_an_async_engine_failure_is_a_backend_error(vllm: ModuleType) -> None:
    engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(model=MODEL))
    engine.shutdown()  # the fake refuses requests afterwards, as a dead engine would
    with pytest.raises(BackendError, match="async engine failed"):
        anyio.run(VLLMEngine(async_engine=engine).acomplete, _call())
