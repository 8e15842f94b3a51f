"""Budgets that make every decode terminate, each with its own stop reason."""

from __future__ import annotations

from dataclasses import dataclass

from citebacktrack.errors import ConfigurationError

__all__ = ["Budgets"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Budgets:
    """Limits on one answer's decoding.

    Attributes:
        max_new_tokens: tokens the answer may keep (stop reason ``max_new_tokens``).
        retries_per_checkpoint: rejected markers allowed in one sentence before the
            decoder escalates to regenerating the whole sentence.
        sentence_retries: whole-sentence regenerations allowed before the policy's
            fallback (drop the marker under AUTO; end the answer, stop reason
            ``no_valid_citation``, under REQUIRED and QUOTES_ONLY).
        max_backtracks: rollbacks in total (stop reason ``backtrack_budget``).
        max_rolled_back_tokens: tokens thrown away in total (``rolled_back_token_budget``).
        max_wall_time_s: seconds for the whole decode, ``None`` for no limit (``wall_time``).
    """

    max_new_tokens: int = 256
    retries_per_checkpoint: int = 3
    sentence_retries: int = 1
    max_backtracks: int = 32
    max_rolled_back_tokens: int = 1024
    max_wall_time_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_backtracks", "max_rolled_back_tokens"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("retries_per_checkpoint", "sentence_retries"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_wall_time_s is not None and self.max_wall_time_s <= 0:
            raise ConfigurationError(f"max_wall_time_s must be > 0, got {self.max_wall_time_s}")
