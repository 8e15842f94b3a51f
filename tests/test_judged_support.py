"""The validator against the kinds of citation a careful reader refuses (issue 19).

Hand-made claim/source pairs, one group per kind the judge refused on real retrieval
input, each with the polarity or linkage that a reader accepts beside the one it refuses:
a rule that refused everything would fail the accepting half.
"""

from __future__ import annotations

import pytest

from citebacktrack import (
    Budgets,
    Citeformer,
    MockBackend,
    Policy,
    SentenceOrigin,
    Source,
    StopReason,
)
from citebacktrack.support import LexicalSupportScorer, is_negated
from citebacktrack.types import RejectionReason
from citebacktrack.validation import CitationValidator

BAND = Source(
    title="Local H",
    text="Local H is an American rock band from Zion, Illinois. The band was formed in 1987.",
)
BAND_NOT = Source(
    title="Tarnation",
    text="Tarnation is not an American band. It was formed in Norway in 1992.",
)
ALBUM = Source(
    title="Big Stone Gap (album)",
    text="Big Stone Gap is an album by the folk group Blue Hollow, recorded in Big Stone Gap, "
    "Virginia.",
)
CITY_FILM = Source(
    title="Harbor Lights",
    text="Harbor Lights is a 2004 drama film set in New York City.",
)
FILM = Source(
    title="Big Stone Gap (film)",
    text="Big Stone Gap is a 2014 romantic comedy film directed by Adriana Trigiani.",
)
DIRECTOR = Source(
    title="Adriana Trigiani",
    text="Adriana Trigiani is an American novelist and film director. Trigiani is based in "
    "New York City.",
)
ARENA = Source(
    title="Rupp Arena",
    text="Rupp Arena is an indoor arena in Lexington, Kentucky. It opened in 1976 and seats "
    "20,500.",
)
EIFFEL = Source(
    title="Eiffel Tower",
    text="The Eiffel Tower is a wrought-iron tower in Paris. It was completed in 1889.",
)
SENATOR = Source(
    title="John Richardson",
    text="John Richardson was a governor of South Carolina. He died in 1873.",
)
MOON = Source(
    title="Apollo program",
    text="The Apollo program was run by NASA. It launched the crewed Apollo missions to the Moon.",
)


def validator(sources: list[Source], question: str | None = None) -> CitationValidator:
    return CitationValidator(
        n_sources=len(sources),
        policy=Policy(),
        scorer=LexicalSupportScorer(sources),
        question=question,
        sources=sources,
    )


def check(v: CitationValidator, claim: str, *ids: int):
    verdict = None
    for k, source in enumerate(ids):
        verdict = v.check(source_index=source, sentence_ids=ids[:k], claim=claim)
        if not verdict.is_accepted:
            return verdict
    return verdict


# --- 1. negation and contradiction ---------------------------------------------------------


def test_negated_claim_against_a_positive_passage_is_refused() -> None:
    v = validator([BAND])
    verdict = check(v, "Local H is not an American rock band from Illinois.", 1)
    assert not verdict.is_accepted
    assert "polarity" in verdict.detail


def test_positive_claim_against_a_positive_passage_is_accepted() -> None:
    v = validator([BAND])
    assert check(v, "Local H is an American rock band from Illinois.", 1).is_accepted


def test_negated_claim_against_a_negated_passage_is_accepted() -> None:
    v = validator([BAND_NOT])
    assert check(v, "Tarnation is not an American band.", 1).is_accepted


def test_positive_claim_against_a_negated_passage_is_refused() -> None:
    v = validator([BAND_NOT])
    assert not check(v, "Tarnation is an American band.", 1).is_accepted


@pytest.mark.parametrize(
    ("text", "negated"),
    [("It is not so.", True), ("They didn't go.", True), ("Never again.", True), ("Now.", False)],
)
def test_negation_words(text: str, negated: bool) -> None:
    assert is_negated(text) is negated


# --- 2. unions of unrelated passages -------------------------------------------------------


def test_union_of_unlinked_passages_is_refused() -> None:
    v = validator([ALBUM, CITY_FILM])
    claim = "The director of the romantic comedy Big Stone Gap is based in New York City."
    verdict = check(v, claim, 1, 2)
    assert not verdict.is_accepted


def test_union_of_linked_passages_is_accepted_with_both_ids() -> None:
    v = validator([FILM, DIRECTOR])
    claim = "Big Stone Gap was directed by Adriana Trigiani, who is based in New York City."
    first = v.check(source_index=1, sentence_ids=(), claim=claim)
    assert first.is_accepted
    assert not first.is_complete  # needs its linked partner
    second = v.check(source_index=2, sentence_ids=(1,), claim=claim)
    assert second.is_accepted
    assert second.is_complete


# --- 3. right words, wrong entity or value ---------------------------------------------------


