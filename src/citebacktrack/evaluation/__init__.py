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
* **validity**: valid markers / markers; none for an answer without markers (shown as
  ``—``), and a summary's is the mean over the answers that have markers (``—`` when none
  has).
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

A report over fewer than :data:`SMALL_SAMPLE` (20) questions carries a warning
(``report.warnings()``, first in its Markdown and in ``to_dict()["warnings"]``): a mean
over n answers moves by up to 1/n when one answer changes.

Records are split deterministically for tuning: an id is in ``holdout`` when
``int(sha256(id).hexdigest(), 16) % 3 == 0``, else in ``tune`` (about a third held out).

The package holds one module per part: :mod:`~citebacktrack.evaluation._datasets` (records
and the split), :mod:`~citebacktrack.evaluation._metrics` (the definitions above),
:mod:`~citebacktrack.evaluation._systems` (what answers an example),
:mod:`~citebacktrack.evaluation._peer` (citeformer in its own process),
:mod:`~citebacktrack.evaluation._report` (summaries, tables and plots) and
:mod:`~citebacktrack.evaluation._runner` (the standard systems and :func:`evaluate`).
"""

from __future__ import annotations

from citebacktrack.evaluation._datasets import (
    SPLITS,
    Example,
    Split,
    load_dataset,
    parse_examples,
    split_of,
)
from citebacktrack.evaluation._metrics import (
    AnswerMetrics,
    Marker,
    answer_hit,
    count_sentences,
    find_markers,
    normalize_answer,
    score_answer,
    strip_markers,
)
from citebacktrack.evaluation._peer import PEER_SETUP, PeerCiteformer, peer_python
from citebacktrack.evaluation._report import (
    SMALL_SAMPLE,
    AnswerRecord,
    EvaluationReport,
    SystemSummary,
    TraceSummary,
    small_sample_warning,
    summarize,
    write_plots,
)
from citebacktrack.evaluation._runner import (
    DEFAULT_SYSTEMS,
    SYSTEM_NAMES,
    evaluate,
    standard_systems,
)
from citebacktrack.evaluation._systems import (
    System,
    SystemOutput,
    citeformer_system,
    raw_system,
    render_prompt,
    sentence_origins,
)

__all__ = [
    "DEFAULT_SYSTEMS",
    "PEER_SETUP",
    "SMALL_SAMPLE",
    "SPLITS",
    "SYSTEM_NAMES",
    "AnswerMetrics",
    "AnswerRecord",
    "EvaluationReport",
    "Example",
    "Marker",
    "PeerCiteformer",
    "Split",
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
    "sentence_origins",
    "small_sample_warning",
    "split_of",
    "standard_systems",
    "strip_markers",
    "summarize",
    "write_plots",
]
