"""The routes file: the documented form loads, and every kind of mistake stops start-up with a
message naming the route (or endpoint), the key and the problem."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from specdec.router.calibration import Calibration
from specdec.router.confidence import ConfidenceMethod
from specdec.router.routes import Comparison, RoutesError, load_routes, parse_routes

SEED = """
routes:
  - name: support-triage
    primary: draft                 # the small model served alone
    escalate_to: speculative       # a local mode, an endpoint name, or a list: a cascade tried in order
    confidence: quantile           # mean_prob | min_prob | geometric_mean | quantile (with q)
    escalate_if:
      - confidence_below: 0.85
      - schema_invalid: true
      - tools_needed: "> 1"
      - input_tokens_above: 2048   # the job crosses a complexity threshold
endpoints:
  frontier-api: {kind: openai, base_url: "http://127.0.0.1:8000/v1", model: "big", api_key_env: FRONTIER_API_KEY, timeout_s: 30, retries: 2}
"""


def test_the_documented_form_loads(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(SEED)
    config = load_routes(path)
    route = config.routes["support-triage"]
    assert route.primary == "draft" and route.escalate_to == ("speculative",)
    assert route.confidence == ConfidenceMethod("quantile", 0.1)  # q's default
    assert route.rules.confidence_below == 0.85 and route.rules.schema_invalid
    assert route.rules.tools_needed == Comparison(">", 1) and route.rules.input_tokens_above == 2048
    assert route.local_modes == {"draft", "speculative"} and route.on_endpoint_failure == "error"
    assert route.drift.window == 200 and route.drift.tolerance == 0.1 and route.drift.baseline is None
    endpoint = config.endpoints["frontier-api"]
    assert endpoint.model == "big" and endpoint.retries == 2 and endpoint.api_key_env == "FRONTIER_API_KEY"
    # Every setting the endpoint has is a key the file may set.
    tuned = parse_routes({**yaml.safe_load(SEED), "endpoints": {"frontier-api": {
        "kind": "openai", "base_url": "http://x/v1", "model": "m", "backoff_s": 0.1, "cooldown_s": 5, "failures_to_cool": 2,
    }}})  # fmt: skip
    assert (
        tuned.endpoints["frontier-api"].backoff_s == 0.1
        and tuned.endpoints["frontier-api"].failures_to_cool == 2
    )


def test_a_cascade_with_an_endpoint_and_a_calibration(tmp_path):
    (tmp_path / "cal.json").write_text(json.dumps({"method": "isotonic", "points": [[0, 0.1], [1, 0.9]]}))
    data = yaml.safe_load(SEED)
    data["routes"][0].update(
        escalate_to=["speculative", "frontier-api"], confidence="min_prob", calibration="cal.json",
        on_endpoint_failure="primary_answer",
    )  # fmt: skip
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(data))
    route = load_routes(path).routes["support-triage"]  # the calibration path is relative to the file
    assert route.tiers == ("draft", "speculative", "frontier-api") and route.local_modes == {
        "draft",
        "speculative",
    }
    assert route.calibration(0.5) == pytest.approx(0.5) and route.on_endpoint_failure == "primary_answer"


def _route(**changes):
    data = yaml.safe_load(SEED)
    for key, value in changes.items():
        if value is None:
            data["routes"][0].pop(key)
        else:
            data["routes"][0][key] = value
    return data


def _rules(*rules):
    return _route(escalate_if=list(rules))


def _endpoint(**changes):
    data = yaml.safe_load(SEED)
    data["endpoints"]["frontier-api"].update(changes)
    return data


BAD = {
    "top-level key": ({**yaml.safe_load(SEED), "route": []}, r"routes.yaml: unknown key 'route'; known: endpoints, routes"),
    "not a mapping": ([1, 2], "expected a mapping with 'routes'"),
    "no routes": ({"routes": []}, "routes: expected a non-empty list"),
    "route key": (_route(threshold=0.5), r"route 'support-triage': unknown key 'threshold'"),
    "no name": (_route(name=None), r"routes\[0\]: name: required"),
    "no primary": (_route(primary=None), r"route 'support-triage': primary: required"),
    "unknown primary": (_route(primary="small"), r"route 'support-triage': primary: unknown tier 'small'; known: draft, speculative, target, frontier-api"),
    "unknown in a cascade": (_route(escalate_to=["target", "gpt"]), r"route 'support-triage': escalate_to\[1\]: unknown tier 'gpt'"),
    "tier twice": (_route(escalate_to=["target", "target"]), "tier 'target' appears twice"),
    "escalate to itself": (_route(escalate_to="draft"), "tier 'draft' appears twice"),
    "rules without a tier": (_route(escalate_to=None), "escalate_if: the route has no escalate_to tier"),
    "a tier without rules": (_route(escalate_if=None), "escalates to 'speculative' but sets no rule"),
    "threshold above 1": (_rules({"confidence_below": 1.5}), r"escalate_if\[0\]: confidence_below: a threshold in \[0, 1\], got 1.5"),
    "threshold below 0": (_rules({"confidence_below": -0.1}), r"confidence_below: a threshold in \[0, 1\]"),
    "threshold a word": (_rules({"confidence_below": "high"}), r"confidence_below: a threshold in \[0, 1\], got 'high'"),
    "threshold a bool": (_rules({"confidence_below": True}), r"confidence_below: a threshold in \[0, 1\], got True"),
    "comparison a word": (_rules({"tools_needed": "> one"}), r"escalate_if\[0\]: tools_needed: expected a comparison such as \"> 1\""),
    "comparison doubled": (_rules({"tools_needed": ">> 1"}), "expected a comparison"),
    "comparison bare": (_rules({"tools_needed": 1}), r"expected a comparison .* got 1"),
    "comparison fraction": (_rules({"tools_needed": "> 1.5"}), "expected a comparison"),
    "unknown rule": (_rules({"confidence_above": 0.2}), r"escalate_if\[0\]: unknown rule 'confidence_above'"),
    "rule twice": (_rules({"input_tokens_above": 5}, {"input_tokens_above": 6}), r"escalate_if\[1\]: input_tokens_above: the rule is given twice"),
    "rule not a mapping": (_rules("schema_invalid"), r"escalate_if\[0\]: expected a rule"),
    "rules not a list": (_route(escalate_if={"schema_invalid": True}), "escalate_if: expected a list of rules"),
    "schema_invalid false": (_rules({"schema_invalid": False}), "schema_invalid: the only setting is true"),
    "negative tokens": (_rules({"input_tokens_above": -1}), "input_tokens_above: a whole number of tokens >= 0, got -1"),
    "fraction of tokens": (_rules({"input_tokens_above": 20.5}), "input_tokens_above: a whole number"),
    "unknown method": (_route(confidence="entropy"), r"route 'support-triage': confidence: one of quantile, mean_prob, min_prob, geometric_mean, got 'entropy'"),
    "q out of range": (_route(q=1.5), r"route 'support-triage': q: a quantile in \[0, 1\], got 1.5"),
    "q without quantile": (_route(confidence="mean_prob", q=0.2), "q: only the quantile method takes q"),
    "failure policy": (_route(on_endpoint_failure="retry"), "on_endpoint_failure: one of error, primary_answer, got 'retry'"),
    "missing calibration": (_route(calibration="nope.json"), r"route 'support-triage': calibration: .*nope.json: cannot read"),
    "drift key": (_route(drift={"windows": 5}), r"route 'support-triage': drift: unknown key 'windows'"),
    "drift window": (_route(drift={"window": 5}), r"drift: window: a whole number of requests in \[10, 100000\], got 5"),
    "drift tolerance": (_route(drift={"tolerance": 2}), r"drift: tolerance: a rate in \[0, 1\], got 2"),
    "drift baseline": (_route(drift={"baseline": "low"}), r"drift: baseline: a rate in \[0, 1\]"),
    "endpoint key": (_endpoint(timeout=3), r"endpoint 'frontier-api': unknown key 'timeout'"),
    "endpoint kind": (_endpoint(kind="anthropic"), r"endpoint 'frontier-api': kind: the supported kind is 'openai'"),
    "endpoint url": (_endpoint(base_url="ftp://x"), "endpoint frontier-api: base_url must be an http"),
    "endpoint without model": (_endpoint(model=""), r"endpoint 'frontier-api': model: required"),
    "endpoint timeout a word": (_endpoint(timeout_s="30s"), r"endpoint 'frontier-api': timeout_s: expected a number of seconds, got '30s'"),
    "endpoint retries fraction": (_endpoint(retries=1.5), "retries: expected a whole number"),
    "endpoint backoff a word": (_endpoint(backoff_s="1s"), r"endpoint 'frontier-api': backoff_s: expected a number of seconds"),
    "endpoint backoff negative": (_endpoint(backoff_s=-1), "backoff_s must be >= 0"),
    "endpoint named like a mode": ({**yaml.safe_load(SEED), "endpoints": {"draft": {"kind": "openai", "base_url": "http://x/v1", "model": "m"}}}, r"endpoint 'draft': the name is a local mode"),
}  # fmt: skip


@pytest.mark.parametrize("data,message", BAD.values(), ids=BAD.keys())
def test_every_mistake_is_refused_by_name(data, message, tmp_path):
    with pytest.raises(RoutesError, match=message):
        parse_routes(copy.deepcopy(data), "routes.yaml", base=tmp_path)


def test_duplicate_route_names_and_a_bad_file_are_refused(tmp_path):
    data = yaml.safe_load(SEED)
    data["routes"].append(copy.deepcopy(data["routes"][0]))
    with pytest.raises(RoutesError, match=r"routes\[1\]: route name 'support-triage' is used twice"):
        parse_routes(data, "routes.yaml")
    path = tmp_path / "routes.yaml"
    path.write_text("routes: [unclosed")
    with pytest.raises(RoutesError, match=r"routes.yaml: not valid YAML"):
        load_routes(path)
    with pytest.raises(RoutesError, match=r"missing.yaml: cannot read the routes file"):
        load_routes(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "text,true_at,false_at",
    [("> 1", 2, 1), (">= 2", 2, 1), ("== 0", 0, 1), ("< 3", 2, 3), ("<= 3", 3, 4), ("  >=0 ", 0, -1)],
)
def test_comparisons(text, true_at, false_at):
    comparison = Comparison.parse(text, "here")
    assert comparison.holds(true_at) and not comparison.holds(false_at)
    assert str(Comparison.parse(str(comparison), "again")) == str(comparison)


def test_confidence_methods():
    p = torch.tensor([0.9, 0.95, 0.2, 0.99, 0.8, 0.9, 0.97, 0.85, 0.9, 0.99])
    assert ConfidenceMethod.make("mean_prob")(p) == pytest.approx(p.double().mean().item())
    assert ConfidenceMethod.make("min_prob")(p) == pytest.approx(0.2)
    assert ConfidenceMethod.make("geometric_mean")(p) == pytest.approx(p.double().log().mean().exp().item())
    assert ConfidenceMethod.make("quantile", 0.5)(p) == pytest.approx(0.9)
    assert ConfidenceMethod.make("quantile", 0.0)(p) == pytest.approx(0.2)
    assert ConfidenceMethod.make()(p) == pytest.approx(torch.quantile(p.double(), 0.1).item())
    for method in ("quantile", "mean_prob", "min_prob", "geometric_mean"):
        assert ConfidenceMethod.make(method)(torch.tensor([])) == 0.0  # nothing to trust
    # The length bias the default avoids: the same per-token distribution, ten times as long.
    long = p.repeat(10)
    assert ConfidenceMethod.make()(long) == pytest.approx(ConfidenceMethod.make()(p), abs=0.02)


def test_calibration_maps_monotonically_and_refuses_bad_files(tmp_path):
    cal = Calibration.from_dict({"method": "isotonic", "points": [[0.2, 0.1], [0.6, 0.5], [0.9, 0.8]]})
    assert (
        cal(0.0) == pytest.approx(0.1) and cal(0.4) == pytest.approx(0.3) and cal(1.0) == pytest.approx(0.8)
    )
    assert Calibration.from_dict(cal.to_dict()) == Calibration(cal.raw, cal.calibrated, "calibration")
    bad = [
        ({"points": [[0, 0], [1, 1]]}, "expected"),
        ({"method": "isotonic", "points": [[0, 0]]}, "at least two"),
        ({"method": "isotonic", "points": [[0, 0], [0, 1]]}, r"points\[1\]: raw confidences must increase"),
        (
            {"method": "isotonic", "points": [[0, 0.5], [1, 0.4]]},
            r"points\[1\]: calibrated values must not decrease",
        ),
        ({"method": "isotonic", "points": [[0, 0], [1, 1.5]]}, r"points\[1\]: a pair of numbers in \[0, 1\]"),
    ]
    for data, message in bad:
        with pytest.raises(Exception, match=message):
            Calibration.from_dict(data)
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(Exception, match=r"c\.json: not valid JSON"):
        Calibration.load(tmp_path / "c.json")


def test_the_documented_example_file_loads():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "docs" / "examples" / "routes-demo.yaml"
    route = load_routes(example).routes["code"]
    assert route.primary == "draft" and route.rules.confidence_below == 0.05
    smollm2 = load_routes(example.with_name("routes-smollm2.yaml"))
    route = smollm2.routes["assistant"]
    assert route.primary == "speculative" and route.escalate_to == ("frontier",)
    assert route.rules.tools_needed == Comparison(">", 1) and route.on_endpoint_failure == "primary_answer"
    assert smollm2.endpoints["frontier"].base_url == "http://127.0.0.1:8101/v1"
