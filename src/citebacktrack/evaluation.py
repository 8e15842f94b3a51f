"""Citation and answer metrics over QA data with gold sources, and the ``eval`` runner.

The metrics are computed from an answer's *text* alone, independently of the validator
that steers decoding, so an unconstrained model (which may write ``[11]`` or ``[1, 2]``)
and a peer library are judged exactly like citebacktrack's own answers::

    from citebacktrack.evaluation import evaluate, load_dataset, standard_systems
    examples = load_dataset("hotpotqa_dev186.json")
    report = evaluate(examples, standard_systems(backend, ["raw", "validated"]))
    print(report.to_markdown())

Definitions (per answer; a summary is the mean over answers):

* **marker**: any bracketed number or number list, ``[3]``, ``[11]``, ``[1, 2]``, ``[1-3]``.
  A marker is *valid* when it is exactly ``[N]`` with ``1 <= N <= len(sources)``.
* **non-empty**: a word character is left after removing the markers.
* **cited**: at least one valid marker.
* **validity**: valid markers / markers (1.0 for an answer without markers).
* **precision** / **recall**: with ``C`` the set of validly cited source numbers and ``G``
  the gold ones, ``|C ∩ G| / |C|`` and ``|C ∩ G| / |G|``; both 0 when ``C`` is empty.
  Micro (pooled) figures divide the summed intersections by the summed ``|C|`` / ``|G|``.
* **hit**: the SQuAD-normalised gold answer (lower case, ASCII punctuation and the articles
  a/an/the dropped, whitespace collapsed) occurs in the normalised answer text with markers
  removed; a yes/no gold answer must occur as a whole word.
* **cites/sentence**: markers / sentences, sentences split after ``.``, ``!`` or ``?``
  followed by whitespace (0 for an empty answer).
* **seconds**: wall clock around one system call, end to end (prefill included).
* From the decoder's trace, when the system has one: rejections, rollbacks, tokens wasted,
  kept tokens and the stop reason.

Records are split deterministically for tuning: an id is in ``holdout`` when
``int(sha256(id).hexdigest(), 16) % 3 == 0``, else in ``tune`` (about a third held out).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import string
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from citebacktrack.backends.base import Backend, ChatMessage
from citebacktrack.decoding.budgets import Budgets
from citebacktrack.errors import (
    BackendError,
    CitebacktrackError,
    ConfigurationError,
    DatasetError,
    MissingDependencyError,
)
from citebacktrack.orchestrator import Citeformer
from citebacktrack.types import Answer, Source, Trace

__all__ = [
    "DEFAULT_SYSTEMS",
    "SPLITS",
    "SYSTEM_NAMES",
    "AnswerMetrics",
    "AnswerRecord",
    "EvaluationReport",
    "Example",
    "Marker",
    "PeerCiteformer",
    "System",
    "SystemOutput",
    "SystemSummary",
    "TraceSummary",
    "answer_hit",
    "citeformer_system",
    "count_sentences",
    "evaluate",
    "find_markers",
    "load_dataset",
    "normalize_answer",
    "parse_examples",
    "peer_python",
    "raw_system",
    "render_prompt",
    "score_answer",
    "split_of",
    "standard_systems",
    "strip_markers",
    "summarize",
    "write_plots",
]

Split = Literal["tune", "holdout"]
SPLITS: tuple[Split, ...] = ("tune", "holdout")
"""The two parts of a dataset: ``tune`` (about two thirds) and ``holdout`` (a third)."""

SYSTEM_NAMES = ("raw", "grammar", "validated", "segment", "citeformer")
"""Systems the ``eval`` command knows."""

DEFAULT_SYSTEMS = ("raw", "grammar", "validated")
"""Systems run by default (``citeformer`` is added when a peer virtualenv is given)."""


# ---------------------------------------------------------------------------- dataset


@dataclass(frozen=True, slots=True, kw_only=True)
class Example:
    """One question with its sources, gold answer and gold (1-based) source numbers."""

    id: str
    question: str
    answer: str
    sources: tuple[Source, ...]
    gold: tuple[int, ...]

    @property
    def split(self) -> Split:
        """``tune`` or ``holdout`` (see :func:`split_of`)."""
        return split_of(self.id)


def split_of(example_id: str) -> Split:
    """``holdout`` when ``int(sha256(id), 16) % 3 == 0``, else ``tune``: deterministic,
    independent of the dataset's order and size, about a third held out."""
    digest = hashlib.sha256(example_id.encode("utf-8")).hexdigest()
    return "holdout" if int(digest, 16) % 3 == 0 else "tune"


