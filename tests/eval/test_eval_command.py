"""`specdec eval` end to end on a tiny pair: the route replayed offline makes the live router's very
decisions, the report's numbers are the records', the files are what they claim (valid PNGs, a
route snippet the router loads with its calibration), a second run resumes from the records, and
the command line refuses bad input by name."""

from __future__ import annotations

import itertools
import json

import pytest
import yaml

from specdec import Engine, SamplingParams
from specdec.cli import main
from specdec.config import EngineConfig
from specdec.errors import SpecdecError
from specdec.eval import analysis
from specdec.eval.data import load_examples
from specdec.eval.evaluate import EvalSettings, evaluate
from specdec.eval.run import LocalTiers, Variant
from specdec.router.router import Router
from specdec.router.routes import load_routes, parse_routes

PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta", "iota", "rho", "tau"]
ROUTES = {"routes": [{"name": "r", "primary": "draft", "escalate_to": "target", "confidence": "mean_prob",
                      "escalate_if": [{"confidence_below": 0.5}]}]}  # fmt: skip


@pytest.fixture(scope="module")
def engine(pairs):
    target, draft = pairs("llama")  # a draft that often disagrees: scores differ by tier
    return Engine(target, draft, config=EngineConfig(max_batch_size=2, max_context=256, warmup=False))


