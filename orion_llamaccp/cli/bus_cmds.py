"""Subcommands that talk to the bus as a client: ``chat``, ``ps``, ``watch``, ``health``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Coroutine
from typing import Any

import orjson

from orion_llamaccp.cli import positive
from orion_llamaccp.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ps", help="every llama.cpp host on the bus, once")
    p.add_argument("--json", action="store_true", help="print the hosts as JSON")
    p.set_defaults(handler=cmd_ps)
    p = sub.add_parser("watch", help="a live table of every llama.cpp host on the bus")
    p.add_argument("--refresh", type=positive(float), default=1.0, help="seconds between redraws")
    p.set_defaults(handler=cmd_watch)
    p = sub.add_parser(
        "health",
        help="exit 0 while this worker (INSTANCE_ID) beats on the bus and is not down "
        "(a container's health check)",
    )
    p.add_argument("--ready", action="store_true", help="healthy only while it serves (ready)")
    p.set_defaults(handler=cmd_health)
    p = sub.add_parser("chat", help="ask one question over the bus and print the answer")
    p.add_argument("prompt")
    p.add_argument("--profile", help="profile to ask (default: LLM_PROFILE_NAME)")
    p.add_argument(
        "--stream",
        action="store_true",
        help="print tokens as they arrive",
    )
    p.add_argument(
        "--via",
        choices=("pubsub", "stream"),
        default="pubsub",
        help="intake: pubsub (at most once) or stream (durable); default pubsub",
    )
    p.add_argument(
        "--max-tokens", type=positive(int), default=None, help="default: the profile's n_predict"
    )
    p.add_argument(
        "--timeout",
        type=positive(float),
        default=300.0,
        help="seconds to wait for the answer (300)",
    )
    p.add_argument("--json", action="store_true", help="print the result payload as JSON")
    p.set_defaults(handler=cmd_chat)


def run_bus(
    coro: Coroutine[Any, Any, int],
    settings: Settings,
    *,
    waiting_for: str = "Redis in time",
    as_json: bool = False,
) -> int:
    """Run a command that talks to the bus. A Redis that is down or refuses us, or no
    answer in time, is an ordinary failure: one ``error:`` line (with ``--json``, its
    JSON) and exit status 1, no traceback, and never the bus password."""
    from redis.exceptions import AuthenticationError, ResponseError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from orion_llamaccp.cli import fail, run_async

    bus = settings.bus_url_display
    try:
        return run_async(coro)
    except AuthenticationError as exc:
        problem, code = f"Redis at {bus} refused the credentials: {exc}", "redis_auth"
    except (RedisConnectionError, RedisTimeoutError) as exc:
        problem, code = f"cannot reach Redis at {bus}: {exc}", "redis_unreachable"
    except ResponseError as exc:  # a database index out of range, an ACL's NOPERM
        problem, code = f"Redis at {bus} refused a command: {exc}", "redis_refused"
    except TimeoutError:
        problem, code = f"no answer from {waiting_for} (bus {bus})", "timeout"
    return fail(settings.redact(problem), code, as_json=as_json)


async def _chat(args: argparse.Namespace, settings: Settings) -> int:
    from orion_llamaccp.bus import keys
    from orion_llamaccp.client import BusClient
    from orion_llamaccp.worker.announce import channels_for
    from orion_llamaccp.worker.startup import connect

    profile = args.profile or settings.profile_name
    options = {"max_tokens": args.max_tokens} if args.max_tokens is not None else {}
    # The selected profile's channels, overrides included (as its worker here reads them);
    # another profile's are its defaults: the overrides belong to the selected one.
    if profile == settings.profile_name:
        channels = channels_for(settings, profile)
        intake, stream = channels.intake, channels.stream
    else:
        intake, stream = keys.intake_channel(profile), keys.intake_stream(profile)

    live = args.stream and not args.json
    shown: list[str] = []  # this attempt's text, as written
    spliced = False  # an earlier attempt's text was written before it

    def show(delta: str) -> None:
        shown.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()

    def restarted(attempt: int) -> None:
        nonlocal spliced
        spliced = spliced or bool(shown)
        shown.clear()
        print(f"\n--- attempt {attempt} starts the answer over ---", file=sys.stderr)

    redis = connect(settings)  # the worker's client: socket timeouts, no silent retries
    try:
        if args.via == "stream":
            await _stream_read(redis, profile, stream)
        result = await BusClient(redis=redis).chat(
            [{"role": "user", "content": args.prompt}],
            profile=profile,
            via=args.via,
            stream=args.stream,
            options=options,
            timeout=args.timeout,
            on_delta=show if live else None,
            on_restart=restarted if live else None,
            channel=intake,
            stream_name=stream,
            cancel_channel=settings.cancel_channel,
        )
    finally:
        await redis.aclose()
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
    content = payload.get("content") or ""
    text = "".join(shown)
    if spliced or not content.startswith(text):  # written text that is not the answer's
        if not sys.stdout.isatty():
            # Text written to a pipe or a file cannot be taken back: appending the answer
            # spliced the two, with exit status 0.
            print(
                "\nerror: the answer was started over (llama-server restarted) after part of "
                "it was written: the output is not the answer; ask again",
                file=sys.stderr,
            )
            return 1
        if not content.startswith(text):
            print("\n--- the text above was not the answer's; the answer: ---", file=sys.stderr)
            text = ""
    rest = content[len(text) :]  # all of it, a lost chunk's tail, or none
    # Ended by a newline, as a line of text is: the shell's prompt, or the next line of
    # a log it is appended to, came right after the answer's last word.
    print(rest, end="" if (text + rest).endswith("\n") else "\n")
    usage = payload.get("usage", {})
    timings = payload.get("meta", {}).get("timings") or {}
    print(
        f"--- {payload.get('model_used')} via {args.via}: "
        f"{usage.get('prompt_tokens')} prompt + {usage.get('completion_tokens')} completion "
        f"tokens; {timings.get('predicted_per_second', 0):.1f} tok/s; "
        f"{(result.done_at - result.sent_at) * 1000:.0f} ms",
        file=sys.stderr,
    )
    return 0


async def _stream_read(redis: Any, profile: str, stream: str) -> None:
    """Raise ``NoWorker`` where the workers of ``profile`` up on the bus all say they do
    not read ``stream`` (pub/sub only, or another stream): the request would wait there,
    and ``chat`` its whole timeout, for a worker to come."""
    from orion_llamaccp.errors import NoWorker
    from orion_llamaccp.fleet import Fleet

    if problem := (await Fleet().load(redis)).no_stream_reader(profile, stream):
        raise NoWorker(
            f"{problem}: ask with --via pubsub, or have a worker serve the stream "
            "(ORION_LLAMACPP_TRANSPORTS, ORION_LLAMACPP_INTAKE_STREAM)"
        )


def cmd_chat(args: argparse.Namespace, settings: Settings) -> int:
    profile = args.profile or settings.profile_name
    return run_bus(
        _chat(args, settings),
        settings,
        as_json=args.json,
        waiting_for=(
            f"a worker serving profile '{profile}' within {args.timeout:g}s (is one running "
            f"and ready? `orion-llamaccp ps`)"
        ),
    )


COLUMNS = (
    "service",
    "node",
    "instance",
    "profile",
    "model",
    "state",
    "slots",
    "tok/s",
    "served",
    "last beat",
)


def fleet_table(rows: list[dict]) -> Any:
    """The hosts as a table. What they said is shown as text, never read as rich's
    markup: anyone may publish on the bus, and a profile named ``p[/x]`` stopped ps."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"llama.cpp hosts on the bus ({len(rows)})")
    for column in COLUMNS:
        table.add_column(column)
    for said in rows:
        row = {k: escape(v) if isinstance(v, str) else v for k, v in said.items()}
        # A worker that gave up says so, and why: "down" alone hid both.
        if row["state"] == "failed":
            state = f"[red]failed[/red]: {row['reason'] or '?'}"
        elif row["down"]:  # and what it said last, where that was no "ready": draining
            said = row["state"] if row["state"] not in (None, "ready") else None
            state = "[red]down[/red]" + (f": {said}" if said else "")
        else:
            state = str(row["state"] or "?")
        slots = (
            f"{row['slots_busy'] if row['slots_busy'] is not None else '?'}/"
            f"{row['slots_total'] if row['slots_total'] is not None else '?'}"
        )
        age = "never" if row["beat_age_sec"] is None else f"{row['beat_age_sec']:.1f}s ago"
        table.add_row(
            row["service"],
            row["node"] or "",
            row["instance"],
            row["profile"] or "",
            row["model"] or "",
            state,
            slots,
            str(row["tokens_per_sec"] or 0),
            str(row["requests_served"] or 0),
            age,
        )
    return table


