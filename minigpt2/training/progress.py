"""What the training loop reports about itself, kept out of the loop: trainer.py calls each in one line.

    UnreadSteps      train records whose loss is still on the device: read now and then, not every step
    StepTimer        the measured seconds of steps, evaluations and saves; throughput and the ETA
    EvalClock        an evaluation's time left, for its progress records
    estimate_record  the first estimate of the whole run, with the machine's load on a CPU

None of this changes what the loop computes: a run with all of it read every step computes the
same numbers as one that reads every tenth.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from minigpt2.device import machine_load

ESTIMATE_AFTER = 3  # steps after the start (or resume) at which the run's length is first estimated


class UnreadSteps:
    """The train records of steps run but not read to the host yet.

    Reading a loss to the host waits for the device to finish its queue of kernels, so on a GPU the
    loop reads every `read_every` steps (one wait for many steps) instead of every step. Some steps
    must be read at once whatever the rhythm: the last, the estimate's, and any step after which
    an evaluation, snapshot or checkpoint follows (nothing is saved from a step not checked).
    """

    def __init__(self, config, first_step: int) -> None:
        self.config = config
        self.first_step = first_step  # where this run (or resume) started
        self.records: list[dict] = []

    def add(self, record: dict, read_every: int) -> bool:
        """Keep `record`; whether the records kept must be read now."""
        self.records.append(record)
        return len(self.records) >= read_every or self._due(record["step"])

    def _due(self, step: int) -> bool:
        c = self.config
        return step in (c.steps, self.first_step + 1, self.estimate_step) or any(
            every and step % every == 0 for every in (c.eval_every, c.snapshot_every, c.save_every)
        )

    @property
    def estimate_step(self) -> int:
        return self.first_step + ESTIMATE_AFTER

    def take(self) -> list[dict]:
        """The records kept so far (and none kept any more)."""
        records, self.records = self.records, []
        return records


class StepTimer:
    """Seconds measured for steps, evaluations and saves, and what they give: each step's
    throughput (tokens per second, MFU) and the time left (`eta`)."""

    def __init__(self, config, device: torch.device, eval_lengths: list[int], flops_per_token: float,
                 peak_flops: float | None) -> None:  # fmt: skip
        self.config, self.device = config, device
        self.eval_lengths = eval_lengths  # tokens of each eval set
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.seconds: dict[str, list[float]] = {"step": [], "eval": [], "save": []}

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind].append(seconds)

    @contextlib.contextmanager
    def measure(self, kind: str):
        """Time the `with` block as one `kind` ("eval" or "save")."""
        started = time.perf_counter()
        yield
        self.add(kind, time.perf_counter() - started)

    def timed(self, kind: str, records: Iterator[dict]) -> Iterator[dict]:
        """`records`, passed on; the time until the last one is measured as one `kind`."""
        with self.measure(kind):
            yield from records

    def time_steps(self, records: list[dict]) -> None:
        """Each record's seconds (`step_s`: the mean over `records` of the time since the first
        began), tokens per second and MFU; the records' `started` is removed."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the values were read, so this waits for the last update only
        seconds = (time.perf_counter() - records[0]["started"]) / len(records)
        tokens_per_s = self.config.tokens_per_step / seconds
        mfu = tokens_per_s * self.flops_per_token / self.peak_flops if self.peak_flops else None
        for record in records:
            del record["started"]
            record.update(tokens_per_s=tokens_per_s, mfu=mfu, step_s=seconds)

    def eta(self, step: int) -> dict:
        """Seconds left after `step`: steps at the measured step time, plus the evaluations and
        saves still due at their measured durations (an evaluation's is known from step 0 on)."""
        c = self.config

        def due(every: int) -> int:
            return sum(1 for s in range(step + 1, c.steps) if every and s % every == 0) + 1

        mean = {k: (sum(v[-20:]) / len(v[-20:]) if v else 0.0) for k, v in self.seconds.items()}
        if not self.seconds["eval"] and self.eval_lengths:  # not measured yet: a forward pass is ~1/3 of a step
            tokens = sum(min(c.eval_tokens, n) for n in self.eval_lengths)
            mean["eval"] = mean["step"] * tokens / c.tokens_per_step / 3
        parts = {
            "steps": (c.steps - step) * mean["step"],
            "evals": due(c.eval_every) * mean["eval"] if self.eval_lengths else 0.0,
            "saves": due(c.save_every) * mean["save"],
        }
        return {
            "eta_s": sum(parts.values()),
            **{f"{k}_s": v for k, v in parts.items()},
            "evals_left": due(c.eval_every) if self.eval_lengths else 0,
            "saves_left": due(c.save_every),
        }


class EvalClock:
    """An evaluation's time left at its speed so far. Its forward passes over all eval sets are
    counted up front (`total`), so the estimate covers the sets still to come."""

    def __init__(self, total: int) -> None:
        self.started, self.done, self.total = time.perf_counter(), 0, total

    def tick(self) -> float:
        """One forward pass done; the seconds left."""
        self.done += 1
        elapsed = time.perf_counter() - self.started
        return elapsed / self.done * max(self.total - self.done, 0)


def estimate_record(step: int, eta: dict, device: torch.device) -> dict:
    """The first estimate of the whole run, a few steps in. On a CPU it carries the machine's load
    (`device.machine_load`): other jobs on the same cores are the usual reason a run is slow."""
    busy = machine_load() if device.type == "cpu" else None
    load = {"load": busy[0], "cores": busy[1]} if busy else {}
    return {"type": "estimate", "step": step, **eta, **load}
