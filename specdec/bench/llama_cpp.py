"""llama.cpp on the target's own GGUF file, through llama-cpp-python: the CPU anchor of the bench.

Optional: llama-cpp-python builds from source (about 20 minutes on a 2-core machine), so it is an
extra (`pip install 'specdec[llama-cpp]'`), never required. When it is installed and the target was
named as a .gguf file, `specdec bench` times llama.cpp greedy decoding of the same prompts in the
same run, like the Hugging Face anchor. It runs the file as stored (for SmolLM2, Q4_1 weights),
while specdec runs the weights dequantized to --dtype: the ratio is the price of that, which the
quantization work is meant to close.

Only at batch size 1: llama-cpp-python's Llama class decodes one sequence at a time (batching
several needs its low-level API and a sequence-aware sampler), and timing B sequences one after the
other would not be a batched figure.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppAnchor:
    """One GGUF file loaded in llama.cpp, decoding greedily at batch size 1."""

    label = "llama.cpp"

    def __init__(self, gguf: Path, context: int, threads: int):
        from llama_cpp import Llama

        self.threads = threads
        self.model = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_batch=512, verbose=False)
        self.version = _version()

    def greedy(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
        """The `new_tokens` greedy tokens after `prompt`, never stopping at end of sequence, and the
        seconds they took (prefill included, as for the Hugging Face anchor)."""
        self.model.reset()
        out: list[int] = []
        t0 = time.perf_counter()
        for token in self.model.generate(prompt, top_k=1, temp=0.0, reset=True):
            out.append(int(token))
            if len(out) == new_tokens:
                break
        return out, time.perf_counter() - t0

    def tokens_per_second(self, prompt: list[int], new_tokens: int) -> float:
        tokens, seconds = self.greedy(prompt, new_tokens)
        return len(tokens) / seconds


def _version() -> str | None:
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:
        return None


def anchor_for(target_spec: Any, context: int, threads: int) -> LlamaCppAnchor | None:
    """The anchor for a target named as a .gguf file when llama-cpp-python is installed and decodes
    here (`probe`); else None."""
    path = Path(str(target_spec))
    if not available() or path.suffix.lower() != ".gguf" or not path.is_file():
        return None
    problem = probe(path, threads)
    if problem is not None:
        print(f"note: the llama.cpp anchor is skipped: {problem}", file=sys.stderr)
        return None
    return LlamaCppAnchor(path, context, threads)


def probe(path: Path, threads: int, timeout: float = 120.0) -> str | None:
    """Why llama.cpp cannot decode `path` here, or None when it can: a few tokens decoded in a child
    process first. A build whose native code this CPU cannot run (seen: `-march=native` builds
    with AMX kernels on a VM that reports AMX) dies of a signal inside llama.cpp, which would
    take the whole bench, and every result measured before it, down with it."""
    code = (
        "import sys; from llama_cpp import Llama; "
        "m = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]), verbose=False); "
        "g = m.generate([1, 2, 3, 4], top_k=1, temp=0.0, reset=True); [next(g) for _ in range(2)]"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(path), str(threads)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return f"decoding two tokens of {path.name} took over {timeout:.0f} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return (
            f"llama.cpp died of signal {-done.returncode} decoding {path.name} (a build whose native "
            "code this CPU cannot run; rebuild llama-cpp-python with CMAKE_ARGS=-DGGML_NATIVE=OFF)"
        )
    return f"llama.cpp failed decoding {path.name}: {done.stderr.strip()[-300:]}"
