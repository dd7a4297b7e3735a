"""The seam between serving and execution: the `Engine` protocol and the types that cross it.

Everything above the engine (the offline `LLM`, the gang's attention workers, the Serve app) uses
only this: `submit` a validated request, `abort`, drive `step()` (also when there is nothing to do: a
gang's wave loop steps every rank together) and take its outputs — the only channel outputs leave
by: every request's new tokens of that step, which the caller routes (`LLM` to its completions, an
attention worker to its consumers' channels) —, `health()`, `stats()`. Invalid requests raise a
typed `workers.errors` exception from `submit`, before anything is queued.
"""

from __future__ import annotations

import abc
import uuid
from dataclasses import dataclass, field
from typing import Any

from workers.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # a request resumed after its gang failed: choice index -> the tokens it already delivered, for
    # the choices still open only; the engine continues each as if it had generated them itself
    resume: dict[int, list[int]] | None = None
    # model.images.ProcessedImage, one per image placeholder of the prompt, in order
    images: list[Any] | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served by the prefix cache


@dataclass
class RequestOutput:
    """What one step produced for one choice of a request: a delta, not the whole text so far."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    usage: Usage | None = None  # on a choice's last output
    error: Exception | None = None  # set with finish_reason "error"
    index: int = 0  # the choice, for n > 1
    logprobs: list[Any] | None = None  # workers.sampler.TokenLogprob per new token, when asked
    prompt_logprobs: list[Any] | None = None  # per prompt token (None for the first), once, when asked
    timings: Any = None  # workers.request.RequestTimings, on a choice's last output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_steps: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions_total: int
    kv: Any  # workers.kv_cache.CacheStats
    num_blocked_steps_total: int = 0  # steps that could schedule none of the waiting requests
    scheduled_tokens_total: int = 0  # tokens computed by all steps (prefill chunks and decodes)
    pending_tokens: int = 0
    microbatched_steps_total: int = 0  # steps run as two ping-pong micro-batches


class Engine(abc.ABC):
    @abc.abstractmethod
    def submit(self, request: GenerateRequest) -> None:
        """Validate and queue; raises `workers.errors.InvalidRequest` (or a subclass) when invalid. Its
        outputs come out of later `step()` calls."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed and the next step outputs its `abort`."""

    @abc.abstractmethod
    def step(self) -> list[RequestOutput]:
        """Run one step (possibly with zero tokens) and return every request's new output."""

    @abc.abstractmethod
    def has_work(self) -> bool:
        """Whether a step would compute anything or deliver any output."""

    @abc.abstractmethod
    def health(self) -> None:
        """Return if the engine can serve; raise `workers.errors.Unavailable` if it cannot."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...
