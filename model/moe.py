"""Llama 4 MoE block: sigmoid top-k router that scales the expert INPUT, routed experts, shared expert.

The routed experts sit behind one replaceable component with a `dispatch` / `combine` pair: here
they compute locally (sparse, grouped by expert); the expert-parallel path in `workers/` swaps in an
all-to-all pair with the same two methods, and the block overlaps the shared expert with it.

Shape suffixes: T tokens, D hidden, E experts (global), e local experts, F expert width,
K experts per token, N = T*K routed rows.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from model.config import Llama4Config
from model.layers import MLP


class ExpertPath(Protocol):
    def dispatch(self, x_ND: torch.Tensor, experts_N: torch.Tensor) -> Any: ...
    def combine(self, pending: Any) -> torch.Tensor: ...


class RoutedExperts(nn.Module):
    """The routed experts a process holds (all of them, or a slice), in the checkpoint's fused layout.

    `gate_up_proj` [e, D, 2F] holds [gate | up] on the last dim; `down_proj` [e, F, D]; both are used
    as `x @ W`. `expert_ids` lists the global expert id of each local row.
    """

    def __init__(self, hidden: int, width: int, expert_ids: list[int], num_experts: int):
        super().__init__()
        e = len(expert_ids)
        self.gate_up_proj = nn.Parameter(torch.empty(e, hidden, 2 * width))
        self.down_proj = nn.Parameter(torch.empty(e, width, hidden))
        self.expert_ids = list(expert_ids)
        self.num_experts = num_experts
        self.register_buffer("local_index_E", torch.empty(num_experts, dtype=torch.long), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        local = torch.full((self.num_experts,), -1, dtype=torch.long, device=self.local_index_E.device)
        ids = torch.tensor(self.expert_ids, dtype=torch.long, device=local.device)
        local[ids] = torch.arange(len(self.expert_ids), device=local.device)
        self.local_index_E = local

    def dispatch(self, x_ND: torch.Tensor, experts_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_ND, experts_N  # local: nothing travels; the work happens in combine

    def combine(self, pending: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.forward(*pending)

    def forward(self, x_ND: torch.Tensor, experts_N: torch.Tensor) -> torch.Tensor:
        """Sparse grouped FFN: rows sorted by expert, one pair of GEMMs per expert that has rows."""
        local_N = self.local_index_E[experts_N]
        if x_ND.shape[0] == 1:  # a lone token (batch-1 decode): no grouping needed
            return self._ffn(int(local_N), x_ND)
        order_N = torch.argsort(local_N, stable=True)
        x_sorted = x_ND.index_select(0, order_N)
        y_sorted = torch.empty_like(x_sorted)
        start = 0
        # NOTE: .tolist() is a host sync; free on CPU, one small copy per MoE layer on GPU
        for e, n in enumerate(torch.bincount(local_N, minlength=len(self.expert_ids)).tolist()):
            if n:
                y_sorted[start:start + n] = self._ffn(e, x_sorted[start:start + n])
                start += n
        return torch.empty_like(x_ND).index_copy_(0, order_N, y_sorted)

    def _ffn(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        return expert_ffn(x_nD, self.gate_up_proj[e], self.down_proj[e])


def expert_ffn(x_nD: torch.Tensor, gate_up_D2F: torch.Tensor, down_FD: torch.Tensor) -> torch.Tensor:
    gate, up = (x_nD @ gate_up_D2F).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down_FD


def experts_for_loop(experts: RoutedExperts, x_ND: torch.Tensor, experts_N: torch.Tensor) -> torch.Tensor:
    """NOTE: kept as the readable reference the grouped path is tested against: one row at a time."""
    rows = []
    for x_D, expert in zip(x_ND, experts_N.tolist()):
        e = experts.expert_ids.index(expert)
        rows.append(expert_ffn(x_D[None], experts.gate_up_proj[e], experts.down_proj[e])[0])
    return torch.stack(rows) if rows else x_ND.new_zeros(x_ND.shape)


class MoE(nn.Module):
    def __init__(self, config: Llama4Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts: ExpertPath = RoutedExperts(
            config.hidden_size, config.intermediate_size, list(range(config.num_experts)), config.num_experts)
        self.shared_expert = MLP(config.hidden_size, config.intermediate_size)

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the score-scaled expert inputs [N, D] and their expert ids [N] (token-major)."""
        logits_TE = self.router(x_TD)
        top_TK, experts_TK = torch.topk(logits_TE, self.top_k, dim=1)
        scores_TK = torch.sigmoid(top_TK.float()).to(logits_TE.dtype)
        x_ND = (x_TD[:, None, :] * scores_TK[:, :, None]).reshape(-1, x_TD.shape[-1])
        return x_ND, experts_TK.reshape(-1)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_ND, experts_N = self.route(x_TD)
        pending = self.experts.dispatch(x_ND, experts_N)
        out_TD = self.shared_expert(x_TD)  # overlaps the routed experts when they are remote
        y_ND = self.experts.combine(pending)
        return out_TD + y_ND.view(x_TD.shape[0], self.top_k, x_TD.shape[1]).sum(1)
