"""GPU check for the EPLB issue, run by hand on a lent H100/H200 (no Ray; a minute or two).

One expert rank of a Maverick gang (128 experts over 6 expert ranks: 22 here, plus 2 spare slots;
hidden 5120, width 8192, bf16), through a rebalance that brings it 2 experts:
- the copy, three ways: (a) read by byte range from a safetensors file (`get_slice`, as the loader
  reads a rank's experts; the file was just written, so this is the page cache's speed, a cold read
  is the disk's), (b) device to device from another buffer (the floor of a peer rank's copy; across
  GPUs NVLink runs at about 450 GB/s each way), (c) `fill_slots`, the in-place copy at the switch step:
  the only part a step waits for (staging overlaps the steps before it);
- a step before and after: this rank's grouped expert FFN (`forward_padded`) on a skewed batch of
  32 and 256 rows per attention rank, when it holds the hot pair alone (85% of the rows, as the
  contiguous layout leaves it) and when the pair is copied on three ranks (a third of those rows).

    python tests/gpu/check_eplb.py [cuda|cpu] [OUT.json]   # cpu: a tiny smoke run
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.moe import FREE, RoutedExperts, fill_slots  # noqa: E402
from tests.gpu.bench_engine_cuda import DEVICE, DTYPE, SMOKE, copy_bandwidth, sync, time_call  # noqa: E402

OUT = Path(sys.argv[2]) if len(sys.argv) > 2 else None
D, F, E, HELD, SPARE = (5120, 8192, 128, 22, 2) if not SMOKE else (64, 96, 16, 5, 2)
HOT_SHARE = 0.85  # of the routed rows, to the hot pair (make-tiny --router-skew 16 measured 0.81-0.87)
MOVED = 2  # experts a rebalance brings this rank: copies of the hot pair


def experts(ids: list[int], seed: int) -> RoutedExperts:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    module = RoutedExperts(D, F, ids, E).to(DEVICE, DTYPE)
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.randn(module.gate_up_proj.shape, generator=g, device=DEVICE) * D ** -0.5)
        module.down_proj.copy_(torch.randn(module.down_proj.shape, generator=g, device=DEVICE) * F ** -0.5)
    module.reset_buffers()
    return module


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def copies(slots: RoutedExperts, incoming: RoutedExperts, folder: Path) -> dict:
    nbytes = MOVED * 3 * D * F * torch.finfo(DTYPE).bits // 8
    path = folder / "experts.safetensors"
    save_file({"gate_up_proj": incoming.gate_up_proj.detach().cpu(), "down_proj": incoming.down_proj.detach().cpu()},
              path)

    def from_file():
        with safe_open(path, "pt", device="cpu") as f:
            for key in ("gate_up_proj", "down_proj"):
                f.get_slice(key)[0:MOVED].to(DEVICE)

    spare = torch.empty_like(incoming.gate_up_proj), torch.empty_like(incoming.down_proj)

    def device_to_device():
        spare[0].copy_(incoming.gate_up_proj)
        spare[1].copy_(incoming.down_proj)

    held = [e for e in slots.expert_ids if e != FREE]
    turns = iter(range(10**6))

    def switch():  # alternately drop and take the incoming pair: each call copies two experts in
        wanted = held + incoming.expert_ids if next(turns) % 2 == 0 else held
        fill_slots(slots, wanted, incoming)

    file_s, d2d_s = best_of(from_file), best_of(device_to_device)
    switch_s = time_call(switch, repeat=10) * 2  # half the calls copy nothing
    return {"moved_experts": MOVED, "moved_bytes": nbytes, "from_file_ms": file_s * 1e3,
            "from_file_gb_s": nbytes / file_s / 1e9, "device_to_device_ms": d2d_s * 1e3,
            "device_to_device_gb_s": nbytes / d2d_s / 1e9, "switch_copy_ms": switch_s * 1e3}


def skewed_rows(rows: int, hot_copies: int, held: list[int], g: torch.Generator) -> torch.Tensor:
    """The expert ids this rank receives of a batch of `rows` routed rows: its share of the hot pair's
    (all of them alone, 1 / copies when copied) and of the cold rows, -1 padding to the buffer size."""
    hot = round(rows * HOT_SHARE / hot_copies)
    cold = round(rows * (1 - HOT_SHARE) * len(held) / E)
    ids = [0, 1] * (hot // 2) + [held[i] for i in torch.randint(2, len(held), (cold,), generator=g).tolist()]
    return torch.tensor(ids + [-1] * (rows * 6 - len(ids)), device=DEVICE)


def main() -> None:
    torch.manual_seed(0)
    held = list(range(HELD))
    slots = experts(held + [FREE] * SPARE, seed=1)
    incoming = experts([E - 2, E - 1], seed=2)
    result = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "hidden": D, "width": F,
              "experts_held": HELD, "spare_slots": SPARE, "copy_bandwidth_gb_s": copy_bandwidth() / 1e9}
    with torch.inference_mode(), tempfile.TemporaryDirectory() as folder:
        result["copy"] = copies(slots, incoming, Path(folder))
        print(json.dumps(result["copy"]))
        fill_slots(slots, held, incoming)  # back to the rank's own experts for the steps
        g = torch.Generator().manual_seed(3)
        result["steps"] = []
        for rows in (32, 256):
            x = torch.randn(rows * 6, D, device=DEVICE, dtype=DTYPE)
            alone, copied = skewed_rows(rows, 1, held, g), skewed_rows(rows, 3, held, g)
            before = time_call(lambda: slots.forward_padded(x, alone))
            after = time_call(lambda: slots.forward_padded(x, copied))
            row = {"rows": rows, "rows_here_before": int((alone >= 0).sum()), "rows_here_after": int((copied >= 0).sum()),
                   "before_ms": before * 1e3, "after_ms": after * 1e3, "before_over_after": before / after}
            result["steps"].append(row)
            print(json.dumps(row))
    if OUT:
        OUT.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
