"""`maverick plan`: what a layout needs per GPU, whether it fits, and the throughput it can reach.

Arithmetic only, from the model config and the deployment's limits; every constant is named below
with its source. Per rank:
- weights: attention ranks hold every non-routed weight (replicated), expert ranks their share of the
  routed experts (consecutive, as even as the counts allow); FP8 weights are one byte plus a 4-byte
  fp32 scale per output row, and only the modules Meta's FP8 checkpoint quantizes are FP8 (routed and
  shared experts, dense MLPs; attention, routers, embeddings and lm_head stay bf16);
- KV cache (attention ranks): `max_num_seqs` sequences of `max_model_len` tokens; full-attention
  (NoPE) layers hold every token, chunked layers at most one chunk plus one step (chunk-local freeing);
- activation workspace: one step of `max_num_batched_tokens` tokens through the widest MLP, plus the
  logits of `max_num_seqs` rows; communication buffers: dispatch + combine of a step's routed rows;
- a safety margin for the CUDA context, allocator fragmentation and NCCL.
The roofline of a decode step: each rank reads what it must from HBM (attention ranks: their weights
and the batch's KV; expert ranks: the experts the batch's tokens touch), and each MoE layer waits
for two all-to-alls (latency + bytes over NVLink inside a node, the network across nodes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model.config import CHUNKED, Llama4Config

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: float  # bytes the driver reports (nvidia-smi's total)
    hbm_bandwidth: float  # bytes/s
    nvlink_bandwidth: float  # bytes/s one way per GPU
    source: str
    bf16_flops: float = 989e12  # dense tensor-core peak, FLOP/s (H100 and H200 SXM datasheets)
    fp8_flops: float = 1979e12


GPUS = {
    "h100": Gpu("H100 SXM5 80GB", 81_559 * 2**20, 3.35e12, 450e9,
                "NVIDIA H100 datasheet: 80 GB HBM3 (nvidia-smi 81,559 MiB), 3.35 TB/s; NVLink 4 900 GB/s "
                "bidirectional = 450 GB/s each way"),
    "h200": Gpu("H200 SXM 141GB", 143_771 * 2**20, 4.8e12, 450e9,
                "NVIDIA H200 datasheet: 141 GB HBM3e (nvidia-smi 143,771 MiB), 4.8 TB/s; NVLink 4 as H100"),
}
NETWORK_BANDWIDTH = 50e9  # bytes/s per GPU across nodes: one 400 Gb/s InfiniBand NDR NIC per GPU (DGX H100)
COLLECTIVE_LATENCY_S = {"nvlink": 10e-6, "network": 25e-6}  # small-message all-to-all, NCCL tests order of size
SAFETY_MARGIN = 0.10  # of GPU memory: CUDA context (~0.5-1 GB), allocator fragmentation, NCCL buffers
FP8_SCALE_BYTES = 4  # one fp32 scale per output row
BATCH_SIZES = (1, 8, 32, 128, 256)
CHECKPOINT_READ_BANDWIDTH = 2e9  # bytes/s one rank reads its weights at: a local NVMe SSD, order of size
NEW_PROCESS_S = 4.0  # a replacement rank's process start and imports: bench chaos on CPU, recovery without
# a spare minus with one (4.0-4.6 s against 0.4-0.7 s, the same bytes read); CUDA initialisation not measured
HOT_SHARE = 0.85  # of the routed rows, to a hot pair of experts (make-tiny --router-skew 16 measured 0.81-0.87)


@dataclass(frozen=True)
class Layout:
    attention_ranks: int
    expert_ranks: int
    weights: str = "bf16"  # bf16 | fp8
    kv_bytes_per_value: int = 2  # bf16 KV cache
    max_num_seqs: int = 32
    max_model_len: int = 8192
    max_num_batched_tokens: int = 8192
    gpus_per_node: int = 8
    kv_cache_bytes: float | None = None  # a deployment's explicit `kv_cache_memory`; else seqs x length
    redundant_experts: int = 0  # eplb's spare slots per expert rank, each a whole expert of every MoE layer


@dataclass
class RankNeed:
    role: str
    weights: float
    kv_cache: float
    workspace: float
    comm: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.workspace + self.comm


def _linear(rows: int, cols: int, fp8: bool) -> float:
    return rows * cols * (1 if fp8 else 2) + (rows * FP8_SCALE_BYTES if fp8 else 0)


def routed_expert_params(c: Llama4Config) -> int:
    return len(c.moe_layers) * c.num_experts * 3 * c.hidden_size * c.intermediate_size


def non_routed_bytes(c: Llama4Config, fp8: bool) -> float:
    """Every weight but the routed experts: what each attention rank holds."""
    H, hd = c.hidden_size, c.head_dim
    total = 2 * c.vocab_size * H * 2  # embeddings and lm_head, bf16
    for layer in range(c.num_hidden_layers):
        total += 2 * H * 2  # the two norms
        total += (c.num_attention_heads * hd * H * 2 + 2 * c.num_key_value_heads * hd * H) * 2  # q, o, k, v
        if c.is_moe(layer):
            total += c.num_experts * H * 2  # router, bf16
            total += 2 * _linear(c.intermediate_size, H, fp8) + _linear(H, c.intermediate_size, fp8)
        else:
            total += 2 * _linear(c.intermediate_size_mlp, H, fp8) + _linear(H, c.intermediate_size_mlp, fp8)
    return total + H * 2  # final norm


def experts_per_rank(c: Llama4Config, expert_ranks: int) -> int:
    """The most experts one expert rank holds (128 over 6: 22)."""
    return math.ceil(c.num_experts / expert_ranks)


def kv_bytes_per_sequence(c: Llama4Config, layout: Layout) -> float:
    per_token_layer = 2 * c.num_key_value_heads * c.head_dim * layout.kv_bytes_per_value
    chunk_hold = min(layout.max_model_len, (c.attention_chunk_size or layout.max_model_len) + 1)
    return sum(per_token_layer * (chunk_hold if t == CHUNKED else layout.max_model_len) for t in c.layer_types)


def needs(c: Llama4Config, layout: Layout) -> tuple[RankNeed, RankNeed | None]:
    fp8 = layout.weights == "fp8"
    T, H = layout.max_num_batched_tokens, c.hidden_size
    rows = T * c.num_experts_per_tok  # routed rows a step sends
    comm_attention = 2 * rows * (H + 1) * 2 if layout.expert_ranks else 0  # dispatch + combine, bf16
    widest = max(c.intermediate_size_mlp, c.intermediate_size)
    workspace = T * (3 * widest + 6 * H) * 2 + layout.max_num_seqs * c.vocab_size * 4
    kv = layout.kv_cache_bytes or layout.max_num_seqs * kv_bytes_per_sequence(c, layout)
    attention = RankNeed("attention", non_routed_bytes(c, fp8), kv, workspace, comm_attention)
    if not layout.expert_ranks:
        attention.weights += routed_expert_params(c) * (1 if fp8 else 2)
        return attention, None
    per_expert = 2 * _linear(c.intermediate_size, H, fp8) + _linear(H, c.intermediate_size, fp8)
    slots = experts_per_rank(c, layout.expert_ranks) + layout.redundant_experts
    expert_weights = slots * len(c.moe_layers) * per_expert
    received = layout.attention_ranks * rows  # at worst every routed row of every attention rank
    expert = RankNeed("expert", expert_weights, 0.0, received * 2 * c.intermediate_size * 2,
                      2 * received * (H + 1) * 2)
    return attention, expert


def fits(c: Llama4Config, layout: Layout, gpu: Gpu) -> tuple[bool, list[str]]:
    usable = gpu.memory * (1 - SAFETY_MARGIN)
    reasons = []
    for need in needs(c, layout):
        if need is not None and need.total > usable:
            reasons.append(f"an {need.role} rank needs {need.total / GB:.1f} GB ({need.weights / GB:.1f} GB weights, "
                           f"{need.kv_cache / GB:.1f} GB KV cache, {(need.workspace + need.comm) / GB:.1f} GB "
                           f"workspace and buffers) but a {gpu.name} offers {usable / GB:.1f} GB after a "
                           f"{SAFETY_MARGIN:.0%} margin")
    return not reasons, reasons


def roofline(c: Llama4Config, layout: Layout, gpu: Gpu, batch: int, context: int) -> dict:
    """Decode step time and tokens/s with `batch` sequences per attention rank at `context` tokens."""
    fp8 = layout.weights == "fp8"
    attention_read = non_routed_bytes(c, fp8) - c.vocab_size * c.hidden_size * 2  # embedding rows: ~0
    attention_read += batch * kv_bytes_per_sequence(c, Layout(**{**layout.__dict__, "max_model_len": context}))
    per_expert = 3 * c.hidden_size * c.intermediate_size * (1 if fp8 else 2)
    tokens = batch * max(1, layout.attention_ranks) * c.num_experts_per_tok
    touched = c.num_experts * (1 - (1 - 1 / c.num_experts) ** tokens)  # expected distinct experts hit
    if not layout.expert_ranks:
        compute_s = (attention_read + touched * per_expert * len(c.moe_layers)) / gpu.hbm_bandwidth
        comm_s = 0.0
    else:
        share = touched * experts_per_rank(c, layout.expert_ranks) / c.num_experts  # uniform routing
        expert_read = share * per_expert * len(c.moe_layers)
        compute_s = max(attention_read, expert_read) / gpu.hbm_bandwidth
        ranks = layout.attention_ranks + layout.expert_ranks
        link = "nvlink" if ranks <= layout.gpus_per_node else "network"
        bandwidth = gpu.nvlink_bandwidth if link == "nvlink" else NETWORK_BANDWIDTH
        bytes_per_collective = batch * c.num_experts_per_tok * (c.hidden_size + 1) * 2
        comm_s = len(c.moe_layers) * 2 * (COLLECTIVE_LATENCY_S[link] + bytes_per_collective / bandwidth)
    step = compute_s + comm_s
    return {"batch_per_attention_rank": batch, "step_ms": step * 1e3, "compute_ms": compute_s * 1e3,
            "alltoall_ms": comm_s * 1e3, "tok_s": batch * max(1, layout.attention_ranks) / step}


def skewed_expert_ms(c: Llama4Config, layout: Layout, gpu: Gpu, rows: int, placement: str,
                     hot_share: float = HOT_SHARE) -> float:
    """The busiest expert rank's time for one MoE layer of a step routing `rows` rows, two hot experts
    taking `hot_share` of them: its rows' FLOPs at the dense peak or the bytes of the experts it
    touches at HBM bandwidth, whichever is longer. `placement` of the hot pair:
    - "contiguous": both on one rank (without eplb, the contiguous layout's worst case);
    - "copies": a copy of both on every rank, rows split evenly (eplb balancing rows). A copy reads
      its whole expert: this divides FLOPs, never the weights a rank reads;
    - "apart": one each on two ranks, no copies;
    - "reads": eplb with `weight_read_rows`, which picks the cheaper of copies and apart."""
    if placement == "reads":
        return min(skewed_expert_ms(c, layout, gpu, rows, p, hot_share) for p in ("copies", "apart"))
    read_s, row_s = _expert_read_and_row_s(c, layout, gpu)
    ranks = layout.expert_ranks
    cold_rows = math.ceil(rows * (1 - hot_share) / ranks)  # on every rank, spread over its own experts
    cold_touched = min(experts_per_rank(c, ranks), cold_rows)
    sharers, held = {"contiguous": (1, 2), "copies": (ranks, 2), "apart": (min(2, ranks), 1)}[placement]
    hot_rows = math.ceil(rows * hot_share / sharers)  # whole rows: a step waits for its busiest rank
    rank_rows, touched = hot_rows + cold_rows, min(held, hot_rows) + cold_touched
    return max(rank_rows * row_s, touched * read_s) * 1e3


def _eplb_lines(c: Llama4Config, layout: Layout, gpu: Gpu) -> list[str]:
    steps = [(f"decode, batch {b}/attention rank", b * layout.attention_ranks * c.num_experts_per_tok)
             for b in BATCH_SIZES if b <= layout.max_num_seqs]
    steps.append((f"prefill, {layout.max_num_batched_tokens} tokens/attention rank",
                  layout.max_num_batched_tokens * layout.attention_ranks * c.num_experts_per_tok))
    lines = ["", f"eplb on a skewed load (a hot pair of experts takes {HOT_SHARE:.0%} of the routed rows): the busiest "
                 "expert rank per MoE layer, FLOPs at peak or weights at HBM bandwidth; eplb balancing rows (copies of "
                 "the pair on every rank) and counting weight reads (eplb.weight_read_rows below: copies only where "
                 "they pay)",
             f"{'step':>40}{'without ms':>12}{'rows ms':>9}{'gain':>7}{'reads ms':>10}{'gain':>7}"]
    for name, rows in steps:
        without = skewed_expert_ms(c, layout, gpu, rows, "contiguous")
        by_rows = skewed_expert_ms(c, layout, gpu, rows, "copies")
        by_reads = skewed_expert_ms(c, layout, gpu, rows, "reads")
        lines.append(f"{name:>40}{without:>12.3f}{by_rows:>9.3f}{without / by_rows:>6.2f}x"
                     f"{by_reads:>10.3f}{without / by_reads:>6.2f}x")
    lines.append(f"eplb.weight_read_rows for this GPU: {weight_read_rows(c, layout, gpu):.0f} (one expert's weights at "
                 "HBM bandwidth, in rows of its FLOPs at peak): with it the policy copies a hot expert only where "
                 "that pays")
    return lines


def weight_read_rows(c: Llama4Config, layout: Layout, gpu: Gpu) -> float:
    """How many rows an expert computes in the time it takes to read its weights once (roofline)."""
    read_s, row_s = _expert_read_and_row_s(c, layout, gpu)
    return read_s / row_s


def _expert_read_and_row_s(c: Llama4Config, layout: Layout, gpu: Gpu) -> tuple[float, float]:
    """One routed expert's weights at HBM bandwidth, and one row's FLOPs through it at the dense peak."""
    fp8 = layout.weights == "fp8"
    read_s = 3 * c.hidden_size * c.intermediate_size * (1 if fp8 else 2) / gpu.hbm_bandwidth
    row_s = 2 * 3 * c.hidden_size * c.intermediate_size / (gpu.fp8_flops if fp8 else gpu.bf16_flops)
    return read_s, row_s


def suggest(c: Llama4Config, gpus: int, gpu: Gpu, base: Layout, batch: int = 32) -> Layout | None:
    """The fitting split of `gpus` into attention and expert ranks with the most tokens/s at `batch`."""
    best, best_rate = None, 0.0
    for a in range(1, gpus + 1):
        e = gpus - a
        if e > c.num_experts:
            continue
        layout = Layout(**{**base.__dict__, "attention_ranks": a, "expert_ranks": e})
        if fits(c, layout, gpu)[0]:
            rate = roofline(c, layout, gpu, batch, base.max_model_len // 2)["tok_s"]
            if rate > best_rate:
                best, best_rate = layout, rate
    return best


# -- the command ----------------------------------------------------------------------------------------

def _replacement_lines(attention: RankNeed, expert: RankNeed | None) -> list[str]:
    """What a failed rank's replacement costs: its weights read again, and a new process unless a warm
    spare takes its place (`spares`, `attention_spares`); the gang replica's death costs nothing."""
    reads = ", ".join(f"{need.role} {need.weights / GB:.1f} GB ~{need.weights / CHECKPOINT_READ_BANDWIDTH:.0f} s"
                      for need in (attention, expert) if need is not None)
    return [f"replacing a failed rank: its weights again ({reads} at {CHECKPOINT_READ_BANDWIDTH / GB:.0f} GB/s), "
            f"plus ~{NEW_PROCESS_S:.0f} s for a new process",
            "  (measured on CPU; CUDA start-up not yet) unless a warm spare takes its place (gloo gangs only, "
            "not yet NCCL)"]


def describe(c: Llama4Config, layout: Layout, gpu: Gpu, num_gangs: int = 1, context: int | None = None) -> tuple[bool, str]:
    ok, reasons = fits(c, layout, gpu)
    attention, expert = needs(c, layout)
    usable = gpu.memory * (1 - SAFETY_MARGIN)
    gpus = (layout.attention_ranks + layout.expert_ranks) * num_gangs
    lines = [f"maverick plan: {c.num_hidden_layers} layers, {c.num_experts} experts x {len(c.moe_layers)} MoE "
             f"layers ({routed_expert_params(c) / 1e9:.1f}B routed parameters), {layout.weights} weights; "
             f"{num_gangs} gang(s) of {layout.attention_ranks} attention + {layout.expert_ranks} expert ranks = "
             f"{gpus} x {gpu.name}", "",
             f"{'rank':<16}{'weights':>10}{'KV cache':>10}{'workspace':>11}{'buffers':>9}{'total':>10}{'of GPU':>8}"]
    for need, count in ((attention, layout.attention_ranks), (expert, layout.expert_ranks)):
        if need is None:
            continue
        lines.append(f"{need.role + f' (x{count})':<16}{need.weights / GB:>8.1f}GB{need.kv_cache / GB:>8.1f}GB"
                     f"{need.workspace / GB:>9.1f}GB{need.comm / GB:>7.1f}GB{need.total / GB:>8.1f}GB"
                     f"{need.total / gpu.memory:>8.0%}")
    if layout.expert_ranks:
        lines.append(f"experts per rank: {experts_per_rank(c, layout.expert_ranks)} at most "
                     f"({c.num_experts} over {layout.expert_ranks}, consecutive, as even as the counts allow)"
                     + (f", plus {layout.redundant_experts} spare slot(s) for eplb's copies of hot experts"
                        if layout.redundant_experts else ""))
    lines += ["", f"fits: {'yes' if ok else 'NO'} ({usable / GB:.1f} GB usable per GPU after a {SAFETY_MARGIN:.0%} "
                  f"margin)"] + [f"  {r}" for r in reasons]
    per_gang = layout.attention_ranks + layout.expert_ranks
    nodes = -(-per_gang // layout.gpus_per_node)
    lines.append(f"nodes: one gang needs {nodes} node(s) of {layout.gpus_per_node} GPUs; {num_gangs} gang(s) need "
                 f"{-(-per_gang * num_gangs // layout.gpus_per_node)} (the worker type Ray's autoscaler adds for a "
                 f"new gang's placement group)")
    lines += _replacement_lines(attention, expert)
    context = context or layout.max_model_len // 2
    lines += ["", f"decode roofline at {context} tokens of context (HBM reads, then two all-to-alls per MoE layer):",
              f"{'batch/attention rank':>22}{'step ms':>10}{'HBM ms':>9}{'all-to-all ms':>15}{'tok/s per gang':>16}"]
    for b in BATCH_SIZES:
        if b > layout.max_num_seqs:
            break
        r = roofline(c, layout, gpu, b, context)
        lines.append(f"{b:>22}{r['step_ms']:>10.2f}{r['compute_ms']:>9.2f}{r['alltoall_ms']:>15.2f}{r['tok_s']:>16.0f}")
    if layout.expert_ranks and layout.redundant_experts:
        lines += _eplb_lines(c, layout, gpu)
    lines += ["", f"constants: {gpu.source}; network {NETWORK_BANDWIDTH / 1e9:.0f} GB/s per GPU (400 Gb/s NDR "
                  f"InfiniBand per GPU); all-to-all latency {COLLECTIVE_LATENCY_S['nvlink'] * 1e6:.0f} us in a node, "
                  f"{COLLECTIVE_LATENCY_S['network'] * 1e6:.0f} us across nodes; FP8 scales fp32 per output row."]
    return ok, "\n".join(lines)
