"""The evaluation instrument: text-only metrics, dataset loading, the split, ``evaluate``,
the peer protocol and the ``eval`` command."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from citebacktrack import cli
from citebacktrack.backends.base import Backend
from citebacktrack.backends.mock import FunctionBackend
from citebacktrack.errors import BackendError, ConfigurationError, DatasetError
from citebacktrack.evaluation import (
    Example,
    PeerCiteformer,
    SystemOutput,
    answer_hit,
    count_sentences,
    evaluate,
    find_markers,
    load_dataset,
    normalize_answer,
    parse_examples,
    peer_python,
    render_prompt,
    score_answer,
    split_of,
    standard_systems,
    strip_markers,
)
from citebacktrack.request import GenerationRequest
from citebacktrack.types import Source, StopReason, Trace

DATA = Path(__file__).parent / "data" / "eval"
TINY = DATA / "tiny.json"
HOTPOT = DATA / "hotpot_tiny.json"
FAKE_PEER = DATA / "fake_peer"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "multihop"
DEV186 = SHARED / "hotpotqa_dev186.json"


# ---------------------------------------------------------------------------- markers


def test_markers_valid_and_invalid() -> None:
    text = "A [1] b [11] c [1, 2] d [1-3] e [0] f [01] g [ 2 ] h [3]. Not [x] or [] or [1a]."
    markers = find_markers(text, n_sources=11)
    assert [m.text for m in markers] == [
        "[1]",
        "[11]",
        "[1, 2]",
        "[1-3]",
        "[0]",
        "[01]",
        "[ 2 ]",
        "[3]",
    ]
    assert [m.source_index for m in markers] == [1, 11, None, None, None, None, None, 3]
    assert text[markers[0].start : markers[0].end] == "[1]"
    # [11] is valid with 11 sources, out of range with 10
    assert find_markers("x [11]", n_sources=10)[0].source_index is None


def test_strip_markers_removes_all_marker_forms() -> None:
    assert strip_markers("Paris [1][2] is big [1, 3]. [x] stays") == "Paris  is big . [x] stays"


def test_score_answer_hand_computed() -> None:
    # 3 sentences, 5 markers (one out of range, one list), gold {1, 2}
    text = "Paris is in France [1][3]. It is big [2][9]. Rome too [1, 2]."
    m = score_answer(text, n_sources=4, gold=[1, 2], gold_answer="Paris")
    assert m.markers == 5
    assert m.valid_markers == 3
    assert m.validity == pytest.approx(3 / 5)
    assert m.cited_sources == (1, 2, 3)
    assert m.correct_sources == 2
    assert m.precision == pytest.approx(2 / 3)
    assert m.recall == pytest.approx(1.0)
    assert m.sentences == 3
    assert m.cites_per_sentence == pytest.approx(5 / 3)
    assert m.non_empty
    assert m.cited
    assert m.hit


def test_score_answer_with_only_invalid_markers() -> None:
    m = score_answer("Paris is the capital [12].", n_sources=10, gold=[1], gold_answer="Paris")
    assert (m.markers, m.valid_markers, m.validity) == (1, 0, 0.0)
    assert not m.cited
    assert (m.precision, m.recall) == (0.0, 0.0)
    assert m.non_empty
    assert m.hit


def test_score_answer_uncited_and_empty() -> None:
    uncited = score_answer("Paris.", n_sources=3, gold=[1], gold_answer="Paris")
    # no marker: nothing to be valid or not (was 1.0, a perfect score for not citing)
    assert (uncited.validity, uncited.precision, uncited.recall) == (None, 0.0, 0.0)
    assert uncited.cites_per_sentence == 0.0
    assert not uncited.cited
    assert uncited.non_empty

    empty = score_answer("", n_sources=3, gold=[1], gold_answer="Paris")
    assert not empty.non_empty
    assert not empty.cited
    assert not empty.hit
    assert (empty.sentences, empty.cites_per_sentence, empty.validity) == (0, 0.0, None)

    # markers alone are not an answer, but they do cite
    only_markers = score_answer(" [1]. ", n_sources=3, gold=[1], gold_answer="Paris")
    assert not only_markers.non_empty
    assert only_markers.cited
    assert only_markers.precision == 1.0


def test_recall_with_partial_gold() -> None:
    m = score_answer("A [2]. B [2].", n_sources=3, gold=[1, 2, 3], gold_answer="x")
    assert (m.precision, m.recall) == (1.0, pytest.approx(1 / 3))
    assert m.cited_sources == (2,)


def test_normalize_answer_squad() -> None:
    assert normalize_answer("The  Eiffel-Tower, in PARIS!") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_answer_hit_substring_and_yes_no_whole_word() -> None:
    assert answer_hit("Lilu is a spirit [6].", "a spirit")
    assert answer_hit("They were THE Beatles [1].", "the Beatles")
    assert not answer_hit("Lilu is a demon [6].", "a spirit")
    assert answer_hit("Yes [1], both are capitals.", "yes")
    assert answer_hit("No.", "No")
    assert not answer_hit("Their eyes are blue [1].", "yes")
    assert not answer_hit("Nobody knows [2].", "no")
    # a marker's digits never make a hit
    assert not answer_hit("It has [2] wheels.", "2")
    assert not answer_hit("anything", "the")  # a gold that normalises to nothing


def test_count_sentences_simple_split() -> None:
    assert count_sentences("One. Two! Three? Four") == 4
    assert count_sentences("It is 3.5 m tall [1].") == 1
    assert count_sentences("   ") == 0
    assert count_sentences("A [1]. [2]. B.") == 2  # a piece without a word is no sentence


# ---------------------------------------------------------------------------- datasets


def test_load_plain_format() -> None:
    examples = load_dataset(TINY)
    assert [e.id for e in examples] == ["q-paris", "q-rome", "q-bananas"]
    first = examples[0]
    assert first.gold == (1,)
    assert first.answer == "Paris"
    assert [s.title for s in first.sources] == ["France", "Bananas", "Seine"]
    assert first.sources[0].text.startswith("Paris is the capital")
    assert examples[1].gold == (1, 2)


def test_load_hotpot_format() -> None:
    examples = load_dataset(HOTPOT)
    assert [e.id for e in examples] == ["h-1", "h-2"]
    first = examples[0]
    assert first.gold == (2, 3)  # France and Seine; France named twice
    assert first.sources[1].text == "France is a country in Europe. Its capital is Paris."
    assert first.answer == "the Seine"
    assert examples[1].gold == (1,)


def test_formats_detected_per_record() -> None:
    plain = json.loads(TINY.read_text())[0]
    hotpot = json.loads(HOTPOT.read_text())[1]
    examples = parse_examples([plain, hotpot])
    assert [e.id for e in examples] == ["q-paris", "h-2"]
    assert [e.gold for e in examples] == [(1,), (1,)]


@pytest.mark.skipif(not DEV186.is_file(), reason="shared/data/multihop is not present")
def test_shared_dev_set_loads() -> None:
    examples = load_dataset(DEV186)
    assert len(examples) == 186
    assert all(1 <= g <= len(e.sources) for e in examples for g in e.gold)
    assert sum(e.split == "holdout" for e in examples) == 63  # about a third


def _write(tmp_path: Path, data: object, name: str = "d.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_dataset_errors_missing_and_not_json(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="is a directory"):
        load_dataset(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("[{", encoding="utf-8")
    with pytest.raises(DatasetError, match="is not JSON"):
        load_dataset(bad)
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_dataset(_write(tmp_path, {"id": "x"}))
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(_write(tmp_path, []))
    assert issubclass(DatasetError, ConfigurationError)


def test_dataset_error_names_record_and_missing_field(tmp_path: Path) -> None:
    records = json.loads(TINY.read_text())
    del records[1]["gold"]
    with pytest.raises(DatasetError, match=r"record 2 \(id 'q-rome'\) lacks 'gold'"):
        load_dataset(_write(tmp_path, records))


def test_dataset_error_gold_out_of_range(tmp_path: Path) -> None:
    records = json.loads(TINY.read_text())
    records[2]["gold"] = [3]
    with pytest.raises(DatasetError, match=r"q-bananas.*gold source 3 but 2 source"):
        load_dataset(_write(tmp_path, records))
    records[2]["gold"] = [0]
    with pytest.raises(DatasetError, match="1-based"):
        load_dataset(_write(tmp_path, records))
    records[2]["gold"] = []
    with pytest.raises(DatasetError, match="no gold source"):
        load_dataset(_write(tmp_path, records))
    records[2]["gold"] = ["2"]
    with pytest.raises(DatasetError, match="list of 1-based integers"):
        load_dataset(_write(tmp_path, records))


def test_dataset_error_bad_sources_and_duplicates(tmp_path: Path) -> None:
    records = json.loads(TINY.read_text())
    records[0]["sources"][1]["text"] = "  "
    with pytest.raises(DatasetError, match="source 2 without text"):
        load_dataset(_write(tmp_path, records))
    records = json.loads(TINY.read_text())
    records[2]["id"] = "q-paris"
    with pytest.raises(DatasetError, match="records 1 and 3 share the id 'q-paris'"):
        load_dataset(_write(tmp_path, records))
    with pytest.raises(DatasetError, match="record 1 is a JSON string"):
        parse_examples(["q"])


def test_hotpot_errors(tmp_path: Path) -> None:
    records = json.loads(HOTPOT.read_text())
    records[0]["supporting_facts"].append(["Nowhere", 0])
    with pytest.raises(DatasetError, match=r"h-1.*'Nowhere', which is not in its context"):
        load_dataset(_write(tmp_path, records))
    records = json.loads(HOTPOT.read_text())
    del records[1]["context"]
    with pytest.raises(DatasetError, match=r"record 2 \(id 'h-2'\) lacks 'context'.*HotpotQA"):
        load_dataset(_write(tmp_path, records))
    records = json.loads(HOTPOT.read_text())
    records[1]["context"][0] = ["Rome", "not a list"]
    with pytest.raises(DatasetError, match="paragraph 1"):
        load_dataset(_write(tmp_path, records))


# ---------------------------------------------------------------------------- split


def test_split_is_the_sha256_rule_and_deterministic() -> None:
    for example_id in ("q-paris", "q-rome", "hotpotqa-dev-5a8b57f25542995d1e6f1371"):
        expected = int(hashlib.sha256(example_id.encode()).hexdigest(), 16) % 3 == 0
        assert (split_of(example_id) == "holdout") is expected
        assert split_of(example_id) == split_of(example_id)
    assert split_of("q-paris") == "holdout"  # hand-checked
    assert split_of("q-rome") == "tune"


def test_split_holds_out_about_a_third() -> None:
    ids = [f"record-{i}" for i in range(3000)]
    holdout = sum(split_of(i) == "holdout" for i in ids)
    assert 0.30 < holdout / len(ids) < 0.37


# ---------------------------------------------------------------------------- evaluate


def _example(
    example_id: str, texts: list[str], gold: tuple[int, ...], answer: str = "x"
) -> Example:
    return Example(
        id=example_id,
        question=f"Question {example_id}?",
        answer=answer,
        sources=tuple(Source(title=f"T{i}", text=t) for i, t in enumerate(texts, start=1)),
        gold=gold,
    )


def test_evaluate_summaries_with_plain_systems() -> None:
    examples = [
        _example("q-paris", ["a", "b", "c"], (1,), answer="Paris"),  # holdout
        _example("q-rome", ["a", "b"], (1, 2), answer="yes"),  # tune
    ]
    answers = {
        "q-paris": "Paris [1][2].",  # P 1/2, R 1, hit
        "q-rome": "No [2] [5].",  # validity 1/2, P 1, R 1/2, miss
    }
    ticks = iter(range(100))

    def clock() -> float:
        return float(next(ticks))

    def fixed(example: Example) -> SystemOutput:
        trace = Trace(rejections=2, backtracks=1, tokens_wasted=4, kept_tokens=9)
        return SystemOutput(text=answers[example.id], trace=trace)

    def failing(example: Example) -> SystemOutput:
        raise BackendError("engine down")

    seen: list[str] = []
    report = evaluate(
        examples,
        {"fixed": fixed, "broken": failing},
        on_record=lambda r: seen.append(f"{r.system}:{r.id}"),
        clock=clock,
    )
    # every example is answered by every system, the order rotated per example
    assert seen == ["fixed:q-paris", "broken:q-paris", "broken:q-rome", "fixed:q-rome"]
    assert set(report.summaries) == {"all", "tune", "holdout"}
    s = report.summaries["all"]["fixed"]
    assert s.answers == 2
    assert s.precision == pytest.approx((0.5 + 1.0) / 2)
    assert s.recall == pytest.approx((1.0 + 0.5) / 2)
    assert s.validity == pytest.approx((1.0 + 0.5) / 2)
    assert s.micro_precision == pytest.approx(2 / 3)  # (1 + 1) / (2 + 1)
    assert s.micro_recall == pytest.approx(2 / 3)  # (1 + 1) / (1 + 2)
    assert s.hit == 0.5
    assert s.seconds == 1.0  # the fake clock ticks once per call
    assert (s.rejections, s.rollbacks, s.tokens_wasted, s.kept_tokens) == (2, 1, 4, 9)
    assert s.stop_reasons == {"end": 2}
    assert report.summaries["holdout"]["fixed"].precision == 0.5
    assert report.summaries["tune"]["fixed"].recall == 0.5
    broken = report.summaries["all"]["broken"]
    assert (broken.errors, broken.non_empty, broken.rejections) == (2, 0.0, None)
    assert report.records[1].error == "BackendError: engine down"
    assert report.records[3].error is None

    markdown = report.to_markdown()
    assert "### all (2 questions)" in markdown
    assert "### holdout (1 question)" in markdown
    assert "| fixed | 2 | 100% | 100% | 0.750 | 0.750 | 0.750 | 50% |" in markdown
    assert "| broken | 2 | 0% | 0% |" in markdown
    assert "—" in markdown  # no trace for the broken system
    payload = json.loads(json.dumps(report.to_dict(dataset="x")))
    assert payload["dataset"] == "x"
    assert payload["summary"]["all"]["fixed"]["micro_precision"] == pytest.approx(2 / 3)
    assert payload["answers"][0]["metrics"]["cited_sources"] == [1, 2]
    assert payload["answers"][0]["split"] == "holdout"


def test_validity_is_a_dash_for_an_answer_or_a_system_without_markers() -> None:
    examples = [_example("q-paris", ["a", "b"], (1,)), _example("q-rome", ["a", "b"], (1,))]
    texts = {"q-paris": "Paris [1] [9].", "q-rome": "Rome."}  # validity 1/2, then no marker

    def uncited(example: Example) -> SystemOutput:
        return SystemOutput(text="Paris is the capital.")

    def mixed(example: Example) -> SystemOutput:
        return SystemOutput(text=texts[example.id])

    report = evaluate(examples, {"uncited": uncited, "mixed": mixed})
    summaries = report.summaries["all"]
    assert summaries["uncited"].validity is None  # was 1.000: perfect for writing no marker
    assert summaries["mixed"].validity == 0.5  # the answer without markers is not averaged in
    assert "| uncited | 2 | 100% | 0% | — | 0.000 |" in report.to_markdown()
    assert "| mixed | 2 | 100% | 50% | 0.500 |" in report.to_markdown()
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["summary"]["all"]["uncited"]["validity"] is None
    assert [a["metrics"]["validity"] for a in payload["answers"] if a["system"] == "mixed"] == [
        0.5,
        None,
    ]


def test_headings_count_questions_in_the_singular_and_the_plural() -> None:
    def fixed(example: Example) -> SystemOutput:
        raise BackendError("engine down")

    one = evaluate([_example("q-paris", ["a"], (1,))], {"s": fixed}).to_markdown()
    assert "### holdout (1 question)\n" in one
    assert "1 error" in one
    assert "error(s)" not in one
    two = evaluate([_example(f"q{i}", ["a"], (1,)) for i in range(2)], {"s": fixed})
    assert "(2 questions)" in two.to_markdown()
    assert "2 errors" in two.to_markdown()


def test_fewer_than_twenty_questions_are_warned_about() -> None:
    def answer(example: Example) -> SystemOutput:
        return SystemOutput(text="Paris [1].")

    small = evaluate([_example(f"q{i}", ["a"], (1,)) for i in range(3)], {"s": answer})
    assert small.questions == 3
    (warning,) = small.warnings()
    assert warning.startswith("only 3 questions: a mean over so few answers moves by up to 0.33")
    assert small.to_markdown().startswith(f"> **Warning:** {warning}\n")
    assert small.to_dict()["warnings"] == [warning]
    enough = evaluate([_example(f"q{i}", ["a"], (1,)) for i in range(20)], {"s": answer})
    assert enough.warnings() == []
    assert "Warning" not in enough.to_markdown()
    assert enough.to_dict()["warnings"] == []


def test_plots_name_their_n_and_show_each_answer_and_a_confidence_interval() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.collections import PathCollection

    from citebacktrack.evaluation._report import (
        _mean_ci,
        _precision_recall_figure,
        _seconds_figure,
    )

    examples = [_example(f"q{i}", ["a", "b"], (1,)) for i in range(4)]
    texts = {"q0": "A [1].", "q1": "A [2].", "q2": "A [1][2].", "q3": "A [1]."}

    def answer(example: Example) -> SystemOutput:
        return SystemOutput(text=texts[example.id], seconds=1.0 + len(example.id))

    report = evaluate(examples, {"raw": answer, "validated": answer})
    figure = _precision_recall_figure(report)
    axes = figure.axes[0]
    assert "4 questions" in axes.get_title()
    assert [t.get_text() for t in axes.get_xticklabels()] == ["raw\nn=4", "validated\nn=4"]
    dots = [c for c in axes.collections if isinstance(c, PathCollection)]
    points = sum(c.get_offsets().shape[0] for c in dots)  # type: ignore[union-attr]
    assert points == 2 * 2 * 4  # systems x metrics x answers
    precision = [1.0, 0.0, 0.5, 1.0]
    mean, half = _mean_ci(precision)
    assert (mean, half) == pytest.approx((0.625, 1.96 * 0.4787135538781691 / 2))
    error_bars = [c for c in axes.collections if c not in dots]
    assert error_bars  # the intervals are drawn
    seconds = _seconds_figure(report).axes[0]
    assert "4 questions" in seconds.get_title()
    assert [t.get_text() for t in seconds.get_xticklabels()] == ["raw\nn=4", "validated\nn=4"]
    assert _mean_ci([0.5]) == (0.5, 0.0)


def _scripted(scripts: dict[str, str]) -> FunctionBackend:
    """A scripted model that writes ``scripts[question]`` whatever the constraints."""

    def respond(request: GenerationRequest) -> str:
        prompt = request.messages[-1].content
        for question, script in scripts.items():
            if question in prompt:
                return script
        raise AssertionError(f"no script for {prompt[-200:]!r}")

    return FunctionBackend(respond)


SCRIPTS = {
    "What is the capital of France?": "Paris is the capital of France [2].",
    "Were Rome and Paris both capitals?": "Yes, Rome is the capital of Italy [1].",
    "What colour are ripe bananas?": "Ripe bananas are yellow fruit [7].",
}


def test_evaluate_end_to_end_with_scripted_backend() -> None:
    examples = load_dataset(TINY)
    backend = _scripted(SCRIPTS)
    report = evaluate(examples, standard_systems(backend, ["grammar", "validated"]))
    texts = {(r.system, r.id): r.text for r in report.records}
    # grammar only: the unsupported [2] (Bananas) stands; [7] with 2 sources cannot be written
    assert texts["grammar", "q-paris"] == "Paris is the capital of France [2]."
    assert "[7]" not in texts["grammar", "q-bananas"]
    assert report.summaries["all"]["grammar"].precision < 1.0
    # validated: [2] (Bananas does not support the sentence) is replaced by the gold [1]
    validated = {r.id: r for r in report.records if r.system == "validated"}
    assert validated["q-paris"].trace is not None
    assert validated["q-paris"].text == "Paris is the capital of France [1]."
    assert validated["q-paris"].metrics.precision == 1.0
    all_ = report.summaries["all"]
    assert all_["validated"].precision > all_["grammar"].precision
    assert all_["grammar"].validity == 1.0
    assert all_["validated"].validity == 1.0
    assert all_["validated"].rejections is not None
    assert all_["grammar"].hit == pytest.approx(1.0)  # Paris, yes, yellow
    assert set(all_["validated"].stop_reasons) <= {r.value for r in StopReason}
    assert all(r.seconds > 0 for r in report.records)


def _raw_supported() -> bool:
    examples = load_dataset(TINY)[:1]
    backend = _scripted({"What is the capital of France?": "Paris [7] x [1, 2]."})
    try:
        evaluate(examples, standard_systems(backend, ["raw"]))
    except Exception:
        return False
    return True


def test_raw_system_writes_what_the_model_wants() -> None:
    if not _raw_supported():
        pytest.xfail("the decoder does not decode grammar=None requests yet")
    examples = load_dataset(TINY)[:1]
    backend = _scripted({"What is the capital of France?": "Paris [7] is big [1, 2]."})
    report = evaluate(examples, standard_systems(backend, ["raw"]))
    (record,) = report.records
    assert record.error is None, record.error
    assert record.text == "Paris [7] is big [1, 2]."
    assert (record.metrics.markers, record.metrics.valid_markers) == (2, 0)
    assert record.metrics.validity == 0.0
    (request,) = backend.requests
    assert request.grammar is None
    assert request.validator is None


def test_standard_systems_share_one_prompt_and_reject_unknown_names() -> None:
    backend = _scripted(SCRIPTS)
    example = load_dataset(TINY)[0]
    systems = standard_systems(backend, ["grammar", "validated"])
    for system in systems.values():
        system(example)
    first, second = backend.requests
    assert first.messages == second.messages
    assert first.validator is not None
    assert second.validator is not None
    with pytest.raises(ConfigurationError, match="unknown system 'best'"):
        standard_systems(backend, ["best"])
    with pytest.raises(ConfigurationError, match="peer"):
        standard_systems(backend, ["citeformer"])
    with pytest.raises(ConfigurationError, match="segment-level backend"):
        standard_systems(backend, ["segment"])


def test_segment_system_answers_through_the_segment_loop_with_the_same_validator() -> None:
    from citebacktrack.backends.segment import SegmentBackend
    from citebacktrack.testing import ScriptedSegmentEngine

    example = next(e for e in load_dataset(TINY) if e.question == "What is the capital of France?")
    engine = ScriptedSegmentEngine(SCRIPTS[example.question])
    systems = standard_systems(
        _scripted(SCRIPTS), ["segment"], segment_backend=SegmentBackend(engine)
    )
    output = systems["segment"](example)
    # The unsupported [2] is rejected and resubmitted with only supported ids: [1].
    assert output.text == "Paris is the capital of France [1]."
    assert output.trace is not None
    assert output.trace.rejections == 1
    assert any(call.prefix.endswith("[") for call in engine.calls)


# ---------------------------------------------------------------------------- peer


@pytest.fixture
def fake_peer() -> Iterator[PeerCiteformer]:
    env = {**os.environ, "PYTHONPATH": str(FAKE_PEER)}
    peer = PeerCiteformer(sys.executable, "model.gguf", max_new_tokens=42, env=env)
    yield peer
    peer.close()


def test_peer_protocol_with_a_fake_citeformer(fake_peer: PeerCiteformer) -> None:
    sources = [Source(title="France", text="Paris."), Source(title="Seine", text="River.")]
    out = fake_peer.answer("the prompt", sources)
    assert out.text == "France answers in 42 tokens [1][2]."  # stdout chatter kept out
    assert out.seconds is not None
    assert out.seconds >= 0
    assert fake_peer.version == "0.3.1-fake"
    assert fake_peer.answer("again", sources[:1]).text == "France answers in 42 tokens [1][1]."
    with pytest.raises(BackendError, match="the fake peer was asked to fail"):
        fake_peer.answer("FAIL", sources)
    # the process survives a failed answer
    assert fake_peer.answer("after", sources).text.endswith("[1][2].")


def test_peer_system_in_evaluate(fake_peer: PeerCiteformer) -> None:
    backend = _scripted(SCRIPTS)
    examples = load_dataset(TINY)
    systems = standard_systems(backend, ["citeformer"], peer=fake_peer)
    report = evaluate(examples, systems)
    paris = report.records[0]
    assert paris.text == "France answers in 42 tokens [1][3]."
    assert paris.trace is None
    assert paris.metrics.cited_sources == (1, 3)
    assert report.summaries["all"]["citeformer"].rejections is None
    assert not backend.requests  # the peer never runs our decoder


def test_peer_that_cannot_start_is_a_backend_error(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # no citeformer there
    with PeerCiteformer(sys.executable, "m.gguf", env=env) as peer:
        died = r"(?s)exited with code 1.*citeformer==0\.3\.1.*ModuleNotFound"
        with pytest.raises(BackendError, match=died):
            peer.answer("p", [Source(text="x")])
        with pytest.raises(BackendError, match="exited earlier"):
            peer.answer("p", [Source(text="x")])
    with pytest.raises(BackendError, match="cannot start the peer Python"):
        PeerCiteformer(tmp_path / "no-python", "m.gguf").answer("p", [Source(text="x")])


def test_peer_python_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CITEBACKTRACK_PEER_VENV", raising=False)
    assert peer_python(None) is None
    assert peer_python(tmp_path) is None  # no bin/python
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("")
    assert peer_python(tmp_path) == tmp_path / "bin" / "python"
    monkeypatch.setenv("CITEBACKTRACK_PEER_VENV", str(tmp_path))
    assert peer_python(None) == tmp_path / "bin" / "python"


def test_render_prompt_fallback_keeps_every_message() -> None:
    backend = _scripted(SCRIPTS)
    from citebacktrack.orchestrator import Citeformer

    request = Citeformer(backend).build_request("Why?", ["Because."])
    prompt = render_prompt(backend, request.messages)
    assert all(m.content in prompt for m in request.messages)
    assert prompt.endswith("assistant: ")


# ---------------------------------------------------------------------------- CLI


@pytest.fixture
def scripted_cli(monkeypatch: pytest.MonkeyPatch) -> list[FunctionBackend]:
    built: list[FunctionBackend] = []

    def fake_backend(name: cli.BackendName, model: Path | None) -> Backend:
        backend = _scripted(SCRIPTS)
        built.append(backend)
        return backend

    monkeypatch.setattr(cli, "_eval_backend", fake_backend)
    monkeypatch.delenv("CITEBACKTRACK_PEER_VENV", raising=False)
    return built


def test_cli_eval_writes_results(tmp_path: Path, scripted_cli: list[FunctionBackend]) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli.app, ["eval", str(TINY), "--systems", "grammar,validated", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert len(scripted_cli) == 1  # one model load for every system
    payload = json.loads((out / "results.json").read_text())
    assert payload["systems"] == ["grammar", "validated"]
    assert set(payload["summary"]) == {"all", "tune", "holdout"}
    assert len(payload["answers"]) == 6
    assert {a["split"] for a in payload["answers"]} == {"tune", "holdout"}
    assert payload["dataset"] == str(TINY)
    markdown = (out / "results.md").read_text()
    assert "| system | n | non-empty | cited | validity | precision | recall | hit |" in markdown
    assert "| validated | 3 |" in markdown
    assert "| validated | 3 |" in result.stdout  # the table is printed too
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped" in result.output
    else:
        for name in ("precision_recall.png", "seconds_per_answer.png"):
            assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_cli_eval_warns_about_a_small_sample_on_stderr_and_in_the_results(
    tmp_path: Path, scripted_cli: list[FunctionBackend]
) -> None:
    out = tmp_path / "out"
    args = ["eval", str(TINY), "--systems", "grammar", "--limit", "3", "--no-plots"]
    result = CliRunner().invoke(cli.app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "warning: only 3 questions: a mean over so few answers" in result.stderr
    assert "run 20 or more questions" in result.stderr
    assert "> **Warning:** only 3 questions" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["warnings"][0].startswith("only 3")


def test_cli_eval_split_and_limit(tmp_path: Path, scripted_cli: list[FunctionBackend]) -> None:
    out = tmp_path / "out"
    args = ["eval", str(TINY), "--systems", "grammar", "--split", "tune", "--limit", "1"]
    result = CliRunner().invoke(cli.app, [*args, "--out", str(out), "--no-plots"])
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "results.json").read_text())
    assert [a["id"] for a in payload["answers"]] == ["q-rome"]
    assert set(payload["summary"]) == {"all", "tune"}
    assert "### tune (1 question)" in (out / "results.md").read_text()
    assert not (out / "precision_recall.png").exists()


def test_cli_eval_hotpot_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = {
        "Which river flows through the capital of France?": "The Seine flows through Paris [3].",
        "Is Rome in Italy?": "Yes, Rome is the capital of Italy [1].",
    }
    monkeypatch.setattr(cli, "_eval_backend", lambda name, model: _scripted(scripts))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli.app, ["eval", str(HOTPOT), "--systems", "validated", "--out", str(out), "--no-plots"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())["summary"]["all"]["validated"]
    assert summary["hit"] == 1.0
    assert summary["precision"] == 1.0
    assert summary["recall"] == pytest.approx((1 / 2 + 1) / 2)


def test_cli_eval_errors(tmp_path: Path, scripted_cli: list[FunctionBackend]) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli.app, ["eval", str(tmp_path / "none.json")])
    assert missing.exit_code == 2
    assert "does not exist" in missing.output
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "a"}]')
    malformed = runner.invoke(cli.app, ["eval", str(bad)])
    assert malformed.exit_code == 2
    assert "record 1 (id 'a') lacks 'question'" in " ".join(malformed.output.split())
    unknown = runner.invoke(cli.app, ["eval", str(TINY), "--systems", "raw,best"])
    assert unknown.exit_code == 2
    assert "best" in unknown.output
    assert not scripted_cli  # no model loaded for bad input


def test_cli_eval_skips_citeformer_without_peer(
    tmp_path: Path, scripted_cli: list[FunctionBackend]
) -> None:
    out = tmp_path / "out"
    args = ["eval", str(TINY), "--systems", "grammar,citeformer", "--limit", "1", "--no-plots"]
    result = CliRunner().invoke(cli.app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "skipping the citeformer system" in " ".join(result.output.split())
    assert json.loads((out / "results.json").read_text())["systems"] == ["grammar"]
