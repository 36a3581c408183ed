"""train.py's options as one typed object: every option's name, default, check, help and
resume rule in one place, resolved once.

    TrainOptions          a dataclass; each field is one option, declared with `option(...)`:
                          its help text, its argparse group and check (`type=`, `choices=`, ...),
                          its default (one for all devices, or `cpu=` / `gpu=` where they differ)
                          and whether a resumed run may change it (`fixed=True`: it may not)
    build_parser()        train.py's argparse parser, made from the fields (flag: --name-with-dashes)
    resolve()             the options a run uses, decided once, in this order:
                              1. what the command line gave,
                              2. on --resume, what the run saved in run.json ("args"),
                              3. the device's defaults;
                          it returns the resolved options and the device defaults it used (the
                          start line names them: "defaults for this cpu: --batch-size 4, ...")
    saved_options()       run.json's "args", checked field by field (a damaged run.json is one
                          clear error naming the file)

A value of None means "not given" until `resolve` has run. The trainer's `TrainConfig` is built
from the resolved object (`setup_run.train_config`); run.json records `to_json()`. The options
own the defaults and checks the two share: `TrainConfig`'s fields take theirs from here
(`default`, `check`), so each is written once.

How to add an option (one edit): add a field to `TrainOptions` in the group it belongs to, e.g.

    new_token_lr: float | None = option("learning rate of the new tokens' rows (default: --lr)",
                                        group="training", type=arg_float(low=0, low_open=True))

and use `o.new_token_lr` where it matters. `fixed=True` if a resumed run must keep it (anything that
changes the batches or the model); `cpu=`/`gpu=` for a default that depends on the device (it is
then shown on the start line when used); `default=` otherwise. If it is a `TrainConfig` field too,
`train_config` passes it on by name, and the field takes its default and check from here
(`default("name")`, `check`). Nothing else names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from minigpt2.checks import (
    MAX_NEW_TOKENS,
    SEED_MAX,
    ArgumentParser,
    arg_float,
    arg_int,
    check_embed_warmup,
    lone_surrogate,
    text_arg,
)
from minigpt2.errors import MiniGPT2Error, OptionError
from minigpt2.generation import SAMPLE_TOKENS  # noqa: F401  (re-exported: compare.py reads it from here)
from minigpt2.model.config import PRESETS  # the model sizes --init-preset may name (torch-free)


def arg_folder(value: str) -> str:
    """A folder argument: an empty one ("" from an unset shell variable) would mean the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?); give the run's folder")
    return value


GROUPS = {
    "data": "data",
    "model": "model",
    "lora": "LoRA: learn a low-rank update of each targeted layer, everything else frozen (but a grown vocabulary's "
    "new rows; which recipe pays: docs/recipes.md)",
    "training": "training (CPU defaults first, then GPU defaults)",
    "output": "evaluation, checkpoints, output (CPU defaults first, then GPU defaults)",
    "hardware": "hardware",
}
SIZE_OPTIONS = ("steps", "epochs", "tokens")  # one of them sets the run's length


def option(
    help: str,
    *,
    group: str,
    default: Any = None,
    cpu: Any = None,
    gpu: Any = None,
    fixed: bool = False,
    saved: bool = True,
    flag: str | None = None,
    **argparse_kwargs,
):
    """A `TrainOptions` field: None until resolved. `cpu`/`gpu`: per-device defaults (then shown on the
    start line when used); `fixed`: a resumed run may not change it; `saved`: recorded in run.json.
    In `help`, {default}, {cpu} and {gpu} stand for those values (each default is written once)."""
    help = help.format(default=_shown(default), cpu=_shown(cpu), gpu=_shown(gpu))
    per_device = cpu is not None or gpu is not None
    meta = {"help": help, "group": group, "default": default, "cpu": cpu, "gpu": gpu, "per_device": per_device,
            "fixed": fixed, "saved": saved, "flag": flag, "argparse": argparse_kwargs}  # fmt: skip
    return field(default=None, metadata=meta)


