"""Run a script in a forked copy of a Python that has already imported torch.

The tests call the scripts' `main(argv)` in their own process where they can (tests/clis.py:
call_main); this is for the runs that need a process of their own (signals, kills, several runs
side by side, torchrun and its ranks, launchers, benchmark workers) without the 3-4 s a fresh
interpreter spends importing torch again on the project's 2-core CPU. A zygote is a Python started
once that imports torch (and numpy, tiktoken, safetensors, and torch._dynamo, which torch imports
when the first optimizer is built: another 2 s of every training run), then waits. For each run it
forks: the child sets the run's signals, environment, working directory, standard streams, argv and
sys.path, leaves the zygote's loop for its program's top level and runs the script there as
`__main__` (runpy.run_path, or runpy.run_module for -m), so that whatever the script does not catch
ends the child as it ends a fresh interpreter, and Python's own shutdown joins its threads and calls
its exit functions. Public APIs only: nothing of subprocess, atexit, threading or runpy is replaced.
Its exit status, stdout and stderr come back as a `subprocess.CompletedProcess`, or, for a run the
test starts and then watches, signals or kills, as a `ZygoteProcess` (a `subprocess.Popen` without
pipes). A child is a real process: its own pid, memory, signals and exit status, killed on a timeout.

A Python the run starts (torchrun's ranks, a benchmark's workers) starts the run's `sys.executable`,
which is the zygote's stand-in python (PROGRAM): it hands the command to the zygote, which forks it
too where `python_args` allows, and runs the real interpreter otherwise. What a fresh interpreter
reads only when it starts cannot be changed in a fork, so a run whose environment differs from the
zygote's in anything but the names in `PER_RUN`, or that asks for another launcher, runs as a plain
subprocess instead (`eligible`). So do the tests of what happens while Python starts (Ctrl-C during
the imports, closed or narrow streams) and those that read a run's output while it goes on
(`start_script(..., fresh=True)`, or subprocess itself). MINIGPT2_TEST_ZYGOTE=0 turns it off.
"""

from __future__ import annotations

import inspect
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Environment variables a run may set or change and still use the zygote: none of them is read
# by what the zygote imported (torch and torch._dynamo, numpy, tiktoken, safetensors) when it was
# imported, or the run does what the fresh interpreter would have done with it (the standard
# streams' encoding and buffering, PYTHONPATH's folders, OMP_NUM_THREADS's torch.set_num_threads).
# The Hugging Face cache and offline mode, minigpt2's own variables, pytest's name of the test, what
# torchrun gives its ranks, what a shell sets (_, SHLVL, PWD), PATH (read when a run starts a program,
# and a fork's os.environ is the run's) and gpu.sh's own (PYTHON, GPU_RESULTS),
# and inductor's own (torch._dynamo's import sets its cache folder, and compiling sets private ones,
# in the tests' process too; inductor reads them when it compiles or loads what it compiled).
PER_RUN = re.compile(
    r"(HF_|HUGGINGFACE_|MINIGPT2_|TIKTOKEN_|TORCHELASTIC_|TMPDIR$|HOME$|PYTEST_CURRENT_TEST$|PYTHONIOENCODING$|PYTHONPATH$"
    r"|PYTHONUNBUFFERED$|OMP_NUM_THREADS$|(LOCAL_|GROUP_|ROLE_)?RANK$|(LOCAL_|GROUP_|ROLE_)?WORLD_SIZE$|ROLE_NAME$"
    r"|MASTER_ADDR$|MASTER_PORT$|TORCH_NCCL_ASYNC_ERROR_HANDLING$|TORCHINDUCTOR_CACHE_DIR$|_TORCHINDUCTOR_"
    r"|PYTHON$|GPU_RESULTS$|_$|SHLVL$|PWD$|OLDPWD$|PATH$)"
)


def python_args(argv, env, python, base_env):
    """argv's arguments after the interpreter if `argv` runs `python` on a script or a module
    (`[-u] SCRIPT ...` or `[-u] -m MODULE ...`) in an environment that differs from `base_env` (the
    zygote's when it started) only in `PER_RUN`'s names; else None. The one rule for both sides: the
    tests' process asks it before sending a run to the zygote, and the zygote (SERVER, which starts
    with this function's source) before forking a command one of its runs starts."""
    import os
    import shutil

    if not argv:
        return None
    program = argv[0] if os.sep in argv[0] else shutil.which(argv[0]) or argv[0]
    if os.path.realpath(program) != os.path.realpath(python):
        return None
    rest = list(argv[1:])
    while rest[:1] == ["-u"]:
        rest.pop(0)
    if not rest or (rest[0].startswith("-") and rest[0] != "-m") or rest == ["-m"]:
        return None
    changed = {k for k in base_env.keys() | env.keys() if base_env.get(k) != env.get(k)}
    if not all(PER_RUN.match(k) for k in changed):
        return None
    return list(argv[1:])


