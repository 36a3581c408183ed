"""Fine-tune GPT-2 (or train one from scratch) on your text, with evaluation as it goes.

    python train.py --data novels/ --out runs/zh --steps 2000                  # fine-tune gpt2
    python train.py --data novels/ --eval-data luxun.txt --out runs/zh --resume  # continue it
    python train.py --data zh/ --init-preset gpt2 --n-layer 2 --n-head 2 --n-embd 64 --context 64 \\
        --tokenizer data/gpt2 --out runs/tiny --steps 200                         # tiny, from scratch

Ctrl-C (or SIGTERM) saves a checkpoint and stops; --resume continues exactly where it stopped.

    torchrun --nproc_per_node=8 train.py --data novels/ --out runs/zh [--shard]   # 8 GPUs, data parallel
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

# Fixed for the life of a run: --resume refuses to change them (the batches would differ).
FIXED_ON_RESUME = ("model", "init_preset", "n_layer", "n_head", "n_embd", "context", "data", "val_data", "val_fraction",
                   "drop_lines", "encoding_errors", "seq_len", "seed", "dropout", "tokenizer")
# --batch-size and --grad-accum may change on resume, but only together with the number of ranks:
# the global batch (batch x accum x ranks windows per step) is what defines the batches.
DEFAULTS = {"model": None, "batch_size": 4, "seq_len": None, "grad_accum": 1, "lr": 3e-4, "weight_decay": 0.1,
            "grad_clip": 1.0, "val_fraction": 0.005, "encoding_errors": "strict", "save_every": 1000,
            "eval_tokens": 65536, "snapshot_every": 0, "log_every": 10, "device": "auto", "dtype": "auto", "seed": 0}


def parser() -> argparse.ArgumentParser:
    # Argument values are checked while parsing (finite, in range), before any data or model is
    # loaded; a bad one is the single line "error: --lr must be a finite number > 0, got nan".
    from minigpt2.checks import SEED_MAX, ArgumentParser, arg_float, arg_int

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None)
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", action="extend", metavar="PATH", help="text files, directories (every .txt below) or globs")
    d.add_argument("--val-data", nargs="+", action="extend", metavar="PATH", help="held-out text (default: the tail of each --data document)")
    d.add_argument("--val-fraction", type=arg_float(low=0, high=1, high_open=True), help="share of each document held out when there is no --val-data (default 0.005)")
    d.add_argument("--eval-data", nargs="+", action="extend", metavar="FILE", help="more texts to evaluate on, each its own set")
    d.add_argument("--drop-lines", metavar="REGEX", help="leave out lines matching this regular expression")
    d.add_argument("--encoding-errors", choices=["strict", "replace"], help="non-UTF-8 bytes: an error (default) or U+FFFD")
    d.add_argument("--cache-dir", help="where token files are cached (default $MINIGPT2_CACHE or ~/.cache/minigpt2/tokens)")
    d.add_argument("--tokenizer", help="where vocab.json + merges.txt come from (default: the model's, or gpt2's)")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="what to fine-tune: gpt2[-medium|-large|-xl], a hub id, a checkpoint (default gpt2)")
    m.add_argument("--init-preset", choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"], help="start from random weights of this shape instead")
    m.add_argument("--n-layer", type=arg_int(low=1), help="with --init-preset: number of blocks")
    m.add_argument("--n-head", type=arg_int(low=1), help="with --init-preset: attention heads")
    m.add_argument("--n-embd", type=arg_int(low=1), help="with --init-preset: width")
    m.add_argument("--context", type=arg_int(low=1), help="with --init-preset: context length (positions)")
    m.add_argument("--dropout", type=arg_float(low=0, high=1, high_open=True), help="dropout probability (default: the model's own)")
    t = p.add_argument_group("training")
    t.add_argument("--out", required=True, help="run directory (must not exist, unless --resume)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--steps", type=arg_int(low=1), help="optimizer steps (default: one epoch)")
    t.add_argument("--epochs", type=arg_float(low=0, low_open=True), help="passes over the training text")
    t.add_argument("--tokens", type=arg_float(low=1), help="training tokens")
    t.add_argument("--batch-size", type=arg_int(low=1), help="sequences per micro-batch (default 4)")
    t.add_argument("--seq-len", type=arg_int(low=1), help="tokens per sequence (default: the model's context, at most 1024)")
    t.add_argument("--grad-accum", type=arg_int(low=1), help="micro-batches per optimizer step (default 1)")
    t.add_argument("--lr", type=arg_float(low=0, low_open=True), help="peak learning rate (default 3e-4)")
    t.add_argument("--min-lr", type=arg_float(low=0), help="final learning rate (default lr / 10)")
    t.add_argument("--warmup", type=arg_int(low=0), help="warm-up steps (default 5%% of the steps, at most 1000)")
    t.add_argument("--weight-decay", type=arg_float(low=0), help="AdamW weight decay on the linear layers' weights (default 0.1)")
    t.add_argument("--grad-clip", type=arg_float(low=0), help="clip the gradient norm to this; 0 to turn off (default 1.0)")
    t.add_argument("--seed", type=arg_int(low=0, high=SEED_MAX), help="seed for init, batches and dropout (default 0)")
    o = p.add_argument_group("evaluation, checkpoints, output")
    o.add_argument("--eval-every", type=arg_int(low=0), help="evaluate every N steps (default: a tenth of the steps)")
    o.add_argument("--eval-tokens", type=arg_int(low=1), help="tokens per eval set and evaluation (default 65536)")
    o.add_argument("--save-every", type=arg_int(low=0), help="checkpoint every N steps; 0: only at the end (default 1000)")
    o.add_argument("--snapshot-every", type=arg_int(low=0), help="record weight and activation drift every N steps")
    o.add_argument("--probe", help="probe prompt for the activation snapshots")
    o.add_argument("--log-every", type=arg_int(low=1), help="print a table row every N steps (default 10)")
    x = p.add_argument_group("hardware")
    x.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    x.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="compute precision (default auto)")
    x.add_argument("--compile", action="store_true", default=None, help="use torch.compile")
    x.add_argument("--shard", action="store_true", default=None,
                   help="under torchrun: shard weights, gradients and AdamW state over the ranks (FSDP) "
                        "instead of a full copy on each; on one process it changes nothing")
    x.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each block's activations in backward: less memory, ~1/3 more compute")
    return p


def merge_args(given: dict, out: Path, resume: bool, ranks: int = 1) -> dict:
    """Defaults, then (when resuming) the run's saved arguments, then what was given now."""
    explicit = {k: v for k, v in given.items() if v is not None}
    if not resume:
        return {**DEFAULTS, **explicit, "ranks": ranks}
    from minigpt2 import MiniGPT2Error

    try:
        saved = json.loads((out / "run.json").read_text())["args"]
    except (OSError, ValueError, KeyError):
        raise MiniGPT2Error(f"cannot resume: '{out}' is not a run directory (no readable run.json)") from None
    changed = [k for k in FIXED_ON_RESUME if k in explicit and explicit[k] != saved.get(k)]
    if changed:
        raise MiniGPT2Error(f"--resume cannot change {', '.join('--' + k.replace('_', '-') for k in changed)}: "
                            "the run would no longer continue exactly; start a new --out instead")
    if any(k in explicit for k in ("steps", "epochs", "tokens")):
        for k in ("steps", "epochs", "tokens"):
            saved.pop(k, None)
    merged = {**DEFAULTS, **saved, **explicit, "resume": True, "ranks": ranks}
    before = saved.get("batch_size", DEFAULTS["batch_size"]) * saved.get("grad_accum", 1) * saved.get("ranks", 1)
    if merged["batch_size"] * merged["grad_accum"] * ranks != before:
        raise MiniGPT2Error(
            f"--resume must keep the global batch of {before} sequences per step (--batch-size x --grad-accum x "
            f"ranks); with {ranks} rank(s) give --batch-size and --grad-accum whose product is {before / ranks:g}"
        )
    return merged


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Console:
    """The table on stdout, a progress bar (or plain progress lines) on stderr."""

    def __init__(self, log_every: int, show_mfu: bool):
        self.log_every, self.show_mfu = log_every, show_mfu
        self.tty = sys.stderr.isatty()
        self.header_done = False

    def bar(self, r):
        done = r["step"] / self.steps
        if self.tty:
            filled = int(30 * done)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {r['step']}/{self.steps} "
                             f"{100 * done:.0f}% ETA {format_duration(r['eta_s'])} ")
            sys.stderr.flush()
        else:
            print(f"progress: step {r['step']}/{self.steps} ({100 * done:.0f}%), ETA {format_duration(r['eta_s'])}",
                  file=sys.stderr, flush=True)

    def clear_bar(self):
        if self.tty:
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()

    def row(self, r):
        if not self.header_done:
            print(f"{'step':>7} | {'train loss':>10} | {'lr':>8} | {'grad norm':>9} | {'tokens/s':>9}"
                  + (" |   MFU" if self.show_mfu else ""))
            self.header_done = True
        mfu = f" | {100 * r['mfu']:4.1f}%" if self.show_mfu and r.get("mfu") is not None else ""
        print(f"{r['step']:>7} | {r['loss']:>10.4f} | {r['lr']:>8.2e} | {r['grad_norm']:>9.3f} | "
              f"{r['tokens_per_s']:>9,.0f}{mfu}", flush=True)

    def show(self, r):
        kind = r["type"]
        if kind == "start":
            self.steps = r["steps"]
            what = "resuming at" if r["resumed"] else "training from"
            print(f"{what} step {r['step']} of {r['steps']}: {r['params']:,} parameters, {r['tokens_per_step']:,} "
                  f"tokens per step, {r['device']}, {r['dtype']}", flush=True)
            if r.get("ranks", 1) > 1:
                print(f"{r['ranks']} ranks{' (sharded)' if r.get('sharded') else ''}: global batch {r['global_batch']} "
                      f"sequences per step", flush=True)
        elif kind == "train":
            if r["step"] % self.log_every == 0 or r["step"] == self.steps or r["step"] == 1:
                self.clear_bar()
                self.row(r)
                if not self.tty:
                    self.bar(r)
            if self.tty:
                self.bar(r)
        elif kind == "eval":
            self.clear_bar()
            print(f"eval step {r['step']:>5} | {r['set']}: loss {r['loss']:.4f}, ppl {r['ppl']:.2f}, "
                  f"bpc {r['bpc']:.4f} ({r['eval_tokens']:,} tokens)", flush=True)
        elif kind in ("checkpoint", "done"):
            self.clear_bar()
            print(f"saved {r['path']} (step {r['step']})", flush=True)
        elif kind == "stopped":
            self.clear_bar()
            print(f"stopped by {r['reason']} at step {r['step']}: saved {r['checkpoint']}; "
                  f"continue with --resume", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ns = parser().parse_args(argv)
    from minigpt2 import MiniGPT2Error, distributed

    rank = os.environ.get("RANK", "0") if distributed.launched_by_torchrun() else "0"
    where = "" if rank == "0" else f"(rank {rank}) "
    try:
        return run(ns)
    except MiniGPT2Error as e:
        distributed.teardown()
        print(f"\nerror: {where}{e}" if sys.stderr.isatty() else f"error: {where}{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before training started (or a second Ctrl-C): nothing to save
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not distributed.is_peer_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {where}another process of this torchrun job failed or was stopped ({first}); the "
              f"checkpoints already in '{ns.out}' are complete: continue with --resume", file=sys.stderr)
        return 1


def run(ns) -> int:
    import dataclasses

    from minigpt2 import MiniGPT2Error, distributed, load_tokenizer
    from minigpt2.data import check_inputs, compile_drop_lines, prepare_corpus
    from minigpt2.snapshots import DEFAULT_PROBE, Snapshotter
    from minigpt2.trainer import (TrainConfig, Trainer, autocast_dtype, check_out_dir, start_model, steps_for,
                                  tokenizer_source_for)

    out = Path(ns.out)
    resume_from = check_out_dir(out, ns.resume)
    a = merge_args({k: v for k, v in vars(ns).items() if k not in ("out", "resume")}, out, ns.resume,
                   ranks=distributed.world_size_from_env())
    if a.get("model") and a.get("init_preset"):
        raise MiniGPT2Error("give --model or --init-preset, not both")
    if not a.get("init_preset") and any(a.get(k) is not None for k in ("n_layer", "n_head", "n_embd", "context")):
        raise MiniGPT2Error("--n-layer, --n-head, --n-embd and --context only apply with --init-preset")
    if not a.get("data"):
        raise MiniGPT2Error("--data is required: the text files, directories or globs to train on")
    source = None if a.get("init_preset") else (a.get("model") or "gpt2")

    # 1. Check every input before anything heavy: a bad file fails in a second. Under torchrun,
    # join the other ranks (after all have checked --out: nothing is written before that).
    ctx = distributed.setup(a["device"])
    ctx.barrier()
    device = ctx.device
    say = print if ctx.is_main else (lambda *args, **kwargs: None)
    dtype = autocast_dtype(a["dtype"], device)
    compile_drop_lines(a.get("drop_lines"))
    train_files = check_inputs(a["data"], a["encoding_errors"])
    val_files = check_inputs(a["val_data"], a["encoding_errors"]) if a.get("val_data") else None
    eval_files = [check_inputs([f], a["encoding_errors"]) for f in a.get("eval_data") or []]

    # 2. Tokenize (or find in the cache).
    tok_source = a.get("tokenizer") or source or "gpt2"
    enc = load_tokenizer(tok_source)
    common = dict(drop_lines=a.get("drop_lines"), encoding_errors=a["encoding_errors"], cache_dir=a.get("cache_dir"))
    with ctx.main_first():  # rank 0 fills the cache; the others then read it
        corpus = prepare_corpus(train_files, enc, val_fraction=0.0 if val_files else a["val_fraction"], **common)
        eval_sets = {}
        if val_files:
            eval_sets["val"] = prepare_corpus(val_files, enc, **common).train
        elif corpus.val is not None and len(corpus.val) > 1:
            eval_sets["val"] = corpus.val
        for files in eval_files:
            eval_sets[files[0].path.stem] = prepare_corpus(files, enc, **common).train
    s = corpus.summary()
    say(f"data: {len(s['files'])} file(s), {s['chars']:,} characters, {s['tokens']:,} tokens "
          f"({s['tokens_per_char']:.2f} tokens per character; {s['train_tokens']:,} for training"
          f"{', from the cache' if corpus.cached else ''})", flush=True)
    for name, data in eval_sets.items():
        say(f"eval set {name}: {data.chars:,} characters, {len(data):,} tokens ({data.tokens_per_char:.2f} per character)")

    # 3. The model, the plan, the trainer.
    overrides = {"n_layer": a.get("n_layer"), "n_head": a.get("n_head"), "n_embd": a.get("n_embd"),
                 "n_positions": a.get("context")}
    model = start_model(source, a.get("init_preset"), overrides, seed=a["seed"], dropout=a.get("dropout"))
    seq_len = a["seq_len"] or min(model.config.n_positions, 1024)
    tokens_per_step = a["batch_size"] * seq_len * a["grad_accum"] * ctx.world_size
    steps = steps_for(steps=a.get("steps"), epochs=a.get("epochs"), tokens=a.get("tokens"),
                      train_tokens=len(corpus.train), tokens_per_step=tokens_per_step)
    config = TrainConfig(steps=steps, batch_size=a["batch_size"], seq_len=seq_len, grad_accum=a["grad_accum"],
                         lr=a["lr"], min_lr=a.get("min_lr"), warmup=a.get("warmup"), weight_decay=a["weight_decay"],
                         grad_clip=a["grad_clip"], eval_every=a.get("eval_every"), eval_tokens=a["eval_tokens"],
                         save_every=a["save_every"], snapshot_every=a["snapshot_every"], seed=a["seed"],
                         ranks=ctx.world_size)
    snapshotter = None
    if config.snapshot_every:
        probe = a.get("probe") or DEFAULT_PROBE
        snapshotter = Snapshotter(model, enc.encode(probe), probe)
    trainer = Trainer(model, corpus.train, eval_sets, config, out, device=device, dtype=dtype,
                      compile=bool(a.get("compile")), tokenizer_source=tokenizer_source_for(tok_source),
                      snapshotter=snapshotter, dist=ctx, shard=bool(a.get("shard")),
                      activation_checkpointing=bool(a.get("activation_checkpointing")))
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
        if trainer.step >= config.steps:
            raise MiniGPT2Error(f"the run in '{out}' already reached step {trainer.step} of {config.steps}; "
                                "give a larger --steps (or --epochs/--tokens) to train further")
    elif ctx.is_main:
        info = {"model": source, "init_preset": a.get("init_preset"), "config": dataclasses.asdict(model.config),
                "train": dataclasses.asdict(config), "args": a, "data": s,
                "eval_sets": {n: {"chars": d.chars, "tokens": len(d), "tokens_per_char": d.tokens_per_char}
                              for n, d in eval_sets.items()},
                "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (out / "run.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # 4. Train. The first Ctrl-C / SIGTERM asks for a checkpoint and a clean stop; a second
    # Ctrl-C interrupts at once.
    def on_signal(signum, frame):
        trainer.request_stop(signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    console = Console(a["log_every"], show_mfu=trainer.peak_flops is not None)
    stopped = False
    for record in trainer.run():
        if ctx.is_main:
            console.show(record)
        stopped = stopped or record["type"] == "stopped"
    distributed.teardown()
    return 128 + getattr(signal, trainer.stop_reason or "SIGINT") if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
