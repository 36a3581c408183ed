"""The command-line boundary that `train.py`, `sample.py` and `compare.py` share.

Every way a script can fail ends in one `error: ...` line on stderr and a non-zero exit, never a
traceback: the library's own `MiniGPT2Error` (with `--flag` names for an `OptionError`), and the
filesystem's `OSError` (a full disk, a read-only folder, a file where a folder should be). A closed
pipe (`| head`) ends quietly with status 141, as a tool killed by SIGPIPE does; Ctrl-C prints
"interrupted" and exits 130 (128 + SIGINT). Like `console.py`, this module exists for the scripts
and writes only to the stream it is given.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

from .errors import MiniGPT2Error, Notice, user_message


def run_script(body: Callable[[], int], flags: dict[str, str] | None = None, prefix: str = "") -> int:
    """`body()`'s exit status, or the status of the one line that says why it failed.

    The library's `Notice` warnings (e.g. GPT-2's tokenizer standing in for a checkpoint without
    one) are printed as one `note: ...` line on stderr each, every time they are raised.
    """
    try:
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
        print("\ninterrupted", file=sys.stderr)
        return 130


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
