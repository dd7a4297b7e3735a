"""PNG plots of the `bench engine`, `bench serve` and `bench ep` reports, written beside their JSON.

engine and serve: tok/s and TPOT against concurrency, one line per system or door (the systems are the
`<name>_tok_s` keys of a report's rows); ep: the step of the single engine and of each gang, split
into compute and all-to-all. matplotlib is imported only when a figure is drawn, and draws with Agg
(no display, no global backend switched), so importing the bench modules stays cheap.

    python -m cluster.bench.plots bench-results/serve.json [--out serve.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# how a system of a report is named in a legend; unknown ones keep their key
LABELS = {"ours": "ours", "engine": "ours, offline", "gang": "gang, offline (in-process)",
          "http": "ours, HTTP", "grpc": "ours, gRPC", "http_nometrics": "ours, HTTP, metrics off",
          "http_noresume": "ours, HTTP, migration_limit 0", "http_schema": "ours, HTTP, JSON schema",
          "ours_nofree": "ours, chunk freeing off", "ours_pressure": "ours, small KV cache",
          "ours_free": "ours", "ours_schema": "ours, JSON schema",
          "vllm": "vLLM", "vllm_engine": "vLLM, offline", "vllm_free": "vLLM",
          "vllm_schema": "vLLM, JSON schema", "hf": "transformers"}
SERVE_LABELS = {**LABELS, "vllm": "vLLM serve"}  # in bench engine, `vllm` is vLLM's offline engine
OFFLINE = {"engine", "gang", "vllm_engine"}  # a serve report's references: dashed beside the doors
# ours in cool colours, vLLM in warm ones, transformers grey: the two sides read apart at a glance
OURS_COLORS = ("tab:blue", "tab:green", "tab:cyan", "tab:purple", "tab:olive", "navy")
PEER_COLORS = ("tab:red", "tab:orange", "tab:brown", "tab:pink")


def kind(report: dict) -> str | None:
    """'serve', 'ep' or 'engine' (`bench engine`, with or without --structured); None for others."""
    rows = report.get("results")
    if not isinstance(rows, list) or not rows or "concurrency" not in rows[0]:
        return None
    if "layouts" in report:
        return "serve"
    if "gang_alltoall_ms" in rows[0]:
        return "ep"
    return "engine" if systems(rows) else None


def systems(rows: list[dict]) -> list[str]:
    """The systems measured in rows, in the order of their keys: `x` for each `x_tok_s` that is not a ratio."""
    names = [k.removesuffix("_tok_s") for k in rows[0] if k.endswith("_tok_s")]
    return [n for n in names if not any(w in n for w in ("_vs_", "_over_", "ratio", "_rounds"))]


def tpot_key(row: dict, name: str) -> str | None:
    # benches without a TPOT of their own report step_ms: wall time over output tokens, the same figure
    return next((k for k in (f"{name}_tpot_ms", f"{name}_step_ms") if k in row), None)


def _figure(rows: int, cols: int, height: float = 4.2, width: float = 6.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _concurrency_axis(ax, levels: list[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(levels))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("concurrent requests")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)


def _curves(axes, rows: list[dict], names: list[str], labels: dict, dashed: set[str]) -> None:
    """tok/s on axes[0], TPOT on axes[1], a line per system (skipping levels a system lacks)."""
    levels = [r["concurrency"] for r in rows]
    ours, peers = iter(OURS_COLORS * 2), iter(PEER_COLORS * 2)
    for name in names:
        color = "tab:gray" if name == "hf" else next(peers if name.startswith("vllm") else ours)
        style = {"color": color, "marker": "o", "label": labels.get(name, name),
                 "linestyle": "--" if name in dashed else "-"}
        tok = [(r["concurrency"], r[f"{name}_tok_s"]) for r in rows if f"{name}_tok_s" in r]
        axes[0].plot(*zip(*tok), **style)
        tpot = [(r["concurrency"], r[k]) for r in rows if (k := tpot_key(r, name))]
        if tpot:
            axes[1].plot(*zip(*tpot), **style)
    axes[0].set_ylabel("output tokens / s (all requests)")
    axes[1].set_ylabel("TPOT, ms per output token")
    for ax in axes:
        _concurrency_axis(ax, levels)
    axes[0].legend(fontsize="small")


def serve_figure(report: dict):
    """A row per gang layout (E expert workers): tok/s and TPOT of each door and reference."""
    layouts = sorted({r["expert_workers"] for r in report["results"]})
    fig, grid = _figure(len(layouts), 2)
    for axes, e in zip(grid, layouts):
        rows = [r for r in report["results"] if r["expert_workers"] == e]
        _curves(axes, rows, systems(rows), SERVE_LABELS, OFFLINE)
        axes[0].set_title(f"E={e}: throughput")
        axes[1].set_title(f"E={e}: time per output token")
    fig.suptitle(f"bench serve: {report['prompt_len']} prompt + {report['output_len']} output tokens, "
                 f"medians of {report['repeat']} rounds, {report['machine'].get('cpus', '?')} CPUs "
                 "(dashed: offline references)")
    return fig


def engine_figure(report: dict):
    load, machine = report.get("load", {}), report.get("machine", {})
    fig, grid = _figure(1, 2)
    _curves(grid[0], report["results"], systems(report["results"]), LABELS, set())
    grid[0][0].set_title("throughput")
    grid[0][1].set_title("time per output token")
    where = f", {machine['cores']} cores" if "cores" in machine else ""
    what = (f"bench engine --structured json-schema, {report.get('vocab_size', '?')}-token vocabulary"
            if "schema" in report else "bench engine")
    fig.suptitle(f"{what}: {load.get('prompt_len', '?')} prompt + {load.get('output_len', '?')} output tokens"
                 f"{where}, each engine alone")
    return fig


def ep_figure(report: dict):
    """Grouped bars per concurrency: the single engine's step, and each gang's split into compute and
    the all-to-all wait of its attention rank."""
    rows = report["results"]
    gangs = [g for g in ("gang", "overlap") if f"{g}_step_ms" in rows[0]]
    fig, grid = _figure(1, 1, height=4.8, width=8.5)
    ax = grid[0][0]
    width = 0.8 / (1 + len(gangs))
    xs = range(len(rows))
    ax.bar([x - 0.4 + width / 2 for x in xs], [r["single_step_ms"] for r in rows], width, color="0.6",
           label="single process (compute)")
    for i, (g, color) in enumerate(zip(gangs, ("tab:blue", "tab:green")), 1):
        pos = [x - 0.4 + width * (i + 0.5) for x in xs]
        wait = [r[f"{g}_alltoall_ms"] for r in rows]
        compute = [r[f"{g}_step_ms"] - w for r, w in zip(rows, wait)]
        name = "gang, 2 micro-batches" if g == "overlap" else "gang"
        ax.bar(pos, compute, width, color=color, label=f"{name}: compute")
        ax.bar(pos, wait, width, bottom=compute, color=color, alpha=0.45, hatch="//", label=f"{name}: all-to-all")
    ax.set_xticks(list(xs), [str(r["concurrency"]) for r in rows])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("median step, ms")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    layout = report.get("layout", {})
    fig.suptitle(f"bench ep: {layout.get('attention_workers', '?')} attention + "
                 f"{layout.get('expert_workers', '?')} expert workers ({layout.get('backend', '?')}) against one "
                 "process:\nthe step, and the attention rank's wait in all-to-all")
    return fig


FIGURES = {"serve": serve_figure, "engine": engine_figure, "ep": ep_figure}


def figure(report: dict):
    which = kind(report)
    if which is None:
        raise ValueError("not a bench engine, serve or ep report")
    return FIGURES[which](report)


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path


def write_beside(report: dict, output: str | Path) -> Path | None:
    """The report's plot at `output` with .png, for the reports that have one (None for others)."""
    if kind(report) is None:
        return None
    return save(figure(report), Path(output).with_suffix(".png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench.plots", description=__doc__.split("\n")[0])
    parser.add_argument("report", help="a bench engine, serve or ep JSON report")
    parser.add_argument("--out", help="the PNG (default: beside the report)")
    args = parser.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    out = Path(args.out) if args.out else Path(args.report).with_suffix(".png")
    print(save(figure(report), out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
