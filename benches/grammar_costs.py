"""What constrained output costs on the host, on the default target's tokenizer (SmolLM2, 49152
tokens): building xgrammar's tokenizer info (once per engine), compiling the extraction schema of
benches/structured_output.py (first time and from the cache), and per token the mask fill
(matcher state -> bitmask), the mask's application to one row of logits, and a bitmask's
allocation - medians over the tokens of one answer.

    python benches/grammar_costs.py
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
from structured_output import SCHEMA  # benches/structured_output.py, beside this script

from specdec.assets import default_target
from specdec.grammar import Constraint, ConstraintKind, Grammars, apply_bitmask, new_bitmask
from specdec.models import load_checkpoint


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    target = load_checkpoint(default_target())
    width = target.config.vocab_size
    print(
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {platform.node()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; vocabulary {width}"
    )
    grammars: list[Grammars] = []
    info_ms = timed(
        lambda: grammars.append(Grammars(target.tokenizer, width, (target.tokenizer.eos_token_id,)))
    )
    constraint = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))
    first_ms = timed(lambda: grammars[0].row(constraint))
    cached_ms = timed(lambda: grammars[0].row(constraint))
    row = grammars[0].row(constraint)
    bitmask = new_bitmask(1, width)
    logits = torch.randn(1, width)
    fills, applies, allocations = [], [], []
    for token in target.tokenizer.encode('{"name": "John Smith", "age": 31, "city": "Boston"}'):
        fills.append(timed(lambda: row.fill(bitmask, 0)))
        applies.append(timed(lambda: apply_bitmask(logits, bitmask, width, [0])))  # in place
        allocations.append(timed(lambda: new_bitmask(5, width)))
        assert row.speculate(token)
    print(f"| tokenizer info (once per engine) | {info_ms:.1f} ms |")
    print(f"| compile the schema, first time | {first_ms:.2f} ms |")
    print(f"| compile the schema, cached | {cached_ms:.3f} ms |")
    print(
        f"| fill one mask (per token) | {statistics.median(fills) * 1e3:.1f} µs (max {max(fills) * 1e3:.0f}) |"
    )
    print(f"| apply one mask to a row of logits (per token) | {statistics.median(applies) * 1e3:.0f} µs |")
    print(f"| allocate a 5-row bitmask (per pass) | {statistics.median(allocations) * 1e3:.0f} µs |")


if __name__ == "__main__":
    main()
