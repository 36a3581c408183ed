"""Fine-tune GPT-2 (or train one from scratch) on your text, with evaluation as it goes.

    python train.py --data novels/ --out runs/zh                               # fine-tune gpt2
    python train.py --data novels/ --eval-data luxun.txt --out runs/zh --resume  # continue it
    python train.py --data novels/ --out runs/zh --tensorboard    # then: tensorboard --logdir runs/
    python train.py --data zh/ --init-preset gpt2 --n-layer 2 --n-head 2 --n-embd 64 --context 64 \\
        --tokenizer data/gpt2 --out runs/tiny --steps 200                         # tiny, from scratch

Ctrl-C, SIGTERM or SIGHUP saves a checkpoint and stops; --resume continues exactly where it stopped.
On a CPU the defaults are sized to show learning within minutes (they are printed at the start).

    torchrun --nproc_per_node=8 train.py --data novels/ --out runs/zh [--shard]   # 8 GPUs, data parallel
"""

from minigpt2.cli import start_script  # light: nothing below is imported yet

if __name__ == "__main__":
    start_script()  # first: Ctrl-C during the imports exits cleanly; closed or narrow streams work

import signal  # noqa: E402
import sys  # noqa: E402

from minigpt2.training.options import build_parser  # noqa: E402

FLAGS = {"n_positions": "--context"}  # library parameter names that this script spells differently


def parser():
    """Every option (declared in minigpt2/training/options.py); values are checked here (finite, in range) before any
    data or model is loaded."""
    return build_parser(__doc__)


def main(argv=None) -> int:
    from minigpt2.training.options import TrainOptions

    ns = TrainOptions(**vars(parser().parse_args(argv)))
    import torch

    from minigpt2.cli import error, run_script
    from minigpt2.training import distributed

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


def train(given) -> int:
    from minigpt2.console import TrainConsole
    from minigpt2.training import distributed
    from minigpt2.training import setup_run as launch
    from minigpt2.training.watch import TensorBoardLog, require_tensorboard, tensorboard_dir

    if given.tensorboard is not None:  # a missing optional package fails before any work
        require_tensorboard()
        launch.check_tensorboard_dir(given.out, given.tensorboard)
    saved = launch.read_saved(given.out) if given.resume else launch.SavedRun(None, None)  # run.json, read once
    ctx = distributed.setup(given.device or (saved.args or {}).get("device") or "auto")
    console = TrainConsole()
    s = launch.setup(given, saved, console.show if ctx.is_main else (lambda r: None), ctx)
    trainer = s.trainer
    console.log_every, console.show_mfu = s.options.log_every, trainer.peak_flops is not None
    board = None
    if given.tensorboard is not None and ctx.is_main:
        board = TensorBoardLog(tensorboard_dir(given.out, given.tensorboard), resumed_at=trainer.step)

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
            if board is not None:
                board.write(record)
            if record["type"] == "start":
                console.defaults(s.options, s.defaults_used, str(trainer.device))
                console.schedule(s.schedule_change)
    console.finish()
    if board is not None:
        board.close()
    s.run.unlock()
    if stopped and ctx.is_main and trainer.resumed_from is None and trainer.step == 0:
        print(f"note: {launch.discard_unstarted(s.run, resumed=bool(given.resume))}", file=sys.stderr)
    distributed.teardown(finished=True)
    return 128 + getattr(signal, trainer.stop_reason, signal.SIGINT) if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