def load_dataset(path: str | os.PathLike[str]) -> list[Example]:
    """Read a JSON list of QA records (see :func:`parse_examples` for the two formats).

    Raises:
        DatasetError: the file is missing or unreadable, not JSON, or a record is malformed.
    """
    file = Path(path)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise DatasetError(f"dataset {str(path)!r} {what}; pass the path of a JSON file")
    try:
        raw = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"dataset {str(path)!r} cannot be read as UTF-8 text: {exc}") from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"dataset {str(path)!r} is not JSON ({exc.msg} at line {exc.lineno}, column "
            f"{exc.colno}); pass a JSON list of records"
        ) from exc
    return parse_examples(data, origin=str(path))


def parse_examples(data: object, *, origin: str = "dataset") -> list[Example]:
    """Turn a decoded JSON list into examples; the format is detected per record.

    * citebacktrack's format: ``{"id", "question", "answer", "sources": [{"title", "text"}],
      "gold": [1-based source numbers]}``;
    * HotpotQA's distractor format: ``{"_id", "question", "answer", "supporting_facts":
      [[title, sentence_index], ...], "context": [[title, [sentence, ...]], ...]}``: each
      context paragraph is a source (sentences joined with a space) and gold holds the
      positions of the paragraphs whose titles ``supporting_facts`` names.

    Raises:
        DatasetError: not a list, an empty list, or a record that is malformed (the message
            names the record by position and id).
    """
    if not isinstance(data, list):
        raise DatasetError(
            f"{origin}: expected a JSON list of records, got a JSON {_json_type(data)}"
        )
    if not data:
        raise DatasetError(f"{origin}: the list of records is empty; nothing to evaluate")
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for position, record in enumerate(data, start=1):
        example = _parse_record(record, position, origin)
        if example.id in seen:
            raise DatasetError(
                f"{origin}: records {seen[example.id]} and {position} share the id "
                f"{example.id!r}; ids must be unique"
            )
        seen[example.id] = position
        examples.append(example)
    return examples


_PLAIN_FIELDS = ("id", "question", "answer", "sources", "gold")
_HOTPOT_FIELDS = ("_id", "question", "answer", "supporting_facts", "context")


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _parse_record(record: object, position: int, origin: str) -> Example:
    if not isinstance(record, dict):
        raise DatasetError(
            f"{origin}: record {position} is a JSON {_json_type(record)}, not an object"
        )
    hotpot = "_id" in record or "context" in record or "supporting_facts" in record
    key = "_id" if hotpot else "id"
    name = f"record {position}" + (
        f" (id {record[key]!r})" if isinstance(record.get(key), str) else ""
    )

    def fail(problem: str, fix: str) -> DatasetError:
        return DatasetError(f"{origin}: {name} {problem}; {fix}")

    required = _HOTPOT_FIELDS if hotpot else _PLAIN_FIELDS
    missing = [k for k in required if k not in record]
    if missing:
        layout = "HotpotQA distractor" if hotpot else "citebacktrack"
        raise fail(
            f"lacks {', '.join(repr(k) for k in missing)}",
            f"a record in the {layout} format needs {', '.join(required)}",
        )
    for k in (key, "question"):
        if not isinstance(record[k], str) or not record[k].strip():
            raise fail(f"has {k!r} = {record[k]!r}", "it must be a non-empty string")
    if not isinstance(record["answer"], str):
        raise fail(f"has answer = {record['answer']!r}", "the gold answer must be a string")
    if hotpot:
        sources, gold = _hotpot_sources(record, fail)
    else:
        sources, gold = _plain_sources(record, fail)
    if not gold:
        raise fail("has no gold source", "list at least one supporting source")
    for number in gold:
        if not 1 <= number <= len(sources):
            raise fail(
                f"has gold source {number} but {len(sources)} source(s)",
                "gold numbers are 1-based positions in its sources",
            )
    return Example(
        id=record[key],
        question=record["question"],
        answer=record["answer"],
        sources=sources,
        gold=gold,
    )


