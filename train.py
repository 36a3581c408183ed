"""Fine-tune GPT-2 (or train one from scratch) on your text, with evaluation as it goes.

    python train.py --data novels/ --out runs/zh                               # fine-tune gpt2
    python train.py --data novels/ --eval-data luxun.txt --out runs/zh --resume  # continue it
    python train.py --data zh/ --init-preset gpt2 --n-layer 2 --n-head 2 --n-embd 64 --context 64 \\
        --tokenizer data/gpt2 --out runs/tiny --steps 200                         # tiny, from scratch

Ctrl-C, SIGTERM or SIGHUP saves a checkpoint and stops; --resume continues exactly where it stopped.
On a CPU the defaults are sized to show learning within minutes (they are printed at the start).

    torchrun --nproc_per_node=8 train.py --data novels/ --out runs/zh [--shard]   # 8 GPUs, data parallel
"""

import argparse
import os
import signal
import sys


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
    d.add_argument("--extend-vocab", type=arg_int(low=1), metavar="N", help="learn N new tokens (BPE merges) from the "
                   "training text, grow the tokenizer and the model's embedding with them (Chinese: ~2.1 -> ~0.9 "
                   "tokens per character at 8000)")
    d.add_argument("--vocab-from", nargs="+", action="extend", metavar="PATH", help="with --extend-vocab: learn the "
                   "new tokens from these texts instead of --data")
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
    t.add_argument("--steps", type=arg_int(low=1), help="optimizer steps (default: 1000 on a CPU, one epoch on a GPU)")
    t.add_argument("--epochs", type=arg_float(low=0, low_open=True), help="passes over the training text")
    t.add_argument("--tokens", type=arg_float(low=1), help="training tokens")
    t.add_argument("--batch-size", type=arg_int(low=1), help="sequences per micro-batch (default 4)")
    t.add_argument("--seq-len", type=arg_int(low=1), help="tokens per sequence (default: 128 on a CPU, the model's "
                   "context (at most 1024) on a GPU)")
    t.add_argument("--grad-accum", type=arg_int(low=1), help="micro-batches per optimizer step (default 1)")
    t.add_argument("--lr", type=arg_float(low=0, low_open=True), help="peak learning rate (default 3e-4)")
    t.add_argument("--min-lr", type=arg_float(low=0), help="final learning rate (default lr / 10)")
    t.add_argument("--warmup", type=arg_int(low=0), help="warm-up steps (default 5%% of the steps, at most 1000)")
    t.add_argument("--weight-decay", type=arg_float(low=0), help="AdamW weight decay on the linear layers' weights "
                   "(default 0.1)")
    t.add_argument("--grad-clip", type=arg_float(low=0), help="clip the gradient norm to this; 0 to turn off "
                   "(default 1.0)")
    t.add_argument("--seed", type=arg_int(low=0, high=SEED_MAX), help="seed for init, batches and dropout (default 0)")
    t.add_argument("--keep-last", type=arg_int(low=0), help="step checkpoints to keep; older ones are deleted once a "
                   "newer one is saved (final/ is always kept; 0 keeps all; default 3)")
    o = p.add_argument_group("evaluation, checkpoints, output")
    o.add_argument("--eval-every", type=arg_int(low=0), help="evaluate every N steps (default: 100 on a CPU, a tenth "
                   "of the steps on a GPU)")
    o.add_argument("--eval-tokens", type=arg_int(low=1), help="tokens per eval set and evaluation (default 4096 on a "
                   "CPU, 65536 on a GPU)")
    o.add_argument("--save-every", type=arg_int(low=0), help="checkpoint every N steps; 0: only at the end (default "
                   "250 on a CPU, 1000 on a GPU)")
    o.add_argument("--snapshot-every", type=arg_int(low=0), help="record weight and activation drift every N steps")
    o.add_argument("--probe", help="probe prompt for the activation snapshots")
    o.add_argument("--log-every", type=arg_int(low=1), help="print a table row every N steps (default 10)")
    lo = p.add_argument_group("LoRA: learn a low-rank update instead of every weight")
    lo.add_argument("--lora", type=arg_int(low=1), metavar="R", help="rank of the update of each targeted layer "
                    "(e.g. 8); everything else stays frozen and AdamW keeps state only for the update")
    lo.add_argument("--lora-alpha", type=arg_float(low=0, low_open=True), metavar="A", help="the update is scaled "
                    "by A / R (default 8)")
    lo.add_argument("--lora-dropout", type=arg_float(low=0, high=1, high_open=True), metavar="P",
                    help="dropout on the update's input (default 0)")
    lo.add_argument("--lora-targets", metavar="LIST", help="comma-separated layers of every block to adapt (default "
                    "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj)")
    x = p.add_argument_group("hardware")
    x.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    x.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="compute precision (default auto)")
    x.add_argument("--compile", action="store_true", default=None, help="use torch.compile")
    x.add_argument("--shard", action="store_true", default=None,
                   help="under torchrun: shard weights, gradients and AdamW state over the ranks (FSDP) "
                        "instead of a full copy on each; on one process it changes nothing")
    x.add_argument("--threads", type=arg_int(low=1), help="CPU threads for PyTorch (default: its own choice, one per core); "
                   "on a machine shared with other jobs, 1 or 2 is often faster")
    x.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each block's activations in backward: less memory, ~1/3 more compute")
    return p


def main(argv=None) -> int:
    ns = parser().parse_args(argv)
    import torch

    from minigpt2 import MiniGPT2Error, distributed
    from minigpt2.errors import user_message

    if ns.threads:
        torch.set_num_threads(ns.threads)
    rank = os.environ.get("RANK", "0") if distributed.launched_by_torchrun() else "0"
    where = "" if rank == "0" else f"(rank {rank}) "
    try:
        return train(ns)
    except MiniGPT2Error as e:
        distributed.teardown()
        message = user_message(e, {"n_positions": "--context"})
        print(f"\nerror: {where}{message}" if sys.stderr.isatty() else f"error: {where}{message}", file=sys.stderr)
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


def train(ns) -> int:
    from minigpt2 import distributed, launch
    from minigpt2.console import TrainConsole

    given = {k: v for k, v in vars(ns).items() if k not in ("out", "resume", "threads")}
    ctx = distributed.setup(ns.device or (launch.saved_option(ns.out, "device") if ns.resume else None) or "auto")
    console = TrainConsole()
    s = launch.setup(given, ns.out, ns.resume, console.show if ctx.is_main else (lambda r: None), ctx)
    trainer = s.trainer
    console.log_every, console.show_mfu = s.options["log_every"], trainer.peak_flops is not None

    # The first Ctrl-C (or SIGTERM, or SIGHUP: the terminal was closed) asks for a checkpoint and
    # a clean stop; a second Ctrl-C interrupts at once.
    def on_signal(signum, frame):
        trainer.request_stop(signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    stopped = False
    for record in trainer.run():
        if ctx.is_main:
            console.show(record)
            if record["type"] == "start":
                console.defaults({k: s.options[k] for k in s.defaults_used}, str(trainer.device))
                if s.schedule_change:
                    console.schedule(s.schedule_change)
        stopped = stopped or record["type"] == "stopped"
    console.finish()
    s.run.unlock()
    distributed.teardown()
    return 128 + getattr(signal, trainer.stop_reason or "SIGINT") if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
