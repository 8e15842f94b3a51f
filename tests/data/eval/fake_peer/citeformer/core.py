"""Stand-ins for citeformer.core.Policy and Source."""

import enum


class Policy(enum.Enum):
    REQUIRED = "required"


class Source:
    def __init__(self, *, metadata, content):
        self.metadata = metadata
        self.content = content