def _plain_sources(
    record: dict[str, Any], fail: Callable[[str, str], DatasetError]
) -> tuple[tuple[Source, ...], tuple[int, ...]]:
    raw_sources, raw_gold = record["sources"], record["gold"]
    if not isinstance(raw_sources, list) or not raw_sources:
        raise fail("has no sources", "'sources' must be a non-empty list of {title, text}")
    sources: list[Source] = []
    for number, item in enumerate(raw_sources, start=1):
        if not isinstance(item, dict):
            raise fail(f"has source {number} = {item!r}", "each source is {title, text}")
        text, title = item.get("text"), item.get("title", "")
        if not isinstance(text, str) or not text.strip():
            raise fail(f"has source {number} without text", "give each source a 'text' string")
        if not isinstance(title, str):
            raise fail(f"has source {number} with title {title!r}", "a title is a string")
        sources.append(Source(title=title, text=text))
    if not isinstance(raw_gold, list) or not all(
        isinstance(g, int) and not isinstance(g, bool) for g in raw_gold
    ):
        raise fail(f"has gold = {raw_gold!r}", "'gold' must be a list of 1-based integers")
    return tuple(sources), tuple(dict.fromkeys(raw_gold))


def _hotpot_sources(
    record: dict[str, Any], fail: Callable[[str, str], DatasetError]
) -> tuple[tuple[Source, ...], tuple[int, ...]]:
    context, facts = record["context"], record["supporting_facts"]
    if not isinstance(context, list) or not context:
        raise fail("has no context", "'context' must be a list of [title, [sentences]]")
    sources: list[Source] = []
    positions: dict[str, int] = {}
    for number, item in enumerate(context, start=1):
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], list)
            or not all(isinstance(s, str) for s in item[1])
        ):
            raise fail(
                f"has context paragraph {number} = {str(item)[:80]!r}",
                "each paragraph is [title, [sentence, ...]]",
            )
        title, sentences = item
        text = " ".join(s.strip() for s in sentences if s.strip())
        if not text:
            raise fail(f"has context paragraph {number} ({title!r}) without text", "drop it")
        positions.setdefault(title, number)
        sources.append(Source(title=title, text=text))
    if not isinstance(facts, list):
        raise fail("has supporting_facts that is not a list", "use [[title, sentence], ...]")
    gold: list[int] = []
    for fact in facts:
        if not isinstance(fact, list | tuple) or not fact or not isinstance(fact[0], str):
            raise fail(f"has supporting fact {fact!r}", "each fact is [title, sentence_index]")
        if fact[0] not in positions:
            raise fail(
                f"names the supporting title {fact[0]!r}, which is not in its context",
                "every supporting_facts title must be a context paragraph title",
            )
        gold.append(positions[fact[0]])
    return tuple(sources), tuple(sorted(set(gold)))


# ---------------------------------------------------------------------------- metrics

_MARKER = re.compile(r"\[\s*\d+(?:\s*(?:,|;|-|–|—)\s*\d+)*\s*\]")
_VALID = re.compile(r"\[([1-9]\d*)\]")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\w")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True, slots=True)
class Marker:
    """One bracketed number (list) in an answer; ``source_index`` is None when invalid."""

    start: int
    end: int
    text: str
    source_index: int | None


def find_markers(text: str, n_sources: int) -> list[Marker]:
    """Every ``[N]``-like marker in ``text``; valid only as ``[N]`` with 1 <= N <= n_sources.

    ``[1, 2]``, ``[1-3]``, ``[0]``, ``[01]`` and ``[N]`` past the last source are invalid.
    """
    markers: list[Marker] = []
    for match in _MARKER.finditer(text):
        valid = _VALID.fullmatch(match.group())
        number = int(valid.group(1)) if valid else None
        if number is not None and number > n_sources:
            number = None
        markers.append(Marker(match.start(), match.end(), match.group(), number))
    return markers


