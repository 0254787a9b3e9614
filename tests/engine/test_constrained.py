"""Constrained output (specdec/grammar.py) with speculative decoding: every output the grammar
allows, constrained speculative == constrained target alone (greedy, token for token; sampled, in
distribution by χ², with a negative control), the matcher rolled back after rejected drafts, a
subset-head draft that cannot propose what the grammar needs, and the errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import jsonschema
import numpy as np
import pytest
import torch

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.errors import InvalidRequestError
from specdec.grammar import UNENFORCED_KEYWORDS, Constraint, ConstraintKind, Grammars, new_bitmask
from specdec.planner import GammaPlanner
from specdec.request import FinishReason, Mode
from specdec.sampling import SamplingTensors, probabilities
from specdec.testing import (
    EXAMPLE_CONSTRAINTS,
    chi_square_pvalue,
    hf_reference,
    sampled_joint_of_three,
    tiny_tokenizer,
)

CONFIG = EngineConfig(max_batch_size=8, max_context=160, max_gamma=8)

CONSTRAINTS = EXAMPLE_CONSTRAINTS


def _valid(constraint: Constraint, text: str) -> bool:
    if constraint.kind is ConstraintKind.JSON_SCHEMA:
        jsonschema.validate(json.loads(text), json.loads(constraint.text))
        return True
    if constraint.kind is ConstraintKind.JSON_OBJECT:
        return isinstance(json.loads(text), dict)
    if constraint.kind is ConstraintKind.REGEX:
        return re.fullmatch(constraint.text, text) is not None
    return re.fullmatch(r"\[[a-c]+(,[a-c]+)*\]", text) is not None


@pytest.fixture(scope="module")
def engine(pairs):
    target, draft = pairs("llama-close")
    return Engine(target=target, draft=draft, config=CONFIG)


def _scheduled(engine, schedule, mask_drafts=True):
    config = dataclasses.replace(CONFIG, mask_constrained_drafts=mask_drafts)
    if schedule is None:
        return Engine(target=engine.target, draft=engine.draft, config=config)
    counter = itertools.count()
    planner = GammaPlanner(
        config, gamma_override=lambda seq: schedule[(next(counter) + seq.slot) % len(schedule)]
    )
    return Engine(target=engine.target, draft=engine.draft, config=config, planner=planner)


def _requests(engine, mode, max_new_tokens=48):
    prompts = ["name:", "hello world", "def f(x):", "the cat"]
    reqs = [
        engine.make_request(p, SamplingParams(max_new_tokens=max_new_tokens), mode, constraint=c)
        for p, c in zip(prompts, CONSTRAINTS.values())
    ]
    # A free row in the same batch: masks must touch the constrained rows only.
    reqs.append(engine.make_request("the cat", SamplingParams(max_new_tokens=20), mode))
    return reqs


@pytest.mark.parametrize(
    "schedule,mask_drafts",
    [
        (None, True),
        ([1], True),
        ([3], True),
        ([8], True),
        ([0, 2, 5], True),
        ([3], False),
        ([0, 2, 8], False),
    ],
    ids=["adaptive", "g1", "g3", "g8", "mixed", "unmasked-g3", "unmasked-mixed"],
)
def test_constrained_speculative_is_the_constrained_target_token_for_token(engine, schedule, mask_drafts):
    """Masked drafting (the default) and unmasked (EngineConfig.mask_constrained_drafts=False:
    the draft proposes freely and the target's masks reject what the grammar forbids) alike."""
    runner = _scheduled(engine, schedule, mask_drafts)
    alone = engine.generate(_requests(engine, Mode.TARGET))
    spec = runner.generate(_requests(engine, Mode.SPECULATIVE))
    for a, s, constraint in zip(alone, spec, [*CONSTRAINTS.values(), None]):
        assert s.error is None and a.error is None
        assert s.token_ids == a.token_ids, constraint
        if constraint is not None:
            assert a.constraint is not None and s.constraint == a.constraint
    assert sum(r.stats.drafted_tokens for r in spec[:4]) > 0  # the constrained rows did speculate
    for r, constraint in zip(alone[:4], CONSTRAINTS.values()):
        if r.finish_reason is FinishReason.EOS:
            assert r.constraint.complete and _valid(constraint, r.text), (constraint, r.text)


def test_every_finished_output_is_valid_in_every_mode(engine):
    finished = 0
    for mode in (Mode.TARGET, Mode.SPECULATIVE, Mode.DRAFT):
        results = engine.generate(_requests(engine, mode, max_new_tokens=120))
        for r, constraint in zip(results[:4], CONSTRAINTS.values()):
            assert r.error is None
            if r.finish_reason is FinishReason.EOS:
                finished += 1
                assert r.constraint.complete and _valid(constraint, r.text), (mode, constraint, r.text)
    assert finished >= 6  # most finish within the budget, so the check above means something


def test_a_cut_output_finishes_with_length_and_says_it_is_incomplete(engine):
    r = engine.generate(
        [
            engine.make_request(
                "x", SamplingParams(max_new_tokens=3), Mode.SPECULATIVE, constraint=CONSTRAINTS["schema"]
            )
        ]
    )[0]
    assert r.finish_reason is FinishReason.LENGTH
    assert r.constraint is not None and not r.constraint.complete
    assert r.as_dict()["constraint"] == {"complete": False, "unenforced": []}


def test_a_stop_string_cut_says_incomplete(engine):
    constraint = Constraint(ConstraintKind.REGEX, r"[0-9]{1,4}![a-c]{1,3}")
    free = engine.generate(
        [engine.make_request("x", SamplingParams(max_new_tokens=20), constraint=constraint)]
    )[0]
    assert free.finish_reason is FinishReason.EOS and free.constraint.complete and "!" in free.text
    cut = engine.generate(
        [engine.make_request("x", SamplingParams(max_new_tokens=20, stop=("!",)), constraint=constraint)]
    )[0]
    assert cut.finish_reason is FinishReason.STOP and cut.text == free.text.split("!")[0]
    assert not cut.constraint.complete  # the text the client got is not a whole match


def test_a_bad_constraint_fails_the_batch_before_any_request_runs(engine):
    steps = []
    good = engine.make_request("x", SamplingParams(max_new_tokens=8), constraint=CONSTRAINTS["regex"])
    bad = engine.make_request(
        "x", SamplingParams(max_new_tokens=8), constraint=Constraint(ConstraintKind.REGEX, "(a")
    )
    with pytest.raises(InvalidRequestError) as e:
        engine.generate([good, bad], max_concurrency=1, on_step=steps.append)
    assert e.value.field == "regex" and steps == []


def test_an_external_draft_the_grammar_forbids_is_rejected_and_rolled_back(engine):
    """A crafted draft: its third token breaks the regex. The target rejects it there, and the
    matcher, advanced over the draft to mask the positions, is back at the committed output: the
    result is the constrained target's, token for token."""
    constraint = CONSTRAINTS["regex"]
    reference = engine.generate(
        [
            engine.make_request(
                "the cat", SamplingParams(max_new_tokens=12), Mode.TARGET, constraint=constraint
            )
        ]
    )[0]
    good = reference.token_ids[:2]
    forbidden = engine.encode("Z")[0]
    draft = good + [forbidden] + reference.token_ids[2:6]
    first_verify = []  # the request's stats after the step that verified the external draft

    def observe(report):
        for out in report.outputs:
            if out.stats.drafted_tokens and not first_verify:
                first_verify.append((out.stats.drafted_tokens, out.stats.accepted_tokens))

    request = engine.make_request(
        "the cat",
        SamplingParams(max_new_tokens=12),
        Mode.SPECULATIVE,
        external_draft=draft,
        constraint=constraint,
    )
    r = engine.generate([request], on_step=observe)[0]
    assert r.token_ids == reference.token_ids and r.error is None
    assert first_verify == [(len(draft), 2)]  # the two good tokens, then the forbidden one rejected


def test_speculate_undo_commit_leaves_the_committed_state():
    grammars = Grammars(tiny_tokenizer(300), 320, (0,))
    constraint = Constraint(ConstraintKind.REGEX, "(cat|dog)+")
    row, fresh = grammars.row(constraint), grammars.row(constraint)
    cat, dog = tiny_tokenizer(300).encode("cat"), tiny_tokenizer(300).encode("dog")
    for token in cat + dog[:2]:
        assert row.speculate(token)
    assert not row.speculate(tiny_tokenizer(300).encode("Z")[0])  # refused, state unchanged
    assert row.speculated == len(cat) + 2
    row.undo()
    row.commit(cat)
    fresh.commit(cat)
    a, b = new_bitmask(1, 320), new_bitmask(1, 320)
    row.fill(a, 0)
    fresh.fill(b, 0)
    assert torch.equal(a, b) and row.speculated == 0
    with pytest.raises(RuntimeError, match="forbids"):
        row.commit(tiny_tokenizer(300).encode("Z"))


@pytest.mark.parametrize(
    "constraint,field,message",
    [
        (Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "nope"}'), "json_schema", "cannot be compiled"),
        (Constraint(ConstraintKind.JSON_SCHEMA, "{not json"), "json_schema", "not valid JSON"),
        (Constraint(ConstraintKind.JSON_SCHEMA, "[1, 2]"), "json_schema", "is an object"),
        (Constraint(ConstraintKind.REGEX, "(ab"), "regex", "parenthesis is not closed"),
        (Constraint(ConstraintKind.REGEX, ""), "regex", "must not be empty"),
        (Constraint(ConstraintKind.GRAMMAR, "root ::= foo"), "grammar", 'Rule "foo" is not defined'),
        (Constraint(ConstraintKind.GRAMMAR, "x" * 70000), "grammar", "at most 65536 characters"),
        (Constraint(ConstraintKind.JSON_SCHEMA, "[" * 30000 + "]" * 30000), "json_schema", "not valid JSON"),
        (
            Constraint(ConstraintKind.JSON_SCHEMA, '{"a":' * 70 + "1" + "}" * 70),
            "json_schema",
            "deeper than 64",
        ),
    ],
)
def test_a_constraint_that_cannot_compile_is_named(engine, constraint, field, message):
    with pytest.raises(InvalidRequestError) as e:
        engine.generate([engine.make_request("hi", SamplingParams(max_new_tokens=4), constraint=constraint)])
    assert e.value.field == field and message in str(e.value)
    assert "/project/" not in str(e.value)  # xgrammar's source location is not the client's business


def test_ignore_eos_with_a_constraint_is_refused(engine):
    with pytest.raises(InvalidRequestError) as e:
        engine.generate(
            [engine.make_request("hi", SamplingParams(ignore_eos=True), constraint=CONSTRAINTS["regex"])]
        )
    assert e.value.field == "ignore_eos"


# ---------------------------------------------------------------------------- unenforced keywords

# For each keyword the grammar lets through: a schema using it and an output that breaks it.
IGNORED = {
    "not": ({"not": {"type": "string"}}, '"abc"'),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
    "contains": ({"type": "array", "contains": {"type": "string"}}, "[1]"),
    "minContains": ({"type": "array", "contains": {"type": "integer"}, "minContains": 2}, '[1, "a"]'),
    "maxContains": ({"type": "array", "contains": {"type": "integer"}, "maxContains": 1}, "[1, 2]"),
    "dependentRequired": (
        {"type": "object", "properties": {"a": {}, "b": {}}, "dependentRequired": {"a": ["b"]}},
        '{"a": 1}',
    ),
    "dependentSchemas": (
        {"type": "object", "properties": {"a": {}, "b": {}}, "dependentSchemas": {"a": {"required": ["b"]}}},
        '{"a": 1}',
    ),
    "if": ({"if": {"type": "integer"}, "then": {"minimum": 5}}, "1"),
    "then": ({"if": {"type": "integer"}, "then": {"minimum": 5}}, "1"),
    "else": ({"if": {"type": "string"}, "else": {"minimum": 5}}, "1"),
    "allOf": ({"allOf": [{"type": "integer"}, {"minimum": 5}]}, "1"),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "1"),
    "unevaluatedProperties": (
        {"type": "object", "properties": {"a": {}}, "unevaluatedProperties": False},
        '{"b": 1}',
    ),
}


