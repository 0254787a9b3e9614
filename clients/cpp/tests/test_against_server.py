"""CTest test of the C++ client against the real Python server.

Starts `specdec serve` on tiny random checkpoints (loopback, a port the kernel picks), then checks
that specdec-cpp, unary and streaming, returns exactly the Python client's greedy tokens; that bad
arguments come back as INVALID_ARGUMENT with the server's message; that a short deadline gives
DEADLINE_EXCEEDED; runs the library's own tests (specdec_client_test); that the server still
exits 0 on SIGTERM afterwards; and, against a second server with API keys and mTLS, that the key
and certificates are sent as the flags say. Run by CMake with the Python of `make setup`:

    python test_against_server.py --cli PATH/specdec-cpp --client-test PATH/specdec_client_test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, x):"]
MAX_NEW_TOKENS = "12"
EXIT_CALL_FAILED = 3  # specdec-cpp's exit status when the call fails
SERVER_START_TIMEOUT_S = 180
SERVER_STOP_TIMEOUT_S = 60
CALL_TIMEOUT_S = 120
SPECDEC = [sys.executable, "-m", "specdec.cli"]


def write_checkpoints(root: Path) -> tuple[Path, Path]:
    from specdec.testing import write_tiny_checkpoint

    target = write_tiny_checkpoint(root / "target", "llama", num_layers=2, seed=1)
    draft = write_tiny_checkpoint(root / "draft", "llama", num_layers=1, seed=2)
    return target, draft


@contextlib.contextmanager
def running_server(
    target: Path, draft: Path, log_path: Path, extra: tuple[str, ...] = ()
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yields (address, process) once the server is serving; kills it if it is still running when
    the block ends (the graceful-stop check stops it itself). `extra`: more serve flags."""
    command = [*SPECDEC, "serve", "--target", str(target), "--draft", str(draft)]
    command += ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *extra]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        port = wait_until_serving(process, log_path)
        yield f"127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_until_serving(process: subprocess.Popen, log_path: Path) -> int:
    """The port from the server's `serving on HOST:PORT` line (port 0 lets the kernel choose)."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = re.search(r"serving on 127\.0\.0\.1:(\d+)", log_path.read_text())
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
        time.sleep(0.2)
    raise RuntimeError(f"the server was not serving after {SERVER_START_TIMEOUT_S}s:\n{log_path.read_text()}")


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=CALL_TIMEOUT_S)


def run_json(command: list[str]) -> dict:
    result = run(command)
    if result.returncode != 0:
        raise AssertionError(f"{command} exited with {result.returncode}: {result.stderr}")
    return json.loads(result.stdout)


class Checks:
    """Runs every check even after one fails, so one run shows all that is wrong."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def run(self, name: str, check: Callable[[], None]) -> None:
        try:
            check()
        except Exception as e:  # any failure: report it and go on
            self.failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        else:
            print(f"PASS {name}", flush=True)


def same_greedy_tokens(cli: str, address: str) -> None:
    for prompt in PROMPTS:
        common = ["--server", address, "--max-new-tokens", MAX_NEW_TOKENS, "--json"]
        python = run_json([*SPECDEC, "generate", prompt, *common])
        unary = run_json([cli, *common, prompt])
        stream = run_json([cli, *common, "--stream", prompt])
        for name, cpp in (("unary", unary), ("stream", stream)):
            assert cpp["token_ids"] == python["token_ids"], (
                f"{name} {prompt!r}: C++ {cpp['token_ids']} != Python {python['token_ids']}"
            )
            assert cpp["text"] == python["text"], f"{name} {prompt!r}: {cpp['text']!r} != {python['text']!r}"
            assert cpp["finish_reason"] == python["finish_reason"], f"{name}: {cpp} vs {python}"
            assert cpp["token_ids"], f"{name} {prompt!r}: no tokens"


def expect_call_error(command: list[str], code: str, message: str) -> None:
    result = run(command)
    assert result.returncode == EXIT_CALL_FAILED, (
        f"exit status {result.returncode}, expected {EXIT_CALL_FAILED}; stderr: {result.stderr}"
    )
    assert f"error: {code}: " in result.stderr, f"no {code} in stderr: {result.stderr!r}"
    assert message in result.stderr, f"no {message!r} in stderr: {result.stderr!r}"


def invalid_arguments(cli: str, address: str) -> None:
    base = [cli, "--server", address]
    expect_call_error(
        [*base, "--temperature", "-1", "x"], "INVALID_ARGUMENT", "temperature: must be a finite number >= 0"
    )
    expect_call_error([*base, "--top-p", "2", "x"], "INVALID_ARGUMENT", "top_p: must be in (0, 1], got 2")
    expect_call_error(
        [*base, "--stream", "--max-new-tokens", "0", "x"],
        "INVALID_ARGUMENT",
        "max_new_tokens: must be a positive integer, got 0",
    )


def deadline_exceeded(cli: str, address: str) -> None:
    base = [cli, "--server", address, "--timeout-ms", "1", "--max-new-tokens", "200"]
    expect_call_error([*base, "def f():"], "DEADLINE_EXCEEDED", "")
    expect_call_error([*base, "--stream", "def f():"], "DEADLINE_EXCEEDED", "")


