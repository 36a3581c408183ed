"""The command-line boundary that `train.py`, `sample.py` and `compare.py` share.

Every way a script can fail ends in one `error: ...` line on stderr and a non-zero exit, never a
traceback: the library's own `MiniGPT2Error` (with `--flag` names for an `OptionError`), and the
filesystem's `OSError` (a full disk, a read-only folder, a file where a folder should be). A closed
pipe (`| head`) ends quietly with status 141, as a tool killed by SIGPIPE does; Ctrl-C prints
"interrupted" and exits 130 (128 + SIGINT) at any moment, imports included (`start_script`).
Output goes out whatever the streams are: a closed stdout or stderr (`>&-`) becomes /dev/null, and
a stream whose encoding cannot hold the text (`PYTHONIOENCODING=ascii`) gets escapes instead of a
UnicodeEncodeError, with one note saying so. Like `console.py`, this module exists for the scripts
and writes only to the standard streams.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import os
import signal
import sys
import warnings
from collections.abc import Callable

from minigpt2.errors import MiniGPT2Error, Notice, user_message

ESCAPES = "minigpt2-escape"  # the codec error handler of streams that cannot encode everything
_escaped: list[str] = []  # the encodings that needed escapes (for the one note)


def start_script() -> None:
    """What each script does first, before it imports anything slow.

    - Ctrl-C while Python imports torch (~2 s, far longer on a busy machine) prints "interrupted"
      and exits 130 at once (SIGTERM and SIGHUP likewise say so and exit 128+N): a
      KeyboardInterrupt raised inside torch's import prints a traceback,
      or even aborts the process from C++. `run_script` restores Python's own Ctrl-C handling
      once torch is imported, so the work itself is interrupted cleanly (temporary files removed).
    - A closed stdin, stdout or stderr (`>&-`) is opened on /dev/null: output there is dropped
      (with a note when stdout is), and no file the script opens can take its place, where a
      stray write would corrupt it.
    - A stream that cannot encode a character writes it as an escape (\\u4eca) instead of failing.
    """
    signal.signal(signal.SIGINT, _interrupted_at_once)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # likewise `kill` or a closed terminal: one line, 128+N
        signal.signal(sig, _stopped_at_once)
    atexit.register(_quiet_teardown)  # registered first, so it runs last: after every other atexit callback
    closed = [fd for fd in (0, 1, 2) if not _is_open(fd)]
    for fd in closed:
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
    for name, fd in (("stdin", 0), ("stdout", 1), ("stderr", 2)):
        if fd in closed or getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", encoding="utf-8", closefd=False))  # noqa: SIM115
    if 1 in closed:
        print("note: standard output is closed: what would be printed there is dropped", file=sys.stderr)
    codecs.register_error(ESCAPES, _escape)
    for stream in (sys.stdout, sys.stderr):
        # strict, or surrogateescape (what Python picks under LC_ALL=C): either fails on a character
        # the encoding lacks, such as the header's "·" in ASCII
        if getattr(stream, "errors", None) in ("strict", "surrogateescape") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=ESCAPES)


def _quiet_teardown() -> None:
    """The last thing before Python tears itself down: it puts the default signal handlers back
    there, and a SIGTERM in that moment killed a script that had already said how it ended (exit
    -15 after "interrupted"). The work and its exit path are over: the signals are ignored (not
    blocked: a mask is the main thread's alone, and torch's threads would take the signal; Python
    leaves an ignored signal ignored)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _interrupted_at_once(signum, frame) -> None:
    try:
        os.write(2, b"\ninterrupted\n")
    finally:
        os._exit(130)


def _stopped_at_once(signum, frame) -> None:
    try:
        os.write(2, f"\nstopped by {signal.Signals(signum).name} while starting (nothing was written)\n".encode())
    finally:
        os._exit(128 + signum)


def _stopped_at_exit(signum, frame) -> None:
    try:
        os.write(2, f"\nstopped by {signal.Signals(signum).name}\n".encode())
    finally:
        os._exit(128 + signum)


def _escape(error: UnicodeError) -> tuple[str, int]:
    """Write a character the stream's encoding lacks as a Python escape, and remember that it was."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    if error.encoding not in _escaped:
        _escaped.append(error.encoding)
    return codecs.backslashreplace_errors(error)


def _escape_note() -> None:
    if _escaped:
        encodings = " / ".join(_escaped)
        print(
            f"note: the output's encoding ({encodings}) cannot show some characters; they were written as "
            "\\u escapes. For the text itself use a UTF-8 locale or PYTHONIOENCODING=utf-8",
            file=sys.stderr,
        )
        _escaped.clear()


def run_script(body: Callable[[], int], flags: dict[str, str] | None = None, prefix: str = "") -> int:
    """`body()`'s exit status, or the status of the one line that says why it failed.

    The library's `Notice` warnings (e.g. GPT-2's tokenizer standing in for a checkpoint without
    one) are printed as one `note: ...` line on stderr each, every time they are raised.
    """
    script = signal.getsignal(signal.SIGINT) is _interrupted_at_once  # (started by start_script)
    try:
        import torch  # noqa: F401  (every script needs it: imported while Ctrl-C still exits at once)

        if signal.getsignal(signal.SIGINT) is _interrupted_at_once:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP):  # the work itself stops as Ctrl-C does (train.py saves first)
            if signal.getsignal(sig) is _stopped_at_once:
                signal.signal(sig, _raise_stopped)
        with warnings.catch_warnings():
            warnings.simplefilter("always", Notice)
            shown = warnings.showwarning

            def show(message, category, *args, **kwargs):
                if issubclass(category, Notice):
                    print(f"note: {message}", file=sys.stderr)
                else:
                    shown(message, category, *args, **kwargs)

            warnings.showwarning = show
            return body()
    except MiniGPT2Error as e:
        return error(prefix + user_message(e, flags))
    except BrokenPipeError:
        return closed_pipe()
    except OSError as e:
        return error(prefix + f"{e.strerror or e}" + (f": '{e.filename}'" if e.filename else ""))
    except KeyboardInterrupt:
        _at_once(script)
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Stopped as e:
        _at_once(script)
        print(f"\nstopped by {e.signal.name}", file=sys.stderr)
        return 128 + e.signal
    finally:
        _at_once(script)
        _escape_note()


def _at_once(script: bool) -> None:
    """Once the work is over (done, failed or stopped), a signal ends the script at once, as while it
    started: raised during the exit path (an atexit callback, threads joined at exit, the cleanup of
    a first Ctrl-C) it printed "Exception ignored ... Stopped" or a traceback, and exited 0."""
    if script:
        with contextlib.suppress(OSError, ValueError):  # (what is printed is out before os._exit could drop it)
            sys.stdout.flush()
        signal.signal(signal.SIGINT, _interrupted_at_once)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _stopped_at_exit)


class Stopped(BaseException):
    """SIGTERM or SIGHUP during the work: unwinds like Ctrl-C (temporary files are removed on the way)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal = signal.Signals(signum)


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


def error(message: str) -> int:
    """Print the one error line, on a fresh line (a sample or a progress bar may be half printed)."""
    try:
        sys.stdout.flush()
    except OSError:
        pass
    print(("\n" if sys.stderr.isatty() else "") + f"error: {message}", file=sys.stderr)
    return 1


def closed_pipe() -> int:
    """The reader of stdout went away: stop quietly. Pointing stdout at /dev/null keeps Python's
    own flush at exit from failing again and printing "Exception ignored ... BrokenPipeError"."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141
