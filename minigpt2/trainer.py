"""The training loop: read it top to bottom as one step of gradient descent, repeated.

    for step in range(steps):
        lr = schedule(step)                          warm up, then decay (why: see `lr_at`)
        for each of K micro-batches:                 gradient accumulation: a batch K times
            loss = model(x, y) / K                   bigger than fits in memory at once
            loss.backward()                          gradients add up over the K passes
        stop if the loss is NaN or infinite          (last good checkpoint left untouched)
        clip the gradient norm to `grad_clip`        (why: see `Trainer.train_step`)
        optimizer.step(); zero the gradients         AdamW (why these groups: `param_groups`)
        now and then: evaluate, snapshot, save a checkpoint

Around it: mixed precision chosen per device, checkpoints that a resumed run continues from bit
for bit, a stop on request (Ctrl-C / SIGTERM) that saves first, and a record for every event.
Under torchrun the same loop runs on every rank, each on its own windows of the step's batch,
with DDP or FSDP exchanging gradients; rank 0 alone logs and writes (see distributed.py).
The trainer never prints: `Trainer.run()` yields records (dicts) and appends each to
`RUN/log.jsonl`; the front end (`train.py`) decides how to show them.

The run directory:

    RUN/run.json              where the run started from (model source or preset), config, arguments
    RUN/log.jsonl             every record, one JSON object per line
    RUN/snapshots.jsonl       with --snapshot-every: weight and activation drift (see snapshots.py)
    RUN/step-000100/          a checkpoint: config.json, model.safetensors, vocab.json, merges.txt
                              (what `load_model` and transformers read) + trainer_state.json and
                              trainer_state.safetensors (optimizer, RNG, step: what --resume needs)
    RUN/final/                the same, at the end
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .config import GPTConfig
from .data import TokenFile, WindowSampler, bits_per_char, eval_windows, gather_windows
from .distributed import Dist, checkpoint_blocks, full_tensor, grad_sync, shard_model, wrap_ddp
from .errors import CheckpointError, MiniGPT2Error
from .lora import is_lora, load_lora_state, lora_settings, merged_state_dict, save_lora_state, save_peft_adapter
from .model import GPT
from .snapshots import Snapshotter
from .weights import load_model, save_model, write_atomically

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
CHECKPOINT_RE = re.compile(r"step-(\d{6,})")

# Dense bf16/fp16 tensor-core peak of the GPUs MFU is reported for (FLOP/s, no sparsity); the
# first name found in torch.cuda.get_device_name() wins, so variants come before the plain name.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12,
              "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


class TrainingDiverged(MiniGPT2Error):
    """The loss became NaN or infinite: the run stops before the bad update is applied."""


@dataclass
class TrainConfig:
    """Everything that decides what the loop computes (and must match when resuming)."""

    steps: int
    batch_size: int = 4
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float | None = None  # default lr / 10
    warmup: int | None = None  # default 5% of the steps, at most 1,000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int | None = None  # default a tenth of the steps; 0: only at the start and the end
    eval_tokens: int = 65536  # per eval set and evaluation
    save_every: int = 0  # 0: only at the end (and on a stop request)
    snapshot_every: int = 0
    seed: int = 0
    ranks: int = 1  # data-parallel processes (torchrun); each step covers batch x accum x ranks windows

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "ranks"):
            if getattr(self, name) < 1:
                raise MiniGPT2Error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise MiniGPT2Error(f"--lr must be positive, got {self.lr}")
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if self.warmup is None:
            self.warmup = min(1000, round(0.05 * self.steps))
        if self.eval_every is None:
            self.eval_every = max(1, self.steps // 10)
        if self.warmup < 0 or self.min_lr < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise MiniGPT2Error("--warmup, --min-lr, --grad-clip and --weight-decay must not be negative")

    @property
    def global_batch(self) -> int:
        """Windows (sequences) per optimizer step, over all ranks."""
        return self.batch_size * self.grad_accum * self.ranks

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def steps_for(*, steps: int | None = None, epochs: float | None = None, tokens: int | None = None,
              train_tokens: int, tokens_per_step: int) -> int:
    """The number of optimizer steps for `--steps`, `--epochs` or `--tokens` (one epoch if none)."""
    given = [x for x in (steps, epochs, tokens) if x is not None]
    if len(given) > 1:
        raise MiniGPT2Error("give only one of --steps, --epochs and --tokens")
    if steps is not None:
        return steps
    if tokens is None:
        tokens = (1.0 if epochs is None else epochs) * train_tokens
    if tokens <= 0:
        raise MiniGPT2Error("--epochs and --tokens must be positive")
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
    """AdamW's two groups: the matrices of the linear layers decay, nothing else does.

    Weight decay pulls weights towards zero, a regulariser for the big matrices that mix
    features. It makes no sense for biases and LayerNorm gains (pulling a gain towards zero just
    shrinks a layer's output, which the next layer must undo), nor for embeddings (a row that is
    rarely used would decay away between the few steps that use it). Each group carries the
    parameter names too, so the optimizer state can be saved under readable names.
    """
    decay, no_decay, seen = ([], []), ([], []), set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue  # lm_head.weight is wte.weight (tied): one tensor, listed once, as wte
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            group = decay if isinstance(module, nn.Linear) and name == "weight" else no_decay
            group[0].append(full)
            group[1].append(p)
    return [
        {"params": decay[1], "names": decay[0], "weight_decay": weight_decay},
        {"params": no_decay[1], "names": no_decay[0], "weight_decay": 0.0},
    ]


def autocast_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The compute precision for `--dtype` (`auto`: bf16 on GPUs that have it, fp16 on older
    GPUs, fp32 on CPU and MPS). Weights and optimizer state always stay in float32: only the
    forward and backward matmuls run in 16 bits, under autocast."""
    from .device import DTYPES

    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise MiniGPT2Error(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise MiniGPT2Error("--dtype float16 needs a GPU; on the CPU use float32 or bfloat16")
    return dtype


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward 2, backward 4) plus attention's matmuls.

    The position embedding is a lookup, not a matmul, so it is left out; the token embedding is
    counted, since it is also the output layer's weight.
    """
    n = config.vocab_size * config.n_embd + config.n_layer * 12 * config.n_embd ** 2
    return 6 * n + 12 * config.n_layer * config.n_embd * seq_len


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The GPU's dense 16-bit peak, for MFU; None where unknown (CPU, MPS, fp32, other GPUs)."""
    if device.type != "cuda" or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


