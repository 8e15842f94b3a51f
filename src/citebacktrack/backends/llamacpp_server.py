"""LlamaCppServer: run llama-cpp-python's OpenAI-compatible server on loopback.

For the ``eval`` command's ``segment`` system, the serving benchmark and the tests: it
starts ``python -m llama_cpp.server`` with a GGUF file (the embedded model by default) on
127.0.0.1 and a free port, waits until ``/v1/models`` answers, and stops the process on
``close()`` (or at the end of a ``with`` block). Needs the ``server`` extra
(``pip install "citebacktrack[server]"``).

    with LlamaCppServer() as server, server.backend() as backend:
        answer = Citeformer(backend).generate(question, sources)
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from citebacktrack._arguments import Number, path, strings
from citebacktrack.errors import BackendError, MissingDependencyError

if TYPE_CHECKING:
    from citebacktrack.backends.openai import OpenAIBackend

__all__ = ["SERVER_MODULES", "LlamaCppServer"]

SERVER_MODULES = ("openai", "llama_cpp", "uvicorn", "fastapi", "sse_starlette", "pydantic_settings")
"""Modules ``python -m llama_cpp.server`` and :class:`OpenAIBackend` import."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# Runs llama_cpp.server with a watchdog thread that exits when the parent goes away (its
# parent pid changes), so a killed caller (SIGKILL, an interrupted benchmark) never leaves
# a server behind. Thread-safe, unlike a preexec_fn, and independent of which thread of
# the caller started it.
_GUARDED = (
    "import os, runpy, sys, threading, time\n"
    "parent = int(sys.argv.pop(1))\n"
    "def watch():\n"
    "    while os.getppid() == parent:\n"
    "        time.sleep(0.5)\n"
    "    os._exit(0)\n"
    "threading.Thread(target=watch, daemon=True).start()\n"
    "sys.argv[0] = 'llama_cpp.server'\n"
    "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n"
)


class LlamaCppServer:
    """A ``llama_cpp.server`` process on 127.0.0.1, started on construction.

    Args:
        model: GGUF file (default: the embedded SmolLM2-135M-Instruct).
        n_ctx: the server's context size (0: the model's training context).
        n_threads: CPU threads, at least 1 (default: llama.cpp's).
        port: the port, 1-65535 (default, or 0: a free one).
        startup_timeout: seconds to wait for ``/v1/models`` to answer (> 0).
        extra_args: more ``llama_cpp.server`` command-line arguments (a list of str).

    Raises:
        ConfigurationError: an argument of the wrong type or out of range, checked before
            any process is started (e.g. ``n_ctx="4096"``, ``extra_args="--verbose"``).
        MissingDependencyError: the ``server`` extra is not installed.
        ModelLoadError: no ``model`` given and the embedded model is not installed.
        BackendError: the server exited or did not answer in time (the message ends with
            the tail of its log).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        port: int | None = None,
        startup_timeout: float = 180.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        model = path(
            "model", model, "pass the path of a .gguf file, or None for the embedded model"
        )
        n_ctx = Number(4096, whole=True, minimum=0)("n_ctx", n_ctx)
        n_threads = Number(4, whole=True, minimum=1, optional=True)("n_threads", n_threads)
        port = Number(8080, whole=True, minimum=0, maximum=65535, optional=True)("port", port)
        startup_timeout = Number(180.0, above=0)("startup_timeout", startup_timeout)
        extra_args = strings(
            "extra_args",
            extra_args,
            "pass a list of command-line arguments, e.g. ['--verbose', 'true']",
        )
        for name in SERVER_MODULES:
            if importlib.util.find_spec(name) is None:
                raise MissingDependencyError(
                    feature="the llama.cpp server", extra="server", module=name
                )
        if model is None:
            from citebacktrack.models import default_model_path

            model = default_model_path()
        self.model = Path(model)
        self.port = port or _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        command = [
            sys.executable,
            "-c",
            _GUARDED,
            str(os.getpid()),
            "--model",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(n_ctx),
        ]
        if n_threads is not None:
            command += ["--n_threads", str(n_threads)]
        command += list(extra_args)
        self._log_dir = tempfile.TemporaryDirectory(prefix="citebacktrack-server-")
        self.log = Path(self._log_dir.name) / "server.log"
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(  # noqa: S603 - our command, this Python
                command,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_until_up(startup_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BackendError(
                    f"llama_cpp.server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                probe = f"{self.base_url}/models"  # http://127.0.0.1 only
                with urllib.request.urlopen(probe, timeout=2) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise BackendError(
            f"llama_cpp.server did not answer {self.base_url}/models in {timeout:g} s:\n"
            f"{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the server's output."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    @property
    def running(self) -> bool:
        """Whether the process is still alive."""
        return self.process.poll() is None

    def backend(self, **options: Any) -> OpenAIBackend:
        """An :class:`OpenAIBackend` on this server (``server="llama.cpp"``; ``options``
        go to :meth:`OpenAIBackend.from_base_url
        <citebacktrack.backends.openai.OpenAIBackend.from_base_url>`)."""
        from citebacktrack.backends.openai import OpenAIBackend

        options.setdefault("model", self.model.stem)
        options.setdefault("server", "llama.cpp")
        options.setdefault("timeout", 300.0)
        return OpenAIBackend.from_base_url(self.base_url, **options)

    def close(self) -> None:
        """Stop the server (terminate, then kill after 15 s); idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self._log_dir.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LlamaCppServer({self.base_url!r}, model={self.model.name!r}, {state})"
