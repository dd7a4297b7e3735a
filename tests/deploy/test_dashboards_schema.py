"""The committed dashboards hold only what Grafana's dashboard schema knows (grafana-foundation-sdk's model).

The SDK's models read a dashboard's JSON field by field and drop what their schema lacks (reading may
add a default, such as an empty `custom`), so a dashboard whose every value survives the round trip has
no field, or misspelt field, that Grafana would ignore.
"""

import copy
import json
from pathlib import Path

import pytest
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from cluster import dashboards

register_default_plugins()  # Prometheus queries and the panels' options read by their own models, not kept as bags
FILES = sorted((Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards").glob("*.json"))


def round_trip(board: dict) -> dict:
    return json.loads(JSONEncoder().encode(Dashboard.from_json(board)))


def leaves(x, path=()) -> set:
    if isinstance(x, dict) and x:
        return set().union(*(leaves(v, path + (k,)) for k, v in x.items()))
    if isinstance(x, list) and x:
        return set().union(*(leaves(v, path + (i,)) for i, v in enumerate(x)))
    return {(path, json.dumps(x))}


def known(board: dict) -> bool:
    """Every value of `board` is read back by the schema's models."""
    return leaves(board) <= leaves(round_trip(board))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_committed_dashboard_survives_the_schema_round_trip(path):
    board = json.loads(path.read_text())
    assert known(board)


def test_a_field_outside_the_schema_is_caught():
    board = dashboards.dashboard("maverick-serving")
    bad = copy.deepcopy(board)
    bad["panels"][0]["targets"][0]["legendFromat"] = "{{outcome}}"  # misspelt: Grafana would ignore it
    worse = copy.deepcopy(board)
    worse["panels"][1]["fieldConfig"]["defaults"]["units"] = "s"
    assert known(board) and not known(bad) and not known(worse)


def test_panels_keep_their_kind_unit_and_queries():
    for uid, (_, panels) in dashboards.DASHBOARDS.items():
        board = dashboards.dashboard(uid)
        assert [p["type"] for p in board["panels"]] == [p.kind for p in panels]
        assert [p["fieldConfig"]["defaults"]["unit"] for p in board["panels"]] == [p.unit for p in panels]
        assert [[t["expr"] for t in p["targets"]] for p in board["panels"]] == \
            [[expr for expr, _ in p.targets] for p in panels]
        grids = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in board["panels"]]
        assert grids == [(12 * (i % 2), 8 * (i // 2)) for i in range(len(panels))]  # two to a row, no overlap