@pytest.fixture(scope="module")
def eval_set(engine, tmp_path_factory):
    """Twelve chats whose expected answer is the draft's own on every third (the draft is right
    there), the target's on the rest. Two slices."""
    path = tmp_path_factory.mktemp("eval") / "set.jsonl"
    lines = []
    for i, word in enumerate(WORDS):
        messages = [{"role": "user", "content": f"say {word}"}]
        [answer] = engine.generate(
            [engine.render_chat(messages)], PARAMS, mode="draft" if i % 3 == 0 else "target"
        )
        lines.append({"id": word, "messages": messages, "expected": answer.text, "scorer": "exact",
                      "slice": "even" if i % 2 == 0 else "odd"})  # fmt: skip
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_the_report_is_the_records_and_the_replay_is_the_live_router(engine, eval_set, tmp_path):
    config = parse_routes(ROUTES, "test")
    router = Router(engine, config)
    examples = load_examples(eval_set)
    variant = tmp_path / "terse.txt"
    variant.write_text("Answer in one word: {input}")
    settings = EvalSettings(str(eval_set), "r", config.routes["r"], PARAMS, variants=(Variant.load(variant),),
                            prices={"target": analysis.Price(1.0, 2.0)}, holdout=0.5)  # fmt: skip
    report = evaluate(examples, LocalTiers(router), settings, tmp_path / "out")
    records = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 12 * 3  # draft, target, and the draft under the variant
    by = {(r["example"], r["tier"], r["variant"]): r for r in records}
    table = {(r["tier"], r["variant"], r["slice"]): r for r in report["tiers_table"]}
    draft_scores = [by[(w, "draft", "")]["score"] for w in WORDS]
    target_scores = [by[(w, "target", "")]["score"] for w in WORDS]
    # By construction (this pair's two models never say the same here): right where expected.
    assert draft_scores == [float(i % 3 == 0) for i in range(12)]
    assert target_scores == [float(i % 3 != 0) for i in range(12)]
    assert table[("draft", "", "all")]["accuracy"] == pytest.approx(4 / 12)
    assert table[("target", "", "all")]["accuracy"] == pytest.approx(8 / 12)
    assert table[("draft", "", "even")]["accuracy"] == pytest.approx(2 / 6)  # alpha, delta of the six
    assert ("draft", "terse", "all") in table

    # Replayed at the route's own threshold, the route decides as the live router does.
    plain = {(r["example"], r["tier"]): r for r in records if not r["variant"]}
    answers = {k: analysis.TierAnswer(**v) for k, v in plain.items()}
    outcomes = analysis.replay(config.routes["r"], examples, answers, None, None, {})
    for example, outcome in zip(examples, outcomes):
        live = router.generate("r", example.messages, PARAMS)
        assert live.record.tier == outcome.tier, example.id
        assert (live.text == example.expected) == bool(outcome.score)
    curve = report["routing"]["curve"]
    assert curve[0]["threshold"] == 0 and curve[0]["escalation_rate"] == 0
    # Higher thresholds escalate more (up to 1: a calibrated confidence of 1 is never below it).
    assert curve[-1]["threshold"] == 1.0
    assert all(a["escalation_rate"] <= b["escalation_rate"] for a, b in itertools.pairwise(curve))
    chosen = report["routing"]["chosen"]  # the default goal: the target's quality
    assert chosen["quality"] >= 8 / 12 - 1e-9 and chosen == min(
        (p for p in curve if p["quality"] >= 8 / 12 - 1e-9),
        key=lambda p: (p["escalation_rate"], -p["quality"], p["threshold"]),
    )

    out = tmp_path / "out"
    for png in ("quality_cost.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| draft | - | all | 12 |" in (out / "report.md").read_text()
    snippet = load_routes(out / "route.yaml")  # the calibration file it names loads with it
    route = snippet.routes["r"]
    assert route.calibration is not None and report["calibration"]["held_out"] > 0
    # The written route is the chosen policy: replayed with its calibration, and live.
    replayed = analysis.replay(route, examples, answers, None, route.calibration, {})
    assert sum(o.score for o in replayed) / 12 == pytest.approx(chosen["quality"])
    assert sum(o.escalated for o in replayed) / 12 == pytest.approx(chosen["escalation_rate"])
    live_router = Router(engine, snippet)
    assert [live_router.generate("r", e.messages, PARAMS).record.tier for e in examples] == [
        o.tier for o in replayed
    ]
    assert report["routing"]["calibrated"] and "calibrated confidence" in (out / "report.md").read_text()


class _Counting(LocalTiers):
    """LocalTiers that remembers the tier of every answer it was asked for."""

    def __init__(self, router):
        super().__init__(router)
        self.calls = []

    def answer(self, *args, **kwargs):
        self.calls.append(args[1])
        return super().answer(*args, **kwargs)


def test_a_second_run_resumes_from_the_records(engine, eval_set, tmp_path):
    config = parse_routes(ROUTES, "test")
    examples = load_examples(eval_set)[:4]
    backend = _Counting(Router(engine, config))
    calls = backend.calls
    settings = EvalSettings(str(eval_set), "r", config.routes["r"], PARAMS)
    first = evaluate(examples[:2], backend, settings, tmp_path)
    assert len(calls) == 4
    second = evaluate(examples, backend, settings, tmp_path)  # two more examples
    assert len(calls) == 8 and second["examples"] == 4 and first["examples"] == 2
    # Answers made with other settings are not mixed in.
    longer = EvalSettings(str(eval_set), "r", config.routes["r"], SamplingParams(max_new_tokens=9))
    with pytest.raises(SpecdecError, match=r"holds answers made with other settings \(max_new_tokens\)"):
        evaluate(examples, backend, longer, tmp_path)


def test_the_command_line(engine, eval_set, pairs, tmp_path, capsys):
    target, draft = pairs("llama")
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump(ROUTES))
    common = ["eval", "--data", str(eval_set), "--routes", str(routes), "--target", str(target),
              "--draft", str(draft), "--max-context", "256", "--max-new-tokens", "6"]  # fmt: skip
    assert main([*common, "--route", "r", "--out", str(tmp_path / "o"), "--price", "target=0.5,1.5"]) == 0
    assert "report.md" in capsys.readouterr().out and (tmp_path / "o" / "report.json").exists()
    for extra, message in (
        (["--route", "nope"], "--route 'nope': not in"),
        (["--route", "r", "--price", "target=cheap"], "--price 'target=cheap'"),
        (["--route", "r", "--price", "target=nan,1"], "--price 'target=nan,1'"),
        (["--route", "r", "--price", "target=-1,1"], "--price 'target=-1,1'"),
        (["--route", "r", "--price", "big=1,2"], "--price big: not a tier of route 'r'"),
        (["--route", "r", "--target-quality", "2"], "--target-quality: in [0, 1]"),
    ):
        assert main([*common, *extra, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err


def test_a_running_server_answers_the_tiers_with_a_forcing_key(engine, eval_set, tmp_path):
    """--server: the same route on a running specdec, each tier forced through route_override by
    a key granted route:force; the records equal the in-process run's."""
    from specdec.client import Client
    from specdec.eval.run import ServerTiers
    from specdec.testing import serve_in_thread

    (tmp_path / "routes.yaml").write_text(yaml.safe_dump(ROUTES))
    (tmp_path / "keys").write_text("sk-eval route:force\nsk-plain\n")
    config = load_routes(tmp_path / "routes.yaml")
    examples = load_examples(eval_set)[:3]
    settings = EvalSettings(str(eval_set), "r", config.routes["r"], PARAMS)
    local = evaluate(examples, LocalTiers(Router(engine, config)), settings, tmp_path / "local")
    srv = serve_in_thread(engine, routes=tmp_path / "routes.yaml", api_key_file=tmp_path / "keys")
    try:
        with Client(srv.address, api_key="sk-eval") as client:
            remote = evaluate(examples, ServerTiers(client), settings, tmp_path / "remote")
        with Client(srv.address, api_key="sk-plain") as client, pytest.raises(Exception, match="route:force"):
            evaluate(examples, ServerTiers(client), settings, tmp_path / "refused")
    finally:
        srv.stop()

    def records(name):
        rows = [json.loads(x) for x in (tmp_path / name / "records.jsonl").read_text().splitlines()]
        return [(r["example"], r["tier"], r["text"], r["score"], r["completion_tokens"]) for r in rows]

    assert records("remote") == records("local")
    assert remote["tiers_table"][0]["accuracy"] == local["tiers_table"][0]["accuracy"]
    local_conf = [
        json.loads(x)["confidence"] for x in (tmp_path / "local" / "records.jsonl").read_text().splitlines()
    ]
    remote_conf = [
        json.loads(x)["confidence"] for x in (tmp_path / "remote" / "records.jsonl").read_text().splitlines()
    ]
    for a, b in zip(local_conf, remote_conf):
        assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, abs=1e-5))


