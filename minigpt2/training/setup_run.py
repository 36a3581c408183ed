"""Setting up a training run from its options: what `train.py` runs before the loop, as functions.

    TrainOptions (from the command line; see options.py) + run.json (`read_saved`, read once)
      │ open_run           judge --out (a run, empty or missing, else refused), lock it, finish
      │                    interrupted saves
      │ resolve            command line, then a resumed run's saved options, then the device's defaults
      │ check inputs       every file, the output folders: a bad one fails in a second
      │ check memory       weights, gradients, AdamW state, activations: refused if they cannot fit
      │ prepare_corpus     tokenize once (or find the verified cache)
      │ start_model        the model to fine-tune, or random weights of a preset
      └ Trainer            ready to run; resumed from the newest readable checkpoint

`setup(given, saved, report, ctx)` does it all and returns a `Setup`; `report(record)` receives a record
for each thing worth telling the user on the way (data read, checkpoints skipped, ...), as the
trainer's loop does. Nothing here prints.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt2.checks import check_train_memory_fits, check_vocab_fits
from minigpt2.device import auto_dtype, resolve_dtype
from minigpt2.errors import MiniGPT2Error, OptionError
from minigpt2.io.tokenizer import load_tokenizer, locate_tokenizer
from minigpt2.io.weights import load_model
from minigpt2.model.config import GPTConfig
from minigpt2.model.evaluate import MIN_SCORED_TOKENS, char_counts, check_enough_text
from minigpt2.model.gpt import GPT
from minigpt2.model.snapshots import DEFAULT_PROBE, Snapshotter
from minigpt2.training import distributed
from minigpt2.training.data import check_inputs, compile_drop_lines, default_cache_dir, head_text, prepare_corpus
from minigpt2.training.options import TrainOptions, check_combinations, resolve, saved_options
from minigpt2.training.rundir import (
    CHECKPOINT_FILES,
    CONFIG,
    FINAL,
    LEFTOVER,
    LOCK,
    RUN_JSON,
    STEP_NAME,
    WEIGHTS,
    RunDir,
    RunDirError,
    check_writable,
    is_complete,
)
from minigpt2.training.trainer import TrainConfig, Trainer, lr_at, steps_for
from minigpt2.training.watch import TENSORBOARD_DIR, PromptSampler, sample_prompts


@dataclass
class SavedRun:
    """What a run directory's run.json says, read (and checked) once: the whole record, and its
    options ("args") for `options.resolve`. `info` is None for a folder without run.json."""

    info: dict | None
    args: dict | None


def read_saved(out: str | os.PathLike) -> SavedRun:
    """run.json of the run in `out`, checked: a damaged one is one error naming the file."""
    run = RunDir(out)
    info = run.read_info() if run.path.is_dir() else None
    if info is None:
        return SavedRun(None, None)
    args = info.get("args")
    train = info.get("train")
    if train is not None and not (isinstance(train, dict) and _is_count(train.get("steps"), allow_none=True)):
        raise RunDirError(
            f"'{run.path / RUN_JSON}' is damaged: \"train\" should hold the run's step count; restore it from a "
            "backup, or start a new run directory"
        )
    return SavedRun(info, saved_options(args, run.path / RUN_JSON) if args is not None else None)


def _is_count(value, allow_none: bool = False) -> bool:
    return (value is None and allow_none) or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def tokenizer_source_for(source: str | os.PathLike | None, vocab_size: int) -> Path | None:
    """The folder of `source`'s own vocab.json + merges.txt (to copy into checkpoints), else None."""
    if source is None:
        return None
    try:
        (vocab, merges), standing_in = locate_tokenizer(source, vocab_size=vocab_size)
    except MiniGPT2Error:
        return None
    return vocab.parent if vocab.parent == merges.parent and not standing_in else None


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
    options: TrainOptions
    defaults_used: list[str]  # the device defaults used (names of `options`), for the start line
    skipped: list[dict]  # checkpoints --resume could not read: {"path", "why", "kept_as"}
    schedule_change: dict | None  # a resumed run given another step count: {"before", "after", "step", "lr_*"}


