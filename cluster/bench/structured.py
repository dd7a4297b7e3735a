"""`maverick bench engine --structured json-schema`: what a JSON schema costs per token, ours against
vLLM-CPU, each engine measured alone.

Every round starts one engine process (ours, then vLLM, the order swapped every round), measures it at
each concurrency level unconstrained and under the schema (the two alternate, so drift touches both),
and stops it before the next engine starts: on 2 cores an idle engine beside the measured one biases it
(`../shared/PEERS.md`). Requests: `--prompt-len` random tokens, `--output-len` tokens with EOS ignored.
The schema (`BENCH_SCHEMA`) asks for at least 40 records, so no request can finish it early: every
step of every request is constrained, strings (nearly the whole vocabulary allowed) and keys (one
token allowed) alike. The checkpoint should have Maverick's vocabulary (202048 tokens,
`make-tiny --vocab-size 202048`): mask work grows with the vocabulary.
Writes JSON (`--output`) and Markdown beside it.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from cluster.bench.engine import HERE, VLLM_PYTHON, EngineProcess, write_report
from cluster.terminal import StepLine
from model.config import load_config

RECORD = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
    "kind": {"enum": ["alpha", "beta", "gamma"]},
    "score": {"type": "number"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["name", "id", "kind", "tags"], "additionalProperties": False}
BENCH_SCHEMA = {"type": "object", "properties": {"records": {"type": "array", "items": RECORD, "minItems": 40}},
                "required": ["records"], "additionalProperties": False}


def _commands(args, schema_path: str) -> dict[str, list[str]]:
    common = ["--model", str(args.model), "--prompt-len", str(args.prompt_len), "--output-len",
              str(args.output_len), "--max-concurrency", str(max(args.concurrency)),
              "--temperature", str(args.temperature), "--top-p", str(args.top_p), "--schema", schema_path]
    commands = {"ours": [sys.executable, "-m", "cluster.bench.runner", "ours", *common]}
    if "vllm" in args.peers:
        if not VLLM_PYTHON.is_file():
            raise FileNotFoundError(f"{VLLM_PYTHON} missing: `make bench` builds .venv-vllm")
        vocab = load_config(args.model).vocab_size
        commands["vllm"] = [str(VLLM_PYTHON), str(HERE / "peer_vllm.py"), *common, "--vocab", str(vocab)]
    return commands


def measure(args) -> dict[str, dict[str, dict[int, list[dict]]]]:
    """samples[engine][free|schema][concurrency] = results of every round."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(BENCH_SCHEMA, f)
    commands = _commands(args, f.name)
    samples = {name: {mode: {c: [] for c in args.concurrency} for mode in ("free", "schema")} for name in commands}
    steps = StepLine()
    try:
        for rep in range(args.repeat):
            order = list(commands) if rep % 2 == 0 else list(reversed(commands))
            for name in order:  # alone: started and stopped around its own round
                steps.show(f"bench structured  round {rep + 1}/{args.repeat}  {name}  loading")
                engine = EngineProcess(name, commands[name], args.timeout)
                try:
                    engine.ready()
                    for c in args.concurrency:
                        modes = ("free", "schema") if (rep + c) % 2 == 0 else ("schema", "free")
                        for mode in modes:
                            steps.show(f"bench structured  round {rep + 1}/{args.repeat}  {name}  {mode}  "
                                       f"concurrency {c}")
                            # each mode its own prompts: the second must not hit the first's in the prefix cache
                            seed = 1000 * rep + c + (500 if mode == "schema" else 0)
                            samples[name][mode][c].append(engine.ask(
                                {"concurrency": c, "seed": seed, "structured": mode == "schema"}))
                finally:
                    engine.close()
    finally:
        steps.close()
        Path(f.name).unlink(missing_ok=True)
    return samples


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def assemble(args, samples: dict) -> dict:
    results = []
    for c in args.concurrency:
        row = {"concurrency": c}
        for name, modes in samples.items():
            free, schema = modes["free"][c], modes["schema"][c]
            for mode, rows in (("free", free), ("schema", schema)):
                row[f"{name}_{mode}_tok_s"] = _median(rows, "tok_s")
                row[f"{name}_{mode}_tpot_ms"] = _median(rows, "step_ms")
                row[f"{name}_{mode}_rounds_tok_s"] = [r["tok_s"] for r in rows]
                if "decode_step_ms" in rows[0]:
                    row[f"{name}_{mode}_decode_step_ms"] = _median(rows, "decode_step_ms")
            row[f"{name}_schema_over_free_tpot"] = row[f"{name}_schema_tpot_ms"] / row[f"{name}_free_tpot_ms"]
            if "mask_step_ms" in schema[0]:
                row[f"{name}_mask_step_ms"] = _median(schema, "mask_step_ms")
                row[f"{name}_mask_ms_per_token"] = _median(schema, "mask_ms_per_token")
        if "vllm" in samples:
            row["ours_vs_vllm_schema_tpot"] = row["ours_schema_tpot_ms"] / row["vllm_schema_tpot_ms"]
        results.append(row)
    return {"results": results, "checkpoint": str(args.model), "vocab_size": load_config(args.model).vocab_size,
            "schema": BENCH_SCHEMA, "load": {"prompt_len": args.prompt_len, "output_len": args.output_len,
                                             "temperature": args.temperature, "top_p": args.top_p,
                                             "ignore_eos": True, "repeat": args.repeat}}


def markdown(report: dict) -> str:
    load = report["load"]
    rows = report["results"]
    engines = [e for e in ("ours", "vllm") if f"{e}_free_tok_s" in rows[0]]
    lines = [f"# Structured outputs: a JSON schema's cost ({report['vocab_size']}-token vocabulary)", "",
             f"{load['prompt_len']} prompt + {load['output_len']} output tokens (EOS ignored), temperature "
             f"{load['temperature']:g}; each engine alone, {load['repeat']} rounds, medians. TPOT: wall time per "
             "output token of a stream.", ""]
    head = ["concurrency"]
    for e in engines:
        head += [f"{e} TPOT ms free", f"{e} TPOT ms schema", f"{e} schema / free"]
    head += ["ours mask ms per step", "ours mask ms per token"]
    if "vllm" in engines:
        head.append("ours / vllm TPOT under the schema")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["concurrency"])]
        for e in engines:
            cells += [f"{r[f'{e}_free_tpot_ms']:.1f}", f"{r[f'{e}_schema_tpot_ms']:.1f}",
                      f"{r[f'{e}_schema_over_free_tpot']:.2f}x"]
        cells += [f"{r['ours_mask_step_ms']:.2f}", f"{r['ours_mask_ms_per_token']:.3f}"]
        if "vllm" in engines:
            cells.append(f"{r['ours_vs_vllm_schema_tpot']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    report = assemble(args, measure(args))
    write_report(report, args.output, markdown(report))
    return 0
