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


class TextTracker:
    """A choice's text as it grows: deltas to emit, and stop strings matched across token boundaries.

    Text that could still turn out to be the start of a stop string is held back, so a stop string
    never leaks into the output, not even partly.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str], skip_special_tokens: bool = True):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.emitted = 0  # characters of detok.text already sent

    @property
    def text(self) -> str:
        return self.detok.text

    def add(self, token: int) -> tuple[str, str | None]:
        """(text delta to emit, the stop string that ended the text, if one did)."""
        before = len(self.detok.text)
        self.detok.add([token])
        return self._emit(before, final=False)

    def finish(self) -> str:
        before = len(self.detok.text)
        self.detok.flush()
        delta, _ = self._emit(before, final=True)
        return delta

    def _emit(self, before: int, final: bool) -> tuple[str, str | None]:
        text = self.detok.text
        if self.stop:
            search_from = max(0, before - self.hold)
            hits = [(i, s) for s in self.stop if (i := text.find(s, search_from)) != -1]
            if hits:
                cut, matched = min(hits)
                delta = text[self.emitted:cut]
                self.detok.text = text[:cut]
                self.emitted = cut
                return delta, matched
        upto = len(text) if final else max(self.emitted, len(text) - self.hold)
        delta = text[self.emitted:upto]
        self.emitted = upto
        return delta, None