# What a run directory may hold besides its checkpoints (step-N/, final/, NAME.damaged-N, hidden leftovers);
# TENSORBOARD_DIR: train.py --tensorboard's event files.
GROWN_BASE = "grown-base"  # RUN/grown-base: the model a LoRA run on a grown vocabulary adapts (for PEFT)
RUN_FILES = {RUN_JSON, "log.jsonl", "snapshots.jsonl", LOCK, "tokenizer", TENSORBOARD_DIR, GROWN_BASE}
# What set-up writes before run.json (which it writes last): a folder holding only these is a set-up
# that never finished (stopped, killed or refused on the way), not a run; the next start clears it.
SETUP_FILES = ("tokenizer", GROWN_BASE, TENSORBOARD_DIR)


def judge_out(path: Path) -> str:
    """What `--out` is, decided before anything is written into it: "missing", "empty", "run",
    "unfinished" (a set-up that stopped before it wrote run.json: see SETUP_FILES), or
    else a `RunDirError` saying what was found (a checkpoint folder, a file, the user's own files):
    training never writes into a folder it does not own."""
    if not path.exists():
        return "missing"
    if not path.is_dir():
        raise RunDirError(f"the run directory '{path}' is a file, not a folder; choose a new or empty folder")
    entries = sorted(p.name for p in path.iterdir())
    if all(name == LOCK for name in entries):
        return "empty"
    if all(name in (LOCK, *SETUP_FILES) or name.startswith(".write-test-") for name in entries):
        return "unfinished"
    if (path / WEIGHTS).exists() or (path / CONFIG).exists():
        found = "a model checkpoint (config.json, model.safetensors)"
    else:
        foreign = [name for name in entries if not _run_entry(path / name)]
        marker = any(name in (RUN_JSON, "log.jsonl") for name in entries) or any(
            is_complete(path / name) for name in entries
        )
        if not foreign and marker:
            return "run"
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        found = f"files that are not a training run's ({shown})" if foreign else "no run.json, log or checkpoint"
    raise RunDirError(
        f"'{path}' is not a training run: it holds {found}; choose a new or empty folder for the run "
        "(nothing was written)"
    )


def _run_entry(path: Path) -> bool:
    """A name a run directory holds: its records and lock, a checkpoint (complete, set aside, or left
    by an interrupted save), its grown tokenizer and base, a write probe."""
    name = path.name
    if name in RUN_FILES or LEFTOVER.fullmatch(name) or name.startswith(".write-test-"):
        return True
    base = re.sub(r"\.damaged-\d+$", "", name).lstrip(".")
    checkpoint = base == FINAL or bool(STEP_NAME.fullmatch(base))
    return checkpoint and path.is_dir() and any((path / f).exists() for f in CHECKPOINT_FILES)


def open_run(out: str | os.PathLike, resume: bool, saved: SavedRun, is_main: bool) -> RunDir:
    """Judge and lock the run directory.

    A fresh start needs an empty (or new) folder; `resume` a run, or a folder a run left before
    it wrote anything (then it starts from step 0, as the same command without resume would).
    """
    run = RunDir(out)
    if not is_main:
        return run
    kind = judge_out(run.path)
    if kind == "run" and not resume:
        run.check_not_in_use()  # a run that is going says so: that is the news, not that it exists
        raise RunDirError(
            f"'{run.path}' already holds a run; continue it with `resume`, or choose a new run "
            "directory (nothing was overwritten)"
        )
    check_writable(run.path, "the run directory")
    run.lock()
    if kind == "unfinished":  # (only now, locked: the set-up of a start still going is never cleared)
        clear_unfinished(run)
    if not resume and not run.is_empty():  # a run started in it since it was judged
        run.unlock()
        raise RunDirError(f"'{run.path}' already holds a run; continue it with `resume` (nothing was overwritten)")
    return run