@pytest.fixture(scope="module")
def grammars():
    return Grammars(tiny_tokenizer(300), 320, (0,))


def _accepts(grammars, schema, text) -> bool:
    matcher = grammars.row(Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))).matcher
    return matcher.accept_string(text) and matcher.is_completed()


@pytest.mark.parametrize("keyword", UNENFORCED_KEYWORDS)
def test_the_unenforced_list_is_what_xgrammar_lets_through(grammars, keyword):
    """Each listed keyword really is ignored by the grammar (an output breaking it is accepted and
    jsonschema refuses it), so the list is measured, not guessed; when xgrammar starts enforcing
    one, this fails and the keyword leaves the list."""
    schema, breaking = IGNORED[keyword]
    assert _accepts(grammars, schema, breaking), f"xgrammar now enforces {keyword}"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(breaking), schema)
    assert keyword in Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema)).unenforced()


@pytest.mark.parametrize(
    "schema,breaking",
    [
        ({"type": "integer", "minimum": 3}, "1"),
        ({"type": "string", "pattern": "^a+$"}, '"b"'),
        ({"type": "array", "minItems": 2}, "[1]"),
        ({"enum": [1, 2]}, "3"),
        (
            {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
            '{"b": 1}',
        ),
        ({"type": "array", "prefixItems": [{"type": "integer"}], "unevaluatedItems": False}, "[1, 2]"),
    ],
)
def test_keywords_the_grammar_enforces(grammars, schema, breaking):
    assert not _accepts(grammars, schema, breaking)
    assert Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema)).unenforced() == ()


