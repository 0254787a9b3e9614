"""Builds the next-line code-completion eval set from the standard-library files the demo pair
never trained on (`specdec/distill/stdlib_manifest.json`, split "heldout"), read from this
machine's Python. The set is built, not shipped: it is the standard library's own text (PSF
licence), and each file is checked against the manifest's SHA-256 first (a file of another Python
version is skipped, and the set says how many).

    .venv/bin/python scripts/make_code_eval.py [OUT]     (default out/evals/stdlib_next_line.jsonl)

Slices: imports, signatures (def / class lines), docstrings (the line after a signature that opens
one), returns. Each example is the 12 lines before the line to predict, asked for as a chat; the
`line_similarity` scorer gives the answer's first code line partial credit against the real one
(exact match alone is near 0 for every model here).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PER_SLICE = 32
CONTEXT = 12
ASK = "Continue this Python code. Reply with its next line only.\n\n```python\n{code}\n```"


def slice_of(lines: list[str], i: int) -> str | None:
    text = lines[i].strip()
    if not text or i < 3:
        return None
    if text.startswith(("import ", "from ")) and lines[i] == text:
        return "imports"
    if text.startswith(("def ", "class ")):
        return "signatures"
    if text.startswith(('"""', "'''")) and lines[i - 1].strip().startswith(("def ", "class ")):
        return "docstrings"
    if text.startswith("return ") and len(text) > 8:
        return "returns"
    return None


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "out" / "evals" / "stdlib_next_line.jsonl"
    manifest = json.loads((ROOT / "specdec" / "distill" / "stdlib_manifest.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates: dict[str, list[tuple[str, int, list[str]]]] = {}
    skipped = 0
    for entry in manifest["files"]:
        if entry["split"] != "heldout":
            continue
        path = stdlib / entry["path"]
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            skipped += 1
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for i in range(len(lines)):
            kind = slice_of(lines, i)
            if kind:
                candidates.setdefault(kind, []).append((entry["path"], i, lines))
    rng = random.Random("stdlib-next-line")
    examples = []
    for kind in sorted(candidates):
        for file, i, lines in rng.sample(candidates[kind], min(PER_SLICE, len(candidates[kind]))):
            code = "\n".join(lines[max(0, i - CONTEXT) : i])
            examples.append({"id": f"{file}:{i + 1}", "prompt": ASK.format(code=code), "expected": lines[i].strip(),
                             "slice": kind, "scorer": "line_similarity"})  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(e) + "\n" for e in examples))
    print(
        f"{out}: {len(examples)} examples from {manifest['python']}'s held-out files ({skipped} skipped: not this Python's)"
    )


if __name__ == "__main__":
    main()
