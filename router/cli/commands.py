"""The `maverick` command line. Subcommands import their heavy dependencies lazily."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("maverick")
ENGINE_OUTPUT = "bench-results/engine.json"


class _PromptAction(argparse.Action):
    """Keep --prompt and --prompt-ids in the order given, in one list of (kind, value)."""

    def __call__(self, parser, namespace, values, option_string=None):
        prompts = getattr(namespace, "prompts", None) or []
        prompts.append(("ids" if option_string == "--prompt-ids" else "text", values))
        namespace.prompts = prompts


class _TinyPresets:
    """`model.tiny.TINY_PRESETS`' names as argparse choices, imported only when make-tiny looks at them
    (model.tiny imports torch, which every other subcommand would pay for)."""

    def __iter__(self):
        from model.tiny import TINY_PRESETS

        return iter(TINY_PRESETS)

    def __contains__(self, name) -> bool:
        return name in list(self)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise SystemExit(f"--prompt-ids takes integers separated by spaces, got {text!r}") from None


def cmd_make_tiny(args: argparse.Namespace) -> int:
    import torch

    from model.tiny import make_tiny

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    out = make_tiny(args.dir, preset=args.preset, seed=args.seed, layout=args.layout, dtype=dtype, fp8=args.fp8,
                    vocab_size=args.vocab_size, router_skew=args.router_skew)
    print(out)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from router.cli.generate import run_generate

    if not getattr(args, "prompts", None):
        raise SystemExit("give at least one --prompt or --prompt-ids")
    prompts = [(kind, _parse_ids(v) if kind == "ids" else v) for kind, v in args.prompts]
    for result in run_generate(args, prompts):
        print(json.dumps(result), flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "engine":
        args.peers = [] if args.peers == "none" else args.peers.split(",")
        if args.structured:
            from cluster.bench.structured import main as bench_structured

            if args.output == ENGINE_OUTPUT:
                args.output = "bench-results/structured.json"
            return bench_structured(args)
        from cluster.bench.engine import main as bench_engine

        return bench_engine(args)
    if args.output == ENGINE_OUTPUT:
        args.output = f"bench-results/{args.target}.json"
    if args.target == "aiperf":
        from cluster.bench.aiperf import main as bench_aiperf

        args.peers = [] if args.peers == "none" else args.peers.split(",")
        return bench_aiperf(args)
    if args.target == "chaos":
        from cluster.bench.chaos import main as bench_chaos

        args.chaos_expert_workers = max(args.expert_workers)
        if not args.chaos_expert_workers:
            raise ValueError("bench chaos needs expert ranks: --expert-workers 2")
        return bench_chaos(args)
    if args.target == "bodies":
        from cluster.bench.bodies import main as bench_bodies

        args.peers = [] if args.peers == "none" else args.peers.split(",")
        return bench_bodies(args)
    if args.target == "serve" and args.ramp:
        from cluster.bench.ramp import main as bench_ramp

        if args.output == "bench-results/serve.json":
            args.output = "bench-results/ramp.json"
        return bench_ramp(args)
    if args.target == "serve":
        from cluster.bench.serve import main as bench_serve
        from router.cli.grpc_client import StreamClient

        args.peers = [] if args.peers == "none" else args.peers.split(",")
        args.grpc_client = StreamClient
        return bench_serve(args)
    if args.eplb:
        from cluster.bench.eplb import main as bench_eplb

        if args.output == "bench-results/ep.json":
            args.output = "bench-results/eplb.json"
        return bench_eplb(args)
    from cluster.bench.ep import main as bench_ep

    return bench_ep(args)


def cmd_dashboards(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cluster import dashboards

    out = Path(args.out) if args.out else dashboards.OUT_DIR
    if args.check:
        stale = dashboards.stale(out)
        if stale:
            print(f"maverick: dashboards out of date: {', '.join(stale)} (run `maverick dashboards`)", file=sys.stderr)
            return 1
        return 0
    for path in dashboards.write(out):
        print(path)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from router.cli.plan import run_plan

    return run_plan(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maverick", description="Serve Llama 4 MoE models on Ray.")
    parser.add_argument("--log-level", default="WARNING", help="logging level for stderr")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a random-weight checkpoint in the Hugging Face layout")
    p.add_argument("dir")
    p.add_argument("--preset", default="tiny-maverick", choices=_TinyPresets(), metavar="PRESET",
                   help="one of %(choices)s (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", default="conditional", choices=["conditional", "causal"],
                   help="Llama4ForConditionalGeneration (Hub layout) or text-only Llama4ForCausalLM")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--fp8", action="store_true",
                   help="Meta's FP8 layout: per-channel E4M3 weights + weight_scale, compressed-tensors config")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="the preset's vocabulary grown or shrunk to this size (202048: Maverick's), the "
                        "tokenizer filled with synthetic merges past what its corpus trains")
    p.add_argument("--router-skew", type=float, default=0.0, metavar="S",
                   help="skew routing toward a hot pair, experts 0 and 1 of every MoE layer: their router rows "
                        "get +S*u and -S*u (u a unit vector per layer from the seed), so top-1 sends them most "
                        "tokens (on tiny-maverick S=10 gives the pair 69-80%%, S=16 81-87%%); "
                        "0 (default) writes the unskewed checkpoint (see model/router_skew.py)")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("generate", help="greedy generation for a batch of prompts, one JSON line each")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--prompt", action=_PromptAction, help="prompt text (repeatable)")
    p.add_argument("--prompt-ids", action=_PromptAction, help='prompt token ids, "1 2 3" (repeatable)')
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap each text prompt as a user chat message")
    p.add_argument("--dtype", default=None, help="compute dtype (default float32 on CPU)")
    p.add_argument("--expert-workers", type=int, default=0,
                   help="run through a gang on a local Ray with this many expert workers")
    p.add_argument("--attention-workers", type=int, default=1)
    p.set_defaults(func=cmd_generate)

    from router.cli.serve import add_serve_parser
    from router.cli.top import add_top_parser

    add_serve_parser(sub)
    add_top_parser(sub)

    from router.cli.plan import add_plan_parser

    add_plan_parser(sub, cmd_plan)

    p = sub.add_parser("dashboards", help="write the Grafana dashboards of deploy/grafana/dashboards")
    p.add_argument("--out", help="folder (default: the repository's deploy/grafana/dashboards)")
    p.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is out of date")
    p.set_defaults(func=cmd_dashboards)

    p = sub.add_parser("bench", help="benchmarks, measured against peers in the same run")
    p.add_argument("target", choices=["engine", "ep", "serve", "aiperf", "bodies", "chaos"],
                   help="aiperf: NVIDIA's aiperf beside bench serve's own client, at the top --concurrency; "
                        "bodies: the streams' inter-token p99 while requests with large bodies arrive; "
                        "chaos: the pause each fault costs the streams (kills and hangs of ranks and replicas)")
    p.add_argument("--model", default="checkpoints/bench", help="checkpoint (make-tiny --preset bench)")
    p.add_argument("--output", default=ENGINE_OUTPUT)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--peers", default="vllm,hf", help="comma-separated: vllm, hf; or none")
    p.add_argument("--compare-no-free", action="store_true",
                   help="also run our engine with chunked-KV freeing off")
    p.add_argument("--compare-kv-fraction", type=float, default=None, metavar="F",
                   help="bench engine: also run ours with a KV cache for F of the largest batch (0.25: a quarter)")
    p.add_argument("--compare-metrics-off", action="store_true",
                   help="bench serve: also a twin application with metrics off, measured in turn")
    p.add_argument("--compare-no-resume", action="store_true",
                   help="bench serve: also a twin application with migration_limit 0 (no resumption bookkeeping)")
    p.add_argument("--image-model", default=None, metavar="DIR",
                   help="bench serve: also the image workload on this checkpoint with a vision tower "
                        "(make-tiny --preset bench --layout conditional)")
    p.add_argument("--structured", choices=["json-schema"], default=None,
                   help="bench engine: a JSON schema's cost per token, unconstrained against constrained, ours "
                        "and vLLM each alone; bench serve: also every server under the schema (use a "
                        "checkpoint with --vocab-size 202048)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="bench engine and aiperf: every request's temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="bench engine and aiperf: every sampled request's top-p (1: off)")
    p.add_argument("--expert-workers", type=int, nargs="+", default=[0, 2],
                   help="bench serve: the gang layouts (A=1), measured one after the other; bench ep: the gang's "
                        "expert workers (the largest given)")
    p.add_argument("--attention-workers", type=int, default=1,
                   help="bench ep: the gang's attention workers (requests spread over them, steps in lock-step)")
    p.add_argument("--attention-threads", type=int, default=1,
                   help="bench ep: intra-op threads of each attention worker of the gang (expert workers run at 1)")
    p.add_argument("--eplb", action="store_true",
                   help="bench ep: the gang without and with eplb on a skewed checkpoint (--skew)")
    p.add_argument("--skew", type=float, default=16.0,
                   help="bench ep --eplb: router skew of the checkpoint written beside --model (make-tiny --router-skew)")
    p.add_argument("--redundant-experts", type=int, default=2, help="bench ep --eplb: spare slots per expert rank")
    p.add_argument("--rebalance-every-steps", type=int, default=64, help="bench ep --eplb: steps between rebalances")
    p.add_argument("--weight-read-rows", default="measure",
                   help="bench ep --eplb: also a gang whose policy counts each copy's weight read "
                        "(eplb.weight_read_rows), in rows of compute; 'measure' times an expert here (default), "
                        "0 leaves that gang out")
    p.add_argument("--ramp", action="store_true",
                   help="bench serve: gangs that follow load (autoscaling) against one fixed gang, each alone, "
                        "under 1 stream, then --ramp-streams, then 1 again")
    p.add_argument("--ramp-streams", type=int, default=24, help="bench serve --ramp: streams of the busy phase")
    p.add_argument("--ramp-seconds", type=float, default=90, help="bench serve --ramp: each phase's length")
    p.add_argument("--ramp-seqs", type=int, default=8, help="bench serve --ramp: max_num_seqs of each gang")
    p.add_argument("--ramp-max-gangs", type=int, default=2, help="bench serve --ramp: the autoscaled deployment's "
                                                                  "max_gangs")
    p.add_argument("--repeat", type=int, default=3, help="runs per engine and level; medians are compared")
    p.add_argument("--idle-seconds", type=float, default=30.0,
                   help="bench serve: each server's idle CPU read over this long in round 1 (0: not read)")
    p.add_argument("--big-requests", type=int, default=20,
                   help="bench bodies: requests with large bodies arriving among the streams")
    p.add_argument("--body-mb", type=float, default=1.0, help="bench bodies: each large body's size in MB")
    p.add_argument("--streams", type=int, default=8, help="bench chaos: greedy streams running through each fault")
    p.add_argument("--faults", type=lambda text: text.split(","),
                   default=["sigkill-expert", "sigstop-expert", "sigkill-attention", "sigstop-attention",
                            "kill-gang-replica"], help="bench chaos: comma-separated faults to inject")
    p.add_argument("--spares", type=int, default=1,
                   help="bench chaos: also the gang with this many warm expert spares and as many attention "
                        "spares (0: not)")
    p.add_argument("--two-gangs", action="store_true", help="bench chaos: also two gangs (the expert faults)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per engine run")
    p.set_defaults(func=cmd_bench)
    for p in sub.choices.values():  # also after the subcommand: `maverick serve ... --debug`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show Python tracebacks of errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from workers.errors import EngineError

    try:
        return args.func(args)
    except BrokenPipeError:  # the reader left (`| head`): nothing more to say, and no traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (FileNotFoundError, ValueError, EngineError) as exc:
        if args.debug:
            raise
        print(f"maverick: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an operator reads one line; --debug shows where it came from
        if args.debug:
            raise
        print(f"maverick: error: {type(exc).__name__}: {exc} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
