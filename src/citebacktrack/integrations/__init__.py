"""Components for other frameworks' pipelines, each in its own module and extra.

* :mod:`citebacktrack.integrations.langchain`: ``CitedAnswerRunnable``, a LangChain
  ``Runnable`` (``pip install "citebacktrack[langchain]"``);
* :mod:`citebacktrack.integrations.llamaindex`: ``CitedQueryEngine``, a LlamaIndex query
  engine (``pip install "citebacktrack[llamaindex]"``).

Importing this package (or :mod:`citebacktrack`) imports neither framework; each module
imports its own, and raises :class:`~citebacktrack.errors.MissingDependencyError` naming
the extra when it is not installed.
"""

__all__: list[str] = []
