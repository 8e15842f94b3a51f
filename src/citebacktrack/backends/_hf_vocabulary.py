"""The vocabulary of a transformers tokenizer, as the decoder reads it (token bytes,
stop and control tokens)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from citebacktrack.decoding.runtime import Vocabulary

__all__ = ["read_vocabulary"]


_STOP_TOKEN_NAMES = ("<|im_end|>", "<|endoftext|>")

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def read_vocabulary(tokenizer: Any, model: Any, width: int) -> Vocabulary:
    """Build the vocabulary: exact bytes per id, stop ids, and control ids up to ``width``."""
    vocab: Mapping[str, int] = tokenizer.get_vocab()
    added: Mapping[int, Any] = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    stop_ids = set(_as_ids(tokenizer.eos_token_id))
    stop_ids.update(_as_ids(getattr(model.generation_config, "eos_token_id", None)))
    stop_ids.update(vocab[name] for name in _STOP_TOKEN_NAMES if name in vocab)
    control_ids = {token for token, entry in added.items() if getattr(entry, "special", False)}
    control_ids.update(_as_ids(getattr(tokenizer, "all_special_ids", None)))

    n_tokenizer = min(len(tokenizer), width)
    pieces = list(_token_bytes(tokenizer, n_tokenizer, added))
    for token, piece in enumerate(pieces):
        if piece is None:
            control_ids.add(token)
    # Logits rows past the tokenizer (padding to a multiple of 64 and the like) are masked.
    control_ids.update(range(n_tokenizer, width))
    stop_ids = {token for token in stop_ids if 0 <= token < width}
    control_ids = {token for token in control_ids if 0 <= token < width} - stop_ids
    tokens = [
        b"" if token in stop_ids or token in control_ids or piece is None else piece
        for token, piece in enumerate(pieces)
    ]
    tokens.extend(b"" for _ in range(n_tokenizer, width))
    return Vocabulary(
        tokens=tuple(tokens),
        stop_ids=frozenset(stop_ids),
        control_ids=frozenset(control_ids),
        size=width,
    )


def _as_ids(value: object) -> list[int]:
    """Normalise an id, a list of ids, or ``None`` to a list of ids."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list | tuple | set | frozenset):
        return [int(item) for item in value if isinstance(item, int)]
    return []


def _token_bytes(tokenizer: Any, n_tokens: int, added: Mapping[int, Any]) -> Iterator[bytes | None]:
    """Yield the exact bytes of ids ``0..n_tokens-1`` (``None`` for an unused id).

    Single-id ``decode`` is lossy (a partial UTF-8 sequence becomes U+FFFD), so the raw
    token strings are mapped back to bytes with the inverse of the tokenizer's encoding:
    GPT-2's byte-to-unicode table for byte-level BPE, ``▁``/``<0xNN>`` for SentencePiece.
    """
    kind = _decoder_kind(tokenizer)
    strings: list[str | None] = tokenizer.convert_ids_to_tokens(list(range(n_tokens)))
    inverse = {char: byte for byte, char in _bytes_to_unicode().items()}
    for token, text in enumerate(strings):
        if text is None:
            yield None
        elif token in added:
            # Added tokens are stored as plain text, not in the byte-level alphabet.
            yield str(added[token].content).encode("utf-8")
        elif kind == "byte_level":
            try:
                yield bytes(inverse[char] for char in text)
            except KeyError:
                yield text.encode("utf-8")
        elif kind == "sentencepiece":
            match = _BYTE_TOKEN.fullmatch(text)
            yield bytes([int(match.group(1), 16)]) if match else text.replace("▁", " ").encode()
        else:
            decoded: str = tokenizer.decode(
                [token], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            yield decoded.encode("utf-8")


def _decoder_kind(tokenizer: Any) -> str:
    """Classify the fast tokenizer's decoder: ``byte_level``, ``sentencepiece`` or ``other``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "other"
    spec = json.loads(backend.to_str()).get("decoder") or {}
    types = set(_decoder_types(spec))
    if "ByteLevel" in types:
        return "byte_level"
    if types & {"ByteFallback", "Metaspace"}:
        return "sentencepiece"
    return "other"


def _decoder_types(spec: object) -> Iterator[str]:
    """Yield every ``type`` in a (possibly nested ``Sequence``) tokenizers decoder spec."""
    if isinstance(spec, dict):
        kind = spec.get("type")
        if isinstance(kind, str):
            yield kind
        for value in spec.values():
            yield from _decoder_types(value)
    elif isinstance(spec, list):
        for item in spec:
            yield from _decoder_types(item)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte-to-printable-character table used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shift)
            shift += 1
    return table
