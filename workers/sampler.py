"""Batched logits processing and sampling for every request of a step at once.

Order, as vLLM applies it: logit bias, repetition / frequency / presence penalties, then greedy
argmax, or temperature, top-k, top-p, min-p and a draw. A draw inverts the row's cumulative
distribution at one uniform number (`draw`). A seeded request reseeds its own generator before each
draw from (seed, choice, position), so its tokens depend on nothing else: not on what shares its
batch, and not on a generator's state that dies with a worker (a request resumed elsewhere draws
what it would have).
Logprobs are `log_softmax` of the model's raw logits (before any processing), as vLLM reports them
by default.

Shape suffixes: N rows that sample this step, M rows that draw, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
        logits_MV = top_k_top_p(logits_MV, top_k, top_p)
    probs_MV = logits_MV.softmax(-1)
    if any(min_p):
        floor = torch.tensor(min_p, device=dev)[:, None] * probs_MV.max(-1, keepdim=True).values
        probs_MV = probs_MV.masked_fill(probs_MV < floor, 0.0)
    return probs_MV


def top_k_top_p(logits_MV: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """-inf outside each row's top k (0: all), then outside the smallest set of best tokens whose
    probability (renormalised over the top k) reaches top p; the best token always stays, and so
    does any token tied with the last one kept (the cut is a threshold on the logits).

    Ranking a whole vocabulary costs: torch's sort took 317 ms per step at 32 rows x 202k here. So
    the 64 best of each row come first (a trained model's nucleus is mostly among them), and only
    if some row's cut lies past them, whole rows are sorted by value (numpy's sort on CPU: 50 ms)."""
    vocab = logits_MV.shape[1]
    k_M1 = torch.tensor([k or vocab for k in top_k], device=logits_MV.device)[:, None]
    p_M1 = torch.tensor(top_p, device=logits_MV.device)[:, None]
    # rows without top-k normalise over the whole vocabulary, whatever the candidates
    log_total_M1 = logits_MV.logsumexp(-1, keepdim=True)
    for c in (64, vocab) if vocab > 64 else (vocab,):
        best_MC = _best_first(logits_MV, c)
        drop = torch.arange(c, device=logits_MV.device)[None, :] >= k_M1
        probs = torch.where(k_M1 <= c, best_MC.masked_fill(drop, float("-inf")).softmax(-1),
                            (best_MC - log_total_M1).exp())
        drop |= probs.cumsum(-1) - probs >= p_M1  # the mass strictly above an entry reaches p
        # settled: the row's top k is among the candidates, or (no top-k) their mass reaches p; an
        # explicit top-k wider than the candidates normalises over tokens not ranked yet
        settled = (k_M1 <= c) | ((k_M1 >= vocab) & (probs.sum(-1, keepdim=True) >= p_M1))
        if bool(settled.all()):
            break
    # both cuts are prefixes of the ranking: keep the best `kept` (at least one)
    kept_M1 = (~drop).sum(-1, keepdim=True).clamp(min=1)
    return logits_MV.masked_fill(logits_MV < best_MC.gather(1, kept_M1 - 1), float("-inf"))


def _best_first(logits_MV: torch.Tensor, c: int) -> torch.Tensor:
    """The c largest logits of each row, in descending order (values only)."""
    if c < logits_MV.shape[1]:
        return logits_MV.topk(c, dim=-1).values
    if logits_MV.device.type == "cpu":  # numpy sorts values alone, ~6x faster than torch's sort here
        return torch.from_numpy(np.ascontiguousarray(np.sort(logits_MV.numpy(), axis=-1)[:, ::-1]))
    return logits_MV.sort(dim=-1, descending=True).values


def sample(logits_NV: torch.Tensor, reqs: list[Request], generator: torch.Generator | None = None,
           grammars=None) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row, plus logprobs for the rows that asked. Rows with a grammar (`req.matcher`)
    first have every token it forbids masked, greedy and drawing rows alike (`grammars`:
    workers.structured.Grammars)."""
    processed = logits_NV
    constrained = [i for i, r in enumerate(reqs) if r.matcher is not None]
    if constrained:
        # logprobs are of the raw logits: mask a copy only when some row reports them
        raw_needed = any(r.params.logprobs is not None for r in reqs)
        processed = grammars.apply_masks(logits_NV, constrained, [reqs[i].matcher for i in constrained],
                                         inplace=not raw_needed)
    processed = process_logits(processed, reqs)
    tokens = processed.argmax(-1)
    drawing = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if drawing:
        idx = torch.tensor(drawing, device=logits_NV.device)
        sub = [reqs[i] for i in drawing]
        probs_MV = _filtered_probs(processed[idx], sub)
        tokens[idx] = draw(probs_MV, _uniforms(sub, generator, probs_MV.device))
    token_list = tokens.tolist()
    return token_list, logprobs_for(logits_NV, reqs, token_list)


def _uniforms(reqs: list[Request], generator: torch.Generator | None, device) -> torch.Tensor:
    """One uniform in [0, 1) per drawing row (float64): a seeded request's from its own generator,
    reseeded for this position; the others' from the step's generator in one call."""
    u_M = torch.empty(len(reqs), dtype=torch.float64)
    shared = [m for m, req in enumerate(reqs) if req.generator is None]
    if shared:
        u_M[shared] = torch.rand(len(shared), dtype=torch.float64, generator=generator)
    for m, req in enumerate(reqs):
        if req.generator is not None:
            req.generator.manual_seed(draw_seed(req.params.seed, req.index, len(req.output_token_ids)))
            u_M[m] = torch.rand(1, dtype=torch.float64, generator=req.generator)
    return u_M.to(device)


def draw(probs_MV: torch.Tensor, u_M: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: row m takes the first token whose cumulative probability reaches
    (1 - u_m) x the row's total, a target in (0, total], so token i comes with probability p_i, a
    zero-probability token never (its running sum reaches nothing its predecessor did not), and
    one uniform per row suffices: noise per vocabulary entry cost 5.6 ms per step at 32 rows x
    8192 here, and grows with the vocabulary. Float64 keeps the sum exact over Maverick's 202k."""
    cdf_MV = probs_MV.to(torch.float64).cumsum(-1)
    target_M1 = (1.0 - u_M[:, None]) * cdf_MV[:, -1:]
    return torch.searchsorted(cdf_MV, target_M1).squeeze(1)


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
