"""Running the repository's scripts (train.py, sample.py, compare.py) as a user runs them.

Each runs as a subprocess of this Python from the repository root, offline (HF_HUB_OFFLINE=1),
with its output written and read as UTF-8; arguments are passed through str().
"""

import atexit
import os
import subprocess
import sys
from pathlib import Path

from zygote import Pool

ROOT = Path(__file__).resolve().parents[1]


def offline_env(hf_home=None, **extra: str) -> dict[str, str]:
    """This process's environment with downloads off and UTF-8 output; HF_HOME=`hf_home` if given, then `extra`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    return {**env, **extra}


def script_command(script: str, *args, launcher=None) -> list[str]:
    """`launcher` (by default this Python) running ROOT/`script` with `args`."""
    return [*(launcher or [sys.executable]), str(ROOT / script), *map(str, args)]


_pool = Pool(ROOT)
atexit.register(_pool.close)
prestart_zygote = _pool.prestart  # conftest starts it once the tests are collected
zygote_python = _pool.python_program  # for a program that starts python itself (a shell script)


def run_script(script: str, *args, timeout: float, env=None, launcher=None) -> subprocess.CompletedProcess:
    """Run `script` to its end (env: `offline_env()` unless given), its stdout and stderr captured.

    It runs in a fork of a Python that has imported torch already (tests/zygote.py) where it can:
    the same script, arguments, environment and folder, without 3-4 s of importing torch again."""
    env = offline_env() if env is None else env
    command = script_command(script, *args, launcher=launcher)
    if _pool.eligible(command, env):
        return _pool.run(command, env=env, cwd=ROOT, timeout=timeout)
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def start_script(script: str, *args, env=None, launcher=None, fresh: bool = False):
    """Start `script` as `run_script` would and return at once.

    In the zygote where it can (tests/zygote.py): a `ZygoteProcess`, which has what the tests use
    of a `subprocess.Popen` (pid, poll, wait, communicate, signals) but no pipes. `fresh`: a new
    interpreter with stdout and stderr piped, for a test of Python's start (a signal during the
    imports) or one that reads the output while the run goes on. `script` may be a path outside
    the repository (a test's own program)."""
    env = offline_env() if env is None else env
    command = script_command(script, *args, launcher=launcher)
    if not fresh and _pool.eligible(command, env):
        return _pool.start(command, env=env, cwd=ROOT)
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=ROOT,
    )


def assert_clean_error(result, *needles, alone: bool = True):
    """A script that failed the way every bad input must: non-zero, no traceback, an `error:` line
    naming each of `needles`; with `alone`, that line is all of stderr (else output may precede it:
    a sample's header)."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    if alone:
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    else:
        assert "error:" in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
