"""Run a script in a forked copy of a Python that has already imported torch: the tests' fast path.

Importing torch takes 3-4 s on the project's 2-core CPU, and the suite runs the three scripts
hundreds of times: most of its time went into importing torch again. A zygote is a Python started
once that imports torch (and numpy, tiktoken, safetensors), then waits. For each run it forks: the
child sets the run's environment, working directory, argv and output files, and executes the
script as `__main__` (runpy), exactly as `python SCRIPT ARGS` would from there; its exit status,
stdout and stderr come back as a `subprocess.CompletedProcess`. A child is a real process: its
own memory, its own exit status, killed on a timeout.

What a fresh interpreter reads only when it starts cannot be changed in a fork, so a run whose
environment differs from the zygote's in anything but the names in `PER_RUN` (the Hugging Face
cache, offline mode, minigpt2's own variables), or that asks for another launcher, runs as a
plain subprocess instead (`eligible`). So do the tests of what happens while Python starts
(Ctrl-C during the imports, closed or narrow streams), which call subprocess themselves.
MINIGPT2_TEST_ZYGOTE=0 turns the zygote off.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Environment variables a run may set or change and still use the zygote: none of them is read
# by what the zygote imported (torch, numpy, tiktoken, safetensors) when it was imported.
PER_RUN = re.compile(r"(HF_|HUGGINGFACE_|MINIGPT2_|TIKTOKEN_|TMPDIR$|HOME$)")
ENCODING = "utf-8"  # PYTHONIOENCODING of every run the zygote takes (tests/clis.py's offline_env)

SERVER = r"""
import json, os, sys
sys.path.pop(0)  # this -c program's '' entry: a script's run puts its own folder first
import numpy, safetensors.torch, tiktoken, torch  # noqa: F401  (the slow imports, once)

def child(req):
    import atexit, io, runpy, signal, threading, traceback
    os.setpgid(0, 0)  # its own process group: a timeout kills it and whatever it started
    fd_in = os.open(os.devnull, os.O_RDONLY)
    fd_out = os.open(req["stdout"], os.O_WRONLY | os.O_TRUNC)
    fd_err = os.open(req["stderr"], os.O_WRONLY | os.O_TRUNC)
    for fd, target in ((fd_in, 0), (fd_out, 1), (fd_err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    enc = req["encoding"]
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding=enc)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=enc)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=enc,
                                                   errors="backslashreplace", line_buffering=True)
    script = req["argv"][0]
    sys.argv = list(req["argv"])
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # as the interpreter does at exit: join the non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code < 0:  # died of a signal, as an uncaught KeyboardInterrupt does
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)

out = sys.stdout
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            child(req)
        finally:
            os._exit(70)
    out.write(json.dumps({"pid": pid}) + "\n")
    out.flush()
    _, status = os.waitpid(pid, 0)
    out.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
    out.flush()
"""


class Zygote:
    """One pre-started Python, one run at a time."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.env = dict(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            cwd=cwd,
            env=self.env,
        )
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)  # the zygote ended

    def _reply(self, timeout: float | None) -> dict:
        reply = self.replies.get(timeout=timeout)
        if reply is None:
            raise RuntimeError("the test zygote ended unexpectedly")
        return reply

    def run(self, argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="zygote-") as tmp:
            stdout, stderr = Path(tmp, "stdout"), Path(tmp, "stderr")
            stdout.touch()
            stderr.touch()
            request = {"argv": argv[1:], "env": env, "cwd": str(cwd), "stdout": str(stdout), "stderr": str(stderr),
                       "encoding": ENCODING}  # fmt: skip
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = self._reply(60)["pid"]
            try:
                returncode = self._reply(timeout)["returncode"]
            except queue.Empty:
                os.killpg(pid, 9)
                self._reply(60)
                raise subprocess.TimeoutExpired(argv, timeout, stdout.read_bytes(), stderr.read_bytes()) from None
            read = lambda p: p.read_bytes().decode(ENCODING, errors="replace")  # noqa: E731
            return subprocess.CompletedProcess(argv, returncode, read(stdout), read(stderr))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Pool:
    """Zygotes started on first use, as many as runs at once (a thread each)."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.idle: list[Zygote] = []
        self.all: list[Zygote] = []
        self.lock = threading.Lock()

    def eligible(self, env: dict[str, str]) -> bool:
        if os.environ.get("MINIGPT2_TEST_ZYGOTE", "1") == "0" or env.get("PYTHONIOENCODING", ENCODING) != ENCODING:
            return False
        base = {**os.environ, "PYTHONIOENCODING": ENCODING}
        changed = {k for k in base.keys() | env.keys() if base.get(k) != env.get(k)}
        return all(PER_RUN.match(k) for k in changed)

    def run(self, argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        with self.lock:
            zygote = self.idle.pop() if self.idle else None
        if zygote is None:
            zygote = Zygote(self.cwd, {**os.environ, "PYTHONIOENCODING": ENCODING})
            with self.lock:
                self.all.append(zygote)
        try:
            return zygote.run(argv, env=env, cwd=cwd, timeout=timeout)
        finally:
            with self.lock:
                self.idle.append(zygote)

    def close(self) -> None:
        for zygote in self.all:
            zygote.close()
