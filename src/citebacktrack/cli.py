"""The ``citebacktrack`` command line: ``ask`` over a folder of documents, ``grammar``,
``serve`` over HTTP, ``eval`` over a QA dataset with gold sources.

Output is for people and for pipes alike: at a terminal rich wraps at its width; written
to a pipe or a file every line (an answer, a quote, a table row) is written whole, never
wrapped at 80 columns."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from citebacktrack.adapters import is_generated_id
from citebacktrack.backends.base import Backend
from citebacktrack.errors import CitebacktrackError, ConfigurationError, MissingDependencyError
from citebacktrack.grammar.citations import citation_grammar
from citebacktrack.grammar.emit import Dialect, emit
from citebacktrack.orchestrator import Citeformer
from citebacktrack.render import evidence_quotes, renumbered_text
from citebacktrack.request import Budgets, SamplingConfig
from citebacktrack.types import Answer, CitationMode, Policy, Source

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Answers with [N] citations that were checked against their sources while decoding.",
)


def _version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    try:
        return importlib.metadata.version("citebacktrack")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        from citebacktrack import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"citebacktrack {_version()}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Answers with [N] citations that were checked against their sources while decoding."""


def _console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr): at a terminal it wraps at the terminal's width;
    elsewhere (a pipe, a file) it writes each line whole (no wrap at 80 columns)."""
    console = Console(stderr=stderr)
    console.soft_wrap = not console.is_terminal
    return console


def _counted(count: int, noun: str) -> str:
    """``1 question``, ``2 questions`` (``noun`` takes an ``s``)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class ServerKind(StrEnum):
    """OpenAI-compatible servers ``serve --server-url`` can drive."""

    LLAMACPP = "llama.cpp"
    VLLM = "vllm"


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


BackendOption = Annotated[BackendName, typer.Option(help="Model engine.")]
ModelOption = Annotated[
    Path | None,
    typer.Option(help="GGUF model file (default: the embedded SmolLM2-135M-Instruct)."),
]
PolicyOption = Annotated[CitationMode, typer.Option(help="Citation policy.")]


