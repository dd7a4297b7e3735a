"""What a process pays at start: every Ray actor and CLI imports these modules before doing anything,
so a heavy import there is seconds added to every gang build and every command (NOTES.md, "Import
costs")."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def loaded_after(module: str, *heavy: str) -> list[str]:
    """Which of `heavy` a fresh interpreter has loaded after importing `module`."""
    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_configs_and_the_front_door_import_without_torch():
    # `maverick serve` reads its config, starts Ray and Serve and follows start-up: no model in it
    for module in ("router.cli", "cluster.config", "cluster.serve_config", "cluster.local_ray", "cluster.startup",
                   "cluster.terminal", "cluster.probe", "cluster.plan", "router.app"):
        assert loaded_after(module, "torch") == [], module


def test_workers_do_not_pull_in_the_torch_compiler():
    # llguidance.torch decorates a kernel with torch.compile at import: ~2 s in every worker process
    for module in ("workers.attention_worker", "workers.expert_worker", "router.gang_deployment"):
        assert loaded_after(module, "torch._dynamo", "torch._inductor") == [], module
