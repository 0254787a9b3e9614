"""Packaging for specdec.

One thing is unusual here: the Python gRPC stubs are generated from ``protos/`` while building,
never committed: the proto package ``specdec.v1`` becomes the Python module
``specdec.v1.specdec_pb2``. They are written into the source tree whenever this file runs (git
ignores them there) and packaged from there like any module, so an editable install
(``pip install -e .``) and code run from the repository root import them too.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOT = Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "protos"


def compile_protos(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on every .proto under protos/ into ``out_dir``."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    if not protos:
        return []
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in protos:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    # Every generated directory needs an __init__.py to be an importable package.
    inits = []
    for proto in protos:
        directory = out_dir / proto.parent.relative_to(PROTO_ROOT)
        while directory != out_dir:
            init = directory / "__init__.py"
            if not init.exists():
                init.write_text("")
            inits.append(init)
            directory = directory.parent
    return inits


def read_version() -> str:
    for line in (ROOT / "specdec" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in specdec/__init__.py")


# Namespace packages too: the directories that hold only data (assets/demo/target, ...) are
# packages to setuptools, and it warns about every one left out of this list.
# The stubs are generated whenever setup.py runs (every build, editable or not), before setuptools
# looks for the packages. grpcio-tools is a build requirement (pyproject.toml), so it is there.
compile_protos(ROOT)
packages = find_namespace_packages(include=["specdec", "specdec.*"])

setup(
    name="specdec",
    version=read_version(),
    description="Speculative-decoding inference server: a draft model proposes, a target verifies, "
    "Triton kernels accept; served over gRPC.",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_data={"specdec": ["assets/**/*", "distill/*.json", "kernels/*.c"]},
    include_package_data=True,
    install_requires=[
        # torch is installed by the Makefile (CPU build where there is no GPU); any 2.4+ works.
        "torch>=2.4",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "numpy>=1.24",
        "grpcio>=1.62",
        "grpcio-health-checking>=1.62",
        "grpcio-reflection>=1.62",
        "protobuf>=4.25",
        "prometheus-client>=0.19",
        "pyyaml>=6",
        "tqdm>=4.60",
        "jsonschema>=4.18",  # with referencing: client schemas never make the server fetch a URL
        "referencing>=0.28",
        # GGUF checkpoints (the default target is one): transformers reads them with these two.
        "gguf>=0.10",
        "accelerate>=0.26",
        # Constrained output (specdec.grammar) uses xgrammar, which scripts/setup.sh installs with
        # --no-deps: it requires triton on Linux x86_64, which only its GPU kernels use (a CPU
        # server would carry a 200 MB package for nothing). These are its other dependencies;
        # `pip install specdec[structured]` takes xgrammar with all of its own.
        "apache-tvm-ffi>=0.1.11",
        "pydantic>=2",
        # The OpenAI-compatible HTTP API (specdec.server.http).
        "starlette>=0.37",
        "uvicorn>=0.29",
    ],
    extras_require={
        # xgrammar with all its dependencies (scripts/setup.sh installs it without triton).
        "structured": ["xgrammar==0.2.9"],
        # triton is only needed for the kernels themselves: on CUDA it comes with torch; on CPU
        # the tests run the kernels under TRITON_INTERPRET=1, so dev installs it.
        "dev": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "pytest-timeout>=2",
            "hypothesis>=6",
            "ruff>=0.4",
            "scipy>=1.10",
            "matplotlib>=3.7",
            "triton>=3.0",
            "grpcio-tools>=1.62",
            "trustme>=1.1",  # certificates for the TLS / mTLS tests
            "openai>=1.40",  # the HTTP API's tests use the official client
        ],
        "bench": ["matplotlib>=3.7"],
        "eval": ["matplotlib>=3.7"],  # specdec eval's plots (the report says so when it is missing)
        # The llama.cpp anchor of `specdec bench` (specdec.bench.llama_cpp); builds from source,
        # about 20 minutes on 2 cores. Nothing else uses it and no test needs it.
        "llama-cpp": ["llama-cpp-python>=0.3"],
        # flash-attn cannot be built on CPU machines; nothing requires it.
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["specdec=specdec.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Operating System :: POSIX :: Linux"],
    zip_safe=False,
)
