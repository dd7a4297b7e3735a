"""Offline generation: submit every prompt, step the engine until all are done (`maverick generate`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.protocol import GenerateRequest, RequestOutput
from workers.sampling_params import SamplingParams


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class LLM:
    def __init__(self, model: str | Path | None = None, config: EngineConfig | None = None,
                 skip_tokenizer_init: bool = False, engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine.from_model_dir(model, config, skip_tokenizer_init)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[Completion]:
        """Run all prompts as one continuous batch; results in prompt order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        requests = [GenerateRequest(list(p), sp) for p, sp in zip(prompts, params_list)]
        for r in requests:
            self.engine.submit(r)
        results: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        done = 0
        while done < len(requests):
            for out in self.engine.step():
                results[out.request_id].append(out)
                done += out.finished
            if self.engine.blocked:  # nothing else can arrive here to unblock it
                raise RuntimeError("the engine cannot schedule the remaining requests: the KV cache is too small")
        completions = []
        for r in requests:
            outs = results[r.request_id]
            text = None if self.engine.tokenizer is None else "".join(o.text_delta or "" for o in outs)
            completions.append(Completion(r.request_id, r.prompt_token_ids, [t for o in outs for t in o.new_token_ids],
                                          text, outs[-1].finish_reason, outs[-1].stop_reason))
        return completions
