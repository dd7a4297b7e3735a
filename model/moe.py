"""Llama 4 MoE block: sigmoid top-k router that scales the expert INPUT, routed experts, shared expert.

The routed experts sit behind one replaceable component with a `dispatch` / `combine` pair: here
they compute locally (sparse, grouped by expert); the expert-parallel path in `workers/` swaps in an
all-to-all pair with the same two methods, and the block overlaps the shared expert with it.

Shape suffixes: T tokens, D hidden, E experts (global), e local experts, F expert width,
K experts per token, N = T*K routed rows.
"""

from __future__ import annotations

import copy
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
        rows = [(row, e) for row, e in enumerate(self.expert_ids) if e >= 0]  # a free slot (-1) maps nothing
        if rows:
            local[torch.tensor([e for _, e in rows], device=local.device)] = torch.tensor(
                [row for row, _ in rows], device=local.device)
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

    def forward_padded(self, x_ND: torch.Tensor, experts_N: torch.Tensor) -> torch.Tensor:
        """`forward` without a host synchronisation (GPU expert ranks): one grouped GEMM per projection
        over offsets that stay on the device. Rows whose expert this module does not hold (padding,
        id -1) sort last and come back undefined: their senders never read them."""
        if x_ND.shape[0] == 0:
            return torch.empty_like(x_ND)
        e = len(self.expert_ids)
        local_N = torch.where(experts_N >= 0, self.local_index_E[experts_N.clamp(min=0)], -1)
        key_N = torch.where(local_N >= 0, local_N, e)
        order_N = torch.argsort(key_N, stable=True)
        counts_e = count_per_bin(key_N, e + 1)[:e]
        offs_e = torch.cumsum(counts_e, 0).to(torch.int32)
        gate, up = F.grouped_mm(x_ND.index_select(0, order_N), self.gate_up_proj, offs=offs_e).chunk(2, dim=-1)
        y_sorted = F.grouped_mm(F.silu(gate) * up, self.down_proj, offs=offs_e)
        return torch.empty_like(x_ND).index_copy_(0, order_N, y_sorted)


FREE = -1  # the expert id of a slot that holds none (a rank's spare slot the placement left empty)


def fill_slots(module: nn.Module, wanted: list[int], fresh: nn.Module) -> nn.Module:
    """After a rebalance, the experts module of one MoE layer on an expert rank holds `wanted`: experts
    it keeps stay in their rows, and the ones it lacks are copied from `fresh` (read while the old
    placement served) into the rows of the ones it drops, in place: no second copy of the slots in
    memory, the rows' layout (`experts_out_in`) kept. Only when `wanted` outgrows the rows is a larger
    module built. Per-expert parameters lead with the row dim (`RoutedExperts`, `Fp8RoutedExperts`)."""
    held = module.expert_ids
    free_rows = [row for row, e in enumerate(held) if e not in wanted]
    missing = [e for e in wanted if e not in held]
    if len(missing) > len(free_rows):
        return _regroup(wanted, module, fresh)
    source_row = {e: row for row, e in enumerate(fresh.expert_ids)}
    ids = list(held)
    params = dict(module.named_parameters(recurse=False))
    fresh_params = dict(fresh.named_parameters(recurse=False))
    for row, e in zip(free_rows, missing + [FREE] * (len(free_rows) - len(missing))):
        if e != FREE:
            for name, param in params.items():
                param.data[row].copy_(fresh_params[name].data[source_row[e]])
        ids[row] = e
    module.expert_ids = ids
    module.reset_buffers()
    return module


def _regroup(expert_ids: list[int], *sources: nn.Module) -> nn.Module:
    """A new module like `sources[0]` holding `expert_ids`, each from the first source that has it."""
    where = {}
    for source in reversed(sources):
        where.update({e: (source, row) for row, e in enumerate(source.expert_ids) if e != FREE})
    out = copy.copy(sources[0])  # its settings; the tensors below are its own
    out._parameters, out._buffers = {}, dict(sources[0]._buffers)
    for name, param in sources[0].named_parameters(recurse=False):
        rows = [getattr(where[e][0], name)[where[e][1]] for e in expert_ids]
        stacked = torch.stack(rows) if rows else param[:0].clone()
        if param.dim() == 3 and param.stride(1) < param.stride(2):  # stored [out, in] (CPU kernels): keep it
            stacked = stacked.transpose(1, 2).contiguous().transpose(1, 2)
        out.register_parameter(name, nn.Parameter(stacked, requires_grad=False))
    out.expert_ids = list(expert_ids)
    out.reset_buffers()
    return out


def pad_slots(module: nn.Module, rows: int) -> nn.Module:
    """`module` grown to `rows` rows, the new ones FREE (zeros): room a rebalance fills in place. Done
    once at load, before the rows take their kernels' layout."""
    extra = rows - len(module.expert_ids)
    if extra <= 0:
        return module
    for name, param in list(module.named_parameters(recurse=False)):
        pad = torch.zeros((extra, *param.shape[1:]), dtype=param.dtype, device=param.device)
        module.register_parameter(name, nn.Parameter(torch.cat([param.data, pad]), requires_grad=False))
    module.expert_ids = [*module.expert_ids, *[FREE] * extra]
    module.reset_buffers()
    return module


def held_experts(module: nn.Module) -> list[int]:
    """The experts a module's rows hold, in row order, free slots left out."""
    return [e for e in module.expert_ids if e != FREE]


def count_per_bin(index_N: torch.Tensor, bins: int) -> torch.Tensor:
    """`torch.bincount(index_N, minlength=bins)` for indices below `bins`, without the host read of the
    maximum that CUDA's bincount makes."""
    return torch.zeros(bins, dtype=torch.long, device=index_N.device).index_add_(0, index_N, torch.ones_like(index_N))


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


class ExpertSlices(nn.Module):
    """What an expert rank holds: for each MoE layer the slice of routed experts it owns, nothing else.
    `model.loader.expert_slice_names` maps its names to the checkpoint's."""

    def __init__(self, config: Llama4Config, owned: dict[int, list[int]]):
        super().__init__()
        self.layers = nn.ModuleDict({str(layer): RoutedExperts(config.hidden_size, config.intermediate_size, ids,
                                                               config.num_experts) for layer, ids in owned.items()})

    def experts(self, layer: int) -> RoutedExperts:
        return self.layers[str(layer)]


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
        return self.end(self.begin(x_TD))

    def begin(self, x_TD: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Route and dispatch; the shared expert runs while the routed experts work (when remote)."""
        x_ND, experts_N = self.route(x_TD)
        pending = self.experts.dispatch(x_ND, experts_N)
        return pending, self.shared_expert(x_TD)

    def end(self, begun: tuple[Any, torch.Tensor]) -> torch.Tensor:
        """Combine the routed experts' rows (waiting for them when remote) with the shared expert's."""
        pending, out_TD = begun
        y_ND = self.experts.combine(pending)
        return out_TD + y_ND.view(out_TD.shape[0], self.top_k, out_TD.shape[1]).sum(1)