ENCODING = "utf-8"  # how the tests read a run's output (tests/clis.py's offline_env sets PYTHONIOENCODING so)

SERVER_BODY = r"""
import json, os, re, select, socket, sys
sys.path.pop(0)  # this -c program's '' entry: a run puts its own script's folder (or its cwd, for -m) first
listener = socket.socket(fileno=int(sys.argv[2]))  # the stand-in python's requests (PROGRAM), listening
STANDIN = sys.argv[4]  # the stand-in python itself: a run's sys.executable (see become)
BASE_ENV = dict(os.environ)  # what the imports below saw
import numpy, safetensors.torch, tiktoken, torch  # noqa: F401  (the slow imports, once)
import torch._dynamo  # noqa: F401  (what building a torch optimizer imports: 2 s of every training run)

PER_RUN = re.compile(sys.argv[1])
# Each run imports minigpt2 and its script's other modules itself, as a fresh interpreter would. Where
# PYTHONDONTWRITEBYTECODE is set (as on the project's machines), Python compiles every one of them
# again in every run: ~0.2 s a run, hundreds of runs. The runs keep their compiled modules here instead,
# in the zygote's own folder (nothing is written beside the sources); Python checks each against its source.
sys.pycache_prefix = sys.argv[3]
sys.dont_write_bytecode = False
BASE_PATH = list(sys.path)
BASE_THREADS = torch.get_num_threads()  # what a fresh interpreter would choose without OMP_NUM_THREADS
PYTHON = os.path.realpath(sys.executable)


def reply(message):
    os.write(1, (json.dumps(message) + "\n").encode())


def python_path(env):
    '''sys.path after its first entry, as a fresh interpreter builds it: PYTHONPATH's folders, then the rest.'''
    given = lambda e: [os.path.abspath(p) for p in e.get("PYTHONPATH", "").split(os.pathsep) if p]  # noqa: E731
    ours = set(given(BASE_ENV))
    return [*given(env), *(p for p in BASE_PATH if p not in ours)]


KEPT = []  # the zygote's own stream objects a run replaced: they own fds 0-2 and close them if collected


def stream(old, fd, encoding, errors, line_buffering, write_through):
    '''The run's text stream on `fd`: the zygote's own (`old`, now on the run's fd) where its encoding and
    error handler are the run's (changing them would seek on a stream that was a file when it was made),
    else a new one.'''
    import codecs, io
    if codecs.lookup(old.encoding).name == codecs.lookup(encoding).name and old.errors == errors:
        if fd:
            old.reconfigure(line_buffering=line_buffering, write_through=write_through)
        return old
    KEPT.append(old)
    raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
    buffered = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
    return io.TextIOWrapper(buffered, encoding=encoding, errors=errors, line_buffering=line_buffering,
                            write_through=write_through and fd != 0)


def become(argv, env, cwd):
    '''Make this fork what `python ARGV` (argv: [-u] SCRIPT ARGS or [-u] -m MODULE ARGS) is as it starts,
    in the environment `env` and folder `cwd`, on the standard streams already at fds 0, 1, 2; return
    ARGV without its -u options. Public APIs only: signals, environment, folder, the streams' settings.'''
    import signal
    for sig in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}:  # signals as Python starts them
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    unbuffered = False
    while argv[:1] == ["-u"]:
        argv, unbuffered = argv[1:], True
    unbuffered = unbuffered or bool(env.get("PYTHONUNBUFFERED"))
    encoding, _, errors = env.get("PYTHONIOENCODING", "utf-8").partition(":")
    encoding = encoding or "utf-8"
    sys.stdin = sys.__stdin__ = stream(sys.stdin, 0, encoding, errors or "strict", False, False)
    sys.stdout = sys.__stdout__ = stream(sys.stdout, 1, encoding, errors or "strict", unbuffered or os.isatty(1),
                                         unbuffered)
    sys.stderr = sys.__stderr__ = stream(sys.stderr, 2, encoding, "backslashreplace", True, unbuffered)
    # OMP_NUM_THREADS is read when torch loads, long gone in a fork: set what it would have chosen
    threads = env.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else BASE_THREADS)
    # the Python this run starts (torchrun's ranks, a benchmark's workers) comes back here, through
    # the stand-in, where python_args allows it; anything else it hands to the real interpreter
    sys.executable = STANDIN
    if argv[0] == "-m":
        sys.argv = argv[1:]
        sys.path[:] = [os.getcwd(), *python_path(env)]
    else:
        sys.argv = list(argv)
        sys.path[:] = [os.path.dirname(os.path.abspath(argv[0])), *python_path(env)]
    return argv


def streams(fds):
    '''The fork's fds 0, 1, 2 become `fds` (closed after).'''
    for fd, target in zip(fds, (0, 1, 2)):
        os.dup2(fd, target)
    for fd in fds:
        os.close(fd)


def client_request(conn):
    '''A request from the stand-in `python` (PROGRAM): its command, environment and folder, and its
    standard streams (passed as file descriptors). None if refused (it runs python itself), else
    (argv, env, cwd, fds).'''
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            break
        data += more
    req = json.loads(data)
    argv = python_args([PYTHON, *req["argv"]], req["env"], PYTHON, BASE_ENV) if len(fds) == 3 else None
    if argv is None:
        for fd in fds:
            os.close(fd)
        conn.sendall(b'{"refused": true}\n')
        conn.close()
        return None
    return argv, req["env"], req["cwd"], fds


def serve():
    '''Fork a child for each run asked for, on stdin (the tests, one JSON line each; replies go out on
    stdout) or on the listening socket (the stand-in python), and say how each ended. Returns only in a
    fork: (argv, env, cwd) of the run it is to be, its streams in place and the zygote's sockets closed.'''
    children = {}  # pid -> the request's id (a run the tests asked for on stdin)
    clients = {}  # pid -> the connection of the stand-in python that asked for it
    pending = b""
    while True:
        ready, _, _ = select.select([0, listener], [], [], 0.02 if children or clients else None)
        if listener in ready:
            conn, _ = listener.accept()
            try:
                asked = client_request(conn)
            except (OSError, ValueError):
                conn.close()
                asked = None
            if asked is not None:
                argv, env, cwd, fds = asked
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    for other in (*clients.values(), conn):
                        other.close()
                    streams(fds)
                    return argv, env, cwd
                for fd in fds:
                    os.close(fd)
                conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
                clients[pid] = conn
        if 0 in ready:
            data = os.read(0, 1 << 16)
            if not data:  # the tests ended
                sys.exit(0)
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    for other in clients.values():
                        other.close()
                    os.setpgid(0, 0)  # its own process group: a timeout kills it and whatever it started
                    streams([os.open(os.devnull, os.O_RDONLY), os.open(req["stdout"], os.O_WRONLY | os.O_TRUNC),
                             os.open(req["stderr"], os.O_WRONLY | os.O_TRUNC)])
                    return req["argv"], req["env"], req["cwd"]
                children[pid] = req["id"]
                reply({"id": req["id"], "pid": pid})
        while children or clients:  # reap every child that ended
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            if pid in clients:
                conn = clients.pop(pid)
                try:
                    conn.sendall((json.dumps({"returncode": code}) + "\n").encode())
                except OSError:  # the stand-in was killed
                    pass
                conn.close()
            elif pid in children:
                reply({"id": children.pop(pid), "returncode": code})


# Only a fork gets past serve(). It runs its script or module as `python` would, and ends as Python
# ends a program, in what a run can see: the exit status SystemExit gives, an uncaught exception's
# traceback and status 1, death by SIGINT for an uncaught KeyboardInterrupt, the non-daemon threads
# joined, logging's handlers flushed, the standard streams flushed. What Python's shutdown does beyond
# that, tearing down every module the zygote imported, costs ~1-2 s a run here and is skipped: os._exit.
# (Exit functions a run registers with atexit are therefore not called; minigpt2, its scripts and
# benchmarks register none.)
import gc  # noqa: E402

gc.freeze()  # what the zygote imported is never collected in its runs (their collections stay short)
_run = become(*serve())
import runpy, signal, threading, traceback  # noqa: E402

_code = 0
try:
    if _run[0] == "-m":
        runpy.run_module(_run[1], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(_run[0], run_name="__main__")
except SystemExit as e:
    if e.code is None:
        _code = 0
    elif isinstance(e.code, int):
        _code = e.code
    else:
        print(e.code, file=sys.stderr)
        _code = 1
except KeyboardInterrupt:
    traceback.print_exc()
    _code = -signal.SIGINT
except BaseException:
    traceback.print_exc()
    _code = 1
for _thread in threading.enumerate():
    if _thread is not threading.current_thread() and not _thread.daemon:
        _thread.join()
if "logging" in sys.modules:
    sys.modules["logging"].shutdown()
for _stream in (sys.stdout, sys.stderr):
    try:
        _stream.flush()
    except (OSError, ValueError):
        pass
if _code < 0:  # died of a signal, as a Python does on an uncaught KeyboardInterrupt
    signal.signal(-_code, signal.SIG_DFL)
    os.kill(os.getpid(), -_code)
os._exit(_code & 0xFF)
"""
SERVER = inspect.getsource(python_args) + "\n\n" + SERVER_BODY  # the zygote's program: the rule, then its loop


