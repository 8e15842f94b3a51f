"""The package's public face: exports, lazy heavy imports, install hints."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import pytest

import citebacktrack
from citebacktrack.errors import MissingDependencyError


def test_all_is_sorted_and_complete() -> None:
    assert citebacktrack.__all__ == sorted(citebacktrack.__all__)
    public = {
        n
        for n in dir(citebacktrack)
        if not n.startswith("_") and not isinstance(getattr(citebacktrack, n), types.ModuleType)
    }
    assert public - {"annotations"} == set(citebacktrack.__all__)
    for name in citebacktrack.__all__:
        assert getattr(citebacktrack, name) is not None


def test_core_imports_without_heavy_engines() -> None:
    """torch, transformers, vllm, llama_cpp and xgrammar are blocked; core still works."""
    code = textwrap.dedent(
        """
        import sys
        for name in ("torch", "transformers", "vllm", "llama_cpp", "xgrammar", "triton"):
            sys.modules[name] = None  # any import of them now raises ImportError
        import citebacktrack
        from citebacktrack import Citeformer, MockBackend, Source, citation_grammar, emit
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
