"""The gang schema: strict keys, impossible layouts refused with the path of the bad field."""

import pytest
from pydantic import ValidationError

from cluster.config import GangConfig, describe


def test_defaults_and_world_size():
    config = GangConfig(model="/m", attention_workers=2, expert_workers=3)
    assert config.world_size == 5 and config.placement_strategy == "PACK"
    assert config.engine.engine_config(None, "cpu").max_num_seqs == config.engine.max_num_seqs


@pytest.mark.parametrize("raw,path", [
    ({"model": "/m", "expert_workers": -1}, "expert_workers"),
    ({"model": "/m", "attention_workers": 0}, "attention_workers"),
    ({"model": "/m", "placement_strategy": "RANDOM"}, "placement_strategy"),
    ({"model": "/m", "engine": {"max_num_seqs": 0}}, "engine.max_num_seqs"),
    ({"model": "/m", "engine": {"max_num_seq": 8}}, "engine.max_num_seq"),
    ({"model": "/m", "experts": {"num_cpus": 1, "gpus": 1}}, "experts.gpus"),
    ({"model": "/m", "surprise": True}, "surprise"),
    ({}, "model"),
])
def test_bad_fields_are_named(raw, path):
    with pytest.raises(ValidationError) as info:
        GangConfig(**raw)
    assert describe(info.value, "args").startswith(f"args.{path}:")


def test_cuda_needs_one_gpu_per_rank():
    with pytest.raises(ValidationError, match="one GPU per actor"):
        GangConfig(model="/m", device="cuda")
    GangConfig(model="/m", device="cuda", attention={"num_gpus": 1})


def test_experts_must_divide():
    config = GangConfig(model="/m", expert_workers=3)
    with pytest.raises(ValueError, match=r"expert_workers \(3\).*num_local_experts \(8\)"):
        config.check_experts(8)
    GangConfig(model="/m", expert_workers=4).check_experts(8)
    GangConfig(model="/m", expert_workers=0).check_experts(7)
