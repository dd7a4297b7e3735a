"""The CPU decode kernels against the torch formulas they replace, across the shapes they meet."""

import pytest
import torch

from model import cpu_kernels
from model.kernel_modules import KernelLinear, KernelRoutedExperts, apply_cpu_kernels
from model.optimize import optimize_for_inference


def test_kernels_build_on_this_machine():
    # CI runs on an AVX2 machine with a compiler: a silent fallback would only show as a slow bench
    assert cpu_kernels.available()


def test_a_checkout_elsewhere_loads_the_kept_library_without_building(tmp_path):
    """torch's loader rebuilds when the source's path changes (a second checkout, a `ray up` host's
    copy): the library kept under its content key is loaded instead, and torch's build is untouched."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from torch.utils.cpp_extension import _get_build_directory

    assert cpu_kernels.available()
    build_file = Path(_get_build_directory(cpu_kernels.NAME, False)) / "build.ninja"
    before = build_file.stat().st_mtime_ns
    elsewhere = tmp_path / "model"
    elsewhere.mkdir()
    for name in ("cpu_kernels.py", "cpu_kernels.cpp"):
        shutil.copy(Path(cpu_kernels.__file__).with_name(name), elsewhere / name)
    check = ("import torch, cpu_kernels; assert cpu_kernels.available(); "
             "x = torch.randn(2, 16); w = torch.randn(8, 16); "
             "torch.testing.assert_close(torch.ops.maverick.skinny_linear(x, w), x @ w.T)")
    done = subprocess.run([sys.executable, "-c", check], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert build_file.stat().st_mtime_ns == before, "torch built the kernels again for the copy"


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 32, 33, 64])
@pytest.mark.parametrize("O,I", [(1, 8), (5, 520), (16, 64), (769, 2048)])
def test_skinny_linear_matches_matmul(M, O, I):
    g = torch.Generator().manual_seed(M * 1000 + O)
    wide = torch.randn(M, I + 8, generator=g)
    x = wide[:, 4:4 + I]  # rows with a stride wider than I
    w = torch.randn(O, I, generator=g)
    expected = (x.double() @ w.double().T).float()
    got = torch.ops.maverick.skinny_linear(x, w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cpu_kernels.linear(x, w), expected, rtol=1e-5, atol=1e-4)


def test_a_split_kernel_covers_every_chunk_once_while_a_thread_is_held_up():
    """The threads take chunks from a shared counter: every output is written exactly once, as with
    one thread, even while the other core is taken by a busy process (a preempted helper)."""
    import subprocess
    import sys

    assert cpu_kernels.available() and torch.get_num_threads() == 2
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(3, 2048, generator=g), torch.randn(4099, 2048, generator=g)  # ~680 chunks, odd tail
    q, cache = torch.randn(40, 8, 64, generator=g), torch.randn(2, 300, 64, generator=g)
    slots, lengths = torch.randint(0, 300, (40, 200), generator=g), torch.randint(1, 201, (40,), generator=g)
    h = torch.randn(64, 2 * 4096, generator=g)

    def run():
        return (torch.ops.maverick.skinny_linear(x, w), cpu_kernels.decode_attention(q, cache, cache, slots, lengths, 0.125),
                torch.ops.maverick.silu_mul(h))

    torch.set_num_threads(1)
    try:
        alone = run()
    finally:
        torch.set_num_threads(2)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for _ in range(20):
            for got, want in zip(run(), alone):
                assert torch.equal(got, want)
    finally:
        hog.kill()
        hog.wait()


def test_linear_and_matmul_route_by_shape():
    w = torch.randn(96, 64)
    for rows in (1, cpu_kernels.MAX_ROWS, cpu_kernels.MAX_ROWS + 1):  # the last one takes F.linear
        x = torch.randn(2, rows, 64)
        torch.testing.assert_close(cpu_kernels.linear(x, w), x @ w.T, rtol=1e-5, atol=1e-4)
    w_IO = w.T  # an [O, I] matrix seen as [I, O]: the kernel applies
    x = torch.randn(3, 64)
    torch.testing.assert_close(cpu_kernels.matmul(x, w_IO), x @ w_IO, rtol=1e-5, atol=1e-4)
    plain_IO = torch.randn(64, 96)  # row-major [I, O]: the library path
    torch.testing.assert_close(cpu_kernels.matmul(x, plain_IO), x @ plain_IO, rtol=1e-5, atol=1e-4)
    bf16 = x.bfloat16()
    assert cpu_kernels.linear(bf16, w.bfloat16()).dtype == torch.bfloat16  # not the fp32 kernel


def test_skinny_linear_rejects_bad_layouts():
    with pytest.raises(RuntimeError, match="layout"):
        torch.ops.maverick.skinny_linear(torch.randn(1, 12), torch.randn(4, 12))
    with pytest.raises(RuntimeError, match="shapes"):
        torch.ops.maverick.skinny_linear(torch.randn(1, 16), torch.randn(4, 8))


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("shape", [(1, 512), (37, 64), (3, 5, 16), (0, 8)])
def test_rms_norm_matches_formula(shape, with_weight):
    x = torch.randn(shape) * 3
    weight = torch.rand(shape[-1]) + 0.5 if with_weight else None
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    if weight is not None:
        expected = expected * weight
    torch.testing.assert_close(cpu_kernels.rms_norm(x, weight, 1e-5), expected, rtol=1e-5, atol=1e-6)


def reference_attention(q_BHK, k_GSK, v_GSK, slots, lengths, scale):
    B, H, K = q_BHK.shape
    G = k_GSK.shape[0]
    out = torch.empty(B, H, K, dtype=torch.float64)
    for b in range(B):
        idx = slots[b, :lengths[b]]
        for h in range(H):
            g = h // (H // G)
            k, v = k_GSK[g, idx].double(), v_GSK[g, idx].double()
            p = torch.softmax(k @ q_BHK[b, h].double() * scale, dim=0)
            out[b, h] = p @ v
    return out.float()


@pytest.mark.parametrize("K,H,G", [(64, 8, 2), (16, 4, 2), (128, 4, 1), (72, 6, 3)])
def test_decode_attention_matches_softmax(K, H, G):
    g = torch.Generator().manual_seed(K + H)
    S, lengths = 300, torch.tensor([1, 7, 8, 9, 130, 257])
    B = lengths.numel()
    k_GSK, v_GSK = torch.randn(G, S, K, generator=g), torch.randn(G, S, K, generator=g)
    slots = torch.zeros(B, int(lengths.max()), dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        slots[b, :n] = torch.randperm(S, generator=g)[:n]  # scattered pages, padding left at slot 0
    qk = torch.randn(B, H + G, K, generator=g) * 2
    q = qk[:, :H]  # strided rows, as the attention layer slices them from the fused projection
    got = cpu_kernels.decode_attention(q, k_GSK, v_GSK, slots, lengths, K**-0.5)
    torch.testing.assert_close(got, reference_attention(q, k_GSK, v_GSK, slots, lengths, K**-0.5),
                               rtol=1e-5, atol=1e-5)


def test_decode_attention_rejects_bad_lengths_and_slots():
    q, cache = torch.randn(1, 4, 16), torch.randn(2, 10, 16)
    with pytest.raises(RuntimeError, match="length"):
        cpu_kernels.decode_attention(q, cache, cache, torch.zeros(1, 3, dtype=torch.long), torch.tensor([4]), 0.25)
    with pytest.raises(RuntimeError, match="slot out of range"):
        cpu_kernels.decode_attention(q, cache, cache, torch.tensor([[3, 10]]), torch.tensor([2]), 0.25)


def test_optimize_routes_linears_and_experts_to_the_kernels(tmp_path):
    from model.loader import load_pretrained
    from model.moe import RoutedExperts
    from model.tiny import make_tiny

    make_tiny(tmp_path)
    model = optimize_for_inference(load_pretrained(tmp_path, torch.float32, "cpu"))
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, KernelLinear)
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    assert experts and all(isinstance(e, KernelRoutedExperts) for e in experts)
    assert all(e.gate_up_proj[0].T.is_contiguous() for e in experts)


@pytest.mark.parametrize("rows", [1, 5, 300])
def test_silu_mul_matches_torch(rows):
    h = torch.randn(rows, 2 * 48) * 6  # wide range: both branches of the stable sigmoid
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_mul(h), torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("counts", [[0, 3, 0, 1], [70, 0, 2, 1], [0, 0, 0, 1]])
def test_grouped_experts_match_one_expert_at_a_time(counts):
    from model.moe import RoutedExperts, experts_for_loop

    D, F, E = 64, 32, 4
    experts = RoutedExperts(D, F, list(range(E)), E)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    ids_N = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    ids_N = ids_N[torch.randperm(ids_N.numel())]  # unsorted, as the router leaves them
    x_ND = torch.randn(ids_N.numel(), D)
    expected = experts_for_loop(experts, x_ND, ids_N)
    assert isinstance(apply_cpu_kernels(experts), KernelRoutedExperts)
    assert cpu_kernels.grouped_experts_fit(x_ND, experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2))
    torch.testing.assert_close(experts(x_ND, ids_N), expected, rtol=1e-5, atol=1e-5)


def test_grouped_experts_reject_counts_that_do_not_add_up():
    gate_up, down = torch.randn(2, 16, 8), torch.randn(2, 8, 8)
    with pytest.raises(RuntimeError, match="add up"):
        cpu_kernels.grouped_experts(torch.randn(3, 8), torch.tensor([1, 1]), gate_up, down)