def test_unenforced_keywords_are_reported_and_property_names_are_not_keywords(engine):
    schema = {"type": "object", "properties": {"not": {"type": "integer"}}, "required": ["not"]}
    assert Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema)).unenforced() == ()
    data = {"enum": [{"not": 1}], "default": {"allOf": []}, "const": {"if": 2}}  # data, not keywords
    assert Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(data)).unenforced() == ()
    schema = {"type": "array", "items": {"type": "integer", "maximum": 9}, "uniqueItems": True, "maxItems": 3}
    r = engine.generate(
        [
            engine.make_request(
                "x",
                SamplingParams(max_new_tokens=40),
                constraint=Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema)),
            )
        ]
    )[0]
    assert r.constraint.unenforced == ("uniqueItems",)


# ---------------------------------------------------------------------------- sampled: χ²

V = 16
PROMPT = [5, 9, 3, 12]
N = 2400
ALPHA = 1e-3
# Over the word vocabulary ("w3" ... "w15"): the second token's choices depend on the first, and
# no end of sequence is possible within three tokens.
WORDS = Constraint(
    ConstraintKind.REGEX, r"(w3(w4|w5)|w6(w7|w8|w9)|w10(w11|w12|w13|w14))(w3|w4|w5|w6|w7|w15)(w3)*"
)


