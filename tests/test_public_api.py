"""The package's public face: exports, lazy heavy imports, install hints."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import pytest

import citebacktrack
from citebacktrack.errors import MissingDependencyError


def isort_order(names: list[str]) -> list[str]:
    """The order ruff's RUF022 keeps ``__all__`` in: CONSTANTS, then Classes, then the rest."""
    return sorted(names, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))


def test_top_level_all_is_sorted_and_complete() -> None:
    assert citebacktrack.__all__ == isort_order(citebacktrack.__all__)
    public = {
        n
        for n in dir(citebacktrack)
        if not n.startswith("_") and not isinstance(getattr(citebacktrack, n), types.ModuleType)
    }
    assert public - {"annotations"} == set(citebacktrack.__all__)
    for name in citebacktrack.__all__:
        assert getattr(citebacktrack, name) is not None


def test_core_imports_without_heavy_engines() -> None:
    """torch, transformers, vllm, llama_cpp, xgrammar and the LangChain and LlamaIndex
    integrations' frameworks are blocked; core still works."""
    code = textwrap.dedent(
        """
        import sys
        for name in ("torch", "transformers", "vllm", "llama_cpp", "xgrammar", "triton",
                     "langchain_core", "llama_index"):
            sys.modules[name] = None  # any import of them now raises ImportError
        import citebacktrack
        import citebacktrack.integrations
        from citebacktrack import Citeformer, MockBackend, Source
        from citebacktrack.grammar import citation_grammar, emit
        print(emit(citation_grammar(2), "gbnf").splitlines()[0])
        try:
            Citeformer(MockBackend(["x [1]."])).generate("q", [Source(text="t")])
        except citebacktrack.MissingDependencyError as exc:
            print("hint:", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("root ::=")
    # xgrammar is a core dependency: the hint names the module, not an extra.
    assert "hint: constrained decoding needs the Python module 'xgrammar'" in out.stdout
    assert "pip install xgrammar" in out.stdout


def test_missing_dependency_message_names_the_extra() -> None:
    error = MissingDependencyError(feature="LlamaCppBackend", extra="llamacpp", module="llama_cpp")
    assert 'pip install "citebacktrack[llamacpp]"' in str(error)
    assert isinstance(error, ImportError)


@pytest.mark.parametrize(
    "module",
    ["citebacktrack.backends.llamacpp", "citebacktrack.backends.hf", "citebacktrack.cli"],
)
def test_backend_modules_import(module: str) -> None:
    __import__(module)


RAG_ESSENTIALS = {
    # the orchestrator, its input and its output
    "Citeformer",
    "Source",
    "Policy",
    "CitationMode",
    "Budgets",
    "SamplingConfig",
    "Answer",
    "Citation",
    "Evidence",
    "Reference",
    "Usage",
    "Trace",
    "TraceEntry",
    "StopReason",
    "SentenceOrigin",
    "RejectionReason",
    "render",
    # stream events
    "Event",
    "Started",
    "TextDelta",
    "CitationAccepted",
    "CitationRejected",
    "Rollback",
    "Done",
    # backends a RAG app or its tests construct
    "Backend",
    "MockBackend",
    "MockSegmentBackend",
    "FunctionBackend",
}

PUBLIC_MODULES = [
    "citebacktrack",
    "citebacktrack.adapters",
    "citebacktrack.answer",
    "citebacktrack.backends",
    "citebacktrack.backends.anthropic",
    "citebacktrack.backends.base",
    "citebacktrack.backends.hf",
    "citebacktrack.backends.llamacpp",
    "citebacktrack.backends.llamacpp_server",
    "citebacktrack.backends.local",
    "citebacktrack.backends.mock",
    "citebacktrack.backends.openai",
    "citebacktrack.backends.segment",
    "citebacktrack.backends.vllm",
    "citebacktrack.decoding",
    "citebacktrack.decoding.operators",
    "citebacktrack.decoding.sampling",
    "citebacktrack.errors",
    "citebacktrack.evaluation",
    "citebacktrack.grammar",
    "citebacktrack.integrations",
    "citebacktrack.integrations.langchain",
    "citebacktrack.integrations.llamaindex",
    "citebacktrack.orchestrator",
    "citebacktrack.render",
    "citebacktrack.request",
    "citebacktrack.segments",
    "citebacktrack.sse",
    "citebacktrack.support",
    "citebacktrack.syntax",
    "citebacktrack.testing",
    "citebacktrack.types",
    "citebacktrack.validation",
]


def test_top_level_is_the_rag_essentials_and_every_error() -> None:
    import citebacktrack.errors as errors

    assert set(citebacktrack.__all__) == RAG_ESSENTIALS | set(errors.__all__)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_public_module_lists_its_names_sorted_and_complete(name: str) -> None:
    import importlib

    module = importlib.import_module(name)
    exported = module.__all__
    assert exported == isort_order(exported), f"{name}.__all__ is not sorted"
    for item in exported:
        assert getattr(module, item) is not None
    is_package = hasattr(module, "__path__")
    # Everything defined here (classes, functions) and not private must be exported; a
    # package exports what it imports for its users.
    defined = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and getattr(v, "__module__", None) == name
        and (isinstance(v, type) or callable(v))
    }
    assert defined <= set(exported), f"{name} defines {defined - set(exported)} unexported"
    if is_package:
        public = {
            n
            for n, v in vars(module).items()
            if not n.startswith("_")
            and n != "annotations"
            and not isinstance(v, types.ModuleType)
            and n not in {"TYPE_CHECKING", "Any"}
        }
        assert public <= set(exported), f"{name} holds {public - set(exported)} unexported"


def test_engines_import_from_the_backends_package() -> None:
    from citebacktrack.backends import HFBackend, LlamaCppBackend
    from citebacktrack.backends.hf import HFBackend as Hf
    from citebacktrack.backends.llamacpp import LlamaCppBackend as Llama

    assert (HFBackend, LlamaCppBackend) == (Hf, Llama)
    with pytest.raises(AttributeError, match="no attribute 'TritonBackend'"):
        citebacktrack.backends.TritonBackend  # noqa: B018


def _package_imports() -> tuple[dict[str, set[str]], list[str]]:
    """Each module of the package with the package modules it imports, and every import of
    another module's private (``_``-prefixed) name."""
    import ast
    import pathlib

    root = pathlib.Path(citebacktrack.__file__).parent
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in names}
    private: list[str] = []
    for name, path in names.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.module not in names:
                continue
            if node.module != name and not name.startswith(f"{node.module}."):
                graph[name].add(node.module)
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    private.append(f"{name} imports {node.module}.{alias.name}")
                if f"{node.module}.{alias.name}" in names:
                    graph[name].add(f"{node.module}.{alias.name}")
    return graph, private


def test_no_module_imports_another_modules_private_name() -> None:
    assert _package_imports()[1] == []


def test_no_import_circle() -> None:
    graph, _ = _package_imports()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise AssertionError(" -> ".join((*path[path.index(name) :], name)))
        if name in done:
            return
        for target in graph[name]:
            if not name.startswith(f"{target}."):  # a module may import its own package
                visit(target, (*path, name))
        done.add(name)

    for name in graph:
        visit(name, ())