PROGRAM = """#!{python} -S
# A stand-in for python, for what starts Python itself (gpu.sh's $PYTHON; a run's sys.executable): it hands its
# command, environment, folder and standard streams to the tests' zygote (tests/zygote.py), which
# runs it in a fork; signals it receives go to that fork, and it exits as the fork did. A command
# the zygote cannot take (another option, another environment) runs in {python} itself.
import json, os, signal, socket, sys

argv = sys.argv[1:]
try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect({socket!r})
    request = {{"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}}
    socket.send_fds(conn, [json.dumps(request).encode() + b"\\n"], [0, 1, 2])
    replies = conn.makefile("rb")
    reply = json.loads(replies.readline() or b"{{}}")
except (OSError, ValueError):
    reply = {{}}
if "pid" not in reply:
    os.execv({python!r}, [{python!r}, *argv])


def forward(sig, frame):
    try:
        os.kill(reply["pid"], sig)
    except ProcessLookupError:
        pass


for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, forward)
line = replies.readline()
code = json.loads(line)["returncode"] if line else 1
if code < 0:  # the fork died of a signal: so does its stand-in
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code & 0xFF)
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
        self.folder = tempfile.TemporaryDirectory(prefix="zygote-server-")
        socket_path = str(Path(self.folder.name, "socket"))
        self.python = Path(self.folder.name, "python")  # the stand-in python: see PROGRAM
        self.python.write_text(PROGRAM.format(python=sys.executable, socket=socket_path))
        self.python.chmod(0o755)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # listening from now on: a request
        listener.bind(socket_path)  # that comes while the zygote imports waits for it
        listener.listen(64)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SERVER,
                PER_RUN.pattern,
                str(listener.fileno()),
                str(Path(self.folder.name, "pycache")),
                str(self.python),
            ],
            pass_fds=[listener.fileno()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            cwd=cwd,
            env=self.env,
        )
        listener.close()  # the zygote's now
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
            request = {"id": rid, "argv": argv[1:], "env": env, "cwd": str(cwd), "stdout": out, "stderr": err}
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
        self.folder.cleanup()


class Pool:
    """The zygote, started on first use (a run whose environment it cannot take runs as a plain subprocess)."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.zygote: Zygote | None = None
        self.lock = threading.Lock()

    def eligible(self, argv: list[str], env: dict[str, str]) -> bool:
        """Can the zygote run `argv` in `env`? (`python_args`'s rule, against the zygote's environment
        when it started: this process's, if it has not started yet.)"""
        if os.environ.get("MINIGPT2_TEST_ZYGOTE", "1") == "0":
            return False
        base = self.zygote.env if self.zygote is not None else os.environ
        return python_args(argv, env, sys.executable, base) is not None

    def python_program(self) -> str:
        """A program to use in place of `python` where a test runs a program that starts Python
        itself (a shell script): it runs each command in a fork of the zygote where it can (see PROGRAM)."""
        if os.environ.get("MINIGPT2_TEST_ZYGOTE", "1") == "0":
            return sys.executable
        return str(self._zygote().python)

    def prestart(self) -> None:
        """Start the zygote now (its imports take seconds), so that the first run need not wait for them."""
        if os.environ.get("MINIGPT2_TEST_ZYGOTE", "1") != "0":
            self._zygote()

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
