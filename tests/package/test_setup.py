"""`make serve`'s set-up on a fresh clone: what serving needs and no more, one line per step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from specdec.testing import copy_checkout

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git checkout of specdec")


@pytest.mark.slow
def test_the_serve_setup_installs_only_what_serving_needs_and_says_so_briefly(tmp_path):
    clone = copy_checkout(REPO, tmp_path / "clone")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("VIRTUAL_ENV", None)
    out = subprocess.run(
        ["bash", "scripts/setup.sh", "serve"], cwd=clone, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines and all(line.startswith("specdec: ") for line in lines) and len(lines) <= 5, lines
    assert out.stderr == "", out.stderr[-2000:]
    python = clone / ".venv" / "bin" / "python"
    check = (
        # xgrammar imports (constrained output works) without triton, which it lists but needs on GPUs only.
        "import importlib.util as u, specdec.engine, specdec.server.app, specdec.server.http, xgrammar\n"
        "tools = ('pytest', 'hypothesis', 'ruff', 'scipy', 'matplotlib', 'triton', 'openai')\n"
        "print([m for m in tools if u.find_spec(m)])\n"
    )
    dev = subprocess.run([str(python), "-I", "-c", check], capture_output=True, text=True)
    assert dev.returncode == 0, dev.stderr
    assert dev.stdout.strip() == "[]", f"test tools installed for serving: {dev.stdout}"
    again = subprocess.run(
        ["bash", "scripts/setup.sh", "serve"], cwd=clone, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0 and again.stdout.splitlines() == [
        "specdec: installing specdec from this checkout"
    ]
