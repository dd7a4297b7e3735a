"""Inference-time rewrites of a loaded model that change speed, never results beyond fp32 rounding.

- `fuse`: q/k/v and gate/up projections become one GEMM each (every device).
- CPU, fp32: every Linear runs through oneDNN with its weight prepacked in oneDNN's blocked layout;
  for the 1-32 row GEMMs of a decode step that streams weights markedly faster than MKL here.
  Routed experts keep the checkpoint layout (`x @ W`): each runs single-threaded beside another
  (see `model.moe.run_spread`), where MKL's kernel measured faster than oneDNN's.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from model.attention import Attention
from model.layers import MLP

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
            module.fuse()
    return model


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Fuse projections everywhere; on CPU in fp32, also prepack weights for oneDNN."""
    fuse(model)
    weight = next(model.parameters(), None)
    if weight is None or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return model
    if not _onednn_available():
        log.warning("oneDNN linear kernels unavailable: CPU matmuls stay on the default BLAS")
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, PackedLinear(child.weight.data))
    return model
