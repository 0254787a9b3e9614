"""Host time of detokenizing and stop-checking one engine step, byte path against window path.

    python benches/detokenize.py                 # the default target's tokenizer (SmolLM2)
    python benches/detokenize.py --target DIR    # another checkpoint's tokenizer

A step at batch size B with γ drafts emits up to γ + 1 tokens per row; every one goes through the
row's `OutputStopper` (detokenizer, stop strings) and the step's text is taken for streaming. This
times exactly that - `consume` and `take_text` over B rows of γ + 1 tokens - for the byte-level path
(`TokenPieces.byte_level`: token bytes through an incremental UTF-8 decoder) and for the window
path every other tokenizer takes (two `tokenizer.decode` calls per token), on the same tokens: the
target's own tokenization of real text, cut into steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from specdec.stopping import OutputStopper
from specdec.tokenization import TokenPieces

TEXT = (
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre and its cafés. "
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    "Naïve façades, 東京 and emoji 🎉 spread across tokens as partial UTF-8 characters. "
) * 40


def step_seconds(
    pieces: TokenPieces, ids: list[int], batch: int, gamma: int, stops: tuple[str, ...]
) -> float:
    """Median seconds of one step: `batch` rows each consuming gamma + 1 tokens, then take_text."""
    width = gamma + 1
    rows = [OutputStopper(pieces, ids[:5], (), (), stops, 10**9, 10**9) for _ in range(batch)]
    samples = []
    for start in range(0, len(ids) - width, width):
        chunk = ids[start : start + width]
        t0 = time.perf_counter()
        for row in rows:
            row.consume(chunk)
            row.take_text(final=False)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target", default=None, help="checkpoint whose tokenizer to use (default: the default target)"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--gamma", type=int, default=8)
    args = parser.parse_args()

    from specdec.assets import default_target
    from specdec.models.loader import load_tokenizer
    from specdec.models.sources import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.target or default_target())
    tokenizer = load_tokenizer(checkpoint.path)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    byte_path = TokenPieces(tokenizer)
    window_path = TokenPieces(tokenizer)
    window_path.byte_level = False
    result = {"tokenizer": checkpoint.name, "byte_level": byte_path.byte_level, "batch": args.batch,
              "gamma": args.gamma, "tokens_per_step": args.batch * (args.gamma + 1), "runs": {}}  # fmt: skip
    for stops in ((), ("\n\n", "</answer>")):
        key = "with stop strings" if stops else "no stop strings"
        timings = {}
        for _ in range(3):  # interleaved; the per-token byte cache is warm after the first
            for name, pieces in (("byte path", byte_path), ("window path", window_path)):
                timings.setdefault(name, []).append(step_seconds(pieces, ids, args.batch, args.gamma, stops))
        ms = {name: round(1000 * min(v), 3) for name, v in timings.items()}
        ms["window / byte"] = round(ms["window path"] / ms["byte path"], 1)
        result["runs"][key] = ms
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
