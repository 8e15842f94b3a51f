"""The backtracking decode loop: mask → sample → accept → validate → keep or roll back.

One generated token is one :class:`_Step`, holding what was true *before* it was sampled:
the random state, the citation state and (for checkpoints and the recent window) the
logits. A rollback to step ``i`` restores all of them together with the grammar matcher
(``rollback``) and the KV cache (``truncate``), so a retry after a rejected citation
needs no extra forward pass; where logits were dropped to save memory, one forward pass
of the last kept token recomputes them (counted in the trace).

Each step first draws a token from the unmasked logits (``propose``: the argmax when
greedy) and checks that token alone (``_speculate``: every filter of the mask decided for
that one token, then the matcher's ``accept_token``); the full mask is built only when it
is refused or its place in the top-k/top-p set depends on the mask. A rejection sampler,
it picks each token with exactly the probability sampling over the mask would give it.

Escalation when a citation is rejected, per sentence:

1. ban the id for the rest of this sentence and roll back to the marker's first token,
   up to ``Budgets.retries_per_checkpoint`` times;
2. then roll back to the start of the sentence and regenerate it, keeping the bans, up to
   ``Budgets.sentence_retries`` times;
3. then fall back: under AUTO, roll back to the marker and forbid markers in this sentence
   (the marker is dropped); under REQUIRED, replace the sentence by a grounded copy
   (``Policy.fallback="copy"``: a source sentence the model picks under a token trie of
   the sentences the validator offers, ADR 0011) and end the answer, else end it after
   the last complete sentence with stop reason ``no_valid_citation`` (or quote, or
   abstain, when nothing was accepted); under QUOTES_ONLY, end it there.

Streaming holds text back until it can no longer be rolled back: the current sentence is
released when the next one starts (or at the end), and, with operators, the last
``max(op.max_depth)`` tokens are held as well.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from citebacktrack._draft import COMPLETE, Accepted, Draft
from citebacktrack.decoding.budgets import Budgets
from citebacktrack.decoding.matcher import TokenMatcher
from citebacktrack.decoding.operators import Operator, StepStats, StepView
from citebacktrack.decoding.runtime import Logits, TokenRuntime
from citebacktrack.decoding.sampling import SamplingConfig, propose, sample, sample_masked
from citebacktrack.decoding.tracker import ClosedMarker, TextState, advance
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.types import (
    CitationMode,
    CitationRejected,
    Done,
    Event,
    Policy,
    RejectionReason,
    Rollback,
    SentenceOrigin,
    StopReason,
    TraceEntry,
)
from citebacktrack.validation import CitationValidator, Verdict

__all__ = ["Decoder"]

_MORE_BYTES = 8
"""After no source supported a claim, bytes the sentence must grow before it cites again."""

_RECENT_LOGITS = 2
"""Steps whose logits are kept besides checkpoints (covers rollback of the current token)."""

_VERDICT_CLAIMS = 64
"""Claims whose verdicts are cached: enough for every marker a sentence retries, and a
decode that rolls back thousands of times does not keep the verdicts of each claim."""


@dataclass(slots=True)
class _Step:
    token: int
    rng: int
    state: TextState
    logits: Logits | None
    stats: StepStats | None = None
    is_checkpoint: bool = False


@dataclass(slots=True)
class _Run:
    """Mutable state of one decode; everything a rollback touches lives here (the answer
    in progress in ``draft``, the token-level state beside it)."""

    draft: Draft
    steps: list[_Step] = field(default_factory=list)
    state: TextState = field(default_factory=TextState)
    rng: int = 0
    logits: Logits | None = None
    kv_steps: int = 0
    bans: dict[int, set[int]] = field(default_factory=dict)
    token_bans: dict[int, set[int]] = field(default_factory=dict)
    marker_retries: dict[int, int] = field(default_factory=dict)
    sentence_retries: dict[int, int] = field(default_factory=dict)
    no_markers: set[int] = field(default_factory=set)
    open_blocks: dict[int, int] = field(default_factory=dict)
    """Sentence start -> answer length before which no marker may open there: no source
    supported the claim, so the sentence must say more before it cites again."""
    best_refused: tuple[float, int, str] = (0.0, 0, "")
    """The best-supported claim refused so far: (score, source, claim), for the quote."""
    verdicts: dict[tuple[str, tuple[int, ...]], dict[int, Verdict]] = field(default_factory=dict)
    """The validator's verdict on every id for (claim, prior ids): the ids it would
    refuse are masked before the id is sampled. The last ``_VERDICT_CLAIMS`` claims used,
    least recently used first (a retry at the same marker finds its claim here)."""
    backtracks: int = 0
    wasted: int = 0
    generated: int = 0
    forward_passes: int = 0


class Decoder:
    """Runs one constrained, validated, backtracking decode on a :class:`TokenRuntime`.

    Args:
        runtime: the model (its KV cache is reset by ``prefill``).
        index: the vocabulary index for ``runtime.vocabulary``.
        matcher: the citation grammar's state (:class:`XGrammarMatcher` over the grammar
            compiled with ``index``, or another engine's :class:`TokenMatcher`).
        policy: the citation policy.
        validator: citation rules and support; ``None`` accepts every grammatical marker.
        sampling: how to pick tokens.
        budgets: limits that end the loop.
        operators: extra rules that may roll back after any token.
        source_ids: the id of each source, in order (for the emitted citations).
        constrained: False decodes with no citation rules at all (the matcher should then
            allow every token): markers are neither filtered, checked nor reported, and the
            whole text is released (the raw-model baseline).
    """

    def __init__(
        self,
        runtime: TokenRuntime,
        index: VocabularyIndex,
        matcher: TokenMatcher,
        *,
        policy: Policy,
        validator: CitationValidator | None,
        sampling: SamplingConfig,
        budgets: Budgets,
        operators: Sequence[Operator] = (),
        source_ids: Sequence[str],
        constrained: bool = True,
    ) -> None:
        self.runtime = runtime
        self.index = index
        self.policy = policy
        self.validator = validator or CitationValidator(
            n_sources=len(source_ids), policy=policy, scorer=None
        )
        self.sampling = sampling
        self.budgets = budgets
        self.operators = tuple(operators)
        self.hold_back = max((op.max_depth for op in self.operators), default=0)
        self.source_ids = tuple(source_ids)
        self.matcher = matcher
        # Operators need the masked distribution of every step: no shortcut for them.
        self._shortcut = not self.operators
        self._n_sources = len(source_ids)
        self.constrained = constrained
        self.initial_state = TextState(strict=constrained and policy.mode is CitationMode.REQUIRED)

    # ------------------------------------------------------------------ driving

    def run(self, prompt: Sequence[int]) -> Iterator[Event]:
        """Decode an answer to ``prompt``; yield final text, citation events and ``Done``."""
        started = time.perf_counter()
        run = self._new_run()
        run.logits = self.runtime.prefill(prompt)
        run.forward_passes = 1
        prompt_len = len(prompt)
        while run.draft.stop is None:
            if self._out_of_time(started):
                run.draft.stop = StopReason.WALL_TIME
                break
            if len(run.steps) >= self.budgets.max_new_tokens:
                self._out_of_tokens(run, prompt_len)
                break
            yield from self._step(run, prompt_len)
        yield from self._release(run, final=True)
        yield self._done(run, prompt_len)

    def _new_run(self) -> _Run:
        draft = Draft(
            policy=self.policy,
            validator=self.validator,
            source_ids=self.source_ids,
            constrained=self.constrained,
        )
        return _Run(draft=draft, rng=self.sampling.seed, state=self.initial_state)

    def _out_of_time(self, started: float) -> bool:
        limit = self.budgets.max_wall_time_s
        return limit is not None and time.perf_counter() - started > limit

    def _step(self, run: _Run, prompt_len: int) -> Iterator[Event]:
        """Sample one token under every constraint and take it."""
        if run.logits is None:  # pragma: no cover - every path sets logits before stepping
            raise RuntimeError("decoder lost its logits")
        position = len(run.steps)
        proposal = propose(run.logits, self.sampling, run.rng) if self._shortcut else None
        if (
            proposal is not None
            and proposal.certain
            and self._speculate(run, proposal.token, position)
        ):
            rng = proposal.rng_state
            yield from self._take(run, proposal.token, rng, None, prompt_len, accepted=True)
            return
        if run.state.in_marker:
            favourite = proposal.token if proposal is not None else int(np.argmax(run.logits))
            yield from self._refused_choice(run, favourite, position)
        allowed = self._allowed(run, position)
        if allowed is None:
            yield from self._dead_end(run, prompt_len)
            return
        if proposal is not None:  # no operators: they would need the masked logits
            token, rng_after = sample_masked(run.logits, allowed, self.sampling, run.rng, proposal)
            yield from self._take(run, token, rng_after, None, prompt_len)
            return
        masked = np.where(allowed, run.logits, np.float32(-np.inf)).astype(np.float32, copy=False)
        token, rng_after = sample(masked, self.sampling, run.rng)
        yield from self._take(run, token, rng_after, masked, prompt_len)

    def _take(
        self,
        run: _Run,
        token: int,
        rng_after: int,
        masked: Logits | None,
        prompt_len: int,
        *,
        accepted: bool = False,
    ) -> Iterator[Event]:
        """Accept ``token`` (already allowed by the mask): validate, maybe roll back, forward.

        ``masked`` (the logits it was drawn from) may be None only when there are no
        operators; ``accepted`` says the matcher has already taken the token.
        """
        position = len(run.steps)
        logits = run.logits
        run.generated += 1
        if token in self.index.stop_ids and (accepted or self.matcher.accept_token(token)):
            run.draft.stop = StopReason.END
            return
        if not accepted and not self.matcher.accept_token(token):
            # The mask said yes and the matcher no: never trust a token twice.
            run.token_bans.setdefault(position, set()).add(token)
            return
        step = _Step(
            token=token, rng=run.rng, state=run.state, logits=logits, is_checkpoint=position == 0
        )
        piece = self.index.tokens[token]
        run.state, closed = advance(run.state, piece, position)
        run.steps.append(step)
        run.draft.out += piece
        run.rng = rng_after
        if run.state.sentence_token == position or b"[" in piece:
            step.is_checkpoint = True
        for marker in closed if self.constrained else ():
            claim, verdict = self._judge(run, marker)
            if not verdict.is_accepted:
                yield from self._reject(run, marker, verdict, prompt_len)
                return
            if not marker.prior_ids and self._repeats(run, marker):
                target = max(self._token_at(run, marker.sentence_start), _kept_tokens(run))
                self._note(run, "fallback", target, "repeated sentence: the answer ends here")
                self._truncate_to(run, target, prompt_len)
                run.draft.stop = StopReason.END
                return
            run.draft.accepted.append(Accepted(marker, verdict, claim))
        if self.operators and masked is not None:
            depth = self._operators(run, position, token, masked)
            if depth:
                yield from self._operator_rollback(run, depth, prompt_len)
                return
        yield from self._release(run, final=False)
        run.logits = self.runtime.forward([token])
        run.kv_steps = len(run.steps)
        run.forward_passes += 1
        stale = len(run.steps) - 1 - _RECENT_LOGITS - self.hold_back
        if stale >= 0 and not run.steps[stale].is_checkpoint:
            run.steps[stale].logits = None

    # ------------------------------------------------------------------ masking

    def _speculate(self, run: _Run, token: int, position: int) -> bool:
        """The shortcut: whether ``token`` (the proposed draw) passes every filter
        of :meth:`_allowed` and the grammar, checked for this one token; if so the matcher
        has accepted it. The full mask (the bitmask fill is most of the decoder's cost)
        is then never built. False means "build the mask": the token is refused, or its
        fate depends on other tokens (the ramble bound's fallbacks, a dead end).

        Decides exactly as ``_allowed(...)[token]`` would, filter by filter
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
        if not state.in_marker and self._needs_more(run) and index.open_pos[token] != 0:
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

    def _allowed(self, run: _Run, position: int) -> npt.NDArray[np.bool_] | None:
        """The tokens the grammar, control masks, bans and citation rules all allow."""
        allowed = self.matcher.allowed() & self.index.unblocked
        for token in run.token_bans.get(position, ()):
            allowed[token] = False
        if not self.constrained:
            return allowed if allowed.any() else None
        can_open = self._filter_markers(run, allowed, position)
        if not run.state.in_marker and self._needs_more(run):
            allowed &= self.index.open_pos == 0
            return allowed if allowed.any() else None
        if self.policy.mode is CitationMode.REQUIRED and not run.state.in_marker:
            if not can_open:
                if run.state.dangling:
                    return None  # the sentence needs a citation that can no longer be given
                self._filter_dangling(run, allowed)
            self._filter_ramble(run, allowed)
        return allowed if allowed.any() else None

    def _marker_rules(self, run: _Run) -> tuple[frozenset[int], bool]:
        """Ids the next marker in this sentence must not use, and whether a new marker may
        open here (always True inside a marker)."""
        state = run.state
        banned = run.bans.get(state.sentence_start, set())
        forbidden = self.validator.forbidden_ids(state.sentence_ids, banned)
        if state.in_marker:
            unsupported = frozenset(i for i, v in self._verdicts(run).items() if not v.is_accepted)
            return forbidden | unsupported, True
        can_open = state.sentence_start not in run.no_markers and self.validator.can_open_marker(
            state.sentence_ids, banned
        )
        return forbidden, can_open

    def _not_yet(self, run: _Run) -> bool:
        """A marker may not open here, though the sentence may still cite later: under
        REQUIRED there are no words to cite yet (a finished sentence has none left, and
        ``claim [1]. [2]`` would reopen one already released), or no source supported the
        claim a moment ago and the sentence must say more first."""
        state = run.state
        if state.strict and not (state.dangling or state.in_group):
            return True
        return state.length < run.open_blocks.get(state.sentence_start, 0)

    def _verdicts(self, run: _Run) -> dict[int, Verdict]:
        """The validator's verdict for every id at the open marker (cached per claim)."""
        state = run.state
        claim = self._claim(run, state.sentence_start, state.marker_start)
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
                    for i in range(1, self._n_sources + 1)
                    if i not in state.sentence_ids
                }
            if len(run.verdicts) >= _VERDICT_CLAIMS:
                del run.verdicts[next(iter(run.verdicts))]  # the least recently used
        run.verdicts[key] = verdicts
        return verdicts

    def _needs_more(self, run: _Run) -> bool:
        """Right after a partial marker: the group must go on with another marker."""
        state = run.state
        if not state.in_group or not run.draft.accepted:
            return False
        last = run.draft.accepted[-1]
        return last.marker.end == state.length and not last.verdict.is_complete

    def _ramble_room(self, run: _Run) -> int | None:
        """Characters (code points) of prose left before ``max_uncited_chars``, or None
        while no token is long enough to reach the bound."""
        room = max(0, self.policy.max_uncited_chars - run.state.uncited_run)
        return room if room < self.index.max_length else None

    def _filter_markers(self, run: _Run, allowed: npt.NDArray[np.bool_], position: int) -> bool:
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

    def _partial_ids(self, run: _Run) -> frozenset[int]:
        """Ids the open marker may take only if another marker follows in the group."""
        if not run.state.in_marker:
            return frozenset()
        return frozenset(
            i for i, v in self._verdicts(run).items() if v.is_accepted and not v.is_complete
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
                str(i).startswith(prefix) and i not in taken for i in range(1, self._n_sources + 1)
            )
        return True

    def _filter_dangling(self, run: _Run, allowed: npt.NDArray[np.bool_]) -> None:
        """No marker may open: only let words through if the token ends the sentence first."""
        pending = run.state.pending_boundary
        if pending == 2:
            return
        index = self.index
        new_sentence = index.newline_first | index.ends_first
        if pending == 1:
            new_sentence = new_sentence | index.space_first
        allowed &= ~(index.prose & ~new_sentence)

    def _filter_ramble(self, run: _Run, allowed: npt.NDArray[np.bool_]) -> None:
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

    # ------------------------------------------------------------------ validation

    def _repeats(self, run: _Run, marker: ClosedMarker) -> bool:
        """Whether the sentence of ``marker`` (its first) says nothing an earlier one did
        not: the same words, or a run of an earlier sentence's words."""
        said = _normalized(self._claim(run, marker.sentence_start, marker.start))
        earlier = {
            _normalized(self._claim(run, a.marker.sentence_start, a.marker.start))
            for a in run.draft.accepted
            if not a.marker.prior_ids and a.marker.sentence_start < marker.sentence_start
        }
        # A sentence that only says again what one earlier sentence said (or a part of it).
        padded = f" {said} "
        return bool(said) and any(padded in f" {e} " for e in earlier)

    def _token_at(self, run: _Run, byte_offset: int) -> int:
        """Index of the generated token holding ``byte_offset``."""
        lo, hi = 0, len(run.steps)
        while lo < hi:  # the first step whose text starts after byte_offset, minus one
            mid = (lo + hi) // 2
            if run.steps[mid].state.length <= byte_offset:
                lo = mid + 1
            else:
                hi = mid
        return max(0, lo - 1)

    def _refused_choice(self, run: _Run, token: int, position: int) -> Iterator[Event]:
        """Report the model's own choice of id when the validator masked it: the same
        rejection a rollback would have reported, without the rollback."""
        state = run.state
        after, closed = advance(state, self.index.tokens[token], position)
        verdicts = self._verdicts(run)
        if closed:
            wanted = closed[0].source_index
        elif after.in_marker and after.partial_id.isdigit():
            # A digit the model wanted ("1" of "[1]"), refused because only refused ids
            # begin with it.
            wanted = int(after.partial_id)
            if any(
                str(i).startswith(after.partial_id) and v.is_accepted for i, v in verdicts.items()
            ):
                return
        else:
            return
        verdict = verdicts.get(wanted)
        if verdict is None or verdict.is_accepted:
            return
        yield self._rejection(
            run,
            token_position=state.marker_token,
            byte_offset=state.marker_start,
            source_index=wanted,
            reason=verdict.reason or RejectionReason.UNSUPPORTED,
            score=verdict.score,
            detail=f"masked before sampling: {verdict.detail}",
        )

    def _rejection(
        self,
        run: _Run,
        *,
        token_position: int,
        byte_offset: int,
        source_index: int,
        reason: RejectionReason,
        score: float | None,
        detail: str,
    ) -> CitationRejected:
        """Count a rejection and trace it; the event to yield for it."""
        return run.draft.reject(
            position=token_position,
            offset=run.draft.char_offset(byte_offset),
            source_index=source_index,
            reason=reason,
            score=score,
            detail=detail,
        )

    def _claim(self, run: _Run, sentence_start: int, marker_start: int) -> str:
        """The sentence before a marker, markers removed: what the marker must support."""
        return run.draft.claim(sentence_start, marker_start)

    def _judge(self, run: _Run, marker: ClosedMarker) -> tuple[str, Verdict]:
        """The claim a closed marker must support, and the validator's verdict on it."""
        return run.draft.judge(marker)

    def _reject(
        self, run: _Run, marker: ClosedMarker, verdict: Verdict, prompt_len: int
    ) -> Iterator[Event]:
        sentence = marker.sentence_start
        yield self._rejection(
            run,
            token_position=marker.token_index,
            byte_offset=marker.start,
            source_index=marker.source_index,
            reason=verdict.reason or RejectionReason.UNSUPPORTED,
            score=verdict.score,
            detail=verdict.detail,
        )
        run.bans.setdefault(sentence, set()).add(marker.source_index)
        retries = run.marker_retries.get(sentence, 0) + 1
        run.marker_retries[sentence] = retries
        if retries <= self.budgets.retries_per_checkpoint:
            yield from self._rollback(
                run, marker.token_index, prompt_len, f"rejected [{marker.source_index}]"
            )
            return
        yield from self._escalate(run, prompt_len, marker_token=marker.token_index)

    def _escalate(
        self, run: _Run, prompt_len: int, *, marker_token: int | None, stuck: bool = False
    ) -> Iterator[Event]:
        """Regenerate the sentence, or apply the policy's fallback when that is used up
        (``stuck``: the grammar itself allowed no token, see :meth:`_give_up`)."""
        state = run.steps[marker_token].state if marker_token is not None else run.state
        sentence, sentence_token = state.sentence_start, state.sentence_token
        redone = run.sentence_retries.get(sentence, 0) + 1
        run.sentence_retries[sentence] = redone
        # A group right after a released sentence's end (``claim. [2]``) belongs to it:
        # that sentence is streamed already and cannot be regenerated.
        released = sentence_token < _kept_tokens(run)
        if (
            redone <= self.budgets.sentence_retries
            and sentence_token < len(run.steps)
            and not released
        ):
            run.marker_retries[sentence] = 0
            # Retries never repeat themselves: the regenerated sentence starts differently.
            first = run.steps[sentence_token].token
            run.token_bans.setdefault(sentence_token, set()).add(first)
            yield from self._rollback(run, sentence_token, prompt_len, "regenerate sentence")
            return
        if self.policy.mode is CitationMode.AUTO and marker_token is not None:
            run.no_markers.add(sentence)
            self._note(run, "fallback", marker_token, "dropped marker: no valid citation")
            yield from self._rollback(run, marker_token, prompt_len, "drop marker")
            return
        self._give_up(run, state, prompt_len, stuck=stuck)

    def _out_of_tokens(self, run: _Run, prompt_len: int) -> None:
        """The token budget ran out: ``max_new_tokens``, unless the sentence waiting for
        its citation is one no source would support (:meth:`Draft.unsupported_at_budget`);
        then it ends like a sentence no citation can be found for (:meth:`_give_up`)."""
        run.draft.stop = StopReason.MAX_NEW_TOKENS
        state = run.state
        banned = run.bans.get(state.sentence_start, set())
        if run.draft.unsupported_at_budget(state, banned) is None:
            return
        self._note(
            run, "fallback", len(run.steps), "the token budget ran out in an unsupported sentence"
        )
        self._give_up(run, state, prompt_len)

    def _give_up(
        self, run: _Run, state: TextState, prompt_len: int, *, stuck: bool = False
    ) -> None:
        """End the answer before the sentence of ``state``, which no citation can be found
        for: the policy's fallback for it (:meth:`Draft.give_up`), and the stop reason that
        says so. ``stuck``: the grammar itself (with the token bans) allowed nothing,
        whatever the citation rules: that is no citation failure, and the answer ends with
        ``dead_end``."""
        sentence, sentence_token = state.sentence_start, state.sentence_token
        end = state.marker_start if state.in_marker else len(run.draft.out)
        claim = run.draft.claim(sentence, max(sentence, end))
        why = "the grammar allows no token" if stuck else "no valid citation"
        self._note(run, "fallback", sentence_token, f"{why} for this sentence")
        # Never into released text (a group after a released sentence's end reopens it).
        self._truncate_to(run, max(sentence_token, _kept_tokens(run)), prompt_len)
        if stuck or self.policy.mode is CitationMode.AUTO:
            run.draft.stop = StopReason.DEAD_END
            return
        stop = run.draft.give_up(
            copy=lambda: self._copy(run, claim, prompt_len),
            quote=lambda: self._quote(run, claim, prompt_len),
        )
        run.draft.stop = stop or run.draft.grounded_stop()

    def _copy(self, run: _Run, claim: str, prompt_len: int) -> bool:
        """Grounded recovery: write, in place of the unsupported sentence, one sentence of
        the best-supported sources (:meth:`CitationValidator.grounding`) with its
        citation, decoded greedily under a token trie of those sentences: at each step
        only tokens that continue some candidate are allowed and the model's logits pick
        among them, so its likelihood chooses which sentence answers. Every token also
        goes through the grammar matcher and the copy through the validator; False when
        there is nothing to copy or the grammar or budget refuses (nothing is changed)."""
        lead = b"" if not run.draft.out or run.draft.out[-1:].isspace() else b" "
        trie: dict[tuple[int, ...], set[int]] = {}
        sources: dict[tuple[int, ...], int] = {}
        for source, text in self.validator.grounding(claim):
            tokens = self.index.encode(lead + text.encode("utf-8") + f" [{source}].".encode())
            if not tokens:
                continue
            path = tuple(tokens)
            sources.setdefault(path, source)
            for depth in range(len(path)):
                trie.setdefault(path[:depth], set()).add(path[depth])
        if not trie:
            return False
        start = len(run.steps)
        written: tuple[int, ...] = ()
        while written not in sources:
            options = trie.get(written)
            if not options or len(run.steps) >= self.budgets.max_new_tokens:
                self._truncate_to(run, start, prompt_len)
                return False
            logits = run.logits
            ranked = sorted(options, key=lambda t: -float(logits[t]) if logits is not None else t)
            for token in ranked:
                if self.matcher.accept_token(token):
                    break
            else:
                self._truncate_to(run, start, prompt_len)
                return False
            written = (*written, token)
            if not self._force(run, token, start, prompt_len, SentenceOrigin.COPY):
                return False
            run.logits = self.runtime.forward([token])
            run.forward_passes += 1
            run.kv_steps = len(run.steps)
        source = sources[written]
        self._note(run, "fallback", start, f"grounded copy of a sentence of source [{source}]")
        return True

    def _force(
        self, run: _Run, token: int, start: int, prompt_len: int, origin: SentenceOrigin
    ) -> bool:
        """Take ``token`` (the matcher has accepted it) as a step of a copy or quote that
        began at step ``start``, judging the markers it closes; on a refused one, undo
        everything from ``start`` and return False. The caller evaluates the token."""
        position = len(run.steps)
        run.steps.append(
            _Step(
                token=token,
                rng=run.rng,
                state=run.state,
                logits=run.logits if position == start else None,
                is_checkpoint=position == start,
            )
        )
        run.state, closed = advance(run.state, self.index.tokens[token], position)
        run.draft.out += self.index.tokens[token]
        run.generated += 1
        for marker in closed:
            said, verdict = self._judge(run, marker)
            if not verdict.is_accepted:
                self._truncate_to(run, start, prompt_len)
                return False
            run.draft.accepted.append(Accepted(marker, verdict, said, origin))
        return True

    def _quote(self, run: _Run, claim: str, prompt_len: int) -> bool:
        """Write the evidence sentence the validator picks (:meth:`CitationValidator.quote`:
        relevant to the question), verbatim, with its citation: a sentence constrained to
        what that source says. It goes
        through the grammar and the validator like any other; False if either refuses it
        (nothing is then changed)."""
        if run.best_refused[0] > 0.0 and self.validator.question is None:
            claim = run.best_refused[2]  # the refused claim that came closest
        picked = self.validator.quote(claim)
        if picked is None:
            return False
        source, text = picked
        lead = b"" if not run.draft.out or run.draft.out[-1:].isspace() else b" "
        tokens = self.index.encode(lead + text.encode("utf-8") + f" [{source}].".encode())
        start = len(run.steps)
        if tokens is None or start + len(tokens) > self.budgets.max_new_tokens:
            return False  # not writable, or past the token budget
        for token in tokens:
            if not self.matcher.accept_token(token):
                self._truncate_to(run, start, prompt_len)  # undoes the tokens taken so far
                return False
            if not self._force(run, token, start, prompt_len, SentenceOrigin.QUOTE):
                return False
        # One token per forward pass, like every other kept token: the KV cache then holds
        # exactly what decoding these tokens would have left (a batched eval differs by
        # llama.cpp's batch rounding).
        for token in tokens:
            run.logits = self.runtime.forward([token])
            run.forward_passes += 1
        run.kv_steps = len(run.steps)
        self._note(run, "fallback", start, f"quoted the evidence of source [{source}]")
        return True

    def _dead_end(self, run: _Run, prompt_len: int) -> Iterator[Event]:
        """Nothing may be sampled here: treat it as this sentence failing to find a
        citation, unless the grammar itself allows nothing (then regenerating the sentence
        is all that may help, and the answer ends with ``dead_end`` when it does not)."""
        if not run.steps:
            run.draft.stop = StopReason.DEAD_END
            return
        state = run.state
        grammar = self.matcher.allowed() & self.index.unblocked
        for token in run.token_bans.get(len(run.steps), ()):
            grammar[token] = False
        if not grammar.any():
            self._note(run, "fallback", len(run.steps), "the grammar allows no token here")
            marker_token = state.marker_token if state.in_marker else None
            yield from self._escalate(run, prompt_len, marker_token=marker_token, stuck=True)
            return
        if state.in_marker and self.validator.scorer is not None:
            yield from self._unsupported_claim(run, prompt_len)
            return
        if not state.in_marker and self._needs_more(run):
            # A partial marker whose completion was made impossible: reject it.
            last = run.draft.accepted[-1]
            verdict = Verdict(
                is_accepted=False,
                reason=RejectionReason.UNSUPPORTED,
                score=last.verdict.score,
                detail="partial support that no further citation could complete",
            )
            yield from self._reject(run, last.marker, verdict, prompt_len)
            return
        self._note(run, "fallback", len(run.steps), "no token allowed (bans, bound and grammar)")
        marker_token = state.marker_token if state.in_marker else None
        yield from self._escalate(run, prompt_len, marker_token=marker_token)

    def _unsupported_claim(self, run: _Run, prompt_len: int) -> Iterator[Event]:
        """No source supports the sentence so far: take the marker back and make the
        sentence say more before it may cite again (or escalate when retries run out)."""
        state = run.state
        sentence, marker_token = state.sentence_start, state.marker_token
        claim = self._claim(run, sentence, state.marker_start)
        best = self.validator.best_sources(claim)
        best_id, best_score = best[0] if best else (0, 0.0)
        if best_score > run.best_refused[0]:
            run.best_refused = (best_score, best_id, claim)
        # The verdict on the best source says why (a claim that is not citable scores 0
        # whatever the scorer gives its words): a trace never says unsupported with 1.0.
        verdict = (
            self.validator.check(source_index=best_id, sentence_ids=state.sentence_ids, claim=claim)
            if best_id
            else None
        )
        score = verdict.score if verdict is not None and verdict.score is not None else best_score
        why = verdict.detail if verdict is not None else "no source"
        yield self._rejection(
            run,
            token_position=marker_token,
            byte_offset=state.marker_start,
            source_index=best_id,
            reason=RejectionReason.UNSUPPORTED,
            score=score,
            detail=f"no source supports {claim[-80:]!r}; best [{best_id}] {score:.2f}: {why}",
        )
        retries = run.marker_retries.get(sentence, 0) + 1
        run.marker_retries[sentence] = retries
        if retries > self.budgets.retries_per_checkpoint:
            yield from self._escalate(run, prompt_len, marker_token=marker_token)
            return
        run.open_blocks[sentence] = state.marker_start + _MORE_BYTES
        yield from self._rollback(run, marker_token, prompt_len, "no supported id")

    def _note(self, run: _Run, kind: str, position: int, detail: str) -> None:
        out = run.draft.out
        offset = run.steps[position].state.length if position < len(run.steps) else len(out)
        run.draft.note(
            position=position, offset=run.draft.char_offset(offset), detail=detail, kind=kind
        )

    # ------------------------------------------------------------------ operators

    def _operators(self, run: _Run, position: int, token: int, masked: Logits) -> int:
        finite = np.isfinite(masked)
        shifted = np.where(finite, masked - masked[finite].max(), -np.inf).astype(np.float64)
        probs = np.exp(shifted)
        probs /= probs.sum()
        nonzero = probs[probs > 0]
        entropy = float(-(nonzero * np.log(nonzero)).sum())
        top = np.partition(probs, -2)[-2:] if probs.size > 1 else np.array([0.0, probs[0]])
        stats = StepStats(
            token=token,
            probability=float(probs[token]),
            entropy=entropy,
            margin=float(top[1] - top[0]),
            logit=float(masked[token]),
        )
        run.steps[position].stats = stats
        history = [s.stats for s in run.steps[:position] if s.stats is not None]
        view = StepView(position, token, masked, probs, stats, history)
        depth, name = 0, ""
        for operator in self.operators:
            wanted = operator.check(view)
            if wanted > depth:
                depth = wanted
                name = type(operator).__name__
        if not depth:
            return 0
        depth = min(depth, position + 1)
        target = position + 1 - depth
        bans = run.token_bans.setdefault(target, set())
        if len(bans) >= self.budgets.retries_per_checkpoint:
            return 0  # this position has had its retries; let the token stand
        bans.add(run.steps[target].token)
        self._note(run, "operator", target, f"{name} rolled back {depth}")
        return depth

    def _operator_rollback(self, run: _Run, depth: int, prompt_len: int) -> Iterator[Event]:
        yield from self._rollback(run, len(run.steps) - depth, prompt_len, "operator")

    # ------------------------------------------------------------------ rollback

    def _rollback(self, run: _Run, target: int, prompt_len: int, reason: str) -> Iterator[Event]:
        """Restore every piece of state to just before step ``target`` (atomically)."""
        depth = len(run.steps) - target
        self._truncate_to(run, target, prompt_len)
        run.backtracks += 1
        run.wasted += depth
        run.draft.trace.append(
            TraceEntry(
                kind="rollback",
                token_position=target,
                char_offset=run.draft.char_offset(len(run.draft.out)),
                reason=reason,
                depth=depth,
            )
        )
        yield Rollback(depth=depth, reason=reason)
        if run.backtracks > self.budgets.max_backtracks:
            run.draft.stop = StopReason.BACKTRACK_BUDGET
        elif run.wasted > self.budgets.max_rolled_back_tokens:
            run.draft.stop = StopReason.ROLLED_BACK_TOKEN_BUDGET

    def _truncate_to(self, run: _Run, target: int, prompt_len: int) -> None:
        if target >= len(run.steps):
            return
        step = run.steps[target]
        self.matcher.rollback(len(run.steps) - target)
        if step.logits is not None:
            if run.kv_steps > target:
                self.runtime.truncate(prompt_len + target)
            run.logits = step.logits
        else:
            # Logits were dropped to save memory: re-evaluate the last kept token.
            self.runtime.truncate(prompt_len + target - 1)
            run.logits = self.runtime.forward([run.steps[target - 1].token])
            run.forward_passes += 1
        run.kv_steps = min(run.kv_steps, target)
        run.state, run.rng = step.state, step.rng
        del run.steps[target:]
        del run.draft.out[step.state.length :]
        run.draft.accepted = [a for a in run.draft.accepted if a.marker.end <= step.state.length]
        sentence = step.state.sentence_start
        for key in [k for k in run.bans if k > sentence]:
            del run.bans[key]
        for key in [k for k in run.open_blocks if k > sentence]:
            del run.open_blocks[key]
        for key in [k for k in run.token_bans if k > target]:
            del run.token_bans[key]

    # ------------------------------------------------------------------ output

    def _safe_offset(self, run: _Run, *, final: bool) -> int:
        if final:
            whole = run.draft.final_offset(run.state)
            if whole is not None:
                return whole
        sentence_token = run.state.sentence_token
        safe = (
            run.steps[sentence_token].state.length
            if sentence_token < len(run.steps)
            else len(run.draft.out)
        )
        if final:
            return safe
        if self.hold_back:
            first_open = len(run.steps) - self.hold_back
            safe = min(safe, run.steps[first_open].state.length if first_open >= 0 else 0)
        # Never cut inside a UTF-8 character.
        out, released = run.draft.out, run.draft.released
        while safe > released and safe < len(out) and out[safe] & 0xC0 == 0x80:
            safe -= 1
        return safe

    def _release(self, run: _Run, *, final: bool) -> Iterator[Event]:
        yield from run.draft.release(self._safe_offset(run, final=final))

    def _done(self, run: _Run, prompt_len: int) -> Done:
        kept = len(run.steps) if run.draft.stop in COMPLETE else _kept_tokens(run)
        return run.draft.done(
            backtracks=run.backtracks,
            wasted=run.wasted,
            forward_passes=run.forward_passes,
            kept=kept,
            prompt_tokens=prompt_len,
            generated=run.generated,
        )


def _kept_tokens(run: _Run) -> int:
    """Tokens whose bytes made it into the released text."""
    for i, step in enumerate(run.steps):
        if step.state.length >= run.draft.released:
            return i
    return len(run.steps)


def _normalized(text: str) -> str:
    """Lower-case words only: how repeated sentences are recognised."""
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())
