"""A stand-in for citeformer 0.3.1 (tests only): the same import paths and call shape."""

__version__ = "0.3.1-fake"
