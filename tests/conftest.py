"""Shared test settings: two cores, so every test process uses at most two torch threads; and no
network: transformers and huggingface_hub must never try to download anything; and the KV cache's
invariants checked in every engine."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# every engine in the suite (Ray actors and `maverick serve` children inherit it) checks its KV
# cache's bookkeeping after each step
os.environ.setdefault("MAVERICK_CHECK_INVARIANTS", "1")

import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_sessionfinish(session, exitstatus):
    """Free the last failure's traceback while gRPC is still loaded: pytest keeps it in `sys.last_*`
    until exit, and a gRPC call object freed during interpreter teardown can crash the process."""
    import gc
    import sys

    for name in ("last_exc", "last_type", "last_value", "last_traceback"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    gc.collect()
