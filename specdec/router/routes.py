"""The routes file (`specdec serve --routes FILE`): what each route serves first, where it escalates
and when, checked strictly at start-up.

    routes:
      - name: support-triage
        primary: draft                 # a local mode (draft | speculative | target) or an endpoint
        escalate_to: speculative       # one tier, or a list: a cascade tried in order
        confidence: quantile           # quantile (with q; the default) | mean_prob | min_prob | geometric_mean
        q: 0.1
        escalate_if:
          - confidence_below: 0.85
          - schema_invalid: true
          - tools_needed: "> 1"
          - input_tokens_above: 2048
    endpoints:
      frontier-api: {kind: openai, base_url: "http://127.0.0.1:8000/v1", model: "big"}

Every problem stops start-up with one message naming the file, the route (or endpoint), the key and
what is wrong: an unknown key anywhere (never silently dropped), an unknown tier, a threshold
outside [0, 1], a malformed comparison, a rule given twice, a duplicate route name. Whether the
served pair can run a route's local tiers (a draft that cannot answer alone) is the server's check,
made where it knows the pair (`Route.local_modes`).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specdec.errors import SpecdecError
from specdec.router.calibration import Calibration
from specdec.router.confidence import ConfidenceMethod
from specdec.router.endpoints import OpenAIEndpoint

LOCAL_MODES = ("draft", "speculative", "target")

_ROUTE_KEYS = {
    "name", "primary", "escalate_to", "confidence", "q", "escalate_if", "calibration", "on_endpoint_failure",
    "drift",
}  # fmt: skip
_DRIFT_KEYS = {"window", "tolerance", "baseline"}
_RULE_KEYS = ("confidence_below", "schema_invalid", "tools_needed", "input_tokens_above")
_ENDPOINT_KEYS = {
    "kind",
    "base_url",
    "model",
    "api_key_env",
    "timeout_s",
    "retries",
    "backoff_s",
    "cooldown_s",
    "failures_to_cool",
}
_FAILURE_POLICIES = ("error", "primary_answer")

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt,
}  # fmt: skip
_COMPARISON = re.compile(r"^\s*(>=|<=|==|>|<)\s*(\d+)\s*$")


class RoutesError(SpecdecError):
    """The routes file is wrong; the message names where and why."""


@dataclass(frozen=True)
class Comparison:
    """`> 1`, `>= 2`, `== 0`, ...: a count compared with a whole number."""

    op: str
    value: int

    @staticmethod
    def parse(text: Any, where: str) -> Comparison:
        match = _COMPARISON.match(text) if isinstance(text, str) else None
        if match is None:
            raise RoutesError(
                f'{where}: expected a comparison such as "> 1" (one of {", ".join(_OPERATORS)} and a '
                f"whole number), got {text!r}"
            )
        return Comparison(match.group(1), int(match.group(2)))

    def holds(self, count: int) -> bool:
        return _OPERATORS[self.op](count, self.value)

    def __str__(self) -> str:
        return f"{self.op} {self.value}"


@dataclass(frozen=True)
class Rules:
    """When a route escalates: any rule that fires (None / False: the rule is not set)."""

    confidence_below: float | None = None
    schema_invalid: bool = False
    tools_needed: Comparison | None = None
    input_tokens_above: int | None = None


@dataclass(frozen=True)
class Drift:
    """The escalation rate over the last `window` routed requests, against a baseline: `baseline`
    when given, else the rate of the route's first `window` requests. Past `tolerance` (absolute)
    the route's drift gauge is 1 - the traffic changed (docs/ROUTING.md)."""

    window: int = 200
    tolerance: float = 0.1
    baseline: float | None = None


@dataclass(frozen=True)
class Route:
    name: str
    primary: str  # a local mode or an endpoint name
    escalate_to: tuple[str, ...]  # tried in order; empty: the primary's answer always stands
    confidence: ConfidenceMethod
    rules: Rules
    calibration: Calibration | None = None  # maps raw confidence to P(correct); thresholds then apply to it
    # When every escalation tier fails (an endpoint down): "error" answers UNAVAILABLE with the
    # endpoint's message; "primary_answer" returns the primary's answer, flagged as a fallback.
    on_endpoint_failure: str = "error"
    drift: Drift = field(default_factory=Drift)

    @property
    def tiers(self) -> tuple[str, ...]:
        return (self.primary, *self.escalate_to)

    @property
    def local_modes(self) -> set[str]:
        return {t for t in self.tiers if t in LOCAL_MODES}


