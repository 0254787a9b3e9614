"""Greedy acceptance of drafts on the default target's held-out chat prompts, side by side.

    python benches/chat_acceptance.py DRAFT_DIR [DRAFT_DIR ...] [--gammas 1,2,4]

The 48 held-out instructions (`specdec/assets/smollm2_draft/heldout_prompts.json`, never trained
on) rendered whole by the chat template, answers ending at their end of turn (at most 128 tokens,
batch 16, float32), at each fixed γ: accepted / drafted (at γ = 1 that is the per-token
acceptance α), emitted tokens per verify pass, and a check that every draft gives the target's
own tokens. `specdec bench`'s chat workload differs on purpose - prompts cut to one length and
outputs run past the end of turn, for its Hugging Face batches and fixed lengths - and measures a
lower acceptance than this, the one a chat server sees.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from specdec import Engine, SamplingParams
from specdec.assets import DEFAULT_DRAFT, default_target
from specdec.config import EngineConfig
from specdec.request import Mode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("drafts", nargs="+", type=Path)
    ap.add_argument("--gammas", default="1,2,4")
    args = ap.parse_args()
    instructions = json.loads((DEFAULT_DRAFT / "heldout_prompts.json").read_text())["chat"]
    params = SamplingParams(max_new_tokens=128)
    reference = None
    print("| draft | γ | accepted / drafted | tokens per verify | tokens | seconds |")
    print("|---|---|---|---|---|---|")
    for draft in args.drafts:
        config = EngineConfig(max_batch_size=16, max_context=512, warmup=False, dtype="float32")
        engine = Engine(default_target(), draft, config=config)
        prompts = [engine.render_chat([{"role": "user", "content": i}]) for i in instructions]
        for gamma in (int(g) for g in args.gammas.split(",")):
            t0 = time.perf_counter()
            results = engine.generate(prompts, params, mode=Mode.SPECULATIVE, num_speculative_tokens=gamma)
            seconds = time.perf_counter() - t0
            tokens = [r.token_ids for r in results]
            reference = reference or tokens
            assert tokens == reference, f"{draft} at γ = {gamma} differs from the first run's tokens"
            drafted = sum(r.stats.drafted_tokens for r in results)
            accepted = sum(r.stats.accepted_tokens for r in results)
            verifies = sum(r.stats.verify_steps for r in results)
            emitted = sum(len(t) for t in tokens)
            print(
                f"| {draft} | {gamma} | {accepted / drafted:.3f} | {emitted / verifies:.3f} | {emitted} | {seconds:.0f} |"
            )


if __name__ == "__main__":
    main()
