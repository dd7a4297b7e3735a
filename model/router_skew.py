"""`make-tiny --router-skew S`: routers that send most tokens to a few experts (a workload for EPLB).

The distribution, precisely. In every MoE layer the *hot pair* is experts 0 and 1. A unit vector
`u` [D] is drawn per layer from the checkpoint's seed, and the pair's router rows become

    router[0] += S * u        router[1] -= S * u

Nothing else changes: every other tensor is byte-identical to the unskewed checkpoint, and S = 0
writes exactly that checkpoint. The router's input is RMS-normalised (unit RMS per coordinate), so
`u . h` is about N(0, 1) over tokens and S is the hot pair's extra logit per unit of it; the other
experts' logits have a spread of about 3 (their rows' norm). Top-1 picks `max(logit_0, logit_1)`,
which grows like `S * |u . h|`, so as S grows the pair takes most tokens, each token going to the
one on its side of `u` (about evenly split when the activations have no common direction).

Why a pair and not one expert: a linear router (no bias) on activations without a common direction
cannot send more than about half of the tokens to one expert, because `h` and `-h` are about as likely
and they rank the logits in reverse. Why experts 0 and 1: the default contiguous placement puts them
on the first expert rank, the worst case for a static placement and the one EPLB exists for.

Measured on `tiny-maverick` (seed 1, fp32, 8 random prompts of 21 tokens, 16 greedy tokens each),
share of routed tokens in MoE layers 1 / 3 (docs/checkpoints.md has balancedness too):

    S     hot pair        expert 0, expert 1
    0     0.25 / 0.38     0.10, 0.15 / 0.26, 0.12   (unskewed)
    5     0.50 / 0.64     0.29, 0.22 / 0.21, 0.43
    10    0.69 / 0.80     0.35, 0.34 / 0.25, 0.55
    16    0.81 / 0.87     0.44, 0.38 / 0.30, 0.57
    20    0.86 / 0.90     0.45, 0.41 / 0.30, 0.60
"""

from __future__ import annotations

import random

import torch

HOT_PAIR = (0, 1)


def skew_directions(seed: int, num_layers: int, hidden: int) -> torch.Tensor:
    """One unit vector per MoE layer [L, D], from a generator of its own (the weights' stream and
    every other tensor stay as without skew)."""
    gen = torch.Generator().manual_seed(random.Random(f"router-skew-{seed}").getrandbits(63))
    u_LD = torch.randn(num_layers, hidden, generator=gen, dtype=torch.float64)
    return (u_LD / u_LD.norm(dim=1, keepdim=True)).float()


def skew_routers(tensors: dict[str, torch.Tensor], skew: float, seed: int) -> dict[str, torch.Tensor]:
    """`tensors` (fp32, any key prefix) with every `feed_forward.router.weight` [E, D] skewed by `skew`."""
    if skew < 0:
        raise ValueError(f"--router-skew must be >= 0, got {skew}")
    if skew == 0:
        return tensors
    keys = sorted((k for k in tensors if k.endswith("feed_forward.router.weight")), key=_layer_index)
    if not keys:
        return tensors
    num_experts, hidden = tensors[keys[0]].shape
    if num_experts < 2:
        raise ValueError("--router-skew needs at least 2 experts (its hot pair)")
    u_LD = skew_directions(seed, len(keys), hidden)
    out = dict(tensors)
    for key, u_D in zip(keys, u_LD):
        w_ED = tensors[key].clone()
        w_ED[HOT_PAIR[0]] += skew * u_D
        w_ED[HOT_PAIR[1]] -= skew * u_D
        out[key] = w_ED
    return out


def _layer_index(key: str) -> int:
    """`...layers.{i}.feed_forward.router.weight` -> i (layer order, not the string order of keys)."""
    return int(key.split("layers.")[1].split(".")[0])
