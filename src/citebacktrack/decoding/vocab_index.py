"""Per-vocabulary precomputation shared by every decode on that vocabulary.

Building it costs a pass over the vocabulary and an XGrammar ``TokenizerInfo``; backends
build one per model and reuse it, and its compiler caches compiled grammars by text.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from citebacktrack.decoding.runtime import Vocabulary
from citebacktrack.errors import MissingDependencyError
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.grammar.ir import Grammar
from citebacktrack.syntax import CLOSERS, MARKER_CLOSE, MARKER_OPEN, TERMINATORS, WHITESPACE

if TYPE_CHECKING:
    import xgrammar as xgr

__all__ = ["VocabularyIndex", "import_xgrammar"]


def import_xgrammar() -> ModuleType:
    """Import XGrammar on first use (it imports torch, which plain grammar printing never needs)."""
    try:
        import xgrammar
    except ImportError as exc:
        raise MissingDependencyError(
            feature="constrained decoding", extra=None, module="xgrammar"
        ) from exc
    return xgrammar


_DIGITS = b"0123456789"


def _chars(piece: bytes) -> int:
    """Code points ``piece`` starts: its bytes that are not UTF-8 continuation bytes."""
    return sum(1 for byte in piece if byte & 0xC0 != 0x80)


class VocabularyIndex:
    """Token facts as arrays, plus the XGrammar tokenizer info and grammar compiler.

    Attributes:
        tokens: each id's bytes (padding ids and control tokens map to ``b""``).
        lengths: byte length of each token.
        chars: characters (Unicode code points) each token starts: its bytes that are not
            UTF-8 continuation bytes. The ramble bound counts these, as the grammar does.
        open_pos: offset of the first ``[`` in each token, -1 if none.
        open_chars: characters before the first ``[`` in each token, -1 if none.
        unblocked: False for control tokens, padding ids and tokens holding a NUL byte
            (never sampled; no answer wants a NUL, and llama.cpp's GBNF sampler cannot
            match one while XGrammar can, so both engines now give the same masks).
        open_ids: ids of tokens containing ``[``.
        marker_ids: ids of tokens that can continue a marker (digits first or ``]``).
        is_marker: ``marker_ids`` as a boolean array over the vocabulary.
        prose: tokens with a word character (anything but whitespace, closers,
            terminators): writing one after a sentence's last marker needs another marker,
            unless the token first ends the sentence, which the next three arrays tell.
        newline_first: a newline comes before the token's first word character.
        ends_first: a terminator then whitespace come before its first word character.
        space_first: whitespace comes before its first word character.
        closing: tokens of only whitespace and periods, then tokens of only digits: the
            ways out of a construct ``[`` cannot interrupt (an ellipsis, ``e.g.``, a URL,
            a decimal point), tried in that order when the ramble bound is reached there.
    """

    def __init__(self, vocabulary: Vocabulary) -> None:
        self.vocabulary = vocabulary
        size = vocabulary.size
        blocked = set(vocabulary.control_ids) | set(range(len(vocabulary.tokens), size))
        tokens = [
            b"" if i in blocked or i in vocabulary.stop_ids else bytes(vocabulary.tokens[i])
            for i in range(size)
        ]
        self.tokens = tokens
        self._by_bytes: dict[bytes, int] | None = None
        self.stop_ids = frozenset(vocabulary.stop_ids)
        self.lengths: npt.NDArray[np.int32] = np.fromiter((len(t) for t in tokens), np.int32, size)
        self.max_length = int(self.lengths.max(initial=1))
        self.open_pos: npt.NDArray[np.int32] = np.fromiter(
            (t.find(_OPEN) for t in tokens), np.int32, size
        )
        self.chars: npt.NDArray[np.int32] = np.fromiter((_chars(t) for t in tokens), np.int32, size)
        self.open_chars: npt.NDArray[np.int32] = np.fromiter(
            (_chars(t[:p]) if p >= 0 else -1 for t, p in zip(tokens, self.open_pos, strict=True)),
            np.int32,
            size,
        )
        unblocked = np.ones(size, dtype=bool)
        unblocked[sorted(blocked)] = False
        unblocked[[i for i, t in enumerate(tokens) if b"\x00" in t]] = False
        self.unblocked = unblocked
        self.open_ids: npt.NDArray[np.intp] = np.flatnonzero(self.open_pos >= 0)
        self.marker_ids: npt.NDArray[np.intp] = np.fromiter(
            (
                i
                for i, t in enumerate(tokens)
                if t[:1] in (_CLOSE, *(bytes([d]) for d in _DIGITS)) and t
            ),
            np.intp,
        )
        self.is_marker = np.zeros(size, dtype=bool)
        self.is_marker[self.marker_ids] = True
        flags = np.array([_lead_flags(t) for t in tokens], dtype=bool).reshape(size, 4)
        self.prose, self.newline_first, self.ends_first, self.space_first = flags.T.copy()
        self.closing: tuple[npt.NDArray[np.bool_], ...] = tuple(
            np.fromiter((bool(t) and set(t) <= alphabet for t in tokens), bool, size)
            for alphabet in (frozenset(WHITESPACE.encode() + b"."), frozenset(_DIGITS))
        )
        # Stop tokens need a non-empty spelling for XGrammar; they are matched by id anyway.
        encoded = [t if t or i not in self.stop_ids else b"</s>" for i, t in enumerate(tokens)]
        xgr = import_xgrammar()
        self.tokenizer_info = xgr.TokenizerInfo(
            encoded, xgr.VocabType.RAW, vocab_size=size, stop_token_ids=sorted(self.stop_ids)
        )
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=1, cache_enabled=True)

    def encode(self, text: bytes) -> list[int] | None:
        """Greedy longest-match tokens spelling ``text`` exactly (for text the decoder
        writes itself, such as a quoted fallback sentence); ``None`` if some byte has no
        token. Not the model's own tokenization, but every token is a real one."""
        if self._by_bytes is None:
            self._by_bytes = {}
            for token, piece in enumerate(self.tokens):
                if piece and self.unblocked[token]:
                    self._by_bytes.setdefault(piece, token)
        table, longest = self._by_bytes, self.max_length
        out: list[int] = []
        position = 0
        while position < len(text):
            for size in range(min(longest, len(text) - position), 0, -1):
                found = table.get(text[position : position + size])
                if found is not None:
                    out.append(found)
                    position += size
                    break
            else:
                return None
        return out

    def compile(self, grammar: Grammar) -> xgr.CompiledGrammar:
        """Compile ``grammar`` for this vocabulary (cached by grammar text)."""
        compiled: xgr.CompiledGrammar = self.compiler.compile_grammar(emit(grammar, Dialect.EBNF))
        return compiled


_OPEN = MARKER_OPEN.encode()
_CLOSE = MARKER_CLOSE.encode()
_NEUTRAL_SPACE = frozenset(WHITESPACE.replace("\n", "").encode())
_NEUTRAL_END = frozenset(TERMINATORS.encode())
_NEUTRAL_CLOSE = frozenset(CLOSERS.encode("ascii", "ignore"))  # as the tracker's closers


def _lead_flags(token: bytes) -> tuple[bool, bool, bool, bool]:
    """(has a word character, newline before it, terminator+space before it, space before it)."""
    newline = ended = spaced = terminated = False
    for byte in token:
        if byte == 10:
            newline = True
        elif byte in _NEUTRAL_SPACE:
            spaced = True
            ended = ended or terminated
        elif byte in _NEUTRAL_END:
            terminated = True
        elif byte in _NEUTRAL_CLOSE or byte == _OPEN[0]:  # "[": the marker filter's business
            continue
        else:
            return True, newline, ended, spaced
    return False, newline, ended, spaced