def strip_markers(text: str) -> str:
    """``text`` with every marker (valid or not) removed."""
    return _MARKER.sub("", text)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and a/an/the, collapse spaces."""
    lowered = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", lowered).split())


def answer_hit(text: str, gold_answer: str) -> bool:
    """Whether the normalised gold answer occurs in the normalised answer (markers removed).

    A yes/no gold answer must occur as a whole word (``yes`` does not hit ``eyes``); others
    as a substring. An answer whose gold normalises to nothing never hits.
    """
    gold = normalize_answer(gold_answer)
    answer = normalize_answer(strip_markers(text))
    if not gold:
        return False
    if gold in ("yes", "no"):
        return re.search(rf"\b{gold}\b", answer) is not None
    return gold in answer


def count_sentences(text: str) -> int:
    """Sentences in ``text``: pieces between ``[.!?]`` + whitespace that hold a word
    character outside markers."""
    pieces = _SENTENCE_BREAK.split(text.strip())
    return sum(1 for piece in pieces if _WORD.search(strip_markers(piece)))


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerMetrics:
    """The text-only metrics of one answer (see the module docstring)."""

    non_empty: bool
    cited: bool
    markers: int
    valid_markers: int
    validity: float
    cited_sources: tuple[int, ...]
    correct_sources: int
    """``|cited ∩ gold|``."""
    gold_sources: int
    precision: float
    recall: float
    hit: bool
    sentences: int
    cites_per_sentence: float


def score_answer(
    text: str, *, n_sources: int, gold: Iterable[int], gold_answer: str
) -> AnswerMetrics:
    """Score one answer text against the gold sources and the gold answer."""
    markers = find_markers(text, n_sources)
    valid = [m.source_index for m in markers if m.source_index is not None]
    cited = set(valid)
    gold_set = set(gold)
    correct = len(cited & gold_set)
    sentences = count_sentences(text)
    return AnswerMetrics(
        non_empty=_WORD.search(strip_markers(text)) is not None,
        cited=bool(cited),
        markers=len(markers),
        valid_markers=len(valid),
        validity=len(valid) / len(markers) if markers else 1.0,
        cited_sources=tuple(sorted(cited)),
        correct_sources=correct,
        gold_sources=len(gold_set),
        precision=correct / len(cited) if cited else 0.0,
        recall=correct / len(gold_set) if cited and gold_set else 0.0,
        hit=answer_hit(text, gold_answer),
        sentences=sentences,
        cites_per_sentence=len(markers) / sentences if sentences else 0.0,
    )


# ---------------------------------------------------------------------------- systems


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemOutput:
    """What a system returned for one example.

    ``seconds`` overrides the wall clock that :func:`evaluate` measures around the call
    (for a system that times itself, such as a peer in another process).
    """

    text: str
    trace: Trace | None = None
    seconds: float | None = None
    origins: tuple[str, ...] = ()
    """How each cited sentence was obtained (``SentenceOrigin`` values), in order."""


System = Callable[[Example], SystemOutput]
"""Answers one example."""


def citeformer_system(cf: Citeformer) -> System:
    """A system answering with ``cf.generate`` (its trace is kept)."""

    def run(example: Example) -> SystemOutput:
        answer = cf.generate(example.question, example.sources)
        return SystemOutput(text=answer.text, trace=answer.trace, origins=sentence_origins(answer))

    return run


def sentence_origins(answer: Answer) -> tuple[str, ...]:
    """The origin of each cited sentence of ``answer`` (one per sentence, in order)."""
    seen: dict[int, str] = {}
    for citation in answer.citations:
        seen.setdefault(citation.sentence_start, citation.origin.value)
    return tuple(seen.values())


def raw_system(cf: Citeformer) -> System:
    """The model unconstrained on ``cf``'s prompt: no grammar, no marker checks."""

    def run(example: Example) -> SystemOutput:
        request = cf.build_request(example.question, example.sources)
        free = dataclasses.replace(request, grammar=None, validator=None)
        answer = cf.generate(free)
        return SystemOutput(text=answer.text, trace=answer.trace)

    return run


