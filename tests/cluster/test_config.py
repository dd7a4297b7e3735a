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
    ({"model": "/m", "expert_workers": 2, "eplb": {"redundant_experts": -1}}, "eplb.redundant_experts"),
    ({"model": "/m", "expert_workers": 2, "eplb": {"rebalance_every": 8}}, "eplb.rebalance_every"),
    ({"model": "/m", "expert_workers": 2, "eplb": {"rebalance_every_steps": 8, "window_steps": 9}}, "eplb"),
])
def test_bad_fields_are_named(raw, path):
    with pytest.raises(ValidationError) as info:
        GangConfig(**raw)
    assert describe(info.value, "args").startswith(f"args.{path}:")


def test_cuda_needs_one_gpu_per_rank():
    with pytest.raises(ValidationError, match="one GPU per actor"):
        GangConfig(model="/m", device="cuda")
    GangConfig(model="/m", device="cuda", attention={"num_gpus": 1})


def test_every_expert_worker_needs_an_expert():
    config = GangConfig(model="/m", expert_workers=9)
    with pytest.raises(ValueError, match=r"expert_workers \(9\).*num_local_experts \(8\)"):
        config.check_experts(8)
    GangConfig(model="/m", expert_workers=3).check_experts(8)  # uneven: 3, 3, 2
    GangConfig(model="/m", expert_workers=6).check_experts(128)
    GangConfig(model="/m", expert_workers=0).check_experts(7)


def test_app_args_extend_the_gang_and_name_bad_paths():
    from cluster.config import AppConfig, parse_app_args

    config = parse_app_args({"model": "m", "expert_workers": 2, "num_gangs": 2, "api_key": "sk-secret-42"})
    assert isinstance(config, AppConfig) and config.model_name == "m"
    assert config.gang_config() == GangConfig(model="m", expert_workers=2)
    assert "sk-secret-42" not in repr(config)  # the key never reaches a log line through repr
    with pytest.raises(ValueError, match=r"args\.engine\.max_num_seq: Extra inputs"):
        parse_app_args({"model": "m", "engine": {"max_num_seq": 4}})
    with pytest.raises(ValueError, match=r"args\.num_gangs: Input should be greater"):
        parse_app_args({"model": "m", "num_gangs": 0})


def test_serve_config_unknown_keys_are_found_at_every_level():
    from cluster.serve_config import validate_serve_config

    def config(**app):
        return {"http_options": {"host": "127.0.0.1"},
                "applications": [{"name": "a", "import_path": "router.app:build", "args": {"model": "m"}, **app}]}

    schema, apps = validate_serve_config(config())
    assert apps[0].model == "m"
    cases = {
        "applications[0].deployments[0].max_ongoing_request": config(
            deployments=[{"name": "ingress", "max_ongoing_request": 3}]),
        "applications[0].deployments[0].ray_actor_options.num_cpu": config(
            deployments=[{"name": "ingress", "ray_actor_options": {"num_cpu": 1}}]),
        "applications[0].import_paht": config(import_paht="x"),
        "http_options.hots": {**config(), "http_options": {"hots": "x"}},
    }
    for path, data in cases.items():
        with pytest.raises(ValueError, match=path.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            validate_serve_config(data)
    foreign = config(import_path="other.module:app", args={"anything": 1})
    assert validate_serve_config(foreign)[1] == [None]  # only our own args schema is ours to check


def test_api_key_from_the_replicas_environment(monkeypatch):
    from cluster.config import parse_app_args

    config = parse_app_args({"model": "m", "api_key_env": "MAVERICK_TEST_KEY"})
    monkeypatch.delenv("MAVERICK_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="MAVERICK_TEST_KEY is not set"):  # never silently open
        config.with_api_key_from_env()
    monkeypatch.setenv("MAVERICK_TEST_KEY", "s3cret")
    assert config.with_api_key_from_env().api_key == "s3cret"
    literal = parse_app_args({"model": "m", "api_key": "given", "api_key_env": "MAVERICK_TEST_KEY"})
    assert literal.with_api_key_from_env().api_key == "given"
    assert parse_app_args({"model": "m"}).with_api_key_from_env().api_key is None


def test_eplb_needs_expert_ranks_and_counts_spare_slots_per_rank():
    with pytest.raises(ValidationError, match="eplb balances experts over expert ranks"):
        GangConfig(model="/m", eplb={"redundant_experts": 2})
    config = GangConfig(model="/m", expert_workers=3, eplb={"redundant_experts": 2, "rebalance_every_steps": 64})
    assert config.expert_capacities(8) == [5, 5, 4]  # 3, 3, 2 contiguous, plus 2 spare each
    assert GangConfig(model="/m", expert_workers=3).expert_capacities(8) == [3, 3, 2]
    assert config.eplb.settings().window_steps == 0  # every step since the last rebalance


def test_autoscaling_bounds_the_gang_count_and_leaves_time_to_move_requests(tmp_path):
    from cluster.config import AppConfig, parse_app_args
    from router.app import gang_count, prepare_args

    config = parse_app_args({"model": "/m", "autoscaling": {"min_gangs": 2, "max_gangs": 4, "target_load": 0.5}})
    assert config.initial_gangs == 2  # no num_gangs: start at the floor
    scaling = gang_count(config)["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["initial_replicas"]) == (2, 4, 2)
    assert scaling["policy"] == {"policy_function": "cluster.autoscale:GangLoadPolicy",
                                 "policy_kwargs": {"target_load": 0.5}}
    assert gang_count(parse_app_args({"model": "/m", "num_gangs": 3})) == {"num_replicas": 3}
    (tmp_path / "config.json").write_text("{}")
    prepared = prepare_args({"model": str(tmp_path), "autoscaling": {"min_gangs": 2, "max_gangs": 4}})
    assert AppConfig.model_validate(prepared.model_dump()).num_gangs == 2  # what every replica validates
    for args, message in [({"autoscaling": {"min_gangs": 3, "max_gangs": 2}}, "max_gangs \\(2\\) is below"),
                          ({"num_gangs": 5, "autoscaling": {"max_gangs": 4}}, "num_gangs \\(5\\) must lie within"),
                          ({"graceful_shutdown_timeout_s": 20, "autoscaling": {"drain_grace_s": 30}},
                           "drain_grace_s \\(30\\) must be below"),
                          ({"autoscaling": {"target_load": 0}}, "args.autoscaling.target_load")]:
        with pytest.raises(ValueError, match=message):
            parse_app_args({"model": "/m", **args})


def test_spares_stand_in_for_ranks_of_cpu_gangs_recovered_in_place():
    assert GangConfig(model="m", expert_workers=2, spares=1, attention_spares=2).attention_spares == 2
    for spares in ({"spares": 1}, {"attention_spares": 1}):
        with pytest.raises(ValueError, match="spares stand in for failed ranks of a gang recovered in place"):
            GangConfig(model="m", **spares)
    with pytest.raises(ValueError, match="not built for NCCL gangs"):
        GangConfig(model="m", expert_workers=1, spares=1, device="cuda",
                   attention={"num_gpus": 1}, experts={"num_gpus": 1})
