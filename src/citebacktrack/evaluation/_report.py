"""Scored answers, their summaries per system and split, and the report's tables and plots."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from citebacktrack.errors import MissingDependencyError
from citebacktrack.evaluation._datasets import Split
from citebacktrack.evaluation._metrics import AnswerMetrics
from citebacktrack.types import Trace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "SMALL_SAMPLE",
    "AnswerRecord",
    "EvaluationReport",
    "SystemSummary",
    "TraceSummary",
    "small_sample_warning",
    "summarize",
    "write_plots",
]

SMALL_SAMPLE = 20
"""Under this many questions a run is warned about: a mean over so few answers moves by
tenths when one answer changes, so differences between systems mean little."""


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
    validity: float | None
    """Mean over the answers that have markers; None when no answer has one."""
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

    validities = [m.validity for m in metrics if m.validity is not None]
    cited = sum(len(m.cited_sources) for m in metrics)
    correct = sum(m.correct_sources for m in metrics)
    gold = sum(m.gold_sources for m in metrics)
    return SystemSummary(
        system=system,
        answers=len(records),
        errors=sum(1 for r in records if r.error is not None),
        non_empty=_mean([float(m.non_empty) for m in metrics]),
        cited=_mean([float(m.cited) for m in metrics]),
        validity=_mean(validities) if validities else None,
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


def small_sample_warning(questions: int) -> str | None:
    """A warning for a run of fewer than :data:`SMALL_SAMPLE` questions, else None."""
    if questions >= SMALL_SAMPLE:
        return None
    return (
        f"only {_counted(questions, 'question')}: a mean over so few answers moves by up to "
        f"{1 / max(questions, 1):.2f} when one answer changes, so these figures say little "
        f"about a system and less about the difference between two; run {SMALL_SAMPLE} or "
        "more questions"
    )


def _counted(count: int, noun: str) -> str:
    """``1 question``, ``2 questions``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95% confidence interval (normal approximation,
    ``1.96 * stdev / sqrt(n)``, which understates it for a handful of values; 0 for fewer
    than two values)."""
    if len(values) < 2:
        return _mean(values), 0.0
    return _mean(values), 1.96 * statistics.stdev(values) / math.sqrt(len(values))


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

    @property
    def questions(self) -> int:
        """Distinct questions answered."""
        return len({r.id for r in self.records})

    def warnings(self) -> list[str]:
        """What the reader should know before trusting the figures (a small sample)."""
        warning = small_sample_warning(self.questions)
        return [warning] if warning is not None else []

    def to_dict(self, **meta: Any) -> dict[str, Any]:
        """A JSON-ready dict: ``meta``, ``warnings``, ``systems``, ``summary`` and
        ``answers``."""
        return {
            **meta,
            "warnings": self.warnings(),
            "systems": list(self.systems),
            "summary": {
                split: {name: dataclasses.asdict(s) for name, s in by_system.items()}
                for split, by_system in self.summaries.items()
            },
            "answers": [dataclasses.asdict(r) for r in self.records],
        }

    def to_markdown(self) -> str:
        """One Markdown table per split (rows: systems), with stop reasons under each,
        after any :meth:`warnings` (as quoted lines)."""
        parts = [f"> **Warning:** {warning}\n" for warning in self.warnings()]
        splits = [s for s in self.summaries if s != "all" or len(self.summaries) > 2]
        for split in splits:
            by_system = self.summaries[split]
            count = len({r.id for r in self.records if split in ("all", r.split)})
            parts.append(f"### {split} ({_counted(count, 'question')})\n")
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
                errors = f", {_counted(summary.errors, 'error')}" if summary.errors else ""
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


def write_plots(report: EvaluationReport, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``precision_recall.png`` (mean precision and recall per system over all
    answers, with a 95% confidence interval and each answer's value as a dot) and
    ``seconds_per_answer.png`` (the spread of seconds per answer per system); each names
    its number of questions, and each system its number of answers.

    Raises:
        MissingDependencyError: matplotlib is not installed (the ``eval`` extra).
    """
    _use_agg()
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, draw in (
        ("precision_recall.png", _precision_recall_figure),
        ("seconds_per_answer.png", _seconds_figure),
    ):
        figure = draw(report)
        path = out / name
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def _use_agg() -> None:
    """Draw with matplotlib's Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependencyError(
            feature="the evaluation plots", extra="eval", module="matplotlib"
        ) from exc
    matplotlib.use("Agg")


def _per_system(report: EvaluationReport, value: str) -> list[list[float]]:
    """Each system's per-answer ``value`` (a metric, or ``seconds``), in report order."""
    return [
        [
            float(getattr(r, value) if value == "seconds" else getattr(r.metrics, value))
            for r in report.records
            if r.system == name
        ]
        for name in report.systems
    ]