def _shown(value: Any) -> str:
    """A default as the help shows it: 3e-4 rather than 0.0003; 0.1, 1.0 and 4096 as they are."""
    text = str(value)
    if isinstance(value, float) and "e" not in text and len(text) > 5:
        mantissa, exponent = f"{value:e}".split("e")
        text = f"{float(mantissa):g}e{int(exponent)}"
    return text


def extend(metavar: str) -> dict:
    return {"nargs": "+", "action": "extend", "metavar": metavar}


# fmt: off
@dataclass
class TrainOptions:
    """Every option of train.py (see the module docstring). None: not given (before `resolve`)."""

    # data
    data: list[str] | None = option("text files, folders, globs; .jsonl/.json/.csv/.tsv/.parquet (one document per "
                                    "row), .gz/.bz2/.xz/.zst, or a dataset: hf:OWNER/NAME[:CONFIG][@SPLIT] or "
                                    "hf:FOLDER (see docs/data.md)", group="data", fixed=True, **extend("PATH"))
    text_field: str | None = option("the field (column) of each row that holds its text (default {default})",
                                    group="data", default="text", fixed=True, metavar="NAME")
    val_data: list[str] | None = option("held-out text (default: a dataset's own validation split, else whole rows "
                                        "of many-row data, else the tail of each document)", group="data",
                                        fixed=True, **extend("PATH"))
    val_fraction: float | None = option("share of each document held out when there is no --val-data (default "
                                        "{default})", group="data", default=0.005, fixed=True,
                                        type=arg_float(low=0, high=1, high_open=True))
    eval_data: list[str] | None = option("more texts to evaluate on", group="data", **extend("FILE"))
    drop_lines: str | None = option("leave out lines matching this regular expression", group="data", fixed=True,
                                    metavar="REGEX")
    encoding_errors: str | None = option("non-UTF-8 bytes: an error or U+FFFD", group="data", default="strict",
                                         fixed=True, choices=["strict", "replace"])
    cache_dir: str | None = option("token cache (default $MINIGPT2_CACHE or ~/.cache/minigpt2/tokens)", group="data")
    tokenizer: str | None = option("where vocab.json + merges.txt come from (default: the model's, or gpt2's)",
                                   group="data", fixed=True)
    extend_vocab: int | None = option("learn N new tokens from the training text; grow the tokenizer and the "
                                      "embedding (Chinese: 2.1 -> 0.9 tokens per character at 8000); with --lora "
                                      "only the new rows and the adapters train. Which recipe pays: "
                                      "docs/recipes.md", group="data", fixed=True, type=arg_int(low=1), metavar="N")
    vocab_from: list[str] | None = option("learn them from these texts", group="data", fixed=True,
                                          **extend("PATH"))
    new_token_lr: float | None = option("with --extend-vocab: peak learning rate of the new rows (default --lr)",
                                        group="data", type=arg_float(low=0, low_open=True), metavar="LR")
    embed_warmup: int | None = option("with --extend-vocab: train only the new rows for the first STEPS steps, then "
                                      "the model (or the adapters) too (default 0)", group="data",
                                      type=arg_int(low=0), metavar="STEPS")
    # model
    model: str | None = option("gpt2[-medium|-large|-xl], a hub id or a checkpoint to fine-tune (default gpt2)",
                               group="model", fixed=True)
    init_preset: str | None = option("start from random weights of this shape instead", group="model", fixed=True,
                                     choices=list(PRESETS))
    n_layer: int | None = option("with --init-preset: number of blocks", group="model", fixed=True,
                                 type=arg_int(low=1))
    n_head: int | None = option("with --init-preset: attention heads", group="model", fixed=True,
                                type=arg_int(low=1))
    n_embd: int | None = option("with --init-preset: width", group="model", fixed=True, type=arg_int(low=1))
    context: int | None = option("with --init-preset: context length (positions)", group="model", fixed=True,
                                 type=arg_int(low=1))
    dropout: float | None = option("dropout (default: the model's)", group="model", fixed=True,
                                   type=arg_float(low=0, high=1, high_open=True))
    # LoRA
    lora: int | None = option("rank of the update (e.g. 8)", group="lora", fixed=True, type=arg_int(low=1),
                              metavar="R")
    lora_alpha: float | None = option("scale A/R (default 8)", group="lora", fixed=True,
                                      type=arg_float(low=0, low_open=True), metavar="A")
    lora_dropout: float | None = option("(default 0)", group="lora", fixed=True,
                                        type=arg_float(low=0, high=1, high_open=True), metavar="P")
    lora_targets: str | None = option("comma-separated layers of each block "
                                      "(default attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj)", group="lora",
                                      fixed=True, metavar="LIST")
    # training
    out: str | None = option("the run directory (must not hold a run, unless --resume)", group="training",
                             saved=False, required=True, type=arg_folder)
    resume: bool | None = option("continue the run in --out from its newest good checkpoint", group="training",
                                 saved=False, action="store_true")
    batch_size: int | None = option("sequences per micro-batch (default {cpu})", group="training", cpu=4, gpu=4,
                                    type=arg_int(low=1))
    seq_len: int | None = option("tokens per sequence (default {cpu}; the context)", group="training", fixed=True,
                                 cpu=128, type=arg_int(low=1))
    steps: int | None = option("optimizer steps (default {cpu}; one epoch)", group="training", cpu=500,
                               type=arg_int(low=1))
    epochs: float | None = option("passes over the training text", group="training",
                                  type=arg_float(low=0, low_open=True))
    tokens: float | None = option("training tokens", group="training", type=arg_float(low=1))
    grad_accum: int | None = option("micro-batches per optimizer step (default {default})", group="training", default=1,
                                    type=arg_int(low=1))
    lr: float | None = option("peak learning rate (default {default})", group="training", default=3e-4,
                              type=arg_float(low=0, low_open=True))
    min_lr: float | None = option("final learning rate (default lr / 10)", group="training", type=arg_float(low=0))
    warmup: int | None = option("warm-up steps (default 5%% of the steps, at most 1000)", group="training",
                                type=arg_int(low=0))
    weight_decay: float | None = option("AdamW decay of the linear weights (default {default})", group="training",
                                        default=0.1, type=arg_float(low=0))
    grad_clip: float | None = option("clip the gradient norm; 0: off (default {default})", group="training",
                                     default=1.0, type=arg_float(low=0))
    seed: int | None = option("for init, batches and dropout (default {default})", group="training", default=0,
                              fixed=True, type=arg_int(low=0, high=SEED_MAX))
    # evaluation, checkpoints, output
    eval_every: int | None = option("evaluate every N steps (default {cpu}; steps/10)", group="output", cpu=50,
                                    type=arg_int(low=0))
    eval_tokens: int | None = option("tokens per eval set (default {cpu}; {gpu})", group="output", cpu=4096,
                                     gpu=65536, type=arg_int(low=1))
    save_every: int | None = option("checkpoint every N steps; 0: at the end ({cpu}; {gpu})", group="output", cpu=100,
                                    gpu=1000, type=arg_int(low=0))
    keep_last: int | None = option("step checkpoints kept (final/ always; 0: all; default {default})", group="output",
                                   default=3, type=arg_int(low=0))
    snapshot_every: int | None = option("record weight and activation drift every N steps", group="output",
                                        default=0, type=arg_int(low=0))
    probe: str | None = option("probe prompt for the activation snapshots", group="output")
    log_every: int | None = option("print a table row every N steps (default {default})", group="output", default=10,
                                   type=arg_int(low=1))
    sample_prompt: list[str] | None = option("continue this prompt at every evaluation, with a fixed seed "
                                             "(repeatable; default: a Chinese and an English sentence)",
                                             group="output", action="append", type=text_arg, metavar="TEXT")
    sample_tokens: int | None = option("new tokens per sample (default {default}; 0: no samples)",
                                       group="output", default=SAMPLE_TOKENS, type=arg_int(low=0, high=MAX_NEW_TOKENS),
                                       metavar="N")
    tensorboard: str | None = option("also log to TensorBoard, in DIR (default RUN/tensorboard; needs the "
                                     "tensorboard package)", group="output", saved=False, nargs="?", const="",
                                     metavar="DIR")
    # hardware
    device: str | None = option("auto, cpu, cuda, cuda:N or mps (default {default})", group="hardware", default="auto")
    dtype: str | None = option("compute precision; auto: bfloat16 on a GPU that has it, on a CPU only where it "
                               "computes bfloat16 natively (AVX-512 BF16, AMX), else float32", group="hardware",
                               default="auto",
                               choices=["auto", "float32", "bfloat16", "float16"])
    threads: int | None = option("CPU threads (default: one per core); on a machine shared with other jobs, 1 or 2 "
                                 "is often faster", group="hardware", saved=False, type=arg_int(low=1))
    compile: bool | None = option("use torch.compile", group="hardware", action="store_true", default=None)
    shard: bool | None = option("under torchrun: shard weights, gradients and AdamW state over the ranks (FSDP)",
                                group="hardware", action="store_true", default=None)
    activation_checkpointing: bool | None = option("recompute each block's activations in backward: less memory, "
                                                   "~1/3 more compute", group="hardware", action="store_true",
                                                   default=None)
    # set by `resolve`, not an option: data-parallel processes (the global batch is kept on resume)
    ranks: int | None = None

    def to_json(self) -> dict:
        """What run.json records as "args" (the options a resume reads back)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("saved", True)}

    def given(self) -> dict:
        """The options that are set (not None), by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
