"""Setting up a training run from its options: what `train.py` runs before the loop, as functions.

    options (dict, from the command line)
      │ merge_options      defaults for the device, then a resumed run's saved options, then the new ones
      │ open_run           lock RUN, finish interrupted saves, decide: fresh start or resume
      │ check inputs       every file, the output folders: a bad one fails in a second
      │ prepare_corpus     tokenize once (or find the verified cache)
      │ start_model        the model to fine-tune, or random weights of a preset
      └ Trainer            ready to run; resumed from the newest readable checkpoint

`setup(options, report)` does it all and returns a `Setup`; `report(record)` receives a record
for each thing worth telling the user on the way (data read, checkpoints skipped, ...), as the
trainer's loop does. Nothing here prints.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .checks import check_vocab_fits
from .config import GPTConfig
from .data import check_inputs, compile_drop_lines, default_cache_dir, prepare_corpus
from .device import resolve_dtype
from .errors import MiniGPT2Error, OptionError
from .evaluate import char_counts
from .model import GPT
from .rundir import RunDir, RunDirError, check_writable
from .snapshots import DEFAULT_PROBE, Snapshotter
from .tokenizer import load_tokenizer, tokenizer_files
from .trainer import TrainConfig, Trainer, lr_at, steps_for
from .weights import load_model

# Fixed for the life of a run: --resume refuses to change them (the batches would differ).
FIXED_ON_RESUME = (
    "model",
    "init_preset",
    "n_layer",
    "n_head",
    "n_embd",
    "context",
    "data",
    "val_data",
    "val_fraction",
    "drop_lines",
    "encoding_errors",
    "seq_len",
    "seed",
    "dropout",
    "tokenizer",
    "extend_vocab",
    "vocab_from",
    "lora",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
)
COMMON_DEFAULTS = {
    "model": None,
    "grad_accum": 1,
    "lr": 3e-4,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "val_fraction": 0.005,
    "encoding_errors": "strict",
    "snapshot_every": 0,
    "log_every": 10,
    "device": "auto",
    "dtype": "auto",
    "seed": 0,
    "keep_last": 3,
}
# On a GPU: long sequences, one epoch, thorough evaluations. On a CPU a step of GPT-2 (124M) at 4 x 128
# tokens took ~3.7 s on our two cores, so one epoch of four novels would take a week: there the
# defaults show learning within minutes (an evaluation every ~3 minutes) and end in about half an hour.
GPU_DEFAULTS = {"batch_size": 4, "seq_len": None, "steps": None, "eval_every": None, "eval_tokens": 65536,
                "save_every": 1000}  # fmt: skip
CPU_DEFAULTS = {"batch_size": 4, "seq_len": 128, "steps": 500, "eval_every": 50, "eval_tokens": 4096,
                "save_every": 100}  # fmt: skip
SIZE_OPTIONS = ("steps", "epochs", "tokens")


def device_defaults(device: torch.device) -> dict:
    return GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS


def merge_options(given: dict, saved: dict | None, device: torch.device, ranks: int = 1) -> tuple[dict, list[str]]:
    """Defaults, then (when resuming) the run's saved options, then what was given now.

    Returns (options, names of the device defaults that were used), for the start line.
    """
    explicit = {k: v for k, v in given.items() if v is not None}
    defaults = {**COMMON_DEFAULTS, **device_defaults(device)}
    if saved is None:
        merged = {**defaults, **explicit, "ranks": ranks}
        if any(k in explicit for k in ("epochs", "tokens")):
            merged["steps"] = explicit.get("steps")
        used = [k for k in device_defaults(device) if k not in explicit and merged.get(k) is not None]
        return merged, used
    changed = [k for k in FIXED_ON_RESUME if k in explicit and explicit[k] != saved.get(k)]
    if changed:
        raise OptionError(
            changed[0],
            f"cannot change when a run is resumed (it was {saved.get(changed[0])!r}): the "
            "run would no longer continue exactly; start a new run directory instead",
        )
    saved = dict(saved)
    if any(k in explicit for k in SIZE_OPTIONS):
        for k in SIZE_OPTIONS:
            saved.pop(k, None)
    merged = {**defaults, **saved, **explicit, "ranks": ranks}
    before = saved.get("batch_size", 4) * saved.get("grad_accum", 1) * saved.get("ranks", 1)
    if merged["batch_size"] * merged["grad_accum"] * ranks != before:
        raise OptionError(
            "batch_size",
            f"must keep a resumed run's global batch of {before} sequences per step (batch size x gradient "
            f"accumulation x ranks); with {ranks} rank(s), give a batch size and accumulation whose product is "
            f"{before / ranks:g}",
        )
    return merged, []


def saved_option(out: str | os.PathLike, key: str):
    """One option of the run in `out` as it was saved (None if there is none)."""
    try:
        return ((RunDir(out).read_info() or {}).get("args") or {}).get(key)
    except MiniGPT2Error:
        return None


def tokenizer_source_for(source: str | os.PathLike | None) -> str | os.PathLike | None:
    """`source` if its vocab.json + merges.txt can be found (to copy into checkpoints), else None."""
    if source is None:
        return None
    try:
        tokenizer_files(source)
    except MiniGPT2Error:
        return None
    return source


def start_model(
    source: str | None,
    preset: str | None = None,
    overrides: dict | None = None,
    *,
    seed: int = 0,
    dropout: float | None = None,
) -> GPT:
    """The model a run starts from: a loadable `source`, or random weights of a preset.

    Random init is seeded, so a resumed run can rebuild the exact starting weights (the
    snapshots measure drift from them) without storing a copy.
    """
    if preset is not None:
        try:
            config = GPTConfig.from_preset(preset, **{k: v for k, v in (overrides or {}).items() if v is not None})
        except (ValueError, TypeError) as e:
            raise MiniGPT2Error(f"preset {preset}: {e}") from None
        torch.manual_seed(seed)
        model = GPT(config)
        model.source = None
    else:
        model = load_model(source)
    if dropout is not None:
        model.set_dropout(dropout)
    return model


@dataclass
class Setup:
    """A run ready to train: the trainer, its run directory and what the start line should say."""

    trainer: Trainer
    run: RunDir
    options: dict
    defaults_used: list[str]
    skipped: list[dict]  # checkpoints --resume could not read: {"path", "why", "kept_as"}
    schedule_change: dict | None  # a resumed run given another step count: {"before", "after", "step", "lr_*"}


def open_run(out: str | os.PathLike, resume: bool, is_main: bool) -> tuple[RunDir, dict | None]:
    """Lock the run directory and decide what it holds: (run, saved options or None).

    A fresh start needs an empty (or new) folder; `resume` a run, or a folder a run left before
    it wrote anything (then it starts from step 0, as the same command without resume would).
    """
    run = RunDir(out)
    if not is_main:
        return run, (run.read_info() or {}).get("args") if resume else None
    check_writable(run.path, "the run directory")
    run.lock()
    info = run.read_info() if run.path.is_dir() else None
    if not resume:
        if not run.is_empty():
            run.unlock()
            raise RunDirError(
                f"'{run.path}' already holds a run; continue it with `resume`, or choose a new run "
                "directory (nothing was overwritten)"
            )
        return run, None
    return run, (info or {}).get("args")


def setup(
    given: dict, out: str | os.PathLike, resume: bool, report: Callable[[dict], None], ctx: distributed.Dist
) -> Setup:
    """Everything before the loop (see the module docstring), checking the cheap things first.

    If it fails before the run has written anything, a run directory it created is removed again:
    a typo never leaves a folder behind that the corrected command would refuse.
    """
    created = not Path(out).exists()
    run, saved = open_run(out, resume, ctx.is_main)
    try:
        return _setup(run, saved, given, resume, report, ctx)
    except BaseException:
        if created and ctx.is_main and run.is_empty():
            run.unlock()
            shutil.rmtree(run.path, ignore_errors=True)
        raise


def _setup(
    run: RunDir, saved: dict | None, given: dict, resume: bool, report: Callable[[dict], None], ctx: distributed.Dist
) -> Setup:
    if ctx.is_main:
        for message in run.recover():
            report({"type": "recovered", "message": message})
    if resume and saved is None and not given.get("data"):
        raise RunDirError(f"nothing to resume in '{run.path}': it holds no run.json; start it with its data")
    o, defaults_used = merge_options(given, saved, ctx.device, ranks=ctx.world_size)
    files = _check_inputs(o)
    dtype = resolve_dtype(o["dtype"], ctx.device)
    source, model, enc, tok_source = _start(o, run, files, report, ctx)
    corpus, eval_sets = _tokenize(o, enc, *files, ctx)
    sets = {n: {"chars": d.chars, "tokens": len(d), "tokens_per_char": d.tokens_per_char} for n, d in eval_sets.items()}
    report({"type": "data", **corpus.summary(), "eval_sets": sets})

    if "seq_len" in defaults_used or not o["seq_len"]:  # a default is a cap: a shorter context is used whole
        o["seq_len"] = min(o["seq_len"] or 1024, model.config.n_positions)
    config = train_config(o, len(corpus.train), ctx.world_size)
    snapshotter = None
    if config.snapshot_every:
        probe = o.get("probe") or DEFAULT_PROBE
        snapshotter = Snapshotter(model, enc.encode(probe, disallowed_special=()), probe)
    trainer = Trainer(model, corpus.train, eval_sets, config, run, device=ctx.device, dtype=dtype,
                      compile=bool(o.get("compile")), tokenizer_source=tokenizer_source_for(tok_source),
                      snapshotter=snapshotter, dist=ctx, shard=bool(o.get("shard")), keep_last=o["keep_last"],
                      activation_checkpointing=bool(o.get("activation_checkpointing")),
                      char_counts=char_counts(enc))  # fmt: skip
    skipped = trainer.resume() if resume else []
    for record in skipped:
        report({"type": "skipped", **record})
    if resume and trainer.step == 0:
        report({"type": "note", "message": f"no checkpoint in '{run.path}' to resume from: starting from step 0"})
    previous = _check_steps(trainer, saved, run)
    if ctx.is_main:
        check_free_space(run, checkpoint_bytes(model, sum(p.numel() for p in trainer.params)))
        if saved is None or trainer.step == 0:
            run.write_info(_run_info(source, tok_source, o, model, config, corpus, eval_sets, ctx.device, dtype))
        elif previous is not None:
            update_steps(run, config.steps)
    change = schedule_change(config, previous, trainer.step, o) if previous is not None else None
    return Setup(trainer, run, o, defaults_used, skipped, change)


def _check_inputs(o: dict) -> tuple:
    """(training files, validation files or None, [files of each eval set]), all checked: the cheap
    pass that makes a bad file or folder fail in a second, before a model is loaded."""
    check_options(o)
    check_writable(o.get("cache_dir") or default_cache_dir(), "the token cache folder")
    compile_drop_lines(o.get("drop_lines"))
    errors = o["encoding_errors"]
    train_files = check_inputs(o["data"], errors)
    val_files = check_inputs(o["val_data"], errors) if o.get("val_data") else None
    return train_files, val_files, [check_inputs([f], errors) for f in o.get("eval_data") or []]


def _start(o: dict, run: RunDir, files: tuple, report, ctx) -> tuple:
    """(source, the model to train, its tokenizer, where the tokenizer's files are): the start
    model or a preset, grown by `extend_vocab` and wrapped with LoRA when asked."""
    source = None if o.get("init_preset") else (o.get("model") or "gpt2")
    tok_source = o.get("tokenizer") or source or "gpt2"
    enc = load_tokenizer(tok_source)
    sizes = {"n_layer": o.get("n_layer"), "n_head": o.get("n_head"), "n_embd": o.get("n_embd"),
             "n_positions": o.get("context")}  # fmt: skip
    model = start_model(source, o.get("init_preset"), sizes, seed=o["seed"], dropout=o.get("dropout"))
    check_vocab_fits(model.config, enc)
    if o.get("extend_vocab"):
        model, enc, tok_source = _extended(model, enc, tok_source, o, run, files[0], files[2], report, ctx)
    if o.get("lora"):
        _with_lora(model, o, report)
    return source, model, enc, tok_source


TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def train_config(o: dict, train_tokens: int, ranks: int) -> TrainConfig:
    """The loop's settings from the options; `steps` from steps, epochs or tokens (one epoch if none)."""
    tokens_per_step = o["batch_size"] * o["seq_len"] * o["grad_accum"] * ranks
    steps = steps_for(steps=o.get("steps"), epochs=o.get("epochs"), tokens=o.get("tokens"),
                      train_tokens=train_tokens, tokens_per_step=tokens_per_step)  # fmt: skip
    return TrainConfig(**{**{k: o[k] for k in TRAIN_FIELDS if o.get(k) is not None}, "steps": steps, "ranks": ranks})


def schedule_change(config: TrainConfig, previous_steps: int, step: int, o: dict) -> dict:
    """How a resumed run's learning rate changes when its step count does (the cosine is stretched)."""
    old = TrainConfig(**{**dataclasses.asdict(config), "steps": previous_steps, "warmup": o.get("warmup"),
                         "eval_every": o.get("eval_every")})  # fmt: skip
    return {"before": previous_steps, "after": config.steps, "step": step, "lr_before": lr_at(step, old),
            "lr_after": lr_at(step, config)}  # fmt: skip


def _extended(model, enc, tok_source, o, run: RunDir, train_files, eval_files, report, ctx):
    """The model and tokenizer grown by `extend_vocab` new tokens (see vocab.py).

    Learned once: a fresh run learns the merges (or finds them cached) and writes the grown tokenizer
    into RUN/tokenizer/; a resumed run reads it back from there and grows the model the same way
    (the checkpoint's weights then replace the grown start).
    """
    from .tokenizer import encoding_from_files
    from .vocab import extend_vocabulary, grow_model

    folder = run.path / "tokenizer"
    if (folder / "vocab.json").is_file():
        new_enc = encoding_from_files(folder / "vocab.json", folder / "merges.txt")
        return grow_model(model, enc, new_enc), new_enc, folder
    base = tokenizer_files(tok_source)[0].parent
    vocab_from = check_inputs(o["vocab_from"], o["encoding_errors"]) if o.get("vocab_from") else None
    eval_texts = {
        files[0].path.stem: files[0].path.read_text(encoding="utf-8", errors="replace")[:200_000]
        for files in eval_files
    }
    with ctx.main_first():
        grown, new_enc, folder, summary = extend_vocabulary(
            model,
            enc,
            train_files,
            o["extend_vocab"],
            tokenizer_dir=folder,
            base_tokenizer_dir=base,
            vocab_from_files=vocab_from,
            eval_texts=eval_texts,
            cache_dir=o.get("cache_dir"),
        )
    report({"type": "vocab", **summary})
    return grown, new_enc, folder


def _with_lora(model: GPT, o: dict, report) -> None:
    """Freeze the model and give the targeted layers a low-rank update to learn (see lora.py).

    A resumed run rebuilds the same: the start model (never a merged checkpoint) and the same
    adapters; the trainer then loads the adapters' trained values from the checkpoint.
    """
    from .lora import TARGETS, apply_lora, lora_summary

    targets = o.get("lora_targets") or ",".join(TARGETS)
    apply_lora(
        model,
        o["lora"],
        alpha=o.get("lora_alpha"),
        dropout=o.get("lora_dropout") or 0.0,
        targets=targets,
        seed=o["seed"],
    )
    report({"type": "lora", **lora_summary(model)})


def check_options(o: dict) -> None:
    """The combinations no single option's check can see."""
    if o.get("model") and o.get("init_preset"):
        raise MiniGPT2Error("give a model to fine-tune or a preset to start from random weights, not both")
    if not o.get("init_preset") and any(o.get(k) is not None for k in ("n_layer", "n_head", "n_embd", "context")):
        raise MiniGPT2Error("the layer count, head count, width and context only apply to a preset")
    if not o.get("data"):
        raise MiniGPT2Error("no training data given: the text files, directories or globs to train on")
    if o.get("lora") and o.get("extend_vocab"):
        raise OptionError(
            "lora",
            "cannot be combined with extending the vocabulary yet: LoRA freezes the embedding, "
            "so the new tokens' rows would never learn",
        )
    if not o.get("lora") and any(o.get(k) is not None for k in ("lora_alpha", "lora_dropout", "lora_targets")):
        raise OptionError("lora", "is needed for the other LoRA settings (alpha, dropout, targets): give the rank")


def _tokenize(o, enc, train_files, val_files, eval_files, ctx):
    """The training corpus and the eval sets (val: --val-data, else the held-out tails), tokenized
    once into the cache (rank 0 first under torchrun)."""
    common = dict(drop_lines=o.get("drop_lines"), encoding_errors=o["encoding_errors"], cache_dir=o.get("cache_dir"))
    with ctx.main_first():  # rank 0 fills the cache; the others then read it
        corpus = prepare_corpus(train_files, enc, val_fraction=0.0 if val_files else o["val_fraction"], **common)
        eval_sets = {}
        if val_files:
            eval_sets["val"] = prepare_corpus(val_files, enc, **common).train
        elif corpus.val is not None and len(corpus.val) > 1:
            eval_sets["val"] = corpus.val
        for files in eval_files:
            eval_sets[files[0].path.stem] = prepare_corpus(files, enc, **common).train
    return corpus, eval_sets


def _check_steps(trainer: Trainer, saved: dict | None, run: RunDir) -> int | None:
    """A resumed run must have steps left; returns the previously planned steps if they changed."""
    steps = trainer.config.steps
    if trainer.step >= steps:
        raise RunDirError(
            f"the run in '{run.path}' already reached step {trainer.step} of {steps}; give a larger "
            "number of steps (or epochs, or tokens) to train further"
        )
    before = (run.read_info() or {}).get("train", {}).get("steps") if saved is not None else None
    return before if before is not None and before != steps else None


def _run_info(source, tok_source, o, model, config, corpus, eval_sets, device, dtype) -> dict:
    return {
        "model": source,
        "init_preset": o.get("init_preset"),
        "config": dataclasses.asdict(model.config),
        "tokenizer": str(tok_source) if tok_source is not None else None,
        "train": dataclasses.asdict(config),
        "args": o,
        "data": corpus.summary(),
        "eval_sets": {
            n: {"chars": d.chars, "tokens": len(d), "tokens_per_char": d.tokens_per_char} for n, d in eval_sets.items()
        },
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def update_steps(run: RunDir, steps: int) -> None:
    """Record a resumed run's new step count in run.json (what `compare.py` and a later resume read)."""
    info = run.read_info() or {}
    info.setdefault("train", {})["steps"] = steps
    info.setdefault("args", {})["steps"] = steps
    run.write_info(info)


def checkpoint_bytes(model: GPT, trainable: int) -> int:
    """About what one checkpoint takes on disk: float32 weights + two AdamW moments per trainable weight."""
    return 4 * model.num_params() + 8 * trainable


def check_free_space(run: RunDir, needed: int) -> None:
    """Refuse to start when the disk cannot hold even one checkpoint (a full disk found after an hour)."""
    free = shutil.disk_usage(run.path).free
    if free < needed:
        raise RunDirError(
            f"the disk holding '{run.path}' has {free / 1e9:.2f} GB free, but one checkpoint of this "
            f"model takes about {needed / 1e9:.2f} GB; free some space or choose another folder"
        )
