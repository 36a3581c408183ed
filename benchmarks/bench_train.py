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
    python benchmarks/bench_train.py --dtypes float32 bfloat16   # minigpt2 against itself in two precisions

The last line is the ratio minigpt2 / transformers for every shape, then minigpt2 / plain PyTorch (with
--dtypes: minigpt2 in the second precision / in the first, both minigpt2's real step, taking turns the same way).
"""

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import random_token_file

from minigpt2 import GPT, GPTConfig
from minigpt2.device import resolve_dtype
from minigpt2.io.weights import is_conv1d
from minigpt2.model.flops import flops_per_token, peak_flops
from minigpt2.training.trainer import TrainConfig, Trainer

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
            vocab_size=config.vocab_size,
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
    p.add_argument("--dtypes", nargs=2, metavar=("A", "B"), help="race minigpt2 in precision A against B instead")
    p.add_argument("--layers", type=int, default=12, help="fewer blocks for a quick check (default 12)")
    p.add_argument("--vocab", type=int, default=50257, help="a smaller vocabulary for a quick check (default 50257)")
    p.add_argument("--json-out", metavar="FILE", help="also write the figures to this JSON file")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device, training=True)
    config = GPTConfig.from_preset("gpt2", dropout=0.0, n_layer=args.layers, vocab_size=args.vocab)
    dtypes = [resolve_dtype(d, device, training=True) for d in args.dtypes] if args.dtypes else None
    shown = " vs ".join(map(str, dtypes)) if dtypes else str(dtype)
    print(f"device {device}, autocast {shown}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    ratios = []
    results = {}
    for shape in args.shapes:
        B, T = map(int, shape.split("x"))
        hf = transformers_model(config, device)
        ours = same_weights(hf, config)
        with tempfile.TemporaryDirectory() as tmp:
            data = random_token_file(Path(tmp), config.vocab_size)

            def make_trainer(model, dtype, name, data=data, tmp=tmp, B=B, T=T):
                return Trainer(
                    model,
                    data,
                    {},
                    TrainConfig(steps=10_000, batch_size=B, seq_len=T, lr=1e-4, warmup=0),
                    Path(tmp) / name,
                    device=device,
                    dtype=dtype,
                    compile=args.compile,
                )

            if dtypes:
                del hf
                trainers = {
                    f"minigpt2 {str(d).removeprefix('torch.')}": make_trainer(copy.deepcopy(ours), d, f"run{i}")
                    for i, d in reversed(list(enumerate(dtypes)))  # B first: the ratio is B / A
                }
                times = race(trainers_steps(trainers), args, device)
                report(times, B, T, config, device, dtypes[0], args, ratios, results, shape)
                continue
            trainer = make_trainer(ours, dtype, "run")
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

            def ours_step(i, trainer=trainer):
                trainer.step = i
                trainer.train_step(read=i % 10 == 0)  # as `Trainer.run` on a GPU: most steps not read

            plain = plain_step(config, device, dtype, args.compile)

            def plain_train(i, trainer=trainer, plain=plain):
                x, y = trainer.batch(i)
                plain(x, y)

            steps = {"minigpt2": ours_step, "transformers": hf_step, "plain PyTorch": plain_train}
            times = race(steps, args, device)
        report(times, B, T, config, device, dtype, args, ratios, results, shape)
        del hf, ours, trainer, opt, hf_step, ours_step, steps, plain, plain_train
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"device": str(device), "dtype": shown, "shapes": results}))
    first, *others = list(results[args.shapes[0]])[: len(ratios[0][1]) + 1]
    print(
        "; ".join(
            f"{first} / {other}: " + ", ".join(f"{shape} {r[other]:.2f}x" for shape, r in ratios) for other in others
        )
    )
    return 0


def trainers_steps(trainers: dict) -> dict:
    """{name: step(i)} running each trainer's real step at step index i."""

    def step_of(trainer):
        def step(i):
            trainer.step = i
            trainer.train_step()

        return step

    return {name: step_of(t) for name, t in trainers.items()}


def race(steps: dict, args, device) -> dict:
    """Step times of each contestant, taking turns (and alternating who goes first)."""
    times = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        order = list(steps) if i % 2 == 0 else list(steps)[::-1]
        for name in order:
            start = time.perf_counter()
            steps[name](i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return times


def report(times, B, T, config, device, dtype, args, ratios, results, shape) -> None:
    """Print each contestant's tokens/s and the paired speed ratio of the first to each other; append to ratios
    and results."""
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
    first, *others = list(times)
    medians = {}
    for other in others:
        pairs = [b / a for a, b in zip(times[first], times[other])]
        print(f"{shape:>8} paired step-time ratios {other}/{first}: " + " ".join(f"{r:.2f}" for r in pairs))
        medians[other] = statistics.median(pairs)
    ratios.append((shape, medians))
    mfus = {k: v * flops_per_token(config, T) / peak if peak else None for k, v in speeds.items()}
    results[shape] = {k: {"tokens_per_s": speeds[k], "mfu": mfus[k]} for k in speeds} | {"ratios": medians}


if __name__ == "__main__":
    sys.exit(main())
