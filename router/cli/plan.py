"""`maverick plan CONFIG.yaml` or `maverick plan --preset maverick --gpu h200 --gpus 8`: memory per rank,
fit or not (exit 1 when not), a suggested layout, the decode roofline (`cluster.plan`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _architecture(args: argparse.Namespace, model_dir: str | None):
    from model.config import load_config, preset

    if model_dir and (Path(model_dir) / "config.json").is_file():
        return load_config(model_dir), _checkpoint_weights(model_dir)
    if not args.preset:
        raise ValueError(f"{model_dir or 'no model'}: no config.json here; give --preset maverick|scout")
    return preset(args.preset), None


def _checkpoint_weights(model_dir: str) -> str:
    from model.quant import load_scheme

    return "fp8" if load_scheme(model_dir) is not None else "bf16"


def run_plan(args: argparse.Namespace) -> int:
    from cluster.plan import GPUS, Layout, describe, suggest

    gpu = GPUS[args.gpu]
    num_gangs = 1
    if args.config:
        from cluster.serve_config import load_serve_config, validate_serve_config

        _, apps = validate_serve_config(load_serve_config(args.config), args.config)
        app = next(a for a in apps if a is not None)
        config, weights = _architecture(args, app.model)
        limits = app.engine
        layout = Layout(app.attention_workers, app.expert_workers, args.weights or weights or "bf16",
                        max_num_seqs=limits.max_num_seqs, max_num_batched_tokens=limits.max_num_batched_tokens,
                        max_model_len=limits.max_model_len or min(config.max_position_embeddings, 8192),
                        gpus_per_node=args.gpus_per_node,
                        kv_cache_bytes=limits.kv_cache_memory if "kv_cache_memory" in limits.model_fields_set else None,
                        redundant_experts=app.eplb.redundant_experts if app.eplb else args.redundant_experts)
        num_gangs = app.autoscaling.max_gangs if app.autoscaling else app.num_gangs  # the most it may run
    else:
        config, weights = _architecture(args, None)
        a = args.attention_workers or 1
        e = args.expert_workers if args.expert_workers is not None else max(0, (args.gpus or 8) - a)
        layout = Layout(a, e, args.weights or "bf16", max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                        gpus_per_node=args.gpus_per_node, redundant_experts=args.redundant_experts)
    if args.suggest:
        gpus = args.gpus or layout.attention_ranks + layout.expert_ranks
        best = suggest(config, gpus, gpu, layout)
        if best is None:
            print(f"maverick plan: no split of {gpus} x {gpu.name} fits this model with {layout.weights} weights")
            return 1
        layout = best
    ok, text = describe(config, layout, gpu, num_gangs)
    if args.json:
        print(json.dumps({"fits": ok, "attention_ranks": layout.attention_ranks, "expert_ranks": layout.expert_ranks,
                          "weights": layout.weights, "report": text}))
    else:
        print(text)
        if not ok and not args.suggest:
            gpus = args.gpus or layout.attention_ranks + layout.expert_ranks
            print(f"hint: add --suggest to find the attention/expert split of these {gpus} GPUs with the best roofline "
                  "(--gpus N for another count)")
    return 0 if ok else 1


def add_plan_parser(sub, func) -> None:
    p = sub.add_parser("plan", help="memory per GPU, fit, suggested layout and throughput roofline of a layout")
    p.add_argument("config", nargs="?", help="a deployment YAML (its first application's layout and limits)")
    p.add_argument("--preset", choices=["maverick", "scout"], help="the architecture, when the model dir is absent")
    p.add_argument("--weights", choices=["bf16", "fp8"], help="default: the checkpoint's, else bf16")
    p.add_argument("--gpu", choices=["h100", "h200"], default="h100")
    p.add_argument("--gpus", type=int, help="GPUs for one gang (with --suggest: split them)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--attention-workers", type=int)
    p.add_argument("--expert-workers", type=int)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--redundant-experts", type=int, default=0,
                   help="eplb's spare expert slots per expert rank (a YAML's eplb.redundant_experts wins)")
    p.add_argument("--suggest", action="store_true", help="choose the attention/expert split with the best roofline")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=func)
