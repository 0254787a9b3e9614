"""gRPC (and OpenAI HTTP) load generator: what `vllm bench serve` prints, for specdec.

    python benches/load_test.py                         # the default pair, closed loop at 1, 4 and 16 clients
    python benches/load_test.py --rate 20 --requests 200  # open loop: Poisson arrivals at 20 req/s
    python benches/load_test.py --server host:50051     # an already running server (no in-process comparison)
    python benches/load_test.py --http                  # also the same requests over the OpenAI HTTP API

Closed loop: N clients, each sending its next request when the previous one finishes. Open loop:
requests arrive at the given rate whatever the server's state. Every request streams; per request
it records time to first token, inter-token latencies (a chunk's interval spread over its tokens)
and end-to-end latency. It reports request throughput, output tokens/s and TTFT / ITL / E2E p50
and p99. Then, in the same run, the same requests go through the in-process engine at the same
concurrency, without gRPC, so the overhead of gRPC + the server's scheduling is a measured ratio.
With --http the same requests also stream over the OpenAI-compatible HTTP API of the same server
(`/v1/completions`, SSE, one keep-alive connection per client), so HTTP's cost against gRPC is a
ratio measured in the same run too.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import random
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from specdec.client import build_request
from specdec.v1 import specdec_pb2_grpc as pb_grpc


@dataclass
class Result:
    ttft: float
    e2e: float
    tokens: int
    itl: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def one_request(stub, prompt: list[int], args) -> Result:
    msg = build_request(
        prompt, args.mode, max_new_tokens=args.max_new_tokens, ignore_eos=True, temperature=args.temperature
    )
    start = last = time.perf_counter()
    ttft, tokens, itl = None, 0, []
    for chunk in stub.GenerateStream(msg):
        now = time.perf_counter()
        n = len(chunk.token_ids)
        if n:
            if ttft is None:
                ttft = now - start
            else:
                itl.extend([(now - last) / n] * n)
            tokens += n
            last = now
    return Result(ttft=ttft or 0.0, e2e=time.perf_counter() - start, tokens=tokens, itl=itl)


def one_http_request(connection: http.client.HTTPConnection, model: str, prompt: list[int], args) -> Result:
    """One streamed /v1/completions request (token-id prompt, as over gRPC). SSE chunks carry
    text, not token counts, so the tokens come from the usage chunk and a request's inter-token
    latencies are its chunk intervals spread evenly over the tokens after the first chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_new_tokens, "ignore_eos": True,
            "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if args.mode:
        body["mode"] = args.mode
    start = time.perf_counter()
    connection.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    arrivals, tokens = [], 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0].get("text"):
            arrivals.append(time.perf_counter())
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    e2e = time.perf_counter() - start
    itl = []
    if len(arrivals) > 1 and tokens > 1:
        per_chunk_tokens = (tokens - 1) / (len(arrivals) - 1)  # the first chunk counted as one token
        for a, b in itertools.pairwise(arrivals):
            itl.extend([(b - a) / per_chunk_tokens] * max(1, round(per_chunk_tokens)))
    return Result(ttft=(arrivals[0] - start) if arrivals else 0.0, e2e=e2e, tokens=tokens, itl=itl)


