"""Fuzzing what comes from outside the decode loop: bytes a tokenizer hands the citation
tracker, grammars the emitters print, and bodies a server sends back.

* The tracker (:func:`~citebacktrack._tracker.advance`) reads the answer one token
  at a time; its state after some bytes must not depend on how they were cut into tokens.
* Every citation grammar (random ``n``, policy, ``bounded``, continuation prefixes) and
  every random IR grammar is printed in each dialect; each text must parse where a server
  would parse it (:func:`~citebacktrack.backends.openai.check_grammar_text`: llama.cpp's
  parser for GBNF, XGrammar for EBNF and Lark) and XGrammar and Lark must accept and
  reject the same strings.
* The readers of server responses (the OpenAI-protocol server engine, the hosted
  Responses and Chat Completions engines, Anthropic's messages and stream events) get
  arbitrary bytes, arbitrary JSON and valid bodies with random parts replaced: each must
  give a :class:`~citebacktrack.segments.SegmentResult` or raise
  :class:`~citebacktrack.errors.BackendError`, never another exception.

``CITEBACKTRACK_FUZZ_SCALE`` multiplies every example count (e.g. ``=20`` for a long run).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from citebacktrack._tracker import ClosedMarker, TextState, advance
from citebacktrack.backends._openai_server import parse_response as _parse_response
from citebacktrack.backends.openai import check_grammar_text
from citebacktrack.errors import BackendError, GrammarError
from citebacktrack.grammar._continuation import continuation_grammar
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.grammar.ir import (
    CharClass,
    Choice,
    Grammar,
    Literal,
    Node,
    Repeat,
    RuleRef,
    walk,
)
from citebacktrack.grammar.ir import Sequence as Seq
from citebacktrack.segments import SegmentCall, SegmentResult
from citebacktrack.types import ChatMessage, CitationMode, Policy, Source
from grammar_engines import (
    GbnfVocab,
    lark_accepts,
    lark_parser,
    xgrammar_accepts,
    xgrammar_compiled,
)

SCALE = float(os.environ.get("CITEBACKTRACK_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    """``n`` examples, times ``CITEBACKTRACK_FUZZ_SCALE``."""
    return max(1, round(n * SCALE))


# The default suite (scale 1) replays the same examples every run, so CI is not flaky;
# a scaled run (CITEBACKTRACK_FUZZ_SCALE) explores new ones.
FUZZ = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow],
    "derandomize": "CITEBACKTRACK_FUZZ_SCALE" not in os.environ,
}


# =============================================================================== tracker

# Bytes that matter to the tracker (markers, digits, terminators, closers, whitespace, the
# letters of abbreviations and initials) and a multi-byte character to split.
TRACKER_BYTES = b"ab AU.!?)\"'[]0123456789\n\tegimpvsDrMPfo" + "é’".encode()


def _without_tokens(state: TextState) -> tuple[object, ...]:
    """The state less its token indices (which count tokens, so depend on the split)."""
    return (
        state.length,
        state.sentence_start,
        state.sentence_ids,
        state.group_ids,
        state.in_group,
        state.marker_start,
        state.partial_id,
        state.uncited_run,
        state.dangling,
        state.pending_boundary,
        state.initial_period,
        state.group_after_end,
        state.tail,
    )


def _marker_key(marker: ClosedMarker) -> tuple[object, ...]:
    return (marker.source_index, marker.start, marker.end, marker.sentence_start, marker.prior_ids)


def _bounds(data: bytes, cuts: list[int]) -> list[int]:
    """Where the pieces of ``data`` cut at ``cuts`` start, and its length."""
    return [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]


def _read(data: bytes, cuts: list[int], strict: bool) -> tuple[list[TextState], list[ClosedMarker]]:
    """Advance over ``data`` cut at ``cuts``; the state after each piece, every marker."""
    state = TextState(strict=strict)
    states, markers = [], []
    for token, (a, b) in enumerate(itertools.pairwise(_bounds(data, cuts))):
        state, closed = advance(state, data[a:b], token)
        states.append(state)
        markers += closed
    return states, markers


@settings(max_examples=examples(400), **FUZZ)
@given(
    data=st.binary(max_size=80) | st.lists(st.sampled_from(TRACKER_BYTES), max_size=80).map(bytes),
    cuts=st.lists(st.integers(0, 80), max_size=12),
    strict=st.booleans(),
)
def test_tracker_state_does_not_depend_on_how_the_bytes_are_split(
    data: bytes, cuts: list[int], strict: bool
) -> None:
    whole, whole_markers = _read(data, [], strict)
    bytewise, byte_markers = _read(data, list(range(len(data))), strict)
    split, split_markers = _read(data, cuts, strict)
    if not data:
        return
    final = _without_tokens(whole[-1])
    assert _without_tokens(bytewise[-1]) == final
    assert _without_tokens(split[-1]) == final
    keys = [_marker_key(m) for m in whole_markers]
    assert [_marker_key(m) for m in byte_markers] == keys
    assert [_marker_key(m) for m in split_markers] == keys
    # The token indices name the piece that holds the byte they stand for.
    bounds = _bounds(data, cuts)
    last = split[-1]
    if last.sentence_start < len(data):
        token = last.sentence_token
        assert bounds[token] <= last.sentence_start < bounds[token + 1], (last, bounds)
    for marker in split_markers:
        assert bounds[marker.token_index] <= marker.start < bounds[marker.token_index + 1]


# =============================================================================== grammars

# Answer pieces: prose, breaks, terminators, closers, quotes, bullets, headings, markers.
PIECES = [
    *("Paris", " is", " big", " ", "\n", ",", ":", "é", "(", ")", '"', "“", "”", "’"),
    *(".", "!", "?", "...", "3.5", "U.S.", " e.g.", "J.", " Dr.", "://x.y", "- ", "1. "),
    *("[", "]", "[1]", "[2]", "[3]", "[12]", "[0]", "[1, 2]", " [1].", ". [2]", "[1][2]"),
]
POLICIES = st.builds(
    Policy,
    mode=st.sampled_from(list(CitationMode)),
    max_citations_per_sentence=st.integers(1, 3),
    max_uncited_chars=st.sampled_from([20, 40, 300]),
)
answers = st.lists(st.sampled_from(PIECES), max_size=10).map("".join)


def _xgrammar_of_lark(lark_text: str) -> Any:
    """The Lark text as XGrammar reads it (as vLLM's xgrammar backend does)."""
    import xgrammar as xgr

    from grammar_engines import _xgrammar_compiler

    return _xgrammar_compiler().compile_grammar(xgr.Grammar.from_lark(lark_text))


def _agree(
    grammar: Grammar,
    strings: list[str],
    gbnf_vocab: GbnfVocab | None,
    *,
    lark_library: bool = True,
) -> None:
    """XGrammar on the EBNF text and on the Lark text, llama.cpp on the GBNF text and (when
    cheap) the Lark library on the Lark text judge every string alike."""
    ebnf, gbnf, lark_text = (emit(grammar, d) for d in (Dialect.EBNF, Dialect.GBNF, Dialect.LARK))
    engines: dict[str, Callable[[str], bool]] = {}
    compiled = xgrammar_compiled(ebnf, grammar.root)
    engines["xgrammar-ebnf"] = lambda text: xgrammar_accepts(compiled, text)
    from_lark = _xgrammar_of_lark(lark_text)
    engines["xgrammar-lark"] = lambda text: xgrammar_accepts(from_lark, text)
    if lark_library:
        parser = lark_parser(lark_text)
        engines["lark"] = lambda text: lark_accepts(parser, text)
    if gbnf_vocab is not None:
        engines["llama.cpp"] = lambda text: gbnf_vocab.accepts(gbnf, text, grammar.root)
    for text in strings:
        verdicts = {name: accepts(text) for name, accepts in engines.items()}
        if verdicts.get("llama.cpp") is False and _is_partial_utf8_quirk(grammar, text):
            del verdicts["llama.cpp"]  # see test_grammar_properties.assert_agree
        assert len(set(verdicts.values())) == 1, (text, verdicts, ebnf, gbnf, lark_text)


def _is_partial_utf8_quirk(grammar: Grammar, text: str) -> bool:
    """llama.cpp refuses a token holding part of a character if any character it could
    become is in a negated class (test_grammar_emit.test_llama_cpp_negated_class_partial_utf8)."""
    return any(ord(c) > 0x7F for c in text) and any(
        isinstance(node, CharClass) and node.negated
        for _, body in grammar.rules
        for node in walk(body)
    )


def _check_dialects(grammar: Grammar) -> None:
    """Every dialect's text of ``grammar`` parses as its server would parse it."""
    for dialect in Dialect:
        check_grammar_text(emit(grammar, dialect), dialect)


def _is_slow_for_lark(policy: Policy, bounded: bool) -> bool:
    """Earley over bounded regex terminals takes seconds a string (XGrammar reads the same
    Lark text instead)."""
    return bounded and policy.mode is CitationMode.REQUIRED


@pytest.fixture(scope="module")
def gbnf_or_none() -> Iterator[GbnfVocab | None]:
    """llama.cpp's grammar sampler over SmolLM2's vocabulary, or None without llama_cpp."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        yield None
        return
    from grammar_engines import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        yield None
        return
    vocab = GbnfVocab(path)
    yield vocab
    vocab.close()


@settings(max_examples=examples(40), **FUZZ)
@given(
    n=st.integers(1, 14),
    policy=POLICIES,
    bounded=st.booleans(),
    strings=st.lists(answers, min_size=1, max_size=6),
)
def test_citation_grammars_parse_in_every_dialect_and_engines_agree(
    gbnf_or_none: GbnfVocab | None, n: int, policy: Policy, bounded: bool, strings: list[str]
) -> None:
    grammar = citation_grammar(n, policy, bounded=bounded)
    _check_dialects(grammar)
    _agree(grammar, strings, gbnf_or_none, lark_library=not _is_slow_for_lark(policy, bounded))


@settings(max_examples=examples(40), **FUZZ)
@given(
    n=st.integers(1, 14),
    policy=POLICIES,
    bounded=st.booleans(),
    prefix=answers,
    ids=st.none() | st.sets(st.integers(1, 14), min_size=1, max_size=3),
    strings=st.lists(answers, min_size=1, max_size=5),
)
def test_continuation_grammars_parse_in_every_dialect_and_engines_agree(
    gbnf_or_none: GbnfVocab | None,
    n: int,
    policy: Policy,
    bounded: bool,
    prefix: str,
    ids: set[int] | None,
    strings: list[str],
) -> None:
    """Prefixes at random points: those the library refuses raise GrammarError (never
    another error); the grammars it gives parse everywhere and read alike."""
    allowed = None if ids is None or not prefix.endswith("[") else ids
    try:
        grammar = continuation_grammar(n, policy, prefix, allowed_ids=allowed, bounded=bounded)
    except GrammarError:
        assume(False)
        return
    _check_dialects(grammar)
    _agree(grammar, strings, gbnf_or_none, lark_library=not _is_slow_for_lark(policy, bounded))
    # The continuation reads as the full grammar does after the prefix (the XGrammar oracle).
    full = xgrammar_compiled(emit(citation_grammar(n, policy, bounded=bounded), Dialect.EBNF))
    compiled = xgrammar_compiled(emit(grammar, Dialect.EBNF))
    for text in strings:
        if allowed is None:
            assert xgrammar_accepts(compiled, text) == xgrammar_accepts(full, prefix + text)
        elif xgrammar_accepts(compiled, text):
            assert xgrammar_accepts(full, prefix + text)


# Random IR from the library's own constructors (no recursion: a rule names later rules).
ALPHABET = ["a", "b", '"', "\\", "]", "[", "-", "^", "/", "\n", " ", "'", "|", "~", "(", "é"]


@st.composite
def _char_classes(draw: st.DrawFn) -> CharClass:
    if draw(st.integers(0, 9)) == 0:
        return CharClass((), negated=True)
    ranges = []
    for _ in range(draw(st.integers(1, 3))):
        a, b = draw(st.sampled_from(ALPHABET)), draw(st.sampled_from(ALPHABET))
        ranges.append((min(a, b), max(a, b)))
    return CharClass(tuple(ranges), negated=draw(st.booleans()))


def _nodes(refs: list[str]) -> st.SearchStrategy[Node]:
    leaves: list[st.SearchStrategy[Node]] = [
        st.text(st.sampled_from(ALPHABET), min_size=1, max_size=3).map(Literal),
        _char_classes(),
    ]
    if refs:
        leaves.append(st.sampled_from(refs).map(RuleRef))
    bounds = st.sampled_from([(0, None), (1, None), (0, 1), (2, 2), (1, 3), (3, None), (0, 2000)])

    def extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
        return st.one_of(
            st.lists(children, min_size=2, max_size=3).map(lambda xs: Seq(tuple(xs))),
            st.lists(children, min_size=2, max_size=3).map(lambda xs: Choice(tuple(xs))),
            st.tuples(children, bounds).map(lambda t: Repeat(t[0], *t[1])),
        )

    return st.recursive(st.one_of(leaves), extend, max_leaves=6)


@st.composite
def _grammars(draw: st.DrawFn) -> Grammar:
    names = ["root", *draw(st.lists(st.sampled_from(["start", "item-2", "root-g1"]), unique=True))]
    return Grammar(tuple((name, draw(_nodes(names[i + 1 :]))) for i, name in enumerate(names)))


@settings(max_examples=examples(60), **FUZZ)
@given(grammar=_grammars(), strings=st.lists(st.text(st.sampled_from(ALPHABET), max_size=6)))
def test_random_ir_parses_in_every_dialect_and_engines_agree(
    gbnf_or_none: GbnfVocab | None, grammar: Grammar, strings: list[str]
) -> None:
    _check_dialects(grammar)
    large = any(
        isinstance(node, Repeat) and (node.max or node.min) > 20
        for _, body in grammar.rules
        for node in walk(body)
    )
    # Lark spells x{0,2000} as 2000 alternatives, and llama.cpp's sampler can take
    # minutes over an ambiguous one ((x*){0,2000}): XGrammar reads both texts instead.
    _agree(grammar, strings, None if large else gbnf_or_none, lark_library=not large)


# =============================================================================== responses

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(value: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every path to a value inside ``value`` (the root included)."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    return found


def _replace(value: Any, path: tuple[object, ...], new: object, *, delete: bool) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    if not rest and delete:
        del copy[head]  # type: ignore[arg-type]
    else:
        copy[head] = _replace(value[head], rest, new, delete=delete)  # type: ignore[index]
    return copy


@st.composite
def mutated(draw: st.DrawFn, documents: list[Any]) -> Any:
    """A valid document with up to three values replaced by random JSON, or deleted."""
    doc = draw(st.sampled_from(documents))
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        doc = _replace(doc, path, draw(json_values), delete=bool(path) and draw(st.booleans()))
    return doc


@st.composite
def bodies(draw: st.DrawFn, documents: list[Any]) -> bytes:
    """Bytes a server might send: a (mutated) document, cut short, nested too deep, an
    integer too long to read, invalid UTF-8, or any bytes at all."""
    kind = draw(st.sampled_from(["mutated", "json", "cut", "deep", "long-int", "bytes", "utf8"]))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "deep":
        depth = draw(st.sampled_from([900, 5000, 100_000]))
        opener = draw(st.sampled_from(["[", '{"choices": [', '{"a":']))
        return (opener * depth).encode()
    if kind == "long-int":
        doc = json.dumps(draw(mutated(documents)))
        return doc.replace("1", "1" * 5000, 1).encode() if "1" in doc else b"1" * 5000
    body = json.dumps(draw(mutated(documents))).encode()
    if kind == "cut":
        return body[: draw(st.integers(0, len(body)))]
    if kind == "utf8":
        at = draw(st.integers(0, len(body)))
        return body[:at] + b"\xff\xfe" + body[at:]
    return body


SOURCES = (
    Source(text="The Eiffel Tower was completed in 1889. It is 330 metres tall.", id="e"),
    Source(text="The Louvre is an art museum in Paris.", id="l"),
)
CALL = SegmentCall(
    messages=(ChatMessage("user", "When was the Eiffel Tower completed?"),),
    prefix="The tower [",
    grammar=citation_grammar(2),
    max_tokens=64,
    sources=SOURCES,
    question="When was the Eiffel Tower completed?",
)
ANSWER_JSON = json.dumps(
    {"sentences": [{"text": "It was completed in 1889.", "citations": [1, 2]}]}
)
USAGE = {"prompt_tokens": 12, "completion_tokens": 5}
SERVER_BODIES = [
    {
        "object": "text_completion",
        "choices": [
            {"index": 0, "text": "1] is tall", "finish_reason": "stop", "stop_reason": "]"}
        ],
        "usage": USAGE,
    },
    {
        "object": "chat.completion",
        "choices": [{"message": {"content": "2", "role": "assistant"}, "finish_reason": "length"}],
        "usage": USAGE,
    },
    {"error": {"message": "overloaded"}},
]
RESPONSES_BODIES = [
    {
        "object": "response",
        "status": "completed",
        "output": [
            {"type": "reasoning", "summary": []},
            {"type": "message", "content": [{"type": "output_text", "text": ANSWER_JSON}]},
            {"type": "custom_tool_call", "name": "answer", "input": "It is tall [1]."},
        ],
        "usage": {"input_tokens": 10, "output_tokens": 4},
    },
    {
        "object": "response",
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "output": [
            {"type": "message", "content": [{"type": "output_text", "text": ANSWER_JSON[:30]}]}
        ],
    },
]
CHAT_BODIES = [
    {
        "object": "chat.completion",
        "choices": [
            {
                "finish_reason": "tool_calls",
                "message": {
                    "content": ANSWER_JSON,
                    "refusal": None,
                    "tool_calls": [
                        {"type": "custom", "custom": {"name": "answer", "input": "Tall [2]."}}
                    ],
                },
            }
        ],
        "usage": USAGE,
    }
]


@functools.cache
def _hosted_engine(mode: str, api: str) -> Any:
    """A hosted engine whose client is never called (only its reader is fuzzed)."""
    openai = pytest.importorskip("openai")
    from citebacktrack.backends._openai_hosted import HOSTED_ENGINES

    client = openai.OpenAI(api_key="sk-fuzz", base_url="https://api.openai.test/v1")
    return HOSTED_ENGINES[mode](client=client, model="gpt-5", api=api)  # type: ignore[arg-type]


def _returns_a_result_or_backend_error(read: Callable[[], SegmentResult]) -> None:
    try:
        result = read()
    except BackendError:
        return
    assert isinstance(result, SegmentResult)
    assert isinstance(result.text, str)
    assert result.finish in ("stop", "end", "length")
    assert result.prompt_tokens >= 0
    assert result.completion_tokens >= 0


@settings(max_examples=examples(300), **FUZZ)
@given(body=bodies(SERVER_BODIES), endpoint=st.sampled_from(["completions", "chat"]))
def test_server_responses_give_a_segment_or_a_backend_error(body: bytes, endpoint: str) -> None:
    _returns_a_result_or_backend_error(
        lambda: _parse_response(body, endpoint=endpoint, call=CALL)  # type: ignore[arg-type]
    )


@settings(max_examples=examples(300), **FUZZ)
@given(
    data=st.data(),
    mode=st.sampled_from(["cfg", "json_schema"]),
    api=st.sampled_from(["responses", "chat"]),
)
def test_hosted_responses_give_a_segment_or_a_backend_error(
    data: st.DataObject, mode: str, api: str
) -> None:
    engine = _hosted_engine(mode, api)
    body = data.draw(bodies(RESPONSES_BODIES if api == "responses" else CHAT_BODIES))
    call = CALL if mode == "cfg" else SegmentCall(**{**_call_fields(), "prefix": ""})
    _returns_a_result_or_backend_error(lambda: engine._result(body, call))


def _call_fields() -> dict[str, Any]:
    return {name: getattr(CALL, name) for name in CALL.__dataclass_fields__}


def _cite(doc: int, start: int, end: int) -> dict[str, Any]:
    text = SOURCES[doc].text
    return {
        "type": "char_location",
        "cited_text": text[start:end],
        "document_index": doc,
        "start_char_index": start,
        "end_char_index": end,
    }


ANTHROPIC_MESSAGES = [
    {
        "type": "message",
        "role": "assistant",
        "content": [
            {
                "type": "text",
                "text": "The tower was completed in 1889",
                "citations": [_cite(0, 0, 39)],
            },
            {"type": "text", "text": ". It is near the Louvre", "citations": [_cite(1, 4, 10)]},
            {"type": "thinking", "thinking": "..."},
            {"type": "text", "text": "."},
        ],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 3},
    },
    {
        "type": "message",
        "content": [],
        "stop_reason": "max_tokens",
        "usage": {"input_tokens": 1, "output_tokens": 0},
    },
    {"type": "error", "error": {"type": "overloaded_error"}},
]


def _stream_events(message: dict[str, Any]) -> list[dict[str, Any]]:
    start = {**message, "content": [], "stop_reason": None}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}, {"type": "ping"}]
    for index, block in enumerate(message.get("content", [])):
        opened = {**block, "text": ""} if block.get("type") == "text" else block
        opened.pop("citations", None)
        events.append({"type": "content_block_start", "index": index, "content_block": opened})
        for citation in block.get("citations", []):
            delta = {"type": "citations_delta", "citation": citation}
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        text = block.get("text", "")
        for i in range(0, len(text), 9):
            delta = {"type": "text_delta", "text": text[i : i + 9]}
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        events.append({"type": "content_block_stop", "index": index})
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": message.get("stop_reason")},
            "usage": {"output_tokens": 7},
        }
    )
    events.append({"type": "message_stop"})
    return events


@functools.cache
def _anthropic_engine() -> Any:
    anthropic = pytest.importorskip("anthropic")
    from citebacktrack.backends.anthropic import AnthropicEngine

    client = anthropic.Anthropic(api_key="sk-ant-fuzz", base_url="https://api.anthropic.test")
    return AnthropicEngine(client=client, model="claude-sonnet-4-6", max_retries=0)


@settings(max_examples=examples(300), **FUZZ)
@given(body=bodies(ANTHROPIC_MESSAGES))
def test_anthropic_messages_give_a_segment_or_a_backend_error(body: bytes) -> None:
    from citebacktrack.backends._anthropic_messages import parse_message as _parse_message

    engine = _anthropic_engine()
    call = SegmentCall(**{**_call_fields(), "prefix": ""})
    _returns_a_result_or_backend_error(lambda: engine._result(_parse_message(body), call))


@settings(max_examples=examples(300), **FUZZ)
@given(data=st.data())
def test_anthropic_streams_give_a_segment_or_a_backend_error(data: st.DataObject) -> None:
    from citebacktrack.backends._anthropic_messages import StreamAssembler as _StreamAssembler

    engine = _anthropic_engine()
    call = SegmentCall(**{**_call_fields(), "prefix": ""})
    events = _stream_events(data.draw(st.sampled_from(ANTHROPIC_MESSAGES[:2])))
    # Replace, delete, duplicate or reorder a few events, or corrupt parts of them.
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.integers(0, len(events) - 1))
        match data.draw(st.sampled_from(["mutate", "json", "delete", "duplicate", "swap"])):
            case "mutate":
                events[at] = data.draw(mutated([events[at]]))
            case "json":
                value = data.draw(json_values)
                events[at] = value if isinstance(value, dict) else {"type": value}
            case "delete":
                del events[at]
            case "duplicate":
                events.insert(at, events[at])
            case _:
                other = data.draw(st.integers(0, len(events) - 1))
                events[at], events[other] = events[other], events[at]
        if not events:
            break

    def read() -> SegmentResult:
        assembler = _StreamAssembler()
        for event in events:
            if not isinstance(event, dict):
                event = {"type": event}
            assembler.feed(event)
        return engine._result(assembler.reply(), call)

    _returns_a_result_or_backend_error(read)


# =============================================================================== regressions

HUGE_INT = (
    b'{"choices": [{"text": "a", "finish_reason": "stop"}], "usage": {"prompt_tokens": '
    + b"1" * 5000
    + b"}}"
)
DEEP = b"[" * 100_000


def _readers() -> dict[str, Callable[[bytes], object]]:
    from citebacktrack.backends._anthropic_messages import parse_message as _parse_message

    call = SegmentCall(**{**_call_fields(), "prefix": ""})
    return {
        "server": lambda body: _parse_response(body, endpoint="completions", call=CALL),
        "responses": lambda body: _hosted_engine("cfg", "responses")._result(body, CALL),
        "chat": lambda body: _hosted_engine("json_schema", "chat")._result(body, call),
        "anthropic": _parse_message,
    }


@pytest.mark.parametrize("body", [HUGE_INT, DEEP], ids=["int-of-5000-digits", "nested-100000-deep"])
@pytest.mark.parametrize("reader", ["server", "responses", "chat", "anthropic"])
def test_json_python_cannot_read_is_a_backend_error(reader: str, body: bytes) -> None:
    """``json.loads`` raises ValueError (not JSONDecodeError) for an integer of more than
    4300 digits and RecursionError for deep nesting: both escaped every reader."""
    with pytest.raises(BackendError, match="not JSON"):
        _readers()[reader](body)


def test_a_json_schema_answer_with_an_unreadable_integer_is_a_backend_error() -> None:
    answer = '{"sentences": [{"text": "It is tall.", "citations": [' + "1" * 5000 + "]}]}"
    body = {**CHAT_BODIES[0]}
    body["choices"] = [{"finish_reason": "stop", "message": {"content": answer}}]
    engine = _hosted_engine("json_schema", "chat")
    with pytest.raises(BackendError, match="an answer that is not JSON"):
        engine._result(json.dumps(body).encode(), SegmentCall(**{**_call_fields(), "prefix": ""}))


@pytest.mark.parametrize("tool_calls", [5, True, "answer"])
def test_chat_tool_calls_that_are_not_a_list_are_a_backend_error(tool_calls: object) -> None:
    body = json.loads(json.dumps(CHAT_BODIES[0]))
    body["choices"][0]["message"]["tool_calls"] = tool_calls
    engine = _hosted_engine("cfg", "chat")
    with pytest.raises(BackendError, match="not a list"):
        engine._result(json.dumps(body).encode(), CALL)


def test_an_excerpt_of_json_nested_too_deep_to_print_is_still_text() -> None:
    from citebacktrack.backends._sdk import excerpt as _excerpt

    nested: list[object] = []
    for _ in range(100_000):
        nested = [nested]
    assert _excerpt(nested).startswith("[[")


@pytest.mark.parametrize(
    "node",
    [
        Repeat(Repeat(Literal("a")), 0, 2000),  # was (\"a\"*){0,2000}
        Repeat(Repeat(Literal("a"), 0, 2000), 0, 1),  # was (\"a\"{0,2000})?
        Repeat(Seq((Literal("b"), Repeat(Literal("a"), 0, 2000)))),  # was (\"b\" \"a\"{0,2000})*
    ],
)
def test_gbnf_prints_a_group_that_holds_a_counted_repeat_as_a_rule(node: Node) -> None:
    """llama.cpp refuses a parenthesised group whose generated rules times its repetition
    pass 2000; such a group is now a rule of its own (llama.cpp parses it; XGrammar reads
    the EBNF and Lark texts alike)."""
    grammar = Grammar((("root", node),))
    assert "root-g1 ::= " in emit(grammar, Dialect.GBNF)
    _check_dialects(grammar)
    _agree(grammar, ["", "a", "aaa", "b", "ba", "bab", "c"], None, lark_library=False)


@pytest.mark.parametrize(
    "ranges",
    [(("^", "a"), ("a", "a")), (("^", "^"),), (("^", "^"), ("b", "c")), (("^", "z"),)],
)
def test_a_lark_class_starting_with_a_caret_reads_the_same_in_xgrammar(
    ranges: tuple[tuple[str, str], ...],
) -> None:
    """XGrammar's Lark reader (vLLM's xgrammar backend) took ``/[\\^-a]/`` for the negated
    ``[^-a]``, so it accepted ``/``: the caret now goes last."""
    for node in (CharClass(ranges), Repeat(CharClass(ranges), 1, 3)):
        grammar = Grammar((("root", Choice((Literal("["), node))),))
        _check_dialects(grammar)
        _agree(grammar, ["/", "^", "_", "a", "b", "z", "^^", "[", ""], None)


@pytest.mark.parametrize(
    "ranges",
    [(("é", "é"), ("a", "b")), (("\x00", "\x00"), ("a", "f")), (("\x01", "\x01"), ("0", "9"))],
)
def test_a_lark_class_reads_the_same_in_xgrammar_whatever_follows_an_escape(
    ranges: tuple[tuple[str, str], ...],
) -> None:
    """``/[\\u00E9a-b]/`` was refused by XGrammar's Lark reader (U+0E9A-b, a range that
    runs backwards): characters are written as themselves now, NUL last."""
    grammar = Grammar((("root", CharClass(ranges)),))
    _check_dialects(grammar)
    _agree(grammar, ["é", "a", "b", "c", "f", "0", "\x00", "\x01", "\u0e9a"], None)
