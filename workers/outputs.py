"""From sampled tokens to `RequestOutput`s: text deltas, stop conditions, logprobs, usage."""

from __future__ import annotations

from model.tokenizer import Tokenizer
from workers.detokenizer import TextTracker
from workers.errors import EngineError
from workers.protocol import RequestOutput, Usage
from workers.request import Request
from workers.sampler import TokenLogprob


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_ids: frozenset[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.text: dict[str, TextTracker] = {}

    def track(self, req: Request) -> None:
        if self.tokenizer is not None:
            tracker = TextTracker(self.tokenizer, req.params.stop, req.params.skip_special_tokens)
            for token in req.output_token_ids:  # a resumed choice: replay what it delivered, so the held-
                tracker.add(token)  # back text and stop-string window are what they were, deltas unsent
            self.text[req.request_id] = tracker

    def _echo(self, req: Request, delta: str | None) -> str | None:
        """With echo, a choice's first text delta starts with the prompt's text."""
        if not req.params.echo or len(req.output_token_ids) > 1 or self.tokenizer is None:
            return delta
        prompt = self.tokenizer.decode(req.prompt_token_ids, skip_special_tokens=req.params.skip_special_tokens)
        return prompt + (delta or "")

    def token(self, req: Request, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        """The output for one new token; decides whether the choice has finished."""
        req.append_token(token)
        tracker = self.text.get(req.request_id)
        delta, stop_string = tracker.add(token) if tracker else (None, None)
        params = req.params
        logprobs = [logprob] if logprob is not None else None
        if stop_string is not None:
            return self.finish(req, "stop", [token], delta, stop_string, logprobs=logprobs)
        if token in self.eos_ids and not params.ignore_eos:
            return self.finish(req, "stop", [token], delta, logprobs=logprobs)
        if token in params.stop_token_ids:
            return self.finish(req, "stop", [token], delta, token, logprobs=logprobs)
        if len(req.output_token_ids) >= req.max_tokens or len(req.tokens) >= self.max_model_len:
            return self.finish(req, "length", [token], delta, logprobs=logprobs)
        return RequestOutput(req.parent_id, [token], self._echo(req, delta), index=req.index, logprobs=logprobs,
                             prompt_logprobs=self._take_prompt_logprobs(req))

    def finish(self, req: Request, reason: str, new_ids: list[int] | None = None, delta: str | None = None,
               stop_reason: int | str | None = None, error: EngineError | None = None,
               logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        tracker = self.text.pop(req.request_id, None)
        if tracker is not None and not isinstance(stop_reason, str):  # a stop string already cut the text
            delta = (delta or "") + tracker.finish()
        req.finish(reason, stop_reason)
        usage = Usage(req.num_prompt_tokens, len(req.output_token_ids), req.num_cached_prompt)
        return RequestOutput(req.parent_id, new_ids or [], self._echo(req, delta), reason, stop_reason, usage, error, req.index,
                             logprobs, self._take_prompt_logprobs(req), req.timings())

    @staticmethod
    def _take_prompt_logprobs(req: Request) -> list | None:
        """Prompt logprobs travel once, with the choice's first output."""
        if req.params.prompt_logprobs is None or len(req.output_token_ids) > 1 or req.index:
            return None
        return [None] + req.prompt_logprobs
