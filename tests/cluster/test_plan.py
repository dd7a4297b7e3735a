"""`maverick plan` against hand arithmetic, and every GPU layout in deploy/gpu/ fits by its own plan."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.plan import (GPUS, Layout, experts_per_rank, fits, needs, non_routed_bytes, routed_expert_params,
                          skewed_expert_ms, suggest, weight_read_rows)
from model.config import preset

ROOT = Path(__file__).resolve().parents[2]
MAVERICK = str(Path(sys.executable).with_name("maverick"))
GPU_LAYOUTS = sorted((ROOT / "deploy" / "gpu").glob("*.yaml"))


def test_maverick_parameter_arithmetic():
    c = preset("maverick")
    # 24 MoE layers x 128 experts x 3 matrices x 5120 x 8192
    assert routed_expert_params(c) == 24 * 128 * 3 * 5120 * 8192 == 386_547_056_640
    assert non_routed_bytes(c, fp8=False) / 2 == pytest.approx(14.16e9, rel=0.01)  # "the rest is ~14B"
    fp8 = needs(c, Layout(1, 8, "fp8"))[1].weights
    assert fp8 == 16 * 24 * (3 * 5120 * 8192 + (2 * 8192 + 5120) * 4)  # 16 experts x 24 layers, bytes + scales


def test_eplb_spare_slots_are_whole_experts_of_every_moe_layer(tmp_path):
    c = preset("maverick")
    plain, spare = needs(c, Layout(2, 6, "fp8"))[1], needs(c, Layout(2, 6, "fp8", redundant_experts=4))[1]
    assert spare.weights - plain.weights == 4 * 24 * (3 * 5120 * 8192 + (2 * 8192 + 5120) * 4)
    yaml = tmp_path / "eplb.yaml"
    yaml.write_text("applications:\n- name: m\n  import_path: router.app:build\n  args:\n    model: /nowhere\n"
                    "    attention_workers: 2\n    expert_workers: 6\n    eplb: {redundant_experts: 4}\n")
    out = subprocess.run([MAVERICK, "plan", str(yaml), "--preset", "maverick", "--weights", "fp8", "--gpu", "h200"],
                         capture_output=True, text=True)
    assert "plus 4 spare slot(s)" in out.stdout and "eplb on a skewed load" in out.stdout, out.stdout + out.stderr


def test_eplb_divides_a_hot_ranks_flops_never_its_weight_reads():
    c, h200 = preset("maverick"), GPUS["h200"]
    layout = Layout(2, 6, "fp8", redundant_experts=4)
    # decode at 256 per attention rank: 435 hot rows are still below the FP8 roofline's ridge, so the
    # busiest rank is bound by the weights it reads, which a copy reads whole: no gain
    decode = [skewed_expert_ms(c, layout, h200, 512, p) for p in ("contiguous", "copies")]
    assert decode[0] == pytest.approx(decode[1])
    # a prefill step of 8192 tokens per attention rank is compute-bound on the hot rank: eplb splits it
    prefill = [skewed_expert_ms(c, layout, h200, 16384, p) for p in ("contiguous", "copies")]
    assert prefill[0] / prefill[1] > 2


def test_counting_weight_reads_splits_the_pair_in_decode_and_copies_it_in_prefill():
    c, h200 = preset("maverick"), GPUS["h200"]
    layout = Layout(2, 6, "fp8", redundant_experts=4)
    # decode: the hot rank reads one hot expert instead of two
    decode = {p: skewed_expert_ms(c, layout, h200, 64, p) for p in ("contiguous", "copies", "apart", "reads")}
    assert decode["reads"] == decode["apart"] < decode["copies"] == pytest.approx(decode["contiguous"])
    # prefill: copies pay, and the policy keeps them
    prefill = {p: skewed_expert_ms(c, layout, h200, 16384, p) for p in ("copies", "apart", "reads")}
    assert prefill["reads"] == prefill["copies"] < prefill["apart"]


def test_weight_read_rows_is_the_rooflines_ridge_in_rows():
    c, h200 = preset("maverick"), GPUS["h200"]
    # a row costs 2 FLOPs per weight; an FP8 weight is 1 byte: rows = peak / (2 x bandwidth)
    fp8 = weight_read_rows(c, Layout(2, 6, "fp8"), h200)
    assert fp8 == pytest.approx(h200.fp8_flops / (2 * h200.hbm_bandwidth))
    assert weight_read_rows(c, Layout(2, 6, "bf16"), h200) == pytest.approx(h200.bf16_flops / h200.hbm_bandwidth)
    out = subprocess.run([MAVERICK, "plan", "--preset", "maverick", "--weights", "fp8", "--gpu", "h200", "--gpus", "8",
                          "--attention-workers", "2", "--expert-workers", "6", "--redundant-experts", "2"],
                         capture_output=True, text=True, timeout=120)
    assert f"eplb.weight_read_rows for this GPU: {fp8:.0f}" in out.stdout, out.stdout + out.stderr


def test_bf16_experts_over_8_ranks_do_not_fit_an_h100():
    c = preset("maverick")
    _, expert = needs(c, Layout(1, 8, "bf16"))
    assert expert.weights == pytest.approx(96.6e9, rel=0.01)  # 772 GB / 8
    ok, reasons = fits(c, Layout(1, 8, "bf16"), GPUS["h100"])
    assert not ok and any(r.startswith("an expert rank needs 97.") and "H100" in r for r in reasons)


def test_fp8_on_one_h100_node_fits_only_with_an_uneven_split():
    c = preset("maverick")
    h100 = GPUS["h100"]
    fitting = {e for e in range(1, 8) if fits(c, Layout(8 - e, e, "fp8", max_num_seqs=8), h100)[0]}
    assert fitting and all(128 % e for e in fitting)  # 4 ranks (even) would need 97 GB each
    assert experts_per_rank(c, 6) == 22 and experts_per_rank(c, 7) == 19
    best = suggest(c, 8, h100, Layout(1, 7, "fp8"))
    assert best is not None and best.expert_ranks in fitting


def test_fp8_fits_one_h200_node_and_suggest_uses_every_gpu():
    c = preset("maverick")
    best = suggest(c, 8, GPUS["h200"], Layout(1, 7, "fp8"))
    assert best.attention_ranks + best.expert_ranks == 8 and fits(c, best, GPUS["h200"])[0]


def test_kv_cache_counts_chunked_layers_at_one_chunk():
    c = preset("maverick", attention_chunk_size=1024)
    long = needs(c, Layout(1, 7, "fp8", max_num_seqs=1, max_model_len=65536))[0].kv_cache
    per_token_layer = 2 * 8 * 128 * 2
    full_layers, chunked_layers = c.layer_types.count("full_attention"), c.layer_types.count("chunked_attention")
    assert long == per_token_layer * (full_layers * 65536 + chunked_layers * 1025)


@pytest.mark.parametrize("path", GPU_LAYOUTS, ids=lambda p: p.stem)
def test_every_gpu_layout_fits_by_its_plan(path):
    command = re.search(r"`(maverick plan [^`]+)`", path.read_text()).group(1).split()[1:]
    out = subprocess.run([MAVERICK, *command, "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["fits"] and "fits: yes" in report["report"]


def test_plan_exits_nonzero_when_it_does_not_fit():
    out = subprocess.run([MAVERICK, "plan", "--preset", "maverick", "--gpu", "h100", "--attention-workers", "1",
                          "--expert-workers", "8"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "fits: NO" in out.stdout and "an expert rank needs" in out.stdout


def test_gpu_layouts_cover_the_issue():
    assert {p.stem for p in GPU_LAYOUTS} == {"scout-bf16-8xh100", "maverick-fp8-8xh200", "maverick-fp8-8xh100",
                                             "maverick-bf16-2x8xh100"}


def test_plan_says_how_many_nodes_a_gang_and_the_most_gangs_need():
    from cluster.plan import describe

    c = preset("maverick")
    _, text = describe(c, Layout(2, 14, "fp8", gpus_per_node=8), GPUS["h100"], num_gangs=3)
    assert "nodes: one gang needs 2 node(s) of 8 GPUs; 3 gang(s) need 6" in text
    _, text = describe(c, Layout(1, 7, "fp8", gpus_per_node=8), GPUS["h200"])
    assert "nodes: one gang needs 1 node(s) of 8 GPUs; 1 gang(s) need 1" in text


def test_a_replacement_costs_its_ranks_weights_at_the_read_bandwidth_plus_a_process_without_a_spare():
    from cluster.plan import CHECKPOINT_READ_BANDWIDTH, NEW_PROCESS_S, describe

    layout = Layout(attention_ranks=2, expert_ranks=16, weights="fp8", max_num_seqs=32, max_model_len=8192)
    attention, expert = needs(preset("maverick"), layout)
    _, text = describe(preset("maverick"), layout, GPUS["h100"])
    line = next(line for line in text.splitlines() if line.startswith("replacing a failed rank"))
    for need in (attention, expert):
        seconds = need.weights / CHECKPOINT_READ_BANDWIDTH
        assert f"{need.role} {need.weights / 1e9:.1f} GB ~{seconds:.0f} s" in line, line
    assert 10 < expert.weights / CHECKPOINT_READ_BANDWIDTH < 15  # 24.2 GB of FP8 experts at 2 GB/s
    assert f"~{NEW_PROCESS_S:.0f} s for a new process" in line and "warm spare" in text