def test_a_name_the_passage_attaches_to_nothing_is_refused() -> None:
    v = validator([EIFFEL])
    verdict = check(v, "The Louvre was completed in 1889.", 1)
    assert not verdict.is_accepted
    assert "Louvre" in verdict.detail


def test_a_number_in_another_place_of_the_passage_is_refused() -> None:
    v = validator([SENATOR])
    # 1873 is his death, in another sentence than the office: the claim's parts are
    # not found together in one sentence or its neighbour... and the year is not a term.
    verdict = check(v, "John Richardson was governor of South Carolina from 1840.", 1)
    assert not verdict.is_accepted


def test_the_same_facts_about_the_right_entity_are_accepted() -> None:
    v = validator([EIFFEL])
    assert check(v, "The Eiffel Tower was completed in 1889.", 1).is_accepted


# --- 4. the passage never names the subject ------------------------------------------------


def test_a_passage_that_never_names_the_subject_is_refused() -> None:
    v = validator([ARENA])
    verdict = check(v, "The Kentucky Wildcats play in an arena in Lexington that seats 20,500.", 1)
    assert not verdict.is_accepted


# --- 5. sentences that add nothing to the question ------------------------------------------


def test_a_restatement_of_the_question_is_not_citable() -> None:
    question = "When was the Eiffel Tower in Paris completed?"
    v = validator([EIFFEL], question)
    verdict = check(v, "The Eiffel Tower in Paris was completed.", 1)
    assert not verdict.is_accepted
    assert verdict.score == 0.0
    assert "beyond the question" in verdict.detail


def test_the_answer_to_the_question_is_citable() -> None:
    question = "When was the Eiffel Tower in Paris completed?"
    v = validator([EIFFEL], question)
    assert check(v, "The Eiffel Tower in Paris was completed in 1889.", 1).is_accepted


def test_a_claim_with_no_content_words_is_not_citable_and_never_scores_one() -> None:
    v = validator([EIFFEL, MOON])
    verdict = check(v, "It is not the same.", 1)
    assert not verdict.is_accepted
    assert verdict.score == 0.0


# --- 6. order-dependent partial markers ------------------------------------------------------


def test_a_partial_marker_is_refused_when_another_source_supports_alone() -> None:
    nasa = Source(title="NASA", text="NASA is the space agency of the United States.")
    v = validator([nasa, MOON])
    claim = "NASA runs the Apollo program, which launched the crewed Apollo missions to the Moon."
    assert v.check(source_index=2, sentence_ids=(), claim=claim).is_accepted
    partial = v.check(source_index=1, sentence_ids=(), claim=claim)
    assert not partial.is_accepted  # [1] then [2] would keep a marker ALCE drops
    assert partial.reason in (RejectionReason.REDUNDANT, RejectionReason.UNSUPPORTED)


def test_a_partial_marker_needs_a_partner_it_adds_to() -> None:
    v = validator([FILM, DIRECTOR], "Where is the director of Big Stone Gap based?")
    claim = "Big Stone Gap was directed by Adriana Trigiani, who is based in New York City."
    assert not v.check(source_index=2, sentence_ids=(), claim=claim).is_complete


# --- verbatim copies and grounding candidates ------------------------------------------------


def test_a_verbatim_sentence_is_always_accepted() -> None:
    sources = [BAND, BAND_NOT, ALBUM, CITY_FILM, FILM, DIRECTOR, ARENA, EIFFEL, SENATOR, MOON]
    v = validator(sources)
    for number, source in enumerate(sources, 1):
        sentence = source.text.split(". ")[0] + "."
        verdict = check(v, sentence, number)
        assert verdict.is_accepted, (source.title, verdict.detail)


def test_grounding_offers_sentences_of_the_best_sources_each_accepted() -> None:
    question = "When was the Eiffel Tower completed?"
    v = validator([BAND, EIFFEL, MOON], question)
    candidates = v.grounding("The tower was finished long ago.")
    assert candidates
    assert {source for source, _ in candidates} == {2}
    for source, sentence in candidates:
        assert v.check(source_index=source, sentence_ids=(), claim=sentence).is_accepted


def test_a_question_is_not_citable() -> None:
    v = validator([EIFFEL])
    verdict = check(v, "Was the Eiffel Tower completed in 1889?", 1)
    assert not verdict.is_accepted
    assert verdict.score == 0.0
    assert "question asserts nothing" in verdict.detail


def test_a_word_many_sources_share_links_nothing() -> None:
    # "American" names no particular entity: four of five passages say it.
    singer = Source(title="Joan Avery", text="Joan Avery is an American singer from Ohio.")
    show = Source(title="Night Lights", text="Night Lights is an American show filmed in Texas.")
    others = [Source(title=f"Filler {k}", text=f"Filler {k} is an American thing.") for k in (1, 2)]
    v = validator([singer, show, *others, EIFFEL])
    claim = "The singer of the show is from Ohio and it was filmed in Texas."
    assert not check(v, claim, 1, 2).is_accepted


