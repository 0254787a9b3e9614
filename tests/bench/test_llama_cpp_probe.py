"""The llama.cpp anchor is probed in a child process before the bench trusts it in its own: a build
that dies of a signal (native code this CPU cannot run) is skipped with a note saying why and how
to rebuild, instead of killing the bench. Runs without llama-cpp-python (the child is faked)."""

from __future__ import annotations

import subprocess

from specdec.bench import llama_cpp


def _child(returncode: int, stderr: str = ""):
    return lambda *args, **kwargs: subprocess.CompletedProcess(args, returncode, "", stderr)


def test_a_child_that_dies_of_a_signal_skips_the_anchor_with_the_fix(tmp_path, monkeypatch, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(llama_cpp, "available", lambda: True)
    monkeypatch.setattr(llama_cpp.subprocess, "run", _child(-11))
    assert llama_cpp.anchor_for(gguf, 64, 2) is None
    note = capsys.readouterr().err
    assert "signal 11" in note and "model.gguf" in note and "GGML_NATIVE=OFF" in note


def test_the_probe_passes_a_working_build_and_names_an_error(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    monkeypatch.setattr(llama_cpp.subprocess, "run", _child(0))
    assert llama_cpp.probe(gguf, 2) is None
    monkeypatch.setattr(llama_cpp.subprocess, "run", _child(1, "ValueError: Failed to load model"))
    assert "Failed to load model" in llama_cpp.probe(gguf, 2)
