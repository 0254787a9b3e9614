"""`specdec eval`: the same eval set through every tier of a route, sliced, with the route replayed
at every threshold and a calibrated threshold chosen (docs/ROUTING.md, *Evaluating tiers*)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from specdec.cli.options import add_engine_flags, engine_config
from specdec.errors import SpecdecError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score every tier of a route on an eval set and choose its threshold")
    p.add_argument("--data", type=Path, required=True, help="the eval set (JSON Lines)")
    p.add_argument("--routes", type=Path, required=True, help="the routes file")
    p.add_argument("--route", required=True, help="the route to evaluate")
    p.add_argument(
        "--server", default=None, help="HOST:PORT of a running specdec serving the route (else in-process)"
    )
    p.add_argument(
        "--api-key", default=None, help="with --server: a key granted route:force (default $SPECDEC_API_KEY)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("out/eval"), help="report directory (records.jsonl there resumes)"
    )
    p.add_argument(
        "--scorer",
        default=None,
        help="the default scorer: exact, contains, label, json_fields, regex, MODULE:FUNC",
    )
    goal = p.add_mutually_exclusive_group()
    goal.add_argument(
        "--target-quality", type=float, default=None, help="the fewest escalations reaching this quality"
    )
    goal.add_argument(
        "--max-escalation-rate", type=float, default=None, help="the best quality within this escalation rate"
    )
    p.add_argument("--price", action="append", default=[], metavar="TIER=IN,OUT",
                   help="$ per million input and output tokens of a tier (or TIER=hour:X, $ per machine-hour)")  # fmt: skip
    p.add_argument("--prompt-variant", action="append", default=[], type=Path, metavar="FILE",
                   help="a prompt template ({input}: the example's last user message) the small tier is scored under")  # fmt: skip
    p.add_argument(
        "--holdout", type=float, default=0.3, help="share of examples held out for the calibration error"
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    add_engine_flags(p)
    p.set_defaults(func=run)


def parse_price(text: str):
    from specdec.eval.analysis import Price

    tier, sep, value = text.partition("=")
    try:
        if not sep or not tier:
            raise ValueError
        numbers = (
            [float(value.removeprefix("hour:"))]
            if value.startswith("hour:")
            else [float(x) for x in value.split(",")]
        )
        if len(numbers) not in (1, 2) or (len(numbers) == 1) != value.startswith("hour:"):
            raise ValueError
        if not all(math.isfinite(x) and x >= 0 for x in numbers):
            raise ValueError
        return tier, Price(per_hour=numbers[0]) if len(numbers) == 1 else Price(*numbers)
    except ValueError:
        raise SpecdecError(f"--price {text!r}: TIER=IN,OUT ($ per million tokens) or TIER=hour:X") from None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from specdec.eval.data import load_examples
    from specdec.eval.evaluate import EvalSettings, evaluate
    from specdec.eval.run import LocalTiers, ServerTiers, Variant
    from specdec.router.routes import load_routes
    from specdec.sampling import SamplingParams

    for name, value in (("--target-quality", args.target_quality), ("--max-escalation-rate", args.max_escalation_rate),
                        ("--holdout", args.holdout)):  # fmt: skip
        if value is not None and not 0 <= value <= 1:
            raise SpecdecError(f"{name}: in [0, 1], got {value}")
    examples = load_examples(args.data)
    config = load_routes(args.routes)
    if args.route not in config.routes:
        raise SpecdecError(
            f"--route {args.route!r}: not in {args.routes} (it has {', '.join(config.routes)})"
        )
    try:
        variants = tuple(Variant.load(p) for p in args.prompt_variant)
    except (OSError, ValueError) as e:
        raise SpecdecError(f"--prompt-variant: {e}") from None
    names = [v.name for v in variants]
    if len(set(names)) < len(names):
        raise SpecdecError(
            f"--prompt-variant: two files are named {max(names, key=names.count)!r} (a variant is named by its file)"
        )
    if args.server:
        from specdec.client import Client

        backend = ServerTiers(
            Client(args.server, timeout=600, api_key=args.api_key or os.environ.get("SPECDEC_API_KEY"))
        )
    else:
        from specdec.assets import resolve_pair
        from specdec.engine import Engine
        from specdec.router.router import Router

        target, draft = resolve_pair(args.target, args.draft, args.demo)
        backend = LocalTiers(Router(Engine(target=target, draft=draft, config=engine_config(args)), config))
    route = config.routes[args.route]
    import yaml

    written_endpoints = (yaml.safe_load(args.routes.read_text()) or {}).get("endpoints") or {}
    settings = EvalSettings(
        endpoints=written_endpoints,
        data=str(args.data), route_name=args.route, route=route,
        params=SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed),
        default_scorer=args.scorer, prices=dict(parse_price(p) for p in args.price), variants=variants,
        target_quality=args.target_quality, max_escalation_rate=args.max_escalation_rate, holdout=args.holdout,
    )  # fmt: skip
    from specdec.router.routes import LOCAL_MODES

    if variants and route.primary not in LOCAL_MODES:
        raise SpecdecError(
            f"--prompt-variant: the primary {route.primary!r} is an endpoint; variants are scored on a local small tier"
        )
    jobs = len(examples) * (len(route.tiers) + len(variants))
    with tqdm(total=jobs, desc="eval", unit="answer", file=sys.stderr) as bar:
        report = evaluate(examples, backend, settings, args.out, bar.update)
    print(f"{args.out / 'report.md'}: {report['sizing']}")
    return 0
