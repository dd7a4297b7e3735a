"""A request's lifecycle as one explicit state machine.

    WAITING ──schedule──> PREFILL ──prompt done, first token──> DECODE ──> FINISHED
       ^                     │                                    │
       └──────preempt────────┴────────────────────────────────────┘
    any live state ──abort──> ABORTED;  ──engine failure──> FAILED

The scheduler moves requests between queues and calls these transitions; the model runner only
reads `tokens[num_computed:]`. Preemption is by recompute: the blocks go, the tokens stay, and the
request resumes from whatever the prefix cache still holds.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.sampling_params import SamplingParams


class RequestState(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED)


_ALLOWED = {
    RequestState.WAITING: {RequestState.PREFILL, RequestState.ABORTED, RequestState.FAILED},
    RequestState.PREFILL: {RequestState.DECODE, RequestState.WAITING, RequestState.ABORTED, RequestState.FAILED},
    RequestState.DECODE: {RequestState.WAITING, RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED},
}


@dataclass(frozen=True)
class RequestTimings:
    queue_s: float  # arrival in the engine -> first scheduled
    prefill_s: float  # first scheduled -> first token
    decode_s: float  # first token -> finished


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: never more than the context leaves
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # queue time ends here (the first admission)
    first_token_time: float | None = None  # prefill ends here
    state: RequestState = RequestState.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(init=False)  # prompt + outputs: what the model consumes
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached_prompt: int = 0  # prompt tokens served by the prefix cache (last admission)
    num_preemptions: int = 0
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None
    # n > 1: one Request per choice; the client sees `parent_id` and `index`
    parent_id: str = ""
    index: int = 0
    first_sibling: "Request | None" = None  # choices 1.. wait for choice 0's prompt, then share it
    generator: torch.Generator | None = None  # a seeded request: reseeded per draw (workers.sampler)
    prompt_logprobs: list = field(default_factory=list)  # filled while the prompt is computed
    images: list = field(default_factory=list)  # model.images.ProcessedImage, in prompt order
    patch_positions: list[int] = field(default_factory=list)  # prompt index of every `<|patch|>`, in order
    image_spans: list[tuple[int, int, bytes]] = field(default_factory=list)  # each image's tokens, digest
    image_embeds: torch.Tensor | None = None  # one row per patch position, while the prompt is computed
    matcher: Any = None  # workers.structured.Matcher of a structured-output choice: advanced per token

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_token_ids) + self.output_token_ids  # a resumed choice has outputs
        self.parent_id = self.parent_id or self.request_id

    @property
    def ready(self) -> bool:
        """Choices after the first start once the first has computed the shared prompt."""
        s = self.first_sibling
        return s is None or s.state.done or s.num_computed >= s.num_prompt_tokens - 1

    def image_key(self, start: int, end: int) -> bytes:
        """The digests of the images with tokens in [start, end): part of a KV block's name, so blocks
        with equal placeholder tokens but different images never match in the prefix cache."""
        return b"".join(d for s, e, d in self.image_spans if s < end and e > start)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed

    def _move(self, new: RequestState) -> None:
        if new not in _ALLOWED.get(self.state, ()):
            raise RuntimeError(f"request {self.request_id}: illegal transition {self.state.name} -> {new.name}")
        self.state = new

    def schedule(self, num_tokens: int) -> None:
        """The scheduler gave this request `num_tokens` of the step (prefill chunk or decode)."""
        if self.state is RequestState.WAITING:  # new, or resumed after preemption: (re)compute
            self._move(RequestState.PREFILL)
            if self.first_scheduled_time is None:
                self.first_scheduled_time = time.monotonic()
        assert 0 < num_tokens <= self.num_uncomputed

    def computed(self, num_tokens: int) -> bool:
        """The step computed `num_tokens` more; True when the request now samples a token."""
        self.num_computed += num_tokens
        return self.num_computed == len(self.tokens)

    def append_token(self, token: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_token_ids.append(token)
        self.tokens.append(token)
        if self.state is RequestState.PREFILL:
            self._move(RequestState.DECODE)

    def preempt(self) -> None:
        self._move(RequestState.WAITING)
        self.num_computed = 0
        self.num_preemptions += 1

    def timings(self) -> "RequestTimings":
        """Where the request's time went, at its end (vLLM's queue / prefill / decode split)."""
        now = time.monotonic()
        scheduled = self.first_scheduled_time or now
        first = self.first_token_time or now
        return RequestTimings(scheduled - self.arrival_time, max(0.0, first - scheduled), max(0.0, now - first))

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        target = {"abort": RequestState.ABORTED, "error": RequestState.FAILED}.get(reason, RequestState.FINISHED)
        self._move(target)
        self.finish_reason, self.stop_reason = reason, stop_reason
