"""When a returned seed repeats a run - as docs/API.md (Seeds) and the README say, and no more."""

from __future__ import annotations

from pathlib import Path

import pytest

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.request import Mode

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine(pairs):
    target, draft = pairs("llama-close")
    return Engine(
        target=target, draft=draft, config=EngineConfig(max_batch_size=4, max_context=128, warmup=False)
    )


@pytest.mark.parametrize("mode,gamma", [(Mode.TARGET, 0), (Mode.DRAFT, 0), (Mode.SPECULATIVE, 3)])
def test_a_seed_repeats_the_run_where_the_docs_say_it_does(engine, mode, gamma):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=11, ignore_eos=True)
    [first] = engine.generate([[5, 6, 7]], params, mode=mode, num_speculative_tokens=gamma)
    # Again, beside other requests.
    others = [SamplingParams(max_new_tokens=9, temperature=0.7, seed=s, ignore_eos=True) for s in (1, 2)]
    batch = engine.generate(
        [[9, 8], [5, 6, 7], [4]], [others[0], params, others[1]], mode=mode, num_speculative_tokens=gamma
    )
    assert batch[1].token_ids == first.token_ids and first.seed == 11


@pytest.mark.skipif(not (REPO / "docs" / "API.md").exists(), reason="needs the repository's docs")
def test_the_docs_say_exactly_when_a_seed_repeats():
    api = (REPO / "docs" / "API.md").read_text()
    seeds = api[api.index("## Seeds") :]
    for phrase in (
        "`MODE_TARGET` and `MODE_DRAFT`",
        "with a\nfixed `num_speculative_tokens`",
        "Under adaptive γ",
    ):
        assert phrase in seeds, phrase
    assert (
        "same seed repeats the\nrun token for token in target or draft mode"
        in (REPO / "README.md").read_text()
    )
