"""Per-request generation parameters. Validation raises the typed invalid-request error."""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.errors import InvalidRequest


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: whatever the context leaves
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)

    def validate(self, vocab_size: int) -> None:
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or not 0 <= t < vocab_size:
                raise InvalidRequest(f"stop_token_ids holds {t}, outside the vocabulary [0, {vocab_size})",
                                     param="stop_token_ids")
