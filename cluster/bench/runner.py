"""One engine under load, in its own process: ours (`LLMEngine`) or transformers' `generate`.

    python -m cluster.bench.runner ours|hf --model DIR [--no-free-chunked] [--kv-fraction F]

It loads the model, prints `{"ready": ...}`, then serves one measurement per line of stdin:
`{"concurrency": c, "seed": s}` submits c requests of `--prompt-len` random prompt tokens and
generates `--output-len` tokens each (greedy, EOS ignored), and prints one JSON result line (with
`"requests": n`, n requests in all, at most c at once: a serving benchmark's load, offline); with
`"structured": true` every request follows the JSON schema in `--schema` (ours only), and the result
holds the time the step's grammar masks took;
`{"profile": c}` prints where one decode step at concurrency c spends its time. The driver
(`cluster.bench.engine`) interleaves engines level by level, so the machine's slow drifts touch all
of them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


class Ours:
    def __init__(self, args: argparse.Namespace):
        from workers.config import EngineConfig
        from workers.engine import LLMEngine
        from workers.sampling_params import SamplingParams

        config = EngineConfig(max_num_seqs=args.max_concurrency,
                              max_num_batched_tokens=max(4096, args.prompt_len),
                              free_chunked_blocks=not args.no_free_chunked)
        if args.kv_fraction:
            config.kv_blocks = pressured_blocks(args, config)
        # grammars need the tokenizer
        self.engine = LLMEngine.from_model_dir(args.model, config, skip_tokenizer_init=not args.schema)
        self.params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.output_len,
                                     ignore_eos=True)
        self.args = args
        self.mask_seconds: list[float] = []
        if args.schema:
            from workers.structured import GrammarSpec

            self.structured_params = dataclasses.replace(
                self.params, structured=GrammarSpec.json_schema(Path(args.schema).read_text()))
            apply_masks = self.engine.grammars.apply_masks

            def timed(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return apply_masks(*a, **kw)
                finally:
                    self.mask_seconds.append(time.perf_counter() - t0)

            self.engine.grammars.apply_masks = timed

    def _generate(self, prompts: list[list[int]], structured: bool = False,
                  in_flight: int | None = None) -> tuple[float, list[float], int, int]:
        """All `prompts`, at most `in_flight` at once (a finished request's place goes to the next, as a
        client with that many connections would do); by default all at once."""
        from workers.protocol import GenerateRequest

        params = self.structured_params if structured else self.params
        waiting = list(reversed(prompts))
        for _ in range(min(len(waiting), in_flight or len(waiting))):
            self.engine.submit(GenerateRequest(waiting.pop(), params))
        steps, tokens, saved = [], 0, 0
        start = time.perf_counter()
        while self.engine.has_work():
            t0 = time.perf_counter()
            outputs = self.engine.step()
            tokens += sum(len(o.new_token_ids) for o in outputs)
            for _ in range(min(len(waiting), sum(o.finished for o in outputs))):
                self.engine.submit(GenerateRequest(waiting.pop(), params))
            steps.append(time.perf_counter() - t0)
            if len(steps) == self.args.output_len // 2:  # mid-run: what chunk freeing holds back
                saved = self.engine.stats().kv.chunked_bytes_saved
        return time.perf_counter() - start, steps, tokens, saved

    def measure(self, c: int, seed: int, structured: bool = False, requests: int | None = None) -> dict:
        """c requests at once; with `requests`, that many in all, at most c at once."""
        preempted = self.engine.stats().num_preemptions_total
        self.mask_seconds.clear()
        prompts = random_prompts(requests or c, self.args.prompt_len, self.args.vocab, seed)
        seconds, steps, tokens, saved = self._generate(prompts, structured, in_flight=c)
        decode = steps[1:] or steps  # the first step prefills every prompt (the budget holds them all)
        waves = (requests or c) / c
        result = {"concurrency": c, "tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
                  "step_ms": seconds / (self.args.output_len * waves) * 1e3,
                  "decode_step_ms": statistics.median(decode) * 1e3, "chunked_kv_bytes_saved_midrun": saved,
                  "preemptions": self.engine.stats().num_preemptions_total - preempted}
        if structured:  # per step: fill every row's bitmask and mask its logits
            result["mask_step_ms"] = statistics.median(self.mask_seconds) * 1e3
            result["mask_ms_per_token"] = sum(self.mask_seconds) / max(1, tokens) * 1e3
        return result

    def profile(self, c: int) -> str:
        """Where one decode step at concurrency c spends its time (torch profiler, CPU)."""
        from torch.profiler import ProfilerActivity, profile

        from workers.protocol import GenerateRequest
        from workers.sampling_params import SamplingParams

        short = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        for p in random_prompts(c, self.args.prompt_len, self.args.vocab, seed=7):
            self.engine.submit(GenerateRequest(p, short))
        for _ in range(4):  # prefill, then a few decode steps
            self.engine.step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            self.engine.step()
        while self.engine.has_work():
            self.engine.step()
        return prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=32, max_shapes_column_width=40)


def pressured_blocks(args: argparse.Namespace, config) -> dict[str, int]:
    """KV blocks per group for `kv_fraction` of the largest batch at full length (at least one sequence)."""
    from model.config import load_config
    from workers.kv_cache import KVCacheManager

    model_config = load_config(args.model)
    groups = set(model_config.layer_types)
    probe = KVCacheManager(model_config, dict.fromkeys(groups, 1), config.block_size, dict.fromkeys(groups, 1),
                           free_chunked_blocks=config.free_chunked_blocks)
    seqs = max(1.0, args.kv_fraction * args.max_concurrency)
    length = args.prompt_len + args.output_len
    return {g: math.ceil(seqs * probe.max_blocks_needed(g, length)) for g in groups}


class Transformers:
    def __init__(self, args: argparse.Namespace):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        self.args = args

    def measure(self, c: int, seed: int) -> dict:
        ids = torch.tensor(random_prompts(c, self.args.prompt_len, self.args.vocab, seed))
        start = time.perf_counter()
        # sampled: temperature and top-p as asked, and no top-k (transformers' own default is 50)
        sampling = {"do_sample": True, "temperature": self.args.temperature, "top_p": self.args.top_p, "top_k": 0} \
            if self.args.temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.args.output_len,
                                      min_new_tokens=self.args.output_len, pad_token_id=0, **sampling)
        seconds = time.perf_counter() - start
        tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
        return {"concurrency": c, "tok_s": tokens / seconds, "seconds": seconds,
                "step_ms": seconds / self.args.output_len * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["ours", "hf"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--no-free-chunked", action="store_true")
    parser.add_argument("--kv-fraction", type=float, default=None,
                        help="a KV cache for this fraction of --max-concurrency full-length sequences")
    parser.add_argument("--schema", default=None, help="a JSON schema file: measurements may ask for it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from model.config import load_config

    args.vocab = load_config(args.model).vocab_size
    engine = Ours(args) if args.engine == "ours" else Transformers(args)
    engine.measure(1, seed=99)  # warm-up
    if args.schema and args.engine == "ours":  # the schema compiled, as a server that has seen it before
        engine.measure(1, seed=98, structured=True)
    print(json.dumps({"ready": args.engine}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if "profile" in command:
            print(json.dumps({"profile": engine.profile(command["profile"])}), flush=True)
        else:
            kw = {"structured": True} if command.get("structured") else {}
            if command.get("requests"):
                kw["requests"] = command["requests"]
            print(json.dumps({"result": engine.measure(command["concurrency"], command["seed"], **kw)}), flush=True)


if __name__ == "__main__":
    main()
