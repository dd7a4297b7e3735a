"""One engine under load, in its own process: ours (`LLMEngine`) or transformers' `generate`.

    python -m cluster.bench.runner ours|hf --model DIR --concurrency 1 8 32 [--no-free-chunked] [--profile]

Each concurrency level submits that many requests of `--prompt-len` random prompt tokens and
generates `--output-len` tokens each (greedy, EOS ignored). Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def run_ours(args: argparse.Namespace, vocab: int) -> dict:
    from workers.config import EngineConfig
    from workers.engine import LLMEngine
    from workers.protocol import GenerateRequest
    from workers.sampling_params import SamplingParams

    top = max(args.concurrency)
    config = EngineConfig(max_num_seqs=top, max_num_batched_tokens=max(4096, args.prompt_len),
                          free_chunked_blocks=not args.no_free_chunked)
    engine = LLMEngine.from_model_dir(args.model, config, skip_tokenizer_init=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    def generate(prompts: list[list[int]]) -> tuple[float, list[float], int]:
        for p in prompts:
            engine.submit(GenerateRequest(p, params))
        steps, tokens = [], 0
        start = time.perf_counter()
        while engine.has_work():
            t0 = time.perf_counter()
            tokens += sum(len(o.new_token_ids) for o in engine.step())
            steps.append(time.perf_counter() - t0)
            if len(steps) == args.output_len // 2:  # mid-run: what chunk freeing holds back
                saved[0] = engine.stats().kv.chunked_bytes_saved
        return time.perf_counter() - start, steps, tokens

    saved = [0]

    generate(random_prompts(1, args.prompt_len, vocab, seed=99)[:1])  # warm-up
    results = []
    for c in args.concurrency:
        runs = []
        for r in range(args.repeat):
            seconds, steps, tokens = generate(random_prompts(c, args.prompt_len, vocab, seed=c * 100 + r))
            decode = steps[1:] if c == 1 else [s for s in steps if s < 0.5 * max(steps)]
            runs.append((seconds, tokens, statistics.median(decode)))
        seconds, tokens, decode_s = sorted(runs)[len(runs) // 2]  # the median run
        results.append({"concurrency": c, "tok_s": tokens / seconds, "seconds": seconds,
                        "all_tok_s": [t / s for s, t, _ in runs],
                        "step_ms": seconds / args.output_len * 1e3, "decode_step_ms": decode_s * 1e3,
                        "chunked_kv_bytes_saved_midrun": saved[0]})
    out = {"engine": "ours", "results": results}
    if args.profile:
        out["profile"] = profile_step(engine, generate, random_prompts(top, args.prompt_len, vocab, seed=7))
    return out


def profile_step(engine, generate, prompts) -> str:
    """Where one decode step at the highest concurrency spends its time (torch profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    from workers.protocol import GenerateRequest
    from workers.sampling_params import SamplingParams

    for p in prompts:
        engine.submit(GenerateRequest(p, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)))
    for _ in range(4):  # prefill, then a few decode steps
        engine.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        engine.step()
    while engine.has_work():
        engine.step()
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=32, max_shapes_column_width=40)


def run_hf(args: argparse.Namespace, vocab: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    def generate(prompts: list[list[int]]) -> tuple[float, int]:
        ids = torch.tensor(prompts)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.output_len,
                                 min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start, (out.shape[1] - ids.shape[1]) * ids.shape[0]

    generate(random_prompts(1, args.prompt_len, vocab, seed=99))
    results = []
    for c in args.concurrency:
        runs = sorted(generate(random_prompts(c, args.prompt_len, vocab, seed=c * 100 + r))
                      for r in range(args.repeat))
        seconds, tokens = runs[len(runs) // 2]
        results.append({"concurrency": c, "tok_s": tokens / seconds, "seconds": seconds,
                        "all_tok_s": [t / s for s, t in runs], "step_ms": seconds / args.output_len * 1e3})
    return {"engine": "hf", "results": results}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["ours", "hf"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs per level; the median is reported")
    parser.add_argument("--no-free-chunked", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from model.config import load_config

    vocab = load_config(args.model).vocab_size
    out = (run_ours if args.engine == "ours" else run_hf)(args, vocab)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
