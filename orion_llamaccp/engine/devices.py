"""Whether llama-server sees a GPU at all, asked before a profile pinned to GPUs is fetched.

llama-server says "no usable GPU found" only as it loads the model, and the start then
fails (``diagnostics.no_gpu``). For a model still to download, that came after the whole
download: hours for a 40 GB file, on a host that was never going to serve it (a container
started without its GPUs, a CPU build). ``--list-devices`` answers in a moment, before
any model: asked beside the download, it stops it as soon as it says "(none)".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from orion_llamaccp.engine.command import LaunchSpec
from orion_llamaccp.engine.diagnostics import Diagnosis, no_gpu

log = logging.getLogger(__name__)

LIST_DEVICES = "--list-devices"
# Seconds for the answer: CUDA's initialisation on a host with many GPUs takes seconds.
# Past it, nothing is concluded: llama-server's own load says it, later.
_LIST_TIMEOUT = 60.0


async def no_gpu_listed(launch: LaunchSpec, environ: Mapping[str, str]) -> Diagnosis | None:
    """Why the profile cannot be served as asked when llama-server, run with the launch's
    environment (its ``CUDA_VISIBLE_DEVICES`` pin), lists no device; None when it lists
    one, or said nothing that can be read as "none" (then its load decides)."""
    pinned = launch.gpus_required
    if pinned is None:
        return None
    env, _ = launch.child_env(environ)
    try:
        proc = await asyncio.create_subprocess_exec(
            launch.argv[0],
            LIST_DEVICES,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
    except OSError as exc:  # the start says it better, with the binary's own error
        log.debug("%s %s not run: %s", launch.argv[0], LIST_DEVICES, exc)
        return None
    try:
        async with asyncio.timeout(_LIST_TIMEOUT):
            out, _ = await proc.communicate()
    except TimeoutError:
        return None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0 or not lists_none(out.decode(errors="replace")):
        return None
    return no_gpu(f"no usable GPU found: `llama-server {LIST_DEVICES}` lists none", pinned)


def lists_none(text: str) -> bool:
    """Whether ``--list-devices`` said "Available devices:" and then only "(none)"."""
    lines = [line.strip() for line in text.splitlines()]
    if "Available devices:" not in lines:
        return False
    listed = [line for line in lines[lines.index("Available devices:") + 1 :] if line]
    return listed == ["(none)"]
