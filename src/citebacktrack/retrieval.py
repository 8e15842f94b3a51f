"""BM25 retrieval over a folder of text documents, for the command line.

Documents (``.txt``, ``.md``, ``.markdown``, ``.rst``) are split into passages of whole
paragraphs (long paragraphs are split at sentence ends, by
:func:`citebacktrack.syntax.split_sentences`) of about ``passage_words`` words;
each passage becomes a :class:`~citebacktrack.types.Source` whose id is
``"<file>#<n>"``. Scoring uses the maintained ``bm25s`` library.

The folder's files are data, read only from inside it: a file (or a link) whose real
path is outside the folder is not read, nor is a file over :data:`MAX_DOCUMENT_BYTES`
(its size is read from the file system first, so a huge or sparse file costs nothing),
a binary file (one holding a NUL byte) or one that cannot be read. Each is skipped with
a reason (``load_passages(..., on_skip=...)``; the CLI prints them as notes). Bytes that
are not UTF-8 are read as U+FFFD.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from citebacktrack.errors import ConfigurationError, MissingDependencyError
from citebacktrack.syntax import split_sentences
from citebacktrack.types import Source

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "Passage",
    "PassageIndex",
    "chunk_text",
    "load_passages",
    "sample_docs_path",
]

SUFFIXES = frozenset({".txt", ".md", ".markdown", ".rst"})

MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
"""Largest document read (16 MiB, about 2.5 million words); a larger file is skipped:
split it into smaller files."""


def sample_docs_path() -> Path:
    """The folder of sample documents bundled with the package."""
    return Path(str(resources.files("citebacktrack").joinpath("data", "sample_docs")))


@dataclass(frozen=True, slots=True)
class Passage:
    """A chunk of one document."""

    path: Path
    number: int
    title: str
    text: str

    def to_source(self, score: float | None = None) -> Source:
        """This passage as a citable source (``score``: its retrieval score, if any)."""
        return Source(
            id=f"{self.path.name}#{self.number}",
            title=self.title,
            text=self.text,
            url=self.path.resolve().as_uri(),
            score=score,
        )


def chunk_text(text: str, *, passage_words: int = 80) -> list[str]:
    """Split ``text`` into passages of whole paragraphs of about ``passage_words`` words."""
    pieces: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        words = paragraph.split()
        if not words or paragraph.lstrip().startswith("#"):
            continue
        if len(words) <= passage_words * 1.5:
            pieces.append(" ".join(words))
            continue
        current: list[str] = []
        for sentence in split_sentences(" ".join(words)):
            if current and len(" ".join(current).split()) + len(sentence.split()) > passage_words:
                pieces.append(" ".join(current))
                current = []
            current.append(sentence)
        if current:
            pieces.append(" ".join(current))
    passages: list[str] = []
    for piece in pieces:
        if passages and len(passages[-1].split()) + len(piece.split()) <= passage_words:
            passages[-1] = f"{passages[-1]} {piece}"
        else:
            passages.append(piece)
    return passages


def _title(path: Path, text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return path.stem.replace("_", " ").replace("-", " ").strip()


def _read(path: Path, root: Path) -> str:
    """The text of the document at ``path``; raises ``_SkippedError`` saying why it is not read."""
    real = path.resolve()
    if not real.is_relative_to(root):
        raise _SkippedError(f"it links to {str(real)!r}, outside the folder; not followed")
    try:
        size = real.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise _SkippedError(
                f"it is {size:,} bytes, over the {MAX_DOCUMENT_BYTES:,}-byte limit; "
                "split it into smaller files"
            )
        data = real.read_bytes()
    except OSError as exc:
        raise _SkippedError(f"it cannot be read ({exc.strerror or exc})") from exc
    if b"\x00" in data:
        raise _SkippedError("it is a binary file (it holds NUL bytes), not text")
    return data.decode("utf-8", errors="replace")


class _SkippedError(Exception):
    """A document that is not read; the message says why."""


def load_passages(
    folder: Path,
    *,
    passage_words: int = 80,
    on_skip: Callable[[Path, str], None] | None = None,
) -> list[Passage]:
    """Read every document under ``folder`` (recursively) and chunk it.

    Files outside the folder (through a link), over :data:`MAX_DOCUMENT_BYTES`, binary
    or unreadable are skipped; ``on_skip(path, reason)`` is called for each.

    Raises:
        ConfigurationError: the folder does not exist or holds no readable document.
    """
    if not folder.is_dir():
        raise ConfigurationError(
            f"--docs {str(folder)!r} is not a folder; pass a folder of .txt/.md files"
        )
    root = folder.resolve()
    passages: list[Passage] = []
    for path in sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()
    ):
        try:
            text = _read(path, root)
        except _SkippedError as skipped:
            if on_skip is not None:
                on_skip(path, str(skipped))
            continue
        title = _title(path, text)
        for number, chunk in enumerate(chunk_text(text, passage_words=passage_words), start=1):
            passages.append(Passage(path=path, number=number, title=title, text=chunk))
    if not passages:
        raise ConfigurationError(
            f"no text found in {str(folder)!r}; "
            f"it needs files ending in {', '.join(sorted(SUFFIXES))}"
        )
    return passages


class PassageIndex:
    """A BM25 index over passages."""

    def __init__(self, passages: Sequence[Passage]) -> None:
        try:
            import bm25s
        except ImportError as exc:
            raise MissingDependencyError(
                feature="document retrieval", extra="retrieval", module="bm25s"
            ) from exc
        self._bm25s = bm25s
        self.passages = list(passages)
        corpus = [f"{p.title} {p.text}" for p in self.passages]
        self._retriever = bm25s.BM25()
        self._retriever.index(
            bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False
        )

    def search(self, query: str, k: int = 5) -> list[Source]:
        """The ``k`` passages that best match ``query``, best first, as sources; each
        source's ``score`` is its BM25 score (never used to judge support)."""
        k = max(1, min(k, len(self.passages)))
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        results, scores = self._retriever.retrieve(tokens, k=k, show_progress=False)
        # Zero-score passages stay: distractors are normal, the validator sorts them.
        return [
            self.passages[int(i)].to_source(score=float(score))
            for i, score in zip(results[0], scores[0], strict=True)
        ]