@app.command()
def grammar(
    sources: Annotated[
        int, typer.Option("--sources", "-n", help="Number of sources (ids 1..N).")
    ] = 3,
    policy: PolicyOption = CitationMode.REQUIRED,
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
    backend: BackendOption = BackendName.LLAMACPP,
    model: ModelOption = None,
    policy: PolicyOption = CitationMode.REQUIRED,
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

    console = _console(stderr=True)
    skipped: list[tuple[Path, str]] = []
    try:
        folder = docs if docs is not None else sample_docs_path()
        with console.status("Indexing documents…"):
            passages = load_passages(folder, on_skip=lambda path, why: skipped.append((path, why)))
            sources = PassageIndex(passages).search(question, k)
        with console.status(f"Loading the model ({backend.value})…"):
            engine = _build_backend(backend, model)
        with engine:  # frees the model as soon as the answer is built
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
    finally:
        for path, why in skipped:
            console.print(f"[yellow]note:[/] skipped {escape(str(path))}: {escape(why)}")
    if as_json:
        payload = {
            "answer": answer.model_dump(mode="json"),
            "sources": [s.model_dump(mode="json") for s in sources],
        }
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    _print_answer(_console(), answer, sources)


def _print_answer(console: Console, answer: Answer, sources: list[Source]) -> None:
    if answer.is_abstained:
        console.print(
            f"[bold yellow]No answer[/]: {escape(answer.abstention or '')} "
            f"[dim](stop: {answer.stop_reason.value}; see the trace below)[/]"
        )
    else:
        console.print(escape(renumbered_text(answer)), highlight=False)
    if answer.references:
        console.print("\n[bold]References[/]")
        for ref in answer.references:
            source = sources[ref.source_index - 1]
            title = ref.title or f"source {ref.source_index}"
            given = not is_generated_id(ref.source_id, ref.source_index)
            shown = f" [dim](id {escape(ref.source_id)})[/]" if given else ""
            score = f" [dim]score {source.score:.2f}[/]" if source.score is not None else ""
            console.print(f"  [{ref.number}] {escape(title)}{shown}{score}")
            if source.url:
                console.print(f"      [dim]{escape(source.url)}[/]")
            for quote in evidence_quotes(answer, ref.source_index):
                console.print(f'      [italic]"{escape(quote)}"[/]', highlight=False)
    trace, usage = answer.trace, answer.usage
    console.print(
        f"\n[dim]trace: {_counted(trace.rejections, 'citation')} rejected, "
        f"{_counted(trace.backtracks, 'rollback')}, {_counted(trace.tokens_wasted, 'token')} "
        f"wasted, {usage.completion_tokens} kept, "
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


class SplitChoice(StrEnum):
    """Which part of an evaluation dataset to run (see ``evaluation.split_of``)."""

    ALL = "all"
    TUNE = "tune"
    HOLDOUT = "holdout"


@app.command()
def serve(
    docs: Annotated[
        Path | None,
        typer.Option(
            help="Folder of .txt/.md documents searched when a request sends no sources "
            "(default: the bundled sample documents)."
        ),
    ] = None,
    backend: BackendOption = BackendName.LLAMACPP,
    model: ModelOption = None,
    server_url: Annotated[
        str | None,
        typer.Option(
            help="Answer with an OpenAI-compatible server at this URL (e.g. "
            "http://127.0.0.1:8080/v1) instead of a local model."
        ),
    ] = None,
    server_model: Annotated[str, typer.Option(help="Model name sent to --server-url.")] = "default",
    server_kind: Annotated[
        ServerKind, typer.Option(help="What runs at --server-url (sets its grammar dialect).")
    ] = ServerKind.LLAMACPP,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=0, max=65535)] = 8000,
    policy: PolicyOption = CitationMode.REQUIRED,
    max_new_tokens: Annotated[int, typer.Option(help="Most answer tokens.", min=1)] = 160,
    max_concurrent: Annotated[
        int, typer.Option(help="Answers decoded at once (a local model decodes one).", min=1)
    ] = 1,
    max_queue: Annotated[
        int, typer.Option(help="Answers waiting their turn; past it: 429.", min=0)
    ] = 32,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body; past it: 413.", min=1)
    ] = 1024 * 1024,
) -> None:
    """Serve cited answers over HTTP (POST /v1/answers, GET /health, the page at /)."""
    try:
        import uvicorn

        from citebacktrack.serve import Limits, create_app
    except ImportError as exc:
        _fail(
            MissingDependencyError(feature="citebacktrack serve", extra="serve", module="uvicorn")
            if not isinstance(exc, MissingDependencyError)
            else exc
        )
    from citebacktrack.retrieval import sample_docs_path

    try:
        if server_url is not None:
            from citebacktrack.backends.openai import OpenAIBackend

            engine: Backend = OpenAIBackend.from_base_url(
                server_url, model=server_model, server=server_kind.value
            )
            name = "server"
        else:
            engine = _build_backend(backend, model)
            name = backend.value
        cf = Citeformer(
            engine,
            policy=Policy(mode=policy),
            budgets=Budgets(max_new_tokens=max_new_tokens),
        )
        limits = Limits(
            max_concurrent=max_concurrent, max_queue=max_queue, max_body_bytes=max_body_bytes
        )
        service = create_app(
            cf,
            documents=docs if docs is not None else sample_docs_path(),
            limits=limits,
            backend_name=name,
        )
    except (CitebacktrackError, ValueError) as exc:
        _fail(exc)
    _console(stderr=True).print(
        f"serving on http://{host}:{port}/ (the page); the API schema is at /openapi.json"
    )
    uvicorn.run(service, host=host, port=port, log_level="warning")


EVAL_N_CTX = 8192
"""llama.cpp context for ``eval``: ten passages plus the demo overflow the default 4096."""


