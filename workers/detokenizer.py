"""Incremental detokenization: text deltas that never split a UTF-8 character."""

from __future__ import annotations

from model.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Decodes a growing list of ids; a token that ends mid-character waits for the next one."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # ids up to here are already in `text`
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        seen = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(seen) or full.endswith("\ufffd"):
            return ""  # incomplete character (or a skipped special token): wait
        delta = full[len(seen):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end: whatever is still held back, replacement characters included."""
        seen = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        delta = full[len(seen):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
