"""The Grafana dashboards and Prometheus configs in deploy/ are valid and up to date (offline)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster import dashboards

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD_FILES = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
UNITS = {"reqps", "s", "short", "percentunit", "Bps"}


def test_committed_dashboards_equal_the_generator():
    assert [p.stem for p in DASHBOARD_FILES] == sorted(dashboards.DASHBOARDS)
    assert dashboards.stale() == [], "run `maverick dashboards` and commit deploy/grafana/dashboards"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboard_structure(path):
    board = json.loads(path.read_text())
    assert board["uid"] == path.stem and board["title"].startswith("maverick")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"application", "model", "gang"} <= variables.keys()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, panel["title"]
        assert panel["description"] and panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            expr = target["expr"]
            assert "$application" in expr, f"{panel['title']}: every query is filtered by application"
            assert expr.count("(") == expr.count(")"), expr
            if "rate(" in expr:
                assert "[$__rate_interval]" in expr, expr


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards():
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/maverick.yml").read_text())
    assert providers["providers"][0]["type"] == "file"


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-static.yml"])
def test_prometheus_configs_pass_promtool(name, tmp_path):
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(promtool).is_file():
        pytest.fail("promtool missing: `make install` installs Debian's prometheus package")
    config = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
    for job in config["scrape_configs"]:  # the key file is the operator's; give promtool one to read
        auth = job.get("authorization")
        if auth and "credentials_file" in auth:
            auth["credentials_file"] = str(tmp_path / "api_key")
            (tmp_path / "api_key").write_text("sk-test")
    checked = tmp_path / name
    checked.write_text(yaml.safe_dump(config))
    out = subprocess.run([promtool, "check", "config", str(checked)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"ray", "maverick-serve"} <= jobs
