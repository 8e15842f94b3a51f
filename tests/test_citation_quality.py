"""The citation-quality mechanisms, end to end through the real decoder on scripted models.

Each test names the mechanism it pins: a marker after the period, the per-sentence union
rule (two-source claims, no stacking), recovery that ends in a supported answer or an
explicit abstention, and no repetition loop.
"""

from __future__ import annotations

from typing import Any

import pytest

from citebacktrack import Answer, Citeformer, MockBackend, Source
from citebacktrack.support import LexicalSupportScorer
from citebacktrack.types import CitationMode, Policy, RejectionReason, StopReason
from citebacktrack.validation import CitationValidator

BRIDGE = [
    Source(
        title="Maximum Overdrive",
        text=(
            "Maximum Overdrive is a 1986 American horror film written and directed by Stephen King."
        ),
    ),
    Source(
        title="Leland, North Carolina",
        text="Leland is a town in Brunswick County, North Carolina. The film was shot there.",
    ),
    Source(title="Myrtle Beach", text="Myrtle Beach is a city on the coast of South Carolina."),
]
BOTH = [
    Source(title="Christopher Nolan", text="Christopher Nolan is an English film director."),
    Source(title="Sathish Kalathil", text="Sathish Kalathil is an Indian film director."),
    Source(title="Zeitgeist Films", text="Zeitgeist Films is a distributor based in New York."),
]


def answer(script: str, sources: list[Source], question: str = "question", **policy: Any) -> Answer:
    cf = Citeformer(MockBackend([script]), policy=Policy(**policy))
    return cf.generate(question, sources)


# ------------------------------------------------------------------ marker after the period


@pytest.mark.parametrize("gap", ["", " "])
def test_a_marker_after_the_period_cites_that_sentence(gap: str) -> None:
    script = (
        f"Maximum Overdrive was directed by Stephen King.{gap}[1] It was shot in Leland.{gap}[2]"
    )
    result = answer(script, BRIDGE)
    assert result.text == script
    citations = result.citations
    assert [c.source_index for c in citations] == [1, 2]
    # Each marker was checked against the sentence its period closed.
    assert citations[1].sentence_start == script.index("It was")
    assert all(c.support is not None and c.support >= 0.4 for c in citations)


# ------------------------------------------------------------------ the union rule


def test_a_two_source_claim_is_accepted_with_both_markers() -> None:
    validator = CitationValidator(n_sources=3, policy=Policy(), scorer=LexicalSupportScorer(BOTH))
    claim = "Christopher Nolan and Sathish Kalathil are both film directors"
    first = validator.check(source_index=1, sentence_ids=(), claim=claim)
    assert first.is_accepted  # partial: one of two names
    assert not first.is_complete
    second = validator.check(source_index=2, sentence_ids=(1,), claim=claim)
    assert second.is_accepted
    assert second.is_complete


def test_a_two_source_claim_refuses_an_irrelevant_second_marker() -> None:
    validator = CitationValidator(n_sources=3, policy=Policy(), scorer=LexicalSupportScorer(BOTH))
    claim = "Christopher Nolan and Sathish Kalathil are both film directors"
    third = validator.check(source_index=3, sentence_ids=(1,), claim=claim)
    assert not third.is_accepted
    assert third.reason in {RejectionReason.REDUNDANT, RejectionReason.UNSUPPORTED}


def test_the_decoder_completes_a_partial_marker_in_the_same_group() -> None:
    # The model wants to stop after [1]; a partial citation must be completed first.
    script = "Christopher Nolan and Sathish Kalathil are both film directors [1]."
    result = answer(script, BOTH)
    text = result.text
    ids = [c.source_index for c in result.citations]
    assert ids == [1, 2], text
    assert text.rstrip(".").endswith("[1][2]")


def test_stacking_does_not_pay() -> None:
    script = "Christopher Nolan is an English film director [1][2][3]."
    result = answer(script, BOTH)
    assert [c.source_index for c in result.citations] == [1]
    rejected = {e.source_index: e.reason for e in result.trace.entries if e.kind == "rejection"}
    # [2] shares words with the claim but adds nothing [1] did not already support.
    assert rejected[2] == RejectionReason.REDUNDANT.value


# ------------------------------------------------------------------ recovery


@pytest.mark.parametrize(("fallback", "how"), [("copy", "grounded copy"), ("quote", "quoted")])
def test_an_unsupportable_answer_copies_the_source_most_relevant_to_the_question(
    fallback: str, how: str
) -> None:
    script = "Stephen King loved purple elephants dancing in Paris [3]."
    question = "Which 1986 horror film did Stephen King direct?"
    result = answer(script, BRIDGE, question, fallback=fallback)
    text = result.text
    assert result.stop_reason is StopReason.FALLBACK
    assert result.is_fallback
    assert text == (
        "Maximum Overdrive is a 1986 American horror film written and directed by Stephen King [1]."
    )
    assert any(how in e.detail for e in result.trace.entries)


def test_no_source_relevant_to_the_question_is_quoted() -> None:
    """The model's claim is unsupported and no source is about the question: the
    answer abstains rather than quote a source the claim merely resembles."""
    script = "Stephen King directed the Sydney Opera House film [1]."
    result = answer(script, BRIDGE, "Who designed the Sydney Opera House?")
    assert result.text == ""
    assert result.stop_reason is StopReason.NO_SUPPORTED_ANSWER


def test_nothing_supportable_is_an_explicit_abstention() -> None:
    result = answer("Bananas are blue and grow on Mars [1].", BRIDGE)
    assert result.text == ""
    assert result.stop_reason is StopReason.NO_SUPPORTED_ANSWER
    assert result.abstention is not None
    assert "none of the sources" in result.abstention


def test_abstain_policy_never_quotes() -> None:
    script = "Stephen King loved purple elephants dancing in Paris [3]."
    result = answer(script, BRIDGE, fallback="abstain")
    assert result.text == ""
    assert result.stop_reason is StopReason.NO_SUPPORTED_ANSWER


def test_supported_sentences_are_kept_when_a_later_one_fails() -> None:
    script = "Maximum Overdrive was directed by Stephen King [1]. Bananas are blue on Mars [2]."
    result = answer(script, BRIDGE)
    assert result.text.startswith("Maximum Overdrive was directed by Stephen King [1].")
    assert "Bananas" not in result.text


# ------------------------------------------------------------------ no degenerate output


def test_a_repeated_sentence_ends_the_answer() -> None:
    sentence = "Maximum Overdrive was directed by Stephen King [1]. "
    result = answer(sentence * 4, BRIDGE)
    assert result.text == sentence.strip()
    assert result.stop_reason is StopReason.END


def test_a_sentence_repeating_part_of_an_earlier_one_ends_the_answer() -> None:
    script = (
        "The film Maximum Overdrive was directed by Stephen King [1]. "
        "Maximum Overdrive was directed by Stephen King [1]. It was shot in Leland [2]."
    )
    result = answer(script, BRIDGE)
    assert result.text == "The film Maximum Overdrive was directed by Stephen King [1]."


def test_ellipsis_chains_cannot_carry_a_sentence() -> None:
    result = answer("Maximum Overdrive was directed by Stephen King........ [1]", BRIDGE)
    assert "...." not in result.text


def test_auto_policy_is_unchanged_by_the_quote_fallback() -> None:
    result = answer("Bananas are blue [1].", BRIDGE, mode=CitationMode.AUTO)
    assert "[" not in result.text
