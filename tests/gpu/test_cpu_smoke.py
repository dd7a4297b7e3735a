"""The GPU check scripts are run by hand when a GPU is lent, rarely: their CPU smoke runs (same code,
tiny shapes) keep them from rotting in between."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent
ROOT = SCRIPTS.parents[1]


def smoke(script: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), "cpu", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("script", ["bench_engine_cuda.py", "check_experts.py", "check_fp8.py", "check_model.py"])
def test_gpu_script_runs_on_cpu(script, tmp_path):
    assert smoke(script, tmp_path / "out.json")


def test_overlap_check_splits_steps_and_keeps_tokens(tmp_path):
    report = smoke("check_overlap.py", tmp_path / "out.json")
    one, four = report["results"]
    assert one["microbatched_steps"] == 0 and four["microbatched_steps"] > 0  # one request never splits
    for row in report["results"]:  # fp32 on the CPU: the stub's round trip changes nothing
        assert row["round_trips"] > 0 and row["tokens_equal_stubbed"] and row["tokens_equal_overlapped"]


def test_eplb_check_measures_the_copies_and_splits_the_hot_rows(tmp_path):
    report = smoke("check_eplb.py", tmp_path / "out.json")
    copy = report["copy"]
    assert copy["moved_bytes"] > 0 and min(copy["from_file_ms"], copy["device_to_device_ms"], copy["switch_copy_ms"]) > 0
    for row in report["steps"]:  # copied on three ranks, the hot pair's rows here shrink to about a third
        assert row["rows_here_after"] < row["rows_here_before"] / 2 and row["after_ms"] > 0
