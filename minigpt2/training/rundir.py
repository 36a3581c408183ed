"""The run directory: its layout, its records, its checkpoints and its lock, in one place.

    RUN/run.json              where the run started (model source or preset), config, arguments, data
    RUN/log.jsonl             every record of the trainer, one JSON object per line
    RUN/snapshots.jsonl       weight and activation drift from the start (see snapshots.py)
    RUN/step-000100/          a checkpoint: config.json + model.safetensors (+ vocab.json, merges.txt):
                              what `load_model` and transformers read; trainer_state.json +
                              trainer_state.safetensors: what --resume needs (optimizer, RNG, step)
    RUN/final/                the same, at the end
    RUN/.lock                 held (an OS lock) by the process training in RUN

`train.py`, the trainer, `compare.py`, `sample.py` and `load_model` all go through `RunDir`.

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
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from minigpt2.errors import MiniGPT2Error
from minigpt2.files import append_jsonl, parse_json, read_json_object, read_jsonl, rewrite_jsonl, write_json

RUN_JSON = "run.json"
LOG = "log.jsonl"
SNAPSHOTS = "snapshots.jsonl"
LOCK = ".lock"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
CHECKPOINT_FILES = (CONFIG, WEIGHTS, STATE_TENSORS, STATE_JSON)  # the trainer writes them in this order
FINAL = "final"
STEP_NAME = re.compile(r"step-(\d{6,})")
UNKNOWN_FINAL_STEP = 10**12  # a final/ whose step cannot be read sorts as the newest
LEFTOVER = re.compile(r"\.(step-\d{6,}|final)\.(tmp|old)-(\d+)")


class RunDirError(MiniGPT2Error):
    """A run directory that cannot be used as asked (in use, not a run, not writable, ...)."""


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder of a run, and the step it was saved at."""

    path: Path
    step: int


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(path: Path) -> int | None:
    """The step recorded in a checkpoint's trainer_state.json, or None if it cannot be read."""
    try:
        step = parse_json((path / STATE_JSON).read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def is_complete(path: Path) -> bool:
    """All of a checkpoint's files are there (each is written whole, the state JSON last)."""
    return path.is_dir() and all((path / name).is_file() for name in CHECKPOINT_FILES)


class RunDir:
    """One training run's folder. `fault`, if given, is called with the name of each stage of a
    checkpoint save; the crash tests pass one that kills the process at a chosen stage."""

    def __init__(self, path: str | os.PathLike, *, fault: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.fault = fault
        self._lock_file = None

    def __repr__(self) -> str:
        return f"RunDir('{self.path}')"

    @staticmethod
    def is_run(path: str | os.PathLike) -> bool:
        """A training run's folder (not a checkpoint folder itself)."""
        path = Path(path)
        if not path.is_dir() or (path / WEIGHTS).exists():
            return False
        return any((path / name).exists() for name in (RUN_JSON, LOG, LOCK, FINAL)) or any(
            STEP_NAME.fullmatch(p.name) for p in path.iterdir()
        )

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

    def check_not_in_use(self) -> None:
        """Raise as `lock` does when another process holds the run, without taking it or writing."""
        import fcntl

        try:
            f = open(self.path / LOCK, encoding="utf-8")  # noqa: SIM115 (closed below)
        except OSError:
            return  # no lock file: nobody holds it
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip()
            raise self._in_use(holder) from None
        finally:
            f.close()

    def _in_use(self, holder: str) -> RunDirError:
        return RunDirError(
            f"'{self.path}' is in use by another training process ({_describe(holder)}); "
            "wait for it to finish or stop it, or choose another run directory"
        )

    def _why_no_checkpoint(self) -> str:
        """A run still training "has not saved yet"; one no process holds stopped before its first save."""
        try:
            self.check_not_in_use()
        except RunDirError:
            return "it is still training and has not saved yet (try again after its first checkpoint)"
        return "it stopped before its first save"

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file releases the flock
            self._lock_file = None

    # ----- what the run is --------------------------------------------------------------------

    def read_info(self) -> dict | None:
        """run.json, or None when the run never got that far."""
        path = self.path / RUN_JSON
        if not path.is_file():
            return None
        return read_json_object(path, "a training run's run.json", RunDirError)

    def write_info(self, info: dict) -> None:
        write_json(self.path / RUN_JSON, info)

    def is_empty(self) -> bool:
        """Nothing in it but its lock: a fresh run may start here."""
        return not self.path.exists() or all(p.name == LOCK for p in self.path.iterdir())

    # ----- records ----------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        append_jsonl(self.path / LOG, record)

    def add_snapshot(self, record: dict) -> None:
        append_jsonl(self.path / SNAPSHOTS, record)

    def read_log(self) -> list[dict]:
        """Every record of log.jsonl (a line cut short by a crash is skipped)."""
        return read_jsonl(self.path / LOG)

    def read_snapshots(self) -> list[dict]:
        """snapshots.jsonl, in step order."""
        snaps = [s for s in read_jsonl(self.path / SNAPSHOTS) if isinstance(s.get("step"), int)]
        for s in snaps:
            s.setdefault("weights", {})
            s.setdefault("activations", {})
        return sorted(snaps, key=lambda s: s["step"])

    def forget_after(self, step: int) -> None:
        """Drop the records of steps after `step` (done, then lost when the run stopped), so the
        log reads as one run once the resumed run redoes them."""
        for name in (LOG, SNAPSHOTS):
            records = read_jsonl(self.path / name)
            kept = [r for r in records if r.get("step", 0) <= step]
            if len(kept) != len(records) or (self.path / name).is_file():
                rewrite_jsonl(self.path / name, kept)

    # ----- checkpoints ------------------------------------------------------------------------

    def checkpoints(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first (`final` after a step folder of the same step).

        A checkpoint caught in the middle of being replaced still counts: the hidden folder holding
        the complete old or new copy stands in for its name until `recover()` puts it back.
        """
        if not self.path.is_dir():
            return []
        found: dict[str, Checkpoint] = {}
        for path in sorted(self.path.iterdir()):
            name = _base_name(path)
            if not (name == FINAL or STEP_NAME.fullmatch(name)) or not is_complete(path):
                continue
            step = checkpoint_step(path)
            if step is None:  # damaged: still listed (a resume names it and falls back), at its name's place
                step = int(name.split("-")[1]) if name != FINAL else UNKNOWN_FINAL_STEP
            current = found.get(name)
            if current is None or _rank(path) > _rank(current.path):
                found[name] = Checkpoint(path, step)
        return sorted(found.values(), key=lambda c: (c.step, _base_name(c.path) == FINAL))

    def resume_candidates(self) -> list[Checkpoint]:
        """What --resume may continue from, the newest first."""
        return list(reversed(self.checkpoints()))

    def model_checkpoint(self) -> Path:
        """The checkpoint the run stands for, to load as a model: `final/`, else its newest complete
        checkpoint, else its newest step folder holding weights (a model needs no trainer state)."""
        if (self.path / FINAL / WEIGHTS).is_file() and (self.path / FINAL / CONFIG).is_file():
            return self.path / FINAL
        complete = self.checkpoints()
        if complete:
            return complete[-1].path
        steps = [p for p in self.step_checkpoints() if (p / CONFIG).is_file()]
        if not steps:
            raise RunDirError(f"training run '{self.path}' has no checkpoint yet: {self._why_no_checkpoint()}")
        return steps[-1]

    def step_checkpoints(self) -> list[Path]:
        """The step-N folders that hold weights, in step order (for comparing a run's start)."""
        steps = [
            (int(m.group(1)), p)
            for p in self.path.iterdir()
            if (m := STEP_NAME.fullmatch(p.name)) and (p / WEIGHTS).is_file()
        ]
        return [p for _, p in sorted(steps)]

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


def other_checkpoints_hint(source: str | os.PathLike) -> str:
    """For a checkpoint of a training run that failed to load (given as the run, its checkpoint
    folder or that folder's weights file): a sentence naming the run's other checkpoints with
    weights, which may load instead; "" for anything else."""
    path = Path(source)
    for run_path in (path, path.parent, path.parent.parent):
        if RunDir.is_run(run_path):
            break
    else:
        return ""
    run = RunDir(run_path)
    try:
        failed = run.model_checkpoint() if run_path == path else (path if run_path == path.parent else path.parent)
    except RunDirError:
        return ""
    finals = [run.path / FINAL] if (run.path / FINAL / WEIGHTS).is_file() else []
    others = [p.name for p in run.step_checkpoints() + finals if p.resolve() != failed.resolve()]
    if not others:
        return ""
    return (
        f" The run has other checkpoints ({', '.join(others[-3:])}): load one of those folders instead, or resume "
        "the training, which sets a damaged checkpoint aside and goes on from the newest good one."
    )


def _base_name(path: Path) -> str:
    m = LEFTOVER.fullmatch(path.name)
    return m.group(1) if m else path.name


def _rank(path: Path) -> int:
    """Which copy of a checkpoint wins: the folder under its own name, else the newer hidden (tmp) one."""
    m = LEFTOVER.fullmatch(path.name)
    return 2 if not m else (1 if m.group(2) == "tmp" else 0)


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


def _describe(holder: str) -> str:
    try:
        info = parse_json(holder)
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"


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
