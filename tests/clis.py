"""Running the repository's scripts (train.py, sample.py, compare.py) as a user runs them.

Each runs from the repository root, offline (HF_HUB_OFFLINE=1), with its output read as text;
arguments are passed through str(). `run_script` calls the script's `main(argv)` in this process
where nothing but the process boundary could tell the difference (`call_main`), else runs it in a
fork of a Python that imported torch already (tests/zygote.py), else as a plain subprocess.
"""

import atexit
import contextlib
import importlib.util
import io
import os
import random
import re
import signal
import subprocess
import sys
import threading
import traceback
import warnings
from pathlib import Path

from zygote import Pool

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "sample.py", "compare.py")

# Environment variables a run in this process may set or change: each is read when a script calls
# for it (the token cache, HF_HOME's folders: see `_hub_home`), never only when a Python starts.
# Anything else (OMP_NUM_THREADS, a locale, CXX, inductor's folders, torchrun's ranks) sends the run
# to a fork or a fresh interpreter.
IN_PROCESS_ENV = re.compile(r"(HF_HOME|MINIGPT2_CACHE|XDG_CACHE_HOME|PYTEST_CURRENT_TEST)$")


def offline_env(hf_home=None, **extra: str) -> dict[str, str]:
    """This process's environment with downloads off and UTF-8 output; HF_HOME=`hf_home` if given, then `extra`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    return {**env, **extra}


def script_command(script: str, *args, launcher=None) -> list[str]:
    """`launcher` (by default this Python) running ROOT/`script` with `args`."""
    return [*(launcher or [sys.executable]), str(ROOT / script), *map(str, args)]


def in_process(script: str, args, env: dict[str, str], launcher=None) -> bool:
    """Can `call_main` run it? One of the three scripts, no launcher, on the main thread (signal handlers
    are set there only, and one run at a time), downloads off, UTF-8 output (the captured text is what
    a UTF-8 stream would carry), no `--compile` (torch.compile's caches would carry over from run to run)
    and no other change to the environment than `IN_PROCESS_ENV`'s names. MINIGPT2_TEST_IN_PROCESS=0:
    never (every run in a fork or a fresh interpreter, as before)."""
    if os.environ.get("MINIGPT2_TEST_IN_PROCESS", "1") == "0":
        return False
    if launcher is not None or script not in SCRIPTS or "--compile" in map(str, args):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    if env.get("HF_HUB_OFFLINE") != "1" or env.get("PYTHONIOENCODING", "utf-8").lower() not in ("utf-8", "utf8"):
        return False
    changed = {k for k in env.keys() | os.environ.keys() if env.get(k) != os.environ.get(k)}
    return all(IN_PROCESS_ENV.match(k) for k in changed - {"HF_HUB_OFFLINE", "PYTHONIOENCODING"})


_modules: dict[str, object] = {}


def _script_module(script: str):
    """ROOT/`script` imported as a module (not as __main__: its start_script() is for a fresh process)."""
    if script not in _modules:
        name = "minigpt2_script_" + Path(script).stem
        spec = importlib.util.spec_from_file_location(name, ROOT / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[script] = module
    return _modules[script]


@contextlib.contextmanager
def _hub_home(hf_home: str | None):
    """huggingface_hub reads HF_HOME once, at import: its cache folders follow `hf_home` for the call."""
    from huggingface_hub import constants

    old = constants.HF_HOME
    moved = {}
    if hf_home is not None and os.path.abspath(hf_home) != os.path.abspath(old):
        for name, value in vars(constants).items():
            if name.isupper() and isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
                moved[name] = value
        for name, value in moved.items():
            setattr(constants, name, str(hf_home) + value[len(old) :])
    try:
        yield
    finally:
        for name, value in moved.items():
            setattr(constants, name, value)


@contextlib.contextmanager
def _as_a_run(argv0: str, env: dict[str, str], cwd: Path):
    """What a script may change in the process it runs in, put back after: the environment, the
    folder, sys.argv and the standard streams, signal handlers, warning filters, torch's thread count
    and the random generators' states."""
    import numpy
    import torch

    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    threads = torch.get_num_threads()
    states = torch.random.get_rng_state(), random.getstate(), numpy.random.get_state()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [argv0]
    try:
        with warnings.catch_warnings(), _hub_home(env.get("HF_HOME")):
            # as a fresh interpreter has them (pytest's own filters and its recording are for the tests)
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
            warnings.showwarning = _show_warning
            yield
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved_streams
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
        torch.random.set_rng_state(states[0])
        random.setstate(states[1])
        numpy.random.set_state(states[2])


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Python's own way of printing a warning, to the stderr of the moment (the run's)."""
    (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


def call_main(script: str, *args, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    """`main(argv)` of ROOT/`script`, called in this process with stdin empty and stdout and stderr
    captured, as `python SCRIPT ARGS` would run in `env` (default `offline_env()`) and `cwd`: its exit
    status is main's return value or SystemExit's code; an exception main lets out prints its traceback
    and is status 1 (KeyboardInterrupt: -SIGINT, as a Python killed by it). Only on the main thread."""
    env = offline_env() if env is None else env
    argv = [str(a) for a in args]
    main = _script_module(script).main
    out, err = io.StringIO(), io.StringIO()
    with _as_a_run(str(ROOT / script), env, cwd):
        sys.stdin, sys.stdout, sys.stderr = io.StringIO(), out, err
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
            if code is not None and not isinstance(code, int):
                print(code, file=err)
                code = 1
        except KeyboardInterrupt:
            traceback.print_exc(file=err)
            code = -signal.SIGINT
        except Exception:
            traceback.print_exc(file=err)
            code = 1
    return subprocess.CompletedProcess(
        [sys.executable, str(ROOT / script), *argv], code or 0, out.getvalue(), err.getvalue()
    )


_pool = Pool(ROOT)
atexit.register(_pool.close)
prestart_zygote = _pool.prestart  # conftest starts it once the tests are collected
zygote_python = _pool.python_program  # for a program that starts python itself (a shell script)


def run_script(script: str, *args, timeout: float, env=None, launcher=None) -> subprocess.CompletedProcess:
    """Run `script` to its end (env: `offline_env()` unless given), its stdout and stderr captured.

    In this process where it can (`in_process`, `call_main`); else in a fork of a Python that has
    imported torch already (tests/zygote.py): the same script, arguments, environment and folder,
    without 3-4 s of importing torch again; else as a fresh interpreter. `timeout` bounds the last two."""
    env = offline_env() if env is None else env
    if in_process(script, args, env, launcher):
        return call_main(script, *args, env=env)
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
