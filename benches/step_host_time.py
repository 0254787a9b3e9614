"""Host time of one speculative step: `SpeculativeStep.run` on a tiny random pair, where the models
cost next to nothing and what is left is the step's own work on the host - building every pass's
inputs, the sampling parameters, the draft placements, the launches and the one readback.

    python benches/step_host_time.py [--batch 1,16] [--gamma 8] [--against OTHER/specdec/speculative.py]

--against times another version of the step (an older checkout's `specdec/speculative.py`, whose
`SpeculativeStep` takes over the same engine's runner) in the same process, batches taken in turn
(a, b, a, b, ...), so the noisy machine's slow spells fall on both alike. It also counts what would
be host-to-device copies on a GPU (a tensor moved to a device, or made from Python values) per
step. Greedy and sampled rows alike, a fixed γ, answers that never end early.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch
from other_version import load_module  # benches/other_version.py, beside this script

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.planner import GammaPlanner
from specdec.speculative import SpeculativeStep
from specdec.testing import HostTensorCount, perturb_checkpoint, write_tiny_checkpoint


def generate(engine: Engine, batch: int) -> None:
    """One batch of `batch` rows, half greedy and half sampled."""
    params = [
        SamplingParams(max_new_tokens=72, ignore_eos=True, temperature=0.0 if b % 2 else 0.8, seed=b)
        for b in range(batch)
    ]
    engine.generate([engine.make_request(f"row {b}:", p) for b, p in zip(range(batch), params)])


def step_costs(engine: Engine, batch: int, repeats: int, steps: dict[str, type]) -> dict[str, dict]:
    """Per step class: median milliseconds of a step over `repeats` batches (after a warm-up
    batch; the classes take turns), and the host tensors a step makes, counted in one more batch
    apart (counting slows every torch call)."""
    runner = engine.runner
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    moves: dict[str, list[int]] = {name: [] for name in steps}

    def run_as(name: str, cls: type, count: bool) -> None:
        real_run = cls.run

        def timed(self, plans, draft_only):
            if count:
                with HostTensorCount() as seen:
                    out = real_run(self, plans, draft_only)
                moves[name].append(seen.moves)
                return out
            t0 = time.perf_counter()
            out = real_run(self, plans, draft_only)
            seconds[name].append(time.perf_counter() - t0)
            return out

        runner.step.__class__ = cls
        cls.run = timed
        try:
            generate(engine, batch)
        finally:
            cls.run = real_run

    for cls in steps.values():
        runner.step.__class__ = cls
        generate(engine, batch)  # warm-up
    for _ in range(repeats):
        for name, cls in steps.items():
            run_as(name, cls, count=False)
    for name, cls in steps.items():
        run_as(name, cls, count=True)
    runner.step.__class__ = SpeculativeStep
    return {
        name: {
            "median_step_ms": round(statistics.median(seconds[name]) * 1e3, 3),
            "host_tensors_per_step": statistics.median(moves[name]),
            "steps": len(seconds[name]),
        }
        for name in steps
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--gamma", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--against", default=None, help="another version's specdec/speculative.py")
    args = parser.parse_args()
    torch.set_num_threads(2)
    batches = [int(b) for b in args.batch.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        target = write_tiny_checkpoint(f"{tmp}/target", hidden_size=64, num_layers=2)
        draft = perturb_checkpoint(target, f"{tmp}/draft", noise=0.05, seed=9)
        config = EngineConfig(max_batch_size=max(batches), max_context=256, max_gamma=args.gamma)
        planner = GammaPlanner(config, gamma_override=lambda seq: args.gamma)
        engine = Engine(target=str(target), draft=str(draft), config=config, planner=planner)
        steps = {"this": SpeculativeStep}
        if args.against:
            steps["against"] = load_module(args.against, "other_speculative").SpeculativeStep
        results = {batch: step_costs(engine, batch, args.repeats, steps) for batch in batches}
    record = {
        "bench": "step_host_time",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 2 threads",
        "command": " ".join(["python benches/step_host_time.py", *sys.argv[1:]]),
        "gamma": args.gamma,
        "results": results,
    }
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