def _eval_backend(name: BackendName, model: Path | None) -> Backend:
    """The one backend every system of an ``eval`` run shares (tests replace this)."""
    if name is BackendName.HF:
        from citebacktrack.backends.hf import HFBackend

        return HFBackend.from_gguf(model)
    from citebacktrack.backends.llamacpp import LlamaCppBackend

    # Every core: an eval run has the machine to itself (llama.cpp's default is half).
    return LlamaCppBackend(model, n_ctx=EVAL_N_CTX, n_threads=os.cpu_count())


def _eval_system_names(
    systems: str | None, peer_python: Path | None, peer_given: bool, console: Console
) -> list[str]:
    from citebacktrack.evaluation import DEFAULT_SYSTEMS, PEER_SETUP, SYSTEM_NAMES

    if systems is None:
        names = list(DEFAULT_SYSTEMS)
        wanted_peer = peer_given
    else:
        names = list(dict.fromkeys(n.strip() for n in systems.split(",") if n.strip()))
        unknown = [n for n in names if n not in SYSTEM_NAMES]
        if unknown or not names:
            raise typer.BadParameter(
                f"unknown system(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"choose from {','.join(SYSTEM_NAMES)}",
                param_hint="--systems",
            )
        wanted_peer = "citeformer" in names
        names = [n for n in names if n != "citeformer"]
    if wanted_peer:
        if peer_python is None:
            console.print(
                "[yellow]note:[/] skipping the citeformer system: no peer virtualenv with "
                "bin/python (give --peer-venv or $CITEBACKTRACK_PEER_VENV; create one with: "
                f"{escape(PEER_SETUP)})"
            )
        else:
            names.append("citeformer")
    if not names:
        raise typer.BadParameter("no system left to run", param_hint="--systems")
    return names


