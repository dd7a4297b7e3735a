"""Every cluster-launcher config in deploy/ray/ passes what `ray up` checks before it touches a cloud
(`prepare_config` then `validate_config` against the wheel's ray-schema.json), keeps Ray's ports
closed, turns token auth on everywhere and has room for the GPU layouts in deploy/gpu/."""

import copy
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.serve_config import load_serve_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
LAUNCHER_CONFIGS = sorted((DEPLOY / "ray").glob("*.yaml"))
CLOUD_CONFIGS = [p for p in LAUNCHER_CONFIGS if p.stem != "onprem"]
RAY_PORTS = {6379, 8265, 10001, 8076, 8080, 52365}  # GCS, dashboard, client, object manager, metrics, agent
SERVING_PORTS = {8000, 9000}
GPU_OF_NODE_TYPE = {"gpu-8xh100": "h100", "gpu-8xh200": "h200"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _prepared(path: Path) -> dict:
    prepared = prepare_config(copy.deepcopy(_load(path)))
    validate_config(prepared)
    return prepared


def _ray_starts(config: dict) -> list[str]:
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    return [c for c in commands if "ray start" in c]


def test_there_are_configs_for_each_provider():
    assert {p.stem for p in LAUNCHER_CONFIGS} >= {"onprem", "aws", "gcp"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.stem)
def test_config_passes_ray_up_validation(path):
    prepared = _prepared(path)
    assert prepared["cluster_name"] == "maverick"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_validation_is_live():
    """The schema check really runs: an unknown top-level key and a fractional resource are refused."""
    config = _load(DEPLOY / "ray" / "aws.yaml")
    with pytest.raises(Exception, match="head_start_commands"):
        validate_config(prepare_config(copy.deepcopy(config) | {"head_start_commands": []}))
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu-8xh100"]["resources"]["GPU"] = 0.5
    with pytest.raises(Exception):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.stem)
def test_ray_is_started_locked_down(path):
    prepared = _prepared(path)
    starts = _ray_starts(prepared)
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command, command
        assert "--metrics-export-port=8080" in command, command  # static Prometheus targets
    head = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head
    assert "--num-gpus=0" in head  # no rank ever lands on the head
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # `ray exec` and `maverick serve --address auto` on the head need the same mode
    assert any("export RAY_AUTH_MODE=token" in c for c in prepared["setup_commands"])


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.stem)
def test_project_is_installed_pinned(path):
    prepared = _prepared(path)
    common = prepared["setup_commands"]  # prepare_config puts them first on both kinds of node
    assert prepared["head_setup_commands"][:len(common)] == common
    assert prepared["worker_setup_commands"][:len(common)] == common
    setup = " ; ".join(common)
    assert re.search(r"pip install -q torch==2\.13\.0", setup)  # before the project: never an unpinned CUDA pull
    assert setup.index("torch==2.13.0") < setup.index("-e ~/maverick")
    assert prepared["file_mounts"]["~/maverick"] == "."
    assert ".gitignore" in prepared["rsync_filter"]  # no .venv or checkpoints shipped to the nodes
    image = prepared.get("docker", {}).get("image")
    if image:
        assert image == "rayproject/ray:2.60.0-py311-gpu"


@pytest.mark.parametrize("path", CLOUD_CONFIGS, ids=lambda p: p.stem)
def test_cloud_opens_only_serving_ports(path):
    config = _load(path)
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    if config["provider"]["type"] == "aws":
        assert rules, "AWS: the serving ports must be opened explicitly"
    for rule in rules:
        ports = set(range(rule["FromPort"], rule["ToPort"] + 1))
        assert ports <= SERVING_PORTS and not ports & RAY_PORTS, rule
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", [])), rule
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0


def _layout_gpus(path: Path) -> tuple[int, str]:
    """GPUs the layout's gangs hold at their most (`max_gangs` with autoscaling), and the GPU kind."""
    app = load_serve_config(path)["applications"][0]["args"]
    ranks = app["attention_workers"] + app["expert_workers"]
    gangs = (app.get("autoscaling") or {}).get("max_gangs") or app.get("num_gangs", 1)
    return ranks * gangs, "h200" if "h200" in path.stem else "h100"


@pytest.mark.parametrize("layout", sorted((DEPLOY / "gpu").glob("*.yaml")), ids=lambda p: p.stem)
@pytest.mark.parametrize("path", CLOUD_CONFIGS, ids=lambda p: p.stem)
def test_cloud_has_room_for_every_gpu_layout(path, layout):
    gpus, kind = _layout_gpus(layout)
    types = _load(path)["available_node_types"]
    room = {GPU_OF_NODE_TYPE[name]: t["resources"]["GPU"] * t["max_workers"]
            for name, t in types.items() if name in GPU_OF_NODE_TYPE}
    assert room.get(kind, 0) >= gpus, f"{layout.name} needs {gpus} x {kind}; {path.name} has {room}"
