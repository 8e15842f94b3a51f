"""OpenAICompatibleEngine against a real llama-cpp-python server on the embedded SmolLM2.

Starts ``python -m llama_cpp.server`` on 127.0.0.1 (a free port) once for the module and
stops it in the fixture's finalizer. Needs the ``server`` extra
(``pip install "citebacktrack[server]"``); skipped without it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from citebacktrack.errors import GrammarError, MissingDependencyError, ModelLoadError
from citebacktrack.grammar import Dialect, citation_grammar, emit
from citebacktrack.grammar._continuation import continuation_grammar
from citebacktrack.prompts import build_messages
from citebacktrack.segments import SegmentCall
from citebacktrack.types import Policy, Source

pytestmark = pytest.mark.slow

SOURCES = [
    Source(title="Eiffel Tower", text="The Eiffel Tower is in Paris. It was completed in 1889."),
    Source(title="Big Ben", text="Big Ben is a clock tower in London, finished in 1859."),
    Source(title="Colosseum", text="The Colosseum is an amphitheatre in Rome."),
]
MESSAGES = build_messages("When was the Eiffel Tower completed?", SOURCES, Policy())
FULL = citation_grammar(3, bounded=True)
_OPEN_MARKER = re.compile(r"\[[1-3]\Z")


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    from citebacktrack.backends.llamacpp_server import LlamaCppServer

    try:
        server = LlamaCppServer(n_ctx=4096)
    except (MissingDependencyError, ModelLoadError) as exc:  # no server extra or no model
        pytest.skip(str(exc))
    with server:
        yield server.base_url
    assert not server.running, "the server was not shut down"


def _engine(url: str) -> Any:
    from citebacktrack.backends.openai import OpenAICompatibleEngine

    return OpenAICompatibleEngine.from_base_url(
        url, model="smollm2", server="llama.cpp", timeout=120.0, max_retries=0
    )


@pytest.fixture(scope="module")
def engine(server_url: str) -> Iterator[Any]:
    engine = _engine(server_url)
    yield engine
    engine.close()


def _matcher(prefix: str) -> Any:
    """An XGrammar matcher of the full citation grammar that has read ``prefix``."""
    import xgrammar

    from grammar_engines import xgrammar_compiled

    matcher = xgrammar.GrammarMatcher(xgrammar_compiled(emit(FULL, Dialect.EBNF)))
    assert not prefix or matcher.accept_string(prefix), prefix
    return matcher


def _segment(prefix: str = "", **options: Any) -> SegmentCall:
    options.setdefault("max_tokens", 160)
    grammar = continuation_grammar(3, None, prefix, bounded=True) if prefix else FULL
    options.setdefault("grammar", grammar)
    return SegmentCall(messages=MESSAGES, prefix=prefix, seed=0, **options)


@pytest.fixture(scope="module")
def first(engine: Any) -> Any:
    return engine.complete(_segment(""))


def test_first_segment_obeys_the_grammar_and_stops_inside_a_marker(first: Any) -> None:
    assert first.finish == "stop", first
    assert _OPEN_MARKER.search(first.text), first.text
    assert "]" not in first.text.rsplit("[", 1)[-1]
    assert _matcher(first.text + "]")  # what it wrote, closed, is a prefix of the grammar
    assert first.prompt_tokens > 100
    assert first.completion_tokens > 0


def test_async_continuation_from_an_accepted_prefix(server_url: str, first: Any) -> None:
    prefix = first.text + "]"

    async def main() -> Any:
        engine = _engine(server_url)  # its async client lives in this event loop only
        try:
            return await engine.acomplete(_segment(prefix))
        finally:
            await engine.aclose()

    result = anyio.run(main)
    matcher = _matcher(prefix)
    if result.text:  # SmolLM2 often ends the answer right here (EOS: "end", no text)
        assert matcher.accept_string(result.text + ("]" if result.finish == "stop" else ""))
    if result.finish == "end":
        assert matcher.is_completed()
    if result.finish == "stop":
        assert _OPEN_MARKER.search(prefix + result.text)
    assert result.prompt_tokens > first.prompt_tokens  # the prefix went into the prompt


def test_resubmission_at_an_open_marker_takes_an_allowed_id(engine: Any, first: Any) -> None:
    prefix = first.text[: first.text.rindex("[") + 1]
    grammar = continuation_grammar(3, None, prefix, allowed_ids={2}, bounded=True)
    result = engine.complete(_segment(prefix, grammar=grammar))
    # The text alone ("2") shows no "[": the open marker is found across the prefix.
    assert (result.text, result.finish) == ("2", "stop")


def test_max_tokens_gives_length(engine: Any) -> None:
    result = engine.complete(_segment("", max_tokens=3))
    assert result.finish == "length"
    assert result.completion_tokens == 3


def test_invalid_grammar_is_refused_and_the_server_survives(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import citebacktrack.backends._openai_server as module

    with monkeypatch.context() as patch:
        patch.setattr(module, "emit", lambda grammar, dialect: 'root ::= "a" (')
        with pytest.raises(GrammarError):
            engine.complete(_segment(""))
    assert engine.complete(_segment("", max_tokens=4)).completion_tokens > 0


# ------------------------------------------------------------------ Citeformer over the server


def _backend(url: str) -> Any:
    from citebacktrack.backends.openai import OpenAIBackend

    return OpenAIBackend.from_base_url(
        url, model="smollm2", server="llama.cpp", timeout=120.0, max_retries=0
    )


QUESTION = "When was the Eiffel Tower completed?"


def _check_answer(answer: Any) -> None:
    for citation in answer.citations:
        assert 1 <= citation.source_index <= len(SOURCES)
        assert answer.text[citation.start : citation.end] == f"[{citation.source_index}]"
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.generated_tokens > 0


def test_citeformer_answers_through_the_server_stream_equals_generate_async_equals_sync(
    server_url: str,
) -> None:
    from citebacktrack import Citeformer, Done, TextDelta

    with _backend(server_url) as backend:
        cf = Citeformer(backend)
        answer = cf.generate(QUESTION, SOURCES)
        _check_answer(answer)
        assert answer.text
        events = list(cf.stream(QUESTION, SOURCES))
        last = events[-1]
        assert isinstance(last, Done)
        assert last.answer == answer
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == answer.text

        async def main() -> Any:
            return await cf.agenerate(QUESTION, SOURCES)

        assert anyio.run(main) == answer


def test_an_unsupported_citation_is_rejected_and_resubmitted_through_the_server(
    server_url: str,
) -> None:
    from citebacktrack import CitationRejected, Citeformer, StopReason
    from citebacktrack.support import SupportResult

    class OnlyTheLast:
        """Supports every claim from source 3 only: any other id the model picks is
        rejected and the marker resubmitted."""

        def score(self, claim: str, source_index: int) -> SupportResult:
            ok = source_index == 3
            return SupportResult(
                score=0.9 if ok else 0.1, is_supported=ok, evidence="", detail=str(ok)
            )

    with _backend(server_url) as backend:
        cf = Citeformer(backend, scorer=lambda sources: OnlyTheLast())
        events = list(cf.stream(QUESTION, SOURCES))
    answer = events[-1].answer  # type: ignore[union-attr]
    _check_answer(answer)
    assert answer.stop_reason in {
        StopReason.END,
        StopReason.MAX_NEW_TOKENS,
        StopReason.NO_VALID_CITATION,
    }
    assert {c.source_index for c in answer.citations} == {3}
    rejected = [e for e in events if isinstance(e, CitationRejected)]
    assert all(e.source_index != 3 for e in rejected)
    assert answer.trace.forward_passes > len(answer.citations)


def test_a_killed_caller_leaves_no_server_behind(tmp_path: Path) -> None:
    """SIGKILL the process that started a LlamaCppServer: the server exits by itself."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "caller.py"
    script.write_text(
        "import os\n"
        "from citebacktrack.backends.llamacpp_server import LlamaCppServer\n"
        "server = LlamaCppServer(n_ctx=512)\n"
        "print(server.process.pid, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.25)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the server outlived its killed caller")
