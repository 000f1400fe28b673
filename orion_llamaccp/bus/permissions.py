"""Whether the bus's Redis user may PUBLISH and SUBSCRIBE on the worker's channels.

An ACL user without one of them passed ``doctor``; ``run`` then failed its SUBSCRIBE
("No permissions to access a channel", no channel named) or its first heartbeat. Asked
with ``ACL DRYRUN`` where the user may run it (Redis 7), exactly, per command and channel.
Elsewhere (Redis 6.2, a user without ``ACL``) by trying, without a message anyone reads:
a SUBSCRIBE to each channel on a connection of its own, left at once (a channel's
permission is one for PUBLISH and SUBSCRIBE alike), and a PUBLISH to a channel of our own
that no one listens on, whose refusal says whether the command or the channel was refused.

The channels of the replies (each request's ``reply_to``) are the callers': not checked.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

import redis

from orion_llamaccp.bus import keys

# Channel -> what the worker does there, for the message.
Channels = Mapping[str, str]


def refused(
    client: redis.Redis, user: str, *, publish: Channels, subscribe: Channels
) -> str | None:
    """What ``user`` may not do on the worker's channels, the channel named; None when
    it may do all of it."""
    wanted = [("PUBLISH", name, why) for name, why in publish.items()]
    wanted += [("SUBSCRIBE", name, why) for name, why in subscribe.items()]
    try:
        return _dry_run(client, user, wanted)
    except redis.ResponseError:  # no DRYRUN (6.2), or not this user's to run
        return _tried(client, user, wanted)


def user_of(client: redis.Redis, url: str) -> str:
    """The ACL user ``client`` is: as Redis says (``ACL WHOAMI``), else as the URL names
    it (none: ``default``)."""
    try:
        found = client.acl_whoami()
        return found.decode() if isinstance(found, bytes) else str(found)
    except redis.ResponseError:
        return unquote(urlsplit(url).username or "") or "default"


def _dry_run(client: redis.Redis, user: str, wanted: list[tuple[str, str, str]]) -> str | None:
    for command, channel, why in wanted:
        args = (channel, "") if command == "PUBLISH" else (channel,)
        reply = client.execute_command("ACL", "DRYRUN", user, command, *args)
        said = reply.decode() if isinstance(reply, bytes) else str(reply)
        if said != "OK":  # the reason, as a reply: DRYRUN itself ran
            return _said(user, command, "" if _of_the_command(said) else channel, why, said)
    return None


def _tried(client: redis.Redis, user: str, wanted: list[tuple[str, str, str]]) -> str | None:
    pubsub = client.pubsub()
    try:
        for command, channel, why in wanted:
            try:
                pubsub.subscribe(channel)
                pubsub.get_message(timeout=2.0)  # its reply: a refusal is raised here
                # Left at once: while subscribed, a request published on the intake
                # counts a listener here, and its caller waits for an answer.
                pubsub.unsubscribe(channel)
                pubsub.get_message(timeout=2.0)  # its reply, before the next one's
            except redis.ResponseError as exc:
                if _of_the_command(str(exc)):
                    return _said(user, "SUBSCRIBE", "", "", str(exc))
                return _said(user, command, channel, why, str(exc))
    finally:
        pubsub.close()  # its connection goes with it, and every channel it subscribed
    try:
        client.publish(f"{keys.PREFIX}:doctor:{uuid.uuid4()}", b"")
    except redis.ResponseError as exc:
        if _of_the_command(str(exc)):  # else the channel was refused: the command is allowed
            return _said(user, "PUBLISH", "", "", str(exc))
    return None


def _of_the_command(reason: str) -> bool:
    """Whether a refusal is of the command itself, not of one of its channels."""
    return "command" in reason.lower()


def _said(user: str, command: str, channel: str, why: str, reason: str) -> str:
    if not channel:
        grant = f"+{command.lower()}"
        return (
            f"Redis user {user!r} may not run {command} ({reason}), which the worker needs: "
            f"grant it in Redis's ACL ({grant})"
        )
    return (
        f"Redis user {user!r} may not {command} to {channel} ({why}; {reason}): grant it in "
        f"Redis's ACL (&{channel}, or a pattern over it)"
    )
