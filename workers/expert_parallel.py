"""Expert parallelism over one process group: placement, and the one dispatch/combine pair.

Ranks 0..A-1 are attention workers, A..A+E-1 expert workers. For each MoE layer, in this order,
every rank takes part in three collectives:
  1. count exchange: each attention rank tells every rank how many rows it sends it;
  2. dispatch `all_to_all_single`: score-scaled activations (+ their expert id as one extra column)
     go to the expert ranks that own those experts, with uneven splits;
  3. combine `all_to_all_single`: expert outputs come back to the rows' senders.
Expert ranks send nothing in (2), attention ranks receive nothing from each other. Dispatch is
asynchronous, so the attention rank computes the shared expert while its tokens are away.
The local path (`model.moe.RoutedExperts`) stays the reference these are tested against.

Shape suffixes: N routed rows, D hidden, W world size, E experts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model.moe import RoutedExperts


class Placement:
    """(MoE layer, expert) -> the ranks holding that expert; dispatch reads only this table."""

    def __init__(self, table: dict[int, list[list[int]]]):
        self.table = table  # layer -> [ranks of expert 0, ranks of expert 1, ...]
        self._dest: dict[int, torch.Tensor] = {}
        for layer, experts in table.items():
            width = max(len(r) for r in experts)
            # replicas padded by repeating the first; dispatch picks replica (row index % count)
            self._dest[layer] = torch.tensor([(r * width)[:width] for r in experts], dtype=torch.long)

    @classmethod
    def contiguous(cls, moe_layers: list[int], num_experts: int, expert_ranks: list[int]) -> "Placement":
        """Consecutive experts per rank, as even as the counts allow: 128 over 6 ranks is 22,22,21,21,21,21."""
        k = len(expert_ranks)
        if not 0 < k <= num_experts:
            raise ValueError(f"{k} expert ranks cannot split {num_experts} experts (each needs at least one)")
        owners = []
        for i, rank in enumerate(expert_ranks):
            owners += [[rank]] * (num_experts // k + (i < num_experts % k))
        return cls({layer: owners for layer in moe_layers})

    def experts_on(self, rank: int, layer: int) -> list[int]:
        return [e for e, ranks in enumerate(self.table[layer]) if rank in ranks]

    def destinations(self, layer: int, experts_N: torch.Tensor) -> torch.Tensor:
        dest_EW = self._dest[layer]
        if dest_EW.shape[1] == 1:
            return dest_EW[experts_N, 0]
        replica_N = torch.arange(experts_N.shape[0]) % dest_EW.shape[1]
        return dest_EW[experts_N, replica_N]


@dataclass
class Pending:
    order_N: torch.Tensor  # rows sorted by destination rank
    send_counts: list[int]
    work: dist.Work | None


class ExpertGroup:
    """The collectives of one rank, shared by every MoE layer (they run in layer order)."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world_size: int, hidden: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.group, self.rank, self.world_size = group, rank, world_size
        self.hidden, self.dtype, self.device = hidden, dtype, torch.device(device)
        self.alltoall_seconds = 0.0  # time spent in collectives, since start
        self.alltoall_bytes = 0  # payload this rank sent: dispatch on attention ranks, combine on expert ranks

    def exchange_counts(self, send_counts: list[int]) -> list[int]:
        start = time.perf_counter()
        send = torch.tensor(send_counts, dtype=torch.long, device=self.device)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        counts = recv.tolist()
        self.alltoall_seconds += time.perf_counter() - start
        return counts

    def all_to_all(self, send_RD: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                   async_op: bool = False) -> tuple[torch.Tensor, dist.Work | None]:
        start = time.perf_counter()
        recv_RD = torch.empty(sum(recv_counts), send_RD.shape[1], dtype=send_RD.dtype, device=self.device)
        work = dist.all_to_all_single(recv_RD, send_RD.contiguous(), recv_counts, send_counts,
                                      group=self.group, async_op=async_op)
        self.alltoall_bytes += send_RD.numel() * send_RD.element_size()
        self.alltoall_seconds += time.perf_counter() - start  # async: only the time to launch it
        return recv_RD, work

    def wait(self, work: dist.Work | None) -> None:
        if work is not None:
            start = time.perf_counter()
            work.wait()
            self.alltoall_seconds += time.perf_counter() - start


class AllToAllExperts(nn.Module):
    """Stands in for `model.moe.RoutedExperts` on an attention rank: same `dispatch`/`combine` pair,
    the experts themselves live on the expert ranks."""

    def __init__(self, comm: ExpertGroup, placement: Placement, layer: int):
        super().__init__()
        self.comm, self.placement, self.layer = comm, placement, layer
        self._recv: torch.Tensor | None = None

    def dispatch(self, x_ND: torch.Tensor, experts_N: torch.Tensor) -> Pending:
        comm = self.comm
        dest_N = self.placement.destinations(self.layer, experts_N.cpu())
        order_N = torch.argsort(dest_N, stable=True)
        send_counts = torch.bincount(dest_N, minlength=comm.world_size).tolist()
        comm.exchange_counts(send_counts)  # attention ranks receive no rows: zeros come back
        # NOTE: the expert id rides as an extra column, exact in fp32 and in bf16 up to 256 experts
        ids = experts_N.to(x_ND.dtype)[:, None]
        payload_N = torch.cat([x_ND, ids], dim=1).index_select(0, order_N.to(x_ND.device))
        _, work = comm.all_to_all(payload_N, send_counts, [0] * comm.world_size, async_op=True)
        return Pending(order_N, send_counts, work)

    def combine(self, pending: Pending) -> torch.Tensor:
        comm = self.comm
        comm.wait(pending.work)
        empty = torch.empty(0, comm.hidden, dtype=comm.dtype, device=comm.device)
        back_ND, _ = comm.all_to_all(empty, [0] * comm.world_size, pending.send_counts)
        y_ND = torch.empty_like(back_ND)
        y_ND[pending.order_N.to(back_ND.device)] = back_ND
        return y_ND


def serve_layer(comm: ExpertGroup, experts: RoutedExperts, load_E: torch.Tensor | None = None) -> int:
    """An expert rank's share of one MoE layer: receive rows, run the grouped FFN, send them back.
    `load_E` (per expert of the model) counts the rows each expert received."""
    zeros = [0] * comm.world_size
    recv_counts = comm.exchange_counts(zeros)
    empty = torch.empty(0, comm.hidden + 1, dtype=comm.dtype, device=comm.device)
    rows_ND1, _ = comm.all_to_all(empty, zeros, recv_counts)
    x_ND, experts_N = rows_ND1[:, :-1], rows_ND1[:, -1].long()
    if load_E is not None and experts_N.numel():  # on the rows' device: no host sync per layer
        load_E += torch.bincount(experts_N, minlength=load_E.numel())
    y_ND = experts(x_ND, experts_N) if rows_ND1.shape[0] else x_ND
    comm.all_to_all(y_ND, recv_counts, zeros)
    return rows_ND1.shape[0]
