"""configs/grafana/rayinfer.json: every query asks for series that `/metrics` exports, with labels they carry.

The exported names are read from the code, not listed here: the test renders `/metrics` the way a replica does
(`render_prometheus` over a replica's snapshot) and parses it back, so a renamed or removed metric fails here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client", reason="installed with the 'serve' extra")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from rayinfer.cluster.metrics import ReplicaMetrics, render_prometheus  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[2] / "configs" / "grafana" / "rayinfer.json"
METRIC = re.compile(r"\brayinfer_[A-Za-z0-9_:]+")
SELECTOR = re.compile(r"(rayinfer_[A-Za-z0-9_:]+)\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
RATE_OF = re.compile(r"\b(?:rate|irate|increase)\(\s*(rayinfer_[A-Za-z0-9_:]+)")


def _exported() -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """Sample name -> its family, its family's type, its label names: as `/metrics` renders them."""
    metrics = ReplicaMetrics()
    metrics.track().on_end()  # one ended request, so the by-reason counter has a sample and shows its labels
    engine = {"num_blocks": 8, "num_free_blocks": 4, "num_running": 1, "num_waiting": 0}
    text = render_prometheus([metrics.snapshot(engine)], "m").decode()
    families, kinds, labels = {}, {}, {}
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:
            families[family.name + suffix] = family.name
            kinds[family.name + suffix] = family.type
            labels[family.name + suffix] = set()
        for sample in family.samples:
            labels[sample.name] |= set(sample.labels)
    return families, kinds, labels


FAMILIES, KINDS, LABELS = _exported()


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and every query variable."""
    board = _dashboard()
    exprs = [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]
    variables = [v for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs + [(f"variable {v['name']}", v["query"]["query"]) for v in variables]


def _call_arguments(expr: str, function: str) -> list[str]:
    """The text inside the parentheses of each call of `function` in `expr`."""
    args = []
    for match in re.finditer(rf"\b{function}\(", expr):
        depth, start = 1, match.end()
        for i in range(start, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            if depth == 0:
                args.append(expr[start:i])
                break
    return args


def test_exported_names_come_from_the_code() -> None:
    assert KINDS["rayinfer_num_preemptions_total"] == "counter"
    assert KINDS["rayinfer_time_to_first_token_seconds_bucket"] == "histogram"
    assert LABELS["rayinfer_request_success_total"] == {"model_name", "finished_reason"}


def test_every_panel_has_a_query_and_uses_the_datasource_variable() -> None:
    board = _dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert board["panels"] and len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in board["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert target["datasource"]["uid"] == panel["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("title, expr", _exprs())
def test_queries_ask_for_exported_series_and_labels(title: str, expr: str) -> None:
    names = METRIC.findall(expr)
    assert names, f"{title}: no rayinfer_ metric in {expr!r}"
    assert set(names) <= set(KINDS), f"{title}: {sorted(set(names) - set(KINDS))} are not exported"
    for name, matchers in SELECTOR.findall(expr):
        assert set(MATCHER_LABEL.findall(matchers)) <= LABELS[name], f"{title}: {name} has no such label"
    carried = set().union(*(LABELS[name] for name in names))
    for by in BY.findall(expr):
        grouped = {label.strip() for label in by.split(",") if label.strip()}
        assert grouped <= carried, f"{title}: groups by {sorted(grouped - carried)}, which no series carries"
    for name in RATE_OF.findall(expr):
        assert KINDS[name] != "gauge", f"{title}: rate() of the gauge {name}"


@pytest.mark.parametrize("title, expr", [(t, e) for t, e in _exprs() if "histogram_quantile" in e])
def test_histogram_quantile_is_over_histogram_buckets(title: str, expr: str) -> None:
    for argument in _call_arguments(expr, "histogram_quantile"):
        names = METRIC.findall(argument)
        assert names and all(KINDS[n] == "histogram" and n.endswith("_bucket") for n in names), (title, argument)
        for by in BY.findall(argument):  # an aggregation that drops `le` leaves no buckets to interpolate
            assert "le" in {label.strip() for label in by.split(",")}, (title, argument)


def test_every_exported_metric_is_charted() -> None:
    charted = {FAMILIES.get(name) for _, expr in _exprs() for name in METRIC.findall(expr)}
    assert set(FAMILIES.values()) - charted == set()