def test_a_name_the_claim_states_is_no_bridge() -> None:
    # Both passages mention CBS, but they are about two different stations.
    atlanta = Source(
        title="WGCL-TV",
        text="WGCL-TV is a CBS-affiliated television station in Atlanta. It is owned by the "
        "Meredith Corporation.",
    )
    sherman = Source(
        title="KXII",
        text="KXII, virtual channel 12, is a CBS-affiliated television station in Sherman.",
    )
    v = validator([atlanta, sherman])
    claim = "Channel 12 is a CBS-affiliated television station owned by the Meredith Corporation."
    assert not check(v, claim, 1, 2).is_accepted


def test_a_shared_year_is_no_bridge() -> None:
    episode = Source(
        title="Pirate Ghost",
        text="Pirate Ghost is an episode of South Park that aired on October 27, 1999.",
    )
    song = Source(
        title="Losing California",
        text="Losing California is a song by Sloan that debuted as a single in 1999.",
    )
    v = validator([episode, song])
    claim = "The song Losing California debuted in the October 27, 1999 episode of South Park."
    assert not check(v, claim, 1, 2).is_accepted


def test_a_generic_title_word_does_not_make_a_passage_the_subject() -> None:
    # "University" is the claim's word, but "University of Nairobi" is not its subject.
    nairobi = Source(
        title="University of Nairobi",
        text="The University of Nairobi grew out of the University of East Africa.",
    )
    rugby = Source(
        title="Loughborough Students RUFC",
        text="Loughborough Students RUFC is the rugby club that serves Loughborough Students' "
        "Union.",
    )
    others = [
        Source(title=f"{k} University", text=f"{k} University is a university.") for k in "AB"
    ]
    v = validator([nairobi, rugby, *others])
    claim = "Loughborough Students' Union serves the University of East Africa."
    assert not check(v, claim, 1, 2).is_accepted
    # Two passages each about an entity the claim names do combine (a comparison).
    inn = Source(title="Pizza Inn", text="Pizza Inn is a restaurant chain based in Texas.")
    gino = Source(title="Papa Gino's", text="Papa Gino's is a restaurant chain based in Boston.")
    v = validator([inn, gino])
    claim = "Pizza Inn is based in Texas, while Papa Gino's is based in Boston."
    assert check(v, claim, 1, 2).is_accepted


# --- grounded recovery on the token-level decoder -----------------------------------------

TOWER = [
    Source(id="louvre", title="Louvre", text="The Louvre is an art museum in Paris."),
    Source(
        id="eiffel",
        title="Eiffel Tower",
        text="The Eiffel Tower was completed in 1889. It is 330 metres tall.",
    ),
    Source(id="wall", title="Great Wall", text="The Great Wall of China is very long."),
]
TOWER_QUESTION = "When was the Eiffel Tower completed, and how tall is it?"


@pytest.mark.parametrize(
    ("script", "copy"),
    [
        # The model's likelihood picks the copy: it starts the way the model wanted to.
        ("It is 330 metres tall and made of cheese [1].", "It is 330 metres tall [2]."),
        (
            "The Eiffel Tower was completed by aliens from Mars [3].",
            "The Eiffel Tower was completed in 1889 [2].",
        ),
    ],
)
def test_an_unsupported_sentence_is_replaced_by_the_copy_the_model_prefers(
    script: str, copy: str
) -> None:
    answer = Citeformer(MockBackend([script])).generate(TOWER_QUESTION, TOWER)
    assert answer.text == copy
    assert [c.origin for c in answer.citations] == [SentenceOrigin.COPY]
    assert answer.stop_reason is StopReason.FALLBACK
    assert answer.is_fallback
    assert answer.citations[0].evidence is not None
    notes = [e.detail for e in answer.trace.entries if e.kind == "fallback"]
    assert notes[-1] == "grounded copy of a sentence of source [2]"


def test_a_copy_after_a_supported_sentence_keeps_it_and_ends_the_answer() -> None:
    script = "The Eiffel Tower was completed in 1889 [2]. It is made of cheese from Mars [1]."
    # No sentence regeneration: the scripted model, off its script, would end the answer.
    cf = Citeformer(MockBackend([script]), budgets=Budgets(sentence_retries=0))
    answer = cf.generate(TOWER_QUESTION, TOWER)
    assert answer.text.startswith("The Eiffel Tower was completed in 1889 [2]. ")
    assert [c.origin for c in answer.citations] == [SentenceOrigin.MODEL, SentenceOrigin.COPY]
    assert answer.stop_reason is StopReason.END
    assert not answer.is_fallback


