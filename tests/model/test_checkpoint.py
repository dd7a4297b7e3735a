"""Checkpoint reading: layouts, key prefixes, expert slices read by byte range, clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, CheckpointReader
from model.config import load_config
from model.decoder import Llama4ForCausalLM
from model.generate import greedy_generate
from model.loader import expert_slice_names, load_model, load_pretrained, materialize
from model.moe import ExpertSlices
from model.tiny import make_tiny
from workers.expert_parallel import AllToAllExperts, ExpertGroup, Placement, shard_experts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny-maverick", seed=3)


def _all_tensors(path):
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _expert_bytes(reader):
    return sum(i.end - i.begin for k, i in reader.tensors.items() if ".experts." in k)


def test_sharded_index_with_language_model_prefix(tiny):
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert any(k.startswith("language_model.model.layers.") for k in index["weight_map"])
    assert any(k.startswith("vision_model.") for k in index["weight_map"])


def test_expert_rows_read_by_byte_range(tiny):
    with CheckpointReader(tiny) as reader:
        key = "language_model.model.layers.1.feed_forward.experts.gate_up_proj"
        full = reader.read(key)
        before = reader.bytes_read
        part = reader.read(key, rows=[5, 2, 3])
        assert reader.bytes_read - before == 3 * reader.info(key).row_bytes
        assert torch.equal(part, full[[5, 2, 3]])


def _placement(config, owned):
    """Expert rank 0 of an E=2, A=1 gang holds `owned`, rank 1 the rest (rank 2 runs attention)."""
    return Placement({layer: [[0] if e in owned else [1] for e in range(config.num_experts)]
                      for layer in config.moe_layers})


def _shard(config, rank, owned=(2, 3)):
    """What rank `rank` of that gang loads, as `shard_experts` makes it on the meta device."""
    comm = ExpertGroup(None, rank, 3, 2, config.hidden_size, torch.float32)
    with torch.device("meta"):
        shard = shard_experts(Llama4ForCausalLM(config), comm, _placement(config, owned))
    return materialize(shard, "cpu")


def _attention_worker_model(config):
    """Everything but the routed experts, as an attention worker holds it."""
    model = _shard(config, rank=2)
    assert all(isinstance(moe.experts, AllToAllExperts) for _, moe in model.moe_blocks())
    return model


def test_attention_worker_never_reads_routed_experts(tiny):
    config = load_config(tiny)
    with CheckpointReader(tiny) as reader:
        report = load_model(_attention_worker_model(config), reader, torch.float32, strict=False)
        text_bytes = sum(i.end - i.begin for k, i in reader.tensors.items() if k.startswith("language_model."))
        assert report.bytes_read == text_bytes - _expert_bytes(reader)
        assert not any(".experts." in k for k in report.keys_read)


def test_expert_worker_reads_only_its_experts(tiny):
    config = load_config(tiny)
    owned = [2, 3]
    shard = _shard(config, rank=0, owned=owned)
    assert isinstance(shard, ExpertSlices) and list(shard.parameters())  # experts only, and only those
    assert sum(p.numel() for p in shard.parameters()) == sum(
        p.numel() for layer in config.moe_layers for p in shard.experts(layer).parameters())
    with CheckpointReader(tiny) as reader:
        report = load_model(shard, reader, torch.float32, strict=False, names=expert_slice_names)
        assert report.bytes_read == _expert_bytes(reader) * len(owned) // config.num_experts
        full = reader.read("language_model.model.layers.3.feed_forward.experts.down_proj")
    assert shard.experts(3).expert_ids == owned
    assert torch.equal(shard.experts(3).down_proj, full[owned].float())
    assert _shard(config, rank=1, owned=owned).experts(3).expert_ids == [e for e in range(config.num_experts)
                                                                         if e not in owned]


def test_shard_experts_refuses_a_placement_that_does_not_fit(tiny):
    config = load_config(tiny)
    comm = ExpertGroup(None, 0, 3, 2, config.hidden_size, torch.float32)
    wrong_rank = Placement({layer: [[2]] * config.num_experts for layer in config.moe_layers})
    with torch.device("meta"), pytest.raises(ValueError, match="not expert ranks"):
        shard_experts(Llama4ForCausalLM(config), comm, wrong_rank)


def _greedy(model_dir):
    return greedy_generate(load_pretrained(model_dir), [[5, 9, 200, 31, 7]], 12)


def test_unfused_per_expert_keys_single_file_causal_layout(tiny, tmp_path):
    """Per-expert Linear keys, one safetensors file, no prefix: the same model as the fused original."""
    tensors = {k.removeprefix("language_model."): v for k, v in _all_tensors(tiny).items()
               if k.startswith("language_model.")}
    for key in [k for k in tensors if k.endswith("experts.gate_up_proj")]:
        base = key.removesuffix(".gate_up_proj")
        gate, up = tensors.pop(key).chunk(2, dim=-1)  # [E, D, F] each
        down = tensors.pop(base + ".down_proj")  # [E, F, D]
        for e in range(gate.shape[0]):
            tensors[f"{base}.{e}.gate_proj.weight"] = gate[e].t().contiguous()
            tensors[f"{base}.{e}.up_proj.weight"] = up[e].t().contiguous()
            tensors[f"{base}.{e}.down_proj.weight"] = down[e].t().contiguous()
    out = tmp_path / "unfused"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((tiny / "config.json").read_text())["text_config"]
    (out / "config.json").write_text(json.dumps({"architectures": ["Llama4ForCausalLM"], **config}))
    assert _greedy(out) == _greedy(tiny)


def _broken_copy(tiny, tmp_path, key, edit):
    """Copy the checkpoint and edit the shard that holds `key`; return the copy and that shard's name."""
    out = tmp_path / "broken"
    shutil.copytree(tiny, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][key]
    tensors = load_file(out / shard)
    edit(tensors)
    save_file(tensors, str(out / shard))
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if k in tensors or f != shard}
    index["weight_map"].update({k: shard for k in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out, shard


def test_missing_key_is_named(tiny, tmp_path):
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    out, _ = _broken_copy(tiny, tmp_path, key, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="layers.0.self_attn.q_proj.weight"):
        load_pretrained(out)


def test_unexpected_key_is_named_with_its_file(tiny, tmp_path):
    extra = "language_model.model.layers.0.self_attn.q_norm.weight"
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    out, shard = _broken_copy(tiny, tmp_path, key, lambda t: t.__setitem__(extra, torch.ones(4)))
    with pytest.raises(CheckpointError, match=rf"{shard}.*unexpected.*q_norm"):
        load_pretrained(out)


def test_shape_mismatch_is_named(tiny, tmp_path):
    key = "language_model.model.norm.weight"
    out, shard = _broken_copy(tiny, tmp_path, key, lambda t: t.__setitem__(key, t[key][:-1].clone()))
    with pytest.raises(CheckpointError, match=rf"{shard}.*norm.weight.*shape"):
        load_pretrained(out)


def test_missing_shard_file(tiny, tmp_path):
    out = tmp_path / "noshard"
    shutil.copytree(tiny, out)
    sorted(out.glob("*.safetensors"))[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        CheckpointReader(out)


def test_bf16_checkpoint_runs_in_fp32_or_bf16(tiny):
    with CheckpointReader(tiny) as reader:
        assert reader.info("language_model.lm_head.weight").dtype == torch.bfloat16
    assert load_pretrained(tiny).lm_head.weight.dtype == torch.float32
    assert load_pretrained(tiny, torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
