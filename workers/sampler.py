"""Batched logits processing and sampling for every request of a step at once.

Order, as vLLM applies it: logit bias, repetition / frequency / presence penalties, then greedy
argmax, or temperature, top-k, top-p, min-p and a draw. A draw is `argmax(p / q)` with `q ~ Exp(1)`
drawn per vocabulary entry. A seeded request reseeds its own generator before each draw from (seed,
choice, position), so its tokens depend on nothing else: not on what shares its batch, and not on a
generator's state that dies with a worker (a request resumed elsewhere draws what it would have).
Logprobs are `log_softmax` of the model's raw logits (before any processing), as vLLM reports them
by default.

Shape suffixes: N rows that sample this step, M rows that draw, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.request import Request


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # the `logprobs` most likely (token id, logprob), best first


def _seen_tokens(req: Request, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts of generated tokens [V], mask of tokens in prompt or output [V])."""
    out = torch.tensor(req.output_token_ids, dtype=torch.long, device=device)
    counts = torch.bincount(out, minlength=vocab)[:vocab].float()
    seen = counts > 0
    seen[torch.tensor(req.prompt_token_ids, dtype=torch.long, device=device)] = True
    return counts, seen


def process_logits(logits_NV: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """Logit bias and penalties, in place on a copy only when some request asks for them."""
    touched = False
    vocab = logits_NV.shape[1]
    for i, req in enumerate(reqs):
        p = req.params
        if not (p.logit_bias or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty):
            continue
        if not touched:
            logits_NV, touched = logits_NV.clone(), True
        row = logits_NV[i]
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=row.device)
            row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device)
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            counts, seen = _seen_tokens(req, vocab, row.device)
            if p.repetition_penalty != 1.0:
                penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row.copy_(torch.where(seen, penalised, row))
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits_NV


def _filtered_probs(logits_MV: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """Softmax after temperature, top-k, top-p and min-p; masked entries are exact zeros."""
    dev = logits_MV.device
    temp = torch.tensor([r.params.temperature for r in reqs], device=dev)[:, None]
    logits_MV = logits_MV / temp
    top_k = [r.params.top_k for r in reqs]
    top_p = [r.params.top_p for r in reqs]
    min_p = [r.params.min_p for r in reqs]
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_MV, order_MV = logits_MV.sort(dim=-1, descending=True)
        vocab = logits_MV.shape[1]
        ranks = torch.arange(vocab, device=dev)[None, :]
        k = torch.tensor([k or vocab for k in top_k], device=dev)[:, None]
        drop = ranks >= k
        probs = sorted_MV.masked_fill(drop, float("-inf")).softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly above each entry
        drop |= before >= torch.tensor(top_p, device=dev)[:, None]
        drop[:, 0] = False  # the most likely token always survives
        logits_MV = logits_MV.scatter(1, order_MV, sorted_MV.masked_fill(drop, float("-inf")))
    probs_MV = logits_MV.softmax(-1)
    if any(min_p):
        floor = torch.tensor(min_p, device=dev)[:, None] * probs_MV.max(-1, keepdim=True).values
        probs_MV = probs_MV.masked_fill(probs_MV < floor, 0.0)
    return probs_MV


def sample(logits_NV: torch.Tensor, reqs: list[Request], generator: torch.Generator | None = None,
           ) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row, plus logprobs for the rows that asked."""
    processed = process_logits(logits_NV, reqs)
    tokens = processed.argmax(-1)
    drawing = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if drawing:
        idx = torch.tensor(drawing, device=logits_NV.device)
        sub = [reqs[i] for i in drawing]
        probs_MV = _filtered_probs(processed[idx], sub)
        q_MV = torch.empty_like(probs_MV)
        for m, req in enumerate(sub):  # per-request noise: a seeded draw ignores its neighbours
            if req.generator is not None:
                req.generator.manual_seed(draw_seed(req.params.seed, req.index, len(req.output_token_ids)))
            q_MV[m].exponential_(generator=req.generator if req.generator is not None else generator)
        tokens[idx] = (probs_MV / q_MV).argmax(-1)
    token_list = tokens.tolist()
    return token_list, logprobs_for(logits_NV, reqs, token_list)


def draw_seed(seed: int, choice: int, position: int) -> int:
    """The seed of one draw: SplitMix64 over the choice's seed and the position, so neighbouring
    seeds or positions give unrelated streams. Choice i of seed s draws as seed s + i alone (vLLM's
    rule for n > 1)."""
    mask = 2**64 - 1
    x = 0
    for part in (seed + choice, position):
        x = (x + 0x9E3779B97F4A7C15 + (part & mask)) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return x >> 1  # manual_seed takes up to 2**63 - 1 without complaint


def logprobs_for(logits_NV: torch.Tensor, reqs: list[Request], tokens: list[int]) -> list[TokenLogprob | None]:
    wanted = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(reqs)
    if not wanted:
        return out
    logp = torch.log_softmax(logits_NV[torch.tensor(wanted, device=logits_NV.device)], -1)
    for row, i in enumerate(wanted):
        out[i] = token_logprob(logp[row], tokens[i], reqs[i].params.logprobs)
    return out


def token_logprob(logp_V: torch.Tensor, token: int, num_top: int) -> TokenLogprob:
    chosen = logp_V[token]
    rank = int((logp_V > chosen).sum()) + 1
    top = []
    if num_top:
        values, ids = logp_V.topk(num_top)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(chosen), rank, top)
