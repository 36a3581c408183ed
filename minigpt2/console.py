"""What the scripts show: `train.py`'s table on stdout, a progress bar (or plain progress lines) on
stderr, and `compare.py`'s progress through its phases.

This is the front ends' display, kept out of the scripts so that each stays a page long;
it is the one place in the package that names command-line options, since it talks to the person
who typed them. It writes only to the two streams it is given. If one goes away (the terminal was
closed, `| head` exited), it stops writing to that one and the work goes on (training's log.jsonl
has every record anyway).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time

from minigpt2.text import format_bytes, format_duration, one_line, plural, visible
from minigpt2.training.options import FLAGS

# Without a terminal (a log file), a long phase still writes a progress line at least this often.
PLAIN_EVERY_S = 5.0


class Display:
    """Lines for a person on stdout, notes and a progress line on stderr; a stream that goes away
    (the terminal was closed, `| head` exited) is written to no more, and the work goes on."""

    def __init__(self, out=None, err=None) -> None:
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.tty = self._isatty(self.err)
        self.bar_text = ""
        self.plain_at = 0.0  # when the last plain progress line of a phase was written (no terminal)
        self.phase, self.phase_at = "", 0.0  # the long phase going on before training, and its start

    @staticmethod
    def _isatty(stream) -> bool:
        try:
            return stream.isatty()
        except (ValueError, OSError):
            return False

    # ----- writing, surviving a closed stream -------------------------------------------------

    def _write(self, which: str, text: str) -> None:
        stream = getattr(self, which)
        if stream is None:
            return
        try:
            stream.write(text)
            stream.flush()
        except (BrokenPipeError, OSError, ValueError):
            setattr(self, which, None)  # gone: stop writing there
            if which == "out":  # and keep Python from complaining about it at exit
                try:
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                except (OSError, ValueError):
                    pass

    def line(self, text: str) -> None:
        self.clear_bar()
        self._write("out", text + "\n")
        self.redraw()

    def note(self, text: str) -> None:
        self.clear_bar()
        self._write("err", text + "\n")
        self.redraw()

    def bar(self, text: str) -> None:
        """The progress line: redrawn in place on a terminal, a plain line otherwise."""
        self.bar_text = text
        if self.tty:
            self._write("err", "\r" + text[:110].ljust(110))
        else:
            self._write("err", f"progress: {text}\n")

    def clear_bar(self) -> None:
        if self.tty and self.bar_text:
            self._write("err", "\r" + " " * 110 + "\r")

    def redraw(self) -> None:
        if self.tty and self.bar_text:
            self._write("err", "\r" + self.bar_text[:110].ljust(110))

    def finish(self) -> None:
        self.clear_bar()
        self.bar_text = ""


class PhaseProgress(Display):
    """What a script is doing and how far it is, for work that reports `(task, done, total, unit)`
    (`minigpt2.analysis.compare.Progress`): on a terminal a bar redrawn in place, with the time spent and an
    estimate of the time left. Otherwise (a log file, a pipe) a line once a phase has run `after`
    seconds — a timer prints it even while the phase is silent, such as a model loading — and then
    at most every `every` seconds: a log shows each long phase within seconds of its start, and
    quick phases (or an error in the first second) leave it alone."""

    def __init__(self, out=None, err=None, *, after: float = 2.0, every: float = 5.0) -> None:
        super().__init__(out, err)
        self.after, self.every = after, every
        self.state: tuple[str, int, int, str] | None = None
        self.started = self.shown = 0.0
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None

    def __call__(self, task: str, done: int, total: int, unit: str = "") -> None:
        now = time.monotonic()
        with self.lock:
            new = self.state is None or task != self.state[0]
            self.state = (task, done, total, unit)
            if new:
                self.started, self.shown = now, -math.inf
                self._cancel()
                if not self.tty:
                    self.timer = threading.Timer(self.after, self._late, args=(task,))
                    self.timer.daemon = True
                    self.timer.start()
                    return
            if self.tty:
                if new or now - self.shown >= 0.2 or done >= total:
                    self._show(now)
            elif now - self.started >= self.after and now - self.shown >= self.every and done < total:
                self._show(now)

    def _late(self, task: str) -> None:
        with self.lock:
            if self.state is not None and self.state[0] == task and self.shown == -math.inf:
                self._show(time.monotonic())

    def _show(self, now: float) -> None:
        task, done, total, unit = self.state
        self.shown = now
        elapsed = now - self.started
        left = f", about {format_duration(elapsed / done * (total - done))} left" if 0 < done < total else ""
        count = f": {done}/{total}{' ' + unit if unit else ''}" if total > 1 or unit else ""
        self.bar(f"{task}{count} ({format_duration(elapsed)} so far{left})")

    def _cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def finish(self) -> None:
        with self.lock:
            self._cancel()
            self.state = None
            super().finish()


class TrainConsole(Display):
    """Turns the trainer's records into lines for a person."""

    def __init__(self, out=None, err=None, *, log_every: int = 10, show_mfu: bool = False) -> None:
        super().__init__(out, err)
        self.log_every, self.show_mfu = log_every, show_mfu
        self.header_done = False
        self.steps = 0

    # ----- records --------------------------------------------------------------------------

    def show(self, r: dict) -> None:
        handler = getattr(self, "_" + r["type"], None)
        if handler is not None:
            handler(r)

    def _data(self, r):
        if r.get("rebuilt_because"):
            self.note(
                f"note: the cached tokens of this data could not be trusted ({r['rebuilt_because']}); tokenized again"
            )
        cached = ", from the cache" if r["cached"] else ""
        self.line(
            f"data: {len(r['files'])} file(s), {r['chars']:,} characters, {r['tokens']:,} tokens "
            f"({r['tokens_per_char']:.2f} tokens per character; {r['train_tokens']:,} for training{cached})"
        )
        for name, d in r["eval_sets"].items():
            self.line(
                f"eval set {name}: {d['chars']:,} characters, {d['tokens']:,} tokens "
                f"({d['tokens_per_char']:.2f} per character)"
            )

    def _rows(self, r):
        fields = " and ".join(f"'{f}'" for f in r["fields"])
        self.line(
            f"rows: {r['rows']:,} in {plural(r['sources'], 'source')}, the text of field {fields}; the first row "
            f'begins "{visible(r["first"])}"'
        )

    def _vocab(self, r):
        cached = ", from the cache" if r["cached"] else f" in {format_duration(r['learn_seconds'])}"
        self.line(f"vocabulary: {r['merges_learned']:,} new tokens learned{cached}; {r['vocab_size']:,} in all")
        for name, t in r["texts"].items():
            bpc = (
                f"; bits per character at step 0: {t['bits_per_char_before']:.3f} ({t['protocol_before']}) -> "
                f"{t['bits_per_char_after']:.3f} ({t['protocol_after']})"
                if "bits_per_char_after" in t
                else ""
            )
            self.line(
                f"  {name}: tokens per character {t['tokens_per_char_before']:.2f} -> "
                f"{t['tokens_per_char_after']:.2f}{bpc}"
            )

    def _phase(self, r):
        """A long phase before training (learning a vocabulary...): what, how far, about how long."""
        now = time.monotonic()
        if r["what"] != self.phase:
            self.phase, self.phase_at, self.plain_at = r["what"], now, 0.0
        done, total = r["done"], r["total"]
        left = ""
        if 0 < done < total and now - self.phase_at >= 1:
            left = f", ~{format_duration((now - self.phase_at) / done * (total - done))} left"
        share = f" ({100 * done / total:.0f}%)" if total else ""
        text = f"{r['what']}: {done:,} of {total:,}{share}{left}"
        if self.tty:
            self.bar(text)
        elif done in (0, total) or now - self.plain_at >= PLAIN_EVERY_S:
            self.plain_at = now
            self.bar(text)
        if done >= total:
            self.clear_bar()
            self.bar_text = ""

    def _dtype(self, r):
        self.line(f"precision: {r['dtype']} (--dtype auto: {r['why']})")

    def _final_only(self, r):
        self.note(
            f"note: {FLAGS['save_every']} 0: no checkpoints along the way, but the final one is always written "
            f"(about {format_bytes(r['bytes'])}, as {r['path']})"
        )

    def _disk(self, r):
        kept = "--keep-last 0 keeps all" if not r["keep_last"] else f"--keep-last {r['keep_last']}"
        where = "final/ alone" if r["folders"] == 1 else f"{plural(r['folders'], 'checkpoint')}: {kept}, and final/"
        self.line(
            f"checkpoints: {format_bytes(r['weights'])} of weights each, + {format_bytes(r['state'])} of optimizer "
            f"state in the newest two only (for --resume); about {format_bytes(r['total'])} in all "
            f"({where})"
        )

    def _lora(self, r):
        rows = f" + the rows of {r['trainable_tokens']:,} new tokens" if r.get("trainable_tokens") else ""
        self.line(
            f"LoRA r={r['r']}, alpha={r['alpha']:g} on {', '.join(r['targets'])}{rows}: "
            f"{r['trainable_params']:,} trainable parameters ({100 * r['trainable_share']:.2f}%), AdamW state "
            f"{format_bytes(r['optimizer_state_bytes'])} (full fine-tuning: "
            f"{format_bytes(r['full_optimizer_state_bytes'])})"
        )

    def _recovered(self, r):
        self.note(f"note: {r['message']}")

    _note = _recovered

    def _skipped(self, r):
        kept = f"kept as {r['kept_as']}" if r.get("kept_as") else "kept"
        self.note(f"note: skipped checkpoint {r['path']}: {r['why'].rstrip('.')}. It is {kept}, for inspection.")

    def _start(self, r):
        self.steps = r["steps"]
        what = f"resuming at step {r['step']}" if r["resumed"] else f"training from step {r['step']}"
        trainable = f" ({r['trainable']:,} trainable)" if r.get("trainable") and r["trainable"] != r["params"] else ""
        self.line(
            f"{what} of {r['steps']}: {r['params']:,} parameters{trainable}, {r['tokens_per_step']:,} tokens "
            f"per step ({r['tokens']:,} in all), {r['device']}, {r['dtype']}"
        )
        if r.get("ranks", 1) > 1:
            self.line(
                f"{r['ranks']} ranks{' (sharded)' if r.get('sharded') else ''}: global batch "
                f"{r['global_batch']} sequences per step"
            )

    def defaults(self, options, used: list[str], device: str) -> None:
        """The device defaults a run uses (`options.Resolved.defaults_used`), named by their flags, with
        the values `options` (a `TrainOptions`) holds."""
        if used:
            shown = ", ".join(f"{FLAGS[k]} {getattr(options, k)}" for k in used)
            self.line(
                f"defaults for {'a GPU' if device.startswith('cuda') else 'this ' + device}: {shown} "
                "(give any of them to change it)"
            )

    def schedule(self, change: dict | None) -> None:
        if change is None:
            return
        self.line(
            f"steps: {change['before']} -> {change['after']}: the learning-rate schedule now ends at step "
            f"{change['after']}; at step {change['step']} the rate is {change['lr_after']:.2e} "
            f"(it was {change['lr_before']:.2e})"
        )

    def _estimate(self, r):
        parts = [f"{format_duration(r['steps_s'])} of steps"]
        if r["evals_left"]:
            parts.append(f"{plural(r['evals_left'], 'evaluation')} {format_duration(r['evals_s'])}")
        if r["saves_s"]:
            parts.append(f"{plural(r['saves_left'], 'save')} {format_duration(r['saves_s'])}")
        busy = ""
        if r.get("load") is not None and r["load"] > r["cores"]:
            busy = (
                f"; the machine is busy (load {r['load']:.1f} on {r['cores']} cores), which slows this run: "
                "on a quiet one it would be shorter"
            )
        self.line(f"estimated time left: {format_duration(r['eta_s'])} ({', '.join(parts)}), at the speed so far{busy}")

    def _train(self, r):
        if r["step"] % self.log_every == 0 or r["step"] == self.steps or r["step"] == 1:
            self._row(r)
        self._progress(r["step"], r["eta_s"])

    def _progress(self, step: int, eta_s: float | None, doing: str = "") -> None:
        done = step / max(self.steps, 1)
        eta = f" ETA {format_duration(eta_s)}" if eta_s is not None else ""
        if self.tty:
            filled = int(30 * done)
            self.bar(f"[{'#' * filled}{'.' * (30 - filled)}] {step}/{self.steps} {100 * done:.0f}%{eta}{doing}")
        elif not doing and (step % self.log_every == 0 or step == self.steps or step == 1):
            self.bar(f"step {step}/{self.steps} ({100 * done:.0f}%),{eta}")

    def _row(self, r):
        if not self.header_done:
            self.line(
                f"{'step':>7} | {'train loss':>10} | {'lr':>8} | {'grad norm':>9} | {'tokens/s':>9}"
                + (" |   MFU" if self.show_mfu else "")
            )
            self.header_done = True
        mfu = f" | {100 * r['mfu']:4.1f}%" if self.show_mfu and r.get("mfu") is not None else ""
        self.line(
            f"{r['step']:>7} | {r['loss']:>10.4f} | {r['lr']:>8.2e} | {r['grad_norm']:>9.3f} | "
            f"{r['tokens_per_s']:>9,.0f}{mfu}"
        )

    def _eval_progress(self, r):
        left = f", ~{format_duration(r['eta_s'])} left in this evaluation" if r.get("eta_s") is not None else ""
        if self.tty:
            self._progress(r["step"], None, f" · evaluating {r['set']} {r['done']}/{r['total']}{left}")
        elif r["done"] == 1 or r["done"] == r["total"] or time.monotonic() - self.plain_at >= PLAIN_EVERY_S:
            self.plain_at = time.monotonic()
            self.bar(f"step {r['step']}/{self.steps}: evaluating {r['set']}, batch {r['done']} of {r['total']}{left}")

    def _sampling(self, r):
        what = f"sampling {plural(r['prompts'], 'prompt')} ({r['tokens']} new tokens each; Ctrl-C stops it)"
        if self.tty:
            self._progress(r["step"], None, f" · {what}")
        else:
            self.bar(f"step {r['step']}/{self.steps}: {what}")

    def _eval(self, r):
        self.line(
            f"eval step {r['step']:>5} | {r['set']}: loss {r['loss']:.4f}, ppl {r['ppl']:.2f}, "
            f"bpc {r['bpc']:.4f} ({r['eval_tokens']:,} tokens in windows of {r['window']}, {r['chars']:,} characters)"
        )

    def _samples(self, r):
        for s in r["samples"]:
            self.line(f"sample step {r['step']:>3} | [{one_line(s['prompt'])}] {one_line(s['text'])}")

    def _checkpoint(self, r):
        self.line(f"saved {r['path']} (step {r['step']}, {format_bytes(r.get('bytes'))})")

    _done = _checkpoint

    def _stopped(self, r):
        self.clear_bar()
        self.bar_text = ""
        if r["checkpoint"]:
            self.note(f"stopped by {r['reason']} at step {r['step']}: saved {r['checkpoint']}; continue with --resume")
        else:
            self.note(f"stopped by {r['reason']} before the first step: nothing to save")
