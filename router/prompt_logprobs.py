"""Prompt logprobs travel once per prompt: with its choice 0's first output (`workers.outputs` sends them
so, and `RequestOutput.prompt_logprobs` starts with None for the first prompt token). The front's
readers ask here, so that the rule lives in one place on this side:

- a response shows them once per prompt (gRPC, HTTP without echo) or on every choice (HTTP echo):
  `for_choice` finds them where they came;
- a request resumed on another gang asks for them again only if they have not gone out
  (`already_sent`).
"""

from __future__ import annotations

CARRIER = 0  # the choice (of each prompt) whose first output carries its prompt's logprobs


def for_choice(choices: list, index: int, n: int) -> list | None:
    """The prompt logprobs of choice `index` (of `n` per prompt, numbered prompt by prompt), read from
    its prompt's carrier; None when none came (not asked for, or not arrived yet)."""
    return choices[index - index % n + CARRIER].prompt_logprobs


def already_sent(delivered: dict[int, list[int]]) -> bool:
    """Whether the carrier's first output has gone out, given each open choice's delivered tokens (a
    finished choice is no longer in `delivered`)."""
    return delivered.get(CARRIER) != []


def without_first(lps: list | None) -> list:
    """The logprobs of prompt tokens after the first, the only ones that have any (gRPC lists those)."""
    return (lps or [None])[1:]
