"""The fake's "model" (not part of vLLM): a scripted toy model decoding like vLLM's engine.

A model name is registered with a *script* function: given the prompt up to the assistant
turn it returns the answer that model wants to write. A request then decodes token by
token over citebacktrack's toy vocabulary, from wherever the prompt's answer prefix left
off (:class:`citebacktrack.testing.ScriptedRuntime`), under the request's grammar
(XGrammar, as vLLM's ``xgrammar`` backend; ``guidance`` takes Lark only), and finishes as
vLLM 0.33 does:

* a stop string: ``finish_reason="stop"``, ``stop_reason`` the string, text cut before it
  (``vllm/v1/engine/detokenizer.py`` ``check_stop_strings``, line 321); the token that
  completed it stays in ``token_ids``;
* EOS (the toy stop token, id 0): ``"stop"`` with ``stop_reason=None``, EOS kept in
  ``token_ids`` and left out of the text (``vllm/v1/core/sched/utils.py`` ``check_stop``,
  line 98; detokenizer lines 107-130);
* ``max_tokens``: ``"length"``.

A grammar vLLM's backend cannot parse raises ``VLLMValidationError("Invalid grammar
specification.")`` before anything runs (``backend_xgrammar.py`` lines 550-560); the
backend tells EBNF from Lark with ``grammar_is_likely_lark`` (``structured_output/utils.py``
line 409: Lark unless a line holds ``::=``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from citebacktrack.decoding.matcher import FreeMatcher, TokenMatcher, XGrammarMatcher
from citebacktrack.decoding.vocab_index import import_xgrammar
from citebacktrack.testing import ScriptedRuntime, default_vocabulary, index_for
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams

ASSISTANT = "<|im_start|>assistant\n"
"""Where the chat template opens the answer; what follows it in a prompt is the prefix."""

SCRIPTS: dict[str, Callable[[str], str]] = {}

_HONOURED = {"n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "max_tokens"}
_HONOURED |= {"structured_outputs", "stop_token_ids", "bad_words", "output_text_buffer_length"}
_HONOURED |= {"skip_reading_prefix_cache"}


def register(model: str, script: Callable[[str], str]) -> None:
    """Make ``model`` a loadable fake model whose answer to a prompt is ``script(prompt)``."""
    SCRIPTS[model] = script


def load(model: str) -> Callable[[str], str]:
    if model not in SCRIPTS:
        raise OSError(f"fake vLLM: no model {model!r} (register it with vllm._scripted)")
    return SCRIPTS[model]


def encode(text: str) -> list[int]:
    ids = index_for(default_vocabulary()).encode(text.encode())
    if ids is None:
        raise ValueError(f"the toy vocabulary cannot spell {text!r}")
    return ids


class FakeTokenizer:
    """The part of vLLM's ``TokenizerLike`` (``vllm/tokenizers/protocol.py``) called here:
    ``apply_chat_template(messages, tools=None, **kwargs)``, with HF's keyword defaults
    (``tokenize=True``, ``add_generation_prompt=False``). The template is ChatML."""

    eos_token_id = 0

    def apply_chat_template(
        self, messages: list[Any], tools: list[dict[str, Any]] | None = None, **kwargs: Any
    ) -> str | list[int]:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if kwargs.get("add_generation_prompt", False):
            text += ASSISTANT
        return encode(text) if kwargs.get("tokenize", True) else text


def grammar_is_likely_lark(grammar_str: str) -> bool:
    """As ``vllm/v1/structured_output/utils.py`` line 409."""
    if not grammar_str or not isinstance(grammar_str, str):
        return False
    for line in grammar_str.split("\n"):
        line = re.sub(r"(#|//).*$", "", line).strip()
        if line and "::=" in line:
            return False
    return True


@dataclass
class Decoded:
    prompt_token_ids: list[int]
    steps: list[tuple[str, list[int]]]
    """Text and token ids after each token (what a cumulative stream shows)."""
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: int | str | None


def validate(params: SamplingParams, backend: str) -> Any:
    """What vLLM checks before a request runs; returns the compiled grammar (or None)."""
    defaults = SamplingParams()
    for f in fields(SamplingParams):
        if f.name not in _HONOURED and getattr(params, f.name) != getattr(defaults, f.name):
            raise NotImplementedError(f"the fake vLLM does not honour SamplingParams.{f.name}")
    if params.n != 1:
        raise NotImplementedError("the fake vLLM generates one output per prompt (n=1)")
    so = params.structured_outputs
    if so is None:
        return None
    if so.grammar is None:
        raise NotImplementedError("the fake vLLM honours only structured_outputs.grammar")
    if so.grammar.strip() == "":
        raise VLLMValidationError("structured_outputs.grammar cannot be an empty string")
    xgr = import_xgrammar()
    index = index_for(default_vocabulary())
    lark = grammar_is_likely_lark(so.grammar)
    try:
        if backend == "guidance" and not lark:
            raise ValueError("guidance reads Lark grammars")
        if lark:
            return index.compiler.compile_grammar(xgr.Grammar.from_lark(so.grammar))
        return index.compiler.compile_grammar(so.grammar)
    except Exception as exc:
        raise VLLMValidationError("Invalid grammar specification.") from exc


def decode(
    script: Callable[[str], str], prompt: str, params: SamplingParams, compiled: Any
) -> Decoded:
    vocabulary = default_vocabulary()
    head, found, prefix = prompt.rpartition(ASSISTANT)
    if not found:
        head, prefix = prompt, ""
    else:
        head += ASSISTANT
    runtime = ScriptedRuntime(script(head), vocabulary)
    head_ids, prefix_ids = encode(head), encode(prefix) if prefix else []
    logits = runtime.prefill(head_ids)
    if prefix_ids:
        logits = runtime.forward(prefix_ids)
    matcher: TokenMatcher
    if compiled is None:
        matcher = FreeMatcher(vocabulary.size)
    else:
        matcher = XGrammarMatcher(compiled, vocabulary.size)
    unblocked = index_for(vocabulary).unblocked
    rng = np.random.default_rng(params.seed)
    stops: Sequence[str] = params.stop or ()
    out, ids, steps = bytearray(), list[int](), list[tuple[str, list[int]]]()
    limit = params.max_tokens if params.max_tokens is not None else 1 << 20
    for _ in range(limit):
        allowed = matcher.allowed() & unblocked
        if not allowed.any():
            raise RuntimeError("fake vLLM: the grammar allows no token here")
        token = _sample(np.where(allowed, logits, -np.inf), params, rng)
        matcher.accept_token(token)
        ids.append(token)
        if token in vocabulary.stop_ids:
            text = out.decode("utf-8", "replace")
            return Decoded(head_ids + prefix_ids, steps, text, ids, "stop", None)
        out += vocabulary.tokens[token]
        text = out.decode("utf-8", "ignore")
        hits = [(text.find(s) + len(s), i, s) for i, s in enumerate(stops) if s in text]
        if hits:
            _, _, stop = min(hits)
            cut = text[: text.index(stop)]
            return Decoded(head_ids + prefix_ids, steps, cut, ids, "stop", stop)
        steps.append((text, list(ids)))
        logits = runtime.forward([token])
    text = out.decode("utf-8", "replace")
    return Decoded(head_ids + prefix_ids, steps, text, ids, "length", None)


def _sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.temperature < 1e-5:
        return int(np.argmax(logits))
    scaled = logits / params.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = np.cumsum(probs[order]) - probs[order] < params.top_p
    kept = order[keep]
    return int(rng.choice(kept, p=probs[kept] / probs[kept].sum()))
