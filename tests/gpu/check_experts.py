"""GPU check for the expert-parallel issue, run by hand on a lent H100/H200 (no Ray; a few minutes).

One expert rank of a Maverick gang (128 experts over 6 expert ranks: 22 here; hidden 5120, width
8192, bf16) serving the padded buffer a dispatch delivers (blocks of capacity rows, id -1 padding):
- `forward` (today's CPU path: drop padding with `nonzero`, one GEMM pair per expert with rows, host
  reads of the counts) against `forward_padded` (grouped GEMMs over device-side offsets);
- `forward_padded` under `torch.cuda.set_sync_debug_mode("error")`: proves no host synchronisation;
- ms per call at 1 / 32 / 256 real rows in a buffer of 6 x that many, and the fraction of the HBM
  roofline (bytes of the experts the rows touch / measured copy bandwidth).
Needs two GPUs or more, not measured here: the all-to-all itself and overlap with attention (NCCL
refuses two ranks on one GPU).

    python tests/gpu/check_experts.py [cuda|cpu] [OUT.json]   # cpu: a tiny smoke run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.moe import RoutedExperts  # noqa: E402
from tests.gpu.bench_engine_cuda import DEVICE, DTYPE, SMOKE, copy_bandwidth, time_call  # noqa: E402

OUT = Path(sys.argv[2]) if len(sys.argv) > 2 else None
D, F, E, HELD = (5120, 8192, 128, 22) if not SMOKE else (64, 96, 16, 5)
EXPERT_RANKS = 6


def padded_buffer(real: int, held: list[int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """What one expert rank receives: `real` rows for its experts spread over the blocks, the rest -1."""
    rows = real * EXPERT_RANKS
    ids = torch.full((rows,), -1, dtype=torch.long)
    where = torch.randperm(rows, generator=g)[:real]
    ids[where] = torch.tensor(held)[torch.randint(0, len(held), (real,), generator=g)]
    x = torch.randn(rows, D, generator=g) * 0.5
    return x.to(DEVICE, DTYPE), ids.to(DEVICE)


def main() -> None:
    torch.manual_seed(0)
    held = list(range(HELD))
    experts = RoutedExperts(D, F, held, E).to(DEVICE, DTYPE)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=D ** -0.5)
        experts.down_proj.normal_(std=F ** -0.5)
    experts.reset_buffers()
    bandwidth = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "hidden": D, "width": F,
              "experts_held": HELD, "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": []}
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for real in (1, 32, 256):
            x, ids = padded_buffer(real, held, g)
            mine = ids >= 0
            got = experts.forward_padded(x, ids)
            want = experts(x[mine], ids[mine])
            error = float((got[mine].float() - want.float()).abs().max())
            if DEVICE == "cuda":
                torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
                try:
                    experts.forward_padded(x, ids)
                    sync_free = True
                except RuntimeError as exc:
                    sync_free, error_text = False, str(exc)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            else:
                sync_free = None  # only CUDA can tell
            touched = len(set(ids[mine].tolist()))
            touched_bytes = touched * 3 * D * F * experts.gate_up_proj.element_size()

            def loop():
                keep = torch.nonzero(ids >= 0).squeeze(1)
                experts(x.index_select(0, keep), ids.index_select(0, keep))

            loop_s, padded_s = time_call(loop), time_call(lambda: experts.forward_padded(x, ids))
            row = {"real_rows": real, "buffer_rows": len(ids), "experts_touched": touched, "max_abs_error": error,
                   "sync_free": sync_free, "loop_ms": loop_s * 1e3, "padded_ms": padded_s * 1e3,
                   "padded_roofline": touched_bytes / bandwidth / padded_s,
                   "loop_roofline": touched_bytes / bandwidth / loop_s}
            if sync_free is False:
                row["sync_error"] = error_text
            result["rows"].append(row)
            print(json.dumps(row))
    if OUT:
        OUT.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
