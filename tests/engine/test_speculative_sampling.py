"""Sampled speculative decoding follows the target's distribution, end to end through the engine.

A tiny-vocabulary pair (16 word tokens) whose draft agrees with the target often but not always:
the joint distribution of the first three generated tokens over thousands of seeded requests is
compared by χ² (at 1e-3) with the exact joint computed from the target (`transformers`, fp32)
under the same sampling transform. A wrong acceptance rule run through the same engine fails.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.kernels import rejection_sample as rs
from specdec.request import Mode
from specdec.speculative import AcceptKernels
from specdec.testing import chi_square_pvalue, hf_reference, joint_of_three, sampled_joint_of_three

V = 16
PROMPT = [5, 9, 3, 12]
N = 2400
ALPHA = 1e-3


@pytest.fixture(scope="module")
def pair(word_pair):
    return word_pair


@pytest.fixture(scope="module")
def engine(pair):
    return Engine(
        target=pair[0], draft=pair[1], config=EngineConfig(max_batch_size=64, max_context=32, max_queue=N)
    )


def exact_joint(path, params: SamplingParams) -> np.ndarray:
    """P(t1, t2, t3 | PROMPT) under the target's transformed distribution, [V**3]."""
    ref = hf_reference(path)
    return joint_of_three(lambda seqs: ref(seqs).logits[:, -1], PROMPT, V, params)


def sampled_joint(engine, params: SamplingParams, gamma: int, seed_base: int = 0) -> np.ndarray:
    return sampled_joint_of_three(engine, PROMPT, V, params, gamma, N, seed_base)


@pytest.mark.parametrize(
    "params,gamma",
    [
        (SamplingParams(temperature=1.0), 2),
        (SamplingParams(temperature=0.8, top_k=6, top_p=0.9), 3),
    ],
    ids=["t1-gamma2", "truncated-gamma3"],
)
def test_joint_of_first_three_tokens_matches_the_target(engine, pair, params, gamma):
    expected = exact_joint(pair[0], params)
    observed = sampled_joint(engine, params, gamma)
    assert chi_square_pvalue(observed, expected) > ALPHA


@pytest.mark.parametrize(
    "rule",
    [{"residual_rule": lambda p, q: p}, {"accept_rule": lambda p_d, q_d, u: u * p_d < q_d}],
    ids=["replacement-from-p", "inverted-ratio"],
)
def test_a_wrong_rule_through_the_engine_fails(engine, pair, rule):
    """Negative controls end to end: the same test rejects a wrong rule run through the engine."""
    params = SamplingParams(temperature=1.0)
    expected = exact_joint(pair[0], params)
    wrong = _with_wrong_rule(engine, **rule)
    observed = sampled_joint(wrong, params, 2, seed_base=10_000)
    assert chi_square_pvalue(observed, expected) < ALPHA


def _with_wrong_rule(engine: Engine, **rule) -> Engine:
    """An engine on `engine`'s models whose rejection sampling runs the reference with `rule`
    swapped in. γ is forced in these tests, so it needs no start-up cost measurement."""

    def run(*args, **kwargs):
        return rs.rejection_sample_reference(*args, **kwargs, **rule)

    kernels = dataclasses.replace(AcceptKernels.for_device(engine.runner.device), rejection_sample=run)
    config = dataclasses.replace(engine.config, warmup=False)
    return Engine(target=engine.target, draft=engine.draft, config=config, kernels=kernels)


def test_seeded_requests_reproduce_and_seeds_differ(engine):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    a = engine.generate([PROMPT], params, num_speculative_tokens=3)[0]
    # Again, now in a batch with other requests around it.
    others = [
        SamplingParams(max_new_tokens=5 + i, temperature=0.9, seed=100 + i, ignore_eos=True) for i in range(5)
    ]
    batch = engine.generate(
        [[3, 4]] * 2 + [PROMPT] + [[6]] * 3, others[:2] + [params] + others[2:5], num_speculative_tokens=3
    )
    assert batch[2].token_ids == a.token_ids
    different = {
        tuple(
            engine.generate(
                [PROMPT],
                SamplingParams(max_new_tokens=12, temperature=1.0, seed=s, ignore_eos=True),
                num_speculative_tokens=3,
            )[0].token_ids
        )
        for s in range(8, 14)
    }
    assert len(different) > 3


# A draft with a small output head (10 of the 16 tokens) that borrows the target's embeddings:
# q is 0 on the other 6, which the target still emits through the residual.
SUBSET = [0, 1, 2, 3, 5, 7, 8, 11, 12, 14]


@pytest.fixture(scope="module")
def subset_engine(pair, engine, tmp_path_factory):
    from specdec.models.subset_head import restrict_checkpoint

    draft = restrict_checkpoint(
        pair[1], tmp_path_factory.mktemp("subset-draft"), SUBSET, share_embeddings=True
    )
    subset = Engine(
        target=engine.target, draft=draft, config=dataclasses.replace(engine.config, warmup=False)
    )
    assert subset.draft.config.head_tokens == len(SUBSET) and subset.vocab_size == V
    assert subset.draft.model.embed_tokens.weight is subset.target.model.embed_tokens.weight
    return subset


