"""Inference-time rewrites of a loaded model that change speed, never results beyond fp32 rounding.

- `fuse`: q/k/v and gate/up projections become one GEMM each (every device; FP8 ones stay apart).
- CPU, fp32, with the decode kernels: `model.kernel_modules.apply_cpu_kernels` swaps in their modules
  (Linears, RMSNorm, SwiGLU, decode attention, grouped routed experts).
- CPU, fp32, without it: every Linear runs through oneDNN with its weight prepacked in oneDNN's
  blocked layout, which streams decode GEMMs faster than MKL here.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from model import cpu_kernels
from model.attention import Attention
from model.layers import MLP
from model.kernel_modules import apply_cpu_kernels
from model.quant import Fp8Linear

log = logging.getLogger(__name__)


def _onednn_available() -> bool:
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2), 1)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), w, None, "none", [], "")
        return True
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """A bias-free Linear whose weight [out, in] lives in oneDNN's prepacked layout."""

    def __init__(self, weight_OI: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight_OI.shape[1], weight_OI.shape[0]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight_OI.contiguous(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")


def fuse(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        if isinstance(module, (Attention, MLP)) and getattr(module, "qkv_proj", None) is None \
                and getattr(module, "gate_up_proj", None) is None:
            if any(isinstance(child, Fp8Linear) for child in module.children()):
                continue  # FP8 projections stay apart: each dequantizes (or runs an FP8 GEMM) on its own
            module.fuse()
    return model


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Fuse projections everywhere; on CPU in fp32, route decode GEMMs to the fastest kernel here."""
    fuse(model)
    weight = next(model.parameters(), None)
    if weight is None or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return model
    if cpu_kernels.available():
        return apply_cpu_kernels(model)
    if not _onednn_available():
        log.warning("oneDNN linear kernels unavailable: CPU matmuls stay on the default BLAS")
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, PackedLinear(child.weight.data))
    return model
