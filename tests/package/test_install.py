"""The ways contributors install and run specdec: an editable install (`pip install -e .`) and
code run from the repository root both import the gRPC stubs (generated at build time, never
committed) and the kernels. `make test` itself tests the installed package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from specdec.testing import copy_checkout

REPO = Path(__file__).resolve().parents[2]
CHECK = (
    "import specdec, specdec.kernels, specdec.v1.specdec_pb2\n"
    "from specdec.client import Client\n"
    "print(specdec.__file__)\n"
)

pytestmark = pytest.mark.skipif(
    not (REPO / ".git").exists() or shutil.which("git") is None, reason="needs the git checkout of specdec"
)


def test_code_run_from_the_repository_root_imports_the_package_there():
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == REPO / "specdec" / "__init__.py"


@pytest.mark.slow
def test_an_editable_install_has_the_grpc_stubs(tmp_path):
    source = copy_checkout(REPO, tmp_path / "src")
    assert not (source / "specdec" / "v1").exists()  # the stubs are not part of the source
    prefix = tmp_path / "prefix"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed", "-e", str(source),
         "--prefix", str(prefix)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    site_dir = next(prefix.rglob("site-packages"))
    # The editable install, then this environment's packages (grpc, protobuf), not the working
    # directory; the editable finder goes first, as if it were the only specdec installed.
    check = (
        f"import site, sys\nsite.addsitedir({str(site_dir)!r})\n"
        f"site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
        "sys.meta_path.sort(key=lambda f: '__editable__' not in getattr(f, '__module__', ''))\n" + CHECK
    )
    out = subprocess.run([sys.executable, "-S", "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == source / "specdec" / "__init__.py"
