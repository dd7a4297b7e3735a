"""What a process pays at start: every Ray actor and CLI imports these modules before doing anything,
so a heavy import there is seconds added to every gang build and every command (NOTES.md)."""

import subprocess
import sys


def loaded_after(module: str, *heavy: str) -> list[str]:
    """Which of `heavy` a fresh interpreter has loaded after importing `module`."""
    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()


def test_configs_and_the_front_door_import_without_torch():
    # the `maverick` CLI reads configs before it knows whether it will run a model
    for module in ("cluster.config", "cluster.local_ray", "cluster.plan", "router.app"):
        assert loaded_after(module, "torch") == [], module


def test_workers_do_not_pull_in_the_torch_compiler():
    # llguidance.torch decorates a kernel with torch.compile at import: ~2 s in every worker process
    for module in ("workers.attention_worker", "workers.expert_worker", "router.gang_deployment"):
        assert loaded_after(module, "torch._dynamo", "torch._inductor") == [], module