def standard_systems(
    backend: Backend,
    names: Sequence[str] = DEFAULT_SYSTEMS,
    *,
    budgets: Budgets | None = None,
    peer: PeerCiteformer | None = None,
    segment_backend: Backend | None = None,
) -> dict[str, System]:
    """The named systems over one backend and one prompt.

    ``raw``: unconstrained; ``grammar``: ``Citeformer(backend, scorer=None)``;
    ``validated``: ``Citeformer(backend)``; ``segment``: ``Citeformer(segment_backend)``,
    the same validator over segment-level backtracking (a server serving the same model);
    ``citeformer``: ``peer`` on the same prompt.

    Raises:
        ConfigurationError: an unknown name, ``citeformer`` without a ``peer`` or
            ``segment`` without a ``segment_backend``.
    """
    budgets = budgets or Budgets()
    validated = Citeformer(backend, budgets=budgets)
    systems: dict[str, System] = {}
    for name in names:
        if name == "raw":
            systems[name] = raw_system(validated)
        elif name == "grammar":
            systems[name] = citeformer_system(Citeformer(backend, scorer=None, budgets=budgets))
        elif name == "validated":
            systems[name] = citeformer_system(validated)
        elif name == "segment":
            if segment_backend is None:
                raise ConfigurationError(
                    "the 'segment' system needs a segment-level backend (an OpenAIBackend on "
                    "a server serving the same model)"
                )
            systems[name] = citeformer_system(Citeformer(segment_backend, budgets=budgets))
        elif name == "citeformer":
            if peer is None:
                raise ConfigurationError(
                    "the 'citeformer' system needs the peer's virtualenv (PeerCiteformer)"
                )
            systems[name] = peer.system(validated)
        else:
            raise ConfigurationError(
                f"unknown system {name!r}; choose from {', '.join(SYSTEM_NAMES)}"
            )
    return systems


def render_prompt(backend: Backend, messages: Sequence[ChatMessage]) -> str:
    """The prompt text ``backend`` prefills for ``messages``, for an engine that takes text.

    On llama.cpp it is the exact text (chat template applied, special tokens written out);
    on other backends a plain ``role: content`` rendering.
    """
    runtime = getattr(backend, "runtime", None)
    llama = getattr(runtime, "llama", None)
    if runtime is not None and llama is not None:
        tokens = runtime.encode_chat(messages)
        return bytes(llama.detokenize(tokens, special=True)).decode("utf-8", errors="replace")
    turns = [f"{m.role}: {m.content}" for m in messages]
    return "\n\n".join([*turns, "assistant: "])


PEER_SETUP = (
    "python3 -m venv benchmarks/.peer-venv && benchmarks/.peer-venv/bin/pip install "
    "citeformer==0.3.1 llama-cpp-python==0.3.36"
)
"""How to create the peer's virtualenv."""


def peer_python(venv: str | os.PathLike[str] | None) -> Path | None:
    """The Python of the peer virtualenv ``venv`` (else ``$CITEBACKTRACK_PEER_VENV``), or
    None when neither is given or it has no ``bin/python``."""
    chosen = venv if venv is not None else os.environ.get("CITEBACKTRACK_PEER_VENV")
    if not chosen:
        return None
    python = Path(chosen) / "bin" / "python"
    return python if python.is_file() else None


_PEER_SCRIPT = r"""
import json, os, sys, time
proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
os.dup2(2, 1)  # anything the engine prints goes to stderr, never into the protocol
sys.stdout = sys.stderr
spec = json.loads(sys.stdin.readline())
import citeformer
from citeformer.backends.llamacpp import LlamaCppBackend
from citeformer.core import Policy, Source
backend = LlamaCppBackend(spec["model_path"], n_ctx=spec["n_ctx"], n_gpu_layers=0)
version = getattr(citeformer, "__version__", "unknown")
proto.write(json.dumps({"ready": True, "version": version}) + "\n")
for line in sys.stdin:
    item = json.loads(line)
    sources = [
        Source(metadata={"id": f"s{i}", "type": "webpage", "title": s["title"]}, content=s["text"])
        for i, s in enumerate(item["sources"], start=1)
    ]
    start = time.perf_counter()
    try:
        out = backend.generate(item["prompt"], sources, Policy.REQUIRED,
                               max_new_tokens=spec["max_new_tokens"], temperature=0.0)
        text = out if isinstance(out, str) else str(getattr(out, "text", out))
        reply = {"text": text, "seconds": time.perf_counter() - start}
    except Exception as exc:
        reply = {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - start}
    proto.write(json.dumps(reply) + "\n")
"""


