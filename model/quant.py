"""FP8 checkpoints as Meta ships Maverick: compressed-tensors, static per-output-channel E4M3 weights.

`quantization_config` in `config.json` (LLAMA4.md §5.3): `quant_method: compressed-tensors`,
`format: float-quantized`, one config group whose `weights` are 8-bit float, symmetric, strategy
`channel`, static; `input_activations` (if given) 8-bit float, strategy `token`, dynamic; an `ignore`
list of module names or `re:` patterns (attention, routers, lm_head, vision stay in bf16). A
quantized Linear stores `weight` (float8_e4m3fn [out, in]) and `weight_scale` ([out, 1]); routed
experts use per-expert keys `experts.{e}.{gate,up,down}_proj.weight` (+ `.weight_scale`).

The model stays the plain reference: `quantize_modules` swaps, from outside, each quantized
`nn.Linear` for `Fp8Linear` and each `RoutedExperts` for `Fp8RoutedExperts`, both holding FP8 storage.
They compute by dequantizing one layer (or one expert) at a time into the working dtype, or, on a
GPU with FP8 tensor cores, with `torch._scaled_mm` on per-token-quantized activations.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.moe import RoutedExperts

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


class QuantConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Fp8Scheme:
    ignore: tuple[str, ...]
    dynamic_activations: bool  # per-token FP8 activations on devices that have FP8 GEMMs

    def quantized(self, module_name: str) -> bool:
        """Whether the checkpoint quantizes this module (its name with or without `language_model.`)."""
        names = {module_name, "language_model." + module_name}
        for rule in self.ignore:
            if rule.startswith("re:"):
                if any(re.fullmatch(rule[3:], n) for n in names):
                    return False
            elif rule in names:
                return False
        return True


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise QuantConfigError(f"quantization_config.{where}: {message}")


def parse_scheme(qc: dict) -> Fp8Scheme:
    """Validate a `quantization_config`; anything but FP8 per-channel weights is refused by name."""
    _require(qc.get("quant_method") == "compressed-tensors", "quant_method",
             f"{qc.get('quant_method')!r} is not supported (only 'compressed-tensors' FP8)")
    _require(qc.get("format", "float-quantized") == "float-quantized", "format",
             f"{qc.get('format')!r} is not supported (only 'float-quantized')")
    groups = qc.get("config_groups") or {}
    _require(len(groups) == 1, "config_groups", f"exactly one group is supported, found {len(groups)}")
    (name, group), = groups.items()
    at = f"config_groups.{name}"
    _require("Linear" in (group.get("targets") or []), f"{at}.targets", "must target 'Linear'")
    w = group.get("weights") or {}
    for key, want in (("num_bits", 8), ("type", "float"), ("symmetric", True), ("strategy", "channel"),
                      ("dynamic", False)):
        _require(w.get(key) == want, f"{at}.weights.{key}", f"{w.get(key)!r} is not supported (need {want!r})")
    _require(w.get("group_size") is None, f"{at}.weights.group_size", "group quantization is not supported")
    a = group.get("input_activations")
    if a is not None:
        for key, want in (("num_bits", 8), ("type", "float"), ("strategy", "token"), ("dynamic", True)):
            _require(a.get(key) == want, f"{at}.input_activations.{key}",
                     f"{a.get(key)!r} is not supported (need {want!r})")
    _require(group.get("output_activations") is None, f"{at}.output_activations", "not supported")
    _require(qc.get("kv_cache_scheme") is None, "kv_cache_scheme", "an FP8 KV cache is not supported")
    return Fp8Scheme(tuple(qc.get("ignore") or ()), a is not None)


def load_scheme(model_dir: str | Path) -> Fp8Scheme | None:
    """The checkpoint's FP8 scheme, or None for a bf16/fp32 checkpoint."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    qc = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    return parse_scheme(qc) if qc else None


# attention, routers, lm_head and the vision tower stay in bf16, as in Meta's FP8 Maverick
DEFAULT_IGNORE = ("re:.*self_attn.*", "re:.*router", "re:.*lm_head", "re:vision_model.*", "re:multi_modal_projector.*")


def fp8_quantization_config(ignore: tuple[str, ...] = DEFAULT_IGNORE) -> dict:
    """The `quantization_config` of an FP8-dynamic compressed-tensors checkpoint."""
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                        "dynamic": False, "group_size": None, "observer": "minmax"},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                  "dynamic": True, "observer": None},
            "output_activations": None}},
        "ignore": list(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
    }


# -- FP8 arithmetic -----------------------------------------------------------------------------------

