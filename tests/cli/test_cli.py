"""The `specdec` command, run as a user runs it: a subprocess of the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SPECDEC = shutil.which("specdec") or str(Path(sys.executable).parent / "specdec")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SPECDEC, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def test_generate_json_on_a_checkpoint(llama_path):
    out = run("generate", "def add(a, b):", "--target", str(llama_path), "--max-new-tokens", "6", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) >= {"text", "token_ids", "finish_reason", "stats"}
    assert len(result["token_ids"]) <= 6 and result["finish_reason"] in ("length", "eos")


def test_generate_reports_bad_arguments(llama_path):
    out = run("generate", "x", "--target", str(llama_path), "--top-p", "2", "--temperature", "1")
    assert out.returncode == 2
    assert "top_p: must be in (0, 1]" in out.stderr


def test_generate_reports_bad_checkpoint(tmp_path):
    out = run("generate", "x", "--target", str(tmp_path / "missing"))
    assert out.returncode == 2 and "checkpoint directory does not exist" in out.stderr


def test_generate_speculative_json_with_a_draft(pairs):
    target, draft = pairs("llama-close")
    out = run(
        "generate",
        "def add(a, b):",
        "--target",
        str(target),
        "--draft",
        str(draft),
        "--mode",
        "speculative",
        "--num-speculative-tokens",
        "3",
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    stats = result["stats"]
    assert stats["drafted_tokens"] > 0 and 0 <= stats["acceptance_rate"] <= 1
    assert stats["mean_accepted_length"] >= 1
    target_only = json.loads(
        run(
            "generate",
            "def add(a, b):",
            "--target",
            str(target),
            "--draft",
            str(draft),
            "--mode",
            "target",
            "--max-new-tokens",
            "12",
            "--json",
        ).stdout
    )
    assert target_only["token_ids"] == result["token_ids"]


def test_flag_defaults_are_the_cores_own():
    """Unset flags mean the core's defaults: one mapping from flags to EngineConfig and
    SamplingParams, shared by every subcommand that builds an engine."""
    from specdec.cli import build_parser
    from specdec.cli.options import engine_config, sampling_params
    from specdec.config import EngineConfig
    from specdec.sampling import SamplingParams

    parser = build_parser()
    generate = parser.parse_args(["generate", "x"])
    assert sampling_params(generate) == SamplingParams()
    assert engine_config(generate) == EngineConfig()
    assert engine_config(parser.parse_args(["serve"])) == EngineConfig()
    flags = parser.parse_args(["serve", "--max-batch-size", "3", "--max-queue", "5", "--no-adaptive"])
    assert engine_config(flags) == EngineConfig(max_batch_size=3, max_queue=5, adaptive=False)


def test_quantize_flags_map_to_each_model():
    """--quantize sets both models; --target-quantize / --draft-quantize override it per model."""
    from specdec.cli import build_parser
    from specdec.cli.options import engine_config
    from specdec.config import Quantization

    parser = build_parser()
    both = engine_config(parser.parse_args(["serve", "--quantize", "int8"]))
    assert (both.target_quantize, both.draft_quantize) == (Quantization.INT8, Quantization.INT8)
    mixed = engine_config(
        parser.parse_args(["generate", "x", "--quantize", "int8", "--target-quantize", "int4"])
    )
    assert (mixed.target_quantize, mixed.draft_quantize) == (Quantization.INT4, Quantization.INT8)
    draft_only = engine_config(parser.parse_args(["serve", "--draft-quantize", "int8"]))
    assert (draft_only.target_quantize, draft_only.draft_quantize) == (Quantization.NONE, Quantization.INT8)


def test_generate_over_grpc_streaming_json_has_every_token_id(pairs):
    from specdec import Engine
    from specdec.config import EngineConfig
    from specdec.testing import serve_in_thread

    target, draft = pairs("llama-close")
    server = serve_in_thread(
        Engine(
            target=target, draft=draft, config=EngineConfig(max_batch_size=2, max_context=128, warmup=False)
        )
    )
    try:
        common = (
            "generate",
            "def add(a, b):",
            "--server",
            server.address,
            "--max-new-tokens",
            "20",
            "--json",
        )
        streamed = run(*common, "--stream")
        unary = run(*common)
    finally:
        server.stop()
    assert streamed.returncode == 0 and unary.returncode == 0, streamed.stderr + unary.stderr
    s, u = json.loads(streamed.stdout), json.loads(unary.stdout)
    assert len(s["token_ids"]) == s["usage"]["completion_tokens"] == len(u["token_ids"])
    assert s["token_ids"] == u["token_ids"] and s["text"] == u["text"]


def test_generate_chat_renders_the_template_in_process_and_over_grpc(pairs):
    from specdec import Engine, SamplingParams
    from specdec.config import EngineConfig
    from specdec.testing import serve_in_thread

    target, draft = pairs("llama-close")
    engine = Engine(
        target=target, draft=draft, config=EngineConfig(max_batch_size=2, max_context=128, warmup=False)
    )
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    [expected] = engine.generate([engine.render_chat(messages)], SamplingParams(max_new_tokens=10))
    chat = (
        "generate",
        "--chat",
        "def add(a, b):",
        "--system",
        "Be brief.",
        "--max-new-tokens",
        "10",
        "--json",
    )
    local = run(*chat, "--target", str(target), "--draft", str(draft))
    assert local.returncode == 0, local.stderr
    assert json.loads(local.stdout)["token_ids"] == expected.token_ids
    server = serve_in_thread(engine)
    try:
        remote = run(*chat, "--server", server.address)
        plain = run("generate", "--chat", "def add(a, b):", "--system", "Be brief.", "--max-new-tokens", "10",
                    "--server", server.address)  # fmt: skip
    finally:
        server.stop()
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout)["token_ids"] == expected.token_ids
    assert plain.returncode == 0 and plain.stdout == expected.text + "\n"  # an answer, no prompt echoed
    both = run("generate", "x", "--chat", "y", "--target", str(target))
    assert both.returncode == 2 and "give a prompt or --chat, not both" in both.stderr
    lone = run("generate", "--system", "y", "--target", str(target))
    assert lone.returncode == 2 and "--system goes with --chat" in lone.stderr


def test_generate_constrained_in_process_and_over_grpc(pairs, tmp_path):
    from specdec import Engine
    from specdec.config import EngineConfig
    from specdec.testing import serve_in_thread

    target, draft = pairs("llama-close")
    schema = tmp_path / "schema.json"
    schema.write_text(
        '{"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"], "additionalProperties": false}'
    )
    common = ("generate", "n:", "--max-new-tokens", "24", "--json-schema", f"@{schema}")
    local = run(*common, "--target", str(target), "--draft", str(draft), "--json")
    assert local.returncode == 0, local.stderr
    result = json.loads(local.stdout)
    assert result["constraint"]["complete"] and isinstance(json.loads(result["text"])["n"], int)
    server = serve_in_thread(
        Engine(
            target=target, draft=draft, config=EngineConfig(max_batch_size=2, max_context=128, warmup=False)
        )
    )
    try:
        remote = run(*common, "--server", server.address)
        bad = run("generate", "x", "--regex", "(ab", "--server", server.address)
        empty = run("generate", "x", "--regex", "", "--server", server.address)
    finally:
        server.stop()
    assert remote.returncode == 0 and remote.stdout.strip() == "n:" + result["text"], remote.stderr
    assert "constraint complete" in remote.stderr
    assert bad.returncode == 1 and "INVALID_ARGUMENT: regex: cannot be compiled" in bad.stderr
    assert empty.returncode == 2 and "regex: must not be empty" in empty.stderr, empty.stderr
    both = run("generate", "x", "--regex", "a", "--json-object", "--target", str(target))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
