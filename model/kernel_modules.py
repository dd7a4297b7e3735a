"""The CPU decode kernels as modules: `apply_cpu_kernels(model)` is the one place a loaded fp32 CPU
model leaves the plain torch reference of `model/` for `model.cpu_kernels`.

Each kernel module subclasses the plain one and overrides only the computation, keeping parameters,
buffers and checkpoint names; inputs the kernels do not take (prefill rows above MAX_ROWS, widths
that are no multiple of 8, other dtypes) fall back to the plain code. What changes is speed and
fp32 rounding, never results beyond it (tests/model/test_oracle.py runs transformers' oracle on both).
"""

from __future__ import annotations

import torch
from torch import nn

from model import cpu_kernels
from model.attention import Attention
from model.batch import DecodeBatch
from model.layers import MLP, RMSNorm
from model.moe import RoutedExperts


class KernelLinear(nn.Module):
    """A bias-free Linear whose skinny inputs take the kernel; weight [out, in] unchanged."""

    def __init__(self, weight_OI: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight_OI.shape[1], weight_OI.shape[0]
        self.weight = weight_OI.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear(x, self.weight)


class KernelRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.rms_norm(x, self.weight, self.eps)


class KernelMLP(MLP):
    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return super().forward(x_TD)
        return self.down_proj(cpu_kernels.silu_mul(self.gate_up_proj(x_TD)))


class KernelAttention(Attention):
    def qk_norm(self, qk_TNK: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.rms_norm(qk_TNK, None, self.eps)

    def _decode(self, q_BHK: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                d: DecodeBatch) -> torch.Tensor:
        if cpu_kernels.decode_attention_fits(q_BHK, k_cache):  # reads the cache in place: no gather
            return cpu_kernels.decode_attention(q_BHK, k_cache, v_cache, d.kv_slots_BL, d.lengths_B, self.scaling)
        return super()._decode(q_BHK, k_cache, v_cache, d)


class KernelRoutedExperts(RoutedExperts):
    """Every expert of a step in one kernel call: rows sorted by expert, weights streamed [out, in]
    (`experts_out_in` stores them so, keeping the checkpoint's [in, out] shape as a view)."""

    def forward(self, x_ND: torch.Tensor, experts_N: torch.Tensor) -> torch.Tensor:
        gate_up_eOI, down_eOI = self.gate_up_proj.transpose(1, 2), self.down_proj.transpose(1, 2)
        if x_ND.shape[0] < 2 or not cpu_kernels.grouped_experts_fit(x_ND, gate_up_eOI, down_eOI):
            return super().forward(x_ND, experts_N)
        local_N = self.local_index_E[experts_N]
        order_N = torch.argsort(local_N, stable=True)
        counts_e = torch.bincount(local_N, minlength=len(self.expert_ids))
        y_sorted = cpu_kernels.grouped_experts(x_ND.index_select(0, order_N), counts_e, gate_up_eOI, down_eOI)
        return torch.empty_like(x_ND).index_copy_(0, order_N, y_sorted)

    def _ffn(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        gate_up_D2F, down_FD = self.gate_up_proj[e], self.down_proj[e]
        return cpu_kernels.matmul(cpu_kernels.silu_mul(cpu_kernels.matmul(x_nD, gate_up_D2F)), down_FD)


KERNEL_MODULES: dict[type, type] = {RMSNorm: KernelRMSNorm, MLP: KernelMLP, Attention: KernelAttention,
                                    RoutedExperts: KernelRoutedExperts}


def experts_out_in(experts: RoutedExperts) -> None:
    """Store each expert matrix [out, in] in memory, keeping the [in, out] shape as a view."""
    for name in ("gate_up_proj", "down_proj"):
        param = getattr(experts, name)
        param.data = param.data.transpose(1, 2).contiguous().transpose(1, 2)


def apply_cpu_kernels(model: nn.Module) -> nn.Module:
    """Swap every plain module that has a kernel version (exact types: FP8 modules keep their own
    path) and every bias-free fp32 Linear for its kernel-backed twin. Needs `cpu_kernels.available()`."""
    for module in list(model.modules()):
        kernel_class = KERNEL_MODULES.get(type(module))
        if kernel_class is not None:
            if isinstance(module, RoutedExperts):
                experts_out_in(module)
            module.__class__ = kernel_class  # same state, the kernel's forward
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                setattr(module, name, KernelLinear(child.weight.data))
    return model
