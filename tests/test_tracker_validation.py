"""The citation tracker (sentences, markers, groups) and the validator's rules."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from citebacktrack._tracker import TextState, advance
from citebacktrack.support import LexicalSupportScorer, SupportResult
from citebacktrack.types import Evidence, Policy, RejectionReason, Source
from citebacktrack.validation import CitationValidator, strip_markers
from helpers import table_scorer


def feed(text: str, *, chunk: int = 1) -> tuple[TextState, list]:
    data = text.encode()
    state, closed = TextState(), []
    for token_index, start in enumerate(range(0, len(data), chunk)):
        state, found = advance(state, data[start : start + chunk], token_index)
        closed.extend(found)
    return state, closed


def sentence_starts(text: str) -> list[str]:
    data = text.encode()
    state, starts = TextState(), set()
    for i in range(len(data)):
        state, _ = advance(state, data[i : i + 1], i)
        starts.add(state.sentence_start)
    return [data[s:].decode()[:8] for s in sorted(starts)]


def test_markers_groups_and_sentence_ids() -> None:
    state, closed = feed("Paris is big [1][2]. Rome is old [3], and Oslo [1].")
    assert [(m.source_index, m.prior_ids) for m in closed] == [
        (1, ()),
        (2, (1,)),
        (3, ()),
        (1, (3,)),
    ]
    assert state.sentence_ids == (3, 1)
    assert not state.in_marker


@pytest.mark.parametrize(
    ("text", "starts"),
    [
        ("A is b [1]. C is d [2].", ["A is b [", "C is d ["]),
        ("It cost 3.5 dollars [1]. Next [2].", ["It cost ", "Next [2]"]),
        ("Use e.g. apples [1]. Next [2].", ["Use e.g.", "Next [2]"]),
        ("By J. K. Rowling [1]. Next [2].", ["By J. K.", "Next [2]"]),
        ("Intro:\n- a [1]\n- b [2]", ["Intro:\n-", "- a [1]\n", "- b [2]"]),
        ("Done [1]! Really? Yes [2].", ["Done [1]", "Really? ", "Yes [2]."]),
    ],
)
def test_sentence_boundaries_follow_the_grammar(text: str, starts: list[str]) -> None:
    assert sentence_starts(text) == starts


@given(st.text(alphabet="ab .[]12\n", max_size=60), st.integers(1, 7))
def test_tokenisation_does_not_change_the_state(text: str, chunk: int) -> None:
    """Token boundaries (one byte or many) never change what the tracker concludes."""
    by_byte, closed_a = feed(text, chunk=1)
    by_chunk, closed_b = feed(text, chunk=chunk)
    assert (by_byte.sentence_start, by_byte.sentence_ids, by_byte.marker_start) == (
        by_chunk.sentence_start,
        by_chunk.sentence_ids,
        by_chunk.marker_start,
    )
    assert [(m.source_index, m.start, m.end) for m in closed_a] == [
        (m.source_index, m.start, m.end) for m in closed_b
    ]


def test_utf8_split_across_tokens_is_harmless() -> None:
    data = "Año [1]. Ünï [2].".encode()
    state = TextState()
    closed = []
    for i in range(len(data)):  # one byte per token splits every multi-byte character
        state, found = advance(state, data[i : i + 1], i)
        closed.extend(found)
    assert [m.source_index for m in closed] == [1, 2]


def test_uncited_run_and_dangling() -> None:
    state, _ = feed("Some words here")
    assert state.uncited_run == len("Some words here")
    assert state.dangling
    state, _ = feed("Some words [1]")
    assert (state.uncited_run, state.dangling) == (0, False)
    state, _ = feed("Some words [1].")
    assert not state.dangling
    state, _ = feed("Some words [1] more")
    assert state.dangling


def validator(n: int = 3, k: int = 3, rule=None) -> CitationValidator:  # type: ignore[no-untyped-def]
    scorer = table_scorer(rule) if rule else None
    return CitationValidator(
        n_sources=n, policy=Policy(max_citations_per_sentence=k), scorer=scorer
    )


@pytest.mark.parametrize(
    ("source_index", "prior", "reason"),
    [
        (0, (), RejectionReason.OUT_OF_RANGE),
        (4, (), RejectionReason.OUT_OF_RANGE),
        (2, (2,), RejectionReason.DUPLICATE),
        (3, (1, 2), RejectionReason.TOO_MANY),
    ],
)
def test_structural_rules(
    source_index: int, prior: tuple[int, ...], reason: RejectionReason
) -> None:
    verdict = validator(k=2).check(source_index=source_index, sentence_ids=prior, claim="x")
    assert not verdict.is_accepted
    assert verdict.reason is reason
    assert verdict.detail


def test_support_rule_and_scores() -> None:
    v = validator(rule=lambda claim, i: i == 2)
    rejected = v.check(source_index=1, sentence_ids=(), claim="Paris is big")
    accepted = v.check(source_index=2, sentence_ids=(), claim="Paris is big")
    assert (rejected.is_accepted, rejected.reason, rejected.score) == (
        False,
        RejectionReason.UNSUPPORTED,
        0.1,
    )
    assert (accepted.is_accepted, accepted.score) == (True, 0.9)


BRIDGE = [
    Source(
        title="Maximum Overdrive",
        text="Maximum Overdrive is a 1986 American horror film directed by Stephen King.",
    ),
    Source(
        title="Leland, North Carolina",
        text="Leland is a town in Brunswick County, North Carolina.\n\n"
        "Maximum Overdrive was shot there.",
    ),
    Source(title="Myrtle Beach", text="Myrtle Beach is a city on the coast of South Carolina."),
]


def lexical_validator(partial_support: float = 0.25) -> CitationValidator:
    return CitationValidator(
        n_sources=len(BRIDGE),
        policy=Policy(),
        scorer=LexicalSupportScorer(BRIDGE),
        partial_support=partial_support,
    )


def test_an_accepted_verdict_carries_the_span_it_rests_on() -> None:
    verdict = lexical_validator().check(
        source_index=1, sentence_ids=(), claim="Stephen King directed the 1986 horror film"
    )
    assert verdict.is_accepted
    assert verdict.spans == (
        Evidence(source_index=1, start=0, end=len(BRIDGE[0].text), text=BRIDGE[0].text),
    )


def test_a_union_verdict_spans_each_contributing_source() -> None:
    v = lexical_validator(partial_support=0.15)
    claim = "The horror film directed by Stephen King was shot in Leland, North Carolina"
    partial = v.check(source_index=1, sentence_ids=(), claim=claim)
    assert partial.is_accepted
    assert not partial.is_complete
    assert [span.source_index for span in partial.spans] == [1]
    together = v.check(source_index=2, sentence_ids=(1,), claim=claim)
    assert together.is_accepted
    assert together.is_complete
    assert [span.source_index for span in together.spans] == [1, 2]
    for span in together.spans:
        assert span.text == BRIDGE[span.source_index - 1].text[span.start : span.end]
    assert together.spans[1].text == BRIDGE[1].text  # both sentences, the blank line kept


def test_rejections_and_structural_verdicts_carry_no_span() -> None:
    v = lexical_validator()
    claim = "Stephen King directed the 1986 horror film"
    assert v.check(source_index=3, sentence_ids=(), claim=claim).spans == ()
    assert v.check(source_index=1, sentence_ids=(1,), claim=claim).spans == ()
    assert validator().check(source_index=1, sentence_ids=(), claim=claim).spans == ()


def test_evidence_span_is_the_best_span_in_one_source() -> None:
    v = lexical_validator()
    claim = "Leland is a town in North Carolina"
    span = v.evidence_span(claim, 2)
    assert span is not None
    assert span.text == "Leland is a town in Brunswick County, North Carolina."
    assert v.evidence_span("Purple elephants", 1) is None
    assert validator().evidence_span(claim, 2) is None
    assert validator(rule=lambda claim, i: True).evidence_span(claim, 2) is None


@dataclass
class LopsidedScorer:
    """A set scorer whose unions rest on the first source alone, spanning only it."""

    def score(self, claim: str, source_index: int) -> SupportResult:
        return self._result(0.2, (source_index,))

    def score_set(self, claim: str, source_indices: Sequence[int]) -> SupportResult:
        ids = sorted(source_indices)
        return self._result(0.2 if len(ids) == 1 else 0.9, ids[:1])

    @staticmethod
    def _result(score: float, ids: Sequence[int]) -> SupportResult:
        spans = tuple(Evidence(source_index=i, start=0, end=1, text=str(i)) for i in ids)
        return SupportResult(
            score=score, is_supported=score >= 0.5, evidence="", detail="", spans=spans
        )


def test_a_union_verdict_always_spans_the_marker_s_own_source() -> None:
    v = CitationValidator(n_sources=3, policy=Policy(), scorer=LopsidedScorer())
    # The claim's words are the spans' own: what it asserts is in the passages.
    verdict = v.check(source_index=3, sentence_ids=(1,), claim="1 3")
    assert verdict.is_accepted
    assert [(span.source_index, span.text) for span in verdict.spans] == [(1, "1"), (3, "3")]


def test_forbidden_and_can_open() -> None:
    v = validator(n=3, k=2)
    assert v.forbidden_ids((1,), {3}) == {1, 3}
    assert v.can_open_marker((1,), set())
    assert not v.can_open_marker((1, 2), set())  # per-sentence limit
    assert not v.can_open_marker((1,), {2, 3})  # nothing left to cite


def test_strip_markers() -> None:
    assert strip_markers("Paris [1][2] is big [3].") == "Paris is big."


def feed_pieces(pieces: list[bytes], *, strict: bool = True) -> tuple[TextState, list]:
    state, closed = TextState(strict=strict), []
    for token_index, piece in enumerate(pieces):
        state, found = advance(state, piece, token_index)
        closed.extend(found)
    return state, closed


@pytest.mark.parametrize(
    "pieces",
    [
        # The splits SmolLM2's tokenizer makes of "... lost. [2]" and "... lost.[2]".
        [b"He", b" won", b".", b" [", b"1", b"]", b" She", b" lost", b".", b" [", b"2", b"]"],
        [b"He", b" won", b".[", b"1", b"]", b" She", b" lost", b".[", b"2", b"]"],
        [b"He", b" won", b".", b"[", b"1", b"]", b" She", b" lost", b". ", b"[", b"2", b"]"],
        [b"He won. [1] She lost. [2]"],
        [b"He won [1]", b". She", b" lost [2", b"]."],
    ],
)
def test_marker_after_the_period_cites_the_sentence_it_closes(pieces: list[bytes]) -> None:
    """``claim. [1]`` and ``claim.[1]`` cite ``claim``, however the tokens split them."""
    text = b"".join(pieces)
    for strict in (True, False):
        state, closed = feed_pieces(pieces, strict=strict)
        assert [m.source_index for m in closed] == [1, 2]
        assert [m.prior_ids for m in closed] == [(), ()]
        assert [m.sentence_start for m in closed] == [0, text.index(b"She")]
        ends = [len(b"".join(pieces[: i + 1])) for i in range(len(pieces))]
        assert closed[1].token_index == next(i for i, e in enumerate(ends) if e > text.rindex(b"["))
        assert state.sentence_ids == (2,)


def test_a_late_group_ends_the_sentence_at_the_next_word() -> None:
    state, _ = feed("He won. [1][2]", chunk=3)
    assert (state.pending_boundary, state.dangling, state.sentence_ids) == (1, False, (1, 2))
    state, _ = feed("He won. [1][2] ")
    assert state.pending_boundary == 2
    state, _ = feed("He won. [1] Then")
    assert (state.sentence_start, state.sentence_ids) == (len("He won. [1] "), ())


@pytest.mark.parametrize(
    ("text", "starts"),
    [
        ("He won. [1] She lost.[2] Done! [3]", ["He won. ", "She lost", "Done! [3"]),
        ('He said "no." [1] Then [2].', ["He said ", "Then [2]"]),
        # After an absorbed period a late group does not end the sentence (as in the grammar,
        # where "U.S" + "." + " [1]" and "U.S." + " [1]" both parse, the tracker keeps one).
        ("It is in the U.S. [1] and more [2].", ["It is in"]),
        ("Ask Dr. Smith [1]. Next [2].", ["Ask Dr. ", "Next [2]"]),
        ("Wait... there is more [1]. Next [2].", ["Wait... ", "Next [2]"]),
        ("Some cause.g. heat [1]. Next [2].", ["Some cau", "heat [1]", "Next [2]"]),
        ("Mr. Smith came [1]. J. K. Rowling too [2].", ["Mr. Smit", "J. K. Ro"]),
    ],
)
def test_sentence_boundaries_with_late_markers(text: str, starts: list[str]) -> None:
    assert sentence_starts(text) == starts


def test_fake_abbreviations_end_the_sentence_outside_required() -> None:
    # "cause.g." is not "e.g." (no word start) and "Affairs.s." is no abbreviation at all.
    data = "Some cause.g. Heat. Affairs.s. Role."
    state, starts = TextState(), set()
    for i, byte in enumerate(data.encode()):
        state, _ = advance(state, bytes([byte]), i)
        starts.add(state.sentence_start)
    assert [data[s:][:4] for s in sorted(starts)] == ["Some", "Heat", "Affa", "Role"]
