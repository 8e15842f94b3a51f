"""Grounded recovery, the token-level half: the copy and the quote the decoder writes
in place of a sentence no citation can be found for (ADR 0011).

:class:`GroundedRecovery` is a part of :class:`~citebacktrack.decoding.decoder.Decoder`
(its base class): the copy decodes greedily under a token trie of the sentences the
validator offers, the quote writes the evidence sentence verbatim; both go through the
grammar matcher, the validator and the KV cache like any other token. Which fallback
applies, and the stop reason it ends with, the draft decides (:meth:`Draft.give_up`).
"""

from __future__ import annotations

from citebacktrack._draft import Accepted
from citebacktrack._tracker import ClosedMarker, advance
from citebacktrack.decoding._run import Run, Step
from citebacktrack.decoding.matcher import TokenMatcher
from citebacktrack.decoding.runtime import TokenRuntime
from citebacktrack.decoding.vocab_index import VocabularyIndex
from citebacktrack.request import Budgets
from citebacktrack.types import SentenceOrigin
from citebacktrack.validation import CitationValidator, Verdict

__all__ = ["GroundedRecovery"]


class GroundedRecovery:
    """The copy and the quote of the token-level decoder (a base of ``Decoder``)."""

    runtime: TokenRuntime
    index: VocabularyIndex
    matcher: TokenMatcher
    validator: CitationValidator
    budgets: Budgets

    def _judge(self, run: Run, marker: ClosedMarker) -> tuple[str, Verdict]:
        raise NotImplementedError  # the decoder's

    def _truncate_to(self, run: Run, target: int, prompt_len: int) -> None:
        raise NotImplementedError  # the decoder's

    def _note(self, run: Run, kind: str, position: int, detail: str) -> None:
        raise NotImplementedError  # the decoder's

    def _copy(self, run: Run, claim: str, prompt_len: int) -> bool:
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
        self, run: Run, token: int, start: int, prompt_len: int, origin: SentenceOrigin
    ) -> bool:
        """Take ``token`` (the matcher has accepted it) as a step of a copy or quote that
        began at step ``start``, judging the markers it closes; on a refused one, undo
        everything from ``start`` and return False. The caller evaluates the token."""
        position = len(run.steps)
        run.steps.append(
            Step(
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

    def _quote(self, run: Run, claim: str, prompt_len: int) -> bool:
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
