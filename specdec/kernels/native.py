"""Building specdec's C kernels (`int8_linear.c`, `layer_cpu.c`, `philox_cpu.c`) at first use.

Each source is compiled with the system's C compiler (`$CC`, else `cc`; with OpenMP where the
compiler has it) into specdec's cache and loaded through ctypes by its own module, which falls
back to its tensor-op path where no compiler works. Nothing is compiled at install time, so a
wheel stays pure Python and a machine without a compiler still runs (slower).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

from specdec.cache import cache_root

log = logging.getLogger(__name__)

# No fused multiply-add and no fast-math: the C must round exactly where its reference does.
CFLAGS = ("-O3", "-std=gnu99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
# Tried in turn: OpenMP (work split over PyTorch's threads), else one thread.
THREADING = (("-fopenmp",), ())
# Why a build failed, raised as one of these by `built_library` (OSError: ctypes' own failure).
BUILD_ERRORS = (OSError, subprocess.SubprocessError)


def built_library(source: Path) -> Path:
    """The shared library of `source` in specdec's cache, compiled if this source, compiler and
    machine have none yet: with OpenMP if the compiler has it, else without. Written to a
    temporary name and renamed, so processes building at once never load a half-written file."""
    compiler = shlex.split(os.environ.get("CC") or "cc")
    targets = []
    for threading in THREADING:
        flags = (*CFLAGS, *threading)
        key = hashlib.sha256(source.read_bytes() + repr((compiler, flags, platform.machine())).encode())
        target = cache_root() / "kernels" / f"{source.stem}-{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        targets.append((flags, target))
    errors = []
    for flags, target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            built = Path(work) / target.name
            cmd = [*compiler, *flags, "-o", str(built), str(source), "-lm"]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                os.replace(built, target)
                log.info("compiled %s into %s", source.name, target)
                return target
            errors.append(f"{shlex.join(cmd)} failed: {result.stderr.strip()[-400:]}")
    raise OSError("; ".join(errors))
