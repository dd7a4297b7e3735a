"""The longest prompt the ingress passes on to a gang: one that surely cannot fit is refused here.

The engine knows the exact context limit (the KV cache may lower it below the checkpoint's) and checks
every prompt. This is the cheap check before it, with a limit at least the engine's: the deployment's
`engine.max_model_len`, else the checkpoint's `max_position_embeddings`. A text prompt is refused from
its length alone when even the longest tokens could not fit it (`Tokenizer.surely_longer_than`), so a
1 MB body costs microseconds instead of a third of a second of tokenizing on the cores the engine
shares, and a long id list is refused before it is shipped to a worker. vLLM refuses text the same way.
"""

from __future__ import annotations

from pathlib import Path

from model.config import load_config
from model.tokenizer import Tokenizer
from workers.errors import ContextTooLong


class PromptLimit:
    def __init__(self, tokens: int, reason: str, tokenizer: Tokenizer | None):
        self.tokens, self.reason, self.tokenizer = tokens, reason, tokenizer

    @classmethod
    def for_model(cls, max_model_len: int | None, model_dir: str, tokenizer: Tokenizer | None) -> "PromptLimit | None":
        """None where neither is known here (an ingress serving ids only, on a node without the checkpoint):
        then the engine alone checks."""
        if max_model_len is not None:
            return cls(max_model_len, "max_model_len", tokenizer)
        if not (Path(model_dir) / "config.json").is_file():
            return None
        return cls(load_config(model_dir).max_position_embeddings, "the checkpoint's max_position_embeddings",
                   tokenizer)

    def check_text(self, text: str, max_tokens: int | None, param: str) -> None:
        room = self.tokens - (max_tokens if max_tokens is not None else 1)  # the engine wants >= 1 token
        if self.tokenizer is not None and self.tokenizer.surely_longer_than(text, room):
            raise ContextTooLong(
                f"This model's maximum context length is {self.tokens} tokens (set by {self.reason}). However, "
                f"your prompt has {len(text)} characters, more than {max(room, 0)} tokens can hold (one token "
                f"covers at most {self.tokenizer.max_chars_per_token} characters).", param=param)

    def check_ids(self, count: int, max_tokens: int | None) -> None:
        ContextTooLong.check(self.tokens, self.reason, count, max_tokens)
