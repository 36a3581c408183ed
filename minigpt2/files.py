"""Small file helpers that every part of minigpt2 shares: atomic writes, JSON, JSON lines.

Whatever minigpt2 writes is written under a temporary name in the same folder and renamed into
place, so a crash, a full disk or Ctrl-C never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import MiniGPT2Error


def write_atomically(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, flush it to disk, rename it to `path`.

    The rename is atomic: readers see the old file or the new one, never a mix. On any failure
    (including KeyboardInterrupt) the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); give it the usual mode
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    from .errors import DataError

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
    return text


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
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
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
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def rewrite_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