def _labels(report: EvaluationReport) -> list[str]:
    """Tick labels: each system's name over its number of answers."""
    counts = Counter(r.system for r in report.records)
    return [f"{name}\nn={counts[name]}" for name in report.systems]


def _dots(center: float, count: int, spread: float, seed: int) -> list[float]:
    """``count`` x positions scattered around ``center`` (fixed seed: same plot each run)."""
    jitter = random.Random(seed)
    return [center + jitter.uniform(-spread, spread) for _ in range(count)]


def _precision_recall_figure(report: EvaluationReport) -> Figure:
    _use_agg()
    import matplotlib.pyplot as plt

    xs = list(range(len(report.systems)))
    figure, axes = plt.subplots(figsize=(1.6 + 1.6 * len(xs), 4.0))
    width = 0.38
    for number, (offset, label) in enumerate(((-width / 2, "precision"), (width / 2, "recall"))):
        samples = _per_system(report, label)
        means, halves = zip(*(_mean_ci(values) for values in samples), strict=True)
        # The interval, cut to the metric's range [0, 1].
        below = [min(half, mean) for mean, half in zip(means, halves, strict=True)]
        above = [min(half, 1 - mean) for mean, half in zip(means, halves, strict=True)]
        at = [x + offset for x in xs]
        bars = axes.bar(at, means, width, yerr=[below, above], capsize=4, label=label, alpha=0.8)
        for text in axes.bar_label(bars, fmt="%.2f", fontsize=8, label_type="center"):
            text.set_bbox({"facecolor": "white", "alpha": 0.8, "linewidth": 0, "pad": 1})
        for x, values in zip(at, samples, strict=True):
            dots = _dots(x, len(values), width * 0.3, seed=len(values) + number)
            axes.scatter(dots, values, s=6, color="black", alpha=0.35, linewidths=0, zorder=3)
    axes.set_xticks(xs, _labels(report))
    axes.set_ylim(-0.05, 1.3)
    axes.set_ylabel("per answer (dots); mean ± 95% CI (bars)")
    axes.set_title(
        f"Citation precision and recall, {_counted(report.questions, 'question')}", fontsize=10
    )
    axes.legend(loc="upper center", ncol=2, fontsize=8)
    figure.tight_layout()
    return figure


def _seconds_figure(report: EvaluationReport) -> Figure:
    _use_agg()
    import matplotlib.pyplot as plt

    xs = [x + 1 for x in range(len(report.systems))]
    samples = [values or [0.0] for values in _per_system(report, "seconds")]
    figure, axes = plt.subplots(figsize=(1.6 + 1.6 * len(xs), 4.0))
    axes.boxplot(samples, showmeans=True)
    for x, values in zip(xs, samples, strict=True):
        dots = _dots(x, len(values), 0.12, seed=len(values))
        axes.scatter(dots, values, s=6, color="black", alpha=0.35, linewidths=0, zorder=3)
    axes.set_xticks(xs, _labels(report))
    axes.set_ylabel("seconds per answer (end to end)")
    axes.set_title(f"Time per answer, {_counted(report.questions, 'question')}", fontsize=10)
    figure.tight_layout()
    return figure