@app.command("eval")
def eval_command(
    dataset: Annotated[
        Path,
        typer.Argument(
            help="JSON list of records: {id, question, answer, sources:[{title, text}], gold} "
            "or HotpotQA's distractor format."
        ),
    ],
    systems: Annotated[
        str | None,
        typer.Option(
            help="Systems to run, comma-separated (e.g. raw,validated): raw, grammar, "
            "validated, segment, citeformer (default: raw, grammar and validated, plus "
            "citeformer when a peer virtualenv is given). segment: the validator over "
            "segment-level backtracking on a llama.cpp server (--server-url, else one "
            "started on 127.0.0.1 with the same model)."
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            help="Only the first N records (after --split); under 20 measure little.",
            min=1,
            metavar="N",
        ),
    ] = None,
    split: Annotated[
        SplitChoice,
        typer.Option(help="Records to run: all, tune (2/3) or holdout (1/3).", metavar="SPLIT"),
    ] = SplitChoice.ALL,
    out: Annotated[
        Path, typer.Option(help="Folder for results.json, results.md and the plots.")
    ] = Path("eval-out"),
    backend: BackendOption = BackendName.LLAMACPP,
    model: ModelOption = None,
    peer_venv: Annotated[
        Path | None,
        typer.Option(
            help="Virtualenv with citeformer==0.3.1 for the citeformer system "
            "(default: $CITEBACKTRACK_PEER_VENV)."
        ),
    ] = None,
    server_url: Annotated[
        str | None,
        typer.Option(
            help="OpenAI-compatible llama.cpp server (its URL ends in /v1) serving the same "
            "model, for the segment system (default: start one; needs the server extra)."
        ),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(help="Most answer tokens.", min=1, metavar="N")
    ] = 160,
    plots: Annotated[bool, typer.Option(help="Write PNG plots (needs matplotlib).")] = True,
) -> None:
    """Score citation precision/recall, validity and answer hits over a QA dataset."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from citebacktrack import __version__
    from citebacktrack.backends.llamacpp_server import LlamaCppServer
    from citebacktrack.backends.openai import OpenAIBackend
    from citebacktrack.errors import MissingDependencyError
    from citebacktrack.evaluation import (
        AnswerRecord,
        PeerCiteformer,
        evaluate,
        load_dataset,
        peer_python,
        small_sample_warning,
        standard_systems,
        write_plots,
    )
    from citebacktrack.models import default_model_path

    console = _console(stderr=True)
    peer: PeerCiteformer | None = None
    engine: Backend | None = None
    server: LlamaCppServer | None = None
    segment_backend: Backend | None = None
    try:
        examples = load_dataset(dataset)
        if split is not SplitChoice.ALL:
            examples = [e for e in examples if e.split == split.value]
        examples = examples[:limit] if limit is not None else examples
        if not examples:
            raise typer.BadParameter(f"no record of {dataset} is in the {split.value} split")
        peer_given = peer_venv is not None or bool(os.environ.get("CITEBACKTRACK_PEER_VENV"))
        python = peer_python(peer_venv)
        names = _eval_system_names(systems, python, peer_given, console)
        budgets = Budgets(max_new_tokens=max_new_tokens)
        with console.status(f"Loading the model ({backend.value})…"):
            engine = _eval_backend(backend, model)
        if "citeformer" in names and python is not None:
            peer = PeerCiteformer(
                python,
                model if model is not None else default_model_path(),
                n_ctx=EVAL_N_CTX,
                max_new_tokens=max_new_tokens,
            )
        if "segment" in names:
            if server_url is None:
                with console.status("Starting a llama.cpp server on 127.0.0.1…"):
                    server = LlamaCppServer(model, n_ctx=EVAL_N_CTX, n_threads=os.cpu_count())
                segment_backend = server.backend()
            else:
                segment_backend = OpenAIBackend.from_base_url(
                    server_url, model="default", server="llama.cpp", timeout=300.0
                )
        runners = standard_systems(
            engine, names, budgets=budgets, peer=peer, segment_backend=segment_backend
        )
        console.print(
            f"{_counted(len(examples), 'question')} × {_counted(len(runners), 'system')}: "
            f"{', '.join(runners)}"
        )
        warning = small_sample_warning(len(examples))
        if warning is not None:
            console.print(f"[yellow]warning:[/] {escape(warning)}")
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("evaluating", total=len(examples) * len(runners))

            out.mkdir(parents=True, exist_ok=True)
            partial = (out / "records.jsonl").open("w", encoding="utf-8")

            def advance(record: AnswerRecord) -> None:
                # Each answer as it comes, so a long run that is cut off loses nothing.
                partial.write(json.dumps(dataclasses.asdict(record), default=str) + "\n")
                partial.flush()
                progress.update(task, advance=1, description=f"{record.system:>10} {record.id}")

            try:
                report = evaluate(examples, runners, on_record=advance)
            finally:
                partial.close()
    except (CitebacktrackError, ValueError) as exc:
        _fail(exc)
    finally:
        if peer is not None:
            peer.close()
        if engine is not None:
            engine.close()
        if segment_backend is not None:
            segment_backend.close()
        if server is not None:
            server.close()
    markdown = report.to_markdown()
    meta = {
        "dataset": str(dataset),
        "split": split.value,
        "limit": limit,
        "backend": backend.value,
        "model": str(model) if model is not None else None,
        "max_new_tokens": max_new_tokens,
        "citebacktrack": __version__,
        "peer": peer.version if peer is not None else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(
            json.dumps(report.to_dict(**meta), indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
        (out / "results.md").write_text(
            f"# citebacktrack eval: {dataset.name}\n\n{markdown}", encoding="utf-8"
        )
    except OSError as exc:
        _fail(ConfigurationError(f"cannot write the results to {str(out)!r}: {exc}"))
    written = ["results.json", "results.md"]
    if plots:
        try:
            written += [p.name for p in write_plots(report, out)]
        except MissingDependencyError as exc:
            console.print(f"[yellow]note:[/] plots skipped: {escape(str(exc))}")
    console.print(f"wrote {', '.join(written)} to {escape(str(out))}")
    typer.echo(markdown)


def _fail(exc: Exception) -> None:
    _console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}")
    raise typer.Exit(code=2)


def main() -> None:
    """Entry point of the ``citebacktrack`` script."""
    app(prog_name="citebacktrack")


if __name__ == "__main__":  # pragma: no cover
    main()
