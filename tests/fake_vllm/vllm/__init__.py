"""A fake of the small part of vLLM 0.33.0 that ``citebacktrack.backends.vllm`` calls.

vLLM needs a GPU and cannot be installed on the machines this project runs on, so the
tests put ``tests/fake_vllm`` on ``sys.path`` and ``import vllm`` finds this package. It
keeps vLLM 0.33.0's module paths, names, signatures (keywords and defaults; checked in
``tests/test_vllm_backend.py`` against strings copied from the 0.33.0 wheel's sources)
and return shapes, for exactly:

* ``vllm.LLM`` (``vllm/entrypoints/llm.py``): ``__init__``, ``generate``, ``get_tokenizer``;
* ``vllm.SamplingParams``, ``vllm.sampling_params.StructuredOutputsParams``;
* ``vllm.RequestOutput``, ``vllm.CompletionOutput`` (``vllm/outputs.py``);
* ``vllm.AsyncLLMEngine`` = ``vllm.v1.engine.async_llm.AsyncLLM``: ``from_engine_args``,
  ``generate``, ``get_tokenizer``, ``shutdown``; ``vllm.AsyncEngineArgs``;
* the tokenizer's ``apply_chat_template(messages, tools=None, **kwargs)``.

The top-level names are those of ``MODULE_ATTRS`` in vLLM's ``vllm/__init__.py``
(lines 16-38). Models are scripts registered with ``vllm._scripted.register``; they
decode under the request's grammar with XGrammar over a toy vocabulary.
"""

from __future__ import annotations

from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.entrypoints.llm import LLM
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

__version__ = "0.33.0"

__all__ = [
    "LLM",
    "AsyncEngineArgs",
    "AsyncLLMEngine",
    "CompletionOutput",
    "EngineArgs",
    "RequestOutput",
    "SamplingParams",
    "__version__",
]
