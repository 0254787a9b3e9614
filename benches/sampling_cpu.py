"""Sampled decode on the CPU with the C Philox and top-p's candidate selection, against the
tensor-op Philox and the whole-vocabulary sort they replaced, side by side in one process.

    PYTHONPATH=.:benches python benches/sampling_cpu.py [--batch-sizes 1,16] [--repeats 3]

The default target alone, float32, chat prompts, temperature 0.8 and top-p 0.95, 64 new tokens
past the end of turn; the two variants alternate, and each figure is the median of the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import specdec.kernels.rejection_sample as rejection_sample
import specdec.kernels.sample as sample
import specdec.sampling as sampling
from specdec import Engine, SamplingParams
from specdec.assets import default_target
from specdec.config import EngineConfig
from specdec.distill.chat_data import instructions
from specdec.kernels.philox import uniform, uniform_reference
from specdec.request import Mode


@contextmanager
def tensor_op_sampling():
    """The sampling path before: Philox as tensor ops, top-p over the whole sorted row."""
    fast = sampling._top_k_top_p
    sample.uniform = rejection_sample.uniform = uniform_reference
    sampling._top_k_top_p = sampling._top_k_top_p_sorted
    try:
        yield
    finally:
        sample.uniform = rejection_sample.uniform = uniform
        sampling._top_k_top_p = fast


def rate(engine: Engine, prompts: list, params: SamplingParams) -> float:
    """Tokens per second of one batch, target alone."""
    t0 = time.perf_counter()
    results = engine.generate(prompts, params, mode=Mode.TARGET)
    return sum(len(r.token_ids) for r in results) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    print("| B | tensor-op sampling, tok/s | C Philox + candidates, tok/s | ratio |")
    print("|---|---|---|---|")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        engine = Engine(
            default_target(), config=EngineConfig(max_batch_size=b, max_context=512, dtype="float32")
        )
        prompts = [engine.render_chat([{"role": "user", "content": i}]) for i in instructions(b)]
        params = SamplingParams(
            max_new_tokens=args.new_tokens, temperature=0.8, top_p=0.95, seed=1, ignore_eos=True
        )

        before, after = [], []
        for _ in range(args.repeats):
            with tensor_op_sampling():
                before.append(rate(engine, prompts, params))
            after.append(rate(engine, prompts, params))
        old, new = statistics.median(before), statistics.median(after)
        print(f"| {b} | {old:.1f} | {new:.1f} | {new / old:.2f}x |")


if __name__ == "__main__":
    main()