def _masked_joint(target_path, params, constraint, mask_first=True) -> np.ndarray:
    """P(t1, t2, t3 | PROMPT) of the target alone under the constraint: each position's logits
    masked by the grammar in the state its prefix leaves, then the sampling transform. With
    mask_first=False the transform comes first and the mask after (renormalised): the wrong order,
    for the negative control."""
    from transformers import AutoTokenizer

    ref = hf_reference(target_path)
    grammars = Grammars(AutoTokenizer.from_pretrained(target_path), V, (0,))

    def allowed(prefix) -> torch.Tensor:
        row = grammars.row(constraint)
        if not all(row.speculate(t) for t in prefix):
            return torch.zeros(V, dtype=torch.bool)  # a prefix the grammar forbids: probability 0 anyway
        mask = new_bitmask(1, V)
        row.fill(mask, 0)
        bits = (mask[0, 0].item() >> torch.arange(V)) & 1
        return bits.bool()

    def dist(prefixes) -> torch.Tensor:
        seqs = torch.tensor([PROMPT + list(p) for p in prefixes])
        with torch.no_grad():
            logits = ref(seqs).logits[:, -1, :V].float()
        masks = torch.stack([allowed(p) for p in prefixes])
        st = SamplingTensors.from_params([params] * len(prefixes), torch.device("cpu"))
        if mask_first:
            return probabilities(logits.masked_fill(~masks, float("-inf")), st)
        p = probabilities(logits, st) * masks
        return p / p.sum(-1, keepdim=True).clamp(min=1e-30)

    p1 = dist([()])[0]
    p2 = dist([(a,) for a in range(V)])
    p3 = dist(list(itertools.product(range(V), range(V)))).view(V, V, V)
    return (p1[:, None, None] * p2[:, :, None] * p3).flatten().double().numpy()


