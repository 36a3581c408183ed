"""Data-parallel scaling: training tokens/s of N torchrun ranks over 1 rank.

Each rank runs minigpt2's real `Trainer.train_step` (DDP, or FSDP with --shard) on the same
per-rank batch, so N ranks process N times the tokens per step (weak scaling); perfect scaling
is a ratio of N. On the CPU the cores are split between the ranks (OMP_NUM_THREADS = cores / N),
so the ratio there measures the overhead of the gradient all-reduce against one process using
every core, not extra hardware.

    python benchmarks/bench_distributed.py                              # CPU: 1 vs 2 ranks
    python benchmarks/bench_distributed.py --device cuda --ranks 8 --preset gpt2 --shape 16x1024 --dtype bfloat16

The last line is the ratio (N ranks / 1 rank) and the per-rank efficiency.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """Under torchrun: time `--steps` training steps; rank 0 prints the global tokens/s."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from minigpt2 import GPT, GPTConfig
    from minigpt2.device import resolve_dtype
    from minigpt2.training import distributed
    from minigpt2.training.data import TokenFile
    from minigpt2.training.trainer import TrainConfig, Trainer

    ctx = distributed.setup(args.device)
    B, T = map(int, args.shape.split("x"))
    sizes = {k: v for k, v in (("n_layer", args.n_layer), ("n_embd", args.n_embd), ("n_head", args.n_head)) if v}
    config = GPTConfig.from_preset(args.preset, dropout=0.0, **sizes)
    torch.manual_seed(0)
    model = GPT(config)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, 200_000, dtype=np.uint16)
        tokens.tofile(Path(tmp) / "tokens.bin")
        data = TokenFile(Path(tmp) / "tokens.bin", chars=len(tokens))
        trainer = Trainer(
            model,
            data,
            {},
            TrainConfig(steps=10_000, batch_size=B, seq_len=T, lr=1e-4, warmup=0, ranks=ctx.world_size),
            Path(tmp) / f"run-{ctx.rank}",
            device=ctx.device,
            dtype=resolve_dtype(args.dtype, ctx.device),
            compile=args.compile,
            dist=ctx,
            shard=args.shard,
        )
        times = []
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            trainer.train_step()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    if ctx.is_main:
        print(f"RESULT {ctx.world_size} {B * T * ctx.world_size / statistics.median(times):.1f}", flush=True)
    distributed.teardown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="ranks to compare with 1 (default 2)")
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--n-layer", type=int, default=None, help="override the preset's blocks (CPU default 4)")
    p.add_argument("--n-embd", type=int, default=None, help="override the width (CPU default 256)")
    p.add_argument("--n-head", type=int, default=None, help="override the heads (CPU default 4)")
    p.add_argument("--shape", default="4x128", help="per-rank BxT (default 4x128)")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--shard", action="store_true", help="FSDP instead of DDP")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "cpu" and not (args.n_layer or args.n_embd or args.n_head):
        args.n_layer, args.n_embd, args.n_head = 4, 256, 4
    if args.worker:
        worker(args)
        return 0

    cores = os.cpu_count() or 1
    speeds = {}
    for n in (1, args.ranks):
        env = {**os.environ}
        if args.device == "cpu":
            env["OMP_NUM_THREADS"] = str(max(1, cores // n))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            str(Path(__file__).resolve()),
            "--worker",
            *sys.argv[1:],
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        found = re.search(r"^RESULT (\d+) ([\d.]+)$", result.stdout, re.M)
        if result.returncode != 0 or not found:
            print(result.stdout + result.stderr, file=sys.stderr)
            return 1
        speeds[n] = float(found.group(2))
        threads = env.get("OMP_NUM_THREADS", "default")
        print(
            f"{n} rank(s){' (sharded)' if args.shard else ''}: {speeds[n]:,.1f} tokens/s "
            f"(per-rank batch {args.shape}, {threads} threads per rank, {args.device})"
        )
    ratio = speeds[args.ranks] / speeds[1]
    print(f"{args.ranks} ranks / 1 rank: {ratio:.2f}x ({100 * ratio / args.ranks:.0f}% per rank)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
