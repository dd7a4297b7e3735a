"""The `maverick` console script, run as a user runs it."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.oracle import hf_greedy

MAVERICK = str(Path(sys.executable).with_name("maverick"))
ROOT = Path(__file__).resolve().parents[2]


def run(*args, check=True):
    proc = subprocess.run([MAVERICK, *args], capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"maverick {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    assert run("make-tiny", str(out), "--preset", "tiny-maverick", "--seed", "5").stdout.strip() == str(out)
    return out


@pytest.fixture(scope="module")
def hf(tiny):
    from transformers import Llama4ForCausalLM

    return Llama4ForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation="eager").eval()


def test_generate_prompt_ids_batch_equals_transformers_alone(tiny, hf):
    prompts = [[11, 12, 13, 14], list(range(300, 460, 3)), [7] * 9]
    args = ["generate", "--model", str(tiny), "--max-tokens", "20"]
    for p in prompts:
        args += ["--prompt-ids", " ".join(map(str, p))]
    lines = run(*args).stdout.strip().splitlines()
    assert len(lines) == len(prompts)
    eos = set(json.loads((tiny / "generation_config.json").read_text())["eos_token_id"])
    for line, prompt in zip(lines, prompts):
        result = json.loads(line)
        expected = hf_greedy(hf, prompt, 20)
        cut = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
        assert result["token_ids"] == expected[:cut]
        assert isinstance(result["text"], str)


def test_generate_text_and_chat_prompts(tiny, hf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    out = run("generate", "--model", str(tiny), "--prompt", "The quick brown fox", "--max-tokens", "8")
    result = json.loads(out.stdout)
    ids = tok("The quick brown fox")["input_ids"]
    assert result["token_ids"] == hf_greedy(hf, ids, 8)[:len(result["token_ids"])]
    assert result["text"] == tok.decode(result["token_ids"], skip_special_tokens=True)
    chat = run("generate", "--model", str(tiny), "--chat", "--prompt", "Hi!", "--max-tokens", "4")
    chat_ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True)
    chat_ids = chat_ids if isinstance(chat_ids, list) else chat_ids["input_ids"]
    assert json.loads(chat.stdout)["token_ids"] == hf_greedy(hf, chat_ids, 4)[:len(json.loads(chat.stdout)["token_ids"])]


def test_generate_errors_are_clear(tmp_path):
    proc = run("generate", "--model", "meta-llama/Llama-4-Scout", "--prompt", "x", check=False)
    assert proc.returncode != 0 and "local directory" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("generate", "--model", str(tmp_path), "--prompt-ids", "1 x", check=False)
    assert proc.returncode != 0 and "integers" in proc.stderr


def test_generate_through_a_gang_equals_single_process(tiny):
    args = ["generate", "--model", str(tiny), "--max-tokens", "10", "--prompt-ids", "11 12 13 14",
            "--prompt-ids", " ".join(map(str, range(300, 360)))]
    single = run(*args).stdout.strip().splitlines()
    gang = run(*args, "--expert-workers", "2").stdout.strip().splitlines()
    assert [json.loads(x)["token_ids"] for x in gang] == [json.loads(x)["token_ids"] for x in single]
    assert all(line.startswith("{") for line in gang)  # logs stay on stderr


@pytest.mark.parametrize("host, proxy", [(None, "haproxy"), ("127.0.0.1", "haproxy"), ("0.0.0.0", "haproxy"),
                                         ("10.1.2.3", "python")])
def test_serve_takes_haproxy_unless_the_host_is_one_it_cannot_serve(host, proxy, capsys):
    from router.cli.serve import _local_proxy

    assert _local_proxy("haproxy", host) == proxy
    assert ("Python proxy" in capsys.readouterr().err) == (proxy == "python")
    assert _local_proxy("python", "127.0.0.1") == "python"


def test_make_tiny_takes_every_preset_of_model_tiny():
    """The presets come from `model.tiny.TINY_PRESETS` (the README's `--preset maverick-full-depth`
    once failed with `invalid choice`)."""
    from model.tiny import TINY_PRESETS
    from router.cli import build_parser

    for preset in TINY_PRESETS:
        assert build_parser().parse_args(["make-tiny", "d", "--preset", preset]).preset == preset
    assert "maverick-full-depth" in build_parser()._subparsers._group_actions[0].choices["make-tiny"].format_help()


def test_serve_help_explains_every_flag_with_its_default():
    from router.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    text = serve.format_help()
    # one entry per flag: from its first option string to the next flag's
    entries = re.split(r"\n  (?=-)", text[text.index("\n  -h, --help"):])
    for action in serve._actions:
        if not action.option_strings or action.dest in ("help", "debug"):
            continue
        entry = next(e for e in entries if e.startswith(action.option_strings[0]))
        assert action.help and "default" in entry, entry
    assert "--expert-workers EXPERT_WORKERS" in text and "(default: 0)" in text


def test_serve_eplb_flags_become_the_apps_eplb_args():
    from cluster.serve_config import config_from_flags, validate_serve_config
    from router.cli import build_parser

    flags = ["serve", "--model", "/m", "--expert-workers", "3", "--redundant-experts", "2",
             "--rebalance-every-steps", "128", "--weight-read-rows", "18"]
    config = config_from_flags(build_parser().parse_args(flags))
    _, (app,) = validate_serve_config(config, "flags")
    assert (app.eplb.redundant_experts, app.eplb.rebalance_every_steps, app.eplb.weight_read_rows) == (2, 128, 18)
    plain = config_from_flags(build_parser().parse_args(["serve", "--model", "/m"]))
    assert "eplb" not in plain["applications"][0]["args"]
    with pytest.raises(ValueError, match="eplb balances experts over expert ranks"):
        validate_serve_config(config_from_flags(build_parser().parse_args(flags[:3] + flags[5:])), "flags")


def test_serve_spares_flag_becomes_the_apps_spares():
    from cluster.serve_config import config_from_flags, validate_serve_config
    from router.cli import build_parser

    flags = ["serve", "--model", "/m", "--expert-workers", "2", "--spares", "1", "--attention-spares", "2"]
    _, (app,) = validate_serve_config(config_from_flags(build_parser().parse_args(flags)), "flags")
    assert (app.spares, app.attention_spares) == (1, 2)
    with pytest.raises(ValueError, match="spares stand in for failed ranks"):
        validate_serve_config(config_from_flags(build_parser().parse_args(flags[:3] + flags[5:])), "flags")


def test_serve_gang_bound_flags_become_the_apps_autoscaling_args():
    from cluster.serve_config import config_from_flags, validate_serve_config
    from router.cli import build_parser

    flags = ["serve", "--model", "/m", "--min-gangs", "1", "--max-gangs", "3", "--target-load", "0.5"]
    _, (app,) = validate_serve_config(config_from_flags(build_parser().parse_args(flags)), "flags")
    assert (app.autoscaling.min_gangs, app.autoscaling.max_gangs, app.autoscaling.target_load) == (1, 3, 0.5)
    assert app.initial_gangs == 1
    plain = config_from_flags(build_parser().parse_args(["serve", "--model", "/m", "--num-gangs", "2"]))
    assert "autoscaling" not in plain["applications"][0]["args"] and plain["applications"][0]["args"]["num_gangs"] == 2
    with pytest.raises(ValueError, match="num_gangs \\(4\\) must lie within"):
        validate_serve_config(config_from_flags(build_parser().parse_args(flags + ["--num-gangs", "4"])), "flags")


def test_serve_max_attention_workers_turns_attention_scaling_on_from_the_attention_workers():
    from cluster.serve_config import config_from_flags, validate_serve_config
    from router.cli import build_parser

    flags = ["serve", "--model", "/m", "--expert-workers", "2", "--max-attention-workers", "3"]
    _, (app,) = validate_serve_config(config_from_flags(build_parser().parse_args(flags)), "flags")
    scaling = app.attention_scaling
    assert (scaling.min_attention_workers, scaling.max_attention_workers, app.attention_workers) == (1, 3, 1)
    with pytest.raises(ValueError, match="needs expert_workers >= 1"):
        validate_serve_config(config_from_flags(build_parser().parse_args(flags[:3] + flags[5:])), "flags")


def test_serve_says_each_change_of_a_gangs_attention_ranks_once():
    from router.cli.serve import AttentionRanks, _attention_gauges

    text = ('# HELP maverick_gang_attention_ranks ...\n'
            'maverick_gang_attention_ranks{gang="gang-a",model_name="tiny"} 1.0\n'
            'maverick_gang_attention_ranks{gang="gang-b",model_name="tiny"} 2.0\n'
            'maverick_gang_ready{gang="gang-a",model_name="tiny"} 1.0\n')
    assert _attention_gauges(text) == {"gang-a": 1, "gang-b": 2}
    said = []
    ranks = AttentionRanks("http://127.0.0.1:1/metrics", None, said.append)
    ranks.update({"gang-a": 1, "gang-b": 2})
    ranks.update({"gang-a": 2, "gang-b": 2})
    ranks.update({"gang-a": 2})  # a read that missed a gang says nothing of it
    ranks.update({"gang-a": 1, "gang-b": 2})
    assert said == ["maverick: gang-a attention ranks: 1 -> 2", "maverick: gang-a attention ranks: 2 -> 1"]


def test_plan_that_does_not_fit_points_at_suggest(capsys):
    from router.cli import main

    assert main(["plan", "--preset", "maverick", "--weights", "bf16", "--gpu", "h100", "--gpus", "8"]) == 1
    out = capsys.readouterr().out
    assert "fits: NO" in out and "--suggest" in out.split("fits: NO")[1]


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port"])
def test_serve_on_a_taken_port_says_so_in_one_line(flag):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run("serve", "deploy/tiny-cpu.yaml", flag, str(port), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert f"port {port}" in lines[0] and flag in lines[0] and "Traceback" not in proc.stderr


def test_top_without_a_server_or_a_scheme_says_so_in_one_line():
    from tests.router.conftest import free_port

    refused = run("top", "--url", f"http://127.0.0.1:{free_port()}", "--once", check=False)
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "connection refused" in refused.stderr and "--url" in refused.stderr
    bare = run("top", "--url", "127.0.0.1:8000", "--once", check=False)
    assert bare.returncode != 0 and bare.stderr.strip().splitlines() == [
        "maverick top: --url needs a URL with its scheme, e.g. http://127.0.0.1:8000 (got '127.0.0.1:8000')"]
    debug = run("top", "--url", f"http://127.0.0.1:{free_port()}", "--once", "--debug", check=False)
    assert "Traceback" in debug.stderr  # --debug shows where it came from


def test_top_shows_eplb_only_where_its_series_exist():
    from router.cli.top import PrometheusSource

    class Answers:  # Prometheus answering only the eplb queries
        def __init__(self, eplb: bool):
            self.eplb = eplb

        def query(self, promql):
            if not self.eplb or "eplb_balancedness" not in promql:
                return []
            return [{"metric": {"layer": layer, "placement": placement}, "value": [0, value]}
                    for layer, placement, value in (("3", "served", "0.41"), ("3", "planned", "0.93"),
                                                    ("1", "served", "0.38"), ("1", "planned", "0.95"))]

        def value(self, promql):
            return 2.0 if self.eplb and "eplb_rebalances" in promql else None

    source = PrometheusSource("http://127.0.0.1:1", "maverick", "1m")
    source.prom = Answers(eplb=True)
    assert source._eplb_lines() == ["eplb: 2 rebalances in 1m; balancedness (served -> planned) by layer: "
                                    "L1 0.38 -> 0.95, L3 0.41 -> 0.93"]
    source.prom = Answers(eplb=False)
    assert source._eplb_lines() == []


def test_top_shows_the_gang_count_and_scaling_only_with_autoscaling():
    from router.cli.top import PrometheusSource

    class Answers:  # Prometheus with or without Serve's autoscaling series
        def __init__(self, autoscaling: bool):
            self.autoscaling = autoscaling

        def query(self, promql):
            if "gang_scaling_events" not in promql:
                return []
            return [{"metric": {"direction": "up"}, "value": [0, "3"]},
                    {"metric": {"direction": "down"}, "value": [0, "2"]}]

        def value(self, promql):
            if not self.autoscaling:
                return None
            return 2.0 if "desired_replicas" in promql else 1.0

    source = PrometheusSource("http://127.0.0.1:1", "maverick", "1m")
    source.prom = Answers(autoscaling=True)
    assert source._gangs_lines() == ["gangs: 1 ready, 2 wanted (autoscaling); scaled up 3, down 2 in the last hour"]
    source.prom = Answers(autoscaling=False)
    assert source._gangs_lines() == []


def test_top_shows_attention_scaling_only_once_a_gang_changed_its_attention_side():
    from router.cli.top import PrometheusSource

    class Answers:
        def __init__(self, moved: bool):
            self.moved = moved

        def query(self, promql):
            if "attention_scaling_events" not in promql or not self.moved:
                return []
            return [{"metric": {"direction": "up"}, "value": [0, "2"]},
                    {"metric": {"direction": "down"}, "value": [0, "1"]}]

    source = PrometheusSource("http://127.0.0.1:1", "maverick", "1m")
    source.prom = Answers(moved=True)
    assert source._attention_lines() == ["attention ranks: added 2, removed 1 in the last hour"]
    source.prom = Answers(moved=False)
    assert source._attention_lines() == []


def test_the_ready_banner_says_when_a_key_is_needed():
    from router.cli.serve import _banner

    app = {"name": "maverick", "args": {"served_model_name": "/tmp/tiny", "api_key": "sk-local"}}
    data = {"applications": [app], "grpc_options": {"port": 9000, "grpc_servicer_functions": ["x"]}}
    banner = _banner(data, "http://127.0.0.1:8100", "127.0.0.1", 12.0)
    assert "model: `/tmp/tiny`" in banner and "OpenAI API: http://127.0.0.1:8100/v1" in banner
    assert "gRPC maverick.v1.Generation: 127.0.0.1:9000" in banner
    assert "API key: required" in banner and "sk-local" not in banner  # never print the key itself


def test_serve_says_why_a_deployment_failed_and_each_change_of_the_gang_count():
    from types import SimpleNamespace

    from ray.serve._private.common import DeploymentStatus, ReplicaState

    from router.cli.serve import GangCount, _app_status, _gangs_running

    traceback = ("The deployment failed to start 3 times in a row. See controller logs for details. Error:\n"
                 "Traceback (most recent call last):\n  File ...\n"
                 "ValueError: api_key_env: environment variable MAVERICK_API_KEY is not set on this replica\n")
    ingress = SimpleNamespace(status=DeploymentStatus.DEPLOY_FAILED, message=traceback, replica_states={})
    gangs = SimpleNamespace(status=DeploymentStatus.HEALTHY, message="", replica_states={ReplicaState.RUNNING: 2})
    failed = SimpleNamespace(status="DEPLOY_FAILED", message="Failed to update the deployments ['ingress'].",
                             deployments={"ingress": ingress, "gangs": gangs})
    state, message = _app_status({"maverick": failed})
    assert state == "DEPLOY_FAILED" and message == (
        "maverick: Failed to update the deployments ['ingress'].\n  ingress: ValueError: api_key_env: "
        "environment variable MAVERICK_API_KEY is not set on this replica"), message
    assert _app_status(RuntimeError("down"))[0] == "UNREACHABLE"

    said = []
    count = GangCount(said.append)
    for running in (2, 2, None, 1, 2):
        count.update(running)
    assert said == ["maverick: gangs running: 2 -> 1", "maverick: gangs running: 1 -> 2"]
    assert _gangs_running({"maverick": failed}) == 2 and _gangs_running(RuntimeError("down")) is None


def test_the_gang_count_is_read_in_full_only_while_deployments_change():
    from types import SimpleNamespace

    from ray.serve._private.common import DeploymentStatus, ReplicaState

    from router.cli.serve import GangCount

    def light(gangs_status) -> dict:
        gangs = SimpleNamespace(status=gangs_status, status_trigger="AUTOSCALING", message="")
        return {"maverick": SimpleNamespace(status="RUNNING", message="", deployments={"gangs": gangs})}

    def details(running: int) -> dict:
        gangs = SimpleNamespace(replica_states={ReplicaState.RUNNING: running, ReplicaState.STARTING: 3 - running})
        return {"maverick": SimpleNamespace(deployments={"gangs": gangs})}

    full_reads, said = [], []
    answers = iter([details(1), RuntimeError("controller restarting"), details(1), details(2), details(3),
                    details(3), details(2), details(3)])

    def read_details():
        full_reads.append(1)
        return next(answers)

    count = GangCount(said.append, read_details)
    count.follow(light(DeploymentStatus.HEALTHY))  # the first light read: a full one follows
    count.follow(light(DeploymentStatus.HEALTHY))  # steady: no full read
    count.follow(RuntimeError("down"))
    assert len(full_reads) == 1 and said == []
    count.follow(light(DeploymentStatus.UPSCALING))  # the full read fails: tried again at the next one
    count.follow(light(DeploymentStatus.UPSCALING))
    count.follow(light(DeploymentStatus.UPSCALING))  # still scaling: read at every poll, one gang at a time
    count.follow(light(DeploymentStatus.UPSCALING))
    assert len(full_reads) == 5 and said == ["maverick: gangs running: 1 -> 2", "maverick: gangs running: 2 -> 3"]
    count.follow(light(DeploymentStatus.HEALTHY))  # the change to HEALTHY: one more full read
    count.follow(light(DeploymentStatus.HEALTHY))
    assert len(full_reads) == 6
    count.follow(light(DeploymentStatus.UNHEALTHY))  # a gang died: read while unhealthy
    count.follow(light(DeploymentStatus.UNHEALTHY))
    assert len(full_reads) == 8 and said[2:] == ["maverick: gangs running: 3 -> 2", "maverick: gangs running: 2 -> 3"]


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`maverick ... | head`: the pipe closes before the output is written; the CLI ends quietly."""
    proc = subprocess.Popen([MAVERICK, "plan", "deploy/gpu/scout-bf16-8xh100.yaml", "--preset", "scout", "--gpu",
                             "h100"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the CLI has even imported: every write it makes meets a closed pipe
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"BrokenPipe" not in err and b"Traceback" not in err, err
