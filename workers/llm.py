"""Offline generation: submit every prompt, step the engine until all are done (`maverick generate`).

`LLM.generate` returns what vLLM's does: one `RequestResult` per prompt, in prompt order, whose
`outputs` hold one `CompletionOutput` per choice (`n`), each with its own tokens and finish reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.protocol import GenerateRequest, RequestOutput
from workers.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    """One choice, as vLLM's `CompletionOutput`."""

    index: int
    text: str | None
    token_ids: list[int]
    finish_reason: str | None  # stop | length | abort | error
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[Any] | None = None  # workers.sampler.TokenLogprob per token, when asked
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestResult:
    """One prompt's result, as vLLM's `RequestOutput`: `outputs[i]` is choice i."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[Any] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


class LLM:
    def __init__(self, model: str | Path | None = None, config: EngineConfig | None = None,
                 skip_tokenizer_init: bool = False, engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine.from_model_dir(model, config, skip_tokenizer_init)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestResult]:
        """Run all prompts as one continuous batch; results in prompt order, choices in index order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        requests = [GenerateRequest(list(p), sp) for p, sp in zip(prompts, params_list)]
        for r in requests:
            self.engine.submit(r)
        # request id -> choice index -> that choice's step outputs
        results: dict[str, dict[int, list[RequestOutput]]] = {r.request_id: {} for r in requests}
        open_choices = sum(r.params.n for r in requests)  # a request is done when every choice is
        while open_choices:
            for out in self.engine.step():
                results[out.request_id].setdefault(out.index, []).append(out)
                open_choices -= out.finished
            if self.engine.blocked:  # nothing else can arrive here to unblock it
                raise RuntimeError("the engine cannot schedule the remaining requests: the KV cache is too small")
        return [self._result(r, results[r.request_id]) for r in requests]

    def _result(self, request: GenerateRequest, choices: dict[int, list[RequestOutput]]) -> RequestResult:
        result = RequestResult(request.request_id, request.prompt_token_ids)
        for index in sorted(choices):
            outs = choices[index]
            text = None if self.engine.tokenizer is None else "".join(o.text_delta or "" for o in outs)
            logprobs = [lp for o in outs for lp in o.logprobs or []] if request.params.logprobs is not None else None
            result.outputs.append(CompletionOutput(
                index, text, [t for o in outs for t in o.new_token_ids], outs[-1].finish_reason, outs[-1].stop_reason,
                logprobs, sum(lp.logprob for lp in logprobs) if logprobs is not None else None))
            result.prompt_logprobs = result.prompt_logprobs or next(
                (o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
        return result
