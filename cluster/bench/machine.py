"""What this machine can do: memory bandwidth, matmul rate, and the roofline of a decode step."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from model.config import CHUNKED, Llama4Config


def _best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(threads: int) -> dict:
    """Read bandwidth (a reduction over 256 MB, far beyond the caches) and fp32 matmul rate."""
    torch.set_num_threads(threads)
    data = torch.randn(64 * 2**20)  # 256 MB
    read_s = _best(lambda: data.sum(), 7)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    mm_s = _best(lambda: a @ b, 10)
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "read_GBps": data.numel() * 4 / read_s / 1e9,
        "matmul_GFLOPs": 2 * 1024**3 / mm_s / 1e9,
    }


def decode_step_floor(config: Llama4Config, concurrency: int, context: int, read_GBps: float,
                      matmul_GFLOPs: float, dtype_bytes: int = 4) -> dict:
    """Least time one decode step can take: every weight it touches read once, or its FLOPs at the
    measured matmul rate, whichever is larger. Experts touched: E * (1 - (1 - 1/E)^c) per MoE layer."""
    d, hd, c = config.hidden_size, config.head_dim, concurrency
    attn = d * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    expert = 3 * d * config.intermediate_size
    dense = 3 * d * config.intermediate_size_mlp
    e = config.num_experts
    touched = e * (1 - (1 - 1 / e) ** c)
    params_read = params_active = d * config.vocab_size  # lm_head
    for i in range(config.num_hidden_layers):
        params_read += attn
        params_active += attn
        if config.is_moe(i):
            params_read += expert * (1 + touched) + d * e
            params_active += 2 * expert + d * e
        else:
            params_read += dense
            params_active += dense
    kv_per_token = 2 * config.num_key_value_heads * hd
    window = min(context, config.attention_chunk_size or context)
    kv_read = sum(kv_per_token * (window if t == CHUNKED else context) for t in config.layer_types) * c
    bytes_read = (params_read + kv_read) * dtype_bytes
    flops = 2 * params_active * c
    seconds = max(bytes_read / (read_GBps * 1e9), flops / (matmul_GFLOPs * 1e9))
    return {"bytes": bytes_read, "flops": flops, "step_ms": seconds * 1e3,
            "tok_s": c / seconds, "bound": "memory" if bytes_read / read_GBps > flops / matmul_GFLOPs else "compute",
            "experts_touched_per_layer": round(touched, 2)}


__all__ = ["measure", "decode_step_floor"]
