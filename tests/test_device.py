"""--dtype auto on the CPU: bfloat16 autocast for training only where the CPU computes it natively."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minigpt2 import MiniGPT2Error
from minigpt2.device import (
    BusyCores,
    auto_dtype,
    cpu_bf16_native,
    machine_load,
    resolve_dtype,
    threads_for_decoding,
)

CPU = torch.device("cpu")


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="the CPU's flags are read from Linux's /proc/cpuinfo")
def test_native_bfloat16_follows_the_cpu_flags():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    native = cpu_bf16_native()
    assert (native is not None) == bool(flags & {"avx512_bf16", "amx_bf16"}), native
    assert native in (None, "AMX", "AVX-512 BF16")


def test_auto_trains_in_bfloat16_only_where_it_is_native():
    native = cpu_bf16_native()
    dtype, why = auto_dtype(CPU, training=True)
    assert dtype == (torch.bfloat16 if native else torch.float32)
    assert (native or "no native bfloat16") in why  # the start line says why
    assert resolve_dtype("auto", CPU, training=True) == dtype and resolve_dtype(None, CPU, training=True) == dtype
    # sampling on the CPU stays float32 either way; an explicit choice is always kept
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16 and resolve_dtype("float32", CPU, training=True) == (
        torch.float32
    )
    with pytest.raises(MiniGPT2Error, match="float16 needs a GPU"):
        resolve_dtype("float16", CPU, training=True)


@pytest.mark.skipif(not hasattr(os, "getloadavg"), reason="no load average on this system")
def test_machine_load_is_the_load_average_and_the_cores():
    load, cores = machine_load()
    assert load >= 0 and cores == os.cpu_count()


def test_decoding_threads_are_the_cores_other_work_leaves_free():
    cores = os.cpu_count()
    for available in (1, 2, 64):
        assert threads_for_decoding(available, busy=None) == available  # nothing known: every core
        assert threads_for_decoding(available, busy=0.0) == min(available, cores)  # a quiet machine
        assert threads_for_decoding(available, busy=float(cores)) == 1  # every core busy: at least one
        assert threads_for_decoding(available, busy=cores + 3.0) == 1
    assert threads_for_decoding(64, busy=cores - 1.0) == 1
    assert threads_for_decoding(64, busy=0.4) == max(1, round(cores - 0.4))


@pytest.mark.skipif(not Path("/proc/stat").is_file() or (os.cpu_count() or 1) < 2, reason="Linux, 2 cores or more")
def test_busy_cores_counts_other_processes_and_not_this_one():
    """A process spinning beside this one reads as about one busy core; this process's own work
    (here: spinning too, as sample.py loads its models) is not counted. The load average counted
    both, and a minute late."""
    spin = "import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end: pass"
    other = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.2)  # it has started
        watch = BusyCores()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # this process busy too
            pass
        busy = watch.others()
    finally:
        other.kill()
        other.wait()
    assert 0.6 < busy < 1.6, busy  # the other one, not this one as well (that would read ~2)
