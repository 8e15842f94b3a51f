"""The decoder's mask: which tokens every citation rule allows at a step.

The grammar matcher allows what the citation grammar allows; :class:`MarkerMask` narrows
that by the validator (ids it would refuse for the open marker, partial ids that need a
partner, markers a sentence may not open yet), the required policy (no uncited sentence
may end, ``max_uncited_chars``), bans and control tokens, and checks one proposed token
the same way (:meth:`MarkerMask.speculate`) so that greedy decoding rarely builds the
whole mask.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from citebacktrack._tracker import ClosedMarker, TextState, advance
from citebacktrack.decoding._run import VERDICT_CLAIMS, Run
from citebacktrack.decoding.matcher import TokenMatcher
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.types import CitationMode, Policy, RejectionReason
from citebacktrack.validation import CitationValidator, Verdict

__all__ = ["MarkerMask", "normalized"]


class MarkerMask:
    """The citation rules of one decode, as token masks.

    Args:
        index: the vocabulary index.
        matcher: the grammar matcher (shared with the decoder).
        policy: the citation policy.
        validator: the one validator.
        n_sources: how many sources may be cited.
        constrained: False for the raw model (only the grammar, bans and control masks).
    """

    def __init__(
        self,
        *,
        index: VocabularyIndex,
        matcher: TokenMatcher,
        policy: Policy,
        validator: CitationValidator,
        n_sources: int,
        constrained: bool,
    ) -> None:
        self.index = index
        self.matcher = matcher
        self.policy = policy
        self.validator = validator
        self.n_sources = n_sources
        self.constrained = constrained

    def speculate(self, run: Run, token: int, position: int) -> bool:
        """The shortcut: whether ``token`` (the proposed draw) passes every filter
        of :meth:`allowed` and the grammar, checked for this one token; if so the matcher
        has accepted it. The full mask (the bitmask fill is most of the decoder's cost)
        is then never built. False means "build the mask": the token is refused, or its
        fate depends on other tokens (the ramble bound's fallbacks, a dead end).

        Decides exactly as ``allowed(...)[token]`` would, filter by filter
        (``test_one_token_checks_agree_with_the_full_mask_for_every_token_at_every_step``
        compares the two on random models).
        """
        index, state = self.index, run.state
        if not index.unblocked[token] or token in run.token_bans.get(position, ()):
            return False
        if not self.constrained:
            return self.matcher.accept_token(token)
        opens = bool(index.open_pos[token] >= 0)
        forbidden, can_open = self._marker_rules(run)
        candidate = index.is_marker[token] if state.in_marker else opens
        partial = self._partial_ids(run)
        if (
            (forbidden or partial)
            and candidate
            and not self._marker_ok(state, index.tokens[token], position, forbidden, partial)
        ):
            return False
        if not state.in_marker and self.needs_more(run) and index.open_pos[token] != 0:
            return False
        if not state.in_marker:
            if opens and (not can_open or self._not_yet(run)):
                return False
            if self.policy.mode is CitationMode.REQUIRED:
                if not can_open:
                    if state.dangling:
                        return False  # a dead end: the full path escalates it
                    pending = state.pending_boundary
                    if pending != 2 and index.prose[token]:
                        new_sentence = index.newline_first[token] or index.ends_first[token]
                        if not (new_sentence or (pending == 1 and index.space_first[token])):
                            return False
                room = self._ramble_room(run)
                reach = int(index.open_chars[token]) if opens else int(index.chars[token])
                if room is not None and reach > room:
                    return False  # past the bound: the fallbacks need the whole mask
        return self.matcher.accept_token(token)

    def allowed(self, run: Run, position: int) -> npt.NDArray[np.bool_] | None:
        """The tokens the grammar, control masks, bans and citation rules all allow."""
        allowed = self.matcher.allowed() & self.index.unblocked
        for token in run.token_bans.get(position, ()):
            allowed[token] = False
        if not self.constrained:
            return allowed if allowed.any() else None
        can_open = self._filter_markers(run, allowed, position)
        if not run.state.in_marker and self.needs_more(run):
            allowed &= self.index.open_pos == 0
            return allowed if allowed.any() else None
        if self.policy.mode is CitationMode.REQUIRED and not run.state.in_marker:
            if not can_open:
                if run.state.dangling:
                    return None  # the sentence needs a citation that can no longer be given
                self._filter_dangling(run, allowed)
            self._filter_ramble(run, allowed)
        return allowed if allowed.any() else None

    def _marker_rules(self, run: Run) -> tuple[frozenset[int], bool]:
        """Ids the next marker in this sentence must not use, and whether a new marker may
        open here (always True inside a marker)."""
        state = run.state
        banned = run.bans.get(state.sentence_start, set())
        forbidden = self.validator.forbidden_ids(state.sentence_ids, banned)
        if state.in_marker:
            unsupported = frozenset(i for i, v in self.verdicts(run).items() if not v.is_accepted)
            return forbidden | unsupported, True
        can_open = state.sentence_start not in run.no_markers and self.validator.can_open_marker(
            state.sentence_ids, banned
        )
        return forbidden, can_open

    def _not_yet(self, run: Run) -> bool:
        """A marker may not open here, though the sentence may still cite later: under
        REQUIRED there are no words to cite yet (a finished sentence has none left, and
        ``claim [1]. [2]`` would reopen one already released), or no source supported the
        claim a moment ago and the sentence must say more first."""
        state = run.state
        if state.strict and not (state.dangling or state.in_group):
            return True
        return state.length < run.open_blocks.get(state.sentence_start, 0)

    def verdicts(self, run: Run) -> dict[int, Verdict]:
        """The validator's verdict for every id at the open marker (cached per claim)."""
        state = run.state
        claim = run.draft.claim(state.sentence_start, state.marker_start)
        key = (claim, state.sentence_ids)
        verdicts = run.verdicts.pop(key, None)
        if verdicts is None:
            if self.validator.scorer is None:
                verdicts = {}
            else:
                verdicts = {
                    i: self.validator.check(
                        source_index=i, sentence_ids=state.sentence_ids, claim=claim
                    )
                    for i in range(1, self.n_sources + 1)
                    if i not in state.sentence_ids
                }
            if len(run.verdicts) >= VERDICT_CLAIMS:
                del run.verdicts[next(iter(run.verdicts))]  # the least recently used
        run.verdicts[key] = verdicts
        return verdicts

    def refusal(self, run: Run, claim: str, best: int) -> tuple[int, Verdict]:
        """Why no id could close the open marker: the id that came closest and its
        verdict, whose reason and score agree. ``best`` (the source that supports the
        claim best) unless the sentence cites it already (its verdict would be a
        duplicate with no score); then the best-scored id this marker could take, which
        is redundant where the sentence is supported without it."""
        state = run.state
        if best and best not in state.sentence_ids:
            ids = state.sentence_ids
            return best, self.validator.check(source_index=best, sentence_ids=ids, claim=claim)
        open_ids = self.verdicts(run)
        if not open_ids:
            why = "every source is cited in this sentence already"
            return best, Verdict(is_accepted=False, reason=RejectionReason.DUPLICATE, detail=why)
        closest = max(open_ids, key=lambda i: (open_ids[i].score or 0.0, -i))
        return closest, open_ids[closest]

    def needs_more(self, run: Run) -> bool:
        """Right after a partial marker: the group must go on with another marker."""
        state = run.state
        if not state.in_group or not run.draft.accepted:
            return False
        last = run.draft.accepted[-1]
        return last.marker.end == state.length and not last.verdict.is_complete

    def _ramble_room(self, run: Run) -> int | None:
        """Characters (code points) of prose left before ``max_uncited_chars``, or None
        while no token is long enough to reach the bound."""
        room = max(0, self.policy.max_uncited_chars - run.state.uncited_run)
        return room if room < self.index.max_length else None

    def _filter_markers(self, run: Run, allowed: npt.NDArray[np.bool_], position: int) -> bool:
        """Mask marker tokens the validator would refuse; return whether a marker may open."""
        state = run.state
        forbidden, can_open = self._marker_rules(run)
        if not state.in_marker:
            if not can_open or self._not_yet(run):
                allowed[self.index.open_ids] = False
                return can_open
            candidates = self.index.open_ids
        else:
            candidates = self.index.marker_ids
        partial = self._partial_ids(run)
        if forbidden or partial:
            for token in candidates[allowed[candidates]]:
                piece = self.index.tokens[token]
                if not self._marker_ok(state, piece, position, forbidden, partial):
                    allowed[token] = False
        return can_open

    def _partial_ids(self, run: Run) -> frozenset[int]:
        """Ids the open marker may take only if another marker follows in the group."""
        if not run.state.in_marker:
            return frozenset()
        return frozenset(
            i for i, v in self.verdicts(run).items() if v.is_accepted and not v.is_complete
        )

    def _marker_ok(
        self,
        state: TextState,
        piece: bytes,
        position: int,
        forbidden: frozenset[int],
        partial: frozenset[int] = frozenset(),
    ) -> bool:
        """Whether ``piece`` keeps every marker it touches completable with a permitted id
        (and does not end a group right after a ``partial`` id)."""
        after, closed = advance(state, piece, position)
        for marker in closed:
            if marker.source_index in forbidden or marker.source_index in marker.prior_ids:
                return False
        ends_group = not (after.in_group or after.in_marker)
        if closed and closed[-1].source_index in partial and ends_group:
            return False
        if after.in_marker:
            taken = forbidden | frozenset(after.sentence_ids)
            prefix = after.partial_id
            return any(
                str(i).startswith(prefix) and i not in taken for i in range(1, self.n_sources + 1)
            )
        return True

    def _filter_dangling(self, run: Run, allowed: npt.NDArray[np.bool_]) -> None:
        """No marker may open: only let words through if the token ends the sentence first."""
        pending = run.state.pending_boundary
        if pending == 2:
            return
        index = self.index
        new_sentence = index.newline_first | index.ends_first
        if pending == 1:
            new_sentence = new_sentence | index.space_first
        allowed &= ~(index.prose & ~new_sentence)

    def _filter_ramble(self, run: Run, allowed: npt.NDArray[np.bool_]) -> None:
        """Enforce ``max_uncited_chars``: prose past the bound must open a citation first.

        Where the bound falls inside a construct the grammar will not let ``[`` interrupt
        (an ellipsis, ``e.g.``, a decimal point, a URL), the construct is finished first,
        by the shortest tokens that can (see ``VocabularyIndex.closing``): the bound may be
        overshot by those few characters, but never becomes a dead end.
        """
        room = self._ramble_room(run)
        if room is None:
            return
        chars, open_chars = self.index.chars, self.index.open_chars
        within = ~np.where(open_chars >= 0, open_chars > room, chars > room)
        if (allowed & within).any():
            allowed &= within
            return
        for closing in self.index.closing:
            if (allowed & closing).any():
                allowed &= closing
                return

    def repeats(self, run: Run, marker: ClosedMarker) -> bool:
        """Whether the sentence of ``marker`` (its first) says nothing an earlier one did
        not: the same words, or a run of an earlier sentence's words."""
        said = normalized(run.draft.claim(marker.sentence_start, marker.start))
        earlier = {
            normalized(run.draft.claim(a.marker.sentence_start, a.marker.start))
            for a in run.draft.accepted
            if not a.marker.prior_ids and a.marker.sentence_start < marker.sentence_start
        }
        # A sentence that only says again what one earlier sentence said (or a part of it).
        padded = f" {said} "
        return bool(said) and any(padded in f" {e} " for e in earlier)

    def token_at(self, run: Run, byte_offset: int) -> int:
        """Index of the generated token holding ``byte_offset``."""
        lo, hi = 0, len(run.steps)
        while lo < hi:  # the first step whose text starts after byte_offset, minus one
            mid = (lo + hi) // 2
            if run.steps[mid].state.length <= byte_offset:
                lo = mid + 1
            else:
                hi = mid
        return max(0, lo - 1)


def normalized(text: str) -> str:
    """Lower-case words only: how repeated sentences are recognised."""
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())