def setup(given: TrainOptions, saved: SavedRun, report: Callable[[dict], None], ctx: distributed.Dist) -> Setup:
    """Everything before the loop (see the module docstring), checking the cheap things first.

    `given` is the command line (unresolved), `saved` the run's run.json (`read_saved`; empty for a
    fresh start). If it fails before the run has written anything, a run directory it created is
    removed again: a typo never leaves a folder behind that the corrected command would refuse.
    """
    created = not Path(given.out).exists()
    left = ctx.is_main and not created and _is_unfinished(Path(given.out))
    run = open_run(given.out, bool(given.resume), saved, ctx.is_main)
    if left:
        report({"type": "note", "message": f"'{run.path}' held what a start that stopped during its set-up left "
                "(no run.json): removed, starting afresh"})  # fmt: skip
    try:
        return _setup(run, saved, given, report, ctx)
    except BaseException:
        if ctx.is_main and _is_unfinished(run.path):  # the grown tokenizer, ... written before run.json
            clear_unfinished(run)
        if created and ctx.is_main and run.is_empty():
            run.unlock()
            shutil.rmtree(run.path, ignore_errors=True)
        raise


def _is_unfinished(path: Path) -> bool:
    try:
        return path.is_dir() and judge_out(path) == "unfinished"
    except RunDirError:
        return False


def clear_unfinished(run: RunDir) -> list[str]:
    """Remove what a set-up that never wrote run.json left (see SETUP_FILES): so that a run folder is
    either a run `resume` continues or a folder the same command starts in. Returns the names removed."""
    removed = []
    for name in SETUP_FILES:
        path = run.path / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def check_tensorboard_dir(out: str, given: str | None) -> None:
    """`--tensorboard DIR`: a folder outside the run (made now, so that a bad one fails at once), or
    none (RUN/tensorboard). A folder of its own inside the run would be made before the run's set-up,
    never cleared, and make the run folder one that `--resume` refuses."""
    if not given:
        return
    folder, run = Path(given).expanduser().resolve(), Path(out).expanduser().resolve()
    if folder == run / TENSORBOARD_DIR:
        return  # the run's own (made with the run)
    if folder == run or run in folder.parents:
        own = Path(out) / TENSORBOARD_DIR
        raise OptionError("tensorboard", f"'{given}' is inside the run folder '{out}': give --tensorboard without a "
                          f"folder (it writes into {own}), or a folder outside the run")  # fmt: skip
    check_writable(folder, "the TensorBoard folder")


