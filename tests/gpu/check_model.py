"""GPU check for the model issue, run by hand on a lent GPU machine (no Ray, device's own torch).

1. Oracle on CUDA: our model vs transformers in fp32 (same 1e-4 tolerance) and bf16 (max logit
   difference, greedy agreement length) on the Scout-like and Maverick-like test configs.
2. One Maverick-shaped MoE layer (hidden 5120, expert width 8192, 16 experts, bf16, random weights)
   at 1, 32 and 256 tokens: time and fraction of the measured HBM bandwidth.

    python tests/gpu/check_model.py [cuda|cpu]     # cpu: a tiny smoke run of the same code
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.batch import build_metadata  # noqa: E402
from model.config import Llama4Config  # noqa: E402
from model.generate import ContiguousCache, greedy_generate  # noqa: E402
from model.loader import load_pretrained  # noqa: E402
from model.moe import MoE  # noqa: E402
from tests.oracle import MAVERICK_LIKE, SCOUT_LIKE, hf_model, hf_text_config, save_conditional  # noqa: E402

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"
SMOKE = DEVICE == "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def hf_greedy(hf, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(hf(input_ids=torch.tensor([ids], device=DEVICE), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def our_logits(model, prompt):
    cache = ContiguousCache(model, 1, len(prompt))
    pos, meta = build_metadata(model.config, [cache.slots(0, 0, len(prompt))])
    ids = torch.tensor(prompt, device=DEVICE)
    return model.logits(model(ids, pos.to(DEVICE), meta.to(DEVICE), cache.kv)).float()


def agreement(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def oracle(results):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (7, 19, 33)]
    for name, base in (("scout-like", SCOUT_LIKE), ("maverick-like", MAVERICK_LIKE)):
        hf = hf_model(hf_text_config(base), seed=7)
        with tempfile.TemporaryDirectory() as tmp:
            save_conditional(hf, Path(tmp)) if name == "maverick-like" else hf.save_pretrained(tmp)
            ours32 = load_pretrained(tmp, torch.float32, DEVICE)
            ours16 = load_pretrained(tmp, torch.bfloat16, DEVICE)
        hf32 = hf.to(DEVICE)
        row = {"config": name}
        with torch.no_grad():
            ref = [hf32(input_ids=torch.tensor([p], device=DEVICE), use_cache=False).logits[0] for p in prompts]
        row["fp32_max_logit_diff"] = max((our_logits(ours32, p) - r).abs().max().item() for p, r in zip(prompts, ref))
        row["fp32_greedy_identical_64"] = all(
            greedy_generate(ours32, [p], 64)[0] == hf_greedy(hf32, p, 64) for p in prompts)
        hf16 = hf.to(torch.bfloat16)
        with torch.no_grad():
            ref16 = [hf16(input_ids=torch.tensor([p], device=DEVICE), use_cache=False).logits[0].float()
                     for p in prompts]
        row["bf16_max_logit_diff_vs_hf_bf16"] = max(
            (our_logits(ours16, p) - r).abs().max().item() for p, r in zip(prompts, ref16))
        row["bf16_max_logit_diff_vs_hf_fp32"] = max(
            (our_logits(ours16, p) - r).abs().max().item() for p, r in zip(prompts, ref))
        # how far transformers' own bf16 run is from fp32: the scale bf16 differences live on
        row["hf_bf16_max_logit_diff_vs_hf_fp32"] = max((a - b).abs().max().item() for a, b in zip(ref16, ref))
        row["logit_absmax"] = max(r.abs().max().item() for r in ref)
        row["bf16_greedy_agreement_of_64"] = [agreement(greedy_generate(ours16, [p], 64)[0], hf_greedy(hf16, p, 64))
                                              for p in prompts]
        results["oracle"].append(row)
        print(json.dumps(row), flush=True)


def timed(fn, reps):
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def moe_layer(results):
    d, f, e = (5120, 8192, 16) if not SMOKE else (256, 512, 16)
    config = Llama4Config(hidden_size=d, intermediate_size=f, num_local_experts=e, num_hidden_layers=1)
    dtype = torch.bfloat16
    with torch.device(DEVICE):
        moe = MoE(config).to(dtype)
        with torch.no_grad():
            for p in moe.parameters():
                p.normal_(0, 0.02)
    n = 512 * 2**20 if not SMOKE else 2**20
    src = torch.empty(n, dtype=torch.float32, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), 20)
    peak = 2 * src.numel() * 4 / copy_s  # bytes read + written per second
    results["hbm_copy_GBps"] = peak / 1e9
    expert_bytes = 3 * d * f * 2
    for tokens in (1, 32, 256):
        x = torch.randn(tokens, d, device=DEVICE, dtype=dtype)
        with torch.no_grad():
            _, ids = moe.route(x)
            touched = int(torch.unique(ids).numel())
            seconds = timed(lambda: moe(x), 20)
        moved = (touched + 1) * expert_bytes + e * d * 2  # routed + shared experts + router
        row = {"tokens": tokens, "experts_touched": touched, "ms": seconds * 1e3,
               "weight_GB": moved / 1e9, "GBps": moved / seconds / 1e9, "fraction_of_copy_bw": moved / seconds / peak}
        results["moe_layer"].append(row)
        print(json.dumps(row), flush=True)


def main():
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
               "torch": torch.__version__, "oracle": [], "moe_layer": []}
    import transformers
    results["transformers"] = transformers.__version__
    oracle(results)
    moe_layer(results)
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    if out:
        out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