def test_the_route_snippet_carries_its_endpoints_and_loads():
    from specdec.eval.evaluate import _snippet

    ep = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "big", "retries": 1}
    data = {"routes": [{"name": "r", "primary": "speculative", "escalate_to": ["target", "ep"], "q": 0.2,
                        "escalate_if": [{"confidence_below": 0.4}, {"tools_needed": ">= 2"}],
                        "on_endpoint_failure": "primary_answer"}],
            "endpoints": {"ep": ep, "unused": {**ep, "model": "other"}}}  # fmt: skip
    route = parse_routes(data, "test").routes["r"]
    settings = EvalSettings("set", "r", route, endpoints=data["endpoints"])
    snippet = _snippet(settings, 0.25, calibrated=False)
    assert set(snippet["endpoints"]) == {"ep"}
    loaded = parse_routes(yaml.safe_load(yaml.safe_dump(snippet)), "snippet").routes["r"]
    assert loaded.tiers == route.tiers and loaded.rules.confidence_below == 0.25
    assert loaded.rules.tools_needed == route.rules.tools_needed and loaded.confidence == route.confidence
    assert loaded.on_endpoint_failure == "primary_answer"


def test_resume_reruns_changed_examples_rescores_and_survives_a_cut_line(engine, eval_set, tmp_path):
    import dataclasses

    config = parse_routes(ROUTES, "test")
    backend = _Counting(Router(engine, config))
    calls = backend.calls
    settings = EvalSettings(str(eval_set), "r", config.routes["r"], PARAMS)
    examples = load_examples(eval_set)[:2]
    evaluate(examples, backend, settings, tmp_path)
    assert len(calls) == 4
    # A new expected answer is scored again without running a model; a changed prompt is rerun.
    rescored = [dataclasses.replace(examples[0], expected="nothing says this"), examples[1]]
    report = evaluate(rescored, backend, settings, tmp_path)
    assert len(calls) == 4 and report["tiers_table"][0]["n"] == 2
    changed = [dataclasses.replace(examples[0], messages=[{"role": "user", "content": "other"}]), examples[1]]
    evaluate(changed, backend, settings, tmp_path)
    assert len(calls) == 6
    # A run killed while writing leaves a partial last line: it is dropped and that answer rerun.
    records = tmp_path / "records.jsonl"
    records.write_text(records.read_text()[:-40])
    evaluate(changed, backend, settings, tmp_path)
    assert len(calls) == 7


def test_errors_during_a_run_name_the_example(engine, eval_set, tmp_path):
    import dataclasses

    config = parse_routes(ROUTES, "test")
    backend = LocalTiers(Router(engine, config))
    settings = EvalSettings(str(eval_set), "r", config.routes["r"], PARAMS)
    [example] = load_examples(eval_set)[:1]
    for bad, message in (
        (
            dataclasses.replace(example, tools=[{"type": "function"}]),
            r"example 'alpha' \(line 1\): 'function'",
        ),
        (
            dataclasses.replace(example, json_schema={"type": "strnig"}),
            r"example 'alpha' \(line 1\): json_schema: not a valid",
        ),
        (dataclasses.replace(example, scorer="nope"), "unknown scorer 'nope'"),
    ):
        with pytest.raises(SpecdecError, match=message):
            evaluate([bad], backend, settings, tmp_path / str(len(message)))
