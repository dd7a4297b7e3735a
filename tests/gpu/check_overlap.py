"""GPU check of ping-pong micro-batches on one device, run by hand on a lent H100/H200 (no Ray; minutes).

An attention rank's decode steps on the 4-layer Maverick-shaped model of `bench_engine_cuda` (bf16,
random weights), its MoE layers' all-to-all stubbed on one GPU by `Loopback`: the dispatched rows
(the id as an extra column, as `AllToAllExperts` sends them) go to pinned host memory and back on a
side stream (copy engines, as a NIC or NVLink transfer would), the rank's experts run there
(`forward_padded`, no host read), and the outputs come back the same way. `combine` makes the
compute stream wait on an event, never the host. Per concurrency: median decode step
- local: the experts in line (the plain engine), the floor;
- stubbed, one micro-batch: every MoE layer waits for its round trip;
- stubbed, two micro-batches (`microbatches: 2`): one micro-batch computes while the other's rows travel,
and whether the greedy tokens of all three agree (bf16: near-ties may flip on random weights).
What needs two GPUs or more: the expert side on its own device and the real NCCL all-to-all; here the
experts share the attention rank's SMs, so the overlap can only hide the transfers and part of them.

    python tests/gpu/check_overlap.py [cuda|cpu] [OUT.json]   # cpu: a tiny smoke run, in order
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.moe import RoutedExperts  # noqa: E402
from tests.gpu.bench_engine_cuda import DEVICE, MAVERICK4, SMOKE, build, sync  # noqa: E402
from workers.config import EngineConfig  # noqa: E402
from workers.engine import LLMEngine  # noqa: E402
from workers.protocol import GenerateRequest  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402

OUT = Path(sys.argv[2]) if len(sys.argv) > 2 else None
CUDA = DEVICE == "cuda"


class Loopback(nn.Module):
    """`AllToAllExperts`' dispatch/combine pair with the collective replaced by a round trip through
    pinned host memory on a side stream, the experts computed there."""

    def __init__(self, experts: RoutedExperts):
        super().__init__()
        self.experts = experts
        self.stream = torch.cuda.Stream() if CUDA else None
        self.round_trips = 0

    def _away(self, x_ND: torch.Tensor, experts_N: torch.Tensor) -> torch.Tensor:
        sent_ND1 = torch.cat([x_ND, experts_N.to(x_ND.dtype)[:, None]], dim=1)
        arrived_ND1 = _through_host(sent_ND1)
        y_ND = self.experts.forward_padded(arrived_ND1[:, :-1], arrived_ND1[:, -1].long())
        return _through_host(y_ND)

    def dispatch(self, x_ND: torch.Tensor, experts_N: torch.Tensor):
        self.round_trips += 1
        if not CUDA:
            return self._away(x_ND, experts_N), None
        compute = torch.cuda.current_stream()
        self.stream.wait_stream(compute)  # the rows are ready once the compute stream gets here
        with torch.cuda.stream(self.stream):
            y_ND = self._away(x_ND, experts_N)
            done = torch.cuda.Event()
            done.record(self.stream)
        for t in (x_ND, experts_N):  # made on the compute stream, read on the side stream
            t.record_stream(self.stream)
        return y_ND, done

    def combine(self, pending) -> torch.Tensor:
        y_ND, done = pending
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
            y_ND.record_stream(torch.cuda.current_stream())  # made on the side stream, read here
        return y_ND


def _through_host(t: torch.Tensor) -> torch.Tensor:
    if not CUDA:
        return t.clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host.to(t.device, non_blocking=True)


def decode(model, microbatches: int, concurrency: int, prompt_len: int, output_len: int) -> dict:
    engine = LLMEngine(model, EngineConfig(max_num_seqs=concurrency, max_num_batched_tokens=8192, device=DEVICE,
                                           kv_cache_memory=(2**31 if not SMOKE else 2**26),
                                           microbatches=microbatches, microbatch_min_tokens=2))
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    rng = random.Random(concurrency)
    prompts = [[rng.randrange(10, model.config.vocab_size) for _ in range(prompt_len)] for _ in range(concurrency)]
    for warm in (True, False):
        requests = [GenerateRequest(p, params) for p in (prompts[:1] if warm else prompts)]
        for request in requests:
            engine.submit(request)
        tokens: dict = {}
        steps = []
        while engine.has_work():
            sync()
            start = time.perf_counter()
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            sync()
            steps.append(time.perf_counter() - start)
    return {"step_ms": statistics.median(steps[2:] or steps) * 1e3,
            "microbatched_steps": engine.runner.microbatched_steps,
            "tokens": [tokens[r.request_id] for r in requests]}


def main() -> None:
    model = build(MAVERICK4)
    loopbacks = {}
    report = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__, "results": []}
    prompt_len, output_len = (128, 64) if not SMOKE else (8, 6)
    for c in (1, 32, 128) if not SMOKE else (1, 4):
        row = {"concurrency": c}
        local = decode(model, 1, c, prompt_len, output_len)
        for layer, moe in model.moe_blocks():  # the attention rank's view: its experts are elsewhere
            loopbacks[layer] = moe.experts = Loopback(moe.experts)
        one = decode(model, 1, c, prompt_len, output_len)
        two = decode(model, 2, c, prompt_len, output_len)
        for layer, moe in model.moe_blocks():
            moe.experts = loopbacks[layer].experts
        row.update({"local_step_ms": local["step_ms"], "stubbed_step_ms": one["step_ms"],
                    "overlapped_step_ms": two["step_ms"], "overlap_over_stubbed": two["step_ms"] / one["step_ms"],
                    "microbatched_steps": two["microbatched_steps"],
                    "round_trips": sum(lb.round_trips for lb in loopbacks.values()),
                    "tokens_equal_stubbed": one["tokens"] == local["tokens"],
                    "tokens_equal_overlapped": two["tokens"] == local["tokens"]})
        report["results"].append(row)
        print(json.dumps(row), flush=True)
    if OUT:
        OUT.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
