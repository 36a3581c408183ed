"""Run a script in a forked copy of a Python that has already imported torch: the tests' fast path.

Importing torch takes 3-4 s on the project's 2-core CPU, and the suite runs the three scripts
hundreds of times: most of its time went into importing torch again. A zygote is a Python started
once that imports torch (and numpy, tiktoken, safetensors, and torch._dynamo, which torch imports
when the first optimizer is built: another 2 s of every training run), then waits. For each run it forks: the
child sets the run's environment, working directory, argv and output files, and executes the
script as `__main__` (runpy), exactly as `python SCRIPT ARGS` would from there; its exit status,
stdout and stderr come back as a `subprocess.CompletedProcess`, or, for a run the test starts
and then watches, signals or kills, as a `ZygoteProcess` (a `subprocess.Popen` without pipes).
Runs go side by side, each in its own fork. A child is a real process: its own pid, memory,
signals and exit status, killed on a timeout.

What a fresh interpreter reads only when it starts cannot be changed in a fork, so a run whose
environment differs from the zygote's in anything but the names in `PER_RUN` (the Hugging Face
cache, offline mode, minigpt2's own variables), or that asks for another launcher, runs as a
plain subprocess instead (`eligible`). So do the tests of what happens while Python starts
(Ctrl-C during the imports, closed or narrow streams) and those that read a run's output while
it goes on (`start_script(..., fresh=True)`, or subprocess itself).
MINIGPT2_TEST_ZYGOTE=0 turns the zygote off.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Environment variables a run may set or change and still use the zygote: none of them is read
# by what the zygote imported (torch and torch._dynamo, numpy, tiktoken, safetensors) when it was imported.
PER_RUN = re.compile(r"(HF_|HUGGINGFACE_|MINIGPT2_|TIKTOKEN_|TMPDIR$|HOME$)")
ENCODING = "utf-8"  # PYTHONIOENCODING of every run the zygote takes (tests/clis.py's offline_env)

SERVER = r"""
import json, os, select, sys
sys.path.pop(0)  # this -c program's '' entry: a script's run puts its own folder first
import numpy, safetensors.torch, tiktoken, torch  # noqa: F401  (the slow imports, once)
import torch._dynamo  # noqa: F401  (what building a torch optimizer imports: 2 s of every training run)

def reply(message):
    os.write(1, (json.dumps(message) + "\n").encode())


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

children = {}  # pid -> the request's id
pending = b""
while True:  # requests come in on stdin, one JSON line each; replies go out on stdout
    ready, _, _ = select.select([0], [], [], 0.02 if children else None)
    if ready:
        data = os.read(0, 1 << 16)
        if not data:  # the tests ended
            break
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                try:
                    child(req)
                finally:
                    os._exit(70)
            children[pid] = req["id"]
            reply({"id": req["id"], "pid": pid})
    while children:  # reap every child that ended
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        reply({"id": children.pop(pid), "returncode": os.waitstatus_to_exitcode(status)})
"""


class ZygoteProcess:
    """A run in the zygote, as much of `subprocess.Popen` as the tests use: `args`, `pid`,
    `returncode`, `poll`, `wait`, `communicate`, `send_signal`, `terminate` and `kill`. Its stdout and
    stderr go to files, read once it has ended: a test that reads them while the run goes on starts
    a plain subprocess instead (`start_script(..., fresh=True)`)."""

    stdout = stderr = None  # no pipes: see above

    def __init__(self, args: list[str], pid: int, replies: queue.Queue, folder: tempfile.TemporaryDirectory) -> None:
        self.args, self.pid, self.returncode = args, pid, None
        self._replies, self._folder, self._output = replies, folder, None

    def _ended(self, reply: dict | None) -> int:
        if reply is None:
            raise RuntimeError("the test zygote ended unexpectedly")
        self.returncode = reply["returncode"]
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self._ended(self._replies.get_nowait())
            except queue.Empty:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self._ended(self._replies.get(timeout=timeout))
            except queue.Empty:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        if self._output is None:
            read = lambda name: Path(self._folder.name, name).read_bytes().decode(ENCODING, errors="replace")  # noqa: E731
            self._output = (read("stdout"), read("stderr"))
            self._folder.cleanup()
        return self._output

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it ended a moment ago
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """One pre-started Python; any number of runs at once, each in its own fork."""

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
        self.lock = threading.Lock()
        self.replies: dict[int, queue.Queue] = {}
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            reply = json.loads(line)
            with self.lock:
                self.replies[reply["id"]].put(reply)
        with self.lock:  # the zygote ended: every run still waiting hears it
            for replies in self.replies.values():
                replies.put(None)

    def start(self, argv: list[str], *, env: dict[str, str], cwd: Path) -> ZygoteProcess:
        folder = tempfile.TemporaryDirectory(prefix="zygote-")
        for name in ("stdout", "stderr"):
            Path(folder.name, name).touch()
        with self.lock:
            rid, self.next_id = self.next_id, self.next_id + 1
            replies = self.replies[rid] = queue.Queue()
            out, err = (str(Path(folder.name, name)) for name in ("stdout", "stderr"))
            request = {"id": rid, "argv": argv[1:], "env": env, "cwd": str(cwd), "encoding": ENCODING, "stdout": out,
                       "stderr": err}  # fmt: skip
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        reply = replies.get(timeout=60)
        if reply is None:
            raise RuntimeError("the test zygote ended unexpectedly")
        return ZygoteProcess(argv, reply["pid"], replies, folder)

    def run(self, argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        proc = self.start(argv, env=env, cwd=cwd)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and whatever it started
            stdout, stderr = proc.communicate(timeout=60)
            raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr) from None
        return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Pool:
    """The zygote, started on first use (a run whose environment it cannot take runs as a plain subprocess)."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.zygote: Zygote | None = None
        self.lock = threading.Lock()

    def eligible(self, env: dict[str, str]) -> bool:
        if os.environ.get("MINIGPT2_TEST_ZYGOTE", "1") == "0" or env.get("PYTHONIOENCODING", ENCODING) != ENCODING:
            return False
        base = {**os.environ, "PYTHONIOENCODING": ENCODING}
        changed = {k for k in base.keys() | env.keys() if base.get(k) != env.get(k)}
        return all(PER_RUN.match(k) for k in changed)

    def _zygote(self) -> Zygote:
        with self.lock:
            if self.zygote is None:
                self.zygote = Zygote(self.cwd, {**os.environ, "PYTHONIOENCODING": ENCODING})
            return self.zygote

    def start(self, argv: list[str], *, env: dict[str, str], cwd: Path) -> ZygoteProcess:
        return self._zygote().start(argv, env=env, cwd=cwd)

    def run(self, argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        return self._zygote().run(argv, env=env, cwd=cwd, timeout=timeout)

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.close()
