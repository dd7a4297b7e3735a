"""The KubeRay RayService manifests in deploy/kuberay/: valid against the RayService CRD's v1 schema;
their serveConfigV2 a valid Serve config whose layout fills the worker pods' GPUs and fits them by
`maverick plan`; what KubeRay relies on in place; and nothing exposed beyond the serving ports.

The CRD schema is vendored (CI runs from a clean clone, without ../shared) as
tests/deploy/schemas/rayservice-v1.json: the v1 `openAPIV3Schema` of KubeRay's CRD file without its
`description` texts (tests/deploy/schemas/README.md). Rewrite it from a newer CRD file with
    PYTHONPATH=. .venv/bin/python tests/deploy/test_kuberay.py --refresh PATH/ray.io_rayservices.yaml --commit SHA
"""

import argparse
import json
import re
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.config import parse_app_args
from cluster.serve_config import OUR_IMPORT_PATHS, load_serve_config, validate_serve_config
from router.cli.plan import add_plan_parser, run_plan

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
MANIFESTS = sorted([*KUBERAY.glob("*.yml"), *KUBERAY.glob("*.yaml")])
SCHEMA = Path(__file__).with_name("schemas") / "rayservice-v1.json"
KUBERAY_COMMIT = "feeaf72facab4881ba2b179248bb67315634e229"
CRD_PATH = "ray-operator/config/crd/bases/ray.io_rayservices.yaml"

# keywords whose values are data, not schemas: never rewritten
DATA_KEYWORDS = {"default", "enum", "example", "const"}
# GPU feature discovery's `nvidia.com/gpu.product` values -> `maverick plan --gpu`
GPU_PRODUCTS = {"NVIDIA-H200": "h200", "NVIDIA-H100-80GB-HBM3": "h100"}
SERVING_PORTS = {8000, 9000}
DASHBOARD_AGENT_PORT = "52365"  # KubeRay passes --dashboard-agent-listen-port=52365 unless told otherwise


# -- the vendored schema ---------------------------------------------------------------------------------

def _strip_descriptions(node, field_names: bool = False):
    """`node` without `description` keywords; a field that happens to be called description stays."""
    if isinstance(node, list):
        return [_strip_descriptions(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {key: value if key in DATA_KEYWORDS and not field_names
            else _strip_descriptions(value, field_names=key in ("properties", "patternProperties") and not field_names)
            for key, value in node.items() if field_names or key != "description"}


def reduce_crd(crd: dict, commit: str = KUBERAY_COMMIT) -> dict:
    v1 = next(version for version in crd["spec"]["versions"] if version["name"] == "v1")
    schema = _strip_descriptions(v1["schema"]["openAPIV3Schema"])
    return {"$comment": f"ray-project/kuberay {CRD_PATH} at {commit}: spec.versions[v1].schema.openAPIV3Schema, "
                        "description texts removed (tests/deploy/test_kuberay.py reduce_crd)", **schema}


def to_jsonschema(node, field_names: bool = False):
    """Kubernetes' structural schema as plain JSON Schema. Unknown fields fail, as kubectl's strict field
    validation makes them (the API server would otherwise drop them silently); int-or-string and
    nullable are spelled out; other x-kubernetes-* markers and CEL rules are left out (nothing here runs CEL)."""
    if isinstance(node, list):
        return [to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    if field_names:
        return {name: to_jsonschema(sub) for name, sub in node.items()}
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "$comment"):
            continue
        out[key] = value if key in DATA_KEYWORDS else to_jsonschema(value, key in ("properties", "patternProperties"))
    # int-or-string carries no `type`; without its anyOf it would accept anything
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=1)
def validator() -> jsonschema.Draft4Validator:
    schema = to_jsonschema(json.loads(SCHEMA.read_text()))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def schema_errors(manifest: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator().iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))]


# -- reading a manifest ------------------------------------------------------------------------------------

def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def serve_config(manifest: dict) -> dict:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def our_app(manifest: dict, source: str):
    _, apps = validate_serve_config(serve_config(manifest), source)
    return next(app for app in apps if app is not None)


