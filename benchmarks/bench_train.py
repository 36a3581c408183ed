"""Training speed, side by side: minigpt2's training step vs transformers' GPT2LMHeadModel + AdamW,
and vs the plainest fast PyTorch GPT-2 (benchmarks/plain_gpt2.py: SDPA, fused AdamW where CUDA).

Both get the same random 124M-shape weights and the same token windows. minigpt2 runs
`Trainer.train_step` (its real loop: AdamW with decay groups, clipping, the sampler); transformers
runs what its Trainer runs underneath: `model(input_ids, labels=...)`, backward, gradient
clipping at 1.0, torch's AdamW (default implementation), zero_grad. Steps alternate between the
two (and which goes first), so a busy machine slows both alike; the median step time gives
tokens/s, and the ratio is the median over neighbouring pairs of steps. minigpt2 runs as on a GPU
run: its steps are not read to the host (the loss stays on the device) except every tenth.

    python benchmarks/bench_train.py                       # CPU: 4x128 and 1x512
    python benchmarks/bench_train.py --device cuda --shapes 16x1024 --dtype bfloat16 [--compile]
    python benchmarks/bench_train.py --ranks 2              # data-parallel scaling: bench_distributed.py

The last line is the ratio minigpt2 / transformers for every shape, then minigpt2 / plain PyTorch.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minigpt2 import GPT, GPTConfig
from minigpt2.data import TokenFile
from minigpt2.device import resolve_dtype
from minigpt2.flops import flops_per_token, peak_flops
from minigpt2.trainer import TrainConfig, Trainer
from minigpt2.weights import is_conv1d

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_gpt2 import optimizer_step, plain_step  # noqa: E402


def transformers_model(config: GPTConfig, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
            n_positions=config.n_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    return hf.to(device).train()


def same_weights(hf, config: GPTConfig) -> GPT:
    ours = GPT(config)
    with torch.no_grad():
        theirs = hf.transformer.state_dict()
        for name, p in ours.state_dict().items():
            if name == "lm_head.weight":
                continue
            t = theirs[name]
            p.copy_(t.t() if is_conv1d(name) else t)
    return ours


def main() -> int:
    if any(a == "--ranks" or a.startswith("--ranks=") for a in sys.argv[1:]):
        # Data-parallel scaling (N torchrun ranks over 1) is its own script; same arguments.
        script = Path(__file__).with_name("bench_distributed.py")
        os.execv(sys.executable, [sys.executable, str(script), *sys.argv[1:]])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["4x128", "1x512"], help="BxT shapes (default 4x128 1x512)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation and shape")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--layers", type=int, default=12, help="fewer blocks for a quick check (default 12)")
    p.add_argument("--json-out", metavar="FILE", help="also write the figures to this JSON file")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = GPTConfig.from_preset("gpt2", dropout=0.0, n_layer=args.layers)
    print(f"device {device}, autocast {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    ratios = []
    results = {}
    for shape in args.shapes:
        B, T = map(int, shape.split("x"))
        hf = transformers_model(config, device)
        ours = same_weights(hf, config)
        with tempfile.TemporaryDirectory() as tmp:
            tokens = np.random.default_rng(0).integers(0, config.vocab_size, 200_000, dtype=np.uint16)
            tokens.tofile(Path(tmp) / "tokens.bin")
            data = TokenFile(Path(tmp) / "tokens.bin", chars=len(tokens))
            trainer = Trainer(
                ours,
                data,
                {},
                TrainConfig(steps=10_000, batch_size=B, seq_len=T, lr=1e-4, warmup=0),
                Path(tmp) / "run",
                device=device,
                dtype=dtype,
                compile=args.compile,
            )
            decay = [p for n, p in hf.named_parameters() if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
            other = [p for n, p in hf.named_parameters() if not (p.dim() >= 2 and "wte" not in n and "wpe" not in n)]
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                lr=1e-4,
                betas=(0.9, 0.95),
            )
            hf_model = torch.compile(hf) if args.compile else hf

            def hf_step(i, trainer=trainer, hf_model=hf_model, hf=hf, opt=opt):
                x, _ = trainer.batch(i)  # the very windows minigpt2 trains on at step i
                optimizer_step(lambda: hf_model(input_ids=x, labels=x).loss, hf.parameters(), opt, device, dtype)

            times = {"minigpt2": [], "transformers": [], "plain PyTorch": []}

            def ours_step(i, trainer=trainer):
                trainer.step = i
                trainer.train_step(read=i % 10 == 0)  # as `Trainer.run` on a GPU: most steps not read
                if device.type == "cuda":
                    torch.cuda.synchronize()

            plain = plain_step(config, device, dtype, args.compile)

            def plain_train(i, trainer=trainer, plain=plain):
                x, y = trainer.batch(i)
                plain(x, y)

            steps = {"minigpt2": ours_step, "transformers": hf_step, "plain PyTorch": plain_train}
            for i in range(args.warmup + args.steps):
                order = list(steps) if i % 2 == 0 else list(steps)[::-1]  # alternate who goes first
                for name in order:
                    start = time.perf_counter()
                    steps[name](i)
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - start)
        speeds = {k: B * T / statistics.median(v) for k, v in times.items()}
        peak = peak_flops(device, dtype)
        for name, speed in speeds.items():
            mfu = f", MFU {100 * speed * flops_per_token(config, T) / peak:.1f}%" if peak else ""
            print(
                f"{shape:>8} {name:<12} {speed:>10,.1f} tokens/s (median of {args.steps} steps; best "
                f"{B * T / min(times[name]):,.1f}{mfu})"
            )
        # The ratio of each pair of neighbouring steps (same moment, same machine load), then the
        # median over pairs: robust against other jobs that come and go on a shared machine.
        pairs = [hf / ours for ours, hf in zip(times["minigpt2"], times["transformers"])]
        print(f"{shape:>8} paired step-time ratios transformers/minigpt2: " + " ".join(f"{r:.2f}" for r in pairs))
        plain_pairs = [p / ours for ours, p in zip(times["minigpt2"], times["plain PyTorch"])]
        ratios.append((shape, statistics.median(pairs), statistics.median(plain_pairs)))
        mfus = {k: v * flops_per_token(config, T) / peak if peak else None for k, v in speeds.items()}
        results[shape] = {k: {"tokens_per_s": speeds[k], "mfu": mfus[k]} for k in speeds} | {
            "ratio": ratios[-1][1],
            "ratio_to_plain": ratios[-1][2],
        }
        del hf, ours, trainer, opt, hf_step, ours_step, steps, plain, plain_train
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"device": str(device), "dtype": str(dtype), "shapes": results}))
    print(
        "minigpt2 / transformers: "
        + ", ".join(f"{shape} {r:.2f}x" for shape, r, _ in ratios)
        + "; minigpt2 / plain PyTorch: "
        + ", ".join(f"{shape} {r:.2f}x" for shape, _, r in ratios)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
