"""benches/gpu_suite.sh runs where the device tool allows 600 s a command: it must parse, keep one
deadline under that limit, and give every step a limit; the steps that bench a pair must name one
the GPU machine has (the demo pair or random weights: the default pair's files cannot travel)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SUITE = Path(__file__).resolve().parents[2] / "benches" / "gpu_suite.sh"


def test_the_suite_parses_and_fits_the_device_command_limit():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)
    text = SUITE.read_text()
    budget = int(re.search(r"BUDGET_S=\$\{GPU_SUITE_BUDGET_S:-(\d+)\}", text).group(1))
    assert budget <= 580  # the install before the first step and the tarball after take the rest
    steps = re.findall(r'^step "([^"]+)" (\d+) (.*)$', text, flags=re.M)
    assert len(steps) >= 5
    for name, limit, command in steps:
        assert 0 < int(limit) <= budget, name
        if "specdec.cli bench" in command or "load_test.py" in command:
            assert "--demo" in command or "--random-weights" in command, name
