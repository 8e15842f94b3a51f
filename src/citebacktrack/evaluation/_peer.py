"""The peer library, citeformer 0.3.1, answering in its own virtualenv and process."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from citebacktrack.errors import BackendError
from citebacktrack.evaluation._datasets import Example
from citebacktrack.evaluation._systems import System, SystemOutput, render_prompt
from citebacktrack.orchestrator import Citeformer
from citebacktrack.types import Source

__all__ = ["PEER_SETUP", "PeerCiteformer", "peer_python"]

PEER_SETUP = (
    "python3 -m venv benchmarks/.peer-venv && benchmarks/.peer-venv/bin/pip install "
    "citeformer==0.3.1 llama-cpp-python==0.3.36"
)
"""How to create the peer's virtualenv."""


def peer_python(venv: str | os.PathLike[str] | None) -> Path | None:
    """The Python of the peer virtualenv ``venv`` (else ``$CITEBACKTRACK_PEER_VENV``), or
    None when neither is given or it has no ``bin/python``."""
    chosen = venv if venv is not None else os.environ.get("CITEBACKTRACK_PEER_VENV")
    if not chosen:
        return None
    python = Path(chosen) / "bin" / "python"
    return python if python.is_file() else None


_PEER_SCRIPT = r"""
import json, os, sys, time
proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
os.dup2(2, 1)  # anything the engine prints goes to stderr, never into the protocol
sys.stdout = sys.stderr
spec = json.loads(sys.stdin.readline())
import citeformer
from citeformer.backends.llamacpp import LlamaCppBackend
from citeformer.core import Policy, Source
backend = LlamaCppBackend(spec["model_path"], n_ctx=spec["n_ctx"], n_gpu_layers=0)
version = getattr(citeformer, "__version__", "unknown")
proto.write(json.dumps({"ready": True, "version": version}) + "\n")
for line in sys.stdin:
    item = json.loads(line)
    sources = [
        Source(metadata={"id": f"s{i}", "type": "webpage", "title": s["title"]}, content=s["text"])
        for i, s in enumerate(item["sources"], start=1)
    ]
    start = time.perf_counter()
    try:
        out = backend.generate(item["prompt"], sources, Policy.REQUIRED,
                               max_new_tokens=spec["max_new_tokens"], temperature=0.0)
        text = out if isinstance(out, str) else str(getattr(out, "text", out))
        reply = {"text": text, "seconds": time.perf_counter() - start}
    except Exception as exc:
        reply = {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - start}
    proto.write(json.dumps(reply) + "\n")
"""


class PeerCiteformer:
    """citeformer 0.3.1 in its own virtualenv and one long-lived process (model loaded once).

    Each call sends the prompt text citebacktrack would prefill (see :func:`render_prompt`)
    and the same sources; the peer answers with ``Policy.REQUIRED``, greedy. Its seconds
    are timed inside the peer around its ``generate`` (prefill included, IPC excluded).

    Args:
        python: the peer virtualenv's Python.
        model_path: the GGUF file the peer loads (the same as citebacktrack's).
        n_ctx: the peer's context window.
        max_new_tokens: the peer's answer budget.
        env: environment of the peer process (default: this one's).
    """

    def __init__(
        self,
        python: str | os.PathLike[str],
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int = 8192,
        max_new_tokens: int = 160,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.python = Path(python)
        self.spec = {
            "model_path": str(model_path),
            "n_ctx": n_ctx,
            "max_new_tokens": max_new_tokens,
        }
        self.env = dict(env) if env is not None else None
        self.version: str | None = None
        self._process: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self._process is not None:
            if self._process.poll() is None:
                return self._process
            raise self._died(" earlier")
        # Closed in close(); it outlives this method, so no context manager.
        self._stderr = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")  # noqa: SIM115
        try:
            self._process = subprocess.Popen(  # noqa: S603 - our script, the user's venv
                [str(self.python), "-c", _PEER_SCRIPT],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                text=True,
                encoding="utf-8",
                env=self.env,
            )
        except OSError as exc:
            self._stderr.close()
            self._stderr = None
            raise BackendError(f"cannot start the peer Python {str(self.python)!r}: {exc}") from exc
        ready = self._exchange(self.spec)
        self.version = str(ready.get("version", "unknown"))
        return self._process

    def _exchange(self, message: Mapping[str, Any]) -> dict[str, Any]:
        process = self._process
        assert process is not None
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            process.stdin.write(json.dumps(message) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise self._died("")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise BackendError(f"the peer answered {line[:200]!r}, not a JSON object")
        return reply

    def _died(self, when: str) -> BackendError:
        tail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            tail = self._stderr.read()[-2000:]
        code: int | None = None
        if self._process is not None:
            try:
                code = self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
        return BackendError(
            f"the peer citeformer process ({self.python}) exited{when} with code {code}; "
            f"is citeformer==0.3.1 installed there ({PEER_SETUP})? Its stderr ends:\n{tail}"
        )

    def answer(self, prompt: str, sources: Sequence[Source]) -> SystemOutput:
        """Ask the peer; raises :class:`BackendError` if it fails."""
        self._start()
        reply = self._exchange(
            {"prompt": prompt, "sources": [{"title": s.title, "text": s.text} for s in sources]}
        )
        if "error" in reply:
            raise BackendError(f"citeformer failed: {reply['error']}")
        return SystemOutput(text=str(reply["text"]).strip(), seconds=float(reply["seconds"]))

    def system(self, cf: Citeformer) -> System:
        """A system asking the peer with ``cf``'s prompt for each example."""

        def run(example: Example) -> SystemOutput:
            request = cf.build_request(example.question, example.sources)
            return self.answer(render_prompt(cf.backend, request.messages), request.sources)

        return run

    def close(self) -> None:
        """End the peer process (idempotent)."""
        process, self._process = self._process, None
        if process is not None:
            if process.stdin is not None:
                process.stdin.close()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> PeerCiteformer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
