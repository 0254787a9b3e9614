"""Soak test: N requests from C concurrent clients against a live `specdec serve`, and the checks
that nothing was lost.

    python benches/soak.py                       # 10,000 requests, 16 clients, the default pair
    python benches/soak.py --requests 200 --target DIR --draft DIR --out out/soak.json

It starts the server itself (loopback only, API keys from a file it writes, metrics on), then
every client thread sends requests drawn at random from a fixed-seed mix: unary and streaming
calls with random max_new_tokens, random cancels mid-stream, tight deadlines, malformed requests
(a bad field, or bytes that are not a request at all), and calls with a wrong key or none, spread
over several keys. At the end it checks, and prints:

- every request reached exactly one terminal status, and only ones its kind allows (0 lost);
- every completed output is complete: a finish reason, and as many token ids as its usage says;
- the running and waiting gauges are back to 0 (no leaked slot);
- the server's RSS after a warm-up stayed flat within --rss-tolerance-mib.

Exit status 0 when every check holds. Bounded: at most --requests calls, each with a deadline.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from specdec.client import build_request
from specdec.testing import free_port, scrape_metrics
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc

KINDS = ("unary", "stream", "cancel", "deadline", "malformed", "garbage", "bad_key", "no_key")
# The terminal statuses each kind may end in. RESOURCE_EXHAUSTED is a legitimate answer to any
# call under load; a deadline may also be met.
ALLOWED = {
    "unary": {"OK", "RESOURCE_EXHAUSTED"},
    "stream": {"OK", "RESOURCE_EXHAUSTED"},
    "cancel": {"CANCELLED", "OK", "RESOURCE_EXHAUSTED"},
    "deadline": {"DEADLINE_EXCEEDED", "OK", "RESOURCE_EXHAUSTED"},
    "malformed": {"INVALID_ARGUMENT"},
    "garbage": {"INVALID_ARGUMENT"},
    "bad_key": {"UNAUTHENTICATED"},
    "no_key": {"UNAUTHENTICATED"},
}
MIX = (0.35, 0.3, 0.1, 0.08, 0.06, 0.03, 0.05, 0.03)  # weights of KINDS


@dataclass
class Outcome:
    kind: str
    status: str
    complete: bool = True  # for OK calls: finish reason set, ids == usage
    detail: str = ""


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


def _status(error: grpc.RpcError) -> str:
    return error.code().name


def one_call(kind: str, channel: grpc.Channel, key: str, rnd: random.Random, args) -> Outcome:
    stub = pb_grpc.SpecDecStub(channel)
    metadata = (("authorization", f"Bearer {key}"),)
    if kind == "bad_key":
        metadata = (("authorization", "Bearer not-a-key"),)
    elif kind == "no_key":
        metadata = ()
    prompt = [rnd.randrange(3, args.vocab) for _ in range(rnd.randint(1, 24))]
    fields = {"max_new_tokens": rnd.randint(1, args.max_new_tokens), "ignore_eos": rnd.random() < 0.5}
    if rnd.random() < 0.3:
        fields.update(temperature=0.8, seed=rnd.randrange(2**31))
    timeout = args.call_timeout
    try:
        if kind == "garbage":
            raw = channel.unary_unary(
                "/specdec.v1.SpecDec/Generate", request_serializer=None, response_deserializer=None
            )
            # Wire type 7 does not exist: whatever follows, this is not a GenerateRequest.
            junk = b"\x0f" + bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 64)))
            raw(junk, metadata=metadata, timeout=timeout)
            return Outcome(kind, "OK", detail="garbage was accepted")
        if kind == "malformed":
            bad = rnd.choice(
                [
                    {"top_p": 2.0},
                    {"temperature": -1.0},
                    {"max_new_tokens": 0},
                    {"top_k": -4},
                    {"num_speculative_tokens": 999},
                ]
            )
            fields.update(bad)
        request = build_request(prompt, None, **fields)
        if kind == "deadline":
            timeout = rnd.uniform(0.002, 0.05)
        if kind in ("unary", "malformed", "deadline", "bad_key", "no_key"):
            reply = stub.Generate(request, metadata=metadata, timeout=timeout)
            return _checked(kind, reply.finish_reason, len(reply.token_ids), reply.usage.completion_tokens)
        call = stub.GenerateStream(request, metadata=metadata, timeout=timeout)
        ids, last = 0, None
        for i, chunk in enumerate(call):
            ids += len(chunk.token_ids)
            last = chunk
            if kind == "cancel" and i == 0:
                call.cancel()
        if last is None:
            return Outcome(kind, "OK", complete=False, detail="a stream with no message")
        return _checked(kind, last.finish_reason, ids, last.usage.completion_tokens)
    except grpc.RpcError as e:
        return Outcome(kind, _status(e), detail=(e.details() or "")[:200])


def _checked(kind: str, finish: int, ids: int, usage: int) -> Outcome:
    complete = finish != pb.FINISH_REASON_UNSPECIFIED and ids == usage
    return Outcome(kind, "OK", complete, "" if complete else f"finish {finish}, {ids} ids, usage {usage}")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def start_server(args, workdir: Path, keys: list[str]) -> tuple[subprocess.Popen, int, int]:
    key_file = workdir / "keys"
    key_file.write_text("\n".join(keys) + "\n")
    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "specdec.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--metrics-port", str(metrics_port), "--api-key-file", str(key_file),
               "--max-batch-size", str(args.max_batch_size), "--max-context", str(args.max_context)]  # fmt: skip
    if args.target:
        command += ["--target", str(args.target)] + (["--draft", str(args.draft)] if args.draft else [])
    log = open(workdir / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if re.search(r"serving on", (workdir / "server.log").read_text()):
            return proc, port, metrics_port
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise SystemExit(f"the server did not start:\n{(workdir / 'server.log').read_text()[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--keys", type=int, default=3, help="distinct API keys the clients spread over")
    parser.add_argument("--target", type=Path, default=None, help="default: the embedded demo pair")
    parser.add_argument("--draft", type=Path, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-context", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=250, help="prompt token ids are drawn below this")
    parser.add_argument("--call-timeout", type=float, default=120.0, help="every call's deadline (s)")
    parser.add_argument(
        "--warmup-fraction", type=float, default=0.1, help="of the requests, before RSS is taken"
    )
    parser.add_argument("--rss-tolerance-mib", type=float, default=64.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/soak.json"))
    args = parser.parse_args(argv)

    keys = [f"soak-key-{i}-{random.Random(args.seed + i).randrange(2**62):x}" for i in range(args.keys)]
    tally = Tally()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="specdec-soak-") as tmp:
        proc, port, metrics_port = start_server(args, Path(tmp), keys)
        try:
            address = f"127.0.0.1:{port}"
            warmup = max(1, int(args.requests * args.warmup_fraction))
            rss_after_warmup: list[float] = []
            todo = iter(range(args.requests))
            todo_lock = threading.Lock()

            def client(worker: int) -> None:
                rnd = random.Random(args.seed * 1000 + worker)
                channel = grpc.insecure_channel(address)
                while True:
                    with todo_lock:
                        i = next(todo, None)
                        if i == warmup and not rss_after_warmup:
                            rss_after_warmup.append(rss_mib(proc.pid))
                    if i is None:
                        break
                    kind = rnd.choices(KINDS, MIX)[0]
                    tally.add(one_call(kind, channel, keys[i % len(keys)], rnd, args))
                channel.close()

            threads = [threading.Thread(target=client, args=(w,)) for w in range(args.concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(1.0)  # the last cancellations are reaped at the next engine step
            gauges = scrape_metrics(metrics_port)
            rss_end = rss_mib(proc.pid)
            alive = proc.poll() is None
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    elapsed = time.monotonic() - started
    outcomes = tally.outcomes
    by_kind = Counter(o.kind for o in outcomes)
    statuses = Counter(f"{o.kind}:{o.status}" for o in outcomes)
    unexpected = [o for o in outcomes if o.status not in ALLOWED[o.kind]]
    incomplete = [o for o in outcomes if o.status == "OK" and not o.complete]
    rss_growth = rss_end - (rss_after_warmup[0] if rss_after_warmup else rss_end)
    checks = {
        "every request has one terminal status (0 lost)": len(outcomes) == args.requests,
        "only statuses each kind allows": not unexpected,
        "every completed output complete": not incomplete,
        "running and waiting gauges back to 0": gauges.get("specdec_num_requests_running") == 0
        and gauges.get("specdec_num_requests_waiting") == 0,
        f"RSS after warm-up flat within {args.rss_tolerance_mib:g} MiB": rss_growth <= args.rss_tolerance_mib,
        "server still running at the end": alive,
    }
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python", "benches/soak.py", *(argv if argv is not None else sys.argv[1:])]),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "keys": args.keys,
        "seconds": round(elapsed, 1),
        "lost": args.requests - len(outcomes),
        "by_kind": dict(sorted(by_kind.items())),
        "statuses": dict(sorted(statuses.items())),
        "unexpected": [o.__dict__ for o in unexpected[:20]],
        "incomplete": [o.__dict__ for o in incomplete[:20]],
        "rss_mib": {
            "after_warmup": round(rss_after_warmup[0], 1) if rss_after_warmup else None,
            "end": round(rss_end, 1),
            "growth": round(rss_growth, 1),
        },
        "gauges": {
            k: gauges.get(k) for k in ("specdec_num_requests_running", "specdec_num_requests_waiting")
        },
        "checks": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
