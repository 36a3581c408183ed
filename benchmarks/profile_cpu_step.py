"""Where a CPU training step's time goes: one `Trainer.train_step` under torch.profiler.

The step's operators are grouped (matrix products, attention, the optimizer, LayerNorm, GELU,
the loss, the rest) by their own time (self CPU time, children excluded), and the matrix products'
rate is set against a plain float32 matmul of the model's largest shape measured beside it, in the
same process: the share of the step that is matmul, and how close those matmuls run to the rate
the CPU reaches on its own.

    python benchmarks/profile_cpu_step.py [--layers 12] [--shape 4x128] [--threads N]

The last line: the step's share in matrix products and their rate against the plain matmul.
"""

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import random_token_file
from torch.profiler import ProfilerActivity, profile

from minigpt2 import GPT, GPTConfig
from minigpt2.model.flops import flops_per_token
from minigpt2.training.trainer import TrainConfig, Trainer

GROUPS = {  # operator name fragments -> group (first match wins)
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "aten::softmax"),
    "optimizer (AdamW)": ("_foreach", "adam", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt"),
    "LayerNorm": ("layer_norm",),
    "GELU": ("gelu",),
    "loss (log-softmax, NLL)": ("log_softmax", "nll_loss", "cross_entropy"),
    "gradient clipping": ("aten::norm", "linalg_vector_norm", "clip_grad"),
    "embedding": ("embedding",),
    "copies, adds, views": ("aten::copy_", "aten::add", "aten::mul", "aten::fill_", "aten::zero_", "aten::clone"),
}


def group_of(name: str) -> str:
    low = name.lower()
    for group, parts in GROUPS.items():
        if any(p.lower() in low for p in parts):
            return group
    return "other"


def plain_matmul_rate(n: int, k: int, m: int, repeat: int = 5) -> float:
    """FLOP/s of a float32 (n, k) @ (k, m), best of `repeat`."""
    a, b = torch.randn(n, k), torch.randn(k, m)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n * k * m / best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--shape", default="4x128")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, T = map(int, args.shape.split("x"))
    config = GPTConfig.from_preset("gpt2", dropout=0.0, n_layer=args.layers)
    torch.manual_seed(0)
    model = GPT(config)
    with tempfile.TemporaryDirectory() as tmp:
        data = random_token_file(Path(tmp), config.vocab_size)
        trainer = Trainer(model, data, {}, TrainConfig(steps=100, batch_size=B, seq_len=T, warmup=0), Path(tmp) / "r")
        trainer.train_step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            trainer.train_step()
            step_s = time.perf_counter() - started
    rate = plain_matmul_rate(B * T, config.n_embd, 4 * config.n_embd)  # the MLP's product, the typical shape
    own = defaultdict(float)
    for event in prof.key_averages():
        own[group_of(event.key)] += event.self_cpu_time_total / 1e6
    total = sum(own.values())
    model_flops = flops_per_token(config, T) * B * T
    print(
        f"{args.layers} layers, {B}x{T}, float32, {torch.get_num_threads()} threads, load "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; step {step_s:.2f} s "
        f"({model_flops / step_s / 1e9:.1f} GFLOP/s of model FLOPs); plain matmul {rate / 1e9:.1f} GFLOP/s"
    )
    for group, seconds in sorted(own.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<26} {seconds:7.2f} s  {100 * seconds / total:5.1f}%")
    matmul_s = own["matrix products"]
    print(
        f"matrix products: {100 * matmul_s / total:.0f}% of the step's operator time; the whole step runs at "
        f"{100 * model_flops / step_s / rate:.0f}% of the plain matmul rate, its matmuls alone at "
        f"{100 * model_flops / max(matmul_s, 1e-9) / rate:.0f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