def _setup(run: RunDir, saved: SavedRun, given: TrainOptions, report: Callable[[dict], None], ctx) -> Setup:
    resume = bool(given.resume)
    if ctx.is_main:
        for message in run.recover():
            report({"type": "recovered", "message": message})
    if resume and saved.args is None and not given.data:
        raise RunDirError(f"nothing to resume in '{run.path}': it holds no run.json; start it with its data")
    resolved = resolve(given, saved.args if resume else None, ctx.device.type, ranks=ctx.world_size)
    o = resolved.options
    files = _check_inputs(o)
    dtype = resolve_dtype(o.dtype, ctx.device, training=True)
    if o.dtype in (None, "auto"):
        report({"type": "dtype", "dtype": str(dtype).removeprefix("torch."), "why": auto_dtype(ctx.device, True)[1]})
    check_train_memory(o, ctx, dtype)
    source, model, enc, tok_source, base = _start(o, run, files, report, ctx)
    corpus, eval_sets = _tokenize(o, enc, *files, ctx, report)
    for message in data_notes(corpus, eval_sets):
        report({"type": "note", "message": message})
    sets = {n: {"chars": d.chars, "tokens": len(d), "tokens_per_char": d.tokens_per_char} for n, d in eval_sets.items()}
    report({"type": "data", **corpus.summary(), "eval_sets": sets})
    if (rows := rows_record(files[0], o.encoding_errors)) is not None:
        report(rows)

    if "seq_len" in resolved.defaults_used or not o.seq_len:  # a default is a cap: a shorter context is used whole
        o.seq_len = min(o.seq_len or 1024, model.config.n_positions)
    config = train_config(o, len(corpus.train), ctx.world_size)
    snapshotter = None
    if config.snapshot_every:
        probe = o.probe or DEFAULT_PROBE
        snapshotter = Snapshotter(model, enc.encode(probe, disallowed_special=()), probe)
    tok_folder = tokenizer_source_for(tok_source, model.config.vocab_size)
    trainer = Trainer(model, corpus.train, eval_sets, config, run, device=ctx.device, dtype=dtype,
                      compile=bool(o.compile), tokenizer_source=tok_folder, base_model=base,
                      snapshotter=snapshotter, prompt_sampler=_prompt_sampler(o, enc, ctx, report), dist=ctx,
                      shard=bool(o.shard), keep_last=o.keep_last,
                      activation_checkpointing=bool(o.activation_checkpointing),
                      char_counts=char_counts(enc))  # fmt: skip
    if config.embed_warmup:
        report({"type": "note", "message": embed_warmup_phase(config)})
    skipped = trainer.resume() if resume else []
    for record in skipped:
        report({"type": "skipped", **record})
    if resume and trainer.step == 0:
        report({"type": "note", "message": f"no checkpoint in '{run.path}' to resume from: starting from step 0"})
    previous = _check_steps(trainer, saved if resume else SavedRun(None, None), run)
    # (before run.json is rewritten: a schedule that cannot be worked out must not leave a changed run.json)
    change = schedule_change(config, previous, trainer.step, o, saved.args) if previous is not None else None
    if ctx.is_main:
        size = checkpoint_bytes(model, sum(p.numel() for p in trainer.params))
        check_free_space(run, size)
        if not config.save_every:
            report({"type": "final_only", "bytes": size, "path": str(run.path / "final")})
        report(disk_use(model, sum(p.numel() for p in trainer.params), config.steps, config.save_every, o.keep_last))
        if saved.args is None or not resume or trainer.step == 0:
            run.write_info(_run_info(source, tok_source, o, model, config, corpus, eval_sets, ctx.device, dtype))
        elif previous is not None:
            update_steps(run, saved.info, config.steps)
    return Setup(trainer, run, o, resolved.defaults_used, skipped, change)


def _prompt_sampler(o: TrainOptions, enc, ctx: distributed.Dist, report: Callable[[dict], None]):
    """What continues the sample prompts at every evaluation (see `minigpt2.training.watch`), unless
    `sample_tokens` is 0; a sharded run cannot draw them on one rank, so it goes without (and says so)."""
    if not o.sample_tokens:
        return None
    if o.shard and ctx.world_size > 1:
        report({"type": "note", "message": "no samples while training a sharded model (its forward pass needs "
                "every rank)"})  # fmt: skip
        return None
    return PromptSampler(enc, sample_prompts(o.sample_prompt), o.sample_tokens)


def _check_inputs(o: TrainOptions) -> tuple:
    """(training files, validation files or None, [files of each eval set]), all checked: the cheap
    pass that makes a bad file or folder fail in a second, before a model is loaded."""
    check_combinations(o)
    check_writable(o.cache_dir or default_cache_dir(), "the token cache folder")
    compile_drop_lines(o.drop_lines)
    errors, text_field = o.encoding_errors, o.text_field
    train_files = check_inputs(o.data, errors, text_field)
    val_files = check_inputs(o.val_data, errors, text_field) if o.val_data else None
    if val_files is None and any(f.validation for f in train_files):  # a dataset's own validation split
        val_files = [f.validation for f in train_files if f.validation is not None]
    eval_files = [check_inputs([f], errors, text_field) for f in o.eval_data or []]
    every = [*train_files, *(val_files or []), *(f for files in eval_files for f in files)]
    if text_field != "text" and all(f.format == "text" for f in every):  # it would be ignored without a word
        why = "names the field of each row, but every input is a plain text file (read whole); leave it out"
        raise OptionError("text_field", why + ", or give row files (.jsonl, .json, .csv, .tsv, .parquet, hf:)")
    return train_files, val_files, eval_files