class PeerCiteformer:
    """citeformer 0.3.1 in its own virtualenv and one long-lived process (model loaded once).

    Each call sends the prompt text citebacktrack would prefill (see :func:`render_prompt`)
    and the same sources; the peer answers with ``Policy.REQUIRED``, greedy. Its seconds
    are timed inside the peer around its ``generate`` (prefill included, IPC excluded).

    Args:
        python: the peer virtualenv's Python.
        model_path: the GGUF file the peer loads (the same as citebacktrack's).
        n_ctx: the peer's context window.
        max_new_tokens: the peer's answer budget.
        env: environment of the peer process (default: this one's).
    """

    def __init__(
        self,
        python: str | os.PathLike[str],
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int = 8192,
        max_new_tokens: int = 160,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.python = Path(python)
        self.spec = {
            "model_path": str(model_path),
            "n_ctx": n_ctx,
            "max_new_tokens": max_new_tokens,
        }
        self.env = dict(env) if env is not None else None
        self.version: str | None = None
        self._process: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self._process is not None:
            if self._process.poll() is None:
                return self._process
            raise self._died(" earlier")
        # Closed in close(); it outlives this method, so no context manager.
        self._stderr = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")  # noqa: SIM115
        try:
            self._process = subprocess.Popen(  # noqa: S603 - our script, the user's venv
                [str(self.python), "-c", _PEER_SCRIPT],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                text=True,
                encoding="utf-8",
                env=self.env,
            )
        except OSError as exc:
            self._stderr.close()
            self._stderr = None
            raise BackendError(f"cannot start the peer Python {str(self.python)!r}: {exc}") from exc
        ready = self._exchange(self.spec)
        self.version = str(ready.get("version", "unknown"))
        return self._process

    def _exchange(self, message: Mapping[str, Any]) -> dict[str, Any]:
        process = self._process
        assert process is not None
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            process.stdin.write(json.dumps(message) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise self._died("")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise BackendError(f"the peer answered {line[:200]!r}, not a JSON object")
        return reply

    def _died(self, when: str) -> BackendError:
        tail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            tail = self._stderr.read()[-2000:]
        code: int | None = None
        if self._process is not None:
            try:
                code = self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
        return BackendError(
            f"the peer citeformer process ({self.python}) exited{when} with code {code}; "
            f"is citeformer==0.3.1 installed there ({PEER_SETUP})? Its stderr ends:\n{tail}"
        )

    def answer(self, prompt: str, sources: Sequence[Source]) -> SystemOutput:
        """Ask the peer; raises :class:`BackendError` if it fails."""
        self._start()
        reply = self._exchange(
            {"prompt": prompt, "sources": [{"title": s.title, "text": s.text} for s in sources]}
        )
        if "error" in reply:
            raise BackendError(f"citeformer failed: {reply['error']}")
        return SystemOutput(text=str(reply["text"]).strip(), seconds=float(reply["seconds"]))

    def system(self, cf: Citeformer) -> System:
        """A system asking the peer with ``cf``'s prompt for each example."""

        def run(example: Example) -> SystemOutput:
            request = cf.build_request(example.question, example.sources)
            return self.answer(render_prompt(cf.backend, request.messages), request.sources)

        return run

    def close(self) -> None:
        """End the peer process (idempotent)."""
        process, self._process = self._process, None
        if process is not None:
            if process.stdin is not None:
                process.stdin.close()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> PeerCiteformer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- runs


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceSummary:
    """The decoder's accounting for one answer."""

    rejections: int
    rollbacks: int
    tokens_wasted: int
    kept_tokens: int
    stop_reason: str

    @classmethod
    def of(cls, trace: Trace) -> TraceSummary:
        return cls(
            rejections=trace.rejections,
            rollbacks=trace.backtracks,
            tokens_wasted=trace.tokens_wasted,
            kept_tokens=trace.kept_tokens,
            stop_reason=trace.stop_reason.value,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerRecord:
    """One system's answer to one example, scored. ``error`` is set when the system
    raised a :class:`CitebacktrackError` (the answer then counts as empty)."""

    id: str
    split: Split
    system: str
    text: str
    metrics: AnswerMetrics
    seconds: float
    trace: TraceSummary | None = None
    error: str | None = None
    origins: tuple[str, ...] = ()
    """How each cited sentence was obtained: ``model``, ``copy`` or ``quote``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemSummary:
    """Means over one system's answers (trace figures over the answers that have a trace)."""

    system: str
    answers: int
    errors: int
    non_empty: float
    cited: float
    validity: float
    precision: float
    recall: float
    micro_precision: float
    micro_recall: float
    hit: float
    cites_per_sentence: float
    seconds: float
    rejections: float | None
    rollbacks: float | None
    tokens_wasted: float | None
    kept_tokens: float | None
    stop_reasons: dict[str, int] = field(default_factory=dict)
    origins: dict[str, float] = field(default_factory=dict)
    """Share of cited sentences by origin (``model``, ``copy``, ``quote``); empty when
    the system reports none."""


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def summarize(system: str, records: Sequence[AnswerRecord]) -> SystemSummary:
    """Summarise ``records`` (one system's answers)."""
    metrics = [r.metrics for r in records]
    traces = [r.trace for r in records if r.trace is not None]

    def trace_mean(attribute: str) -> float | None:
        return _mean([getattr(t, attribute) for t in traces]) if traces else None

    cited = sum(len(m.cited_sources) for m in metrics)
    correct = sum(m.correct_sources for m in metrics)
    gold = sum(m.gold_sources for m in metrics)
    return SystemSummary(
        system=system,
        answers=len(records),
        errors=sum(1 for r in records if r.error is not None),
        non_empty=_mean([float(m.non_empty) for m in metrics]),
        cited=_mean([float(m.cited) for m in metrics]),
        validity=_mean([m.validity for m in metrics]),
        precision=_mean([m.precision for m in metrics]),
        recall=_mean([m.recall for m in metrics]),
        micro_precision=correct / cited if cited else 0.0,
        micro_recall=correct / gold if gold else 0.0,
        hit=_mean([float(m.hit) for m in metrics]),
        cites_per_sentence=_mean([m.cites_per_sentence for m in metrics]),
        seconds=_mean([r.seconds for r in records]),
        rejections=trace_mean("rejections"),
        rollbacks=trace_mean("rollbacks"),
        tokens_wasted=trace_mean("tokens_wasted"),
        kept_tokens=trace_mean("kept_tokens"),
        stop_reasons=dict(sorted(Counter(t.stop_reason for t in traces).items())),
        origins=_shares([origin for r in records for origin in r.origins]),
    )


def _shares(values: Sequence[str]) -> dict[str, float]:
    """Each distinct value's share of ``values``, most common first."""
    counts = Counter(values)
    return {value: count / len(values) for value, count in counts.most_common()}


_COLUMNS = (
    ("answers", "n", "{:d}"),
    ("non_empty", "non-empty", "{:.0%}"),
    ("cited", "cited", "{:.0%}"),
    ("validity", "validity", "{:.3f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("hit", "hit", "{:.0%}"),
    ("cites_per_sentence", "cites/sentence", "{:.2f}"),
    ("rejections", "rejections", "{:.2f}"),
    ("rollbacks", "rollbacks", "{:.2f}"),
    ("tokens_wasted", "wasted tokens", "{:.1f}"),
    ("seconds", "s/answer", "{:.2f}"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationReport:
    """Every scored answer, and summaries per split (``all``, ``tune``, ``holdout``)."""

    records: tuple[AnswerRecord, ...]
    systems: tuple[str, ...]
    summaries: dict[str, dict[str, SystemSummary]]
    """split -> system -> summary; ``all`` plus each split that has records."""

    def to_dict(self, **meta: Any) -> dict[str, Any]:
        """A JSON-ready dict: ``meta``, ``systems``, ``summary`` and ``answers``."""
        return {
            **meta,
            "systems": list(self.systems),
            "summary": {
                split: {name: dataclasses.asdict(s) for name, s in by_system.items()}
                for split, by_system in self.summaries.items()
            },
            "answers": [dataclasses.asdict(r) for r in self.records],
        }

    def to_markdown(self) -> str:
        """One Markdown table per split (rows: systems), with stop reasons under each."""
        parts: list[str] = []
        splits = [s for s in self.summaries if s != "all" or len(self.summaries) > 2]
        for split in splits:
            by_system = self.summaries[split]
            count = len({r.id for r in self.records if split in ("all", r.split)})
            parts.append(f"### {split} ({count} questions)\n")
            parts.append("| system | " + " | ".join(c[1] for c in _COLUMNS) + " |")
            parts.append("|---" * (len(_COLUMNS) + 1) + "|")
            for name, summary in by_system.items():
                cells = []
                for attribute, _, fmt in _COLUMNS:
                    value = getattr(summary, attribute)
                    cells.append("—" if value is None else fmt.format(value))
                parts.append(f"| {name} | " + " | ".join(cells) + " |")
            notes = []
            for name, summary in by_system.items():
                stops = ", ".join(f"{k} {v}" for k, v in summary.stop_reasons.items()) or "—"
                errors = f", {summary.errors} error(s)" if summary.errors else ""
                origins = ", ".join(f"{k} {v:.0%}" for k, v in summary.origins.items())
                origins = f"; cited sentences: {origins}" if origins else ""
                notes.append(
                    f"- {name}: micro precision {summary.micro_precision:.3f}, micro recall "
                    f"{summary.micro_recall:.3f}; stop reasons: {stops}{errors}{origins}"
                )
            parts.append("")
            parts.extend(notes)
            parts.append("")
        return "\n".join(parts)


def evaluate(
    examples: Sequence[Example],
    systems: Mapping[str, System],
    *,
    on_record: Callable[[AnswerRecord], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> EvaluationReport:
    """Run every system on every example and score the answers.

    Examples are the outer loop (each example is answered by every system in turn, the
    order rotated by one system per example), so drift in the host's speed and any
    warm-cache advantage of going first or last hit every system alike. A system that raises a
    :class:`CitebacktrackError` for one example gets an empty answer with the error
    recorded; other exceptions propagate.

    Args:
        examples: the questions (see :func:`load_dataset`).
        systems: name -> system, in report order.
        on_record: called after each answer (for progress).
        clock: seconds, for timing each call.
    """
    records: list[AnswerRecord] = []
    names = list(systems)
    for number, example in enumerate(examples):
        shift = number % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            system = systems[name]
            error: str | None = None
            start = clock()
            try:
                output = system(example)
            except CitebacktrackError as exc:
                output, error = SystemOutput(text=""), f"{type(exc).__name__}: {exc}"
            elapsed = clock() - start
            record = AnswerRecord(
                id=example.id,
                split=example.split,
                system=name,
                text=output.text,
                metrics=score_answer(
                    output.text,
                    n_sources=len(example.sources),
                    gold=example.gold,
                    gold_answer=example.answer,
                ),
                seconds=output.seconds if output.seconds is not None else elapsed,
                trace=TraceSummary.of(output.trace) if output.trace is not None else None,
                error=error,
                origins=output.origins,
            )
            records.append(record)
            if on_record is not None:
                on_record(record)
    summaries: dict[str, dict[str, SystemSummary]] = {}
    for split in ("all", *SPLITS):
        chosen = [r for r in records if split in ("all", r.split)]
        if chosen:
            summaries[split] = {
                name: summarize(name, [r for r in chosen if r.system == name]) for name in systems
            }
    return EvaluationReport(records=tuple(records), systems=tuple(systems), summaries=summaries)


# ---------------------------------------------------------------------------- plots


def write_plots(report: EvaluationReport, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``precision_recall.png`` (grouped bars per system, all answers) and
    ``seconds_per_answer.png`` (the spread of seconds per answer per system).

    Raises:
        MissingDependencyError: matplotlib is not installed (the ``eval`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError(
            feature="the evaluation plots", extra="eval", module="matplotlib"
        ) from exc
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overall = report.summaries.get("all", {})
    names = list(report.systems)
    written: list[Path] = []

    figure, axes = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6))
    width = 0.38
    xs = list(range(len(names)))
    for offset, label in ((-width / 2, "precision"), (width / 2, "recall")):
        values = [getattr(overall[n], label) if n in overall else 0.0 for n in names]
        bars = axes.bar([x + offset for x in xs], values, width, label=label)
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks(xs, names)
    axes.set_ylim(0, 1.1)
    axes.set_ylabel("mean over answers")
    axes.set_title("Citation precision and recall")
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    path = out / "precision_recall.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(path)

    figure, axes = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6))
    samples = [[r.seconds for r in report.records if r.system == n] or [0.0] for n in names]
    axes.boxplot(samples, showmeans=True)
    axes.set_xticks([x + 1 for x in xs], names)
    axes.set_ylabel("seconds per answer (end to end)")
    axes.set_title("Time per answer")
    figure.tight_layout()
    path = out / "seconds_per_answer.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(path)
    return written