def plain_output(cli: str, address: str) -> None:
    """Without --json: prompt and text on stdout, the statistics on stderr."""
    prompt = "def fibonacci(n):"
    for extra in ([], ["--stream"]):
        result = run([cli, "--server", address, "--max-new-tokens", MAX_NEW_TOKENS, *extra, prompt])
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(prompt), result.stdout
        assert re.search(r"\d+ tokens in [\d.]+s; acceptance [\d.]+, [\d.]+ tokens/verify", result.stderr), (
            result.stderr
        )


def library_tests(client_test: str, address: str) -> None:
    result = run([client_test, address])
    print(result.stdout + result.stderr, end="")
    assert result.returncode == 0, f"specdec_client_test exited with {result.returncode}"


def write_pki(root: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (trustme, a test extra)."""
    import trustme

    ca = trustme.CA()
    server, client = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("client@example.com")
    files = {
        "ca": ca.cert_pem, "server.crt": server.cert_chain_pems[0], "server.key": server.private_key_pem,
        "client.crt": client.cert_chain_pems[0], "client.key": client.private_key_pem,
    }  # fmt: skip
    paths = {}
    for name, blob in files.items():
        blob.write_to_path(str(root / name))
        paths[name] = root / name
    return paths


def keys_and_mtls(cli: str, address: str, pki: dict[str, Path]) -> None:
    """Against a server with API keys and mTLS: the key from --api-key or $SPECDEC_API_KEY, the
    CA and the client certificate from the TLS flags; a missing key is UNAUTHENTICATED."""
    tls = [
        "--tls-ca",
        str(pki["ca"]),
        "--tls-cert",
        str(pki["client.crt"]),
        "--tls-key",
        str(pki["client.key"]),
    ]
    base = [cli, "--server", address, "--max-new-tokens", "4", "--json", *tls]
    for command, env in (([*base, "--api-key", "cpp-key"], None), (base, {"SPECDEC_API_KEY": "cpp-key"})):
        result = subprocess.run(
            [*command, "def f():"], capture_output=True, text=True, timeout=CALL_TIMEOUT_S,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert len(json.loads(result.stdout)["token_ids"]) == 4
    expect_call_error([*base, "def f():"], "UNAUTHENTICATED", "missing or invalid API key")
    expect_call_error([*base, "--api-key", "wrong", "--stream", "def f():"], "UNAUTHENTICATED", "")
    result = run([cli, "--server", address, "--api-key", "cpp-key", "--tls-ca", str(pki["ca"]), "def f():"])
    assert result.returncode == EXIT_CALL_FAILED and "UNAVAILABLE" in result.stderr, result.stderr  # no cert
    expect_call_error(
        [cli, "--server", address, "--tls-cert", str(pki["client.crt"]), "def f():"],
        "INVALID_ARGUMENT",
        "--tls-cert and --tls-key go together",
    )


def graceful_stop(process: subprocess.Popen, log_path: Path) -> None:
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=SERVER_STOP_TIMEOUT_S)
    assert code == 0, f"the server exited with {code} on SIGTERM:\n{log_path.read_text()[-4000:]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cli", required=True, help="the specdec-cpp executable")
    parser.add_argument("--client-test", required=True, help="the specdec_client_test executable")
    args = parser.parse_args()

    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="specdec-cpp-test-") as tmp:
        root = Path(tmp)
        target, draft = write_checkpoints(root)
        log_path = root / "server.log"
        with running_server(target, draft, log_path) as (address, process):
            print(f"server on {address}", flush=True)
            checks.run("same_greedy_tokens_as_python", lambda: same_greedy_tokens(args.cli, address))
            checks.run("invalid_argument", lambda: invalid_arguments(args.cli, address))
            checks.run("deadline_exceeded", lambda: deadline_exceeded(args.cli, address))
            checks.run("plain_output", lambda: plain_output(args.cli, address))
            checks.run("library", lambda: library_tests(args.client_test, address))
            # Last: the server still serves after the cancellations and deadlines above.
            checks.run("still_serving", lambda: same_greedy_tokens(args.cli, address))
            checks.run("graceful_stop", lambda: graceful_stop(process, log_path))
        if checks.failed:
            print(f"server log (last 4000 characters):\n{log_path.read_text()[-4000:]}")
        pki = write_pki(root)
        keys = root / "keys"
        keys.write_text("cpp-key\n")
        secure = (
            "--api-key-file", str(keys), "--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["server.key"]),
            "--tls-client-ca", str(pki["ca"]),
        )  # fmt: skip
        secure_log = root / "secure-server.log"
        with running_server(target, draft, secure_log, secure) as (address, _process):
            checks.run("api_keys_and_mtls", lambda: keys_and_mtls(args.cli, address, pki))
            if "api_keys_and_mtls" in checks.failed:
                print(f"server log (last 4000 characters):\n{secure_log.read_text()[-4000:]}")
    if checks.failed:
        print(f"{len(checks.failed)} check(s) failed: {', '.join(checks.failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