def test_a_subset_head_draft_keeps_the_targets_joint(subset_engine, pair):
    params = SamplingParams(temperature=1.0)
    observed = sampled_joint(subset_engine, params, 2, seed_base=20_000)
    outside = [t for t in range(V) if t not in SUBSET]
    first_tokens = observed.reshape(V, V * V).sum(1)
    assert first_tokens[outside].sum() > 0, "the target never emitted a token the draft cannot propose"
    assert chi_square_pvalue(observed, exact_joint(pair[0], params)) > ALPHA


def test_a_wrong_rule_with_a_subset_head_draft_fails(subset_engine, pair):
    """The negative control for the subset path: the same χ² test rejects a wrong residual."""
    wrong = _with_wrong_rule(subset_engine, residual_rule=lambda p, q: p)
    observed = sampled_joint(wrong, SamplingParams(temperature=1.0), 2, seed_base=30_000)
    assert chi_square_pvalue(observed, exact_joint(pair[0], SamplingParams(temperature=1.0))) < ALPHA


def test_a_draft_on_the_targets_first_layer_keeps_the_targets_joint(engine, pair, tmp_path):
    """A draft that borrows the target's layer 0 (and embeddings) under its own layer 1 and a
    subset head: the same χ² test (the rule's negative control is the subset test's above)."""
    from specdec.models.subset_head import restrict_checkpoint

    draft = restrict_checkpoint(pair[1], tmp_path / "layered", SUBSET, share_embeddings=True, shared_layers=1)
    layered = Engine(
        target=engine.target, draft=draft, config=dataclasses.replace(engine.config, warmup=False)
    )
    assert layered.draft.config.shared_layers == 1
    assert (
        layered.draft.model.layers[0].mlp.down_proj.weight
        is layered.target.model.layers[0].mlp.down_proj.weight
    )
    params = SamplingParams(temperature=1.0)
    observed = sampled_joint(layered, params, 2, seed_base=40_000)
    assert chi_square_pvalue(observed, exact_joint(pair[0], params)) > ALPHA


@pytest.fixture(scope="module")
def feature_engine(pair, engine, tmp_path_factory):
    """A feature-reading (EAGLE) draft: the noisy draft with an fc that mixes in the target's
    features, so its proposals - and their q - depend on them."""
    from specdec.testing import feature_draft

    draft = feature_draft(pair[1], tmp_path_factory.mktemp("eagle-draft"), feature_scale=0.03, seed=4)
    eagle = Engine(target=engine.target, draft=draft, config=dataclasses.replace(engine.config, warmup=False))
    assert eagle.draft.config.feature_input and eagle.runner.target_cache.features is not None
    return eagle


def test_a_feature_reading_draft_keeps_the_targets_joint(feature_engine, pair):
    params = SamplingParams(temperature=1.0)
    observed = sampled_joint(feature_engine, params, 2, seed_base=70_000)
    assert chi_square_pvalue(observed, exact_joint(pair[0], params)) > ALPHA


def test_a_wrong_rule_with_a_feature_reading_draft_fails(feature_engine, pair):
    """The negative control for the feature path: the same χ² test rejects a wrong residual."""
    wrong = _with_wrong_rule(feature_engine, residual_rule=lambda p, q: p)
    observed = sampled_joint(wrong, SamplingParams(temperature=1.0), 2, seed_base=80_000)
    assert chi_square_pvalue(observed, exact_joint(pair[0], SamplingParams(temperature=1.0))) < ALPHA


@pytest.fixture(scope="module")
def small_answers(engine):
    """N sampled answers of the draft model alone: what the router's small tier returns."""
    return engine.generate(
        [
            engine.make_request(PROMPT, dataclasses.replace(REUSE, seed=50_000 + i), Mode.DRAFT)
            for i in range(N)
        ]
    )


REUSE = SamplingParams(temperature=1.0, max_new_tokens=3, ignore_eos=True)


def _escalate(engine, small, mode, seed_base=60_000):
    from specdec.router.router import draft_request

    requests = [
        draft_request(engine, PROMPT, dataclasses.replace(REUSE, seed=seed_base + i), mode, answer, "draft")
        for i, answer in enumerate(small)
    ]
    return engine.generate(requests)


def _joint(results) -> np.ndarray:
    counts = np.zeros(V**3)
    for r in results:
        a, b, c = r.token_ids
        counts[(a * V + b) * V + c] += 1
    return counts


