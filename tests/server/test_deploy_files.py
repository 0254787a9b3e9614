"""The shipped Grafana dashboard and Prometheus alert rules parse, and every series they query is
one the server exports (a renamed metric would leave them silently empty)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from specdec.router.router import RouteRecord, TierSpend
from specdec.router.routes import Drift
from specdec.server.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SERIES = re.compile(r"\bspecdec_[a-z_]+")


def _exported() -> set[str]:
    metrics = Metrics()
    record = RouteRecord("r", "target", True, ("x",), ("confidence_below",), 0.4, None, True, True,
                         (TierSpend("draft", 3, 4),))  # fmt: skip
    for _ in range(10):  # a full window: the baseline and drift gauges exist from then on
        metrics.observe_route(record, Drift(window=10))
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


def test_the_dashboard_and_the_alerts_query_only_exported_series():
    exported = _exported()
    dashboard = json.loads((DEPLOY / "grafana-router-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    rules = yaml.safe_load((DEPLOY / "prometheus-router-alerts.yaml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {"SpecdecRouteEscalationDrift", "SpecdecRouteFallbacks"}
    queries += [a["expr"] for a in alerts] + [a["annotations"].get("description", "") for a in alerts]
    used = {name for q in queries for name in SERIES.findall(q)}
    assert used and used <= exported, sorted(used - exported)
