"""A run's records read back for a report, each checked for the shape the report relies on.

log.jsonl and snapshots.jsonl are files on disk: a crash, an edit or another version may leave a
record that is valid JSON of the wrong shape (a train record without its loss, a sample record
whose step is text). A report built on such a record used to stop with a traceback; here each
record is checked as run.json and the trainer state are, and a damaged one is left out: it costs
its line (named in one note), never the report.
"""

from __future__ import annotations

import os
from pathlib import Path

from minigpt2.files import parse_json


def _int(value) -> bool:
    return type(value) is int and value >= 0


def _number(value) -> bool:  # (NaN and inf too: a loss that diverged is a fact worth showing)
    return type(value) in (int, float)


def _maybe(check):
    return lambda value: value is None or check(value)


def _text(value) -> bool:
    return isinstance(value, str)


def _samples(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(s, dict) and _text(s.get("prompt")) and _text(s.get("text")) for s in value
    )


def _numbers(value) -> bool:
    return isinstance(value, dict) and all(_text(k) and _number(v) for k, v in value.items())


def _blocks(value) -> bool:
    return isinstance(value, dict) and all(_text(k) and _numbers(v) for k, v in value.items())


# What each kind of record must hold to be shown (fields a report reads): field -> check.
LOG_SHAPES = {
    "train": {"step": _int, "loss": _number, "tokens": _maybe(_int)},
    "eval": {"step": _int, "set": _text, "loss": _number, "bpc": _maybe(_number), "tokens": _maybe(_int)},
    "samples": {
        "step": _int,
        "samples": _samples,
        "seed": _maybe(_int),
        "max_new_tokens": _maybe(_int),
        "tokens": _maybe(_int),
    },  # fmt: skip
}
SNAPSHOT_SHAPE = {"step": _int, "weights": _maybe(_numbers), "activations": _maybe(_blocks), "probe": _maybe(_text),
                  "tokens": _maybe(_int)}  # fmt: skip


def log_shape(record: dict) -> dict:
    """The checks of a log.jsonl record's fields, by its "type" (a type no report reads: none)."""
    return LOG_SHAPES.get(record.get("type"), {})


def snapshot_shape(record: dict) -> dict:
    return SNAPSHOT_SHAPE


def read_records(path: str | os.PathLike, shape_of=log_shape) -> tuple[list[dict], list[int]]:
    """(records of `path` whose shape is right, numbers of the lines left out).

    `shape_of(record)`: the checks of its fields (`log_shape`, `snapshot_shape`). A last line cut
    short by a crash is left out without a word (the record was never complete); any other
    unreadable or misshapen line is counted."""
    path = Path(path)
    if not path.is_file():
        return [], []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")  # (not splitlines: see files.read_jsonl)
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records, skipped = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = parse_json(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and all(check(record.get(k)) for k, check in shape_of(record).items()):
            records.append(record)
        elif record is not None or i != last:
            skipped.append(i + 1)
    return records, skipped


def skipped_note(name: str, skipped: list[int]) -> str | None:
    """One line naming the lines of `name` that were left out, or None."""
    if not skipped:
        return None
    shown = ", ".join(map(str, skipped[:8])) + (f" and {len(skipped) - 8} more" if len(skipped) > 8 else "")
    return (f"{name}: line{'s' if len(skipped) > 1 else ''} {shown} left out: not a record of the shape this "
            "version writes (damaged or edited)")  # fmt: skip