def _start(o: TrainOptions, run: RunDir, files: tuple, report, ctx) -> tuple:
    """(source, the model to train, its tokenizer, where the tokenizer's files are, the base a LoRA
    adapter applies to): the start model or a preset, grown by `extend_vocab` and wrapped with LoRA
    when asked."""
    source = None if o.init_preset else (o.model or "gpt2")
    tok_source = o.tokenizer or source or "gpt2"
    model = start_model(source, o.init_preset, preset_sizes(o), seed=o.seed, dropout=o.dropout)
    # After the model: its vocabulary decides whether GPT-2's tokenizer may stand in for missing files.
    enc = load_tokenizer(tok_source, vocab_size=model.config.vocab_size, explicit=bool(o.tokenizer))
    check_vocab_fits(model.config, enc)
    old_vocab, base = model.config.vocab_size, source
    if o.extend_vocab:
        model, enc, tok_source = _extended(model, enc, tok_source, o, run, files[0], files[2], report, ctx)
        if o.lora:  # PEFT applies the adapter to this grown model: the run keeps it
            base = _grown_base(model, run, tok_source, ctx, report)
    new_rows = range(old_vocab, model.config.vocab_size)
    if o.lora:
        _with_lora(model, o, report, new_rows)
    elif o.extend_vocab and (o.new_token_lr or o.embed_warmup):
        _with_trainable_tokens(model, new_rows)
    return source, model, enc, tok_source, base


def preset_sizes(o: TrainOptions) -> dict:
    """The preset's shape as given (`GPTConfig` names)."""
    return {"n_layer": o.n_layer, "n_head": o.n_head, "n_embd": o.n_embd, "n_positions": o.context}


def start_config(o: TrainOptions) -> GPTConfig:
    """The start model's shape, without building it: the preset's, or read from the checkpoint's
    config.json and safetensors header (no weights are read)."""
    if o.init_preset:
        try:
            return GPTConfig.from_preset(o.init_preset, **{k: v for k, v in preset_sizes(o).items() if v is not None})
        except (ValueError, TypeError) as e:
            raise MiniGPT2Error(f"preset {o.init_preset}: {e}") from None
    from minigpt2.io.weights import checkpoint_config, checkpoint_files, open_safetensors, read_header

    config_path, weights_path = checkpoint_files(o.model or "gpt2")
    with open_safetensors(weights_path) as f:
        return checkpoint_config(config_path, read_header(f, weights_path), weights_path)


def check_train_memory(o: TrainOptions, ctx: distributed.Dist, dtype: torch.dtype) -> None:
    """Refuse a run whose weights, gradients, AdamW state and activations cannot fit on its device
    (see `checks.train_memory_bytes`), before the model is built or any text tokenized."""
    config = start_config(o)
    if o.extend_vocab:
        config = dataclasses.replace(config, vocab_size=config.vocab_size + o.extend_vocab)
    seq_len = min(o.seq_len or config.n_positions, config.n_positions)
    check_train_memory_fits(
        config, o.batch_size, seq_len, dtype.itemsize, ctx.device, lora=bool(o.lora),
        shards=ctx.world_size if o.shard else 1, recompute=bool(o.activation_checkpointing),
    )  # fmt: skip


TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def train_config(o: TrainOptions, train_tokens: int, ranks: int) -> TrainConfig:
    """The loop's settings from the options; `steps` from steps, epochs or tokens (one epoch if none)."""
    tokens_per_step = o.batch_size * o.seq_len * o.grad_accum * ranks
    steps = steps_for(steps=o.steps, epochs=o.epochs, tokens=o.tokens,
                      train_tokens=train_tokens, tokens_per_step=tokens_per_step)  # fmt: skip
    given = {k: getattr(o, k) for k in TRAIN_FIELDS if getattr(o, k, None) is not None}
    return TrainConfig(**{**given, "steps": steps, "ranks": ranks})


def schedule_change(
    config: TrainConfig, previous_steps: int, step: int, o: TrainOptions, saved_args: dict | None = None
) -> dict:
    """How a resumed run's learning rate changes when its step count does (the cosine is stretched).
    The old schedule is the saved one: its own embedding warm-up (the new one may not fit in its steps)."""
    before = (saved_args or {}).get("embed_warmup") or 0
    before = before if before < previous_steps else 0
    old = TrainConfig(**{**dataclasses.asdict(config), "steps": previous_steps, "warmup": o.warmup,
                         "eval_every": o.eval_every, "embed_warmup": before})  # fmt: skip
    return {"before": previous_steps, "after": config.steps, "step": step, "lr_before": lr_at(step, old),
            "lr_after": lr_at(step, config)}  # fmt: skip


