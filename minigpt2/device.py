"""Choosing where the model runs and in what precision."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from minigpt2.errors import MiniGPT2Error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; a named device must be available."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MiniGPT2Error(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MiniGPT2Error(f"device {name!r} asked for, but this PyTorch sees no CUDA GPU; use `device=cpu` or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MiniGPT2Error(
            f"device {name!r} asked for, but Apple's MPS is not available here; use `device=cpu` or auto"
        )
    return device


def cpu_bf16_native() -> str | None:
    """What lets this CPU compute bfloat16 natively ("AMX" or "AVX-512 BF16"), or None.

    Without one of them (AVX2 or plain AVX-512 CPUs: most laptops), bfloat16 matrix products are
    emulated by converting to float32 and back, which costs more than it saves.
    """
    cpu = getattr(torch, "cpu", None)
    checks = (
        ("AMX", "_is_amx_tile_supported", "amx_bf16"),
        ("AVX-512 BF16", "_is_avx512_bf16_supported", "avx512_bf16"),
    )
    flags = None
    for name, check, flag in checks:
        if hasattr(cpu, check):
            if getattr(cpu, check)():
                return name
            continue
        if flags is None:  # an older PyTorch: the kernel's own list of the CPU's features
            try:
                flags = Path("/proc/cpuinfo").read_text().split()
            except OSError:
                flags = []
        if flag in flags:
            return name
    return None


def auto_dtype(device: torch.device, training: bool = False) -> tuple[torch.dtype, str]:
    """What `--dtype auto` means on `device`, and why (for the start line).

    bfloat16 on a GPU that has it, float16 on older GPUs, float32 on Apple's MPS. On the CPU,
    training uses bfloat16 autocast only where the CPU computes it natively: on a 2-core AMD EPYC
    with AVX-512 BF16, a step of GPT-2 (124M, 4 x 128 tokens) ran 1.9x faster than in float32; on
    an AVX2-only one, where bfloat16 is emulated, a cut-down step ran at 0.06x (16 times slower).
    The two learned the same (docs/speed.md). Sampling on the CPU stays float32 (unmeasured there).
    """
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "this GPU computes bfloat16"
        return torch.float16, "this GPU has no bfloat16 (float16, with loss scaling)"
    if device.type != "cpu":
        return torch.float32, f"the default on {device.type}"
    native = cpu_bf16_native()
    if training and native:
        return torch.bfloat16, f"this CPU computes bfloat16 natively ({native}): faster than float32"
    if training:
        return torch.float32, "this CPU has no native bfloat16 (AVX-512 BF16 or AMX), where bfloat16 is slower"
    return torch.float32, "the default for sampling on a CPU"


def resolve_dtype(name: str | torch.dtype | None, device: torch.device, training: bool = False) -> torch.dtype:
    """The precision for `--dtype`, the one place that decides it (sampling and training alike).

    `auto` (or None): see `auto_dtype` (bfloat16 on a GPU that has it, float16 on older GPUs;
    on the CPU, bfloat16 for training where it is native, else float32). bfloat16 keeps float32's
    range, so nothing overflows; float16 does not, which is why training then scales the loss (see
    the trainer), and why it is refused on a CPU, where it is also slower than float32.
    """
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return auto_dtype(device, training)[0]
    if name not in DTYPES:
        raise MiniGPT2Error(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and name == "float16":
        raise MiniGPT2Error("float16 needs a GPU; on the CPU use float32 or bfloat16")
    return DTYPES[name]


def machine_load() -> tuple[float, int] | None:
    """(the 1-minute load average, the CPU cores) where the system reports them, else None.

    A load above the core count means that runnable processes wait for a core: a CPU job then runs
    slower than it would on a quiet machine, and multithreaded ones most (their threads wait for
    each other as well).
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no load average
        return None
    return load, os.cpu_count() or 1


class BusyCores:
    """How many cores other processes keep busy, measured while this process does its own work.

    Started before the models load and read just before decoding: over that window, the CPU time
    the whole machine spent (Linux's /proc/stat) minus this process's own, per second of the
    window. Unlike the load average it does not lag by a minute, and it does not count this
    process: sample.py's own start-up (about one core for some seconds) used to read as a busy
    machine, and a quiet 2-core machine decoded int8 with one thread at 0.72x of its speed with two
    (docs/speed.md). Where the system has no /proc/stat (macOS), the 1-minute load average
    stands in (it lags, and counts this process too); on Windows, which has neither, None.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float | None, float]:
        """(now, the machine's busy CPU seconds or None, this process's CPU seconds)."""
        try:
            with open("/proc/stat") as f:  # cpu user nice system idle iowait irq softirq steal ...
                fields = [int(x) for x in f.readline().split()[1:]]
            machine = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # idle, iowait: not busy
        except (OSError, ValueError, IndexError, AttributeError):
            machine = None
        own = os.times()
        return time.monotonic(), machine, own.user + own.system

    def others(self, window: float = 0.2) -> float | None:
        """The cores other processes kept busy since the start (0 on a quiet machine), or None.

        Measured over `window` seconds at least (waiting out the rest: the kernel counts CPU time
        in ticks of 10 ms, too coarse for a shorter window)."""
        then, machine_then, own_then = self.start
        if machine_then is None:  # no /proc/stat
            load = machine_load()
            return None if load is None else load[0]
        time.sleep(max(0.0, then + window - time.monotonic()))
        now, machine, own = self._sample()
        if machine is None:
            return None
        return max(0.0, (machine - machine_then - (own - own_then)) / (now - then))


def threads_for_decoding(available: int | None = None, busy: float | None = None) -> int:
    """How many threads decoding should use: the cores that other work leaves free, at least one.

    Decoding runs ~50 small matrix products per token, each split over the threads, which wait
    for each other at its end. On a quiet machine every core helps. When other work holds the
    cores (a training run beside it: this project's own workflow), a thread that has to wait
    for a core stalls every product, and fewer threads are faster: on our 2-core test machine,
    with a 124M training run beside it, one thread decoded faster than two (docs/speed.md).
    `available`: the cores this process may use (default: its CPU affinity). `busy`: the cores
    other processes keep busy (`BusyCores.others()`); None (not known): every available core.
    """
    if available is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if busy is None:
        return available
    return max(1, min(available, round((os.cpu_count() or 1) - busy)))