@pytest.mark.parametrize(
    ("fallback", "stop", "origins"),
    [
        ("quote", StopReason.FALLBACK, [SentenceOrigin.QUOTE]),
        ("abstain", StopReason.NO_SUPPORTED_ANSWER, []),
    ],
)
def test_other_fallbacks_quote_or_abstain(
    fallback: str, stop: StopReason, origins: list[SentenceOrigin]
) -> None:
    cf = Citeformer(MockBackend(["Bananas are blue and grow on Mars [1]."]))
    answer = cf.generate(TOWER_QUESTION, TOWER, policy=Policy(fallback=fallback))
    assert answer.stop_reason is stop
    assert [c.origin for c in answer.citations] == origins


def test_no_copy_without_sources_to_copy_from_sentence() -> None:
    # Nothing in these sources is relevant to the question: no copy, no quote.
    unrelated = [Source(title="Bananas", text="Bananas grow in warm places near rivers.")]
    answer = Citeformer(MockBackend(["Whatever it was, it was tall [1]."])).generate(
        TOWER_QUESTION, unrelated
    )
    assert answer.text == ""
    assert answer.stop_reason is StopReason.NO_SUPPORTED_ANSWER


def test_what_a_claim_adds_must_all_be_in_the_passage() -> None:
    choir = Source(title="Silver Bells", text="Ann Lee founded the choir Silver Bells in 1990.")
    v = validator([choir], "Who founded Silver Bells?")
    verdict = check(v, "Ann Lee, the lead soprano, founded the choir Silver Bells.", 1)
    assert not verdict.is_accepted
    assert "lead" in verdict.detail
    assert check(v, "Ann Lee founded the choir Silver Bells in 1990.", 1).is_accepted
    lenient = CitationValidator(
        n_sources=1,
        policy=Policy(),
        scorer=LexicalSupportScorer([choir], threshold=0.5),
        question="Who founded Silver Bells?",
        sources=[choir],
        min_novel=0.5,
    )
    assert check(
        lenient, "Ann Lee, the lead soprano, founded the choir Silver Bells.", 1
    ).is_accepted


def test_copies_are_sentences_no_splitter_would_cut() -> None:
    earl = Source(
        title="Edward Stanley",
        text="Edward Stanley (c. 1435 - 1504) was an English earl and a soldier in the war. "
        "Edward Stanley fought at the Battle of Bosworth in the year 1485.",
    )
    v = validator([earl], "Which battle did Edward Stanley fight at?")
    assert [text for _, text in v.grounding("Stanley fought somewhere")] == [
        "Edward Stanley fought at the Battle of Bosworth in the year 1485"
    ]


def test_no_copy_when_no_source_names_what_the_question_is_about() -> None:
    # "designed" is in a source (Eiffel's company designed the tower), the Opera House is
    # in none: a copy would answer another question.
    eiffel = Source(
        title="Eiffel Tower",
        text="It is named after the engineer Gustave Eiffel, whose company designed and "
        "built the tower from 1887 to 1889.",
    )
    question = "Who designed the Sydney Opera House?"
    assert validator([eiffel], question).grounding("Frank Lloyd Wright designed it") == []
    script = "The Opera House was designed by Frank Lloyd Wright [1]."
    answer = Citeformer(MockBackend([script])).generate(question, [eiffel])
    assert answer.text == ""
    assert answer.stop_reason is StopReason.NO_SUPPORTED_ANSWER


def test_a_copy_says_whom_it_is_about() -> None:
    # Read without its passage, "The song was performed live ..." is about whatever song
    # the reader has in mind: a copy names its passage's subject, or the question does.
    song = Source(
        title="Blue Harbour (song)",
        text="Blue Harbour is a single by the band Tin Lanterns. The song was performed "
        "live on a 1999 episode of a late-night television show.",
    )
    other = Source(
        title="Red Delta",
        text="Red Delta is a song by the band Tin Lanterns, released in 1996 on a vinyl single.",
    )
    asked_of_another = "On which show did Tin Lanterns perform Red Delta live?"
    offered = [text for _, text in validator([song, other], asked_of_another).grounding("")]
    assert (
        "The song was performed live on a 1999 episode of a late-night television show"
        not in offered
    )
    assert offered  # the sentences that name their subject stay
    for text in offered:
        assert "Blue Harbour" in text or "Red Delta" in text
    asked_of_it = "On which show was Blue Harbour performed live?"
    offered = [text for _, text in validator([song, other], asked_of_it).grounding("")]
    assert (
        "The song was performed live on a 1999 episode of a late-night television show" in offered
    )


def test_an_untitled_source_keeps_its_copies() -> None:
    untitled = Source(text="It was performed live on a 1999 episode of a late-night show.")
    question = "When was it performed live on a late-night show?"
    offered = [text for _, text in validator([untitled], question).grounding("")]
    assert offered == ["It was performed live on a 1999 episode of a late-night show"]
