"""`specdec generate`: one prompt, in-process or over gRPC with --server."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from specdec.assets import resolve_pair
from specdec.cli.options import add_engine_flags, add_sampling_flags, engine_config, sampling_params
from specdec.errors import SpecdecError
from specdec.grammar import Constraint, ConstraintKind


def add_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "generate", help="generate text for one prompt: in-process, or over gRPC with --server"
    )
    gen.add_argument("prompt", nargs="?", help="the text to continue (or give --chat)")
    gen.add_argument(
        "--chat",
        metavar="MESSAGE",
        help="a user message, rendered with the checkpoint's chat template (instead of a prompt)",
    )
    gen.add_argument("--system", metavar="MESSAGE", help="with --chat: a system message before it")
    gen.add_argument(
        "--server", help="HOST:PORT of a running `specdec serve` (default: run the engine in-process)"
    )
    gen.add_argument("--timeout", type=float, default=None, help="gRPC deadline in seconds (with --server)")
    gen.add_argument(
        "--api-key", default=None, help="with --server: the server's API key (default: $SPECDEC_API_KEY)"
    )
    gen.add_argument("--tls", action="store_true", help="with --server: TLS, verified with the system's CAs")
    gen.add_argument(
        "--tls-ca", type=Path, default=None, help="with --server: TLS, verified with this CA (PEM)"
    )
    gen.add_argument("--tls-cert", type=Path, default=None, help="with --server: a client certificate (mTLS)")
    gen.add_argument("--tls-key", type=Path, default=None, help="with --server: the client certificate's key")
    add_engine_flags(gen)
    add_sampling_flags(gen)
    gen.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    constrain = gen.add_mutually_exclusive_group()
    constrain.add_argument(
        "--json-schema",
        metavar="SCHEMA",
        help="constrain the output to this JSON Schema (JSON text, or @FILE)",
    )
    constrain.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
    constrain.add_argument(
        "--regex", metavar="REGEX", help="constrain the output to match this regular expression"
    )
    constrain.add_argument(
        "--grammar",
        metavar="EBNF",
        help="constrain the output to this EBNF grammar (text, or @FILE; rule root)",
    )
    gen.set_defaults(func=run)


def _constraint(args: argparse.Namespace) -> Constraint | None:
    """The constraint the flags ask for (docs/STRUCTURED_OUTPUT.md); @FILE reads a file."""

    def text(value: str) -> str:
        if value.startswith("@"):
            try:
                return Path(value[1:]).read_text()
            except OSError as e:
                raise SpecdecError(f"cannot read {value[1:]}: {e.strerror}") from None
        return value

    if args.json_schema is not None:
        constraint = Constraint(ConstraintKind.JSON_SCHEMA, text(args.json_schema))
    elif args.json_object:
        constraint = Constraint(ConstraintKind.JSON_OBJECT)
    elif args.regex is not None:
        constraint = Constraint(ConstraintKind.REGEX, args.regex)
    elif args.grammar is not None:
        constraint = Constraint(ConstraintKind.GRAMMAR, text(args.grammar))
    else:
        return None
    # Checked here too: over gRPC an empty string is a field left unset, so the server would see
    # no constraint at all.
    constraint.check()
    return constraint


def _messages(args: argparse.Namespace) -> list[dict[str, str]] | None:
    """The chat messages --chat and --system ask for (None: a plain prompt); SpecdecError on a
    contradiction."""
    if args.chat is None:
        if args.system is not None:
            raise SpecdecError("--system goes with --chat")
        if args.prompt is None:
            raise SpecdecError("give a prompt, or a chat message with --chat")
        return None
    if args.prompt is not None:
        raise SpecdecError("give a prompt or --chat, not both")
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return [*system, {"role": "user", "content": args.chat}]


def run(args: argparse.Namespace) -> int:
    messages = _messages(args)
    # What is echoed before the output: the prompt continued, or nothing for a chat answer.
    echo = "" if messages else args.prompt
    if args.server:
        return _generate_remote(args, messages, echo)
    from specdec.engine import Engine

    target, draft = resolve_pair(args.target, args.draft, args.demo)
    engine = Engine(target=target, draft=draft, config=engine_config(args))
    prompt = engine.render_chat(messages) if messages else args.prompt
    request = engine.make_request(
        prompt, sampling_params(args), args.mode, args.num_speculative_tokens, constraint=_constraint(args)
    )
    if args.stream and not args.json:
        sys.stdout.write(echo)
        for out in engine.stream(request):
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    [result] = engine.generate([request])
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(echo + result.text)
        stats = result.stats
        print(
            f"[{result.finish_reason.value}; {len(result.token_ids)} tokens in {result.timing.total_seconds:.2f}s; "
            f"acceptance {stats.acceptance_rate:.2f}, {stats.mean_accepted_length:.2f} tokens/verify"
            f"{_constraint_note(result.constraint)}]",
            file=sys.stderr,
        )
    return 0 if result.error is None else 1


def _constraint_note(outcome) -> str:
    """'; constraint complete' (or incomplete, and the unenforced keywords) for the summary line."""
    if outcome is None:
        return ""
    note = "; constraint " + ("complete" if outcome.complete else "incomplete (cut before the grammar ended)")
    return note + (f", not enforced: {', '.join(outcome.unenforced)}" if outcome.unenforced else "")


def _generate_remote(args: argparse.Namespace, messages: list[dict[str, str]] | None, echo: str) -> int:
    """`specdec generate --server`: the same flags, over gRPC."""
    import grpc

    from specdec.client import Client, response_dict

    params = sampling_params(args)
    fields = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "seed": params.seed,
        "stop": list(params.stop),
        "num_speculative_tokens": args.num_speculative_tokens,
    }
    constraint = _constraint(args)
    if constraint is not None:
        if constraint.kind is ConstraintKind.JSON_SCHEMA:
            fields.update(json_schema=constraint.text, constrain=True)
        else:
            is_flag = constraint.kind is ConstraintKind.JSON_OBJECT
            fields[constraint.kind.value] = True if is_flag else constraint.text
    try:
        client = Client(
            args.server,
            timeout=args.timeout,
            api_key=args.api_key,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
        with client:
            if args.stream:
                last = None
                if not args.json:
                    sys.stdout.write(echo)
                pieces = []
                for chunk in client.stream(messages or args.prompt, args.mode, **fields):
                    pieces.append(chunk)
                    last = chunk
                    if not args.json:
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
                assert last is not None
                # One reply with the totals of the last chunk and the text and ids of them all.
                reply = type(last)()
                reply.CopyFrom(last)
                reply.text = "".join(c.text for c in pieces)
                del reply.token_ids[:], reply.logprobs[:]
                reply.token_ids.extend(t for c in pieces for t in c.token_ids)
                reply.logprobs.extend(lp for c in pieces for lp in c.logprobs)
                if not args.json:
                    sys.stdout.write("\n")
            else:
                reply = client.generate(messages or args.prompt, args.mode, **fields)
                if not args.json:
                    print(echo + reply.text)
    except grpc.RpcError as e:
        print(f"specdec: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(response_dict(reply)))
    else:
        stats = reply.stats
        print(
            f"[{len(reply.token_ids)} tokens in {reply.timing.total_seconds:.2f}s; acceptance "
            f"{stats.acceptance_rate:.2f}, {stats.mean_accepted_length:.2f} tokens/verify"
            f"{_constraint_note(reply.constraint if reply.HasField('constraint') else None)}]",
            file=sys.stderr,
        )
    return 0
