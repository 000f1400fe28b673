"""Subcommands that talk to the bus as a client: ``chat``."""

from __future__ import annotations

import argparse
import sys

import orjson

from orion_llamaccp.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="ask one question over the bus and print the answer")
    p.add_argument("prompt")
    p.add_argument("--profile", help="profile to ask (default: LLM_PROFILE_NAME)")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--via", choices=("pubsub", "stream"), default="pubsub")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", action="store_true", help="print the result payload as JSON")
    p.set_defaults(handler=cmd_chat)


async def _chat(args: argparse.Namespace, settings: Settings) -> int:
    from orion_llamaccp.client import BusClient

    profile = args.profile or settings.profile_name
    options = {"max_tokens": args.max_tokens} if args.max_tokens else {}

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    async with BusClient(settings.bus_url.get_secret_value()) as bus:
        result = await bus.chat(
            [{"role": "user", "content": args.prompt}],
            profile=profile,
            via=args.via,
            stream=args.stream,
            options=options,
            timeout=args.timeout,
            on_delta=None if args.json else show,
        )
    payload = result.payload
    if args.json:
        print(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode())
        return 0 if result.ok else 1
    if not result.ok:
        print(
            f"\nerror: {payload.get('error')}: {payload.get('details', {}).get('message')}",
            file=sys.stderr,
        )
        return 1
    if not args.stream:
        print(payload.get("content", ""), end="")
    usage = payload.get("usage", {})
    timings = payload.get("meta", {}).get("timings") or {}
    print(
        f"\n--- {payload.get('model_used')} via {args.via}: "
        f"{usage.get('prompt_tokens')} prompt + {usage.get('completion_tokens')} completion "
        f"tokens; {timings.get('predicted_per_second', 0):.1f} tok/s; "
        f"{(result.done_at - result.sent_at) * 1000:.0f} ms",
        file=sys.stderr,
    )
    return 0


def cmd_chat(args: argparse.Namespace, settings: Settings) -> int:
    from orion_llamaccp.cli import run_async

    return run_async(_chat(args, settings))
