"""The step's one host-to-device copy (specdec/staging.py): arrays of every dtype a step sends come
back equal and in the order added; a decode step sends all its per-row inputs in exactly one copy
and makes no other host tensor on the way; and the rows each phase takes from the step's one row
table are the right ones (a seeded batch gives each row what it gives alone)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.planner import GammaPlanner
from specdec.request import Mode
from specdec.speculative import SpeculativeStep
from specdec.staging import HostStaging
from specdec.testing import HostTensorCount

CONFIG = EngineConfig(max_batch_size=8, max_context=160, max_gamma=6)


def test_mixed_dtypes_and_odd_sizes_round_trip():
    rng = np.random.default_rng(0)
    arrays = [
        np.array([True, False, True]),  # 3 bytes added first: later arrays must still land aligned
        rng.integers(0, 50_000, (3, 5)),
        rng.standard_normal((2, 3)).astype(np.float32),
        np.zeros((3, 0), dtype=np.int64),  # no bytes at all
        rng.integers(0, 9, 7).astype(np.int32),
        np.array([-1], dtype=np.int8),
        [[1, 2], [3, 4]],  # a list is staged as an array of its values
    ]
    staging = HostStaging()
    handles = [staging.add(a) for a in arrays]
    uploaded = staging.upload(torch.device("cpu"))
    assert handles == list(range(len(arrays)))
    for a, h in zip(arrays, handles):
        assert np.array_equal(uploaded[h].numpy(), np.asarray(a)) and uploaded[h].shape == np.shape(a)
        assert uploaded[h].data_ptr() % 16 == 0  # as a fresh allocation's (Triton specialises on it)
    assert staging.upload(torch.device("cpu")) == []  # emptied: ready for another round
    with pytest.raises(TypeError, match="float64"):
        staging.add(np.zeros(2))


def _own_gamma(seq) -> int:
    """A γ that depends on the row's own progress only, so a row runs the same schedule in any
    batch: plain target steps (the draft then catches up), short and long drafts."""
    return (0, 0, 3, 1, 6)[len(seq.tokens) % 5]


@pytest.fixture(scope="module")
def engine(pairs):
    target, draft = pairs("llama-close")
    planner = GammaPlanner(CONFIG, gamma_override=_own_gamma)
    return Engine(target=target, draft=draft, config=CONFIG, planner=planner)


def _requests(engine):
    """Greedy and sampled (with top-k / top-p) speculative rows, a draft-only row and a row with an
    external draft, so that each phase's rows are a gather from the step's row table, not a slice."""
    sampled = SamplingParams(max_new_tokens=14, temperature=0.9, top_k=20, seed=5, ignore_eos=True)
    return [
        engine.make_request("the cat", SamplingParams(max_new_tokens=14, ignore_eos=True)),
        engine.make_request("x = 1", sampled),
        engine.make_request("def f", SamplingParams(max_new_tokens=10, temperature=1.0, seed=9), Mode.DRAFT),
        engine.make_request(
            "hello", SamplingParams(max_new_tokens=12, ignore_eos=True), external_draft=[5, 6, 7]
        ),
        engine.make_request("a b c", SamplingParams(max_new_tokens=14, temperature=0.7, top_p=0.8, seed=2)),
    ]


def test_a_decode_step_sends_its_inputs_in_one_copy(engine, monkeypatch):
    counts = {"runs": 0, "uploads": 0, "moves": 0, "in_step": False}
    real_run, real_upload = SpeculativeStep.run, HostStaging.upload

    def upload(self, device):
        counts["uploads"] += counts["in_step"]  # prefill passes upload too, apart from the step
        return real_upload(self, device)

    def run(self, plans, draft_only):
        counts["runs"] += 1
        counts["in_step"] = True
        with HostTensorCount() as seen:
            outcomes = real_run(self, plans, draft_only)
        counts["in_step"] = False
        counts["moves"] += seen.moves
        return outcomes

    monkeypatch.setattr(HostStaging, "upload", upload)
    monkeypatch.setattr(SpeculativeStep, "run", run)
    engine.generate(_requests(engine))
    assert counts["runs"] > 0
    # One upload per step, moved once to the device (`Tensor.to`), nothing else made on the host.
    assert counts["uploads"] == counts["runs"] and counts["moves"] == counts["runs"]


def test_each_row_of_a_mixed_batch_gets_what_it_gets_alone(engine):
    together = engine.generate(_requests(engine))
    alone = [engine.generate([r])[0] for r in _requests(engine)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in together}) == len(together)  # the rows differ
