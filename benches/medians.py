"""The one timer of the scripts in benches/: median milliseconds of a call, after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(fn: Callable[[], object], runs: int) -> float:
    """Median wall milliseconds of `runs` calls of `fn`, after 2 untimed warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved_median_ms(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median wall milliseconds of each of `fns`, the calls taken in turn (a, b, a, b, ...) so that
    a noisy machine's slow spells fall on all of them alike; 2 untimed warm-up rounds."""
    for _ in range(2):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}
