"""A small Python client for the SpecDec gRPC API (used by `specdec generate --server`).

from specdec.client import Client
with Client("localhost:50051") as client:
    reply = client.generate("def fibonacci(n):", max_new_tokens=64)
    print(reply.text, reply.stats.acceptance_rate)
    for chunk in client.stream("def quicksort(xs):", max_new_tokens=64):
        print(chunk.text, end="")

A server with API keys takes `Client(address, api_key=...)` (default: $SPECDEC_API_KEY); one with
TLS `tls_ca=` (the CA that signed its certificate; None with `tls=True`: the system's roots), and
with mTLS also `tls_cert=` and `tls_key=`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc

MODES = {
    "speculative": pb.MODE_SPECULATIVE,
    "target": pb.MODE_TARGET,
    "draft": pb.MODE_DRAFT,
    None: pb.MODE_UNSPECIFIED,
}


def build_request(
    prompt: str | list[int] | list[dict[str, str]], mode: str | None = None, **fields: Any
) -> pb.GenerateRequest:
    """A GenerateRequest from a prompt (text, token ids, or chat messages) and keyword fields named
    as in the proto; fields left as None stay unset (the server's defaults apply)."""
    msg = pb.GenerateRequest(mode=MODES[mode])
    if isinstance(prompt, str):
        msg.prompt = prompt
    elif prompt and isinstance(prompt[0], dict):
        msg.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)  # type: ignore[index]
    else:
        msg.prompt_token_ids.extend(prompt)  # type: ignore[arg-type]
    for name, value in fields.items():
        if value is None:
            continue
        field = getattr(msg, name)
        if hasattr(field, "extend"):
            field.extend(value)
        elif hasattr(field, "CopyFrom"):  # a message field (route_override)
            field.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


class Client:
    def __init__(
        self,
        address: str,
        timeout: float | None = None,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ):
        if tls or tls_ca or tls_cert or tls_key:
            from specdec.server.tls import channel_credentials

            self.channel = grpc.secure_channel(address, channel_credentials(tls_ca, tls_cert, tls_key))
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.SpecDecStub(self.channel)
        self.timeout = timeout
        api_key = api_key if api_key is not None else os.environ.get("SPECDEC_API_KEY")
        # Per-call metadata, on plaintext and TLS channels alike (gRPC's call credentials refuse
        # plaintext ones, which a server on loopback legitimately is).
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(
        self, prompt: Any, mode: str | None = None, timeout: float | None = None, **fields: Any
    ) -> pb.GenerateResponse:
        return self.stub.Generate(
            build_request(prompt, mode, **fields), timeout=timeout or self.timeout, metadata=self.metadata
        )

    def stream(
        self, prompt: Any, mode: str | None = None, timeout: float | None = None, **fields: Any
    ) -> Iterator[pb.GenerateResponse]:
        return self.stub.GenerateStream(
            build_request(prompt, mode, **fields), timeout=timeout or self.timeout, metadata=self.metadata
        )

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)


def response_dict(reply: pb.GenerateResponse) -> dict[str, Any]:
    """The `--json` form of a (unary or merged) response."""
    return {
        "request_id": reply.request_id,
        "text": reply.text,
        "token_ids": list(reply.token_ids),
        "finish_reason": pb.FinishReason.Name(reply.finish_reason).removeprefix("FINISH_REASON_").lower(),
        "usage": {
            "prompt_tokens": reply.usage.prompt_tokens,
            "completion_tokens": reply.usage.completion_tokens,
        },
        "stats": {
            "drafted_tokens": reply.stats.drafted_tokens,
            "accepted_tokens": reply.stats.accepted_tokens,
            "acceptance_rate": round(reply.stats.acceptance_rate, 4),
            "mean_accepted_length": round(reply.stats.mean_accepted_length, 4),
            "verify_steps": reply.stats.verify_steps,
            "accepted_by_position": list(reply.stats.accepted_by_position),
        },
        "timing": {
            "queue_seconds": reply.timing.queue_seconds,
            "time_to_first_token_seconds": reply.timing.time_to_first_token_seconds,
            "total_seconds": reply.timing.total_seconds,
        },
        "seed": reply.seed,
        **(
            {"logprobs": [{"token_id": lp.token_id, "logprob": lp.logprob} for lp in reply.logprobs]}
            if reply.logprobs
            else {}
        ),
    }
