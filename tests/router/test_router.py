"""Routing in-process on a tiny pair whose draft answers alone: each rule fires on its own and none
fires when it should not; escalation returns exactly the escalation tier's own output; an answer the
target agrees with costs no per-token decoding; endpoint failures cascade, fall back or fail."""

from __future__ import annotations

import pytest

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.request import Mode
from specdec.router.endpoints import EndpointError
from specdec.router.router import Router
from specdec.router.routes import RoutesError, parse_routes
from specdec.testing import free_port

MESSAGES = [{"role": "user", "content": "hello there, how are you"}]
PARAMS = SamplingParams(max_new_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(pairs):
    target, draft = pairs("llama-close")
    return Engine(target, draft, config=EngineConfig(max_batch_size=4, max_context=256, warmup=False))


def _router(engine, *rules, primary="draft", escalate_to="target", endpoints=None, **route):
    data = {
        "routes": [
            {"name": "r", "primary": primary, "escalate_to": escalate_to, "escalate_if": list(rules), **route}
        ],
        "endpoints": endpoints or {},
    }
    return Router(engine, parse_routes(data, "test"))


def _alone(engine, mode):
    [result] = engine.generate([engine.render_chat(MESSAGES)], PARAMS, mode=mode)
    return result


def test_when_no_rule_fires_the_primary_answers(engine):
    router = _router(
        engine, {"confidence_below": 0.0}, {"schema_invalid": True}, {"input_tokens_above": 10_000}
    )
    routed = router.generate("r", MESSAGES, PARAMS, json_schema=True)  # accept-anything schema
    record = routed.record
    assert record.tier == "draft" and not record.escalated and record.reasons == ()
    assert 0 < record.confidence <= 1 and record.schema_valid is True
    assert routed.token_ids == _alone(engine, Mode.DRAFT).token_ids
    assert [s.tier for s in record.spent] == ["draft"] and record.spent[0].completion_tokens == 24


def test_low_confidence_escalates_and_the_answer_is_the_tiers_own(engine):
    router = _router(engine, {"confidence_below": 1.0}, confidence="mean_prob")
    routed = router.generate("r", MESSAGES, PARAMS)
    record = routed.record
    assert record.tier == "target" and record.escalated
    [reason] = record.reasons
    assert reason == f"confidence {record.confidence:.3f} < 1"
    assert routed.token_ids == _alone(engine, Mode.TARGET).token_ids  # greedy: token for token
    small = _alone(engine, Mode.DRAFT).token_ids
    reused = record.spent[1].draft_tokens_reused
    assert routed.token_ids[:reused] == small[:reused] and [s.tier for s in record.spent] == [
        "draft",
        "target",
    ]


def test_an_invalid_answer_escalates_on_the_schema_rule_alone(engine):
    schema = {"type": "object", "required": ["name"]}
    router = _router(engine, {"schema_invalid": True}, escalate_to="speculative")
    routed = router.generate("r", MESSAGES, PARAMS, json_schema=schema)
    assert routed.record.tier == "speculative" and routed.record.reasons[0].startswith(
        "schema_invalid: not JSON"
    )
    assert routed.record.schema_valid is False  # the returned answer's own verdict
    assert routed.token_ids == _alone(engine, Mode.TARGET).token_ids
    # Without the rule, the same invalid answer stands.
    plain = _router(engine, {"input_tokens_above": 10_000}).generate(
        "r", MESSAGES, PARAMS, json_schema=schema
    )
    assert plain.record.tier == "draft" and plain.record.schema_valid is False


def test_a_long_input_skips_the_small_tier(engine):
    router = _router(engine, {"input_tokens_above": 4})
    routed = router.generate("r", MESSAGES, PARAMS)
    prompt = len(engine.render_chat(MESSAGES))
    assert routed.record.reasons == (f"input_tokens {prompt} > 4",) and routed.record.tier == "target"
    assert [s.tier for s in routed.record.spent] == ["target"] and routed.record.confidence is None


def test_an_agreeing_answer_costs_no_per_token_decoding(engine, monkeypatch):
    """primary: target, then speculative: the second tier's target agrees with every token and
    reads prompt + answer in one pass - ⌈(prompt + answer) / prefill budget⌉ = 1 - where the
    primary took a pass per token (96 tokens: past the 64 a pass once took)."""
    params = SamplingParams(max_new_tokens=96, ignore_eos=True)
    router = _router(engine, {"confidence_below": 1.0}, primary="target", escalate_to="speculative")
    model = engine.target.model
    widths = []
    real = model.forward
    monkeypatch.setattr(
        model, "forward", lambda *a, **k: widths.append(a[0].tokens.shape[1]) or real(*a, **k)
    )
    [alone] = engine.generate([engine.render_chat(MESSAGES)], params, mode=Mode.TARGET)
    per_token = len(widths)
    widths.clear()
    routed = router.generate("r", MESSAGES, params)
    assert routed.token_ids == alone.token_ids and routed.record.spent[1].draft_tokens_reused == 96
    prompt = len(engine.render_chat(MESSAGES))
    assert per_token >= 96 and len(widths) == per_token + 1
    # One pass: the prompt and the answer's first 95 tokens as drafts (the 96th is the bonus).
    assert widths[per_token:] == [prompt + 95], widths


def test_a_sampled_small_answer_is_scored_in_one_draft_pass(engine, monkeypatch):
    """draft -> speculative, sampled: the speculative tier verifies the draft's answer against the
    draft's q, which one wide draft pass over the answer recomputes - not a pass per token."""
    params = SamplingParams(max_new_tokens=40, temperature=0.7, seed=3, ignore_eos=True)
    router = _router(engine, {"confidence_below": 1.0}, escalate_to="speculative")
    draft_widths, target_widths = [], []
    for model, widths in ((engine.draft.model, draft_widths), (engine.target.model, target_widths)):
        real = model.forward
        monkeypatch.setattr(
            model,
            "forward",
            lambda *a, _r=real, _w=widths, **k: _w.append(a[0].tokens.shape[1]) or _r(*a, **k),
        )
    routed = router.generate("r", MESSAGES, params)
    small, escalated = routed.record.spent
    assert routed.record.tier == "speculative" and small.completion_tokens == 40
    prompt = len(engine.render_chat(MESSAGES))
    # The draft tier: prefill, then a pass per token. Then the speculative tier's draft prefill
    # and its first step: the answer's first 39 tokens are the chunk (a step emits at most chunk +
    # 1 tokens, and 40 may be emitted), scored in one draft pass over the last prompt token and the
    # chunk but its last token, and verified in one target pass that reads the prompt too.
    first = draft_widths.index(prompt - 1, 1)  # the second prefill: the speculative tier's
    assert draft_widths[first + 1] == 39, draft_widths
    assert target_widths[0] == prompt + 39, target_widths  # [the prompt + 39 drafts]
    assert escalated.draft_tokens_reused >= 1  # the tiny pair agrees at its first token, at least


def test_a_cascade_moves_past_a_failing_endpoint_or_falls_back(engine):
    dead = {"kind": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "m", "retries": 0}
    router = _router(
        engine, {"confidence_below": 1.0}, escalate_to=["down", "target"], endpoints={"down": dead}
    )
    routed = router.generate("r", MESSAGES, PARAMS)
    assert routed.record.tier == "target" and "down failed: endpoint down:" in routed.record.reasons[1]
    assert routed.record.spent[1].error and routed.token_ids == _alone(engine, Mode.TARGET).token_ids
    # The draft's answer, not the failed endpoint's nothing, is the target's draft.
    small = _alone(engine, Mode.DRAFT).token_ids
    reused = routed.record.spent[2].draft_tokens_reused
    assert reused > 0 and routed.token_ids[:reused] == small[:reused]
    assert routed.record.confidence is not None  # the primary's

    failing = _router(engine, {"confidence_below": 1.0}, escalate_to="down", endpoints={"down": dead})
    with pytest.raises(EndpointError, match=r"endpoint down: .*ConnectionRefusedError"):
        failing.generate("r", MESSAGES, PARAMS)
    fallback = _router(engine, {"confidence_below": 1.0}, escalate_to="down", endpoints={"down": dead},
                       on_endpoint_failure="primary_answer")  # fmt: skip
    routed = fallback.generate("r", MESSAGES, PARAMS)
    assert routed.record.fallback and routed.record.tier == "draft"
    assert routed.token_ids == _alone(engine, Mode.DRAFT).token_ids


def test_calibrated_thresholds_read_the_calibrated_value(engine, tmp_path):
    import json

    (tmp_path / "cal.json").write_text(json.dumps({"method": "isotonic", "points": [[0, 0], [1, 0.5]]}))
    data = {"routes": [{"name": "r", "primary": "draft", "escalate_to": "target", "calibration": str(tmp_path / "cal.json"),
                        "escalate_if": [{"confidence_below": 0.6}]}]}  # fmt: skip
    routed = Router(engine, parse_routes(data, "test")).generate("r", MESSAGES, PARAMS)
    record = routed.record
    assert record.calibrated_confidence == pytest.approx(record.confidence / 2)
    assert record.reasons == (f"calibrated confidence {record.calibrated_confidence:.3f} < 0.6",)


def test_what_the_pair_cannot_serve_is_refused_at_start_up(engine, pairs, tmp_path):
    from specdec.models.subset_head import restrict_checkpoint

    target, draft = pairs("llama-close")
    subset = Engine(
        target, restrict_checkpoint(draft, tmp_path / "s", list(range(100))), config=engine.config
    )
    with pytest.raises(RoutesError, match="route 'r': tier 'draft': this pair's draft cannot answer alone"):
        _router(subset, {"confidence_below": 0.5})
    alone = Engine(target, config=engine.config)
    with pytest.raises(RoutesError, match="route 'r': tier 'speculative': this server has no draft model"):
        _router(alone, {"confidence_below": 0.5}, primary="target", escalate_to="speculative")
    ep = {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m"}
    with pytest.raises(RoutesError, match="confidence_below: the primary 'ep' is an endpoint"):
        _router(engine, {"confidence_below": 0.5}, primary="ep", endpoints={"ep": ep})
    with pytest.raises(Exception, match="route: unknown route 'nope'; known: r"):
        _router(engine, {"confidence_below": 0.5}).generate("nope", MESSAGES, PARAMS)