def run_grpc(
    address: str,
    prompts: list[list[int]],
    args,
    concurrency: int | None,
    rate: float | None,
    http_target: tuple[str, int, str] | None = None,
) -> dict:
    """The load over gRPC at `address`, or with `http_target` (host, port, model) over HTTP."""
    stub = pb_grpc.SpecDecStub(grpc.insecure_channel(address))
    local = threading.local()

    def send(prompt: list[int]) -> Result:
        if http_target is None:
            return one_request(stub, prompt, args)
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection(http_target[0], http_target[1], timeout=600)
        return one_http_request(local.connection, http_target[2], prompt, args)

    results: list[Result] = []
    lock = threading.Lock()
    start = time.perf_counter()
    if rate:  # open loop
        rnd = random.Random(0)
        arrivals, t = [], 0.0
        for _ in prompts:
            t += rnd.expovariate(rate)
            arrivals.append(t)

        def fire(i: int) -> None:
            delay = arrivals[i] - (time.perf_counter() - start)
            if delay > 0:
                time.sleep(delay)
            r = send(prompts[i])
            with lock:
                results.append(r)

        with ThreadPoolExecutor(max(64, len(prompts))) as pool:
            list(pool.map(fire, range(len(prompts))))
    else:  # closed loop
        todo = deque(prompts)

        def client() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    prompt = todo.popleft()
                r = send(prompt)
                with lock:
                    results.append(r)

        threads = [threading.Thread(target=client) for _ in range(concurrency or 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    wall = time.perf_counter() - start
    return summarize(results, wall)


def summarize(results: list[Result], wall: float) -> dict:
    tokens = sum(r.tokens for r in results)
    itl = [x for r in results for x in r.itl]
    return {
        "requests": len(results),
        "wall_seconds": round(wall, 3),
        "request_throughput": round(len(results) / wall, 3),
        "output_tokens_per_second": round(tokens / wall, 2),
        "ttft_p50_ms": round(1000 * percentile([r.ttft for r in results], 0.5), 2),
        "ttft_p99_ms": round(1000 * percentile([r.ttft for r in results], 0.99), 2),
        "itl_p50_ms": round(1000 * percentile(itl, 0.5), 3),
        "itl_p99_ms": round(1000 * percentile(itl, 0.99), 3),
        "e2e_p50_ms": round(1000 * percentile([r.e2e for r in results], 0.5), 2),
        "e2e_p99_ms": round(1000 * percentile([r.e2e for r in results], 0.99), 2),
    }


def run_in_process(engine, prompts: list[list[int]], args, concurrency: int) -> dict:
    """The same requests through the scheduler directly, `concurrency` in flight at a time."""
    from specdec.request import Mode
    from specdec.sampling import SamplingParams

    scheduler = engine.scheduler
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True, temperature=args.temperature)
    mode = Mode(args.mode) if args.mode else None
    todo = deque(prompts)
    active: dict[int, dict] = {}
    results: list[Result] = []
    start = time.perf_counter()
    while todo or active:
        while todo and len(active) < concurrency:
            request = engine.make_request(todo.popleft(), params, mode)
            handle = scheduler.add_request(request, check_queue=False)
            active[handle] = {
                "start": time.perf_counter(),
                "ttft": None,
                "tokens": 0,
                "itl": [],
                "last": None,
            }
        for out in scheduler.step().outputs:
            state = active.get(out.handle)
            if state is None:
                continue
            now = time.perf_counter()
            n = len(out.new_token_ids)
            if n:
                if state["ttft"] is None:
                    state["ttft"] = now - state["start"]
                else:
                    state["itl"].extend([(now - state["last"]) / n] * n)
                state["tokens"] += n
                state["last"] = now
            if out.finished:
                del active[out.handle]
                results.append(
                    Result(state["ttft"] or 0.0, now - state["start"], state["tokens"], state["itl"])
                )
    return summarize(results, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="directory, .gguf file or hub id (default: the default pair)")
    parser.add_argument("--draft")
    parser.add_argument("--demo", action="store_true", help="the tiny embedded demo pair")
    parser.add_argument("--server", help="load an already running server (no in-process comparison)")
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop client counts")
    parser.add_argument("--rate", type=float, default=None, help="open loop: requests per second (Poisson)")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--mode", choices=["speculative", "target", "draft"], default=None)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument(
        "--cpu-threads", type=int, default=0, help="as `specdec serve --cpu-threads` (0 = all cores but one)"
    )
    parser.add_argument(
        "--http",
        action="store_true",
        help="also run every load over the server's OpenAI HTTP API (streamed /v1/completions)",
    )
    parser.add_argument("--out", type=Path, default=Path("out/load_test.json"))
    args = parser.parse_args(argv)
    if args.cpu_threads < 0:
        parser.error(f"--cpu-threads must be >= 0 (0 = all cores but one), got {args.cpu_threads}")
    if args.http and args.server:
        parser.error("--http drives the server this script starts; drop --server")

    from specdec.assets import resolve_pair
    from specdec.bench.main import prompts_from_text
    from specdec.config import EngineConfig
    from specdec.engine import Engine, resolve_device
    from specdec.server.app import ServerConfig, configure_cpu_threads
    from specdec.server.background import BackgroundServer
    from specdec.testing import free_port

    target, draft = resolve_pair(args.target, args.draft, args.demo)
    engine = server = None
    threads = 0
    if args.server:
        address = args.server
    else:
        # The serving default, for both the server and the in-process run (torch's thread count is
        # per process), so that their ratio is the cost of gRPC and the server's loop alone.
        threads = configure_cpu_threads(resolve_device("auto"), args.cpu_threads)
        engine = Engine(
            target=target,
            draft=draft,
            config=EngineConfig(
                max_batch_size=args.max_batch_size,
                max_queue=max(args.requests, 64),
                max_context=args.prompt_len + args.max_new_tokens + 1,
            ),
        )
        server_config = ServerConfig(
            host="127.0.0.1", port=0, metrics_port=0, http_port=free_port() if args.http else 0
        )
        server = BackgroundServer(engine, server_config)
        address = server.address
    from specdec.models.loader import load_tokenizer

    tokenizer = engine.tokenizer if engine is not None else load_tokenizer(Path(target))
    texts_file = Path(target).parent / "heldout_prompts.json"
    texts = json.loads(texts_file.read_text()) if texts_file.exists() else ["def f(x):\n    return x\n" * 50]
    prompts = prompts_from_text(tokenizer, texts, args.prompt_len, args.requests)

    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python", "benches/load_test.py", *(argv or sys.argv[1:])]),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "torch_threads": threads if engine is not None else None,
        "runs": [],
    }
    loads = (
        [("rate", args.rate)] if args.rate else [("concurrency", int(c)) for c in args.concurrency.split(",")]
    )
    for kind, value in loads:
        one_request(pb_grpc.SpecDecStub(grpc.insecure_channel(address)), prompts[0], args)  # warm-up
        grpc_result = run_grpc(
            address, prompts, args, None if kind == "rate" else value, value if kind == "rate" else None
        )
        entry = {kind: value, "grpc": grpc_result}
        if args.http:
            http_target = ("127.0.0.1", server_config.http_port, engine.target.name)
            http_result = run_grpc(
                address, prompts, args, None if kind == "rate" else value, value if kind == "rate" else None,
                http_target,
            )  # fmt: skip
            entry["http"] = http_result
            entry["http_vs_grpc_tokens_per_second"] = round(
                http_result["output_tokens_per_second"] / grpc_result["output_tokens_per_second"], 4
            )
        if engine is not None and kind == "concurrency":
            # The server must be idle while the scheduler is driven directly from this thread.
            server.stop()
            local = run_in_process(engine, prompts, args, value)
            entry["in_process"] = local
            entry["grpc_overhead"] = round(
                1 - grpc_result["output_tokens_per_second"] / local["output_tokens_per_second"], 4
            )
            server = BackgroundServer(engine, server_config)
            address = server.address
        report["runs"].append(entry)
        print(json.dumps(entry))
    if server is not None:
        server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