def _extended(model, enc, tok_source, o: TrainOptions, run: RunDir, train_files, eval_files, report, ctx):
    """The model and tokenizer grown by `extend_vocab` new tokens (see vocab.py).

    Learned once: a fresh run learns the merges (or finds them cached) and writes the grown tokenizer
    into RUN/tokenizer/; a resumed run reads it back from there and grows the model the same way
    (the checkpoint's weights then replace the grown start).
    """
    from minigpt2.io.tokenizer import encoding_from_files
    from minigpt2.training.vocab import extend_vocabulary, grow_model

    folder = run.path / "tokenizer"
    if (folder / "vocab.json").is_file():
        new_enc = encoding_from_files(folder / "vocab.json", folder / "merges.txt")
        return grow_model(model, enc, new_enc), new_enc, folder
    base = locate_tokenizer(tok_source)[0][0].parent
    vocab_from = check_inputs(o.vocab_from, o.encoding_errors, o.text_field) if o.vocab_from else None
    eval_texts = {files[0].path.stem: head_text(files[0], 200_000) for files in eval_files}
    with ctx.main_first():
        grown, new_enc, folder, summary = extend_vocabulary(
            model,
            enc,
            train_files,
            o.extend_vocab,
            tokenizer_dir=folder,
            base_tokenizer_dir=base,
            vocab_from_files=vocab_from,
            eval_texts=eval_texts,
            cache_dir=o.cache_dir,
            progress=lambda what, done, total: report({"type": "phase", "what": what, "done": done, "total": total}),
        )
    report({"type": "vocab", **summary})
    return grown, new_enc, folder


def _grown_base(model: GPT, run: RunDir, tokenizer_dir, ctx, report) -> str:
    """Save the grown model (before LoRA) as RUN/grown-base, once, and return its absolute path:
    the adapter's `base_model_name_or_path`, so that PEFT finds the base it was trained on."""
    from minigpt2.io.weights import save_model

    folder = (run.path / GROWN_BASE).resolve()
    damage = grown_base_damage(folder, model.config) if ctx.is_main and folder.exists() else None
    if ctx.is_main and (damage or not folder.exists()):  # the grown model is rebuilt the same way each time
        save_model(model, folder, tokenizer_source=tokenizer_dir, overwrite=True)
    if damage:
        report({"type": "note", "message": f"'{folder}' was damaged ({damage}): written again from the run's "
                "start model and tokenizer"})  # fmt: skip
    return str(folder)