@dataclass(frozen=True)
class RoutesConfig:
    routes: dict[str, Route] = field(default_factory=dict)
    endpoints: dict[str, OpenAIEndpoint] = field(default_factory=dict)


def load_routes(path: str | Path) -> RoutesConfig:
    """Read and check the routes file at `path` (YAML)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RoutesError(f"{path}: cannot read the routes file ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RoutesError(f"{path}: not valid YAML ({e})") from None
    return parse_routes(data, str(path), base=path.parent)


def parse_routes(data: Any, source: str = "routes", base: Path | None = None) -> RoutesConfig:
    """Check a parsed routes document; `source` names it in messages, `base` resolves relative
    calibration paths (the routes file's directory)."""
    if not isinstance(data, dict):
        raise RoutesError(f"{source}: expected a mapping with 'routes' (and 'endpoints'), got {_kind(data)}")
    _no_unknown(data, {"routes", "endpoints"}, source)
    endpoints = _endpoints(data.get("endpoints") or {}, source)
    raw_routes = data.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        raise RoutesError(f"{source}: routes: expected a non-empty list of routes, got {_kind(raw_routes)}")
    routes: dict[str, Route] = {}
    for i, raw in enumerate(raw_routes):
        route = _route(raw, f"{source}: routes[{i}]", endpoints, base)
        if route.name in routes:
            raise RoutesError(f"{source}: routes[{i}]: route name {route.name!r} is used twice")
        routes[route.name] = route
    return RoutesConfig(routes, endpoints)


def _endpoints(raw: Any, source: str) -> dict[str, OpenAIEndpoint]:
    if not isinstance(raw, dict):
        raise RoutesError(f"{source}: endpoints: expected a mapping of name -> endpoint, got {_kind(raw)}")
    out = {}
    for name, spec in raw.items():
        where = f"{source}: endpoint {name!r}"
        if not isinstance(name, str) or not name:
            raise RoutesError(f"{source}: endpoints: names must be non-empty strings, got {name!r}")
        if name in LOCAL_MODES:
            raise RoutesError(f"{where}: the name is a local mode ({', '.join(LOCAL_MODES)}); choose another")
        if not isinstance(spec, dict):
            raise RoutesError(f"{where}: expected a mapping, got {_kind(spec)}")
        _no_unknown(spec, _ENDPOINT_KEYS, where)
        kind = spec.get("kind")
        if kind != "openai":
            raise RoutesError(f"{where}: kind: the supported kind is 'openai', got {kind!r}")
        for key in ("base_url", "model"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                raise RoutesError(f"{where}: {key}: required, a non-empty string")
        fields = {k: v for k, v in spec.items() if k != "kind"}
        for key in ("timeout_s", "backoff_s", "cooldown_s"):
            if key in fields and not _is_number(fields[key]):
                raise RoutesError(f"{where}: {key}: expected a number of seconds, got {fields[key]!r}")
        for key in ("retries", "failures_to_cool"):
            if key in fields and (not isinstance(fields[key], int) or isinstance(fields[key], bool)):
                raise RoutesError(f"{where}: {key}: expected a whole number, got {fields[key]!r}")
        try:
            out[name] = OpenAIEndpoint(name=name, **fields)
        except SpecdecError as e:
            raise RoutesError(f"{source}: {e}") from None
    return out


def _route(raw: Any, where: str, endpoints: dict[str, OpenAIEndpoint], base: Path | None) -> Route:
    if not isinstance(raw, dict):
        raise RoutesError(f"{where}: expected a mapping, got {_kind(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RoutesError(f"{where}: name: required, a non-empty string")
    where = f"{where.rsplit(': ', 1)[0]}: route {name!r}"
    _no_unknown(raw, _ROUTE_KEYS, where)

    def tier(value: Any, key: str) -> str:
        if not isinstance(value, str) or (value not in LOCAL_MODES and value not in endpoints):
            known = list(LOCAL_MODES) + sorted(endpoints)
            raise RoutesError(f"{where}: {key}: unknown tier {value!r}; known: {', '.join(known)}")
        return value

    if "primary" not in raw:
        raise RoutesError(f"{where}: primary: required (a local mode or an endpoint name)")
    primary = tier(raw["primary"], "primary")
    escalate = raw.get("escalate_to", [])
    escalate = [escalate] if isinstance(escalate, str) else escalate
    if not isinstance(escalate, list):
        raise RoutesError(f"{where}: escalate_to: expected a tier or a list of tiers, got {_kind(escalate)}")
    escalate_to = tuple(tier(t, f"escalate_to[{i}]") for i, t in enumerate(escalate))
    seen = [primary]
    for t in escalate_to:
        if t in seen:
            raise RoutesError(f"{where}: escalate_to: tier {t!r} appears twice in the cascade")
        seen.append(t)

    rules = _rules(raw.get("escalate_if", []), f"{where}: escalate_if")
    if not escalate_to and rules != Rules():
        raise RoutesError(f"{where}: escalate_if: the route has no escalate_to tier to escalate to")
    if escalate_to and rules == Rules():
        raise RoutesError(f"{where}: escalate_if: the route escalates to {escalate_to[0]!r} but sets no rule")

    try:
        confidence = ConfidenceMethod.make(raw.get("confidence"), raw.get("q"))
    except SpecdecError as e:
        raise RoutesError(f"{where}: {e}") from None

    calibration = None
    if raw.get("calibration") is not None:
        path = raw["calibration"]
        if not isinstance(path, str):
            raise RoutesError(f"{where}: calibration: expected a file path, got {_kind(path)}")
        file = Path(path) if base is None or Path(path).is_absolute() else base / path
        try:
            calibration = Calibration.load(file)
        except SpecdecError as e:
            raise RoutesError(f"{where}: calibration: {e}") from None
    failure = raw.get("on_endpoint_failure", "error")
    if failure not in _FAILURE_POLICIES:
        raise RoutesError(
            f"{where}: on_endpoint_failure: one of {', '.join(_FAILURE_POLICIES)}, got {failure!r}"
        )
    return Route(
        name, primary, escalate_to, confidence, rules, calibration, failure, _drift(raw.get("drift"), where)
    )


def _drift(raw: Any, where: str) -> Drift:
    if raw is None:
        return Drift()
    where = f"{where}: drift"
    if not isinstance(raw, dict):
        raise RoutesError(f"{where}: expected a mapping (window, tolerance, baseline), got {_kind(raw)}")
    _no_unknown(raw, _DRIFT_KEYS, where)
    window = raw.get("window", Drift.window)
    if not isinstance(window, int) or isinstance(window, bool) or not 10 <= window <= 100_000:
        raise RoutesError(f"{where}: window: a whole number of requests in [10, 100000], got {window!r}")
    for key in ("tolerance", "baseline"):
        value = raw.get(key)
        if value is not None and (not _is_number(value) or not 0 <= value <= 1):
            raise RoutesError(f"{where}: {key}: a rate in [0, 1], got {value!r}")
    return Drift(window, float(raw.get("tolerance", Drift.tolerance)), raw.get("baseline"))


def _rules(raw: Any, where: str) -> Rules:
    if not isinstance(raw, list):
        raise RoutesError(
            f"{where}: expected a list of rules (- confidence_below: 0.85, ...), got {_kind(raw)}"
        )
    values: dict[str, Any] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not item:
            raise RoutesError(f"{where}[{i}]: expected a rule such as confidence_below: 0.85, got {item!r}")
        for key, value in item.items():
            at = f"{where}[{i}]: {key}"
            if key not in _RULE_KEYS:
                raise RoutesError(f"{where}[{i}]: unknown rule {key!r}; known: {', '.join(_RULE_KEYS)}")
            if key in values:
                raise RoutesError(f"{at}: the rule is given twice")
            values[key] = _rule_value(key, value, at)
    return Rules(**values)


def _rule_value(key: str, value: Any, at: str) -> Any:
    if key == "confidence_below":
        if not _is_number(value) or not 0 <= value <= 1:
            raise RoutesError(f"{at}: a threshold in [0, 1], got {value!r}")
        return float(value)
    if key == "schema_invalid":
        if value is not True:
            raise RoutesError(f"{at}: the only setting is true (leave the rule out to never escalate on it)")
        return True
    if key == "tools_needed":
        return Comparison.parse(value, at)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RoutesError(f"{at}: a whole number of tokens >= 0, got {value!r}")
    return value


def _no_unknown(mapping: dict, known: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in mapping if k not in known)
    if unknown:
        raise RoutesError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