# ----- the run directory ------------------------------------------------------------------------


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in a run directory, (step, path), oldest first; `final` last."""
    found = []
    for path in Path(out).iterdir() if Path(out).is_dir() else []:
        if (path / STATE_JSON).is_file() and (CHECKPOINT_RE.fullmatch(path.name) or path.name == "final"):
            found.append((json.loads((path / STATE_JSON).read_text())["step"], path))
    return sorted(found, key=lambda item: (item[0], item[1].name == "final"))


def check_out_dir(out: Path, resume: bool) -> Path | None:
    """Refuse to overwrite a run; for --resume, return the checkpoint to continue from."""
    out = Path(out)
    if not resume:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise MiniGPT2Error(
                f"'{out}' already exists; pass --resume to continue that run, or choose a new --out "
                "(nothing was overwritten)"
            )
        return None
    if not (out / "run.json").is_file():
        raise MiniGPT2Error(f"cannot resume: '{out}' is not a run directory (no run.json)")
    found = checkpoints(out)
    if not found:
        raise MiniGPT2Error(f"cannot resume: '{out}' has no complete checkpoint yet; start it again without --resume")
    return found[-1][1]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def tokenizer_source_for(source: str | os.PathLike | None) -> str | os.PathLike | None:
    """`source` if its vocab.json + merges.txt can be found (to copy into checkpoints), else None."""
    from .tokenizer import tokenizer_files

    if source is None:
        return None
    try:
        tokenizer_files(source)
    except MiniGPT2Error:
        return None
    return source


def start_model(source: str | None, preset: str | None = None, overrides: dict | None = None, *,
                seed: int = 0, dropout: float | None = None) -> GPT:
    """The model a run starts from: a loadable `source`, or random weights of a preset.

    Random init is seeded, so a resumed run can rebuild the exact starting weights (the
    snapshots measure drift from them) without storing a copy.
    """

    if preset is not None:
        try:
            config = GPTConfig.from_preset(preset, **{k: v for k, v in (overrides or {}).items() if v is not None})
        except (ValueError, TypeError) as e:
            raise MiniGPT2Error(f"--init-preset {preset}: {e}") from None
        if dropout is not None:
            config = dataclasses.replace(config, dropout=dropout)
        torch.manual_seed(seed)
        model = GPT(config)
        model.source = None
        return model
    model = load_model(source)
    if dropout is not None:
        model.config = dataclasses.replace(model.config, dropout=dropout)
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = dropout
            if hasattr(module, "dropout") and isinstance(module.dropout, float):
                module.dropout = dropout
    return model


# ----- the trainer ------------------------------------------------------------------------------


class Trainer:
    """Trains `model` on windows of `train` and evaluates it on `eval_sets`, writing into `out`.

    Args:
        model: a `GPT` (float32 weights; it is moved to `device`).
        train: the training tokens.
        eval_sets: name → tokens, e.g. {"val": held-out tail, "鲁迅小说集": another text}.
        config: the `TrainConfig`.
        out: the run directory (created; `run.json` is written by the caller).
        device, dtype: where, and in which autocast precision, to compute.
        compile: wrap the model in `torch.compile` for training steps.
        tokenizer_source: where checkpoints copy vocab.json + merges.txt from.
        snapshotter: with `config.snapshot_every`, measures drift from the starting model.
        dist: this process's place in a torchrun job (`distributed.setup`); None: one process.
        shard: FSDP2 (`distributed.shard_model`) instead of DDP: weights, gradients and AdamW state
            split over the ranks (with one process: one shard, i.e. the plain model).
        activation_checkpointing: recompute each block's activations in backward.
    """

    def __init__(self, model: GPT, train: TokenFile, eval_sets: dict[str, TokenFile], config: TrainConfig,
                 out: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 compile: bool = False, tokenizer_source: str | os.PathLike | None = None,
                 snapshotter: Snapshotter | None = None, dist: Dist | None = None, shard: bool = False,
                 activation_checkpointing: bool = False) -> None:
        self.dist = dist or Dist(device=torch.device(device))
        if config.ranks != self.dist.world_size:
            raise MiniGPT2Error(f"TrainConfig.ranks is {config.ranks} but the job has {self.dist.world_size} rank(s)")
        self.sharded = shard and self.dist.enabled
        if self.sharded and snapshotter is not None:
            raise MiniGPT2Error("--snapshot-every does not work with --shard (each rank holds only a slice of the "
                                "weights); snapshot a run without --shard")
        if self.sharded and is_lora(model):
            raise MiniGPT2Error("LoRA does not work with a sharded model yet; its adapters and optimizer state "
                                "are small, so train it unsharded")
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.train_data = train
        self.eval_sets = eval_sets
        self.tokenizer_source = tokenizer_source
        self.snapshotter = snapshotter
        if config.seq_len > model.config.n_positions:
            raise MiniGPT2Error(
                f"--seq-len {config.seq_len} is longer than the model's context of {model.config.n_positions} tokens"
            )
        self.sampler = WindowSampler(len(train), config.seq_len, config.batch_size, config.seed)

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

        groups = param_groups(self.raw_model, config.weight_decay)
        self.param_names = [name for g in groups for name in g.pop("names")]
        self.params = [p for g in groups for p in g["params"]]
        # The fused kernel updates every tensor in one pass (one launch on a GPU) instead of a
        # dozen element-wise passes over every tensor: less memory traffic, less overhead.
        fused = self.device.type in ("cuda", "cpu") and not self.sharded
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8,
                                           fused=fused)
        # fp16 has a narrow range: small gradients underflow to zero. The scaler multiplies the
        # loss by a large factor before backward and divides it out before the step, skipping
        # steps whose gradients overflowed. bf16 has float32's range and needs none of this.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)
        self.flops_per_token = flops_per_token(self.raw_model.config, config.seq_len)
        self.peak_flops = peak_flops(self.device, dtype)
        if self.peak_flops:
            self.peak_flops *= self.dist.world_size  # MFU of the whole job: all GPUs' peak

        self.step = 0
        self.tokens = 0
        self.stop_reason: str | None = None
        # Dropout's random numbers, reproducibly; each rank its own stream (rank 0's is a
        # one-process run's).
        torch.manual_seed(config.seed + self.dist.rank)

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

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns its train record."""
        c = self.config
        started = time.perf_counter()
        lr = lr_at(self.step, c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

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
        loss = (loss_sum / c.grad_accum).item()
        if self.dist.enabled:  # the mean over the global batch (every rank gets the same number)
            loss = self.dist.sum(loss)[0] / self.dist.world_size

        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"the training loss became {loss} at step {self.step + 1}; stopping before the update "
                f"({self._last_good()}). Lower --lr, raise --warmup, or use --dtype float32/bfloat16."
            )

        # Clipping: one unlucky batch can produce a gradient many times larger than usual; an
        # AdamW step along it would undo many steps of progress. Rescaling the whole gradient
        # to norm <= grad_clip keeps its direction but bounds the step. (Unscale first, so the
        # norm is that of the true gradient, not of the fp16 loss-scaled one.)
        self.scaler.unscale_(self.optimizer)
        clip = c.grad_clip if c.grad_clip > 0 else float("inf")
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, clip)).item()
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"the gradient norm became {grad_norm} at step {self.step + 1}; stopping before the update "
                f"({self._last_good()}). Lower --lr or raise --warmup."
            )

        self.scaler.step(self.optimizer)  # AdamW; the scaler skips the step if fp16 grads overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)  # free the gradients' memory until next backward
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.step += 1
        self.tokens += c.tokens_per_step

        seconds = time.perf_counter() - started
        tokens_per_s = c.tokens_per_step / seconds
        mfu = tokens_per_s * self.flops_per_token / self.peak_flops if self.peak_flops else None
        return {"type": "train", "step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr,
                "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu, "step_s": seconds,
                "epoch": self.tokens / len(self.train_data)}

    def _last_good(self) -> str:
        found = checkpoints(self.out)
        return f"the last good checkpoint, {found[-1][1]}, is untouched" if found else "no checkpoint had been saved yet"

    @torch.no_grad()
    def evaluate(self) -> list[dict]:
        """Loss, perplexity and bits per character on each eval set (same windows every time)."""
        records = []
        self.raw_model.eval()  # dropout off
        try:
            for name, data in self.eval_sets.items():
                seq_len = min(self.config.seq_len, len(data) - 1)
                if seq_len < 1:
                    continue
                offsets = eval_windows(len(data), seq_len, self.config.eval_tokens)
                B, R, r = self.config.batch_size, self.dist.world_size, self.dist.rank
                chunks = [np.array(offsets[i:i + B]) for i in range(0, len(offsets), B)]
                nats, count = 0.0, 0
                # Rank r evaluates chunks r, r + R, ...; the sums are added up over the ranks.
                # A sharded model's forward is a collective, so there every rank runs the same
                # number of them (a spare one, on chunk 0, counts nothing).
                for j in range(math.ceil(len(chunks) / R)):
                    index = j * R + r
                    if index >= len(chunks) and not self.sharded:
                        break
                    x, y = self._inputs_targets(gather_windows(data.tokens, chunks[index % len(chunks)], seq_len))
                    with self.autocast():
                        _, loss = self.raw_model(x, y)
                    if index < len(chunks):
                        nats += loss.item() * y.numel()
                        count += y.numel()
                nats, count = self.dist.sum(nats, count)
                count = int(count)
                mean = nats / count
                records.append({"type": "eval", "step": self.step, "tokens": self.tokens, "set": name,
                                "loss": mean, "ppl": math.exp(min(mean, 700.0)),
                                "bpc": bits_per_char(mean, data.tokens_per_char), "eval_tokens": count})
        finally:
            self.raw_model.train()
        return records

    # ----- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self, name: str | None = None) -> Path:
        """Write weights + trainer state to RUN/step-NNNNNN (or RUN/final), atomically.

        Everything goes into a hidden temporary folder first, which is renamed into place only
        when complete: a crash mid-save leaves a stray temporary folder, never a half checkpoint,
        and an existing checkpoint is never written into. Under torchrun only rank 0 writes (a
        sharded model's full weights are first gathered to it, which every rank takes part in).
        """
        from safetensors.torch import save_file


        name = name or f"step-{self.step:06d}"
        target = self.out / name
        # This step was saved already (e.g. a stop request right after a save)? Rank 0 has seen
        # its own rename, so every rank asks it: they must all take the same path below.
        if name != "final" and self.dist.any(target.exists()):
            return target
        weights = None
        if self.sharded:  # collectives: every rank, before rank 0 alone goes on
            from .distributed import full_model_state, full_optimizer_state

            weights = full_model_state(self.raw_model)
            optim_state = full_optimizer_state(self.raw_model, self.optimizer)
        if not self.dist.is_main:
            return target
        lora = is_lora(self.raw_model)
        tmp = self.out / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            # LoRA: model.safetensors holds the merged model (the usual layout), adapter/ the
            # adapters alone in PEFT's layout, the trainer state the adapters for resuming.
            merged = merged_state_dict(self.raw_model, weights) if lora else weights
            save_model(self.raw_model, tmp, tokenizer_source=self.tokenizer_source, state_dict=merged)
            tensors, state = self.state(optim_state if self.sharded else None)
            if lora:
                save_peft_adapter(self.raw_model, tmp / "adapter", getattr(self.raw_model, "source", None), weights)
                tensors.update(save_lora_state(self.raw_model, weights))
            save_file(tensors, str(tmp / STATE_TENSORS))
            (tmp / STATE_JSON).write_text(json.dumps(state, indent=2))
            if target.exists():  # final/ of a run that is being extended: swap, then delete
                old = self.out / f".{name}.old-{os.getpid()}"
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old)
            else:
                os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def state(self, full_optimizer_state: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The trainer state as (tensors for safetensors, JSON-able dict): no pickle anywhere.

        The data position needs no state of its own: batch i is a pure function of (seed, i),
        see `WindowSampler`. Python's and NumPy's global generators are not used by the loop.
        A sharded run passes its gathered optimizer state (keyed by parameter name); it is
        written in the same layout, so any run can resume from any other.
        """
        if full_optimizer_state is None:
            opt = self.optimizer.state_dict()
        else:
            index = {name: i for i, name in enumerate(self.param_names)}
            opt = {"state": {index[name]: entry for name, entry in full_optimizer_state["state"].items()},
                   "param_groups": [{**g, "params": [index[name] for name in g["params"]]}
                                    for g in full_optimizer_state["param_groups"]]}
        tensors = {}
        for index, entry in opt["state"].items():
            for key, value in entry.items():
                tensors[f"optimizer.{self.param_names[index]}.{key}"] = value.detach().cpu().contiguous()
        tensors["rng.torch_cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "config": dataclasses.asdict(self.config),
            "param_names": self.param_names,
            "param_groups": opt["param_groups"],
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "sampler": {"seed": self.config.seed, "next_batch": self.step * self.config.grad_accum * self.config.ranks},
            "ranks": self.config.ranks,
            "lora": lora_settings(self.raw_model) if is_lora(self.raw_model) else None,
        }
        return tensors, state

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Continue from a checkpoint: its weights, optimizer moments, step, RNG and scaler."""
        from safetensors.torch import load_file


        path = Path(path)
        try:
            state = json.loads((path / STATE_JSON).read_text())
            tensors = load_file(str(path / STATE_TENSORS))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the trainer state in '{path}': {e}") from None
        if state["param_names"] != self.param_names:
            raise CheckpointError(f"'{path}' was saved from a model with different parameters; cannot resume")
        lora = lora_settings(self.raw_model) if is_lora(self.raw_model) else None
        if state.get("lora") != lora:
            raise CheckpointError(f"'{path}' was saved with LoRA settings {state.get('lora')}, not {lora}; cannot resume")
        index = {name: i for i, name in enumerate(self.param_names)}
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                name, field = key[len("optimizer."):].rsplit(".", 1)
                opt_state.setdefault(index[name], {})[field] = value
        groups = [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]
        if self.sharded:  # every rank reads the full state and keeps its slices
            from .distributed import load_full_state

            loaded = load_model(path)
            names = self.param_names
            load_full_state(self.raw_model, self.optimizer, loaded.state_dict(),
                            {"state": {names[i]: entry for i, entry in opt_state.items()},
                             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups]})
        elif lora:  # the base stays the start model; model.safetensors is merged (B @ A counted in)
            load_lora_state(self.raw_model, tensors)
            self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        else:
            with torch.no_grad():
                loaded = load_model(path, device=self.device)
                self.raw_model.load_state_dict(loaded.state_dict())
            self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(tensors["rng.torch_cpu"])
        cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda_states and self.device.type == "cuda" and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        self.step, self.tokens = state["step"], state["tokens"]
        if self.dist.rank:  # the checkpoint holds rank 0's dropout stream; the others start anew
            torch.manual_seed(self.config.seed + self.dist.rank + 1_000_003 * self.step)
        if not self.dist.is_main:
            return
        # Records of steps after this checkpoint (done, then lost when the run was stopped) are
        # dropped, so the log reads as one run; the redone steps log them again.
        for log in ("log.jsonl", "snapshots.jsonl"):
            records = read_jsonl(self.out / log)
            if records:
                _rewrite_jsonl(self.out / log, [r for r in records if r.get("step", 0) <= self.step])

    # ----- the loop ---------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step, saving a checkpoint first (signal-safe)."""
        self.stop_reason = reason

    def _emit(self, record: dict, file: str = "log.jsonl") -> dict:
        if not self.dist.is_main:  # every rank yields the records; only rank 0 logs them
            return record
        with open(self.out / file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return record

    def _snapshot(self) -> dict:
        if not self.dist.is_main:
            return {"type": "snapshot", "step": self.step, "tokens": self.tokens}
        snap = self.snapshotter.measure(self.raw_model, self.step, self.tokens)
        self._emit(snap, "snapshots.jsonl")
        return self._emit({"type": "snapshot", "step": self.step, "tokens": self.tokens})

    def run(self) -> Iterator[dict]:
        """Train to `config.steps`, yielding every record as it happens (see the module docstring)."""
        c = self.config
        first_step = self.step
        yield self._emit({"type": "start", "step": self.step, "steps": c.steps, "tokens_per_step": c.tokens_per_step,
                          "ranks": c.ranks, "global_batch": c.global_batch, "sharded": self.sharded,
                          "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                          "params": self.raw_model.num_params(), "resumed": first_step > 0})
        if first_step == 0:
            # Where the starting model stands: the baseline every later evaluation is read against.
            for record in self.evaluate():
                yield self._emit(record)
            if self.snapshotter is not None and c.snapshot_every:
                yield self._snapshot()
        started = time.perf_counter()
        last_eval = self.step
        while self.step < c.steps:
            # A stop request reaches the ranks at different moments: they agree on it first,
            # so all stop after the same step.
            if self.dist.any(self.stop_reason is not None):
                self.stop_reason = self.stop_reason or "SIGTERM"
                path = self.save_checkpoint()
                yield self._emit({"type": "stopped", "step": self.step, "tokens": self.tokens,
                                  "reason": self.stop_reason, "checkpoint": str(path)})
                return
            record = self.train_step()
            elapsed = time.perf_counter() - started
            record["eta_s"] = elapsed / (self.step - first_step) * (c.steps - self.step)
            yield self._emit(record)
            at = self.step
            if c.eval_every and at % c.eval_every == 0 and at < c.steps:
                for record in self.evaluate():
                    yield self._emit(record)
                last_eval = at
            if self.snapshotter is not None and c.snapshot_every and at % c.snapshot_every == 0:
                yield self._snapshot()
            if c.save_every and at % c.save_every == 0 and at < c.steps:
                path = self.save_checkpoint()
                yield self._emit({"type": "checkpoint", "step": at, "tokens": self.tokens, "path": str(path)})
        if last_eval != self.step:
            for record in self.evaluate():
                yield self._emit(record)
        path = self.save_checkpoint("final")
        yield self._emit({"type": "done", "step": self.step, "tokens": self.tokens, "path": str(path),
                          "seconds": time.perf_counter() - started})
