"""Every Serve config in deploy/ passes Ray's schema, our unknown-key check and our `args` schema."""

from pathlib import Path

import pytest

from cluster.serve_config import load_serve_config, validate_serve_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SERVE_CONFIGS = sorted(p for p in DEPLOY.rglob("*.yaml") if "applications" in p.read_text())


def test_there_are_serve_configs():
    assert DEPLOY / "tiny-cpu.yaml" in SERVE_CONFIGS


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_validates(path):
    schema, apps = validate_serve_config(load_serve_config(path), str(path))
    assert schema.applications and all(app is not None for app in apps)
    assert schema.http_options.host == "127.0.0.1"  # never bind every interface by default
