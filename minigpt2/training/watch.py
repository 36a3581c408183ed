"""Watching a run while it trains: short samples at every evaluation, and TensorBoard.

The question a person fine-tuning GPT-2 on Chinese actually asks is "is it writing better Chinese
yet?". The loss answers it in numbers; a sample answers it in text. `PromptSampler` continues a few
fixed prompts at every evaluation with a *fixed seed*: the same seed every time, so what changes
from one evaluation to the next is the model, not the luck of the draw. By default one Chinese and
one English prompt (the same sentence): the first shows what is being learned, the second what is
being forgotten.

`TensorBoardLog` turns the trainer's records (the same ones log.jsonl holds) into TensorBoard
scalars and text, with PyTorch's own `torch.utils.tensorboard.SummaryWriter`; the `tensorboard`
package it needs is an optional extra (`require_tensorboard` says how to install it).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

from minigpt2.errors import MiniGPT2Error
from minigpt2.generation import SAMPLE_SEED, SAMPLE_TOKENS
from minigpt2.generation.sampling import draw_samples
from minigpt2.generation.utf8 import Utf8Guard
from minigpt2.model.gpt import GPT

# The same sentence in the language being learned and in the one the model knew: the first
# sample shows the new language arriving, the second the old one fading (or not).
DEFAULT_SAMPLE_PROMPTS = ("他走进屋里，看见", "He walked into the room and saw")
TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard: --tensorboard's folder when none is given


class _SamplingStopped(Exception):
    """A stop request (Ctrl-C) reached a draw of samples: it ends between two tokens."""


class PromptSampler:
    """The trainer's samples while training: fixed prompts, a fixed seed, at every evaluation."""

    def __init__(self, enc, prompts: Sequence[str], max_new_tokens: int = SAMPLE_TOKENS, seed: int = SAMPLE_SEED):
        if not prompts or max_new_tokens < 1:
            raise MiniGPT2Error("samples while training need at least one prompt and one new token")
        self.enc, self.prompts, self.max_new_tokens, self.seed = enc, list(prompts), max_new_tokens, seed
        self.guard: Utf8Guard | None = None  # built once, on the model's device, at the first draw

    def draw(self, model: GPT, step: int, tokens: int, stop=None) -> dict | None:
        """The `samples` record of this step: each prompt's continuation and the seconds it took.
        (In the weights' own precision, float32, whatever the training's autocast: a few dozen
        tokens cost little, and the samples do not depend on the mixed-precision setting.)
        `stop()` is asked as the text comes (every token or few): once it says yes (Ctrl-C), the
        draw ends there and None is returned, so a stop request waits for no sample."""
        started = time.perf_counter()
        if self.guard is None:
            self.guard = Utf8Guard.for_tokenizer(self.enc, model.config.vocab_size, model.wte.weight.device)

        def check(i: int, piece: str) -> None:
            if stop is not None and stop():
                raise _SamplingStopped

        try:
            samples = draw_samples(model, self.enc, self.prompts, self.max_new_tokens, seed=self.seed,
                                   guard=self.guard, on_text=check)  # fmt: skip
        except _SamplingStopped:
            return None
        return {
            "type": "samples",
            "step": step,
            "tokens": tokens,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
            "samples": samples,
            "seconds": time.perf_counter() - started,
        }


# ----- TensorBoard ------------------------------------------------------------------------


def require_tensorboard() -> None:
    """Nothing if the `tensorboard` package is installed; else a `MiniGPT2Error` naming the extra."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError:
        raise MiniGPT2Error(
            "--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard "
            "(or install minigpt2 with its 'tensorboard' extra: pip install -e \".[tensorboard]\")"
        ) from None


TRAIN_SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                 "tokens_per_s": "train/tokens_per_s", "mfu": "train/mfu"}  # fmt: skip


class TensorBoardLog:
    """The trainer's records as TensorBoard event files in `logdir` (one run's folder).

    Scalars against the optimizer step: train/loss, lr, grad_norm, tokens_per_s, mfu (when the
    device's peak is known); eval/SET/loss and eval/SET/bpc per eval set; drift/weights/LAYER and
    drift/activations/BLOCK at each snapshot. Text: samples/PROMPT-NUMBER at each evaluation.
    """

    def __init__(self, logdir: str | os.PathLike, resumed_at: int = 0) -> None:
        """`resumed_at`: the step a resumed run continues from. TensorBoard then hides what an
        earlier process logged after it (the steps after the checkpoint, which are trained again)."""
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = str(logdir)
        self.writer = SummaryWriter(self.logdir, purge_step=resumed_at + 1 if resumed_at else None)

    def _scalar(self, tag: str, value, step: int) -> None:
        if value is not None and math.isfinite(value):
            self.writer.add_scalar(tag, float(value), step)

    def write(self, r: dict) -> None:
        kind, step = r["type"], r.get("step", 0)
        if kind == "train":
            for key, tag in TRAIN_SCALARS.items():
                self._scalar(tag, r.get(key), step)
        elif kind == "eval":
            self._scalar(f"eval/{r['set']}/loss", r["loss"], step)
            self._scalar(f"eval/{r['set']}/bpc", r["bpc"], step)
        elif kind == "snapshot" and r.get("drift"):
            for layer, value in r["drift"]["weight_drift"].items():
                self._scalar(f"drift/weights/{layer}", value, step)
            for block, value in r["drift"]["activation_drift"].items():
                self._scalar(f"drift/activations/{block}", value, step)
        elif kind == "samples":
            for number, s in enumerate(r["samples"], 1):
                # TensorBoard renders text as Markdown: the prompt in bold, then the continuation.
                shown = s["text"].replace("\n", "  \n")
                self.writer.add_text(f"samples/prompt {number}", f"**{s['prompt']}**{shown}", step)
        if kind in ("eval", "samples", "snapshot", "checkpoint", "done", "stopped"):
            self.writer.flush()  # visible in a running TensorBoard now, not minutes later

    def close(self) -> None:
        self.writer.close()


def tensorboard_dir(run: str | os.PathLike, given: str | None = None) -> str:
    """The folder given, else RUN/tensorboard: inside the run folder, so `tensorboard --logdir
    runs/` shows every run side by side."""
    return given or os.path.join(os.fspath(run), TENSORBOARD_DIR)


def sample_prompts(given: Sequence[str] | None) -> list[str]:
    """The prompts to sample while training: those given, else the defaults."""
    return list(given) if given else list(DEFAULT_SAMPLE_PROMPTS)
