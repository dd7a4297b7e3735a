"""`make-tiny --router-skew S`: our model on the skewed checkpoint routes most tokens to the hot pair,
still equals `transformers`, and S = 0 writes the unskewed checkpoint byte for byte."""

import pytest
import torch
from safetensors.torch import load_file

from model.generate import greedy_generate
from model.loader import load_pretrained
from model.router_skew import HOT_PAIR
from model.tiny import make_tiny
from tests.oracle import hf_greedy
from workers.expert_placement import balancedness, contiguous_placement, place_experts

SKEW = 16.0  # the workload of issue 36's tests: the hot pair takes about 85% of the tokens


def tensors(ckpt) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("plain") / "ckpt", "tiny-maverick", seed=1, dtype=torch.float32)


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("skewed") / "ckpt", "tiny-maverick", seed=1, dtype=torch.float32,
                     router_skew=SKEW)


def routed_counts(model, prompts: list[list[int]], max_new_tokens: int) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert of each MoE layer while generating (prefill and decode), read
    from the router's top-1 as `MoE.route` takes it."""
    counts = {layer: torch.zeros(model.config.num_experts, dtype=torch.long) for layer, _ in model.moe_blocks()}
    hooks = []
    for layer, moe in model.moe_blocks():
        def count(_module, _inputs, logits_TE, layer=layer):
            top_TK = torch.topk(logits_TE, moe.top_k, dim=1).indices
            counts[layer] += torch.bincount(top_TK.reshape(-1), minlength=logits_TE.shape[1])
        hooks.append(moe.router.register_forward_hook(count))
    try:
        greedy_generate(model, prompts, max_new_tokens)
    finally:
        for h in hooks:
            h.remove()
    return counts


def random_prompts(model, num: int = 8, length: int = 20) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    return [[model.config.bos_token_id] + torch.randint(0, vocab, (length,), generator=gen).tolist()
            for _ in range(num)]


def test_zero_skew_writes_the_plain_checkpoint(plain, tmp_path):
    zero = make_tiny(tmp_path / "zero", "tiny-maverick", seed=1, dtype=torch.float32, router_skew=0.0)
    for f in sorted(plain.glob("*.safetensors")):
        assert (zero / f.name).read_bytes() == f.read_bytes()


def test_only_the_hot_pair_router_rows_change(plain, skewed):
    a, b = tensors(plain), tensors(skewed)
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(k.endswith("feed_forward.router.weight") for k in changed)
    for k in changed:
        rows = torch.nonzero((a[k] != b[k]).any(dim=1)).squeeze(1).tolist()
        assert rows == list(HOT_PAIR)
        # +S u on one row, -S u on the other, u a unit vector
        delta_D = b[k][HOT_PAIR[0]] - a[k][HOT_PAIR[0]]
        torch.testing.assert_close(b[k][HOT_PAIR[1]] - a[k][HOT_PAIR[1]], -delta_D)
        assert delta_D.norm().item() == pytest.approx(SKEW, rel=1e-5)


def test_skew_is_deterministic_per_seed_and_the_cli_writes_it(skewed, tmp_path):
    from router.cli import main

    again = tmp_path / "again"
    assert main(["make-tiny", str(again), "--seed", "1", "--dtype", "float32", "--router-skew", str(SKEW)]) == 0
    other = make_tiny(tmp_path / "other", "tiny-maverick", seed=2, dtype=torch.float32, router_skew=SKEW)
    key = "language_model.model.layers.1.feed_forward.router.weight"
    assert torch.equal(tensors(again)[key], tensors(skewed)[key])
    assert not torch.equal(tensors(other)[key], tensors(skewed)[key])


def test_negative_skew_is_refused(tmp_path):
    with pytest.raises(ValueError, match="router-skew must be >= 0"):
        make_tiny(tmp_path / "neg", "tiny-maverick", seed=1, router_skew=-1.0)


def test_skewed_routing_unbalances_three_ranks_and_the_policy_rebalances(plain, skewed):
    for ckpt, hot in ((plain, False), (skewed, True)):
        model = load_pretrained(ckpt)
        counts = routed_counts(model, random_prompts(model), 16)
        per_rank = [3, 3, 2]  # 8 experts contiguous over 3 expert ranks, as a gang lays them out
        for layer, tokens_E in counts.items():
            share_E = tokens_E.double() / tokens_E.sum()
            tokens = tokens_E.tolist()
            before = balancedness(contiguous_placement(8, per_rank).rank_tokens(tokens))
            if not hot:
                assert share_E[list(HOT_PAIR)].sum() < 0.5
                assert before > 0.5
                continue
            assert share_E[list(HOT_PAIR)].sum() > 0.75, share_E
            assert share_E.max() > 0.35
            assert before < 0.5
            # two redundant slots per expert rank, placed from these counts
            after = place_experts({layer: tokens}, [c + 2 for c in per_rank])[layer]
            assert balancedness(after.rank_tokens(tokens)) >= 0.9


def test_skewed_checkpoint_matches_transformers(skewed):
    from transformers import Llama4ForCausalLM

    hf = Llama4ForCausalLM.from_pretrained(skewed, dtype=torch.float32, attn_implementation="eager").eval()
    ours = load_pretrained(skewed)
    prompt = random_prompts(ours, num=1)[0]
    expected = hf_greedy(hf, prompt, 12)
    assert greedy_generate(ours, [prompt], 12) == [expected]