def grown_base_damage(folder: Path, expected: GPTConfig) -> str | None:
    """What is wrong with RUN/grown-base (a file missing, weights cut short, another shape), or None."""
    from minigpt2.io.weights import checkpoint_config, open_safetensors, read_header

    missing = [n for n in (CONFIG, WEIGHTS, "vocab.json", "merges.txt") if not (folder / n).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        with open_safetensors(folder / WEIGHTS) as f:
            config = checkpoint_config(folder / CONFIG, read_header(f, folder / WEIGHTS), folder / WEIGHTS)
    except (MiniGPT2Error, OSError) as e:
        return str(e).split(";")[0][:200]
    shape = ("vocab_size", "n_layer", "n_head", "n_embd", "n_positions")
    same = all(getattr(config, k) == getattr(expected, k) for k in shape)
    return None if same else "its config.json is not the grown model's shape"


def _with_trainable_tokens(model: GPT, new_rows: range) -> None:
    """The new rows as a parameter of their own: trainable beside frozen old rows (LoRA), or in an
    optimizer group with their own learning rate and phase (see trainer.param_groups)."""
    from minigpt2.model.lora import add_trainable_tokens

    if new_rows:
        add_trainable_tokens(model, new_rows)


def _with_lora(model: GPT, o: TrainOptions, report, new_rows: range) -> None:
    """Freeze the model and give the targeted layers a low-rank update to learn (see lora.py); a
    grown vocabulary's new rows (`new_rows`, empty when not grown) train too.

    A resumed run rebuilds the same: the start model (never a merged checkpoint) and the same
    adapters; the trainer then loads the adapters' trained values from the checkpoint.
    """
    from minigpt2.model.lora import TARGETS, apply_lora, lora_summary

    targets = o.lora_targets or ",".join(TARGETS)
    apply_lora(
        model,
        o.lora,
        alpha=o.lora_alpha,
        dropout=o.lora_dropout or 0.0,
        targets=targets,
        seed=o.seed,
    )
    _with_trainable_tokens(model, new_rows)
    report({"type": "lora", **lora_summary(model)})


def _tokenize(o, enc, train_files, val_files, eval_files, ctx, report):
    """The training corpus and the eval sets (val: --val-data, else the held-out tails), tokenized
    once into the cache (rank 0 first under torchrun), telling `report` how far tokenizing is."""
    common = dict(drop_lines=o.drop_lines, encoding_errors=o.encoding_errors, cache_dir=o.cache_dir,
                  text_field=o.text_field)  # fmt: skip

    def told(what: str):  # characters tokenized so far, as a "phase" record the console shows
        return lambda done, total: report({"type": "phase", "what": f"tokenizing {what} (characters)",
                                           "done": done, "total": total})  # fmt: skip

    with ctx.main_first():  # rank 0 fills the cache; the others then read it
        corpus = prepare_corpus(train_files, enc, val_fraction=0.0 if val_files else o.val_fraction,
                                progress=told("the training text"), **common)  # fmt: skip
        # Too little text is refused where the user gave it (the training text, --val-data,
        # --eval-data) and said at the start where it is the held-out tail (data_notes).
        check_enough_text(_named("the training text of", train_files), None, len(corpus.train), training=True)
        eval_sets = {}
        if val_files:
            given = "--val-data" if o.val_data else "the dataset's validation split"  # else it came with --data
            eval_sets["val"] = prepare_corpus(val_files, enc, progress=told(given), **common).train
            check_enough_text(_named(given, val_files), None, len(eval_sets["val"]))
        elif corpus.val is not None and len(corpus.val) >= MIN_SCORED_TOKENS:
            eval_sets["val"] = corpus.val
        for files in eval_files:
            name = files[0].path.stem
            eval_sets[name] = prepare_corpus(files, enc, progress=told(name), **common).train
            check_enough_text(_named("--eval-data", files), None, len(eval_sets[name]))
    return corpus, eval_sets


def _named(what: str, files) -> str:
    names = [getattr(f, "path", None) or getattr(f, "spec", f) for f in files]  # a file, or a dataset
    shown = ", ".join(f"'{n}'" for n in names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")
    return f"{what} {shown}"


def data_notes(corpus, eval_sets: dict) -> list[str]:
    """What the start should say about the data: rows left out, held-out text too small to use."""
    notes = []
    if corpus.summary().get("empty_rows"):
        notes.append(f"{corpus.summary()['empty_rows']:,} empty or blank rows left out (nothing to learn from)")
    if corpus.val is not None and "val" not in eval_sets:
        notes.append(
            f"the held-out text is {len(corpus.val)} token(s), too little to evaluate: no validation loss will be "
            "computed; give more text, a larger --val-fraction or --val-data"
        )
    return notes


def _check_steps(trainer: Trainer, saved: SavedRun, run: RunDir) -> int | None:
    """A resumed run must have steps left; returns the previously planned steps if they changed."""
    steps = trainer.config.steps
    if trainer.step >= steps:
        raise RunDirError(
            f"the run in '{run.path}' already reached step {trainer.step} of {steps}; give a larger "
            "number of steps (or epochs, or tokens) to train further"
        )
    before = (saved.info or {}).get("train", {}).get("steps")
    return before if before is not None and before != steps else None


def _run_info(source, tok_source, o: TrainOptions, model, config, corpus, eval_sets, device, dtype) -> dict:
    return {
        "model": source,
        "init_preset": o.init_preset,
        "config": dataclasses.asdict(model.config),
        "tokenizer": str(tok_source) if tok_source is not None else None,
        "train": dataclasses.asdict(config),
        "args": o.to_json(),
        "data": corpus.summary(),
        "eval_sets": {
            n: {"chars": d.chars, "tokens": len(d), "tokens_per_char": d.tokens_per_char} for n, d in eval_sets.items()
        },
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def update_steps(run: RunDir, info: dict, steps: int) -> None:
    """Record a resumed run's new step count in run.json (what `compare.py` and a later resume read)."""
    info = dict(info)
    info["train"] = {**(info.get("train") or {}), "steps": steps}
    info["args"] = {**(info.get("args") or {}), "steps": steps}
    run.write_info(info)


def checkpoint_bytes(model: GPT, trainable: int) -> int:
    """About what one checkpoint takes on disk: float32 weights + two AdamW moments per trainable weight."""
    return 4 * model.num_params() + 8 * trainable


def embed_warmup_phase(config) -> str:
    """The start's word on --embed-warmup: which steps train only the new rows, at what rate, then what."""
    k = config.embed_warmup
    return (
        f"steps 1-{k} train only the grown vocabulary's new rows (--embed-warmup {k}; learning rate up to "
        f"{config.new_token_lr or config.lr:.2e}, the rate the log shows); from step {k + 1} everything "
        f"trains (learning rate {config.lr:.2e}, with a warm-up and cosine of its own)"
    )


def rows_record(train_files, encoding_errors: str) -> dict | None:
    """For row inputs (JSON Lines, CSV, Parquet, a dataset): how many rows, the field read, and the
    start of the first row, so a user sees at once that the text, not the raw record, is trained on."""
    from minigpt2.training.data import documents

    row_files = [f for f in train_files if f.format != "text"]
    if not row_files:
        return None
    texts = (text for f in row_files for _, _, text in documents(f, encoding_errors) if isinstance(text, str))
    first = next(texts, "")
    return {"type": "rows", "rows": sum(f.rows for f in row_files), "sources": len(row_files),
            "fields": sorted({f.text_field for f in row_files if f.text_field}), "first": first[:60]}  # fmt: skip


def discard_unstarted(run: RunDir, *, resumed: bool) -> str:
    """A new run stopped before its first step holds nothing worth keeping (its step-0 evaluation, its
    settings): empty its folder, so that the same command starts it again; the advice, as a sentence.
    A resumed run's folder is the user's run: it stays, and --resume starts it from step 0."""
    if resumed:
        return f"run the same command again: it starts '{run.path}' from step 0"
    for entry in run.path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return f"'{run.path}' is empty again (the run had not started): run the same command to start it"


def disk_use(model: GPT, trainable: int, steps: int, save_every: int, keep_last: int) -> dict:
    """What the run's checkpoints take, for the start line: float32 weights in every checkpoint, the
    optimizer state (two AdamW moments per trainable weight) only in the newest two (`final/` and
    the step folder before it; see `checkpoint.drop_old_optimizer_state`)."""
    weights, state = 4 * model.num_params(), 8 * trainable
    step_folders = (steps - 1) // save_every if save_every else 0  # the last step is saved as final/ alone
    kept = min(keep_last, step_folders) if keep_last else step_folders
    folders = kept + 1
    return {"type": "disk", "weights": weights, "state": state, "folders": folders, "keep_last": keep_last,
            "total": folders * weights + min(2, folders) * state}  # fmt: skip


def check_free_space(run: RunDir, needed: int) -> None:
    """Refuse to start when the disk cannot hold even one checkpoint (a full disk found after an hour)."""
    free = shutil.disk_usage(run.path).free
    if free < needed:
        raise RunDirError(
            f"the disk holding '{run.path}' has {free / 1e9:.2f} GB free, but one checkpoint of this "
            f"model takes about {needed / 1e9:.2f} GB; free some space or choose another folder"
        )
