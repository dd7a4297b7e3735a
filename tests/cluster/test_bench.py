"""Tiny smoke runs of `maverick bench engine|ep|serve|aiperf` (no peers): each harness works end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.bench.collectives import collectives_alone
from model.tiny import make_tiny

MAVERICK = str(Path(sys.executable).with_name("maverick"))


def test_bench_engine_smoke(tmp_path):
    ckpt = make_tiny(tmp_path / "tiny", "tiny-maverick", layout="causal")
    out = tmp_path / "engine.json"
    proc = subprocess.run([MAVERICK, "bench", "engine", "--model", str(ckpt), "--output", str(out), "--peers",
                           "none", "--concurrency", "1", "8", "--prompt-len", "12", "--output-len", "10",
                           "--repeat", "1", "--compare-no-free", "--compare-kv-fraction", "0.25"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [r["concurrency"] for r in report["results"]] == [1, 8]
    for row in report["results"]:
        assert row["ours_tok_s"] > 0 and row["ours_nofree_tok_s"] > 0 and row["ours_pressure_tok_s"] > 0
        assert 0 < row["roofline_fraction"] and row["roofline_decode_step_ms"] > 0
        assert row["ours_preemptions"] == 0
    # a cache for 2 of the 8 sequences (2 blocks of 16 each at 22 tokens): the 4 prompts admitted
    # together all cross into their second block, so running requests are preempted
    assert report["results"][0]["ours_pressure_preemptions"] == 0
    assert report["results"][1]["ours_pressure_preemptions"] > 0
    assert report["machine"]["read_GBps"] > 0 and report["machine"]["matmul_GFLOPs"] > 0
    assert "mkldnn" in report["profile"] or "aten::" in report["profile"]
    assert out.with_suffix(".md").read_text().startswith("# Engine benchmark")
    # one plain line per step (stderr is no terminal here): engine, level and round
    assert "bench engine  ours_pressure  concurrency 8 (level 2/2)  round 1/1\n" in proc.stderr


def test_bench_engine_sampled_smoke(tmp_path):
    """`--temperature`/`--top-p` reach our engine and transformers' (which samples without its top-k 50)."""
    ckpt = make_tiny(tmp_path / "tiny", "tiny-maverick", layout="causal")
    out = tmp_path / "engine.json"
    proc = subprocess.run([MAVERICK, "bench", "engine", "--model", str(ckpt), "--output", str(out), "--peers", "hf",
                           "--concurrency", "2", "--prompt-len", "8", "--output-len", "6", "--repeat", "1",
                           "--temperature", "0.7", "--top-p", "0.9"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["load"]["greedy"] is False and report["load"]["temperature"] == 0.7
    assert report["results"][0]["ours_tok_s"] > 0 and report["results"][0]["hf_tok_s"] > 0
    assert "temperature 0.7, top-p 0.9" in out.with_suffix(".md").read_text().splitlines()[0]


def test_bench_engine_structured_smoke(tmp_path):
    """Unconstrained against the JSON schema, each engine alone, with the mask time per token."""
    ckpt = make_tiny(tmp_path / "tiny", "tiny-maverick", layout="causal", vocab_size=4096)
    out = tmp_path / "structured.json"
    proc = subprocess.run([MAVERICK, "bench", "engine", "--structured", "json-schema", "--model", str(ckpt),
                           "--output", str(out), "--peers", "none", "--concurrency", "1", "4", "--prompt-len", "8",
                           "--output-len", "12", "--repeat", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["vocab_size"] == 4096 and [r["concurrency"] for r in report["results"]] == [1, 4]
    for row in report["results"]:
        assert row["ours_free_tpot_ms"] > 0 and row["ours_schema_tpot_ms"] > 0
        assert len(row["ours_schema_rounds_tok_s"]) == 2 and row["ours_mask_ms_per_token"] > 0
    assert "schema / free" in out.with_suffix(".md").read_text()


def test_bench_ep_smoke(tmp_path):
    ckpt = make_tiny(tmp_path / "tiny", "tiny-maverick", layout="causal")
    out = tmp_path / "ep.json"
    # 2A+1E: the requests spread over two attention ranks, two each at concurrency 4
    proc = subprocess.run([MAVERICK, "bench", "ep", "--model", str(ckpt), "--output", str(out), "--concurrency",
                           "1", "4", "--prompt-len", "8", "--output-len", "6", "--attention-workers", "2",
                           "--expert-workers", "0", "1", "--attention-threads", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    layout = report["layout"]
    assert (layout["attention_workers"], layout["expert_workers"], layout["attention_threads"]) == (2, 1, 2)
    assert [r["concurrency"] for r in report["results"]] == [1, 4]
    for row in report["results"]:
        for gang in ("gang", "overlap"):  # a share of the gang's own step: every gang step waits on collectives
            assert 0 < row[f"{gang}_alltoall_share"] < 1
        assert row["gang_microbatched_steps"] == 0
        assert row["collectives_alone_e2_ms"] > 0 and row["collectives_alone_e1_ms"] > 0
    # one request never splits; two on an attention rank do, in steps where both run
    assert report["results"][0]["overlap_microbatched_steps"] == 0
    assert report["results"][1]["overlap_microbatched_steps"] >= 3
    assert 0 <= report["idle"]["idle_cpu_share"] < 0.5 and report["idle"]["wake_to_first_token_ms"] > 0
    steps = [line for line in proc.stderr.splitlines() if line.startswith("bench ep  ") and "round" in line]
    assert steps[0] == "bench ep  single  concurrency 1 (level 1/2)  round 1/3"
    assert steps[-1] == "bench ep  overlap  concurrency 4 (level 2/2)  round 3/3" and len(steps) == 18


def test_bench_ep_eplb_smoke(tmp_path):
    ckpt = make_tiny(tmp_path / "tiny", "tiny-maverick", layout="causal")
    out = tmp_path / "eplb.json"
    proc = subprocess.run([MAVERICK, "bench", "ep", "--eplb", "--skew", "16", "--model", str(ckpt), "--output",
                           str(out), "--concurrency", "8", "--prompt-len", "8", "--output-len", "12",
                           "--expert-workers", "3", "--rebalance-every-steps", "4", "--repeat", "1",
                           "--weight-read-rows", "6"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tiny-skew16" / "config.json").is_file()  # written beside --model
    report = json.loads(out.read_text())
    assert [r["concurrency"] for r in report["results"]] == [8]  # one level: three gangs are slow to test
    for row in report["results"]:
        for gang in ("static", "eplb", "eplb_reads"):
            assert row[f"{gang}_slowest_expert_compute_ms"] > 0 and 0 < row[f"{gang}_balancedness"] <= 1
    # the hot pair sits on the first expert rank without eplb; copied over three ranks with it
    top = report["results"][-1]
    assert top["static_balancedness"] < 0.6 < top["eplb_balancedness"]
    assert report["weight_read_rows"] == 6
    for policy in ("eplb", "eplb_reads"):  # both moved the hot pair apart from the start placement
        rebalance = report["rebalance"][policy]
        assert rebalance["rebalanced"] and rebalance["bytes_read"] > 0 and rebalance["staging_steps"] >= 0
    text = out.with_suffix(".md").read_text()
    assert "slowest expert rank compute" in text and "rows + weight reads" in text
    assert report["copy"]["checkpoint_gb_s"] > 0 and report["copy"]["peer_gloo_gb_s"] > 0


@pytest.mark.parametrize("layout, message", [(["--expert-workers", "0"], "--expert-workers 1 or more"),
                                             (["--attention-workers", "0"], "--attention-workers 1 or more")])
def test_bench_ep_refuses_a_gang_without_experts_or_attention(tmp_path, layout, message):
    proc = subprocess.run([MAVERICK, "bench", "ep", "--model", str(tmp_path), *layout],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr


def test_collectives_alone_ends_when_a_rank_fails():
    # 3 expert ranks cannot split 2 experts: every spawned rank raises after the rendezvous
    with pytest.raises(RuntimeError, match=r"4 processes\): exit codes \[1"):
        collectives_alone(3, hidden=16, moe_layers=[0], num_experts=2, rows=[1], steps=10, timeout_s=120)


@pytest.mark.timeout(900)  # a gang, then three `maverick serve`, one after the other: minutes on 2 cores
def test_bench_serve_smoke(tmp_path):
    ckpt = make_tiny(tmp_path / "tiny", "tiny-maverick", layout="causal")
    vision = make_tiny(tmp_path / "vision", "tiny-maverick", dtype=torch.float32)
    out = tmp_path / "serve.json"
    proc = subprocess.run([MAVERICK, "bench", "serve", "--model", str(ckpt), "--output", str(out), "--peers", "none",
                           "--concurrency", "1", "2", "--prompt-len", "8", "--output-len", "6", "--timeout", "300",
                           "--repeat", "1", "--compare-metrics-off", "--expert-workers", "1", "--idle-seconds", "2",
                           "--image-model", str(vision), "--structured", "json-schema"],
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [(r["expert_workers"], r["concurrency"]) for r in report["results"]] == [(1, 1), (1, 2)]
    for row in report["results"]:
        assert row["reference"] == "inproc"
        for system in ("inproc", "http", "grpc", "http_nometrics", "http_schema"):
            assert row[f"{system}_tok_s"] > 0 and row[f"{system}_tpot_ms"] > 0 and row[f"{system}_ttft_ms"] > 0
            # every request streamed all its tokens: 2 x concurrency requests of 6
            assert row[f"{system}_tokens"] == 2 * row["concurrency"] * 6, (system, row)
            assert row[f"{system}_rounds_tok_s"] == [row[f"{system}_tok_s"]]  # one round: its own figures
        assert row["metrics_on_vs_off_tok_s"] == row["http_tok_s"] / row["http_nometrics_tok_s"]
        assert row["http_schema_over_http_tpot"] == row["http_schema_tpot_ms"] / row["http_tpot_ms"]
        for door in ("http", "grpc"):
            assert row[f"{door}_share"] == row[f"{door}_tok_s"] / row["inproc_tok_s"]
            assert row[f"{door}_tpot_overhead"] == row[f"{door}_tpot_ms"] / row["inproc_tpot_ms"] - 1
    top = report["results"][-1]  # where the CPU went at the top level: the server's processes and the client
    assert any(kind.startswith("ray::AttentionWorker") for kind in top["http_cpu_cores"])
    # the idle server, read over its own process tree: the gang's ranks and Ray's daemons
    idle = report["idle_cores"]["maverick serve E=1"]
    assert "raylet" in idle or "gcs_server" in idle, idle
    # the image workload, its own `maverick serve`
    images = report["images"]
    assert [r["concurrency"] for r in images["rows"]] == [1, 2]
    tokens = images["prompt_tokens"]  # 336 px on 16-px tiles: 4x4 tiles + global, 16 patches each
    assert tokens["image_tiles"] == 17 and tokens["image"] > tokens["text"] + 17 * 16
    for row in images["rows"]:
        for name in ("image", "text"):
            assert row[f"{name}_tokens"] == 2 * row["concurrency"] * 6 and row[f"{name}_ttft_ms"] > 0, (name, row)
    markdown = out.with_suffix(".md").read_text()
    assert markdown.startswith("# Serving benchmark") and "metrics on" in markdown and "## Images" in markdown
    assert "Under a JSON schema" in markdown and "Idle servers" in markdown and "Every round's tok/s" in markdown
    assert "bench serve  E=1 grpc  concurrency 2 (level 2/2)  round 1/1: " in proc.stderr
    assert "bench serve  images image  concurrency 2 (level 2/2)  round 1/1: " in proc.stderr
    # the systems in turn, each started for its round (the twin on a server of its own)
    starts = [line for line in proc.stderr.splitlines() if line.endswith("starting (round 1/1)")]
    assert [line.split("  ")[1] for line in starts] == ["gang E=1", "maverick serve E=1", "maverick serve E=1_nometrics",
                                                         "images"]
    assert "maverick: ready in" in out.with_name("maverick-serve-e1_nometrics.log").read_text()


def test_bench_aiperf_smoke(tmp_path):
    """aiperf (`.venv-aiperf`, built by `make test`) and our client on one `maverick serve` with its tokenizer."""
    ckpt = make_tiny(tmp_path / "tiny", "tiny-maverick", layout="causal")
    out = tmp_path / "aiperf.json"
    proc = subprocess.run([MAVERICK, "bench", "aiperf", "--model", str(ckpt), "--output", str(out), "--peers", "none",
                           "--concurrency", "2", "--prompt-len", "8", "--output-len", "6", "--timeout", "300",
                           "--repeat", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    row = report["result"]
    assert report["servers"] == ["maverick"] and row["concurrency"] == 2
    assert row["maverick_aiperf_requests"] == [4]  # 2 x concurrency, counted by aiperf
    for client in ("bench", "aiperf"):
        assert row[f"maverick_{client}_tok_s"] > 0 and row[f"maverick_{client}_ttft_ms"] > 0
        assert row[f"maverick_{client}_client_cpu_s"] > 0  # aiperf's: its reaped child processes
    assert row["maverick_aiperf_vs_bench_tok_s"] == row["maverick_aiperf_tok_s"] / row["maverick_bench_tok_s"]
    assert out.with_suffix(".md").read_text().startswith("# aiperf against")


def run_on_tiny(tmp_path, target: str, *flags: str) -> tuple[dict, Path]:
    """`maverick bench TARGET` on a tiny checkpoint, one round, short prompts: its JSON report and path."""
    ckpt = make_tiny(tmp_path / "tiny", "tiny-maverick", layout="causal")
    out = tmp_path / f"{target}.json"
    proc = subprocess.run([MAVERICK, "bench", target, "--model", str(ckpt), "--output", str(out), "--prompt-len", "8",
                           "--timeout", "300", "--repeat", "1", *flags], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), out


def test_bench_bodies_smoke(tmp_path):
    """Streams quiet and loaded with large bodies, on one `maverick serve` with its tokenizer: every large
    request is refused with a 400 (its prompt cannot fit) and both phases report their gaps."""
    report, out = run_on_tiny(tmp_path, "bodies", "--peers", "none", "--concurrency", "2", "--output-len", "6",
                              "--big-requests", "2", "--body-mb", "0.05")
    ours = report["systems"]["maverick"]
    for phase in ("quiet", "loaded"):
        assert ours["rounds"][0][phase]["gaps"] == 2 * 2 * 5  # 2 x concurrency streams, 6 tokens: 5 gaps each
    assert ours["rounds"][0]["loaded"]["big_statuses"] == ["400"]
    assert ours["p99_ratio"] > 0 and out.with_suffix(".md").read_text().startswith("# bench bodies")


def test_bench_chaos_smoke(tmp_path):
    """A killed expert rank under two streams: both exact and resumed, and the gang recovered in place,
    reading that rank's share again (the spare and hang cases run in tests/cluster/test_gang.py)."""
    report, out = run_on_tiny(tmp_path, "chaos", "--streams", "2", "--output-len", "24", "--faults", "sigkill-expert",
                              "--spares", "0", "--expert-workers", "2")
    (row,) = report["rows"]
    assert (row["layout"], row["fault"]) == ("1 gang", "sigkill-expert")
    assert row["exact"] == row["streams"] == 2 and row["resumed"] >= 1 and row["longest_pause_s"] > 0, row
    assert row["recovery_s"] is not None and 0 < row["bytes_read"], row  # recovered in place: a rank's share read
    assert report["summary"][0]["exact"] == "2/2"
    assert out.with_suffix(".md").read_text().startswith("# bench chaos")
