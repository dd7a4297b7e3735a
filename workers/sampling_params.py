"""Per-request generation parameters, as OpenAI clients and vLLM users know them.

Fields left as None take the checkpoint's `generation_config.json` defaults (`resolve`), then the
neutral value. `validate` raises the typed invalid-request error, naming the field, before anything
is queued.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from workers.errors import InvalidRequest
from workers.structured import GrammarSpec

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16

# Fields whose None means "the checkpoint's default, else this".
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = None  # None: the checkpoint default, else whatever the context leaves
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1 = off
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per generated token (0 = only the chosen one)
    prompt_logprobs: int | None = None
    echo: bool = False  # the first output of each choice starts with the prompt's text (and logprobs)
    skip_special_tokens: bool = True
    structured: GrammarSpec | None = None  # the grammar every token must follow (workers.structured)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def resolve(self, defaults: dict) -> "SamplingParams":
        """A copy with every None filled: from the checkpoint's defaults, then neutral values."""
        filled = {}
        for name, neutral in NEUTRAL.items():
            if getattr(self, name) is None:
                filled[name] = defaults.get(name, neutral)
        if self.max_tokens is None and defaults.get("max_new_tokens") is not None:
            filled["max_tokens"] = defaults["max_new_tokens"]
        if self.echo and self.logprobs is not None and self.prompt_logprobs is None:
            filled["prompt_logprobs"] = self.logprobs  # echoed tokens come with their logprobs too
        out = dataclasses.replace(self, **filled)
        if out.top_k == -1:
            out.top_k = 0
        return out

    def validate(self, vocab_size: int) -> None:
        def bad(param: str, message: str) -> InvalidRequest:
            return InvalidRequest(f"{param} {message}", param=param)

        def number(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            value = getattr(self, name)
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(name, f"must be a number, got {value!r}")
            if not (lo < value if lo_open else lo <= value) or value > hi:
                raise bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")

        def integer(name: str, lo: int, hi: int) -> None:
            value = getattr(self, name)
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, f"must be an integer, got {value!r}")
            if not lo <= value <= hi:
                raise bad(name, f"must be in [{lo}, {hi}], got {value}")

        integer("n", 1, MAX_N)
        integer("max_tokens", 1, 2**31 - 1)
        number("temperature", 0.0, 100.0)
        number("top_p", 0.0, 1.0, lo_open=True)
        integer("top_k", -1, vocab_size)
        number("min_p", 0.0, 1.0)
        integer("seed", -(2**63), 2**63 - 1)
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        number("repetition_penalty", 0.0, 2.0, lo_open=True)
        integer("logprobs", 0, MAX_LOGPROBS)
        integer("prompt_logprobs", 0, MAX_LOGPROBS)
        if not isinstance(self.logit_bias, dict):
            raise bad("logit_bias", "must map token ids to biases")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise bad("logit_bias", f"has token id {token!r}, outside the vocabulary [0, {vocab_size})")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise bad("logit_bias", f"values must be numbers in [-100, 100], got {bias!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"may hold at most {MAX_STOP_STRINGS} strings")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise bad("stop_token_ids", f"holds {t!r}, outside the vocabulary [0, {vocab_size})")
