"""A training run's folder as anyone reads it: its layout, its records and where its checkpoints are.

    RUN/run.json              where the run started (model source or preset), config, arguments, data
    RUN/log.jsonl             every record of the trainer, one JSON object per line
    RUN/snapshots.jsonl       weight and activation drift from the start (see model/snapshots.py)
    RUN/step-000100/          a checkpoint: config.json + model.safetensors (+ vocab.json, merges.txt):
                              what `load_model` and transformers read; trainer_state.json +
                              trainer_state.safetensors: what --resume needs (optimizer, RNG, step)
    RUN/final/                the same, at the end
    RUN/.lock                 held (an OS lock) by the process training in RUN

`load_model`, `load_tokenizer`, `compare.py` and `sample.py` read a run through `RunFolder`; the
trainer writes one through its subclass `minigpt2.training.rundir.RunDir` (the lock, crash-safe saves,
recovery), so that reading a run needs nothing of training.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from minigpt2.errors import MiniGPT2Error
from minigpt2.files import parse_json, read_json_object, read_jsonl

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


class RunFolder:
    """One training run's folder, read: what it is, its records and its checkpoints."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder('{self.path}')"

    @staticmethod
    def is_run(path: str | os.PathLike) -> bool:
        """A training run's folder (not a checkpoint folder itself)."""
        path = Path(path)
        if not path.is_dir() or (path / WEIGHTS).exists():
            return False
        return any((path / name).exists() for name in (RUN_JSON, LOG, LOCK, FINAL)) or any(
            STEP_NAME.fullmatch(p.name) for p in path.iterdir()
        )

    # ----- what the run is --------------------------------------------------------------------

    def read_info(self) -> dict | None:
        """run.json, or None when the run never got that far."""
        path = self.path / RUN_JSON
        if not path.is_file():
            return None
        return read_json_object(path, "a training run's run.json", RunDirError)

    def is_empty(self) -> bool:
        """Nothing in it but its lock: a fresh run may start here."""
        return not self.path.exists() or all(p.name == LOCK for p in self.path.iterdir())

    # ----- records ----------------------------------------------------------------------------

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


def other_checkpoints_hint(source: str | os.PathLike) -> str:
    """For a checkpoint of a training run that failed to load (given as the run, its checkpoint
    folder or that folder's weights file): a sentence naming the run's other checkpoints with
    weights, which may load instead; "" for anything else."""
    path = Path(source)
    for run_path in (path, path.parent, path.parent.parent):
        if RunFolder.is_run(run_path):
            break
    else:
        return ""
    run = RunFolder(run_path)
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


def _describe(holder: str) -> str:
    try:
        info = parse_json(holder)
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"


def _base_name(path: Path) -> str:
    m = LEFTOVER.fullmatch(path.name)
    return m.group(1) if m else path.name


def _rank(path: Path) -> int:
    """Which copy of a checkpoint wins: the folder under its own name, else the newer hidden (tmp) one."""
    m = LEFTOVER.fullmatch(path.name)
    return 2 if not m else (1 if m.group(2) == "tmp" else 0)