def quantize_rows(w_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel E4M3: (weight [O, I] fp8, scale [O, 1] fp32) with w ~ q * scale."""
    scale_O1 = (w_OI.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (w_OI.float() / scale_O1).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale_O1


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., O, I] fp8 times its per-row scale [..., O, 1], in `dtype` (fp32 arithmetic)."""
    return (q.float() * scale.float()).to(dtype)


def fp8_gemm_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, q_OI: torch.Tensor, scale_O1: torch.Tensor, dynamic: bool) -> torch.Tensor:
    """x @ W.T for W = q * scale: FP8 tensor-core GEMM where there is one, else dequantize just in time."""
    if dynamic and fp8_gemm_supported(x.device) and x.dtype in (torch.bfloat16, torch.float16):
        x_TI = x.reshape(-1, x.shape[-1])
        if x_TI.shape[0] and x_TI.shape[1] % 16 == 0 and q_OI.shape[0] % 16 == 0:
            x_scale_T1 = (x_TI.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
            x_q = (x_TI.float() / x_scale_T1).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            y = torch._scaled_mm(x_q, q_OI.t(), scale_a=x_scale_T1, scale_b=scale_O1.float().t(),
                                 out_dtype=x.dtype)
            return y.view(*x.shape[:-1], q_OI.shape[0])
    return F.linear(x, dequantize(q_OI, scale_O1, x.dtype))


# -- modules --------------------------------------------------------------------------------------------

class Fp8Linear(nn.Module):
    """A bias-free Linear holding an FP8 weight [out, in] and its per-row scale [out, 1]."""

    def __init__(self, in_features: int, out_features: int, dynamic: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.dynamic = in_features, out_features, dynamic
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, 1, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.dynamic)


class Fp8RoutedExperts(nn.Module):
    """`RoutedExperts` with FP8 storage: each expert's matrices [out, in] with per-row scales.

    `gate_up_weight` [e, 2F, D] stacks [gate; up] rows, `down_weight` [e, D, F]; one expert at a time
    is dequantized (or run through an FP8 GEMM) when it has rows.
    """

    def __init__(self, hidden: int, width: int, expert_ids: list[int], num_experts: int, dynamic: bool = True):
        super().__init__()
        e = len(expert_ids)
        self.dynamic = dynamic
        self.gate_up_weight = nn.Parameter(torch.empty(e, 2 * width, hidden, dtype=FP8), requires_grad=False)
        self.gate_up_weight_scale = nn.Parameter(torch.empty(e, 2 * width, 1), requires_grad=False)
        self.down_weight = nn.Parameter(torch.empty(e, hidden, width, dtype=FP8), requires_grad=False)
        self.down_weight_scale = nn.Parameter(torch.empty(e, hidden, 1), requires_grad=False)
        self.expert_ids = list(expert_ids)
        self.num_experts = num_experts
        self.register_buffer("local_index_E", torch.empty(num_experts, dtype=torch.long), persistent=False)
        self.reset_buffers()

    reset_buffers = RoutedExperts.reset_buffers
    dispatch = RoutedExperts.dispatch
    combine = RoutedExperts.combine

    def forward(self, x_ND: torch.Tensor, experts_N: torch.Tensor) -> torch.Tensor:
        local_N = self.local_index_E[experts_N]
        order_N = torch.argsort(local_N, stable=True)
        counts = torch.bincount(local_N, minlength=len(self.expert_ids)).tolist()  # NOTE: a host sync
        x_sorted = x_ND.index_select(0, order_N)
        y_sorted = torch.empty_like(x_sorted)
        start = 0
        for e, n in enumerate(counts):
            if n:
                y_sorted[start:start + n] = self._ffn(e, x_sorted[start:start + n])
                start += n
        return torch.empty_like(x_ND).index_copy_(0, order_N, y_sorted)

    def _ffn(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        gate_up = fp8_linear(x_nD, self.gate_up_weight[e], self.gate_up_weight_scale[e], self.dynamic)
        gate, up = gate_up.chunk(2, dim=-1)
        return fp8_linear(F.silu(gate) * up, self.down_weight[e], self.down_weight_scale[e], self.dynamic)


def quantize_modules(model: nn.Module, scheme: Fp8Scheme, names: Callable[[str], str] | None = None) -> nn.Module:
    """Swap, on the meta device before loading, every module the checkpoint quantizes for its FP8 twin
    (`names`: the model's module names -> the checkpoint's, when they differ)."""
    names = names or (lambda name: name)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, (nn.Linear, RoutedExperts)) or not scheme.quantized(names(full)):
                continue
            with torch.device(next(child.parameters()).device):  # meta stays meta: nothing allocated
                if isinstance(child, RoutedExperts):
                    swapped = Fp8RoutedExperts(child.gate_up_proj.shape[1], child.down_proj.shape[1],
                                               child.expert_ids, child.num_experts, scheme.dynamic_activations)
                elif child.bias is None:
                    swapped = Fp8Linear(child.in_features, child.out_features, scheme.dynamic_activations)
                else:
                    continue
            setattr(module, child_name, swapped)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter as held in memory (FP8 storage counts one byte per weight)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
