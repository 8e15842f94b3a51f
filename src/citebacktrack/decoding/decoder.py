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
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from citebacktrack._cancel import stop_if_cancelled
from citebacktrack._draft import COMPLETE, Accepted, Draft
from citebacktrack._tracker import ClosedMarker, TextState, advance
from citebacktrack.decoding._masking import MarkerMask
from citebacktrack.decoding._recovery import GroundedRecovery
from citebacktrack.decoding._run import RECENT_LOGITS, Run, Step, kept_tokens
from citebacktrack.decoding.matcher import TokenMatcher
from citebacktrack.decoding.operators import strongest, view_of
from citebacktrack.decoding.runtime import Logits, TokenRuntime
from citebacktrack.decoding.sampling import propose, sample, sample_masked
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.types import (
    CitationMode,
    CitationRejected,
    Done,
    Event,
    RejectionReason,
    Rollback,
    StopReason,
    TraceEntry,
)
from citebacktrack.validation import CitationValidator, Verdict

if TYPE_CHECKING:
    from citebacktrack.request import GenerationRequest

__all__ = ["Decoder"]

_MORE_BYTES = 8
"""After no source supported a claim, bytes the sentence must grow before it cites again."""


class Decoder(GroundedRecovery):
    """Runs one constrained, validated, backtracking decode on a :class:`TokenRuntime`.

    Args:
        runtime: the model (its KV cache is reset by ``prefill``).
        index: the vocabulary index for ``runtime.vocabulary``.
        matcher: the citation grammar's state (:class:`XGrammarMatcher` over the grammar
            compiled with ``index``, or another engine's :class:`TokenMatcher`).
        request: what to decode, the one source of its policy, validator, budgets,
            sampling, operators and sources. A request without a grammar decodes with no
            citation rules at all (the matcher should then allow every token): markers
            are neither filtered, checked nor reported, and the whole text is released
            (the raw-model baseline).
    """

    def __init__(
        self,
        runtime: TokenRuntime,
        index: VocabularyIndex,
        matcher: TokenMatcher,
        request: GenerationRequest,
    ) -> None:
        policy = request.policy
        constrained = request.grammar is not None
        self.runtime = runtime
        self.index = index
        self.policy = policy
        self.validator = request.validator or CitationValidator(
            n_sources=request.n_sources, policy=policy, scorer=None
        )
        self.sampling = request.decoding.sampling
        self.budgets = request.budgets
        self.operators = request.decoding.operators
        self.hold_back = max((op.max_depth for op in self.operators), default=0)
        self.matcher = matcher
        # Operators need the masked distribution of every step: no shortcut for them.
        self._shortcut = not self.operators
        self._n_sources = request.n_sources
        self.constrained = constrained
        self.mask = MarkerMask(
            index=index,
            matcher=matcher,
            policy=policy,
            validator=self.validator,
            n_sources=self._n_sources,
            constrained=constrained,
        )
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
            stop_if_cancelled()  # an async caller that went away stops it within one step
            if self._out_of_time(started):
                run.draft.stop = StopReason.WALL_TIME
                break
            if len(run.steps) >= self.budgets.max_new_tokens:
                self._out_of_tokens(run, prompt_len)
                break
            yield from self._step(run, prompt_len)
        yield from self._release(run, final=True)
        yield self._done(run, prompt_len)

    def _new_run(self) -> Run:
        draft = Draft(
            policy=self.policy,
            validator=self.validator,
            n_sources=self._n_sources,
            constrained=self.constrained,
        )
        return Run(draft=draft, rng=self.sampling.seed, state=self.initial_state)

    def _out_of_time(self, started: float) -> bool:
        limit = self.budgets.max_wall_time_s
        return limit is not None and time.perf_counter() - started > limit

    def _step(self, run: Run, prompt_len: int) -> Iterator[Event]:
        """Sample one token under every constraint and take it."""
        if run.logits is None:  # pragma: no cover - every path sets logits before stepping
            raise RuntimeError("decoder lost its logits")
        position = len(run.steps)
        proposal = propose(run.logits, self.sampling, run.rng) if self._shortcut else None
        if (
            proposal is not None
            and proposal.certain
            and self.mask.speculate(run, proposal.token, position)
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
        run: Run,
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
        step = Step(
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
            if not marker.prior_ids and self.mask.repeats(run, marker):
                target = max(self.mask.token_at(run, marker.sentence_start), kept_tokens(run))
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
        stale = len(run.steps) - 1 - RECENT_LOGITS - self.hold_back
        if stale >= 0 and not run.steps[stale].is_checkpoint:
            run.steps[stale].logits = None

    def _allowed(self, run: Run, position: int) -> npt.NDArray[np.bool_] | None:
        """The tokens the grammar, control masks, bans and citation rules all allow."""
        return self.mask.allowed(run, position)

    def _refused_choice(self, run: Run, token: int, position: int) -> Iterator[Event]:
        """Report the model's own choice of id when the validator masked it: the same
        rejection a rollback would have reported, without the rollback."""
        state = run.state
        after, closed = advance(state, self.index.tokens[token], position)
        verdicts = self.mask.verdicts(run)
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
        run: Run,
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

    def _claim(self, run: Run, sentence_start: int, marker_start: int) -> str:
        """The sentence before a marker, markers removed: what the marker must support."""
        return run.draft.claim(sentence_start, marker_start)

    def _judge(self, run: Run, marker: ClosedMarker) -> tuple[str, Verdict]:
        """The claim a closed marker must support, and the validator's verdict on it."""
        return run.draft.judge(marker)

    def _reject(
        self, run: Run, marker: ClosedMarker, verdict: Verdict, prompt_len: int
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
        self, run: Run, prompt_len: int, *, marker_token: int | None, stuck: bool = False
    ) -> Iterator[Event]:
        """Regenerate the sentence, or apply the policy's fallback when that is used up
        (``stuck``: the grammar itself allowed no token, see :meth:`_give_up`)."""
        state = run.steps[marker_token].state if marker_token is not None else run.state
        sentence, sentence_token = state.sentence_start, state.sentence_token
        redone = run.sentence_retries.get(sentence, 0) + 1
        run.sentence_retries[sentence] = redone
        # A group right after a released sentence's end (``claim. [2]``) belongs to it:
        # that sentence is streamed already and cannot be regenerated.
        released = sentence_token < kept_tokens(run)
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

    def _out_of_tokens(self, run: Run, prompt_len: int) -> None:
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

    def _give_up(self, run: Run, state: TextState, prompt_len: int, *, stuck: bool = False) -> None:
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
        self._truncate_to(run, max(sentence_token, kept_tokens(run)), prompt_len)
        if stuck or self.policy.mode is CitationMode.AUTO:
            run.draft.stop = StopReason.DEAD_END
            return
        stop = run.draft.give_up(
            copy=lambda: self._copy(run, claim, prompt_len),
            quote=lambda: self._quote(run, claim, prompt_len),
        )
        run.draft.stop = stop or run.draft.grounded_stop()

    def _dead_end(self, run: Run, prompt_len: int) -> Iterator[Event]:
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
        if not state.in_marker and self.mask.needs_more(run):
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

    def _unsupported_claim(self, run: Run, prompt_len: int) -> Iterator[Event]:
        """No source supports the sentence so far: take the marker back and make the
        sentence say more before it may cite again (or escalate when retries run out)."""
        state = run.state
        sentence, marker_token = state.sentence_start, state.marker_token
        claim = self._claim(run, sentence, state.marker_start)
        best = self.validator.best_sources(claim)
        best_id, best_score = best[0] if best else (0, 0.0)
        if best_score > run.best_refused[0]:
            run.best_refused = (best_score, best_id, claim)
        # The verdict of the id that came closest says why, with its own reason and score:
        # a trace never says unsupported with a score that supports (MarkerMask.refusal).
        closest, verdict = self.mask.refusal(run, claim, best_id)
        reason = verdict.reason or RejectionReason.UNSUPPORTED
        lead = "no source supports" if reason is RejectionReason.UNSUPPORTED else "nothing adds to"
        score = "" if verdict.score is None else f" {verdict.score:.2f}"
        yield self._rejection(
            run,
            token_position=marker_token,
            byte_offset=state.marker_start,
            source_index=closest,
            reason=reason,
            score=verdict.score,
            detail=f"{lead} {_shown(claim)!r}; best [{closest}]{score}: {verdict.detail}",
        )
        retries = run.marker_retries.get(sentence, 0) + 1
        run.marker_retries[sentence] = retries
        if retries > self.budgets.retries_per_checkpoint:
            yield from self._escalate(run, prompt_len, marker_token=marker_token)
            return
        run.open_blocks[sentence] = state.marker_start + _MORE_BYTES
        yield from self._rollback(run, marker_token, prompt_len, "no supported id")

    def _note(self, run: Run, kind: str, position: int, detail: str) -> None:
        out = run.draft.out
        offset = run.steps[position].state.length if position < len(run.steps) else len(out)
        run.draft.note(
            position=position, offset=run.draft.char_offset(offset), detail=detail, kind=kind
        )

    # ------------------------------------------------------------------ operators

    def _operators(self, run: Run, position: int, token: int, masked: Logits) -> int:
        history = [s.stats for s in run.steps[:position] if s.stats is not None]
        view = view_of(position, token, masked, history)
        run.steps[position].stats = view.stats
        depth, name = strongest(self.operators, view)
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

    def _operator_rollback(self, run: Run, depth: int, prompt_len: int) -> Iterator[Event]:
        yield from self._rollback(run, len(run.steps) - depth, prompt_len, "operator")

    # ------------------------------------------------------------------ rollback

    def _rollback(self, run: Run, target: int, prompt_len: int, reason: str) -> Iterator[Event]:
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

    def _truncate_to(self, run: Run, target: int, prompt_len: int) -> None:
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

    def _safe_offset(self, run: Run, *, final: bool) -> int:
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

    def _release(self, run: Run, *, final: bool) -> Iterator[Event]:
        yield from run.draft.release(self._safe_offset(run, final=final))

    def _done(self, run: Run, prompt_len: int) -> Done:
        kept = len(run.steps) if run.draft.stop in COMPLETE else kept_tokens(run)
        return run.draft.done(
            backtracks=run.backtracks,
            wasted=run.wasted,
            forward_passes=run.forward_passes,
            kept=kept,
            prompt_tokens=prompt_len,
            generated=run.generated,
        )


def _shown(claim: str, limit: int = 300) -> str:
    """``claim`` for a trace line: whole up to ``limit`` characters (the default
    ``max_uncited_chars``, so a sentence the default policy lets cite is shown whole),
    else its last whole words after an ellipsis; never cut inside a word ("uilt in 1889",
    "he bees use" read as claims of their own): a last word longer than ``limit`` is
    shown whole."""
    if len(claim) <= limit:
        return claim
    words = claim.split(" ")
    shown = words.pop()
    while words and len(words[-1]) + 1 + len(shown) <= limit:
        shown = f"{words.pop()} {shown}"
    return f"…{shown}" if words else shown