async def _ps(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console

    from orion_llamaccp.fleet import Fleet
    from orion_llamaccp.worker.startup import connect

    redis = connect(settings)
    try:
        rows = (await Fleet().load(redis)).rows()
    finally:
        await redis.aclose()
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    else:
        Console(width=200).print(fleet_table(rows))
    return 0


def cmd_ps(args: argparse.Namespace, settings: Settings) -> int:
    return run_bus(_ps(args, settings), settings, as_json=args.json)


async def _health(args: argparse.Namespace, settings: Settings) -> int:
    """This worker's health as the fleet sees it: its last heartbeat, kept under its
    liveness key for three intervals. So a worker that lost Redis, or whose loop hangs,
    is unhealthy (no beat), and one downloading or loading a model is not (it beats,
    ``degraded``), where llama-server's ``/health`` says 503 for the whole download."""
    from orion_llamaccp.bus import keys
    from orion_llamaccp.worker.startup import connect

    redis = connect(settings)
    try:
        raw = await redis.get(keys.liveness(settings.service_name, settings.instance_id))
    finally:
        await redis.aclose()
    who = f"{settings.service_name} {settings.instance_id}"
    if raw is None:
        print(f"unhealthy: no heartbeat of {who} on the bus within three intervals")
        return 1
    try:
        beat = orjson.loads(raw)["payload"]
        status, details = str(beat["status"]), dict(beat.get("details") or {})
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        print(f"unhealthy: the heartbeat of {who} cannot be read: {raw[:80]!r}")
        return 1
    said = f"{who}: {status} ({details.get('state', '?')})"
    if reason := details.get("reason"):
        said += f": {reason}"
    wanted = ("ok",) if args.ready else ("ok", "degraded")
    print(f"{'healthy' if status in wanted else 'unhealthy'}: {said}")
    return 0 if status in wanted else 1


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    return run_bus(_health(args, settings), settings)


async def _watch(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import signal

    from rich.live import Live

    from orion_llamaccp.fleet import Fleet
    from orion_llamaccp.worker.startup import connect

    redis = connect(settings)
    fleet = await Fleet().load(redis)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(settings.health_channel, settings.announce_channel)
    loop = asyncio.get_running_loop()
    # A SIGTERM (a supervisor's, ``timeout``'s) ends it as Ctrl-C does: off a terminal the
    # table is drawn once, as Live stops, and the default action drew nothing.
    stopped = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    next_draw = reload_at = 0.0
    try:
        with Live(fleet_table(fleet.rows()), auto_refresh=False) as live:
            while not stopped.is_set():
                message = await pubsub.get_message(timeout=args.refresh)
                if message is not None:
                    fleet.ingest(message["data"])
                now = loop.time()
                if now >= reload_at:  # hosts that went silent before we subscribed
                    await fleet.load(redis)
                    fleet.forget_gone()
                    reload_at = now + 10
                if now >= next_draw:
                    live.update(fleet_table(fleet.rows()), refresh=True)
                    next_draw = now + args.refresh
        return 0
    finally:
        await pubsub.aclose()
        await redis.aclose()


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return run_bus(_watch(args, settings), settings)
    except KeyboardInterrupt:
        return 0