# fmt: on

OPTIONS = [f for f in fields(TrainOptions) if "help" in f.metadata]
FIXED_ON_RESUME = tuple(f.name for f in OPTIONS if f.metadata["fixed"])
FLAGS = {f.name: f"--{f.name.replace('_', '-')}" for f in OPTIONS}  # the script's spelling of each option
RULES = {f.name: f.metadata["argparse"].get("type") for f in OPTIONS}
OPTION_RULES = {name: rule for name, rule in RULES.items() if hasattr(rule, "check")}  # the numbers' checks


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """train.py's parser: one flag per option, checked while parsing (before any data or model is loaded)."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: p.add_argument_group(title) for name, title in GROUPS.items()}
    for f in OPTIONS:
        m = f.metadata
        kwargs = dict(m["argparse"])
        if kwargs.get("action") == "store_true" and "default" not in kwargs:
            kwargs["default"] = None  # "not given", so a resumed run keeps its saved choice
        groups[m["group"]].add_argument(FLAGS[f.name], dest=f.name, help=m["help"], **kwargs)
    return p


def parse(argv=None, description: str | None = None) -> TrainOptions:
    """The command line as a `TrainOptions` (unresolved: None where an option was not given)."""
    return TrainOptions(**vars(build_parser(description).parse_args(argv)))


def device_defaults(device_type: str) -> dict:
    """The defaults that differ by device ("cuda" or anything else), by name."""
    key = "gpu" if device_type == "cuda" else "cpu"
    return {f.name: f.metadata[key] for f in OPTIONS if f.metadata["per_device"]}


def defaults_for(device_type: str) -> dict:
    """Every option's default on this device (None: decided later, e.g. one epoch of steps)."""
    common = {f.name: f.metadata["default"] for f in OPTIONS}
    return {**common, **device_defaults(device_type)}


