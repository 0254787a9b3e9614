"""The routed example of docs/ROUTING.md on the default SmolLM2 pair: a second specdec on loopback
is the `frontier` endpoint of docs/examples/routes-smollm2.yaml, and a few chats go through the
route; each line printed is a row of the docs' table.

    .venv/bin/python scripts/routing_example.py [--frontier-target CHECKPOINT]

The endpoint serves SmolLM2-135M too unless --frontier-target names a bigger model (none is
reachable on this project's machine), so the table shows how the router decides and what each
tier spent, not a gain in quality.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from specdec.client import Client
from specdec.v1 import specdec_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
WEATHER = pb.Tool(
    name="get_weather",
    description="The weather forecast for one city.",
    parameters=json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ),
)
PERSON = json.dumps(
    {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
)
CHATS = [
    ("What is the capital of France?", {}),
    ("Name three colours.", {}),
    ("Extract name and age as JSON: John is 31 years old.", {"json_schema": PERSON}),
    ("Write one sentence about the sea.", {}),
    ("Reply in JSON with the name and the age: Mary is thirty-one.", {"json_schema": PERSON}),
    ("What is the weather in Paris and in Oslo?", {"tools": [WEATHER]}),
]


def wait_for(port: int, process: subprocess.Popen, what: str) -> None:
    import socket

    for _ in range(600):
        if process.poll() is not None:
            sys.exit(f"{what} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"{what} did not come up on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frontier-target", help="the endpoint's checkpoint (default: SmolLM2 alone)")
    args = parser.parse_args()
    specdec = [sys.executable, "-m", "specdec.cli"]
    frontier_args = ["--target", args.frontier_target] if args.frontier_target else []
    if not args.frontier_target:
        from specdec.assets import default_target

        frontier_args = ["--target", str(default_target())]
    frontier = subprocess.Popen(
        [
            *specdec,
            "serve",
            *frontier_args,
            "--port",
            "50101",
            "--http-port",
            "8101",
            "--metrics-port",
            "9101",
            "--served-model-name",
            "frontier",
        ]
    )
    router = subprocess.Popen(
        [
            *specdec,
            "serve",
            "--port",
            "50102",
            "--metrics-port",
            "9102",
            "--routes",
            str(ROOT / "docs/examples/routes-smollm2.yaml"),
        ]
    )
    try:
        wait_for(8101, frontier, "the frontier endpoint")
        wait_for(50102, router, "the routing server")
        time.sleep(2)
        with Client("127.0.0.1:50102", timeout=600) as client:
            print("| user turn | answered by | reasons | confidence | spent | answer begins |")
            print("|---|---|---|---|---|---|")
            for text, fields in CHATS:
                reply = client.generate(
                    [{"role": "user", "content": text}], route="assistant", max_new_tokens=48, **fields
                )
                record = reply.route
                spent = "; ".join(
                    f"{s.tier}: {s.prompt_tokens}+{s.completion_tokens}"
                    + (f", {s.draft_tokens_reused} reused" if s.draft_tokens_reused else "")
                    for s in record.spent
                )
                reasons = "; ".join(f"`{r}`" for r in record.reasons) or "-"
                answer = reply.text.replace("\n", " ").strip()[:80]
                calls = ", ".join(
                    f"{c.name}({c.arguments}) {'valid' if c.valid else 'invalid'}" for c in reply.tool_calls
                )
                shown = f"`{answer}`" + (f" calls: {calls}" if calls else "")
                confidence = f"{record.confidence:.3f}" if record.HasField("confidence") else "-"
                print(
                    f"| {text} | {record.tier} | {reasons} | {confidence} | {spent} | {shown} |", flush=True
                )
    finally:
        for process in (router, frontier):
            process.terminate()
        for process in (router, frontier):
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
