"""The ``eval`` run: the standard systems over one backend, run on every example."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from citebacktrack.backends.base import Backend
from citebacktrack.errors import CitebacktrackError, ConfigurationError
from citebacktrack.evaluation._datasets import SPLITS, Example
from citebacktrack.evaluation._metrics import score_answer
from citebacktrack.evaluation._peer import PeerCiteformer
from citebacktrack.evaluation._report import (
    AnswerRecord,
    EvaluationReport,
    SystemSummary,
    TraceSummary,
    summarize,
)
from citebacktrack.evaluation._systems import (
    System,
    SystemOutput,
    citeformer_system,
    raw_system,
)
from citebacktrack.orchestrator import Citeformer
from citebacktrack.request import Budgets

__all__ = ["DEFAULT_SYSTEMS", "SYSTEM_NAMES", "evaluate", "standard_systems"]

SYSTEM_NAMES = ("raw", "grammar", "validated", "segment", "citeformer")
"""Systems the ``eval`` command knows."""

DEFAULT_SYSTEMS = ("raw", "grammar", "validated")
"""Systems run by default (``citeformer`` is added when a peer virtualenv is given)."""


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
