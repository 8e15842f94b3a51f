"""The ``citebacktrack`` command line: ``ask`` over a folder of documents, ``grammar``."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from citebacktrack.backends.base import Backend
from citebacktrack.decoding.budgets import Budgets
from citebacktrack.decoding.sampling import SamplingConfig
from citebacktrack.errors import CitebacktrackError
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.orchestrator import Citeformer
from citebacktrack.render import renumbered_text
from citebacktrack.types import Answer, CitationMode, Policy, Source

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Answers with [N] citations that were checked against their sources while decoding.",
)


class BackendName(StrEnum):
    """Engines the command line can run."""

    LLAMACPP = "llamacpp"
    HF = "hf"


def _build_backend(name: BackendName, model: Path | None) -> Backend:
    if name is BackendName.HF:
        from citebacktrack.backends.hf import HFBackend

        return HFBackend.from_gguf(model)
    from citebacktrack.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(model)


@app.command()
def grammar(
    sources: Annotated[
        int, typer.Option("--sources", "-n", help="Number of sources (ids 1..N).")
    ] = 3,
    policy: Annotated[CitationMode, typer.Option(help="Citation policy.")] = CitationMode.REQUIRED,
    dialect: Annotated[Dialect, typer.Option(help="Grammar language to print.")] = Dialect.EBNF,
    max_per_sentence: Annotated[int, typer.Option(help="Most citations in one sentence.")] = 3,
    bounded: Annotated[
        bool,
        typer.Option(
            help="Also bound uncited prose in the grammar (for engines we cannot filter)."
        ),
    ] = False,
) -> None:
    """Print the citation grammar for N sources."""
    try:
        chosen = Policy(mode=policy, max_citations_per_sentence=max_per_sentence)
        typer.echo(emit(citation_grammar(sources, chosen, bounded=bounded), dialect), nl=False)
    except (CitebacktrackError, ValueError) as exc:
        _fail(exc)


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    docs: Annotated[
        Path | None,
        typer.Option(help="Folder of .txt/.md documents (default: the bundled sample documents)."),
    ] = None,
    backend: Annotated[BackendName, typer.Option(help="Model engine.")] = BackendName.LLAMACPP,
    model: Annotated[
        Path | None, typer.Option(help="GGUF model file (default: embedded SmolLM2-135M-Instruct).")
    ] = None,
    policy: Annotated[CitationMode, typer.Option(help="Citation policy.")] = CitationMode.REQUIRED,
    k: Annotated[
        int, typer.Option("-k", "--top-k-passages", help="Passages to retrieve.", min=1)
    ] = 5,
    temperature: Annotated[float, typer.Option(help="0 is greedy.", min=0.0)] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Most answer tokens.", min=1)] = 160,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
) -> None:
    """Answer QUESTION over a folder of documents, with checked citations."""
    from citebacktrack.retrieval import PassageIndex, load_passages, sample_docs_path

    console = Console(stderr=True)
    try:
        folder = docs if docs is not None else sample_docs_path()
        with console.status("Indexing documents…"):
            sources = PassageIndex(load_passages(folder)).search(question, k)
        with console.status(f"Loading the model ({backend.value})…"):
            engine = _build_backend(backend, model)
        cf = Citeformer(
            engine,
            policy=Policy(mode=policy),
            sampling=SamplingConfig(temperature=temperature, seed=seed),
            budgets=Budgets(max_new_tokens=max_new_tokens),
        )
        with console.status("Generating with citation checks…"):
            answer = cf.generate(question, sources)
    except (CitebacktrackError, ValueError) as exc:
        _fail(exc)
    if as_json:
        payload = {
            "answer": answer.model_dump(mode="json"),
            "sources": [s.model_dump(mode="json") for s in sources],
        }
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    _print_answer(Console(), answer, sources)


def _print_answer(console: Console, answer: Answer, sources: list[Source]) -> None:
    if answer.is_abstained:
        console.print(
            f"[bold yellow]No answer[/]: {answer.stop_reason.value} (see the trace below)"
        )
    else:
        console.print(escape(renumbered_text(answer)), highlight=False)
    if answer.references:
        console.print("\n[bold]References[/]")
        for ref in answer.references:
            source = sources[ref.source_index - 1]
            console.print(
                f"  [{ref.number}] {escape(ref.title or ref.source_id)} "
                f"[dim]({escape(ref.source_id)})[/]"
            )
            if source.url:
                console.print(f"      [dim]{escape(source.url)}[/]")
    trace, usage = answer.trace, answer.usage
    console.print(
        f"\n[dim]trace: {trace.rejections} citation(s) rejected, {trace.backtracks} rollback(s), "
        f"{trace.tokens_wasted} token(s) wasted, {usage.completion_tokens} kept, "
        f"{trace.forward_passes_per_kept_token:.2f} forward passes per kept token, "
        f"stop: {trace.stop_reason.value}[/]"
    )
    for entry in trace.entries:
        if entry.kind == "rejection":
            score = f" score {entry.score:.2f}" if entry.score is not None else ""
            console.print(
                f"[dim]  rejected [{entry.source_index}] ({entry.reason}{score}): "
                f"{escape(entry.detail)}[/]"
            )


def _fail(exc: Exception) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}")
    raise typer.Exit(code=2)


def main() -> None:
    """Entry point of the ``citebacktrack`` script."""
    app(prog_name="citebacktrack")


if __name__ == "__main__":  # pragma: no cover
    main()
