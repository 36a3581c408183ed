"""Fine-tune GPT-2 (or train one from scratch) on your text, with evaluation as it goes.

    python train.py --data novels/ --out runs/zh                               # fine-tune gpt2
    python train.py --data novels/ --eval-data luxun.txt --out runs/zh --resume  # continue it
    python train.py --data zh/ --init-preset gpt2 --n-layer 2 --n-head 2 --n-embd 64 --context 64 \\
        --tokenizer data/gpt2 --out runs/tiny --steps 200                         # tiny, from scratch

Ctrl-C, SIGTERM or SIGHUP saves a checkpoint and stops; --resume continues exactly where it stopped.
On a CPU the defaults are sized to show learning within minutes (they are printed at the start).

    torchrun --nproc_per_node=8 train.py --data novels/ --out runs/zh [--shard]   # 8 GPUs, data parallel
"""

from minigpt2.cli import start_script  # light: nothing below is imported yet

if __name__ == "__main__":
    start_script()  # first: Ctrl-C during the imports exits cleanly; closed or narrow streams work

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from minigpt2.checks import SEED_MAX, ArgumentParser, arg_float, arg_int  # noqa: E402

PRESETS = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
FLAGS = {"n_positions": "--context"}  # library parameter names that this script spells differently


# fmt: off
def parser() -> argparse.ArgumentParser:
    """Every option; values are checked here (finite, in range) before any data or model is loaded."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", action="extend", metavar="PATH", help="text files, folders, globs")
    d.add_argument("--val-data", nargs="+", action="extend", metavar="PATH", help="held-out text (default: the tail "
                   "of each --data document)")
    d.add_argument("--val-fraction", type=arg_float(low=0, high=1, high_open=True), help="share of each document held "
                   "out when there is no --val-data (default 0.005)")
    d.add_argument("--eval-data", nargs="+", action="extend", metavar="FILE", help="more texts to evaluate on")
    d.add_argument("--drop-lines", metavar="REGEX", help="leave out lines matching this regular expression")
    d.add_argument("--encoding-errors", choices=["strict", "replace"], help="non-UTF-8 bytes: an error or U+FFFD")
    d.add_argument("--cache-dir", help="token cache (default $MINIGPT2_CACHE or ~/.cache/minigpt2/tokens)")
    d.add_argument("--tokenizer", help="where vocab.json + merges.txt come from (default: the model's, or gpt2's)")
    d.add_argument("--extend-vocab", type=arg_int(low=1), metavar="N", help="learn N new tokens from the training "
                   "text; grow the tokenizer and the embedding (Chinese: 2.1 -> 0.9 tokens per character at 8000)")
    d.add_argument("--vocab-from", nargs="+", action="extend", metavar="PATH", help="learn them from these texts")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="gpt2[-medium|-large|-xl], a hub id or a checkpoint to fine-tune (default gpt2)")
    m.add_argument("--init-preset", choices=PRESETS, help="start from random weights of this shape instead")
    m.add_argument("--n-layer", type=arg_int(low=1), help="with --init-preset: number of blocks")
    m.add_argument("--n-head", type=arg_int(low=1), help="with --init-preset: attention heads")
    m.add_argument("--n-embd", type=arg_int(low=1), help="with --init-preset: width")
    m.add_argument("--context", type=arg_int(low=1), help="with --init-preset: context length (positions)")
    m.add_argument("--dropout", type=arg_float(low=0, high=1, high_open=True), help="dropout (default: the model's)")
    lo = p.add_argument_group("LoRA: learn a low-rank update of each targeted layer, everything else frozen")
    lo.add_argument("--lora", type=arg_int(low=1), metavar="R", help="rank of the update (e.g. 8)")
    lo.add_argument("--lora-alpha", type=arg_float(low=0, low_open=True), metavar="A", help="scale A/R (default 8)")
    lo.add_argument("--lora-dropout", type=arg_float(low=0, high=1, high_open=True), metavar="P", help="(default 0)")
    lo.add_argument("--lora-targets", metavar="LIST", help="comma-separated layers of each block "
                    "(default attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj)")
    t = p.add_argument_group("training (CPU defaults first, then GPU defaults)")
    t.add_argument("--out", required=True, help="the run directory (must not hold a run, unless --resume)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest good checkpoint")
    t.add_argument("--steps", type=arg_int(low=1), help="optimizer steps (default 500; one epoch)")
    t.add_argument("--epochs", type=arg_float(low=0, low_open=True), help="passes over the training text")
    t.add_argument("--tokens", type=arg_float(low=1), help="training tokens")
    t.add_argument("--batch-size", type=arg_int(low=1), help="sequences per micro-batch (default 4)")
    t.add_argument("--seq-len", type=arg_int(low=1), help="tokens per sequence (default 128; the context)")
    t.add_argument("--grad-accum", type=arg_int(low=1), help="micro-batches per optimizer step (default 1)")
    t.add_argument("--lr", type=arg_float(low=0, low_open=True), help="peak learning rate (default 3e-4)")
    t.add_argument("--min-lr", type=arg_float(low=0), help="final learning rate (default lr / 10)")
    t.add_argument("--warmup", type=arg_int(low=0), help="warm-up steps (default 5%% of the steps, at most 1000)")
    t.add_argument("--weight-decay", type=arg_float(low=0), help="AdamW decay of the linear weights (default 0.1)")
    t.add_argument("--grad-clip", type=arg_float(low=0), help="clip the gradient norm; 0: off (default 1.0)")
    t.add_argument("--seed", type=arg_int(low=0, high=SEED_MAX), help="for init, batches and dropout (default 0)")
    o = p.add_argument_group("evaluation, checkpoints, output (CPU defaults first, then GPU defaults)")
    o.add_argument("--eval-every", type=arg_int(low=0), help="evaluate every N steps (default 50; steps/10)")
    o.add_argument("--eval-tokens", type=arg_int(low=1), help="tokens per eval set (default 4096; 65536)")
    o.add_argument("--save-every", type=arg_int(low=0), help="checkpoint every N steps; 0: at the end (100; 1000)")
    o.add_argument("--keep-last", type=arg_int(low=0), help="step checkpoints kept (final/ always; 0: all; default 3)")
    o.add_argument("--snapshot-every", type=arg_int(low=0), help="record weight and activation drift every N steps")
    o.add_argument("--probe", help="probe prompt for the activation snapshots")
    o.add_argument("--log-every", type=arg_int(low=1), help="print a table row every N steps (default 10)")
    x = p.add_argument_group("hardware")
    x.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    x.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="compute precision")
    x.add_argument("--threads", type=arg_int(low=1), help="CPU threads (default: one per core); on a machine "
                   "shared with other jobs, 1 or 2 is often faster")
    x.add_argument("--compile", action="store_true", default=None, help="use torch.compile")
    x.add_argument("--shard", action="store_true", default=None, help="under torchrun: shard weights, gradients "
                   "and AdamW state over the ranks (FSDP)")
    x.add_argument("--activation-checkpointing", action="store_true", default=None, help="recompute each block's "
                   "activations in backward: less memory, ~1/3 more compute")
    return p
# fmt: on


def main(argv=None) -> int:
    ns = parser().parse_args(argv)
    import torch

    from minigpt2 import distributed
    from minigpt2.cli import error, run_script

    if ns.threads:
        torch.set_num_threads(ns.threads)

    def body() -> int:
        try:
            return train(ns)
        except Exception as e:
            peer_failed = distributed.is_peer_failure(e)  # (asks the process group: before teardown)
            distributed.teardown()
            if not peer_failed:
                raise
            return error(
                f"{distributed.rank_prefix()}{distributed.peer_failure_message(e)}; the checkpoints already "
                f"in '{ns.out}' are complete: continue with --resume"
            )

    return run_script(body, FLAGS, distributed.rank_prefix())


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
        stopped = stopped or record["type"] == "stopped"
        if ctx.is_main:
            console.show(record)
            if record["type"] == "start":
                console.defaults({k: s.options[k] for k in s.defaults_used}, str(trainer.device))
                console.schedule(s.schedule_change)
    console.finish()
    s.run.unlock()
    distributed.teardown(finished=True)
    return 128 + getattr(signal, trainer.stop_reason, signal.SIGINT) if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
