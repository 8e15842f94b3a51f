"""Segment-level backtracking, for engines that cannot roll back a KV cache.

A server (llama.cpp's, vLLM's) or an API generates one *segment* at a time: the answer
from an accepted prefix up to the next citation close (``stop=["]"]``), under a grammar
for "the rest of the answer from here". The same validator as the token-level decoder
checks each closed marker; a rejection resubmits the prompt and the accepted prefix up to
the marker's ``[`` with a grammar that allows only the ids the validator accepts there.

:class:`SegmentLoop` is a plain state machine with no I/O: ``next_call()`` says what to ask
the engine, ``feed(result)`` takes its answer and returns the events it releases, and
``finish()`` ends the stream with ``Done``. :func:`run_segments` and :func:`arun_segments`
drive it over a :class:`SegmentEngine` (blocking and natively async). Budgets, stop
reasons, events and the trace are the token-level decoder's; what differs:

* ids come from support as in the decoder: after a rejected marker the resubmission's
  grammar allows only the ids the validator accepts for that sentence, so the engine
  chooses among supported sources;
* when no id supports the sentence it is regenerated once, sampled, and then replaced by
  a grounded copy: the next call's grammar allows only the source sentences the validator
  offers (``CitationValidator.grounding``), each with its marker, and the engine's
  likelihood picks one (``Policy.fallback="copy"``, ADR 0011); without a copy the answer
  ends after the supported sentences (``no_valid_citation``) or, when nothing was
  supported, quotes the best-supported source's evidence or abstains;
* token counts are the engine's (``forward_passes`` counts engine calls; tokens of a
  segment cut back by a rejection count as wasted, whole);
* streaming releases a sentence once the next one starts, as the decoder does.
"""

from citebacktrack.segments._loop import SegmentLoop, arun_segments, run_segments
from citebacktrack.segments._protocol import SegmentCall, SegmentEngine, SegmentResult

__all__ = [
    "SegmentCall",
    "SegmentEngine",
    "SegmentLoop",
    "SegmentResult",
    "arun_segments",
    "run_segments",
]
