"""GPU check for the FP8 issue, run by hand on a lent H100/H200 (no Ray; under 8 minutes).

1. A Maverick-shaped MoE layer's routed experts (hidden 5120, width 8192, 16 experts, top-1) in FP8
   (`Fp8RoutedExperts`: per-token FP8 activations, `torch._scaled_mm`) against bf16: ms per call at
   1 / 32 / 256 tokens, and the fraction of the HBM roofline (expert bytes touched / copy bandwidth).
2. Our engine on a 4-layer Maverick-shaped model, bf16 against the same weights quantized to FP8
   (experts, shared experts, dense MLPs; attention, routers, lm_head in bf16): tok/s at 1 and 32
   concurrent, decode step, and the largest logit difference on a prompt.

    python tests/gpu/check_fp8.py [cuda|cpu] [OUT.json]   # cpu: a tiny smoke run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.moe import RoutedExperts  # noqa: E402
from model.quant import DEFAULT_IGNORE, Fp8Linear, Fp8RoutedExperts, Fp8Scheme, quantize_modules, quantize_rows  # noqa: E402
from tests.gpu.bench_engine_cuda import (DEVICE, DTYPE, MAVERICK4, SMOKE, build, copy_bandwidth, run,  # noqa: E402
                                         time_call)

OUT = Path(sys.argv[2]) if len(sys.argv) > 2 else None
D, F, E = (5120, 8192, 16) if not SMOKE else (256, 256, 8)


@torch.no_grad()
def moe_layer(bandwidth: float) -> list[dict]:
    dense = RoutedExperts(D, F, list(range(E)), E).to(DEVICE)
    for p in dense.parameters():
        p.copy_(torch.randn(p.shape, device=DEVICE) * 0.02)
    dense = dense.to(DTYPE)
    fp8 = Fp8RoutedExperts(D, F, list(range(E)), E).to(DEVICE)
    for e in range(E):  # the same weights, [out, in] per expert
        fp8.gate_up_weight.data[e], fp8.gate_up_weight_scale.data[e] = quantize_rows(dense.gate_up_proj[e].t())
        fp8.down_weight.data[e], fp8.down_weight_scale.data[e] = quantize_rows(dense.down_proj[e].t())
    rows = []
    for tokens in (1, 32, 256):
        x = torch.randn(tokens, D, device=DEVICE, dtype=DTYPE)
        ids = torch.randint(0, E, (tokens,), device=DEVICE)
        touched = len(set(ids.tolist()))
        for name, module, bytes_per_weight in (("dense", dense, 2), ("fp8", fp8, 1)):
            seconds = time_call(lambda: module(x, ids))
            need = touched * 3 * D * F * bytes_per_weight
            rows.append({"part": "moe_layer", "dtype": name, "tokens": tokens, "ms": seconds * 1e3,
                         "roofline_fraction": need / bandwidth / seconds})
        ref, got = dense(x, ids).float(), fp8(x, ids).float()
        rows[-1]["max_rel_diff_vs_dense"] = ((got - ref).abs().max() / ref.abs().max()).item()
        print(json.dumps(rows[-2:]), flush=True)
    return rows


@torch.no_grad()
def quantized_copy(model):
    """The model with every module Meta's FP8 checkpoint quantizes swapped for FP8 storage (built on the
    model's device: `quantize_modules` allocates where the original lives)."""
    import copy

    fp8 = copy.deepcopy(model)
    originals = dict(fp8.named_modules())  # the modules quantize_modules is about to replace
    quantize_modules(fp8, Fp8Scheme(DEFAULT_IGNORE, True))
    for name, module in fp8.named_modules():
        source = originals.get(name)
        if isinstance(module, Fp8Linear):
            module.weight.data, module.weight_scale.data = quantize_rows(source.weight)
        elif isinstance(module, Fp8RoutedExperts):
            for e in range(len(module.expert_ids)):
                module.gate_up_weight.data[e], module.gate_up_weight_scale.data[e] = quantize_rows(
                    source.gate_up_proj[e].t())
                module.down_weight.data[e], module.down_weight_scale.data[e] = quantize_rows(source.down_proj[e].t())
    return fp8


def main() -> None:
    bandwidth = copy_bandwidth()
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
              "copy_GBps": bandwidth / 1e9, "results": moe_layer(bandwidth)}
    bf16 = build(MAVERICK4)
    fp8 = quantized_copy(bf16)
    prompt = torch.randint(10, MAVERICK4["vocab_size"], (64,)).tolist()
    from tests.model.test_fp8 import prefill_logits

    diff = (prefill_logits(fp8, prompt).float() - prefill_logits(bf16, prompt).float()).abs().max().item()
    report["logit_max_abs_diff_fp8_vs_bf16"] = diff
    prompt_len, output_len = (128, 128) if not SMOKE else (16, 8)
    for name, model in (("dense", bf16), ("fp8", fp8)):
        for c in (1, 32):
            row = {"part": "engine", "dtype": name, "concurrency": c, **run(model, c, prompt_len, output_len)}
            report["results"].append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"logit_max_abs_diff_fp8_vs_bf16": diff}))
    if OUT:
        OUT.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
