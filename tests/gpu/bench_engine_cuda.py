"""GPU check for the engine benchmark issue, run by hand on a lent GPU machine (no Ray).

Our engine on CUDA in bf16: output tok/s and median decode step at 1 and 32 concurrent requests
(128 random prompt tokens, 128 output tokens, greedy, ignore_eos) on (a) the `bench` shape and (b) a
4-layer Maverick-shaped model (hidden 5120, 40/8 heads, 16 experts, MoE every other layer), random
weights; the fraction of the HBM roofline: bytes a decode step must read / measured copy bandwidth.

    python tests/gpu/bench_engine_cuda.py [cuda|cpu] [OUT.json]   # cpu: a tiny smoke run
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.config import config_from_hf  # noqa: E402
from model.decoder import Llama4ForCausalLM  # noqa: E402
from model.loader import materialize  # noqa: E402
from model.optimize import optimize_for_inference  # noqa: E402
from workers.config import EngineConfig  # noqa: E402
from workers.engine import LLMEngine  # noqa: E402
from workers.protocol import GenerateRequest  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"
OUT = Path(sys.argv[2]) if len(sys.argv) > 2 else None
SMOKE = DEVICE == "cpu"
DTYPE = torch.float32 if SMOKE else torch.bfloat16

BENCH = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=16, num_experts_per_tok=1,
             interleave_moe_layer_step=2, attention_chunk_size=256, max_position_embeddings=4096)
MAVERICK4 = dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
                 num_hidden_layers=4, num_attention_heads=40, num_key_value_heads=8, head_dim=128, num_local_experts=16,
                 num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=8192,
                 max_position_embeddings=8192)
if SMOKE:
    MAVERICK4 = {**MAVERICK4, "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 256,
                 "intermediate_size_mlp": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def build(shape: dict) -> Llama4ForCausalLM:
    config = config_from_hf({**shape, "model_type": "llama4_text", "bos_token_id": 1, "eos_token_id": 2,
                                   "pad_token_id": 0, "use_qk_norm": False})
    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    materialize(model, DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(1 + 0.02 * torch.randn(p.shape, generator=gen, device=DEVICE))
        else:
            p.copy_(torch.randn(p.shape, generator=gen, device=DEVICE) * (0.5 if "router" in name else 0.02))
    return optimize_for_inference(model.to(DTYPE).eval())


def time_call(fn, repeat: int = 20) -> float:
    """Seconds per call of `fn`, after one warm-up call, the device synchronised around the loop."""
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def copy_bandwidth() -> float:
    x = torch.empty(2**28 if not SMOKE else 2**24, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * x.numel() * 10 / (time.perf_counter() - start)  # read + write bytes per second


def step_bytes(model: Llama4ForCausalLM, batch: int) -> int:
    """Weights a decode step must read: all but the routed experts, plus the experts `batch` tokens touch."""
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
    dense -= model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    config = model.config
    touched = min(config.num_experts, batch)
    per_expert = 3 * config.hidden_size * config.intermediate_size * torch.finfo(DTYPE).bits // 8
    return dense + len(config.moe_layers) * touched * per_expert


def run(model, concurrency: int, prompt_len: int, output_len: int) -> dict:
    engine = LLMEngine(model, EngineConfig(max_num_seqs=32, max_num_batched_tokens=4096, device=DEVICE,
                                           kv_cache_memory=(2**30 if not SMOKE else 2**26)))
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    rng = random.Random(concurrency)
    vocab = model.config.vocab_size
    for warm in (True, False):
        for _ in range(concurrency if not warm else 1):
            engine.submit(GenerateRequest([rng.randrange(10, vocab) for _ in range(prompt_len)], params))
        steps, tokens = [], 0
        sync()
        start = time.perf_counter()
        while engine.has_work():
            t0 = time.perf_counter()
            tokens += sum(len(o.new_token_ids) for o in engine.step())
            sync()
            steps.append(time.perf_counter() - t0)
        wall = time.perf_counter() - start
    return {"tok_s": tokens / wall, "decode_step_ms": statistics.median(steps[2:] or steps) * 1e3}


def main() -> None:
    bandwidth = copy_bandwidth()
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
              "dtype": str(DTYPE), "copy_GBps": bandwidth / 1e9, "results": []}
    prompt_len, output_len = (128, 128) if not SMOKE else (16, 8)
    for name, shape in (("bench", BENCH), ("maverick-4-layer", MAVERICK4)):
        model = build(shape)
        params = sum(p.numel() for p in model.parameters())
        for c in (1, 32):
            got = run(model, c, prompt_len, output_len)
            roofline_ms = step_bytes(model, c) / bandwidth * 1e3
            row = {"model": name, "params": params, "concurrency": c, **got, "roofline_step_ms": roofline_ms,
                   "roofline_fraction": roofline_ms / got["decode_step_ms"]}
            report["results"].append(row)
            print(json.dumps(row), flush=True)
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if OUT:
        OUT.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
