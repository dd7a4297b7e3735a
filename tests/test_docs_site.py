"""The documentation site builds, and its reference pages say what the code does.

`mkdocs build --strict` fails on a broken link or anchor and on a page left out of the navigation.
The YAML reference is generated from the schema and must be current; the metric table, the HTTP field
tables and the gRPC field table must name everything the code has (tests/test_readme.py runs the
pages' code).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import yaml_reference

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def page(name: str) -> str:
    return (DOCS / name).read_text()


def named(text: str) -> set[str]:
    """Every `code span` of a page, and each name in a `a`, `b` list inside one table cell."""
    return {m.strip() for m in re.findall(r"`([^`]+)`", text)}


def test_the_site_builds_strictly(tmp_path):
    proc = subprocess.run([str(Path(sys.executable).with_name("mkdocs")), "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("index", "performance", "http-api", "deployment/yaml-reference"):
        assert (tmp_path / "site" / name / "index.html").is_file() or name == "index"
    assert "maverick" in (tmp_path / "site" / "index.html").read_text()


def test_every_page_is_in_the_navigation():
    import yaml

    def files(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from (files(value) if isinstance(value, list) else [value])

    nav = set(files(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == nav, (pages - nav, nav - pages)


def test_the_yaml_reference_is_current():
    assert yaml_reference.main(["--check"]) == 0, "run `python -m cluster.yaml_reference`"


def test_the_yaml_reference_lists_every_field_and_fails_without_a_meaning(monkeypatch):
    from cluster.config import AppConfig

    text = yaml_reference.render()
    for name in AppConfig.model_fields:
        assert f"| `{name}` |" in text, name
    assert "| `engine.kv_cache_memory` | int (>= 1) | 268435456 (256 MiB) |" in text
    monkeypatch.delitem(yaml_reference.MEANINGS, "num_gangs")
    with pytest.raises(ValueError, match="num_gangs: no description"):
        yaml_reference.render()


def exported_metrics() -> set[str]:
    """Metric names as the code creates them (f-strings expanded by hand: the engine phases); the
    scaling events come from the autoscaling policy in Serve's controller and a gang's attention scaler."""
    names = set()
    for path in ("router/metrics.py", "workers/metrics.py", "cluster/autoscale.py",
                 "cluster/attention_scaling.py"):
        names |= set(re.findall(r'"(maverick_[a-z0-9_]+)"', (ROOT / path).read_text()))
    assert 'f"maverick_request_{name}_time_seconds"' in (ROOT / "router/metrics.py").read_text()
    names |= {f"maverick_request_{p}_time_seconds" for p in ("queue", "prefill", "decode")}
    return names


def test_the_metric_table_names_every_metric_and_no_other():
    table = [line for line in page("observability.md").splitlines() if line.startswith("| `maverick_")]
    documented = {re.sub(r"\{.*", "", name).removesuffix("_total")
                  for line in table for name in re.findall(r"`(maverick_[^`]+)`", line.split("|")[1])}
    exported = exported_metrics()
    assert documented == exported, (sorted(exported - documented), sorted(documented - exported))


def test_the_http_page_names_every_request_field():
    from router.openai_models import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

    documented = set()
    for line in page("http-api.md").splitlines():
        if line.startswith("| `") or line.startswith("`POST /tokenize` takes"):
            documented |= named(line.split("|")[1] if line.startswith("|") else line)
    text = page("http-api.md")
    for model in (CompletionRequest, ChatCompletionRequest):
        missing = set(model.model_fields) - documented
        assert not missing, f"{model.__name__}: {sorted(missing)} not in docs/http-api.md's tables"
    for model in (TokenizeRequest, DetokenizeRequest):
        for name in model.model_fields:
            assert f"`{name}`" in text, name


def test_the_grpc_page_names_every_field_of_the_proto():
    from router import maverick_v1_pb2 as pb

    documented = set()
    for line in page("grpc.md").splitlines():
        if line.startswith("| `"):
            documented |= named(line.split("|")[1])
    request = {f.name for f in pb.GenerateRequest.DESCRIPTOR.fields}
    response = {f.name for f in pb.GenerateResponse.DESCRIPTOR.fields}
    assert request | response <= documented, sorted((request | response) - documented)
    text = page("grpc.md")
    for kind in pb.StructuredOutput.DESCRIPTOR.fields:
        assert f"`{kind.name}`" in text, kind.name


def test_the_error_table_has_a_row_for_every_status():
    from workers import errors

    rows = {line.split("|")[1].strip().split()[0] for line in page("http-api.md").splitlines()
            if re.match(r"\| \d{3}", line)}
    statuses = {str(cls.http_status) for cls in vars(errors).values()
                if isinstance(cls, type) and issubclass(cls, errors.EngineError)}
    assert statuses | {"401", "404", "413"} <= rows, rows
