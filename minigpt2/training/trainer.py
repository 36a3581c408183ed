"""The training loop: read it top to bottom as one step of gradient descent, repeated.

    for step in range(steps):                        `Trainer.run`; one step is `Trainer.train_step`
        lr = schedule(step)                          warm up, then decay (why: see `lr_at`)
        for each of K micro-batches:                 gradient accumulation: a batch K times
            x, y = batch(...)                        bigger than fits in memory at once
            loss = model(x, y) / K
            loss.backward()                          gradients add up over the K passes
        clip the gradient norm to `grad_clip`        (why: see `Trainer.train_step`)
        stop if the loss is NaN or infinite          (last good checkpoint left untouched)
        optimizer.step(); zero the gradients         AdamW (why these groups: `param_groups`)
        now and then: evaluate, snapshot, save a checkpoint

Around it: mixed precision chosen per device, checkpoints that a resumed run continues from bit
for bit (what they hold and how they are read back: `checkpoint.TrainingState` and
`checkpoint.Checkpointer`; where they go and how they are replaced safely: `rundir.py`), a stop
on request (Ctrl-C, SIGTERM, SIGHUP) that saves first, and a record for every event. What the loop
reports about itself (losses read to the host only now and then, step times, the ETA, an
evaluation's time left) is in `progress.py`, each piece called here in one line. Under torchrun
the same loop runs on every rank, each on its own windows of the step's batch, with DDP or FSDP
exchanging gradients; rank 0 alone logs and writes (see distributed.py). The trainer never
prints: `Trainer.run()` yields records (dicts) and appends each to RUN/log.jsonl; the front end
(`train.py`) decides how to show them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minigpt2.checks import check_embed_warmup, finite, positive_int
from minigpt2.errors import MiniGPT2Error
from minigpt2.io.tokenizer import load_tokenizer
from minigpt2.model.evaluate import batches, char_counts, score_stream, spans
from minigpt2.model.flops import flops_per_token, peak_flops
from minigpt2.model.gpt import GPT
from minigpt2.model.lora import TOKEN_ROWS, is_lora
from minigpt2.model.snapshots import Snapshotter
from minigpt2.training.checkpoint import Checkpointer, TrainingState
from minigpt2.training.data import TokenFile, WindowSampler, gather_windows
from minigpt2.training.distributed import Dist, checkpoint_blocks, full_tensor, grad_sync, shard_model, wrap_ddp
from minigpt2.training.options import OPTION_RULES, check, default
from minigpt2.training.progress import EvalClock, StepTimer, UnreadSteps, estimate_record
from minigpt2.training.rundir import RunDir, dir_size
from minigpt2.training.watch import PromptSampler

READ_EVERY = 10  # on a GPU: steps between reads of the loss to the host (the console's default --log-every)


class TrainingDiverged(MiniGPT2Error):
    """The loss (or gradient norm) became NaN or infinite: the run stops, and no checkpoint is
    written after it (read every step, as on a CPU, it stops before the bad update; see `train_step`)."""


@dataclass
class TrainConfig:
    """Everything that decides what the loop computes (and must match when resuming).

    A field that is also one of train.py's options takes that option's default and check (both
    written once, in options.py): `TrainConfig(steps=100)` trains as train.py does on a CPU, but
    for the evaluation and checkpoint rhythm, whose defaults here suit a library call.
    """

    steps: int
    batch_size: int = default("batch_size")
    seq_len: int = default("seq_len")  # train.py's CPU default (on a GPU it takes the model's context)
    grad_accum: int = default("grad_accum")
    lr: float = default("lr")
    min_lr: float | None = None  # default lr / 10
    warmup: int | None = None  # default 5% of the steps, at most 1,000
    weight_decay: float = default("weight_decay")
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = default("grad_clip")
    eval_every: int | None = None  # default a tenth of the steps; 0: only at the start and the end
    eval_tokens: int = default("eval_tokens", "cuda")  # per eval set and evaluation (train.py's GPU default)
    save_every: int = 0  # 0: only at the end (and on a stop request)
    snapshot_every: int = default("snapshot_every")
    seed: int = default("seed")
    ranks: int = 1  # data-parallel processes (torchrun); each step covers batch x accum x ranks windows
    new_token_lr: float | None = None  # peak learning rate of a grown vocabulary's new rows (default lr)
    embed_warmup: int = 0  # first steps in which only those rows train (see `Trainer.phase`)

    def __post_init__(self) -> None:
        # Finite first, then the range: NaN passes every `< 0` test and would train one step of
        # garbage before anything noticed. Errors name the field (`OptionError.option`); the
        # script renders it as its flag. Each option's own rule is the option's (`check`).
        for name in (f.name for f in dataclasses.fields(self) if f.name in OPTION_RULES):
            if getattr(self, name) is not None:
                check(name, getattr(self, name))
        positive_int("ranks", self.ranks)
        for name in ("beta1", "beta2"):
            finite(name, getattr(self, name), low=0, high=1, high_open=True)
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        finite("min_lr", self.min_lr, low=0, high=self.lr)
        if self.warmup is None:
            self.warmup = min(1000, round(0.05 * self.steps))
        if self.eval_every is None:
            self.eval_every = max(1, self.steps // 10)
        check_embed_warmup(self.embed_warmup, self.steps)

    @property
    def global_batch(self) -> int:
        """Windows (sequences) per optimizer step, over all ranks."""
        return self.batch_size * self.grad_accum * self.ranks

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def steps_for(
    *,
    steps: int | None = None,
    epochs: float | None = None,
    tokens: int | None = None,
    train_tokens: int,
    tokens_per_step: int,
) -> int:
    """The number of optimizer steps for `--steps`, `--epochs` or `--tokens` (one epoch if none)."""
    given = [x for x in (steps, epochs, tokens) if x is not None]
    if len(given) > 1:
        raise MiniGPT2Error("give only one of `steps`, `epochs` and `tokens`")
    if steps is not None:
        return steps
    if tokens is None:
        tokens = (1.0 if epochs is None else epochs) * train_tokens
    if tokens <= 0:
        raise MiniGPT2Error("`epochs` and `tokens` must be positive")
    return max(1, math.ceil(tokens / tokens_per_step))


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay.

    Why warm up: at the start AdamW's second-moment estimates are built from a handful of
    gradients and are noisy, and a model fresh from random init (or meeting new text) has large,
    erratic gradients. Full-size steps then can knock the weights somewhere they never recover
    from; ramping the rate up over the first steps avoids that.

    Why cosine: large steps make fast progress early; small steps late let the weights settle
    into a minimum instead of bouncing around it. The cosine goes smoothly from `lr` to `min_lr`
    without a schedule to tune.
    """
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.steps <= config.warmup:
        return config.lr
    progress = (step - config.warmup) / (config.steps - config.warmup)  # 0 → 1
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (config.lr - config.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's groups: the matrices of the linear layers decay, nothing else does.

    Weight decay pulls weights towards zero, a regulariser for the big matrices that mix
    features. It makes no sense for biases and LayerNorm gains (pulling a gain towards zero just
    shrinks a layer's output, which the next layer must undo), nor for embeddings (a row that is
    rarely used would decay away between the few steps that use it). Each group carries the
    parameter names too, so the optimizer state can be saved under readable names.

    A grown vocabulary's new rows, when they are a parameter of their own (lora.TrainableTokens),
    get a third group (`"new_tokens": True`, no decay): their own learning rate and phase.
    """
    decay, no_decay, tokens, seen = ([], []), ([], []), ([], []), set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue  # lm_head.weight is wte.weight (tied): one tensor, listed once, as wte
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            group = decay if isinstance(module, nn.Linear) and name == "weight" else no_decay
            group = tokens if full.removeprefix("_orig_mod.").endswith(TOKEN_ROWS) else group
            group[0].append(full)
            group[1].append(p)
    groups = [
        {"params": decay[1], "names": decay[0], "weight_decay": weight_decay},
        {"params": no_decay[1], "names": no_decay[0], "weight_decay": 0.0},
    ]
    if tokens[1]:
        groups.append({"params": tokens[1], "names": tokens[0], "weight_decay": 0.0, "new_tokens": True})
    return groups


class Trainer:
    """Trains `model` on windows of `train` and evaluates it on `eval_sets`, writing into `run`.

    Args:
        model: a `GPT` (float32 weights; it is moved to `device`).
        train: the training tokens.
        eval_sets: name → tokens, e.g. {"val": held-out tail, "鲁迅小说集": another text}.
        config: the `TrainConfig`.
        run: the run directory (a `RunDir` or a path; `run.json` is written by the caller).
        device, dtype: where, and in which autocast precision, to compute.
        compile: wrap the model in `torch.compile` for training steps.
        tokenizer_source: where checkpoints copy vocab.json + merges.txt from.
        base_model: the model a LoRA adapter applies to (its `base_model_name_or_path` for PEFT).
        char_counts: characters per token id of the tokenizer that made the data
            (`evaluate.char_counts`), for bits per character; by default read from
            `tokenizer_source` (GPT-2's without one) at the first evaluation.
        snapshotter: with `config.snapshot_every`, measures drift from the starting model.
        prompt_sampler: continues its prompts after every evaluation (a `samples` record; see
            `minigpt2.training.watch`); on rank 0 only, so not with a sharded model.
        dist: this process's place in a torchrun job (`distributed.setup`); None: one process.
        shard: FSDP2 (`distributed.shard_model`) instead of DDP: weights, gradients and AdamW state
            split over the ranks (with one process: one shard, i.e. the plain model).
        activation_checkpointing: recompute each block's activations in backward.
        keep_last: step checkpoints to keep (older ones are deleted once a newer one is complete;
            `final/` is always kept); 0 keeps them all.
    """

    def __init__(
        self,
        model: GPT,
        train: TokenFile,
        eval_sets: dict[str, TokenFile],
        config: TrainConfig,
        run: RunDir | str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
        tokenizer_source: str | os.PathLike | None = None,
        base_model: str | None = None,
        snapshotter: Snapshotter | None = None,
        prompt_sampler: PromptSampler | None = None,
        dist: Dist | None = None,
        shard: bool = False,
        activation_checkpointing: bool = False,
        keep_last: int = 0,
        char_counts: np.ndarray | None = None,
    ) -> None:
        self.dist = dist or Dist(device=torch.device(device))
        self.sharded = shard and self.dist.enabled
        check_setup(model, config, self.dist, self.sharded, snapshotter, prompt_sampler)
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.run_dir = run if isinstance(run, RunDir) else RunDir(run)
        self.out = self.run_dir.path
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.train_data = train
        self.eval_sets = eval_sets
        self.char_counts = char_counts
        self.snapshotter = snapshotter
        self.prompt_sampler = prompt_sampler
        self.sampler = WindowSampler(len(train), config.seq_len, config.batch_size, config.seed)
        self._build_model(model, compile, activation_checkpointing)
        self._build_optimizer()
        # Checkpointing is a component: handed what it saves (`states`) and where (`run_dir`).
        self.states = TrainingState(self.raw_model, self.optimizer, self.scaler, self.params, self.param_names,
                                    config, self.sharded)  # fmt: skip
        self.checkpointer = Checkpointer(self.run_dir, dist=self.dist, device=self.device, keep_last=keep_last,
                                         tokenizer_source=tokenizer_source, base_model=base_model)  # fmt: skip
        self.tokenizer_source = tokenizer_source
        self.peak_flops = peak_flops(self.device, dtype)
        if self.peak_flops:
            self.peak_flops *= self.dist.world_size  # MFU of the whole job: all GPUs' peak
        self.timer = StepTimer(config, self.device, [len(d) for d in eval_sets.values()],
                               flops_per_token(self.raw_model.config, config.seq_len), self.peak_flops)  # fmt: skip

        self.step = 0
        self.tokens = 0
        self.stop_reason: str | None = None
        self.resumed_from: Path | None = None
        # Steps between reads of the loss and gradient norm to the host. Each read waits for the
        # device to finish its queue; on a CPU there is no queue, so every step is read (and a
        # NaN stops the run before its update). See `train_step`.
        self.read_every = 1 if self.device.type == "cpu" else READ_EVERY
        self.last = {"eval": None, "snapshot": None}  # the step each was last done at
        # Dropout's random numbers, reproducibly; each rank its own stream (rank 0's is a
        # one-process run's).
        torch.manual_seed(config.seed + self.dist.rank)

    def _build_model(self, model: GPT, compile: bool, activation_checkpointing: bool) -> None:
        if self.device.type == "cuda":
            # TF32: float32 matmuls on tensor cores with a 10-bit mantissa, ~8x faster, and
            # plenty for the parts autocast leaves in float32. A process-wide switch.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.raw_model = model.to(self.device)
        self.raw_model.train()
        if activation_checkpointing:
            checkpoint_blocks(self.raw_model)
        if self.sharded:
            shard_model(self.raw_model)  # in place: raw_model's parameters become this rank's slices
        # torch.compile fuses the many small element-wise kernels (GELU, LayerNorm, residual adds)
        # and removes Python overhead; the raw model stays around for saving and evaluation.
        # Under torchrun without --shard, DDP wraps it (and is what gets compiled).
        self.ddp = wrap_ddp(self.raw_model, self.dist) if self.dist.enabled and not self.sharded else None
        train_module = self.ddp or self.raw_model
        self.model = torch.compile(train_module) if compile else train_module

    def _build_optimizer(self) -> None:
        c = self.config
        groups = param_groups(self.raw_model, c.weight_decay)
        if (c.new_token_lr is not None or c.embed_warmup) and not any(g.get("new_tokens") for g in groups):
            option = "new_token_lr" if c.new_token_lr is not None else "embed_warmup"
            raise MiniGPT2Error(f"`{option}` needs the new rows of a grown vocabulary (`extend_vocab`) as their own")
        if c.embed_warmup and self.dist.enabled:
            raise MiniGPT2Error("`embed_warmup` does not work under torchrun yet: train on one process")
        self.param_names = [name for g in groups for name in g.pop("names")]
        self.params = [p for g in groups for p in g["params"]]
        self.body_params = [p for g in groups if not g.get("new_tokens") for p in g["params"]]
        # After an embedding warm-up the rest starts its own warm-up and cosine over the steps left.
        self.body_schedule = c
        if c.embed_warmup:
            self.body_schedule = dataclasses.replace(c, steps=c.steps - c.embed_warmup, embed_warmup=0)
        # The fused kernel updates every tensor in one pass (one launch on a GPU) instead of a
        # dozen element-wise passes over every tensor: less memory traffic, less overhead.
        fused = self.device.type in ("cuda", "cpu") and not self.sharded
        self.optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=1e-8, fused=fused)
        # fp16 has a narrow range: small gradients underflow to zero. The scaler multiplies the
        # loss by a large factor before backward and divides it out before the step, skipping
        # steps whose gradients overflowed. bf16 has float32's range and needs none of this.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    # ----- the loop ---------------------------------------------------------------------------

    def run(self) -> Iterator[dict]:
        """Train to `config.steps`, yielding every record as it happens (see the module docstring)."""
        c = self.config
        unread = UnreadSteps(c, first_step=self.step)  # train records whose loss is still on the device
        yield self._emit(self._start_record())
        if self.step == 0:
            yield from self._baseline()  # where the starting model stands, before any step
        while self.step < c.steps:
            # A stop request reaches the ranks at different moments: they agree on it first,
            # so all stop after the same step.
            if self.dist.any(self.stop_reason is not None):
                yield from self._report(unread)
                yield self._stopped(unread.first_step)
                return
            record = self.train_step(read=self.read_every == 1)  # batch, forward, backward, clip, step
            if unread.add(record, self.read_every):
                yield from self._report(unread)  # losses read and checked, logged with the time left
            # What is due after this step (none after the last step, which ends with all three anyway,
            # nor a checkpoint when a stop will save one).
            if due(c.eval_every, self.step) and self.step < c.steps:
                yield from self._evaluation()
            if self.snapshotter is not None and due(c.snapshot_every, self.step):
                yield self._snapshot()
            if due(c.save_every, self.step) and self.step < c.steps and self.stop_reason is None:
                yield self._saved("checkpoint", self._save())
        # The end: evaluate (unless just done), snapshot, save the final model.
        if self.last["eval"] != self.step:
            yield from self._evaluation()
        if self.snapshotter is not None and c.snapshot_every and self.last["snapshot"] != self.step:
            yield self._snapshot()  # the drift curves end where the run ends
        yield self._saved("done", self._save("final"))

    def train_step(self, read: bool = True) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns its train record.

        With `read=False` the loss and gradient norm stay on the device (0-d tensors) and nothing
        waits for it: a GPU's queue of kernels keeps running ahead of Python. `read_records` reads
        many steps in one transfer later, and checks them for NaN/inf then. Reading every step (a
        CPU's default, where it costs nothing) stops *before* a bad update; reading every N steps
        (a GPU's) up to N - 1 updates after it: the model in memory is then damaged, but no
        checkpoint is, as each is written only after a read.
        """
        c = self.config
        started = time.perf_counter()
        lr = self.phase()  # the schedule (`lr_at`): warm-up, then cosine; new rows may have their own
        for group in self.optimizer.param_groups:
            group["lr"] = self.new_token_lr() if group.get("new_tokens") else lr

        # Forward and backward, K times. Dividing each loss by K makes the summed gradients
        # those of the mean loss over the whole (K times larger) batch.
        loss_sum = torch.zeros((), device=self.device)
        for k in range(c.grad_accum):
            x, y = self.batch(self.step * c.grad_accum + k)
            with self.grad_sync(k == c.grad_accum - 1):
                with self.autocast():
                    _, loss = self.model(x, y)
                self.scaler.scale(loss / c.grad_accum).backward()
            loss_sum += loss.detach()

        # Clipping: one unlucky batch can produce a gradient many times larger than usual; an
        # AdamW step along it would undo many steps of progress. Rescaling the whole gradient
        # to norm <= grad_clip keeps its direction but bounds the step. (Unscale first, so the
        # norm is that of the true gradient, not of the fp16 loss-scaled one.)
        self.scaler.unscale_(self.optimizer)
        clip = c.grad_clip if c.grad_clip > 0 else float("inf")
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, clip))
        record = {"type": "train", "step": self.step + 1, "loss": loss_sum / c.grad_accum, "grad_norm": grad_norm,
                  "lr": self.new_token_lr() if self.step < c.embed_warmup else lr, "started": started}  # fmt: skip
        if read:  # before the update: a non-finite loss stops the run with the weights intact
            self._read_values([record], before_update=True)

        self.scaler.step(self.optimizer)  # AdamW; the scaler skips the step if fp16 grads overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)  # free the gradients' memory until next backward
        self.step += 1
        self.tokens += c.tokens_per_step
        record.update(tokens=self.tokens, epoch=self.tokens / len(self.train_data))
        if read:
            self.timer.time_steps([record])
        return record

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step, saving a checkpoint first (signal-safe)."""
        self.stop_reason = reason

    # ----- pieces of a step ---------------------------------------------------------------

    def autocast(self):
        """Mixed precision: matmuls in bf16/fp16 where asked; nothing changes in float32."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, T) of this rank's training micro-batch `index`: sampler batch
        index * ranks + rank, so the ranks read disjoint windows (see `WindowSampler`)."""
        offsets = self.sampler.offsets(index * self.dist.world_size + self.dist.rank)
        return self._inputs_targets(gather_windows(self.train_data.tokens, offsets, self.config.seq_len))

    def _inputs_targets(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T + 1) windows → inputs x = tokens 0..T-1 and targets y = tokens 1..T (the next ones)."""
        windows = torch.from_numpy(windows)
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        else:
            windows = windows.to(self.device)
        return windows[:, :-1], windows[:, 1:]

    def grad_sync(self, last_micro_step: bool):
        """Data parallelism skips the gradient all-reduce until the last micro-step (DDP's
        `no_sync()`, see `distributed.grad_sync`); with one process there is nothing to synchronise."""
        if not self.dist.enabled:
            return contextlib.nullcontext()
        return grad_sync(self.ddp or self.raw_model, last_micro_step, self.sharded)

    def phase(self) -> float:
        """What trains at this step, and the learning rate of the body (everything but new rows).

        With `embed_warmup` K (the first stage of the Chinese-LLaMA recipe): for steps 0..K-1 only a
        grown vocabulary's new rows train. The rest is frozen (no gradient is computed for it, so
        no optimizer state either), because its gradient at first is mostly the model's
        reaction to new rows that still mean nothing: random-ish pushes that would damage what
        it knows. From step K on, everything trains, the body with a warm-up and cosine of its own
        over the steps left. Decided from the step alone, so a resumed run is in the same phase.
        """
        c = self.config
        alone = self.step < c.embed_warmup
        for p in self.body_params:
            p.requires_grad_(not alone)
        return 0.0 if alone else lr_at(self.step - c.embed_warmup, self.body_schedule)

    def new_token_lr(self) -> float:
        """The learning rate of a grown vocabulary's new rows at this step: the run's schedule from
        step 0, scaled to peak at `new_token_lr` (default: `lr`, the same as everything else)."""
        c = self.config
        return lr_at(self.step, c) * (c.new_token_lr or c.lr) / c.lr

    # ----- reading steps' losses to the host ------------------------------------------------

    def read_records(self, records: list[dict]) -> list[dict]:
        """Complete the records of steps run with `read=False`: their loss and gradient norm read
        in one transfer (one wait for the device), checked, and the steps' mean time filled in."""
        self._read_values(records, before_update=False)
        self.timer.time_steps(records)
        return records

    def _read_values(self, records: list[dict], before_update: bool) -> None:
        values = torch.stack([torch.stack([r["loss"].float(), r["grad_norm"].float()]) for r in records]).tolist()
        losses = [v[0] for v in values]
        if self.dist.enabled:  # the mean over the global batch (every rank gets the same number)
            losses = [total / self.dist.world_size for total in self.dist.sum(*losses)]
        for record, loss, (_, grad_norm) in zip(records, losses, values):
            record.update(loss=loss, grad_norm=grad_norm)
            if not math.isfinite(loss):
                extra = "or use float32/bfloat16 instead of float16"
                self._diverged(f"the training loss became {loss}", extra, record["step"], before_update)
            if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                self._diverged(f"the gradient norm became {grad_norm}", "", record["step"], before_update)

    def _diverged(self, what: str, extra: str, step: int, before_update: bool) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        found = self.run_dir.checkpoints() if self.dist.is_main else []
        last = (
            f"the last good checkpoint, {found[-1].path}, is untouched" if found else "no checkpoint had been saved yet"
        )
        when = "before the update" if before_update else "before saving any later step"
        raise TrainingDiverged(
            f"{what} at step {step}; stopping {when} ({last}). "
            f"Lower the learning rate, lengthen the warm-up{', ' + extra if extra else ''}."
        )

    # ----- checkpoints (see checkpoint.Checkpointer) ------------------------------------------

    def save_checkpoint(self, name: str | None = None) -> Path:
        """Write a checkpoint of the current step to RUN/step-NNNNNN (or RUN/`name`); return its path."""
        return self.checkpointer.save(self.states, self.step, self.tokens, name)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Continue from the checkpoint at `path` (a `CheckpointError` leaves the trainer as it was)."""
        self.step, self.tokens = self.checkpointer.load(self.states, path)
        self.resumed_from = Path(path)

    def resume(self) -> list[dict]:
        """Continue from the run's newest readable checkpoint, setting damaged ones aside; returns one
        record per checkpoint skipped ({"path", "why", "kept_as"})."""
        found = self.checkpointer.resume(self.states)
        if found.path is not None:
            self.step, self.tokens, self.resumed_from = found.step, found.tokens, found.path
        return found.skipped

    # ----- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> Iterator[dict]:
        """Loss, perplexity and bits per character on each eval set (same windows every time).

        Yields an `eval_progress` record after every batch (for a progress bar; not logged) and
        one `eval` record per set. A stop request ends it between two batches: the set being
        evaluated is then dropped, never reported from part of its windows.
        """
        self.raw_model.eval()  # dropout off
        clock = EvalClock(sum(self._eval_rounds(d) for d in self.eval_sets.values()))  # for the time left
        try:
            for name, data in self.eval_sets.items():
                record = yield from self._evaluate_set(name, data, clock)
                if record is None:  # stopped part way
                    return
                if record:  # {}: a set too short for one window
                    yield record
        finally:
            self.raw_model.train()

    def _eval_rounds(self, data: TokenFile) -> int:
        """The forward passes each rank runs to evaluate `data` (for the evaluation's estimate)."""
        window = min(self.config.seq_len, len(data) - 1)
        if window < 1:
            return 0
        windows = spans(len(data) + 1, window, self.config.eval_tokens)
        groups = batches(windows, self.config.batch_size) if windows else []
        return math.ceil(len(groups) / self.dist.world_size)

    def _evaluate_set(self, name: str, data: TokenFile, clock: EvalClock) -> Iterator[dict]:
        """One eval set scored by `evaluate.score_stream` (the protocol every figure shares): the
        first `eval_tokens` tokens in windows of `seq_len`; {} for a set too short to score."""
        window = min(self.config.seq_len, len(data) - 1)
        if window < 1:
            return {}
        if self.char_counts is None:
            self.char_counts = char_counts(load_tokenizer(self.tokenizer_source or "gpt2"))
        scoring = score_stream(self.raw_model, data.tokens, self.char_counts, window=window,
                               max_tokens=self.config.eval_tokens, batch_size=self.config.batch_size,
                               device=self.device, autocast=self.autocast, dist=self.dist, sharded=self.sharded,
                               stop=lambda: self.stop_reason is not None)  # fmt: skip
        while True:
            try:
                done, total = next(scoring)
            except StopIteration as finished:
                score = finished.value
                break
            yield {"type": "eval_progress", "step": self.step, "set": name, "done": done, "total": total,
                   "eta_s": clock.tick()}  # fmt: skip
        if score is None:  # stopped part way
            return None
        return {
            "type": "eval",
            "step": self.step,
            "tokens": self.tokens,
            "set": name,
            "loss": score.loss,
            "ppl": score.perplexity,
            "bpc": score.bits_per_char,
            "eval_tokens": score.tokens,
            "window": score.window,
            "chars": score.characters,
        }

    # ----- what the loop calls --------------------------------------------------------------

    def _emit(self, record: dict) -> dict:
        if self.dist.is_main and record["type"] != "eval_progress":  # every rank yields; rank 0 logs
            self.run_dir.log(record)
        return record

    def _baseline(self) -> Iterator[dict]:
        """Step 0: evaluate the starting model, the baseline every later evaluation is read against
        (unless the log has it: a run resumed before its first checkpoint), and snapshot it."""
        if not self._logged_step0_eval():
            yield from self._evaluation()
        self.last["eval"] = 0
        if self.snapshotter is not None and self.config.snapshot_every and self.stop_reason is None:
            yield self._snapshot()

    def _logged_step0_eval(self) -> bool:
        """The step-0 evaluation is in the log already (a run resumed before its first checkpoint)."""
        done = {r.get("set") for r in self.run_dir.read_log() if r.get("type") == "eval" and r.get("step") == 0}
        return bool(self.eval_sets) and set(self.eval_sets) <= done

    def _report(self, unread: UnreadSteps) -> Iterator[dict]:
        """The records of the steps not read yet, completed (see `train_step`), logged and yielded
        with the time left; at the estimate's step, the estimate too."""
        records = unread.take()
        if records and isinstance(records[0]["loss"], torch.Tensor):
            self.read_records(records)
        for record in records:
            self.timer.add("step", record["step_s"])
            yield self._emit({**record, **self.eta()})
            if record["step"] == unread.estimate_step:
                yield estimate_record(record["step"], self.eta(), self.device)

    def eta(self) -> dict:
        """Seconds left, and the evaluations and saves still due (see `progress.StepTimer.eta`)."""
        return self.timer.eta(self.step)

    def _snapshot(self) -> dict:
        """Measure and store a snapshot; the record yielded (not logged: snapshots.jsonl has it)
        also carries its per-layer drift, for a live view such as TensorBoard."""
        self.last["snapshot"] = self.step
        drift = None
        if self.dist.is_main:
            measured = self.snapshotter.measure(self.raw_model, self.step, self.tokens)
            self.run_dir.add_snapshot(measured)
            drift = self.snapshotter.layer_drift(measured)
        record = self._emit({"type": "snapshot", "step": self.step, "tokens": self.tokens})
        return {**record, "drift": drift} if drift is not None else record

    def _evaluation(self) -> Iterator[dict]:
        yield from self.timer.timed("eval", self._evaluate_and_sample())
        self.last["eval"] = self.step

    def _evaluate_and_sample(self) -> Iterator[dict]:
        """The evaluation's records, then (rank 0, unless a stop was asked for) the samples."""
        yield from (self._emit(r) for r in self.evaluate())
        if self.prompt_sampler is not None and self.dist.is_main and self.stop_reason is None:
            s = self.prompt_sampler  # a phase of its own on the progress line; Ctrl-C ends it between tokens
            yield {"type": "sampling", "step": self.step, "prompts": len(s.prompts), "tokens": s.max_new_tokens}
            record = s.draw(self.raw_model, self.step, self.tokens, stop=lambda: self.stop_reason is not None)
            if record is not None:
                yield self._emit(record)

    def _save(self, name: str | None = None) -> Path:
        with self.timer.measure("save"):
            return self.save_checkpoint(name)

    def _start_record(self) -> dict:
        c = self.config
        return {"type": "start", "step": self.step, "steps": c.steps, "tokens_per_step": c.tokens_per_step,
                "tokens": c.steps * c.tokens_per_step, "ranks": c.ranks, "global_batch": c.global_batch,
                "sharded": self.sharded, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "params": self.raw_model.num_params(), "trainable": sum(p.numel() for p in self.params),
                "resumed": self.resumed_from is not None}  # fmt: skip

    def _saved(self, kind: str, path: Path) -> dict:
        size = dir_size(path) if self.dist.is_main else None
        return self._emit({"type": kind, "step": self.step, "tokens": self.tokens, "path": str(path), "bytes": size})

    def _stopped(self, first_step: int) -> dict:
        self.stop_reason = self.stop_reason or "SIGTERM"
        path = None
        if self.step > first_step:
            path = str(self._save())
        elif self.resumed_from is not None:
            path = str(self.resumed_from)  # nothing new since: the checkpoint resumed from stands
        return self._emit(
            {
                "type": "stopped",
                "step": self.step,
                "tokens": self.tokens,
                "reason": self.stop_reason,
                "checkpoint": path,
            }
        )


def due(every: int, step: int) -> bool:
    """Whether something done every `every` steps (0: never) is due after `step`."""
    return bool(every) and step % every == 0


def check_setup(model: GPT, config: TrainConfig, dist: Dist, sharded: bool, snapshotter, prompt_sampler) -> None:
    """The combinations a `Trainer` refuses before it changes anything."""
    if config.ranks != dist.world_size:
        raise MiniGPT2Error(f"TrainConfig.ranks is {config.ranks} but the job has {dist.world_size} rank(s)")
    if sharded and snapshotter is not None:
        raise MiniGPT2Error(
            "weight snapshots do not work with sharding (each rank holds only a slice of the "
            "weights); snapshot a run that is not sharded"
        )
    if sharded and prompt_sampler is not None:
        raise MiniGPT2Error(
            "samples while training do not work with sharding (a sharded model's forward pass "
            "needs every rank); turn them off for a sharded run"
        )
    if sharded and is_lora(model):
        raise MiniGPT2Error(
            "LoRA does not work with a sharded model yet; its adapters and optimizer state "
            "are small, so train it unsharded"
        )
    if config.seq_len > model.config.n_positions:
        raise MiniGPT2Error(
            f"the sequence length {config.seq_len} is longer than the model's context of "
            f"{model.config.n_positions} tokens"
        )
