"""`specdec bench` on tiny checkpoints, in CI-sized time: the JSON has every number, the plots exist."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SPECDEC = shutil.which("specdec") or str(Path(sys.executable).parent / "specdec")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SPECDEC, "bench", *args], capture_output=True, text=True, timeout=600)


def _bench(target, draft, out, batch_sizes: str, gammas: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`specdec bench` on a tiny pair at CI size: the finished process and its bench.json."""
    proc = _run(
        "--target", str(target), "--draft", str(draft), "--batch-sizes", batch_sizes, "--gamma", gammas,
        "--prompt-len", "8", "--new-tokens", "8", "--repeats", "1", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "bench.json").read_text())


def test_bench_on_a_checkpoint_pair(pairs, tmp_path):
    target, draft = pairs("llama-close")
    out = tmp_path / "bench"
    proc, result = _bench(target, draft, out, "1,2", "0,2,adaptive,adaptive-per-row")
    assert result["settings"]["batch_sizes"] == [1, 2]
    assert {r["mode"] for r in result["rows"]} == {
        "target",
        "draft",
        "speculative",
        "hf-target",
        "hf-assisted",
    }
    for entry in result["summary"]:
        modes = entry["modes"]
        assert {"target", "draft", "speculative-gamma2", "speculative-adaptive", "hf-target"} <= set(modes)
        assert all(m["tokens_per_second"] > 0 for m in modes.values())
        # Every ratio is of the medians measured side by side, and the close pair's drafts are
        # mostly accepted (its γ = 2 acceptance is measured, not assumed).
        spec, target = modes["speculative-gamma2"], modes["target"]
        assert spec["speedup_vs_target"] == round(spec["tokens_per_second"] / target["tokens_per_second"], 3)
        assert 0.5 < spec["acceptance"] <= 1
        assert modes["speculative-gamma2"]["theoretical_speedup"] > 0
        assert "gamma_histogram" in modes["speculative-adaptive"]
        assert "gamma_histogram" in modes["speculative-adaptive-per-row"]
        assert (
            entry["cost_ratio_c"] > 0
            and entry["copy_bandwidth_GBps"] > 0
            and entry["target_bandwidth_GBps"] > 0
        )
    assert "speedup_vs_hf_assisted" in result["summary"][0]["modes"]["target"]
    engine_rows = [r for r in result["rows"] if not r["mode"].startswith("hf")]
    for r in result["rows"]:  # one sample per repeat, the reported figure their median
        assert len(r["samples"]) == 1 and r["tokens_per_second"] == pytest.approx(r["samples"][0], abs=0.01)
    # The adaptive configurations report the γ their steps ran with.
    assert all(
        sum(m["gamma_histogram"].values()) > 0
        for e in result["summary"]
        for k, m in e["modes"].items()
        if "adaptive" in k
    )
    assert all(r["extra"]["whole_run_tokens_per_second"] > 0 for r in engine_rows)
    assert result["settings"]["waves"] == 2 and result["settings"]["length_spread"] == 0.5
    for name in ("tokens_per_second.png", "speedup_vs_gamma.png", "acceptance_by_position.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 2000
    assert "tok/s" in proc.stdout


@pytest.mark.slow
def test_bench_random_weights_small_shape(tmp_path):
    out = tmp_path / "bench"
    proc = _run(
        "--random-weights", "--shape", "tiny-1b-like", "--batch-sizes", "1", "--gamma", "2",
        "--prompt-len", "8", "--new-tokens", "6", "--repeats", "1", "--no-hf", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert result["random_weights"] == {"target_shape": "tiny-1b-like", "draft_shape": "tiny-draft"}
    at = result["summary"][0]["theoretical_at_alpha"]
    assert set(at) == {"0.6", "0.7", "0.8"} and float(at["0.8"]["4"]) > float(at["0.6"]["4"])


def test_bench_rejects_bad_gamma(tmp_path):
    proc = _run("--gamma", "2,banana", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--gamma: 'banana'" in proc.stderr


def test_bench_rejects_a_length_spread_of_one_or_more(tmp_path):
    proc = _run("--length-spread", "1.0", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--length-spread must be in [0, 1), got 1.0" in proc.stderr


def test_output_lengths_spread_around_new_tokens_the_same_for_every_configuration():
    from specdec.bench.runner import BenchSettings, output_lengths

    lockstep = BenchSettings(batch_sizes=[4], gammas=[0], new_tokens=100, length_spread=0.0)
    assert output_lengths(lockstep, 8) == [100] * 8
    spread = BenchSettings(batch_sizes=[4], gammas=[0], new_tokens=100, length_spread=0.5)
    lengths = output_lengths(spread, 400)
    assert lengths == output_lengths(spread, 400)  # seeded: every configuration gets these
    assert min(lengths) >= 50 and max(lengths) <= 150 and len(set(lengths)) > 50
    assert 90 < sum(lengths) / len(lengths) < 110


def test_bench_with_a_draft_that_only_speculates(pairs, tmp_path):
    """A subset-head draft over the target's embeddings (the default pair's kind): no draft-alone
    configuration and no Hugging Face draft, and the report still gives c from the live passes."""
    from specdec.models.subset_head import restrict_checkpoint

    target, draft = pairs("llama-close")
    subset = restrict_checkpoint(draft, tmp_path / "subset", list(range(0, 300, 2)), share_embeddings=True)
    _, result = _bench(target, subset, tmp_path / "bench", "1", "0,2,adaptive")
    assert {r["mode"] for r in result["rows"]} == {"target", "speculative", "hf-target"}
    [entry] = result["summary"]
    assert entry["cost_ratio_c"] > 0 and entry["modes"]["speculative-gamma2"]["acceptance"] > 0


def test_bench_runs_a_json_schema_workload_beside_the_free_one(pairs, tmp_path):
    """--json-schema: every configuration again under the schema ("json ..." rows), each compared
    with the constrained target alone, with the share of answers complete and valid."""
    target, draft = pairs("llama-close")
    flag = {
        "type": "object",
        "properties": {"a": {"type": "boolean"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(flag))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("is it on?\nanswer as JSON\n")
    out = tmp_path / "bench"
    proc = _run(
        "--target", str(target), "--draft", str(draft), "--batch-sizes", "1", "--gamma", "0,2",
        "--new-tokens", "12", "--repeats", "1", "--no-hf", "--json-schema", str(schema),
        "--prompts", str(prompts), "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert {r["mode"] for r in result["rows"]} == {
        "target", "draft", "speculative", "json target", "json draft", "json speculative"
    }  # fmt: skip
    assert result["json_schema"]["schema"] == flag and result["prompts"].startswith("chat")
    [entry] = result["summary"]
    modes = entry["modes"]
    for key in ("json target", "json draft", "json speculative-gamma2"):
        item = modes[key]
        # A boolean flag's object is a few tokens: every answer completes and validates.
        assert item["constraint_complete"] == 1.0 and item["schema_valid"] == 1.0
        assert 0 < item["mean_output_tokens"] < 12
        same = item["tokens_per_second"] / modes["json target"]["tokens_per_second"]
        assert item["speedup_vs_same_target"] == round(same, 3)
    assert "constraint_complete" not in modes["speculative-gamma2"]  # the free rows are free
    assert modes["json speculative-gamma2"]["acceptance"] > 0

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = _run("--target", str(target), "--draft", str(draft), "--json-schema", str(bad), "--out", str(out))
    assert proc.returncode != 0 and f"--json-schema {bad}: not a readable JSON Schema file" in proc.stderr


@pytest.mark.parametrize("respect_eos", [False, True])
def test_respect_eos_lets_the_engines_answers_end_at_their_end_of_sequence(pairs, respect_eos):
    from specdec.bench.runner import CONSTRAINED, Bench, BenchSettings
    from specdec.grammar import Constraint, ConstraintKind
    from specdec.models import load_checkpoint
    from specdec.request import Mode

    target_dir, draft_dir = pairs("llama-close")
    target = load_checkpoint(target_dir)
    draft = load_checkpoint(draft_dir)
    settings = BenchSettings(batch_sizes=[1], gammas=[0], new_tokens=8, respect_eos=respect_eos)
    configs = [("target", Mode.TARGET, 0, "none"), (CONSTRAINED + "target", Mode.TARGET, 0, "none")]
    bench = Bench(
        {"none": (target, draft)},
        settings,
        [[5, 6, 7]],
        configs,
        constraint=Constraint(ConstraintKind.JSON_OBJECT),
    )
    engine = next(iter(bench.engines.values()))
    [free] = bench._requests(engine, 1, Mode.TARGET, 0, "target")
    [constrained] = bench._requests(engine, 1, Mode.TARGET, 0, CONSTRAINED + "target")
    assert free.params.ignore_eos is not respect_eos and constrained.params.ignore_eos is False
    assert free.params.max_new_tokens == bench.output_lengths[0]
