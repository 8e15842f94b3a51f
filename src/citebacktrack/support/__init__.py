"""Support scorers: does source N back the sentence written so far?

The citation validator calls a :class:`SupportScorer` each time a ``[N]`` marker closes,
with the current sentence up to the marker (markers removed) as the *claim* and ``N`` as
the source number. A result below the scorer's threshold makes the decoder roll back and
ban ``N`` at that position.

Two scorers ship here:

* :class:`LexicalSupportScorer` (the default) needs no model. Its score is the
  IDF-weighted share of the claim's content words found in the best window of one or two
  adjacent sentences of the source (the title counts as part of every window), halved for
  each number or capitalised name of the claim that window and the title lack. Only
  windows of the claim's polarity count (both negate, or neither: :func:`is_negated`).
  Several sources combine (``score_set``) only when they are linked: each titled by what
  the claim names, or their passages naming a common entity few sources name.
* :class:`FunctionSupportScorer` wraps any ``(claim, source_text) -> float`` callable,
  such as an embedding similarity or an NLI entailment probability.

Each result also says where in the sources it rests (:attr:`SupportResult.spans`: offsets
into ``Source.text`` and the quoted text), so that a citation can point at its passage.

Thresholds. A claim is supported when ``score >= threshold``. The lexical default, 0.6,
reads "most of what the sentence says, weighted toward rare words, names and numbers, is
found together in one place of the source, nothing it names is missing there, and it
negates where the source does" (ADR 0011). It is strict on purpose: a strong language
model judging citations the way a careful reader does (LongBench-Cite's protocol) refused
three in four of the citations the earlier, looser default (0.4, names anywhere in the
source, the last clause standing for the sentence) accepted on multi-hop retrieval input.
On the ALCE few-shot demos (ASQA, ELI5, QAMPARI; ``tests/test_support.py`` re-measures
this) 21 of 60 gold citations reach it each on its own (ALCE's hand-written answers
paraphrase and list, and many of their citations support only a part), while 196 of 199
uncited passages of the same questions stay below it, as do all 260 passages of other
questions. Paraphrase is what the lexical scorer misses: use
:class:`FunctionSupportScorer` with an NLI model when it matters more than speed; the
validator's other rules apply to any scorer.

Claims with no content words (``"It is."``, ``""``), or fewer than ``min_content_words``,
have nothing to check and are judged supported with score 1.0.
"""

from citebacktrack.support._base import SetSupportScorer, SupportResult, SupportScorer
from citebacktrack.support._function import FunctionSupportScorer
from citebacktrack.support._lexical import LexicalSupportScorer
from citebacktrack.support._text import content_stems, is_negated, name_stems, names_title

__all__ = [
    "FunctionSupportScorer",
    "LexicalSupportScorer",
    "SetSupportScorer",
    "SupportResult",
    "SupportScorer",
    "content_stems",
    "is_negated",
    "name_stems",
    "names_title",
]
