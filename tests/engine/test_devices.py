"""What llama-server's ``--list-devices`` says, read before a GPU profile's download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orion_llamaccp.engine.devices import lists_none, no_gpu_listed
from orion_llamaccp.engine.diagnostics import Cause
from tests.engine.conftest import LaunchFactory


async def test_a_cpu_build_lists_no_device_for_a_profile_pinned_to_gpus(
    make_launch: LaunchFactory,
) -> None:
    """This machine's llama-server (a CPU build) lists none: a profile pinned to GPU 0
    with layers on it gets the no-GPU diagnosis, with its way out."""
    diagnosis = await no_gpu_listed(make_launch(gpus=[0], n_gpu_layers=99), os.environ)
    assert diagnosis is not None and diagnosis.cause is Cause.NO_GPU
    assert "GPUs 0" in str(diagnosis) and "LLAMACPP_N_GPU_LAYERS_OVERRIDE=0" in str(diagnosis)


async def test_nothing_is_asked_for_a_profile_without_layers_on_a_gpu(
    make_launch: LaunchFactory, tmp_path: Path
) -> None:
    """No pin, or a pin with no layers on it: nothing to check, though the binary (a
    stand-in) would say it sees no GPU."""
    sees_none = tmp_path / "sees-none.sh"
    sees_none.write_text("#!/bin/sh\nprintf 'Available devices:\\n  (none)\\n'\n")
    sees_none.chmod(0o755)
    assert await no_gpu_listed(make_launch(binary=sees_none, gpus=[0]), os.environ)
    assert await no_gpu_listed(make_launch(binary=sees_none), os.environ) is None
    launch = make_launch(binary=sees_none, gpus=[0], n_gpu_layers=0)
    assert await no_gpu_listed(launch, os.environ) is None


async def test_a_binary_that_cannot_run_concludes_nothing(
    make_launch: LaunchFactory, tmp_path: Path
) -> None:
    """Not run, or run and saying something else: the start says what is wrong, later."""
    missing = tmp_path / "no-such-llama-server"
    assert await no_gpu_listed(make_launch(binary=missing, gpus=[0]), os.environ) is None
    talker = tmp_path / "talker.sh"
    talker.write_text("#!/bin/sh\necho 'unknown argument: --list-devices'\nexit 1\n")
    talker.chmod(0o755)
    assert await no_gpu_listed(make_launch(binary=talker, gpus=[0]), os.environ) is None


@pytest.mark.parametrize(
    ("said", "none"),
    [
        ("Available devices:\n  (none)\n", True),
        ("ggml_cuda_init: no CUDA devices\nAvailable devices:\n  (none)\n", True),
        # A GPU host's answer (stand-in: no GPU here): a device listed.
        (
            "ggml_cuda_init: found 1 CUDA devices:\nAvailable devices:\n"
            "  CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, 80543 MiB free)\n",
            False,
        ),
        ("Available devices:\n  (none)\n  CUDA0: NVIDIA H100\n", False),
        ("error: unknown argument: --list-devices\n", False),
        ("", False),
    ],
)
def test_only_an_explicit_none_counts_as_no_gpu_stand_in_output(said: str, none: bool) -> None:
    assert lists_none(said) is none
