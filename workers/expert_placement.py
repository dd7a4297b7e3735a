"""Where each expert's replicas live, chosen from measured load (EPLB's placement policy), pure.

The policy is the published greedy (DeepSeek's EPLB, vLLM's `--enable-eplb`), written here:
  1. replicate: while spare slots remain, give one more replica to the expert with the highest load
     per replica (never more replicas than ranks: a second copy on one rank halves nothing);
  2. pack: place replicas heaviest first (load / replicas), each on the least-loaded rank that has a
     free slot and does not hold that expert yet.
Ties break on the lower expert, replica and rank index, so the same counts give the same placement.

That greedy balances rows. Where an expert's weight read costs as much as computing many rows (decode
on a GPU, or on a CPU), each copy of a hot expert adds a whole read to its rank, and balanced rows can
leave the busiest rank no faster. With `weight_rows` > 0 (one expert's weight read, in rows of
compute) a replica's weight is its modelled cost per step instead: its rows per step, plus
`weight_rows` times the chance it gets any row at all (1 - exp(-rows), rows arriving at random). The
same greedy then runs with 0, 1, ... of the spare slots filled, and the count whose busiest rank
costs least is kept (ties: more copies). `weight_rows` 0 is the published greedy, unchanged.

Ranks here are expert ranks counted from 0, which in a gang's group are their ranks too. A rank's
capacity is its experts plus its redundant slots; capacities may differ between ranks.

Tokens of an expert with several replicas are split by `replica_of_rows`: the k-th row routed to the
expert (in row order) goes to replica k mod replicas, the round continuing across calls. Every
replica holds the same weights and computes each row alone, so outputs do not depend on placement;
only which rank does the work does.

Shape suffixes: N routed rows, E experts.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from model.moe import count_per_bin


@dataclass(frozen=True)
class Replica:
    rank: int  # expert rank, counted from 0
    slot: int  # index of the slot on that rank


@dataclass(frozen=True)
class LayerPlacement:
    """One MoE layer: each expert's replicas (in the order the token split numbers them) and each
    rank's slots (the expert each filled slot holds)."""

    replicas: tuple[tuple[Replica, ...], ...]  # expert -> its replicas, sorted by (rank, slot)
    slots: tuple[tuple[int, ...], ...]  # rank -> expert in slot 0, 1, ...

    def replica_counts(self) -> list[int]:
        return [len(r) for r in self.replicas]

    def rank_tokens(self, tokens_E: Sequence[int]) -> list[int]:
        """Tokens each rank serves when each expert's `tokens_E` split over its replicas by
        `replica_of_rows` (replica j of c gets n // c, plus one for j < n % c)."""
        per_rank = [0] * len(self.slots)
        for n, replicas in zip(tokens_E, self.replicas):
            c = len(replicas)
            for j, replica in enumerate(replicas):
                per_rank[replica.rank] += int(n) // c + (j < int(n) % c)
        return per_rank


@dataclass(frozen=True)
class CostModel:
    """What a replica costs its rank per step, in rows of compute (see the module's docstring)."""

    weight_rows: float = 0.0  # one expert's weight read, in rows; 0: count rows only
    steps: int = 1  # steps the token counts were taken over

    def replica(self, tokens: float) -> float:
        rows = float(tokens) / max(1, self.steps)
        return rows + self.weight_rows * -math.expm1(-rows)


ROWS_ONLY = CostModel()


def place_experts(load: Mapping[int, Sequence[float]], capacities: Sequence[int],
                  cost: CostModel = ROWS_ONLY) -> dict[int, LayerPlacement]:
    """Per MoE layer (`load`'s keys): its experts' replicas on ranks with `capacities` slots each,
    from the window's token counts per expert."""
    return {layer: place_layer(tokens_E, capacities, cost) for layer, tokens_E in load.items()}


def place_layer(tokens_E: Sequence[float], capacities: Sequence[int], cost: CostModel = ROWS_ONLY) -> LayerPlacement:
    num_experts, num_ranks = len(tokens_E), len(capacities)
    if any(c < 0 for c in capacities):
        raise ValueError(f"slot capacities must be >= 0, got {list(capacities)}")
    if sum(capacities) < num_experts:
        raise ValueError(f"{num_experts} experts do not fit in {sum(capacities)} slots (capacities {list(capacities)})")
    if any(n < 0 for n in tokens_E):
        raise ValueError("token counts must be >= 0")
    if cost.weight_rows == 0:
        return pack(tokens_E, replicate(tokens_E, sum(capacities), num_ranks), capacities)
    best, best_cost = None, math.inf
    for spares in range(sum(capacities) - num_experts + 1):
        placement = pack(tokens_E, replicate(tokens_E, num_experts + spares, num_ranks), capacities, cost)
        busiest = max(rank_costs(placement, tokens_E, cost))
        if busiest <= best_cost:  # ties: more copies, as the rows-only greedy would
            best, best_cost = placement, busiest
    return best


def rank_costs(placement: LayerPlacement, tokens_E: Sequence[float], cost: CostModel) -> list[float]:
    """Each rank's modelled cost per step: its replicas' rows (each expert's split evenly over its
    copies) plus a weight read for each replica likely to get rows."""
    per_rank = [0.0] * len(placement.slots)
    for n, replicas in zip(tokens_E, placement.replicas):
        for replica in replicas:
            per_rank[replica.rank] += cost.replica(float(n) / len(replicas))
    return per_rank


