"""The bench reports' PNG plots (`cluster/bench/plots.py`), from small reports of the benches' own shapes."""

import json
import subprocess
import sys

import pytest

from cluster.bench import engine, plots, servers

PNG = b"\x89PNG\r\n\x1a\n"
LEVELS = [1, 8, 32]


def serve_report(layouts=(0, 2)) -> dict:
    rows = []
    for e in layouts:
        for c in LEVELS:
            row = {"expert_workers": e, "concurrency": c, "reference": "engine" if e == 0 else "gang"}
            for door in ("engine" if e == 0 else "gang", "http", "grpc", "vllm_engine", "vllm"):
                row[f"{door}_tok_s"] = 40.0 * c ** 0.6
                row[f"{door}_tpot_ms"] = 8.0 + c
                row[f"{door}_rounds_tok_s"] = [40.0, 41.0]
            row["http_vs_vllm_tok_s"] = row["engine_vs_vllm_engine_tok_s"] = 1.0  # ratios: not lines
            rows.append(row)
    return {"results": rows, "layouts": [{"attention_workers": 1, "expert_workers": e} for e in layouts],
            "prompt_len": 128, "output_len": 128, "repeat": 2, "machine": {"cpus": 2, "threads": 2}}


def engine_report() -> dict:
    rows = [{"concurrency": c, "ours_tok_s": 100.0 * c ** 0.5, "ours_step_ms": 5.0 + c, "ours_decode_step_ms": 4.0,
             "vllm_tok_s": 80.0 * c ** 0.5, "vllm_step_ms": 6.0 + c, "ratio_vs_vllm": 1.25,
             "ours_nofree_tok_s": 90.0 * c ** 0.5, "ours_nofree_step_ms": 5.5 + c, "ratio_vs_ours_nofree": 1.1}
            for c in LEVELS]
    return {"results": rows, "machine": {"cores": 2, "torch": "2.13.0+cpu"},
            "load": {"prompt_len": 128, "output_len": 128}, "profile": ""}


def ep_report() -> dict:
    rows = [{"concurrency": c, "single_tok_s": 100.0, "single_step_ms": 4.0 + c, "gang_tok_s": 60.0,
             "gang_step_ms": 10.0 + c, "gang_alltoall_ms": 4.0, "overlap_tok_s": 62.0, "overlap_step_ms": 12.0 + c,
             "overlap_alltoall_ms": 4.5} for c in LEVELS]
    return {"results": rows, "idle": {}, "layout": {"attention_workers": 1, "expert_workers": 2, "backend": "gloo"}}


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000, path


def test_serve_plot_has_a_line_per_door_and_a_row_per_layout(tmp_path):
    fig = plots.figure(serve_report())
    assert len(fig.axes) == 4  # E=0 and E=2, tok/s and TPOT each
    for ax in fig.axes:
        assert len(ax.get_lines()) == 5  # reference, HTTP, gRPC, vLLM offline, vLLM serve
        assert list(ax.get_lines()[1].get_xdata()) == LEVELS
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["ours, offline", "ours, HTTP", "ours, gRPC", "vLLM, offline", "vLLM serve"]
    assert fig.axes[0].get_lines()[0].get_linestyle() == "--"  # offline references dashed
    assert_png(plots.save(fig, tmp_path / "serve.png"))


def test_engine_plot_uses_step_ms_where_there_is_no_tpot(tmp_path):
    report = engine_report()
    fig = plots.figure(report)
    tok_s, tpot = fig.axes
    assert [line.get_label() for line in tok_s.get_lines()] == ["ours", "vLLM", "ours, chunk freeing off"]
    assert len(tpot.get_lines()) == 3
    assert list(tpot.get_lines()[0].get_ydata()) == [r["ours_step_ms"] for r in report["results"]]
    assert_png(plots.save(fig, tmp_path / "engine.png"))


def test_ep_plot_splits_each_gang_step_into_compute_and_alltoall(tmp_path):
    report = ep_report()
    fig = plots.figure(report)
    (ax,) = fig.axes
    assert len(ax.containers) == 5  # single, then compute and all-to-all of gang and overlap
    assert all(len(bars) == len(LEVELS) for bars in ax.containers)
    gang_compute, gang_wait = ax.containers[1], ax.containers[2]
    for bars_c, bars_w, row in zip(gang_compute, gang_wait, report["results"]):  # stacked to the step time
        assert bars_c.get_height() == pytest.approx(row["gang_step_ms"] - row["gang_alltoall_ms"])
        assert bars_w.get_y() + bars_w.get_height() == pytest.approx(row["gang_step_ms"])
    assert_png(plots.save(fig, tmp_path / "ep.png"))


def test_report_writers_put_the_plot_beside_the_json(tmp_path):
    engine.write_report(engine_report(), str(tmp_path / "engine.json"), "# engine\n")
    servers.write_report(str(tmp_path / "serve.json"), serve_report(layouts=(0,)), "# serve\n")
    servers.write_report(str(tmp_path / "aiperf.json"), {"result": {}, "servers": []}, "# aiperf\n")
    assert_png(tmp_path / "engine.png")
    assert_png(tmp_path / "serve.png")
    assert not (tmp_path / "aiperf.png").exists()  # aiperf's report has no plot


def test_command_line_and_unknown_reports(tmp_path):
    path = tmp_path / "ep.json"
    path.write_text(json.dumps(ep_report()))
    out = subprocess.run([sys.executable, "-m", "cluster.bench.plots", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert_png(tmp_path / "ep.png")
    with pytest.raises(ValueError):
        plots.figure({"results": [{"concurrency": 1}]})


def test_importing_the_benches_does_not_import_matplotlib():
    code = ("import sys, cluster.bench.engine, cluster.bench.servers, cluster.bench.plots; "
            "sys.exit('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