# The trainer's `TrainConfig` takes its defaults and checks from here: each is written once, in its
# option above, and the library and the command line cannot drift apart.


def default(name: str, device_type: str = "cpu") -> Any:
    """Option `name`'s default (on `device_type` where it depends on the device)."""
    return defaults_for(device_type)[name]


def check(name: str, value: Any) -> None:
    """`value` checked by option `name`'s own rule (its `type=`); an `OptionError` naming `name` if it breaks it."""
    OPTION_RULES[name].check(name, value)


@dataclass
class Resolved:
    """The options a run uses, and the device defaults among them (for the start line)."""

    options: TrainOptions
    defaults_used: list[str]  # names; their values are read from `options` (a default may be capped later)


def resolve(given: TrainOptions, saved: dict | None, device_type: str, ranks: int = 1) -> Resolved:
    """Command line, then (on resume) the saved run's options, then the device's defaults.

    A resumed run may not change a `fixed` option, nor its global batch (batch x accumulation x
    ranks): either would change what it computes. A new --steps, --epochs or --tokens replaces the
    saved length (any of the three).
    """
    explicit = {k: v for k, v in given.given().items() if k != "ranks"}
    if "val_fraction" in explicit and (explicit.get("val_data") or (saved or {}).get("val_data")):
        raise OptionError(
            "val_fraction",
            "holds out a share of the training text only when there is no `val_data`: give one or the other",
        )
    defaults = defaults_for(device_type)
    if saved is None:
        merged = {**defaults, **explicit}
        if any(k in explicit for k in ("epochs", "tokens")):
            merged["steps"] = explicit.get("steps")
        used = [k for k in device_defaults(device_type) if k not in explicit and merged[k] is not None]
        return Resolved(TrainOptions(**{**merged, "ranks": ranks}), used)
    changed = [k for k in FIXED_ON_RESUME if k in explicit and explicit[k] != saved.get(k)]
    if changed:
        raise OptionError(
            changed[0],
            f"cannot change when a run is resumed (it was {saved.get(changed[0])!r}): the "
            "run would no longer continue exactly; start a new run directory instead",
        )
    saved = {k: v for k, v in saved.items() if v is not None}
    if any(k in explicit for k in SIZE_OPTIONS):
        for k in SIZE_OPTIONS:
            saved.pop(k, None)
    merged = {**defaults, **saved, **explicit}
    if any(k in explicit for k in ("epochs", "tokens")):  # a new length in epochs or tokens: not the default steps
        merged["steps"] = explicit.get("steps")
    # A run.json from before an option existed ran with its default (and on one process).
    before = saved.get("batch_size", defaults["batch_size"]) * saved.get("grad_accum", defaults["grad_accum"])
    before *= saved.get("ranks", 1)
    if merged["batch_size"] * merged["grad_accum"] * ranks != before:
        raise OptionError(
            "batch_size",
            f"must keep a resumed run's global batch of {before} sequences per step (batch size x gradient "
            f"accumulation x ranks); with {ranks} rank(s), give a batch size and accumulation whose product is "
            f"{before / ranks:g}",
        )
    _check_new_rows_kept(saved, merged, explicit)
    return Resolved(TrainOptions(**{**merged, "ranks": ranks}), [])