def replicate(tokens_E: Sequence[float], num_slots: int, num_ranks: int) -> list[int]:
    """Replicas per expert: one each, then the spare slots to the highest load per replica."""
    counts = [1] * len(tokens_E)
    heap = [(-float(n), e) for e, n in enumerate(tokens_E)]  # (-(load per replica), expert)
    heapq.heapify(heap)
    for _ in range(num_slots - len(tokens_E)):
        while heap and counts[heap[0][1]] >= num_ranks:
            heapq.heappop(heap)  # as many replicas as ranks: another copy would share a rank
        if not heap:
            break  # every expert on every rank; the remaining slots stay empty
        _, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, (-float(tokens_E[e]) / counts[e], e))
    return counts


def pack(tokens_E: Sequence[float], counts: Sequence[int], capacities: Sequence[int],
         cost: CostModel = ROWS_ONLY) -> LayerPlacement:
    """Replicas heaviest first, each onto the least-loaded rank with room that does not hold the expert
    yet. A replica with no such rank is dropped and its slot stays free: a second copy on one rank
    would serve nothing, and an expert rank maps each expert to one local row. A replica weighs its
    tokens (rows only) or its modelled cost."""
    def weight(e: int, c: int) -> float:
        share = float(tokens_E[e]) / c
        return share if cost.weight_rows == 0 else cost.replica(share)

    order = sorted(((weight(e, c), e, j) for e, c in enumerate(counts) for j in range(c)),
                   key=lambda item: (-item[0], item[1], item[2]))
    rank_load = [0.0] * len(capacities)
    slots: list[list[int]] = [[] for _ in capacities]
    for weight, e, _ in order:
        fresh = [r for r in range(len(capacities)) if len(slots[r]) < capacities[r] and e not in slots[r]]
        if not fresh:  # never an expert's first replica: the replicas fit in the slots
            continue
        rank = min(fresh, key=lambda r: (rank_load[r], len(slots[r]), r))
        slots[rank].append(e)
        rank_load[rank] += weight
    slots = [sorted(held) for held in slots]  # slot order carries no meaning: expert order reads best
    replicas: list[list[Replica]] = [[] for _ in tokens_E]
    for rank, held in enumerate(slots):
        for slot, e in enumerate(held):
            replicas[e].append(Replica(rank, slot))
    return LayerPlacement(tuple(tuple(r) for r in replicas), tuple(tuple(s) for s in slots))


def balancedness(tokens_per_rank: Sequence[float]) -> float:
    """Mean over max tokens per rank (vLLM's definition): 1.0 is perfect, 1/ranks is one rank doing it
    all. A layer with no tokens counts as balanced."""
    top = max(tokens_per_rank)
    return 1.0 if top == 0 else sum(tokens_per_rank) / len(tokens_per_rank) / top


def contiguous_placement(num_experts: int, capacities: Sequence[int]) -> LayerPlacement:
    """Consecutive experts per rank, one replica each, as `Placement.contiguous` lays them out (the
    placement without EPLB); `capacities` here are the experts per rank."""
    if sum(capacities) != num_experts:
        raise ValueError(f"contiguous capacities {list(capacities)} must sum to {num_experts} experts")
    slots, start = [], 0
    for c in capacities:
        slots.append(tuple(range(start, start + c)))
        start += c
    replicas = tuple((Replica(r, held.index(e)),) for e in range(num_experts)
                     for r, held in enumerate(slots) if e in held)
    return LayerPlacement(replicas, tuple(slots))


def to_rank_table(placements: Mapping[int, LayerPlacement]) -> dict[int, list[list[int]]]:
    """`workers.expert_parallel.Placement`'s table: layer -> each expert's process-group ranks (expert
    ranks come first in a gang's group, so an expert rank's index here is its rank)."""
    return {layer: [[r.rank for r in replicas] for replicas in p.replicas]
            for layer, p in placements.items()}


def replica_of_rows(experts_N: torch.Tensor, replicas_E: torch.Tensor,
                    next_E: torch.Tensor | None = None) -> torch.Tensor:
    """Which replica serves each routed row: round robin per expert, in row order. Without `next_E`
    the k-th row of expert e goes to replica k mod replicas_E[e]; with it, the round continues from
    `next_E[e]` (then advanced in place by the rows dealt), so calls with fewer rows than replicas
    (decode) still reach every replica instead of always the first. Depends only on the rows' experts
    and that counter, never on where replicas live; stays on the device (no host sync)."""
    n = experts_N.shape[0]
    order_N = torch.argsort(experts_N, stable=True)
    counts_E = count_per_bin(experts_N, replicas_E.shape[0])
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_N = experts_N.index_select(0, order_N)
    ordinal_N = torch.empty_like(experts_N)
    ordinal_N[order_N] = torch.arange(n, device=experts_N.device) - starts_E[sorted_N]
    if next_E is not None:
        ordinal_N += next_E[experts_N]
        next_E += counts_E
    return ordinal_N % replicas_E.to(experts_N.device)[experts_N]
