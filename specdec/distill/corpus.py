"""The demo pair's corpus: the source of Python's standard library, pinned file by file.

The manifest (committed beside this module) records the Python version, every file's path, size
and SHA-256, and which files are held out for evaluation. Training refuses a machine whose files
differ, so the recorded metrics always describe the recorded data. (The stdlib is under the PSF
licence, which permits redistribution of derived works.)
"""

from __future__ import annotations

import hashlib
import json
import platform
import sysconfig
from pathlib import Path

from specdec.distill.data import Document
from specdec.errors import SpecdecError

MANIFEST = Path(__file__).with_name("stdlib_manifest.json")
# Left out: GUI toolkits, the 2to3 machinery, test suites (large and repetitive), vendored pip.
EXCLUDED_PARTS = {
    "site-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "tkinter",
    "ensurepip",
}
HELDOUT_EVERY = 20  # every 20th file (sorted by path) is held out


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_manifest(root: Path | None = None) -> dict:
    root = root or stdlib_root()
    files = sorted(
        p for p in root.rglob("*.py") if not EXCLUDED_PARTS.intersection(p.relative_to(root).parts)
    )
    entries = []
    for i, path in enumerate(files):
        rel = path.relative_to(root).as_posix()
        entries.append(
            {
                "path": rel,
                "bytes": path.stat().st_size,
                "sha256": _sha256(path),
                "split": "heldout" if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train",
            }
        )
    return {"python": platform.python_version(), "excluded": sorted(EXCLUDED_PARTS), "files": entries}


def load_corpus(
    manifest_path: Path = MANIFEST, root: Path | None = None
) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents, after checking this machine's files against the manifest."""
    manifest = json.loads(manifest_path.read_text())
    root = root or stdlib_root()
    if platform.python_version() != manifest["python"]:
        raise SpecdecError(
            f"the demo corpus is pinned to Python {manifest['python']}'s standard library; this is Python "
            f"{platform.python_version()}. Run the training with that exact Python (its stdlib sources are the data)."
        )
    missing, changed = [], []
    for entry in manifest["files"]:
        path = root / entry["path"]
        if not path.is_file():
            missing.append(entry["path"])
        elif _sha256(path) != entry["sha256"]:
            changed.append(entry["path"])
    if missing or changed:
        detail = "; ".join(
            part
            for part in (
                f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                f"{len(changed)} with a different SHA-256 (e.g. {changed[:3]})" if changed else "",
            )
            if part
        )
        raise SpecdecError(
            f"the standard library at {root} differs from the pinned corpus {manifest_path.name}: {detail}"
        )
    train, heldout = [], []
    for entry in manifest["files"]:
        doc = Document(entry["path"], (root / entry["path"]).read_text(encoding="utf-8", errors="replace"))
        (heldout if entry["split"] == "heldout" else train).append(doc)
    return train, heldout