def _check_new_rows_kept(saved: dict, merged: dict, explicit: dict) -> None:
    """A grown vocabulary's new rows are a parameter of their own with `new_token_lr` or
    `embed_warmup` (see setup_run), and part of the embedding without: a resumed run may change
    their values, not whether there are any, or its checkpoints no longer fit its parameters."""

    def split(options: dict) -> bool:
        return bool(options.get("extend_vocab")) and bool(options.get("new_token_lr") or options.get("embed_warmup"))

    if merged.get("lora") or split(saved) == split(merged):
        return
    name = next(k for k in ("embed_warmup", "new_token_lr") if k in explicit)
    raise OptionError(
        name,
        f"cannot be {'added to' if split(merged) else 'dropped from'} a resumed run: it decides whether the new "
        "tokens' rows train as a parameter of their own, and the run's checkpoints were saved "
        f"{'without' if split(merged) else 'with'} them apart; resume as it was, or start a new run directory",
    )


def check_combinations(o: TrainOptions) -> None:
    """The combinations no single option's check can see."""
    if o.model and o.init_preset:
        raise MiniGPT2Error("give a model to fine-tune or a preset to start from random weights, not both")
    if not o.init_preset and any(x is not None for x in (o.n_layer, o.n_head, o.n_embd, o.context)):
        raise MiniGPT2Error("the layer count, head count, width and context only apply to a preset")
    if not o.data:
        raise MiniGPT2Error("no training data given: the text files, directories or globs to train on")
    for name in ("new_token_lr", "embed_warmup"):
        if getattr(o, name) and not o.extend_vocab:
            raise OptionError(
                name,
                "only applies to the new tokens of a grown vocabulary: give `extend_vocab` N too "
                "(docs/recipes.md says which recipe pays for which budget)",
            )
        if getattr(o, name) and o.shard:
            raise OptionError(name, "does not work with a sharded model yet: train without `shard`")
    check_embed_warmup(o.embed_warmup or 0, o.steps)  # before anything is written
    if not o.lora and any(x is not None for x in (o.lora_alpha, o.lora_dropout, o.lora_targets)):
        raise OptionError("lora", "is needed for the other LoRA settings (alpha, dropout, targets): give the rank")
    if o.vocab_from and not o.extend_vocab:
        raise OptionError(
            "vocab_from",
            "only says where `extend_vocab` learns its new tokens from: give `extend_vocab` N too, or leave it out",
        )