@pytest.fixture(scope="module")
def word_engine(word_pair):
    return Engine(
        target=word_pair[0],
        draft=word_pair[1],
        config=EngineConfig(max_batch_size=64, max_context=32, max_queue=N),
    )


PARAMS = SamplingParams(temperature=1.0, top_k=6)  # top-k of the allowed tokens, not of all


def test_unmasked_constrained_drafting_keeps_the_joint(word_engine, word_pair):
    """Drafts proposed without the grammar (q unmasked, so some proposals have p = 0) are verified
    against the masked target: still the constrained target's joint."""
    unmasked = Engine(
        target=word_engine.target,
        draft=word_engine.draft,
        config=dataclasses.replace(word_engine.config, mask_constrained_drafts=False, warmup=False),
    )
    # Unmasked, most proposals break the grammar (about 0.13 are accepted).
    observed = sampled_joint_of_three(
        unmasked, PROMPT, V, PARAMS, 2, N // 2, seed_base=90_000, constraint=WORDS, agreement=(0.05, 0.95)
    )
    assert chi_square_pvalue(observed, _masked_joint(word_pair[0], PARAMS, WORDS)) > ALPHA


def test_constrained_sampling_keeps_the_constrained_targets_joint(word_engine, word_pair):
    observed = sampled_joint_of_three(
        word_engine, PROMPT, V, PARAMS, 2, N, seed_base=70_000, constraint=WORDS
    )
    expected = _masked_joint(word_pair[0], PARAMS, WORDS)
    assert chi_square_pvalue(observed, expected) > ALPHA
    # Negative control: the same samples against the transform-then-mask order are rejected, so
    # the test tells the two orders apart (and would catch an engine that masked after top-k).
    wrong = _masked_joint(word_pair[0], PARAMS, WORDS, mask_first=False)
    assert np.abs(wrong - expected).sum() > 0.2  # the orders differ here
    with pytest.raises(AssertionError):  # the zero-probability check or the χ² itself
        assert chi_square_pvalue(observed, wrong) > ALPHA


def test_a_constrained_external_draft_keeps_the_joint(word_engine, word_pair):
    """The router's escalation path: a previous answer (here a fixed prediction, w3 w5 w15, which
    the grammar allows) as the external draft of a constrained sampled request, verified as point
    masses under the grammar: still the constrained target's joint."""
    observed = sampled_joint_of_three(
        word_engine, PROMPT, V, PARAMS, 2, N // 2, seed_base=60_000, constraint=WORDS,
        agreement=(0.02, 0.98), external_draft=[3, 5, 15],
    )  # fmt: skip
    assert chi_square_pvalue(observed, _masked_joint(word_pair[0], PARAMS, WORDS)) > ALPHA


