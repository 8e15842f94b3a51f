"""Scored answers, their summaries per system and split, and the report's tables and plots."""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from citebacktrack.errors import MissingDependencyError
from citebacktrack.evaluation._datasets import Split
from citebacktrack.evaluation._metrics import AnswerMetrics
from citebacktrack.types import Trace

__all__ = [
    "AnswerRecord",
    "EvaluationReport",
    "SystemSummary",
    "TraceSummary",
    "summarize",
    "write_plots",
]


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
