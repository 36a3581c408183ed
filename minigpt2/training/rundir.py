"""The run directory as the trainer writes it: its lock, its records and crash-safe checkpoints.

Its layout, and reading it (`RunFolder`: what it is, its records, where its checkpoints are), live in
`minigpt2/io/runs.py`, so that loading a model from a run needs nothing of training.

`train.py` and the trainer go through `RunDir`.

Three promises, and how they are kept:

- **One process per run.** `lock()` takes an exclusive `flock` on RUN/.lock and writes the holder's pid
  and host into it. A second process is refused at once, naming the holder. The OS releases the lock
  when the holder dies, however it dies, so a crash never leaves a stale lock behind.
- **A complete checkpoint can always be found.** A checkpoint is written into a hidden temporary folder
  and renamed into place when complete. Replacing an existing one (`final/` of a run that is extended)
  takes three renames: the old one aside, the new one in, the old one deleted. A process killed between
  any two of them leaves the complete old or new folder under a hidden name; `checkpoints()` finds it
  there, and `recover()`, at the next start, moves it back into place and says so.
- **--resume never gets stuck.** `resume_candidates()` lists the complete checkpoints newest first;
  the trainer falls back past any it cannot read, naming each and why.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from minigpt2.files import append_jsonl, read_jsonl, rewrite_jsonl, write_json
from minigpt2.io.runs import (  # noqa: F401  (the layout's names, re-exported for the trainer's modules)
    CHECKPOINT_FILES,
    CONFIG,
    FINAL,
    LEFTOVER,
    LOCK,
    LOG,
    RUN_JSON,
    SNAPSHOTS,
    STATE_JSON,
    STATE_TENSORS,
    STEP_NAME,
    WEIGHTS,
    Checkpoint,
    RunDirError,
    RunFolder,
    checkpoint_step,
    is_complete,
    other_checkpoints_hint,
    step_name,
)


class RunDir(RunFolder):
    """One training run's folder, written. `fault`, if given, is called with the name of each stage of a
    checkpoint save; the crash tests pass one that kills the process at a chosen stage."""

    def __init__(self, path: str | os.PathLike, *, fault: Callable[[str], None] | None = None) -> None:
        super().__init__(path)
        self.fault = fault
        self._lock_file = None

    def __repr__(self) -> str:
        return f"RunDir('{self.path}')"

    # ----- the lock -------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the run for this process, or raise naming the process that has it.

        An `flock` on RUN/.lock: exclusive, not waited for, and released by the OS when the process
        ends, so there is no stale lock to clean up after a crash.
        """
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (held for the life of the run)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise self._in_use(holder) from None
        f.seek(0)
        f.truncate()
        f.write(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
            + "\n"
        )
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file releases the flock
            self._lock_file = None

    # ----- what the run is --------------------------------------------------------------------

    def write_info(self, info: dict) -> None:
        write_json(self.path / RUN_JSON, info)

    # ----- records ----------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        append_jsonl(self.path / LOG, record)

    def add_snapshot(self, record: dict) -> None:
        append_jsonl(self.path / SNAPSHOTS, record)

    def forget_after(self, step: int) -> None:
        """Drop the records of steps after `step` (done, then lost when the run stopped), so the
        log reads as one run once the resumed run redoes them."""
        for name in (LOG, SNAPSHOTS):
            records = read_jsonl(self.path / name)
            kept = [r for r in records if r.get("step", 0) <= step]
            if len(kept) != len(records) or (self.path / name).is_file():
                rewrite_jsonl(self.path / name, kept)

    # ----- checkpoints ------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Finish or undo saves that a killed process left half done; return what was done.

        Call it holding the lock: then no other process is writing, and every leftover is dead.
        """
        messages = []
        if not self.path.is_dir():
            return messages
        leftovers = sorted(
            (p for p in self.path.iterdir() if LEFTOVER.fullmatch(p.name)),
            key=lambda p: LEFTOVER.fullmatch(p.name).group(2) == "old",
        )  # tmp first
        for path in leftovers:
            name, kind, _ = LEFTOVER.fullmatch(path.name).groups()
            target = self.path / name
            if not target.exists() and is_complete(path) and checkpoint_step(path) is not None:
                os.rename(path, target)
                what = "a complete save" if kind == "tmp" else "the previous copy"
                messages.append(f"restored {target.name}/ from {what} left by an interrupted save ({path.name})")
            else:
                shutil.rmtree(path, ignore_errors=True)
                why = "incomplete" if kind == "tmp" else f"superseded by {target.name}/"
                messages.append(f"removed {path.name}, left by an interrupted save ({why})")
        return messages

    def stage(self, name: str) -> None:
        """A named point of the save sequence (see `fault`)."""
        if self.fault is not None:
            self.fault(name)

    def save(self, name: str, write: Callable[[Path], None]) -> Path:
        """Write a checkpoint called `name` with `write(folder)`, so that a crash at any moment
        leaves a complete checkpoint findable (see the module docstring). Returns its path."""
        tmp = self.path / f".{name}.tmp-{os.getpid()}"
        target = self.path / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write(tmp)
            _fsync_dir(tmp)
            self.stage("written")
            if target.exists():
                old = self.path / f".{name}.old-{os.getpid()}"
                os.rename(target, old)
                self.stage("moved-old-aside")
                os.rename(tmp, target)
                self.stage("moved-new-in")
                shutil.rmtree(old)
            else:
                os.rename(tmp, target)
            _fsync_dir(self.path)
            self.stage("done")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def prune(self, keep_last: int, protect: set[Path] = frozenset()) -> list[Path]:
        """Delete all but the newest `keep_last` step checkpoints (never `final/` or `protect`)."""
        steps = self.step_checkpoints()  # complete ones and those kept with weights only
        doomed = [
            p for p in steps[: max(0, len(steps) - keep_last)] if p.resolve() not in {q.resolve() for q in protect}
        ]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
        return doomed


def _fsync_dir(path: Path) -> None:
    """Make renames and new files in a folder durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def check_writable(folder: str | os.PathLike, what: str) -> Path:
    """Make sure `folder` is (or can become) a writable directory, by writing a probe file in it:
    a read-only disk, a file in the way or a missing permission fails now, not after minutes of
    tokenizing. Raises `RunDirError` naming the folder and what it is for."""
    folder = Path(folder).expanduser()
    try:
        if folder.exists() and not folder.is_dir():
            raise RunDirError(f"{what} '{folder}' is a file, not a folder; choose a folder")
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"cannot write to {what} '{folder}': {e.strerror or e}") from None
    return folder
