"""Recognise llama-server's known fatal messages and say what to do about them.

Other wrappers surface these as "exited with status 1"; we turn the line that matters into
an error a person can act on. Patterns are matched case-insensitively, line by line.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from enum import StrEnum


class Cause(StrEnum):
    CORRUPT_MODEL = "corrupt_model"
    UNKNOWN_FLAG = "unknown_flag"
    BAD_FLAG_VALUE = "bad_flag_value"
    OUT_OF_MEMORY = "out_of_memory"
    PORT_IN_USE = "port_in_use"
    MODEL_NOT_FOUND = "model_not_found"
    NO_GPU = "no_gpu"  # said as a warning, and llama-server goes on: see ``no_gpu``


@dataclass(frozen=True)
class Diagnosis:
    cause: Cause
    line: str
    advice: str

    def __str__(self) -> str:
        return f"{self.advice} (llama-server said: {self.line.strip()[:300]})"


_RULES: list[tuple[Cause, re.Pattern[str], str]] = [
    (
        Cause.CORRUPT_MODEL,
        re.compile(
            r"missing tensor|wrong number of tensors|not within the file bounds|"
            r"tensor .* data is not within|failed to read magic|invalid magic|"
            r"bad GGUF version|gguf_init_from_\w+: (failed to (read|seek)|duplicate)|"
            r"unexpectedly reached end of file",
            re.I,
        ),
        "the model file is corrupt, truncated or not the expected file: verify it with "
        "`orion-llamaccp verify` and re-download it (a wrong quant or an incompatible "
        "llama.cpp build gives the same message)",
    ),
    (
        Cause.UNKNOWN_FLAG,
        re.compile(r"invalid argument: \S+|unknown argument: \S+|error: unrecognized", re.I),
        "this llama-server build does not know a flag we passed: check the flag's current "
        "name in `llama-server --help`, then fix the profile knob or llamacpp.extra_args",
    ),
    (
        Cause.BAD_FLAG_VALUE,
        re.compile(r"error while handling (argument|environment variable)", re.I),
        "llama-server refused the value of a flag we passed: fix the profile knob or "
        "llamacpp.extra_args (`orion-llamaccp command` shows the command line)",
    ),
    (
        Cause.OUT_OF_MEMORY,
        re.compile(
            r"out of memory|cudaMalloc failed|failed to allocate .*buffer|"
            r"unable to allocate|not enough memory|std::bad_alloc",
            re.I,
        ),
        "out of memory loading the model: lower n_gpu_layers (LLAMACPP_N_GPU_LAYERS_OVERRIDE) "
        "or ctx_size (LLAMACPP_CTX_SIZE_OVERRIDE), or use a smaller quant",
    ),
    (
        Cause.PORT_IN_USE,
        re.compile(r"address already in use|couldn't bind|failed to bind|bind\(\) failed", re.I),
        "llama-server's port (or, where the line names a .sock path, the worker's UNIX "
        "socket beside it) is already taken: stop whatever listens there or set "
        "LLAMACPP_PORT_OVERRIDE (for the socket, ORION_LLAMACPP_ENGINE_UNIX_SOCKET=0)",
    ),
    (
        Cause.MODEL_NOT_FOUND,
        re.compile(r"failed to open .*gguf|No such file or directory", re.I),
        "llama-server cannot open the model file: check the path (`orion-llamaccp command`)",
    ),
]


# Every rule at once: most lines match none, and one search rules them all out.
_ANY = re.compile("|".join(f"(?:{pattern.pattern})" for _, pattern, _ in _RULES), re.I)


def diagnose(line: str) -> Diagnosis | None:
    """The first known fatal pattern in ``line``, or ``None``."""
    if not _ANY.search(line):
        return None
    for cause, pattern, advice in _RULES:
        if pattern.search(line):
            return Diagnosis(cause, line, advice)
    return None


def diagnose_all(lines: list[str]) -> Diagnosis | None:
    """The most specific diagnosis in a tail of output (corrupt beats a generic failure)."""
    return most_specific(*(diagnose(line) for line in lines))


def most_specific(*found: Diagnosis | None) -> Diagnosis | None:
    """The one whose cause comes first in ``Cause``; the first of those, on a tie."""
    order = list(Cause)
    return min(
        (d for d in found if d is not None), key=lambda d: order.index(d.cause), default=None
    )


# llama.cpp's warning when it has no GPU to put layers on (a CPU build, no driver, a pin
# to a GPU that is not there): it then serves on the CPU, many times slower.
_NO_GPU = re.compile(r"no usable GPU found", re.I)


def no_gpu(line: str, pinned: str) -> Diagnosis | None:
    """``line`` as the reason a profile that pins GPUs ``pinned`` is not served as asked."""
    if not _NO_GPU.search(line):
        return None
    return Diagnosis(
        Cause.NO_GPU,
        line,
        f"the profile runs layers on GPUs {pinned} (gpu.device_ids or "
        "CUDA_VISIBLE_DEVICES_OVERRIDE, n_gpu_layers) but llama-server found no usable GPU "
        "and would serve on the CPU: give the container its GPUs (compose's "
        "deploy.resources.reservations.devices, `docker run --gpus`), check the pin "
        "against the GPUs this host or job numbers, or use a llama-server build with GPU "
        "support; to serve on the CPU on purpose, set LLAMACPP_N_GPU_LAYERS_OVERRIDE=0",
    )


_SIGNAL_HINTS = {
    signal.SIGILL: "an instruction this CPU does not have: a build for another CPU; build "
    "it on this machine (`make llama-server`)",
    signal.SIGKILL: "not by us: most often the kernel's out-of-memory killer, which `dmesg` shows",
    signal.SIGBUS: "a model file changed or cut short under it while mapped, or a bad disk",
}


def exit_said(code: int) -> str:
    """How llama-server ended, in words: a negative code is the signal that killed it,
    which "exited with code -4" left the reader to decode."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        sig = signal.Signals(-code)
    except ValueError:
        return f"was killed by signal {-code}"
    hint = _SIGNAL_HINTS.get(sig)
    return f"was killed by {sig.name}" + (f" ({hint})" if hint else "")
