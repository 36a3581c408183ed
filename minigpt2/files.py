"""Small file helpers that every part of minigpt2 shares: atomic writes, JSON, JSON lines.

Whatever minigpt2 writes is written under a temporary name in the same folder and renamed into
place, so a crash, a full disk or Ctrl-C never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from minigpt2.errors import MiniGPT2Error, OutputError

# What a failed write means for the user, by cause: the one thing to do about it.
WRITE_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EFBIG: "the file is larger than this process may write (see ulimit -f)",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "no permission to write there: write elsewhere",
    errno.EPERM: "no permission to write there: write elsewhere",
}


def write_error(path: str | os.PathLike, error: BaseException) -> OutputError | None:
    """The one-line `OutputError` for a failed write of `path`, or None if `error` is no write failure.

    `error` is an OSError, or safetensors' `SafetensorError`, which carries the OS error only in
    its text ("I/O error: No space left on device (os error 28)").
    """
    if isinstance(error, OutputError):
        return error
    code = cause = None
    if isinstance(error, OSError):
        code, cause = error.errno, error.strerror or str(error)
    elif type(error).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)|code: (\d+)", str(error))
        if found is None:
            return None
        code = int(found.group(1) or found.group(2))
        cause = os.strerror(code)
    else:
        return None
    advice = WRITE_ADVICE.get(code)
    return OutputError(f"cannot write '{path}': {cause}" + (f"; {advice}" if advice else ""))


def write_atomically(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, flush it to disk, rename it to `path`.

    The rename is atomic: readers see the old file or the new one, never a mix. On any failure
    (including KeyboardInterrupt) the temporary file is removed and `path` is untouched. A full
    disk, a file size limit, a read-only or forbidden folder is an `OutputError` naming `path`.
    """
    path = Path(path)
    check_replaceable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes it private (0600), and safetensors replaces the file with a private one of its
        # own: give it the mode every other file gets, after the write
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        failure = write_error(path, e)
        if failure is None:
            raise
        raise failure from None


def check_replaceable(path: str | os.PathLike) -> None:
    """An output may be written where nothing is or over a regular file, never over anything else:
    renaming a file over a device, a FIFO or a socket replaces the node itself (as root, `--json
    /dev/null --force` would replace /dev/null). An `OutputError`, `--force` or not."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return  # a dangling link: replaced like a file
    if path.exists() and not path.is_file() and not path.is_dir():
        raise OutputError(
            f"'{path}' is not a regular file (a device, pipe or socket): an output is never written over one, "
            "--force or not; choose a file name"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, value) -> None:
    """`value` as indented UTF-8 JSON (Chinese stays readable), written atomically."""
    write_text_atomically(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def parse_json(text: str):
    """`json.loads`, whose every failure is a `ValueError` (as `json.JSONDecodeError` is).

    Two inputs get past `JSONDecodeError`: a document nested deeper than Python's recursion limit
    (`[[[[...` raises `RecursionError`) and an integer of more than 4,300 digits (a plain
    `ValueError`). Neither is in a file this project writes; both are damage or an attack, and must
    be reported like any other unreadable JSON rather than as a traceback.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("it is nested too deeply to be a file of this kind") from None
    except ValueError as e:
        if isinstance(e, json.JSONDecodeError):
            raise
        raise ValueError("it holds a number of more than 4300 digits") from None  # int()'s limit; no real value


def read_json_object(path: str | os.PathLike, expected: str, error: type[MiniGPT2Error] = MiniGPT2Error) -> dict:
    """A JSON file that must hold an object; `expected` says what it should be, for the error."""
    try:
        value = parse_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: UnicodeDecodeError and JSONDecodeError among them
        raise error(f"cannot read '{path}': {e}. It should be {expected}.") from None
    if not isinstance(value, dict):
        raise error(f"'{path}' is not a JSON object; it should be {expected}.")
    return value


def read_text_file(path: str | os.PathLike, what: str = "text file") -> str:
    """A whole UTF-8 text file as str, or a `DataError` naming it: unreadable, a folder, not UTF-8
    (with the offending byte and its offset, so the user can look at exactly that spot), empty, or a
    device (reading /dev/zero would fill the memory). A pipe is read: `--prompt-file <(...)` works.
    `what` says what the file is for ("prompt file", "text file")."""
    from minigpt2.errors import DataError

    path = Path(path)
    if path.is_char_device() or path.is_block_device() or path.is_socket():  # /dev/zero never ends
        raise DataError(f"{what} '{path}' is not a regular file (a device or socket); give a text file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {what} '{path}': {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{what} '{path}' is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}. "
            "Convert it to UTF-8 first (for example `iconv -f GBK -t UTF-8`)"
        ) from None
    if not text:
        raise DataError(f"{what} '{path}' is empty; give a file with text in it")
    if "\x00" in text:
        raise binary_file_error(f"{what} '{path}'", data.find(0), "give a UTF-8 text file")
    return text


def binary_file_error(named: str, offset: int | str, advice: str):
    """The `DataError` for a file with a NUL byte at `offset` (`named`: how to name the file): no
    text format uses NUL, so it is a binary file (or UTF-16, which must be converted first)."""
    from minigpt2.errors import DataError

    return DataError(f"{named} looks like a binary file (a NUL byte at offset {offset}), not text; {advice}")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of a JSON-lines file; [] if it does not exist.

    A process killed in the middle of appending leaves a truncated last line: it is skipped (the
    record was never complete). A bad line elsewhere is real damage and is skipped too, since a
    log is for reading, not worth refusing a whole run over.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    # split("\n"), not splitlines(): JSON keeps U+2028, U+0085 and the like unescaped inside a
    # string (a generated sample may hold one), and splitlines() would cut the record there.
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        if not line.strip():
            continue
        try:
            record = parse_json(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as one line (a single write, so lines never interleave)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    except OSError as e:
        raise write_error(path, e) from None


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, with a failed write an `OutputError` naming `path` (not atomic:
    for a file inside a folder that is itself put in place atomically, or via `write_atomically`)."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
        os.chmod(path, 0o666 & ~_umask())  # safetensors writes it private (0600): the usual mode
    except Exception as e:
        failure = write_error(path, e)
        if failure is None:
            raise
        raise failure from None


def rewrite_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
