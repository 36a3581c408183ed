"""Does bfloat16 autocast learn the same as float32? The same run twice, side by side, same seed.

A tiny GPT (2 layers, width 128, context 128) over UTF-8 bytes (a vocabulary of 256, so that
bfloat16 stays affordable on CPUs that only emulate it) trains on 红楼梦 with minigpt2's real
`Trainer.train_step`, once in float32 and once under bfloat16 autocast: the same starting
weights, the same batches, the steps taking turns (so a busy machine slows both alike). Printed:
the training loss of both every few steps, the held-out bits per character on 鲁迅小说集 (never
trained on) at the end, and the speed of each. `--dtype auto` (minigpt2/device.py) uses bfloat16
on a CPU only where it is native (AVX-512 BF16, AMX); this script is the "learns the same" half
of that decision, bench_train.py --dtypes the "faster" half (at the 124M shape).

    MINIGPT2_SHARED_DATA=/work/shared/data python benchmarks/bench_cpu_dtype.py [--steps 300]

The last line: held-out bits per character of both, and the speed ratio bfloat16 / float32.
"""

import argparse
import copy
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from minigpt2 import GPT, GPTConfig
from minigpt2.training.data import TokenFile
from minigpt2.training.trainer import TrainConfig, Trainer


def byte_tokens(text: str, path: Path) -> TokenFile:
    """The text as UTF-8 bytes, one token each, in a token file (bits per character stay per character)."""
    np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16).tofile(path)
    return TokenFile(path, chars=len(text), name=path.stem)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--every", type=int, default=25, help="print the losses every this many steps")
    p.add_argument("--eval-tokens", type=int, default=32768)
    args = p.parse_args()
    data = Path(os.environ.get("MINIGPT2_SHARED_DATA", "/work/shared/data"))
    if not (data / "zh" / "鲁迅小说集.txt").is_file():
        print(f"error: no {data / 'zh'} with the novels: set MINIGPT2_SHARED_DATA", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, n_positions=128, n_layer=2, n_head=4, n_embd=128))
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    with tempfile.TemporaryDirectory() as tmp:
        train = byte_tokens((data / "zh" / "红楼梦.txt").read_text(encoding="utf-8")[:1_000_000], Path(tmp) / "train")
        held_out = byte_tokens((data / "zh" / "鲁迅小说集.txt").read_text(encoding="utf-8")[:200_000], Path(tmp) / "lx")
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=128, lr=args.lr,
                             eval_tokens=args.eval_tokens)  # fmt: skip
        trainers = {
            name: Trainer(copy.deepcopy(model), train, {"鲁迅小说集": held_out}, config, Path(tmp) / name, dtype=dtype)
            for name, dtype in dtypes.items()
        }
        losses = {name: [] for name in trainers}
        seconds = {name: [] for name in trainers}
        print(f"{'step':>5} | {'float32 loss':>12} | {'bfloat16 loss':>13}")
        for step in range(args.steps):
            order = list(trainers) if step % 2 == 0 else list(trainers)[::-1]
            for name in order:
                record = trainers[name].train_step()
                losses[name].append(record["loss"])
                seconds[name].append(record["step_s"])
            if (step + 1) % args.every == 0 or step == 0:
                window = slice(max(0, step + 1 - args.every), step + 1)  # the mean over the last steps
                f32, bf16 = (statistics.mean(losses[n][window]) for n in trainers)
                print(f"{step + 1:>5} | {f32:>12.4f} | {bf16:>13.4f}", flush=True)
        bpc = {}
        for name, trainer in trainers.items():
            records = [r for r in trainer.evaluate() if r["type"] == "eval"]
            bpc[name] = records[0]["bpc"]
    speed = {n: statistics.median(s) for n, s in seconds.items()}
    for name in trainers:
        print(f"{name}: held-out bits per character {bpc[name]:.4f}; median step {speed[name] * 1000:.0f} ms")
    pairs = [a / b for a, b in zip(seconds["float32"], seconds["bfloat16"])]
    print(
        f"held-out bpc float32 {bpc['float32']:.4f}, bfloat16 {bpc['bfloat16']:.4f} "
        f"({bpc['bfloat16'] / bpc['float32'] - 1:+.2%}); speed bfloat16 / float32 {statistics.median(pairs):.2f}x "
        f"({torch.get_num_threads()} threads, {os.getloadavg()[0]:.1f} load)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