# ----- reading run.json's options back ------------------------------------------------------------


def _kind(f: dataclasses.Field) -> str:
    t = str(f.type)
    for kind in ("list", "bool", "int", "float", "str"):
        if t.startswith(kind):
            return kind
    return "any"


def saved_options(args: Any, where: Path) -> dict:
    """run.json's "args", every field checked: a damaged run.json is one `RunDirError`-like error
    naming the file, never a crash further on. Unknown names (a newer version's options) are kept."""
    from minigpt2.training.rundir import RunDirError

    def bad(why: str) -> MiniGPT2Error:
        return RunDirError(f"'{where}' is damaged: {why}; restore it from a backup, or start a new run directory")

    if not isinstance(args, dict):
        raise bad(f'its "args" should be an object of options, not {type(args).__name__}')
    known = {f.name: f for f in fields(TrainOptions)}
    for name, value in args.items():
        f = known.get(name)
        if f is None or value is None:
            continue
        kind = _kind(f)
        ok = {
            "list": isinstance(value, list) and all(isinstance(x, str) for x in value),
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            "str": isinstance(value, str),
        }.get(kind, True)
        if not ok:
            wanted = {"list": "a list of texts", "bool": "true or false", "int": "an integer", "float": "a number"}
            raise bad(f'"args"."{name}" is {value!r}, not {wanted.get(kind, "a text")}')
        texts = value if kind == "list" else [value] if kind == "str" else []
        half = next(filter(None, map(lone_surrogate, texts)), None)
        if half:  # (it could not be written back: run.json is UTF-8)
            raise bad(f'"args"."{name}" holds the escape {half}, half of a UTF-16 pair and no character')
        check = f.metadata.get("argparse", {}).get("type")
        if check is not None and kind in ("int", "float"):
            try:
                check(str(value))
            except argparse.ArgumentTypeError as e:
                raise bad(f'"args"."{name}" {e}') from None
        choices = f.metadata.get("argparse", {}).get("choices")
        if choices is not None and value not in choices:
            raise bad(f'"args"."{name}" is {value!r}, not one of {", ".join(choices)}')
    if isinstance(args.get("ranks"), int) and args["ranks"] < 1:
        raise bad(f'"args"."ranks" is {args["ranks"]}, not a positive integer')
    return {k: v for k, v in args.items() if k in known}
