"""benches/soak.py at a small N in the suite (the 10,000-request run is in docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "benches" / "soak.py"


@pytest.mark.slow
@pytest.mark.skipif(not SOAK.exists(), reason="needs the repository's benches/")
def test_a_small_soak_loses_nothing(pairs, tmp_path):
    target, draft = pairs("llama-close")
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--requests", "240", "--concurrency", "8", "--target", str(target),
         "--draft", str(draft), "--max-new-tokens", "12", "--max-batch-size", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["lost"] == 0 and all(report["checks"].values())
    # The mix really was mixed: every kind of call was made.
    assert set(report["by_kind"]) == {
        "unary",
        "stream",
        "cancel",
        "deadline",
        "malformed",
        "garbage",
        "bad_key",
        "no_key",
    }
    assert (
        report["statuses"].get("bad_key:UNAUTHENTICATED", 0) > 0 and report["statuses"].get("unary:OK", 0) > 0
    )
