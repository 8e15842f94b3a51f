"""The command line's own behaviour: ``--version``, help that is never cut, output that a
pipe gets whole, retrieval scores in ``ask --json``, whole claims and plurals in the trace.

Every test runs a scripted model (``MockBackend``) through the real decoder; none loads a
real model.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from citebacktrack import MockBackend
from citebacktrack.cli import app

QUESTION = "How do honey bees tell their nestmates where the flowers are?"
BEES = (
    "Honey bees tell their nestmates where the flowers are by dancing a waggle dance on the "
    "comb, and the angle of the dance gives the direction of the flowers from the sun."
)
UNSUPPORTED = (
    "Honey bees that live in the big white hives of the northern valleys always dance at "
    "midnight to greet the rising winter moon"
)


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "bees.md").write_text(f"# Honey bees\n\n{BEES}\n", encoding="utf-8")
    (folder / "paris.md").write_text(
        "# Paris\n\nParis is the capital of France. The Eiffel Tower stands in Paris.\n",
        encoding="utf-8",
    )
    return folder


def ask(docs: Path, monkeypatch: pytest.MonkeyPatch, script: str, *args: str) -> tuple[str, str]:
    """``citebacktrack ask`` with a model that wants to write ``script``, at 80 columns
    (stdout is not a terminal, as in a pipe); its stdout and stderr."""
    pytest.importorskip("bm25s")
    backend = MockBackend([script])
    monkeypatch.setattr("citebacktrack.cli._build_backend", lambda name, model: backend)
    result = CliRunner().invoke(
        app, ["ask", QUESTION, "--docs", str(docs), *args], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


# ---------------------------------------------------------------------------- version


def test_version_prints_the_package_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"citebacktrack {importlib.metadata.version('citebacktrack')}\n"


# ---------------------------------------------------------------------------- help


def _commands() -> list[list[str]]:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return [[], *([name] for name in group.commands)]


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "citebacktrack")
def test_help_at_80_columns_shows_every_word_of_every_option(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout  # rich's mark of a word cut to fit its column
    shown = set(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split())
    group = typer.main.get_command(app)
    cmd = group.commands[command[0]] if command else group  # type: ignore[attr-defined]
    for param in cmd.params:
        for word in (getattr(param, "help", None) or "").split():
            if "[" not in word:  # rich markup, e.g. [N]
                assert word in shown, f"{word!r} of {param.name}'s help is not shown whole"


def test_help_follows_the_terminal_width() -> None:
    pty = pytest.importorskip("pty")
    fcntl = pytest.importorskip("fcntl")
    termios = pytest.importorskip("termios")
    import struct

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TERMINAL_WIDTH")}
    process = subprocess.Popen(
        [sys.executable, "-m", "citebacktrack.cli", "eval", "--help"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert process.wait(timeout=60) == 0
    text = re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode("utf-8", "replace"))
    widths = [len(line) for line in text.splitlines() if line.strip()]
    assert max(widths) == 150
    assert "…" not in text


# ---------------------------------------------------------------------------- ask


def test_piped_ask_output_writes_the_answer_and_its_quotes_whole(
    docs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdout, _ = ask(docs, monkeypatch, f"{BEES[:-1]} [1].")
    lines = stdout.splitlines()
    assert f"{BEES[:-1]} [1]." in lines  # 172 characters on one line, not wrapped at 80
    assert f'      "{BEES}"' in lines
    assert any(line.startswith("trace: ") and line.endswith("stop: end") for line in lines)


def test_ask_json_reports_each_source_s_retrieval_score(
    docs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdout, _ = ask(docs, monkeypatch, f"{BEES[:-1]} [1].", "--json")
    payload = json.loads(stdout)
    scores = [source["score"] for source in payload["sources"]]
    assert payload["sources"][0]["id"] == "bees.md#1"
    assert all(isinstance(score, float) for score in scores)
    assert scores == sorted(scores, reverse=True)
    assert scores[0] > 0
    assert payload["answer"]["references"][0]["score"] == scores[0]


def test_trace_shows_a_rejected_claim_whole_and_counts_in_plurals(
    docs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdout, _ = ask(docs, monkeypatch, f"{UNSUPPORTED} [1].")
    assert f"no source supports {UNSUPPORTED!r}" in stdout  # 124 characters, not its last 80
    trace = next(line for line in stdout.splitlines() if line.startswith("trace: "))
    assert "(s)" not in trace
    assert re.search(r"trace: \d+ citations rejected, \d+ rollbacks, \d+ tokens wasted", trace)


def test_trace_counts_one_in_the_singular(docs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # [2] (Paris) is refused before it is sampled and [1] cited instead: one rejection.
    stdout, _ = ask(docs, monkeypatch, f"{BEES[:-1]} [2].")
    assert "trace: 1 citation rejected, 0 rollbacks, 0 tokens wasted" in stdout


def test_passage_index_gives_each_source_its_bm25_score(docs: Path) -> None:
    pytest.importorskip("bm25s")
    from citebacktrack.retrieval import PassageIndex, load_passages

    sources = PassageIndex(load_passages(docs)).search("waggle dance of honey bees", k=2)
    assert [s.id for s in sources] == ["bees.md#1", "paris.md#1"]
    assert sources[0].score is not None
    assert sources[0].score > 0
    assert sources[1].score == 0.0  # no query word in it: kept, scored 0


def test_the_reference_list_shows_the_title_the_score_and_only_a_chosen_id(
    docs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = ask(docs, monkeypatch, f"{BEES} [1].")
    [line] = [line for line in out.splitlines() if line.startswith("  [1] ")]
    # A passage of the folder has an id of its own (file#passage), shown once, and the
    # BM25 score it was retrieved with.
    assert re.fullmatch(r"  \[1\] Honey bees \(id bees\.md#1\) score \d+\.\d\d", line), line