def head(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterConfig"]["headGroupSpec"]


def workers(manifest: dict) -> list[dict]:
    return manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first


def ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def quantity(value) -> float:
    """A Kubernetes quantity ("64Gi", "16", "500m") as a number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units.get(unit, 1)


def gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def is_serving_port_name(name: str) -> bool:
    return name == "serve" or name.startswith("serve-")  # what KubeRay copies into the serve Service


def pod_templates(manifest: dict) -> list[dict]:
    return [head(manifest)["template"]] + [group["template"] for group in workers(manifest)]


def test_there_are_manifests():
    assert MANIFESTS, "deploy/kuberay/ holds no manifest"
    for path in MANIFESTS:
        manifest = load(path)
        assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService"), path


# -- (1) the CRD's schema ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_crd_schema(path):
    assert schema_errors(load(path)) == []


_DELETE = object()


def _set(doc: dict, dotted: str, value):
    *parents, last = dotted.split(".")
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    if value is _DELETE:
        del doc[last]
    else:
        doc[last] = value


HEAD_CONTAINER = "spec.rayClusterConfig.headGroupSpec.template.spec.containers.0"
WORKER_CONTAINER = "spec.rayClusterConfig.workerGroupSpecs.0.template.spec.containers.0"
BAD = {  # each breaks another part of the schema: the serve config's type, closed objects, a required
    # field, string maps, int-or-string, the quantity pattern, an enum; errors point at the field, or at
    # the object that lacks or should not have it
    "serveConfigV2 as a mapping": ("spec.serveConfigV2", {"applications": []}),
    "unknown field in spec": ("spec.serveConfig", "applications: []", "spec"),
    "unknown field in a container": (f"{HEAD_CONTAINER}.imagePullPolicyy", "Always", HEAD_CONTAINER),
    "no headGroupSpec": ("spec.rayClusterConfig.headGroupSpec", _DELETE, "spec.rayClusterConfig"),
    "rayStartParams value not a string": ("spec.rayClusterConfig.headGroupSpec.rayStartParams.num-gpus", 0),
    "probe port a mapping": (f"{WORKER_CONTAINER}.livenessProbe.httpGet.port", {"number": 52365}),
    "memory not a quantity": (f"{WORKER_CONTAINER}.resources.limits.memory", "lots"),
    "auth mode unknown": ("spec.rayClusterConfig.authOptions.mode", "password"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_vendored_schema_rejects_a_bad_manifest(case):
    field, value, *at = BAD[case]
    error_at = at[0] if at else field
    manifest = load(MANIFESTS[0])
    _set(manifest, field, value)
    errors = schema_errors(manifest)
    assert any(e.startswith(f"{error_at}: ") for e in errors), errors


def test_int_or_string_and_nullable_are_checked():
    schema = to_jsonschema({"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True},  # no anyOf, no type: still only an int or a string
        "when": {"type": "string", "nullable": True}}})
    check = jsonschema.Draft4Validator(schema)
    for good in ({"port": 8000}, {"port": "serve"}, {"when": None}, {"when": "now"}):
        assert check.is_valid(good), good
    for bad in ({"port": {"a": 1}}, {"port": [8000]}, {"port": 1.5}, {"port": None}, {"when": 5}, {"other": 1}):
        assert not check.is_valid(bad), bad


def test_vendored_schema_is_small_and_says_where_it_comes_from():
    text = SCHEMA.read_text()
    schema = json.loads(text)
    assert KUBERAY_COMMIT in schema["$comment"] and CRD_PATH in schema["$comment"]
    assert _strip_descriptions(schema) == schema  # the texts are gone
    assert {"spec", "status"} <= set(schema["properties"]) and len(text) < 400_000


# -- (2) serveConfigV2 and the plan -------------------------------------------------------------------------

@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_serve_config_validates(path):
    schema, apps = validate_serve_config(serve_config(load(path)), f"{path.name}: serveConfigV2")
    assert schema.applications and any(app is not None for app in apps)
    assert all(app.import_path in OUR_IMPORT_PATHS for app in schema.applications)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_serve_config_is_the_gpu_layout_it_names(path):
    named = re.search(r"deploy/gpu/[\w.-]+\.yaml", path.read_text())
    assert named, f"{path.name}: say which deploy/gpu/ layout serveConfigV2 carries"
    layout = load_serve_config(ROOT / named.group(0))
    ours = serve_config(load(path))
    # the same layout and limits; only where the API key comes from differs (a Secret here)
    assert [parse_app_args(a["args"]).model_copy(update={"api_key_env": None}) for a in ours["applications"]] == \
           [parse_app_args(a["args"]) for a in layout["applications"]]
    assert ours["grpc_options"] == layout["grpc_options"]
    assert ours["http_options"]["port"] == layout["http_options"]["port"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_worker_gpus_are_the_gangs_ranks(path):
    manifest = load(path)
    app = our_app(manifest, path.name)
    ranks = app.attention_workers + app.expert_workers
    declared = sum(group["replicas"] * gpus(ray_container(group)) for group in workers(manifest))
    assert declared == ranks * app.num_gangs, f"{declared} GPUs declared for {app.num_gangs} gang(s) of {ranks} ranks"
    for group in workers(manifest):
        container = ray_container(group)
        per_pod = gpus(container)
        assert per_pod and per_pod % ranks == 0, f"{group['groupName']}: a gang ({ranks} ranks) spans pods"
        # a pod's gangs fit its CPUs too: ranks at their num_cpus plus each gang's supervisor
        need = per_pod // ranks * (app.attention_workers * app.attention.num_cpus +
                                   app.expert_workers * app.experts.num_cpus + app.serve.supervisor_num_cpus)
        assert need <= quantity(container["resources"]["limits"]["cpu"]), group["groupName"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_worker_pods_follow_the_gang_bounds(path):
    """With autoscaling, Ray's autoscaler may add a pod for every gang up to max_gangs, keeps those of
    min_gangs, and removes idle ones; without it, the pods are fixed."""
    manifest = load(path)
    app, cluster = our_app(manifest, path.name), manifest["spec"]["rayClusterConfig"]
    ranks = app.attention_workers + app.expert_workers
    low = sum(group["minReplicas"] * gpus(ray_container(group)) for group in workers(manifest))
    high = sum(group["maxReplicas"] * gpus(ray_container(group)) for group in workers(manifest))
    if app.autoscaling is None:
        assert low == high == ranks * app.num_gangs
        return
    assert cluster.get("enableInTreeAutoscaling") is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert low == ranks * app.autoscaling.min_gangs, (low, app.autoscaling)
    assert high == ranks * app.autoscaling.max_gangs, (high, app.autoscaling)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_layout_fits_the_worker_gpus_by_maverick_plan(path, tmp_path, capsys):
    manifest = load(path)
    app = our_app(manifest, path.name)
    (group,) = workers(manifest)
    product = group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    assert product in GPU_PRODUCTS, f"{product}: a GPU `maverick plan` does not know"
    config = tmp_path / "serve.yaml"
    config.write_text(manifest["spec"]["serveConfigV2"])
    # the checkpoint is not here: its architecture and weight format come from its directory's name
    preset = "maverick" if "Maverick" in app.model else "scout"
    weights = "fp8" if app.model.upper().endswith("FP8") else "bf16"
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(), run_plan)
    args = parser.parse_args(["plan", str(config), "--preset", preset, "--weights", weights, "--gpu",
                              GPU_PRODUCTS[product], "--gpus-per-node", str(gpus(ray_container(group))), "--json"])
    code = args.func(args)
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["fits"], report["report"]


# -- (3) security ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_ray_token_auth_is_on(path):
    cluster = load(path)["spec"]["rayClusterConfig"]
    assert cluster.get("authOptions", {}).get("mode") == "token"
    assert "enableK8sTokenAuth" not in cluster["authOptions"]  # KubeRay refuses it for a RayService
    major, minor, _ = map(int, cluster["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), "Ray's token auth needs 2.52"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_dashboard_is_reached_only_with_the_token_inside_the_cluster(path):
    manifest = load(path)
    params = head(manifest)["rayStartParams"]
    # KubeRay's operator calls the dashboard at the head Service's address, so it cannot be 127.0.0.1
    # here; what guards it is the token and a Service that stays inside the cluster
    assert params["dashboard-host"] == "0.0.0.0"
    assert manifest["spec"]["rayClusterConfig"]["authOptions"]["mode"] == "token"
    assert head(manifest).get("serviceType") == "ClusterIP"
    assert ports(ray_container(head(manifest)))["dashboard"] == 8265


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_serve_service_exposes_only_the_serving_ports(path):
    manifest = load(path)
    service = manifest["spec"]["serveService"]["spec"]
    assert service["type"] == "ClusterIP"
    assert {p["port"] for p in service["ports"]} == SERVING_PORTS
    assert all(is_serving_port_name(p["name"]) for p in service["ports"])
    # KubeRay adds every head port named serve or serve-* to that Service: none may be another port
    head_serving = {port for name, port in ports(ray_container(head(manifest))).items() if is_serving_port_name(name)}
    assert head_serving == SERVING_PORTS
    config = serve_config(manifest)
    assert {config["http_options"]["port"], config["grpc_options"]["port"]} == SERVING_PORTS
    assert "host" in config["http_options"]  # Serve's file default binds every interface silently


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_no_pod_binds_the_node_network(path):
    # Serve listens on 0.0.0.0 inside the pod; with the host's network that would be the node's interfaces
    for template in pod_templates(load(path)):
        assert not template["spec"].get("hostNetwork")
        for container in template["spec"]["containers"]:
            assert all("hostPort" not in p for p in container.get("ports", [])), container["name"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_no_rank_can_land_on_the_head(path):
    group = head(load(path))
    assert group["rayStartParams"]["num-gpus"] == "0"
    assert all(gpus(c) == 0 and "nvidia.com/gpu" not in c["resources"].get("requests", {})
               for c in group["template"]["spec"]["containers"])


# -- what KubeRay relies on ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_metrics_port_is_fixed_and_declared(path):
    manifest = load(path)
    static = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus-static.yml").read_text())
    scraped = {int(t.rsplit(":", 1)[1]) for job in static["scrape_configs"] if job["job_name"] == "ray"
               for group in job["static_configs"] for t in group["targets"]}
    for group in [head(manifest), *workers(manifest)]:
        port = int(group["rayStartParams"]["metrics-export-port"])
        assert ports(ray_container(group)).get("metrics") == port and scraped == {port}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_probes_check_what_kuberay_would(path):
    manifest = load(path)
    head_container = ray_container(head(manifest))
    # a Serve check on the head would take it out of the head Service the workers join through
    for probe in ("readinessProbe", "livenessProbe"):
        port = head_container.get(probe, {}).get("httpGet", {}).get("port")
        assert port not in {*SERVING_PORTS, "serve", "serve-grpc"}, probe
    for group in workers(manifest):
        container = ray_container(group)
        serve_port = container["readinessProbe"]["httpGet"]["port"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/-/healthz"
        assert ports(container).get(serve_port, serve_port) == 8000  # this pod's Serve proxy
        agent_port = group["rayStartParams"].get("dashboard-agent-listen-port", DASHBOARD_AGENT_PORT)
        assert container["livenessProbe"]["httpGet"] == {"path": "/api/healthz", "port": int(agent_port)}
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 300, "a restart reloads the weights"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_worker_pods_have_shared_memory_for_nccl(path):
    for group in workers(load(path)):
        spec = group["template"]["spec"]
        container = ray_container(group)
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["emptyDir"]["medium"] == "Memory"
        shm = quantity(volume["emptyDir"]["sizeLimit"])
        assert quantity(group["rayStartParams"]["object-store-memory"]) <= shm  # else Ray falls back to disk
        assert shm < quantity(container["resources"]["limits"]["memory"])  # memory-backed: charged to the pod


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_groups_are_complete(path):
    manifest = load(path)
    for group in workers(manifest):  # autoscaling is off: KubeRay wants both bounds
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    for template in pod_templates(manifest):
        volumes = {v["name"] for v in template["spec"].get("volumes", [])}
        for container in template["spec"]["containers"]:
            assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes, container["name"]
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], container["name"]  # no overcommit of a GPU node


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_image_is_pinned_and_built_from_the_rays_version(path):
    manifest = load(path)
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{manifest['spec']['rayClusterConfig']['rayVersion']}-")
    assert re.search(rf"^ARG VERSION={re.escape(version)}$", dockerfile, re.M), "the Dockerfile installs another"
    images = {c["image"] for t in pod_templates(manifest) for c in t["spec"]["containers"]}
    assert len(images) == 1 and images.pop().endswith(f"/maverick:{version}")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_api_key_comes_from_a_secret_on_every_pod(path):
    """The serving ports need their own key (Ray's token does not cover them); it lives in a Secret,
    and every pod that may hold the ingress replica gets it under the name the app reads."""
    manifest = load(path)
    app = our_app(manifest, path.name)
    assert app.api_key is None and app.api_key_env
    for template in pod_templates(manifest):
        env = {e["name"]: e for e in template["spec"]["containers"][0].get("env", [])}
        assert "secretKeyRef" in env[app.api_key_env]["valueFrom"], env


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="rewrite tests/deploy/schemas/rayservice-v1.json from KubeRay's CRD")
    cli.add_argument("--refresh", metavar="CRD_YAML", required=True, help=f"a copy of KubeRay's {CRD_PATH}")
    cli.add_argument("--commit", default=KUBERAY_COMMIT, help="the KubeRay commit that file comes from")
    options = cli.parse_args()
    crd = yaml.load(Path(options.refresh).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    SCHEMA.write_text(json.dumps(reduce_crd(crd, options.commit), indent=0, sort_keys=True) + "\n")
    print(f"wrote {SCHEMA} ({SCHEMA.stat().st_size:,} bytes); update KUBERAY_COMMIT if the commit changed")