@pytest.fixture(scope="module")
def subset_word_engine(word_engine, word_pair, tmp_path_factory):
    """A small-head draft without w4, w7, w8, w11, w12, w13, w14: after w3, w6 or w10 the
    grammar allows no token it can propose, so those rows fall back to γ = 0 there."""
    from specdec.models.subset_head import restrict_checkpoint

    subset = [0, 1, 2, 3, 5, 6, 9, 10, 15]
    draft = restrict_checkpoint(
        word_pair[1], tmp_path_factory.mktemp("subset-grammar"), subset, share_embeddings=True
    )
    return Engine(
        target=word_engine.target, draft=draft, config=dataclasses.replace(word_engine.config, warmup=False)
    )


def test_a_subset_head_draft_under_a_grammar_keeps_the_joint(subset_word_engine, word_pair):
    observed = sampled_joint_of_three(
        subset_word_engine, PROMPT, V, PARAMS, 2, N // 2, seed_base=80_000, constraint=WORDS
    )
    assert observed.sum() == N // 2  # no row failed for want of a proposable token
    assert chi_square_pvalue(observed, _masked_joint(word_pair[0], PARAMS, WORDS)) > ALPHA


def test_free_rows_keep_one_host_read_per_step_and_constrained_rows_add_one_per_draft_pass(
    engine, monkeypatch
):
    """The design's one device-to-host copy per step (`readback.HostCopy.fetch`) holds for every
    decode step; the matchers' read of the proposals (`_DraftGrammar.advance`, one per draft pass) happens
    only in steps that have a constrained drafting row - never for a batch of free rows."""
    from specdec import speculative
    from specdec.readback import HostCopy

    counts = {"fetch": 0, "advance": 0}
    real_fetch, real_advance = HostCopy.fetch, speculative._DraftGrammar.advance

    def fetch(self, device):
        counts["fetch"] += 1
        return real_fetch(self, device)

    def advance(self, *args):
        counts["advance"] += 1
        return real_advance(self, *args)

    monkeypatch.setattr(HostCopy, "fetch", fetch)
    monkeypatch.setattr(speculative._DraftGrammar, "advance", advance)
    runner = _scheduled(engine, [3])  # γ = 3 every step
    steps = []
    free = [
        runner.make_request(p, SamplingParams(max_new_tokens=12, ignore_eos=True)) for p in ("the cat", "x")
    ]
    runner.generate(free, on_step=steps.append)
    decode_steps = sum(1 for s in steps if s.gammas)
    assert counts["advance"] == 0 and counts["fetch"] == decode_steps > 0
    counts.update(fetch=0, advance=0)
    steps.clear()
    mixed = [
        runner.make_request("the cat", SamplingParams(max_new_tokens=12, ignore_eos=True)),
        runner.make_request("x", SamplingParams(max_new_tokens=12), constraint=CONSTRAINTS["json"]),
    ]
    runner.generate(mixed, on_step=steps.append)
    assert counts["fetch"] == sum(1 for s in steps if s.gammas)
    assert 0 < counts["advance"] <= 3 * len(steps)  # at most one per draft pass of each step


def test_drafts_are_masked_by_default_on_the_cpu_only():
    """On the CPU a host read costs nothing and masked drafting measured faster; on a GPU each read
    synchronises, so by default constrained rows draft unmasked there (one extra read a step, not
    one per draft pass); EngineConfig.mask_constrained_drafts overrides either way."""
    from specdec.runner import mask_drafts_on

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert mask_drafts_on(None, cpu) is True and mask_drafts_on(None, cuda) is False
    assert mask_drafts_on(True, cuda) is True and mask_drafts_on(False, cpu) is False