def test_a_reused_small_answer_keeps_the_targets_joint(engine, pair, small_answers):
    """The router's escalation (router.draft_request): the draft model's sampled answer is the
    target's external draft; the target's output keeps its own distribution, whether the answer
    is verified as point masses (target mode) or against the draft's q (speculative mode, which
    keeps more of it). The negative control: the small answers themselves (what blind reuse would
    return) fail the same test."""
    exact = exact_joint(pair[0], SamplingParams(temperature=1.0))
    kept = {}
    for mode in (Mode.TARGET, Mode.SPECULATIVE):
        escalated = _escalate(engine, small_answers, mode)
        kept[mode] = sum(r.token_ids[0] == s.token_ids[0] for r, s in zip(escalated, small_answers))
        # The target kept some small answers' first token and replaced others.
        assert 0.05 * N < kept[mode] < 0.95 * N, (mode, kept[mode])
        assert chi_square_pvalue(_joint(escalated), exact) > ALPHA, mode
    # min(1, p/q) >= p at every token: verified against q, more of the answer stands.
    assert kept[Mode.SPECULATIVE] > kept[Mode.TARGET] + 0.05 * N, kept
    assert chi_square_pvalue(_joint(small_answers), exact) < ALPHA


def test_a_reused_small_answer_with_a_wrong_residual_fails(engine, pair, small_answers):
    """The negative control for the q path: replacing a rejected token from p instead of
    norm(max(0, p - q)) is caught by the same test."""
    wrong = _with_wrong_rule(engine, residual_rule=lambda p, q: p)
    escalated = _escalate(wrong, small_answers, Mode.SPECULATIVE, seed_base=70_000)
    assert chi_square_pvalue(_joint(escalated), exact_joint(pair[0], SamplingParams(temperature=1.0))) < ALPHA


def test_a_scored_answer_beside_model_drafted_rows_reproduces(engine, small_answers):
    """A q-verified external row shares the step's q with model-drafted sampled rows (one stacked
    tensor): its seeded output is the same alone and in that batch."""
    from specdec.router.router import draft_request

    answer = next(a for a in small_answers if len(set(a.token_ids)) > 1)
    params = dataclasses.replace(REUSE, max_new_tokens=8, seed=5)

    def make():
        request = draft_request(engine, PROMPT, params, Mode.SPECULATIVE, answer, "draft")
        request.num_speculative_tokens = 3  # a seeded output is reproducible for a given γ schedule
        return request

    [alone] = engine.generate([make()])
    others = [
        engine.make_request(
            [3, 4, 6], SamplingParams(max_new_tokens=8, temperature=0.9, seed=s), Mode.SPECULATIVE, 3
        )
        for s in range(4)
    ]
    batch = engine.generate(others[:2] + [make()] + others[2:])
    assert batch[2].token_ids == alone.token_ids
    assert alone.stats.drafted_tokens >= 2  # the answer's two tokens were verified as drafts


def test_q_verification_is_for_the_drafts_own_answers_in_speculative_mode(engine, small_answers):
    from specdec.errors import InvalidRequestError

    answer = small_answers[0].token_ids
    for mode, external in ((Mode.TARGET, answer), (Mode.SPECULATIVE, None)):
        request = engine.make_request(
            PROMPT, REUSE, mode, external_draft=external, external_draft_from_draft=True
        )
        with pytest.raises(InvalidRequestError, match="external_draft_from_draft"):
            engine.generate([request])
    # Greedy rows ignore q: the output is the target's own, token for token.
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    [target] = engine.generate([PROMPT], greedy, mode=Mode.TARGET)
    request = engine.make_request(
        PROMPT, greedy, Mode.SPECULATIVE, external_draft=answer, external_draft_from_draft=True
    )
    assert engine.generate([request])[0].token_ids == target.token_ids


def test_a_scored_answer_beside_greedy_drafting_rows(engine, small_answers):
    """The step's q holds only the scored chunks when every drafting row is greedy: the greedy rows
    read none of it, and every row is still right."""
    from specdec.router.router import draft_request

    answer = small_answers[1]
    params = dataclasses.replace(REUSE, max_new_tokens=8, seed=11)

    def scored():
        request = draft_request(engine, PROMPT, params, Mode.SPECULATIVE, answer, "draft")
        request.num_speculative_tokens = 3
        return request

    [alone] = engine.generate([scored()])
    greedy = SamplingParams(max_new_tokens=8, ignore_eos=True)
    prompts = [[3, 4, 6], [7, 1]]
    targets = engine.generate(prompts, greedy, mode=Mode.TARGET)
    batch = engine.generate(
        [engine.make_request(p, greedy, Mode.SPECULATIVE, 2) for p in prompts] + [scored()]
    )
    assert all(r.error is None for r in batch)
    assert [r.token_ids for r in batch[:2]] == [t.token_ids for t in targets]
    assert batch[2].token_ids == alone.token_ids


def test_q_verification_only_where_the_recomputed_q_is_the_sampled_one(engine, small_answers):
    from specdec.router.router import draft_request

    answer = small_answers[0]

    def ask(**p):
        return draft_request(
            engine, PROMPT, dataclasses.replace(REUSE, **p), Mode.SPECULATIVE, answer, "draft"
        )

    assert ask().external_draft_from_draft  # float32, untruncated
    assert not ask(top_p=0.9).external_draft_from_draft and not ask(top_k=5).external_draft_from_draft
    assert not draft_request(engine, PROMPT, REUSE, Mode.TARGET, answer, "draft").external_draft_from_draft
    assert not draft_request(
        engine, PROMPT, REUSE, Mode.SPECULATIVE, answer, "speculative"
    ).external_draft_from_draft
